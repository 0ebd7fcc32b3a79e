"""GET /rewards (any key of the programme) and its management with the program:manage scope."""

from decimal import Decimal

from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import exceptions, serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from core.pagination import CursorPagination
from core.schema import listing
from core.validation import AwareDateTimeField, DecimalField
from rewards.api.common import member_from_body
from rewards.models import LANGUAGES, Reward
from rewards.selectors import reward_get, reward_list
from rewards.services.catalogue import MAX_STOCK_DELTA, reward_create, reward_retire, reward_stock_change, reward_update

MAX_POINTS = 10_000_000
CENT = Decimal("0.01")


class RewardInputSerializer(serializers.Serializer):
    code = serializers.SlugField(max_length=40)
    kind = serializers.ChoiceField(choices=Reward.Kind.choices)
    points_cost = serializers.IntegerField(min_value=1, max_value=MAX_POINTS)
    name_en = serializers.CharField(max_length=120)
    name_sv = serializers.CharField(max_length=120, required=False, allow_blank=True)
    name_nb = serializers.CharField(max_length=120, required=False, allow_blank=True)
    description_en = serializers.CharField(max_length=5000, required=False, allow_blank=True)
    description_sv = serializers.CharField(max_length=5000, required=False, allow_blank=True)
    description_nb = serializers.CharField(max_length=5000, required=False, allow_blank=True)
    image_url = serializers.URLField(max_length=500, required=False, allow_blank=True)
    discount_amount = DecimalField(max_digits=12, decimal_places=2, required=False, allow_null=True)
    discount_percent = DecimalField(max_digits=5, decimal_places=2, required=False, allow_null=True)
    min_basket = DecimalField(max_digits=12, decimal_places=2, min_value=0, required=False, allow_null=True)
    product_sku = serializers.CharField(max_length=64, required=False, allow_blank=True)
    partner = serializers.CharField(max_length=120, required=False, allow_blank=True)
    stock = serializers.IntegerField(min_value=0, max_value=MAX_STOCK_DELTA, required=False, allow_null=True)
    member_limit = serializers.IntegerField(min_value=1, max_value=1_000_000, required=False, allow_null=True)
    member_limit_period = serializers.ChoiceField(choices=Reward.Period.choices, required=False)
    min_tier_rank = serializers.IntegerField(min_value=0, max_value=32767, required=False, allow_null=True)
    available_from = AwareDateTimeField(required=False, allow_null=True)
    available_until = AwareDateTimeField(required=False, allow_null=True)
    voucher_valid_days = serializers.IntegerField(min_value=1, max_value=3650, required=False)
    active = serializers.BooleanField(required=False)

    def validate(self, attrs):
        # DRF ignores fields it does not know; a misspelt or unchangeable field must not be silently dropped.
        unknown = sorted(set(self.initial_data) - set(self.fields)) if isinstance(self.initial_data, dict) else []
        if unknown:
            hint = {"stock": "Change stock through POST /rewards/{code}/stock.", "code": "The code cannot change."}
            raise serializers.ValidationError({k: [hint.get(k, "Unknown field.")] for k in unknown})
        return attrs


class RewardChangeSerializer(RewardInputSerializer):
    """A change: any catalogue field but the code (the reward's identity) and stock (changed through /stock)."""

    code = None
    stock = None


class RewardOutputSerializer(serializers.ModelSerializer):
    name = serializers.SerializerMethodField()
    description = serializers.SerializerMethodField()
    names = serializers.SerializerMethodField()
    descriptions = serializers.SerializerMethodField()
    value = serializers.SerializerMethodField()

    class Meta:
        model = Reward
        fields = [
            "code",
            "kind",
            "name",
            "description",
            "names",
            "descriptions",
            "points_cost",
            "value",
            "image_url",
            "discount_amount",
            "discount_percent",
            "min_basket",
            "product_sku",
            "partner",
            "stock",
            "member_limit",
            "member_limit_period",
            "min_tier_rank",
            "available_from",
            "available_until",
            "voucher_valid_days",
            "active",
        ]

    def get_name(self, reward) -> str:
        return reward.text("name")

    def get_description(self, reward) -> str:
        return reward.text("description")

    def get_names(self, reward) -> dict:
        return {lang: getattr(reward, f"name_{lang}") for lang in LANGUAGES}

    def get_descriptions(self, reward) -> dict:
        return {lang: getattr(reward, f"description_{lang}") for lang in LANGUAGES}

    def get_value(self, reward) -> dict:
        """What the points are worth in money: what a donation gives its cause."""
        program = reward.program
        return {"amount": str((reward.points_cost * program.point_value).quantize(CENT)), "currency": program.currency}


class RewardPagination(CursorPagination):
    ordering = ("points_cost", "id")


def _reward_response(reward: Reward, status: int = 200) -> Response:
    return Response(RewardOutputSerializer(reward).data, status=status)


class RewardListApi(APIView):
    scopes = {"GET": None, "POST": "program:manage"}  # the catalogue is every key's to read

    class FilterSerializer(serializers.Serializer):
        kind = serializers.ChoiceField(choices=Reward.Kind.choices, required=False)
        tier = serializers.IntegerField(min_value=0, max_value=32767, required=False, help_text="A tier's rank.")
        affordable_for = serializers.CharField(max_length=10, required=False)
        include_retired = serializers.BooleanField(required=False, default=False)

    @extend_schema(
        parameters=[
            OpenApiParameter("kind", str, enum=Reward.Kind.values),
            OpenApiParameter("tier", int, description="Rewards a member of the tier with this rank may redeem."),
            OpenApiParameter("affordable_for", str, description="A member number (needs members:read)."),
            OpenApiParameter("include_retired", bool, description="Also retired and unavailable (program:manage)."),
        ],
        operation_id="v1_rewards_list",
        responses=listing(RewardOutputSerializer, name="RewardList"),
    )
    def get(self, request):
        filters = self.FilterSerializer(data=request.query_params)
        filters.is_valid(raise_exception=True)
        f = filters.validated_data
        if f.get("affordable_for") and not request.auth.has_scope("members:read"):
            raise exceptions.PermissionDenied("affordable_for reads a balance: it needs the scope 'members:read'.")
        if f["include_retired"] and not request.auth.has_scope("program:manage"):
            raise exceptions.PermissionDenied("include_retired needs the scope 'program:manage'.")
        member = (
            member_from_body(request, f["affordable_for"], field="affordable_for") if "affordable_for" in f else None
        )
        rewards = reward_list(
            program=request.auth.program,
            kind=f.get("kind"),
            tier_rank=f.get("tier"),
            affordable_for=member,
            include_retired=f["include_retired"],
        ).select_related("program")
        paginator = RewardPagination()
        page = paginator.paginate_queryset(rewards, request, view=self)
        return paginator.get_paginated_response(RewardOutputSerializer(page, many=True).data)

    @extend_schema(request=RewardInputSerializer, responses={201: RewardOutputSerializer})
    def post(self, request):
        serializer = RewardInputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        return _reward_response(reward_create(program=request.auth.program, **serializer.validated_data), 201)


class RewardDetailApi(APIView):
    scopes = {"GET": None, "PATCH": "program:manage", "DELETE": "program:manage"}

    @extend_schema(responses=RewardOutputSerializer)
    def get(self, request, code: str):
        return _reward_response(reward_get(program=request.auth.program, code=code))

    @extend_schema(request=RewardChangeSerializer, responses=RewardOutputSerializer)
    def patch(self, request, code: str):
        reward = reward_get(program=request.auth.program, code=code)
        serializer = RewardChangeSerializer(data=request.data, partial=True)
        serializer.is_valid(raise_exception=True)
        return _reward_response(reward_update(reward=reward, **serializer.validated_data))

    @extend_schema(responses={200: RewardOutputSerializer}, description="Retire the reward: it stays for history.")
    def delete(self, request, code: str):
        return _reward_response(reward_retire(reward=reward_get(program=request.auth.program, code=code)))


class RewardStockApi(APIView):
    scopes = {"POST": "program:manage"}

    class InputSerializer(serializers.Serializer):
        delta = serializers.IntegerField(min_value=-MAX_STOCK_DELTA, max_value=MAX_STOCK_DELTA)
        reason = serializers.CharField(max_length=500)

    @extend_schema(request=InputSerializer, responses={201: dict})
    def post(self, request, code: str):
        reward = reward_get(program=request.auth.program, code=code)
        serializer = self.InputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        change = reward_stock_change(reward=reward, api_client=request.auth, **serializer.validated_data)
        return Response(
            {"reward": reward.code, "delta": change.delta, "stock": change.stock_after, "reason": change.reason},
            status=201,
        )
