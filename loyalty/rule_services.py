"""Creating, changing and retiring earning rules. A change never rewrites points already earned: each purchase
stored its own breakdown."""

from decimal import Decimal

from django.db import IntegrityError, transaction

from core.errors import Conflict, InvalidInput
from core.models import Program
from loyalty.models import Transaction
from loyalty.rule_claims import budget_slices_set
from loyalty.rule_models import EarningRule
from loyalty.rules import rules_changed

# The most a rule may give, so that no purchase's points overflow: a multiplier of the base points, fixed points, or
# points per unit bought.
MAX_VALUE = {"multiplier": Decimal(100), "fixed": Decimal(1_000_000), "per_unit": Decimal(100_000)}

EDITABLE = [
    f.name
    for f in EarningRule._meta.concrete_fields
    if f.editable and f.name not in {"id", "program", "created_at", "updated_at"}
]


def earning_rule_check(rule: EarningRule) -> None:
    """Refuse definitions that cannot work, field by field, before the database sees them."""
    errors: dict[str, list[str]] = {}
    if rule.benefit not in EarningRule.Benefit.values:
        errors["benefit"] = [f"One of {', '.join(EarningRule.Benefit.values)}."]
    if rule.value is None:
        errors["value"] = ["This field is required."]
        raise InvalidInput("The earning rule is not valid.", errors=errors)
    if rule.benefit == EarningRule.Benefit.MULTIPLIER and rule.value <= 1:
        errors.setdefault("value", []).append("A multiplier must be greater than 1 (2 doubles the points).")
    if rule.benefit in (EarningRule.Benefit.FIXED, EarningRule.Benefit.PER_UNIT) and rule.value <= 0:
        errors.setdefault("value", []).append("Must be greater than 0.")
    if rule.benefit in MAX_VALUE and rule.value > MAX_VALUE[rule.benefit]:
        errors.setdefault("value", []).append(f"At most {MAX_VALUE[rule.benefit]} for a {rule.benefit} benefit.")
    if rule.valid_from and rule.valid_until and rule.valid_from >= rule.valid_until:
        errors.setdefault("valid_until", []).append("Must be after valid_from.")
    if rule.time_from is not None and rule.time_from == rule.time_until:
        errors.setdefault("time_until", []).append("Must differ from time_from.")
    for name in ("categories", "skus", "stores", "tiers"):
        value = getattr(rule, name)
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            errors.setdefault(name, []).append("Must be a list of non-empty strings.")
    if not isinstance(rule.channels, list) or not all(c in Transaction.Channel.values for c in rule.channels):
        errors.setdefault("channels", []).append(f"Must be a list drawn from {', '.join(Transaction.Channel.values)}.")
    if not isinstance(rule.days_of_week, list) or not all(type(d) is int and 1 <= d <= 7 for d in rule.days_of_week):
        errors.setdefault("days_of_week", []).append("Must be a list of ISO weekdays, 1 (Monday) to 7 (Sunday).")
    if rule.budget is not None and rule.budget < rule.budget_used:
        errors.setdefault("budget", []).append(f"{rule.budget_used} points have already been given.")
    if errors:
        raise InvalidInput("The earning rule is not valid.", errors=errors)


def _save(rule: EarningRule) -> EarningRule:
    earning_rule_check(rule)
    try:
        with transaction.atomic():
            rule.save(update_fields=[*EDITABLE, "updated_at"] if rule.pk else None)
            budget_slices_set(rule)
    except IntegrityError as exc:
        raise Conflict(f"The programme already has a rule '{rule.code}'.", code="rule_exists") from exc
    # Both after commit and now: this process drops its cache at once, other processes within seconds.
    rules_changed(rule.program_id)
    return rule


def earning_rule_create(*, program: Program, **fields) -> EarningRule:
    """A new rule of the programme; InvalidInput or Conflict (code taken), nothing written, when it cannot be."""
    return _save(EarningRule(program=program, **{k: v for k, v in fields.items() if k in EDITABLE}))


def earning_rule_update(*, rule: EarningRule, **changes) -> EarningRule:
    """Change a rule from now on; purchases already made keep their points. Its code never changes: the
    breakdowns of the purchases it gave name it, and another rule taking the code would take over their history."""
    if "code" in changes and changes["code"] != rule.code:
        raise InvalidInput(
            "A rule's code cannot change: the purchases it gave points name it. Retire it and create another.",
            errors={"code": ["Cannot change."]},
        )
    for name, value in changes.items():
        if name in EDITABLE:
            setattr(rule, name, value)
    return _save(rule)


def earning_rule_retire(*, rule: EarningRule) -> EarningRule:
    """Stop a rule; it stays for the history of the purchases that used it."""
    return earning_rule_update(rule=rule, active=False)
