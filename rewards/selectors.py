"""Reads of the rewards capability: the catalogue, redemptions, vouchers, holds, and points spent."""

from datetime import datetime

from django.db import connection
from django.db.models import Count, Q, QuerySet, Sum
from django.db.models.functions import Trunc
from django.utils import timezone

from core.db import columns, instance_from_row
from core.models import Program
from loyalty.ledger import ledger_balance
from loyalty.tier_selectors import tier_current_for
from members.models import Member
from rewards.codes import voucher_code_normalize
from rewards.errors import HoldNotFound, InvalidVoucherCode, RedemptionNotFound, RewardNotFound, VoucherNotFound
from rewards.models import Hold, Redemption, Reward, Voucher


def member_tier_rank(*, member: Member) -> int | None:
    """The rank of the member's current tier, or None without one (then rewards with a minimum rank are refused)."""
    tier = tier_current_for(member=member)
    return tier.rank if tier else None


def reward_get(*, program: Program, code: str) -> Reward:
    reward = Reward.objects.filter(program=program, code=code).first()
    if reward is None:
        raise RewardNotFound(f"No reward {code} in this programme.")
    return reward


def member_and_reward_get(*, program: Program, member_number: str, code: str) -> tuple[Member | None, Reward | None]:
    """The programme's member with this number and its reward with this code, either None when there is none, in
    one plain query (the redemption hot path). Rewards are read afresh on every redemption, not cached: retiring a
    reward or changing its price, window or limit takes effect at once."""
    m_columns, m_select = columns(Member, "m")
    r_columns, r_select = columns(Reward, "r")
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT {m_select}, {r_select} FROM (SELECT 1) AS one "
            f"LEFT JOIN {Member._meta.db_table} m ON m.member_number = %s AND m.program_id = %s "
            f"LEFT JOIN {Reward._meta.db_table} r ON r.code = %s AND r.program_id = %s",
            [member_number, program.pk, code, program.pk],
        )
        row = cursor.fetchone()
    split = len(m_columns)
    member = instance_from_row(Member, row[:split]) if row[0] is not None else None
    reward = instance_from_row(Reward, row[split:]) if row[split] is not None else None
    return member, reward


def reward_list(
    *,
    program: Program,
    kind: str | None = None,
    tier_rank: int | None = None,
    affordable_for: Member | None = None,
    include_retired: bool = False,
    now: datetime | None = None,
) -> QuerySet[Reward]:
    """Rewards of the programme; by default those that can be redeemed now. `tier_rank`: those a member of that tier
    rank may redeem. `affordable_for`: those the member can pay for with the points they may spend now."""
    now = now or timezone.now()
    rewards = Reward.objects.filter(program=program)
    if not include_retired:
        rewards = rewards.filter(
            Q(available_from__isnull=True) | Q(available_from__lte=now),
            Q(available_until__isnull=True) | Q(available_until__gt=now),
            active=True,
        ).exclude(stock=0)
    if kind:
        rewards = rewards.filter(kind=kind)
    if tier_rank is not None:
        rewards = rewards.filter(Q(min_tier_rank__isnull=True) | Q(min_tier_rank__lte=tier_rank))
    if affordable_for is not None:
        spendable = ledger_balance(member_id=affordable_for.pk).spendable
        rank = member_tier_rank(member=affordable_for)
        rewards = rewards.filter(points_cost__lte=spendable).filter(
            Q(min_tier_rank__isnull=True) | Q(min_tier_rank__lte=rank if rank is not None else -1)
        )
    return rewards


MAX_ID = 2**63 - 1  # ids beyond bigint are not found, rather than a database error


def redemption_get(*, program: Program, redemption_id: int) -> Redemption:
    if not 0 < redemption_id <= MAX_ID:
        raise RedemptionNotFound(f"No redemption {redemption_id} in this programme.")
    redemption = (
        Redemption.objects.select_related("reward", "member", "voucher")
        .filter(program=program, pk=redemption_id)
        .first()
    )
    if redemption is None:
        raise RedemptionNotFound(f"No redemption {redemption_id} in this programme.")
    return redemption


def voucher_get(*, program: Program, code: str) -> Voucher:
    """The programme's voucher with this code, as typed at a till. InvalidVoucherCode for a mistyped code (its check
    character does not match), VoucherNotFound for a well-formed code nobody was given."""
    canonical = voucher_code_normalize(code)
    if canonical is None:
        raise InvalidVoucherCode(f"{code!r} is not a voucher code; check it for typing errors.")
    voucher = (
        Voucher.objects.select_related("redemption__reward", "redemption__member")
        .filter(program=program, code=canonical)
        .first()
    )
    if voucher is None:
        raise VoucherNotFound("No voucher has this code.")
    return voucher


def hold_get(*, program: Program, hold_id: int) -> Hold:
    """The programme's hold with its member, in one plain query (a hot path: capture and release at tills)."""
    if not 0 < hold_id <= MAX_ID:
        raise HoldNotFound(f"No hold {hold_id} in this programme.")
    h_columns, h_select = columns(Hold, "h")
    _, m_select = columns(Member, "m")
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT {h_select}, {m_select} FROM {Hold._meta.db_table} h "
            f"JOIN {Member._meta.db_table} m ON m.id = h.member_id WHERE h.id = %s AND h.program_id = %s",
            [hold_id, program.pk],
        )
        row = cursor.fetchone()
    if row is None:
        raise HoldNotFound(f"No hold {hold_id} in this programme.")
    hold = instance_from_row(Hold, row[: len(h_columns)])
    hold.member = instance_from_row(Member, row[len(h_columns) :])
    return hold


def points_spent_report(
    *, program: Program, period: str = "month", since: datetime | None = None, until: datetime | None = None
) -> list[dict]:
    """Points spent on rewards per period and reward, net of cancelled redemptions, newest period first; and, as
    reward None, points paid at tills through captured holds."""
    assert period in ("day", "week", "month", "year")
    redemptions = Redemption.objects.filter(program=program, status=Redemption.Status.REDEEMED)
    holds = Hold.objects.filter(program=program, status=Hold.Status.CAPTURED)
    if since:
        redemptions, holds = redemptions.filter(created_at__gte=since), holds.filter(closed_at__gte=since)
    if until:
        redemptions, holds = redemptions.filter(created_at__lt=until), holds.filter(closed_at__lt=until)
    rows = [
        {"period": r["period"], "reward": r["reward__code"], "name": r["reward__name_en"], **_counts(r)}
        for r in redemptions.annotate(period=Trunc("created_at", period))
        .values("period", "reward__code", "reward__name_en")
        .annotate(count=Count("pk"), points=Sum("points"))
    ]
    rows += [
        {"period": h["period"], "reward": None, "name": "Paid with points at tills", **_counts(h)}
        for h in holds.annotate(period=Trunc("closed_at", period))
        .values("period")
        .annotate(count=Count("pk"), points=Sum("captured_points"))
    ]
    return sorted(rows, key=lambda r: (-r["period"].timestamp(), -r["points"], r["reward"] or ""))


def _counts(row: dict) -> dict:
    return {"count": row["count"], "points": row["points"] or 0}
