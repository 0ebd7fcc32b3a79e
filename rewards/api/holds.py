"""Paying with points at a till (points:write): POST /points/holds, then capture or release."""

from decimal import Decimal

from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from core.hotpath import reply
from core.validation import validate
from loyalty.ledger import ledger_balance
from rewards.api.common import balance_output, member_from_body
from rewards.selectors import hold_get
from rewards.services.holds import MAX_HOLD_POINTS, HoldResult, hold_capture, hold_place, hold_release

CENT = Decimal("0.01")


def _hold_output(result: HoldResult) -> dict:
    hold = result.hold
    program = hold.program
    captured = hold.captured_points if hold.status == hold.Status.CAPTURED else None
    return {
        "hold_id": hold.pk,
        "member": hold.member.member_number,
        "points": hold.points,
        "store": hold.store,
        "status": hold.status,
        "expires_at": hold.expires_at.isoformat(),
        "closed_at": hold.closed_at.isoformat() if hold.closed_at else None,
        "captured_points": captured,
        "transaction_external_id": hold.transaction_external_id or None,
        # What the captured points paid, for the till's receipt; the purchase earns only on the rest.
        "value": {"amount": str((captured * program.point_value).quantize(CENT)), "currency": program.currency}
        if captured
        else None,
        "balance": balance_output(result.balance),
    }


def _hold(request, hold_id: int):
    hold = hold_get(program=request.auth.program, hold_id=hold_id)
    hold.program = request.auth.program
    return hold


class HoldApi(APIView):
    scopes = {"POST": "points:write"}

    class InputSerializer(serializers.Serializer):
        member = serializers.CharField(max_length=10)
        points = serializers.IntegerField(min_value=1, max_value=MAX_HOLD_POINTS)
        store = serializers.CharField(max_length=64)

    @extend_schema(request=InputSerializer, responses={201: dict})
    def post(self, request):
        v = validate(self.InputSerializer, request.data)
        member = member_from_body(request, v["member"])
        member.program = request.auth.program
        result = hold_place(member=member, points=v["points"], store=v["store"], api_client=request.auth)
        result.hold.program = request.auth.program
        return reply(request, _hold_output(result), status=201)


class HoldDetailApi(APIView):
    scopes = {"GET": "points:write"}

    @extend_schema(responses=dict)
    def get(self, request, hold_id: int):
        hold = _hold(request, hold_id)
        return Response(_hold_output(HoldResult(hold, ledger_balance(member_id=hold.member_id))))


class HoldCaptureApi(APIView):
    scopes = {"POST": "points:write"}

    class InputSerializer(serializers.Serializer):
        external_id = serializers.CharField(max_length=128, help_text="The purchase's transaction external_id.")
        points = serializers.IntegerField(
            min_value=1, max_value=MAX_HOLD_POINTS, required=False, help_text="Fewer than held; the rest is released."
        )

    @extend_schema(request=InputSerializer, responses=dict)
    def post(self, request, hold_id: int):
        hold = _hold(request, hold_id)
        v = validate(self.InputSerializer, request.data)
        return reply(
            request,
            _hold_output(hold_capture(hold=hold, transaction_external_id=v["external_id"], points=v.get("points"))),
        )


class HoldReleaseApi(APIView):
    scopes = {"POST": "points:write"}

    @extend_schema(request=None, responses=dict)
    def post(self, request, hold_id: int):
        return reply(request, _hold_output(hold_release(hold=_hold(request, hold_id))))
