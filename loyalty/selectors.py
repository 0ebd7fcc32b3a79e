from dataclasses import dataclass
from datetime import datetime

from django.db.models import QuerySet, Sum

from loyalty.models import Account, Entry, Lot
from members.models import Member


@dataclass(frozen=True)
class MemberBalance:
    available: int
    pending: int
    lifetime_earned: int
    expiring: list[dict]
    held: int = 0  # set aside by open holds (rewards); already counted out of `available`


def balance_get(*, member: Member, expiring_limit: int = 12) -> MemberBalance:
    """The member's balances and the points that will expire, soonest first, grouped by expiry time. `available` is
    what may be spent now: points set aside by open holds are counted out of it (API.md: Points)."""
    account = (
        Account.objects.filter(pk=member.pk).values_list("available", "pending", "lifetime_earned", "held").first()
    )
    available, pending, lifetime_earned, held = account or (0, 0, 0, 0)
    expiring = (
        Lot.objects.filter(account_id=member.pk, remaining__gt=0, expires_at__isnull=False)
        .values("expires_at")
        .annotate(points=Sum("remaining"))
        .order_by("expires_at")[:expiring_limit]
    )
    return MemberBalance(
        available - held,
        pending,
        lifetime_earned,
        expiring=[{"points": row["points"], "expires_at": row["expires_at"]} for row in expiring],
        held=held,
    )


def entry_list(
    *, member: Member, kind: str | None = None, since: datetime | None = None, until: datetime | None = None
) -> QuerySet[Entry]:
    """The member's ledger entries with what caused them; order and page them at the edge."""
    entries = Entry.objects.filter(account_id=member.pk).select_related("transaction", "staff_user", "api_client")
    if kind:
        entries = entries.filter(kind=kind)
    if since:
        entries = entries.filter(occurred_at__gte=since)
    if until:
        entries = entries.filter(occurred_at__lt=until)
    return entries
