"""Lock order across paths, on real threads and real PostgreSQL connections: two paths that lock the same rows must
lock them in the same order (loyalty.ledger's "Lock order"), or PostgreSQL's deadlock detector kills one of them.

Each test forces the dangerous interleaving: one path stops, holding its first locks, until the other has started
and is waiting; a deadlock then surfaces as an error within deadlock_timeout (1 s), which the tests assert away."""

import threading
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.db import transaction
from django.utils import timezone

from loyalty import ledger, tier_setup, tiers
from loyalty.imports import transactions_import
from loyalty.models import Account, Entry, Transaction
from loyalty.tier_models import Tier, TierChange, TierCounter, TierStatus
from loyalty.tier_setup import program_settings_update, tier_create
from loyalty.tiers import tiers_review_due
from loyalty.transactions import TransactionInput, transaction_record
from loyalty.verify import ledger_verify
from tests.factories import MemberFactory
from tests.threads import at_once, until_someone_waits_on_a_lock

AT = datetime(2025, 5, 1, 12, tzinfo=UTC)
# Long enough for the other thread to take its first lock and queue for the next one.
HEAD_START = 0.5


def _threads(*works):
    """Run each work on its own thread, released together; returns what each raised (None if nothing)."""
    return [None if not isinstance(o, Exception) else o for o in at_once(len(works), lambda i: works[i](), timeout=20)]


def _purchase(member, external_id, total):
    return transaction_record(
        program=member.program,
        data=TransactionInput(
            store="S1",
            external_id=external_id,
            channel="pos",
            kind="purchase",
            occurred_at=AT,
            currency="SEK",
            total=Decimal(total),
            member=member,
        ),
        now=AT + timedelta(days=1),
    )


def _row(line, external_id, member, total, **extra):
    row = {
        "store": "S1",
        "external_id": external_id,
        "channel": "pos",
        "member": member.member_number,
        "type": "purchase",
        "original_external_id": "",
        "occurred_at": (AT + timedelta(hours=line)).isoformat(),
        "currency": "SEK",
        "total": str(total),
    }
    row.update(extra)
    return line, row


@pytest.fixture
def pause_after_import_credits(monkeypatch):
    """Stop an import chunk right after its purchases' credits (their accounts locked), until `gate` opens and the
    other thread has had its head start; `gate` is a Barrier the other thread passes too."""
    gate = threading.Barrier(2)
    credit_rows = ledger.ledger_credit_rows

    def credit_then_wait(**kwargs):
        entry_ids = credit_rows(**kwargs)
        gate.wait(timeout=10)
        time.sleep(HEAD_START)
        return entry_ids

    monkeypatch.setattr(ledger, "ledger_credit_rows", credit_then_wait)
    return gate


def test_an_import_chunk_with_a_return_and_the_expiry_job_do_not_deadlock(
    transactional_db, program, pause_after_import_credits
):
    # given a member with a purchase the file returns, and a second member (higher key) the file credits; both
    # have points the expiry job will expire, so it locks both accounts, lower key first
    first, second = MemberFactory(program=program), MemberFactory(program=program)
    assert first.pk < second.pk
    _purchase(first, "P1", 300)
    _purchase(second, "P2", 200)
    rows = [_row(1, "I1", second, 100), _row(2, "R1", first, 100, type="return", original_external_id="P1")]

    def run_import():
        transactions_import(program=program, rows=rows, writers=1)  # one lane: the orders are within a chunk

    def run_expiry():
        pause_after_import_credits.wait(timeout=10)  # the chunk holds the second account now
        ledger.ledger_expire_due(now=AT + timedelta(days=3650))

    # when
    errors = _threads(run_import, run_expiry)
    # then neither was chosen as a deadlock victim, and both did their work
    assert errors == [None, None]
    assert Transaction.objects.filter(external_id__in=["I1", "R1"]).count() == 2
    assert Account.objects.filter(pk__in=[first.pk, second.pk], available=0, pending=0).count() == 2
    assert ledger_verify() == []


def test_an_import_chunk_undoing_a_referral_and_the_expiry_job_do_not_deadlock(
    transactional_db, program, pause_after_import_credits
):
    # given a referrer (lowest key) rewarded for a referee's purchase that the file returns in full, in a chunk that
    # also credits a third member; everyone has points the expiry job will expire, so it locks all three accounts
    referrer, referee = _referrer_and_referee(program)
    third = MemberFactory(program=program)
    assert referrer.pk < referee.pk < third.pk
    _purchase(referee, "P1", 300)
    _purchase(third, "P2", 200)
    rows = [_row(1, "I1", third, 100), _row(2, "R1", referee, 300, type="return", original_external_id="P1")]

    def run_import():
        transactions_import(program=program, rows=rows, writers=1)  # one lane: the orders are within a chunk

    def run_expiry():
        pause_after_import_credits.wait(timeout=10)  # the chunk holds its accounts now
        ledger.ledger_expire_due(now=AT + timedelta(days=3650))

    # when
    errors = _threads(run_import, run_expiry)
    # then neither was a deadlock victim, and the referral was undone
    assert errors == [None, None]
    assert Transaction.objects.get(external_id="P1").referral.undone_by.external_id == "R1"
    assert ledger_verify() == []


def test_an_import_chunk_returning_a_purchase_and_a_live_return_of_it_do_not_deadlock(
    transactional_db, program, pause_after_import_credits
):
    # given a purchase of 300 that the file returns in part, in a chunk that also credits the same member, while a
    # till returns another part of it
    member = MemberFactory(program=program)
    _purchase(member, "P1", 300)
    rows = [_row(1, "I1", member, 100), _row(2, "R1", member, 100, type="return", original_external_id="P1")]

    def run_import():
        transactions_import(program=program, rows=rows, writers=1)  # one lane: the orders are within a chunk

    def run_live_return():
        pause_after_import_credits.wait(timeout=10)  # the chunk holds the member's account now
        transaction_record(
            program=program,
            data=TransactionInput(
                store="S1",
                external_id="R2",
                channel="pos",
                kind="return",
                occurred_at=AT + timedelta(hours=3),
                currency="SEK",
                total=Decimal(100),
                original_external_id="P1",
            ),
            now=AT + timedelta(days=1),
        )

    # when
    errors = _threads(run_import, run_live_return)
    # then both returns are recorded, each reversing its share once
    assert errors == [None, None]
    purchase = Transaction.objects.get(external_id="P1")
    assert (purchase.returned_total, purchase.points_reversed) == (Decimal(200), 200)
    assert Entry.objects.filter(account_id=member.pk, kind=Entry.Kind.REVERSAL).count() == 2
    assert ledger_verify() == []


def test_a_late_purchase_in_the_grace_days_racing_the_review_keeps_the_tier(transactional_db, program, monkeypatch):
    # given a Gold member due for review, whose window alone no longer supports Gold; a till sends a purchase made in
    # the grace days (which count for the review) just as the review runs
    program_settings_update(program=program, tier_grace_days=14)
    tier_create(program=program, code="silver", name_en="Silver", rank=1, threshold=Decimal(1000))
    gold = tier_create(program=program, code="gold", name_en="Gold", rank=2, threshold=Decimal(5000))
    member = MemberFactory(program=program, enrolled_at=AT - timedelta(days=400))
    _purchase(member, "P1", 5000)
    review_at = TierStatus.objects.get(member=member).review_at
    review_now = review_at + timedelta(days=14)
    gate = threading.Barrier(2)
    on_transaction = tiers.tier_on_transaction

    def count_then_wait(**kwargs):
        change = on_transaction(**kwargs)
        gate.wait(timeout=10)  # the purchase's counter is written, not yet committed
        time.sleep(HEAD_START)
        return change

    monkeypatch.setattr(tiers, "tier_on_transaction", count_then_wait)

    def run_purchase():
        transaction_record(
            program=program,
            data=TransactionInput(
                store="S1",
                external_id="P2",
                channel="pos",
                kind="purchase",
                occurred_at=review_at + timedelta(days=3),
                currency="SEK",
                total=Decimal(5000),
                member=member,
            ),
            now=review_now,
        )

    def run_review():
        gate.wait(timeout=10)
        tiers_review_due(now=review_now)

    # when
    errors = _threads(run_purchase, run_review)
    # then the review did not decide on a window missing the purchase: Gold is kept, now and at a rerun
    assert errors == [None, None]
    assert TierStatus.objects.get(member=member).tier_id == gold.pk
    tiers_review_due(now=review_now)
    assert TierStatus.objects.get(member=member).tier_id == gold.pk
    assert not TierChange.objects.filter(member=member, reason=TierChange.Reason.DOWNGRADE).exists()


def test_a_tier_change_moving_members_up_and_the_review_do_not_deadlock(transactional_db, program, monkeypatch):
    # given: a member in Silver, due for review, with 250 points this month: the review moves them down (a history
    # row, which refers to the programme), and Gold lowered to 200 moves them up
    now = timezone.now()
    for rank, (code, threshold) in enumerate([("base", 0), ("silver", 100), ("gold", 300)]):
        tier_create(program=program, code=code, name_en=code, rank=rank, threshold=Decimal(threshold), now=now)
    program.refresh_from_db()
    member = MemberFactory(program=program)
    TierStatus.objects.create(
        member=member,
        program=program,
        tier=Tier.objects.get(code="silver"),
        since=now - timedelta(days=400),
        review_at=now - timedelta(days=40),
        updated_at=now,
    )
    TierCounter.objects.create(member=member, period=now.date().replace(day=1), points=250, spend_cents=0, purchases=1)
    paused, go = threading.Event(), threading.Event()
    move_up = tier_setup.members_move_up

    def move_up_when_released(**kwargs):
        paused.set()  # the change holds the programme row now
        go.wait(timeout=10)
        return move_up(**kwargs)

    monkeypatch.setattr(tier_setup, "members_move_up", move_up_when_released)

    def lower_gold():
        tier_setup.tier_update(tier=Tier.objects.get(code="gold"), threshold=Decimal(200))

    def review():
        paused.wait(timeout=10)
        tiers_review_due(now=now, workers=1)

    def release():  # once the review waits on a lock, or has finished
        paused.wait(timeout=10)
        until_someone_waits_on_a_lock(timeout=5)
        go.set()

    # when
    errors = _threads(lower_gold, review, release)
    # then
    assert errors == [None, None, None]
    assert TierStatus.objects.get(member=member).tier.code == "gold"


def _members_in_distinct_slices(program, count: int) -> list:
    found, numbers = [], set()
    while len(found) < count:
        member = MemberFactory(program=program)
        if member.pk % 16 not in numbers:
            numbers.add(member.pk % 16)
            found.append(member)
    return found


@pytest.mark.parametrize("overlap", ["the same members in other orders", "one budget's slices"])
def test_batches_sent_with_idempotency_keys_at_once_do_not_deadlock(transactional_db, program, make_client, overlap):
    # given two batches, each stopped after its first item until the other has recorded its first too: either
    # naming the same two members in opposite orders (their accounts), or four members whose first purchases fit
    # their slices of a budget and whose second purchases do not (every slice)
    from loyalty import api as loyalty_api
    from loyalty.rule_services import earning_rule_create
    from tests.clients import APIClient
    from tests.test_transactions_api import purchase

    if overlap == "one budget's slices":
        earning_rule_create(program=program, code="promo", name="Promo", benefit="per_unit", value=10, budget=1600)
        a1, b1, a2, b2 = _members_in_distinct_slices(program, 4)
    else:
        a1, a2 = MemberFactory(program=program), MemberFactory(program=program)
        b1, b2 = a2, a1
    barrier, record = threading.Barrier(2), loyalty_api._record

    def record_then_meet(client, data):
        result = record(client, data)
        if data.external_id.endswith("-1"):
            barrier.wait(timeout=HEAD_START * 6)
        return result

    _, raw = make_client()
    statuses = {}

    def send(tag, first, second):
        def item(member, n, units):
            line = {"sku": "X", "category": "c", "quantity": str(units), "unit_price": "1.00", "amount": f"{units}.00"}
            return purchase(member, external_id=f"{tag}-{n}", total=f"{units}.00", lines=[line])

        def work():
            client = APIClient()
            client.credentials(HTTP_AUTHORIZATION=f"Api-Key {raw}")
            response = client.post(
                "/api/v1/transactions/batch",
                {"transactions": [item(first, 1, 1), item(second, 2, 20)]},
                format="json",
                HTTP_IDEMPOTENCY_KEY=f"batch-{tag}",
            )
            statuses[tag] = [result["status"] for result in response.json()["results"]]

        return work

    loyalty_api._record = record_then_meet
    try:
        # when
        errors = _threads(send("A", a1, a2), send("B", b1, b2))
    finally:
        loyalty_api._record = record
    # then every item was recorded, none a deadlock's victim
    assert errors == [None, None]
    assert statuses == {"A": [201, 201], "B": [201, 201]}
    assert ledger_verify() == []


def test_an_account_opened_by_a_till_while_an_import_chunk_opens_it_keeps_both_credits(
    transactional_db, program, monkeypatch
):
    # given two members without accounts; a till's purchase opens the first one's account and holds it, not yet
    # committed, while an import chunk credits both, so the chunk finds that account missing and waits to open it
    from loyalty.ledger import bulk

    till_member, other = MemberFactory(program=program), MemberFactory(program=program)
    assert not Account.objects.exists()
    worked = []

    class Counted(bulk._Work):
        def __init__(self, *args):
            worked.append(args)
            super().__init__(*args)

    monkeypatch.setattr(bulk, "_Work", Counted)
    opened = threading.Event()

    def run_till():
        with transaction.atomic():
            _purchase(till_member, "T1", 300)
            opened.set()
            # until the import's chunk has probed, found no account and waits on its key
            assert until_someone_waits_on_a_lock()

    def run_import():
        opened.wait(timeout=10)
        rows = [_row(1, "I1", till_member, 100), _row(2, "I2", other, 200)]
        return transactions_import(program=program, rows=rows, writers=1)

    # when
    errors = _threads(run_till, run_import)
    # then the chunk found the account opened by the till, worked its credit out again from the till's balance, and
    # opened the other account itself
    assert errors == [None, None]
    till_account, other_account = Account.objects.get(pk=till_member.pk), Account.objects.get(pk=other.pk)
    till_points = Entry.objects.get(transaction__external_id="T1").points
    import_points = {t: Entry.objects.get(transaction__external_id=t).points for t in ("I1", "I2")}
    assert till_account.available + till_account.pending == till_points + import_points["I1"]
    assert other_account.available + other_account.pending == import_points["I2"]
    assert ledger_verify() == []
    assert len(worked) == 2  # the first working out, and the second without the account the till opened


def test_a_referred_members_first_purchase_and_an_import_chunk_opening_their_account_do_not_deadlock(
    transactional_db, program, monkeypatch
):
    # given a referrer with an account and the member they referred, without one yet; the member's first purchase
    # at a till rewards the referral, so it locks both accounts and stops there, while an import chunk credits both
    # members: it finds the referrer's account and opens the member's
    referrer, referee = _referrer_and_referee(program)
    assert referrer.pk < referee.pk
    _purchase(referrer, "P1", 100)
    assert not Account.objects.filter(pk=referee.pk).exists()
    held = threading.Event()
    till = []
    for name in ("ledger_lock", "ledger_lock_many"):
        monkeypatch.setattr(ledger, name, _pausing(getattr(ledger, name), till, held))

    def run_till():
        till.append(threading.current_thread())
        _purchase(referee, "T1", 300)

    def run_import():
        held.wait(timeout=10)  # the till holds its first account lock now
        rows = [_row(1, "I1", referrer, 100), _row(2, "I2", referee, 200)]
        transactions_import(program=program, rows=rows, writers=1)

    # when
    errors = _threads(run_till, run_import)
    # then neither was a deadlock victim, and every credit and both referral rewards are in the ledger
    assert errors == [None, None]
    assert Entry.objects.filter(transaction__external_id__in=["P1", "T1", "I1", "I2"]).count() == 4
    assert Transaction.objects.get(external_id="T1").referral is not None
    assert ledger_verify() == []


def _pausing(lock, threads: list, held: threading.Event):
    """`lock` (a ledger locking function) that, the first time one of `threads` calls it, sets `held` and keeps its
    locks until another connection waits on a lock (or 10 s have passed) before going on."""

    def locked_then_paused(*args, **kwargs):
        result = lock(*args, **kwargs)
        if threading.current_thread() in threads and not held.is_set():
            held.set()
            until_someone_waits_on_a_lock()
        return result

    return locked_then_paused


def _referrer_and_referee(program):
    """A member and the member they referred, in a programme that rewards referrals (50 and 20 points)."""
    program.referrals_enabled, program.referral_referrer_points, program.referral_referee_points = True, 50, 20
    program.save()
    referrer = MemberFactory(program=program)
    return referrer, MemberFactory(program=program, referral_code=referrer.referral_code)
