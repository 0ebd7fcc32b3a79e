"""Tier management over the API (API.md: Management), with the `program:manage` scope. Retiring is the only way to
remove a tier: history keeps referring to it."""

from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from core.errors import NotFound
from core.models import Program
from core.pagination import CursorPagination
from core.validation import DecimalField, UnknownFieldsRefused
from loyalty.tier_models import Tier
from loyalty.tier_selectors import tier_progress_get
from loyalty.tier_setup import CODE_RE, MAX_MULTIPLIER, tier_create, tier_retire, tier_update
from members.models import Member

LOCALES = ("en", "sv", "nb")


def tier_output(tier: Tier, program: Program, *, with_retired: bool = False) -> dict:
    """A tier as integrations see it; the threshold is in the programme's measure (money as a decimal string)."""
    threshold = f"{tier.threshold:.2f}" if program.tier_measure == Program.TierMeasure.SPEND else int(tier.threshold)
    body = {
        "code": tier.code,
        "name": tier.name_en,
        "names": {loc: tier.name_in(loc) for loc in LOCALES},
        "rank": tier.rank,
        "threshold": threshold,
        "measure": program.tier_measure,
        "benefits": {
            "earn_multiplier": f"{tier.earn_multiplier.normalize():f}",
            "perks": {loc: tier.perks_in(loc) for loc in LOCALES},
        },
    }
    if with_retired:
        body["retired_at"] = tier.retired_at.isoformat() if tier.retired_at else None
    return body


def tier_balance_fields(*, member: Member, program: Program) -> dict:
    """The balance endpoint's `tier` and `next_tier`, in the member's language; both null without tiers."""
    progress = tier_progress_get(member=member, program=program)
    if progress is None:
        return {"tier": None, "next_tier": None}
    tier, following, locale = progress.tier, progress.next_tier, member.locale
    amount = (lambda v: f"{v:.2f}") if progress.measure == Program.TierMeasure.SPEND else int
    return {
        "tier": None
        if tier is None
        else {
            "code": tier.code,
            "name": tier.name_in(locale),
            "since": progress.since.isoformat() if progress.since else None,
            "review_at": progress.review_at.isoformat() if progress.review_at else None,
            "manual_until": progress.manual_until.isoformat() if progress.manual_until else None,
            "perks": tier.perks_in(locale),
            "earn_multiplier": f"{tier.earn_multiplier.normalize():f}",
        },
        "next_tier": None
        if following is None
        else {
            "code": following.code,
            "name": following.name_in(locale),
            "measure": progress.measure,
            "current": amount(progress.value),
            "needed": amount(progress.needed),
        },
    }


class LocalizedSerializer(serializers.Serializer):
    en = serializers.CharField(max_length=80, required=False, allow_blank=True)
    sv = serializers.CharField(max_length=80, required=False, allow_blank=True)
    nb = serializers.CharField(max_length=80, required=False, allow_blank=True)


class PerksSerializer(serializers.Serializer):
    en = serializers.CharField(max_length=2000, required=False, allow_blank=True)
    sv = serializers.CharField(max_length=2000, required=False, allow_blank=True)
    nb = serializers.CharField(max_length=2000, required=False, allow_blank=True)


class TierInputSerializer(UnknownFieldsRefused, serializers.Serializer):
    code = serializers.RegexField(CODE_RE, max_length=32)
    name = LocalizedSerializer()
    perks = PerksSerializer(required=False)
    rank = serializers.IntegerField(min_value=0, max_value=1000)
    threshold = DecimalField(max_digits=14, decimal_places=2, min_value=0)
    earn_multiplier = DecimalField(
        max_digits=6,
        decimal_places=3,
        min_value=1,
        max_value=MAX_MULTIPLIER,
        required=False,
        error_messages={"min_value": "Must be at least 1: a tier never earns less than the base rate."},
    )

    def validate_name(self, value):
        if (not self.partial or "en" in value) and not (value.get("en") or "").strip():
            raise serializers.ValidationError("The English name (name.en) is required.")
        return value


class TierPatchSerializer(TierInputSerializer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, partial=True, **kwargs)
        del self.fields["code"]


def _service_fields(data: dict) -> dict:
    fields = {k: data[k] for k in ("rank", "threshold", "earn_multiplier") if k in data}
    for loc, text in data.get("name", {}).items():
        fields[f"name_{loc}"] = text.strip()
    for loc, text in data.get("perks", {}).items():
        fields[f"perks_{loc}"] = text.strip()
    return fields


def _tier_for(request, code: str) -> Tier:
    # A path's code that no tier can have is not looked for: PostgreSQL refuses some text (a NUL from %00).
    tier = None
    if CODE_RE.match(code):
        tier = Tier.objects.select_related("program").filter(program=request.auth.program, code=code).first()
    if tier is None:
        raise NotFound(f"No tier {code} in this programme.", code="tier_not_found")
    return tier


class TierPagination(CursorPagination):
    ordering = ("rank", "id")


class TierListApi(APIView):
    scopes = {"GET": "program:manage", "POST": "program:manage"}

    class FilterSerializer(serializers.Serializer):
        include_retired = serializers.BooleanField(required=False, default=False)

    @extend_schema(
        operation_id="v1_tiers_list", parameters=[OpenApiParameter("include_retired", bool)], responses={200: dict}
    )
    def get(self, request):
        filters = self.FilterSerializer(data=request.query_params)
        filters.is_valid(raise_exception=True)
        program = Program.objects.get(pk=request.auth.program.pk)
        tiers = Tier.objects.filter(program=program)
        if not filters.validated_data["include_retired"]:
            tiers = tiers.filter(retired_at__isnull=True)
        paginator = TierPagination()
        page = paginator.paginate_queryset(tiers, request, view=self)
        return paginator.get_paginated_response([tier_output(t, program, with_retired=True) for t in page])

    @extend_schema(request=TierInputSerializer, responses={201: dict})
    def post(self, request):
        serializer = TierInputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        program = Program.objects.get(pk=request.auth.program.pk)
        fields = _service_fields(data)
        tier = tier_create(
            program=program,
            code=data["code"],
            name_en=fields.pop("name_en"),
            rank=fields.pop("rank"),
            threshold=fields.pop("threshold"),
            **fields,
        )
        return Response(tier_output(tier, program, with_retired=True), status=201)


class TierDetailApi(APIView):
    scopes = {"GET": "program:manage", "PATCH": "program:manage", "DELETE": "program:manage"}

    @extend_schema(responses={200: dict})
    def get(self, request, code: str):
        tier = _tier_for(request, code)
        return Response(tier_output(tier, tier.program, with_retired=True))

    @extend_schema(request=TierPatchSerializer, responses={200: dict})
    def patch(self, request, code: str):
        tier = _tier_for(request, code)
        serializer = TierPatchSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        tier = tier_update(tier=tier, **_service_fields(serializer.validated_data))
        return Response(tier_output(tier, tier.program, with_retired=True))

    @extend_schema(responses={200: dict})
    def delete(self, request, code: str):
        """Retire the tier (never deleted: history refers to it). Members holding it keep it until their review."""
        tier = tier_retire(tier=_tier_for(request, code))
        return Response(tier_output(tier, tier.program, with_retired=True))
