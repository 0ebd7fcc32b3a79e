"""Canonical forms of identifiers, so that every channel finds the same member."""

import phonenumbers
from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import validate_email


def normalize_channel(value: str) -> str:
    """An external id's channel as it is kept: trimmed and lower-cased."""
    return value.strip().lower()


def normalize_email(value: str) -> str:
    """Trimmed and lower-cased; raises ValidationError when it is not an email address."""
    email = value.strip().lower()
    validate_email(email)
    return email


def normalize_phone(value: str, *, region: str | None = None) -> str:
    """E.164 (+46701234567); numbers without a country code are read in the programme's region."""
    try:
        number = phonenumbers.parse(value, region or settings.LOYALTY_DEFAULT_REGION)
    except phonenumbers.NumberParseException as exc:
        raise ValidationError(f"'{value}' is not a phone number.") from exc
    if not phonenumbers.is_valid_number(number):
        raise ValidationError(f"'{value}' is not a valid phone number.")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
