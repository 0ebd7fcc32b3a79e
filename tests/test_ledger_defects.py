"""Ledger defects found in review, each pinned by the behaviour that was wrong: a return under `available_only` took
points a hold had set aside; points already expired on arrival could be spent; verify_ledger missed purchases
without their earn entry and entries on the wrong account; staff could not adjust a member with no account yet."""

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from dateutil.relativedelta import relativedelta
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command

from core.errors import InsufficientPoints
from core.models import Program
from loyalty.ledger import (
    ledger_credit,
    ledger_credit_new_transaction,
    ledger_debit,
    ledger_expire_due,
    ledger_reverse,
)
from loyalty.models import Account, Draw, Entry, Lot, Transaction
from loyalty.points import points_adjust
from loyalty.transactions import TransactionInput, transaction_record_by_number
from loyalty.verify import ledger_verify
from rewards.services.holds import hold_capture, hold_place
from tests.factories import MemberFactory, record

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
# Older than the DEFAULT programme's 24 months of expiry: its points expired before they arrived.
LONG_AGO = NOW - relativedelta(months=25)


def _balance(member):
    return Account.objects.values_list("available", "pending", "lifetime_earned", "held").get(pk=member.pk)


def _rows():
    return (Transaction.objects.count(), Entry.objects.count(), Lot.objects.count(), Draw.objects.count())


def _kinds(member):
    return list(Entry.objects.filter(account_id=member.pk).order_by("pk").values_list("kind", "points"))


@pytest.fixture
def available_only(program):
    program.return_policy = Program.ReturnPolicy.AVAILABLE_ONLY
    program.save(update_fields=["return_policy"])
    return program


# Defect 6: under available_only a return never takes points a hold set aside.


def test_an_available_only_return_leaves_held_points_alone(available_only, member):
    # given 100 points earned, 80 of them held for a till
    record(available_only, member, "100.00", external_id="p1", at=NOW)
    hold = hold_place(member=member, points=80, store="S1", now=NOW).hold

    # when the whole purchase comes back
    result = record(available_only, member, "100.00", external_id="r1", kind="return", original="p1", at=NOW)

    # then only the 20 points neither spent nor held are taken; the rest is forgiven
    assert (result.points, result.forgiven) == (-20, 80)
    assert _balance(member) == (80, 0, 80, 80)
    assert result.balance.spendable == 0
    # and the hold is still covered: it can be captured in full
    captured = hold_capture(hold=hold, transaction_external_id="t1", now=NOW)
    assert captured.balance.available == 0
    assert ledger_verify() == []


def test_an_available_only_return_takes_nothing_when_everything_is_held(available_only, member):
    # given
    record(available_only, member, "100.00", external_id="p1", at=NOW)
    hold_place(member=member, points=100, store="S1", now=NOW)
    entries = Entry.objects.count()

    # when
    result = record(available_only, member, "40.00", external_id="r1", kind="return", original="p1", at=NOW)

    # then the return is recorded, forgiven whole, and writes no ledger entry
    assert (result.points, result.forgiven) == (0, 40)
    assert _balance(member) == (100, 0, 100, 100)
    assert Entry.objects.count() == entries
    assert Transaction.objects.get(external_id="p1").points_reversed == 40
    assert ledger_verify() == []


def test_an_allow_negative_return_still_takes_everything_even_held_points(program, member):
    # given the default policy
    record(program, member, "100.00", external_id="p1", at=NOW)
    hold_place(member=member, points=80, store="S1", now=NOW)

    # when
    result = record(program, member, "100.00", external_id="r1", kind="return", original="p1", at=NOW)

    # then buying, holding and returning must not pay: the hold is no longer covered
    assert (result.points, result.forgiven) == (-100, 0)
    assert _balance(member) == (0, 0, 0, 80)
    assert ledger_verify() == []


# Defect 7: points whose expiry has passed when they are credited are never spendable.


def _expired_on_arrival(member, earn_points, *, expire_points=None):
    """The member's entries end with the earn and, right after it, the expiry of what is left of its lot."""
    earn, expire = list(Entry.objects.filter(account_id=member.pk).order_by("-pk")[:2])[::-1]
    lot = Lot.objects.get(entry=earn)
    assert (earn.kind, earn.points) == ("earn", earn_points)
    assert (expire.kind, expire.points) == ("expire", -(earn_points if expire_points is None else expire_points))
    assert expire.occurred_at == lot.expires_at == LONG_AGO + relativedelta(months=24)
    assert list(Draw.objects.filter(entry=expire).values_list("lot_id", "points")) == [(lot.pk, -expire.points)]
    assert lot.remaining == 0


def test_a_purchase_older_than_the_expiry_credits_points_that_are_expired_at_once(program, member):
    # when the member's first purchase (the ledger's general path) is older than the programme's expiry
    result = record(program, member, "100.00", external_id="old", at=LONG_AGO, now=NOW)

    # then it earned its points, and they expired with it, in the same transaction; its answer says so
    assert result.points == 100
    assert (result.balance.available, result.balance.pending) == (0, 0)
    assert _balance(member) == (0, 0, 100, 0)
    _expired_on_arrival(member, 100)
    with pytest.raises(InsufficientPoints):
        ledger_debit(member_id=member.pk, kind=Entry.Kind.REDEEM, points=1, occurred_at=NOW, now=NOW)
    # and the expiry job finds nothing more to do
    assert ledger_expire_due(now=NOW) == 0
    assert ledger_verify() == []


def test_an_old_purchase_of_a_member_with_an_account_is_expired_at_once_too(program, member):
    # given an account, so that purchases may take the one-statement path
    record(program, member, "10.00", external_id="new", at=NOW)

    # when
    result = record(program, member, "100.00", external_id="old", at=LONG_AGO, now=NOW)

    # then
    assert result.points == 100
    assert _balance(member) == (10, 0, 110, 0)
    _expired_on_arrival(member, 100)
    with pytest.raises(InsufficientPoints):
        ledger_debit(member_id=member.pk, kind=Entry.Kind.REDEEM, points=11, occurred_at=NOW, now=NOW)
    assert ledger_verify() == []


def test_an_old_purchase_by_member_number_is_expired_at_once_too(program, member):
    # given
    record(program, member, "10.00", external_id="new", at=NOW)
    data = TransactionInput(
        store="S1",
        external_id="old",
        channel="pos",
        kind="purchase",
        occurred_at=LONG_AGO,
        currency="SEK",
        total=Decimal("100.00"),
    )
    rows = _rows()

    # when
    result = transaction_record_by_number(program=program, data=data, member_number=member.member_number, now=NOW)

    # then the one statement declines, writing nothing: the caller takes the general path, which expires them
    assert result is None
    assert _rows() == rows
    record(program, member, "100.00", external_id="old", at=LONG_AGO, now=NOW)
    assert _balance(member) == (10, 0, 110, 0)
    _expired_on_arrival(member, 100)


def _credit(member_id, points, *, at, expires_at, kind=Entry.Kind.EARN, **fields):
    """ledger_credit of points available at once, at `at`."""
    return ledger_credit(
        member_id=member_id,
        kind=kind,
        points=points,
        occurred_at=at,
        available_from=at,
        expires_at=expires_at,
        now=NOW,
        **fields,
    )


def test_the_one_statement_credit_declines_a_credit_already_expired(program, member):
    # given
    record(program, member, "10.00", external_id="new", at=NOW)
    txn = Transaction(
        program=program,
        store="S1",
        external_id="old",
        channel="pos",
        kind="purchase",
        occurred_at=LONG_AGO,
        currency="SEK",
        total=Decimal("100.00"),
        points=100,
        created_at=NOW,
    )
    rows = _rows()

    # when the expiry is exactly now (the expiry job expires at expires_at <= now)
    entry = ledger_credit_new_transaction(
        txn=txn,
        member=member.pk,
        kind=Entry.Kind.EARN,
        points=100,
        occurred_at=LONG_AGO,
        available_from=LONG_AGO,
        expires_at=NOW,
        now=NOW,
    )

    # then
    assert entry is None
    assert txn.pk is None
    assert _rows() == rows


def test_an_expired_credit_first_settles_a_negative_balance_like_the_expiry_job_would(program, member):
    # given a balance of -60 (points spent, then the goods returned)
    record(program, member, "100.00", external_id="p1", at=NOW)
    ledger_debit(member_id=member.pk, kind=Entry.Kind.REDEEM, points=100, occurred_at=NOW, now=NOW)
    record(program, member, "60.00", external_id="r1", kind="return", original="p1", at=NOW)
    assert _balance(member)[0] == -60

    # when 100 points arrive already expired
    _credit(member.pk, 100, at=LONG_AGO, expires_at=LONG_AGO + relativedelta(months=24), kind=Entry.Kind.BONUS)

    # then 60 pay the debt and the other 40 expire
    assert _balance(member) == (0, 0, 140, 0)
    assert _kinds(member)[-2:] == [("bonus", 100), ("expire", -40)]
    assert ledger_verify() == []


def test_a_credit_that_expires_later_is_not_expired(program, member):
    # when
    _credit(member.pk, 100, at=NOW, expires_at=NOW + timedelta(seconds=1), kind=Entry.Kind.BONUS)

    # then
    assert _balance(member) == (100, 0, 100, 0)
    assert _kinds(member) == [("bonus", 100)]


# Defect 8: verify_ledger checks transactions against their entries.


def _purchase(program, member, external_id, points):
    return Transaction.objects.create(
        program=program,
        store="S1",
        external_id=external_id,
        channel="pos",
        member=member,
        kind="purchase",
        occurred_at=NOW,
        currency="SEK",
        total=Decimal(points),
        points=points,
        created_at=NOW,
    )


def _breaches(check):
    return [(b.subject, b.detail) for b in ledger_verify() if b.check == check]


def test_verify_finds_a_purchase_without_its_earn_entry(program, member):
    # given a purchase that says it earned 50 points, with no ledger entry
    ghost = _purchase(program, member, "ghost", 50)

    # when
    found = _breaches("a member's purchase that earned points has exactly one earn entry")

    # then
    assert found == [(str(ghost.pk), "found 0, expected 1")]


def test_verify_finds_a_purchase_credited_twice(program, member):
    # given
    twice = _purchase(program, member, "twice", 30)
    for _ in range(2):
        _credit(member.pk, 30, at=NOW, expires_at=None, transaction=twice)

    # then
    assert _breaches("a member's purchase that earned points has exactly one earn entry") == [
        (str(twice.pk), "found 2, expected 1")
    ]


def test_verify_finds_an_earn_entry_on_another_members_account(program, member):
    # given a purchase of `member` credited to another member
    other = MemberFactory(program=program)
    wrong = _purchase(program, member, "wrong", 30)
    entry = _credit(other.pk, 30, at=NOW, expires_at=None, transaction=wrong)

    # then
    assert _breaches("an entry of a transaction is on its member's account") == [
        (str(entry.pk), f"found {other.pk}, expected {member.pk}")
    ]
    assert wrong.pk not in [
        int(s) for s, _ in _breaches("a member's purchase that earned points has exactly one earn entry")
    ]


def test_verify_finds_a_reversal_larger_than_its_return(program, member):
    # given a return that recorded 10 points taken back, whose entry took 25
    purchase = record(program, member, "100.00", external_id="p1", at=NOW).transaction
    ret = Transaction.objects.create(
        program=program,
        store="S1",
        external_id="r1",
        channel="pos",
        member=member,
        kind="return",
        original=purchase,
        occurred_at=NOW,
        currency="SEK",
        total=Decimal("10.00"),
        points=-10,
        created_at=NOW,
    )
    Transaction.objects.filter(pk=purchase.pk).update(returned_total=Decimal("10.00"), points_reversed=10)
    ledger_reverse(
        member_id=member.pk,
        points=25,
        earn_entry_id=Entry.objects.get(transaction=purchase).pk,
        allow_negative=True,
        occurred_at=NOW,
        now=NOW,
        transaction=ret,
    )

    # then
    assert _breaches("a return's entries take back at most the points it recorded") == [
        (str(ret.pk), "found -25, expected -10 to 0")
    ]


@pytest.mark.parametrize("policy", Program.ReturnPolicy.values)
def test_verify_passes_returns_reversed_whole_in_part_or_not_at_all(program, member, policy):
    # given returns after the points were spent, under either policy, and an anonymous purchase
    program.return_policy = policy
    program.save(update_fields=["return_policy"])
    record(program, member, "100.00", external_id="p1", at=NOW)
    ledger_debit(member_id=member.pk, kind=Entry.Kind.REDEEM, points=70, occurred_at=NOW, now=NOW)
    record(program, member, "50.00", external_id="r1", kind="return", original="p1", at=NOW)
    record(program, member, "50.00", external_id="r2", kind="return", original="p1", at=NOW)
    record(program, None, "20.00", external_id="anon", at=NOW)
    record(program, member, "0.50", external_id="nothing", at=NOW)

    # then
    assert ledger_verify() == []


def test_verify_ledger_reports_transaction_breaches_readably(program, member, capsys):
    # given
    ghost = _purchase(program, member, "ghost", 50)

    # when
    with pytest.raises(CommandError, match="ledger broken"):
        call_command("verify_ledger")

    # then
    out = capsys.readouterr().out
    assert "a member's purchase that earned points has exactly one earn entry: 1 breach(es)" in out
    assert f"subject {ghost.pk}: found 0, expected 1" in out


# Defect 12: staff adjust points from the member admin, also for a member whose account is not opened yet.

MEMBERS = "/admin/members/member/"
ACCOUNTS = "/admin/loyalty/account/"


@pytest.fixture
def staff(db, client):
    user = get_user_model().objects.create_superuser("staff", "staff@example.com", None)
    client.force_login(user)
    return client


def test_staff_give_points_to_a_member_enrolled_a_moment_ago(staff, program):
    # given a member with no ledger account yet
    member = MemberFactory(program=program)
    assert not Account.objects.filter(pk=member.pk).exists()

    # when staff pick the action, then fill in its form
    form = staff.post(MEMBERS, {"action": "adjust_points", "_selected_action": [member.pk]})
    done = staff.post(
        MEMBERS,
        {
            "action": "adjust_points",
            "_selected_action": [member.pk],
            "apply": "1",
            "points": "250",
            "reason": "welcome gift",
        },
        follow=True,
    )

    # then
    assert form.status_code == 200
    assert [account.member for account in form.context["accounts"]] == [member]
    assert done.status_code == 200
    assert "Adjusted 1 account(s) by +250 points." in [str(m) for m in done.context["messages"]]
    assert _balance(member) == (250, 0, 250, 0)
    entry = Entry.objects.get(account_id=member.pk)
    assert (entry.kind, entry.points, entry.reason, entry.staff_user.username) == (
        "adjust",
        250,
        "welcome gift",
        "staff",
    )
    assert ledger_verify() == []


def test_a_member_admin_adjustment_without_a_reason_changes_nothing(staff, program):
    # given
    member = MemberFactory(program=program)

    # when
    response = staff.post(
        MEMBERS,
        {"action": "adjust_points", "_selected_action": [member.pk], "apply": "1", "points": "250", "reason": ""},
    )

    # then the form comes back with its error, and no account was opened
    assert response.status_code == 200
    assert "reason" in response.context["form"].errors
    assert not Account.objects.filter(pk=member.pk).exists()
    assert not Entry.objects.exists()


def test_a_member_admin_adjustment_is_all_or_nothing(staff, program):
    # given one member with points and one without
    rich, poor = MemberFactory(program=program), MemberFactory(program=program)
    points_adjust(member=rich, points=100, reason="seed", now=NOW)
    entries = Entry.objects.count()

    # when staff take 50 from both
    done = staff.post(
        MEMBERS,
        {
            "action": "adjust_points",
            "_selected_action": [rich.pk, poor.pk],
            "apply": "1",
            "points": "-50",
            "reason": "correction",
        },
        follow=True,
    )

    # then
    assert any("Nothing was adjusted" in str(m) for m in done.context["messages"])
    assert _balance(rich)[0] == 100
    assert not Account.objects.filter(pk=poor.pk).exists()
    assert Entry.objects.count() == entries


def test_the_account_admin_still_adjusts_points(staff, program):
    # given
    member = MemberFactory(program=program)
    points_adjust(member=member, points=100, reason="seed", now=NOW)

    # when
    staff.post(
        ACCOUNTS,
        {
            "action": "adjust_points",
            "_selected_action": [member.pk],
            "apply": "1",
            "points": "-30",
            "reason": "correction",
        },
    )

    # then
    assert _balance(member)[0] == 70
    assert _kinds(member) == [("adjust", 100), ("adjust", -30)]


def test_staff_without_the_adjust_permission_are_not_offered_the_action(client, program):
    # given a staff user who may look at and change members, but not write ledger entries
    from django.contrib.auth.models import Permission

    user = get_user_model().objects.create_user("clerk", "clerk@example.com", None, is_staff=True)
    user.user_permissions.set(Permission.objects.filter(codename__in=["view_member", "change_member"]))
    client.force_login(user)
    member = MemberFactory(program=program)

    # when
    page = client.get(MEMBERS)
    client.post(
        MEMBERS,
        {"action": "adjust_points", "_selected_action": [member.pk], "apply": "1", "points": "250", "reason": "x"},
    )

    # then
    assert page.status_code == 200
    assert b"adjust_points" not in page.content
    assert not Account.objects.filter(pk=member.pk).exists()


@pytest.mark.parametrize("callers", ["on", "off"])
def test_verify_leaves_the_callers_transaction_its_planner_setting(program, member, callers):
    # given: verify_ledger turns nested-loop joins off for its own checks, in a caller's transaction set either way
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT set_config('enable_nestloop', %s, true)", [callers])
        # when
        ledger_verify()
        # then
        cursor.execute("SHOW enable_nestloop")
        assert cursor.fetchone()[0] == callers
