"""Many tills at once, on real threads and real PostgreSQL connections: row locks and unique indexes, not luck, keep
every purchase earning once, every balance at or above zero and every return within its purchase."""

from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from dateutil.relativedelta import relativedelta

from core.errors import InsufficientPoints, Unprocessable
from loyalty.ledger import ledger_debit, ledger_expire_due, ledger_mature_due
from loyalty.models import Account, Entry, Lot, Transaction
from loyalty.transactions import TransactionInput, transaction_record, transaction_record_by_number
from loyalty.verify import ledger_verify
from tests.factories import MemberFactory
from tests.threads import at_once

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
THREADS = 16


def _purchase(member, total, *, external_id, at=NOW):
    return TransactionInput(
        store="S1",
        external_id=external_id,
        channel="pos",
        kind="purchase",
        occurred_at=at,
        currency="SEK",
        total=Decimal(total),
        member=member,
    )


def _return(total, *, external_id, original, at=NOW):
    return TransactionInput(
        store="S1",
        external_id=external_id,
        channel="pos",
        kind="return",
        occurred_at=at,
        currency="SEK",
        total=Decimal(total),
        original_external_id=original,
    )


def _balance(member):
    return Account.objects.values_list("available", "pending", "lifetime_earned").get(pk=member.pk)


def _unexpected(outcomes, *allowed):
    return [o for o in outcomes if isinstance(o, Exception) and not isinstance(o, allowed)]


def test_the_same_purchase_sent_by_many_threads_at_once_earns_once(transactional_db, program):
    # given
    member = MemberFactory()
    data = _purchase(member, "250.00", external_id="r1")

    # when
    outcomes = at_once(THREADS, lambda i: transaction_record(program=program, data=data, now=NOW))

    # then one call recorded it; every caller got the same answer
    assert _unexpected(outcomes) == []
    assert Counter(o.created for o in outcomes) == {True: 1, False: THREADS - 1}
    assert {(o.transaction.pk, o.points, o.pending, o.balance) for o in outcomes} == {
        (outcomes[0].transaction.pk, 250, 0, outcomes[0].balance)
    }
    assert (outcomes[0].balance.available, outcomes[0].balance.pending) == (250, 0)
    assert Transaction.objects.count() == 1
    assert Entry.objects.filter(kind=Entry.Kind.EARN).count() == 1
    assert Lot.objects.count() == 1
    assert _balance(member) == (250, 0, 250)
    assert ledger_verify() == []


def test_purchases_by_member_number_from_many_threads_earn_once_each(transactional_db, program):
    # given: a member with an account, so that a till's purchase by number is one statement
    # (transaction_record_by_number); half the threads send one purchase, the others one each
    member = MemberFactory()
    transaction_record(program=program, data=_purchase(member, "10.00", external_id="open"), now=NOW)

    def till(i):
        """As TransactionApi.post: the one statement by number, else the general way with the member read."""
        data = replace(_purchase(member, "250.00", external_id="same" if i % 2 else f"own-{i}"), member=None)
        found = transaction_record_by_number(program=program, data=data, member_number=member.member_number, now=NOW)
        return found or transaction_record(program=program, data=replace(data, member=member), now=NOW)

    # when
    outcomes = at_once(THREADS, till)

    # then the shared purchase was recorded once and every copy answered with it; every other one counted
    assert _unexpected(outcomes) == []
    same = [o for i, o in enumerate(outcomes) if i % 2]
    assert Counter(o.created for o in same) == {True: 1, False: THREADS // 2 - 1}
    assert len({(o.transaction.pk, o.points) for o in same}) == 1
    assert all(o.created and o.known_member_number for i, o in enumerate(outcomes) if not i % 2)  # by number
    assert Transaction.objects.count() == 1 + 1 + THREADS // 2
    expected = 10 + 250 * (1 + THREADS // 2)
    assert _balance(member) == (expected, 0, expected)
    assert len(set(Entry.objects.values_list("available_after", flat=True))) == 2 + THREADS // 2
    assert ledger_verify() == []


def test_different_purchases_of_one_member_at_once_all_count(transactional_db, program):
    # given
    member = MemberFactory()

    # when
    outcomes = at_once(
        THREADS,
        lambda i: transaction_record(
            program=program, data=_purchase(member, f"{10 + i}.00", external_id=f"r{i}"), now=NOW
        ),
    )

    # then no update was lost
    assert _unexpected(outcomes) == []
    expected = sum(10 + i for i in range(THREADS))
    assert _balance(member) == (expected, 0, expected)
    # The balances after each entry form one serial history: every running total is distinct.
    assert len(set(Entry.objects.values_list("available_after", flat=True))) == THREADS
    assert ledger_verify() == []


def test_many_spends_at_once_never_take_the_balance_below_zero(transactional_db, program):
    # given 100 points, and threads that each want 15
    member = MemberFactory()
    transaction_record(program=program, data=_purchase(member, "100.00", external_id="r1"), now=NOW)

    # when
    outcomes = at_once(
        THREADS,
        lambda i: ledger_debit(member_id=member.pk, kind=Entry.Kind.REDEEM, points=15, occurred_at=NOW, now=NOW),
    )

    # then exactly as many succeed as the balance allowed; the rest are refused
    assert _unexpected(outcomes, InsufficientPoints) == []
    spent = [o for o in outcomes if isinstance(o, Entry)]
    refused = [o for o in outcomes if isinstance(o, InsufficientPoints)]
    assert (len(spent), len(refused)) == (6, THREADS - 6)
    assert _balance(member) == (10, 0, 100)
    assert Entry.objects.filter(kind=Entry.Kind.REDEEM).count() == 6
    assert sorted(e.available_after for e in spent) == [10, 25, 40, 55, 70, 85]
    assert Lot.objects.get().remaining == 10
    assert ledger_verify() == []


def test_spends_of_different_sizes_at_once_use_up_no_more_than_there_is(transactional_db, program):
    # given
    member = MemberFactory()
    transaction_record(program=program, data=_purchase(member, "100.00", external_id="r1"), now=NOW)
    sizes = [1, 3, 7, 9, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53]

    # when
    outcomes = at_once(
        len(sizes),
        lambda i: ledger_debit(member_id=member.pk, kind=Entry.Kind.REDEEM, points=sizes[i], occurred_at=NOW, now=NOW),
    )

    # then what was spent is what left the balance, and every refusal was right when it was made
    assert _unexpected(outcomes, InsufficientPoints) == []
    spent = sum(sizes[i] for i, o in enumerate(outcomes) if isinstance(o, Entry))
    available = _balance(member)[0]
    assert available == 100 - spent >= 0
    for i, outcome in enumerate(outcomes):
        if isinstance(outcome, InsufficientPoints):
            assert outcome.extra["available"] < sizes[i]
            assert outcome.extra["available"] >= available
    assert ledger_verify() == []


def test_concurrent_returns_of_one_purchase_never_reverse_more_than_it_earned(transactional_db, program):
    # given a purchase of 100.00 and sixteen returns of 10.00 each
    member = MemberFactory()
    transaction_record(program=program, data=_purchase(member, "100.00", external_id="r1"), now=NOW)

    # when
    outcomes = at_once(
        THREADS,
        lambda i: transaction_record(
            program=program, data=_return("10.00", external_id=f"ret{i}", original="r1"), now=NOW
        ),
    )

    # then ten fit in the purchase, six are refused
    assert _unexpected(outcomes, Unprocessable) == []
    refused = [o for o in outcomes if isinstance(o, Unprocessable)]
    assert {o.code for o in refused} == {"return_exceeds_purchase"}
    assert len(refused) == THREADS - 10
    assert [o.points for o in outcomes if not isinstance(o, Exception)] == [-10] * 10
    purchase = Transaction.objects.get(external_id="r1")
    assert (purchase.returned_total, purchase.points_reversed) == (Decimal("100.00"), 100)
    assert Transaction.objects.filter(kind=Transaction.Kind.RETURN).count() == 10
    assert _balance(member) == (0, 0, 0)
    assert ledger_verify() == []


def test_the_same_full_return_sent_by_many_threads_at_once_reverses_once(transactional_db, program):
    # given
    member = MemberFactory()
    transaction_record(program=program, data=_purchase(member, "80.00", external_id="r1"), now=NOW)
    data = _return("80.00", external_id="ret1", original="r1")

    # when
    outcomes = at_once(THREADS, lambda i: transaction_record(program=program, data=data, now=NOW))

    # then every caller gets the first result
    assert _unexpected(outcomes) == []
    assert Counter(o.created for o in outcomes) == {True: 1, False: THREADS - 1}
    assert {(o.transaction.pk, o.points) for o in outcomes} == {(outcomes[0].transaction.pk, -80)}
    assert Entry.objects.filter(kind=Entry.Kind.REVERSAL).count() == 1
    assert _balance(member) == (0, 0, 0)
    assert ledger_verify() == []


def test_returns_racing_spends_keep_the_ledger_consistent(transactional_db, program):
    # given a purchase of 100.00 under allow_negative, returned in parts while the member spends
    member = MemberFactory()
    transaction_record(program=program, data=_purchase(member, "100.00", external_id="r1"), now=NOW)

    def work(i):
        if i % 2:
            return transaction_record(
                program=program, data=_return("12.50", external_id=f"ret{i}", original="r1"), now=NOW
            )
        return ledger_debit(member_id=member.pk, kind=Entry.Kind.REDEEM, points=20, occurred_at=NOW, now=NOW)

    # when
    outcomes = at_once(THREADS, work)

    # then all eight returns fit; the balance is what was earned, less spent, less reversed
    assert _unexpected(outcomes, InsufficientPoints) == []
    spends = sum(1 for o in outcomes if isinstance(o, Entry))
    assert Transaction.objects.get(external_id="r1").points_reversed == 100
    assert _balance(member) == (-20 * spends, 0, 0)
    assert ledger_verify() == []


def test_jobs_running_together_and_with_purchases_keep_the_ledger_consistent(transactional_db, program):
    # given four members, each with a pending purchase that is now due to mature and to expire, and one due to mature
    program.pending_days = 14
    program.save(update_fields=["pending_days"])
    members = [MemberFactory() for _ in range(4)]
    long_ago, lately = NOW - relativedelta(months=25), NOW - timedelta(days=20)
    for n, member in enumerate(members):
        transaction_record(
            program=program, data=_purchase(member, "100.00", external_id=f"old{n}", at=long_ago), now=long_ago
        )
        transaction_record(
            program=program, data=_purchase(member, "50.00", external_id=f"late{n}", at=lately), now=lately
        )

    # when maturation and expiry run three times each, alongside new purchases of the same members
    def work(i):
        if i < 3:
            return ("matured", ledger_mature_due(now=NOW, batch_size=2))
        if i < 6:
            return ("expired", ledger_expire_due(now=NOW, batch_size=2))
        member = members[i % 4]
        return (
            "bought",
            transaction_record(program=program, data=_purchase(member, "30.00", external_id=f"new{i}"), now=NOW),
        )

    outcomes = at_once(THREADS, work)

    # then every due lot matured once and expired once, and nothing else moved
    assert _unexpected(outcomes) == []
    assert sum(n for what, n in outcomes if what == "matured") == 8
    assert sum(n for what, n in outcomes if what == "expired") == 4
    assert Entry.objects.filter(kind=Entry.Kind.EXPIRE).count() == 4
    bought = Counter(members[i % 4].pk for i in range(6, THREADS))
    for member in members:
        assert _balance(member)[:2] == (50, 30 * bought[member.pk])
    assert ledger_verify() == []

    # when the jobs run again
    assert (ledger_mature_due(now=NOW), ledger_expire_due(now=NOW)) == (0, 0)

    # then
    assert ledger_verify() == []


@pytest.mark.parametrize("runs", [2, 4])
def test_expiry_runs_at_once_expire_each_lot_once(transactional_db, program, runs):
    # given
    members = [MemberFactory() for _ in range(5)]
    long_ago = NOW - relativedelta(months=25)
    for n, member in enumerate(members):
        for k in range(3):
            transaction_record(
                program=program, data=_purchase(member, "10.00", external_id=f"r{n}-{k}", at=long_ago), now=long_ago
            )

    # when
    outcomes = at_once(runs, lambda i: ledger_expire_due(now=NOW, batch_size=4))

    # then
    assert _unexpected(outcomes) == []
    assert sum(outcomes) == 15
    assert Entry.objects.filter(kind=Entry.Kind.EXPIRE).count() == 15
    assert not Account.objects.exclude(available=0).exists()
    assert ledger_verify() == []
