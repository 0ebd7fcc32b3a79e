"""What the rewards endpoints share: resolving members named in requests, and the shapes of answers."""

from core.errors import MemberNotFound, Unprocessable
from loyalty.account_api import balance_output as _balance_output
from loyalty.ledger import Balance, ledger_balance
from members.models import Member
from members.selectors import member_get
from rewards.codes import voucher_code_display
from rewards.models import Reward, Voucher


def member_from_body(request, member_number: str, *, field: str = "member") -> Member:
    """A member named in a request body or query: unknown is a 422 on that field, not a 404 of the resource."""
    try:
        return member_get(program=request.auth.program, member_number=member_number)
    except MemberNotFound as exc:
        raise Unprocessable(exc.detail, code="unknown_member", errors={field: [exc.detail]}) from exc


def balance_output(balance: Balance | None = None, *, member_id: int | None = None) -> dict:
    """The balances given, or the member's balances now."""
    return _balance_output(balance or ledger_balance(member_id=member_id))


def reward_summary(reward: Reward) -> dict:
    """What a till needs to honour a voucher of this reward."""
    return {
        "code": reward.code,
        "kind": reward.kind,
        "name": reward.text("name"),
        "discount_amount": str(reward.discount_amount) if reward.discount_amount is not None else None,
        "discount_percent": str(reward.discount_percent) if reward.discount_percent is not None else None,
        "min_basket": str(reward.min_basket) if reward.min_basket is not None else None,
        "product_sku": reward.product_sku,
        "partner": reward.partner,
    }


def voucher_output(voucher: Voucher) -> dict:
    used = voucher.status == Voucher.Status.USED
    return {
        "code": voucher_code_display(voucher.code),
        "status": voucher.status,
        "expires_at": voucher.expires_at.isoformat(),
        "member": voucher.redemption.member.member_number,
        "redemption": voucher.redemption_id,
        "reward": reward_summary(voucher.redemption.reward),
        "used": {
            "at": voucher.used_at.isoformat(),
            "store": voucher.used_store,
            "transaction_external_id": voucher.used_transaction_external_id,
        }
        if used
        else None,
    }
