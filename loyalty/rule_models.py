"""Earning rules: bonus points on top of the base rate. Imported by loyalty.models so Django finds them."""

from django.core.validators import MinValueValidator
from django.db import models
from django.db.models import F, Q
from django.utils.translation import gettext_lazy as _

from core.models import Program
from members.models import Member


class Period(models.TextChoices):
    DAY = "day", _("Day")
    WEEK = "week", _("Week")
    MONTH = "month", _("Month")
    YEAR = "year", _("Year")
    EVER = "ever", _("Ever")


class EarningRule(models.Model):
    """When a purchase meets every condition set here, the rule adds its benefit. Empty conditions match all."""

    class Benefit(models.TextChoices):
        FIXED = "fixed", _("Fixed points")
        MULTIPLIER = "multiplier", _("Multiply the base points of what matches")
        PER_UNIT = "per_unit", _("Points per unit bought")

    program = models.ForeignKey(Program, on_delete=models.PROTECT, related_name="earning_rules")
    code = models.SlugField(max_length=40)
    name = models.CharField(max_length=120)
    description = models.TextField(blank=True)
    active = models.BooleanField(default=True)
    priority = models.IntegerField(default=0, help_text=_("Higher runs first."))
    exclusive = models.BooleanField(default=False, help_text=_("When it earns points, rules of lower priority do not."))
    valid_from = models.DateTimeField(null=True, blank=True)
    valid_until = models.DateTimeField(null=True, blank=True)
    # Conditions
    categories = models.JSONField(default=list, blank=True)
    skus = models.JSONField(default=list, blank=True)
    stores = models.JSONField(default=list, blank=True)
    channels = models.JSONField(default=list, blank=True)
    days_of_week = models.JSONField(default=list, blank=True, help_text=_("ISO weekdays, 1 = Monday."))
    time_from = models.TimeField(null=True, blank=True, help_text=_("Local time in the programme's time zone."))
    time_until = models.TimeField(null=True, blank=True)
    min_basket = models.DecimalField(max_digits=12, decimal_places=2, null=True, blank=True)
    tiers = models.JSONField(default=list, blank=True, help_text=_("Tier codes; empty means every member."))
    first_purchase = models.BooleanField(default=False)
    birthday_month = models.BooleanField(default=False)
    # Benefit
    benefit = models.CharField(max_length=12, choices=Benefit.choices)
    value = models.DecimalField(max_digits=12, decimal_places=4, validators=[MinValueValidator(0)])
    # Limits
    member_limit = models.PositiveIntegerField(null=True, blank=True, help_text=_("Points per member per period."))
    member_limit_period = models.CharField(max_length=8, choices=Period.choices, default=Period.MONTH)
    budget = models.PositiveBigIntegerField(null=True, blank=True, help_text=_("Points this rule may give in all."))
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-priority", "pk"]
        constraints = [
            models.UniqueConstraint(fields=["program", "code"], name="earning_rule_code_unique"),
            models.CheckConstraint(
                condition=Q(valid_from__isnull=True) | Q(valid_until__isnull=True) | Q(valid_from__lt=F("valid_until")),
                name="rule_validity_ordered",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.code})"

    @property
    def budget_used(self) -> int:
        """Points the rule has given from its budget: its slices' (prefetch `budget_slices` for many rules)."""
        return sum(s.used for s in self.budget_slices.all()) if self.pk else 0


# A budget is cut into this many slices. Purchases claim from the slice their member's id picks, so concurrent
# purchases lock different rows: with the budget in one row, every purchase that claimed from it waited for the one
# before to commit.
BUDGET_SLICES = 16


class BudgetSlice(models.Model):
    """A share of an earning rule's budget: no slice gives more than its size, and the sizes add up to the budget
    (the budget's slices are all locked whenever sizes change: loyalty.rule_claims, budget_slices_set and awards_claim;
    loyalty.verify checks the sum). So the rule never gives more than its budget, whichever slices purchases claim
    from. A slice that runs short sends its purchases to the careful claim, which takes from the other slices and
    shares out what is left again."""

    rule = models.ForeignKey(EarningRule, on_delete=models.CASCADE, related_name="budget_slices")
    number = models.PositiveSmallIntegerField()
    size = models.PositiveBigIntegerField()
    used = models.PositiveBigIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["rule", "number"], name="budget_slice_unique"),
            models.CheckConstraint(condition=Q(used__lte=F("size")), name="budget_slice_not_exceeded"),
        ]

    def __str__(self) -> str:
        return f"{self.rule_id}/{self.number}: {self.used} of {self.size}"


class RuleUsage(models.Model):
    """Points a rule has given one member in one period, for per-member limits."""

    rule = models.ForeignKey(EarningRule, on_delete=models.CASCADE, related_name="usages")
    member = models.ForeignKey(Member, on_delete=models.CASCADE)
    period_start = models.DateField()
    points = models.PositiveBigIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["rule", "member", "period_start"], name="rule_usage_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.rule_id}/{self.member_id}/{self.period_start}: {self.points}"
