"""The ledger's core: account locks, credit, debit and reversal, and the entry, lot and draw rows they write."""

from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime
from functools import cache, lru_cache

from django.db import DatabaseError, connection, transaction
from django.db.models import F, Model
from django.utils import timezone

from core.db import insert_params, insert_plan, on_postgresql, statement_cursor, unsaved
from core.errors import InsufficientPoints
from loyalty.ledger.jobs import lots_expire
from loyalty.models import ON_REPEAT, Account, Draw, Entry, Lot

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


def _credit_ctes(
    entry: Entry,
    *,
    available_from: datetime,
    expires_at: datetime | None,
    now: datetime,
    account: tuple[str, list],
) -> tuple[str, list]:
    """The credit `entry` (unsaved, its kind and points set) as the common table expressions of one statement, with
    their parameters: `a` adds to the account's balances (its UPDATE takes the row lock), `e` inserts the entry
    with the balances after, `l` its lot, less what settles a negative balance, and `d` the draw that settles it;
    as ledger_credit's steps would write them.
    `account` is the UPDATE's condition and its parameters. An account that is not there writes nothing at
    all."""
    update_where, update_params = account
    sql, e_plan = _credit_sql("", update_where, "a", ())
    return sql, _credit_params(entry, e_plan, update_params, available_from, expires_at, now)


def _credit_params(entry: Entry, e_plan: list, update_params: list, available_from, expires_at, now) -> list:
    """The parameters of _credit_sql's text for the credit `entry`."""
    points, matured = entry.points, available_from <= now
    added = (points, 0) if matured else (0, points)
    params = [*added, points if entry.kind in LIFETIME_KINDS else 0, now, *update_params, *insert_params(entry, e_plan)]
    params += [matured, available_from, expires_at, matured]
    return params


@cache
def _credit_sql(update_from: str, update_where: str, entry_from: str, entry_links: tuple) -> tuple[str, list]:
    """_credit_ctes's text, and the plan of the entry fields it takes as parameters: the same for every credit
    written the same way, so built once. `update_from` is the UPDATE's extra FROM list; `entry_links` names entry
    columns taken from other parts of the statement, (attname, SQL) selected `FROM {entry_from}`."""
    accounts, entries, lots, draws = (m._meta.db_table for m in (Account, Entry, Lot, Draw))
    e_plan, e_columns = insert_plan(Entry)
    from_statement = {
        "account_id": "a.member_id",
        "available_after": "a.available",
        "pending_after": "a.pending",
        "held_after": "a.held",
        **dict(entry_links),
    }
    e_values = [from_statement.get(f.attname, "%s") for f, _ in e_plan]
    sql = (
        f"a AS (UPDATE {accounts} SET available = available + %s, pending = pending + %s, "
        f"lifetime_earned = lifetime_earned + %s, updated_at = %s{update_from} WHERE {update_where} "
        f"RETURNING {accounts}.member_id, available, pending, held), "
        f"e AS (INSERT INTO {entries} ({e_columns}) SELECT {', '.join(e_values)} FROM {entry_from} "
        "RETURNING id, account_id, points, available_after, pending_after, held_after), "
        # What the balance owed before this credit is paid from the new lot.
        f"l AS (INSERT INTO {lots} (account_id, entry_id, amount, remaining, available_from, expires_at, matured) "
        "SELECT e.account_id, e.id, e.points, e.points - CASE WHEN %s "
        "THEN LEAST(e.points, GREATEST(0, e.points - e.available_after)) ELSE 0 END, %s, %s, %s FROM e "
        "RETURNING entry_id, amount, remaining), "
        # A lot is keyed by its entry.
        f"d AS (INSERT INTO {draws} (entry_id, lot_id, points) SELECT entry_id, entry_id, amount - remaining FROM l "
        "WHERE remaining < amount)"
    )
    return sql, [(f, how) for f, how in e_plan if f.attname not in from_statement]


def _credited(entry: Entry, row, *, available_from, expires_at, now) -> Entry:
    """`entry` as the statement of _credit_ctes wrote it, from its row (entry id and balances, the lot's
    remaining), with its lot."""
    entry.pk, entry.available_after, entry.pending_after, entry.held_after, remaining = row
    entry._state.adding = False
    lot = _lot(entry, remaining, available_from=available_from, expires_at=expires_at, matured=available_from <= now)
    lot._state.adding = False
    return entry


def _lot(entry: Entry, remaining: int, *, available_from, expires_at, matured: bool) -> Lot:
    """The unsaved lot of the credit `entry`."""
    return Lot(
        account_id=entry.account_id,
        entry=entry,
        amount=entry.points,
        remaining=remaining,
        available_from=available_from,
        expires_at=expires_at,
        matured=matured,
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
    negative balance. Points whose expiry has passed already (a late purchase) expire at once, as the expiry job
    would expire them, so they are never spendable. Locks the account row (opened on first use). On PostgreSQL in
    one statement, and a few more when the points expire at once."""
    assert points > 0
    entry = Entry(account_id=member_id, kind=kind, points=points, occurred_at=occurred_at, created_at=now, **fields)
    credit = _credit_in_one_statement if connection.vendor == "postgresql" else _credit_in_steps
    entry = credit(entry, available_from=available_from, expires_at=expires_at, now=now)
    if expires_at is not None and expires_at <= now and entry.lot.remaining:
        lots_expire([entry.lot], now=now)
    return entry


def _credit_in_steps(entry: Entry, *, available_from, expires_at, now) -> Entry:
    """ledger_credit's writes where the embedded SQLite default has no data-modifying WITH: the same writes step by
    step."""
    points, matured = entry.points, available_from <= now
    after = _lock_and_add(
        entry.account_id,
        available=points if matured else 0,
        pending=0 if matured else points,
        lifetime=points if entry.kind in LIFETIME_KINDS else 0,
    )
    entry.available_after, entry.pending_after, entry.held_after = after.available, after.pending, after.held
    entry.save(force_insert=True)
    # What the balance owed before this credit is paid from the new lot.
    settle = min(points, max(0, points - after.available)) if matured else 0
    lot = _lot(entry, points - settle, available_from=available_from, expires_at=expires_at, matured=matured)
    lot.save(force_insert=True)
    if settle:
        Draw.objects.create(entry=entry, lot=lot, points=settle)
    return entry


def _credit_in_one_statement(entry: Entry, **credit) -> Entry:
    """ledger_credit's writes on PostgreSQL: one round trip, two when the account is opened first."""
    ctes, params = _credit_ctes(entry, account=("member_id = %s", [entry.account_id]), **credit)
    sql = f"WITH {ctes} SELECT e.id, e.available_after, e.pending_after, e.held_after, l.remaining FROM e, l"
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        row = cursor.fetchone()
        if row is None:  # no account yet
            Account.objects.bulk_create([Account(member_id=entry.account_id)], ignore_conflicts=True)
            cursor.execute(sql, params)
            row = cursor.fetchone()
    return _credited(entry, row, **credit)


_SHORT = "a condition of the statement failed"  # loyalty_statement_abort's message (migration 0013)


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
    also: tuple[str, list, str] | None = None,
    **fields,
) -> Entry | None:
    """INSERT the unsaved transaction `txn` (a purchase) of `member` and credit `points` for it as ledger_credit does,
    in a single statement: the transaction, the account's balances (row-locked), the entry, its lot and the draw
    that settles a negative balance. One round trip that needs no database transaction around it, where the general
    path takes several. `member` is the member's id, or a query selecting it as `id` with its parameters, which
    saves reading the member first; a query that finds no one writes nothing. The INSERT is `ON CONFLICT DO
    NOTHING`; when it inserts nothing, or the member has no account yet, nothing at all is written and None is
    returned: the caller takes the general path. So it is, without a statement, for points already expired
    (`expires_at` <= `now`, a late purchase): ledger_credit expires them at once in the credit's own transaction.
    PostgreSQL only (data-modifying WITH). Sets `txn.pk` and `txn.member_id`.

    `also` adds writes of the caller's to the statement: common table expressions after the credit's own (they may
    read `a`, the account's row as updated, which orders their locks after the account's), their parameters, and a
    condition over them that the statement must meet. When it does not, the statement undoes itself (it raises in
    the database, loyalty_statement_abort) and None is returned, with nothing written either."""
    assert points > 0 and on_postgresql()
    if expires_at is not None and expires_at <= now:
        return None
    member_sql, member_params = ("SELECT %s::bigint AS id", [member]) if isinstance(member, int) else member
    entry = unsaved(Entry, kind=kind, points=points, occurred_at=occurred_at, created_at=now, **fields)
    also_ctes, also_params, also_condition = also or ("", [], "")
    sql, r_plan, e_plan = _new_transaction_sql(type(txn), member_sql, also_ctes, also_condition)
    params = [*member_params, *insert_params(txn, r_plan)]
    params += _credit_params(entry, e_plan, [], available_from, expires_at, now)
    try:
        # Inside a caller's database transaction, a failed statement would spoil it: a savepoint keeps it apart.
        with transaction.atomic() if also and connection.in_atomic_block else nullcontext():
            with statement_cursor() as cursor:
                cursor.execute(sql, [*params, *also_params])
                found = cursor.fetchone()
    except DatabaseError as exc:
        if getattr(exc.__cause__, "sqlstate", None) != "LY001":
            raise
        return None
    if found is None:
        return None
    txn.pk, txn.member_id = found[:2]
    txn._state.adding = False
    entry.account_id, entry.transaction = txn.member_id, txn
    # The entry alone, without an instance of its lot: the caller knows when its points mature.
    entry.pk, entry.available_after, entry.pending_after, entry.held_after = found[2:6]
    entry._state.adding = False
    return entry


@lru_cache(maxsize=256)
def _new_transaction_sql(model: type[Model], member_sql: str, also_ctes: str, also_condition: str) -> tuple:
    """ledger_credit_new_transaction's statement, and the plans of the transaction's and the entry's fields it takes
    as parameters: the same for every purchase written the same way, so built once."""
    r_plan, r_columns = insert_plan(model)
    # The transaction's member comes from the statement itself.
    r_values = ["m.id" if f.attname == "member_id" else "%s" for f, _ in r_plan]
    ctes, e_plan = _credit_sql(
        " FROM r", f"{Account._meta.db_table}.member_id = r.member_id", "r, a", (("transaction_id", "r.id"),)
    )
    if also_condition:
        # A scalar subquery, so PostgreSQL weighs the condition once, not once per row it guesses the join gives:
        # the plan's cost then no longer depends on the parameters' values, and PostgreSQL keeps the generic plan
        # of the prepared statement. Weighed per row, where the tables had no statistics, the plan for the actual
        # values always looked cheaper, and each purchase was planned anew (docs/benchmarks.md, fourth round).
        # Where `r` wrote nothing (an unknown member, a guard that failed, a repeat) nothing else was written
        # either, and the statement returns no row without undoing itself.
        also_condition = (
            f"(SELECT CASE WHEN NOT EXISTS (SELECT FROM r) OR {also_condition} THEN true "
            f"ELSE loyalty_statement_abort('{_SHORT}') END)"
        )
    sql = (
        f"WITH m AS ({member_sql}), "
        f"r AS (INSERT INTO {model._meta.db_table} ({r_columns}) "
        f"SELECT {', '.join(r_values)} FROM m WHERE EXISTS "
        f"(SELECT 1 FROM {Account._meta.db_table} WHERE member_id = m.id) "
        f"{ON_REPEAT} RETURNING id, member_id), {ctes}{', ' if also_ctes else ''}{also_ctes} "
        "SELECT r.id, r.member_id, e.id, e.available_after, e.pending_after, e.held_after "
        f"FROM r, e, l WHERE {also_condition or 'true'}"
    )
    return sql, [(f, how) for f, how in r_plan if f.attname != "member_id"], e_plan


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
    available lots; what is still missing makes the balance negative if `allow_negative`, else is forgiven, as are
    points open holds set aside (they stay covered). Returns the reversal entry, or None when nothing could be
    taken. Locks the account row."""
    assert points > 0
    before = ledger_lock(member_id)
    lot = Lot.objects.filter(entry_id=earn_entry_id).first() if earn_entry_id else None
    from_pending = min(points, lot.remaining) if lot is not None and not lot.matured else 0
    from_available = points - from_pending if allow_negative else min(points - from_pending, before.spendable)
    taken = from_pending + from_available
    if taken == 0:
        return None
    after = _lock_and_add(member_id, available=-from_available, pending=-from_pending, lifetime=-taken)
    entry = _entry(member_id, Entry.Kind.REVERSAL, -taken, after, occurred_at=occurred_at, now=now, **fields)
    if from_pending:
        Lot.objects.filter(pk=lot.pk).update(remaining=F("remaining") - from_pending)
        Draw.objects.create(entry=entry, lot=lot, points=from_pending)
    if from_available:
        # Matured lots hold max(available, 0): what is taken beyond it (allow_negative) is owed, not drawn.
        in_lots = max(before.available, 0)
        _draw(member_id, entry, min(from_available, in_lots), first_lot_ids=(lot.pk,) if lot else ())
    return entry
