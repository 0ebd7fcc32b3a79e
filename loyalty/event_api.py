"""Custom events over REST: POST /events (points:write), and management of event types (program:manage)."""

import json

from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from core.errors import MemberNotFound, NotFound, Unprocessable
from core.schema import listing
from core.validation import AwareDateTimeField, UnknownFieldsRefused
from loyalty.account_api import balance_output
from loyalty.event_models import EventType, MemberEvent
from loyalty.event_services import event_type_create, event_type_retire, event_type_update
from loyalty.events import EventResult, event_record
from members.selectors import member_get

MAX_ATTRIBUTES_BYTES = 4096

_OUTCOME_REASONS = {
    MemberEvent.Outcome.AWARDED: None,
    MemberEvent.Outcome.LIMIT_REACHED: "The member has reached this event type's limit for the period; "
    "the event is recorded without points.",
}


def _problem(description: str) -> OpenApiResponse:
    return OpenApiResponse(description=f"{description}: application/problem+json with a `code` (and `errors`).")


class EventOutputSerializer(serializers.Serializer):
    id = serializers.IntegerField(source="event.pk")
    external_id = serializers.CharField(source="event.external_id")
    member = serializers.CharField(source="event.member.member_number")
    event = serializers.CharField(source="event.event_type.code")
    occurred_at = serializers.DateTimeField(source="event.occurred_at")
    points = serializers.IntegerField(source="event.points")
    outcome = serializers.ChoiceField(choices=MemberEvent.Outcome.choices, source="event.outcome")
    reason = serializers.SerializerMethodField(help_text="Why no points were given, or null.")
    balance = serializers.SerializerMethodField()

    def get_reason(self, result: EventResult) -> str | None:
        return _OUTCOME_REASONS[result.event.outcome]

    def get_balance(self, result: EventResult) -> dict:
        return balance_output(result.balance)


class EventApi(APIView):
    scopes = {"POST": "points:write"}

    class InputSerializer(serializers.Serializer):
        member = serializers.CharField(max_length=10, help_text="The member number.")
        event = serializers.SlugField(max_length=40, help_text="The event type's code.")
        external_id = serializers.CharField(max_length=128, help_text="Unique per programme; a repeat is a replay.")
        occurred_at = AwareDateTimeField()
        attributes = serializers.DictField(required=False, default=dict, help_text="Free-form facts of the event.")

        def validate_attributes(self, value: dict) -> dict:
            if len(json.dumps(value)) > MAX_ATTRIBUTES_BYTES:
                raise serializers.ValidationError(f"At most {MAX_ATTRIBUTES_BYTES} bytes of JSON.")
            return value

    @extend_schema(
        operation_id="events_record",
        summary="Record a custom event and give its points",
        request=InputSerializer,
        responses={
            201: EventOutputSerializer,
            200: OpenApiResponse(EventOutputSerializer, description="The same event sent again: its first result."),
            400: _problem("Invalid fields"),
            409: _problem("event_mismatch: another event has this external_id; member_not_active"),
            422: _problem("unknown_member, unknown_event_type, event_type_inactive, occurred_in_future"),
        },
    )
    def post(self, request):
        serializer = self.InputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        v = serializer.validated_data
        program = request.auth.program
        try:
            member = member_get(program=program, member_number=v["member"])
        except MemberNotFound as exc:
            raise Unprocessable(exc.detail, code="unknown_member", errors={"member": [exc.detail]}) from exc
        result = event_record(
            program=program,
            member=member,
            event_code=v["event"],
            external_id=v["external_id"],
            occurred_at=v["occurred_at"],
            attributes=v["attributes"],
            api_client=request.auth,
        )
        return Response(EventOutputSerializer(result).data, status=201 if result.created else 200)


class EventTypeSerializer(UnknownFieldsRefused, serializers.ModelSerializer):
    class Meta:
        model = EventType
        fields = [
            "code",
            "name",
            "description",
            "points",
            "limit_count",
            "limit_period",
            "qualifying",
            "active",
            "created_at",
            "updated_at",
        ]
        read_only_fields = ["created_at", "updated_at"]
        # Uniqueness of code is the database's to decide (409), not a racy pre-check.
        validators = []


def _event_type(request, code: str) -> EventType:
    event_type = EventType.objects.filter(program=request.auth.program, code=code).first()
    if event_type is None:
        raise NotFound(f"No event type '{code}' in this programme.")
    return event_type


class EventTypeListApi(APIView):
    scopes = {"GET": "program:manage", "POST": "program:manage"}

    @extend_schema(
        operation_id="event_types_list",
        summary="The programme's event types",
        responses=listing(EventTypeSerializer, name="EventTypeList", paginated=False),
    )
    def get(self, request):
        event_types = EventType.objects.filter(program=request.auth.program)
        return Response({"results": EventTypeSerializer(event_types, many=True).data})

    @extend_schema(
        operation_id="event_types_create",
        summary="Create an event type",
        request=EventTypeSerializer,
        responses={201: EventTypeSerializer, 400: _problem("Invalid fields"), 409: _problem("event_type_exists")},
    )
    def post(self, request):
        serializer = EventTypeSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        event_type = event_type_create(program=request.auth.program, **serializer.validated_data)
        return Response(EventTypeSerializer(event_type).data, status=201)


class EventTypeDetailApi(APIView):
    scopes = {"GET": "program:manage", "PATCH": "program:manage", "DELETE": "program:manage"}

    @extend_schema(
        operation_id="event_types_retrieve",
        summary="An event type",
        responses={200: EventTypeSerializer, 404: _problem("not_found")},
    )
    def get(self, request, code: str):
        return Response(EventTypeSerializer(_event_type(request, code)).data)

    @extend_schema(
        operation_id="event_types_update",
        summary="Change an event type from now on",
        request=EventTypeSerializer,
        responses={
            200: EventTypeSerializer,
            400: _problem("Invalid fields"),
            404: _problem("not_found"),
            409: _problem("event_type_exists"),
        },
    )
    def patch(self, request, code: str):
        event_type = _event_type(request, code)
        serializer = EventTypeSerializer(event_type, data=request.data, partial=True)
        serializer.is_valid(raise_exception=True)
        return Response(EventTypeSerializer(event_type_update(event_type=event_type, **serializer.validated_data)).data)

    @extend_schema(
        operation_id="event_types_retire",
        summary="Retire an event type",
        description="Deactivates the event type: new events of it are refused; those recorded keep their points.",
        responses={200: EventTypeSerializer, 404: _problem("not_found")},
    )
    def delete(self, request, code: str):
        return Response(EventTypeSerializer(event_type_retire(event_type=_event_type(request, code))).data)
