"""Time the tier review over 1,000,000 members (the target: under 60 seconds).

Usage: python bench/tier_review_bench.py [MEMBERS]   (default 1,000,000)
Works on its own database, loyalty_tiers_bench on the PostgreSQL of DATABASE_URL (default 127.0.0.1), which it creates,
migrates and refills on every run. Members, their tier statuses and six months of qualifying counters each are made
set-based with generate_series: what is measured is the review, not how the data came about. Every member is due;
about a third keep their tier, the rest move down. A second run right after must find nothing to do."""

import os
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
BENCH_DB = "loyalty_tiers_bench"
_base = urlsplit(os.environ.get("DATABASE_URL") or "postgres://postgres@127.0.0.1:5432/postgres")
os.environ["DATABASE_URL"] = urlunsplit(_base._replace(path=f"/{BENCH_DB}"))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

import psycopg  # noqa: E402

with psycopg.connect(urlunsplit(_base._replace(path="/postgres")), autocommit=True) as admin_conn:
    if not admin_conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [BENCH_DB]).fetchone():
        admin_conn.execute(f"CREATE DATABASE {BENCH_DB}")

import django  # noqa: E402

django.setup()

from datetime import timedelta  # noqa: E402
from decimal import Decimal  # noqa: E402

from django.core.management import call_command  # noqa: E402
from django.db import connection  # noqa: E402
from django.utils import timezone  # noqa: E402

from core.models import Program  # noqa: E402
from loyalty.tier_models import TierChange  # noqa: E402
from loyalty.tier_setup import tier_create  # noqa: E402
from loyalty.tiers import tiers_review_due  # noqa: E402


def seed(count: int, now) -> Program:
    call_command("migrate", verbosity=0)
    program = Program.objects.get(code="DEFAULT")
    with connection.cursor() as cur:
        cur.execute(
            "TRUNCATE loyalty_tierchange, loyalty_tierstatus, loyalty_tiercounter, loyalty_tier, members_member "
            "RESTART IDENTITY CASCADE"
        )
    Program.objects.filter(pk=program.pk).update(has_tiers=False, tier_window="rolling", tier_window_months=12)
    program.refresh_from_db()
    tier_create(program=program, code="member", name_en="Member", rank=0, threshold=Decimal(0))
    silver = tier_create(program=program, code="silver", name_en="Silver", rank=1, threshold=Decimal(1000))
    gold = tier_create(program=program, code="gold", name_en="Gold", rank=2, threshold=Decimal(5000))
    started = time.monotonic()
    with connection.cursor() as cur:
        # Required text columns other apps add to members (codes and the like) get a unique value each.
        cur.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'members_member' "
            "AND is_nullable = 'NO' AND column_default IS NULL AND data_type = 'character varying' "
            "AND column_name NOT IN ('member_number', 'first_name', 'last_name', 'locale', 'timezone', 'status', "
            "'enrollment_channel')"
        )
        extra = [row[0] for row in cur.fetchall()]
        extra_columns = "".join(f", {connection.ops.quote_name(c)}" for c in extra)
        extra_values = "".join(f", '{chr(82 + n)}' || to_hex(i)" for n in range(len(extra)))
        cur.execute(
            f"""
            INSERT INTO members_member (id, program_id, member_number, first_name, last_name, locale, timezone, status,
                enrollment_channel, enrolled_at, updated_at, consent_email, consent_sms, consent_push{extra_columns})
            SELECT i, %(program)s, 'B' || lpad(i::text, 9, '0'), '', '', 'sv',
                   (ARRAY['Europe/Stockholm', 'Europe/Oslo', 'America/New_York', 'Pacific/Auckland'])[1 + i %% 4],
                   'active', 'pos', %(now)s - make_interval(days => 400 + i %% 1000), %(now)s, false, false, false
                   {extra_values}
            FROM generate_series(1, %(n)s) AS i
            """,
            {"program": program.pk, "now": now, "n": count},
        )
        cur.execute(
            """
            INSERT INTO loyalty_tierstatus (member_id, program_id, tier_id, since, review_at, manual_reason, updated_at)
            SELECT i, %(program)s, CASE WHEN i %% 2 = 0 THEN %(gold)s ELSE %(silver)s END,
                   %(now)s - interval '13 months', %(now)s - make_interval(hours => 1 + i %% 48), '', %(now)s
            FROM generate_series(1, %(n)s) AS i
            """,
            {"program": program.pk, "gold": gold.pk, "silver": silver.pk, "now": now, "n": count},
        )
        # Six monthly periods each, inside the window the review counts: 6 x (0..1499) points.
        cur.execute(
            """
            INSERT INTO loyalty_tiercounter (member_id, period, points, spend_cents, purchases)
            SELECT i, (date_trunc('month', %(now)s AT TIME ZONE 'UTC') - make_interval(months => 2 + k))::date,
                   (i::bigint * 7919 + k * 104729) %% 1500, 0, 1
            FROM generate_series(1, %(n)s) AS i, generate_series(0, 5) AS k
            """,
            {"now": now, "n": count},
        )
    # What autovacuum does to a table that is not brand new: statistics and the visibility map.
    with connection.cursor() as cur:
        cur.execute("VACUUM ANALYZE members_member, loyalty_tierstatus, loyalty_tiercounter, loyalty_tier")
    print(f"seeded {count:,} members, statuses and {6 * count:,} counters in {time.monotonic() - started:.1f} s")
    return program


def main(count: int) -> None:
    now = timezone.now()
    seed(count, now)
    started = time.monotonic()
    result = tiers_review_due(now=now)
    elapsed = time.monotonic() - started
    print(
        f"review: {result.reviewed:,} members reviewed, {result.changed:,} moved in {elapsed:.1f} s "
        f"({result.reviewed / elapsed:,.0f} members/s)"
    )
    started = time.monotonic()
    again = tiers_review_due(now=now)
    print(f"second run: {again.reviewed} reviewed, {again.changed} moved in {time.monotonic() - started:.1f} s")
    print(f"history rows: {TierChange.objects.count():,}")
    later = tiers_review_due(now=now + timedelta(days=1))
    assert again.reviewed == again.changed == later.reviewed == 0, "a second run must find nothing to do"
    if elapsed >= 60:
        sys.exit(f"too slow: {elapsed:.1f} s for {result.reviewed:,} members (target: under 60 s)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000)
