"""The maturation and expiry jobs: they act exactly when a lot's time comes, once, and keep the ledger balanced."""

from datetime import UTC, datetime, timedelta

import pytest

from core.models import Program
from loyalty.ledger import ledger_debit, ledger_expire_due, ledger_mature_due
from loyalty.models import Account, Draw, Entry, Lot
from loyalty.verify import ledger_verify
from tests.factories import MemberFactory, record

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
TWO_YEARS_LATER = datetime(2027, 3, 1, 12, 0, tzinfo=UTC)
SECOND = timedelta(seconds=1)


@pytest.fixture
def pending_program(program):
    """The DEFAULT programme with a 14-day pending period."""
    program.pending_days = 14
    program.save(update_fields=["pending_days"])
    return program


def _txn(program, member, total, *, external_id, kind="purchase", original=None, at=NOW, now=None):
    return record(program, member, total, external_id=external_id, kind=kind, original=original, at=at, now=now)


def _balance(member):
    return Account.objects.values_list("available", "pending").get(pk=member.pk)


def _rows():
    return (Entry.objects.count(), Draw.objects.count(), list(Lot.objects.order_by("pk").values_list()))


def test_a_pending_purchase_matures_at_available_from_and_not_before(pending_program, member):
    # given
    result = _txn(pending_program, member, "120.00", external_id="r1")
    assert (result.pending, result.available_at) == (120, NOW + timedelta(days=14))
    assert _balance(member) == (0, 120)

    # when the job runs a second early
    early = ledger_mature_due(now=NOW + timedelta(days=14) - SECOND)

    # then nothing matures
    assert early == 0
    assert _balance(member) == (0, 120)

    # when it runs on the dot
    matured = ledger_mature_due(now=NOW + timedelta(days=14))

    # then
    assert matured == 1
    assert _balance(member) == (120, 0)
    lot = Lot.objects.get()
    assert (lot.matured, lot.remaining) == (True, 120)
    assert ledger_verify() == []


def test_maturing_writes_no_entry(pending_program, member):
    # given
    _txn(pending_program, member, "120.00", external_id="r1")

    # when
    ledger_mature_due(now=NOW + timedelta(days=15))

    # then the earn entry already explains the points; only their state changed
    assert list(Entry.objects.values_list("kind", flat=True)) == ["earn"]


def test_matured_points_can_be_spent(pending_program, member):
    # given
    _txn(pending_program, member, "120.00", external_id="r1")
    ledger_mature_due(now=NOW + timedelta(days=14))

    # when
    ledger_debit(member_id=member.pk, kind=Entry.Kind.REDEEM, points=120, occurred_at=NOW, now=NOW)

    # then
    assert _balance(member) == (0, 0)
    assert ledger_verify() == []


def test_maturing_settles_a_negative_balance_first(pending_program, member):
    # given 100 spent, then their purchase returned, leaving -100, and a newer purchase still pending
    pending_program.pending_days = 0
    _txn(pending_program, member, "100.00", external_id="r1")
    ledger_debit(member_id=member.pk, kind=Entry.Kind.REDEEM, points=100, occurred_at=NOW, now=NOW)
    _txn(pending_program, member, "100.00", external_id="ret1", kind="return", original="r1")
    pending_program.pending_days = 14
    _txn(pending_program, member, "130.00", external_id="r2")
    assert _balance(member) == (-100, 130)

    # when
    ledger_mature_due(now=NOW + timedelta(days=14))

    # then the debt is paid from the matured lot
    assert _balance(member) == (30, 0)
    lot = Lot.objects.get(entry__transaction__external_id="r2")
    assert (lot.amount, lot.remaining) == (130, 30)
    assert ledger_verify() == []


def test_expiry_happens_at_expires_at_with_one_entry_per_lot(program):
    # given two members, one with two lots of the same day
    first, second = MemberFactory(), MemberFactory()
    _txn(program, first, "100.00", external_id="r1")
    _txn(program, first, "50.00", external_id="r2")
    _txn(program, second, "70.00", external_id="r3")
    ledger_debit(member_id=first.pk, kind=Entry.Kind.REDEEM, points=120, occurred_at=NOW, now=NOW)

    # when the job runs a second early
    assert ledger_expire_due(now=TWO_YEARS_LATER - SECOND) == 0
    assert not Entry.objects.filter(kind=Entry.Kind.EXPIRE).exists()

    # when it runs on the dot
    expired = ledger_expire_due(now=TWO_YEARS_LATER)

    # then only lots with something left expire, each with its own entry
    assert expired == 2
    assert _balance(first) == (0, 0)
    assert _balance(second) == (0, 0)
    expiries = Entry.objects.filter(kind=Entry.Kind.EXPIRE).order_by("account_id")
    assert [(e.account_id, e.points, e.occurred_at) for e in expiries] == [
        (first.pk, -30, TWO_YEARS_LATER),
        (second.pk, -70, TWO_YEARS_LATER),
    ]
    for expiry in expiries:
        draw = Draw.objects.get(entry=expiry)
        assert draw.points == -expiry.points
        assert draw.lot.remaining == 0
    assert ledger_verify() == []


def test_expiry_keeps_lots_that_expire_later(program, member):
    # given
    _txn(program, member, "100.00", external_id="r1")
    _txn(program, member, "40.00", external_id="r2", at=NOW + timedelta(days=30))

    # when
    ledger_expire_due(now=TWO_YEARS_LATER)

    # then
    assert _balance(member) == (40, 0)
    assert Entry.objects.get(kind=Entry.Kind.EXPIRE).points == -100
    assert ledger_verify() == []


def test_expiry_entries_carry_the_running_balance(program, member):
    # given
    _txn(program, member, "100.00", external_id="r1")
    _txn(program, member, "40.00", external_id="r2", at=NOW + timedelta(days=1))
    _txn(program, member, "10.00", external_id="r3", at=NOW + timedelta(days=900))

    # when
    ledger_expire_due(now=TWO_YEARS_LATER + timedelta(days=1))

    # then
    expiries = Entry.objects.filter(kind=Entry.Kind.EXPIRE).order_by("pk")
    assert [(e.points, e.available_after, e.pending_after) for e in expiries] == [(-100, 50, 0), (-40, 10, 0)]


def test_a_pending_lot_that_reaches_its_expiry_expires_from_pending(member):
    # given a programme whose points would expire before they mature
    odd = Program.objects.create(code="ODD", name="Odd", currency="SEK", pending_days=40, expiry_months=1)
    _txn(odd, member, "80.00", external_id="r1")

    # when
    expired = ledger_expire_due(now=NOW + timedelta(days=31))

    # then
    assert expired == 1
    assert _balance(member) == (0, 0)
    assert Entry.objects.get(kind=Entry.Kind.EXPIRE).pending_after == 0
    assert ledger_verify() == []


def test_running_the_jobs_twice_changes_nothing(pending_program):
    # given
    first, second = MemberFactory(), MemberFactory()
    _txn(pending_program, first, "100.00", external_id="r1")
    _txn(pending_program, second, "60.00", external_id="r2", at=NOW + timedelta(days=3))
    later = TWO_YEARS_LATER + timedelta(days=5)
    assert ledger_mature_due(now=later) == 2
    assert ledger_expire_due(now=later) == 2
    balances, rows = (_balance(first), _balance(second)), _rows()

    # when
    matured, expired = ledger_mature_due(now=later), ledger_expire_due(now=later)

    # then
    assert (matured, expired) == (0, 0)
    assert (_balance(first), _balance(second)) == balances == ((0, 0), (0, 0))
    assert _rows() == rows
    assert ledger_verify() == []


def test_the_jobs_work_through_every_batch(pending_program):
    # given more lots, across more accounts, than one batch holds
    members = [MemberFactory() for _ in range(4)]
    for i in range(10):
        _txn(pending_program, members[i % 4], f"{10 + i}.00", external_id=f"r{i}", at=NOW + timedelta(hours=i))

    # when
    matured = ledger_mature_due(now=NOW + timedelta(days=15), batch_size=3)

    # then
    assert matured == 10
    assert not Lot.objects.filter(matured=False).exists()
    assert Account.objects.filter(pending=0).count() == 4

    # when
    expired = ledger_expire_due(now=TWO_YEARS_LATER + timedelta(days=1), batch_size=3)

    # then
    assert expired == 10
    assert Entry.objects.filter(kind=Entry.Kind.EXPIRE).count() == 10
    assert not Account.objects.exclude(available=0).exists()
    assert ledger_verify() == []


def test_the_jobs_leave_other_members_alone(pending_program):
    # given one member due and one not
    due, not_due = MemberFactory(), MemberFactory()
    _txn(pending_program, due, "100.00", external_id="r1")
    _txn(pending_program, not_due, "100.00", external_id="r2", at=NOW + timedelta(days=5))
    updated_before = Account.objects.get(pk=not_due.pk).updated_at

    # when
    ledger_mature_due(now=NOW + timedelta(days=14))

    # then
    assert _balance(due) == (100, 0)
    assert _balance(not_due) == (0, 100)
    assert Account.objects.get(pk=not_due.pk).updated_at == updated_before
