"""Foreign keys checked set-based for bulk writes (PostgreSQL): `references_checked`.

PostgreSQL checks a foreign key with a trigger per row: a query with its own executor start-up for every row, at
commit (the constraints are deferred). For an import's chunk that was half of the database's work, more than the
rows and their indexes (docs/benchmarks.md, tenth round). Inside `references_checked` those per-row triggers are
not queued (session_replication_role = replica, for this block only); when the block ends, every foreign key of
the rows it wrote is checked with one query per table, which does what the triggers would have done: each
referenced row must exist, and is locked FOR KEY SHARE until the transaction ends, so that no other transaction
can delete it or change its key before this one commits. A reference to a row that this transaction inserted
itself (Block.own: the block's own rows, or an import chunk's purchases written before its ledger rows) is checked
by counting those rows once, by ranges of their keys, with no probe and no lock: no other transaction can see
them. Nor is a reference to a row the transaction holds locked (Block.holds: the accounts a bulk credit locked),
which no other transaction can delete or re-key before it commits. The constraints stay declared, and every other
write is checked by them as always.

Skipping the triggers needs the right to set session_replication_role (a superuser has it; on PostgreSQL 15 and
newer, `GRANT SET ON PARAMETER session_replication_role TO <role>` gives it to the service's role) and, for the
locks, SELECT and UPDATE on the tables referred to (the triggers run as those tables' owner; the role that ran the
migrations owns them all). It is asked at the start of every block, in the statement that sets the role. Without it
the block changes nothing and PostgreSQL's triggers check each row, more slowly. The skip covers every trigger that
does not fire in replica mode, not only foreign keys: tests/test_references.py asserts that the tables written in
such blocks have no other trigger that an INSERT fires, so a new one cannot be skipped unnoticed. Changing the role
makes PostgreSQL drop the connection's cached plans, twice a block: blocks are for batch work, whose statements are
not prepared (core.db.batch_statements)."""

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

from django.db import IntegrityError, connection, models, transaction

from core.db import array_literal


class Block:
    """What a references_checked block wrote (`written`), the rows its transaction wrote itself (`own`), and whether
    it skips the triggers."""

    def __init__(self, into: tuple[type[models.Model], ...]):
        self.models = into
        self.writes: list[tuple[type[models.Model], str, list[int]]] = []
        self.owned: dict[type[models.Model], list[int]] = {}
        self.locked: dict[type[models.Model], list[int]] = {}
        self.skipping = False

    def written(self, model: type[models.Model], column: str, ids: list[int]) -> None:
        """The rows of `model` whose `column` (a unique, indexed one) is among `ids` were written in the block.
        Declared by their primary keys, they must be rows the block inserted (COPY, or RETURNING of an INSERT), for
        they are then taken as the transaction's own (`own`)."""
        assert model in self.models, f"{model.__name__} is not among the block's models"
        if self.skipping and ids:
            self.writes.append((model, column, ids))
            if column == model._meta.pk.column:
                self.own(model, ids)

    def own(self, model: type[models.Model], ids: list[int]) -> None:
        """The rows of `model` with these primary keys were inserted by this database transaction, with keys it drew
        from the table's sequence: no other transaction can see them, so none can delete them or change their keys
        before it commits. A reference to one of them is checked by counting them, not by a probe and a lock each.
        Only ids of rows this transaction inserted itself (a COPY's, an INSERT's RETURNING) may be given: a row of
        another transaction's would pass the count unlocked, and could be deleted before this one commits."""
        if self.skipping and ids:
            self.owned.setdefault(model, []).extend(ids)

    def holds(self, model: type[models.Model], ids: list[int]) -> None:
        """This database transaction holds a row lock on the rows of `model` with these primary keys: they exist,
        and no other transaction can delete them or change their keys before it commits (each row lock blocks
        both). A reference to one of them needs no probe and no lock. Only keys that a locking query of this
        transaction returned (SELECT ... FOR UPDATE) may be given, or an INSERT of its own (RETURNING): no other
        transaction sees such a row before this one commits."""
        if self.skipping and ids:
            self.locked.setdefault(model, []).extend(ids)


@contextmanager
def references_checked(*into: type[models.Model]) -> Iterator[Block]:
    """A block of bulk inserts into the tables of `into`, whose foreign keys are checked set-based when it ends (see
    the module); it declares what it wrote with `written`. The block is its own savepoint: an error inside it, or a
    reference to a missing row, undoes all of it (IntegrityError), the role included. Elsewhere than PostgreSQL, or
    without the rights, the triggers run as usual."""
    block = Block(into)
    with transaction.atomic():
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                may, params = _may_skip(into)
                cursor.execute(
                    "SELECT current_setting('session_replication_role'), "
                    f"CASE WHEN {may} THEN set_config('session_replication_role', 'replica', true) END",
                    params,
                )
                before, replica = cursor.fetchone()
            block.skipping = replica is not None
        yield block
        if block.skipping:
            with connection.cursor() as cursor:
                # Back to what it was before checking, so that the rest of the transaction is checked as usual.
                cursor.execute("SELECT set_config('session_replication_role', %s, true)", [before])
                # Only the own rows that a written row may refer to are counted (a block's rows may be its own
                # and referred to by none: an import's lots, keyed by their entries).
                referred = {key.related_model for model, _, _ in block.writes for key, _, _ in _foreign_keys(model)}
                own = owned_present(cursor, {m: ids for m, ids in block.owned.items() if m in referred})
                for model, column, ids in block.writes:
                    foreign_keys_check(cursor, model, column, ids, own, block.locked)


def _may_skip(written: tuple[type[models.Model], ...]) -> tuple[str, list[str]]:
    """The SQL condition, and its parameters, under which this connection's role may skip the triggers of rows
    written into the tables of `written` and check them itself: asked anew each time, as the role or its rights
    may change while a connection lives."""
    if connection.pg_version >= 150000:
        may = ["has_parameter_privilege('session_replication_role', 'SET')"]
    else:  # before GRANT SET ON PARAMETER, only superusers may
        may = ["current_setting('is_superuser') = 'on'"]
    tables = sorted({table for model in written for _, table, _ in _foreign_keys(model)})
    for _ in tables:  # FOR KEY SHARE needs UPDATE, which the triggers, run as the tables' owner, do not
        may.append("has_table_privilege(%s, 'SELECT') AND has_table_privilege(%s, 'UPDATE')")
    return " AND ".join(may), [table for table in tables for _ in range(2)]


def foreign_keys_check(
    cursor, model: type[models.Model], column: str, ids: list[int], own: dict | None = None, held: dict | None = None
):
    """Every foreign key of the rows of `model` whose `column` is among `ids` names a row that exists, locked FOR KEY
    SHARE in key order; an IntegrityError names the constraint otherwise. `own` ({model: runs of primary keys},
    owned_present) names rows that this transaction inserted and that are known to be there, and `held` ({model:
    primary keys}, Block.holds) rows it holds locked: a key among either needs neither a probe nor a lock."""
    keys = _foreign_keys(model)
    if not keys:
        return
    ids = sorted(ids)
    if ids[-1] - ids[0] + 1 == len(set(ids)):  # one run of ids (the usual case): a range scan, not a probe per id
        where, params = f"{column} BETWEEN %s AND %s", [ids[0], ids[-1]]
    else:
        where, params = f"{column} = ANY(%s::bigint[])", [array_literal(ids)]
    missing = []
    for key, table, target in keys:
        # How many distinct values name no row: those named, less those found and locked. A probe per value: bounds
        # (BETWEEN the least and the greatest) halved the time where the rows lie together, as an import's entries
        # name its transactions, but made the planner read whole ranges of a large table where they are spread.
        # Values among the transaction's own rows, counted there already, and among the rows it holds locked are
        # left out.
        known = []
        if key.target_field.primary_key:
            known += [f"{key.column} BETWEEN {lo} AND {hi}" for lo, hi in (own or {}).get(key.related_model, ())]
            if locked := (held or {}).get(key.related_model):
                known.append(f"{key.column} = ANY('{array_literal(int(pk) for pk in locked)}'::bigint[])")
        others = " WHERE NOT (" + " OR ".join(known) + ")" if known else ""
        missing.append(
            f"(SELECT count(DISTINCT {key.column}) FROM new{others}) - (SELECT count(*) FROM (SELECT FROM {table} r "
            f"WHERE r.{target} IN (SELECT {key.column} FROM new{others}) ORDER BY r.{target} FOR KEY SHARE OF r) found)"
        )
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


def owned_present(cursor, owned: dict[type[models.Model], list[int]]) -> dict:
    """{model: runs (first, last) of primary keys} of the rows a block's transaction inserted itself (Block.own),
    each run counted in the table to be all there (IntegrityError otherwise). Keys in more than a few runs are left
    out, and references to them checked as any other."""
    present = {}
    for model, ids in owned.items():
        ids = sorted(set(ids))
        runs = [[ids[0], ids[0]]]
        for pk in ids[1:]:
            if pk == runs[-1][1] + 1:
                runs[-1][1] = pk
            else:
                runs.append([pk, pk])
        if len(runs) > _MAX_RUNS:
            continue
        table, pk_column = model._meta.db_table, model._meta.pk.column
        cursor.execute(
            f"SELECT {' + '.join(f'(SELECT count(*) FROM {table} WHERE {pk_column} BETWEEN %s AND %s)' for _ in runs)}",
            [bound for run in runs for bound in run],
        )
        if cursor.fetchone()[0] != len(ids):
            raise IntegrityError(f"rows of {table} declared inserted by this transaction are not all there")
        present[model] = [(int(first), int(last)) for first, last in runs]
    return present


_MAX_RUNS = 16


@cache
def _foreign_keys(model: type[models.Model]) -> list[tuple[models.Field, str, str]]:
    """(field, referenced table, referenced column) of each foreign key that the database enforces."""
    return [
        (field, field.related_model._meta.db_table, field.target_field.column)
        for field in model._meta.concrete_fields
        if field.is_relation and field.db_constraint
    ]
