"""Counting qualifying activity set-based: the counters recounted from the recorded purchases and returns, and
the points of the events that counted (tier_counters_backfill: a programme's first tier, a new measure or
window); every member whose window reaches a higher tier moved up at once, as a purchase would move them
(members_move_up: a tier added or lowered); an import's purchases added (tier_counts_add). The live path counts
one transaction or event at a time (loyalty.tiers)."""

from collections import defaultdict
from datetime import UTC, datetime, time, timedelta

from django.db import connection

from core.db import array_literal
from core.models import Program
from loyalty.event_models import MemberEvent
from loyalty.models import Transaction
from loyalty.tier_models import Tier, TierChange, TierCounter, TierStatus
from loyalty.tier_review import _current_end_sql, _measure_sql, _window_sql
from loyalty.tier_windows import anchor_day, counted_since, period_of
from loyalty.tiers import tier_reevaluate
from members.models import Member


def tier_counters_backfill(*, program: Program, now: datetime, counting: bool, set_based: bool | None = None) -> int:
    """Recount the qualifying counters of the programme's members from its recorded purchases and returns, and the
    points of the events that counted (MemberEvent.qualifying), over the periods that any window at `now` reads
    (tier_windows.counted_since), and move up at once every member whose current window supports a higher tier, as
    a purchase would. The number moved up. Runs in the caller's
    transaction, which holds the programme row; `counting`: the earn path counts the programme's purchases
    meanwhile (it had tiers already), and the status and counter tables are locked until the transaction ends."""
    since = counted_since(program=program, now=now)
    # Local days from `since` on began after this instant in every time zone.
    start = datetime.combine(since - timedelta(days=1), time.min, tzinfo=UTC)
    if set_based is None:
        set_based = connection.vendor == "postgresql"
    # SQLite's IMMEDIATE transaction holds the whole database already.
    if counting and connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            # Why: a purchase counted meanwhile would be lost to the recount's delete or counted twice by its insert.
            # Every path that counts (tiers.tier_on_transaction) locks a status row, then writes a counter: taking
            # both tables in that order makes those wait for this, and this for those under way, without deadlock.
            # Other programmes' purchases wait too; a new window is rare. Without tiers until now, the programme's
            # purchases are not counted, and others' touch other members' rows: nothing to wait for.
            cursor.execute(f"LOCK TABLE {TierStatus._meta.db_table}, {TierCounter._meta.db_table} IN EXCLUSIVE MODE")
    if not set_based:
        return _backfill_rows(program, now, since, start)
    with connection.cursor() as cursor:
        params = _backfill_params(program, now, since, start)
        for sql in (*_recount_sql(program), _upgrade_sql(program)):
            cursor.execute(sql, params)
        return cursor.fetchone()[0]


def members_move_up(*, program: Program, now: datetime) -> int:
    """Move up at once every member whose current window reaches a higher tier than they hold, as a purchase
    would: after a tier is added or its threshold or rank changed. The number moved up. Compare-and-set on each
    status row, so a member a concurrent purchase moves meanwhile is left as it moved them. Runs in the caller's
    transaction, which holds the programme row."""
    since = counted_since(program=program, now=now)
    start = datetime.combine(since - timedelta(days=1), time.min, tzinfo=UTC)
    if connection.vendor != "postgresql":  # SQLite's IMMEDIATE transaction holds the whole database already
        return _move_up_rows(program, now, since)
    with connection.cursor() as cursor:
        cursor.execute(_upgrade_sql(program), _backfill_params(program, now, since, start))
        return cursor.fetchone()[0]


def tier_counts_add(*, program: Program, transaction_ids: list[int], now: datetime) -> int:
    """Count newly recorded purchases (an import's chunk) as tiers.tier_on_transaction counts one at a time: each
    added to its period's counter, set-based, and their members moved up at once where their window now reaches a
    higher tier. The number moved up. In the lock order of that path: the caller holds whatever accounts it
    credited, then the members' status rows are locked here in key order, then the counters written. PostgreSQL
    only, as the import is."""
    if not program.has_tiers or not transaction_ids:
        return 0
    since = counted_since(program=program, now=now)
    start = datetime.combine(since - timedelta(days=1), time.min, tzinfo=UTC)
    params = {**_backfill_params(program, now, since, start), "added": array_literal(transaction_ids)}
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT 1 FROM {TierStatus._meta.db_table} WHERE member_id IN (SELECT member_id FROM "
            f"{Transaction._meta.db_table} WHERE id = ANY(%(added)s::bigint[])) ORDER BY member_id FOR NO KEY UPDATE",
            params,
        )
        cursor.execute(_recount_sql(program, added=True)[1], params)
        cursor.execute(_upgrade_sql(program, added=True), params)
        return cursor.fetchone()[0]


def _backfill_params(program: Program, now: datetime, since, start: datetime) -> dict:
    return {
        "program": program.pk,
        "now": now,
        "since": since,
        "start": start,
        "purchase": Transaction.Kind.PURCHASE,
        "upgrade": TierChange.Reason.UPGRADE,
        "scale": _measure_sql(program)[1],
    }


def _recount_sql(program: Program, *, added: bool = False) -> tuple[str, str]:
    """Each purchase as it stands after its returns (what counting it and each return added up to), in the period
    of its day in the member's time zone: the month, or the month from the enrolment day (tier_windows.period_of).
    `added`: only the purchases `%(added)s` names, added to the counters as they stand (tier_counts_add)."""
    counter, member, txn = TierCounter._meta.db_table, Member._meta.db_table, Transaction._meta.db_table
    anniversary = program.tier_window == Program.TierWindow.ANNIVERSARY_YEAR
    anchor = "extract(day from m.enrolled_at AT TIME ZONE m.timezone)::int" if anniversary else "1"
    delete = f"""
DELETE FROM {counter} c USING {member} m
WHERE c.member_id = m.id AND m.program_id = %(program)s AND c.period >= %(since)s
"""
    # Purchases as they stand after their returns, and the points of the events that counted (not for `added`).
    events = f"""
UNION ALL
SELECT e.member_id, e.occurred_at, e.points, 0, 0 FROM {MemberEvent._meta.db_table} e
WHERE e.program_id = %(program)s AND e.qualifying AND e.occurred_at >= %(start)s
"""
    insert = f"""
INSERT INTO {counter} (member_id, period, points, spend_cents, purchases)
SELECT p.member_id, b.period, SUM(p.points), SUM(p.cents), SUM(p.purchases)
FROM (
    SELECT p.member_id, p.occurred_at, p.points - p.points_reversed AS points,
           ((p.total - p.returned_total) * 100)::bigint AS cents,
           CASE WHEN p.returned_total < p.total OR p.total = 0 THEN 1 ELSE 0 END AS purchases
    FROM {txn} p
    WHERE p.program_id = %(program)s AND p.kind = %(purchase)s AND p.occurred_at >= %(start)s
    {"AND p.id = ANY(%(added)s::bigint[])" if added else ""}
    {"" if added else events}
) p JOIN {member} m ON m.id = p.member_id
CROSS JOIN LATERAL (SELECT (p.occurred_at AT TIME ZONE m.timezone)::date AS day, {anchor} AS anchor) l
CROSS JOIN LATERAL (SELECT date_trunc('month', l.day)::date AS ms) a
CROSS JOIN LATERAL (
    -- The anchor day of this month and of the one before, clamped to their last days.
    SELECT a.ms + (LEAST(l.anchor, extract(day from a.ms + interval '1 month - 1 day')::int) - 1) AS this_start,
           (a.ms - interval '1 month')::date + (LEAST(l.anchor, extract(day from a.ms - interval '1 day')::int) - 1)
           AS prev_start
) s
CROSS JOIN LATERAL (SELECT CASE WHEN l.day >= s.this_start THEN s.this_start ELSE s.prev_start END AS period) b
WHERE b.period >= %(since)s
GROUP BY p.member_id, b.period
"""
    if added:
        insert += (
            f"ON CONFLICT (member_id, period) DO UPDATE SET points = {counter}.points + excluded.points, "
            f"spend_cents = {counter}.spend_cents + excluded.spend_cents, "
            f"purchases = {counter}.purchases + excluded.purchases"
        )
    return delete, insert


def _upgrade_sql(program: Program, *, added: bool = False) -> str:
    """tiers.tier_reevaluate's move up for every member with counters, at once: the measure of their current
    window, the highest active tier it reaches, and where that is above their tier (or the base tier, without a
    status row), that tier, a first review as tier_windows.first_review_at gives it, and an upgrade row. `added`:
    only for the members of the purchases `%(added)s` names."""
    column, _ = _measure_sql(program)
    window_start, next_review = _window_sql(program)
    status, member, tier = TierStatus._meta.db_table, Member._meta.db_table, Tier._meta.db_table
    counter, change, txn = TierCounter._meta.db_table, TierChange._meta.db_table, Transaction._meta.db_table
    review_at = "CASE WHEN u.new_threshold > 0 THEN (u.next_r::timestamp AT TIME ZONE u.tz) END"
    return f"""
WITH cand AS (
    SELECT m.id AS member_id, m.timezone AS tz, (%(now)s AT TIME ZONE m.timezone)::date AS today,
           (m.enrolled_at AT TIME ZONE m.timezone)::date AS enrolled
    FROM {member} m
    WHERE m.program_id = %(program)s
      AND EXISTS (SELECT 1 FROM {counter} c WHERE c.member_id = m.id AND c.period >= %(since)s)
      {f"AND m.id IN (SELECT member_id FROM {txn} WHERE id = ANY(%(added)s::bigint[]))" if added else ""}
), ends AS (
    SELECT d.*, {_current_end_sql(program)} AS r FROM cand d
), win AS (
    SELECT d.*, {window_start} AS w_start, {next_review} AS next_r FROM ends d
), ladder AS (
    SELECT t.id, t.rank, t.threshold, t.threshold * %(scale)s AS lo,
           lead(t.threshold * %(scale)s) OVER (ORDER BY t.rank) AS hi
    FROM {tier} t WHERE t.program_id = %(program)s AND t.retired_at IS NULL
), up AS (
    SELECT w.member_id, w.tz, w.next_r, s.member_id IS NOT NULL AS has_status,
           CASE WHEN s.member_id IS NULL THEN base.id ELSE s.tier_id END AS old_id,
           sup.id AS new_id, sup.threshold AS new_threshold
    FROM win w
    CROSS JOIN LATERAL (
        SELECT COALESCE(SUM(c.{column}), 0) AS total FROM {counter} c
        WHERE c.member_id = w.member_id AND c.period >= w.w_start
    ) ms
    JOIN ladder sup ON ms.total >= sup.lo AND (sup.hi IS NULL OR ms.total < sup.hi)
    LEFT JOIN {status} s ON s.member_id = w.member_id
    LEFT JOIN {tier} cur ON cur.id = s.tier_id
    LEFT JOIN (SELECT l.id, l.rank FROM ladder l WHERE l.lo <= 0 ORDER BY l.rank DESC LIMIT 1) base ON true
    WHERE sup.rank > COALESCE(CASE WHEN s.member_id IS NULL THEN base.rank ELSE cur.rank END, -1)
), upd AS (
    UPDATE {status} s SET tier_id = u.new_id, since = %(now)s, review_at = {review_at}, manual_until = NULL,
        manual_reason = '', manual_by_id = NULL, manual_api_client_id = NULL, updated_at = %(now)s
    -- Compare-and-set, as tiers._move: a row the review changed meanwhile (without the table lock) is left to it.
    FROM up u WHERE u.has_status AND s.member_id = u.member_id AND s.tier_id IS NOT DISTINCT FROM u.old_id
    RETURNING s.member_id
), ins AS (
    INSERT INTO {status} (member_id, program_id, tier_id, since, review_at, manual_reason, updated_at)
    SELECT u.member_id, %(program)s, u.new_id, %(now)s, {review_at}, '', %(now)s FROM up u WHERE NOT u.has_status
    ON CONFLICT (member_id) DO NOTHING
    RETURNING member_id
), hist AS (
    INSERT INTO {change} (member_id, program_id, from_tier_id, to_tier_id, reason, note, occurred_at)
    SELECT u.member_id, %(program)s, u.old_id, u.new_id, %(upgrade)s, '', %(now)s FROM up u
    WHERE u.member_id IN (SELECT member_id FROM upd UNION ALL SELECT member_id FROM ins)
    RETURNING 1
)
SELECT count(*) FROM hist
"""


def _backfill_rows(program: Program, now: datetime, since, start: datetime) -> int:
    """The same backfill, row by row: for databases without the SQL above, and as its reference in the tests."""
    TierCounter.objects.filter(member__program=program, period__gte=since).delete()
    sums = defaultdict(lambda: [0, 0, 0])
    purchases = Transaction.objects.filter(
        program=program, kind=Transaction.Kind.PURCHASE, member__isnull=False, occurred_at__gte=start
    ).select_related("member")
    for p in purchases.iterator():
        member = p.member
        period = period_of(p.occurred_at.astimezone(member.tz).date(), anchor_day(program=program, member=member))
        if period >= since:
            row = sums[member.pk, period]
            row[0] += p.points - p.points_reversed
            row[1] += int((p.total - p.returned_total) * 100)
            row[2] += p.returned_total < p.total or p.total == 0
    events = MemberEvent.objects.filter(program=program, qualifying=True, occurred_at__gte=start).select_related(
        "member"
    )
    for e in events.iterator():
        member = e.member
        period = period_of(e.occurred_at.astimezone(member.tz).date(), anchor_day(program=program, member=member))
        if period >= since:
            sums[member.pk, period][0] += e.points
    TierCounter.objects.bulk_create(
        TierCounter(member_id=member_id, period=period, points=points, spend_cents=cents, purchases=count)
        for (member_id, period), (points, cents, count) in sums.items()
    )
    return _move_up_rows(program, now, since)


def _move_up_rows(program: Program, now: datetime, since) -> int:
    """_upgrade_sql's move up, member by member, for everyone with counters from `since` on."""
    counted = TierCounter.objects.filter(period__gte=since).values("member_id")
    members = Member.objects.filter(program=program, pk__in=counted).order_by("pk")
    return sum(tier_reevaluate(program=program, member=member, now=now) is not None for member in members)
