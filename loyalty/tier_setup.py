"""Defining tiers and the programme's tier settings. A change applies from now on and never rewrites history:
whoever a new or lowered tier fits moves up at once (members_move_up), as a purchase would move them; nobody moves
down before their review; history rows stay.

The qualifying counters are kept only while the programme has tiers, so its first tier recounts them from the
recorded purchases and returns, as does a new measure or window (periods may start on other days), and moves up at
once whoever qualifies: tier_counters_backfill."""

import re
from collections import defaultdict
from datetime import UTC, datetime, time, timedelta
from decimal import Decimal

from django.core.exceptions import ValidationError
from django.db import connection, transaction
from django.utils import timezone

from core.errors import Conflict, InvalidInput
from core.models import Program
from loyalty.models import Transaction
from loyalty.tier_models import Tier, TierChange, TierCounter, TierStatus
from loyalty.tier_review import _current_end_sql, _measure_sql, _window_sql
from loyalty.tier_windows import anchor_day, counted_since, period_of
from loyalty.tiers import tier_cache_clear, tier_reevaluate
from members.models import Member

TIER_FIELDS = (
    "name_en",
    "name_sv",
    "name_nb",
    "perks_en",
    "perks_sv",
    "perks_nb",
    "rank",
    "threshold",
    "earn_multiplier",
)
PROGRAM_FIELDS = (
    "name",
    "points_per_unit",
    "rounding",
    "pending_days",
    "expiry_months",
    "return_policy",
    "max_transaction_age_days",
    "tier_measure",
    "tier_window",
    "tier_window_months",
    "tier_grace_days",
    "tier_downgrade",
    "tier_return_policy",
)
CODE_RE = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
MAX_MULTIPLIER = Decimal(100)


class TierCodeTaken(Conflict):
    code, title = "tier_code_taken", "The programme already has a tier with this code"


class TierRankTaken(Conflict):
    code, title = "tier_rank_taken", "Another active tier has this rank"


class TierRetired(Conflict):
    code, title = "tier_retired", "The tier is retired"


class TierThresholdsNotIncreasing(InvalidInput):
    code, title = "tier_thresholds_not_increasing", "Thresholds must increase with rank"


def _check_fields(program: Program, values: dict) -> None:
    errors = {}
    if "earn_multiplier" in values:
        m = values["earn_multiplier"]
        if m is None or m < 1 or m > MAX_MULTIPLIER:
            errors["earn_multiplier"] = [f"Must be between 1 and {MAX_MULTIPLIER}: a tier never earns less."]
    if "threshold" in values:
        t = values["threshold"]
        if t is None or t < 0:
            errors["threshold"] = ["Must be 0 or more."]
        elif program.tier_measure != Program.TierMeasure.SPEND and t != t.to_integral_value():
            errors["threshold"] = [f"Must be a whole number of {program.tier_measure}."]
    if "rank" in values and (values["rank"] is None or not 0 <= values["rank"] <= 1000):
        errors["rank"] = ["Must be between 0 and 1000."]
    if "name_en" in values and not (values["name_en"] or "").strip():
        errors["name_en"] = ["Give the English name."]
    if errors:
        raise InvalidInput(
            "The tier is not valid: " + "; ".join(f"{k}: {v[0]}" for k, v in errors.items()), errors=errors
        )


def _check_ladder(program: Program, tiers: list[Tier]) -> None:
    """Active tiers: ranks unique, thresholds strictly increasing with rank (else a tier could never be reached)."""
    active = sorted((t for t in tiers if t.retired_at is None), key=lambda t: t.rank)
    for lower, upper in zip(active, active[1:], strict=False):
        if lower.rank == upper.rank:
            raise TierRankTaken(
                f"Tiers {lower.code} and {upper.code} would both have rank {upper.rank}.",
                errors={"rank": [f"Rank {upper.rank} is taken by another active tier."]},
            )
        if upper.threshold <= lower.threshold:
            raise TierThresholdsNotIncreasing(
                f"Tier {upper.code} (rank {upper.rank}) needs a threshold above {lower.threshold}, the threshold "
                f"of {lower.code} (rank {lower.rank}); it has {upper.threshold}.",
                errors={"threshold": [f"Must be more than {lower.threshold} (tier {lower.code}, rank {lower.rank})."]},
            )


def _locked_tiers(program: Program) -> list[Tier]:
    # The programme row serialises every change of its tiers, so two changes cannot both pass the ladder check.
    Program.objects.select_for_update().filter(pk=program.pk).first()
    return list(Tier.objects.filter(program=program).order_by("rank", "id"))


def _sync(program: Program) -> None:
    """Keep Program.has_tiers, which the earn path reads instead of querying, and drop cached definitions."""
    has = Tier.objects.filter(program=program, retired_at__isnull=True).exists()
    Program.objects.filter(pk=program.pk).update(has_tiers=has)
    program.has_tiers = has
    tier_cache_clear(program.pk)
    transaction.on_commit(lambda: tier_cache_clear(program.pk))


def tier_check(*, program: Program, tier: Tier) -> None:
    """Would saving `tier` (new or changed, not yet saved) keep the ladder valid? Raises the error the service would;
    for forms that want to answer before saving. The services check again under the programme lock."""
    if not CODE_RE.match(tier.code or ""):
        raise InvalidInput("A tier code is 1-32 letters, digits, '-' or '_'.", errors={"code": ["Not a valid code."]})
    _check_fields(program, {name: getattr(tier, name) for name in TIER_FIELDS})
    others = list(Tier.objects.filter(program=program).exclude(pk=tier.pk))
    if tier.pk is None and any(t.code.lower() == tier.code.lower() for t in others):
        raise TierCodeTaken(f"Tier code {tier.code} is taken (codes are never reused, not even after retirement).")
    _check_ladder(program, [*others, tier])


@transaction.atomic
def tier_create(
    *, program: Program, code: str, name_en: str, rank: int, threshold: Decimal, now: datetime | None = None, **fields
) -> Tier:
    """Add a tier. Refuses a taken code or rank and thresholds that do not increase with rank; writes nothing then.
    The programme's first active tier recounts the qualifying counters as of `now` (tier_counters_backfill)."""
    unknown = set(fields) - set(TIER_FIELDS)
    if unknown:
        raise InvalidInput(f"Unknown tier fields: {', '.join(sorted(unknown))}.")
    if not CODE_RE.match(code or ""):
        raise InvalidInput(
            "A tier code is 1-32 letters, digits, '-' or '_'.", errors={"code": ["Letters, digits, '-', '_'."]}
        )
    values = {"name_en": name_en, "rank": rank, "threshold": Decimal(threshold), **fields}
    values.setdefault("earn_multiplier", Decimal(1))
    _check_fields(program, values)
    tiers = _locked_tiers(program)
    if any(t.code.lower() == code.lower() for t in tiers):
        raise TierCodeTaken(f"Tier code {code} is taken (codes are never reused, not even after retirement).")
    tier = Tier(program=program, code=code, **values)
    _check_ladder(program, [*tiers, tier])
    tier.save()
    _sync(program)
    if not any(t.retired_at is None for t in tiers):
        tier_counters_backfill(program=program, now=now or timezone.now(), counting=False)
    else:
        members_move_up(program=program, now=now or timezone.now())
    return tier


@transaction.atomic
def tier_update(*, tier: Tier, now: datetime | None = None, **fields) -> Tier:
    """Change a tier's names, perks, rank, threshold or multiplier. Whoever qualifies under a new threshold or rank
    moves up at once; moving down waits for each member's review. The code never changes."""
    unknown = set(fields) - set(TIER_FIELDS)
    if unknown:
        raise InvalidInput(f"These tier fields cannot be changed: {', '.join(sorted(unknown))}.")
    program = tier.program
    _check_fields(program, fields)
    tiers = _locked_tiers(program)
    current = next(t for t in tiers if t.pk == tier.pk)
    if current.retired_at is not None:
        raise TierRetired(f"Tier {current.code} is retired and cannot be changed.")
    ladder = (current.rank, current.threshold)
    for name, value in fields.items():
        setattr(current, name, value)
    _check_ladder(program, tiers)
    current.save()
    _sync(program)
    if (current.rank, current.threshold) != ladder:
        members_move_up(program=program, now=now or timezone.now())
    return current


@transaction.atomic
def tier_retire(*, tier: Tier) -> Tier:
    """Retire a tier: nobody reaches it any more; members holding it keep it until their review. Idempotent."""
    program = tier.program
    tiers = _locked_tiers(program)
    current = next(t for t in tiers if t.pk == tier.pk)
    if current.retired_at is None:
        current.retired_at = timezone.now()
        current.save(update_fields=["retired_at", "updated_at"])
        _sync(program)
    return current


@transaction.atomic
def program_settings_update(*, program: Program, now: datetime | None = None, **fields) -> Program:
    """Change the programme's settings (earning basics and tier qualification). Points already earned and tier
    history stay as they were. A new measure or window recounts the qualifying counters and moves up at once whoever
    qualifies under it; moving down waits for each member's review."""
    unknown = set(fields) - set(PROGRAM_FIELDS)
    if unknown:
        raise InvalidInput(f"These programme settings cannot be changed: {', '.join(sorted(unknown))}.")
    tiers = _locked_tiers(program)
    program_measure_check(tiers, fields.get("tier_measure", program.tier_measure))
    qualification = _qualification(program)
    for name, value in fields.items():
        setattr(program, name, value)
    try:
        program.full_clean(exclude=["code", "currency"])
    except ValidationError as exc:
        errors = {k: [str(m) for m in v] for k, v in exc.message_dict.items()}
        raise InvalidInput(
            "The settings are not valid: " + "; ".join(f"{k}: {v[0]}" for k, v in errors.items()), errors=errors
        ) from exc
    program.save(update_fields=[*fields, "updated_at"])
    if _qualification(program) != qualification and any(t.retired_at is None for t in tiers):
        tier_counters_backfill(program=program, now=now or timezone.now(), counting=True)
    tier_cache_clear(program.pk)
    return program


def program_measure_check(tiers: list[Tier], measure: str) -> None:
    """InvalidInput where active tiers' thresholds are not whole numbers of a measure that counts in whole ones."""
    if measure != Program.TierMeasure.SPEND:
        fractional = [t.code for t in tiers if t.retired_at is None and t.threshold != t.threshold.to_integral_value()]
        if fractional:
            raise InvalidInput(
                f"Tiers {', '.join(fractional)} have thresholds that are not whole {measure}; change them first.",
                code="tier_thresholds_not_whole",
                errors={"tier_measure": [f"Thresholds of {', '.join(fractional)} are not whole numbers."]},
            )


def _qualification(program: Program) -> tuple:
    """The settings that decide what the counters hold and which of them count."""
    rolling = program.tier_window == Program.TierWindow.ROLLING
    return program.tier_measure, program.tier_window, program.tier_window_months if rolling else None


def tier_counters_backfill(*, program: Program, now: datetime, counting: bool, set_based: bool | None = None) -> int:
    """Recount the qualifying counters of the programme's members from its recorded purchases and returns, over
    the periods that any window at `now` reads (tier_windows.counted_since), and move up at once every member whose
    current window supports a higher tier, as a purchase would. The number moved up. Runs in the caller's
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


def _recount_sql(program: Program) -> tuple[str, str]:
    """Each purchase as it stands after its returns (what counting it and each return added up to), in the period
    of its day in the member's time zone: the month, or the month from the enrolment day (tier_windows.period_of)."""
    counter, member, txn = TierCounter._meta.db_table, Member._meta.db_table, Transaction._meta.db_table
    anniversary = program.tier_window == Program.TierWindow.ANNIVERSARY_YEAR
    anchor = "extract(day from m.enrolled_at AT TIME ZONE m.timezone)::int" if anniversary else "1"
    delete = f"""
DELETE FROM {counter} c USING {member} m
WHERE c.member_id = m.id AND m.program_id = %(program)s AND c.period >= %(since)s
"""
    insert = f"""
INSERT INTO {counter} (member_id, period, points, spend_cents, purchases)
SELECT p.member_id, b.period, SUM(p.points - p.points_reversed), SUM(((p.total - p.returned_total) * 100)::bigint),
       COUNT(*) FILTER (WHERE p.returned_total < p.total OR p.total = 0)
FROM {txn} p JOIN {member} m ON m.id = p.member_id
CROSS JOIN LATERAL (SELECT (p.occurred_at AT TIME ZONE m.timezone)::date AS day, {anchor} AS anchor) l
CROSS JOIN LATERAL (SELECT date_trunc('month', l.day)::date AS ms) a
CROSS JOIN LATERAL (
    -- The anchor day of this month and of the one before, clamped to their last days.
    SELECT a.ms + (LEAST(l.anchor, extract(day from a.ms + interval '1 month - 1 day')::int) - 1) AS this_start,
           (a.ms - interval '1 month')::date + (LEAST(l.anchor, extract(day from a.ms - interval '1 day')::int) - 1)
           AS prev_start
) s
CROSS JOIN LATERAL (SELECT CASE WHEN l.day >= s.this_start THEN s.this_start ELSE s.prev_start END AS period) b
WHERE p.program_id = %(program)s AND p.kind = %(purchase)s AND p.occurred_at >= %(start)s AND b.period >= %(since)s
GROUP BY p.member_id, b.period
"""
    return delete, insert


def _upgrade_sql(program: Program) -> str:
    """tiers.tier_reevaluate's move up for every member with counters, at once: the measure of their current
    window, the highest active tier it reaches, and where that is above their tier (or the base tier, without a
    status row), that tier, a first review as tier_windows.first_review_at gives it, and an upgrade row."""
    column, _ = _measure_sql(program)
    window_start, next_review = _window_sql(program)
    status, member, tier = TierStatus._meta.db_table, Member._meta.db_table, Tier._meta.db_table
    counter, change = TierCounter._meta.db_table, TierChange._meta.db_table
    review_at = "CASE WHEN u.new_threshold > 0 THEN (u.next_r::timestamp AT TIME ZONE u.tz) END"
    return f"""
WITH cand AS (
    SELECT m.id AS member_id, m.timezone AS tz, (%(now)s AT TIME ZONE m.timezone)::date AS today,
           (m.enrolled_at AT TIME ZONE m.timezone)::date AS enrolled
    FROM {member} m
    WHERE m.program_id = %(program)s
      AND EXISTS (SELECT 1 FROM {counter} c WHERE c.member_id = m.id AND c.period >= %(since)s)
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
