"""Members' tiers: counting qualifying activity, moving up at once, and manual overrides (what a member sees is
loyalty.tier_selectors').

Definitions are changed by loyalty.tier_setup and reviewed by loyalty.tier_review (re-exported here). The earn path
calls `tier_on_transaction` only when the programme has tiers (Program.has_tiers, loaded with the API client), so a
programme without tiers pays nothing; with tiers it costs a row lock, one upsert and one read unless the tier
changes."""

import time
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from django.db import connection
from django.db import transaction as db_transaction
from django.utils import timezone

from core.errors import InvalidInput
from core.models import ApiClient, Program
from loyalty.models import Transaction
from loyalty.tier_models import Tier, TierChange, TierCounter, TierStatus
from loyalty.tier_windows import anchor_day, current_window_start, earning_window, first_review_at, period_of
from members.models import Member

# Tier definitions are read on every purchase of a programme with tiers, so they are remembered in-process for a
# few seconds. tier_setup clears this process's copy on every change; other processes see a change within this time.
TIER_CACHE_SECONDS = 5
_tier_cache: dict[int, tuple[tuple["TierInfo", ...], float]] = {}

MEASURE_COLUMN = {
    Program.TierMeasure.POINTS: "points",
    Program.TierMeasure.SPEND: "spend_cents",
    Program.TierMeasure.PURCHASES: "purchases",
}


@dataclass(frozen=True)
class TierInfo:
    id: int
    code: str
    rank: int
    threshold: Decimal
    earn_multiplier: Decimal
    retired: bool


def tier_cache_clear(program_id: int | None = None) -> None:
    if program_id is None:
        _tier_cache.clear()
    else:
        _tier_cache.pop(program_id, None)


def tier_info_list(*, program_id: int) -> tuple[TierInfo, ...]:
    """Every tier of the programme, retired ones too (members may still hold them), lowest rank first."""
    cached = _tier_cache.get(program_id)
    if cached and time.monotonic() - cached[1] < TIER_CACHE_SECONDS:
        return cached[0]
    tiers = tuple(
        TierInfo(id=t[0], code=t[1], rank=t[2], threshold=t[3], earn_multiplier=t[4], retired=t[5] is not None)
        for t in Tier.objects.filter(program_id=program_id)
        .order_by("rank", "id")
        .values_list("id", "code", "rank", "threshold", "earn_multiplier", "retired_at")
    )
    _tier_cache[program_id] = (tiers, time.monotonic())
    return tiers


def threshold_units(program: Program, threshold: Decimal) -> int:
    """A threshold in the counters' unit: cents for money, whole points or purchases otherwise."""
    return int(threshold * 100) if program.tier_measure == Program.TierMeasure.SPEND else int(threshold)


def _supported(program: Program, tiers: tuple[TierInfo, ...], units: int) -> TierInfo | None:
    """The highest active tier that `units` of the measure reach."""
    reached = [t for t in tiers if not t.retired and threshold_units(program, t.threshold) <= units]
    return reached[-1] if reached else None


def _by_id(tiers: tuple[TierInfo, ...], tier_id: int | None) -> TierInfo | None:
    return next((t for t in tiers if t.id == tier_id), None)


def _rank(tier: TierInfo | None) -> int:
    return -1 if tier is None else tier.rank


def _needs_review(program: Program, tier: TierInfo | Tier | None) -> bool:
    return tier is not None and threshold_units(program, tier.threshold) > 0


def measure_in_window(*, program: Program, member: Member, since_period, before_period=None) -> int:
    """The member's qualifying measure, in counter units, over the periods from `since_period` on (and before
    `before_period`, if given)."""
    sql = (
        f"SELECT COALESCE(SUM({MEASURE_COLUMN[program.tier_measure]}), 0) FROM {TierCounter._meta.db_table} "
        "WHERE member_id = %s AND period >= %s"
    )
    params = [member.pk, since_period]
    if before_period is not None:
        sql, params = f"{sql} AND period < %s", [*params, before_period]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return int(cursor.fetchone()[0])


def _count(txn: Transaction, member: Member, program: Program) -> None:
    """One statement: add a purchase's qualifying activity to its period (an upsert), or take a return's off its
    purchase's period (an update: without a row there, the purchase never counted, and there is nothing to take)."""
    if txn.kind != Transaction.Kind.RETURN:
        _count_add(member, program, txn.occurred_at, txn.points, int(txn.total * 100), 1)
        return
    source = txn.original
    period = period_of(source.occurred_at.astimezone(member.tz).date(), anchor_day(program=program, member=member))
    # A purchase stops counting as one when the return that completes it comes (the return's own update of the
    # purchase's returned_total is already visible in this database transaction). Never below zero: the period
    # may hold other purchases while this one, bought before the counters were rebuilt, never counted.
    greatest = "GREATEST" if connection.vendor == "postgresql" else "MAX"
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {TierCounter._meta.db_table} SET points = {greatest}(points + %s, 0), "
            f"spend_cents = {greatest}(spend_cents - %s, 0), "
            f"purchases = {greatest}(purchases - (SELECT CASE WHEN returned_total >= total "
            f"AND returned_total - %s < total THEN 1 ELSE 0 END FROM {Transaction._meta.db_table} WHERE id = %s), 0) "
            "WHERE member_id = %s AND period = %s",
            [txn.points, int(txn.total * 100), txn.total, source.pk, member.pk, period],
        )


def _count_add(member: Member, program: Program, occurred_at: datetime, points: int, cents: int, purchases: int):
    """Add to the counter of the period holding `occurred_at` in the member's time zone (an upsert)."""
    period = period_of(occurred_at.astimezone(member.tz).date(), anchor_day(program=program, member=member))
    table = TierCounter._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {table} (member_id, period, points, spend_cents, purchases) VALUES (%s, %s, %s, %s, %s) "
            f"ON CONFLICT (member_id, period) DO UPDATE SET points = {table}.points + excluded.points, "
            f"spend_cents = {table}.spend_cents + excluded.spend_cents, "
            f"purchases = {table}.purchases + excluded.purchases",
            [member.pk, period, points, cents, purchases],
        )


def _lock_status(member: Member) -> None:
    """Lock the member's status row, if they have one, until the transaction ends."""
    if connection.vendor != "postgresql":  # SQLite has no row locks: its IMMEDIATE transaction holds the database's
        return
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT 1 FROM {TierStatus._meta.db_table} WHERE member_id = %s FOR NO KEY UPDATE", [member.pk])


def _status_and_measure(
    program: Program, member: Member, now: datetime
) -> tuple[bool, int | None, datetime | None, datetime | None, int]:
    """(has a status row, its tier id, its manual end, its review date, the measure in the current window) in one
    read."""
    column = MEASURE_COLUMN[program.tier_measure]
    since_period = current_window_start(program=program, member=member, now=now)
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT s.member_id, s.tier_id, s.manual_until, s.review_at, (SELECT COALESCE(SUM(c.{column}), 0) "
            f"FROM {TierCounter._meta.db_table} c WHERE c.member_id = %s AND c.period >= %s) "
            f"FROM (SELECT 1 AS one) AS x LEFT JOIN {TierStatus._meta.db_table} s ON s.member_id = %s",
            [member.pk, since_period, member.pk],
        )
        found, tier_id, manual_until, review_at, measure = cursor.fetchone()
    return found is not None, tier_id, manual_until, review_at, int(measure)


def _insert_status(member: Member, program: Program, tier_id: int | None, now: datetime, review_at) -> bool:
    """INSERT the member's first status row; False when it exists already. The database decides, so of two first
    changes at once exactly one inserts (no check-then-insert race)."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {TierStatus._meta.db_table} (member_id, program_id, tier_id, since, review_at, "
            "manual_reason, updated_at) VALUES (%s, %s, %s, %s, %s, '', %s) "
            "ON CONFLICT (member_id) DO NOTHING RETURNING member_id",
            [member.pk, program.pk, tier_id, now, review_at, now],
        )
        return cursor.fetchone() is not None


def _move(
    *,
    program: Program,
    member: Member,
    exists: bool,
    from_id: int | None,
    to: TierInfo | None,
    reason: str,
    now: datetime,
    review_at: datetime | None,
    clear_manual: bool = False,
    **history,
) -> TierChange | None:
    """Compare-and-set the member's tier from `from_id` to `to`, with its history row. None when another
    transaction changed it first (its history row is the one that counts). Without a status row the member was
    at the base tier (`from_id`), and the first insert wins."""
    to_id = to.id if to else None
    if exists:
        fields = {"tier_id": to_id, "since": now, "review_at": review_at, "updated_at": now}
        if clear_manual:
            fields.update(manual_until=None, manual_reason="", manual_by=None, manual_api_client=None)
        changed = TierStatus.objects.filter(member_id=member.pk, tier_id=from_id).update(**fields)
    else:
        changed = _insert_status(member, program, to_id, now, review_at)
    if not changed:
        return None
    return TierChange.objects.create(
        member_id=member.pk,
        program_id=program.pk,
        from_tier_id=from_id,
        to_tier_id=to_id,
        reason=reason,
        occurred_at=now,
        **history,
    )


def tier_on_transaction(*, transaction: Transaction, now: datetime) -> TierChange | None:
    """Count a purchase's or return's qualifying activity; move the member up at once when they qualify, and after
    a return, down at once if the programme re-evaluates on returns. Runs inside the caller's database transaction;
    concurrent purchases of one member upgrade once (compare-and-set on the status row)."""
    program, member = transaction.program, transaction.member
    if member is None:
        return None
    # Why: the review job decides on the counters it can see. Holding the member's status row from before the count
    # until commit makes the review skip them (SKIP LOCKED) while this activity is uncommitted, or makes this wait
    # for a review that got there first and then read the counters and the reviewed tier afresh (a new statement,
    # a new snapshot). Exclusive, not shared: two of the member's transactions that share-locked the row could
    # each wait for the other to upgrade it. Locked before the counter, like every path that takes both.
    _lock_status(member)
    _count(transaction, member, program)
    is_return = transaction.kind == Transaction.Kind.RETURN
    if is_return and program.tier_return_policy != Program.TierReturnPolicy.REEVALUATE:
        return None
    return tier_reevaluate(program=program, member=member, now=now, transaction=transaction)


def tier_on_event(*, program: Program, member: Member, points: int, occurred_at: datetime, now: datetime) -> None:
    """Count a qualifying event's points (EventType.qualifying) as a purchase's are counted, and move the member up
    at once if they now qualify. The caller holds the member's account lock, as for a purchase."""
    if not program.has_tiers:
        return
    _lock_status(member)
    _count_add(member, program, occurred_at, points, 0, 0)
    tier_reevaluate(program=program, member=member, now=now)


def tier_reevaluate(
    *, program: Program, member: Member, now: datetime, transaction: Transaction | None = None
) -> TierChange | None:
    """Move the member up at once if their current window supports a higher tier; after a return (`transaction`),
    down if nothing holds their tier any more. Compare-and-set on the status row; the caller holds its lock."""
    is_return = transaction is not None and transaction.kind == Transaction.Kind.RETURN
    tiers = tier_info_list(program_id=program.pk)
    for _attempt in range(3):
        exists, tier_id, manual_until, review_at, measure = _status_and_measure(program, member, now)
        supported = _supported(program, tiers, measure)
        current = _by_id(tiers, tier_id) if exists else _supported(program, tiers, 0)
        manual = manual_until is not None and manual_until > now
        if _rank(supported) > _rank(current):
            to, reason, clear_manual = supported, TierChange.Reason.UPGRADE, True
            review_at = first_review_at(program=program, member=member, since=now)
        elif is_return and not manual and _rank(supported) < _rank(current):
            to, review_at = _after_return(program, member, tiers, current, supported, review_at, now)
            if to == current:
                return None
            reason, clear_manual = TierChange.Reason.RETURN, False
        else:
            return None
        change = _move(
            program=program,
            member=member,
            exists=exists,
            from_id=tier_id if exists else (current.id if current else None),
            to=to,
            reason=reason,
            now=now,
            review_at=review_at if _needs_review(program, to) else None,
            clear_manual=clear_manual,
            transaction=transaction,
        )
        if change is not None:
            return change
    return None


def _after_return(
    program: Program,
    member: Member,
    tiers: tuple[TierInfo, ...],
    current: TierInfo,
    supported: TierInfo | None,
    review_at: datetime | None,
    now: datetime,
) -> tuple[TierInfo | None, datetime | None]:
    """The tier, and its review date, that a return leaves a member with under the re-evaluate policy. Until its
    review, a tier is held by the window it was earned in (or kept on), not only by the current one: a return moves
    the member down only if it took that window below the tier too, and then one tier or to what the windows still
    support, as the review would."""
    held = supported
    if review_at is not None:
        start, end = earning_window(program=program, member=member, review_at=review_at)
        earned = measure_in_window(program=program, member=member, since_period=start, before_period=end)
        held = max(supported, _supported(program, tiers, earned), key=_rank)
    if _rank(held) >= _rank(current):
        return current, review_at
    if program.tier_downgrade == Program.TierDowngrade.ONE_STEP:
        below = [t for t in tiers if not t.retired and t.rank < current.rank]
        to = below[-1] if below else None
    else:
        to = held
    # A tier the current window supports is reviewed as if reached now, like an upgrade; any other at the review
    # the lost tier had, where the window that earned it is judged again.
    if _rank(supported) >= _rank(to):
        return to, first_review_at(program=program, member=member, since=now)
    return to, review_at


@db_transaction.atomic
def tier_set_manual(
    *,
    member: Member,
    tier: Tier,
    reason: str,
    until: datetime,
    now: datetime | None = None,
    staff_user=None,
    api_client: ApiClient | None = None,
) -> TierChange:
    """Staff give a member a tier until `until`, with a reason; the review leaves it alone until then. It then gives
    way to the tier the member had earned, whose review date the status row keeps meanwhile, or to a higher one
    their window supports by then. Locks the member's status row; writes the history row with it."""
    now = now or timezone.now()
    errors = {}
    if tier.program_id != member.program_id or tier.retired_at is not None:
        errors["tier"] = ["Not an active tier of the member's programme."]
    if not reason or not reason.strip():
        errors["reason"] = ["Give the reason."]
    elif len(reason) > 500:
        errors["reason"] = ["At most 500 characters."]
    if until <= now:
        errors["until"] = ["Must lie in the future."]
    if errors:
        raise InvalidInput(
            "The tier cannot be set: " + "; ".join(f"{k}: {v[0]}" for k, v in errors.items()), errors=errors
        )
    program = member.program
    if _insert_status(member, program, None, now, None):
        # The member had no row: they were at the base tier, if the programme has one.
        base = _supported(program, tier_info_list(program_id=program.pk), 0)
        from_id = base.id if base else None
    else:
        from_id = TierStatus.objects.select_for_update().values_list("tier_id", flat=True).get(member_id=member.pk)
    TierStatus.objects.filter(member_id=member.pk).update(
        tier=tier,
        since=now,
        manual_until=until,
        manual_reason=reason.strip(),
        manual_by=staff_user,
        manual_api_client=api_client,
        updated_at=now,
    )
    return TierChange.objects.create(
        member_id=member.pk,
        program_id=program.pk,
        from_tier_id=from_id,
        to_tier=tier,
        reason=TierChange.Reason.MANUAL,
        note=reason.strip(),
        occurred_at=now,
        staff_user=staff_user,
        api_client=api_client,
    )


from loyalty.tier_review import tiers_review_due  # noqa: E402,F401  (the review job's public name lives here too)
