"""Database plumbing of core/db.py that every read goes through."""

from datetime import UTC

import pytest
from django.db import connection
from django.db.backends.postgresql.psycopg_any import BaseTzLoader
from psycopg.pq import Format

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
