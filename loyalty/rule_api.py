"""Management of earning rules over the API (scope program:manage), as staff do in the admin."""

from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from core.errors import NotFound
from core.schema import listing
from core.validation import UnknownFieldsRefused
from loyalty.rule_models import EarningRule
from loyalty.rule_services import earning_rule_create, earning_rule_retire, earning_rule_update

FIELDS = [
    "code",
    "name",
    "description",
    "active",
    "priority",
    "exclusive",
    "valid_from",
    "valid_until",
    "categories",
    "skus",
    "stores",
    "channels",
    "days_of_week",
    "time_from",
    "time_until",
    "min_basket",
    "tiers",
    "first_purchase",
    "birthday_month",
    "benefit",
    "value",
    "member_limit",
    "member_limit_period",
    "budget",
]


class RuleSerializer(UnknownFieldsRefused, serializers.ModelSerializer):
    budget_used = serializers.IntegerField(read_only=True, help_text="Points given from the budget so far.")

    class Meta:
        model = EarningRule
        fields = FIELDS + ["budget_used", "created_at", "updated_at"]
        read_only_fields = ["budget_used", "created_at", "updated_at"]
        # Uniqueness of code is the database's to decide (409), not a racy pre-check.
        validators = []


def _rule(request, code: str) -> EarningRule:
    rule = EarningRule.objects.filter(program=request.auth.program, code=code).first()
    if rule is None:
        raise NotFound(f"No earning rule '{code}' in this programme.")
    return rule


class EarningRuleListApi(APIView):
    scopes = {"GET": "program:manage", "POST": "program:manage"}

    @extend_schema(
        operation_id="v1_earning_rules_list",
        responses=listing(RuleSerializer, name="EarningRuleList", paginated=False),
    )
    def get(self, request):
        rules = EarningRule.objects.filter(program=request.auth.program).prefetch_related("budget_slices")
        return Response({"results": RuleSerializer(rules, many=True).data})

    @extend_schema(request=RuleSerializer, responses={201: RuleSerializer})
    def post(self, request):
        serializer = RuleSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        rule = earning_rule_create(program=request.auth.program, **serializer.validated_data)
        return Response(RuleSerializer(rule).data, status=201)


class EarningRuleDetailApi(APIView):
    scopes = {"GET": "program:manage", "PATCH": "program:manage", "DELETE": "program:manage"}

    @extend_schema(responses=RuleSerializer)
    def get(self, request, code: str):
        return Response(RuleSerializer(_rule(request, code)).data)

    @extend_schema(request=RuleSerializer, responses=RuleSerializer)
    def patch(self, request, code: str):
        rule = _rule(request, code)
        serializer = RuleSerializer(rule, data=request.data, partial=True)
        serializer.is_valid(raise_exception=True)
        return Response(RuleSerializer(earning_rule_update(rule=rule, **serializer.validated_data)).data)

    @extend_schema(
        responses={200: RuleSerializer}, description="Retires the rule; it is kept for the purchases it gave."
    )
    def delete(self, request, code: str):
        return Response(RuleSerializer(earning_rule_retire(rule=_rule(request, code))).data)
