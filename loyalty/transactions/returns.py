"""Returns: a return reverses its purchase's points in proportion to what it gives back, never more than the purchase
earned, whatever returns come at once."""

from django.db import transaction

from core.errors import Unprocessable
from core.models import Program
from loyalty import ledger, referrals, tiers
from loyalty.earning import reversal_for_return
from loyalty.models import Entry, Transaction
from loyalty.transactions.common import (
    TransactionInput,
    TransactionResult,
    insert_ignoring_conflict,
    new_transaction,
    replay,
    result_of,
)


@transaction.atomic
def record_return(program, data, api_client, now) -> TransactionResult:
    # Locking the purchase serialises its returns, so together they never reverse more than it earned.
    original = _original_for_update(program, data)
    # A return sent again must be answered with its first result before the checks below, which would refuse a
    # repeat of a full return as exceeding the purchase. Looking first is race-free here: the lock on the purchase
    # has made any earlier copy of this return commit already.
    if Transaction.objects.filter(program=program, store=data.store, external_id=data.external_id).exists():
        return replay(program, data)
    member = original.member
    if data.member is not None and data.member.pk != original.member_id:
        raise Unprocessable(
            "The return names another member than the purchase.",
            code="member_mismatch",
            errors={"member": ["Differs from the purchase's member."]},
        )
    returned_total = original.returned_total + data.total
    if returned_total > original.total:
        raise Unprocessable(
            f"Purchase {original.external_id} had {original.total - original.returned_total} left to return, "
            f"not {data.total}.",
            code="return_exceeds_purchase",
            errors={"total": [f"At most {original.total - original.returned_total}."]},
        )
    to_reverse = reversal_for_return(
        earned=original.points,
        already_reversed=original.points_reversed,
        purchase_total=original.total,
        returned_total=returned_total,
    )
    txn = new_transaction(
        program,
        data,
        api_client,
        now,
        member=member,
        original=original,
        points=-to_reverse,
        breakdown=_return_breakdown(original, to_reverse),
    )
    txn.pk = insert_ignoring_conflict(txn)
    if txn.pk is None:
        return replay(program, data)
    # Before any account lock of this return: it locks the referrer's and this member's accounts in key order.
    referrals.referral_on_return(
        program=program,
        original=original,
        returned_total=returned_total,
        now=now,
        transaction=txn,
        occurred_at=data.occurred_at,
    )
    Transaction.objects.filter(pk=original.pk).update(
        returned_total=returned_total, points_reversed=original.points_reversed + to_reverse
    )
    entry = None
    if to_reverse:
        earn = Entry.objects.filter(transaction=original, kind=Entry.Kind.EARN).values_list("pk", flat=True).first()
        entry = ledger.ledger_reverse(
            member_id=member.pk,
            points=to_reverse,
            earn_entry_id=earn,
            allow_negative=program.return_policy == Program.ReturnPolicy.ALLOW_NEGATIVE,
            occurred_at=data.occurred_at,
            now=now,
            transaction=txn,
            api_client=api_client,
        )
    if member is not None and program.has_tiers:
        tiers.tier_on_transaction(transaction=txn, now=now)
    return result_of(txn, created=True, entry=entry, forgiven=to_reverse + (entry.points if entry else 0))


def _return_breakdown(original: Transaction, to_reverse: int) -> list[dict]:
    """A return's lines: the points it takes back shared among its purchase's lines (base, tier, each rule) in
    proportion to what each has still to give back, largest remainders rounded up, so they add up exactly; a
    return explains itself as its purchase does, and returns that end in a full return take back every line whole.
    A return's lines are negative."""
    left: dict[str, int] = {}
    for line in original.breakdown:
        left[line["rule"]] = left.get(line["rule"], 0) + line["points"]
    for lines in Transaction.objects.filter(original=original).values_list("breakdown", flat=True):
        for line in lines:
            if line["rule"] in left:
                left[line["rule"]] += line["points"]
    left = {code: points for code, points in left.items() if points > 0}
    whole = sum(left.values())
    if not to_reverse or not whole:
        return []
    shares = {code: to_reverse * points // whole for code, points in left.items()}
    by_remainder = sorted(left, key=lambda code: -(to_reverse * left[code] % whole))
    for code in by_remainder[: to_reverse - sum(shares.values())]:
        shares[code] += 1
    return [{"rule": code, "points": -points} for code, points in shares.items() if points]


def _original_for_update(program: Program, data: TransactionInput) -> Transaction:
    if not data.original_external_id:
        raise Unprocessable(
            "A return names the purchase it returns.",
            code="original_required",
            errors={"original_external_id": ["This field is required for returns."]},
        )
    candidates = Transaction.objects.filter(
        program=program, kind=Transaction.Kind.PURCHASE, external_id=data.original_external_id
    )
    if data.original_store:
        candidates = candidates.filter(store=data.original_store)
    found = list(candidates.values_list("pk", "store")[:50])
    if len(found) > 1:
        found = [f for f in found if f[1] == data.store] or found
    if not found:
        raise Unprocessable(
            f"No purchase {data.original_external_id} to return.",
            code="original_not_found",
            errors={"original_external_id": ["No such purchase."]},
        )
    if len(found) > 1:
        raise Unprocessable(
            f"Several stores sent purchase {data.original_external_id}; name the store with original_store.",
            code="original_ambiguous",
            errors={"original_store": ["Required: the external id is not unique across stores."]},
        )
    return Transaction.objects.select_for_update(of=("self",)).select_related("member").get(pk=found[0][0])
