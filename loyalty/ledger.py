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

from core.db import insert_params, insert_plan
from core.errors import InsufficientPoints
from loyalty.models import Account, Draw, Entry, Lot

# What lifetime_earned counts, plus positive adjustments. Bonus points (events, referrals) are earned too.
EARNED_KINDS = (Entry.Kind.EARN, Entry.Kind.REVERSAL, Entry.Kind.BONUS)


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
        occurred_at=occurred_at,
        created_at=now,
        **fields,
    )


def _insert_entry_and_lot(entry: Entry, lot: Lot) -> None:
    """INSERT a credit's entry and its lot in one statement and set their ids: one round trip instead of two, and
    no ORM query compilation, on the earn path (docs/benchmarks.md)."""
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
        lifetime=points if kind in EARNED_KINDS or kind == Entry.Kind.ADJUST else 0,
    )
    entry = Entry(
        account_id=member_id,
        kind=kind,
        points=points,
        available_after=after.available,
        pending_after=after.pending,
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


_CREDIT_FIELDS = frozenset({"transaction_id", "api_client_id", "staff_user_id", "reason"})


@transaction.atomic(savepoint=False)
def ledger_credit_many(*, credits: list[dict], now: datetime) -> list[int]:
    """The set-based twin of ledger_credit: the same entries, lots, draws and balances as calling it once per credit,
    in list order, in a fixed handful of statements. Each credit is a dict of ledger_credit's arguments (member_id,
    kind, points, occurred_at, available_from, expires_at; entry fields as transaction_id, api_client_id,
    staff_user_id, reason). Returns the entry ids in list order. Locks the accounts in primary-key order."""
    if not credits:
        return []
    for credit in credits:
        assert credit["points"] > 0
        assert _CREDIT_FIELDS.issuperset(
            credit.keys() - {"member_id", "kind", "points", "occurred_at", "available_from", "expires_at"}
        )
    a, e, lot_t, d = (m._meta.db_table for m in (Account, Entry, Lot, Draw))

    def array(values) -> str:
        # An array literal of integers, ~50x cheaper for the driver than adapting a list element by element.
        return "{" + ",".join(map(str, values)) + "}"

    stamp = timezone.now()
    account_ids = sorted({credit["member_id"] for credit in credits})
    with connection.cursor() as cursor:
        # Opening in key order, then locking in key order: the same order as every other many-account job, so two
        # imports, or an import and ledger_mature_due, wait for each other instead of deadlocking.
        cursor.execute(
            f"INSERT INTO {a} (member_id, available, pending, lifetime_earned, updated_at) "
            "SELECT id, 0, 0, 0, %s FROM unnest(%s::bigint[]) AS id ORDER BY id ON CONFLICT DO NOTHING",
            [stamp, array(account_ids)],
        )
        cursor.execute(
            f"SELECT member_id, available, pending, lifetime_earned FROM {a} "
            "WHERE member_id = ANY(%s::bigint[]) ORDER BY member_id FOR UPDATE",
            [array(account_ids)],
        )
        balances = {pk: [available, pending, lifetime] for pk, available, pending, lifetime in cursor.fetchall()}
        # Ids drawn from the table's own sequence up front, so lots and draws can name their entries without a
        # round trip per row; sorted, so entry ids rise in list order as they would one call at a time.
        cursor.execute(
            f"SELECT nextval(pg_get_serial_sequence('{e}', 'id')) FROM generate_series(1, %s)", [len(credits)]
        )
        entry_ids = sorted(row[0] for row in cursor.fetchall())
        entries, lots, draws = [], [], []
        for credit, entry_id in zip(credits, entry_ids, strict=True):
            points, kind, member_id = credit["points"], credit["kind"], credit["member_id"]
            balance = balances[member_id]
            matured = credit["available_from"] <= now
            if matured:
                balance[0] += points
            else:
                balance[1] += points
            if kind in EARNED_KINDS or kind == Entry.Kind.ADJUST:
                balance[2] += points
            settle = min(points, max(0, points - balance[0])) if matured else 0
            entries.append(
                (
                    entry_id,
                    member_id,
                    kind,
                    points,
                    balance[0],
                    balance[1],
                    credit["occurred_at"],
                    now,
                    credit.get("transaction_id"),
                    credit.get("api_client_id"),
                    credit.get("staff_user_id"),
                    credit.get("reason", ""),
                )
            )
            lots.append(
                (member_id, entry_id, points, points - settle, credit["available_from"], credit["expires_at"], matured)
            )
            if settle:
                draws.append((entry_id, settle))
        with cursor.copy(
            f"COPY {e} (id, account_id, kind, points, available_after, pending_after, occurred_at, created_at, "
            "transaction_id, api_client_id, staff_user_id, reason) FROM STDIN"
        ) as copy:
            for row in entries:
                copy.write_row(row)
        with cursor.copy(
            f"COPY {lot_t} (account_id, entry_id, amount, remaining, available_from, expires_at, matured) FROM STDIN"
        ) as copy:
            for row in lots:
                copy.write_row(row)
        if draws:
            # A lot is found by its entry (one lot per credit entry), which spares reserving lot ids as well.
            cursor.execute(
                f"INSERT INTO {d} (entry_id, lot_id, points) SELECT v.entry_id, l.id, v.points "
                "FROM unnest(%s::bigint[], %s::bigint[]) AS v(entry_id, points) "
                f"JOIN {lot_t} l ON l.entry_id = v.entry_id",
                [array(entry_id for entry_id, _ in draws), array(points for _, points in draws)],
            )
        # Absolute values are safe: they were computed from the rows as locked above.
        cursor.execute(
            f"UPDATE {a} AS a SET available = v.available, pending = v.pending, lifetime_earned = v.lifetime, "
            "updated_at = %s FROM unnest(%s::bigint[], %s::bigint[], %s::bigint[], %s::bigint[]) "
            "AS v(member_id, available, pending, lifetime) WHERE a.member_id = v.member_id",
            [stamp, array(account_ids), *(array(balances[pk][i] for pk in account_ids) for i in range(3))],
        )
    return entry_ids


# Holds and refunds (rewards: paying with points, cancelled redemptions). A hold is a reservation, not a ledger
# movement: it only raises Account.held, which ledger_debit counts out of what may be spent. Capturing a hold is
# the spend, as a redeem entry that lowers `held` in the same statement.


@dataclass(frozen=True)
class HeldBalance:
    available: int
    pending: int
    held: int

    @property
    def spendable(self) -> int:
        return max(self.available - self.held, 0)


def _lock_and_spend(member_id: int, *, points: int, unhold: int) -> HeldBalance:
    """Lock the member's account and take `points` from available and `unhold` from held; returns the balances after.
    The caller checks them and raises to roll back. An account not yet opened is opened empty."""
    sql = (
        f"UPDATE {Account._meta.db_table} SET available = available - %s, held = held - %s, updated_at = %s "
        "WHERE member_id = %s RETURNING available, pending, held"
    )
    params = [points, unhold, timezone.now(), member_id]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        row = cursor.fetchone()
        if row is None:
            Account.objects.bulk_create([Account(member_id=member_id)], ignore_conflicts=True)
            cursor.execute(sql, params)
            row = cursor.fetchone()
    return HeldBalance(*row)


def ledger_balance(*, member_id: int) -> HeldBalance:
    """The member's balances as they are now, without locking (for answers, not decisions)."""
    row = Account.objects.filter(pk=member_id).values_list("available", "pending", "held").first()
    return HeldBalance(*(row or (0, 0, 0)))


@transaction.atomic
def ledger_hold(*, member_id: int, points: int) -> HeldBalance:
    """Set `points` aside from what the member may spend. Refuses with InsufficientPoints, changing nothing, when
    fewer are spendable (available less already held). Locks the account row."""
    assert points > 0
    # held + p inside the UPDATE, checked after: a racing hold or spend waits on the row lock and sees this one.
    after = _lock_and_spend(member_id, points=0, unhold=-points)
    if after.available - after.held < 0:  # raising rolls the UPDATE back with this function's savepoint
        spendable = max(after.available - after.held + points, 0)
        raise InsufficientPoints(
            f"{points} points requested, {spendable} available.", available=spendable, requested=points
        )
    return after


@transaction.atomic(savepoint=False)
def ledger_unhold(*, member_id: int, points: int) -> HeldBalance:
    """Give back points a hold set aside (release or lapse): they become spendable again. Locks the account row.
    The caller must have claimed the hold first, so its points are given back once."""
    assert points > 0
    return _lock_and_spend(member_id, points=0, unhold=points)


@transaction.atomic
def ledger_capture(
    *, member_id: int, held: int, points: int, kind: str, occurred_at: datetime, now: datetime, **fields
) -> Entry:
    """Spend `points` (at most `held`) that a hold set aside, as an entry of `kind`, and give the hold's `held` points
    back from the held total, in one statement. Refuses with InsufficientPoints, changing nothing, when the points
    are no longer available (they expired or a return took them back while held). Locks the account row."""
    assert 0 < points <= held
    after = _lock_and_spend(member_id, points=points, unhold=held)
    # Only this hold's own points are checked: they were set aside, so other holds have no claim on them.
    if after.available < 0:
        available = max(after.available + points, 0)
        raise InsufficientPoints(
            f"{points} held points to capture, {available} still available.", available=available, requested=points
        )
    entry = _entry(member_id, kind, -points, after, occurred_at=occurred_at, now=now, **fields)
    _draw(member_id, entry, points)
    return entry


@transaction.atomic(savepoint=False)
def ledger_refund(*, spend_entry_id: int, occurred_at: datetime, now: datetime, **fields) -> Entry:
    """Give back everything a spend entry took, as a refund entry. The points go back to the very lots the spend drew
    from (negative draws), so they keep their original expiry; a lot that expired meanwhile is expired again by the
    next expiry run. What settles a negative balance (a return took points back after the spend) is not put back
    into lots, as in ledger_credit. A spend is refunded at most once (unique Entry.refund_of). Locks the account."""
    spend = Entry.objects.get(pk=spend_entry_id)
    assert spend.points < 0 and spend.kind in (Entry.Kind.REDEEM, Entry.Kind.ADJUST)
    points = -spend.points
    after = _lock_and_add(spend.account_id, available=points)
    entry = _entry(
        spend.account_id, Entry.Kind.REFUND, points, after, occurred_at=occurred_at, now=now, refund_of=spend, **fields
    )
    settle = min(points, max(0, points - after.available))
    give_back = points - settle
    draws = []
    # Latest-expiring lots first: if part of the refund settles a debt, the points given back live longest.
    taken = Draw.objects.filter(entry=spend).select_related("lot")

    def last_to_expire(d: Draw) -> tuple:
        return (d.lot.expires_at is None, d.lot.expires_at.timestamp() if d.lot.expires_at else 0, d.lot.pk)

    for draw in sorted(taken, key=last_to_expire, reverse=True):
        if give_back == 0:
            break
        back = min(draw.points, give_back)
        give_back -= back
        draws.append(Draw(entry=entry, lot=draw.lot, points=-back))
    for draw in draws:
        Lot.objects.filter(pk=draw.lot_id).update(remaining=F("remaining") - draw.points)
    Draw.objects.bulk_create(draws)
    return entry
