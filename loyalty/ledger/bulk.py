"""The ledger's bulk credit (imports): many credits in a fixed handful of statements."""

from datetime import datetime
from typing import NamedTuple

from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from core.db import COPY_NULL as NULL
from core.db import array_literal, copy_text, ids_reserve
from core.references import references_checked
from loyalty.ledger.core import LIFETIME_KINDS, ledger_credit, ledger_lock
from loyalty.models import Account, Draw, Entry, Lot, Transaction

_CREDIT_ARGUMENTS = frozenset({"member_id", "kind", "points", "occurred_at", "available_from", "expires_at"})
_CREDIT_FIELDS = frozenset({"transaction_id", "api_client_id", "staff_user_id", "reason"})


def _open(cursor, account_ids: str, stamp) -> None:
    """Open the missing accounts (`account_ids` as an array literal, in primary-key order): waiting for a racing first
    insert of an account is a wait on its key, so opening keeps the same order as locking."""
    cursor.execute(
        f"INSERT INTO {Account._meta.db_table} (member_id, available, pending, lifetime_earned, updated_at) "
        "SELECT id, 0, 0, 0, %s FROM unnest(%s::bigint[]) AS id ORDER BY id ON CONFLICT DO NOTHING",
        [stamp, account_ids],
    )


class BulkCredit(NamedTuple):
    """One credit of ledger_credit_rows, its times already COPY text, and whether its points have matured or expired
    decided beforehand (ledger_credit_many decides both against its `now`; the import against its start)."""

    member_id: int
    kind: str
    points: int
    occurred_at: str
    dates: str  # the lot's available_from and expires_at ("\\N" for none), tab-separated
    matured: bool  # available_from has come
    expired: str | None  # expires_at when it has passed already: the points expire on arrival
    refs: str  # credit_refs: the entry's transaction, API client, staff user and reason


def credit_refs(*, transaction_id=None, api_client_id=None, staff_user_id=None, reason: str = "") -> str:
    """An entry's references and reason as BulkCredit.refs: COPY text, NULL as \\N, the reason escaped."""
    return (
        f"{NULL if transaction_id is None else transaction_id}\t{NULL if api_client_id is None else api_client_id}\t"
        f"{NULL if staff_user_id is None else staff_user_id}\t{copy_text(reason) if reason else ''}"
    )


_NO_REFS = credit_refs()


@transaction.atomic(savepoint=False)
def ledger_lock_many(*, member_ids) -> None:
    """Lock the accounts of `member_ids` until the transaction ends: those not there yet opened first, then all
    locked, each in primary-key order. For work that goes on to write several accounts one at a time in an order of
    its own (an import chunk's returns, a referral's two accounts): it cannot deadlock with the jobs, an import
    chunk or another such path (loyalty.ledger's lock order)."""
    account_ids = sorted(set(member_ids))
    if not account_ids:
        return
    if connection.vendor != "postgresql":
        for member_id in account_ids:  # SQLite serialises writers; this only opens the accounts
            ledger_lock(member_id)
        return
    ids = array_literal(account_ids)
    with connection.cursor() as cursor:
        _open(cursor, ids, timezone.now())
        cursor.execute(
            f"SELECT member_id FROM {Account._meta.db_table} WHERE member_id = ANY(%s::bigint[]) "
            "ORDER BY member_id FOR UPDATE",
            [ids],
        )


@transaction.atomic(savepoint=False)
def ledger_credit_many(*, credits: list[dict], now: datetime) -> list[int]:
    """The set-based twin of ledger_credit: the same entries, lots, draws and balances as calling it once per credit,
    in list order, in a fixed handful of statements. Each credit is a dict of ledger_credit's arguments (member_id,
    kind, points, occurred_at, available_from, expires_at; entry fields as transaction_id, api_client_id,
    staff_user_id, reason). Returns the entry ids in list order. Locks the accounts in primary-key order."""
    if not credits:
        return []
    fields = set().union(*credits)  # every credit's keys at once: a set per credit costs a tenth of a row's work
    assert _CREDIT_FIELDS.issuperset(
        fields - {"member_id", "kind", "points", "occurred_at", "available_from", "expires_at"}
    )
    if connection.vendor != "postgresql":
        # The embedded SQLite default has no arrays or COPY: one ledger_credit per credit, the very ledger this
        # function's contract names, in this one transaction (SQLite serialises writers, so no lock order matters).
        return [ledger_credit(now=now, **credit).pk for credit in credits]
    rows = []
    for credit in credits:
        available_from, expires_at = credit["available_from"], credit.get("expires_at")
        rows.append(
            BulkCredit(
                credit["member_id"],
                str(credit["kind"]),
                credit["points"],
                credit["occurred_at"].isoformat(" "),
                f"{available_from.isoformat(' ')}\t{NULL if expires_at is None else expires_at.isoformat(' ')}",
                available_from <= now,
                expires_at.isoformat(" ") if expires_at is not None and expires_at <= now else None,
                credit_refs(**{k: credit[k] for k in _CREDIT_FIELDS.intersection(credit)}),
            )
        )
    return ledger_credit_rows(credits=rows, now=now)


@transaction.atomic(savepoint=False)
def ledger_credit_rows(*, credits: list[BulkCredit], now: datetime, own_transactions: list[int] = ()) -> list[int]:
    """ledger_credit_many's writes (PostgreSQL), for credits made ready beforehand: the import makes its purchases'
    credits while it reads the file, so writing a chunk works out balances and little else. `own_transactions`: the
    ids of transactions the credits name that the caller's database transaction inserted itself (Block.own).

    An account not there yet is opened with its balances after the credits (worked out from nothing), rather than
    opened at zero, locked and updated: a history names most members once a chunk, most of them the first time.
    Accounts are inserted before any is locked, each in key order, as every many-account job does (_open)."""
    if not credits:
        return []
    a, e, lot_t, d = (m._meta.db_table for m in (Account, Entry, Lot, Draw))
    stamp = timezone.now()
    account_ids = sorted({credit[0] for credit in credits})
    with connection.cursor() as cursor:
        # Ids drawn up front, so lots and draws can name their entries without a round trip per row: one for each
        # credit's entry, and one for the expire entry of each credit whose expiry passed before it arrived (as
        # ledger_credit, it expires at once; an id is left unused where settling took all of it).
        ids = iter(ids_reserve(Entry, len(credits) + sum(1 for credit in credits if credit[6] is not None)))
        numbered = [(credit, next(ids), next(ids) if credit[6] is not None else None) for credit in credits]
        work = _Work(numbered, now)
        # The accounts not there yet (a guess, not locked: one opened meanwhile is found so below). A join, not
        # "= ANY": the planner takes a bitmap scan for that, at twice the cost of a probe of the index each.
        cursor.execute(
            f"SELECT a.member_id FROM unnest(%s::bigint[]) AS v(id) JOIN {a} AS a ON a.member_id = v.id",
            [array_literal(account_ids)],
        )
        missing = set(account_ids).difference(pk for (pk,) in cursor.fetchall())
        opened: list[int] = []
        if missing:
            # Opened in key order with their balances; one another transaction opened first (waited for, as a
            # racing first insert is a wait on its key) is left to be locked with the others.
            new = sorted(missing)
            opening = work.out({pk: [0, 0, 0, 0] for pk in new})
            cursor.execute(
                f"INSERT INTO {a} (member_id, available, pending, lifetime_earned, held, updated_at) "
                "SELECT v.*, 0, %s FROM unnest(%s::bigint[], %s::bigint[], %s::bigint[], %s::bigint[]) "
                "AS v(member_id, available, pending, lifetime) ORDER BY member_id ON CONFLICT DO NOTHING "
                "RETURNING member_id",
                [stamp, array_literal(new)] + [array_literal(opening[pk][i] for pk in new) for i in range(3)],
            )
            opened = [pk for (pk,) in cursor.fetchall()]
            if len(opened) < len(new):  # their credits worked out again, from the balances as locked below
                work = _Work(numbered, now)
                work.out({pk: [0, 0, 0, 0] for pk in opened})
        present = sorted(set(account_ids).difference(opened)) if opened else account_ids
        if present:
            # Opened first, then locked, each in key order, as every path that takes several accounts does
            # (loyalty.ledger's lock order): two imports, an import and a job or a referral wait for each other
            # instead of deadlocking.
            ids_text = array_literal(present)
            cursor.execute(
                f"SELECT member_id, available, pending, lifetime_earned, held FROM {a} "
                "WHERE member_id = ANY(%s::bigint[]) ORDER BY member_id FOR UPDATE",
                [ids_text],
            )
            # fetchall: iterating the cursor costs two driver calls a row, over a tenth of a chunk's Python.
            rows = cursor.fetchall()
            balances = {pk: [available, pending, lifetime, held] for pk, available, pending, lifetime, held in rows}
            if len(balances) < len(present):  # accounts are never deleted; a credit must not go missing if one were
                raise IntegrityError(f"Accounts gone: {sorted(set(present) - set(balances))}.")
            work.out(balances)
        entry_ids = [entry_id for _, entry_id, _ in numbered]
        # Their foreign keys checked set-based, not a trigger per row (core.references): half the database's work.
        with references_checked(Entry, Lot) as block:
            with cursor.copy(
                f"COPY {e} (id, account_id, kind, points, available_after, pending_after, held_after, occurred_at, "
                "created_at, transaction_id, api_client_id, staff_user_id, reason) FROM STDIN"
            ) as copy:
                copy.write("".join(work.entries))
            with cursor.copy(
                f"COPY {lot_t} (account_id, entry_id, amount, remaining, available_from, expires_at, matured) "
                "FROM STDIN"
            ) as copy:
                copy.write("".join(work.lots))
            block.written(Entry, "id", entry_ids + work.expire_ids)
            block.written(Lot, "entry_id", entry_ids)
            block.own(Transaction, list(own_transactions))
            block.holds(Account, opened + present)  # inserted or locked above
        if work.draws:
            # A lot is keyed by its credit's entry.
            cursor.execute(
                f"INSERT INTO {d} (entry_id, lot_id, points) "
                "SELECT * FROM unnest(%s::bigint[], %s::bigint[], %s::bigint[])",
                [array_literal(draw[i] for draw in work.draws) for i in range(3)],
            )
        if present:
            # Absolute values are safe: they were computed from the rows as locked above.
            cursor.execute(
                f"UPDATE {a} AS a SET available = v.available, pending = v.pending, lifetime_earned = v.lifetime, "
                "updated_at = %s FROM unnest(%s::bigint[], %s::bigint[], %s::bigint[], %s::bigint[]) "
                "AS v(member_id, available, pending, lifetime) WHERE a.member_id = v.member_id",
                [stamp, ids_text] + [array_literal(balances[pk][i] for pk in present) for i in range(3)],
            )
    return entry_ids


class _Work:
    """The entries, lots and draws of ledger_credit_rows's credits (`numbered`: (credit, entry id, expire entry id
    or None), in the order given), worked out for one set of accounts at a time (`out`). COPY text is built here
    rather than with write_row, which adapts value by value at ~6 µs a row: integers print as PostgreSQL reads
    them, and the times and free text come as COPY text already."""

    def __init__(self, numbered: list, now: datetime):
        self.numbered, self.now_text = numbered, str(now)
        self.entries: list[str] = []
        self.lots: list[str] = []
        self.draws: list[tuple[int, int, int]] = []
        self.expire_ids: list[int] = []  # those used
        self.lifetime_kinds: dict[str, bool] = {}

    def out(self, balances: dict[int, list[int]]) -> dict[int, list[int]]:
        """The credits of the accounts in `balances` ({member id: [available, pending, lifetime, held]}, as they
        are before them) worked out in order, and `balances` updated to after them and returned."""
        entries, lots, draws, expire_ids = self.entries, self.lots, self.draws, self.expire_ids
        now_text, lifetime_kinds = self.now_text, self.lifetime_kinds
        for (member_id, kind, points, occurred_at, dates, matured, expired, refs), entry_id, expire_id in self.numbered:
            balance = balances.get(member_id)
            if balance is None:
                continue
            assert points > 0
            if matured:
                balance[0] += points
            else:
                balance[1] += points
            lifetime = lifetime_kinds.get(kind)
            if lifetime is None:
                lifetime = lifetime_kinds[kind] = kind in LIFETIME_KINDS
            if lifetime:
                balance[2] += points
            # What settles a negative balance (the points it takes are not in the lot): min(points, max(0, -before)).
            settle = 0 if not matured or balance[0] >= points else min(points, points - balance[0])
            entries.append(
                f"{entry_id}\t{member_id}\t{kind}\t{points}\t{balance[0]}\t{balance[1]}\t{balance[3]}\t{occurred_at}\t"
                f"{now_text}\t{refs}\n"
            )
            left = points - settle
            if settle:
                draws.append((entry_id, entry_id, settle))
            if left and expired is not None:
                # Expired before it arrived: the expiry job's entry and draw, at once (loyalty.ledger.jobs).
                expire_ids.append(expire_id)
                balance[0 if matured else 1] -= left
                entries.append(
                    f"{expire_id}\t{member_id}\texpire\t{-left}\t{balance[0]}\t{balance[1]}\t{balance[3]}\t"
                    f"{expired}\t{now_text}\t{_NO_REFS}\n"
                )
                draws.append((expire_id, entry_id, left))
                left = 0
            lots.append(f"{member_id}\t{entry_id}\t{points}\t{left}\t{dates}\t{'t' if matured else 'f'}\n")
        return balances
