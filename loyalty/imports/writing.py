"""Writing an import: each purchase made ready to write while the file is checked (Earnings.ready), then a chunk at
a time: purchases set-based, their points through ledger_credit_rows, returns one by one through
transaction_record."""

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from operator import itemgetter

import psycopg
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from core.db import COPY_NULL as NULL
from core.db import array_literal, copy_text, ids_reserve
from core.errors import ApplicationError
from core.models import Program
from core.references import references_checked
from loyalty import ledger
from loyalty.earning import earning_for_purchase
from loyalty.imports.report import ImportAborted, ImportReport
from loyalty.imports.rows import Row
from loyalty.models import ON_REPEAT, Entry, Transaction
from loyalty.tier_counts import tier_counts_add
from loyalty.transactions import TransactionInput, transaction_record
from members.models import Member


class Earnings:
    """Makes purchases ready to write (`ready`), with earning_for_purchase memoised. It is pure, and costs ~15 µs a
    call (calendar arithmetic), about half of a row's budget. Its points depend on the total alone, and its dates on
    the day of the purchase and the time within that day, which calendar arithmetic carries over unchanged: so one
    call per distinct total and one per distinct day give every row's exact result. A rule that looks at more than
    these must widen the keys.

    Whether a purchase's points have matured, or expired before they arrive, is decided against `as_of`, the
    import's start (as the rows were checked against it): points that mature or expire while the import runs are
    then matured or expired by the ledger's jobs, as any pending or expiring points are."""

    def __init__(self, program: Program, as_of: datetime):
        self.program = program
        self.as_of = as_of
        self.by_total: dict[Decimal, tuple[int, str, str]] = {}
        self.by_day: dict[tuple, tuple] = {}
        # Days in UTC by their text (a time's first ten characters) whose every time has its lot's dates as text, and
        # whether its points have matured and expired: (available date, expiry date or None, matured, expired).
        self.utc_days: dict[str, tuple] = {}

    def points(self, total: Decimal, occurred_at: datetime) -> tuple[int, str, str]:
        """(points, breakdown as JSON in COPY text, the total as text: made once per total, as f"{total}" costs a
        quarter of a µs each time)."""
        found = self.by_total.get(total)
        if found is None:
            earning = earning_for_purchase(program=self.program, total=total, occurred_at=occurred_at)
            found = (earning.points, copy_text(json.dumps(earning.breakdown)), str(total))
            if len(self.by_total) < 100_000:
                self.by_total[total] = found
        return found

    def lot(self, occurred_at: datetime, occurred_text: str) -> tuple[str, bool, str | None]:
        """The lot's available_from and expires_at as COPY text, whether it has matured, and its expiry text if that
        has passed already (the points expire on arrival)."""
        utc = occurred_at.tzinfo is UTC
        whole = self.utc_days.get(occurred_text[:10]) if utc else None  # the common case: a day seen before
        if whole is None:
            key = (occurred_at.date(), occurred_at.tzinfo)  # not the instant: two zones' midnights may coincide
            day = self.by_day.get(key)
            if day is None:
                day = self.by_day[key] = self._day(occurred_at)
            available_base, expires_base, midnight, texts, day_matured, day_expired = day
            if texts is None or day_matured is None or day_expired is None:  # not the same for all the day's times
                since = occurred_at - midnight  # wall-clock time within the day: both share the zone
                available_from = available_base + since
                expires_at = expires_base + since if expires_base is not None else None
                expired = expires_at is not None and expires_at <= self.as_of
                return (
                    f"{available_from.isoformat(' ')}\t{NULL if expires_at is None else expires_at.isoformat(' ')}",
                    available_from <= self.as_of,
                    expires_at.isoformat(" ") if expired else None,
                )
            whole = (*texts, day_matured, day_expired)
            if utc:
                self.utc_days[occurred_text[:10]] = whole
        available_text, expires_text, day_matured, day_expired = whole
        time = occurred_text[10:]  # the purchase's time of day, and its offset
        if expires_text is None:
            return f"{available_text}{time}\t{NULL}", day_matured, None
        return (
            f"{available_text}{time}\t{expires_text}{time}",
            day_matured,
            expires_text + time if day_expired else None,
        )

    def _day(self, occurred_at: datetime) -> tuple:
        """For the day of `occurred_at`: the available_from and expires_at of its midnight (None: never expires),
        that midnight, and what holds for every time of the day, None where it does not: their dates as text (in
        UTC, where a time's text is its date's and the purchase's time of day; other zones' offsets may change
        within a day), whether its points have matured and whether they have expired."""
        midnight = occurred_at.replace(hour=0, minute=0, second=0, microsecond=0)
        earning = earning_for_purchase(program=self.program, total=Decimal(0), occurred_at=midnight)
        available_from, expires_at = earning.available_from, earning.expires_at
        texts = None
        if str(occurred_at.tzinfo) in ("UTC", "Etc/UTC"):
            texts = (str(available_from.date()), str(expires_at.date()) if expires_at is not None else None)

        def whole_day(start: datetime | None) -> bool | None:
            """Whether the day's times from `start` on have come by as_of: all of them, none, or None (some)."""
            if start is None:
                return False
            return True if start + _DAY <= self.as_of else False if start > self.as_of else None

        return available_from, expires_at, midnight, texts, whole_day(available_from), whole_day(expires_at)

    def ready(self, row: Row, member_id: int | None) -> tuple:
        """The purchase `row` of member `member_id` (None: anonymous) ready to write, as a tuple of plain values,
        which the spool writes with marshal (checking.spool_write):
            (line, (store, external_id), member number, member_id, transaction text, points, occurred_at,
             lot dates, matured, expired)
        The texts are COPY text: the transaction's of the columns of _purchases_text from store to breakdown, the
        others as ledger_credit_rows takes them. Anonymous purchases are kept for analytics and earn nothing, as in
        transaction_record; nor do purchases worth no points, which have no lot."""
        line, store, external_id, channel, member, _, _, _, at, total, lines, occurred_at = row  # not 13 lookups
        occurred_at = occurred_at or at.isoformat(" ")  # str() would call this, at twice the cost
        if member_id is None:
            points, breakdown, total = 0, "[]", str(total)
        else:
            points, breakdown, total = self.by_total.get(total) or self.points(total, at)
        dates, matured, expired = self.lot(at, occurred_at) if points else ("", False, None)
        return (
            line,
            (store, external_id),
            member,
            member_id,
            f"{copy_text(store)}\t{copy_text(external_id)}\t{channel}\t{NULL if member_id is None else member_id}\t"
            f"{occurred_at}\t{self.program.currency}\t{total}\t{copy_text(json.dumps(lines)) if lines else '[]'}\t"
            f"{points}\t{breakdown if points else '[]'}",
            points,
            occurred_at,
            dates,
            matured,
            expired,
        )


_DAY = timedelta(days=1)


@dataclass
class Prepared:
    """A chunk ready to write: purchases as Earnings.ready made them, returns as rows."""

    purchases: list[tuple]
    returns: list[Row]
    size: int


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


def _members_inactive(member_ids: set[int]) -> dict[int, str | None]:
    """{id: status, or None if gone} of those among `member_ids` no longer active since the file was checked: a
    count first, the rows only where it falls short (rarely)."""
    ids = array_literal(member_ids)
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT count(*) FROM {Member._meta.db_table} WHERE id = ANY(%s::bigint[]) AND status = %s",
            [ids, Member.Status.ACTIVE],
        )
        if cursor.fetchone()[0] == len(member_ids):
            return {}
        cursor.execute(f"SELECT id, status FROM {Member._meta.db_table} WHERE id = ANY(%s::bigint[])", [ids])
        found = dict(cursor.fetchall())
    return {pk: found.get(pk) for pk in member_ids if found.get(pk) != Member.Status.ACTIVE}


@transaction.atomic
def chunk_write(*, program: Program, chunk: Prepared, report: ImportReport, skip_invalid: bool) -> None:
    """One chunk, one database transaction: its purchases set-based, then its returns one by one.

    The chunk commits without waiting for its WAL to reach the disk (synchronous_commit off, for this transaction
    only). That is safe here: a crash can lose only the last chunks acknowledged before it, never half a chunk, and
    as the import is idempotent, rerunning the file restores exactly those."""
    now = timezone.now()
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL synchronous_commit = off")
    inactive = _members_inactive({p[3] for p in chunk.purchases if p[3] is not None})
    purchases, seen = [], set()
    for purchase in chunk.purchases:
        line, key, member, member_id = purchase[:4]
        if member_id in inactive:
            status = inactive[member_id]
            message = f"Member {member} is {status}." if status else f"No member {member}."
            late_error(report, line, "member", message, skip_invalid)
        elif key in seen:  # the file repeats itself: the first row counts
            report.already_present += 1
        else:
            seen.add(key)
            purchases.append(purchase)
    ids = _purchases_copy(program, purchases, now)
    if ids is None:  # some are recorded already: each is skipped on its own
        ids = _purchases_insert(program, purchases, now)
    inserted = [pk for pk in ids if pk is not None]
    report.already_present += len(purchases) - len(inserted)
    report.imported += len(inserted)
    members = {}
    if chunk.returns:
        members = members_resolve(program, {r.member for r in chunk.returns} - {""})
        _lock_for_returns(program, chunk.returns, members, purchases)
    credits, credited = [], 0
    for purchase, txn_id in zip(purchases, ids, strict=True):
        _, _, _, member_id, _, points, occurred_at, dates, matured, expired = purchase
        if txn_id is not None and points:
            refs = f"{txn_id}{_AFTER_TRANSACTION}"  # ledger.credit_refs(transaction_id=txn_id), at a third of its cost
            credits.append(ledger.BulkCredit(member_id, _EARN, points, occurred_at, dates, matured, expired, refs))
            credited += points
    # The chunk's transaction inserted the purchases itself: the entries' references to them need no lock.
    ledger.ledger_credit_rows(credits=credits, now=now, own_transactions=inserted)
    report.points_credited += credited
    # Imported purchases qualify for tiers as recorded ones do (before the returns, which take off what they count).
    tier_counts_add(program=program, transaction_ids=inserted, now=now)
    if chunk.returns:
        _returns_record(program, chunk.returns, members, report, skip_invalid, now)


_EARN = Entry.Kind.EARN.value  # a Choices member's value costs a call each time it is read
_AFTER_TRANSACTION = ledger.credit_refs()[len(NULL) :]  # an earn entry's references after its transaction's id


def late_error(report: ImportReport, line: int, name: str, message: str, skip_invalid: bool) -> None:
    """A row refused after the check passed (a member suspended meanwhile, a return that exceeds its purchase):
    skipped with skip_invalid, otherwise the import stops and this chunk is rolled back."""
    if not skip_invalid:
        raise ImportAborted(
            f"line {line}: {name}: {message} The import stopped there; what it imported until then stays "
            "imported, and a rerun skips it.",
            errors={name: [message]},
            line=line,
        )
    report.add_error(line, name, message)


_TEMP = "import_purchase"
# The columns _purchases_text writes; original_id and api_client_id are left out: COPY fills them with NULL.
_COLUMNS = (
    "id, program_id, store, external_id, channel, member_id, occurred_at, currency, total, lines, points, breakdown, "
    "kind, returned_total, points_reversed, created_at"
)


def _purchases_text(program: Program, purchases: list, ids: list[int], now: datetime) -> str:
    """The purchases with their ids (given in the chunk's order, each member's in file order, as one INSERT at a
    time would give them) as COPY text of _COLUMNS, in (store, external_id) order: every import writes a chunk's
    purchases in this one order, so two imports of overlapping files wait for each other's uncommitted rows instead
    of deadlocking (the lock order in loyalty/ledger/__init__.py). Sorted by the keys alone, unique in a chunk, each
    joined by a NUL: strings sort in half the time of pairs of strings, in the same order, as no key holds a NUL
    (PostgreSQL's text cannot)."""
    head, tail = f"\t{program.pk}\t", f"\tpurchase\t0\t0\t{now}\n"
    keys = ["\0".join(p[1]) for p in purchases]
    ordered = sorted(zip(keys, ids, purchases, strict=True), key=itemgetter(0))
    return "".join(f"{pk}{head}{p[4]}{tail}" for _, pk, p in ordered)


def _purchases_copy(program: Program, purchases: list, now: datetime) -> list[int] | None:
    """COPY the purchases straight into the table, with ids drawn from its sequence up front; returns their ids, in
    the order of `purchases`. About 40% less work for the database than INSERT ... ON CONFLICT through a
    temporary table, which is the fallback: None when the unique index refuses the COPY because one of them is
    recorded already (a rerun, an overlapping file, a concurrent import), or when a member it names is gone (the
    set-based key check; the fallback's triggers then refuse it at commit). The COPY is then undone to its
    savepoint; on a rerun it fails at its first row, so trying first costs little."""
    if not purchases:
        return []
    ids = ids_reserve(Transaction, len(purchases))
    text = _purchases_text(program, purchases, ids, now)
    try:
        # Its foreign keys checked set-based (core.references); the block is its own savepoint.
        with references_checked(Transaction) as block, connection.cursor() as cursor:
            with cursor.copy(f"COPY {Transaction._meta.db_table} ({_COLUMNS}) FROM STDIN") as copy:
                copy.write(text)
            block.written(Transaction, "id", ids)
    except (IntegrityError, psycopg.IntegrityError):
        return None
    return ids


def _purchases_insert(program: Program, purchases: list, now: datetime) -> list[int | None]:
    """INSERT ... ON CONFLICT DO NOTHING the purchases through a COPY-filled temporary table; returns their ids in
    the order of `purchases`, None for those recorded already. The unique index decides, so concurrent imports of
    the same file cannot record a purchase twice."""
    if not purchases:
        return []
    ids = ids_reserve(Transaction, len(purchases))  # those of repeats are left unused
    table = Transaction._meta.db_table
    with connection.cursor() as cursor:
        # ON COMMIT DROP cleans up after a failed chunk; the explicit DROP lets the next chunk of the same
        # transaction (as in tests, where nothing commits) create it again.
        cursor.execute(f"CREATE TEMP TABLE {_TEMP} ON COMMIT DROP AS SELECT {_COLUMNS} FROM {table} WITH NO DATA")
        with cursor.copy(f"COPY {_TEMP} ({_COLUMNS}) FROM STDIN") as copy:
            copy.write(_purchases_text(program, purchases, ids, now))
        cursor.execute(
            f"INSERT INTO {table} ({_COLUMNS}) SELECT {_COLUMNS} FROM {_TEMP} "
            'ORDER BY store COLLATE "C", external_id COLLATE "C" '
            f"{ON_REPEAT} RETURNING store, external_id, id"
        )
        inserted = {(store, external_id): pk for store, external_id, pk in cursor.fetchall()}
        cursor.execute(f"DROP TABLE {_TEMP}")
    return [inserted.get(p[1]) for p in purchases]


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
    account_ids.update(p[3] for p in purchases if p[3] is not None)
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
        member_id = members.get(row.member, (None, None))[0]
        if row.member and member_id is None:  # gone since the check; a member of any status may return goods
            late_error(report, row.line, "member", f"No member {row.member}.", skip_invalid)
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
            late_error(report, row.line, next(iter(exc.errors or {}), "row"), exc.detail, skip_invalid)
            continue
        if result.created:
            report.imported += 1
            report.points_reversed -= result.points
        else:
            report.already_present += 1
