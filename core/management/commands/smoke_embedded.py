"""`manage.py smoke_embedded`: every ledger path once, through the services, on whatever database is configured.

CI runs it on the embedded SQLite default (scripts/test), whose hot paths take portable branches the PostgreSQL test
suite never reaches. It writes a fresh pair of members (smoke-<tag>@example.invalid), a reward and an event type of
its own, so it can run again on the same database; it ends with the ledger check and exits non-zero on any failure."""

import secrets
from datetime import timedelta
from decimal import Decimal

from django.core.management.base import BaseCommand, CommandError
from django.db import connection
from django.utils import timezone

from core.errors import ApplicationError
from core.models import Program
from loyalty.event_models import Referral
from loyalty.event_services import event_type_create
from loyalty.events import event_record
from loyalty.ledger import ledger_balance, ledger_credit, ledger_expire_due, ledger_mature_due
from loyalty.models import Entry, Lot, Transaction
from loyalty.points import points_adjust
from loyalty.selectors import balance_get
from loyalty.transactions import TransactionInput, transaction_record
from loyalty.verify import ledger_verify
from members.services import member_enroll, member_update
from rewards.models import Hold, Redemption, Reward, Voucher
from rewards.services.catalogue import reward_create
from rewards.services.holds import hold_capture, hold_place, hold_release
from rewards.services.redemptions import redemption_cancel, reward_redeem
from rewards.services.vouchers import voucher_consume

PROGRAM_CODE = "DEFAULT"


def _expect(condition: bool, what: str) -> None:
    if not condition:
        raise CommandError(f"smoke_embedded: {what}")


class Command(BaseCommand):
    help = "Exercise enrolment, purchases, returns, rewards, vouchers, holds, events and the ledger jobs, then verify."

    def handle(self, *args, **options):
        program = Program.objects.filter(code=PROGRAM_CODE).first()
        if program is None:
            raise CommandError(f"No programme {PROGRAM_CODE}: run `python manage.py migrate` first.")
        try:
            steps = self._run(program, secrets.token_hex(4))
        except ApplicationError as exc:
            raise CommandError(f"smoke_embedded: a service refused: {exc.detail} {exc.errors or ''}".strip()) from exc
        breaches = ledger_verify()
        if breaches:
            detail = "; ".join(f"{b.check} {b.subject}: {b.detail}" for b in breaches[:10])
            raise CommandError(f"smoke_embedded: the ledger is broken after the smoke run: {detail}")
        self.stdout.write(
            self.style.SUCCESS(f"smoke ok on {connection.vendor}: {steps} steps, ledger verified, no breaches")
        )

    def _run(self, program: Program, tag: str) -> int:
        now = timezone.now()
        store, steps = f"SMOKE-{tag}", 0

        def step(name: str) -> None:
            nonlocal steps
            steps += 1
            self.stdout.write(f"  {steps:2}. {name}")

        step("enrol members: one, one referred at enrolment, one referred later")
        member = member_enroll(program=program, email=f"smoke-{tag}@example.invalid", source="smoke", now=now)
        friend = member_enroll(
            program=program,
            email=f"smoke-{tag}-friend@example.invalid",
            source="smoke",
            referral_code=member.referral_code,
            now=now,
        )
        _expect(friend.referred_by_id == member.pk, "the referral was not attached")
        late = member_enroll(program=program, email=f"smoke-{tag}-late@example.invalid", source="smoke", now=now)
        late = member_update(member=late, source="smoke", referral_code=friend.referral_code, now=now)
        _expect(late.referred_by_id == friend.pk, "the referral code added after enrolment was not attached")

        def record(external_id, kind, total, who, channel, original_external_id=None):
            data = TransactionInput(
                store=store,
                external_id=external_id,
                channel=channel,
                kind=kind,
                occurred_at=now,
                currency=program.currency,
                total=total,
                member=who,
                original_store=store if original_external_id else None,
                original_external_id=original_external_id,
            )
            return transaction_record(program=program, data=data, now=now)

        step("a purchase earns points")
        purchase = record("p1", Transaction.Kind.PURCHASE, Decimal("500.00"), member, Transaction.Channel.POS)
        _expect(purchase.created and purchase.points > 0, f"the purchase earned {purchase.points} points")

        step("the referred member's first purchase rewards the referral")
        first = record("f1", Transaction.Kind.PURCHASE, Decimal("500.00"), friend, Transaction.Channel.WEB)
        _expect(first.created, "the referred member's purchase was not recorded")
        if program.referral_referee_points and Decimal("500.00") >= program.referral_min_purchase:
            _expect(Referral.objects.filter(referee=friend).exists(), "the referral was not rewarded")

        step("a partial return takes some back")
        returned = record(
            "r1", Transaction.Kind.RETURN, Decimal("100.00"), member, Transaction.Channel.POS, original_external_id="p1"
        )
        _expect(returned.points < 0, f"the return changed the points by {returned.points}")

        step("an adjustment adds spendable points")
        points_adjust(member=member, points=1000, reason="smoke_embedded", now=now)
        spendable = ledger_balance(member_id=member.pk).spendable
        _expect(spendable >= 1000, f"{spendable} spendable after the adjustment")

        step("a reward of limited stock is redeemed, then cancelled")
        reward = reward_create(
            program=program,
            code=f"smoke-{tag}",
            kind=Reward.Kind.DISCOUNT,
            points_cost=100,
            name_en="Smoke discount",
            discount_amount=Decimal("10.00"),
            stock=5,
            member_limit=3,
        )
        redemption = reward_redeem(member=member, reward=reward, now=now)
        _expect(
            ledger_balance(member_id=member.pk).spendable == spendable - 100, "the redemption did not spend 100 points"
        )
        _expect(Reward.objects.get(pk=reward.pk).stock == 4, "the redemption did not take an item of stock")
        redemption_cancel(redemption=redemption, now=now)
        _expect(
            Redemption.objects.get(pk=redemption.pk).status == Redemption.Status.CANCELLED, "the cancel did not stick"
        )
        _expect(ledger_balance(member_id=member.pk).spendable == spendable, "the cancel did not refund the points")
        _expect(Reward.objects.get(pk=reward.pk).stock == 5, "the cancel did not put the item back")

        step("a second redemption's voucher is consumed at a till")
        redemption = reward_redeem(member=member, reward=reward, now=now)
        voucher = voucher_consume(
            program=program, code=redemption.voucher.code, store=store, transaction_external_id="p2", now=now
        )
        _expect(voucher.status == Voucher.Status.USED, f"the voucher is {voucher.status} after use")

        step("a hold is placed and captured")
        before = ledger_balance(member_id=member.pk)
        held = hold_place(member=member, points=50, store=store, now=now)
        _expect(held.hold.pk is not None and held.balance.held == before.held + 50, "the hold set nothing aside")
        captured = hold_capture(hold=held.hold, transaction_external_id="p3", points=40, now=now)
        _expect(Hold.objects.get(pk=held.hold.pk).entry_id == captured.hold.entry.pk, "the hold names no entry")
        after = ledger_balance(member_id=member.pk)
        _expect(
            (after.available, after.held) == (before.available - 40, before.held),
            f"after the capture {after}, before {before}",
        )

        step("another hold is placed and released")
        held = hold_place(member=member, points=30, store=store, now=now)
        released = hold_release(hold=held.hold, now=now)
        _expect(released.hold.status == Hold.Status.RELEASED, f"the hold is {released.hold.status}")
        _expect(ledger_balance(member_id=member.pk) == after, "the release did not give the points back")
        again = hold_release(hold=held.hold, now=now)
        _expect(again.balance == after, "a repeated release changed the balance")

        step("an event gives its points")
        event_type = event_type_create(program=program, code=f"smoke-{tag}", name="Smoke event", points=25)
        event = event_record(
            program=program,
            member=member,
            event_code=event_type.code,
            external_id=f"smoke-{tag}",
            occurred_at=now,
            attributes={},
            now=now,
        )
        _expect(event.created, "the event was not recorded")

        step("the jobs mature a pending lot and expire a lapsed one")
        # Credited as of a moment ago: pending until a second ago, then past its expiry, so both jobs have work.
        earlier = now - timedelta(minutes=5)
        credit = ledger_credit(
            member_id=member.pk,
            kind=Entry.Kind.BONUS,
            points=7,
            occurred_at=earlier,
            available_from=now - timedelta(seconds=2),
            expires_at=now - timedelta(seconds=1),
            now=earlier,
            reason="smoke_embedded",
        )
        _expect(ledger_mature_due(now=now) >= 1, "the maturing job matured nothing")
        _expect(ledger_expire_due(now=now) >= 1, "the expiry job expired nothing")
        lot = Lot.objects.get(entry=credit)
        _expect(lot.matured and lot.remaining == 0, f"the lot is matured={lot.matured}, remaining={lot.remaining}")

        step("the balance a till reads, with points held and points expiring")
        held = hold_place(member=member, points=20, store=store, now=now)
        found, balance = balance_get(program=program, member_number=member.member_number)
        ledger = ledger_balance(member_id=member.pk)
        _expect(found.pk == member.pk and found.enrolled_at == member.enrolled_at, "the balance read another member")
        _expect(
            (balance.available, balance.held, balance.pending) == (ledger.spendable, ledger.held, ledger.pending),
            f"the balance reads {balance}, the ledger {ledger}",
        )
        _expect(balance.expiring and balance.expiring[0]["expires_at"].tzinfo, f"expiring: {balance.expiring}")
        hold_release(hold=held.hold, now=now)
        return steps
