"""Holds, hot-path spends and refunds (rewards: paying with points, cancelled redemptions)."""

from datetime import datetime

from django.db import connection, transaction
from django.db.models import F, Model
from django.utils import timezone

from core.db import insert_params, insert_plan
from core.errors import InsufficientPoints
from loyalty.ledger.core import Balance, _draw, _entry, _lock_and_add, _lock_and_spend
from loyalty.models import Account, Draw, Entry, Lot

# Holds and refunds (rewards: paying with points, cancelled redemptions). A hold is a reservation, not a ledger
# movement: it only raises Account.held, which ledger_debit counts out of what may be spent. Capturing a hold is
# the spend, as a redeem entry that lowers `held` in the same statement.
#
# The rewards hot paths (redemptions, holds) use compare-and-set: one UPDATE ... WHERE <affordable> RETURNING both
# locks the account and writes it, or changes nothing. A refusal then has nothing to roll back, so these functions
# need no savepoint of their own, and the spend's entry, lot draws and draw rows go in one more statement.

# What must be true of the account row, before the write, for each compare-and-set.
_SPENDABLE = "available - held >= %s"  # a spend or a new hold: points not set aside by other holds
_AVAILABLE = "available >= %s"  # a capture: the hold's own points, set aside for it


def _spend_if(
    member_id: int, *, points: int, unhold: int, condition: str, need: int, record: Model | None = None
) -> Balance | None:
    """Compare-and-set: lock the account and take `points` from available and `unhold` from held if `condition`
    holds for `need` on the row as locked; returns the balances after, or None (nothing written) if it does not, or
    if the account was never opened (an unopened account has no points to spend or hold). `record`, an unsaved model
    instance, is INSERTed in the same statement if and only if the account was written; its pk is set."""
    sql = (
        f"UPDATE {Account._meta.db_table} SET available = available - %s, held = held - %s, updated_at = %s "
        f"WHERE member_id = %s AND {condition} RETURNING available, pending, held"
    )
    params = [points, unhold, timezone.now(), member_id, need]
    if record is not None and connection.vendor != "postgresql":
        # The embedded SQLite default has no data-modifying WITH: the same two writes, one transaction.
        with transaction.atomic(savepoint=False):
            after = _spend_if(member_id, points=points, unhold=unhold, condition=condition, need=need)
            if after is not None:
                record.save(force_insert=True)
        return after
    if record is not None:
        plan, columns = insert_plan(type(record))
        sql = (
            f"WITH a AS ({sql}), r AS (INSERT INTO {record._meta.db_table} ({columns}) "
            f"SELECT {', '.join(['%s'] * len(plan))} FROM a RETURNING id) "
            "SELECT a.available, a.pending, a.held, r.id FROM a, r"
        )
        params += insert_params(record, plan)
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        row = cursor.fetchone()
    if row is None:
        return None
    if record is not None:
        record.pk, row = row[3], row[:3]
        record._state.adding = False
    return Balance(*row)


def _insufficient(member_id: int, points: int, *, of_held: bool = False) -> InsufficientPoints:
    """The refusal of a compare-and-set that did not match, naming what the member has now."""
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT available, held FROM {Account._meta.db_table} WHERE member_id = %s", [member_id])
        available, held = cursor.fetchone() or (0, 0)
    if of_held:
        available = max(available, 0)
        return InsufficientPoints(
            f"{points} held points to capture, {available} still available.", available=available, requested=points
        )
    available = max(available - held, 0)
    return InsufficientPoints(
        f"{points} points requested, {available} available.", available=available, requested=points
    )


def _insert_spend(
    member_id: int,
    kind: str,
    points: int,
    after: Balance,
    *,
    link: Model | None = None,
    chain: tuple[tuple[Model, str], ...] = (),
    **fields,
) -> Entry:
    """INSERT a spend's entry and take its `points` from the member's matured lots, soonest to expire first (as
    _draw does), with their draw rows, in one statement. The caller holds the account lock, which guards every lot
    of the account; the statement starts after the lock was taken, so it sees the lots as the last writer left them.
    `link`, a saved row with an `entry` field, is pointed at the new entry in the same statement. `chain`: unsaved
    rows INSERTed by the same statement, each (row, field) naming by `field` the row before it (the first row: the
    entry); their pks are set. Returns the entry, its id set."""
    entry = Entry(
        account_id=member_id,
        kind=kind,
        points=-points,
        available_after=after.available,
        pending_after=after.pending,
        held_after=after.held,
        **fields,
    )
    if connection.vendor != "postgresql":
        # The embedded SQLite default has no data-modifying WITH: the same writes as plain statements, in the
        # caller's transaction, under the account lock it holds.
        entry.save(force_insert=True)
        if link is not None:
            type(link).objects.filter(pk=link.pk).update(entry=entry)
        previous = entry
        for row, field in chain:
            setattr(row, field, previous)
            row.save(force_insert=True)
            previous = row
        drawn = _draw(member_id, entry, points)
        assert drawn, f"account {member_id} has fewer matured points in lots than available"
        return entry
    plan, columns = insert_plan(Entry)
    lot, draw = Lot._meta.db_table, Draw._meta.db_table
    link_sql, link_params = "", []
    if link is not None:
        column = link._meta.get_field("entry").column
        link_sql = f", k AS (UPDATE {link._meta.db_table} SET {column} = (SELECT id FROM e) WHERE id = %s) "
        link_params = [link.pk]
    chain_sql, chain_params, previous = "", [], "e"
    for i, (row, field) in enumerate(chain):
        plan_i, columns_i = insert_plan(type(row), frozenset({field}))
        column = row._meta.get_field(field).column
        chain_sql += (
            f", c{i} AS (INSERT INTO {row._meta.db_table} ({columns_i}, {column}) "
            f"SELECT {', '.join(['%s'] * len(plan_i))}, {previous}.id FROM {previous} RETURNING id)"
        )
        chain_params += insert_params(row, plan_i)
        previous = f"c{i}"
    chain_ids = "".join(f", (SELECT id FROM c{i})" for i in range(len(chain)))
    sql = (
        f"WITH e AS (INSERT INTO {Entry._meta.db_table} ({columns}) "
        f"VALUES ({', '.join(['%s'] * len(plan))}) RETURNING id), "
        # `before`: what the lots ahead of this one hold; a lot gives what is still missing once they are used up.
        # A lot is keyed by its credit's entry, which orders lots as they were credited.
        "l AS (SELECT entry_id, remaining, "
        "SUM(remaining) OVER (ORDER BY expires_at ASC NULLS LAST, entry_id) - remaining AS before "
        f"FROM {lot} WHERE account_id = %s AND matured AND remaining > 0), "
        "t AS (SELECT entry_id, before, LEAST(remaining, %s - before) AS take FROM l WHERE before < %s), "
        f"u AS (UPDATE {lot} SET remaining = {lot}.remaining - t.take FROM t WHERE {lot}.entry_id = t.entry_id)"
        f"{link_sql}{chain_sql}, "
        f"d AS (INSERT INTO {draw} (entry_id, lot_id, points) "
        "SELECT e.id, t.entry_id, t.take FROM e, t ORDER BY t.before RETURNING entry_id) "
        f"SELECT (SELECT id FROM e), (SELECT COUNT(*) FROM d){chain_ids}"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [*insert_params(entry, plan), member_id, points, points, *link_params, *chain_params])
        entry_id, drawn, *chain_ids = cursor.fetchone()
    # No draw is ruled out by the balance invariant after a successful compare-and-set.
    assert drawn, f"account {member_id} has fewer matured points in lots than available"
    entry.pk = entry_id
    entry._state.adding = False
    previous = entry
    for (row, field), pk in zip(chain, chain_ids, strict=True):
        setattr(row, field, previous)
        row.pk, row._state.adding = pk, False
        previous = row
    return entry


def ledger_balance(*, member_id: int) -> Balance:
    """The member's balances as they are now, without locking (for answers, not decisions)."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT available, pending, held FROM {Account._meta.db_table} WHERE member_id = %s", [member_id]
        )
        row = cursor.fetchone()
    return Balance(*(row or (0, 0, 0)))


def ledger_spend(
    *,
    member_id: int,
    kind: str,
    points: int,
    occurred_at: datetime,
    now: datetime,
    chain: tuple[tuple[Model, str], ...] = (),
    **fields,
) -> tuple[Entry, Balance]:
    """ledger_debit for hot paths: spend available points not held, soonest-to-expire lots first, in two statements
    and no savepoint. Refuses with InsufficientPoints, changing nothing. Returns the entry and the balances right
    after it. Locks the account row (until the caller's transaction ends: a later refusal of the caller rolls the
    spend back with it). `chain`: rows that record the spend, written by the same statement as its entry (see
    _insert_spend), so the account stays locked for one statement less."""
    assert points > 0
    # The refusal is raised outside the block: nothing was written, so the caller's transaction stays usable.
    with transaction.atomic(savepoint=False):
        after = _spend_if(member_id, points=points, unhold=0, condition=_SPENDABLE, need=points)
        if after is not None:
            entry = _insert_spend(
                member_id, kind, points, after, chain=chain, occurred_at=occurred_at, created_at=now, **fields
            )
    if after is None:
        raise _insufficient(member_id, points)
    return entry, after


def ledger_hold(*, member_id: int, points: int, record: Model | None = None) -> Balance:
    """Set `points` aside from what the member may spend. Refuses with InsufficientPoints, changing nothing, when
    fewer are spendable (available less already held). Locks the account row. `record`, an unsaved model instance
    (the hold's own row), is INSERTed in the same statement if the points were set aside, and its pk set: one
    statement, atomic by itself, so a hold needs no transaction of its own."""
    assert points > 0
    # held + p only where available - held >= p, decided on the row as locked: a racing hold or spend waits on the
    # row lock and is then checked against this one's result.
    after = _spend_if(member_id, points=0, unhold=-points, condition=_SPENDABLE, need=points, record=record)
    if after is None:
        raise _insufficient(member_id, points)
    return after


def ledger_unhold(*, member_id: int, points: int, claim: tuple[str, list] | None = None) -> Balance | None:
    """Give back points a hold set aside (release or lapse): they become spendable again. Locks the account row.
    The caller must have claimed the hold first, so its points are given back once; or passes `claim`, its
    compare-and-set UPDATE (SQL without RETURNING, and params), which the same statement runs first: the points are
    given back if and only if it changed a row, else None is returned and nothing changed. One statement, atomic
    by itself; the claimed row is locked before the account, as when the caller claims first."""
    assert points > 0
    if claim is None:
        with transaction.atomic(savepoint=False):
            return _lock_and_spend(member_id, points=0, unhold=points)
    claim_sql, claim_params = claim
    if connection.vendor != "postgresql":
        # The embedded SQLite default has no data-modifying WITH: the claim, then the account, in one transaction.
        with transaction.atomic(savepoint=False), connection.cursor() as cursor:
            cursor.execute(claim_sql, claim_params)
            return _lock_and_spend(member_id, points=0, unhold=points) if cursor.rowcount else None
    with connection.cursor() as cursor:
        cursor.execute(
            f"WITH c AS ({claim_sql} RETURNING 1) UPDATE {Account._meta.db_table} SET held = held - %s, "
            "updated_at = %s WHERE member_id = %s AND EXISTS (SELECT FROM c) RETURNING available, pending, held",
            [*claim_params, points, timezone.now(), member_id],
        )
        row = cursor.fetchone()
    return None if row is None else Balance(*row)


def ledger_capture(
    *,
    member_id: int,
    held: int,
    points: int,
    kind: str,
    occurred_at: datetime,
    now: datetime,
    link: Model | None = None,
    **fields,
) -> tuple[Entry, Balance]:
    """Spend `points` (at most `held`) that a hold set aside, as an entry of `kind`, and give the hold's `held` points
    back from the held total, in one statement. Refuses with InsufficientPoints, changing nothing here, when the
    points are no longer available (they expired or a return took them back while held). Returns the entry and the
    balances right after it. Locks the account row. `link`, a saved row with an `entry` field (the hold), is pointed
    at the new entry by the same statement that writes it."""
    assert 0 < points <= held
    # Only this hold's own points are checked: they were set aside, so other holds have no claim on them.
    with transaction.atomic(savepoint=False):
        after = _spend_if(member_id, points=points, unhold=held, condition=_AVAILABLE, need=points)
        if after is not None:
            entry = _insert_spend(
                member_id, kind, points, after, link=link, occurred_at=occurred_at, created_at=now, **fields
            )
    if after is None:
        raise _insufficient(member_id, points, of_held=True)
    return entry, after


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
