"""The rewards catalogue, redemptions with their vouchers, and holds for paying with points.

These tables never hold points themselves: every point moves through loyalty.ledger, and rows here point at the
ledger entries that moved them."""

from django.conf import settings
from django.db import models
from django.db.models import F, Q
from django.utils import translation
from django.utils.translation import gettext_lazy as _

from core.models import ApiClient, Program
from loyalty.models import Entry
from members.models import Member

LANGUAGES = ("en", "sv", "nb")


class Reward(models.Model):
    """Something members spend points on."""

    class Kind(models.TextChoices):
        DISCOUNT = "discount", _("Discount voucher")
        PRODUCT = "product", _("Free product")
        EXPERIENCE = "experience", _("Experience")
        DONATION = "donation", _("Charity donation")
        PARTNER = "partner", _("Partner reward")

    class Period(models.TextChoices):
        DAY = "day", _("Per day")
        WEEK = "week", _("Per week")
        MONTH = "month", _("Per month")
        YEAR = "year", _("Per year")
        EVER = "ever", _("Ever")

    program = models.ForeignKey(Program, on_delete=models.PROTECT, related_name="rewards")
    code = models.SlugField(max_length=40)
    kind = models.CharField(max_length=12, choices=Kind.choices)
    points_cost = models.PositiveIntegerField()
    name_en = models.CharField(max_length=120)
    name_sv = models.CharField(max_length=120, blank=True)
    name_nb = models.CharField(max_length=120, blank=True)
    description_en = models.TextField(blank=True)
    description_sv = models.TextField(blank=True)
    description_nb = models.TextField(blank=True)
    image_url = models.URLField(max_length=500, blank=True)
    # Discount vouchers: an amount or a percentage off, optionally above a minimum basket.
    discount_amount = models.DecimalField(max_digits=12, decimal_places=2, null=True, blank=True)
    discount_percent = models.DecimalField(max_digits=5, decimal_places=2, null=True, blank=True)
    min_basket = models.DecimalField(max_digits=12, decimal_places=2, null=True, blank=True)
    # Free products: what the till hands over. Partner rewards and donations: who delivers or receives it.
    product_sku = models.CharField(max_length=64, blank=True)
    partner = models.CharField(max_length=120, blank=True, help_text=_("Partner, or the cause a donation goes to."))
    # Null: unlimited. Taken with UPDATE ... WHERE stock > 0, so the last item goes to exactly one member.
    stock = models.PositiveIntegerField(null=True, blank=True, help_text=_("Empty means unlimited."))
    member_limit = models.PositiveIntegerField(null=True, blank=True, help_text=_("Redemptions per member per period."))
    member_limit_period = models.CharField(max_length=8, choices=Period.choices, default=Period.MONTH)
    # Filled in by the tiers capability: the lowest tier rank that may redeem; empty means every member.
    min_tier_rank = models.PositiveSmallIntegerField(null=True, blank=True)
    available_from = models.DateTimeField(null=True, blank=True)
    available_until = models.DateTimeField(null=True, blank=True)
    voucher_valid_days = models.PositiveIntegerField(default=30)
    active = models.BooleanField(default=True, help_text=_("Retired rewards stay for history but cannot be redeemed."))
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["program", "code"], name="reward_code_unique"),
            models.CheckConstraint(condition=Q(points_cost__gt=0), name="reward_cost_gt_0"),
            models.CheckConstraint(condition=Q(stock__isnull=True) | Q(stock__gte=0), name="reward_stock_gte_0"),
            models.CheckConstraint(condition=Q(voucher_valid_days__gte=1), name="reward_voucher_valid_days_gte_1"),
            models.CheckConstraint(
                condition=Q(available_from__isnull=True)
                | Q(available_until__isnull=True)
                | Q(available_from__lt=F("available_until")),
                name="reward_window_ordered",
            ),
            models.CheckConstraint(
                condition=~Q(kind="discount")
                | Q(discount_amount__gt=0, discount_percent__isnull=True)
                | Q(discount_amount__isnull=True, discount_percent__gt=0, discount_percent__lte=100),
                name="reward_discount_amount_or_percent",
            ),
        ]
        indexes = [models.Index(fields=["program", "kind", "points_cost"])]

    def __str__(self) -> str:
        return f"{self.name_en} ({self.code})"

    def text(self, field: str, language: str | None = None) -> str:
        """`name` or `description` in the language asked for (the request's by default), English as a fallback."""
        language = (language or translation.get_language() or "en")[:2]
        language = "nb" if language == "no" else language
        value = getattr(self, f"{field}_{language}", "") if language in LANGUAGES else ""
        return value or getattr(self, f"{field}_en")


class StockChange(models.Model):
    """Append-only record of staff or systems adding or removing stock; the reward's counter moves with it."""

    reward = models.ForeignKey(Reward, on_delete=models.PROTECT, related_name="stock_changes")
    delta = models.IntegerField()
    stock_after = models.PositiveIntegerField()
    reason = models.CharField(max_length=500)
    staff_user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT)
    api_client = models.ForeignKey(ApiClient, null=True, blank=True, on_delete=models.PROTECT)
    created_at = models.DateTimeField()

    class Meta:
        constraints = [models.CheckConstraint(condition=~Q(delta=0), name="stock_change_nonzero")]

    def __str__(self) -> str:
        return f"{self.reward_id}: {self.delta:+d}"


class Redemption(models.Model):
    """A member spending points on a reward; the points moved by `entry` (and back by `refund_entry`)."""

    class Status(models.TextChoices):
        REDEEMED = "redeemed", _("Redeemed")
        CANCELLED = "cancelled", _("Cancelled, points refunded")

    program = models.ForeignKey(Program, on_delete=models.PROTECT)
    member = models.ForeignKey(Member, on_delete=models.PROTECT, related_name="redemptions")
    reward = models.ForeignKey(Reward, on_delete=models.PROTECT, related_name="redemptions")
    points = models.PositiveIntegerField()
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.REDEEMED)
    entry = models.OneToOneField(Entry, on_delete=models.PROTECT, related_name="redemption")
    refund_entry = models.OneToOneField(
        Entry, null=True, blank=True, on_delete=models.PROTECT, related_name="refunded_redemption"
    )
    api_client = models.ForeignKey(ApiClient, null=True, blank=True, on_delete=models.PROTECT)
    staff_user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT)
    created_at = models.DateTimeField()
    cancelled_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.CheckConstraint(condition=Q(points__gt=0), name="redemption_points_gt_0"),
            models.CheckConstraint(
                condition=Q(status="redeemed", refund_entry__isnull=True, cancelled_at__isnull=True)
                | Q(status="cancelled", refund_entry__isnull=False, cancelled_at__isnull=False),
                name="redemption_cancel_has_refund",
            ),
        ]
        indexes = [
            models.Index(fields=["member", "reward", "created_at"]),
            models.Index(fields=["program", "created_at"]),
        ]

    def __str__(self) -> str:
        return f"Redemption {self.pk}"


class Voucher(models.Model):
    """The proof of a redemption shown at a till. Used once, linked to the purchase it was used in."""

    class Status(models.TextChoices):
        ISSUED = "issued", _("Issued")
        USED = "used", _("Used")
        CANCELLED = "cancelled", _("Cancelled")

    program = models.ForeignKey(Program, on_delete=models.PROTECT)
    redemption = models.OneToOneField(Redemption, on_delete=models.PROTECT, related_name="voucher")
    # Canonical form: 16 characters of Crockford base 32, the last a check character (rewards.codes).
    code = models.CharField(max_length=16, unique=True)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.ISSUED)
    expires_at = models.DateTimeField()
    used_at = models.DateTimeField(null=True, blank=True)
    used_store = models.CharField(max_length=64, blank=True)
    used_transaction_external_id = models.CharField(max_length=128, blank=True)
    # How often a returned purchase gave the voucher back (the programme's voucher return policy).
    restored_count = models.PositiveSmallIntegerField(default=0)
    created_at = models.DateTimeField()

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=Q(status="used", used_at__isnull=False) & ~Q(used_store="")
                | ~Q(status="used") & Q(used_at__isnull=True, used_store="", used_transaction_external_id=""),
                name="voucher_used_names_purchase",
            ),
        ]
        indexes = [models.Index(fields=["program", "used_store", "used_transaction_external_id"])]

    def __str__(self) -> str:
        return self.code


class Hold(models.Model):
    """Points set aside for paying at a till. Its status moves once, by compare-and-set, from open to captured,
    released or lapsed; Account.held counts the points of open holds."""

    class Status(models.TextChoices):
        OPEN = "open", _("Open")
        CAPTURED = "captured", _("Captured")
        RELEASED = "released", _("Released")
        LAPSED = "lapsed", _("Lapsed")

    program = models.ForeignKey(Program, on_delete=models.PROTECT)
    member = models.ForeignKey(Member, on_delete=models.PROTECT, related_name="holds")
    points = models.PositiveIntegerField()
    store = models.CharField(max_length=64)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.OPEN)
    expires_at = models.DateTimeField()
    created_at = models.DateTimeField()
    closed_at = models.DateTimeField(null=True, blank=True)
    captured_points = models.PositiveIntegerField(null=True, blank=True)
    transaction_external_id = models.CharField(max_length=128, blank=True)
    entry = models.OneToOneField(Entry, null=True, blank=True, on_delete=models.PROTECT, related_name="hold")
    api_client = models.ForeignKey(ApiClient, null=True, blank=True, on_delete=models.PROTECT)

    class Meta:
        constraints = [
            models.CheckConstraint(condition=Q(points__gt=0), name="hold_points_gt_0"),
            models.CheckConstraint(
                condition=Q(status="open", closed_at__isnull=True, entry__isnull=True)
                | Q(status__in=["released", "lapsed"], closed_at__isnull=False, entry__isnull=True)
                # The capture's entry is written after the claim, in the same transaction.
                | Q(
                    status="captured", closed_at__isnull=False, captured_points__gt=0, captured_points__lte=F("points")
                ),
                name="hold_status_consistent",
            ),
        ]
        indexes = [
            models.Index(fields=["expires_at"], condition=Q(status="open"), name="hold_to_lapse"),
            models.Index(fields=["program", "store", "transaction_external_id"], name="hold_by_purchase"),
        ]

    def __str__(self) -> str:
        return f"Hold {self.pk} ({self.status})"
