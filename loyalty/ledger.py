"""The points ledger: the only code that writes Account, Entry, Lot and Draw rows.

Rules every function here keeps:
- Entries are append-only; a correction is a new entry.
- A member's account row is locked before anything of theirs is written, so their writes are serialised; jobs that
  touch many accounts lock them in primary-key order, so they cannot deadlock with each other or with a purchase.
- The cached balances change in the same database transaction as the entries that explain them:
    available + pending == sum(entry.points)
    pending == sum(lot.remaining) over pending lots
    max(available, 0) == sum(lot.remaining) over matured lots (available is negative only after a reversal of
    points already spent, and then every matured lot is empty)
    lot.remaining == lot.amount - sum(draw.points)
  `loyalty.verify` checks them all.
"""

from dataclasses import dataclass
from datetime import datetime

from django.db import connection, transaction
from django.db.models import F
from django.utils import timezone

from core.errors import InsufficientPoints
from loyalty.models import Account, Draw, Entry, Lot

EARNED_KINDS = (Entry.Kind.EARN, Entry.Kind.REVERSAL)  # plus positive adjustments: what lifetime_earned counts


@dataclass(frozen=True)
class Balance:
    available: int
    pending: int


def _lock_and_add(member_id: int, *, available: int = 0, pending: int = 0, lifetime: int = 0) -> Balance:
    """Lock the member's account (opened on first use) and add to its balances; returns the balances after.

    One UPDATE ... RETURNING both takes the row lock and writes, saving a round trip on the earn path."""
    sql = (
        f"UPDATE {Account._meta.db_table} SET available = available + %s, pending = pending + %s, "
        "lifetime_earned = lifetime_earned + %s, updated_at = %s "
        "WHERE member_id = %s RETURNING available, pending"
    )
    params = [available, pending, lifetime, timezone.now(), member_id]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        row = cursor.fetchone()
        if row is None:
            Account.objects.bulk_create([Account(member_id=member_id)], ignore_conflicts=True)
            cursor.execute(sql, params)
            row = cursor.fetchone()
    return Balance(*row)


def _lock(member_id: int) -> Balance:
    return _lock_and_add(member_id)


def _entry(member_id: int, kind: str, points: int, after: Balance, *, occurred_at, now, **fields) -> Entry:
    return Entry.objects.create(
        account_id=member_id,
        kind=kind,
        points=points,
        available_after=after.available,
        pending_after=after.pending,
        occurred_at=occurred_at,
        created_at=now,
        **fields,
    )


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
        lifetime=points if kind in EARNED_KINDS or kind == Entry.Kind.ADJUST else 0,
    )
    entry = _entry(member_id, kind, points, after, occurred_at=occurred_at, now=now, **fields)
    # What the balance owed before this credit is paid from the new lot.
    settle = min(points, max(0, points - after.available)) if matured else 0
    lot = Lot.objects.create(
        account_id=member_id,
        entry=entry,
        amount=points,
        remaining=points - settle,
        available_from=available_from,
        expires_at=expires_at,
        matured=matured,
    )
    if settle:
        Draw.objects.create(entry=entry, lot=lot, points=settle)
    return entry


@transaction.atomic
def ledger_debit(*, member_id: int, kind: str, points: int, occurred_at: datetime, now: datetime, **fields) -> Entry:
    """Spend available points, soonest-to-expire lots first. Refuses with InsufficientPoints, changing nothing,
    when fewer are available. Locks the account row."""
    assert points > 0
    after = _lock_and_add(member_id, available=-points)
    if after.available < 0:  # raising rolls the UPDATE back with this function's savepoint
        available = max(after.available + points, 0)
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
    before = _lock(member_id)
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


def _due_accounts(lots_due) -> list[int]:
    """Lock, in primary-key order, the accounts of a bounded batch of due lots; returns their ids."""
    account_ids = sorted(set(lots_due.values_list("account_id", flat=True)))
    return list(
        Account.objects.select_for_update().filter(pk__in=account_ids).order_by("pk").values_list("pk", flat=True)
    )


def ledger_mature_due(*, now: datetime, batch_size: int = 1000) -> int:
    """Make pending lots whose time has come available; settles negative balances from them. Returns how many
    lots matured. Works in batches of `batch_size` lots, each its own transaction; safe to run twice or
    concurrently, because each batch re-reads its lots after locking their accounts."""
    done = 0
    while True:
        with transaction.atomic():
            due = Lot.objects.filter(matured=False, available_from__lte=now)
            account_ids = _due_accounts(due.order_by("available_from")[:batch_size])
            if not account_ids:
                return done
            lots = list(due.filter(account_id__in=account_ids).order_by("account_id", "available_from", "pk"))
            accounts = {a.pk: a for a in Account.objects.filter(pk__in=account_ids)}
            draws = []
            for lot in lots:
                account = accounts[lot.account_id]
                settle = min(lot.remaining, max(0, -account.available))
                account.pending -= lot.remaining
                account.available += lot.remaining
                if settle:
                    lot.remaining -= settle
                    draws.append(Draw(entry_id=lot.entry_id, lot=lot, points=settle))
                lot.matured = True
            Lot.objects.bulk_update(lots, ["matured", "remaining"])
            Draw.objects.bulk_create(draws)
            for account in accounts.values():
                account.updated_at = now
            Account.objects.bulk_update(accounts.values(), ["available", "pending", "updated_at"])
            done += len(lots)


def ledger_expire_due(*, now: datetime, batch_size: int = 1000) -> int:
    """Expire what is left of lots whose expiry has passed, one expire entry per lot. Returns how many lots
    expired. Batched and safe to run twice or concurrently, like ledger_mature_due."""
    done = 0
    while True:
        with transaction.atomic():
            due = Lot.objects.filter(expires_at__lte=now, remaining__gt=0)
            account_ids = _due_accounts(due.order_by("expires_at")[:batch_size])
            if not account_ids:
                return done
            lots = list(due.filter(account_id__in=account_ids).order_by("account_id", "expires_at", "pk"))
            accounts = {a.pk: a for a in Account.objects.filter(pk__in=account_ids)}
            entries = []
            for lot in lots:
                account = accounts[lot.account_id]
                if lot.matured:
                    account.available -= lot.remaining
                else:
                    account.pending -= lot.remaining
                entries.append(
                    Entry(
                        account_id=account.pk,
                        kind=Entry.Kind.EXPIRE,
                        points=-lot.remaining,
                        available_after=account.available,
                        pending_after=account.pending,
                        occurred_at=lot.expires_at,
                        created_at=now,
                    )
                )
            Entry.objects.bulk_create(entries)
            Draw.objects.bulk_create(
                Draw(entry=entry, lot=lot, points=lot.remaining) for entry, lot in zip(entries, lots, strict=True)
            )
            for lot in lots:
                lot.remaining = 0
            Lot.objects.bulk_update(lots, ["remaining"])
            for account in accounts.values():
                account.updated_at = now
            Account.objects.bulk_update(accounts.values(), ["available", "pending", "updated_at"])
            done += len(lots)
