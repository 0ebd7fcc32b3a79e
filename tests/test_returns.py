"""Returns take back what their purchase earned, in proportion, once, under either return policy."""

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from core.errors import Unprocessable
from core.models import Program
from loyalty.ledger import ledger_debit, ledger_mature_due
from loyalty.models import Account, Draw, Entry, Lot, Transaction
from loyalty.verify import ledger_verify
from tests.factories import MemberFactory, record

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def available_only(program):
    program.return_policy = Program.ReturnPolicy.AVAILABLE_ONLY
    program.save(update_fields=["return_policy"])
    return program


def _buy(program, member, total, *, external_id, at=NOW):
    return record(program, member, total, external_id=external_id, at=at)


def _return(program, total, *, external_id, original, member=None, at=NOW):
    return record(program, member, total, external_id=external_id, kind="return", original=original, at=at)


def _spend(member, points):
    return ledger_debit(member_id=member.pk, kind=Entry.Kind.REDEEM, points=points, occurred_at=NOW, now=NOW)


def _balance(member):
    return Account.objects.values_list("available", "pending", "lifetime_earned").get(pk=member.pk)


def _purchase(external_id):
    return Transaction.objects.values_list("returned_total", "points", "points_reversed").get(external_id=external_id)


def _rows():
    return (
        Transaction.objects.count(),
        Entry.objects.count(),
        Draw.objects.count(),
        list(Lot.objects.order_by("pk").values_list("pk", "remaining", "matured")),
    )


def test_returns_of_30_then_70_percent_reverse_exactly_what_was_earned(program, member):
    # given a purchase that earned 99 points
    assert _buy(program, member, "99.90", external_id="r1").points == 99

    # when 30% comes back
    first = _return(program, "29.97", external_id="ret1", original="r1")

    # then its share is taken, rounded down
    assert (first.points, first.forgiven) == (-29, 0)
    assert _balance(member) == (70, 0, 70)
    assert _purchase("r1") == (Decimal("29.97"), 99, 29)

    # when the other 70% comes back
    second = _return(program, "69.93", external_id="ret2", original="r1")

    # then together they took exactly what the purchase earned
    assert second.points == -70
    assert _balance(member) == (0, 0, 0)
    assert _purchase("r1") == (Decimal("99.90"), 99, 99)
    assert Lot.objects.get().remaining == 0
    assert sum(Transaction.objects.filter(kind="return").values_list("points", flat=True)) == -99
    assert ledger_verify() == []


def test_many_small_returns_never_take_more_than_the_purchase_earned(program, member):
    # given
    _buy(program, member, "10.00", external_id="r1")

    # when it comes back in thirds and a final cent
    for i, part in enumerate(["3.33", "3.33", "3.33", "0.01"]):
        _return(program, part, external_id=f"ret{i}", original="r1")

    # then
    assert list(Transaction.objects.filter(kind="return").order_by("pk").values_list("points", flat=True)) == [
        -3,
        -3,
        -3,
        -1,
    ]
    assert _balance(member) == (0, 0, 0)
    assert ledger_verify() == []


def test_a_return_of_more_than_was_bought_is_refused_and_changes_nothing(program, member):
    # given
    _buy(program, member, "100.00", external_id="r1")
    _return(program, "60.00", external_id="ret1", original="r1")
    balance, rows = _balance(member), _rows()

    # when
    with pytest.raises(Unprocessable) as refused:
        _return(program, "40.01", external_id="ret2", original="r1")

    # then
    assert refused.value.code == "return_exceeds_purchase"
    assert refused.value.errors == {"total": ["At most 40.00."]}
    assert _balance(member) == balance == (40, 0, 40)
    assert _rows() == rows
    assert _purchase("r1") == (Decimal("60.00"), 100, 60)
    assert not Transaction.objects.filter(external_id="ret2").exists()


def test_a_return_of_an_unknown_purchase_is_refused_and_changes_nothing(program, member):
    # given
    _buy(program, member, "100.00", external_id="r1")
    rows = _rows()

    # when
    with pytest.raises(Unprocessable) as refused:
        _return(program, "10.00", external_id="ret1", original="nope")

    # then
    assert refused.value.code == "original_not_found"
    assert _rows() == rows
    assert _balance(member) == (100, 0, 100)


def test_a_return_naming_another_member_is_refused_and_changes_nothing(program, member):
    # given
    _buy(program, member, "100.00", external_id="r1")
    rows = _rows()

    # when
    with pytest.raises(Unprocessable) as refused:
        _return(program, "10.00", external_id="ret1", original="r1", member=MemberFactory())

    # then
    assert refused.value.code == "member_mismatch"
    assert _rows() == rows
    assert _balance(member) == (100, 0, 100)
    assert _purchase("r1") == (Decimal("0.00"), 100, 0)


def test_allow_negative_reverses_spent_points_and_the_next_purchase_settles_the_debt(program, member):
    # given 80 of the purchase's 100 points spent
    _buy(program, member, "100.00", external_id="r1")
    _spend(member, 80)

    # when the whole purchase comes back
    result = _return(program, "100.00", external_id="ret1", original="r1")

    # then all 100 are taken back: the balance goes negative
    assert (result.points, result.forgiven) == (-100, 0)
    assert (result.balance.available, result.balance.pending) == (-80, 0)
    assert _balance(member) == (-80, 0, 0)
    assert ledger_verify() == []

    # when the next purchase earns 50
    _buy(program, member, "50.00", external_id="r2")

    # then it all goes to the debt
    assert _balance(member) == (-30, 0, 50)
    lot = Lot.objects.get(entry__transaction__external_id="r2")
    assert (lot.amount, lot.remaining) == (50, 0)
    assert Draw.objects.get(lot=lot).points == 50
    assert ledger_verify() == []

    # when the one after earns 100
    _buy(program, member, "100.00", external_id="r3")

    # then the debt is paid off and the rest can be spent
    assert _balance(member) == (70, 0, 150)
    assert Lot.objects.get(entry__transaction__external_id="r3").remaining == 70
    _spend(member, 70)
    assert ledger_verify() == []


def test_available_only_reverses_what_is_left_and_forgives_the_rest(available_only, member):
    # given 80 of the purchase's 100 points spent
    _buy(available_only, member, "100.00", external_id="r1")
    _spend(member, 80)

    # when the whole purchase comes back
    result = _return(available_only, "100.00", external_id="ret1", original="r1")

    # then only the 20 still available are taken; the balance never goes negative
    assert (result.points, result.forgiven) == (-20, 80)
    assert _balance(member) == (0, 0, 80)
    assert _purchase("r1") == (Decimal("100.00"), 100, 100)
    assert Transaction.objects.get(external_id="ret1").points == -100
    assert ledger_verify() == []


def test_available_only_takes_from_other_lots_when_the_purchase_lot_is_spent(available_only, member):
    # given the purchase's own lot spent, and other points available
    _buy(available_only, member, "100.00", external_id="r1")
    _spend(member, 100)
    _buy(available_only, member, "30.00", external_id="r2")

    # when half the purchase comes back
    result = _return(available_only, "50.00", external_id="ret1", original="r1")

    # then
    assert (result.points, result.forgiven) == (-30, 20)
    assert _balance(member) == (0, 0, 100)
    assert ledger_verify() == []


def test_available_only_with_nothing_available_reverses_nothing(available_only, member):
    # given
    _buy(available_only, member, "100.00", external_id="r1")
    _spend(member, 100)
    entries = Entry.objects.count()

    # when
    result = _return(available_only, "100.00", external_id="ret1", original="r1")

    # then the return is recorded, but no points move
    assert (result.points, result.forgiven) == (0, 100)
    assert Entry.objects.count() == entries
    assert _balance(member) == (0, 0, 100)
    assert ledger_verify() == []


def test_a_return_of_a_pending_purchase_reduces_pending(program, member):
    # given
    program.pending_days = 14
    _buy(program, member, "100.00", external_id="r1")
    assert _balance(member) == (0, 100, 100)

    # when
    result = _return(program, "40.00", external_id="ret1", original="r1")

    # then
    assert result.points == -40
    assert _balance(member) == (0, 60, 60)
    assert Lot.objects.get().remaining == 60
    assert ledger_verify() == []

    # when the rest matures
    ledger_mature_due(now=NOW + timedelta(days=14))

    # then
    assert _balance(member) == (60, 0, 60)
    assert ledger_verify() == []


def test_a_full_return_of_a_pending_purchase_leaves_nothing_to_mature(available_only, member):
    # given
    available_only.pending_days = 14
    _buy(available_only, member, "100.00", external_id="r1")

    # when
    result = _return(available_only, "100.00", external_id="ret1", original="r1")
    ledger_mature_due(now=NOW + timedelta(days=14))

    # then the pending points are taken in full even under available_only
    assert (result.points, result.forgiven) == (-100, 0)
    assert _balance(member) == (0, 0, 0)
    assert ledger_verify() == []


def test_a_partial_return_sent_twice_reverses_once(program, member):
    # given
    _buy(program, member, "100.00", external_id="r1")
    first = _return(program, "30.00", external_id="ret1", original="r1")
    rows = _rows()

    # when
    again = _return(program, "30.00", external_id="ret1", original="r1")

    # then
    assert (first.created, again.created) == (True, False)
    assert again.transaction.pk == first.transaction.pk
    assert (again.points, again.balance) == (first.points, first.balance)
    assert _rows() == rows
    assert _balance(member) == (70, 0, 70)
    assert _purchase("r1") == (Decimal("30.00"), 100, 30)


def test_a_full_return_sent_twice_reverses_once(program, member):
    # given
    _buy(program, member, "100.00", external_id="r1")
    first = _return(program, "100.00", external_id="ret1", original="r1")
    rows = _rows()

    # when the till retries a return that returned everything
    again = _return(program, "100.00", external_id="ret1", original="r1")

    # then it is answered with the first result, not refused as exceeding the purchase
    assert (again.created, again.transaction.pk, again.points) == (False, first.transaction.pk, -100)
    assert _rows() == rows
    assert _balance(member) == (0, 0, 0)
    assert ledger_verify() == []


def test_an_anonymous_purchase_and_its_return_move_no_points(program):
    # given
    bought = _buy(program, None, "100.00", external_id="r1")

    # when
    returned = _return(program, "100.00", external_id="ret1", original="r1")

    # then both are recorded, no account is opened and nothing enters the ledger
    assert (bought.points, bought.balance, returned.points, returned.balance) == (0, None, 0, None)
    assert _purchase("r1") == (Decimal("100.00"), 0, 0)
    assert Transaction.objects.get(external_id="ret1").member_id is None
    assert not Account.objects.exists()
    assert not Entry.objects.exists()
    assert ledger_verify() == []


def test_a_return_naming_a_member_for_an_anonymous_purchase_is_refused(program, member):
    # given
    _buy(program, None, "100.00", external_id="r1")

    # when
    with pytest.raises(Unprocessable) as refused:
        _return(program, "100.00", external_id="ret1", original="r1", member=member)

    # then
    assert refused.value.code == "member_mismatch"
    assert not Transaction.objects.filter(kind="return").exists()
    assert not Account.objects.exists()
