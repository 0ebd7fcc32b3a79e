"""`Idempotency-Key` on POST /api/v1/members: repeats replay the first answer and write nothing new."""

import json

from django.test import RequestFactory
from django.utils import timezone

from core.idempotency import _request_hash
from core.models import ApiClient, IdempotencyRecord
from members.models import ConsentEvent, Identifier, Member

URL = "/api/v1/members"
BODY = {"email": "anna@example.com", "cards": ["C1"], "consents": {"email": True}}


def post(api, body, key: str | None = "key-1"):
    headers = {"HTTP_IDEMPOTENCY_KEY": key} if key is not None else {}
    raw = body if isinstance(body, str) else json.dumps(body)
    return api.post(URL, raw, content_type="application/json", **headers)


def snapshot():
    return (Member.objects.count(), Identifier.objects.count(), ConsentEvent.objects.count())


def test_a_repeat_with_the_same_key_and_body_replays_the_first_response_and_writes_nothing(api):
    # given
    first = post(api, BODY)
    assert first.status_code == 201
    before = snapshot()
    # when
    again = post(api, BODY)
    # then
    assert again.status_code == 201
    assert again.content == first.content
    assert again["Idempotent-Replayed"] == "true"
    assert snapshot() == before == (1, 1, 1)


def test_the_first_response_is_stored_with_the_key(api):
    # when
    response = post(api, BODY)
    # then
    record = IdempotencyRecord.objects.get(key="key-1")
    assert record.status_code == 201
    assert json.loads(record.body) == response.json()


def test_the_same_key_with_another_body_is_a_422_and_writes_nothing(api):
    # given
    post(api, BODY)
    before = snapshot()
    # when
    response = post(api, {**BODY, "email": "bo@example.com"})
    # then
    assert response.status_code == 422
    assert response["Content-Type"] == "application/problem+json"
    assert response.json()["code"] == "idempotency_key_reused"
    assert snapshot() == before
    assert not Member.objects.filter(email="bo@example.com").exists()


def test_another_key_with_the_same_body_is_a_new_request(api):
    # given
    post(api, BODY, key="key-1")
    # when
    response = post(api, BODY, key="key-2")
    # then the programme's own rule answers: the email is taken
    assert response.status_code == 409
    assert response.json()["code"] == "member_exists"


def test_a_repeat_while_the_first_is_still_running_is_a_409_and_writes_nothing(api):
    # given an unfinished claim on the key for exactly this request
    client = ApiClient.objects.get()
    request = RequestFactory().post(URL, json.dumps(BODY), content_type="application/json")
    IdempotencyRecord.objects.create(
        client=client, key="key-1", request_hash=_request_hash(request), status_code=None, created_at=timezone.now()
    )
    # when
    response = post(api, BODY)
    # then
    assert response.status_code == 409
    assert response["Content-Type"] == "application/problem+json"
    assert response.json()["code"] == "idempotency_in_progress"
    assert snapshot() == (0, 0, 0)
    assert IdempotencyRecord.objects.get().status_code is None


def test_a_4xx_answer_is_replayed_too(api):
    # given a first attempt that was refused
    first = post(api, {"email": "not-an-email"})
    assert first.status_code == 400
    # when
    again = post(api, {"email": "not-an-email"})
    # then
    assert again.status_code == 400
    assert again.content == first.content
    assert again["Idempotent-Replayed"] == "true"
    assert snapshot() == (0, 0, 0)


def test_a_refused_request_leaves_nothing_behind_but_its_record(api, program):
    # given a member who holds the email
    from members.services import member_enroll

    member_enroll(program=program, email="anna@example.com", source="test")
    before = snapshot()
    # when
    response = post(api, {**BODY, "cards": ["NEW-CARD"], "consents": {"sms": True}})
    # then
    assert response.status_code == 409
    assert snapshot() == before
    assert IdempotencyRecord.objects.get(key="key-1").status_code == 409


def test_keys_belong_to_their_client(api, make_client):
    # given another client of the programme that used the same key
    from tests.clients import APIClient

    post(api, BODY)
    _, raw = make_client(name="other-till")
    other = APIClient()
    other.credentials(HTTP_AUTHORIZATION=f"Api-Key {raw}")
    # when
    response = post(other, {"email": "bo@example.com"})
    # then it is not a reuse of the first client's key
    assert response.status_code == 201
    assert IdempotencyRecord.objects.filter(key="key-1").count() == 2


def test_an_invalid_key_is_a_400_problem_and_writes_nothing(api):
    # when
    response = post(api, BODY, key="x" * 256)
    # then
    assert response.status_code == 400
    assert response.json()["code"] == "invalid_idempotency_key"
    assert snapshot() == (0, 0, 0)
    assert not IdempotencyRecord.objects.exists()


def test_without_a_key_every_post_is_run(api):
    # given
    post(api, BODY, key=None)
    # when
    response = post(api, BODY, key=None)
    # then
    assert response.status_code == 409
    assert not IdempotencyRecord.objects.exists()
