"""Tiers: their definitions, each member's tier, the history of every change, and the qualifying counters.

Imported at the bottom of loyalty.models so Django finds these models; written only by loyalty.tiers,
loyalty.tier_setup and loyalty.tier_review."""

from decimal import Decimal

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils.translation import gettext_lazy as _

from core.models import ApiClient, Program
from members.models import Member


class Tier(models.Model):
    """A level of the programme, reached when the qualifying measure in the window meets `threshold`."""

    program = models.ForeignKey(Program, on_delete=models.PROTECT, related_name="tiers")
    code = models.SlugField(max_length=32, help_text=_("Stable identifier; never changes, never reused."))
    name_en = models.CharField(max_length=80)
    name_sv = models.CharField(max_length=80, blank=True)
    name_nb = models.CharField(max_length=80, blank=True)
    perks_en = models.TextField(blank=True, help_text=_("What the member gets, shown to them."))
    perks_sv = models.TextField(blank=True)
    perks_nb = models.TextField(blank=True)
    rank = models.PositiveSmallIntegerField(help_text=_("Higher is better; unique among active tiers."))
    # In the programme's measure: points, purchases (whole numbers) or money (the programme's currency).
    threshold = models.DecimalField(max_digits=14, decimal_places=2)
    earn_multiplier = models.DecimalField(max_digits=6, decimal_places=3, default=Decimal(1))
    retired_at = models.DateTimeField(null=True, blank=True, help_text=_("Retired tiers stay in history."))
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["program", "rank"]
        constraints = [
            # Codes are never reused, not even after retirement: history and integrations refer to them.
            models.UniqueConstraint(fields=["program", "code"], name="tier_code_unique"),
            models.UniqueConstraint(
                fields=["program", "rank"], condition=Q(retired_at__isnull=True), name="tier_rank_unique_active"
            ),
            models.CheckConstraint(condition=Q(threshold__gte=0), name="tier_threshold_gte_0"),
            models.CheckConstraint(condition=Q(earn_multiplier__gte=1), name="tier_multiplier_gte_1"),
        ]

    def __str__(self) -> str:
        return f"{self.name_en} ({self.code})"

    def name_in(self, locale: str) -> str:
        return getattr(self, f"name_{locale}", "") or self.name_en

    def perks_in(self, locale: str) -> str:
        return getattr(self, f"perks_{locale}", "") or self.perks_en


class TierStatus(models.Model):
    """A member's tier now. No row: the member is at the programme's base tier (threshold 0), if it has one."""

    member = models.OneToOneField(Member, primary_key=True, on_delete=models.CASCADE, related_name="tier_status")
    # No index on these foreign keys: the review rewrites a million of these rows, and every index costs it a write.
    program = models.ForeignKey(Program, on_delete=models.PROTECT, related_name="+", db_index=False)
    tier = models.ForeignKey(Tier, null=True, blank=True, on_delete=models.PROTECT, related_name="+", db_index=False)
    since = models.DateTimeField()
    # When the window is next checked; null when there is nothing to lose (no tier, or one with threshold 0).
    review_at = models.DateTimeField(null=True, blank=True)
    manual_until = models.DateTimeField(null=True, blank=True)
    manual_reason = models.CharField(max_length=500, blank=True)
    manual_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    manual_api_client = models.ForeignKey(ApiClient, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    updated_at = models.DateTimeField()

    class Meta:
        verbose_name_plural = "tier statuses"
        constraints = [
            models.CheckConstraint(
                condition=Q(manual_until__isnull=True) | ~Q(manual_reason=""), name="tier_manual_has_reason"
            ),
        ]
        indexes = [
            models.Index(fields=["program", "review_at"], condition=Q(review_at__isnull=False), name="tier_review"),
            models.Index(fields=["manual_until"], condition=Q(manual_until__isnull=False), name="tier_manual"),
        ]

    def __str__(self) -> str:
        return f"{self.member_id}: {self.tier_id}"


class TierChange(models.Model):
    """Append-only history: every change of a member's tier, with why and who."""

    class Reason(models.TextChoices):
        UPGRADE = "upgrade", _("Qualified for a higher tier")
        DOWNGRADE = "downgrade", _("Review: the window no longer supports the tier")
        MANUAL = "manual", _("Set by hand")
        MANUAL_EXPIRED = "manual_expired", _("A tier set by hand ended")
        RETURN = "return", _("A return lowered the qualifying measure")

    member = models.ForeignKey(Member, on_delete=models.CASCADE, related_name="tier_changes")
    program = models.ForeignKey(Program, on_delete=models.PROTECT, related_name="+")
    from_tier = models.ForeignKey(Tier, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    to_tier = models.ForeignKey(Tier, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    reason = models.CharField(max_length=16, choices=Reason.choices)
    note = models.CharField(max_length=500, blank=True)
    occurred_at = models.DateTimeField()
    transaction = models.ForeignKey(
        "loyalty.Transaction", null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    staff_user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    api_client = models.ForeignKey(ApiClient, null=True, blank=True, on_delete=models.PROTECT, related_name="+")

    class Meta:
        indexes = [models.Index(fields=["member", "-occurred_at", "-id"])]

    def __str__(self) -> str:
        return f"{self.member_id}: {self.from_tier_id} → {self.to_tier_id} ({self.reason})"


class TierCounter(models.Model):
    """What a member did in one period (a month, or an anniversary month): the qualifying measures, set-based.

    Written by one INSERT ... ON CONFLICT DO UPDATE per transaction; a window is a range of periods. Spending or
    expiring points never touches these; returns subtract from the period of the purchase they return."""

    member = models.ForeignKey(Member, on_delete=models.CASCADE, related_name="+")
    period = models.DateField(help_text=_("First day of the period, in the member's time zone."))
    points = models.BigIntegerField(default=0)
    spend_cents = models.BigIntegerField(default=0)
    purchases = models.IntegerField(default=0)

    class Meta:
        constraints = [
            # Covering: the review sums a member's periods from the index alone, without visiting the table.
            models.UniqueConstraint(
                fields=["member", "period"],
                include=["points", "spend_cents", "purchases"],
                name="tier_counter_unique",
            )
        ]

    def __str__(self) -> str:
        return f"{self.member_id} {self.period}"
