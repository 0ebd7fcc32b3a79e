"""Members over the API and through their services: enrolment, duplicates, lookup, changes and consent history."""

import json
from datetime import date

import pytest

from members.models import ConsentEvent, Identifier, Member
from members.services import member_enroll
from tests.factories import ProgramFactory

URL = "/api/v1/members"


def post(api, body, **headers):
    return api.post(URL, json.dumps(body), content_type="application/json", **headers)


def patch(api, number, body):
    return api.patch(f"{URL}/{number}", json.dumps(body), content_type="application/json")


def enrol(program, **fields):
    return member_enroll(program=program, source="test", **fields)


def snapshot():
    return (Member.objects.count(), Identifier.objects.count(), ConsentEvent.objects.count())


def full_body(**overrides):
    body = {
        "email": " Anna.Svensson@Example.COM ",
        "phone": "070-123 45 67",
        "first_name": "Anna",
        "last_name": "Svensson",
        "birth_date": "1990-04-01",
        "locale": "sv",
        "timezone": "Europe/Stockholm",
        "external_ids": {"web": "c-991"},
        "cards": ["6001 0000 1111"],
        "consents": {"email": True, "sms": False, "push": False},
        "enrollment_channel": "web",
    }
    body.update(overrides)
    return body


def test_enrolment_answers_201_with_the_normalised_member(api):
    # when
    response = post(api, full_body())
    # then
    assert response.status_code == 201
    body = response.json()
    member = Member.objects.get()
    assert body["member_number"] == member.member_number and len(body["member_number"]) == 10
    assert body["email"] == "anna.svensson@example.com"
    assert body["phone"] == "+46701234567"
    assert body["external_ids"] == {"web": "c-991"}
    assert body["cards"] == ["6001 0000 1111"]
    assert body["consents"] == {"email": True, "sms": False, "push": False}
    assert (body["status"], body["locale"], body["enrollment_channel"]) == ("active", "sv", "web")
    assert body["birth_date"] == "1990-04-01"
    assert body["enrolled_at"]


def test_enrolment_records_one_consent_event_per_grant_with_its_source(api):
    # when
    post(api, full_body(consents={"email": True, "sms": True, "push": False}))
    # then
    events = ConsentEvent.objects.order_by("channel")
    assert [(e.channel, e.granted) for e in events] == [("email", True), ("sms", True)]
    assert all(e.source.startswith("api:") for e in events)


def test_enrolment_with_nothing_but_defaults_is_accepted(api):
    # when
    response = post(api, {})
    # then
    assert response.status_code == 201
    assert response.json()["locale"] == "en" and response.json()["timezone"] == "Europe/Stockholm"


def test_a_duplicate_email_in_other_case_is_409_and_writes_nothing(api, program):
    # given
    enrol(program, email="anna@example.com")
    before = snapshot()
    # when
    response = post(api, full_body(email="ANNA@example.com ", phone=None))
    # then
    assert response.status_code == 409
    assert response["Content-Type"] == "application/problem+json"
    assert response.json()["code"] == "member_exists"
    assert "email" in response.json()["errors"]
    assert snapshot() == before


def test_a_duplicate_phone_written_differently_is_409_and_writes_nothing(api, program):
    # given
    enrol(program, phone="+46701234567")
    before = snapshot()
    # when
    response = post(api, full_body(email="other@example.com", phone="070-123 45 67"))
    # then
    assert response.status_code == 409
    assert response.json()["code"] == "member_exists"
    assert "phone" in response.json()["errors"]
    assert snapshot() == before


def test_a_card_that_belongs_to_another_member_is_409_and_leaves_no_member_behind(api, program):
    # given
    enrol(program, cards=["CARD-1"])
    before = snapshot()
    # when
    response = post(api, full_body(cards=["CARD-1"]))
    # then
    assert response.status_code == 409
    assert response.json()["code"] == "member_exists"
    assert snapshot() == before


def test_the_same_email_may_enrol_in_another_programme(api, program):
    # given
    enrol(ProgramFactory(), email="anna@example.com")
    # when
    response = post(api, {"email": "anna@example.com"})
    # then
    assert response.status_code == 201


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("email", "not-an-email"),
        ("phone", "12"),
        ("timezone", "Mars/Olympus"),
        ("locale", "de"),
        ("enrollment_channel", "fax"),
        ("birth_date", "1990-13-01"),
        ("birth_date", "2999-01-01"),
        ("cards", ["A", "A"]),
        ("cards", "CARD-1"),
        ("external_ids", {"Web Shop!": "x"}),
        ("external_ids", {"web": ""}),
        ("consents", {"email": "maybe"}),
        ("first_name", "x" * 101),
        ("first_name", "nul\x00byte"),
        ("last_name", "\ud800"),
        ("external_ids", {"web\x00": "x"}),
    ],
)
def test_invalid_fields_are_400_problems_naming_the_field_and_write_nothing(api, field, value):
    # when
    response = post(api, full_body(**{field: value}))
    # then
    assert response.status_code == 400
    assert response["Content-Type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == 400 and body["code"] in ("validation_error", "invalid")
    assert any(key.split(".")[0] == field for key in body["errors"]), body
    assert snapshot() == (0, 0, 0)


def test_several_invalid_fields_are_reported_together(api):
    # when
    response = post(api, full_body(email="nope", phone="12", timezone="Nowhere"))
    # then
    assert response.status_code == 400
    assert {"email", "phone", "timezone"} <= set(response.json()["errors"])


def test_a_body_that_is_not_an_object_is_a_400_problem(api):
    # when
    response = api.post(URL, "[1, 2]", content_type="application/json")
    # then
    assert response.status_code == 400
    assert response.json()["code"] == "validation_error"


@pytest.mark.parametrize(
    "query",
    [
        "email=ANNA%40example.com",
        "phone=070-123%2045%2067",
        "phone=%2B46701234567",
        "card=6001%200000%201111",
        "external_id=c-991&channel=web",
    ],
)
def test_lookup_finds_the_member_by_each_identifier(api, program, query):
    # given
    member = enrol(program, **{**full_body(email="anna@example.com"), "birth_date": date(1990, 4, 1)})
    enrol(program, email="someone.else@example.com", cards=["OTHER"], external_ids={"web": "c-1"})
    # when
    response = api.get(f"{URL}/lookup?{query}")
    # then
    assert response.status_code == 200, response.json()
    assert response.json()["member_number"] == member.member_number


@pytest.mark.parametrize("query", ["email=nobody%40example.com", "card=NOPE", "external_id=c-991&channel=app"])
def test_lookup_of_an_unknown_identifier_is_a_404_problem(api, program, query):
    # given
    enrol(program, email="anna@example.com", external_ids={"web": "c-991"})
    # when
    response = api.get(f"{URL}/lookup?{query}")
    # then
    assert response.status_code == 404
    assert response["Content-Type"] == "application/problem+json"
    assert response.json()["code"] == "member_not_found"


@pytest.mark.parametrize("query", ["", "email=a%40example.com&card=X", "external_id=c-991", "phone=abc"])
def test_lookup_without_exactly_one_readable_identifier_is_a_400_problem(api, query):
    # when
    response = api.get(f"{URL}/lookup?{query}")
    # then
    assert response.status_code == 400
    assert response["Content-Type"] == "application/problem+json"


def test_get_returns_the_member(api, program):
    # given
    member = enrol(program, email="anna@example.com", cards=["C1", "C2"])
    # when
    response = api.get(f"{URL}/{member.member_number}")
    # then
    assert response.status_code == 200
    assert response.json()["email"] == "anna@example.com"
    assert sorted(response.json()["cards"]) == ["C1", "C2"]


@pytest.mark.parametrize("number", ["1234567890", "²" * 10, "١٢٣٤٥٦٧٨٩7"], ids=["digits", "superscripts", "arabic"])
def test_get_of_an_unknown_member_is_a_404_problem(api, number):
    # when: digits, or characters Python takes for digits (str.isdigit) that are no member number's
    response = api.get(f"{URL}/{number}")
    # then
    assert response.status_code == 404
    assert response.json()["code"] == "member_not_found"


def test_a_key_of_another_programme_cannot_see_or_change_the_member(program, make_client):
    # given
    from tests.clients import APIClient

    member = enrol(program, email="anna@example.com", cards=["C1"])
    _, raw = make_client(for_program=ProgramFactory())
    other = APIClient()
    other.credentials(HTTP_AUTHORIZATION=f"Api-Key {raw}")
    # when
    responses = [
        other.get(f"{URL}/{member.member_number}"),
        patch(other, member.member_number, {"first_name": "Mallory"}),
        other.get(f"{URL}/lookup?email=anna%40example.com"),
        other.get(f"{URL}/lookup?card=C1"),
    ]
    # then
    assert [r.status_code for r in responses] == [404, 404, 404, 404]
    member.refresh_from_db()
    assert member.first_name == ""


def test_patch_changes_only_the_given_fields(api, program):
    # given
    member = enrol(program, email="anna@example.com", first_name="Anna", locale="sv")
    # when
    response = patch(api, member.member_number, {"last_name": "Berg", "phone": "0701234567", "status": "suspended"})
    # then
    assert response.status_code == 200
    member.refresh_from_db()
    assert (member.first_name, member.last_name, member.locale) == ("Anna", "Berg", "sv")
    assert (member.phone, member.status, member.email) == ("+46701234567", "suspended", "anna@example.com")


def test_patch_to_an_email_or_phone_already_taken_is_409_and_changes_nothing(api, program):
    # given
    enrol(program, email="taken@example.com", phone="+46701234567")
    member = enrol(program, email="anna@example.com", first_name="Anna")
    # when
    responses = [
        patch(api, member.member_number, {"first_name": "Changed", "email": "TAKEN@example.com"}),
        patch(api, member.member_number, {"first_name": "Changed", "phone": "070 123 45 67"}),
    ]
    # then
    assert [r.status_code for r in responses] == [409, 409]
    assert {r.json()["code"] for r in responses} == {"member_exists"}
    member.refresh_from_db()
    assert (member.first_name, member.email, member.phone) == ("Anna", "anna@example.com", None)


def test_patch_replaces_external_ids_per_channel(api, program):
    # given
    member = enrol(program, external_ids={"web": "c-1", "app": "a-1", "crm": "x-1"})
    # when
    response = patch(api, member.member_number, {"external_ids": {"web": "c-2", "crm": None}})
    # then
    assert response.status_code == 200
    assert response.json()["external_ids"] == {"app": "a-1", "web": "c-2"}


def test_patch_with_cards_replaces_the_list(api, program):
    # given
    member = enrol(program, cards=["OLD", "KEEP"])
    # when
    response = patch(api, member.member_number, {"cards": ["KEEP", "NEW"]})
    # then
    assert response.status_code == 200
    assert sorted(response.json()["cards"]) == ["KEEP", "NEW"]


def test_patch_to_an_identifier_of_another_member_is_409_and_keeps_the_old_one(api, program):
    # given
    enrol(program, external_ids={"web": "c-taken"})
    member = enrol(program, external_ids={"web": "c-1"})
    # when
    response = patch(api, member.member_number, {"external_ids": {"web": "c-taken"}})
    # then
    assert response.status_code == 409
    assert list(member.identifiers.values_list("channel", "value")) == [("web", "c-1")]


def test_patch_of_consents_records_each_change_with_its_source(api, program):
    # given
    member = enrol(program, consents={"email": True})
    # when
    response = patch(api, member.member_number, {"consents": {"email": False, "sms": True, "push": False}})
    # then
    assert response.json()["consents"] == {"email": False, "sms": True, "push": False}
    events = list(member.consent_events.order_by("id").values_list("channel", "granted", "source"))
    assert events[0] == ("email", True, "test")
    assert sorted(events[1:]) == [("email", False, "api:till-1"), ("sms", True, "api:till-1")]


@pytest.mark.parametrize(
    "body",
    [{"status": "deleted"}, {"email": "nope"}, {"timezone": "UTC+2"}, {"member_number": 5, "locale": "xx"}],
)
def test_an_invalid_patch_is_a_400_problem_and_changes_nothing(api, program, body):
    # given
    member = enrol(program, email="anna@example.com")
    # when
    response = patch(api, member.member_number, body)
    # then
    assert response.status_code == 400
    after = Member.objects.get(pk=member.pk)
    assert (after.status, after.email, after.timezone, after.locale) == (
        "active",
        "anna@example.com",
        member.timezone,
        "en",
    )


def test_the_schema_documents_the_member_bodies(api):
    # when
    schema = api.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json").json()
    # then
    enrol = schema["paths"]["/api/v1/members"]["post"]
    assert set(enrol["responses"]) >= {"201", "400", "409"}
    request_ref = enrol["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
    assert {"email", "phone", "external_ids", "consents", "enrollment_channel"} <= set(
        schema["components"]["schemas"][request_ref]["properties"]
    )
    member = schema["components"]["schemas"]["Member"]["properties"]
    assert {"member_number", "external_ids", "cards", "consents", "status", "enrolled_at"} <= set(member)
    lookup = schema["paths"]["/api/v1/members/lookup"]["get"]
    assert {p["name"] for p in lookup["parameters"]} >= {"email", "phone", "card", "external_id", "channel"}
    assert set(schema["paths"]["/api/v1/members/{member_number}"]) >= {"get", "patch"}
