"""Transactions and the points ledger. Only loyalty.ledger writes Account, Entry, Lot and Draw rows."""

from django.conf import settings
from django.db import models
from django.db.models import F, Q
from django.utils.translation import gettext_lazy as _

from core.models import ApiClient, Program
from members.models import Member

# How a transaction's insert meets a repeat of it: by (programme, external id, store) alone, transaction_unique. A
# conflict on any other unique index (a primary key drawn from a sequence set back by a restore) raises.
ON_REPEAT = "ON CONFLICT (program_id, external_id, store) DO NOTHING"


class Transaction(models.Model):
    """A purchase or return as a till or web shop sent it. Anonymous purchases have no member."""

    class Kind(models.TextChoices):
        PURCHASE = "purchase", _("Purchase")
        RETURN = "return", _("Return")

    class Channel(models.TextChoices):
        POS = "pos", _("Store")
        WEB = "web", _("Web shop")
        APP = "app", _("App")

    # No index of their own for program and member: the unique (program, store, external_id) and the (member,
    # -occurred_at) index lead with them and serve their lookups, and every index costs each imported row.
    program = models.ForeignKey(Program, on_delete=models.PROTECT, db_index=False)
    store = models.CharField(max_length=64)
    external_id = models.CharField(max_length=128)
    channel = models.CharField(max_length=8, choices=Channel.choices)
    member = models.ForeignKey(
        Member, null=True, blank=True, on_delete=models.PROTECT, related_name="transactions", db_index=False
    )
    kind = models.CharField(max_length=8, choices=Kind.choices)
    # Indexed only where set (Meta.indexes), as are the other links most rows leave empty: an index entry for every
    # NULL costs each write and serves no lookup.
    original = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.PROTECT, related_name="returns", db_index=False
    )
    occurred_at = models.DateTimeField()
    currency = models.CharField(max_length=3)
    total = models.DecimalField(max_digits=12, decimal_places=2)
    # [{sku, category, quantity, unit_price, amount}] as sent, amounts as decimal strings. A JSON column, not a table:
    # one write instead of one per line on the hot path, and still queryable with jsonb functions.
    lines = models.JSONField(default=list)
    # The part of the total paid with points (a captured hold); a purchase earns only on the part paid in money.
    paid_with_points = models.DecimalField(max_digits=12, decimal_places=2, default=0, db_default=0)
    # Points this transaction moved: earned by a purchase (> 0) or reversed by a return (< 0 or 0).
    points = models.IntegerField(default=0)
    breakdown = models.JSONField(default=list)
    # On purchases, the running totals of their returns; guarded by constraints so returns never exceed the purchase.
    returned_total = models.DecimalField(max_digits=12, decimal_places=2, default=0)
    points_reversed = models.IntegerField(default=0)
    api_client = models.ForeignKey(ApiClient, null=True, blank=True, on_delete=models.SET_NULL, db_index=False)
    created_at = models.DateTimeField()

    class Meta:
        constraints = [
            # external_id before store: a return that does not name its purchase's store finds the purchase by
            # (programme, external_id), which these leading columns serve; with store second, the lookup read every
            # index entry of the programme.
            models.UniqueConstraint(fields=["program", "external_id", "store"], name="transaction_unique"),
            models.CheckConstraint(condition=Q(total__gte=0), name="transaction_total_gte_0"),
            models.CheckConstraint(
                condition=Q(paid_with_points__gte=0, paid_with_points__lte=F("total")), name="paid_with_points_in_total"
            ),
            models.CheckConstraint(
                condition=Q(returned_total__gte=0, returned_total__lte=F("total")), name="returned_within_total"
            ),
            models.CheckConstraint(
                condition=Q(points_reversed__gte=0) & (Q(points_reversed__lte=F("points")) | Q(points_reversed=0)),
                name="reversed_within_earned",
            ),
            models.CheckConstraint(
                condition=Q(kind="purchase", original__isnull=True) | Q(kind="return", original__isnull=False),
                name="return_has_original",
            ),
        ]
        indexes = [
            models.Index(fields=["member", "-occurred_at"]),
            models.Index(fields=["program", "-occurred_at"]),
            models.Index(fields=["original"], condition=Q(original__isnull=False), name="transaction_original_set"),
            models.Index(
                fields=["api_client"], condition=Q(api_client__isnull=False), name="transaction_api_client_set"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.store}/{self.external_id}"


class Account(models.Model):
    """A member's points. The balances are a cache of the ledger, written by loyalty.ledger under a row lock."""

    member = models.OneToOneField(Member, primary_key=True, on_delete=models.PROTECT, related_name="account")
    # Spendable now. Negative only when a return reversed points already spent (the programme's return policy).
    available = models.BigIntegerField(default=0)
    pending = models.BigIntegerField(default=0)
    lifetime_earned = models.BigIntegerField(default=0)
    # Points set aside by open holds (rewards): spendable is available - held. A reservation, not a ledger
    # movement; written only by loyalty.ledger under the account row lock. A database default, because some
    # ledger paths insert accounts with raw SQL.
    held = models.BigIntegerField(default=0, db_default=0)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.CheckConstraint(condition=Q(held__gte=0), name="account_held_gte_0"),
            models.CheckConstraint(condition=Q(pending__gte=0), name="account_pending_gte_0"),
            models.CheckConstraint(condition=Q(lifetime_earned__gte=0), name="account_lifetime_gte_0"),
        ]

    def __str__(self) -> str:
        return f"Account {self.member_id}"


class Entry(models.Model):
    """One change of points. Append-only: a correction is a new entry, never an edit."""

    class Kind(models.TextChoices):
        EARN = "earn", _("Earned")
        REVERSAL = "reversal", _("Reversed by a return")
        REDEEM = "redeem", _("Redeemed")
        EXPIRE = "expire", _("Expired")
        ADJUST = "adjust", _("Adjusted")
        REFUND = "refund", _("Refunded (a cancelled redemption)")
        BONUS = "bonus", _("Bonus (an event or a referral)")

    # Indexed by the (account, -occurred_at, -id) index, which leads with it.
    account = models.ForeignKey(Account, on_delete=models.PROTECT, related_name="entries", db_index=False)
    kind = models.CharField(max_length=10, choices=Kind.choices)
    points = models.BigIntegerField()
    # Balances right after this entry, for statements and replayed responses. Points held for a till (rewards:
    # paying with points) are set aside, not moved: available_after counts them in, held_after says how many.
    available_after = models.BigIntegerField()
    pending_after = models.BigIntegerField()
    held_after = models.BigIntegerField(default=0, db_default=0)
    occurred_at = models.DateTimeField()
    created_at = models.DateTimeField()
    transaction = models.ForeignKey(Transaction, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    reason = models.CharField(max_length=500, blank=True)
    # Indexed only where set (Meta.indexes).
    staff_user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, db_index=False
    )
    api_client = models.ForeignKey(ApiClient, null=True, blank=True, on_delete=models.PROTECT, db_index=False)
    # The spend a refund gives back; unique where set (Meta.constraints), so a spend is refunded at most once
    # whatever races, and the entries that refund nothing, nearly all, are not in the index.
    refund_of = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.PROTECT, related_name="refunded_by", db_index=False
    )

    class Meta:
        verbose_name_plural = "entries"
        constraints = [
            models.CheckConstraint(
                condition=Q(kind="earn", points__gt=0)
                | Q(kind__in=["reversal", "redeem", "expire"], points__lt=0)
                | Q(kind="adjust", points__lt=0)
                | Q(kind="adjust", points__gt=0)
                | Q(kind="refund", points__gt=0)
                | Q(kind="bonus", points__gt=0),
                name="entry_sign_matches_kind",
            ),
            models.CheckConstraint(
                condition=Q(kind="refund", refund_of__isnull=False) | Q(~Q(kind="refund"), refund_of__isnull=True),
                name="refund_names_its_spend",
            ),
            models.CheckConstraint(condition=Q(pending_after__gte=0), name="entry_pending_after_gte_0"),
            models.CheckConstraint(condition=Q(held_after__gte=0), name="entry_held_after_gte_0"),
            models.CheckConstraint(condition=~Q(kind="adjust") | ~Q(reason=""), name="adjustment_has_reason"),
            models.UniqueConstraint(
                fields=["refund_of"], condition=Q(refund_of__isnull=False), name="entry_refunded_once"
            ),
        ]
        indexes = [
            models.Index(fields=["account", "-occurred_at", "-id"]),
            models.Index(fields=["staff_user"], condition=Q(staff_user__isnull=False), name="entry_staff_user_set"),
            models.Index(fields=["api_client"], condition=Q(api_client__isnull=False), name="entry_api_client_set"),
        ]

    def __str__(self) -> str:
        return f"{self.kind} {self.points:+d}"


class Lot(models.Model):
    """Points credited together, spent soonest-to-expire first. Pending until `available_from`."""

    # No index of its own: every lookup of an account's lots is of those with points left, which the partial
    # lot_spendable index serves, and accounts are never deleted (nor their keys changed), which is all the foreign
    # key would need it for. An index entry for every lot cost each credit 1.0-1.3 µs of the database's CPU.
    account = models.ForeignKey(Account, on_delete=models.PROTECT, related_name="lots", db_index=False)
    # A lot is its credit's: keyed by the entry, not by an id of its own, which cost each credit a second unique
    # index entry and a draw from a sequence, 1.2-1.4 µs of the database's CPU (docs/benchmarks.md).
    entry = models.OneToOneField(Entry, primary_key=True, on_delete=models.PROTECT, related_name="lot")
    amount = models.BigIntegerField()
    remaining = models.BigIntegerField()
    available_from = models.DateTimeField()
    expires_at = models.DateTimeField(null=True, blank=True)
    matured = models.BooleanField()

    class Meta:
        constraints = [
            models.CheckConstraint(condition=Q(amount__gt=0), name="lot_amount_gt_0"),
            models.CheckConstraint(
                condition=Q(remaining__gte=0, remaining__lte=F("amount")), name="lot_remaining_range"
            ),
        ]
        indexes = [
            models.Index(fields=["available_from"], condition=Q(matured=False), name="lot_to_mature"),
            models.Index(fields=["expires_at"], condition=Q(remaining__gt=0), name="lot_to_expire"),
            models.Index(fields=["account", "expires_at"], condition=Q(remaining__gt=0), name="lot_spendable"),
        ]

    def __str__(self) -> str:
        return f"Lot {self.pk}: {self.remaining}/{self.amount}"


class Draw(models.Model):
    """How much an entry took from a lot (negative: gave back to it)."""

    entry = models.ForeignKey(Entry, on_delete=models.PROTECT, related_name="draws")
    lot = models.ForeignKey(Lot, on_delete=models.PROTECT, related_name="draws")
    points = models.BigIntegerField()

    class Meta:
        constraints = [models.CheckConstraint(condition=~Q(points=0), name="draw_nonzero")]

    def __str__(self) -> str:
        return f"Entry {self.entry_id} drew {self.points} from lot {self.lot_id}"


from loyalty.event_models import EventType, MemberEvent, Referral  # noqa: E402,F401
from loyalty.rule_models import BudgetSlice, EarningRule, Period, RuleUsage  # noqa: E402,F401
from loyalty.tier_models import Tier, TierChange, TierCounter, TierStatus  # noqa: E402,F401
