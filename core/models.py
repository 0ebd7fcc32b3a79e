import hmac
import secrets
from decimal import Decimal

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import models
from django.utils.translation import gettext_lazy as _

from core.money import CURRENCIES


class Program(models.Model):
    """The configuration root: every member, transaction, rule and API client belongs to one programme."""

    class Rounding(models.TextChoices):
        DOWN = "down", _("Round down")
        HALF_UP = "half_up", _("Round half up")
        UP = "up", _("Round up")

    class ReturnPolicy(models.TextChoices):
        ALLOW_NEGATIVE = "allow_negative", _("Reverse in full, even into a negative balance")
        AVAILABLE_ONLY = "available_only", _("Reverse only what is still available")

    class VoucherReturnPolicy(models.TextChoices):
        KEEP_USED = "keep", _("A returned purchase does not give its vouchers back")
        RESTORE = "restore", _("A returned purchase gives its vouchers back, usable again")

    class TierMeasure(models.TextChoices):
        POINTS = "points", _("Qualifying points earned")
        SPEND = "spend", _("Money spent")
        PURCHASES = "purchases", _("Number of purchases")

    class TierWindow(models.TextChoices):
        ROLLING = "rolling", _("Rolling months")
        CALENDAR_YEAR = "calendar_year", _("Calendar year")
        ANNIVERSARY_YEAR = "anniversary", _("Member's anniversary year")

    class TierDowngrade(models.TextChoices):
        ONE_STEP = "one_step", _("One tier at a time")
        TO_SUPPORTED = "to_supported", _("To the tier the window supports")

    class TierReturnPolicy(models.TextChoices):
        KEEP = "keep", _("The tier stays until the review")
        REEVALUATE = "reevaluate", _("Re-evaluate the tier at once")

    code = models.SlugField(max_length=32, unique=True)
    name = models.CharField(max_length=120)
    currency = models.CharField(
        max_length=3, choices=sorted((c, c) for c in CURRENCIES), help_text=_("ISO 4217 code of purchases.")
    )
    points_per_unit = models.DecimalField(
        max_digits=10,
        decimal_places=4,
        default=1,
        validators=[MinValueValidator(0)],
        help_text=_("Points per 1.00 of currency."),
    )
    rounding = models.CharField(max_length=8, choices=Rounding.choices, default=Rounding.DOWN)
    pending_days = models.PositiveIntegerField(default=0, help_text=_("Days before earned points can be spent."))
    expiry_months = models.PositiveIntegerField(
        default=24, help_text=_("Months after the purchase when points expire; 0 means never.")
    )
    return_policy = models.CharField(max_length=16, choices=ReturnPolicy.choices, default=ReturnPolicy.ALLOW_NEGATIVE)
    timezone = models.CharField(
        max_length=64, default="Europe/Stockholm", help_text=_("Local time of earning rules' days and hours.")
    )
    max_transaction_age_days = models.PositiveIntegerField(
        null=True, blank=True, help_text=_("Oldest purchase accepted, in days; empty means unlimited.")
    )
    # Rewards and paying with points (the rewards app reads these).
    hold_minutes = models.PositiveIntegerField(
        default=15,
        db_default=15,
        validators=[MinValueValidator(1)],
        help_text=_("Minutes a hold on points for paying at a till stays open before it lapses by itself."),
    )
    point_value = models.DecimalField(
        max_digits=10,
        decimal_places=4,
        default=Decimal("0.01"),
        db_default=Decimal("0.01"),
        validators=[MinValueValidator(0)],
        help_text=_("What one point is worth in the programme's currency when paying with points or donating."),
    )
    voucher_return_policy = models.CharField(
        max_length=8,
        choices=VoucherReturnPolicy.choices,
        default=VoucherReturnPolicy.KEEP_USED,
        db_default=VoucherReturnPolicy.KEEP_USED,
        help_text=_("Whether a voucher used in a purchase becomes usable again when that purchase is returned."),
    )
    # Tiers (loyalty.tiers). A programme without tiers ignores these, and its purchases pay no tier cost at all.
    has_tiers = models.BooleanField(
        default=False, db_default=False, editable=False, help_text=_("Kept by loyalty.tier_setup: any tier active?")
    )
    tier_measure = models.CharField(
        max_length=10, choices=TierMeasure.choices, default=TierMeasure.POINTS, db_default=TierMeasure.POINTS
    )
    tier_window = models.CharField(
        max_length=16, choices=TierWindow.choices, default=TierWindow.ROLLING, db_default=TierWindow.ROLLING
    )
    tier_window_months = models.PositiveSmallIntegerField(
        default=12,
        db_default=12,
        validators=[MinValueValidator(1), MaxValueValidator(36)],
        help_text=_("Length of a rolling window, in months."),
    )
    tier_grace_days = models.PositiveSmallIntegerField(
        default=0,
        db_default=0,
        validators=[MaxValueValidator(366)],
        help_text=_("Days after the review date before a member moves down; activity in them still counts."),
    )
    tier_downgrade = models.CharField(
        max_length=12, choices=TierDowngrade.choices, default=TierDowngrade.ONE_STEP, db_default=TierDowngrade.ONE_STEP
    )
    tier_return_policy = models.CharField(
        max_length=12, choices=TierReturnPolicy.choices, default=TierReturnPolicy.KEEP, db_default=TierReturnPolicy.KEEP
    )
    # Referrals (loyalty.referrals): both members get their points on the referee's first qualifying purchase.
    referrals_enabled = models.BooleanField(default=False, db_default=False)
    referral_referrer_points = models.PositiveIntegerField(
        default=0, db_default=0, help_text=_("Points for the member whose code was used.")
    )
    referral_referee_points = models.PositiveIntegerField(
        default=0, db_default=0, help_text=_("Points for the new member who enrolled with the code.")
    )
    referral_min_purchase = models.DecimalField(
        max_digits=12,
        decimal_places=2,
        default=Decimal("0"),
        db_default=Decimal("0"),
        validators=[MinValueValidator(0)],
        help_text=_("Smallest purchase total that qualifies the referral."),
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.CheckConstraint(condition=models.Q(points_per_unit__gte=0), name="program_points_per_unit_gte_0"),
            models.CheckConstraint(
                condition=models.Q(tier_window_months__gte=1, tier_window_months__lte=36),
                name="program_tier_window_months_range",
            ),
            models.CheckConstraint(condition=models.Q(hold_minutes__gte=1), name="program_hold_minutes_gte_1"),
            models.CheckConstraint(condition=models.Q(point_value__gte=0), name="program_point_value_gte_0"),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.code})"


class ApiClient(models.Model):
    """A POS, web shop or other system. Only a keyed hash of its key is stored."""

    class Scope(models.TextChoices):
        MEMBERS_READ = "members:read"
        MEMBERS_WRITE = "members:write"
        TRANSACTIONS_WRITE = "transactions:write"
        POINTS_WRITE = "points:write"
        REWARDS_REDEEM = "rewards:redeem"
        VOUCHERS_CONSUME = "vouchers:consume"
        FEEDBACK_WRITE = "feedback:write"
        INSIGHTS_READ = "insights:read"
        PROGRAM_MANAGE = "program:manage"

    KEY_PREFIX = "lk_"

    program = models.ForeignKey(Program, on_delete=models.PROTECT, related_name="api_clients")
    name = models.CharField(max_length=120)
    key_prefix = models.CharField(max_length=12, editable=False, help_text=_("The start of the key, to recognise it."))
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    scopes = models.JSONField(default=list)
    created_at = models.DateTimeField(auto_now_add=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)

    is_authenticated = True  # DRF treats the client itself as the request's user.

    class Meta:
        constraints = [models.UniqueConstraint(fields=["program", "name"], name="api_client_name_unique")]

    def __str__(self) -> str:
        return f"{self.name} ({self.key_prefix}…)"

    @staticmethod
    def hash_key(raw_key: str) -> str:
        # HMAC-SHA256, not the password hasher: it runs on every request, and keys are long random strings.
        return hmac.digest(settings.API_KEY_HASH_SECRET.encode(), raw_key.encode(), "sha256").hex()

    def set_new_key(self) -> str:
        """Give the client a fresh key; returns the raw key, which is never stored."""
        raw = self.KEY_PREFIX + secrets.token_urlsafe(32)
        self.key_prefix = raw[:10]
        self.key_hash = self.hash_key(raw)
        return raw

    def has_scope(self, scope: str) -> bool:
        return scope in self.scopes


class IdempotencyRecord(models.Model):
    """The first response to a POST with an `Idempotency-Key`, replayed for repeats of the same request."""

    client = models.ForeignKey(ApiClient, on_delete=models.CASCADE)
    key = models.CharField(max_length=255, validators=[RegexValidator(r"^[\x21-\x7e]+$")])
    request_hash = models.CharField(max_length=64)
    # Null while the first request is still running.
    status_code = models.PositiveSmallIntegerField(null=True)
    content_type = models.CharField(max_length=100, blank=True)
    body = models.TextField(blank=True)
    created_at = models.DateTimeField()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["client", "key"], name="idempotency_key_unique")]
        indexes = [models.Index(fields=["created_at"])]

    def __str__(self) -> str:
        return f"{self.client_id}:{self.key}"
