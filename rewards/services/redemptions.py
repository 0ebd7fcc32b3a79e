"""Redeeming rewards: points spent through the ledger, stock taken atomically, a voucher issued; and cancelling a
redemption whose voucher is unused, which refunds its points."""

from datetime import datetime, timedelta

from django.db import connection, transaction
from django.db.models import F
from django.utils import timezone

from core.errors import MemberNotActive
from core.models import ApiClient
from loyalty import ledger
from loyalty.models import Entry
from loyalty.rules import period_start_at
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
from rewards.selectors import member_tier_rank


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


def _count_then_take_stock(reward: Reward, used: str, params: list, limit: int) -> tuple[int, bool]:
    """_limit_and_stock's statement as two, for databases without data-modifying WITH."""
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {used}", params)
        used_now = cursor.fetchone()[0]
        if reward.member_limit is not None and used_now > limit:
            return used_now, False
        cursor.execute(f"UPDATE {Reward._meta.db_table} SET stock = stock - 1 WHERE id = %s AND stock > 0", [reward.pk])
        return used_now, cursor.rowcount == 1


def _limit_and_stock(reward: Reward, member: Member, now: datetime) -> None:
    """Check the member's limit and take an item of limited stock, in one statement, after this redemption's row was
    written (so it counts itself). Runs under the account lock the spend took (a statement started after it, so it
    counts the member's redemptions as the last one left them): two redemptions by one member cannot both see room.
    The stock is taken with UPDATE ... WHERE stock > 0, so the last item goes to exactly one member; the reward row
    is locked last, for the shortest time."""
    params: list = []
    used = "0"
    if reward.member_limit is not None:
        # In the member's own calendar, as earning rules and events count (Reward.Period has loyalty's Period values).
        since = period_start_at(reward.member_limit_period, now, member.tz)
        used = (
            f"(SELECT COUNT(*) FROM {Redemption._meta.db_table} WHERE member_id = %s AND reward_id = %s "
            "AND status = %s" + (" AND created_at >= %s)" if since is not None else ")")
        )
        params += [member.pk, reward.pk, Redemption.Status.REDEEMED] + ([since] if since is not None else [])
    limit = reward.member_limit if reward.member_limit is not None else 0
    if reward.stock is not None and connection.vendor != "postgresql":
        # The embedded SQLite default has no data-modifying WITH: the count, then the stock, as two statements in
        # this transaction (SQLite serialises writers, so nothing can come between them).
        used_now, took_stock = _count_then_take_stock(reward, used, params, limit)
    else:
        if reward.stock is not None:
            sql = (
                f"WITH c AS (SELECT {used} AS used), s AS (UPDATE {Reward._meta.db_table} SET stock = stock - 1 "
                "WHERE id = %s AND stock > 0 AND (%s OR (SELECT used FROM c) <= %s) RETURNING id) "
                "SELECT (SELECT used FROM c), EXISTS (SELECT FROM s)"
            )
            params += [reward.pk, reward.member_limit is None, limit]
        else:
            sql, params = f"SELECT {used}, true", params
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            used_now, took_stock = cursor.fetchone()
    if reward.member_limit is not None and used_now > reward.member_limit:
        raise RedemptionLimitReached(
            f"Reward {reward.code} may be redeemed {reward.member_limit} times "
            f"{reward.get_member_limit_period_display().lower()}.",
            limit=reward.member_limit,
            period=reward.member_limit_period,
        )
    if not took_stock:
        raise OutOfStock(f"Reward {reward.code} is out of stock.")


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
    Locks the member's account, then (limited stock only) the reward row: always in that order. The returned
    redemption has its member, reward and voucher set, and `balance`: the member's balances right after it."""
    now = now or timezone.now()
    _check_redeemable(reward, member, now)
    redemption = Redemption(
        program_id=member.program_id,
        member=member,
        reward=reward,
        points=reward.points_cost,
        api_client=api_client,
        staff_user=staff_user,
        created_at=now,
    )
    # 75 random bits: a collision is not a practical concern, and the unique index would refuse one.
    voucher = Voucher(
        program_id=member.program_id,
        code=voucher_code_new(),
        expires_at=now + timedelta(days=reward.voucher_valid_days),
        created_at=now,
    )
    # The redemption and its voucher are written by the statement that writes the spend's entry: the account row,
    # which every request of the member waits on, stays locked for one round trip less.
    _entry, balance = ledger.ledger_spend(
        member_id=member.pk,
        kind=Entry.Kind.REDEEM,
        points=reward.points_cost,
        occurred_at=now,
        now=now,
        reason=f"Reward {reward.code}"[:500],
        api_client=api_client,
        staff_user=staff_user,
        chain=((redemption, "entry"), (voucher, "redemption")),
    )
    if reward.member_limit is not None or reward.stock is not None:
        _limit_and_stock(reward, member, now)
    redemption.balance = balance
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
