"""OpenAPI description of the API-key authentication, so /api/schema/ documents how to call the API."""

from drf_spectacular import openapi
from drf_spectacular.extensions import OpenApiAuthenticationExtension


class ApiKeyScheme(OpenApiAuthenticationExtension):
    target_class = "core.auth.ApiKeyAuthentication"
    name = "ApiKey"

    def get_security_definition(self, auto_schema):
        return {
            "type": "apiKey",
            "in": "header",
            "name": "Authorization",
            "description": "`Api-Key <key>`. Each key belongs to one programme and carries scopes.",
        }


class AutoSchema(openapi.AutoSchema):
    """Names nested serializers after their view (HoldApi.InputSerializer -> HoldApiInput), so the house style's
    per-view InputSerializer/OutputSerializer classes do not collide in the schema's components."""

    def get_serializer_name(self, serializer, direction):
        return type(serializer).__qualname__.replace(".", "")
