"""OpenAPI description of the API-key authentication, so /api/schema/ documents how to call the API."""

from drf_spectacular import openapi
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.utils import inline_serializer
from rest_framework import serializers


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


def listing(item_serializer, *, name: str, paginated: bool = True):
    """The documented body of a list endpoint: `{next, previous, results}` (or just `{results}` when unpaginated),
    since views that paginate by hand are otherwise described as a bare array a generated client would trip on."""
    fields = {"results": item_serializer(many=True)}
    if paginated:
        fields = {
            "next": serializers.URLField(allow_null=True),
            "previous": serializers.URLField(allow_null=True),
            **fields,
        }
    return inline_serializer(name=name, fields=fields)
