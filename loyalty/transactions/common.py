"""What recording a transaction takes and gives (TransactionInput, TransactionResult), and what purchases and
returns share: the unsaved row, its insert that lets the database decide a repeat, and a repeat's first result."""

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal

from django.db import connection

from core.db import insert_params, insert_plan, unsaved
from core.errors import Conflict
from core.models import Program
from loyalty import ledger
from loyalty.models import ON_REPEAT, Entry, Transaction
from members.models import Member

# A till's clock may run a little ahead; beyond this a transaction "in the future" is refused.
CLOCK_SKEW = timedelta(minutes=5)

MAX_POINTS = 2**31 - 1  # what Transaction.points, an integer column, holds


@dataclass(frozen=True)
class TransactionInput:
    store: str
    external_id: str
    channel: str
    kind: str
    occurred_at: datetime
    currency: str
    total: Decimal
    lines: list[dict] = field(default_factory=list)
    member: Member | None = None
    original_external_id: str | None = None
    original_store: str | None = None
    paid_with_points: Decimal = Decimal(0)


@dataclass(frozen=True)
class TransactionResult:
    transaction: Transaction
    created: bool
    points: int  # signed: what this transaction added to the member's points (a return's is negative)
    pending: int
    available_at: datetime | None
    balance: ledger.Balance | None  # right after the transaction; None for anonymous purchases
    forgiven: int = 0  # what a return did not take back, under the available-only return policy
    known_member_number: str | None = None  # for a member not read (transaction_record_by_number)

    @property
    def member_number(self) -> str | None:
        if self.known_member_number is not None:
            return self.known_member_number
        return self.transaction.member.member_number if self.transaction.member_id else None


class TransactionMismatch(Conflict):
    code, title = "transaction_mismatch", "Another transaction with this store and external_id exists"


def points_out_of_range(points: int) -> str:
    return f"The purchase would earn {points} points, more than one transaction can hold ({MAX_POINTS})."


def new_transaction(program, data, api_client, now, **fields) -> Transaction:
    return unsaved(
        Transaction,
        program=program,
        store=data.store,
        external_id=data.external_id,
        channel=data.channel,
        kind=data.kind,
        occurred_at=data.occurred_at,
        currency=data.currency,
        total=data.total,
        lines=data.lines,
        paid_with_points=data.paid_with_points,
        api_client=api_client,
        created_at=now,
        **fields,
    )


def insert_ignoring_conflict(instance) -> int | None:
    """INSERT the unsaved transaction; None when transaction_unique says it was recorded already (ON_REPEAT).
    One round trip, and no check-then-insert race: the database decides."""
    plan, columns = insert_plan(type(instance))
    sql = (
        f"INSERT INTO {instance._meta.db_table} ({columns}) VALUES ({', '.join(['%s'] * len(plan))}) "
        f"{ON_REPEAT} RETURNING id"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, insert_params(instance, plan))
        row = cursor.fetchone()
    return row[0] if row else None


def replay(program: Program, data: TransactionInput) -> TransactionResult:
    """The first result of a transaction sent again. Another transaction under the same key is a conflict."""
    existing = Transaction.objects.get(program=program, store=data.store, external_id=data.external_id)
    same_member = (
        data.member is None
        and data.kind == Transaction.Kind.RETURN
        or existing.member_id == (data.member.pk if data.member else None)
    )
    if not (same_member and existing.kind == data.kind and existing.total == data.total):
        raise TransactionMismatch(
            f"Store {data.store} already sent transaction {data.external_id}, with other content."
        )
    entry = (
        Entry.objects.select_related("lot").filter(transaction=existing).exclude(kind=Entry.Kind.ADJUST).first()
        if existing.member_id
        else None
    )
    forgiven = -existing.points + (entry.points if entry else 0) if existing.kind == Transaction.Kind.RETURN else 0
    return result_of(existing, created=False, entry=entry, forgiven=forgiven)


def result_of(
    txn: Transaction,
    *,
    created: bool,
    entry: Entry | None,
    forgiven: int = 0,
    member_number: str | None = None,
    available_from: datetime | None = None,
) -> TransactionResult:
    """The result of `txn` and its `entry`; an earn entry's points mature at `available_from`, else at its lot's."""
    pending, available_at, balance = 0, None, None
    if entry is not None:
        balance = ledger.Balance.after(entry)
        lot = None
        if entry.kind == Entry.Kind.EARN and (available_from is None or Entry.lot.is_cached(entry)):
            lot = getattr(entry, "lot", None)  # read only where not known: the one statement knows its lot's
        if lot is not None and lot.expires_at is not None and lot.expires_at <= entry.created_at:
            # Points that expired before they arrived were expired at once (ledger_credit): the balance is after that.
            expiry = Entry.objects.filter(kind=Entry.Kind.EXPIRE, draws__lot=lot).first()
            balance = ledger.Balance.after(expiry) if expiry is not None else balance
        if available_from is None and lot is not None:
            available_from = lot.available_from
        if available_from is not None and available_from > entry.created_at:
            pending, available_at = entry.points, available_from
    elif txn.member_id:
        balance = ledger.ledger_balance(member_id=txn.member_id)
    return TransactionResult(
        transaction=txn,
        created=created,
        points=entry.points if entry else 0,
        pending=pending,
        available_at=available_at,
        balance=balance,
        forgiven=forgiven,
        known_member_number=member_number,
    )
