"""The earning engine: base rate, tier multiplier and bonus rules, each a line of the breakdown.

Evaluation (`earning_evaluate`) is pure: the preview and the real purchase run it alike. Limits and budgets are
claimed afterwards (`awards_claim`) inside the purchase's database transaction, under locks, so concurrent purchases
never give more than a rule allows."""

import threading
import time
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import ROUND_FLOOR, Decimal
from zoneinfo import ZoneInfo

from django.conf import settings
from django.db.models import F

from core.models import Program
from loyalty.earning import points_for_amount
from loyalty.rule_models import EarningRule, Period, RuleUsage


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

    def _in_time(self, local: datetime) -> bool:
        rule = self.rule
        if rule.valid_from and local < rule.valid_from or rule.valid_until and local >= rule.valid_until:
            return False
        if self.days and local.isoweekday() not in self.days:
            return False
        if rule.time_from is not None or rule.time_until is not None:
            t = local.time().replace(tzinfo=None)
            start, end = rule.time_from or datetime.min.time(), rule.time_until or datetime.max.time()
            # A window such as 22:00-02:00 runs over midnight.
            return start <= t < end if start <= end else (t >= start or t < end)
        return True

    def _matching(self, basket: Basket) -> tuple[Decimal, Decimal] | None:
        """Amount and quantity the benefit counts: the matching lines, or the whole basket."""
        if not self.by_line:
            quantity = sum((Decimal(line["quantity"]) for line in basket.lines), Decimal(0))
            return basket.total, quantity
        lines = [
            line for line in basket.lines if line.get("category") in self.categories or line.get("sku") in self.skus
        ]
        if not lines:
            return None
        return sum((Decimal(x["amount"]) for x in lines), Decimal(0)), sum(
            (Decimal(x["quantity"]) for x in lines), Decimal(0)
        )

    def points(self, basket: Basket, local: datetime) -> int:
        rule = self.rule
        if (
            (self.stores and basket.store not in self.stores)
            or (self.channels and basket.channel not in self.channels)
            or (self.tiers and basket.tier_code not in self.tiers)
            or (rule.min_basket is not None and basket.total < rule.min_basket)
            or (rule.first_purchase and not basket.first_purchase)
            or (rule.birthday_month and (basket.birth_date is None or basket.birth_date.month != local.month))
            or not self._in_time(local)
        ):
            return 0
        matching = self._matching(basket)
        if matching is None:
            return 0
        amount, quantity = matching
        amount *= basket.money_share
        if rule.benefit == EarningRule.Benefit.FIXED:
            return _floor(rule.value)
        if rule.benefit == EarningRule.Benefit.PER_UNIT:
            return _floor(quantity * rule.value)
        extra = rule.value - 1  # a multiplier of 2 doubles: the bonus is the base once more
        return max(0, _floor(Decimal(points_for_amount(program=basket.program, amount=amount)) * extra))


# program id -> (loaded at, compiled active rules). Other processes see a rule change within RULES_CACHE_SECONDS;
# this process at once, because the rule services call rules_changed().
_cache: dict[int, tuple[float, list[CompiledRule]]] = {}
_cache_lock = threading.Lock()


def rules_changed(program_id: int) -> None:
    with _cache_lock:
        _cache.pop(program_id, None)


def _active_rules(program: Program) -> list[CompiledRule]:
    now = time.monotonic()
    cached = _cache.get(program.pk)
    if cached and now - cached[0] < settings.RULES_CACHE_SECONDS:
        return cached[1]
    compiled = [CompiledRule(r) for r in EarningRule.objects.filter(program=program, active=True)]
    with _cache_lock:
        _cache[program.pk] = (now, compiled)
    return compiled


def rules_need(program: Program) -> set[str]:
    """Which member facts the active rules look at, so the purchase path fetches only those."""
    needs = set()
    for c in _active_rules(program):
        if c.rule.first_purchase:
            needs.add("first_purchase")
        if c.rule.birthday_month:
            needs.add("birth_date")
        if c.tiers:
            needs.add("tier")
    return needs


def earning_evaluate(*, basket: Basket) -> list[Award]:
    """Every line a purchase earns: base, tier multiplier, then bonus rules by priority (an exclusive rule that
    applies stops the rules below it). Writes nothing."""
    program = basket.program
    base = points_for_amount(program=program, amount=basket.total - basket.paid_with_points)
    awards = [Award("base", base)] if base else []
    if basket.tier_code and basket.tier_multiplier > 1:
        extra = _floor(Decimal(base) * (basket.tier_multiplier - 1))
        if extra:
            awards.append(Award(f"tier:{basket.tier_code}", extra))
    local = basket.occurred_at.astimezone(ZoneInfo(program.timezone))
    for compiled in _active_rules(program):
        points = compiled.points(basket, local)
        if points > 0:
            awards.append(Award(compiled.rule.code, points, compiled.rule))
            if compiled.rule.exclusive:
                break
    return awards


def period_start(period: str, local: datetime) -> date:
    day = local.date()
    return {
        Period.DAY: day,
        Period.WEEK: day - timedelta(days=day.weekday()),
        Period.MONTH: day.replace(day=1),
        Period.YEAR: day.replace(month=1, day=1),
        Period.EVER: date(1970, 1, 1),
    }[period]


def awards_claim(*, awards: list[Award], member_id: int, program: Program, occurred_at: datetime) -> list[Award]:
    """Cut awards down to what their rules' per-member limits and budgets still allow, and record the use.
    The caller holds the member's account lock, which serialises the member's purchases, so their usage rows need
    no lock of their own. Budgets are shared by every member: their rows are locked, in primary-key order so two
    purchases never wait on each other crosswise, until the purchase commits."""
    local = occurred_at.astimezone(ZoneInfo(program.timezone))
    budget_ids = sorted({a.rule.pk for a in awards if a.rule is not None and a.rule.budget is not None})
    budget_left = dict(
        EarningRule.objects.select_for_update()
        .filter(pk__in=budget_ids)
        .order_by("pk")
        .values_list("pk", F("budget") - F("budget_used"))
    )
    granted = []
    for award in awards:
        rule, points = award.rule, award.points
        if rule is not None and rule.member_limit is not None:
            start = period_start(rule.member_limit_period, local)
            usage = RuleUsage.objects.filter(rule=rule, member_id=member_id, period_start=start).first()
            points = min(points, rule.member_limit - (usage.points if usage else 0))
        if rule is not None and rule.budget is not None:
            points = min(points, budget_left[rule.pk])
        if points <= 0:
            continue
        if rule is not None and rule.budget is not None:
            budget_left[rule.pk] -= points
            EarningRule.objects.filter(pk=rule.pk).update(budget_used=F("budget_used") + points)
        if rule is not None and rule.member_limit is not None:
            if usage:
                RuleUsage.objects.filter(pk=usage.pk).update(points=F("points") + points)
            else:
                RuleUsage.objects.create(rule=rule, member_id=member_id, period_start=start, points=points)
        granted.append(Award(award.code, points, rule))
    return granted


def awards_need_claim(awards: list[Award]) -> bool:
    return any(a.rule is not None and (a.rule.member_limit is not None or a.rule.budget is not None) for a in awards)
