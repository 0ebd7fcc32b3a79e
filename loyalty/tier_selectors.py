"""What a member sees of tiers: their tier, the next one and what it still takes, and their earn multiplier."""

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from django.utils import timezone

from core.models import Program
from loyalty.tier_models import Tier, TierStatus
from loyalty.tiers import TierInfo, _by_id, _rank, _status_and_measure, _supported, threshold_units, tier_info_list
from members.models import Member


@dataclass(frozen=True)
class TierProgress:
    tier: Tier | None
    since: datetime | None
    review_at: datetime | None
    manual_until: datetime | None
    measure: str
    value: int | Decimal  # the measure in the current window, in its unit (points, money, purchases)
    next_tier: Tier | None
    needed: int | Decimal | None  # what is still missing to reach next_tier, in the measure's unit


def _in_unit(program: Program, units: int) -> int | Decimal:
    return Decimal(units) / 100 if program.tier_measure == Program.TierMeasure.SPEND else units


def tier_progress_get(
    *, member: Member, program: Program | None = None, now: datetime | None = None
) -> TierProgress | None:
    """The member's tier, and the next tier with what is still needed for it; None if the programme has no tiers."""
    program = program or member.program
    if not program.has_tiers:
        return None
    now = now or timezone.now()
    tiers = tier_info_list(program_id=program.pk)
    exists, tier_id, manual_until, review_at, measure = _status_and_measure(program, member, now)
    current = _by_id(tiers, tier_id) if exists else _supported(program, tiers, 0)
    manual = manual_until is not None and manual_until > now
    following = [t for t in tiers if not t.retired and t.rank > _rank(current)]
    wanted = {t.id for t in (current, following[0] if following else None) if t}
    loaded = Tier.objects.in_bulk(wanted)
    since = TierStatus.objects.filter(member_id=member.pk).values_list("since", flat=True).first() if exists else None
    next_tier = loaded.get(following[0].id) if following else None
    needed = None
    if next_tier is not None:
        needed = _in_unit(program, max(0, threshold_units(program, next_tier.threshold) - measure))
    return TierProgress(
        tier=loaded.get(current.id) if current else None,
        since=since,
        # While a manual tier lasts, the row keeps the review date of the tier earned before it: not this tier's.
        review_at=None if manual else review_at,
        manual_until=manual_until if manual else None,
        measure=program.tier_measure,
        value=_in_unit(program, measure),
        next_tier=next_tier,
        needed=needed,
    )


def tier_current_for(*, member: Member, program: Program | None = None) -> TierInfo | None:
    """The member's tier now (code, rank, earn_multiplier, ...), for the earning rules; None without one. No query
    when the programme has no tiers or the member was loaded with select_related("tier_status"); else one small one."""
    program = program or member.program
    if not program.has_tiers:
        return None
    tiers = tier_info_list(program_id=program.pk)
    if "tier_status" in member._state.fields_cache:
        status = member._state.fields_cache["tier_status"]
        exists, tier_id = status is not None, status.tier_id if status is not None else None
    else:
        row = TierStatus.objects.filter(member_id=member.pk).values_list("tier_id").first()
        exists, tier_id = row is not None, row[0] if row else None
    return _by_id(tiers, tier_id) if exists else _supported(program, tiers, 0)


def tier_multiplier_for(*, member: Member, program: Program | None = None) -> Decimal:
    """The earn multiplier of the member's tier: 1 without one. Costs what tier_current_for costs."""
    current = tier_current_for(member=member, program=program)
    return current.earn_multiplier if current else Decimal(1)
