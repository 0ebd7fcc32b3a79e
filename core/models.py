import hashlib
import hmac
import secrets

from django.conf import settings
from django.core.validators import MinValueValidator, RegexValidator
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
    max_transaction_age_days = models.PositiveIntegerField(
        null=True, blank=True, help_text=_("Oldest purchase accepted, in days; empty means unlimited.")
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.CheckConstraint(condition=models.Q(points_per_unit__gte=0), name="program_points_per_unit_gte_0"),
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
        return hmac.new(settings.API_KEY_HASH_SECRET.encode(), raw_key.encode(), hashlib.sha256).hexdigest()

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
