"""The earning engine: base rate, tier multiplier and bonus rules, each a line of the breakdown.

Evaluation (`earning_evaluate`) is pure: the preview and the real purchase run it alike. Limits and budgets are
claimed afterwards (`awards_claim`) inside the purchase's database transaction, under locks, so concurrent purchases
never give more than a rule allows."""

import threading
import time
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import ROUND_FLOOR, Decimal
from functools import cached_property
from zoneinfo import ZoneInfo

from django.conf import settings
from django.db import connection, transaction

from core.db import array_literal
from core.errors import InvalidInput
from core.models import Program
from loyalty.earning import points_for_amount
from loyalty.rule_models import BUDGET_SLICES, BudgetSlice, EarningRule, Period, RuleUsage


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


def awards_claim(*, awards: list[Award], member_id: int, program: Program, occurred_at: datetime) -> list[Award]:
    """Cut awards (earning_evaluate's) down to what their rules' per-member limits and budgets still allow, and
    stack them: an exclusive award stops those below it if anything of it is left. Records the use. The caller
    holds the member's account lock, which serialises the member's purchases, so their usage rows need no lock of
    their own.

    Budgets are shared by every member, in slices (BudgetSlice). First only the member's slice of each budget is
    locked, in primary-key order, and charged where every award fits in it, as a purchase's one statement does
    (awards_claim_at_once): purchases of members in other slices do not wait. Where one does not fit, that is
    undone to its savepoint, which lets go of those slices, and every slice is locked, in primary-key order so two
    purchases never wait on each other crosswise, until the purchase commits; what is used is taken from the
    member's slice, and what is left shared out again over the slices (budget_shares), so that purchases claiming
    at once find room in each."""
    local = occurred_at.astimezone(ZoneInfo(program.timezone))
    limited = {a.rule.pk: period_start(a.rule.member_limit_period, local) for a in awards if _limited(a)}
    budgeted = sorted({a.rule.pk for a in awards if a.rule is not None and a.rule.budget is not None})
    usage_t = RuleUsage._meta.db_table
    with connection.cursor() as cursor:
        used = {}
        if limited:
            cursor.execute(
                f"SELECT rule_id, period_start, points FROM {usage_t} WHERE member_id = %s "
                f"AND rule_id IN ({_marks(limited)}) AND period_start IN ({_marks(set(limited.values()))})",
                [member_id, *limited, *set(limited.values())],
            )
            used = {rule_id: points for rule_id, start, points in cursor.fetchall() if limited[rule_id] == start}
        # Budgets are locked last, so that every purchase holds the rows all of them share for as short a time as
        # possible.
        granted = _claim_from_own_slices(cursor, awards, limited, used, budgeted, member_id) if budgeted else None
        if granted is None:
            slices = _budget_slices_lock(cursor, budgeted)
            # A budgeted rule without slices gives nothing: a missing slice must not mean a budget without end.
            budget_left = {pk: sum(size - used_ for _, _, size, used_ in slices.get(pk, ())) for pk in budgeted}
            granted, budget_use, _ = _awards_cut(awards, limited, used, budget_left)
            spent = [pk for pk, left in budget_left.items() if left <= 0]  # after this purchase
            if spent:
                # Once this purchase commits: a preview, or a purchase that fails later, spends nothing; and not if
                # staff changed a rule meanwhile (a raised budget), between this commit and the mark.
                seen = _changes
                transaction.on_commit(lambda: _spent_mark(spent, seen))
            if budget_use:
                # What is used is taken from the member's slice; _budget_slices_write shares out what is left.
                mine, budgets = member_id % BUDGET_SLICES, []
                for pk, points in budget_use.items():
                    budget = sum(size for _, _, size, _ in slices[pk])  # the sizes add up to the budget
                    budgets.append(
                        (budget, [(i, n, size, u + points if n == mine else u) for i, n, size, u in slices[pk]])
                    )
                _budget_slices_write(cursor, budgets)
        usage_rows = [(a.rule.pk, member_id, limited[a.rule.pk], a.points) for a in granted if _limited(a)]
        if usage_rows:
            cursor.execute(
                f"INSERT INTO {usage_t} (rule_id, member_id, period_start, points) VALUES "
                + ", ".join("(%s, %s, %s, %s)" for _ in usage_rows)
                + f" ON CONFLICT (rule_id, member_id, period_start) DO UPDATE SET points = {usage_t}.points + "
                "excluded.points",
                [v for row in usage_rows for v in row],
            )
    return granted


class _SliceShort(Exception):
    """A budget's slice has too little room for the award: claim it from all of its slices."""


def _claim_from_own_slices(cursor, awards, limited, used, budgeted, member_id) -> list[Award] | None:
    """awards_claim's first try: the awards cut as the member's slice of each budget allows, and those slices
    charged; None, having kept nothing, locked nothing and charged nothing, where a budget would cut an award."""
    if connection.vendor != "postgresql":  # SQLite's IMMEDIATE transaction holds the whole database already
        return None
    try:
        with transaction.atomic():
            cursor.execute(
                f"SELECT rule_id, id, size, used FROM {BudgetSlice._meta.db_table} "
                f"WHERE rule_id IN ({_marks(budgeted)}) AND number = %s ORDER BY id FOR UPDATE",
                [*budgeted, member_id % BUDGET_SLICES],
            )
            own = {rule_id: (pk, size - used_) for rule_id, pk, size, used_ in cursor.fetchall()}
            granted, budget_use, cut = _awards_cut(
                awards, limited, used, {pk: own[pk][1] if pk in own else 0 for pk in budgeted}
            )
            if cut:
                raise _SliceShort
            if budget_use:
                cases = " ".join("WHEN %s THEN %s" for _ in budget_use)
                cursor.execute(
                    f"UPDATE {BudgetSlice._meta.db_table} SET used = used + CASE id {cases} END "
                    f"WHERE id IN ({_marks(budget_use)})",
                    [v for pk, points in budget_use.items() for v in (own[pk][0], points)]
                    + [own[pk][0] for pk in budget_use],
                )
            return granted
    except _SliceShort:
        return None


def _awards_cut(awards, limited, used, budget_left) -> tuple[list[Award], dict[int, int], bool]:
    """(the awards as limits and `budget_left` cut and stack them, the points each budget gives, whether a budget
    cut one). `budget_left` is taken from as awards are granted."""
    granted, budget_use, budget_cut = [], {}, False
    for award in awards:
        rule, points = award.rule, award.points
        if rule is not None and rule.pk in limited:
            points = min(points, rule.member_limit - used.get(rule.pk, 0))
        if rule is not None and rule.pk in budget_left and points > budget_left[rule.pk]:
            points, budget_cut = budget_left[rule.pk], True
        if points <= 0:
            continue
        if rule is not None and rule.pk in budget_left:
            budget_left[rule.pk] -= points
            budget_use[rule.pk] = budget_use.get(rule.pk, 0) + points
        granted.append(Award(award.code, points, rule))
        if rule is not None and rule.exclusive:
            break
    return granted, budget_use, budget_cut


def budget_shares(room: int) -> list[int]:
    """`room` points shared out over the slices as evenly as whole points allow."""
    return [room // BUDGET_SLICES + (1 if number < room % BUDGET_SLICES else 0) for number in range(BUDGET_SLICES)]


def _budget_slices_lock(cursor, rule_ids: list[int]) -> dict[int, list[tuple]]:
    """{rule id: [(slice id, number, size, used), ...]} of the rules' budget slices, locked in key order."""
    if not rule_ids:
        return {}
    # SQLite has no row locks: its IMMEDIATE transactions already hold the whole database's write lock.
    lock = " FOR UPDATE" if connection.vendor == "postgresql" else ""
    cursor.execute(
        f"SELECT rule_id, id, number, size, used FROM {BudgetSlice._meta.db_table} "
        f"WHERE rule_id IN ({_marks(rule_ids)}) ORDER BY id{lock}",
        rule_ids,
    )
    slices: dict[int, list[tuple]] = {}
    for rule_id, *row in cursor.fetchall():
        slices.setdefault(rule_id, []).append(tuple(row))
    return slices


def _budget_slices_write(cursor, budgets: list[tuple[int, list[tuple]]]) -> None:
    """Write budgets' slices back, locked, each budget given as (its points, [(slice id, number, size, used)]),
    with what is left of it shared out again: every size becomes its used plus an even share of the room, so the
    sizes add up to the budget and no slice stays empty while another has room."""
    rows = []
    for budget, slices in budgets:
        room = budget - sum(used for _, _, _, used in slices)
        for (pk, _, _, used), share in zip(sorted(slices, key=lambda s: s[1]), budget_shares(room), strict=True):
            rows.append((pk, used + share, used))
    cases = " ".join("WHEN %s THEN %s" for _ in rows)  # CASE rather than a VALUES list: SQLite takes it too
    cursor.execute(
        f"UPDATE {BudgetSlice._meta.db_table} SET size = CASE id {cases} END, used = CASE id {cases} END "
        f"WHERE id IN ({_marks(rows)})",
        [v for pk, size, _ in rows for v in (pk, size)]
        + [v for pk, _, used in rows for v in (pk, used)]
        + [pk for pk, _, _ in rows],
    )


def budget_slices_set(rule: EarningRule) -> None:
    """Give a rule with a budget its slices, or share a changed budget out over them again: each slice keeps what
    it has given, and what is left of the budget is shared out evenly. InvalidInput when the budget is below
    what the rule has given already. Call inside the database transaction that saves the rule."""
    if rule.budget is None:
        return  # the slices, if any, keep what was given; the rule claims nothing while it has no budget
    with connection.cursor() as cursor:
        slices = _budget_slices_lock(cursor, [rule.pk]).get(rule.pk)
        if not slices:
            BudgetSlice.objects.bulk_create(
                BudgetSlice(rule=rule, number=number, size=0) for number in range(BUDGET_SLICES)
            )
            slices = _budget_slices_lock(cursor, [rule.pk])[rule.pk]
        given = sum(used for _, _, _, used in slices)
        if rule.budget < given:
            raise InvalidInput(
                "The earning rule is not valid.", errors={"budget": [f"{given} points have already been given."]}
            )
        _budget_slices_write(cursor, [(rule.budget, slices)])


@dataclass(frozen=True)
class ClaimAtOnce:
    """Per-member limits and budgets claimed inside a purchase's own statement (awards_claim_at_once)."""

    guard: str | None  # a condition on the member's row (`member_table`.id), false where the usage read is too high
    guard_params: list
    also: tuple[str, list, str]  # as ledger_credit_new_transaction takes it


def awards_claim_at_once(
    *, awards: list[Award], program: Program, occurred_at: datetime, member_table: str
) -> ClaimAtOnce:
    """The per-member limits and budgets of `awards` claimed inside the purchase's own statement, each whole or not
    at all. `also` holds the common table expressions, their parameters, and the condition, that every claim was
    had, which the statement must meet; the member is the statement's `a`, the account's row as updated, so the
    account's lock comes before the rows claimed, as in awards_claim. A condition that fails means a claim fell
    short: the statement undoes itself, and the caller claims with awards_claim, which cuts it.

    Limits (`u`): the member's usage rows upserted, each only while it stays within its rule's limit, which
    PostgreSQL checks on the row as it is when the statement reaches it (a concurrent purchase's claim included).
    `guard` keeps the member out of the statement (so it writes nothing) where the usage it reads already leaves
    too little; it may be stale, `u` is what holds. Budgets (`bl`, `b`): the member's slice of each budget (the
    slice their id picks) locked in key order, as every path locks slices, then charged while it has room.
    For awards each within its limit on its own (awards_claim_possible_at_once)."""
    limited = [a for a in awards if _limited(a)]
    budgeted = [a for a in awards if a.rule is not None and a.rule.budget is not None]
    assert len({a.rule.pk for a in limited}) == len(limited), "one award per rule"
    assert len({a.rule.pk for a in budgeted}) == len(budgeted), "one award per rule"
    # The claims as arrays, so the statement's text and its parameters are the same whatever the number of claims:
    # one prepared statement, and few enough parameters for the driver to keep the statement's parsed form.
    ctes, cte_params, conditions, condition_params = [], [], [], []
    guard, guard_params = None, []
    if limited:
        local = occurred_at.astimezone(ZoneInfo(program.timezone))
        usage_t = RuleUsage._meta.db_table
        rule_ids = array_literal(a.rule.pk for a in limited)
        starts = array_literal(period_start(a.rule.member_limit_period, local) for a in limited)
        ctes.append(
            f"u AS (INSERT INTO {usage_t} (rule_id, member_id, period_start, points) "
            "SELECT v.rule_id, a.member_id, v.period_start, v.points FROM a, "
            "unnest(%s::bigint[], %s::date[], %s::bigint[]) AS v(rule_id, period_start, points) "
            f"ON CONFLICT (rule_id, member_id, period_start) DO UPDATE SET points = {usage_t}.points + excluded.points "
            f"WHERE {usage_t}.points + excluded.points <= "
            f"(%s::bigint[])[array_position(%s::bigint[], {usage_t}.rule_id)] "
            "RETURNING 1)"
        )
        points, limits = array_literal(a.points for a in limited), array_literal(a.rule.member_limit for a in limited)
        # In the order of their placeholders: the upsert's rows, then each rule's limit.
        cte_params += [rule_ids, starts, points, limits, rule_ids]
        conditions.append("(SELECT count(*) FROM u) = cardinality(%s::bigint[])")
        condition_params.append(rule_ids)
        guard = (
            f"NOT EXISTS (SELECT 1 FROM {usage_t} x "
            "JOIN unnest(%s::bigint[], %s::date[], %s::bigint[]) AS v(rule_id, period_start, room) "
            "ON x.rule_id = v.rule_id AND x.period_start = v.period_start "
            f"WHERE x.member_id = {member_table}.id AND x.points > v.room)"
        )
        guard_params = [rule_ids, starts, array_literal(a.rule.member_limit - a.points for a in limited)]
    if budgeted:
        slice_t = BudgetSlice._meta.db_table
        rule_ids = array_literal(a.rule.pk for a in budgeted)
        # Locked first, in key order (ORDER BY comes before the lock), then charged: an UPDATE locks rows in the
        # order its plan meets them, which two purchases could meet differently, and wait on each other crosswise.
        ctes.append(
            f"bl AS (SELECT s.id, v.points FROM a, unnest(%s::bigint[], %s::bigint[]) AS v(rule_id, points), "
            f"{slice_t} s WHERE s.rule_id = v.rule_id AND s.number = mod(a.member_id, {BUDGET_SLICES}) "
            "ORDER BY s.id FOR UPDATE OF s), "
            f"b AS (UPDATE {slice_t} s SET used = s.used + bl.points FROM bl "
            "WHERE s.id = bl.id AND s.used + bl.points <= s.size RETURNING 1)"
        )
        cte_params += [rule_ids, array_literal(a.points for a in budgeted)]
        conditions.append("(SELECT count(*) FROM b) = cardinality(%s::bigint[])")
        condition_params.append(rule_ids)
    return ClaimAtOnce(guard, guard_params, (", ".join(ctes), cte_params + condition_params, " AND ".join(conditions)))


def awards_claim_possible_at_once(awards: list[Award]) -> bool:
    """Whether awards_claim_at_once can claim these: no award over its limit on its own."""
    return not any(_limited(a) and a.points > a.rule.member_limit for a in awards)


def _limited(award: Award) -> bool:
    return award.rule is not None and award.rule.member_limit is not None


def _marks(values) -> str:
    return ", ".join(["%s"] * len(values))


def awards_need_claim(awards: list[Award]) -> bool:
    return any(_limited(a) or (a.rule is not None and a.rule.budget is not None) for a in awards)
