"""Foreign keys checked set-based for bulk writes (PostgreSQL): `references_checked`.

PostgreSQL checks a foreign key with a trigger per row: a query with its own executor start-up for every row, at
commit (the constraints are deferred). For an import's chunk that was half of the database's work, more than the
rows and their indexes (docs/benchmarks.md, tenth round). Inside `references_checked` those per-row triggers are
not queued (session_replication_role = replica, for this block only); when the block ends, every foreign key of
the rows it wrote is checked with one query per table, which does what the triggers would have done: each
referenced row must exist, and is locked FOR KEY SHARE until the transaction ends, so that no other transaction
can delete it or change its key before this one commits. The constraints stay declared, and every other write is
checked by them as always.

Skipping the triggers needs the right to set session_replication_role: a superuser has it; on PostgreSQL 15 and
newer, `GRANT SET ON PARAMETER session_replication_role TO <role>` gives it to the service's role. Without it the
block changes nothing and PostgreSQL's own triggers check each row, more slowly. The skip covers every trigger that
does not fire in replica mode, not only foreign keys: tests/test_references.py asserts that the tables written in
such blocks have no other triggers that an INSERT fires, so a new one cannot be skipped unnoticed."""

from django.db import IntegrityError, connection, models, transaction

from core.db import array_literal


class references_checked:
    """A block of bulk inserts whose foreign keys are checked set-based when it ends (see the module). Declare what
    it wrote with `written(model, column, ids)`: the rows of `model` whose `column` (a unique, indexed one) is
    among `ids`. The block is its own savepoint: an error inside it, or a reference to a missing row, undoes all of
    it (IntegrityError). Elsewhere than PostgreSQL, or without the right, the triggers run as usual."""

    def __init__(self):
        self.writes: list[tuple[type[models.Model], str, list[int]]] = []
        self.skipping, self.before = False, None

    def __enter__(self):
        self.atomic = transaction.atomic()
        self.atomic.__enter__()
        try:
            self.skipping = connection.vendor == "postgresql" and _may_skip_triggers()
            if self.skipping:
                with connection.cursor() as cursor:
                    cursor.execute(
                        "SELECT current_setting('session_replication_role'), "
                        "set_config('session_replication_role', 'replica', true)"
                    )
                    self.before = cursor.fetchone()[0]
        except BaseException as exc:
            self.atomic.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    def written(self, model: type[models.Model], column: str, ids: list[int]) -> None:
        if self.skipping and ids:
            self.writes.append((model, column, ids))

    def __exit__(self, exc_type, exc, traceback):
        try:
            if exc_type is None and self.skipping:
                with connection.cursor() as cursor:
                    # Back to what it was before checking, so that the rest of the transaction is checked as usual.
                    cursor.execute("SELECT set_config('session_replication_role', %s, true)", [self.before])
                    for model, column, ids in self.writes:
                        foreign_keys_check(cursor, model, column, ids)
        except BaseException as error:
            self.atomic.__exit__(type(error), error, error.__traceback__)
            raise
        # On an error from the block, the savepoint's rollback undoes the setting too.
        return self.atomic.__exit__(exc_type, exc, traceback)


def _may_skip_triggers() -> bool:
    """Whether this connection's role may set session_replication_role, asked once per database connection."""
    connection.ensure_connection()
    pid = connection.connection.info.backend_pid
    known = getattr(connection, "_may_skip_triggers", None)
    if known is None or known[0] != pid:
        with connection.cursor() as cursor:
            if connection.pg_version >= 150000:
                cursor.execute("SELECT has_parameter_privilege('session_replication_role', 'SET')")
            else:  # before GRANT SET ON PARAMETER, only superusers may
                cursor.execute("SELECT current_setting('is_superuser') = 'on'")
            known = connection._may_skip_triggers = (pid, cursor.fetchone()[0])
    return known[1]


def foreign_keys_check(cursor, model: type[models.Model], column: str, ids: list[int]) -> None:
    """Every foreign key of the rows of `model` whose `column` is among `ids` names a row that exists, locked FOR KEY
    SHARE in key order; an IntegrityError names the constraint otherwise."""
    keys = _foreign_keys(model)
    if not keys:
        return
    ids = sorted(ids)
    if ids[-1] - ids[0] + 1 == len(set(ids)):  # one run of ids (the usual case): a range scan, not a probe per id
        where, params = f"{column} BETWEEN %s AND %s", [ids[0], ids[-1]]
    else:
        where, params = f"{column} = ANY(%s::bigint[])", [array_literal(ids)]
    missing = [
        # How many distinct values name no row: those named, less those found and locked. The bounds let the
        # planner read the referenced rows as one range where they lie together (rows written just before, as an
        # import's entries name its transactions): 40 % less time than a probe per row.
        f"(SELECT count(DISTINCT {key.column}) FROM new) - (SELECT count(*) FROM (SELECT FROM {table} r "
        f"WHERE r.{target} BETWEEN (SELECT min({key.column}) FROM new) AND (SELECT max({key.column}) FROM new) "
        f"AND r.{target} IN (SELECT {key.column} FROM new) ORDER BY r.{target} FOR KEY SHARE OF r) found)"
        for key, table, target in keys
    ]
    cursor.execute(
        f"WITH new AS MATERIALIZED (SELECT {', '.join(key.column for key, _, _ in keys)} "
        f"FROM {model._meta.db_table} WHERE {where}) SELECT {', '.join(missing)}",
        params,
    )
    for (key, table, target), count in zip(keys, cursor.fetchone(), strict=True):
        if count:
            raise IntegrityError(
                f"insert on table {model._meta.db_table} violates a foreign key: {count} value(s) of "
                f"{key.column} name no row of {table} ({target})"
            )


def _foreign_keys(model: type[models.Model]) -> list[tuple[models.Field, str, str]]:
    """(field, referenced table, referenced column) of each foreign key that the database enforces."""
    return [
        (field, field.related_model._meta.db_table, field.target_field.column)
        for field in model._meta.concrete_fields
        if field.is_relation and field.db_constraint
    ]
