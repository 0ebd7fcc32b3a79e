"""The catalogue: creating, changing and retiring rewards, and stock changes with their audit rows."""

from datetime import datetime

from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone

from core.errors import Conflict, InvalidInput
from core.models import ApiClient, Program
from rewards.models import Reward, StockChange

# Fields a change may touch. `stock` moves only through reward_stock_change, so every change is audited and none
# overwrites a redemption that took an item meanwhile; `program` and `code` are the reward's identity.
CHANGEABLE = frozenset(
    f.name for f in Reward._meta.concrete_fields if f.name not in {"id", "program", "code", "stock"}
) - {"created_at", "updated_at"}
MAX_STOCK_DELTA = 1_000_000


def _invalid(exc: ValidationError) -> InvalidInput:
    errors = {k if k != "__all__" else "non_field_errors": v for k, v in exc.message_dict.items()}
    return InvalidInput("The reward is not valid.", errors=errors)


def _save(reward: Reward) -> Reward:
    try:
        reward.clean_fields(exclude=["program"])  # also turns strings into the fields' types
    except ValidationError as exc:
        raise _invalid(exc) from exc
    _validate(reward)
    try:
        reward.full_clean(exclude=["program"])
    except ValidationError as exc:
        raise _invalid(exc) from exc
    try:
        with transaction.atomic():
            reward.save()
    except IntegrityError as exc:  # a concurrent create of the same code, after full_clean looked
        raise Conflict(f"A reward with code {reward.code} exists.", code="reward_exists") from exc
    return reward


def _validate(reward: Reward) -> None:
    """The rules that span fields, with messages naming the field to fix (full_clean would only name the
    constraint)."""
    errors = {}
    has_amount, has_percent = reward.discount_amount is not None, reward.discount_percent is not None
    if reward.kind == Reward.Kind.DISCOUNT:
        if has_amount == has_percent:
            errors["discount_amount"] = ["Give a discount_amount or a discount_percent, exactly one."]
        elif has_amount and reward.discount_amount <= 0:
            errors["discount_amount"] = ["Must be more than 0."]
        elif has_percent and not 0 < reward.discount_percent <= 100:
            errors["discount_percent"] = ["Must be more than 0 and at most 100."]
    elif has_amount or has_percent or reward.min_basket is not None:
        errors["kind"] = ["Only discount vouchers carry a discount or a minimum basket."]
    if reward.available_from and reward.available_until and reward.available_from >= reward.available_until:
        errors["available_until"] = ["Must be after available_from."]
    if errors:
        raise InvalidInput("The reward is not valid.", errors=errors)


def reward_create(*, program: Program, code: str, **fields) -> Reward:
    """Add a reward to the catalogue. InvalidInput for bad fields; Conflict reward_exists for a taken code."""
    unknown = set(fields) - CHANGEABLE - {"stock"}
    if unknown:
        raise InvalidInput("Unknown reward fields.", errors={k: ["Unknown field."] for k in sorted(unknown)})
    reward = Reward(program=program, code=code, **fields)
    if Reward.objects.filter(program=program, code=code).exists():
        raise Conflict(f"A reward with code {code} exists.", code="reward_exists", errors={"code": ["Taken."]})
    return _save(reward)


@transaction.atomic
def reward_update(*, reward: Reward, **fields) -> Reward:
    """Change a reward's catalogue fields. Redemptions already made keep the points they cost. Locks the reward."""
    unknown = set(fields) - CHANGEABLE
    if unknown:
        raise InvalidInput(
            "These fields cannot be changed here.", errors={k: ["Cannot be changed."] for k in sorted(unknown)}
        )
    # Locked and re-read, so a concurrent stock change or redemption's decrement is not overwritten by save().
    locked = Reward.objects.select_for_update().get(pk=reward.pk)
    for name, value in fields.items():
        setattr(locked, name, value)
    return _save(locked)


def reward_retire(*, reward: Reward) -> Reward:
    """Take a reward out of the catalogue; it stays for history and reports. Idempotent."""
    Reward.objects.filter(pk=reward.pk).update(active=False, updated_at=timezone.now())
    reward.refresh_from_db()
    return reward


@transaction.atomic
def reward_stock_change(
    *,
    reward: Reward,
    delta: int,
    reason: str,
    staff_user=None,
    api_client: ApiClient | None = None,
    now: datetime | None = None,
) -> StockChange:
    """Add (delta > 0) or remove (delta < 0) stock, with an audit row. Removing more than is left is refused and
    changes nothing. Unlimited rewards have no stock to change."""
    reason = (reason or "").strip()
    errors = {}
    if not reason:
        errors["reason"] = ["A reason is required."]
    if not delta or abs(delta) > MAX_STOCK_DELTA:
        errors["delta"] = [f"A whole number other than 0, at most {MAX_STOCK_DELTA:,} either way."]
    if errors:
        raise InvalidInput("The stock change is not valid.", errors=errors)
    # Relative and guarded in one statement: concurrent redemptions taking items are never lost or overdrawn.
    row = Reward.objects.filter(pk=reward.pk, stock__isnull=False, stock__gte=-delta).update(
        stock=F("stock") + delta, updated_at=now or timezone.now()
    )
    if not row:
        current = Reward.objects.values_list("stock", flat=True).get(pk=reward.pk)
        if current is None:
            raise Conflict("This reward has unlimited stock.", code="stock_unlimited")
        raise Conflict(f"Only {current} left; cannot remove {-delta}.", code="stock_too_low", stock=current)
    stock_after = Reward.objects.values_list("stock", flat=True).get(pk=reward.pk)
    reward.stock = stock_after
    return StockChange.objects.create(
        reward=reward,
        delta=delta,
        stock_after=stock_after,
        reason=reason[:500],
        staff_user=staff_user,
        api_client=api_client,
        created_at=now or timezone.now(),
    )
