"""REST endpoints for transactions (API.md: Transactions); a member's points are loyalty/account_api.py's."""

import logging
import re
from decimal import ROUND_DOWN, Decimal

from django.conf import settings
from django.db import transaction
from django.db.models import F
from drf_spectacular.utils import extend_schema, extend_schema_field
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from core.errors import (
    SERVER_ERROR,
    ApplicationError,
    InvalidInput,
    MemberNotFound,
    Unprocessable,
    problem,
    problem_for,
)
from core.hotpath import reply
from core.models import ApiClient, Program
from core.money import CURRENCIES
from core.validation import INVALID_DECIMAL, AwareDateTimeField, DecimalField, is_plain_decimal, validate
from loyalty.account_api import balance_output
from loyalty.models import Transaction
from loyalty.transactions import (
    TransactionInput,
    TransactionResult,
    transaction_preview,
    transaction_record,
    transaction_record_by_number,
)
from members.models import Member
from members.selectors import member_get, member_lookup
from rewards.services.vouchers import vouchers_restore_for_purchase

logger = logging.getLogger(__name__)


class LineSerializer(serializers.Serializer):
    sku = serializers.CharField(max_length=64)
    category = serializers.CharField(max_length=64, required=False, allow_blank=True, default="")
    quantity = DecimalField(max_digits=12, decimal_places=3, min_value=0)
    unit_price = DecimalField(max_digits=12, decimal_places=2, min_value=0)
    amount = DecimalField(max_digits=12, decimal_places=2, min_value=0)


MAX_LINES = 1000
_PLACES = {"quantity": Decimal("0.001"), "unit_price": Decimal("0.01"), "amount": Decimal("0.01")}
_WHOLE_DIGITS = {"quantity": 9, "unit_price": 10, "amount": 10}


def _line_number(name: str, value) -> str:
    """A line's decimal as a string with its fixed places; ValueError says what is wrong."""
    if not is_plain_decimal(value):
        raise ValueError(INVALID_DECIMAL)
    number = Decimal(str(value))
    if number < 0:
        raise ValueError("Ensure this value is greater than or equal to 0.")
    places = _PLACES[name]
    if number != number.quantize(places, rounding=ROUND_DOWN):
        raise ValueError(f"Ensure that there are no more than {-places.as_tuple().exponent} decimal places.")
    if number >= Decimal(10) ** _WHOLE_DIGITS[name]:
        raise ValueError(f"Ensure that there are no more than {_WHOLE_DIGITS[name]} digits before the decimal point.")
    return str(number.quantize(places))


def _line_text(line: dict, name: str, *, required: bool) -> str:
    """A line's text as CharField(max_length=64) takes it; ValueError says what is wrong."""
    value = line.get(name)
    if value is not None and not isinstance(value, str):
        raise ValueError("Not a valid string.")
    value = (value or "").strip()
    if not value:
        if required:
            raise ValueError("This field is required.")
        return ""
    if len(value) > 64:
        raise ValueError("Ensure this field has no more than 64 characters.")
    if not value.isprintable():  # a quick test first: NUL and surrogates are not printable, tabs and others neither
        # CharField's checks: PostgreSQL refuses both in text and jsonb.
        if "\x00" in value:
            raise ValueError("Null characters are not allowed.")
        if surrogate := next((c for c in value if "\ud800" <= c <= "\udfff"), None):
            raise ValueError(f"Surrogate characters are not allowed: U+{ord(surrogate):X}.")
    return value


def _clean_line(line: dict) -> tuple[dict, dict]:
    clean, problems = {}, {}
    for name, required in (("sku", True), ("category", False)):
        try:
            clean[name] = _line_text(line, name, required=required)
        except ValueError as exc:
            problems[name] = [str(exc)]
    for name in _PLACES:
        try:
            if line.get(name) is None:
                raise ValueError("This field is required.")
            clean[name] = _line_number(name, line[name])
        except ValueError as exc:
            problems[name] = [str(exc)]
    return clean, problems


@extend_schema_field(LineSerializer(many=True))
class LinesField(serializers.Field):
    """A purchase's lines, checked by hand with LineSerializer's rules and error paths (lines[i].field): DRF's
    nested serializer cost more per request than all the database work of a purchase."""

    def to_internal_value(self, data) -> list[dict]:
        if not isinstance(data, list):
            raise serializers.ValidationError("Expected a list of lines.")
        if len(data) > MAX_LINES:
            raise serializers.ValidationError(f"Ensure this field has no more than {MAX_LINES} elements.")
        lines, errors = [], {}
        for index, line in enumerate(data):
            if not isinstance(line, dict):
                errors[index] = {"non_field_errors": ["Expected an object."]}
                continue
            clean, problems = _clean_line(line)
            if problems:
                errors[index] = problems
            lines.append(clean)
        if errors:
            raise serializers.ValidationError(errors)
        return lines

    def to_representation(self, value):
        return value


class MemberLookupSerializer(serializers.Serializer):
    email = serializers.CharField(required=False)
    phone = serializers.CharField(required=False)
    card = serializers.CharField(required=False)
    external_id = serializers.CharField(required=False)
    channel = serializers.CharField(required=False)


class TransactionInputSerializer(serializers.Serializer):
    external_id = serializers.CharField(max_length=128)
    store = serializers.CharField(max_length=64)
    channel = serializers.ChoiceField(choices=Transaction.Channel.choices)
    member = serializers.CharField(max_length=10, required=False, allow_null=True)
    member_lookup = MemberLookupSerializer(required=False, allow_null=True)
    type = serializers.ChoiceField(choices=Transaction.Kind.choices)
    original_external_id = serializers.CharField(max_length=128, required=False, allow_null=True)
    original_store = serializers.CharField(max_length=64, required=False, allow_null=True)
    occurred_at = AwareDateTimeField()
    currency = serializers.CharField(min_length=3, max_length=3)
    total = DecimalField(max_digits=12, decimal_places=2, min_value=0)
    paid_with_points = DecimalField(
        max_digits=12,
        decimal_places=2,
        min_value=0,
        required=False,
        help_text="The part of the total paid with points (the `value` of a captured hold); earns no points.",
    )
    lines = LinesField(required=False)

    def validate_currency(self, value: str) -> str:
        if value not in CURRENCIES:
            raise serializers.ValidationError(f"'{value}' is not an ISO 4217 currency code.")
        return value

    def validate(self, attrs):
        if attrs.get("member") and attrs.get("member_lookup") is not None:
            raise serializers.ValidationError({"member": ["Give member or member_lookup, not both."]})
        if attrs["type"] == Transaction.Kind.RETURN and not attrs.get("original_external_id"):
            raise serializers.ValidationError({"original_external_id": ["Required for a return."]})
        return attrs


_CHANNELS = frozenset(Transaction.Channel.values)  # the enum's .values builds a new list on every use
_PLAIN_PURCHASE_KEYS = frozenset(
    ["external_id", "store", "channel", "member", "type", "occurred_at", "currency", "total", "lines"]
)
_AMOUNT = re.compile(r"[0-9]{1,10}(\.[0-9]{1,2})?")  # ASCII digits: \d takes any script's
_CENT = Decimal("0.01")
_OCCURRED_AT, _LINES = AwareDateTimeField(), LinesField()


def _plain_purchase(data) -> dict | None:
    """TransactionInputSerializer's validated data for the plain purchase a till sends (ASCII identifiers, a total
    such as "129.90", an ISO 8601 time with its offset), checked by hand; None for anything else, which the
    serializer then checks and explains. The serializer's deep field machinery costs more than a purchase's
    database work. tests/test_transactions_api.py checks with Hypothesis that the two agree."""
    if type(data) is not dict or not data.keys() <= _PLAIN_PURCHASE_KEYS or data.get("type") != "purchase":
        return None
    v = {"type": "purchase"}
    for name, longest in (("external_id", 128), ("store", 64)):
        if not _plain_text(data.get(name), longest):
            return None
        v[name] = data[name]
    if "member" in data:
        if data["member"] is not None and not _plain_text(data["member"], 10):
            return None
        v["member"] = data["member"]
    channel, currency, total, occurred = (data.get(k) for k in ("channel", "currency", "total", "occurred_at"))
    if type(channel) is not str or channel not in _CHANNELS:
        return None
    if type(currency) is not str or currency not in CURRENCIES:
        return None
    if type(total) is not str or not _AMOUNT.fullmatch(total) or type(occurred) is not str:
        return None
    v["channel"], v["currency"], v["total"] = channel, currency, Decimal(total).quantize(_CENT)
    try:
        v["occurred_at"] = _OCCURRED_AT.to_internal_value(occurred)
        if "lines" in data:
            v["lines"] = _LINES.to_internal_value(data["lines"])
    except serializers.ValidationError:
        return None
    return v


def _plain_text(value, longest: int) -> bool:
    """A string that CharField takes as it is: ASCII, printable, not empty or too long, no surrounding blanks."""
    return (
        type(value) is str
        and 0 < len(value) <= longest
        and value.isascii()
        and value.isprintable()
        and value.strip() == value
    )


def _checked(data) -> dict:
    """One transaction body's validated data; raises ValidationError."""
    return _plain_purchase(data) or validate(TransactionInputSerializer, data)


def _transaction_input(program: Program, v: dict) -> TransactionInput:
    """A transaction's validated data (`_checked`) with its member resolved; raises an ApplicationError."""
    member = None
    try:
        if v.get("member"):
            member = member_get(program=program, member_number=v["member"])
        elif v.get("member_lookup") is not None:  # {} too, which member_lookup refuses: not an anonymous purchase
            member = member_lookup(program=program, **v["member_lookup"])
    except MemberNotFound as exc:
        raise Unprocessable(exc.detail, code="unknown_member", errors={"member": [exc.detail]}) from exc
    except InvalidInput as exc:  # not exactly one identifier, or one that is no such identifier
        errors = {f"member_lookup.{name}": messages for name, messages in (exc.errors or {}).items()}
        raise InvalidInput(exc.detail, errors=errors or {"member_lookup": [exc.detail]}) from exc
    return _input(v, member)


def _input(v: dict, member: Member | None) -> TransactionInput:
    return TransactionInput(
        store=v["store"],
        external_id=v["external_id"],
        channel=v["channel"],
        kind=v["type"],
        occurred_at=v["occurred_at"],
        currency=v["currency"],
        total=v["total"],
        lines=v.get("lines", []),
        member=member,
        original_external_id=v.get("original_external_id"),
        original_store=v.get("original_store"),
        paid_with_points=v.get("paid_with_points") or Decimal(0),
    )


def _record(client: ApiClient, data: TransactionInput) -> TransactionResult:
    """Record a transaction; a return that completes its purchase also gives back the purchase's vouchers when the
    programme says so. Both in one database transaction: the return and its vouchers succeed or fail together."""
    program = client.program
    if data.kind == Transaction.Kind.PURCHASE:
        return transaction_record(program=program, data=data, api_client=client)
    with transaction.atomic():
        result = transaction_record(program=program, data=data, api_client=client)
        txn = result.transaction
        original = Transaction.objects.filter(pk=txn.original_id, returned_total=F("total")).first()
        if result.created and original is not None:
            vouchers_restore_for_purchase(
                program=program, store=original.store, transaction_external_id=original.external_id
            )
    return result


def _transaction_output(result: TransactionResult, *, preview: bool = False) -> dict:
    txn = result.transaction
    points = {
        "earned": result.points,
        "pending": result.pending,
        "available_at": result.available_at.isoformat() if result.available_at else None,
        "breakdown": txn.breakdown,
    }
    if txn.kind == Transaction.Kind.RETURN:
        points["reversed"] = -result.points
        points["forgiven"] = result.forgiven
    body = {} if preview else {"id": txn.pk, "store": txn.store, "external_id": txn.external_id}
    body.update(
        {
            "type": txn.kind,
            "member": result.member_number,
            "points": points,
            "balance": balance_output(result.balance) if result.balance else None,
        }
    )
    return body


class TransactionApi(APIView):
    scopes = {"POST": "transactions:write"}

    @extend_schema(request=TransactionInputSerializer, responses={201: dict, 200: dict})
    def post(self, request):
        client = request.auth
        checked = _plain_purchase(request.data)
        result = None
        if checked is not None and checked.get("member"):
            # Written in one statement that finds the member too, where the programme's earning allows.
            result = transaction_record_by_number(
                program=client.program, data=_input(checked, None), member_number=checked["member"], api_client=client
            )
        if result is None:
            result = _record(
                client,
                _transaction_input(client.program, checked or validate(TransactionInputSerializer, request.data)),
            )
        return reply(request, _transaction_output(result), status=201 if result.created else 200)


class TransactionPreviewApi(APIView):
    scopes = {"POST": "transactions:write"}

    @extend_schema(request=TransactionInputSerializer, responses={200: dict})
    def post(self, request):
        result = transaction_preview(
            program=request.auth.program, data=_transaction_input(request.auth.program, _checked(request.data))
        )
        return Response(_transaction_output(result, preview=True))


class TransactionBatchApi(APIView):
    scopes = {"POST": "transactions:write"}
    # Each item commits on its own, also under an Idempotency-Key (core.idempotency): it is idempotent by its store and
    # external id.
    idempotent_per_item = True

    class InputSerializer(serializers.Serializer):
        transactions = serializers.ListField(child=serializers.DictField(), allow_empty=False)

        def validate_transactions(self, value):
            if len(value) > settings.TRANSACTION_BATCH_MAX:
                raise serializers.ValidationError(
                    f"At most {settings.TRANSACTION_BATCH_MAX} transactions per batch, not {len(value)}."
                )
            return value

    @extend_schema(request=InputSerializer, responses={200: dict})
    def post(self, request):
        serializer = self.InputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        results = []
        for index, item in enumerate(serializer.validated_data["transactions"]):
            # Each item stands alone (API.md: a result for each): one bad transaction is reported and does not undo
            # the others. Each is its own database transaction, so one that fails unexpectedly, even after writing,
            # leaves nothing; it is reported as a server error and the batch goes on.
            try:
                with transaction.atomic():
                    result = _record(request.auth, _transaction_input(request.auth.program, _checked(item)))
                results.append(
                    {"index": index, "status": 201 if result.created else 200, "body": _transaction_output(result)}
                )
            except (serializers.ValidationError, ApplicationError) as exc:
                status, body, _ = problem_for(exc)
                results.append({"index": index, "status": status, "body": body})
            except Exception:
                logger.exception("transaction batch item %d failed", index)
                results.append({"index": index, "status": 500, "body": problem(status=500, **SERVER_ERROR)})
        return Response({"results": results})
