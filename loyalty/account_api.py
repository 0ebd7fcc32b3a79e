"""REST endpoints for a member's points: balance, activity and adjustments (API.md: Members, Points)."""

from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from core.hotpath import reply
from core.pagination import CursorPagination
from core.schema import listing
from core.validation import AwareDateTimeField
from loyalty.ledger import Balance
from loyalty.models import Entry
from loyalty.points import points_adjust
from loyalty.selectors import balance_get, entry_list
from loyalty.tier_api import tier_balance_fields
from members.selectors import member_get


def balance_output(balance: Balance) -> dict:
    """A member's balances in an answer, counted as the balance endpoint counts them: held points are not
    available, and a debt (a return of points already spent) shows as a negative balance."""
    return {"available": balance.available - balance.held, "held": balance.held, "pending": balance.pending}


class BalanceApi(APIView):
    scopes = {"GET": "members:read"}

    class OutputSerializer(serializers.Serializer):
        class ExpiringSerializer(serializers.Serializer):
            points = serializers.IntegerField()
            expires_at = serializers.DateTimeField()

        member = serializers.CharField()
        available = serializers.IntegerField(help_text="Spendable now: the balance less points held for a till.")
        held = serializers.IntegerField()
        pending = serializers.IntegerField()
        lifetime_earned = serializers.IntegerField()
        expiring = ExpiringSerializer(many=True, help_text="Soonest first.")
        tier = serializers.DictField(allow_null=True)
        next_tier = serializers.DictField(allow_null=True)

    @extend_schema(responses=OutputSerializer)
    def get(self, request, member_number: str):
        program = request.auth.program
        member, balance = balance_get(program=program, member_number=member_number)
        return reply(
            request,
            {
                "member": member.member_number,
                "available": balance.available,
                "held": balance.held,
                "pending": balance.pending,
                "lifetime_earned": balance.lifetime_earned,
                "expiring": [
                    {"points": e["points"], "expires_at": e["expires_at"].isoformat()} for e in balance.expiring
                ],
                **tier_balance_fields(member=member, program=program),
            },
        )


class ActivityPagination(CursorPagination):
    ordering = ("-occurred_at", "-id")


class ActivityApi(APIView):
    scopes = {"GET": "members:read"}

    class FilterSerializer(serializers.Serializer):
        kind = serializers.ChoiceField(choices=Entry.Kind.choices, required=False)
        since = AwareDateTimeField(required=False)
        until = AwareDateTimeField(required=False)

    class OutputSerializer(serializers.ModelSerializer):
        source = serializers.SerializerMethodField()

        class Meta:
            model = Entry
            fields = [
                "id",
                "kind",
                "points",
                "available_after",
                "pending_after",
                "held_after",
                "occurred_at",
                "reason",
                "source",
            ]

        def get_source(self, entry) -> dict:
            if entry.transaction_id:
                t = entry.transaction
                return {"type": "transaction", "store": t.store, "external_id": t.external_id, "kind": t.kind}
            if entry.staff_user_id:
                return {"type": "staff", "user": entry.staff_user.get_username()}
            if entry.api_client_id:
                return {"type": "api_client", "name": entry.api_client.name}
            return {"type": "system"}

    @extend_schema(
        parameters=[
            OpenApiParameter("kind", str, enum=Entry.Kind.values),
            OpenApiParameter("since", str),
            OpenApiParameter("until", str),
        ],
        operation_id="v1_members_activity_list",
        responses=listing(OutputSerializer, name="ActivityList"),
    )
    def get(self, request, member_number: str):
        member = member_get(program=request.auth.program, member_number=member_number)
        filters = self.FilterSerializer(data=request.query_params)
        filters.is_valid(raise_exception=True)
        paginator = ActivityPagination()
        page = paginator.paginate_queryset(entry_list(member=member, **filters.validated_data), request, view=self)
        return paginator.get_paginated_response(self.OutputSerializer(page, many=True).data)


class AdjustmentApi(APIView):
    scopes = {"POST": "points:write"}

    class InputSerializer(serializers.Serializer):
        points = serializers.IntegerField()
        reason = serializers.CharField(max_length=500)

    @extend_schema(request=InputSerializer, responses={201: dict})
    def post(self, request, member_number: str):
        member = member_get(program=request.auth.program, member_number=member_number)
        serializer = self.InputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        entry = points_adjust(member=member, api_client=request.auth, **serializer.validated_data)
        return Response(
            {
                "id": entry.pk,
                "member": member.member_number,
                "kind": entry.kind,
                "points": entry.points,
                "reason": entry.reason,
                "occurred_at": entry.occurred_at,
                "balance": balance_output(Balance.after(entry)),
            },
            status=201,
        )
