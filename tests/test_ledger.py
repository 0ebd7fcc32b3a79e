"""The ledger service and the database's own guards: credits, spends, adjustments, append-only entries, lot bounds,
and `manage.py verify_ledger`."""

from datetime import UTC, datetime, timedelta

import pytest
from django.core.management import CommandError, call_command
from django.db import IntegrityError, connection, transaction

from core.errors import InsufficientPoints
from loyalty.ledger import ledger_credit, ledger_debit, ledger_refund
from loyalty.models import Account, Draw, Entry, Lot
from loyalty.verify import ledger_verify
from tests.factories import MemberFactory, record

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def _buy(program, member, total, *, external_id, now=NOW):
    return record(program, member, total, external_id=external_id, at=now)


def _credit(member, points, *, expires_at, kind=Entry.Kind.ADJUST, now=NOW, **fields):
    fields.setdefault("reason", "goodwill" if kind == Entry.Kind.ADJUST else "")
    return ledger_credit(
        member_id=member.pk,
        kind=kind,
        points=points,
        occurred_at=now,
        available_from=now,
        expires_at=expires_at,
        now=now,
        **fields,
    )


def _spend(member, points, *, now=NOW):
    return ledger_debit(member_id=member.pk, kind=Entry.Kind.REDEEM, points=points, occurred_at=now, now=now)


def _balance(member):
    return Account.objects.values_list("available", "pending", "lifetime_earned").get(pk=member.pk)


def test_a_purchase_credits_one_lot_with_its_expiry(program, member):
    # when
    result = _buy(program, member, "149.90", external_id="r1")

    # then
    assert result.points == 149
    assert _balance(member) == (149, 0, 149)
    entry = Entry.objects.get(account_id=member.pk)
    assert (entry.kind, entry.points, entry.available_after, entry.pending_after) == ("earn", 149, 149, 0)
    lot = Lot.objects.get(entry=entry)
    assert (lot.amount, lot.remaining, lot.matured) == (149, 149, True)
    assert lot.expires_at == datetime(2027, 3, 1, 12, 0, tzinfo=UTC)
    assert ledger_verify() == []


def test_spending_draws_soonest_to_expiring_lots_first_and_records_draws(program, member):
    # given three lots, credited out of expiry order, one that never expires
    never = _credit(member, 50, expires_at=None)
    late = _credit(member, 100, expires_at=NOW + timedelta(days=300))
    soon = _credit(member, 30, expires_at=NOW + timedelta(days=10))

    # when
    entry = _spend(member, 120)

    # then the soonest lot is emptied, the next one part-spent, the never-expiring one untouched
    assert entry.points == -120
    assert dict(Draw.objects.filter(entry=entry).values_list("lot__entry_id", "points")) == {soon.pk: 30, late.pk: 90}
    assert dict(Lot.objects.values_list("entry_id", "remaining")) == {never.pk: 50, late.pk: 10, soon.pk: 0}
    assert _balance(member)[:2] == (60, 0)
    assert (entry.available_after, entry.pending_after) == (60, 0)
    assert ledger_verify() == []


def test_spending_reaches_never_expiring_lots_last(program, member):
    # given
    never = _credit(member, 50, expires_at=None)
    dated = _credit(member, 20, expires_at=NOW + timedelta(days=700))

    # when
    entry = _spend(member, 60)

    # then
    assert dict(Draw.objects.filter(entry=entry).values_list("lot__entry_id", "points")) == {dated.pk: 20, never.pk: 40}
    assert ledger_verify() == []


def test_spending_more_than_available_is_refused_and_changes_nothing(program, member):
    # given
    _buy(program, member, "100.00", external_id="r1")
    entries_before = Entry.objects.count()

    # when
    with pytest.raises(InsufficientPoints) as refused:
        _spend(member, 101)

    # then
    assert refused.value.extra == {"available": 100, "requested": 101}
    assert _balance(member) == (100, 0, 100)
    assert Entry.objects.count() == entries_before
    assert not Draw.objects.exists()
    assert Lot.objects.get().remaining == 100
    assert ledger_verify() == []


def test_spending_by_a_member_without_an_account_is_refused_and_opens_none(program, member):
    # when
    with pytest.raises(InsufficientPoints):
        _spend(member, 1)

    # then
    assert not Account.objects.filter(pk=member.pk).exists()
    assert not Entry.objects.exists()


def test_pending_points_cannot_be_spent(program, member):
    # given a credit that becomes available tomorrow
    ledger_credit(
        member_id=member.pk,
        kind=Entry.Kind.EARN,
        points=40,
        occurred_at=NOW,
        available_from=NOW + timedelta(days=1),
        expires_at=None,
        now=NOW,
    )

    # when
    with pytest.raises(InsufficientPoints):
        _spend(member, 1)

    # then
    assert _balance(member) == (0, 40, 40)
    assert not Lot.objects.get().matured
    assert ledger_verify() == []


def test_adjustments_credit_and_debit_with_a_reason(program, member):
    # given
    _buy(program, member, "100.00", external_id="r1")

    # when
    _credit(member, 25, expires_at=None, reason="compensation for a late delivery")
    minus = ledger_debit(
        member_id=member.pk, kind=Entry.Kind.ADJUST, points=60, occurred_at=NOW, now=NOW, reason="duplicate receipt"
    )

    # then positive adjustments count as earned, negative ones do not lower it
    assert _balance(member) == (65, 0, 125)
    assert minus.points == -60
    assert sum(Draw.objects.filter(entry=minus).values_list("points", flat=True)) == 60
    assert ledger_verify() == []


def test_an_adjustment_without_a_reason_is_refused_by_the_database(program, member):
    # when
    with pytest.raises(IntegrityError), transaction.atomic():
        _credit(member, 10, expires_at=None, reason="")

    # then
    assert not Entry.objects.exists()
    assert not Account.objects.filter(pk=member.pk, available__gt=0).exists()


def test_the_database_refuses_to_update_an_entry(program, member):
    # given
    _buy(program, member, "100.00", external_id="r1")
    entry = Entry.objects.get()

    # when
    with pytest.raises(IntegrityError, match="append-only"), transaction.atomic():
        Entry.objects.filter(pk=entry.pk).update(points=1000)

    # then
    assert Entry.objects.get().points == 100


def test_the_database_refuses_to_delete_an_entry(program, member):
    # given
    _buy(program, member, "100.00", external_id="r1")

    # when
    with pytest.raises(IntegrityError, match="append-only"), transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute(f"DELETE FROM {Entry._meta.db_table}")

    # then
    assert Entry.objects.count() == 1


def test_the_database_refuses_to_change_a_draw(program, member):
    # given
    _buy(program, member, "100.00", external_id="r1")
    _spend(member, 30)

    # when
    with pytest.raises(IntegrityError, match="append-only"), transaction.atomic():
        Draw.objects.update(points=1)

    # then
    assert Draw.objects.get().points == 30


def test_the_database_refuses_a_lot_below_zero(program, member):
    # given
    _buy(program, member, "100.00", external_id="r1")

    # when
    with pytest.raises(IntegrityError, match="lot_remaining_range"), transaction.atomic():
        Lot.objects.update(remaining=-1)

    # then
    assert Lot.objects.get().remaining == 100


def test_the_database_refuses_a_lot_above_its_amount(program, member):
    # given
    _buy(program, member, "100.00", external_id="r1")

    # when
    with pytest.raises(IntegrityError, match="lot_remaining_range"), transaction.atomic():
        Lot.objects.update(remaining=101)

    # then
    assert Lot.objects.get().remaining == 100


def test_the_database_refuses_a_second_refund_of_a_spend(program, member):
    # given: 100 points, 60 of them spent and refunded
    _credit(member, 100, expires_at=None)
    spend = _spend(member, 60)
    ledger_refund(spend_entry_id=spend.pk, occurred_at=NOW, now=NOW)

    # when
    with pytest.raises(IntegrityError, match="entry_refunded_once"), transaction.atomic():
        ledger_refund(spend_entry_id=spend.pk, occurred_at=NOW, now=NOW)

    # then: refunded once; the entries that refund nothing are many and share no such bound
    assert Account.objects.get(pk=member.pk).available == 100
    assert Entry.objects.filter(refund_of__isnull=True).count() == 2
    assert ledger_verify() == []


def test_verify_ledger_passes_on_a_clean_ledger(program, capsys):
    # given
    first, second = MemberFactory(), MemberFactory()
    _buy(program, first, "100.00", external_id="r1")
    _buy(program, second, "50.00", external_id="r2")
    _spend(first, 40)

    # when
    call_command("verify_ledger")

    # then
    assert capsys.readouterr().out.strip() == "ledger ok: 2 accounts, 3 entries, 2 lots checked"


def test_verify_ledger_detects_a_corrupted_cached_balance(program, member, capsys):
    # given a cached balance changed behind the ledger's back
    _buy(program, member, "100.00", external_id="r1")
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {Account._meta.db_table} SET available = available + 7 WHERE member_id = %s", [member.pk]
        )

    # when
    with pytest.raises(CommandError, match="ledger broken"):
        call_command("verify_ledger")

    # then the report names each broken check, the account and what was found against what was expected
    out = capsys.readouterr().out
    assert "balance equals the sum of entries: 1 breach(es)" in out
    assert f"subject {member.pk}: found 107, expected 100" in out
    assert "available equals what matured lots hold: 1 breach(es)" in out
    assert "ledger ok" not in out


def test_verify_ledger_detects_a_lot_out_of_step_with_its_draws(program, member, capsys):
    # given
    _buy(program, member, "100.00", external_id="r1")
    lot = Lot.objects.get()
    with connection.cursor() as cursor:
        cursor.execute(f"UPDATE {Lot._meta.db_table} SET remaining = 90 WHERE entry_id = %s", [lot.pk])

    # when
    with pytest.raises(CommandError):
        call_command("verify_ledger")

    # then
    out = capsys.readouterr().out
    assert "a lot's remaining equals its amount less its draws: 1 breach(es)" in out
    assert f"subject {lot.pk}: found 90, expected 100" in out


def test_verify_ledger_refuses_a_limit_below_one(program):
    with pytest.raises(CommandError, match="at least 1"):
        call_command("verify_ledger", "--limit", "0")
