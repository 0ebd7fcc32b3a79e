"""API clients: authentication, scopes, revocation, the create_api_client command and the admin."""

import json
import re
from io import StringIO
from types import SimpleNamespace

import pytest
from django.contrib.auth import get_user_model
from django.contrib.messages import get_messages
from django.core.management import CommandError, call_command
from django.utils import timezone

from core import auth
from core.models import ApiClient
from members.models import Member
from tests.clients import APIClient
from tests.factories import ProgramFactory

URL = "/api/v1/members"


@pytest.fixture(autouse=True)
def no_client_cache(settings):
    # core.auth remembers clients for a few seconds; these tests revoke keys and expect it to show at once.
    settings.API_CLIENT_CACHE_SECONDS = 0
    auth._clients.clear()
    yield
    auth._clients.clear()


def client_with(header: str | None) -> APIClient:
    api = APIClient()
    if header is not None:
        api.credentials(HTTP_AUTHORIZATION=header)
    return api


def enrol_body() -> str:
    return json.dumps({"email": "anna@example.com"})


@pytest.mark.parametrize(
    "header",
    [None, "Api-Key lk_not-a-real-key", "Bearer something", "Api-Key ", "Basic dXNlcjpwYXNz"],
)
def test_a_request_without_a_valid_key_is_a_401_problem_and_writes_nothing(db, header):
    # when
    response = client_with(header).post(URL, enrol_body(), content_type="application/json")
    # then
    assert response.status_code == 401
    assert response["Content-Type"] == "application/problem+json"
    assert response.json()["code"] == "not_authenticated"
    assert response["WWW-Authenticate"] == "Api-Key"
    assert not Member.objects.exists()


def test_a_key_without_the_scope_is_a_403_problem_and_writes_nothing(make_client):
    # given
    _, raw = make_client(scopes=["members:read"])
    # when
    response = client_with(f"Api-Key {raw}").post(URL, enrol_body(), content_type="application/json")
    # then
    assert response.status_code == 403
    assert response.json()["code"] == "permission_denied"
    assert "members:write" in response.json()["detail"]
    assert not Member.objects.exists()


def test_a_key_with_the_scope_is_let_in(make_client):
    # given
    _, raw = make_client(scopes=["members:write"])
    # when
    response = client_with(f"Api-Key {raw}").post(URL, enrol_body(), content_type="application/json")
    # then
    assert response.status_code == 201


def test_a_write_key_cannot_read_without_members_read(make_client):
    # given
    _, raw = make_client(scopes=["members:write"])
    # when
    response = client_with(f"Api-Key {raw}").get(f"{URL}/lookup?email=anna%40example.com")
    # then
    assert response.status_code == 403


def test_a_revoked_key_is_refused(make_client):
    # given a key that worked
    client, raw = make_client()
    api = client_with(f"Api-Key {raw}")
    assert api.get(f"{URL}/lookup?card=X").status_code == 404
    # when
    ApiClient.objects.filter(pk=client.pk).update(revoked_at=timezone.now())
    response = api.post(URL, enrol_body(), content_type="application/json")
    # then
    assert response.status_code == 401
    assert not Member.objects.exists()


def test_a_known_key_is_remembered_for_the_cache_seconds_and_an_unknown_one_not_at_all(
    make_client, settings, monkeypatch, django_assert_num_queries
):
    # given a key in use, remembered for 5 s, and a clock we move
    settings.API_CLIENT_CACHE_SECONDS = 5
    client, raw = make_client()
    clock = [1000.0]
    monkeypatch.setattr(auth, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    assert auth.api_client_for_key(raw) == client
    # when it is revoked, it keeps working within the 5 s without asking the database
    ApiClient.objects.filter(pk=client.pk).update(revoked_at=timezone.now())
    clock[0] += 4.9
    with django_assert_num_queries(0):
        assert auth.api_client_for_key(raw) == client
    # and after them it is refused, and stays refused
    clock[0] += 0.2
    assert auth.api_client_for_key(raw) is None
    assert auth.api_client_for_key(raw) is None
    assert raw not in auth._clients
    # an unknown key is asked for every time: nothing is remembered of it
    with django_assert_num_queries(2):
        assert auth.api_client_for_key(raw + "x") is None
        assert auth.api_client_for_key(raw + "x") is None


def test_using_a_key_records_when_it_was_last_used(make_client):
    # given
    client, raw = make_client()
    # when
    client_with(f"Api-Key {raw}").get(f"{URL}/lookup?card=X")
    # then
    client.refresh_from_db()
    assert client.last_used_at is not None


def test_only_a_hash_of_the_key_is_stored(make_client):
    # given
    client, raw = make_client()
    # then
    stored = ApiClient.objects.filter(pk=client.pk).values().get()
    assert raw not in json.dumps(stored, default=str)
    assert stored["key_hash"] == ApiClient.hash_key(raw)


def run_command(*args) -> str:
    out = StringIO()
    call_command("create_api_client", *args, stdout=out)
    return out.getvalue()


def printed_key(output: str) -> str:
    return re.search(r"^(lk_\S+)$", output, re.MULTILINE).group(1)


def test_the_command_creates_a_client_and_prints_a_working_key(program):
    # when
    output = run_command("Store 12 till", "--scopes", "members:read", "transactions:write")
    # then
    client = ApiClient.objects.get(name="Store 12 till")
    assert client.program == program
    assert client.scopes == ["members:read", "transactions:write"]
    raw = printed_key(output)
    assert client.key_hash == ApiClient.hash_key(raw)
    assert client_with(f"Api-Key {raw}").get(f"{URL}/lookup?card=X").status_code == 404


def test_the_command_grants_every_scope_with_all(program):
    # when
    run_command("Back office", "--scopes", "all")
    # then
    assert ApiClient.objects.get(name="Back office").scopes == list(ApiClient.Scope.values)


def test_the_command_creates_the_client_in_the_named_programme(db):
    # given
    other = ProgramFactory(code="NORWAY")
    # when
    run_command("Oslo till", "--scopes", "members:read", "--program", "NORWAY")
    # then
    assert ApiClient.objects.get(name="Oslo till").program == other


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["Till", "--scopes", "members:read", "members:delete"], "Unknown scope(s): members:delete"),
        (["Till", "--scopes", "all", "members:read"], "'all' cannot be combined"),
        (["Till", "--scopes", "members:read", "--program", "NOPE"], "No programme with code 'NOPE'"),
        (["  ", "--scopes", "members:read"], "must not be empty"),
        (["x" * 121, "--scopes", "members:read"], "longer than 120"),
    ],
)
def test_the_command_refuses_bad_input_and_creates_nothing(program, args, message):
    # when
    with pytest.raises(CommandError, match=re.escape(message)):
        run_command(*args)
    # then
    assert not ApiClient.objects.exists()


def test_the_command_refuses_a_duplicate_name_and_keeps_the_first_key(program):
    # given
    raw = printed_key(run_command("Till", "--scopes", "members:read"))
    # when
    with pytest.raises(CommandError, match="already has an API client named 'Till'"):
        run_command("Till", "--scopes", "all")
    # then
    client = ApiClient.objects.get()
    assert client.key_hash == ApiClient.hash_key(raw)
    assert client.scopes == ["members:read"]


@pytest.fixture
def staff(db, client):
    user = get_user_model().objects.create_superuser("staff", "staff@example.com", None)
    client.force_login(user)
    return client


def test_the_admin_generates_the_key_on_creation_and_shows_it_once(staff, program):
    # when
    response = staff.post(
        "/admin/core/apiclient/add/",
        {"program": program.pk, "name": "Web shop", "scopes": ["members:read", "members:write"]},
        follow=True,
    )
    # then
    assert response.status_code == 200
    client = ApiClient.objects.get(name="Web shop")
    assert client.scopes == ["members:read", "members:write"]
    assert client.created_by.username == "staff"
    shown = [str(m) for m in get_messages(response.wsgi_request)]
    raw = re.search(r"(lk_[\w-]+)", " ".join(shown) or response.content.decode()).group(1)
    assert client.key_hash == ApiClient.hash_key(raw)
    # and the change page never shows it again
    page = staff.get(f"/admin/core/apiclient/{client.pk}/change/").content.decode()
    assert raw not in page and client.key_hash not in page
    assert client.key_prefix in page


def test_the_admin_refuses_an_unknown_scope(staff, program):
    # when
    response = staff.post("/admin/core/apiclient/add/", {"program": program.pk, "name": "Web shop", "scopes": ["root"]})
    # then
    assert response.status_code == 200
    assert "scopes" in response.context["adminform"].form.errors
    assert not ApiClient.objects.exists()


def test_the_admin_refuses_a_duplicate_name_on_change(staff, make_client):
    # given
    make_client(name="Till A")
    client, _ = make_client(name="Till B")
    # when
    response = staff.post(f"/admin/core/apiclient/{client.pk}/change/", {"name": "Till A", "scopes": ["members:read"]})
    # then
    assert response.status_code == 200
    assert "name" in response.context["adminform"].form.errors
    assert ApiClient.objects.get(pk=client.pk).name == "Till B"


def test_the_admin_revoke_action_revokes_the_selected_keys(staff, make_client):
    # given
    client, raw = make_client(name="Till A")
    kept, kept_raw = make_client(name="Till B")
    # when
    staff.post("/admin/core/apiclient/", {"action": "revoke", "_selected_action": [client.pk]}, follow=True)
    # then
    client.refresh_from_db()
    kept.refresh_from_db()
    assert client.revoked_at is not None and kept.revoked_at is None
    assert client_with(f"Api-Key {raw}").get(f"{URL}/lookup?card=X").status_code == 401
    assert client_with(f"Api-Key {kept_raw}").get(f"{URL}/lookup?card=X").status_code == 404
