"""The earning engine: base rate, tier multiplier and bonus rules, each a line of the breakdown.

Evaluation (`earning_evaluate`) is pure: the preview and the real purchase run it alike. Limits and budgets are
claimed afterwards (loyalty.rule_claims) inside the purchase's database transaction, under locks, so concurrent
purchases never give more than a rule allows."""

import os
import threading
import time
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import ROUND_FLOOR, Decimal
from functools import cached_property
from zoneinfo import ZoneInfo

from django.conf import settings

from core.models import Program
from loyalty.earning import points_for_amount
from loyalty.rule_models import EarningRule, Period


@dataclass(frozen=True)
class Basket:
    """What a rule may look at."""

    program: Program
    total: Decimal
    lines: list[dict]
    store: str
    channel: str
    occurred_at: datetime
    tier_code: str | None = None
    tier_multiplier: Decimal = Decimal(1)
    birth_date: date | None = None
    first_purchase: bool = False
    paid_with_points: Decimal = Decimal(0)

    @property
    def money_share(self) -> Decimal:
        """The part of the basket paid in money: points earn only on that part."""
        return (self.total - self.paid_with_points) / self.total if self.total else Decimal(1)


@dataclass(frozen=True)
class Award:
    code: str
    points: int
    rule: EarningRule | None = None

    def as_line(self) -> dict:
        return {"rule": self.code, "points": self.points}


def _floor(value: Decimal) -> int:
    return int(value.to_integral_value(rounding=ROUND_FLOOR))


class CompiledRule:
    """A rule's conditions and benefit, prepared once for many baskets."""

    def __init__(self, rule: EarningRule):
        self.rule = rule
        self.categories = frozenset(rule.categories)
        self.skus = frozenset(rule.skus)
        self.stores = frozenset(rule.stores)
        self.channels = frozenset(rule.channels)
        self.days = frozenset(rule.days_of_week)
        self.tiers = frozenset(rule.tiers)
        self.by_line = bool(self.categories or self.skus)

    def _in_time(self, at: "_Moment") -> bool:
        rule = self.rule
        if rule.valid_from and at.local < rule.valid_from or rule.valid_until and at.local >= rule.valid_until:
            return False
        if self.days and at.weekday not in self.days:
            return False
        if rule.time_from is not None or rule.time_until is not None:
            start, end = rule.time_from or datetime.min.time(), rule.time_until or datetime.max.time()
            # A window such as 22:00-02:00 runs over midnight.
            return start <= at.clock < end if start <= end else (at.clock >= start or at.clock < end)
        return True

    def _matching(self, at: "_Moment") -> tuple[Decimal, Decimal] | None:
        """Amount and quantity the benefit counts: the matching lines, or the whole basket."""
        if not self.by_line:
            return at.basket.total, at.quantity
        amount = quantity = Decimal(0)
        matched = False
        for category, sku, line_amount, line_quantity in at.lines:
            if category in self.categories or sku in self.skus:
                amount, quantity, matched = amount + line_amount, quantity + line_quantity, True
        return (amount, quantity) if matched else None

    def points(self, at: "_Moment") -> int:
        rule, basket = self.rule, at.basket
        if (
            (self.stores and basket.store not in self.stores)
            or (self.channels and basket.channel not in self.channels)
            or (self.tiers and basket.tier_code not in self.tiers)
            or (rule.min_basket is not None and basket.total < rule.min_basket)
            or (rule.first_purchase and not basket.first_purchase)
            or (rule.birthday_month and (basket.birth_date is None or basket.birth_date.month != at.local.month))
            or not self._in_time(at)
        ):
            return 0
        matching = self._matching(at)
        if matching is None:
            return 0
        amount, quantity = matching
        if rule.benefit == EarningRule.Benefit.FIXED:
            return _floor(rule.value)
        if rule.benefit == EarningRule.Benefit.PER_UNIT:
            return _floor(quantity * rule.value)
        extra = rule.value - 1  # a multiplier of 2 doubles: the bonus is the base once more
        amount *= at.money_share
        return max(0, _floor(Decimal(points_for_amount(program=basket.program, amount=amount)) * extra))


class _Moment:
    """A basket as every rule looks at it, worked out once rather than once per rule: its local time in the
    programme's zone, and its lines' amounts and quantities as numbers."""

    def __init__(self, basket: Basket):
        self.basket = basket
        self.local = basket.occurred_at.astimezone(ZoneInfo(basket.program.timezone))
        self.weekday = self.local.isoweekday()
        self.clock = self.local.time().replace(tzinfo=None)
        self.money_share = basket.money_share

    @cached_property
    def lines(self) -> list[tuple[str | None, str | None, Decimal, Decimal]]:
        """(category, sku, amount, quantity) of each line; worked out only once a rule's other conditions hold."""
        return [
            (line.get("category"), line.get("sku"), Decimal(line["amount"]), Decimal(line["quantity"]))
            for line in self.basket.lines
        ]

    @cached_property
    def quantity(self) -> Decimal:
        return sum((line[3] for line in self.lines), Decimal(0))


# program id -> (loaded at, compiled active rules). Other processes see a rule change within RULES_CACHE_SECONDS;
# this process at once, because the rule services call rules_changed().
_cache: dict[int, tuple[float, list[CompiledRule]]] = {}
_cache_lock = threading.Lock()


def _lock_anew() -> None:
    """In a process forked while another thread held the lock (an import checks parts of a file in forked
    processes), that lock would stay held there for ever."""
    global _cache_lock
    _cache_lock = threading.Lock()


os.register_at_fork(after_in_child=_lock_anew)


# Budgets found spent: rule id -> when (time.monotonic). Their rules earn nothing more, so purchases pass them over
# rather than lock every slice of the budget to find that out again, one at a time. A budget's room only grows when
# staff raise it through the rule services (rules_changed): this process sees that at once, others within
# RULES_CACHE_SECONDS, as any rule change.
_spent: dict[int, float] = {}
_changes = 0  # how many rule changes this process has seen: a mark found before one is not written after it


def rules_changed(program_id: int) -> None:
    global _changes
    with _cache_lock:
        _cache.pop(program_id, None)
        _spent.clear()
        _changes += 1


def _spent_mark(rule_ids: list[int], seen: int) -> None:
    """Mark budgets spent, unless a rule change came since they were found spent (`seen` changes then)."""
    with _cache_lock:
        if _changes == seen:
            _spent.update(dict.fromkeys(rule_ids, time.monotonic()))


def _budget_spent(rule: EarningRule) -> bool:
    found = _spent.get(rule.pk) if rule.budget is not None else None
    return found is not None and time.monotonic() - found < settings.RULES_CACHE_SECONDS


def rules_active(program: Program) -> list[CompiledRule]:
    """The programme's active rules, compiled, by priority. A purchase reads them once and hands the same list to
    rules_need and earning_evaluate, so a reload between the two cannot make them disagree."""
    now = time.monotonic()
    cached = _cache.get(program.pk)
    if cached and now - cached[0] < settings.RULES_CACHE_SECONDS:
        return cached[1]
    compiled = [CompiledRule(r) for r in EarningRule.objects.filter(program=program, active=True)]
    with _cache_lock:
        _cache[program.pk] = (now, compiled)
    return compiled


def rules_need(active: list[CompiledRule]) -> set[str]:
    """Which member facts the active rules look at, so the purchase path fetches only those; and "limits" or
    "budgets" when a rule has a per-member limit or a budget, which a purchase may have to claim."""
    needs = set()
    for c in active:
        if c.rule.member_limit is not None:
            needs.add("limits")
        if c.rule.budget is not None:
            needs.add("budgets")
        if c.rule.first_purchase:
            needs.add("first_purchase")
        if c.rule.birthday_month:
            needs.add("birth_date")
        if c.tiers:
            needs.add("tier")
    return needs


def earning_evaluate(*, basket: Basket, active: list[CompiledRule]) -> list[Award]:
    """Every line a purchase may earn: base, tier multiplier, then the bonus rules that apply, by priority. An
    exclusive rule that earns stops the rules below it (awards_stacked). Whether one with a per-member limit, a
    budget or a first-purchase condition earns is known only once the purchase has claimed it, under locks, so the
    rules below such a one are evaluated too: awards_claim gives them what it cannot. Writes nothing."""
    program = basket.program
    base = points_for_amount(program=program, amount=basket.total - basket.paid_with_points)
    awards = [Award("base", base)] if base else []
    if basket.tier_code and basket.tier_multiplier > 1:
        extra = _floor(Decimal(base) * (basket.tier_multiplier - 1))
        if extra:
            awards.append(Award(f"tier:{basket.tier_code}", extra))
    if not active:
        return awards
    at = _Moment(basket)
    for compiled in active:
        if _spent and _budget_spent(compiled.rule):
            continue
        points = compiled.points(at)
        if points > 0:
            rule = compiled.rule
            awards.append(Award(rule.code, points, rule))
            if rule.exclusive and rule.member_limit is None and rule.budget is None and not rule.first_purchase:
                break
    return awards


def awards_stacked(awards: list[Award]) -> list[Award]:
    """What the awards earn where nothing cuts them: those down to the first exclusive one."""
    for n, award in enumerate(awards):
        if award.rule is not None and award.rule.exclusive:
            return awards[: n + 1]
    return awards


def period_start(period: str, local: datetime) -> date:
    """The first day of the limit period (day, week from Monday, month, year, ever) holding the local time."""
    day = local.date()
    return {
        Period.DAY: day,
        Period.WEEK: day - timedelta(days=day.weekday()),
        Period.MONTH: day.replace(day=1),
        Period.YEAR: day.replace(month=1, day=1),
        Period.EVER: date(1970, 1, 1),
    }[period]


def period_start_at(period: str, at: datetime, tz: ZoneInfo) -> datetime | None:
    """Local midnight in `tz` that starts the limit period holding `at`; None for a limit over all time."""
    if period == Period.EVER:
        return None
    return datetime.combine(period_start(period, at.astimezone(tz)), datetime.min.time(), tzinfo=tz)
