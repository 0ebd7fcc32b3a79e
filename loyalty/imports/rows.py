"""Checking an import file's rows (loyalty.imports.files reads them): fields in, a Row out, or a precise error per
bad field."""

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import partial
from typing import NamedTuple

from django.utils import timezone

from core.models import Program
from core.validation import is_plain_decimal
from loyalty.imports.files import COLUMNS
from loyalty.models import Transaction
from loyalty.transactions import CLOCK_SKEW
from members.numbers import is_valid_member_number

_CHANNELS = frozenset(Transaction.Channel.values)
_KINDS = frozenset(Transaction.Kind.values)
_MAX_AMOUNT = Decimal("9999999999.99")  # numeric(12, 2)


class Row(NamedTuple):
    line: int
    store: str
    external_id: str
    channel: str
    member: str  # a member number, or "" for an anonymous purchase
    kind: str
    original_external_id: str
    original_store: str
    occurred_at: datetime
    total: Decimal
    lines: list
    # occurred_at as the import writes it (datetime.isoformat(" ")), where the file gave it so already, at a fifth of
    # the cost of writing it anew; else "".
    occurred_text: str = ""


# A Row of all its fields, made as namedtuple's _make makes one, without the Python-level __new__ (at a third of
# the cost, 0.15 µs a row less).
_new_row = partial(tuple.__new__, Row)


class RowInvalid(Exception):
    def __init__(self, errors: list[tuple[str, str]]):
        self.errors = errors


class RowParser:
    """Turns a row's fields into a Row, checking them as the transactions API does; raises RowInvalid."""

    def __init__(self, program: Program, now: datetime):
        self.program = program
        self.latest = now + CLOCK_SKEW
        age = program.max_transaction_age_days
        self.earliest = now - timedelta(days=age) if age is not None else None
        self.tz = timezone.get_current_timezone()
        if str(self.tz) in ("UTC", "Etc/UTC"):
            self.tz = UTC  # the same zone, which the interpreter converts to and prints in at half zoneinfo's cost
        # A member number -> itself if its check digit is right, else "": checked once per import, and the one copy
        # of it that the import's rows then hold (a file names each member many times; the check keeps every
        # purchase's owner until the import ends: 60 bytes a row less).
        self._numbers: dict[str, str] = {}
        self._totals: dict = {}  # a total's text -> its value, for rows that pass

    def parse(self, line: int, raw: dict | tuple | None) -> Row:
        """The row, or RowInvalid naming every bad field. `raw`: its fields by name, or as a tuple in COLUMNS
        order (as a CSV file gives them); None for a row of the wrong shape."""
        if type(raw) is tuple:
            row = self._parse_plain(line, raw)
            return row if row is not None else self._parse_checked(line, dict(zip(COLUMNS, raw, strict=True)))
        if type(raw) is dict and (row := self._parse_plain(line, tuple(map(raw.get, COLUMNS)))) is not None:
            return row
        return self._parse_checked(line, raw)

    def _parse_plain(self, line: int, values: tuple) -> Row | None:
        """The common row (strings as a CSV file gives them, no lines) accepted in a few µs; None for anything
        else, which _parse_checked then reads field by field. It accepts exactly what _parse_checked accepts."""
        store, external_id, channel, member, kind, original, occurred_at, currency, total, lines, original_store = (
            values
        )
        original = "" if original is None else original
        original_store = "" if original_store is None else original_store
        member = member or ""
        if (
            type(store) is not str
            or type(external_id) is not str
            or type(original) is not str
            or type(original_store) is not str
            or type(member) is not str
            or type(occurred_at) is not str
            or type(total) is not str
            or type(channel) is not str
            or lines not in (None, "", [])
            or currency != self.program.currency
            or channel not in _CHANNELS
        ):
            return None
        store, external_id, original, original_store, number = (
            store.strip(),
            external_id.strip(),
            original.strip(),
            original_store.strip(),
            member.strip(),
        )
        if (
            not store
            or not external_id
            or len(store) > 64
            or len(external_id) > 128
            or len(original) > 128
            or len(original_store) > 64
            or (kind != "purchase" and (kind != "return" or not original))
        ):
            return None
        if member and not (number := self._numbers.get(number) or self._number(number)):  # "  " is no number either
            return None
        amount = self._totals.get(total)
        if amount is None:
            errors: list = []
            amount = _decimal(total, 2, errors, "total")
            if amount is None:
                return None
            if len(self._totals) < 100_000:  # totals repeat; bounded all the same
                self._totals[total] = amount
        try:
            at = datetime.fromisoformat(occurred_at)
        except ValueError:
            return None
        if at.tzinfo is None or at > self.latest or (self.earliest is not None and at < self.earliest):
            return None
        # A time in UTC to the second, YYYY-MM-DDTHH:MM:SS+00:00, in a server zone of UTC, is written as it came. Its
        # first ten characters must be its date (Earnings.lot keeps days by them): not so for 24:00, the next day's
        # midnight, which later Python versions read.
        t = occurred_at
        as_given = self.tz is UTC and len(t) == 25 and t[19:] == "+00:00"
        as_given = as_given and t[4] == t[7] == "-" and t[13] == t[16] == ":" and t[11:13] < "24"
        return _new_row(
            (
                line,
                store,
                external_id,
                channel,
                number,
                kind,
                original,
                original_store,
                at.astimezone(self.tz),
                amount,
                [],
                f"{occurred_at[:10]} {occurred_at[11:]}" if as_given else "",
            )
        )

    def _parse_checked(self, line: int, raw: dict | None) -> Row:
        if raw is None:
            raise RowInvalid(
                [("row", "Not a row of the file's shape (wrong number of columns, or not a JSON object).")]
            )
        errors: list[tuple[str, str]] = []
        text = {}
        for name, limit in (("store", 64), ("external_id", 128), ("original_external_id", 128), ("original_store", 64)):
            value = raw.get(name)
            value = "" if value is None else value
            if not isinstance(value, str):
                errors.append((name, "Must be a string."))
            elif len(value.strip()) > limit:
                errors.append((name, f"At most {limit} characters."))
            text[name] = value.strip() if isinstance(value, str) else ""
        for name in ("store", "external_id"):
            if not text[name] and isinstance(raw.get(name) or "", str):
                errors.append((name, "This field is required."))
        channel, kind = raw.get("channel"), raw.get("type")
        if channel not in _CHANNELS:
            errors.append(("channel", f"Must be one of {', '.join(sorted(_CHANNELS))}, not {channel!r}."))
        if kind not in _KINDS:
            errors.append(("type", f"Must be purchase or return, not {kind!r}."))
        elif kind == Transaction.Kind.RETURN and not text["original_external_id"]:
            errors.append(("original_external_id", "Required for a return."))
        member = raw.get("member") or ""
        if not isinstance(member, str) or member and not self._number(member.strip()):
            errors.append(("member", f"{member!r} is not a member number (ten digits with a check digit)."))
            member = ""
        currency = raw.get("currency")
        if currency != self.program.currency:
            errors.append(("currency", f"Must be {self.program.currency}, not {currency!r}."))
        occurred_at = self._occurred_at(raw.get("occurred_at"), errors)
        total = _decimal(raw.get("total"), 2, errors, "total")
        lines = self._lines(raw.get("lines"), total, errors)
        if errors:
            raise RowInvalid(errors)
        return Row(
            line,
            text["store"],
            text["external_id"],
            channel,
            member.strip(),
            kind,
            text["original_external_id"],
            text["original_store"],
            occurred_at,
            total,
            lines,
        )

    def _number(self, number: str) -> str:
        """`number` if it is a member number, the copy of it that _numbers keeps if it keeps one; else ""."""
        kept = self._numbers.get(number)
        if kept is None:
            kept = number if is_valid_member_number(number) else ""
            if len(self._numbers) < 1_000_000:  # bounded: a file may name millions of members
                self._numbers[number] = kept
        return kept

    def _occurred_at(self, value, errors) -> datetime | None:
        try:
            parsed = datetime.fromisoformat(value) if isinstance(value, str) else None
        except ValueError:
            parsed = None
        if parsed is None:
            errors.append(("occurred_at", f"Not an ISO 8601 time: {value!r}."))
        elif parsed.tzinfo is None:
            errors.append(("occurred_at", "Give the time with its offset, e.g. 2026-05-01T14:30:00+02:00."))
        elif parsed > self.latest:
            errors.append(("occurred_at", "In the future."))
        elif self.earliest is not None and parsed < self.earliest:
            errors.append(("occurred_at", f"More than {self.program.max_transaction_age_days} days ago."))
        else:
            # In the server's time zone, as the API's DateTimeField gives it: expiry is counted in calendar
            # months, so the zone decides the day at a month's end.
            return parsed.astimezone(self.tz)
        return None

    @staticmethod
    def _lines(value, total, errors) -> list:
        if value in (None, "", []):
            return []
        if isinstance(value, str):  # a CSV cell holds the lines as JSON
            try:
                value = json.loads(value, parse_float=Decimal)  # as a JSON-lines file is read
            except ValueError:
                value = None
        if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
            errors.append(("lines", "Must be a list of objects with sku, category, quantity, unit_price, amount."))
            return []
        lines = []
        for i, item in enumerate(value):
            sku, category = item.get("sku"), item.get("category") or ""
            if not isinstance(sku, str) or not sku.strip() or len(sku) > 64:
                errors.append((f"lines[{i}].sku", "Required, at most 64 characters."))
            if not isinstance(category, str) or len(category) > 64:
                errors.append((f"lines[{i}].category", "At most 64 characters."))
            numbers = {
                name: _decimal(item.get(name), places, errors, f"lines[{i}].{name}")
                for name, places in (("quantity", 3), ("unit_price", 2), ("amount", 2))
            }
            lines.append({"sku": sku, "category": category, **{k: str(v) for k, v in numbers.items()}})
        if total is not None and not errors:
            added = sum((Decimal(line["amount"]) for line in lines), Decimal(0))
            if added != total:
                errors.append(("lines", f"The amounts add up to {added}, not {total}."))
        return lines


def _decimal(value, places: int, errors: list, name: str) -> Decimal | None:
    """A non-negative decimal with at most `places` decimals, quantized to them as the API's DecimalField does. Text
    must be written as the contract writes amounts (core.validation.is_plain_decimal: "1e5", "1_000" or "١٢" are
    refused, as the API refuses them), spaces around it aside, which a CSV cell may carry; a JSON number is a
    number."""
    if isinstance(value, str):
        value = value.strip()
        number = Decimal(value) if is_plain_decimal(value) else None
    elif isinstance(value, int | Decimal) and not isinstance(value, bool):
        number = Decimal(value)
    elif isinstance(value, float) and is_plain_decimal(value):  # a row given in code, as the API takes it
        number = Decimal(str(value))
    else:
        number = None
    if number is None or not number.is_finite():
        errors.append((name, f"Not a decimal number: {value!r}."))
    elif number < 0:
        errors.append((name, "Must not be negative."))
    elif number.as_tuple().exponent < -places:
        errors.append((name, f"At most {places} decimal places."))
    elif number > _MAX_AMOUNT:
        errors.append((name, f"At most {_MAX_AMOUNT}."))
    else:
        return number.quantize(Decimal(1).scaleb(-places)).copy_abs()  # "-0.00" is 0.00: no -0 to cache by value
    return None
