"""Members over REST: enrol, read, change and look up. A key only ever sees members of its own programme."""

from drf_spectacular.utils import OpenApiResponse, extend_schema, extend_schema_serializer
from rest_framework import serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from core.models import ApiClient
from members.models import Channel, Identifier, Member
from members.selectors import member_get, member_lookup
from members.services import MAX_CARDS, member_enroll, member_update

READ, WRITE = ApiClient.Scope.MEMBERS_READ.value, ApiClient.Scope.MEMBERS_WRITE.value


def _problem(description: str) -> OpenApiResponse:
    return OpenApiResponse(description=f"{description}: application/problem+json with a `code` (and `errors`).")


def _source(request) -> str:
    # Consent history names the system that recorded each change.
    return f"api:{request.auth.name}"


@extend_schema_serializer(component_name="MemberConsents")
class ConsentsSerializer(serializers.Serializer):
    email = serializers.BooleanField(required=False)
    sms = serializers.BooleanField(required=False)
    push = serializers.BooleanField(required=False)


@extend_schema_serializer(component_name="MemberConsentsState")
class ConsentsOutputSerializer(serializers.Serializer):
    email = serializers.BooleanField(source="consent_email")
    sms = serializers.BooleanField(source="consent_sms")
    push = serializers.BooleanField(source="consent_push")


@extend_schema_serializer(component_name="Member")
class MemberOutputSerializer(serializers.Serializer):
    member_number = serializers.CharField()
    email = serializers.EmailField(allow_null=True)
    phone = serializers.CharField(allow_null=True, help_text="E.164, e.g. +46701234567.")
    first_name = serializers.CharField()
    last_name = serializers.CharField()
    birth_date = serializers.DateField(allow_null=True)
    locale = serializers.ChoiceField(choices=Member.Locale.choices)
    timezone = serializers.CharField(help_text="IANA time zone.")
    status = serializers.ChoiceField(choices=Member.Status.choices)
    enrollment_channel = serializers.ChoiceField(choices=Channel.choices)
    enrolled_at = serializers.DateTimeField()
    referral_code = serializers.CharField(help_text="The code others enrol with to name this member as referrer.")
    external_ids = serializers.SerializerMethodField(help_text='Other systems\' ids by channel: {"web": "c-991"}.')
    cards = serializers.SerializerMethodField()
    consents = ConsentsOutputSerializer(source="*")

    def get_external_ids(self, member) -> dict[str, str]:
        return {i.channel: i.value for i in _identifiers(member) if i.kind == Identifier.Kind.EXTERNAL}

    def get_cards(self, member) -> list[str]:
        return [i.value for i in _identifiers(member) if i.kind == Identifier.Kind.CARD]


def _identifiers(member: Member) -> list[Identifier]:
    return sorted(member.identifiers.all(), key=lambda i: (i.kind, i.channel, i.pk))


class _MemberFieldsSerializer(serializers.Serializer):
    email = serializers.CharField(max_length=254, required=False, allow_null=True, allow_blank=True)
    phone = serializers.CharField(
        max_length=32, required=False, allow_null=True, allow_blank=True, help_text="Without a country code: +46."
    )
    first_name = serializers.CharField(max_length=100, required=False, allow_blank=True)
    last_name = serializers.CharField(max_length=100, required=False, allow_blank=True)
    birth_date = serializers.DateField(required=False, allow_null=True)
    locale = serializers.ChoiceField(choices=Member.Locale.choices, required=False)
    timezone = serializers.CharField(max_length=64, required=False, help_text="IANA time zone.")
    cards = serializers.ListField(child=serializers.CharField(max_length=128), max_length=MAX_CARDS, required=False)
    consents = ConsentsSerializer(required=False)
    referral_code = serializers.CharField(
        max_length=16,
        required=False,
        help_text="The referral code of the member who referred this one. After enrolment it can be added once, "
        "within a few days; a member's own code or one that would make a loop is refused.",
    )


class MemberEnrollApi(APIView):
    scopes = {"POST": WRITE}

    @extend_schema_serializer(component_name="MemberEnrollRequest")
    class InputSerializer(_MemberFieldsSerializer):
        external_ids = serializers.DictField(child=serializers.CharField(max_length=128), required=False)
        enrollment_channel = serializers.ChoiceField(choices=Channel.choices, required=False)

    @extend_schema(
        operation_id="members_enroll",
        summary="Enrol a member",
        request=InputSerializer,
        responses={
            201: MemberOutputSerializer,
            400: _problem("Invalid fields; an unknown referral code is reported in errors.referral_code"),
            409: _problem("member_exists: the email, phone, card or external id belongs to a member"),
        },
    )
    def post(self, request):
        serializer = self.InputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        member = member_enroll(program=request.auth.program, source=_source(request), **serializer.validated_data)
        return Response(MemberOutputSerializer(member).data, status=status.HTTP_201_CREATED)


class MemberLookupApi(APIView):
    scopes = {"GET": READ}

    @extend_schema_serializer(component_name="MemberLookupQuery")
    class QuerySerializer(serializers.Serializer):
        email = serializers.CharField(max_length=254, required=False)
        phone = serializers.CharField(max_length=32, required=False)
        card = serializers.CharField(max_length=128, required=False)
        external_id = serializers.CharField(max_length=128, required=False)
        channel = serializers.CharField(max_length=32, required=False, help_text="The system of `external_id`.")

    @extend_schema(
        operation_id="members_lookup",
        summary="Find a member by one identifier",
        parameters=[QuerySerializer],
        responses={
            200: MemberOutputSerializer,
            400: _problem("Not exactly one identifier, or an unreadable one"),
            404: _problem("member_not_found"),
        },
    )
    def get(self, request):
        serializer = self.QuerySerializer(data=request.query_params)
        serializer.is_valid(raise_exception=True)
        member = member_lookup(program=request.auth.program, **serializer.validated_data)
        return Response(MemberOutputSerializer(member).data)


class MemberDetailApi(APIView):
    scopes = {"GET": READ, "PATCH": WRITE}

    @extend_schema_serializer(component_name="MemberUpdateRequest")
    class InputSerializer(_MemberFieldsSerializer):
        external_ids = serializers.DictField(
            child=serializers.CharField(max_length=128, allow_null=True),
            required=False,
            help_text="Replaces the id of each channel given; null removes it. Other channels stay.",
        )
        cards = serializers.ListField(
            child=serializers.CharField(max_length=128),
            max_length=MAX_CARDS,
            required=False,
            help_text="Replaces the member's list of cards.",
        )
        status = serializers.ChoiceField(choices=Member.Status.choices, required=False)

    @extend_schema(
        operation_id="members_retrieve",
        summary="A member",
        responses={200: MemberOutputSerializer, 404: _problem("member_not_found")},
    )
    def get(self, request, member_number: str):
        member = member_get(program=request.auth.program, member_number=member_number)
        return Response(MemberOutputSerializer(member).data)

    @extend_schema(
        operation_id="members_update",
        summary="Change a member",
        request=InputSerializer,
        responses={
            200: MemberOutputSerializer,
            400: _problem("Invalid fields"),
            404: _problem("member_not_found"),
            409: _problem(
                "member_exists: the email, phone, card or external id belongs to another member; "
                "already_referred: the member has a referrer"
            ),
            422: _problem("self_referral, referral_loop, referral_too_late"),
        },
    )
    def patch(self, request, member_number: str):
        member = member_get(program=request.auth.program, member_number=member_number)
        serializer = self.InputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        member = member_update(member=member, source=_source(request), **serializer.validated_data)
        return Response(MemberOutputSerializer(member).data)
