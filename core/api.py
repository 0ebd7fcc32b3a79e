import logging

from django.db import connection
from django.http import JsonResponse
from django.views.decorators.http import require_GET
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

logger = logging.getLogger(__name__)


class ProgramApi(APIView):
    scopes = {"GET": None}  # any valid key may read its own programme

    class OutputSerializer(serializers.Serializer):
        code = serializers.CharField()
        name = serializers.CharField()
        currency = serializers.CharField()
        points_per_unit = serializers.DecimalField(max_digits=10, decimal_places=4)
        rounding = serializers.CharField()
        pending_days = serializers.IntegerField()
        expiry_months = serializers.IntegerField()
        return_policy = serializers.CharField()
        max_transaction_age_days = serializers.IntegerField(allow_null=True)
        tiers = serializers.SerializerMethodField()

        def get_tiers(self, program) -> list:
            return []  # tiers arrive with the tiers capability

    def get(self, request):
        return Response(self.OutputSerializer(request.auth.program).data)


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
