"""The rewards catalogue and redemption: points spent through the ledger, stock taken atomically, per-member limits,
cancellation with a refund, and the API's answers to bad input."""

import threading
from datetime import UTC, datetime, timedelta

import pytest
from django.db import connection

from core.errors import InsufficientPoints, InvalidInput, MemberNotActive
from loyalty.ledger import ledger_credit
from loyalty.models import Account, Draw, Entry, Lot
from loyalty.points import points_adjust
from loyalty.verify import ledger_verify
from rewards.errors import (
    OutOfStock,
    RedemptionLimitReached,
    RedemptionNotCancellable,
    RewardNotAvailable,
    TierNotEligible,
)
from rewards.models import Redemption, Reward, StockChange, Voucher
from rewards.selectors import points_spent_report, reward_list
from rewards.services.catalogue import reward_create, reward_stock_change, reward_update
from rewards.services.redemptions import redemption_cancel, reward_redeem
from rewards.services.vouchers import voucher_consume
from tests.factories import MemberFactory

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def _give(member, points, *, now=NOW):
    return points_adjust(member=member, points=points, reason="seed", now=now)


def _reward(program, code="coffee", **fields):
    fields = {"kind": "product", "points_cost": 100, "name_en": "Coffee", **fields}
    return reward_create(program=program, code=code, **fields)


def _balance(member):
    return Account.objects.values_list("available", "held").get(pk=member.pk)


# Catalogue


def test_a_reward_is_created_with_names_in_three_languages(program):
    # when
    reward = _reward(program, name_sv="Kaffe", name_nb="Kaffe", description_en="A cup")

    # then
    assert reward.text("name", "sv") == "Kaffe"
    assert reward.text("name", "nb") == "Kaffe"
    assert reward.text("description", "sv") == "A cup"  # English when there is no translation


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"kind": "discount"}, "discount_amount"),
        ({"kind": "discount", "discount_amount": "10", "discount_percent": "5"}, "discount_amount"),
        ({"kind": "discount", "discount_percent": "120"}, "discount_percent"),
        ({"kind": "product", "discount_amount": "10"}, "kind"),
        ({"available_from": NOW, "available_until": NOW}, "available_until"),
        ({"code": "Not a slug!"}, "code"),
    ],
)
def test_an_invalid_reward_is_refused_and_nothing_is_created(program, fields, field):
    # when
    with pytest.raises(InvalidInput) as caught:
        _reward(program, **{"code": "r", **fields})

    # then
    assert field in caught.value.errors
    assert not Reward.objects.exists()


def test_stock_cannot_be_set_by_a_change_only_by_an_audited_stock_change(program, django_user_model):
    # given
    reward = _reward(program, stock=2)
    staff = django_user_model.objects.create_user("staff")

    # when
    with pytest.raises(InvalidInput):
        reward_update(reward=reward, stock=100)
    change = reward_stock_change(reward=reward, delta=5, reason="delivery", staff_user=staff)

    # then
    reward.refresh_from_db()
    assert reward.stock == 7
    assert (change.delta, change.stock_after, change.staff_user) == (5, 7, staff)


def test_removing_more_stock_than_is_left_changes_nothing(program):
    # given
    reward = _reward(program, stock=2)

    # when
    with pytest.raises(Exception) as caught:
        reward_stock_change(reward=reward, delta=-3, reason="broken")

    # then
    assert caught.value.code == "stock_too_low"
    reward.refresh_from_db()
    assert reward.stock == 2
    assert not StockChange.objects.exists()


def test_the_catalogue_lists_what_a_member_can_afford_and_redeem_now(program, member):
    # given
    _give(member, 150)
    cheap = _reward(program, "cheap", points_cost=100)
    _reward(program, "dear", points_cost=200)
    _reward(program, "gone", points_cost=10, stock=0)
    _reward(program, "later", points_cost=10, available_from=NOW + timedelta(days=400))
    _reward(program, "retired", points_cost=10, active=False)
    _reward(program, "gold", points_cost=10, min_tier_rank=2)

    # when
    affordable = list(reward_list(program=program, affordable_for=member, now=NOW))
    for_rank_1 = set(reward_list(program=program, tier_rank=1, now=NOW).values_list("code", flat=True))

    # then
    assert affordable == [cheap]
    assert for_rank_1 == {"cheap", "dear"}


# Redemption


def test_redeeming_spends_the_soonest_expiring_points_and_issues_a_voucher(program, member):
    # given a lot expiring soon, credited after one expiring late
    late = ledger_credit(
        member_id=member.pk,
        kind="adjust",
        points=100,
        occurred_at=NOW,
        available_from=NOW,
        expires_at=NOW + timedelta(days=300),
        now=NOW,
        reason="late",
    )
    soon = ledger_credit(
        member_id=member.pk,
        kind="adjust",
        points=100,
        occurred_at=NOW,
        available_from=NOW,
        expires_at=NOW + timedelta(days=10),
        now=NOW,
        reason="soon",
    )
    reward = _reward(program, points_cost=80, voucher_valid_days=14)

    # when
    redemption = reward_redeem(member=member, reward=reward, now=NOW)

    # then
    assert _balance(member) == (120, 0)
    assert redemption.entry.kind == Entry.Kind.REDEEM and redemption.entry.points == -80
    assert list(Draw.objects.filter(entry=redemption.entry).values_list("lot__entry", "points")) == [(soon.pk, 80)]
    assert Lot.objects.get(entry=late).remaining == 100
    assert redemption.voucher.expires_at == NOW + timedelta(days=14)
    assert len(redemption.voucher.code) == 16
    assert ledger_verify() == []


def test_redeeming_without_enough_points_changes_nothing(program, member):
    # given
    _give(member, 50)
    reward = _reward(program, stock=3)

    # when
    with pytest.raises(InsufficientPoints):
        reward_redeem(member=member, reward=reward, now=NOW)

    # then
    assert _balance(member) == (50, 0)
    reward.refresh_from_db()
    assert reward.stock == 3
    assert not Redemption.objects.exists() and not Voucher.objects.exists()
    assert not Entry.objects.filter(kind="redeem").exists()


@pytest.mark.parametrize(
    "fields, error",
    [
        ({"active": False}, RewardNotAvailable),
        ({"available_from": NOW + timedelta(days=1)}, RewardNotAvailable),
        ({"available_until": NOW}, RewardNotAvailable),
        ({"min_tier_rank": 1}, TierNotEligible),
        ({"stock": 0}, OutOfStock),
    ],
)
def test_a_reward_that_cannot_be_redeemed_is_refused_and_changes_nothing(program, member, fields, error):
    # given
    _give(member, 500)
    reward = _reward(program, **fields)

    # when
    with pytest.raises(error):
        reward_redeem(member=member, reward=reward, now=NOW)

    # then
    assert _balance(member) == (500, 0)
    assert not Redemption.objects.exists()


def test_a_suspended_member_cannot_redeem(program):
    # given
    member = MemberFactory(program=program, status="suspended")
    _give(member, 500)

    # when
    with pytest.raises(MemberNotActive):
        reward_redeem(member=member, reward=_reward(program), now=NOW)

    # then
    assert _balance(member) == (500, 0)


def test_the_per_member_limit_counts_the_period_in_the_members_calendar(program, member):
    # given a limit of one a day
    _give(member, 1000)
    reward = _reward(program, member_limit=1, member_limit_period="day")
    reward_redeem(member=member, reward=reward, now=NOW)

    # when
    with pytest.raises(RedemptionLimitReached):
        reward_redeem(member=member, reward=reward, now=NOW + timedelta(hours=1))

    # then the refused one changed nothing, and the next day is a new period
    assert _balance(member) == (900, 0)
    reward_redeem(member=member, reward=reward, now=NOW + timedelta(days=1))
    assert Redemption.objects.count() == 2


def test_cancelling_refunds_the_points_to_their_lots_and_returns_the_stock(program, member):
    # given
    _give(member, 300)
    reward = _reward(program, stock=1, member_limit=1, member_limit_period="ever")
    redemption = reward_redeem(member=member, reward=reward, now=NOW)

    # when
    cancelled = redemption_cancel(redemption=redemption, now=NOW)
    again = redemption_cancel(redemption=redemption, now=NOW)

    # then
    assert cancelled.status == again.status == "cancelled"
    assert _balance(member) == (300, 0)
    refund = cancelled.refund_entry
    assert (refund.kind, refund.points, refund.refund_of_id) == ("refund", 100, redemption.entry_id)
    assert Entry.objects.filter(kind="refund").count() == 1
    assert Lot.objects.get(account_id=member.pk).remaining == 300
    reward.refresh_from_db()
    assert reward.stock == 1
    assert cancelled.voucher.status == "cancelled"
    assert ledger_verify() == []
    # and the cancelled one no longer counts against the limit
    reward_redeem(member=member, reward=reward, now=NOW)


def test_a_used_voucher_cannot_be_cancelled(program, member):
    # given
    _give(member, 300)
    redemption = reward_redeem(member=member, reward=_reward(program), now=NOW)
    voucher_consume(program=program, code=redemption.voucher.code, store="S1", transaction_external_id="t1", now=NOW)

    # when
    with pytest.raises(RedemptionNotCancellable):
        redemption_cancel(redemption=redemption, now=NOW)

    # then
    assert _balance(member) == (200, 0)
    assert not Entry.objects.filter(kind="refund").exists()


def test_a_refund_after_a_return_took_points_into_debt_settles_the_debt_first(program, member):
    # given 100 spent of 100, then a staff correction that the balance cannot cover is forced by a reversal
    _give(member, 100)
    redemption = reward_redeem(member=member, reward=_reward(program, points_cost=100), now=NOW)
    from loyalty.ledger import ledger_reverse

    ledger_reverse(member_id=member.pk, points=30, earn_entry_id=None, allow_negative=True, occurred_at=NOW, now=NOW)
    assert _balance(member) == (-30, 0)

    # when
    redemption_cancel(redemption=redemption, now=NOW)

    # then
    assert _balance(member) == (70, 0)
    assert ledger_verify() == []


def test_points_spent_are_reported_per_reward_and_period(program, member):
    # given
    _give(member, 1000)
    coffee, cake = _reward(program, "coffee"), _reward(program, "cake", points_cost=250)
    reward_redeem(member=member, reward=coffee, now=NOW)
    reward_redeem(member=member, reward=coffee, now=NOW)
    cancelled = reward_redeem(member=member, reward=cake, now=NOW)
    redemption_cancel(redemption=cancelled, now=NOW)
    reward_redeem(member=member, reward=cake, now=NOW + timedelta(days=31))

    # when
    rows = points_spent_report(program=program, period="month")

    # then
    assert [(r["period"].month, r["reward"], r["count"], r["points"]) for r in rows] == [
        (4, "cake", 1, 250),
        (3, "coffee", 2, 200),
    ]


# Concurrency


@pytest.mark.django_db(transaction=True)
def test_many_members_redeeming_the_last_item_at_once_only_one_gets_it(program):
    # given
    reward = _reward(program, stock=1)
    members = [MemberFactory(program=program) for _ in range(12)]
    for m in members:
        _give(m, 100)
    barrier = threading.Barrier(len(members))
    outcomes = []

    def redeem(m):
        try:
            barrier.wait()
            reward_redeem(member=m, reward=reward)
            outcomes.append("ok")
        except OutOfStock:
            outcomes.append("out")
        finally:
            connection.close()

    # when
    threads = [threading.Thread(target=redeem, args=(m,)) for m in members]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    # then
    assert sorted(outcomes) == ["ok"] + ["out"] * 11
    reward.refresh_from_db()
    assert reward.stock == 0
    assert Redemption.objects.count() == 1
    assert (
        sorted(Account.objects.filter(pk__in=[m.pk for m in members]).values_list("available", flat=True))
        == [0] + [100] * 11
    )
    assert ledger_verify() == []


@pytest.mark.django_db(transaction=True)
def test_one_member_racing_their_own_limit_gets_it_once(program):
    # given
    member = MemberFactory(program=program)
    _give(member, 10_000)
    reward = _reward(program, member_limit=1, member_limit_period="ever")
    barrier = threading.Barrier(8)
    outcomes = []

    def redeem():
        try:
            barrier.wait()
            reward_redeem(member=member, reward=reward)
            outcomes.append("ok")
        except RedemptionLimitReached:
            outcomes.append("limit")
        finally:
            connection.close()

    # when
    threads = [threading.Thread(target=redeem) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    # then
    assert sorted(outcomes) == ["limit"] * 7 + ["ok"]
    assert _balance(member) == (9_900, 0)
    assert ledger_verify() == []
