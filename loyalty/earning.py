"""What a purchase earns. The one place money becomes points."""

import calendar
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_UP, Decimal

from core.models import Program

_ROUNDING = {
    Program.Rounding.DOWN: ROUND_FLOOR,
    Program.Rounding.HALF_UP: ROUND_HALF_UP,
    Program.Rounding.UP: ROUND_CEILING,
}


def points_for_amount(*, program: Program, amount: Decimal) -> int:
    """Points for `amount` of the programme's currency, rounded once, by the programme's rounding mode."""
    return int((amount * program.points_per_unit).to_integral_value(rounding=_ROUNDING[program.rounding]))


def months_later(at: datetime, months: int) -> datetime:
    """The same wall-clock time `months` calendar months later, on the month's last day where it is shorter (31 January
    plus one month is 28 or 29 February), as dateutil's relativedelta(months=...) gives it, at a fifth of the
    cost: a purchase works it out every time."""
    years, month = divmod(at.month - 1 + months, 12)
    year = at.year + years
    day = min(at.day, calendar.monthrange(year, month + 1)[1])
    return at.replace(year=year, month=month + 1, day=day, fold=0)


@dataclass(frozen=True)
class Earning:
    points: int
    available_from: datetime
    expires_at: datetime | None
    breakdown: list[dict] = field(default_factory=list)


def earning_for_purchase(*, program: Program, total: Decimal, occurred_at: datetime) -> Earning:
    """Points a purchase of `total` earns at the base rate, when they become spendable and when they expire (both
    counted from the purchase, so a late-arriving purchase is not given a longer life). Bonus rules and tier
    multipliers are loyalty.rules'; the bulk import of history earns the base rate only."""
    base = points_for_amount(program=program, amount=total)
    expires_at = months_later(occurred_at, program.expiry_months) if program.expiry_months else None
    return Earning(
        points=base,
        available_from=occurred_at + timedelta(days=program.pending_days),
        expires_at=expires_at,
        breakdown=[{"rule": "base", "points": base}] if base else [],
    )


def reversal_for_return(*, earned: int, already_reversed: int, purchase_total: Decimal, returned_total: Decimal) -> int:
    """Points a return takes back: the purchase's earnings in proportion to all that has now been returned, less
    what earlier returns took. Rounded down per step, so partial returns never take more than their share, and
    the last of a full return takes exactly what remains."""
    if purchase_total == 0:
        return 0
    target = int((Decimal(earned) * returned_total / purchase_total).to_integral_value(rounding=ROUND_FLOOR))
    return max(0, min(target, earned) - already_reversed)
