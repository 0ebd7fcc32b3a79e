"""Vouchers at the till: consumed once, linked to the purchase; given back when that purchase is returned, if the
programme's voucher return policy says so."""

from datetime import datetime
from decimal import Decimal

from django.db import transaction
from django.db.models import F
from django.utils import timezone

from core.errors import InvalidInput
from core.models import Program
from rewards.errors import BasketBelowMinimum, VoucherCancelled, VoucherExpired, VoucherNotRestorable, VoucherUsed
from rewards.models import Voucher
from rewards.selectors import voucher_get


def _refusal(voucher: Voucher, now: datetime) -> Exception:
    if voucher.status == Voucher.Status.USED:
        return VoucherUsed(
            f"Used at store {voucher.used_store} in purchase {voucher.used_transaction_external_id} "
            f"at {voucher.used_at.isoformat()}.",
            used_at=voucher.used_at.isoformat(),
        )
    if voucher.status == Voucher.Status.CANCELLED:
        return VoucherCancelled("The redemption was cancelled and its points refunded.")
    return VoucherExpired(f"Expired at {voucher.expires_at.isoformat()}.", expired_at=voucher.expires_at.isoformat())


@transaction.atomic
def voucher_consume(
    *,
    program: Program,
    code: str,
    store: str,
    transaction_external_id: str,
    basket_total: Decimal | None = None,
    now: datetime | None = None,
) -> Voucher:
    """Use the voucher in the purchase (store, transaction_external_id). Once: a repeat for the same purchase returns
    the same voucher; any other use is VoucherUsed; cancelled or expired vouchers are refused. Claims the voucher
    by compare-and-set, so of two tills consuming it at once exactly one succeeds."""
    now = now or timezone.now()
    store, transaction_external_id = store.strip(), transaction_external_id.strip()
    errors = {}
    if not store:
        errors["store"] = ["This field may not be blank."]
    if not transaction_external_id:
        errors["transaction_external_id"] = ["This field may not be blank."]
    if errors:
        raise InvalidInput("The consume request is not valid.", errors=errors)
    voucher = voucher_get(program=program, code=code)
    purchase = (store, transaction_external_id)
    if voucher.status == Voucher.Status.USED and (voucher.used_store, voucher.used_transaction_external_id) == purchase:
        return voucher
    reward = voucher.redemption.reward
    if voucher.status == Voucher.Status.ISSUED and voucher.expires_at > now and reward.min_basket is not None:
        if basket_total is None:
            raise InvalidInput(
                f"This voucher needs a basket of at least {reward.min_basket}; send basket_total.",
                errors={"basket_total": ["Required for this voucher."]},
            )
        if basket_total < reward.min_basket:
            raise BasketBelowMinimum(
                f"The basket of {basket_total} is below the voucher's minimum of {reward.min_basket}.",
                errors={"basket_total": [f"At least {reward.min_basket}."]},
            )
    claimed = Voucher.objects.filter(pk=voucher.pk, status=Voucher.Status.ISSUED, expires_at__gt=now).update(
        status=Voucher.Status.USED, used_at=now, used_store=store, used_transaction_external_id=transaction_external_id
    )
    voucher.refresh_from_db()
    if claimed:
        return voucher
    # Lost the claim, or there was none to win: the row as it is now says why (or that a racing repeat of the very
    # same purchase won, which is the same answer).
    if voucher.status == Voucher.Status.USED and (voucher.used_store, voucher.used_transaction_external_id) == purchase:
        return voucher
    raise _refusal(voucher, now)


def voucher_check(*, voucher: Voucher, now: datetime | None = None) -> Exception | None:
    """Why the voucher cannot be consumed now, or None when it can (for look-ups at the till)."""
    now = now or timezone.now()
    if voucher.status == Voucher.Status.ISSUED and voucher.expires_at > now:
        return None
    return _refusal(voucher, now)


@transaction.atomic
def voucher_restore(*, program: Program, code: str, store: str, transaction_external_id: str) -> Voucher:
    """Give back a voucher used in a purchase that was returned, when the programme's voucher return policy allows it;
    it keeps its original expiry. Idempotent. VoucherNotRestorable otherwise, changing nothing."""
    if program.voucher_return_policy != Program.VoucherReturnPolicy.RESTORE:
        raise VoucherNotRestorable("This programme does not give vouchers back when a purchase is returned.")
    voucher = voucher_get(program=program, code=code)
    if _restore(Voucher.objects.filter(pk=voucher.pk), store.strip(), transaction_external_id.strip()):
        voucher.refresh_from_db()
        return voucher
    if voucher.status == Voucher.Status.ISSUED and voucher.restored_count > 0:
        return voucher
    raise VoucherNotRestorable(
        f"The voucher was not used in purchase {transaction_external_id} at store {store}.",
        status_now=voucher.status,
    )


def vouchers_restore_for_purchase(*, program: Program, store: str, transaction_external_id: str) -> int:
    """For the returns path: give back every voucher used in this purchase if the programme's policy says so.
    Returns how many came back. Safe to call twice (a second call finds none still used)."""
    if program.voucher_return_policy != Program.VoucherReturnPolicy.RESTORE:
        return 0
    return _restore(Voucher.objects.filter(program=program), store, transaction_external_id)


def _restore(vouchers, store: str, transaction_external_id: str) -> int:
    # Compare-and-set on (status, purchase): a restore racing another restore or a consume changes the row once.
    return vouchers.filter(
        status=Voucher.Status.USED, used_store=store, used_transaction_external_id=transaction_external_id
    ).update(
        status=Voucher.Status.ISSUED,
        used_at=None,
        used_store="",
        used_transaction_external_id="",
        restored_count=F("restored_count") + 1,
    )
