from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache

from django.db import connection
from django.db.models import QuerySet

from core.db import columns, instance_from_row, statement_cursor
from core.models import Program
from loyalty.models import Account, Entry, Lot
from members.models import Member
from members.numbers import is_valid_member_number
from members.selectors import member_not_found


@dataclass(frozen=True)
class MemberBalance:
    available: int
    pending: int
    lifetime_earned: int
    expiring: list[dict]
    held: int = 0  # set aside by open holds (rewards); already counted out of `available`


EXPIRING_GROUPS = 12  # the soonest expiry times a balance shows


def balance_get(*, program: Program, member_number: str) -> tuple[Member, MemberBalance]:
    """The programme's member with this number (MemberNotFound if none), their balances and the points that will
    expire, soonest first, grouped by expiry time (the EXPIRING_GROUPS soonest). `available` is what may be spent
    now: points set aside by open holds are counted out of it (API.md: Points)."""
    if not is_valid_member_number(member_number):
        raise member_not_found(member_number)  # as member_get: never sent to the database
    # One plain statement: read on every till screen, where ORM compilation and more round trips cost more than
    # the reads. The first row is the member's with their account's balances (kind 0), the others the expiring
    # points (kind 1), soonest first.
    _, m_select = columns(Member, "m")
    member_table = Member._meta.db_table
    with statement_cursor() as cursor:
        cursor.execute(
            f"SELECT 0, a.available, a.pending, a.lifetime_earned, a.held, NULL, {m_select} FROM {member_table} m "
            f"LEFT JOIN {Account._meta.db_table} a ON a.member_id = m.id "
            "WHERE m.member_number = %s AND m.program_id = %s "
            "UNION ALL SELECT * FROM ("
            f"SELECT 1, CAST(SUM(remaining) AS BIGINT), 0, 0, 0, expires_at, {_no_member()} "
            f"FROM {Lot._meta.db_table} WHERE account_id = "
            f"(SELECT id FROM {member_table} WHERE member_number = %s AND program_id = %s) "
            "AND remaining > 0 AND expires_at IS NOT NULL "
            # The limit is written out: as a parameter, the generic plan had to guess it, and PostgreSQL could plan
            # the statement anew for every read (docs/benchmarks.md, fourth round).
            f"GROUP BY expires_at ORDER BY expires_at LIMIT {EXPIRING_GROUPS}) AS expiring",
            [member_number, program.pk, member_number, program.pk],
        )
        rows = cursor.fetchall()
    first = next((r for r in rows if r[0] == 0), None)
    if first is None:
        raise member_not_found(member_number)
    member = instance_from_row(Member, first[6:])
    available, pending, lifetime_earned, held = (value or 0 for value in first[1:5])  # no account yet: all 0
    # SQLite hands back naive UTC datetimes (here as text) from a plain cursor; PostgreSQL aware ones.
    expiring = sorted(
        ({"points": r[1], "expires_at": _aware(r[5])} for r in rows if r[0] == 1), key=lambda e: e["expires_at"]
    )
    return member, MemberBalance(available - held, pending, lifetime_earned, expiring=expiring, held=held)


@cache
def _no_member() -> str:
    """A member's columns as typed NULLs: in a UNION's subquery an untyped NULL is taken as text."""
    return ", ".join(f"CAST(NULL AS {f.db_type(connection)})" for f in Member._meta.concrete_fields)


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
