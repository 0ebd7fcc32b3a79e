import logging

from django.db import connection
from django.http import JsonResponse
from django.views.decorators.http import require_GET
from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from core.models import Program
from core.validation import DecimalField

logger = logging.getLogger(__name__)


class TierQualificationSerializer(serializers.Serializer):
    measure = serializers.ChoiceField(choices=Program.TierMeasure.choices, required=False)
    window = serializers.ChoiceField(choices=Program.TierWindow.choices, required=False)
    window_months = serializers.IntegerField(min_value=1, max_value=36, required=False)
    grace_days = serializers.IntegerField(min_value=0, max_value=366, required=False)
    downgrade = serializers.ChoiceField(choices=Program.TierDowngrade.choices, required=False)
    return_policy = serializers.ChoiceField(choices=Program.TierReturnPolicy.choices, required=False)

    def to_internal_value(self, data):
        # Nested serializers have no initial_data: unknown keys are caught here, before they are dropped.
        unknown = set(data) - set(self.fields) if isinstance(data, dict) else set()
        if unknown:
            raise serializers.ValidationError({k: ["Unknown field."] for k in sorted(unknown)})
        return super().to_internal_value(data)


class ProgramApi(APIView):
    # GET: any valid key may read its own programme; PATCH: see below.

    class OutputSerializer(serializers.Serializer):
        code = serializers.CharField()
        name = serializers.CharField()
        currency = serializers.CharField()
        points_per_unit = DecimalField(max_digits=10, decimal_places=4)
        rounding = serializers.CharField()
        pending_days = serializers.IntegerField()
        expiry_months = serializers.IntegerField()
        return_policy = serializers.CharField()
        max_transaction_age_days = serializers.IntegerField(allow_null=True)
        tiers = serializers.SerializerMethodField()

        tier_qualification = serializers.SerializerMethodField()

        def get_tiers(self, program) -> list:
            from loyalty.tier_api import tier_output

            return [tier_output(t, program) for t in program.tiers.filter(retired_at__isnull=True).order_by("rank")]

        def get_tier_qualification(self, program) -> dict:
            return {
                "measure": program.tier_measure,
                "window": program.tier_window,
                "window_months": program.tier_window_months,
                "grace_days": program.tier_grace_days,
                "downgrade": program.tier_downgrade,
                "return_policy": program.tier_return_policy,
            }

    class PatchSerializer(serializers.Serializer):
        name = serializers.CharField(max_length=120, required=False)
        points_per_unit = DecimalField(max_digits=10, decimal_places=4, min_value=0, required=False)
        rounding = serializers.ChoiceField(choices=Program.Rounding.choices, required=False)
        pending_days = serializers.IntegerField(min_value=0, max_value=3650, required=False)
        expiry_months = serializers.IntegerField(min_value=0, max_value=1200, required=False)
        return_policy = serializers.ChoiceField(choices=Program.ReturnPolicy.choices, required=False)
        max_transaction_age_days = serializers.IntegerField(min_value=1, required=False, allow_null=True)
        tier_qualification = TierQualificationSerializer(required=False)

        def validate(self, attrs):
            unknown = set(self.initial_data) - set(self.fields) if isinstance(self.initial_data, dict) else set()
            if unknown:
                raise serializers.ValidationError({k: ["Unknown or read-only field."] for k in sorted(unknown)})
            if not attrs:
                raise serializers.ValidationError("Give at least one setting to change.")
            return attrs

    scopes = {"GET": None, "PATCH": "program:manage"}

    @extend_schema(responses=OutputSerializer)
    def get(self, request):
        # Read afresh: the client's cached programme may be a few seconds old after a PATCH from another process.
        return Response(self.OutputSerializer(Program.objects.get(pk=request.auth.program.pk)).data)

    @extend_schema(request=PatchSerializer, responses={200: dict})
    def patch(self, request):
        from loyalty.tier_setup import program_settings_update

        serializer = self.PatchSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        fields = dict(serializer.validated_data)
        fields.update({f"tier_{k}": v for k, v in fields.pop("tier_qualification", {}).items()})
        program = program_settings_update(program=Program.objects.get(pk=request.auth.program.pk), **fields)
        # This process's cached API client sees the change at once; others within API_CLIENT_CACHE_SECONDS.
        request.auth.program.__dict__.update({k: getattr(program, k) for k in fields})
        return Response(self.OutputSerializer(program).data)


@require_GET
def health(request):
    """Liveness and readiness: the database and, when configured, Redis."""
    from django.conf import settings

    checks, ok = {}, True
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        checks["database"] = "ok"
    except Exception as exc:  # a health check reports, it does not raise
        logger.warning("health: database unreachable: %s", exc)
        checks["database"], ok = f"error: {exc.__class__.__name__}", False
    if settings.REDIS_URL:
        try:
            import redis

            redis.Redis.from_url(settings.REDIS_URL, socket_timeout=2).ping()
            checks["redis"] = "ok"
        except Exception as exc:
            logger.warning("health: redis unreachable: %s", exc)
            checks["redis"], ok = f"error: {exc.__class__.__name__}", False
    else:
        checks["redis"] = "not configured (tasks run inline)"
    return JsonResponse({"status": "ok" if ok else "error", "checks": checks}, status=200 if ok else 503)
