"""Fast input validation for hot endpoints."""

import re
import threading

from django.utils.dateparse import parse_datetime
from rest_framework import serializers

_instances = threading.local()


def validate(serializer_class: type[serializers.Serializer], data) -> dict:
    """`serializer_class(data=data).is_valid(raise_exception=True)`, returning the validated data, minus the cost.

    DRF deep-copies every declared field each time a serializer is instantiated, which on the purchase endpoint
    cost more than the database work. `run_validation` on an instance kept per thread gives the same result and
    errors, and keeps no per-call state on the instance (`is_valid` is what stores data and errors on it)."""
    cache = _instances.__dict__
    serializer = cache.get(serializer_class)
    if serializer is None:
        serializer = cache[serializer_class] = serializer_class()
    return serializer.run_validation(data)


class UnknownFieldsRefused:
    """A serializer mixin that refuses fields the serializer does not know, so a typo or a read-only field is a clear
    400 rather than silently ignored: a misspelt condition of an earning rule would otherwise make it match every
    purchase."""

    def validate(self, attrs):
        writable = {name for name, field in self.fields.items() if not field.read_only}
        unknown = set(self.initial_data) - writable if isinstance(self.initial_data, dict) else set()
        if unknown:
            raise serializers.ValidationError({k: ["Unknown or read-only field."] for k in sorted(unknown)})
        return super().validate(attrs)


_PLAIN_DECIMAL = re.compile(r"-?[0-9]+(\.[0-9]+)?")
INVALID_DECIMAL = 'A decimal number, such as "129.90", is required.'


def is_plain_decimal(value) -> bool:
    """Whether `value` is an amount as the contract writes one: a decimal string of ASCII digits ("129.90", "-3")
    or a JSON number. Python's Decimal would also read "1e5", "1_000", " 10", "١٢" and "Infinity": a till that sends
    one of those has a bug, and 100,000 points for "1e5" is not the answer it should get."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    if isinstance(value, float):
        value = str(value)
    return isinstance(value, str) and _PLAIN_DECIMAL.fullmatch(value) is not None


class DecimalField(serializers.DecimalField):
    """DRF's DecimalField, taking only amounts as the contract writes them (is_plain_decimal)."""

    default_error_messages = {"invalid": INVALID_DECIMAL}

    def to_internal_value(self, data):
        if isinstance(data, bool | str | float) and not is_plain_decimal(data):
            self.fail("invalid")
        return super().to_internal_value(data)


class AwareDateTimeField(serializers.DateTimeField):
    """ISO 8601 with an offset; a time without one is ambiguous across the programme's time zones."""

    def to_internal_value(self, value):
        parsed = super().to_internal_value(value)
        # Read again to see what was given: the field makes a time without an offset (2026-01-10, 2026-01-10T10) UTC.
        if isinstance(value, str) and parse_datetime(value).tzinfo is None:
            raise serializers.ValidationError("Give the time with its offset, e.g. 2026-05-01T14:30:00+02:00.")
        return parsed
