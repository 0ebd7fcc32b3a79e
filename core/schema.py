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


PROBLEM_SCHEMA = {
    "type": "object",
    "description": "RFC 9457 problem details; `code` is stable and machine-readable.",
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "code": {"type": "string", "example": "validation_error"},
        "errors": {
            "type": "object",
            "description": "Field path -> messages, for validation problems.",
            "additionalProperties": {"type": "array", "items": {"type": "string"}},
        },
    },
    "required": ["type", "title", "status", "detail", "code"],
}
_PROBLEMS = {
    "400": "The request is not valid (`errors` says where).",
    "401": "No API key, or an unknown or revoked one.",
    "403": "The API key lacks the scope this operation needs.",
    "404": "No such resource in the key's programme.",
    "409": "Conflicts with the current state (e.g. `insufficient_points`, `member_exists`, `voucher_used`).",
    "422": "Understood but refused by the programme's rules (e.g. `unknown_member`, `idempotency_key_reused`).",
}


def add_problem_responses(result, generator, request, public):
    """Postprocessing hook: every operation under /api/v1/ documents the problem documents it may answer with."""
    result.setdefault("components", {}).setdefault("schemas", {})["Problem"] = PROBLEM_SCHEMA
    content = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    for path, operations in result.get("paths", {}).items():
        if not path.startswith("/api/v1/"):
            continue
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            for status, description in _PROBLEMS.items():
                responses.setdefault(status, {"description": description}).setdefault("content", content)
    return result
