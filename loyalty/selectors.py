from dataclasses import dataclass
from datetime import UTC, datetime

from django.db import connection
from django.db.models import QuerySet

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
    # Plain SQL: read on every till screen, and ORM compilation costs more than these two queries.
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT available, pending, lifetime_earned, held FROM {Account._meta.db_table} WHERE member_id = %s",
            [member.pk],
        )
        available, pending, lifetime_earned, held = cursor.fetchone() or (0, 0, 0, 0)
        cursor.execute(
            f"SELECT expires_at, SUM(remaining) FROM {Lot._meta.db_table} "
            "WHERE account_id = %s AND remaining > 0 AND expires_at IS NOT NULL "
            "GROUP BY expires_at ORDER BY expires_at LIMIT %s",
            [member.pk, expiring_limit],
        )
        # SQLite hands back naive UTC datetimes from a plain cursor; PostgreSQL aware ones.
        expiring = [
            {"points": points, "expires_at": at if at.tzinfo else at.replace(tzinfo=UTC)}
            for at, points in cursor.fetchall()
        ]
    return MemberBalance(
        available - held,
        pending,
        lifetime_earned,
        expiring=expiring,
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
