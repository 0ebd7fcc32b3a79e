"""Migrations that move data, run both ways over a ledger in use: what the rows record must come through unchanged."""

import json
import os
import subprocess
import sys
from datetime import UTC, datetime

import pytest
from dateutil.relativedelta import relativedelta
from django.conf import settings
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

from loyalty.ledger import ledger_debit
from loyalty.models import Draw, Entry, Lot
from loyalty.verify import ledger_verify
from tests.factories import MemberFactory, record

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
BEFORE, KEYED = ("loyalty", "0021_lot_account_unindexed"), ("loyalty", "0022_lot_keyed_by_entry")


def _migrate(target):
    executor = MigrationExecutor(connection)
    executor.migrate([target])


def _draws_by_lot_id():
    """(draw, its lot's entry, points) of every draw, its lot found by the draw's lot_id among the lots' ids."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT d.id, l.entry_id, d.points FROM loyalty_draw d JOIN loyalty_lot l ON l.id = d.lot_id ORDER BY d.id"
        )
        return cursor.fetchall()


def _ledger_with_draws(program):
    """A ledger with draws of every kind: spends over several lots, expiry on arrival, a debt settled by a lot. The
    first member, and every draw as (id, lot_id, points)."""
    first, second = MemberFactory(program=program), MemberFactory(program=program)
    for i, total in enumerate(["100.00", "50.00", "70.00"]):
        record(program, first, total, external_id=f"a{i}", at=NOW - relativedelta(days=10 - i), now=NOW)
    ledger_debit(member_id=first.pk, kind=Entry.Kind.REDEEM, points=160, occurred_at=NOW, now=NOW)
    record(program, second, "30.00", external_id="old", at=NOW - relativedelta(months=25), now=NOW)  # expired
    record(program, second, "40.00", external_id="b1", at=NOW, now=NOW)
    ledger_debit(member_id=second.pk, kind=Entry.Kind.REDEEM, points=40, occurred_at=NOW, now=NOW)
    record(program, second, "40.00", external_id="b1r", kind="return", original="b1", at=NOW, now=NOW)  # owes 40
    record(program, second, "60.00", external_id="b2", at=NOW, now=NOW)  # settles the 40
    return first, sorted(Draw.objects.values_list("id", "lot_id", "points"))


@pytest.mark.django_db(transaction=True)
def test_lots_keyed_by_their_entries_keep_every_draw_both_ways(program):
    # given
    first, draws = _ledger_with_draws(program)
    assert len(draws) >= 5 and ledger_verify() == []

    try:
        # when the lots get an id column again
        _migrate(BEFORE)

        # then each lot's id is its entry's (the order of spending stays), the draws name lots by it, and new lots
        # draw ids after them
        assert _draws_by_lot_id() == draws
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FILTER (WHERE id <> entry_id), max(id) < nextval(pg_get_serial_sequence("
                "'loyalty_lot', 'id')) FROM loyalty_lot"
            )
            assert cursor.fetchone() == (0, True)
            # given, as in a database from before the change, lots whose ids are not their entries' (the draws
            # following them; as a superuser's replica session, past the draws' append-only trigger)
            cursor.execute("SET session_replication_role = replica")
            cursor.execute("UPDATE loyalty_lot SET id = id + 1000")
            cursor.execute("UPDATE loyalty_draw SET lot_id = lot_id + 1000")
            cursor.execute("SET session_replication_role = origin")
        assert _draws_by_lot_id() == draws
    finally:
        # when they are keyed by their entries once more
        _migrate(KEYED)

    # then every draw names the same lot, by its entry, and the ledger holds
    assert sorted(Draw.objects.values_list("id", "lot_id", "points")) == draws
    assert ledger_verify() == []
    # and the draws are append-only again
    with pytest.raises(Exception, match="append-only"), connection.cursor() as cursor:
        cursor.execute("UPDATE loyalty_draw SET points = points")
    # and spending draws on the lots by their new keys: soonest to expire, then in the order they were credited
    before = dict(Lot.objects.filter(account_id=first.pk).values_list("pk", "remaining"))
    ledger_debit(member_id=first.pk, kind=Entry.Kind.REDEEM, points=10, occurred_at=NOW, now=NOW)
    after = dict(Lot.objects.filter(account_id=first.pk).values_list("pk", "remaining"))
    assert [pk for pk in before if before[pk] != after[pk]] == [min(pk for pk in before if before[pk] > 0)]
    assert ledger_verify() == []


@pytest.mark.django_db(transaction=True)
def test_a_failure_while_keying_lots_by_their_entries_leaves_the_ledger_as_it_was(program):
    # given a ledger with draws, back to before the change, and the name of the draws' new foreign key taken, so
    # the migration's last step fails
    _, draws = _ledger_with_draws(program)
    _migrate(BEFORE)
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                "ALTER TABLE loyalty_draw ADD CONSTRAINT loyalty_draw_lot_id_fk_loyalty_lot_entry_id CHECK (true)"
            )
        # when
        with pytest.raises(Exception, match="already exists"):
            _migrate(KEYED)

        # then nothing of it stayed: lots keep their ids, draws name them by those and still refer to them, the
        # draws' trigger is on, and the migration is not recorded
        assert _draws_by_lot_id() == draws
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT (SELECT count(*) FROM pg_constraint WHERE conrelid = 'loyalty_draw'::regclass "
                "AND contype = 'f' AND confrelid = 'loyalty_lot'::regclass), "
                "(SELECT tgenabled FROM pg_trigger WHERE tgname = 'loyalty_draw_append_only'), "
                "(SELECT count(*) FROM django_migrations WHERE app = 'loyalty' AND name = %s)",
                [KEYED[1]],
            )
            assert cursor.fetchone() == (1, "O", 0)
    finally:
        with connection.cursor() as cursor:
            cursor.execute(
                "ALTER TABLE loyalty_draw DROP CONSTRAINT IF EXISTS loyalty_draw_lot_id_fk_loyalty_lot_entry_id"
            )
        _migrate(KEYED)
    # and once the name is free the migration goes through
    assert sorted(Draw.objects.values_list("id", "lot_id", "points")) == draws
    assert ledger_verify() == []


# Run by `manage.py shell` on an SQLite file (the embedded default), whose branch of the migration builds tables
# again: the ledger above, back to before the change, lots given ids of their own as a database from before has
# (negative, clear of every entry id; the draws following them in the same transaction, as SQLite checks the
# deferred foreign keys at its end), and forward again.
_EMBEDDED_ROUND_TRIP = """
import json
from django.core.management import call_command
from django.db import connection, transaction
from core.models import Program
from loyalty.models import Draw
from loyalty.verify import ledger_verify
from tests.test_migrations import BEFORE, _draws_by_lot_id, _ledger_with_draws
_, draws = _ledger_with_draws(Program.objects.get(code="DEFAULT"))
call_command("migrate", *BEFORE, verbosity=0)
back = _draws_by_lot_id()
with transaction.atomic(), connection.cursor() as cursor:
    cursor.execute("UPDATE loyalty_lot SET id = -id - 1000")
    cursor.execute("UPDATE loyalty_draw SET lot_id = -lot_id - 1000")
scrambled = _draws_by_lot_id()
call_command("migrate", verbosity=0)
again = sorted(Draw.objects.values_list("id", "lot_id", "points"))
breaches = len(ledger_verify())
print(json.dumps({"draws": draws, "back": back, "scrambled": scrambled, "again": again, "breaches": breaches}))
"""


def test_lots_keyed_by_their_entries_keep_every_draw_both_ways_on_the_embedded_sqlite(tmp_path):
    # given an SQLite file migrated to now, as the embedded default runs
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env |= {"DATABASE_URL": f"sqlite:///{tmp_path / 'embedded.sqlite3'}", "DJANGO_SETTINGS_MODULE": "config.settings"}

    def manage(*args) -> str:
        done = subprocess.run(
            [sys.executable, "manage.py", *args], cwd=settings.BASE_DIR, env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    manage("migrate", "--verbosity", "0")
    # when the ledger goes back and forth
    found = json.loads(manage("shell", "--command", _EMBEDDED_ROUND_TRIP).strip().splitlines()[-1])
    # then every draw names the same lot throughout, and the ledger holds
    assert len(found["draws"]) >= 5
    assert found["back"] == found["scrambled"] == found["again"] == found["draws"]
    assert found["breaches"] == 0
