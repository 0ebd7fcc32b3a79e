"""Point adjustments by staff or systems: a correction is a new ledger entry with a reason and its author."""

from datetime import datetime

from dateutil.relativedelta import relativedelta
from django.utils import timezone

from core.errors import InvalidInput
from core.models import ApiClient
from loyalty import ledger
from loyalty.models import Entry
from members.models import Member

MAX_ADJUSTMENT = 10_000_000


def points_adjust(
    *,
    member: Member,
    points: int,
    reason: str,
    staff_user=None,
    api_client: ApiClient | None = None,
    now: datetime | None = None,
) -> Entry:
    """Add (points > 0, spendable at once, expiring like a purchase made now) or remove (points < 0, from the
    soonest-expiring lots; InsufficientPoints if fewer are available) points. Locks the member's account."""
    now = now or timezone.now()
    reason = (reason or "").strip()
    errors = {}
    if not reason:
        errors["reason"] = ["A reason is required."]
    if not points or abs(points) > MAX_ADJUSTMENT:
        errors["points"] = [f"A whole number other than 0, at most {MAX_ADJUSTMENT:,} either way."]
    if errors:
        raise InvalidInput("The adjustment is not valid.", errors=errors)
    author = {"reason": reason[:500], "staff_user": staff_user, "api_client": api_client}
    if points > 0:
        months = member.program.expiry_months
        return ledger.ledger_credit(
            member_id=member.pk,
            kind=Entry.Kind.ADJUST,
            points=points,
            occurred_at=now,
            available_from=now,
            expires_at=now + relativedelta(months=months) if months else None,
            now=now,
            **author,
        )
    return ledger.ledger_debit(
        member_id=member.pk, kind=Entry.Kind.ADJUST, points=-points, occurred_at=now, now=now, **author
    )
