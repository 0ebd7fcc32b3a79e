"""Writing one chunk of checked rows: purchases set-based, their points through ledger_credit_many, returns one by
one through transaction_record."""

import json
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

import psycopg
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from core.db import array_literal, ids_reserve
from core.errors import ApplicationError
from core.models import Program
from loyalty import ledger
from loyalty.earning import earning_for_purchase
from loyalty.imports.report import ImportAborted, ImportReport
from loyalty.imports.rows import Row
from loyalty.models import Entry, Transaction
from loyalty.tier_counts import tier_counts_add
from loyalty.transactions import TransactionInput, transaction_record
from members.models import Member


class Earnings:
    """earning_for_purchase, memoised. It is pure, and costs ~15 µs a call (calendar arithmetic), about half of a
    row's budget. Its points depend on the total alone, and its dates on the day of the purchase and the time
    within that day, which calendar arithmetic carries over unchanged: so one call per distinct total and one per
    distinct day give every row's exact result. A rule that looks at more than these must widen the keys."""

    def __init__(self, program: Program):
        self.program = program
        self.by_total: dict[Decimal, tuple[int, str]] = {}
        self.by_day: dict[tuple, tuple[datetime, datetime | None, datetime]] = {}

    def points(self, total: Decimal, occurred_at: datetime) -> tuple[int, str]:
        """(points, breakdown as JSON in COPY text)."""
        found = self.by_total.get(total)
        if found is None:
            earning = earning_for_purchase(program=self.program, total=total, occurred_at=occurred_at)
            found = (earning.points, copy_text(json.dumps(earning.breakdown)))
            if len(self.by_total) < 100_000:
                self.by_total[total] = found
        return found

    def dates(self, occurred_at: datetime) -> tuple[datetime, datetime | None]:
        """(available_from, expires_at)."""
        key = (occurred_at.date(), occurred_at.tzinfo)  # not the instant: two zones' midnights may coincide
        found = self.by_day.get(key)
        if found is None:
            day = occurred_at.replace(hour=0, minute=0, second=0, microsecond=0)
            earning = earning_for_purchase(program=self.program, total=Decimal(0), occurred_at=day)
            found = self.by_day[key] = (earning.available_from, earning.expires_at, day)
        since = occurred_at - found[2]  # wall-clock time within the day: both share the zone
        return found[0] + since, found[1] + since if found[1] is not None else None


@dataclass
class Prepared:
    """A chunk made ready without the database: purchases as (row, points, breakdown, available_from,
    expires_at), returns as rows."""

    purchases: list[tuple]
    returns: list[Row]
    size: int


def chunk_prepare(rows: list[Row], earnings: Earnings) -> Prepared:
    purchases, returns = [], []
    for row in rows:
        if row.kind == Transaction.Kind.RETURN:
            returns.append(row)
        else:
            purchases.append((row, *earnings.points(row.total, row.occurred_at), *earnings.dates(row.occurred_at)))
    return Prepared(purchases, returns, len(rows))


def members_resolve(program: Program, numbers: set[str]) -> dict[str, tuple[int, str]]:
    """{member number: (id, status)} of the programme's members among `numbers`, in one query."""
    if not numbers:
        return {}
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT member_number, id, status FROM {Member._meta.db_table} "
            "WHERE program_id = %s AND member_number = ANY(%s::text[])",
            # Member numbers are digits only, so a plain array literal needs no quoting; anything else is no number.
            [program.pk, array_literal(n for n in numbers if n.isdigit())],
        )
        return {number: (pk, status) for number, pk, status in cursor.fetchall()}


@transaction.atomic
def chunk_write(*, program: Program, chunk: Prepared, report: ImportReport, skip_invalid: bool) -> None:
    """One chunk, one database transaction: its purchases set-based, then its returns one by one.

    The chunk commits without waiting for its WAL to reach the disk (synchronous_commit off, for this transaction
    only). That is safe here: a crash can lose only the last chunks acknowledged before it, never half a chunk, and
    as the import is idempotent, rerunning the file restores exactly those."""
    now = timezone.now()
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL synchronous_commit = off")
    members = members_resolve(program, {p[0].member for p in chunk.purchases} | {r.member for r in chunk.returns})
    members.pop("", None)
    purchases, seen = [], set()
    for purchase in chunk.purchases:
        row = purchase[0]
        member_id = _member_id(members, row, report, skip_invalid)
        if member_id is False:
            continue
        if (row.store, row.external_id) in seen:  # the file repeats itself: the first row counts
            report.already_present += 1
            continue
        seen.add((row.store, row.external_id))
        purchases.append((member_id, *purchase))
    inserted = _purchases_copy(program, purchases, now)
    if inserted is None:  # some are recorded already: each is skipped on its own
        inserted = _purchases_insert(program, purchases, now)
    report.already_present += len(purchases) - len(inserted)
    report.imported += len(inserted)
    if chunk.returns:
        _lock_for_returns(program, chunk.returns, members, purchases)
    credits = []
    for member_id, row, points, _, available_from, expires_at in purchases:
        txn_id = inserted.get((row.store, row.external_id))
        if txn_id is None or member_id is None or not points:
            continue
        credits.append(
            {
                "member_id": member_id,
                "kind": Entry.Kind.EARN,
                "points": points,
                "occurred_at": row.occurred_at,
                "available_from": available_from,
                "expires_at": expires_at,
                "transaction_id": txn_id,
            }
        )
        report.points_credited += points
    ledger.ledger_credit_many(credits=credits, now=now)
    # Imported purchases qualify for tiers as recorded ones do (before the returns, which take off what they count).
    tier_counts_add(program=program, transaction_ids=list(inserted.values()), now=now)
    if chunk.returns:
        _returns_record(program, chunk.returns, members, report, skip_invalid, now)


def _member_id(members: dict, row: Row, report: ImportReport, skip_invalid: bool) -> int | None | bool:
    """The row's member id, None for an anonymous row, False when the member went away since the check."""
    if not row.member:
        return None
    pk, status = members.get(row.member, (None, None))
    if pk is not None and (status == Member.Status.ACTIVE or row.kind == Transaction.Kind.RETURN):
        return pk
    late_error(
        report, row, "member", f"Member {row.member} is {status}." if pk else f"No member {row.member}.", skip_invalid
    )
    return False


def late_error(report: ImportReport, row: Row, name: str, message: str, skip_invalid: bool) -> None:
    """A row refused after the check passed (a member suspended meanwhile, a return that exceeds its purchase):
    skipped with skip_invalid, otherwise the import stops and this chunk is rolled back."""
    if not skip_invalid:
        raise ImportAborted(
            f"line {row.line}: {name}: {message} The import stopped there; what it imported until then stays "
            "imported, and a rerun skips it.",
            errors={name: [message]},
            line=row.line,
        )
    report.add_error(row.line, name, message)


_TEMP = "import_purchase"
_ESCAPE = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def copy_text(value: str) -> str:
    """`value` as a field of COPY's text format."""
    return value if value.isalnum() else value.translate(_ESCAPE)


def _in_key_order(purchases: list, ids: list[int]) -> list[tuple[int, tuple]]:
    """The purchases with their ids (given in file order), in (store, external_id) order: every import writes a
    chunk's purchases in this one order, so two imports of overlapping files wait for each other's uncommitted
    rows instead of deadlocking (the lock order in loyalty/ledger/__init__.py)."""
    return sorted(zip(ids, purchases, strict=True), key=lambda item: (item[1][1].store, item[1][1].external_id))


def _purchases_copy(program: Program, purchases: list, now: datetime) -> dict | None:
    """COPY the purchases straight into the table, with ids drawn from its sequence up front; returns
    {(store, external_id): id}. About 40% less work for the database than INSERT ... ON CONFLICT through a
    temporary table, which is the fallback: None when the unique index refuses the COPY because one of them is
    recorded already (a rerun, an overlapping file, a concurrent import). The COPY is then undone to its
    savepoint; on a rerun it fails at its first row, so trying first costs little."""
    if not purchases:
        return {}
    table = Transaction._meta.db_table
    ids = ids_reserve(Transaction, len(purchases))  # rising in file order, as one INSERT at a time would give them
    with connection.cursor() as cursor:
        # COPY text built by hand: psycopg's write_row adapts value by value, at several times the cost.
        # original_id and api_client_id are left out: COPY fills them with NULL.
        null, head, middle, tail = (
            "\\N",
            f"\t{program.pk}\t",
            f"\t{copy_text(program.currency)}\t",
            f"\tpurchase\t0\t0\t{now}\n",
        )
        lines_text = []
        for pk, (member_id, row, points, breakdown, _, _) in _in_key_order(purchases, ids):
            # Anonymous purchases are kept for analytics and earn nothing, as in transaction_record.
            lines_text.append(
                f"{pk}{head}{copy_text(row.store)}\t{copy_text(row.external_id)}\t{row.channel}\t"
                f"{null if member_id is None else member_id}\t{row.occurred_at}{middle}{row.total}\t"
                f"{copy_text(json.dumps(row.lines)) if row.lines else '[]'}\t"
                f"{points if member_id else 0}\t{breakdown if member_id else '[]'}{tail}"
            )
        try:
            with (
                transaction.atomic(),
                cursor.copy(
                    f"COPY {table} (id, program_id, store, external_id, channel, member_id, occurred_at, currency, "
                    "total, lines, points, breakdown, kind, returned_total, points_reversed, created_at) FROM STDIN"
                ) as copy,
            ):
                copy.write("".join(lines_text))
        except (IntegrityError, psycopg.IntegrityError):
            return None
    return {(p[1].store, p[1].external_id): pk for p, pk in zip(purchases, ids, strict=True)}


def _purchases_insert(program: Program, purchases: list, now: datetime) -> dict:
    """INSERT ... ON CONFLICT DO NOTHING the purchases through a COPY-filled temporary table; returns
    {(store, external_id): id} of those that were new. The unique index decides, so concurrent imports of the
    same file cannot record a purchase twice."""
    if not purchases:
        return {}
    ids = ids_reserve(Transaction, len(purchases))  # rising in file order; those of repeats are left unused
    with connection.cursor() as cursor:
        # ON COMMIT DROP cleans up after a failed chunk; the explicit DROP lets the next chunk of the same
        # transaction (as in tests, where nothing commits) create it again.
        cursor.execute(
            f"CREATE TEMP TABLE {_TEMP} (id bigint, store text, external_id text, channel text, member_id bigint, "
            "occurred_at timestamptz, total numeric, lines jsonb, points integer, breakdown jsonb) ON COMMIT DROP"
        )
        # COPY text built by hand: psycopg's write_row adapts value by value, at several times the cost.
        null, lines_text = "\\N", []
        for pk, (member_id, row, points, breakdown, _, _) in _in_key_order(purchases, ids):
            # Anonymous purchases are kept for analytics and earn nothing, as in transaction_record.
            lines_text.append(
                f"{pk}\t{copy_text(row.store)}\t{copy_text(row.external_id)}\t{row.channel}\t"
                f"{null if member_id is None else member_id}\t{row.occurred_at}\t{row.total}\t"
                f"{copy_text(json.dumps(row.lines)) if row.lines else '[]'}\t"
                f"{points if member_id else 0}\t{breakdown if member_id else '[]'}\n"
            )
        with cursor.copy(
            f"COPY {_TEMP} (id, store, external_id, channel, member_id, occurred_at, total, lines, points, breakdown) "
            "FROM STDIN"
        ) as copy:
            copy.write("".join(lines_text))
        cursor.execute(
            f"INSERT INTO {Transaction._meta.db_table} (id, program_id, store, external_id, channel, member_id, "
            "kind, original_id, occurred_at, currency, total, lines, points, breakdown, returned_total, "
            "points_reversed, api_client_id, created_at) "
            "SELECT id, %s, store, external_id, channel, member_id, 'purchase', NULL, occurred_at, %s, total, lines, "
            f'points, breakdown, 0, 0, NULL, %s FROM {_TEMP} ORDER BY store COLLATE "C", external_id COLLATE "C" '
            "ON CONFLICT DO NOTHING RETURNING store, external_id, id",
            [program.pk, program.currency, now],
        )
        inserted = {(store, external_id): pk for store, external_id, pk in cursor.fetchall()}
        cursor.execute(f"DROP TABLE {_TEMP}")
    return inserted


def _lock_for_returns(program: Program, returns: list[Row], members: dict, purchases: list) -> None:
    """Take the locks the chunk's returns need before any account lock, in the global order (loyalty.ledger): the
    purchases they return, then every account the chunk writes (referrers' included), each in primary-key order.
    Why: the returns run one by one after the purchases' credits, each locking its purchase and then its account;
    taken there, a purchase row after an account (a till's return of it does the reverse) and accounts out of key
    order (the expiry job, a referral) would deadlock."""
    originals = list(
        Transaction.objects.select_for_update()
        .filter(
            program=program, kind=Transaction.Kind.PURCHASE, external_id__in={r.original_external_id for r in returns}
        )
        .order_by("pk")
        .values_list("member_id", flat=True)
    )
    account_ids = {member_id for member_id in originals if member_id is not None}
    account_ids.update(p[0] for p in purchases if p[0] is not None)
    account_ids.update(pk for pk, _ in (members.get(row.member, (None, None)) for row in returns) if pk is not None)
    # A return that completes its purchase's return takes back the referral that purchase rewarded: the referrer's
    # account too (referrals.referral_on_return).
    referrers = Member.objects.filter(pk__in=account_ids, referred_by__isnull=False).values_list("referred_by_id")
    account_ids.update(pk for (pk,) in referrers)
    ledger.ledger_lock_many(member_ids=account_ids)


def _returns_record(program, returns: list[Row], members: dict, report: ImportReport, skip_invalid, now) -> None:
    # Returns are rare in history, so they take the per-row path with all its checks and locks.
    by_pk = Member.objects.in_bulk([pk for pk, _ in (members.get(row.member, (None, None)) for row in returns) if pk])
    for row in returns:
        member_id = _member_id(members, row, report, skip_invalid)
        if member_id is False:
            continue
        data = TransactionInput(
            store=row.store,
            external_id=row.external_id,
            channel=row.channel,
            kind=row.kind,
            occurred_at=row.occurred_at,
            currency=program.currency,
            total=row.total,
            lines=row.lines,
            member=by_pk.get(member_id),
            original_external_id=row.original_external_id,
            original_store=row.original_store or None,
        )
        try:
            result = transaction_record(program=program, data=data, now=now)
        except ApplicationError as exc:
            late_error(report, row, next(iter(exc.errors or {}), "row"), exc.detail, skip_invalid)
            continue
        if result.created:
            report.imported += 1
            report.points_reversed -= result.points
        else:
            report.already_present += 1
