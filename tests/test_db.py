"""Database plumbing of core/db.py that every read goes through."""

from datetime import UTC
from decimal import Decimal

import pytest
from django.db import DataError, connection, transaction
from django.db.backends.postgresql.psycopg_any import BaseTzLoader
from django.db.transaction import TransactionManagementError
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from psycopg.pq import Format

from core.db import prepared_statements_kept, statement_cursor, unsaved
from loyalty.models import Entry, Lot, Transaction

SERIES = (
    "SELECT t FROM generate_series('1999-12-31 23:00+00'::timestamptz, '2031-01-01+00', "
    "'7 hours 13 minutes 0.123457 seconds') AS t"
)


def _read(sql: str) -> list:
    with connection.cursor() as cursor:
        cursor.execute(sql)
        return [row[0] for row in cursor.fetchall()]


@pytest.mark.django_db
def test_timestamps_are_read_natively_and_exactly_as_djangos_own_loader_reads_them():
    # given: the connection as the service opens it
    connection.ensure_connection()
    adapters = connection.connection.adapters
    native = adapters.get_loader(1184, Format.TEXT)
    assert native.__name__ == "UtcTimestamptzLoader"
    ours = _read(SERIES)

    class DjangosLoader(BaseTzLoader):
        timezone = UTC

    adapters.register_loader(1184, DjangosLoader)
    try:
        # when
        theirs = _read(SERIES)
    finally:
        adapters.register_loader(1184, native)
    # then: the same instants, microseconds, tzinfo objects and folds, across leap days, month ends and years
    assert len(ours) == len(theirs) > 30_000
    assert all(a == b and a.tzinfo is b.tzinfo is UTC and a.fold == b.fold for a, b in zip(ours, theirs, strict=True))


def _fields(instance) -> tuple[dict, tuple]:
    attributes = dict(instance.__dict__)
    state = attributes.pop("_state")
    return attributes, (state.db, state.adding, state.fields_cache)


@pytest.mark.django_db
def test_unsaved_builds_the_instance_the_model_builds(program, make_client, member):
    # given: the values the hot paths give, foreign keys as instances, as None and as ids, some fields left out
    (client, _), now = make_client(), timezone.now()
    purchase = {
        "program": program,
        "store": "s1",
        "external_id": "e1",
        "channel": "pos",
        "kind": "purchase",
        "occurred_at": now,
        "currency": "SEK",
        "total": Decimal("10.00"),
        "lines": [{"sku": "A"}],
        "api_client": client,
        "member": None,
        "points": 10,
        "created_at": now,
    }
    cases = [
        (Transaction, purchase),
        (Transaction, {**purchase, "member": member, "api_client_id": client.pk, "api_client": None}),
        (Transaction, {"program_id": program.pk, "member_id": member.pk}),
        (Entry, {"kind": "earn", "points": 5, "occurred_at": now, "created_at": now, "api_client": client}),
        (Entry, {"kind": "earn", "points": 5, "refund_of": None}),
    ]
    for model, values in cases:
        # when
        ours, theirs = unsaved(model, **values), model(**values)
        # then: the same attributes, defaults included, the same related instances cached, the same database
        assert type(ours) is model
        assert _fields(ours) == _fields(theirs), values


@pytest.mark.django_db
def test_unsaved_leaves_to_the_model_what_it_does_not_build_itself(program):
    # given: a lot of an entry (a one-to-one, whose reverse cache the model sets) and a name no field has
    entry = Entry(kind="earn", points=5)
    # when
    lot = unsaved(Lot, entry=entry, amount=5, remaining=5)
    # then: built by the model itself, so it is the same; and the model's own error for an unknown name
    assert lot.entry is entry and entry.lot is lot
    with pytest.raises(TypeError, match="unexpected keyword"):
        unsaved(Transaction, program=program, no_such_field=1)


@pytest.mark.django_db(transaction=True)
def test_statement_cursor_is_kept_and_behaves_as_djangos_cursor():
    # given: two statements on the same connection
    with statement_cursor() as cursor:
        cursor.execute("SELECT %s::int", [1])
        first, kept = cursor.fetchone(), cursor
    with statement_cursor() as cursor:
        cursor.execute("SELECT %s::text", ["two"])
        # then: one cursor for both, each with its own result
        assert cursor is kept and first == (1,) and cursor.fetchone() == ("two",)
    # when: the connection is closed and opened again
    connection.close()
    with statement_cursor() as cursor:
        cursor.execute("SELECT 3")
        # then: a new cursor on the new connection
        assert cursor is not kept and cursor.fetchone() == (3,)
    # then: database errors are Django's, with psycopg's as their cause, and the connection stays usable
    with pytest.raises(DataError) as raised, statement_cursor() as cursor:
        cursor.execute("SELECT 1 / 0")
    assert raised.value.__cause__.sqlstate == "22012"
    with statement_cursor() as cursor:
        cursor.execute("SELECT 4")
        assert cursor.fetchone() == (4,)


@pytest.mark.django_db
def test_statement_cursor_leaves_logged_queries_and_broken_transactions_to_django():
    # given: queries being counted, as assertNumQueries counts them
    with CaptureQueriesContext(connection) as captured, statement_cursor() as cursor:
        cursor.execute("SELECT 5")
    # then: Django's cursor ran it, so it was counted
    assert [q["sql"] for q in captured.captured_queries] == ["SELECT 5"]
    # given: a transaction whose statement failed, which must be rolled back before anything else runs in it
    with transaction.atomic():
        with pytest.raises(DataError), transaction.atomic(savepoint=False), statement_cursor() as cursor:
            cursor.execute("SELECT 1 / 0")
        # then: refused as Django refuses it
        with pytest.raises(TransactionManagementError), statement_cursor() as cursor:
            cursor.execute("SELECT 6")


def test_prepared_statements_are_kept_only_within_the_block_and_after_an_error_no_longer(db):
    # given: a statement run often enough for the driver to prepare it
    def run():
        with connection.cursor() as cursor:
            cursor.execute("SELECT %s::int + 1", [1])

    for _ in range(6):
        run()
    prepared = connection.connection._prepared
    assert prepared._names

    def rolled_back():
        with transaction.atomic():
            run()
            transaction.set_rollback(True)

    # when: inside the block, a nested block ends, then a savepoint is rolled back, then the block ends on an error
    with pytest.raises(ValueError), prepared_statements_kept():
        with prepared_statements_kept():
            pass
        rolled_back()
        assert prepared._names  # kept through the rollback: the nested block left the outer one's mark
        raise ValueError
    # then: outside it, psycopg's own rule holds again, and a rollback forgets every prepared statement
    rolled_back()
    assert not prepared._names
