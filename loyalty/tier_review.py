"""The periodic tier review: members whose review date (plus the grace days) has passed keep their tier for another
period if their window supports it, or move down (one tier, or to the supported tier: the programme's choice);
manual tiers past their end give way to the tier the member had earned, until its review, or to a higher one that
their window supports.

Set-based on PostgreSQL: one statement per batch claims the due rows in primary-key order (FOR UPDATE SKIP LOCKED),
sums their counters over each member's own window, decides, updates and writes the history rows. A reviewed member's
review date moves a period on, so a second run finds nothing to do, and concurrent runs skip each other's rows.
The members are split into `workers` ranges of member ids reviewed at once, each in its own thread and database
connection (settings.TIER_REVIEW_WORKERS): one statement keeps one PostgreSQL core busy.
Other databases (the embedded SQLite default) run the same rules row by row through loyalty.tier_windows."""

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import connection, transaction

from core.db import batch_statements
from core.models import Program
from loyalty.tier_models import Tier, TierChange, TierCounter, TierStatus
from loyalty.tier_windows import current_window_start, first_review_at, next_review_at, review_window
from members.models import Member


@dataclass(frozen=True)
class ReviewResult:
    reviewed: int = 0
    changed: int = 0
    manual_expired: int = 0

    def __add__(self, other: "ReviewResult") -> "ReviewResult":
        return ReviewResult(
            self.reviewed + other.reviewed, self.changed + other.changed, self.manual_expired + other.manual_expired
        )


@batch_statements()
def tiers_review_due(
    *, now: datetime, batch_size: int = 10_000, set_based: bool | None = None, workers: int | None = None
) -> ReviewResult:
    """Review every member whose review (plus grace) is due at `now`, and end manual tiers past their end date.
    Safe to run twice or concurrently; each batch commits on its own. Inside a database transaction (or with one
    worker, or row by row) the ranges are reviewed one after another in this connection: other connections would
    not see the transaction's rows."""
    if set_based is None:
        set_based = connection.vendor == "postgresql"
    workers = settings.TIER_REVIEW_WORKERS if workers is None else workers
    parallel = set_based and workers > 1 and not connection.in_atomic_block
    result = ReviewResult()
    for program in Program.objects.order_by("pk"):
        result += _expire_manual(program, now, batch_size)
        ranges = _id_ranges(workers if parallel else 1)
        if len(ranges) == 1:
            result += _review_range(program, now, batch_size, set_based, ranges[0])
            continue
        failed = threading.Event()  # set by a worker that fails: the others stop after their current batch
        with ThreadPoolExecutor(len(ranges), thread_name_prefix="tier-review") as pool:
            parts = [pool.submit(_review_range_in_thread, program, now, batch_size, ids, failed) for ids in ranges]
            for part in parts:
                result += part.result()
    return result


def _id_ranges(count: int) -> list[tuple[int, int | None]]:
    """`count` ranges (after, up to) of member ids that together hold every tier status, the last without an end;
    (0, None) for one. Split by the ids' span (two index probes), not by what is due: due reviews spread over all
    ids."""
    if count > 1:
        with connection.cursor() as cursor:
            cursor.execute(f"SELECT min(member_id), max(member_id) FROM {TierStatus._meta.db_table}")
            low, high = cursor.fetchone()
        if low is not None and high - low >= count:
            bounds = [low - 1 + (high - low + 1) * k // count for k in range(count)]
            return list(zip(bounds, [*bounds[1:], None], strict=True))
    return [(0, None)]


def _review_range(
    program: Program, now: datetime, batch_size: int, set_based: bool, ids, stop: threading.Event | None = None
) -> ReviewResult:
    """Review the due members with ids in `ids` (after, up to; None: no end), batch by batch, until done or `stop`."""
    review = _review_batch_sql if set_based else _review_batch_rows
    after, upto = ids
    result = ReviewResult()
    while stop is None or not stop.is_set():
        with transaction.atomic():
            reviewed, changed, last = review(program, now, batch_size, after, upto)
        result += ReviewResult(reviewed=reviewed, changed=changed)
        if last is None:
            break
        after = last
    return result


def _review_range_in_thread(program: Program, now: datetime, batch_size: int, ids, failed) -> ReviewResult:
    """_review_range on this thread's own database connection, closed when done; a failure stops the others."""
    try:
        with batch_statements():
            return _review_range(program, now, batch_size, True, ids, failed)
    except BaseException:
        failed.set()
        raise
    finally:
        connection.close()


def _measure_sql(program: Program) -> tuple[str, int]:
    from loyalty.tiers import MEASURE_COLUMN

    return MEASURE_COLUMN[program.tier_measure], 100 if program.tier_measure == Program.TierMeasure.SPEND else 1


def _window_sql(program: Program) -> tuple[str, str]:
    """SQL for the first period of the window a review at local date `r` counts, and for the next review date;
    the same arithmetic as loyalty.tier_windows.review_window and next_review_at."""
    if program.tier_window == Program.TierWindow.CALENDAR_YEAR:
        return (
            "(date_trunc('year', d.r) - interval '1 year')::date",
            "(date_trunc('year', d.r) + interval '1 year')::date",
        )
    if program.tier_window == Program.TierWindow.ANNIVERSARY_YEAR:
        years = "(extract(year from d.r) - extract(year from d.enrolled))::int"
        return (
            f"(d.enrolled + make_interval(years => {years} - 1))::date",
            f"(d.enrolled + make_interval(years => {years} + 1))::date",
        )
    months = int(program.tier_window_months)
    return (
        f"(d.r - make_interval(months => {months}))::date",
        f"(date_trunc('month', d.r) + make_interval(months => {months}))::date",
    )


def _current_end_sql(program: Program) -> str:
    """SQL for the review date at which the current window of a member whose local date is `d.today` ends: the next
    window's first day. _window_sql of it gives the current window's first period (tier_windows.current_window_start)
    and the first review of a tier reached today (tier_windows.first_review_at)."""
    if program.tier_window == Program.TierWindow.CALENDAR_YEAR:
        return "(date_trunc('year', d.today) + interval '1 year')::date"
    if program.tier_window == Program.TierWindow.ANNIVERSARY_YEAR:
        years = "(extract(year from d.today) - extract(year from d.enrolled))::int"
        return (
            f"(CASE WHEN d.enrolled + make_interval(years => {years}) <= d.today "
            f"THEN d.enrolled + make_interval(years => {years} + 1) "
            f"ELSE d.enrolled + make_interval(years => {years}) END)::date"
        )
    return "(date_trunc('month', d.today) + interval '1 month')::date"


def _review_batch_sql(
    program: Program, now: datetime, batch_size: int, after: int, upto: int | None
) -> tuple[int, int, int | None]:
    column, scale = _measure_sql(program)
    window_start, next_review = _window_sql(program)
    status, member, tier = TierStatus._meta.db_table, Member._meta.db_table, Tier._meta.db_table
    counter, change = TierCounter._meta.db_table, TierChange._meta.db_table
    to_supported = program.tier_downgrade == Program.TierDowngrade.TO_SUPPORTED
    sql = f"""
WITH due AS (
    SELECT s.member_id, s.tier_id, m.timezone AS tz,
           (s.review_at AT TIME ZONE m.timezone)::date AS r,
           (m.enrolled_at AT TIME ZONE m.timezone)::date AS enrolled
    FROM {status} s JOIN {member} m ON m.id = s.member_id
    WHERE s.program_id = %(program)s AND s.review_at <= %(cutoff)s AND s.manual_until IS NULL
      AND s.member_id > %(after)s AND (%(upto)s::bigint IS NULL OR s.member_id <= %(upto)s::bigint)
    ORDER BY s.member_id
    LIMIT %(batch)s
    FOR UPDATE OF s SKIP LOCKED
), win AS (
    SELECT d.*, {window_start} AS w_start, {next_review} AS next_r FROM due d
), ladder AS (
    -- Active tiers as ranges of the measure (thresholds rise with rank: tier_setup enforces it).
    SELECT t.id, t.rank, t.threshold, t.threshold * %(scale)s AS lo,
           lead(t.threshold * %(scale)s) OVER (ORDER BY t.rank) AS hi
    FROM {tier} t WHERE t.program_id = %(program)s AND t.retired_at IS NULL
), steps AS (
    -- For every tier a member may hold (retired ones too), its rank and the active tier one step below it.
    SELECT t.id, t.rank, b.id AS below_id, b.rank AS below_rank, b.threshold AS below_threshold
    FROM {tier} t LEFT JOIN LATERAL (
        SELECT l.id, l.rank, l.threshold FROM ladder l WHERE l.rank < t.rank ORDER BY l.rank DESC LIMIT 1
    ) b ON true
    WHERE t.program_id = %(program)s
), decided AS (
    SELECT w.member_id, w.tier_id AS old_id, w.tz, w.next_r, cur.rank AS old_rank,
           sup.id AS sup_id, sup.rank AS sup_rank, sup.threshold AS sup_threshold,
           cur.below_id, cur.below_rank, cur.below_threshold
    FROM win w
    CROSS JOIN LATERAL (
        -- One index range per member over the counters' (member_id, period) key.
        SELECT COALESCE(SUM(c.{column}), 0) AS total FROM {counter} c
        WHERE c.member_id = w.member_id AND c.period >= w.w_start AND c.period < w.r + %(grace)s::int
    ) ms
    LEFT JOIN steps cur ON cur.id = w.tier_id
    LEFT JOIN ladder sup ON ms.total >= sup.lo AND (sup.hi IS NULL OR ms.total < sup.hi)
), chosen AS (
    SELECT d.member_id, d.old_id, d.old_rank, d.tz, d.next_r,
           CASE WHEN %(to_supported)s OR COALESCE(d.sup_rank, -1) >= COALESCE(d.old_rank, -1)
                THEN d.sup_id ELSE d.below_id END AS new_id,
           CASE WHEN %(to_supported)s OR COALESCE(d.sup_rank, -1) >= COALESCE(d.old_rank, -1)
                THEN d.sup_rank ELSE d.below_rank END AS new_rank,
           CASE WHEN %(to_supported)s OR COALESCE(d.sup_rank, -1) >= COALESCE(d.old_rank, -1)
                THEN d.sup_threshold ELSE d.below_threshold END AS new_threshold
    FROM decided d
), upd AS (
    UPDATE {status} s SET
        tier_id = c.new_id,
        since = CASE WHEN c.new_id IS DISTINCT FROM c.old_id THEN %(now)s ELSE s.since END,
        review_at = CASE WHEN c.new_threshold > 0 THEN (c.next_r::timestamp AT TIME ZONE c.tz) END,
        updated_at = %(now)s
    FROM chosen c WHERE s.member_id = c.member_id
    RETURNING s.member_id
), hist AS (
    INSERT INTO {change} (member_id, program_id, from_tier_id, to_tier_id, reason, note, occurred_at)
    SELECT c.member_id, %(program)s, c.old_id, c.new_id,
           CASE WHEN COALESCE(c.new_rank, -1) > COALESCE(c.old_rank, -1) THEN 'upgrade' ELSE 'downgrade' END,
           '', %(now)s
    FROM chosen c WHERE c.new_id IS DISTINCT FROM c.old_id
    RETURNING 1
)
SELECT (SELECT count(*) FROM upd), (SELECT count(*) FROM hist), (SELECT max(member_id) FROM due)
"""
    params = {
        "program": program.pk,
        "cutoff": now - timedelta(days=program.tier_grace_days),
        "after": after,
        "upto": upto,
        "batch": batch_size,
        "grace": program.tier_grace_days,
        "scale": scale,
        "to_supported": to_supported,
        "now": now,
    }
    with connection.cursor() as cursor:
        # JIT-compiling this statement costs more than it saves on a batch, every batch.
        cursor.execute("SET LOCAL jit = off")
        cursor.execute(sql, params)
        reviewed, changed, last = cursor.fetchone()
    return reviewed, changed, last


def _review_batch_rows(
    program: Program, now: datetime, batch_size: int, after: int, upto: int | None
) -> tuple[int, int, int | None]:
    """The same review, row by row: for databases without the SQL above, and as its reference in the tests."""
    from loyalty.tiers import _rank, _supported, measure_in_window, threshold_units, tier_info_list

    tiers = tier_info_list(program_id=program.pk)
    due = list(
        TierStatus.objects.select_for_update(skip_locked=True, of=("self",))
        .select_related("member")
        .filter(
            program=program,
            review_at__lte=now - timedelta(days=program.tier_grace_days),
            manual_until__isnull=True,
            member_id__gt=after,
            **({"member_id__lte": upto} if upto is not None else {}),
        )
        .order_by("member_id")[:batch_size]
    )
    changed = 0
    for status in due:
        member = status.member
        start, end = review_window(program=program, member=member, review_at=status.review_at)
        measure = measure_in_window(program=program, member=member, since_period=start) - measure_in_window(
            program=program, member=member, since_period=end
        )
        current = next((t for t in tiers if t.id == status.tier_id), None)
        supported = _supported(program, tiers, measure)
        old_rank, sup_rank = _rank(current), _rank(supported)
        if program.tier_downgrade == Program.TierDowngrade.TO_SUPPORTED or sup_rank >= old_rank:
            new = supported
        else:
            below = [t for t in tiers if not t.retired and t.rank < old_rank]
            new = below[-1] if below else None
        new_id = new.id if new else None
        keeps_review = new is not None and threshold_units(program, new.threshold) > 0
        TierStatus.objects.filter(member_id=member.pk).update(
            tier_id=new_id,
            since=now if new_id != status.tier_id else status.since,
            review_at=next_review_at(program=program, member=member, review_at=status.review_at)
            if keeps_review
            else None,
            updated_at=now,
        )
        if new_id != status.tier_id:
            changed += 1
            TierChange.objects.create(
                member_id=member.pk,
                program=program,
                from_tier_id=status.tier_id,
                to_tier_id=new_id,
                reason=TierChange.Reason.UPGRADE if _rank(new) > old_rank else TierChange.Reason.DOWNGRADE,
                occurred_at=now,
            )
    return len(due), changed, due[-1].member_id if due else None


def _expire_manual(program: Program, now: datetime, batch_size: int) -> ReviewResult:
    """Manual tiers past their end give way to the tier the member earned before them, with its review date (which
    the status row kept meanwhile): members move down only at a review. Or to the tier their current window
    supports, if higher: members move up as soon as they qualify. Rare: row by row."""
    from loyalty.tiers import _by_id, _needs_review, _rank, _supported, measure_in_window, tier_info_list

    tiers = tier_info_list(program_id=program.pk)
    expired = 0
    while True:
        with transaction.atomic():
            batch = list(
                TierStatus.objects.select_for_update(skip_locked=True, of=("self",))
                .select_related("member")
                .filter(program=program, manual_until__lte=now)
                .order_by("member_id")[:batch_size]
            )
            for status in batch:
                member = status.member
                start = current_window_start(program=program, member=member, now=now)
                supported = _supported(
                    program, tiers, measure_in_window(program=program, member=member, since_period=start)
                )
                # The tier earned is where the last change not made by hand led; with none, the base tier.
                last = (
                    TierChange.objects.filter(member_id=member.pk)
                    .exclude(reason=TierChange.Reason.MANUAL)
                    .order_by("-id")
                    .values_list("to_tier_id", flat=True)[:1]
                )
                earned = _by_id(tiers, last[0]) if last else _supported(program, tiers, 0)
                # A row whose manual tier was set before rows kept the review date has none: review it at once.
                new, review_at = earned, status.review_at or now
                if _rank(supported) > _rank(earned):
                    new, review_at = supported, first_review_at(program=program, member=member, since=now)
                TierStatus.objects.filter(member_id=member.pk).update(
                    tier_id=new.id if new else None,
                    since=now,
                    review_at=review_at if _needs_review(program, new) else None,
                    manual_until=None,
                    manual_reason="",
                    manual_by=None,
                    manual_api_client=None,
                    updated_at=now,
                )
                TierChange.objects.create(
                    member_id=member.pk,
                    program=program,
                    from_tier_id=status.tier_id,
                    to_tier_id=new.id if new else None,
                    reason=TierChange.Reason.MANUAL_EXPIRED,
                    note=status.manual_reason,
                    occurred_at=now,
                )
            expired += len(batch)
        if len(batch) < batch_size:
            return ReviewResult(manual_expired=expired)
