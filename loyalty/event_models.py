"""Custom events (actions other than purchases that earn points) and referrals. Imported by loyalty.models so Django
finds them."""

from django.core.validators import MinValueValidator
from django.db import models
from django.db.models import Q
from django.utils.translation import gettext_lazy as _

from core.models import ApiClient, Program
from loyalty.models import Entry, Transaction
from loyalty.rule_models import Period
from members.models import Member


class EventType(models.Model):
    """Something a member can do outside a purchase (complete their profile, review a product, answer a survey), and
    the points it gives, at most `limit_count` times per `limit_period`."""

    program = models.ForeignKey(Program, on_delete=models.PROTECT, related_name="event_types")
    code = models.SlugField(max_length=40)
    name = models.CharField(max_length=120)
    description = models.TextField(blank=True)
    points = models.PositiveIntegerField(validators=[MinValueValidator(1)])
    limit_count = models.PositiveIntegerField(
        null=True, blank=True, help_text=_("Times per member per period that give points; empty means no limit.")
    )
    limit_period = models.CharField(max_length=8, choices=Period.choices, default=Period.EVER)
    qualifying = models.BooleanField(
        default=False,
        db_default=False,
        help_text=_(
            "Its points count toward tier qualification, as purchases' points do. Most programmes keep bonus "
            "points out of it."
        ),
    )
    active = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["code"]
        constraints = [
            models.UniqueConstraint(fields=["program", "code"], name="event_type_code_unique"),
            models.CheckConstraint(condition=Q(points__gte=1), name="event_type_points_gte_1"),
            models.CheckConstraint(
                condition=Q(limit_count__isnull=True) | Q(limit_count__gte=1), name="event_type_limit_gte_1"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.code})"


class MemberEvent(models.Model):
    """One event as a system sent it, once per `external_id`, with the points it gave (0 over the limit)."""

    class Outcome(models.TextChoices):
        AWARDED = "awarded", _("Points given")
        LIMIT_REACHED = "limit_reached", _("Over the member's limit: recorded without points")

    program = models.ForeignKey(Program, on_delete=models.PROTECT)
    member = models.ForeignKey(Member, on_delete=models.PROTECT, related_name="events")
    event_type = models.ForeignKey(EventType, on_delete=models.PROTECT, related_name="member_events")
    external_id = models.CharField(max_length=128)
    occurred_at = models.DateTimeField()
    attributes = models.JSONField(default=dict, blank=True)
    points = models.PositiveIntegerField(default=0)
    # Whether its points count toward tiers: its type qualified when it was recorded. Kept on the event so that a
    # recount of the counters counts what counting it did, whatever the type says since.
    qualifying = models.BooleanField(default=False, db_default=False)
    outcome = models.CharField(max_length=16, choices=Outcome.choices)
    entry = models.OneToOneField(Entry, null=True, blank=True, on_delete=models.PROTECT, related_name="member_event")
    api_client = models.ForeignKey(ApiClient, null=True, blank=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["program", "external_id"], name="member_event_unique"),
            models.CheckConstraint(
                condition=Q(outcome="awarded", points__gt=0) | Q(outcome="limit_reached", points=0),
                name="member_event_points_match_outcome",
            ),
        ]
        # Counting a member's events of a type in a period, for the limit.
        indexes = [models.Index(fields=["member", "event_type", "occurred_at"])]

    def __str__(self) -> str:
        return f"{self.event_type_id}/{self.external_id}"


class Referral(models.Model):
    """A rewarded referral: the referee's first qualifying purchase gave both members their points, once (the
    referee is unique). Who referred whom is Member.referred_by; a referral without a row here is still pending.
    `undone_by`: the return that completed the return of that purchase and took both members' points back."""

    program = models.ForeignKey(Program, on_delete=models.PROTECT)
    referrer = models.ForeignKey(Member, on_delete=models.PROTECT, related_name="+")
    referee = models.OneToOneField(Member, on_delete=models.PROTECT, related_name="referral")
    transaction = models.OneToOneField(Transaction, on_delete=models.PROTECT, related_name="referral")
    referrer_points = models.PositiveIntegerField()
    referee_points = models.PositiveIntegerField()
    referrer_entry = models.OneToOneField(Entry, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    referee_entry = models.OneToOneField(Entry, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    created_at = models.DateTimeField()
    undone_by = models.OneToOneField(
        Transaction, null=True, blank=True, on_delete=models.PROTECT, related_name="referral_undone"
    )

    class Meta:
        constraints = [
            models.CheckConstraint(condition=~Q(referrer=models.F("referee")), name="referral_not_self"),
        ]

    def __str__(self) -> str:
        return f"{self.referrer_id} referred {self.referee_id}"
