"""How earning meets the rest: tier multipliers, paying with points, and vouchers coming back with a return."""

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from loyalty.points import points_adjust
from loyalty.tier_setup import tier_create
from loyalty.tiers import tier_set_manual
from loyalty.transactions import TransactionInput, transaction_record
from rewards.models import Voucher
from rewards.services.catalogue import reward_create
from rewards.services.redemptions import reward_redeem
from rewards.services.vouchers import voucher_consume

AT = datetime(2025, 6, 4, 12, 0, tzinfo=UTC)


def buy(program, member, *, external_id="P1", total="100.00", paid_with_points="0"):
    data = TransactionInput(
        store="S1",
        external_id=external_id,
        channel="pos",
        kind="purchase",
        occurred_at=AT,
        currency="SEK",
        total=Decimal(total),
        member=member,
        paid_with_points=Decimal(paid_with_points),
    )
    return transaction_record(program=program, data=data)


def test_a_tier_multiplier_is_a_line_of_the_breakdown(program, member):
    # given
    gold = tier_create(
        program=program, code="GOLD", name_en="Gold", rank=1, threshold=Decimal(5000), earn_multiplier=Decimal("1.5")
    )
    tier_set_manual(member=member, tier=gold, reason="VIP", until=AT + timedelta(days=365), now=AT)
    # when
    result = buy(program, member)
    # then
    assert result.transaction.breakdown == [{"rule": "base", "points": 100}, {"rule": "tier:GOLD", "points": 50}]
    assert result.points == 150


def test_the_part_paid_with_points_earns_nothing(program, member):
    # when: 40.00 of a 100.00 basket was paid with a captured hold
    result = buy(program, member, paid_with_points="40.00")
    # then
    assert result.points == 60
    assert result.transaction.paid_with_points == Decimal("40.00")


def test_paying_more_with_points_than_the_total_is_refused(api, member):
    # when
    response = api.post(
        "/api/v1/transactions",
        json.dumps(
            {
                "external_id": "X",
                "store": "S1",
                "channel": "pos",
                "member": member.member_number,
                "type": "purchase",
                "occurred_at": AT.isoformat(),
                "currency": "SEK",
                "total": "10.00",
                "paid_with_points": "20.00",
            }
        ),
        content_type="application/json",
    )
    # then
    assert response.status_code == 422
    assert response.json()["code"] == "invalid_points_payment"


def test_a_full_return_gives_the_purchases_voucher_back_when_the_programme_says_so(api, program, member):
    # given: a voucher used on a purchase, and a programme that restores vouchers on returns
    program.voucher_return_policy = "restore"
    program.save()
    points_adjust(member=member, points=500, reason="seed")
    reward = reward_create(program=program, code="coffee", kind="product", points_cost=100, name_en="Coffee")
    voucher = reward_redeem(member=member, reward=reward).voucher
    body = {
        "external_id": "P9",
        "store": "S1",
        "channel": "pos",
        "member": member.member_number,
        "type": "purchase",
        "occurred_at": datetime.now(UTC).isoformat(),
        "currency": "SEK",
        "total": "50.00",
    }
    api.post("/api/v1/transactions", json.dumps(body), content_type="application/json")
    voucher_consume(program=program, code=voucher.code, store="S1", transaction_external_id="P9")
    half = {**body, "external_id": "R1", "type": "return", "original_external_id": "P9", "total": "25.00"}
    rest = {**half, "external_id": "R2"}
    # when
    api.post("/api/v1/transactions", json.dumps(half), content_type="application/json")
    after_half = Voucher.objects.get(pk=voucher.pk).status
    api.post("/api/v1/transactions", json.dumps(rest), content_type="application/json")
    # then: a partial return keeps it used; the return that completes the purchase gives it back
    assert after_half == Voucher.Status.USED
    assert Voucher.objects.get(pk=voucher.pk).status == Voucher.Status.ISSUED


def test_a_tier_opens_the_rewards_reserved_for_it(program, member):
    # given
    import pytest

    from rewards.errors import TierNotEligible

    silver = tier_create(program=program, code="SILVER", name_en="Silver", rank=1, threshold=Decimal(1000))
    gold = tier_create(program=program, code="GOLD", name_en="Gold", rank=2, threshold=Decimal(5000))
    points_adjust(member=member, points=500, reason="seed")
    lounge = reward_create(
        program=program, code="lounge", kind="experience", points_cost=100, name_en="Lounge", min_tier_rank=2
    )
    # when / then: silver is not enough
    tier_set_manual(member=member, tier=silver, reason="test", until=AT + timedelta(days=3650), now=AT)
    with pytest.raises(TierNotEligible):
        reward_redeem(member=member, reward=lounge)
    # when / then: gold is
    tier_set_manual(member=member, tier=gold, reason="test", until=AT + timedelta(days=3650), now=AT)
    assert reward_redeem(member=member, reward=lounge).voucher is not None
