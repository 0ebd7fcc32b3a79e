"""Referral rewards. Who referred whom is members' business (Member.referred_by, set at enrolment or shortly after,
where self-referral, loops and a second referrer are refused); this module gives both members their points when the
referee makes their first qualifying purchase.

A return that completes the return of the qualifying purchase takes both members' referral points back
(referral_on_return), under the programme's return policy: buying to trigger a referral and returning the goods must
not pay. A partial return keeps them, as does the referee's next purchase: a referral is rewarded once, and undone
once."""

from datetime import datetime

from django.db import connection

from core.models import Program
from loyalty import ledger
from loyalty.earning import earning_for_purchase
from loyalty.event_models import Referral
from loyalty.models import Entry, Transaction
from members.models import Member


def referral_on_purchase(*, program: Program, member: Member | None, transaction: Transaction, now: datetime) -> None:
    """Reward the referral of `member` if `transaction` is their first purchase of at least the programme's minimum.
    Runs inside the purchase's database transaction, before the purchase takes any account lock. Costs no query when
    referrals are off, the member was not referred or the purchase is too small, and one to find there is nothing to
    do. Rewards at most once, whatever races: the referee is unique among referrals. Opens both accounts, then
    locks them (ledger_lock_many)."""
    if member is None or member.referred_by_id is None or not program.referrals_enabled:
        return
    if transaction.total < program.referral_min_purchase:
        return
    claimed = _claim(program, member, transaction, now)
    if claimed is None:
        return
    referral_id, referrer_points, referee_points = claimed
    # Both opened, then both locked, each in key order, like every path that locks several accounts.
    ledger.ledger_lock_many(member_ids=(member.pk, member.referred_by_id))
    earning = earning_for_purchase(program=program, total=transaction.total, occurred_at=transaction.occurred_at)
    entries = {}
    for role, member_id, points, reason in (
        ("referrer_entry", member.referred_by_id, referrer_points, f"Referral: member {member.member_number} joined"),
        ("referee_entry", member.pk, referee_points, "Referral: welcome bonus for joining with a code"),
    ):
        if points:
            entries[role] = ledger.ledger_credit(
                member_id=member_id,
                kind=Entry.Kind.BONUS,
                points=points,
                occurred_at=transaction.occurred_at,
                available_from=earning.available_from,
                expires_at=earning.expires_at,
                now=now,
                reason=reason,
            )
    if entries:
        Referral.objects.filter(pk=referral_id).update(**entries)


def _claim(program: Program, member: Member, transaction: Transaction, now: datetime) -> tuple[int, int, int] | None:
    """Insert the rewarded referral in one statement, or nothing when the member made a qualifying purchase before
    or their referral was already rewarded. A referrer who is no longer active gets no points; the referee still
    does. Returns (id, referrer points, referee points)."""
    r, t, m = Referral._meta.db_table, Transaction._meta.db_table, Member._meta.db_table
    sql = f"""
        INSERT INTO {r} (program_id, referrer_id, referee_id, transaction_id, referrer_points, referee_points,
                         created_at)
        SELECT %(program)s, ref.id, %(referee)s, %(txn)s,
               CASE WHEN ref.status = %(active)s THEN %(referrer_points)s ELSE 0 END, %(referee_points)s, %(now)s
        FROM {m} ref
        WHERE ref.id = %(referrer)s AND NOT EXISTS (
            SELECT 1 FROM {t} earlier WHERE earlier.member_id = %(referee)s AND earlier.kind = %(purchase)s
              AND earlier.total >= %(minimum)s AND earlier.id <> %(txn)s)
        ON CONFLICT DO NOTHING
        RETURNING id, referrer_points, referee_points"""
    params = {
        "program": program.pk,
        "referee": member.pk,
        "referrer": member.referred_by_id,
        "txn": transaction.pk,
        "active": Member.Status.ACTIVE,
        "referrer_points": program.referral_referrer_points,
        "referee_points": program.referral_referee_points,
        "now": now,
        "purchase": Transaction.Kind.PURCHASE,
        "minimum": program.referral_min_purchase,
    }
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchone()


def referral_on_return(*, program: Program, original: Transaction, returned_total, now: datetime, **reversal) -> None:
    """Take back the referral points that `original` gave, if the return being recorded (`reversal["transaction"]`)
    completes its return (`returned_total`). Runs inside the return's database transaction, which holds the
    purchase's row, before the return takes any account lock: it opens both members' accounts, then locks them
    (ledger_lock_many). `reversal`: ledger_reverse's occurred_at and the return's transaction."""
    if returned_total < original.total or original.member is None or original.member.referred_by_id is None:
        return  # only a referred member's purchase can have rewarded a referral: no query for the others
    referral = Referral.objects.filter(transaction=original, undone_by__isnull=True).first()
    if referral is None:
        return
    ledger.ledger_lock_many(member_ids=(referral.referrer_id, referral.referee_id))
    allow_negative = program.return_policy == Program.ReturnPolicy.ALLOW_NEGATIVE
    txn = reversal.pop("transaction")
    for member_id, entry_id, points in (
        (referral.referrer_id, referral.referrer_entry_id, referral.referrer_points),
        (referral.referee_id, referral.referee_entry_id, referral.referee_points),
    ):
        if entry_id is not None:
            ledger.ledger_reverse(
                member_id=member_id,
                points=points,
                earn_entry_id=entry_id,
                allow_negative=allow_negative,
                now=now,
                reason=f"Referral undone: purchase {original.external_id} returned",
                **reversal,
            )
    Referral.objects.filter(pk=referral.pk).update(undone_by=txn)
