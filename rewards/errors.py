"""Errors of the rewards capability: branches of core.errors' one tree, each with a stable code."""

from core.errors import Conflict, InvalidInput, NotFound, Unprocessable


class RewardNotFound(NotFound):
    code, title = "reward_not_found", "No such reward"


class RewardNotAvailable(Conflict):
    code, title = "reward_not_available", "The reward cannot be redeemed now"


class OutOfStock(Conflict):
    code, title = "out_of_stock", "The reward is out of stock"


class RedemptionLimitReached(Conflict):
    code, title = "redemption_limit_reached", "The member has redeemed this reward as often as allowed"


class TierNotEligible(Conflict):
    code, title = "tier_not_eligible", "The member's tier may not redeem this reward"


class RedemptionNotFound(NotFound):
    code, title = "redemption_not_found", "No such redemption"


class RedemptionNotCancellable(Conflict):
    code, title = "redemption_not_cancellable", "The redemption's voucher has been used"


class InvalidVoucherCode(InvalidInput):
    code, title = "invalid_voucher_code", "This is not a valid voucher code"


class VoucherNotFound(NotFound):
    code, title = "voucher_not_found", "No such voucher"


class VoucherUsed(Conflict):
    code, title = "voucher_used", "The voucher has been used"


class VoucherExpired(Conflict):
    code, title = "voucher_expired", "The voucher has expired"


class VoucherCancelled(Conflict):
    code, title = "voucher_cancelled", "The voucher was cancelled"


class VoucherNotRestorable(Conflict):
    code, title = "voucher_not_restorable", "The voucher cannot be given back"


class BasketBelowMinimum(Unprocessable):
    code, title = "basket_below_minimum", "The purchase is below the voucher's minimum basket"


class HoldNotFound(NotFound):
    code, title = "hold_not_found", "No such hold"


class HoldClosed(Conflict):
    """The hold is no longer open; `code` says how it closed (hold_captured, hold_released, hold_lapsed)."""

    code, title = "hold_closed", "The hold is no longer open"
