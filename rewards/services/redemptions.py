"""Redeeming rewards: points spent through the ledger, stock taken atomically, a voucher issued; and cancelling a
redemption whose voucher is unused, which refunds its points."""

from datetime import datetime, timedelta

from django.db import transaction
from django.db.models import F
from django.utils import timezone

from core.errors import MemberNotActive
from core.models import ApiClient
from loyalty import ledger
from loyalty.models import Entry
from members.models import Member
from rewards.codes import voucher_code_new
from rewards.errors import (
    OutOfStock,
    RedemptionLimitReached,
    RedemptionNotCancellable,
    RewardNotAvailable,
    TierNotEligible,
)
from rewards.models import Redemption, Reward, Voucher
from rewards.selectors import member_tier_rank, period_start


def _check_redeemable(reward: Reward, member: Member, now: datetime) -> None:
    if member.status != Member.Status.ACTIVE:
        raise MemberNotActive(f"Member {member.member_number} is {member.status}.")
    if not reward.active:
        raise RewardNotAvailable(f"Reward {reward.code} has been retired.")
    if reward.available_from and now < reward.available_from:
        raise RewardNotAvailable(f"Reward {reward.code} can be redeemed from {reward.available_from.isoformat()}.")
    if reward.available_until and now >= reward.available_until:
        raise RewardNotAvailable(f"Reward {reward.code} could be redeemed until {reward.available_until.isoformat()}.")
    if reward.min_tier_rank is not None:
        rank = member_tier_rank(member=member)
        if rank is None or rank < reward.min_tier_rank:
            raise TierNotEligible(f"Reward {reward.code} needs a tier of rank {reward.min_tier_rank} or higher.")


@transaction.atomic
def reward_redeem(
    *,
    member: Member,
    reward: Reward,
    api_client: ApiClient | None = None,
    staff_user=None,
    now: datetime | None = None,
) -> Redemption:
    """Spend the reward's points (soonest-to-expire lots first) and issue its voucher. Refuses, changing nothing,
    with InsufficientPoints, RewardNotAvailable, TierNotEligible, RedemptionLimitReached or OutOfStock.
    Locks the member's account, then (limited stock only) the reward row: always in that order."""
    now = now or timezone.now()
    _check_redeemable(reward, member, now)
    entry = ledger.ledger_debit(
        member_id=member.pk,
        kind=Entry.Kind.REDEEM,
        points=reward.points_cost,
        occurred_at=now,
        now=now,
        reason=f"Reward {reward.code}"[:500],
        api_client=api_client,
        staff_user=staff_user,
    )
    if reward.member_limit is not None:
        # Counted under the account lock the debit took: two redemptions by one member cannot both see room.
        since = period_start(period=reward.member_limit_period, now=now, tz=member.tz)
        used = Redemption.objects.filter(member=member, reward=reward, status=Redemption.Status.REDEEMED)
        if since is not None:
            used = used.filter(created_at__gte=since)
        if used.count() >= reward.member_limit:
            raise RedemptionLimitReached(
                f"Reward {reward.code} may be redeemed {reward.member_limit} times "
                f"{reward.get_member_limit_period_display().lower()}.",
                limit=reward.member_limit,
                period=reward.member_limit_period,
            )
    if reward.stock is not None:
        # Taken last, so the reward row - shared by every member redeeming it - stays locked for the shortest time.
        if not Reward.objects.filter(pk=reward.pk, stock__gt=0).update(stock=F("stock") - 1):
            raise OutOfStock(f"Reward {reward.code} is out of stock.")
    redemption = Redemption.objects.create(
        program_id=member.program_id,
        member=member,
        reward=reward,
        points=reward.points_cost,
        entry=entry,
        api_client=api_client,
        staff_user=staff_user,
        created_at=now,
    )
    # 75 random bits: a collision is not a practical concern, and the unique index would refuse one.
    Voucher.objects.create(
        program_id=member.program_id,
        redemption=redemption,
        code=voucher_code_new(),
        expires_at=now + timedelta(days=reward.voucher_valid_days),
        created_at=now,
    )
    return redemption


@transaction.atomic
def redemption_cancel(
    *, redemption: Redemption, api_client: ApiClient | None = None, staff_user=None, now: datetime | None = None
) -> Redemption:
    """Cancel a redemption whose voucher is unused (expired or not): its points come back as a refund entry and its
    item back to stock. Idempotent: cancelling again returns the cancelled redemption. RedemptionNotCancellable
    once the voucher is used. Claims the voucher by compare-and-set, then locks the account, then the reward."""
    now = now or timezone.now()
    # The claim races a till consuming the voucher: exactly one of them changes the row.
    if not Voucher.objects.filter(redemption=redemption, status=Voucher.Status.ISSUED).update(
        status=Voucher.Status.CANCELLED
    ):
        redemption.refresh_from_db()
        if redemption.status == Redemption.Status.CANCELLED:
            return redemption
        raise RedemptionNotCancellable(f"The voucher of redemption {redemption.pk} has been used.")
    refund = ledger.ledger_refund(
        spend_entry_id=redemption.entry_id,
        occurred_at=now,
        now=now,
        reason=f"Cancelled redemption {redemption.pk}"[:500],
        api_client=api_client,
        staff_user=staff_user,
    )
    Redemption.objects.filter(pk=redemption.pk).update(
        status=Redemption.Status.CANCELLED, refund_entry=refund, cancelled_at=now
    )
    Reward.objects.filter(pk=redemption.reward_id, stock__isnull=False).update(stock=F("stock") + 1)
    redemption.refresh_from_db()
    return redemption
