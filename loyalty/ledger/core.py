"""The ledger's core: account locks, credit, debit and reversal, and the entry, lot and draw rows they write."""

from dataclasses import dataclass
from datetime import datetime

from django.db import connection, transaction
from django.db.models import F, Model
from django.utils import timezone

from core.db import insert_params, insert_plan
from core.errors import InsufficientPoints
from loyalty.models import Account, Draw, Entry, Lot

# Points earned; bonus points (events, referrals) are earned too.
EARNED_KINDS = (Entry.Kind.EARN, Entry.Kind.REVERSAL, Entry.Kind.BONUS)
# Credits of these kinds add to lifetime_earned: what is earned, and positive adjustments.
LIFETIME_KINDS = (*EARNED_KINDS, Entry.Kind.ADJUST)


@dataclass(frozen=True)
class Balance:
    """A member's balances. `available` counts in the points open holds set aside; answers call `available` what is
    left without them (negative while a return's debt is unpaid), and `spendable` is what may be spent now."""

    available: int
    pending: int
    held: int = 0

    @property
    def spendable(self) -> int:
        return max(self.available - self.held, 0)

    @classmethod
    def after(cls, entry: Entry) -> "Balance":
        """The balances right after `entry`."""
        return cls(entry.available_after, entry.pending_after, entry.held_after)


def _add_to_account(member_id: int, *, available=0, pending=0, lifetime=0, held=0) -> tuple[int, int, int]:
    """Lock the member's account (opened on first use) and add to its balances; returns available, pending and held
    after. One UPDATE ... RETURNING both takes the row lock and writes, saving a round trip on the hot paths; the
    caller checks the result and raises to roll back."""
    sql = (
        f"UPDATE {Account._meta.db_table} SET available = available + %s, pending = pending + %s, "
        "lifetime_earned = lifetime_earned + %s, held = held + %s, updated_at = %s "
        "WHERE member_id = %s RETURNING available, pending, held"
    )
    params = [available, pending, lifetime, held, timezone.now(), member_id]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        row = cursor.fetchone()
        if row is None:
            Account.objects.bulk_create([Account(member_id=member_id)], ignore_conflicts=True)
            cursor.execute(sql, params)
            row = cursor.fetchone()
    return row


def _lock_and_spend(member_id: int, *, points: int, unhold: int) -> Balance:
    """Take `points` from available and `unhold` from held under the account lock; the balances after."""
    return Balance(*_add_to_account(member_id, available=-points, held=-unhold))


def _lock_and_add(member_id: int, *, available: int = 0, pending: int = 0, lifetime: int = 0) -> Balance:
    """Add to the account's balances under its lock; the balances after."""
    return Balance(*_add_to_account(member_id, available=available, pending=pending, lifetime=lifetime))


def ledger_lock(member_id: int) -> Balance:
    """Lock the member's account (opened on first use) until the transaction ends, serialising their writes;
    returns the balances."""
    return _lock_and_add(member_id)


def _entry(member_id: int, kind: str, points: int, after: Balance, *, occurred_at, now, **fields) -> Entry:
    return Entry.objects.create(
        account_id=member_id,
        kind=kind,
        points=points,
        available_after=after.available,
        pending_after=after.pending,
        held_after=after.held,
        occurred_at=occurred_at,
        created_at=now,
        **fields,
    )


def _insert_entry_and_lot(entry: Entry, lot: Lot) -> None:
    """INSERT a credit's entry and its lot in one statement and set their ids: one round trip instead of two, and
    no ORM query compilation, on the earn path (docs/benchmarks.md)."""
    if connection.vendor != "postgresql":  # the embedded SQLite default has no data-modifying WITH
        entry.save(force_insert=True)
        lot.entry = entry
        lot.save(force_insert=True)
        return
    e_plan, e_columns = insert_plan(Entry)
    l_plan, l_columns = insert_plan(Lot, frozenset({"entry"}))
    sql = (
        f"WITH e AS (INSERT INTO {Entry._meta.db_table} ({e_columns}) "
        f"VALUES ({', '.join(['%s'] * len(e_plan))}) RETURNING id) "
        f"INSERT INTO {Lot._meta.db_table} ({l_columns}, entry_id) "
        f"SELECT {', '.join(['%s'] * len(l_plan))}, e.id FROM e RETURNING entry_id, id"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, insert_params(entry, e_plan) + insert_params(lot, l_plan))
        entry.pk, lot.pk = cursor.fetchone()
    lot.entry_id = entry.pk
    entry._state.adding = lot._state.adding = False


def _draw(member_id: int, entry: Entry, points: int, *, first_lot_ids: tuple[int, ...] = ()) -> int:
    """Take up to `points` from the member's matured lots, the given lots first, then soonest to expire.
    Returns what was taken. The caller holds the account lock, which guards every lot of the account."""
    taken = 0
    draws: list[Draw] = []
    lots = list(Lot.objects.filter(account_id=member_id, matured=True, remaining__gt=0, pk__in=first_lot_ids)) + list(
        Lot.objects.filter(account_id=member_id, matured=True, remaining__gt=0)
        .exclude(pk__in=first_lot_ids)
        .order_by(F("expires_at").asc(nulls_last=True), "pk")
    )
    for lot in lots:
        if taken == points:
            break
        take = min(lot.remaining, points - taken)
        lot.remaining -= take
        taken += take
        draws.append(Draw(entry=entry, lot=lot, points=take))
    if draws:
        Lot.objects.bulk_update([d.lot for d in draws], ["remaining"])
        Draw.objects.bulk_create(draws)
    return taken


@transaction.atomic(savepoint=False)
def ledger_credit(
    *,
    member_id: int,
    kind: str,
    points: int,
    occurred_at: datetime,
    available_from: datetime,
    expires_at: datetime | None,
    now: datetime,
    **fields,
) -> Entry:
    """Credit points as a new lot, pending until `available_from`. Points that become available first settle a
    negative balance. Locks the account row."""
    assert points > 0
    matured = available_from <= now
    after = _lock_and_add(
        member_id,
        available=points if matured else 0,
        pending=0 if matured else points,
        lifetime=points if kind in LIFETIME_KINDS else 0,
    )
    entry = Entry(
        account_id=member_id,
        kind=kind,
        points=points,
        available_after=after.available,
        pending_after=after.pending,
        held_after=after.held,
        occurred_at=occurred_at,
        created_at=now,
        **fields,
    )
    # What the balance owed before this credit is paid from the new lot.
    settle = min(points, max(0, points - after.available)) if matured else 0
    lot = Lot(
        account_id=member_id,
        entry=entry,
        amount=points,
        remaining=points - settle,
        available_from=available_from,
        expires_at=expires_at,
        matured=matured,
    )
    _insert_entry_and_lot(entry, lot)
    if settle:
        Draw.objects.create(entry=entry, lot=lot, points=settle)
    return entry


def ledger_credit_new_transaction(
    *,
    txn: Model,
    member: int | tuple[str, list],
    kind: str,
    points: int,
    occurred_at: datetime,
    available_from: datetime,
    expires_at: datetime | None,
    now: datetime,
    **fields,
) -> Entry | None:
    """INSERT the unsaved transaction `txn` (a purchase) of `member` and credit `points` for it as ledger_credit does,
    in a single statement: the transaction, the account's balances (row-locked), the entry, its lot and the draw
    that settles a negative balance. One round trip that needs no database transaction around it, where the general
    path takes six. `member` is the member's id, or a query selecting it as `id` with its parameters, which saves
    reading the member first; a query that finds no one writes nothing. The INSERT is `ON CONFLICT DO NOTHING`;
    when it inserts nothing, or the member has no account yet, nothing at all is written and None is returned: the
    caller takes the general path. PostgreSQL only (data-modifying WITH). Sets `txn.pk` and `txn.member_id`."""
    assert points > 0 and connection.vendor == "postgresql"
    member_sql, member_params = ("SELECT %s::bigint AS id", [member]) if isinstance(member, int) else member
    matured = available_from <= now
    added = (points, 0) if matured else (0, points)
    lifetime = points if kind in LIFETIME_KINDS else 0
    entry = Entry(kind=kind, points=points, occurred_at=occurred_at, created_at=now, **fields)
    r_plan, r_columns = insert_plan(type(txn))
    e_plan, e_columns = insert_plan(Entry)
    # The member, the entry's balances and its links come from the statement itself.
    r_values = ["m.id" if f.attname == "member_id" else "%s" for f, _ in r_plan]
    r_params = [p for (f, _), p in zip(r_plan, insert_params(txn, r_plan), strict=True) if f.attname != "member_id"]
    from_statement = {
        "account_id": "a.member_id",
        "available_after": "a.available",
        "pending_after": "a.pending",
        "held_after": "a.held",
        "transaction_id": "r.id",
    }
    e_values = [from_statement.get(f.attname, "%s") for f, _ in e_plan]
    e_params = [
        p for (f, _), p in zip(e_plan, insert_params(entry, e_plan), strict=True) if f.attname not in from_statement
    ]
    accounts, entries, lots, draws = (m._meta.db_table for m in (Account, Entry, Lot, Draw))
    sql = (
        f"WITH m AS ({member_sql}), "
        f"r AS (INSERT INTO {txn._meta.db_table} ({r_columns}) "
        f"SELECT {', '.join(r_values)} FROM m WHERE EXISTS (SELECT 1 FROM {accounts} WHERE member_id = m.id) "
        "ON CONFLICT DO NOTHING RETURNING id, member_id), "
        f"a AS (UPDATE {accounts} SET available = available + %s, pending = pending + %s, "
        "lifetime_earned = lifetime_earned + %s, updated_at = %s "
        f"FROM r WHERE {accounts}.member_id = r.member_id RETURNING {accounts}.member_id, available, pending, held), "
        f"e AS (INSERT INTO {entries} ({e_columns}) SELECT {', '.join(e_values)} FROM r, a "
        "RETURNING id, account_id, available_after, pending_after, held_after), "
        # What the balance owed before this credit is paid from the new lot, as in ledger_credit.
        f"l AS (INSERT INTO {lots} (account_id, entry_id, amount, remaining, available_from, expires_at, matured) "
        "SELECT e.account_id, e.id, %s, %s - CASE WHEN %s THEN LEAST(%s, GREATEST(0, %s - e.available_after)) "
        "ELSE 0 END, %s, %s, %s FROM e RETURNING id, entry_id, remaining), "
        f"d AS (INSERT INTO {draws} (entry_id, lot_id, points) SELECT entry_id, id, %s - remaining FROM l "
        "WHERE remaining < %s) "
        "SELECT r.id, r.member_id, e.id, e.available_after, e.pending_after, e.held_after, l.id, l.remaining "
        "FROM r, e, l"
    )
    params = [
        *member_params,
        *r_params,
        *added,
        lifetime,
        now,
        *e_params,
        points,
        points,
        matured,
        points,
        points,
        available_from,
        expires_at,
        matured,
        points,
        points,
    ]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        found = cursor.fetchone()
    if found is None:
        return None
    txn.pk, txn.member_id, entry.pk, entry.available_after, entry.pending_after, entry.held_after, lot_id, left = found
    entry.account_id = txn.member_id
    txn._state.adding = entry._state.adding = False
    entry.transaction = txn
    lot = Lot(
        pk=lot_id,
        account_id=txn.member_id,
        entry=entry,
        amount=points,
        remaining=left,
        available_from=available_from,
        expires_at=expires_at,
        matured=matured,
    )
    lot._state.adding = False
    return entry


@transaction.atomic
def ledger_debit(*, member_id: int, kind: str, points: int, occurred_at: datetime, now: datetime, **fields) -> Entry:
    """Spend available points, soonest-to-expire lots first. Refuses with InsufficientPoints, changing nothing,
    when fewer are available and not held. Locks the account row."""
    assert points > 0
    # Points set aside by open holds are not spendable (rewards: paying with points).
    after = _lock_and_spend(member_id, points=points, unhold=0)
    if after.available - after.held < 0:  # raising rolls the UPDATE back with this function's savepoint
        available = max(after.available + points - after.held, 0)
        raise InsufficientPoints(
            f"{points} points requested, {available} available.", available=available, requested=points
        )
    entry = _entry(member_id, kind, -points, after, occurred_at=occurred_at, now=now, **fields)
    _draw(member_id, entry, points)
    return entry


@transaction.atomic(savepoint=False)
def ledger_reverse(
    *,
    member_id: int,
    points: int,
    earn_entry_id: int | None,
    allow_negative: bool,
    occurred_at: datetime,
    now: datetime,
    **fields,
) -> Entry | None:
    """Take back points a purchase earned: first from that purchase's own lot (pending or not), then from other
    available lots; what is still missing makes the balance negative if `allow_negative`, else is forgiven.
    Returns the reversal entry, or None when nothing could be taken. Locks the account row."""
    assert points > 0
    before = ledger_lock(member_id)
    lot = Lot.objects.filter(entry_id=earn_entry_id).first() if earn_entry_id else None
    from_pending = min(points, lot.remaining) if lot is not None and not lot.matured else 0
    spendable = max(before.available, 0)
    from_available = min(points - from_pending, spendable) if not allow_negative else points - from_pending
    taken = from_pending + from_available
    if taken == 0:
        return None
    after = _lock_and_add(member_id, available=-from_available, pending=-from_pending, lifetime=-taken)
    entry = _entry(member_id, Entry.Kind.REVERSAL, -taken, after, occurred_at=occurred_at, now=now, **fields)
    if from_pending:
        Lot.objects.filter(pk=lot.pk).update(remaining=F("remaining") - from_pending)
        Draw.objects.create(entry=entry, lot=lot, points=from_pending)
    if from_available:
        _draw(member_id, entry, min(from_available, spendable), first_lot_ids=(lot.pk,) if lot else ())
    return entry
