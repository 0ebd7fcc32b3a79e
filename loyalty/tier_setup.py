"""Defining tiers and the programme's tier settings. A change applies from now on and never rewrites history:
whoever a new or lowered tier fits moves up at once (members_move_up), as a purchase would move them; nobody moves
down before their review; history rows stay.

The qualifying counters are kept only while the programme has tiers, so its first tier recounts them from the
recorded purchases and returns, as does a new measure or window (periods may start on other days), and moves up at
once whoever qualifies: loyalty.tier_counts."""

import re
from datetime import datetime
from decimal import Decimal

from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from core.errors import Conflict, InvalidInput
from core.models import Program
from loyalty.tier_counts import members_move_up, tier_counters_backfill
from loyalty.tier_models import Tier
from loyalty.tiers import tier_cache_clear

TIER_FIELDS = (
    "name_en",
    "name_sv",
    "name_nb",
    "perks_en",
    "perks_sv",
    "perks_nb",
    "rank",
    "threshold",
    "earn_multiplier",
)
PROGRAM_FIELDS = (
    "name",
    "points_per_unit",
    "rounding",
    "pending_days",
    "expiry_months",
    "return_policy",
    "max_transaction_age_days",
    "tier_measure",
    "tier_window",
    "tier_window_months",
    "tier_grace_days",
    "tier_downgrade",
    "tier_return_policy",
)
CODE_RE = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
MAX_MULTIPLIER = Decimal(100)


class TierCodeTaken(Conflict):
    code, title = "tier_code_taken", "The programme already has a tier with this code"


class TierRankTaken(Conflict):
    code, title = "tier_rank_taken", "Another active tier has this rank"


class TierRetired(Conflict):
    code, title = "tier_retired", "The tier is retired"


class TierThresholdsNotIncreasing(InvalidInput):
    code, title = "tier_thresholds_not_increasing", "Thresholds must increase with rank"


def _check_fields(program: Program, values: dict) -> None:
    errors = {}
    if "earn_multiplier" in values:
        m = values["earn_multiplier"]
        if m is None or m < 1 or m > MAX_MULTIPLIER:
            errors["earn_multiplier"] = [f"Must be between 1 and {MAX_MULTIPLIER}: a tier never earns less."]
    if "threshold" in values:
        t = values["threshold"]
        if t is None or t < 0:
            errors["threshold"] = ["Must be 0 or more."]
        elif program.tier_measure != Program.TierMeasure.SPEND and t != t.to_integral_value():
            errors["threshold"] = [f"Must be a whole number of {program.tier_measure}."]
    if "rank" in values and (values["rank"] is None or not 0 <= values["rank"] <= 1000):
        errors["rank"] = ["Must be between 0 and 1000."]
    if "name_en" in values and not (values["name_en"] or "").strip():
        errors["name_en"] = ["Give the English name."]
    if errors:
        raise InvalidInput(
            "The tier is not valid: " + "; ".join(f"{k}: {v[0]}" for k, v in errors.items()), errors=errors
        )


def _check_ladder(program: Program, tiers: list[Tier]) -> None:
    """Active tiers: ranks unique, thresholds strictly increasing with rank (else a tier could never be reached)."""
    active = sorted((t for t in tiers if t.retired_at is None), key=lambda t: t.rank)
    for lower, upper in zip(active, active[1:], strict=False):
        if lower.rank == upper.rank:
            raise TierRankTaken(
                f"Tiers {lower.code} and {upper.code} would both have rank {upper.rank}.",
                errors={"rank": [f"Rank {upper.rank} is taken by another active tier."]},
            )
        if upper.threshold <= lower.threshold:
            raise TierThresholdsNotIncreasing(
                f"Tier {upper.code} (rank {upper.rank}) needs a threshold above {lower.threshold}, the threshold "
                f"of {lower.code} (rank {lower.rank}); it has {upper.threshold}.",
                errors={"threshold": [f"Must be more than {lower.threshold} (tier {lower.code}, rank {lower.rank})."]},
            )


def _locked_tiers(program: Program) -> list[Tier]:
    # The programme row serialises every change of its tiers, so two changes cannot both pass the ladder check.
    # FOR NO KEY UPDATE: the key-share locks of inserts that refer to the programme (their foreign-key checks, at
    # commit) do not wait for it, so a change that goes on to wait for members' status rows (members_move_up, the
    # recount) cannot deadlock with a purchase or a review that holds one of them and commits.
    Program.objects.select_for_update(no_key=True).filter(pk=program.pk).first()
    return list(Tier.objects.filter(program=program).order_by("rank", "id"))


def _sync(program: Program) -> None:
    """Keep Program.has_tiers, which the earn path reads instead of querying, and drop cached definitions."""
    has = Tier.objects.filter(program=program, retired_at__isnull=True).exists()
    Program.objects.filter(pk=program.pk).update(has_tiers=has)
    program.has_tiers = has
    tier_cache_clear(program.pk)
    transaction.on_commit(lambda: tier_cache_clear(program.pk))


def tier_check(*, program: Program, tier: Tier) -> None:
    """Would saving `tier` (new or changed, not yet saved) keep the ladder valid? Raises the error the service would;
    for forms that want to answer before saving. The services check again under the programme lock."""
    if not CODE_RE.match(tier.code or ""):
        raise InvalidInput("A tier code is 1-32 letters, digits, '-' or '_'.", errors={"code": ["Not a valid code."]})
    _check_fields(program, {name: getattr(tier, name) for name in TIER_FIELDS})
    others = list(Tier.objects.filter(program=program).exclude(pk=tier.pk))
    if tier.pk is None and any(t.code.lower() == tier.code.lower() for t in others):
        raise TierCodeTaken(f"Tier code {tier.code} is taken (codes are never reused, not even after retirement).")
    _check_ladder(program, [*others, tier])


@transaction.atomic
def tier_create(
    *, program: Program, code: str, name_en: str, rank: int, threshold: Decimal, now: datetime | None = None, **fields
) -> Tier:
    """Add a tier. Refuses a taken code or rank and thresholds that do not increase with rank; writes nothing then.
    The programme's first active tier recounts the qualifying counters as of `now` (tier_counters_backfill)."""
    unknown = set(fields) - set(TIER_FIELDS)
    if unknown:
        raise InvalidInput(f"Unknown tier fields: {', '.join(sorted(unknown))}.")
    if not CODE_RE.match(code or ""):
        raise InvalidInput(
            "A tier code is 1-32 letters, digits, '-' or '_'.", errors={"code": ["Letters, digits, '-', '_'."]}
        )
    values = {"name_en": name_en, "rank": rank, "threshold": Decimal(threshold), **fields}
    values.setdefault("earn_multiplier", Decimal(1))
    _check_fields(program, values)
    tiers = _locked_tiers(program)
    if any(t.code.lower() == code.lower() for t in tiers):
        raise TierCodeTaken(f"Tier code {code} is taken (codes are never reused, not even after retirement).")
    tier = Tier(program=program, code=code, **values)
    _check_ladder(program, [*tiers, tier])
    tier.save()
    _sync(program)
    if not any(t.retired_at is None for t in tiers):
        tier_counters_backfill(program=program, now=now or timezone.now(), counting=False)
    else:
        members_move_up(program=program, now=now or timezone.now())
    return tier


@transaction.atomic
def tier_update(*, tier: Tier, now: datetime | None = None, **fields) -> Tier:
    """Change a tier's names, perks, rank, threshold or multiplier. Whoever qualifies under a new threshold or rank
    moves up at once; moving down waits for each member's review. The code never changes."""
    unknown = set(fields) - set(TIER_FIELDS)
    if unknown:
        raise InvalidInput(f"These tier fields cannot be changed: {', '.join(sorted(unknown))}.")
    program = tier.program
    _check_fields(program, fields)
    tiers = _locked_tiers(program)
    current = next(t for t in tiers if t.pk == tier.pk)
    if current.retired_at is not None:
        raise TierRetired(f"Tier {current.code} is retired and cannot be changed.")
    ladder = (current.rank, current.threshold)
    for name, value in fields.items():
        setattr(current, name, value)
    _check_ladder(program, tiers)
    current.save()
    _sync(program)
    if (current.rank, current.threshold) != ladder:
        members_move_up(program=program, now=now or timezone.now())
    return current


@transaction.atomic
def tier_retire(*, tier: Tier) -> Tier:
    """Retire a tier: nobody reaches it any more; members holding it keep it until their review. Idempotent."""
    program = tier.program
    tiers = _locked_tiers(program)
    current = next(t for t in tiers if t.pk == tier.pk)
    if current.retired_at is None:
        current.retired_at = timezone.now()
        current.save(update_fields=["retired_at", "updated_at"])
        _sync(program)
    return current


@transaction.atomic
def program_settings_update(*, program: Program, now: datetime | None = None, **fields) -> Program:
    """Change the programme's settings (earning basics and tier qualification). Points already earned and tier
    history stay as they were. A new measure or window recounts the qualifying counters and moves up at once whoever
    qualifies under it; moving down waits for each member's review."""
    unknown = set(fields) - set(PROGRAM_FIELDS)
    if unknown:
        raise InvalidInput(f"These programme settings cannot be changed: {', '.join(sorted(unknown))}.")
    tiers = _locked_tiers(program)
    program_measure_check(tiers, fields.get("tier_measure", program.tier_measure))
    qualification = _qualification(program)
    for name, value in fields.items():
        setattr(program, name, value)
    try:
        program.full_clean(exclude=["code", "currency"])
    except ValidationError as exc:
        errors = {k: [str(m) for m in v] for k, v in exc.message_dict.items()}
        raise InvalidInput(
            "The settings are not valid: " + "; ".join(f"{k}: {v[0]}" for k, v in errors.items()), errors=errors
        ) from exc
    program.save(update_fields=[*fields, "updated_at"])
    if _qualification(program) != qualification and any(t.retired_at is None for t in tiers):
        tier_counters_backfill(program=program, now=now or timezone.now(), counting=True)
    tier_cache_clear(program.pk)
    return program


def program_measure_check(tiers: list[Tier], measure: str) -> None:
    """InvalidInput where active tiers' thresholds are not whole numbers of a measure that counts in whole ones."""
    if measure != Program.TierMeasure.SPEND:
        fractional = [t.code for t in tiers if t.retired_at is None and t.threshold != t.threshold.to_integral_value()]
        if fractional:
            raise InvalidInput(
                f"Tiers {', '.join(fractional)} have thresholds that are not whole {measure}; change them first.",
                code="tier_thresholds_not_whole",
                errors={"tier_measure": [f"Thresholds of {', '.join(fractional)} are not whole numbers."]},
            )


def _qualification(program: Program) -> tuple:
    """The settings that decide what the counters hold and which of them count."""
    rolling = program.tier_window == Program.TierWindow.ROLLING
    return program.tier_measure, program.tier_window, program.tier_window_months if rolling else None
