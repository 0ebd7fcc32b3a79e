"""Paying with points at a till: a hold sets points aside, then is captured with the purchase (a redeem entry) or
released; an open hold lapses by itself after the programme's hold_minutes.

A hold's status moves exactly once, from open, by compare-and-set (UPDATE ... WHERE status = 'open'), so capture,
release and lapse racing each other have exactly one winner; the winner then moves the points through the ledger in
the same transaction. Locks: the hold row (by the claim), then the member's account."""

from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db import connection, transaction
from django.utils import timezone

from core.db import batch_statements
from core.errors import InvalidInput, MemberNotActive
from core.models import ApiClient
from loyalty import ledger
from loyalty.models import Entry
from members.models import Member
from rewards.errors import HoldClosed
from rewards.models import Hold

MAX_HOLD_POINTS = 10_000_000


@dataclass(frozen=True)
class HoldResult:
    hold: Hold
    balance: ledger.Balance


def _closed(hold: Hold) -> HoldClosed:
    return HoldClosed(
        f"Hold {hold.pk} was {hold.status} at {hold.closed_at.isoformat()}." if hold.closed_at else "",
        code=f"hold_{hold.status}",
        status_now=hold.status,
    )


def _claim_sql(hold: Hold, assignments: str, params: list, *, unexpired_at: datetime | None = None) -> tuple[str, list]:
    """The compare-and-set UPDATE of an open hold: apply `assignments` (SQL) if it is still open (and, given
    `unexpired_at`, not past its time then)."""
    sql = f"UPDATE {Hold._meta.db_table} SET {assignments} WHERE id = %s AND status = %s"
    params = [*params, hold.pk, Hold.Status.OPEN]
    if unexpired_at is not None:
        sql += " AND expires_at > %s"
        params.append(unexpired_at)
    return sql, params


def _claim(hold: Hold, assignments: str, params: list, *, unexpired_at: datetime | None = None) -> bool:
    """Run _claim_sql's compare-and-set; True if this call won the hold."""
    with connection.cursor() as cursor:
        cursor.execute(*_claim_sql(hold, assignments, params, unexpired_at=unexpired_at))
        return cursor.rowcount == 1


def hold_place(
    *,
    member: Member,
    points: int,
    store: str,
    api_client: ApiClient | None = None,
    now: datetime | None = None,
) -> HoldResult:
    """Set `points` aside for paying at `store`. InsufficientPoints, changing nothing, when fewer are spendable.
    Locks the member's account."""
    now = now or timezone.now()
    store = (store or "").strip()
    errors = {}
    if not 0 < points <= MAX_HOLD_POINTS:
        errors["points"] = [f"A whole number from 1 to {MAX_HOLD_POINTS:,}."]
    if not store:
        errors["store"] = ["This field may not be blank."]
    if errors:
        raise InvalidInput("The hold is not valid.", errors=errors)
    if member.status != Member.Status.ACTIVE:
        raise MemberNotActive(f"Member {member.member_number} is {member.status}.")
    hold = Hold(
        program_id=member.program_id,
        member=member,
        points=points,
        store=store[:64],
        expires_at=now + timedelta(minutes=member.program.hold_minutes),
        created_at=now,
        api_client=api_client,
    )
    # The hold row is written by the very statement that sets its points aside: one round trip, no transaction.
    balance = ledger.ledger_hold(member_id=member.pk, points=points, record=hold)
    return HoldResult(hold, balance)


@transaction.atomic
def hold_capture(
    *, hold: Hold, transaction_external_id: str, points: int | None = None, now: datetime | None = None
) -> HoldResult:
    """Spend the held points (all, or `points` of them; the rest become spendable again) for the purchase
    `transaction_external_id`, as a redeem entry. A repeat for the same purchase returns the same hold; a hold
    already closed otherwise is HoldClosed (hold_captured, hold_released, hold_lapsed), as is an open hold past its
    time. InsufficientPoints, leaving the hold open, if the held points expired or were reversed meanwhile."""
    now = now or timezone.now()
    transaction_external_id = (transaction_external_id or "").strip()
    points = hold.points if points is None else points
    if not transaction_external_id:
        raise InvalidInput("Name the purchase.", errors={"external_id": ["This field may not be blank."]})
    if not 0 < points <= hold.points:
        raise InvalidInput(
            f"Capture from 1 to the {hold.points} points held.", errors={"points": [f"From 1 to {hold.points}."]}
        )
    claimed = _claim(
        hold,
        "status = %s, closed_at = %s, captured_points = %s, transaction_external_id = %s",
        [Hold.Status.CAPTURED, now, points, transaction_external_id],
        unexpired_at=now,
    )
    if not claimed:
        hold.refresh_from_db()
        if (
            hold.status == Hold.Status.CAPTURED
            and hold.transaction_external_id == transaction_external_id
            and hold.captured_points == points
        ):
            return HoldResult(hold, ledger.ledger_balance(member_id=hold.member_id))
        if hold.status == Hold.Status.OPEN:  # past its time; the lapse job will give its points back
            raise HoldClosed(f"Hold {hold.pk} expired at {hold.expires_at.isoformat()}.", code="hold_lapsed")
        raise _closed(hold)
    entry, balance = ledger.ledger_capture(
        member_id=hold.member_id,
        held=hold.points,
        points=points,
        kind=Entry.Kind.REDEEM,
        occurred_at=now,
        now=now,
        reason=f"Paid with points: {hold.store}/{transaction_external_id}"[:500],
        api_client_id=hold.api_client_id,
        link=hold,  # the hold names its entry, written by the same statement
    )
    # What the claim wrote, set here rather than re-read, so the caller's cached member and programme survive.
    hold.status, hold.closed_at, hold.captured_points = Hold.Status.CAPTURED, now, points
    hold.transaction_external_id, hold.entry = transaction_external_id, entry
    return HoldResult(hold, balance)


def hold_release(*, hold: Hold, now: datetime | None = None) -> HoldResult:
    """Give the held points back. Idempotent: releasing a released or lapsed hold changes nothing and returns it;
    a captured hold is HoldClosed (hold_captured)."""
    now = now or timezone.now()
    # Claim and give back in one statement: no transaction, one round trip.
    claim = _claim_sql(hold, "status = %s, closed_at = %s", [Hold.Status.RELEASED, now])
    balance = ledger.ledger_unhold(member_id=hold.member_id, points=hold.points, claim=claim)
    if balance is not None:
        hold.status, hold.closed_at = Hold.Status.RELEASED, now
        return HoldResult(hold, balance)
    hold.refresh_from_db()
    if hold.status == Hold.Status.CAPTURED:
        raise _closed(hold)
    return HoldResult(hold, ledger.ledger_balance(member_id=hold.member_id))


@batch_statements()
def holds_lapse_due(*, now: datetime, batch_size: int = 1000) -> int:
    """Lapse open holds past their time, giving their points back. Returns how many lapsed. Each hold is claimed by
    compare-and-set in its own short transaction, so the job is safe to run twice or concurrently, and a till
    capturing or releasing the same hold at the same moment either wins outright or finds it lapsed."""
    done = 0
    while True:
        due = list(
            Hold.objects.filter(status=Hold.Status.OPEN, expires_at__lte=now)
            .order_by("expires_at", "pk")
            .values_list("pk", "member_id", "points")[:batch_size]
        )
        for pk, member_id, points in due:
            with transaction.atomic():
                if Hold.objects.filter(pk=pk, status=Hold.Status.OPEN, expires_at__lte=now).update(
                    status=Hold.Status.LAPSED, closed_at=now
                ):
                    ledger.ledger_unhold(member_id=member_id, points=points)
                    done += 1
        if len(due) < batch_size:
            return done
