"""Custom events: actions other than purchases (profile completed, product review, survey answered) that give the
points their event type sets, at most a number of times per member and period."""

import zoneinfo
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from dateutil.relativedelta import relativedelta
from django.db import IntegrityError, transaction
from django.utils import timezone

from core.errors import Conflict, MemberNotActive, Unprocessable
from core.models import ApiClient, Program
from loyalty import ledger, tiers
from loyalty.earning import earning_for_purchase
from loyalty.event_models import EventType, MemberEvent
from loyalty.models import Entry
from loyalty.rule_models import Period
from loyalty.rules import period_start_at
from loyalty.transactions import CLOCK_SKEW
from members.models import Member

_PERIOD_LENGTH = {
    Period.DAY: relativedelta(days=1),
    Period.WEEK: relativedelta(weeks=1),
    Period.MONTH: relativedelta(months=1),
    Period.YEAR: relativedelta(years=1),
}


@dataclass(frozen=True)
class EventResult:
    event: MemberEvent
    created: bool
    balance: ledger.Balance

    @property
    def points(self) -> int:
        return self.event.points


class EventMismatch(Conflict):
    code, title = "event_mismatch", "Another event with this external_id exists"


def event_window(*, program: Program, period: str, occurred_at: datetime) -> tuple[datetime | None, datetime | None]:
    """The [start, end) of the limit period that holds `occurred_at`, in the programme's time zone; (None, None) for
    a limit over the member's whole life."""
    start = period_start_at(period, occurred_at, zoneinfo.ZoneInfo(program.timezone))
    return (None, None) if start is None else (start, start + _PERIOD_LENGTH[period])


def event_record(
    *,
    program: Program,
    member: Member,
    event_code: str,
    external_id: str,
    occurred_at: datetime,
    attributes: dict,
    api_client: ApiClient | None = None,
    now: datetime | None = None,
) -> EventResult:
    """Record that the member did something and give the event type's points. Idempotent on external_id: a repeat
    returns the first result (created=False), another event under the same id is an EventMismatch (409). Over the
    member's limit the event is still recorded, with 0 points and outcome limit_reached. The limit is counted under
    the member's account lock, so concurrent events never exceed it."""
    now = now or timezone.now()
    if (existing := _existing(program, external_id)) is not None:
        return _replay(existing, member=member, event_code=event_code, occurred_at=occurred_at, attributes=attributes)
    if occurred_at > now + CLOCK_SKEW:
        raise Unprocessable(
            "occurred_at lies in the future.", code="occurred_in_future", errors={"occurred_at": ["In the future."]}
        )
    if member.status != Member.Status.ACTIVE:
        raise MemberNotActive(f"Member {member.member_number} is {member.status}.")
    event_type = EventType.objects.filter(program=program, code=event_code).first()
    if event_type is None:
        raise Unprocessable(
            f"The programme has no event type '{event_code}'.",
            code="unknown_event_type",
            errors={"event": [f"No event type '{event_code}'."]},
        )
    if not event_type.active:
        raise Unprocessable(
            f"The event type '{event_code}' is retired and gives no points.",
            code="event_type_inactive",
            errors={"event": [f"The event type '{event_code}' is not active."]},
        )
    try:
        with transaction.atomic():
            return _record(program, member, event_type, external_id, occurred_at, attributes, api_client, now)
    except IntegrityError:
        # A concurrent request with the same external_id committed first; the unique index decided.
        if (existing := _existing(program, external_id)) is None:
            raise
        return _replay(existing, member=member, event_code=event_code, occurred_at=occurred_at, attributes=attributes)


def _record(program, member, event_type, external_id, occurred_at, attributes, api_client, now) -> EventResult:
    # The account lock serialises the member's events (and purchases), so the count below cannot be raced.
    balance = ledger.ledger_lock(member.pk)
    awarded = True
    if event_type.limit_count is not None:
        start, end = event_window(program=program, period=event_type.limit_period, occurred_at=occurred_at)
        used = MemberEvent.objects.filter(member=member, event_type=event_type, outcome=MemberEvent.Outcome.AWARDED)
        if start is not None:
            used = used.filter(occurred_at__gte=start, occurred_at__lt=end)
        awarded = used.count() < event_type.limit_count
    event = MemberEvent.objects.create(
        program=program,
        member=member,
        event_type=event_type,
        external_id=external_id,
        occurred_at=occurred_at,
        attributes=attributes,
        points=event_type.points if awarded else 0,
        qualifying=awarded and event_type.qualifying,
        outcome=MemberEvent.Outcome.AWARDED if awarded else MemberEvent.Outcome.LIMIT_REACHED,
        api_client=api_client,
        created_at=now,
    )
    if awarded:
        # Event points live like a purchase's: the same pending period and expiry, counted from the event.
        earning = earning_for_purchase(program=program, total=Decimal(0), occurred_at=occurred_at)
        event.entry = ledger.ledger_credit(
            member_id=member.pk,
            kind=Entry.Kind.BONUS,
            points=event.points,
            occurred_at=occurred_at,
            available_from=earning.available_from,
            expires_at=earning.expires_at,
            now=now,
            api_client=api_client,
            reason=f"Event: {event_type.name}"[:500],
        )
        MemberEvent.objects.filter(pk=event.pk).update(entry=event.entry)
        balance = ledger.Balance.after(event.entry)
        if event.qualifying:
            tiers.tier_on_event(program=program, member=member, points=event.points, occurred_at=occurred_at, now=now)
    return EventResult(event=event, created=True, balance=balance)


def _existing(program: Program, external_id: str) -> MemberEvent | None:
    return (
        MemberEvent.objects.select_related("event_type", "entry")
        .filter(program=program, external_id=external_id)
        .first()
    )


def _replay(existing: MemberEvent, *, member, event_code, occurred_at, attributes) -> EventResult:
    """The first result of an event sent again; another event under its external_id is a conflict."""
    same = (
        existing.member_id == member.pk
        and existing.event_type.code == event_code
        and existing.occurred_at == occurred_at
        and existing.attributes == attributes
    )
    if not same:
        raise EventMismatch(f"Event {existing.external_id} was already sent, with other content.")
    if existing.entry is not None:
        balance = ledger.Balance.after(existing.entry)
    else:
        balance = ledger.ledger_balance(member_id=existing.member_id)
    return EventResult(event=existing, created=False, balance=balance)
