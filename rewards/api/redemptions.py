"""POST /redemptions (rewards:redeem) and vouchers at the till (vouchers:consume)."""

from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from core.errors import Unprocessable
from core.hotpath import reply
from core.validation import DecimalField, validate
from rewards.api.common import balance_output, voucher_output
from rewards.codes import voucher_code_display
from rewards.models import Redemption
from rewards.selectors import member_and_reward_get, redemption_get, voucher_get
from rewards.services.redemptions import redemption_cancel, reward_redeem
from rewards.services.vouchers import voucher_check, voucher_consume, voucher_restore


def _redemption_output(redemption: Redemption) -> dict:
    voucher = redemption.voucher
    # A redemption just made carries the balances right after it; others read them now.
    balance = getattr(redemption, "balance", None)
    return {
        "id": redemption.pk,
        "member": redemption.member.member_number,
        "reward": redemption.reward.code,
        "points": redemption.points,
        "status": redemption.status,
        "created_at": redemption.created_at.isoformat(),
        "cancelled_at": redemption.cancelled_at.isoformat() if redemption.cancelled_at else None,
        "voucher": {
            "code": voucher_code_display(voucher.code),
            "expires_at": voucher.expires_at.isoformat(),
            "status": voucher.status,
        },
        "balance": balance_output(balance, member_id=redemption.member_id),
    }


class RedemptionApi(APIView):
    scopes = {"POST": "rewards:redeem"}

    class InputSerializer(serializers.Serializer):
        member = serializers.CharField(max_length=10)
        reward = serializers.SlugField(max_length=40)

    @extend_schema(request=InputSerializer, responses={201: dict})
    def post(self, request):
        v = validate(self.InputSerializer, request.data)
        program = request.auth.program
        # One query for both: the redemption hot path (docs/benchmarks.md).
        member, reward = member_and_reward_get(program=program, member_number=v["member"], code=v["reward"])
        if member is None:
            detail = f"No member {v['member']} in this programme."
            raise Unprocessable(detail, code="unknown_member", errors={"member": [detail]})
        if reward is None:
            detail = f"No reward {v['reward']} in this programme."
            raise Unprocessable(detail, code="unknown_reward", errors={"reward": [detail]})
        member.program = reward.program = program
        redemption = reward_redeem(member=member, reward=reward, api_client=request.auth)
        return reply(request, _redemption_output(redemption), status=201)


class RedemptionDetailApi(APIView):
    scopes = {"GET": "rewards:redeem"}

    @extend_schema(responses=dict)
    def get(self, request, redemption_id: int):
        return Response(_redemption_output(redemption_get(program=request.auth.program, redemption_id=redemption_id)))


class RedemptionCancelApi(APIView):
    scopes = {"POST": "rewards:redeem"}

    @extend_schema(request=None, responses=dict)
    def post(self, request, redemption_id: int):
        redemption = redemption_get(program=request.auth.program, redemption_id=redemption_id)
        return Response(_redemption_output(redemption_cancel(redemption=redemption, api_client=request.auth)))


class VoucherDetailApi(APIView):
    scopes = {"GET": "vouchers:consume"}

    @extend_schema(responses=dict)
    def get(self, request, code: str):
        voucher = voucher_get(program=request.auth.program, code=code)
        refusal = voucher_check(voucher=voucher)
        body = voucher_output(voucher)
        body["usable"] = refusal is None
        body["refusal"] = {"code": refusal.code, "detail": refusal.detail} if refusal else None
        return Response(body)


class VoucherConsumeApi(APIView):
    scopes = {"POST": "vouchers:consume"}

    class InputSerializer(serializers.Serializer):
        store = serializers.CharField(max_length=64)
        transaction_external_id = serializers.CharField(max_length=128)
        basket_total = DecimalField(
            max_digits=12, decimal_places=2, min_value=0, required=False, help_text="Needed for a minimum basket."
        )

    @extend_schema(request=InputSerializer, responses=dict)
    def post(self, request, code: str):
        serializer = self.InputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        voucher = voucher_consume(program=request.auth.program, code=code, **serializer.validated_data)
        return Response(voucher_output(voucher))


class VoucherRestoreApi(APIView):
    """A till that took back a purchase paid partly with a voucher: gives the voucher back if the programme's
    voucher return policy says so."""

    scopes = {"POST": "vouchers:consume"}

    class InputSerializer(serializers.Serializer):
        store = serializers.CharField(max_length=64)
        transaction_external_id = serializers.CharField(max_length=128)

    @extend_schema(request=InputSerializer, responses=dict)
    def post(self, request, code: str):
        serializer = self.InputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        voucher = voucher_restore(program=request.auth.program, code=code, **serializer.validated_data)
        return Response(voucher_output(voucher))
