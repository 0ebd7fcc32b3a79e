import zoneinfo

from django.db import models
from django.db.models import Q
from django.utils.translation import gettext_lazy as _

from core.models import Program


class Channel(models.TextChoices):
    POS = "pos", _("Store")
    WEB = "web", _("Web shop")
    APP = "app", _("App")
    ADMIN = "admin", _("Staff")
    IMPORT = "import", _("Import")


class Member(models.Model):
    class Status(models.TextChoices):
        ACTIVE = "active", _("Active")
        SUSPENDED = "suspended", _("Suspended")
        CLOSED = "closed", _("Closed")

    class Locale(models.TextChoices):
        EN = "en", "English"
        SV = "sv", "Svenska"
        NB = "nb", "Norsk bokmål"

    program = models.ForeignKey(Program, on_delete=models.PROTECT, related_name="members")
    member_number = models.CharField(max_length=10, unique=True, editable=False)
    first_name = models.CharField(max_length=100, blank=True)
    last_name = models.CharField(max_length=100, blank=True)
    # Normalised by members.services (lower-case email, E.164 phone); unique within the programme.
    email = models.EmailField(max_length=254, null=True, blank=True)
    phone = models.CharField(max_length=16, null=True, blank=True)
    birth_date = models.DateField(null=True, blank=True)
    locale = models.CharField(max_length=5, choices=Locale.choices, default=Locale.EN)
    timezone = models.CharField(max_length=64, default="Europe/Stockholm")
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.ACTIVE)
    enrollment_channel = models.CharField(max_length=10, choices=Channel.choices, default=Channel.POS)
    enrolled_at = models.DateTimeField()
    updated_at = models.DateTimeField(auto_now=True)
    # Current consent per channel; every change is also an append-only ConsentEvent, written by members.services.
    consent_email = models.BooleanField(default=False)
    consent_sms = models.BooleanField(default=False)
    consent_push = models.BooleanField(default=False)
    # Given at enrolment (members.referrals); the code others enrol with to name this member as their referrer.
    referral_code = models.CharField(max_length=8, editable=False)
    # Who referred this member: set once, at enrolment or shortly after it. loyalty.referrals rewards both.
    referred_by = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.PROTECT, related_name="referees", editable=False
    )

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["program", "referral_code"], name="member_referral_code_unique"),
            models.UniqueConstraint(
                fields=["program", "email"], condition=Q(email__isnull=False), name="member_email_unique"
            ),
            models.UniqueConstraint(
                fields=["program", "phone"], condition=Q(phone__isnull=False), name="member_phone_unique"
            ),
        ]
        indexes = [models.Index(fields=["program", "enrolled_at"])]

    def __str__(self) -> str:
        return self.member_number

    @property
    def tz(self) -> zoneinfo.ZoneInfo:
        return zoneinfo.ZoneInfo(self.timezone)


class Identifier(models.Model):
    """A card number or another system's id for the member; with email and phone, how every channel finds them."""

    class Kind(models.TextChoices):
        CARD = "card", _("Card")
        EXTERNAL = "external", _("External id")

    program = models.ForeignKey(Program, on_delete=models.PROTECT)
    member = models.ForeignKey(Member, on_delete=models.CASCADE, related_name="identifiers")
    kind = models.CharField(max_length=10, choices=Kind.choices)
    channel = models.CharField(max_length=32, blank=True, help_text=_("The system an external id belongs to."))
    value = models.CharField(max_length=128)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["program", "kind", "channel", "value"], name="identifier_unique"),
            models.UniqueConstraint(
                fields=["member", "channel"], condition=Q(kind="external"), name="one_external_id_per_channel"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.kind}:{self.channel}:{self.value}" if self.channel else f"{self.kind}:{self.value}"


class ConsentEvent(models.Model):
    """Append-only history of every grant and revocation of contact consent."""

    class Channel(models.TextChoices):
        EMAIL = "email", _("Email")
        SMS = "sms", _("SMS")
        PUSH = "push", _("Push")

    member = models.ForeignKey(Member, on_delete=models.CASCADE, related_name="consent_events")
    channel = models.CharField(max_length=8, choices=Channel.choices)
    granted = models.BooleanField()
    source = models.CharField(max_length=120, help_text=_("Who recorded it: an API client, staff user or the member."))
    occurred_at = models.DateTimeField()

    class Meta:
        indexes = [models.Index(fields=["member", "channel", "-occurred_at"])]

    def __str__(self) -> str:
        return f"{self.channel} {'granted' if self.granted else 'revoked'} at {self.occurred_at:%Y-%m-%d %H:%M}"
