"""Database plumbing for hot paths and batch work: plain-cursor reads (compiling an ORM query costs several times
the query itself there), INSERT parameters, ids drawn up front, and how statements are bound and kept prepared."""

import threading
from contextlib import ContextDecorator, contextmanager
from datetime import UTC, datetime
from decimal import Decimal
from functools import cache

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connection, connections, models
from django.db.models import Model
from django.db.models.base import ModelState
from django.db.models.signals import post_init, pre_init


@cache
def columns(model: type[Model], alias: str = "") -> tuple[list[str], str]:
    """The model's column attnames and their select list, under a table alias when the query reads other tables
    too, for instances built with instance_from_row."""
    prefix, quote = f"{alias}." if alias else "", connection.ops.quote_name
    fields = model._meta.concrete_fields
    return [f.attname for f in fields], ", ".join(f"{prefix}{quote(f.column)}" for f in fields)


def fetch_instance(model: type[Model], where: str, params: list):
    """The first row matching the SQL condition `where`, as a model instance, or None."""
    _, select = columns(model)
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {select} FROM {model._meta.db_table} WHERE {where} LIMIT 1", params)
        row = cursor.fetchone()
    return None if row is None else instance_from_row(model, row)


def instance_from_row(model: type[Model], row) -> Model:
    """An instance of `model` from a plain cursor's values of all its columns (in `columns` order), converted as the
    ORM's own reads convert them: SQLite hands back naive datetimes and text where PostgreSQL's driver hands back
    the Python values."""
    attnames = columns(model)[0]
    if not on_postgresql():
        row = [
            value if value is None else _convert(value, field, converters)
            for value, (field, converters) in zip(row, _converters(model), strict=True)
        ]
    return model.from_db(DEFAULT_DB_ALIAS, attnames, row)


@cache
def _converters(model: type[Model]) -> list:
    fields = model._meta.concrete_fields
    return [(f, connection.ops.get_db_converters(f.get_col("")) + f.get_db_converters(connection)) for f in fields]


def _convert(value, field, converters):
    expression = field.get_col("")
    for converter in converters:
        value = converter(value, expression, connection)
    return value


def unsaved(model: type[Model], **values) -> Model:
    """`model(**values)`, built for hot paths at a fraction of the cost: Model.__init__ walks every field through
    its descriptors and sends pre_init and post_init, 17-19 µs for a transaction or an entry, against 7-9 here. The
    same instance: each field given by name or attname, or its default; a foreign key given as an instance is
    cached, and the instance's database is the related one's, as the default router has it. Where that shortcut
    could differ (database routers, someone listening to pre_init or post_init, a field it does not handle), it is
    `model(**values)` itself."""
    plan = _unsaved_plan(model)
    if plan is None or settings.DATABASE_ROUTERS or pre_init.has_listeners(model) or post_init.has_listeners(model):
        return model(**values)
    given = dict(values)
    instance = model.__new__(model)
    state = instance._state = ModelState()
    attributes = instance.__dict__
    for name, attname, target, default in plan:
        if target is not None and name in values:
            related = values.pop(name)
            if related is None:
                attributes[attname] = None
            elif target is _ONE_TO_ONE:  # setting one sets the related instance's reverse cache too
                return model(**given)
            else:
                attributes[attname] = getattr(related, target)
                state.db = state.db or related._state.db or DEFAULT_DB_ALIAS
                related._state.db = related._state.db or state.db
            state.fields_cache[name] = related
        elif attname in values:
            attributes[attname] = values.pop(attname)
        else:
            attributes[attname] = default()
    if values:  # properties, or names Model.__init__ refuses with its own error
        return model(**given)
    return instance


_ONE_TO_ONE = object()


@cache
def _unsaved_plan(model: type[Model]) -> list | None:
    """(name, attname, the related model's attname for a foreign key, default) of each field; None for a model
    with a field `unsaved` does not handle (a generated column, a relation over several columns)."""
    plan = []
    for f in model._meta.concrete_fields:
        if f.generated:
            return None
        target = None
        if f.is_relation:
            if not (f.many_to_one or f.one_to_one) or len(f.related_fields) != 1:
                return None
            target = _ONE_TO_ONE if f.one_to_one else f.related_fields[0][1].attname
        plan.append((f.name, f.attname, target, f.get_default))
    return plan


# Field types whose Python value the driver takes as it is; every other field is prepared by Django, but for
# aware datetimes and Decimals on PostgreSQL, which Django's preparation hands to psycopg unchanged anyway.
_PLAIN = (models.CharField, models.TextField, models.IntegerField, models.BooleanField, models.ForeignKey)
_AS_IS, _NATIVE_ON_POSTGRESQL, _PREPARE = "as is", "native on postgresql", "prepare"


@cache
def on_postgresql() -> bool:
    """Whether the database is PostgreSQL: the same for the life of the process, and asked on every purchase, where
    `connection.vendor` costs a lookup of the connection each time."""
    return connection.vendor == "postgresql"


@cache
def insert_plan(model: type[Model], omit: frozenset[str] = frozenset()) -> tuple[list, str]:
    """The fields an INSERT writes (all but the primary key and `omit`), how each value is prepared, and their
    quoted column list."""
    fields = [f for f in model._meta.concrete_fields if not f.primary_key and f.name not in omit]

    def how(f) -> str:
        if getattr(f, "auto_now", False) or getattr(f, "auto_now_add", False):
            return _PREPARE
        if isinstance(f, _PLAIN):
            return _AS_IS
        if isinstance(f, models.DateTimeField | models.DecimalField) and connection.vendor == "postgresql":
            return _NATIVE_ON_POSTGRESQL
        return _PREPARE

    return [(f, how(f)) for f in fields], ", ".join(connection.ops.quote_name(f.column) for f in fields)


def insert_params(instance: Model, plan: list) -> list:
    """The values of `instance` for an INSERT of the planned fields, as Django's own INSERT would send them."""
    db = connections[DEFAULT_DB_ALIAS]  # each use of the `connection` proxy looks the connection up again (~2 µs)
    params = []
    for f, how in plan:
        value = getattr(instance, f.attname)
        if how is _AS_IS or (how is _NATIVE_ON_POSTGRESQL and _native(value)):
            params.append(value)
        else:
            params.append(f.get_db_prep_save(f.pre_save(instance, add=True), db))
    return params


def _native(value) -> bool:
    return value is None or isinstance(value, Decimal) or (isinstance(value, datetime) and value.tzinfo is not None)


@contextmanager
def statement_cursor():
    """A cursor for a hot path's statement (a purchase, a balance read), as `connection.cursor()` gives, but kept by
    the connection from statement to statement. A new cursor per statement costs Django's wrapper, and psycopg's
    caches of how to send each parameter type and read each column type start empty with every cursor: together
    ~50 µs of a purchase's CPU. Errors are Django's, as through Django's cursor, and a transaction that must roll
    back is refused alike. Where Django's cursor does more (queries logged: DEBUG, a test counting queries; execute
    wrappers) or is not psycopg's, it is Django's cursor. One cursor: fetch the rows within the block, and open no
    other statement_cursor inside it."""
    db = connections[DEFAULT_DB_ALIAS]
    if db.vendor != "postgresql" or db.queries_logged or db.execute_wrappers:
        with db.cursor() as cursor:
            yield cursor
        return
    db.ensure_connection()
    db.validate_no_broken_transaction()
    raw = db.connection
    cursor = getattr(db, "_statement_cursor", None)
    # Made anew for a new connection, and where batch_statements changed the cursor class (how parameters are bound).
    if cursor is None or cursor.closed or cursor.connection is not raw or type(cursor) is not raw.cursor_factory:
        cursor = db._statement_cursor = db.create_cursor()
    with db.wrap_database_errors:
        yield cursor


def array_literal(values) -> str:
    """`values` (integers, dates, or digit-only text) as a PostgreSQL array literal, to pass as one parameter with a
    cast (`%s::bigint[]`): the driver adapts one string ~50 times faster than a list, element by element. None of
    these needs quoting inside the literal; anything else does, and must not be passed here."""
    return "{" + ",".join(map(str, values)) + "}"


COPY_NULL = "\\N"  # NULL in COPY's text format
_COPY_ESCAPE = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def copy_text(value: str) -> str:
    """`value` as a field of COPY's text format (bulk writes build it by hand: psycopg's write_row adapts value by
    value, at several times the cost)."""
    return value if value.isalnum() else value.translate(_COPY_ESCAPE)


def ids_reserve(model: type[Model], count: int) -> list[int]:
    """`count` new primary keys of `model` drawn from its table's sequence, rising (PostgreSQL): bulk writes name
    rows before inserting them, and give them ids in the order one INSERT at a time would."""
    with connection.cursor() as cursor:
        # The sequence is named as a constant: pg_get_serial_sequence in the query would run once per row, at ten
        # times the cost of nextval itself.
        cursor.execute("SELECT pg_get_serial_sequence(%s, 'id')", [model._meta.db_table])
        cursor.execute(
            "SELECT array_agg(nextval(%s::regclass)) FROM generate_series(1, %s)", [cursor.fetchone()[0], count]
        )
        return sorted(cursor.fetchone()[0])


class prepared_statements_kept:
    """Keep the connection's prepared statements through the rollbacks within. psycopg forgets them all on a
    ROLLBACK, a savepoint's included, and deallocates them, in case the rolled-back work created objects they name;
    PostgreSQL itself keeps them. For work that touches no schema and is rolled back by design (a preview) or when
    refused (an API write): with psycopg's rule, every statement of the connection was parsed again for its next
    five executions and planned for the values at hand for five more (docs/benchmarks.md, fourth round). Keep out
    of it whatever would leave psycopg's record of the statements wrong: creating, altering or dropping objects,
    DISCARD ALL, DEALLOCATE ALL. The block only marks its thread (a connection serves one thread at a time); every
    PostgreSQL connection heeds the mark from its start (statements_kept_when_marked), so entering it costs no
    lookup of the connection: it wraps every API request."""

    __slots__ = ("before",)

    def __enter__(self) -> None:
        self.before = getattr(_keeping, "on", False)
        _keeping.on = True

    def __exit__(self, *exc) -> None:
        _keeping.on = self.before


_keeping = threading.local()


def statements_kept_when_marked(sender, connection, **kwargs) -> None:
    """Have a new PostgreSQL connection keep its prepared statements where psycopg would forget them, while its
    thread is inside prepared_statements_kept. psycopg's statement cache is private: where it is not there as
    expected (another psycopg), psycopg's own rule applies."""
    manager = getattr(connection.connection, "_prepared", None) if connection.vendor == "postgresql" else None
    if getattr(manager, "__dict__", None) is None:
        return
    forget = manager.clear  # called on ROLLBACK by the connection and by the cursor that ran it

    def clear() -> bool:
        return False if getattr(_keeping, "on", False) else forget()

    manager.clear = clear


class KeepPreparedStatementsMiddleware:
    """API requests keep the connection's prepared statements through their rollbacks (prepared_statements_kept):
    a refused write (a duplicate enrolment, a voucher already used, a batch's bad item in its savepoint) would
    otherwise make every statement of the connection be parsed and planned again. API views create, alter and drop
    nothing. Other requests (the admin, the portal) keep psycopg's rule."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if not request.path_info.startswith("/api/"):
            return self.get_response(request)
        with prepared_statements_kept():
            return self.get_response(request)


class batch_statements(ContextDecorator):
    """Statements bound client-side and never prepared within: for batch work (imports, periodic jobs, the tier
    review), which runs a few statements many times with arrays and bounds of very different sizes. Prepared,
    PostgreSQL may switch to a generic plan that guesses them and scans where the plan for the actual values uses an
    index (the 200,000-purchase import went from ~100 to ~940 µs of database CPU per purchase); bound server-side,
    large arrays cost more to send than as literals (133 against 100 µs per purchase)."""

    def _recreate_cm(self):
        # As a decorator, a fresh instance for every call: calls in several threads at once must each restore their
        # own connection.
        return type(self)()

    def __enter__(self):
        self.saved = None
        if connection.vendor == "postgresql":
            from django.db.backends.postgresql.base import Cursor  # Django's client-side binding cursor

            connection.ensure_connection()
            raw = connection.connection
            self.saved = (raw, raw.cursor_factory, raw.prepare_threshold)
            raw.cursor_factory, raw.prepare_threshold = Cursor, None
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            raw, raw.cursor_factory, raw.prepare_threshold = self.saved
        return False


def timestamps_loaded_natively(sender, connection, **kwargs) -> None:
    """Have a new PostgreSQL connection read timestamptz values with psycopg's compiled loader. Django's own loader
    (psycopg_any.BaseTzLoader) subclasses psycopg's pure-Python one, which parses every value with regular
    expressions: 7 % of a balance read's instructions. This one gives the very same values (the session's time zone
    is Django's, so Django only swaps the tzinfo object, as here). Only where Django reads in UTC, the default."""
    if connection.vendor != "postgresql" or connection.timezone != UTC:
        return
    from psycopg import adapt, adapters
    from psycopg.pq import Format

    oid = adapters.types["timestamptz"].oid
    compiled = adapters.get_loader(oid, Format.TEXT)

    class UtcTimestamptzLoader(adapt.Loader):
        timezone = UTC  # what Django compares before it registers its own loader on a cursor

        def __init__(self, oid, context=None):
            super().__init__(oid, context)
            self.compiled = compiled(oid, context)

        def load(self, data):
            return self.compiled.load(data).replace(tzinfo=UTC)

    connection.connection.adapters.register_loader(oid, UtcTimestamptzLoader)
