"""Claiming what earning rules give, inside a purchase's database transaction: per-member limits (RuleUsage rows)
and budgets (BudgetSlice rows, sixteen a budget), never more than a rule allows, also under concurrent purchases.
A purchase by member number claims in its own statement (awards_claim_at_once); any other, or one whose claim falls
short there, the careful way (awards_claim). The rules themselves are evaluated in loyalty.rules."""

from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

from django.db import connection, transaction

from core.db import array_literal
from core.errors import InvalidInput
from core.models import Program
from loyalty import rules
from loyalty.rule_models import BUDGET_SLICES, BudgetSlice, EarningRule, RuleUsage
from loyalty.rules import Award, period_start


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
                seen = rules._changes
                transaction.on_commit(lambda: rules._spent_mark(spent, seen))
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
