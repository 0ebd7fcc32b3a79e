"""Database plumbing of core/db.py that every read and every prepared statement goes through."""

from datetime import UTC

import pytest
from django.db import connection
from django.db.backends.postgresql.psycopg_any import BaseTzLoader
from django.utils import timezone
from psycopg.pq import Format

from loyalty.models import Transaction

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


def _purchase(member, external_id: str) -> dict:
    return {
        "external_id": external_id,
        "store": "S1",
        "channel": "pos",
        "member": member.member_number,
        "type": "purchase",
        "occurred_at": timezone.now().isoformat(),
        "currency": "SEK",
        "total": "120.50",
        "lines": [{"sku": "A", "category": "c", "quantity": "1", "unit_price": "120.50", "amount": "120.50"}],
    }


def test_a_preview_keeps_the_connections_prepared_statements_and_a_schema_change_still_forgets_them(
    api, member, prepared_plans
):
    # given: a till's purchases, often enough for the driver to prepare their statement and for PostgreSQL to settle
    # on its generic plan
    purchase_statement = ("WITH m AS (SELECT id FROM members_member WHERE member_number",)
    for n in range(12):
        assert api.post("/api/v1/transactions", _purchase(member, f"P-{n}"), format="json").status_code == 201
    generic, custom = prepared_plans(*purchase_statement)
    # when: a preview, rolled back by design, then the next purchase
    preview = api.post("/api/v1/transactions/preview", _purchase(member, "V-1"), format="json")
    after = api.post("/api/v1/transactions", _purchase(member, "P-12"), format="json")
    # then: the statement is still prepared, its plans counted on
    assert (preview.status_code, after.status_code) == (200, 201)
    assert prepared_plans(*purchase_statement) == (generic + 1, custom)
    assert not Transaction.objects.filter(external_id="V-1").exists()
    # and outside a preview psycopg's own rule holds: a schema change forgets every prepared statement
    with connection.cursor() as cursor:
        cursor.execute("DROP TABLE IF EXISTS loyalty_no_such_table")
    assert api.post("/api/v1/transactions", _purchase(member, "P-13"), format="json").status_code == 201
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_prepared_statements")
        assert cursor.fetchone()[0] == 0
