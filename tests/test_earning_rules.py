"""Earning rules: bonuses that explain themselves, limits and budgets that hold under concurrency."""

import json
import threading
from dataclasses import replace
from datetime import datetime, time
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
from django.db import DatabaseError, DataError, connection, transaction
from django.test.utils import CaptureQueriesContext

from core.errors import InvalidInput, Unprocessable
from loyalty import rule_claims, rules, transactions
from loyalty.models import Account, BudgetSlice, EarningRule, RuleUsage, Transaction
from loyalty.points import points_adjust
from loyalty.rule_services import earning_rule_create, earning_rule_update
from loyalty.transactions import (
    TransactionInput,
    transaction_preview,
    transaction_record,
    transaction_record_by_number,
)
from loyalty.verify import ledger_verify
from tests.factories import MemberFactory
from tests.threads import at_once, failures

STOCKHOLM = ZoneInfo("Europe/Stockholm")
# A Wednesday, 14:30 in Stockholm.
WEDNESDAY = datetime(2025, 11, 19, 14, 30, tzinfo=STOCKHOLM)


def purchase_input(
    member, *, external_id="T1", total="100.00", lines=None, store="STHLM-01", channel="pos", at=WEDNESDAY
) -> TransactionInput:
    """A till's purchase of 100.00: dairy for 40 and bakery for 60, unless `lines` says otherwise."""
    lines = (
        lines
        if lines is not None
        else [
            {"sku": "MILK", "category": "dairy", "quantity": "2", "unit_price": "20.00", "amount": "40.00"},
            {"sku": "BREAD", "category": "bakery", "quantity": "1", "unit_price": "60.00", "amount": "60.00"},
        ]
    )
    return TransactionInput(
        store=store,
        external_id=external_id,
        channel=channel,
        kind="purchase",
        occurred_at=at,
        currency="SEK",
        total=Decimal(total),
        lines=lines,
        member=member,
    )


def buy(program, member, *, by_number=False, **purchase):
    data = purchase_input(member, **purchase)
    if by_number:  # as TransactionApi.post: the one statement that finds the member by number first
        found = transaction_record_by_number(
            program=program, data=replace(data, member=None), member_number=member.member_number
        )
        if found is not None:
            return found
    return transaction_record(program=program, data=data)


def rule(program, code, **fields):
    return earning_rule_create(program=program, code=code, name=code.title(), **fields)


def test_a_category_multiplier_doubles_the_points_of_what_matches(program, member):
    # given
    rule(program, "dairy2x", categories=["dairy"], benefit="multiplier", value=Decimal(2))
    # when
    result = buy(program, member)
    # then
    assert result.transaction.breakdown == [{"rule": "base", "points": 100}, {"rule": "dairy2x", "points": 40}]
    assert result.points == 140


def test_points_per_unit_of_a_sku(program, member):
    # given
    rule(program, "milk10", skus=["MILK"], benefit="per_unit", value=Decimal(10))
    # when
    result = buy(program, member)
    # then
    assert {"rule": "milk10", "points": 20} in result.transaction.breakdown


def test_a_fixed_bonus_needs_the_minimum_basket(program, member):
    # given
    rule(program, "big-basket", min_basket=Decimal("150.00"), benefit="fixed", value=Decimal(50))
    # when
    small = buy(program, member, external_id="small")
    big = buy(program, member, external_id="big", total="150.00", lines=[])
    # then
    assert small.points == 100
    assert big.points == 150 + 50


def test_store_channel_weekday_and_hours_are_read_in_the_programmes_time_zone(program, member):
    # given: Wednesdays 14:00-15:00 in the Stockholm store only
    rule(
        program,
        "happy-hour",
        stores=["STHLM-01"],
        channels=["pos"],
        days_of_week=[3],
        time_from=time(14, 0),
        time_until=time(15, 0),
        benefit="fixed",
        value=Decimal(25),
    )
    # when
    inside = buy(program, member, external_id="in")
    other_store = buy(program, member, external_id="store", store="GBG-02")
    web = buy(program, member, external_id="web", channel="web")
    # 13:30 UTC is 14:30 in Stockholm: inside the window
    utc = buy(program, member, external_id="utc", at=datetime(2025, 11, 19, 13, 30, tzinfo=ZoneInfo("UTC")))
    late = buy(program, member, external_id="late", at=WEDNESDAY.replace(hour=15))
    thursday = buy(program, member, external_id="thu", at=WEDNESDAY.replace(day=20))
    # then
    assert [r.points for r in (inside, other_store, web, utc, late, thursday)] == [125, 100, 100, 125, 100, 100]


def test_an_hours_window_may_run_over_midnight(program, member):
    # given
    rule(program, "night-owl", time_from=time(22, 0), time_until=time(2, 0), benefit="fixed", value=Decimal(5))
    # when
    before = buy(program, member, external_id="a", at=WEDNESDAY.replace(hour=23))
    after = buy(program, member, external_id="b", at=WEDNESDAY.replace(hour=1))
    outside = buy(program, member, external_id="c", at=WEDNESDAY.replace(hour=2))
    # then
    assert (before.points, after.points, outside.points) == (105, 105, 100)


def test_a_rule_applies_only_within_its_validity(program, member):
    # given
    rule(
        program,
        "november",
        valid_from=datetime(2025, 11, 1, tzinfo=STOCKHOLM),
        valid_until=datetime(2025, 12, 1, tzinfo=STOCKHOLM),
        benefit="fixed",
        value=Decimal(10),
    )
    # when
    inside = buy(program, member, external_id="in")
    outside = buy(program, member, external_id="out", at=datetime(2025, 12, 1, 0, 0, tzinfo=STOCKHOLM))
    # then
    assert (inside.points, outside.points) == (110, 100)


def test_an_exclusive_rule_stops_the_rules_below_it_and_priority_orders_them(program, member):
    # given
    rule(program, "low", priority=1, benefit="fixed", value=Decimal(1))
    rule(program, "vip", priority=10, exclusive=True, benefit="fixed", value=Decimal(30))
    rule(program, "top", priority=20, benefit="fixed", value=Decimal(7))
    # when
    result = buy(program, member)
    # then
    assert [line["rule"] for line in result.transaction.breakdown] == ["base", "top", "vip"]


@pytest.mark.parametrize("by_number", [False, True])
def test_an_exclusive_rule_whose_limit_is_used_up_leaves_the_rules_below_it_their_points(program, by_number):
    # given: an exclusive 300-point bonus, at most 500 a month, above a 7-point one
    member = MemberFactory(program=program)
    rule(program, "low", priority=1, benefit="fixed", value=Decimal(7))
    rule(program, "vip", priority=10, exclusive=True, benefit="fixed", value=Decimal(300), member_limit=500)
    # when
    results = [buy(program, member, external_id=str(n), by_number=by_number) for n in range(3)]
    # then: cut to 200, it still stops the one below; used up, it no longer does
    assert [r.transaction.breakdown for r in results] == [
        [{"rule": "base", "points": 100}, {"rule": "vip", "points": 300}],
        [{"rule": "base", "points": 100}, {"rule": "vip", "points": 200}],
        [{"rule": "base", "points": 100}, {"rule": "low", "points": 7}],
    ]
    assert Account.objects.get(pk=member.pk).available == 400 + 300 + 107
    assert ledger_verify() == []


def test_an_exclusive_rule_whose_budget_is_spent_leaves_the_rules_below_it_their_points(program, member):
    # given: an exclusive bonus whose budget the first purchase spends
    rule(program, "low", priority=1, benefit="fixed", value=Decimal(7), budget=1000)
    rule(program, "promo", priority=10, exclusive=True, benefit="fixed", value=Decimal(50), budget=50)
    # when
    first = buy(program, member, external_id="1")
    second = buy(program, member, external_id="2")
    # then: the lower rule's budget is charged only when it earns
    assert [line["rule"] for line in first.transaction.breakdown] == ["base", "promo"]
    assert second.transaction.breakdown == [{"rule": "base", "points": 100}, {"rule": "low", "points": 7}]
    low = EarningRule.objects.get(code="low")
    assert sum(s.used for s in BudgetSlice.objects.filter(rule=low)) == 7
    assert ledger_verify() == []


def test_an_exclusive_welcome_bonus_not_earned_leaves_the_rules_below_it_their_points(program, monkeypatch):
    # given: a member with a purchase already recorded, whose next basket is read as a first purchase: the case of
    # two first purchases at once, the second of which sees the first only under the account lock
    member = MemberFactory(program=program)
    rule(program, "low", priority=1, benefit="fixed", value=Decimal(7))
    rule(program, "welcome", priority=10, exclusive=True, first_purchase=True, benefit="fixed", value=Decimal(500))
    buy(program, member, external_id="1")
    read_basket = transactions.record._basket
    monkeypatch.setattr(transactions.record, "_basket", lambda *args: replace(read_basket(*args), first_purchase=True))
    # when
    second = buy(program, member, external_id="2")
    # then: the welcome bonus is dropped under the lock, and the rule below it earns
    assert second.transaction.breakdown == [{"rule": "base", "points": 100}, {"rule": "low", "points": 7}]
    assert Account.objects.get(pk=member.pk).available == 600 + 107
    assert ledger_verify() == []


def test_first_purchase_and_birthday_month(program):
    # given
    member = MemberFactory(program=program, birth_date=datetime(1990, 11, 3).date())
    rule(program, "welcome", first_purchase=True, benefit="fixed", value=Decimal(100))
    rule(program, "birthday", birthday_month=True, benefit="multiplier", value=Decimal(2))
    # when
    first = buy(program, member, external_id="1")
    second = buy(program, member, external_id="2")
    december = buy(program, member, external_id="3", at=WEDNESDAY.replace(month=12, day=17))
    # then
    assert first.points == 100 + 100 + 100
    assert second.points == 100 + 100
    assert december.points == 100


@pytest.mark.django_db(transaction=True)
def test_of_first_purchases_sent_at_once_only_one_earns_the_first_purchase_bonus(program):
    # given: a member whose account is open, and a welcome bonus
    member = MemberFactory(program=program)
    points_adjust(member=member, points=1, reason="seed")
    rule(program, "welcome", first_purchase=True, benefit="fixed", value=Decimal(500))
    # when
    outcomes = at_once(6, lambda n: buy(program, member, external_id=f"first-{n}"))
    # then
    assert failures(outcomes) == []
    welcomes = [line for t in Transaction.objects.all() for line in t.breakdown if line["rule"] == "welcome"]
    assert welcomes == [{"rule": "welcome", "points": 500}]
    assert Account.objects.get(pk=member.pk).available == 1 + 6 * 100 + 500
    assert ledger_verify() == []


def test_a_purchase_too_large_to_earn_points_on_is_refused_and_writes_nothing(program, member):
    # given: a multiplier at its maximum
    rule(program, "huge", benefit="multiplier", value=Decimal(100))
    # when
    with pytest.raises(Unprocessable) as refused:
        buy(program, member, total="99999999.00", lines=[])
    # then
    assert refused.value.code == "points_out_of_range"
    assert not Transaction.objects.exists()


def test_the_rules_below_an_exclusive_rule_cut_to_nothing_are_held_to_what_a_transaction_can_hold(program, member):
    # given: an exclusive bonus whose limit the first purchase uses up, above a rule worth 3,000,000,000 points
    big = [{"sku": "BIG", "category": "x", "quantity": "30000", "unit_price": "0.01", "amount": "300.00"}]
    rule(program, "big", priority=1, skus=["BIG"], benefit="per_unit", value=Decimal(100_000))
    rule(program, "vip", priority=10, exclusive=True, benefit="fixed", value=Decimal(10), member_limit=10)
    buy(program, member, external_id="1", total="300.00", lines=big)
    before = Account.objects.get(pk=member.pk).available
    # when
    with pytest.raises(Unprocessable) as refused:
        buy(program, member, external_id="2", total="300.00", lines=big)
    # then
    assert refused.value.code == "points_out_of_range"
    assert not Transaction.objects.filter(external_id="2").exists()
    assert Account.objects.get(pk=member.pk).available == before
    assert ledger_verify() == []


def test_a_member_limit_caps_the_bonus_per_month_and_the_breakdown_says_so(program, member):
    # given: 300 bonus points per purchase, at most 500 a month
    rule(program, "triple", benefit="multiplier", value=Decimal(4), member_limit=500, member_limit_period="month")
    # when
    first = buy(program, member, external_id="1")
    second = buy(program, member, external_id="2")
    third = buy(program, member, external_id="3")
    next_month = buy(program, member, external_id="4", at=WEDNESDAY.replace(month=12, day=2))
    # then
    assert [r.points for r in (first, second, third, next_month)] == [400, 300, 100, 400]
    assert second.transaction.breakdown == [{"rule": "base", "points": 100}, {"rule": "triple", "points": 200}]
    assert RuleUsage.objects.get(period_start=WEDNESDAY.date().replace(day=1)).points == 500
    assert ledger_verify() == []


def test_a_preview_shows_the_limited_bonus_and_uses_up_nothing(program, member):
    # given
    rule(program, "capped", benefit="fixed", value=Decimal(300), member_limit=500)
    buy(program, member, external_id="1")
    data = purchase_input(member, external_id="p", store="S", lines=[])
    # when
    preview = transaction_preview(program=program, data=data)
    # then
    assert preview.points == 100 + 200
    assert RuleUsage.objects.get().points == 300
    assert not Transaction.objects.filter(external_id="p").exists()


def test_a_changed_rule_never_rewrites_points_already_earned(program, member):
    # given
    promo = rule(program, "promo", benefit="fixed", value=Decimal(10))
    before = buy(program, member, external_id="1")
    # when
    earning_rule_update(rule=promo, value=Decimal(99))
    after = buy(program, member, external_id="2")
    # then
    before.transaction.refresh_from_db()
    assert before.transaction.breakdown[-1] == {"rule": "promo", "points": 10}
    assert after.transaction.breakdown[-1] == {"rule": "promo", "points": 99}
    assert Account.objects.get(pk=member.pk).available == 110 + 199


def test_a_return_reverses_bonus_points_in_the_same_proportion_as_base_points(program, member):
    # given
    rule(program, "double", benefit="multiplier", value=Decimal(2))
    buy(program, member, external_id="P")  # 200 points
    # when: a quarter of the basket comes back
    data = TransactionInput(
        store="STHLM-01",
        external_id="R",
        channel="pos",
        kind="return",
        occurred_at=WEDNESDAY,
        currency="SEK",
        total=Decimal("25.00"),
        original_external_id="P",
    )
    result = transaction_record(program=program, data=data)
    # then
    assert result.points == -50
    assert result.transaction.breakdown == [{"rule": "base", "points": -25}, {"rule": "double", "points": -25}]
    assert Account.objects.get(pk=member.pk).available == 150


def test_returns_take_back_each_line_of_the_breakdown_in_proportion_and_a_full_return_all_of_it(program, member):
    # given: 100 base and 3 x 7 bonus points
    rule(program, "seven", benefit="fixed", value=Decimal(7))
    rule(program, "dairy", categories=["dairy"], benefit="fixed", value=Decimal(7))
    rule(program, "bakery", categories=["bakery"], benefit="fixed", value=Decimal(7))
    purchase = buy(program, member, external_id="P")
    breakdown = {line["rule"]: line["points"] for line in purchase.transaction.breakdown}

    def give_back(external_id, total):
        data = TransactionInput(
            store="STHLM-01",
            external_id=external_id,
            channel="pos",
            kind="return",
            occurred_at=WEDNESDAY,
            currency="SEK",
            total=Decimal(total),
            original_external_id="P",
        )
        return transaction_record(program=program, data=data)

    # when: a third, then another third, then the rest
    returns = [give_back("R1", "33.33"), give_back("R2", "33.33"), give_back("R3", "33.34")]
    # then: each return's lines add up to its points, and together they take back every line whole
    for result in returns:
        assert sum(line["points"] for line in result.transaction.breakdown) == result.points < 0
    taken = {}
    for result in returns:
        for line in result.transaction.breakdown:
            taken[line["rule"]] = taken.get(line["rule"], 0) - line["points"]
    assert taken == breakdown == {"base": 100, "seven": 7, "dairy": 7, "bakery": 7}
    assert Account.objects.get(pk=member.pk).available == 0


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("by_number", [False, True])
@pytest.mark.parametrize("budget", [1000, 4800], ids=["slices-too-small", "slices-run-dry"])
def test_a_global_budget_is_never_exceeded_under_concurrent_purchases(program, by_number, budget):
    # given: 100 points per purchase from a budget of 1,000 (a slice cannot pay one) or 4,800 (a slice pays three),
    # and 16 members buying at once, four times each
    promo = rule(program, "launch", benefit="fixed", value=Decimal(100), budget=budget)
    members = [MemberFactory(program=program) for _ in range(16)]

    def shop(i):
        for n in range(4):
            buy(program, members[i], external_id=f"{members[i].pk}-{n}", by_number=by_number)

    # when
    outcomes = at_once(16, shop)
    # then
    assert failures(outcomes) == []
    promo.refresh_from_db()
    given = sum(line["points"] for t in Transaction.objects.all() for line in t.breakdown if line["rule"] == "launch")
    assert promo.budget_used == given == budget
    assert ledger_verify() == []


@pytest.mark.django_db(transaction=True)
def test_a_purchase_not_by_number_claims_a_budget_from_its_members_slice_without_waiting_for_other_slices(program):
    # given: a budgeted bonus; one member's purchase has claimed it and not yet committed
    promo = rule(program, "launch", benefit="fixed", value=Decimal(10), budget=16_000)
    first = MemberFactory(program=program)
    second = MemberFactory(program=program)
    assert first.pk % 16 != second.pk % 16
    claimed, release, errors = threading.Event(), threading.Event(), []

    def hold():
        try:
            with transaction.atomic():
                buy(program, first, external_id="first")
                claimed.set()
                release.wait(timeout=10)
        except Exception as exc:  # collected, asserted below
            errors.append(exc)
        finally:
            connection.close()

    def follow():
        try:
            claimed.wait(timeout=10)
            buy(program, second, external_id="second")
        except Exception as exc:  # collected, asserted below
            errors.append(exc)
        finally:
            connection.close()

    holder, follower = threading.Thread(target=hold), threading.Thread(target=follow)
    # when
    holder.start()
    follower.start()
    follower.join(timeout=5)
    waited = follower.is_alive()
    release.set()
    holder.join()
    follower.join()
    # then: the second purchase went through while the first held its slice; each slice paid its member's bonus,
    # and the slices' sizes were not shared out again
    assert errors == [] and not waited
    sizes = _slices(promo)
    assert [size for size, _ in sizes] == [1000] * 16
    assert sorted(used for _, used in sizes) == [0] * 14 + [10, 10]
    assert ledger_verify() == []


def test_a_spent_budget_is_passed_over_without_locking_its_slices_until_it_is_raised(
    program, member, django_capture_on_commit_callbacks
):
    # given: a budget the first purchase spends (and commits)
    promo = rule(program, "launch", benefit="fixed", value=Decimal(50), budget=50)
    with django_capture_on_commit_callbacks(execute=True):
        buy(program, member, external_id="1")
    # when
    with CaptureQueriesContext(connection) as spent:
        second = buy(program, member, external_id="2")
    earning_rule_update(rule=promo, budget=100)
    third = buy(program, member, external_id="3")
    # then: the purchase after it earns the base alone and reads no slice; once raised, the budget pays again
    assert second.transaction.breakdown == [{"rule": "base", "points": 100}]
    assert not any(BudgetSlice._meta.db_table in q["sql"] for q in spent.captured_queries)
    assert third.transaction.breakdown == [{"rule": "base", "points": 100}, {"rule": "launch", "points": 50}]
    assert sum(used for _, used in _slices(promo)) == 100
    assert ledger_verify() == []


def test_a_preview_that_would_spend_a_budget_leaves_it_to_the_purchases(program, member):
    # given: a budget one purchase spends
    rule(program, "launch", benefit="fixed", value=Decimal(50), budget=50)
    data = purchase_input(member, external_id="P", store="STHLM-01", lines=[])
    # when
    preview = transaction_preview(program=program, data=data)
    bought = buy(program, member, external_id="1")
    # then: both show the bonus; the preview, rolled back, did not mark the budget spent
    assert preview.transaction.breakdown[-1] == bought.transaction.breakdown[-1] == {"rule": "launch", "points": 50}


@pytest.mark.django_db(transaction=True)
def test_a_budget_raised_while_a_purchase_that_spent_it_commits_is_not_marked_spent_after(program):
    # given: a purchase that spends a budget has committed, and staff raise the budget before the purchase's
    # after-commit work is done (a caller's own after-commit callback holds it there)
    promo = rule(program, "launch", benefit="fixed", value=Decimal(50), budget=50)
    first, second = MemberFactory(program=program), MemberFactory(program=program)
    committed, raised, errors = threading.Event(), threading.Event(), []

    def spend():
        try:
            with transaction.atomic():
                transaction.on_commit(lambda: (committed.set(), raised.wait(timeout=10)))
                buy(program, first, external_id="1")
        except Exception as exc:  # collected, asserted below
            errors.append(exc)
        finally:
            connection.close()

    spender = threading.Thread(target=spend)
    spender.start()
    assert committed.wait(timeout=10)
    earning_rule_update(rule=promo, budget=100)
    raised.set()
    spender.join()
    # when
    after = buy(program, second, external_id="2")
    # then: the raised budget pays the purchase after the raise
    assert errors == []
    assert after.transaction.breakdown[-1] == {"rule": "launch", "points": 50}


def _slices(rule_):
    return list(BudgetSlice.objects.filter(rule=rule_).order_by("number").values_list("size", "used"))


@pytest.mark.django_db(transaction=True)
def test_a_budget_claimed_at_once_by_many_members_gives_exactly_the_budget_and_no_more(program):
    # given: two budgets of 16,000 that 40 members, 5 purchases each, would overdraw (20,000 each)
    first = rule(program, "first", benefit="fixed", value=Decimal(100), budget=16_000)
    second = rule(program, "second", benefit="fixed", value=Decimal(100), budget=16_000)
    members = [MemberFactory(program=program) for _ in range(40)]
    for member in members:
        points_adjust(member=member, points=1, reason="seed")  # an open account: the one statement can be used
    in_one_statement = []

    def shop(i):
        for n in range(5):
            for member in members[i::8]:
                in_one_statement.append(
                    buy(program, member, external_id=f"{member.pk}-{n}", by_number=True).known_member_number
                )

    # when
    outcomes = at_once(8, shop)
    # then: most claimed in the one statement; the budgets are spent to the point and never beyond
    assert failures(outcomes) == []
    assert sum(number is not None for number in in_one_statement) > 100
    for promo in (first, second):
        given = sum(
            line["points"] for t in Transaction.objects.all() for line in t.breakdown if line["rule"] == promo.code
        )
        assert promo.budget_used == given == 16_000
        assert sum(size for size, _ in _slices(promo)) == 16_000
    assert ledger_verify() == []


def test_a_slice_run_short_is_made_up_from_the_others_and_what_is_left_shared_out_again(program, member):
    # given: a budget of 320, 20 a slice, and a purchase that earns 50 from it
    promo = rule(program, "promo", benefit="fixed", value=Decimal(50), budget=320)
    assert _slices(promo) == [(20, 0)] * 16
    # when
    result = buy(program, member)
    # then: 50 given, from the member's slice, and the 270 left shared out: 16 slices of 16 or 17
    assert result.transaction.breakdown[-1] == {"rule": "promo", "points": 50}
    slices = _slices(promo)
    assert [used for _, used in slices] == [50 if n == member.pk % 16 else 0 for n in range(16)]
    assert sorted(size - used for size, used in slices) == [16] * 2 + [17] * 14
    assert promo.budget_used == 50


def test_a_changed_budget_is_shared_out_again_and_cannot_fall_below_what_was_given(program, member):
    # given
    promo = rule(program, "promo", benefit="fixed", value=Decimal(50), budget=1600)
    buy(program, member)
    # when
    earning_rule_update(rule=promo, budget=3200)
    with pytest.raises(InvalidInput) as refused:
        earning_rule_update(rule=promo, budget=40)
    # then
    assert sum(size for size, _ in _slices(promo)) == 3200
    assert promo.budget_used == 50
    assert "budget" in refused.value.errors
    promo.refresh_from_db()
    assert promo.budget == 3200


def test_verify_finds_a_budget_whose_slices_do_not_add_up_to_it(program):
    # given: one budget's slice grown behind the rules' back, another budget with its slices gone
    grown = rule(program, "grown", benefit="fixed", value=Decimal(5), budget=1600)
    gone = rule(program, "gone", benefit="fixed", value=Decimal(5), budget=1600)
    BudgetSlice.objects.filter(rule=grown, number=3).update(size=500)
    BudgetSlice.objects.filter(rule=gone).delete()
    # when
    breaches = ledger_verify()
    # then
    assert {(b.check, b.subject) for b in breaches} == {
        ("a budget's slices add up to the budget", str(grown.pk)),
        ("a budget's slices add up to the budget", str(gone.pk)),
    }


def test_a_member_limit_is_claimed_in_the_purchase_by_numbers_one_statement_or_cut_the_careful_way(program):
    # given: 100 bonus points a purchase, at most 150 a month; the member's account is open
    rule(program, "capped", benefit="fixed", value=Decimal(100), member_limit=150, member_limit_period="month")
    member = MemberFactory(program=program)
    points_adjust(member=member, points=10, reason="seed")
    # when
    results = [buy(program, member, external_id=f"c-{n}", by_number=True) for n in range(3)]
    # then: the first claimed whole by number; the second fell short, rolled back and was cut to what was left
    assert [r.known_member_number is not None for r in results] == [True, False, False]
    assert [r.transaction.breakdown for r in results] == [
        [{"rule": "base", "points": 100}, {"rule": "capped", "points": 100}],
        [{"rule": "base", "points": 100}, {"rule": "capped", "points": 50}],
        [{"rule": "base", "points": 100}],
    ]
    assert RuleUsage.objects.get().points == 150
    assert Transaction.objects.count() == 3
    assert Account.objects.get(pk=member.pk).available == 10 + 300 + 150
    assert ledger_verify() == []


def test_a_purchase_claiming_limits_in_its_statement_is_planned_once(program, prepared_plans):
    # given: two limited bonuses with room for many purchases; the member's account is open
    rule(program, "capped", benefit="fixed", value=Decimal(10), member_limit=10_000, member_limit_period="month")
    rule(program, "roomy", benefit="fixed", value=Decimal(5), member_limit=10_000, member_limit_period="month")
    member = MemberFactory(program=program)
    points_adjust(member=member, points=10, reason="seed")
    # when
    results = [buy(program, member, external_id=f"p-{n}", by_number=True) for n in range(12)]
    # then: each claimed in the one statement, which PostgreSQL planned anew only for its five trial runs
    assert all(r.known_member_number is not None for r in results)
    assert dict(RuleUsage.objects.values_list("rule__code", "points")) == {"capped": 120, "roomy": 60}
    generic, custom = prepared_plans("WITH m AS", "loyalty_ruleusage")
    assert generic > 0 and custom == 5


def test_a_purchase_by_number_that_writes_nothing_returns_no_row_and_raises_nothing_in_the_database(program):
    # given: a limited bonus; a member with room for one more bonus, who spends it; database errors watched
    rule(program, "capped", benefit="fixed", value=Decimal(100), member_limit=100, member_limit_period="month")
    member = MemberFactory(program=program)
    points_adjust(member=member, points=10, reason="seed")
    first = buy(program, member, external_id="first", by_number=True)
    errors = []

    def watch(execute, sql, params, many, context):
        try:
            return execute(sql, params, many, context)
        except DatabaseError as exc:
            errors.append(getattr(exc.__cause__, "sqlstate", None))
            raise

    unknown = TransactionInput(
        store="STHLM-01",
        external_id="nobody",
        channel="pos",
        kind="purchase",
        occurred_at=WEDNESDAY,
        currency="SEK",
        total=Decimal("100.00"),
    )
    # when: by number, an unknown member, a repeat, and a member whose limit is used up
    with connection.execute_wrapper(watch):
        results = [
            transaction_record_by_number(program=program, data=unknown, member_number="0000000000"),
            buy(program, member, external_id="first", by_number=True),
            buy(program, member, external_id="later", by_number=True),
        ]
    # then: the statement found nothing to write and said so with no row; it did not undo itself (SQLSTATE LY001)
    assert first.known_member_number is not None
    assert results[0] is None
    assert (results[1].created, results[1].transaction.pk) == (False, first.transaction.pk)
    assert results[2].transaction.breakdown == [{"rule": "base", "points": 100}]
    assert errors == []
    assert RuleUsage.objects.get().points == 100
    assert ledger_verify() == []


@pytest.mark.parametrize(
    "outer",
    [
        pytest.param("database transaction", id="inside-a-transaction"),
        pytest.param("none", id="autocommit", marks=pytest.mark.django_db(transaction=True)),
    ],
)
def test_a_claim_that_falls_short_in_the_statement_undoes_all_it_wrote(program, monkeypatch, outer):
    # given: two limited bonuses, one of them nearly used up by a first purchase; the statement's guard is made to
    # let the second purchase through, as a concurrent purchase's claim, committed after the guard read, can
    rule(program, "capped", benefit="fixed", value=Decimal(100), member_limit=150, member_limit_period="month")
    rule(program, "roomy", benefit="fixed", value=Decimal(50), member_limit=1000, member_limit_period="month")
    member = MemberFactory(program=program)
    points_adjust(member=member, points=10, reason="seed")
    buy(program, member, external_id="first")
    claim_at_once, statements = rule_claims.awards_claim_at_once, []

    def unguarded(**kwargs):
        statements.append(kwargs)
        return replace(claim_at_once(**kwargs), guard="true", guard_params=[])

    monkeypatch.setattr(rule_claims, "awards_claim_at_once", unguarded)
    # when
    result = buy(program, member, external_id="second", by_number=True)
    # then: the statement ran, its "capped" claim fell short and it undid itself; the careful way recorded the
    # purchase once, "capped" cut to what was left and "roomy" whole
    assert len(statements) == 1
    assert result.known_member_number is None
    assert result.created  # not found as a repeat of what the statement wrote
    assert result.transaction.breakdown == [
        {"rule": "base", "points": 100},
        {"rule": "capped", "points": 50},
        {"rule": "roomy", "points": 50},
    ]
    assert Transaction.objects.count() == 2
    assert dict(RuleUsage.objects.values_list("rule__code", "points")) == {"capped": 150, "roomy": 100}
    assert Account.objects.get(pk=member.pk).available == 10 + 250 + 200
    assert ledger_verify() == []


def test_another_database_error_in_the_statement_is_raised_and_writes_nothing(program, monkeypatch):
    # given: a limited bonus, and the statement's condition made to fail with an error of its own
    rule(program, "capped", benefit="fixed", value=Decimal(100), member_limit=150, member_limit_period="month")
    member = MemberFactory(program=program)
    points_adjust(member=member, points=10, reason="seed")
    claim_at_once = rule_claims.awards_claim_at_once

    def dividing_by_zero(**kwargs):
        claim = claim_at_once(**kwargs)
        u, params, _ = claim.also
        return replace(claim, also=(u, params[:-1], "(SELECT 1 / (count(*) - count(*)) FROM u) = 1"))

    monkeypatch.setattr(rule_claims, "awards_claim_at_once", dividing_by_zero)
    # when / then: raised, not taken for a claim that fell short
    with pytest.raises(DataError):
        buy(program, member, external_id="broken", by_number=True)
    # and the test's own database transaction is still usable, with nothing of the purchase in it
    assert Transaction.objects.count() == 0
    assert not RuleUsage.objects.exists()
    assert Account.objects.get(pk=member.pk).available == 10


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("by_number", [False, True])
def test_a_member_limit_holds_under_concurrent_purchases_of_one_member(program, by_number):
    # given: the member's account is open, so that by number each purchase tries the one statement first
    rule(program, "capped", benefit="fixed", value=Decimal(100), member_limit=500)
    member = MemberFactory(program=program)
    points_adjust(member=member, points=10, reason="seed")
    # when
    results = at_once(12, lambda n: buy(program, member, external_id=f"c-{n}", by_number=by_number))
    # then: by number, five claimed whole in their one statement, the others fell back and got nothing more
    assert failures(results) == []
    assert sum(r.known_member_number is not None for r in results) == (5 if by_number else 0)
    assert Account.objects.get(pk=member.pk).available == 10 + 12 * 100 + 500
    assert RuleUsage.objects.get().points == 500
    assert ledger_verify() == []


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"benefit": "multiplier", "value": "0.5"}, "value"),
        ({"benefit": "fixed", "value": "0"}, "value"),
        ({"benefit": "fixed", "value": "5", "days_of_week": [0, 8]}, "days_of_week"),
        ({"benefit": "fixed", "value": "5", "channels": ["fax"]}, "channels"),
        (
            {
                "benefit": "fixed",
                "value": "5",
                "valid_from": "2026-12-01T00:00:00Z",
                "valid_until": "2026-11-01T00:00:00Z",
            },
            "valid_until",
        ),
        ({"benefit": "bogus", "value": "5"}, "benefit"),
        ({"benefit": "fixed", "value": "-5"}, "value"),
        ({"benefit": "fixed", "value": "5", "channels": [["pos"]]}, "channels"),
        ({"benefit": "fixed", "value": "5", "days_of_week": [True]}, "days_of_week"),
        ({"benefit": "multiplier", "value": "1000000"}, "value"),
        ({"benefit": "fixed", "value": "1000001"}, "value"),
        ({"benefit": "per_unit", "value": "100001"}, "value"),
        ({"benefit": "multiplier", "value": "2", "category": ["dairy"]}, "category"),
        ({"benefit": "multiplier", "value": "2", "budget_used": 0}, "budget_used"),
    ],
)
def test_bad_rule_definitions_are_refused_with_a_clear_error(api, fields, field):
    # when
    response = api.post(
        "/api/v1/earning-rules", json.dumps({"code": "bad", "name": "Bad", **fields}), content_type="application/json"
    )
    # then
    assert response.status_code == 400
    assert field in response.json()["errors"]
    assert not EarningRule.objects.exists()


def test_rules_are_managed_over_the_api_and_retired_not_deleted(api, program, member):
    # given
    created = api.post(
        "/api/v1/earning-rules",
        json.dumps({"code": "dairy", "name": "Dairy", "categories": ["dairy"], "benefit": "multiplier", "value": "2"}),
        content_type="application/json",
    )
    duplicate = api.post(
        "/api/v1/earning-rules",
        json.dumps({"code": "dairy", "name": "Again", "benefit": "fixed", "value": "1"}),
        content_type="application/json",
    )
    # when
    changed = api.patch("/api/v1/earning-rules/dairy", json.dumps({"value": "3"}), content_type="application/json")
    retired = api.delete("/api/v1/earning-rules/dairy")
    # then
    assert created.status_code == 201
    assert duplicate.status_code == 409
    assert changed.json()["value"] == "3.0000"
    assert retired.json()["active"] is False
    assert buy(program, member).points == 100
    assert EarningRule.objects.count() == 1


def test_a_key_without_program_manage_cannot_change_rules(make_client):
    # given
    from tests.clients import APIClient

    _, raw = make_client(scopes=["transactions:write"])
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Api-Key {raw}")
    # when
    response = client.post(
        "/api/v1/earning-rules", {"code": "x", "name": "X", "benefit": "fixed", "value": "1"}, format="json"
    )
    # then
    assert response.status_code == 403
    assert not EarningRule.objects.exists()


def test_a_rules_code_never_changes_so_breakdowns_keep_naming_it(api, program):
    # given
    earning_rule_create(program=program, code="promo", name="Promo", benefit="fixed", value=Decimal(10))
    # when
    response = api.patch("/api/v1/earning-rules/promo", json.dumps({"code": "old"}), content_type="application/json")
    # then
    assert response.status_code == 400
    assert "code" in response.json()["errors"]
    assert list(EarningRule.objects.values_list("code", flat=True)) == ["promo"]


def test_staff_manage_rules_in_the_admin_with_the_apis_checks(program, admin_client):
    # given
    form = {
        "program": program.pk,
        "code": "dairy",
        "name": "Dairy",
        "priority": 0,
        "benefit": "multiplier",
        "member_limit_period": "month",
        "active": "on",
        **{name: "[]" for name in ("categories", "skus", "stores", "channels", "days_of_week", "tiers")},
    }
    # when
    refused = admin_client.post("/admin/loyalty/earningrule/add/", {**form, "value": "0.5"})
    created = admin_client.post("/admin/loyalty/earningrule/add/", {**form, "value": "2", "categories": '["dairy"]'})
    # then
    assert refused.status_code == 200 and "greater than 1" in refused.content.decode()
    assert created.status_code == 302
    dairy = EarningRule.objects.get()
    assert (dairy.code, dairy.value, dairy.categories) == ("dairy", Decimal(2), ["dairy"])
    assert rules.rules_active(program)[0].rule.code == "dairy"


def test_a_rule_without_a_value_is_refused_by_the_service_too(program):
    # when
    with pytest.raises(InvalidInput) as refused:
        earning_rule_create(program=program, code="novalue", name="No value", benefit="multiplier")
    # then
    assert "value" in refused.value.errors
    assert not EarningRule.objects.exists()
