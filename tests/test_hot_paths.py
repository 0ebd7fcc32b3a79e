"""The hot paths (core/hotpath.py) answer exactly as the full stack does, and hand it everything else.

Every API test already goes through them (tests/clients.py); these compare the two ways side by side and check the
hand-over, including through the production WSGI entry point."""

import io
import json
from datetime import timedelta

import pytest
from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from core.models import IdempotencyRecord
from loyalty.ledger import ledger_credit_many
from loyalty.models import Account, Entry, Lot, Transaction
from loyalty.points import points_adjust
from loyalty.selectors import EXPIRING_GROUPS
from loyalty.verify import ledger_verify
from members.models import Member
from rewards.services.catalogue import reward_create
from tests.clients import APIClient

URL = "/api/v1/transactions"


def _purchase(member, **overrides):
    return {
        "external_id": "R-1",
        "store": "S1",
        "channel": "pos",
        "member": member.member_number,
        "type": "purchase",
        "occurred_at": timezone.now().isoformat(),
        "currency": "SEK",
        "total": "120.50",
        "lines": [{"sku": "A", "category": "c", "quantity": "1", "unit_price": "120.50", "amount": "120.50"}],
        **overrides,
    }


def _post(api, body, **headers):
    raw = body if isinstance(body, str) else json.dumps(body)
    return api.post(URL, raw, content_type="application/json", **headers)


def _headers(response):
    return dict(response.items())


def _snapshot():
    return (Transaction.objects.count(), Entry.objects.count(), Lot.objects.count(), IdempotencyRecord.objects.count())


def test_a_purchase_served_hot_reads_byte_for_byte_as_the_full_stack_replays_it(api, member, settings):
    # when
    hot = _post(api, _purchase(member))
    settings.HOT_PATHS = False
    full = _post(api, _purchase(member))
    # then
    assert (hot.status_code, full.status_code) == (201, 200)  # the second is the replay of the first
    assert getattr(hot, "served_hot", False) and not getattr(full, "served_hot", False)
    assert hot.content == full.content
    assert _headers(hot) == _headers(full)
    assert hot["Content-Type"] == "application/json"


def test_the_full_stack_first_and_the_hot_replay_agree_too(api, member, settings):
    # given
    settings.HOT_PATHS = False
    full = _post(api, _purchase(member))
    settings.HOT_PATHS = True
    # when
    hot = _post(api, _purchase(member))
    # then
    assert (full.status_code, hot.status_code) == (201, 200)
    assert hot.served_hot
    assert hot.content == full.content
    assert Transaction.objects.count() == 1


def test_a_balance_served_hot_reads_as_the_full_stacks(api, member, settings):
    # given
    _post(api, _purchase(member))
    url = f"/api/v1/members/{member.member_number}/balance"
    # when
    hot = api.get(url)
    settings.HOT_PATHS = False
    full = api.get(url)
    # then
    assert hot.status_code == full.status_code == 200
    assert hot.served_hot
    assert hot.content == full.content
    assert hot.json()["available"] == 120
    assert _headers(hot) == _headers(full)


@pytest.mark.parametrize("accept_language", ["sv", "nb-NO,nb;q=0.9", "de", None])
def test_the_headers_the_middlewares_add_follow_each_requests_language_and_the_settings(
    api, member, settings, accept_language
):
    # given: answered hot in English, and in the request's language under other settings, so the middlewares' work
    # for both is known
    url = f"/api/v1/members/{member.member_number}/balance"
    headers = {"HTTP_ACCEPT_LANGUAGE": accept_language} if accept_language else {}
    assert api.get(url, HTTP_ACCEPT_LANGUAGE="en")["Content-Language"] == "en"
    assert api.get(url, **headers)["X-Frame-Options"] == "DENY"
    settings.X_FRAME_OPTIONS = "SAMEORIGIN"
    # when
    hot = api.get(url, **headers)
    settings.HOT_PATHS = False
    full = api.get(url, **headers)
    # then
    assert hot.served_hot
    assert _headers(hot) == _headers(full)
    assert hot["Content-Language"] == {"sv": "sv", "nb-NO,nb;q=0.9": "nb"}.get(accept_language, "en")
    assert hot["X-Frame-Options"] == "SAMEORIGIN"


def test_a_request_with_cookies_is_the_full_stacks_and_kinds_of_request_kept_are_bounded(
    api, member, settings, monkeypatch
):
    # given: room for two kinds of request
    from core import hotpath
    from tests import clients

    monkeypatch.setattr(hotpath, "_ENVELOPES_KEPT", 2)
    url = f"/api/v1/members/{member.member_number}/balance"
    # when
    languages = [api.get(url, HTTP_ACCEPT_LANGUAGE=lang) for lang in ("sv", "nb", "en", "sv")]
    kept = len(clients._hot.envelopes)
    api.cookies["sessionid"] = "stale"
    with_cookie = api.get(url)
    settings.HOT_PATHS = False
    full = api.get(url)
    # then
    assert [r["Content-Language"] for r in languages] == ["sv", "nb", "en", "sv"]
    assert all(r.served_hot for r in languages)
    assert kept == 2
    assert not getattr(with_cookie, "served_hot", False)
    assert _headers(with_cookie) == _headers(full)


def test_a_purchase_with_cookies_reaches_the_full_stack_with_its_body(api, member):
    # given: a till whose requests carry a cookie, which the hot path leaves to the full stack before reading the body
    api.cookies["sessionid"] = "stale"
    # when
    response = _post(api, _purchase(member))
    # then: recorded once, by the full stack, from the body as sent
    assert not getattr(response, "served_hot", False)
    assert response.status_code == 201
    assert Transaction.objects.get().external_id == "R-1"


def test_a_balance_is_one_statement_and_an_unknown_member_none(api, member, django_assert_num_queries):
    # given: points that expire, and the key known
    _post(api, _purchase(member))
    url = f"/api/v1/members/{member.member_number}/balance"
    assert api.get(url).status_code == 200
    # when
    with django_assert_num_queries(1):
        found = api.get(url)
    unknown = api.get("/api/v1/members/0000000000/balance")
    # then
    assert found.status_code == 200 and found.served_hot
    assert (found.json()["member"], found.json()["available"]) == (member.member_number, 120)
    assert [e["points"] for e in found.json()["expiring"]] == [120]
    assert unknown.status_code == 404 and unknown["Content-Type"] == "application/problem+json"


def test_a_balance_read_is_planned_once(api, member, prepared_plans):
    # given: points expiring on each of 3,000 days, and the table's statistics up to date: at such a size the
    # plan for a balance's first expiry dates looks cheaper than one for any number of them
    now = timezone.now()
    credits = [
        {
            "member_id": member.pk,
            "kind": Entry.Kind.EARN,
            "points": 10,
            "occurred_at": now,
            "available_from": now,
            "expires_at": now + timedelta(days=30 + day),
        }
        for day in range(3000)
    ]
    ledger_credit_many(credits=credits, now=now)
    with connection.cursor() as cursor:
        cursor.execute(f"ANALYZE {Lot._meta.db_table}")
    url = f"/api/v1/members/{member.member_number}/balance"
    # when: read as often as a till does, the driver preparing the statement on the way
    answers = [api.get(url) for _ in range(12)]
    # then: after PostgreSQL's five trial plans it keeps the generic one
    assert {a.status_code for a in answers} == {200}
    assert len(answers[-1].json()["expiring"]) == EXPIRING_GROUPS
    generic, custom = prepared_plans("SELECT 0, a.available")
    assert generic > 0 and custom == 5


@pytest.mark.parametrize(
    ("case", "expected_status"),
    [
        ("malformed_json", 400),
        ("negative_total", 400),
        ("lines_do_not_add_up", 422),
        ("unknown_member", 422),
        ("wrong_currency", 422),
        ("nan_total", 400),
        ("form_encoded", 415),
        ("accepts_only_html", 406),
        ("unknown_key", 401),
        ("key_without_scope", 403),
        ("host_not_allowed", 400),
    ],
)
def test_what_the_hot_path_declines_the_full_stack_answers_and_nothing_is_written(
    api, member, make_client, settings, case, expected_status
):
    # given
    body, headers, content_type = _purchase(member), {}, "application/json"
    if case == "malformed_json":
        body = '{"external_id": "R-1",'
    elif case == "negative_total":
        body["total"] = "-1.00"
    elif case == "lines_do_not_add_up":
        body["total"] = "99.00"
    elif case == "unknown_member":
        body["member"] = "0000000000"
    elif case == "wrong_currency":
        body["currency"] = "EUR"
    elif case == "nan_total":
        body = json.dumps(body).replace('"120.50"', "NaN", 1)
    elif case == "form_encoded":
        content_type = "application/x-www-form-urlencoded"
    elif case == "accepts_only_html":
        headers["HTTP_ACCEPT"] = "text/html"
    elif case == "unknown_key":
        api = APIClient()
        api.credentials(HTTP_AUTHORIZATION="Api-Key lk_nope")
    elif case == "key_without_scope":
        _, raw = make_client(scopes=["members:read"])
        api = APIClient()
        api.credentials(HTTP_AUTHORIZATION=f"Api-Key {raw}")
    elif case == "host_not_allowed":
        headers["HTTP_HOST"] = "evil.example"
    raw = body if isinstance(body, str) else json.dumps(body)
    before = _snapshot()
    # when
    hot = api.post(URL, raw, content_type=content_type, **headers)
    settings.HOT_PATHS = False
    full = api.post(URL, raw, content_type=content_type, **headers)
    # then
    assert hot.status_code == full.status_code == expected_status
    assert not getattr(hot, "served_hot", False)
    assert hot.content == full.content
    assert _snapshot() == before


def test_an_idempotency_key_is_honoured_on_the_hot_path_and_its_replay_reads_as_the_full_stacks(api, member, settings):
    # given
    body = _purchase(member)
    # when: the first request served hot, its repeat both ways, and a reuse of the key with another body
    hot = _post(api, body, HTTP_IDEMPOTENCY_KEY="k-1")
    hot_replay = _post(api, body, HTTP_IDEMPOTENCY_KEY="k-1")
    settings.HOT_PATHS = False
    full_replay = _post(api, body, HTTP_IDEMPOTENCY_KEY="k-1")
    settings.HOT_PATHS = True
    reused = _post(api, {**body, "total": "1.00", "lines": []}, HTTP_IDEMPOTENCY_KEY="k-1")
    # then
    assert hot.status_code == hot_replay.status_code == full_replay.status_code == 201
    assert hot.served_hot and hot_replay.served_hot
    assert hot.content == hot_replay.content == full_replay.content
    assert hot_replay["Idempotent-Replayed"] == "true"
    assert _headers(hot_replay) == _headers(full_replay)
    assert reused.status_code == 422 and reused.json()["code"] == "idempotency_key_reused"
    assert IdempotencyRecord.objects.filter(key="k-1", status_code=201).count() == 1
    assert Transaction.objects.count() == 1


def test_a_declined_request_gives_its_idempotency_key_back_for_the_full_stack(api, member):
    # when: the hot path declines (unknown member) after the key was claimed
    response = _post(api, {**_purchase(member), "member": "0000000000"}, HTTP_IDEMPOTENCY_KEY="k-2")
    # then: the full stack claimed it anew and stored its 422
    assert response.status_code == 422 and not getattr(response, "served_hot", False)
    assert IdempotencyRecord.objects.filter(key="k-2", status_code=422).count() == 1
    assert Transaction.objects.count() == 0


def test_a_hot_attempt_that_fails_midway_leaves_nothing_and_the_full_stack_records_the_purchase_once(
    api, member, monkeypatch
):
    # given: the member's first purchase, which opens their account and so goes the general way, step by step; the
    # first credit of the ledger fails, as a dropped connection would, the second succeeds
    from loyalty.ledger import core

    real, calls = core._credit_in_one_statement, []

    def failing_once(entry, **credit):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("connection lost")
        return real(entry, **credit)

    monkeypatch.setattr(core, "_credit_in_one_statement", failing_once)
    # when
    response = _post(api, _purchase(member))
    # then
    assert response.status_code == 201
    assert not getattr(response, "served_hot", False)
    assert len(calls) == 2
    assert Transaction.objects.count() == 1 and Entry.objects.count() == 1
    assert Account.objects.get(pk=member.pk).available == 120
    assert ledger_verify() == []


def test_a_plain_purchase_is_one_statement_that_finds_the_member_and_writes_it_all(
    api, member, django_assert_num_queries
):
    # given: the member's first purchase has opened their account, and the key is known
    assert _post(api, _purchase(member)).status_code == 201
    # when
    with django_assert_num_queries(1):
        response = _post(api, _purchase(member, external_id="R-2", total="10.00", lines=[]))
    # then
    assert response.status_code == 201 and response.served_hot
    assert response.json()["balance"] == {"available": 130, "held": 0, "pending": 0}
    assert Entry.objects.filter(transaction__external_id="R-2").get().lot.remaining == 10
    assert ledger_verify() == []


# Values that differ between two runs of the same request: new ids, random codes, the clock.
_RUN_SPECIFIC = {"id", "hold_id", "code", "created_at", "expires_at", "closed_at"}


def _same_answer(hot, full):
    def normal(value):
        if isinstance(value, dict):
            return {k: "…" if k in _RUN_SPECIFIC else normal(v) for k, v in value.items()}
        return value

    assert hot.status_code == full.status_code
    assert getattr(hot, "served_hot", False) and not getattr(full, "served_hot", False)
    assert normal(hot.json()) == normal(full.json())
    assert {**_headers(hot), "Content-Length": "…"} == {**_headers(full), "Content-Length": "…"}


def _both_ways(settings, request):
    """`request()` served hot, then, with the database rolled back to before it, by the full stack."""
    with transaction.atomic():
        before = transaction.savepoint()
        hot = request()
        transaction.savepoint_rollback(before)
        settings.HOT_PATHS = False
        full = request()
        settings.HOT_PATHS = True
    return hot, full


def test_redemptions_and_holds_served_hot_answer_as_the_full_stack(api, member, program, settings):
    # given
    points_adjust(member=member, points=1000, reason="seed")
    reward_create(program=program, code="coffee", kind="product", points_cost=120, name_en="Coffee")
    number = member.member_number
    hold = api.post("/api/v1/points/holds", {"member": number, "points": 200, "store": "S1"}, format="json").json()
    hold_url = f"/api/v1/points/holds/{hold['hold_id']}"
    # when / then
    for request in (
        lambda: api.post("/api/v1/redemptions", {"member": number, "reward": "coffee"}, format="json"),
        lambda: api.post("/api/v1/points/holds", {"member": number, "points": 50, "store": "S2"}, format="json"),
        lambda: api.post(f"{hold_url}/capture", {"external_id": "R-9", "points": 150}, format="json"),
        lambda: api.post(f"{hold_url}/release"),
        # declined: the full stack answers both times
        lambda: api.post("/api/v1/redemptions", {"member": number, "reward": "nope"}, format="json"),
        lambda: api.post(f"{hold_url}x/release"),
    ):
        hot, full = _both_ways(settings, request)
        if hot.status_code < 400:
            _same_answer(hot, full)
        else:
            assert not getattr(hot, "served_hot", False) and hot.content == full.content
    assert ledger_verify() == []


def _wsgi(method, path, body=b"", **environ):
    from config.wsgi import application

    env = {
        "REQUEST_METHOD": method,
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000",
        "HTTP_HOST": "127.0.0.1",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": io.StringIO(),
        "CONTENT_LENGTH": str(len(body)),
        "CONTENT_TYPE": "application/json",
        **environ,
    }
    started = []
    result = application(env, lambda status, headers, exc_info=None: started.append((status, dict(headers))))
    try:
        content = b"".join(result)
    finally:
        result.close()
    return started[0][0], started[0][1], content


@pytest.mark.django_db(transaction=True)
def test_the_production_entry_point_serves_hot_routes_and_hands_the_rest_to_django(member, make_client):
    # given
    assert settings.HOT_PATHS
    _, raw = make_client()
    auth = {"HTTP_AUTHORIZATION": f"Api-Key {raw}"}
    # when
    created = _wsgi("POST", URL, json.dumps(_purchase(member)).encode(), **auth)
    balance = _wsgi("GET", f"/api/v1/members/{member.member_number}/balance", **auth)
    refused = _wsgi("POST", URL, json.dumps(_purchase(member, total="1.00")).encode())
    # then
    assert created[0] == "201 Created"
    assert json.loads(created[2])["points"]["earned"] == 120
    assert created[1]["X-Content-Type-Options"] == "nosniff" and created[1]["X-Frame-Options"] == "DENY"
    assert balance[0] == "200 OK" and json.loads(balance[2])["available"] == 120
    assert refused[0] == "401 Unauthorized"
    assert refused[1]["Content-Type"] == "application/problem+json"
    assert Transaction.objects.count() == 1


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("refusal", ["hot route: a return of more than was bought", "full stack: a duplicate email"])
def test_a_refused_write_keeps_the_connections_prepared_statements(member, make_client, prepared_plans, refusal):
    # given: a till's purchases through the production entry point, often enough for the driver to prepare their
    # statement and for PostgreSQL to settle on its generic plan
    _, raw = make_client()
    auth = {"HTTP_AUTHORIZATION": f"Api-Key {raw}"}
    purchase_statement = ("WITH m AS (SELECT id FROM members_member WHERE member_number",)
    for n in range(12):
        assert _wsgi("POST", URL, json.dumps(_purchase(member, external_id=f"P-{n}")).encode(), **auth)[0][:3] == "201"
    generic, custom = prepared_plans(*purchase_statement)
    members_before = Member.objects.count()
    # when: a write refused and rolled back (a hot route's twice: on the hot path, then on the full stack, which
    # answers), then the next purchase
    if refusal.startswith("hot route"):
        body = _purchase(member, external_id="R-X", type="return", original_external_id="P-0", total="999.00", lines=[])
        refused = _wsgi("POST", URL, json.dumps(body).encode(), **auth)
        expected = ("422 Unprocessable Entity", "return_exceeds_purchase")
    else:
        refused = _wsgi("POST", "/api/v1/members", json.dumps({"email": member.email}).encode(), **auth)
        expected = ("409 Conflict", "member_exists")
    after = _wsgi("POST", URL, json.dumps(_purchase(member, external_id="P-12")).encode(), **auth)
    # then: the write is refused and wrote nothing, and the purchase statement is still prepared, its plans counted on
    assert (refused[0], json.loads(refused[2])["code"], after[0]) == (*expected, "201 Created")
    assert (Transaction.objects.count(), Member.objects.count()) == (13, members_before)
    assert prepared_plans(*purchase_statement) == (generic + 1, custom)
