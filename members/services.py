"""Writes to members: enrolment, changes, identifiers and contact consents.

Uniqueness of email, phone, cards and external ids is decided by the database's unique constraints, never by looking
first: two tills enrolling the same person at once must not both succeed."""

import functools
import re
import zoneinfo
from datetime import date, datetime

from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone as dj_timezone

from core.errors import InvalidInput, MemberExists
from core.models import Program
from members.models import Channel, ConsentEvent, Identifier, Member
from members.normalize import normalize_channel, normalize_email, normalize_phone
from members.numbers import new_member_number
from members.referrals import attach_referrer, new_referral_code, referrer_for_code

CONSENT_FIELDS = {"email": "consent_email", "sms": "consent_sms", "push": "consent_push"}
MEMBER_NUMBER_ATTEMPTS = 5
MAX_CARDS = 20
EXTERNAL_CHANNEL_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,31}$")
UPDATABLE = frozenset(
    {
        "email",
        "phone",
        "first_name",
        "last_name",
        "birth_date",
        "locale",
        "timezone",
        "status",
        "external_ids",
        "cards",
        "consents",
        "referral_code",
    }
)


# Which unique constraint a duplicate hit, and the field a client should be told about.
_DUPLICATE_FIELDS = {
    "member_email_unique": ("email", "A member with this email already exists."),
    "member_phone_unique": ("phone", "A member with this phone number already exists."),
    "identifier_unique": ("identifiers", "A card or external id is already registered to another member."),
}


@functools.cache
def _time_zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


def _constraint_name(exc: IntegrityError) -> str:
    diag = getattr(exc.__cause__, "diag", None)
    return getattr(diag, "constraint_name", None) or str(exc)


def _member_exists(exc: IntegrityError) -> MemberExists | None:
    name = _constraint_name(exc)
    for constraint, (field, message) in _DUPLICATE_FIELDS.items():
        if constraint in name:
            return MemberExists(message, errors={field: [message]})
    return None


class _Errors:
    """Collects every field's problem, so one answer lists them all."""

    def __init__(self):
        self.errors: dict[str, list[str]] = {}

    def add(self, field: str, message: str) -> None:
        self.errors.setdefault(field, []).append(message)

    def raise_if_any(self) -> None:
        if self.errors:
            detail = "; ".join(f"{k}: {' '.join(v)}" for k, v in self.errors.items())
            raise InvalidInput(detail, errors=self.errors)


def _clean_text(errors: _Errors, field: str, value, *, max_length: int) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        errors.add(field, "Must be a string.")
        return ""
    value = value.strip()
    if len(value) > max_length:
        errors.add(field, f"At most {max_length} characters.")
    return value


def _clean_email(errors: _Errors, value) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        email = normalize_email(value) if isinstance(value, str) else None
    except ValidationError:
        email = None
    if email is None or len(email) > 254:
        errors.add("email", "Enter a valid email address.")
    return email


def _clean_phone(errors: _Errors, value) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str) or len(value) > 32:
        errors.add("phone", "Enter a valid phone number.")
        return None
    try:
        return normalize_phone(value)
    except ValidationError as exc:
        errors.add("phone", " ".join(exc.messages))
        return None


def _clean_birth_date(errors: _Errors, value, *, today: date) -> date | None:
    if value is None:
        return None
    if isinstance(value, datetime) or not isinstance(value, date):
        errors.add("birth_date", "Must be a date (YYYY-MM-DD).")
        return None
    if value > today or value.year < 1900:
        errors.add("birth_date", "Must lie between 1900-01-01 and today.")
    return value


def _clean_choice(errors: _Errors, field: str, value, choices) -> str:
    if value not in choices:
        errors.add(field, f"'{value}' is not one of: {', '.join(choices)}.")
    return value


def _clean_timezone(errors: _Errors, value) -> str:
    if not isinstance(value, str) or value not in _time_zones():
        errors.add("timezone", f"'{value}' is not an IANA time zone such as 'Europe/Stockholm'.")
    return value


def _clean_external_ids(errors: _Errors, value, *, allow_removal: bool) -> dict[str, str | None]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        errors.add("external_ids", "Must be an object of {channel: id}.")
        return {}
    cleaned: dict[str, str | None] = {}
    for raw_channel, raw_id in value.items():
        channel = normalize_channel(raw_channel) if isinstance(raw_channel, str) else ""
        if not EXTERNAL_CHANNEL_RE.match(channel):
            errors.add("external_ids", f"'{raw_channel}' is not a channel name (a-z, 0-9, '_', '.', '-'; 32 at most).")
            continue
        if channel in cleaned:
            errors.add("external_ids", f"The channel '{channel}' is given twice.")
            continue
        if raw_id is None and allow_removal:
            cleaned[channel] = None
            continue
        ext_id = raw_id.strip() if isinstance(raw_id, str) else ""
        if not ext_id or len(ext_id) > 128:
            errors.add("external_ids", f"The id for '{channel}' must be 1 to 128 characters.")
            continue
        cleaned[channel] = ext_id
    return cleaned


def _clean_cards(errors: _Errors, value) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list | tuple):
        errors.add("cards", "Must be a list of card numbers.")
        return []
    if len(value) > MAX_CARDS:
        errors.add("cards", f"At most {MAX_CARDS} cards.")
    cards: list[str] = []
    for raw in value:
        card = raw.strip() if isinstance(raw, str) else ""
        if not card or len(card) > 128:
            errors.add("cards", "A card number must be 1 to 128 characters.")
        elif card in cards:
            errors.add("cards", f"The card '{card}' is given twice.")
        else:
            cards.append(card)
    return cards


def _clean_consents(errors: _Errors, value) -> dict[str, bool]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        errors.add("consents", "Must be an object such as {'email': true, 'sms': false}.")
        return {}
    cleaned: dict[str, bool] = {}
    for channel, granted in value.items():
        if channel not in CONSENT_FIELDS:
            errors.add("consents", f"'{channel}' is not one of: {', '.join(CONSENT_FIELDS)}.")
        elif not isinstance(granted, bool):
            errors.add("consents", f"The consent for '{channel}' must be true or false.")
        else:
            cleaned[channel] = granted
    return cleaned


def _clean_referrer(errors: _Errors, program: Program, value) -> Member | None:
    referrer, problem = referrer_for_code(program=program, value=value)
    if problem:
        errors.add("referral_code", problem)
    return referrer


def _clean_source(source) -> str:
    if not isinstance(source, str) or not source.strip():
        raise InvalidInput("A source is required.", errors={"source": ["This field is required."]})
    return source.strip()[:120]


def _add_identifiers(*, member: Member, cards: list[str], external_ids: dict[str, str]) -> None:
    Identifier.objects.bulk_create(
        [Identifier(program_id=member.program_id, member=member, kind=Identifier.Kind.CARD, value=c) for c in cards]
        + [
            Identifier(
                program_id=member.program_id, member=member, kind=Identifier.Kind.EXTERNAL, channel=ch, value=value
            )
            for ch, value in external_ids.items()
        ]
    )


@transaction.atomic
def member_enroll(
    *,
    program: Program,
    email: str | None = None,
    phone: str | None = None,
    first_name: str = "",
    last_name: str = "",
    birth_date: date | None = None,
    locale: str = "en",
    timezone: str = "Europe/Stockholm",
    external_ids: dict[str, str] | None = None,
    cards: list[str] | None = None,
    consents: dict[str, bool] | None = None,
    enrollment_channel: str = "pos",
    source: str,
    now: datetime | None = None,
    referral_code: str | None = None,
) -> Member:
    """Enrol a member with identifiers and consents, and with the member who referred them when `referral_code` is
    given. Raises InvalidInput (an unknown referral code: errors.referral_code), or MemberExists when an email, phone,
    card or external id already belongs to a member of the programme; on failure nothing is written."""
    now = now or dj_timezone.now()
    source = _clean_source(source)
    errors = _Errors()
    fields = {
        "email": _clean_email(errors, email),
        "phone": _clean_phone(errors, phone),
        "first_name": _clean_text(errors, "first_name", first_name, max_length=100),
        "last_name": _clean_text(errors, "last_name", last_name, max_length=100),
        "birth_date": _clean_birth_date(errors, birth_date, today=now.date()),
        "locale": _clean_choice(errors, "locale", locale, Member.Locale.values),
        "timezone": _clean_timezone(errors, timezone),
        "enrollment_channel": _clean_choice(errors, "enrollment_channel", enrollment_channel, Channel.values),
    }
    ext_ids = _clean_external_ids(errors, external_ids, allow_removal=False)
    card_list = _clean_cards(errors, cards)
    consent_map = _clean_consents(errors, consents)
    referrer = _clean_referrer(errors, program, referral_code) if referral_code is not None else None
    errors.raise_if_any()

    for attempt in range(MEMBER_NUMBER_ATTEMPTS):
        member = Member(
            program=program,
            member_number=new_member_number(),
            referral_code=new_referral_code(),
            referred_by=referrer,
            enrolled_at=now,
            **fields,
        )
        try:
            # A savepoint, so that a collision on the random member number can be retried in this transaction.
            with transaction.atomic():
                member.save(force_insert=True)
            break
        except IntegrityError as exc:
            if (duplicate := _member_exists(exc)) is not None:
                raise duplicate from exc
            name = _constraint_name(exc)
            collided = "member_number" in name or "member_referral_code_unique" in name
            if not collided or attempt == MEMBER_NUMBER_ATTEMPTS - 1:
                raise
    try:
        with transaction.atomic():
            _add_identifiers(member=member, cards=card_list, external_ids=ext_ids)
    except IntegrityError as exc:
        if (duplicate := _member_exists(exc)) is None:
            raise
        raise duplicate from exc
    if consent_map:
        consents_set(member=member, consents=consent_map, source=source, now=now)
    return member


@transaction.atomic
def consents_set(
    *, member: Member, consents: dict[str, bool], source: str, now: datetime | None = None
) -> list[ConsentEvent]:
    """Set contact consents; a ConsentEvent is written only for a channel whose value changes. Locks the member row."""
    now = now or dj_timezone.now()
    source = _clean_source(source)
    errors = _Errors()
    cleaned = _clean_consents(errors, consents)
    errors.raise_if_any()
    # The lock makes concurrent changes queue up, so each event records a real change from the value before it.
    current = Member.objects.select_for_update().values(*CONSENT_FIELDS.values()).get(pk=member.pk)
    changed = {CONSENT_FIELDS[ch]: granted for ch, granted in cleaned.items() if current[CONSENT_FIELDS[ch]] != granted}
    if not changed:
        return []
    Member.objects.filter(pk=member.pk).update(updated_at=now, **changed)
    for field, granted in changed.items():
        setattr(member, field, granted)
    return ConsentEvent.objects.bulk_create(
        ConsentEvent(member=member, channel=ch, granted=granted, source=source, occurred_at=now)
        for ch, granted in cleaned.items()
        if CONSENT_FIELDS[ch] in changed
    )


def _replace_external_ids(*, member: Member, external_ids: dict[str, str | None]) -> None:
    identifiers = Identifier.objects.filter(member=member, kind=Identifier.Kind.EXTERNAL)
    identifiers.filter(channel__in=list(external_ids)).exclude(
        value__in=[v for v in external_ids.values() if v is not None]
    ).delete()
    kept = set(identifiers.values_list("channel", flat=True))
    _add_identifiers(
        member=member,
        cards=[],
        external_ids={ch: v for ch, v in external_ids.items() if v is not None and ch not in kept},
    )


def _replace_cards(*, member: Member, cards: list[str]) -> None:
    identifiers = Identifier.objects.filter(member=member, kind=Identifier.Kind.CARD)
    identifiers.exclude(value__in=cards).delete()
    kept = set(identifiers.values_list("value", flat=True))
    _add_identifiers(member=member, cards=[c for c in cards if c not in kept], external_ids={})


@transaction.atomic
def member_update(*, member: Member, source: str, now: datetime | None = None, **changes) -> Member:
    """Change a member's details, status, identifiers or consents. `external_ids` replaces the id of each channel
    given (null removes it); `cards` replaces the list of cards. Raises InvalidInput or MemberExists and then changes
    nothing. Locks the member row."""
    now = now or dj_timezone.now()
    source = _clean_source(source)
    unknown = set(changes) - UPDATABLE
    if unknown:
        raise InvalidInput(
            f"Cannot change: {', '.join(sorted(unknown))}.",
            errors={field: ["This field cannot be changed."] for field in sorted(unknown)},
        )
    errors = _Errors()
    fields = {}
    if "email" in changes:
        fields["email"] = _clean_email(errors, changes["email"])
    if "phone" in changes:
        fields["phone"] = _clean_phone(errors, changes["phone"])
    for name in ("first_name", "last_name"):
        if name in changes:
            fields[name] = _clean_text(errors, name, changes[name], max_length=100)
    if "birth_date" in changes:
        fields["birth_date"] = _clean_birth_date(errors, changes["birth_date"], today=now.date())
    if "locale" in changes:
        fields["locale"] = _clean_choice(errors, "locale", changes["locale"], Member.Locale.values)
    if "timezone" in changes:
        fields["timezone"] = _clean_timezone(errors, changes["timezone"])
    if "status" in changes:
        fields["status"] = _clean_choice(errors, "status", changes["status"], Member.Status.values)
    ext_ids = _clean_external_ids(errors, changes.get("external_ids"), allow_removal=True)
    card_list = _clean_cards(errors, changes.get("cards")) if "cards" in changes else None
    consent_map = _clean_consents(errors, changes.get("consents"))
    referrer = _clean_referrer(errors, member.program, changes["referral_code"]) if "referral_code" in changes else None
    errors.raise_if_any()

    locked = Member.objects.select_for_update().get(pk=member.pk)
    if referrer is not None:
        attach_referrer(member=locked, referrer=referrer, now=now)
    try:
        with transaction.atomic():
            if fields or ext_ids or card_list is not None:
                for name, value in fields.items():
                    setattr(locked, name, value)
                locked.save(update_fields=[*fields, "updated_at"])
            if ext_ids:
                _replace_external_ids(member=locked, external_ids=ext_ids)
            if card_list is not None:
                _replace_cards(member=locked, cards=card_list)
    except IntegrityError as exc:
        if (duplicate := _member_exists(exc)) is None:
            raise
        raise duplicate from exc
    if consent_map:
        consents_set(member=locked, consents=consent_map, source=source, now=now)
    return locked
