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
    # One plain statement: read on every till screen, where ORM compilation and a second round trip cost more than
    # the reads. The first row is the account's (kind 0), the others the expiring points (kind 1), soonest first.
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT 0, available, pending, lifetime_earned, held, NULL "
            f"FROM {Account._meta.db_table} WHERE member_id = %s "
            "UNION ALL SELECT * FROM ("
            "SELECT 1, CAST(SUM(remaining) AS BIGINT), 0, 0, 0, expires_at "
            f"FROM {Lot._meta.db_table} WHERE account_id = %s AND remaining > 0 AND expires_at IS NOT NULL "
            "GROUP BY expires_at ORDER BY expires_at LIMIT %s) AS expiring",
            [member.pk, member.pk, expiring_limit],
        )
        rows = cursor.fetchall()
    available, pending, lifetime_earned, held = next((r[1:5] for r in rows if r[0] == 0), (0, 0, 0, 0))
    # SQLite hands back naive UTC datetimes (here as text) from a plain cursor; PostgreSQL aware ones.
    expiring = sorted(
        ({"points": r[1], "expires_at": _aware(r[5])} for r in rows if r[0] == 1), key=lambda e: e["expires_at"]
    )
    return MemberBalance(
        available - held,
        pending,
        lifetime_earned,
        expiring=expiring,
        held=held,
    )


def _aware(at) -> datetime:
    if isinstance(at, str):
        at = datetime.fromisoformat(at)
    return at if at.tzinfo else at.replace(tzinfo=UTC)


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
