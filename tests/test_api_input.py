"""Input the API must refuse cleanly: text PostgreSQL cannot store, malformed path arguments, JSON nested beyond
reason, times without an offset, empty member lookups; and input it must take: a full batch, a channel in any case.
Whatever is refused is a problem document, never a 500, and writes nothing; every purchase is sent the way a till
sends it, so it meets the hot path (core/hotpath.py) first, and with HOT_PATHS off it meets the full stack alone."""

import json

import pytest
from django.conf import settings as django_settings

from core.models import IdempotencyRecord
from loyalty import api as loyalty_api
from loyalty.models import Account, Entry, Lot, Transaction
from loyalty.verify import ledger_verify
from members.models import Identifier, Member
from members.services import member_enroll
from tests.test_transactions_api import purchase

URL = "/api/v1/transactions"


@pytest.fixture(params=[True, False], ids=["hot-paths", "full-stack"])
def route(request, settings):
    """Each test twice: as production serves it (hot path first), and by the full stack alone."""
    settings.HOT_PATHS = request.param
    return request.param


def post(api, url, body, **headers):
    raw = body if isinstance(body, str) else json.dumps(body)
    return api.post(url, raw, content_type="application/json", **headers)


def snapshot():
    return (
        Transaction.objects.count(),
        Entry.objects.count(),
        Lot.objects.count(),
        IdempotencyRecord.objects.count(),
        list(Account.objects.order_by("pk").values_list("available", "pending", "lifetime_earned")),
    )


def assert_problem(response, status: int, code: str):
    assert response.status_code == status
    assert response["Content-Type"] == "application/problem+json"
    assert (response.json()["status"], response.json()["code"]) == (status, code)


# --- text PostgreSQL cannot store (defect 2) ------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["sku", "category"])
@pytest.mark.parametrize(
    ("text", "message"),
    [("A\x00B", "Null characters are not allowed."), ("A\ud800B", "Surrogate characters are not allowed: U+D800.")],
    ids=["nul", "lone-surrogate"],
)
def test_a_nul_or_lone_surrogate_in_a_line_is_a_problem_naming_the_field_and_writes_nothing(
    api, member, route, field, text, message
):
    # given
    body = purchase(member)
    body["lines"][1][field] = text
    before = snapshot()
    # when
    response = post(api, URL, body)
    # then
    assert_problem(response, 400, "validation_error")
    assert response.json()["errors"] == {f"lines[1].{field}": [message]}
    assert snapshot() == before


@pytest.mark.parametrize(
    "field", ["external_id", "store", "member", "original_external_id", "original_store", "currency"]
)
def test_a_nul_in_any_other_text_of_a_transaction_is_a_problem_naming_the_field_and_writes_nothing(
    api, member, route, field
):
    # given
    body = purchase(member, **{field: "A\x00B"})
    before = snapshot()
    # when
    response = post(api, URL, body)
    # then
    assert_problem(response, 400, "validation_error")
    assert field in response.json()["errors"]
    assert snapshot() == before


def test_a_blank_sku_is_refused_as_the_line_serializer_refuses_it(api, member, route):
    # given
    body = purchase(member)
    body["lines"][0]["sku"] = "   "
    before = snapshot()
    # when
    response = post(api, URL, body)
    # then
    assert_problem(response, 400, "validation_error")
    assert response.json()["errors"] == {"lines[0].sku": ["This field is required."]}
    assert snapshot() == before


def test_a_batch_reports_text_it_cannot_store_on_its_item_and_records_the_others(api, member):
    # given
    bad = purchase(member, external_id="B-1")
    bad["lines"][0]["sku"] = "\x00"
    items = [purchase(member, external_id="B-0"), bad, purchase(member, external_id="B-2")]
    # when
    response = post(api, URL + "/batch", {"transactions": items})
    # then
    assert response.status_code == 200
    results = response.json()["results"]
    assert [r["status"] for r in results] == [201, 400, 201]
    assert "lines[0].sku" in results[1]["body"]["errors"]
    assert sorted(Transaction.objects.values_list("external_id", flat=True)) == ["B-0", "B-2"]
    assert Account.objects.get(pk=member.pk).available == 2 * 129
    assert ledger_verify() == []


@pytest.mark.django_db(transaction=True)
def test_a_batch_item_that_fails_unexpectedly_is_rolled_back_alone_and_reported_as_a_server_error(
    api, member, monkeypatch
):
    # given: recording B-1 fails after its purchase and points are written
    record = loyalty_api.transaction_record

    def failing_after_writing(**kwargs):
        result = record(**kwargs)
        if kwargs["data"].external_id == "B-1":
            raise RuntimeError("a bug after writing")
        return result

    monkeypatch.setattr(loyalty_api, "transaction_record", failing_after_writing)
    items = [purchase(member, external_id=f"B-{i}") for i in range(3)]
    # when
    response = post(api, URL + "/batch", {"transactions": items})
    # then: the others are recorded, B-1 left nothing behind, and each item says what became of it
    assert response.status_code == 200
    results = response.json()["results"]
    assert [r["status"] for r in results] == [201, 500, 201]
    assert results[1]["body"]["code"] == "server_error"
    assert "a bug" not in json.dumps(results[1]["body"])
    assert sorted(Transaction.objects.values_list("external_id", flat=True)) == ["B-0", "B-2"]
    assert Entry.objects.count() == 2
    assert Account.objects.get(pk=member.pk).available == 2 * 129
    assert ledger_verify() == []


# --- a NUL or a malformed member number or code in a path (defect 3) -----------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "code"),
    [
        ("get", "/api/v1/members/12%0034", "member_not_found"),
        ("patch", "/api/v1/members/12%0034", "member_not_found"),
        ("get", "/api/v1/members/12%0034/balance", "member_not_found"),
        ("get", "/api/v1/members/12%0034/activity", "member_not_found"),
        ("post", "/api/v1/members/12%0034/adjustments", "member_not_found"),
        ("get", "/api/v1/members/123456789X/balance", "member_not_found"),
        ("get", "/api/v1/tiers/a%00b", "tier_not_found"),
        ("patch", "/api/v1/tiers/a%00b", "tier_not_found"),
    ],
)
def test_a_malformed_member_number_or_tier_code_in_a_path_is_not_found_and_changes_nothing(
    api, member, route, method, path, code
):
    # given
    before = snapshot(), Member.objects.count()
    body = {"data": json.dumps({"points": 10, "reason": "x"}), "content_type": "application/json"}
    # when
    response = getattr(api, method)(path, **({} if method == "get" else body))
    # then
    assert_problem(response, 404, code)
    assert (snapshot(), Member.objects.count()) == before


def test_a_number_with_a_wrong_check_digit_is_not_found_without_asking_the_database(
    api, member, django_assert_num_queries
):
    # given: a real number with its last digit changed, and the key already known
    wrong = member.member_number[:-1] + str((int(member.member_number[-1]) + 1) % 10)
    api.get(f"/api/v1/members/{member.member_number}/balance")
    # when
    with django_assert_num_queries(0):
        response = api.get(f"/api/v1/members/{wrong}/balance")
    # then
    assert_problem(response, 404, "member_not_found")


# --- JSON nested beyond reason (defect 4) --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url", [URL, URL + "/batch", URL + "/preview", "/api/v1/members", "/api/v1/members/{number}/adjustments"]
)
def test_json_nested_too_deeply_is_a_400_problem_and_writes_nothing(api, member, route, url):
    # given
    url = url.format(number=member.member_number)
    before = snapshot(), Member.objects.count()
    # when
    response = api.post(url, "[" * 100_000, content_type="application/json")
    # then
    assert_problem(response, 400, "malformed_request")
    assert (snapshot(), Member.objects.count()) == before


# --- a full batch (defect 5) ---------------------------------------------------------------------------------------


def test_the_largest_batch_with_generous_lines_fits_in_the_accepted_body():
    # given: API.md's largest batch, 25 lines to each transaction, every text as long as it may be
    line = {
        "sku": "S" * 64,
        "category": "C" * 64,
        "quantity": "999999999.999",
        "unit_price": "9999999999.99",
        "amount": "9999999999.99",
    }
    item = purchase(
        None,
        external_id="E" * 128,
        store="S" * 64,
        member="1234567897",
        occurred_at="2026-05-01T14:30:00.123456+02:00",
        total="9999999999.99",
        lines=[line] * 25,
    )
    # when
    size = len(json.dumps({"transactions": [item] * django_settings.TRANSACTION_BATCH_MAX}))
    # then
    assert size <= django_settings.DATA_UPLOAD_MAX_MEMORY_SIZE


def test_a_full_batch_of_realistic_transactions_is_taken_whole(api, member):
    # given: 1,000 purchases of 25 lines each, about 3 MB, more than Django's default of 2.5 MB
    line = {"sku": "SKU-1234567", "category": "groceries", "quantity": "1.000", "unit_price": "5.00", "amount": "5.00"}
    items = [
        purchase(member, external_id=f"till-7-2026-01-10-{i:06d}", total="125.00", lines=[line] * 25)
        for i in range(django_settings.TRANSACTION_BATCH_MAX)
    ]
    raw = json.dumps({"transactions": items})
    assert len(raw) > 2_621_440
    # when
    response = post(api, URL + "/batch", raw)
    # then
    assert response.status_code == 200
    assert [r["status"] for r in response.json()["results"]] == [201] * len(items)
    assert Account.objects.get(pk=member.pk).available == 125 * len(items)


def test_a_body_over_the_limit_is_a_413_problem_and_writes_nothing(api, member, settings, route):
    # given
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    body = purchase(member, lines=purchase(member)["lines"] * 10)
    before = snapshot()
    # when
    response = post(api, URL, body)
    # then
    assert_problem(response, 413, "request_too_large")
    assert snapshot() == before


# --- times without an offset (defect 9) ----------------------------------------------------------------------------


@pytest.mark.parametrize("when", ["2026-01-10", "2026-01-10T10", "2026-01-10T10:00", "2026-01-10T10:00:00.5"])
def test_a_time_without_an_offset_is_refused_naming_the_field_and_writes_nothing(api, member, route, when):
    # given
    before = snapshot()
    # when
    response = post(api, URL, purchase(member, occurred_at=when))
    # then
    assert_problem(response, 400, "validation_error")
    assert list(response.json()["errors"]) == ["occurred_at"]
    assert snapshot() == before


@pytest.mark.parametrize("when", ["2026-01-10T10:00:00Z", "2026-01-10T10:00:00+01:00", "2026-01-10T10:00-05:30"])
def test_a_time_with_an_offset_is_taken(api, member, route, when):
    # when
    response = post(api, URL, purchase(member, occurred_at=when))
    # then
    assert response.status_code == 201


NOT_DECIMALS = [
    "1e5",
    "1E2",
    "1_000",
    " 10.00",
    "Infinity",
    "0x10",
    "+5",
    "5.",
    ".5",
    "\u0661\u0662.\u0669",
    1e16,
    True,
]


# The plain purchase a till sends is checked by hand on the hot path; with another key (here original_store) it is
# the serializer's: both refuse.
@pytest.mark.parametrize("extra", [{}, {"original_store": None}], ids=["plain", "serializer"])
@pytest.mark.parametrize("total", NOT_DECIMALS)
def test_money_not_written_as_a_decimal_is_refused_naming_the_field_and_writes_nothing(
    api, member, route, total, extra
):
    # given
    before = snapshot()
    # when
    response = post(api, URL, purchase(member, total=total, lines=[], **extra))
    # then
    assert_problem(response, 400, "validation_error")
    assert list(response.json()["errors"]) == ["total"]
    assert snapshot() == before


@pytest.mark.parametrize("amount", NOT_DECIMALS)
def test_a_line_amount_not_written_as_a_decimal_is_refused_naming_it_and_writes_nothing(api, member, route, amount):
    # given
    before = snapshot()
    line = {"sku": "A", "quantity": "1", "unit_price": "100.00", "amount": amount}
    # when
    response = post(api, URL, purchase(member, total="100.00", lines=[line]))
    # then
    assert_problem(response, 400, "validation_error")
    assert list(response.json()["errors"]) == ["lines[0].amount"]
    assert snapshot() == before


@pytest.mark.parametrize(("total", "points"), [("129.90", 129), ("7", 7), (12, 12), (12.5, 12)])
def test_money_as_a_decimal_string_or_a_json_number_is_taken(api, member, route, total, points):
    # when
    response = post(api, URL, purchase(member, total=total, lines=[]))
    # then
    assert response.status_code == 201
    assert response.json()["points"]["earned"] == points


def test_an_activity_filter_without_an_offset_is_refused(api, member):
    # when
    response = api.get(f"/api/v1/members/{member.member_number}/activity?since=2026-01-10")
    # then
    assert_problem(response, 400, "validation_error")
    assert "since" in response.json()["errors"]


# --- member_lookup with other than one identifier (defect 10) ------------------------------------------------------


@pytest.mark.parametrize(
    ("lookup", "field"),
    [
        ({}, "member_lookup"),
        ({"channel": "web"}, "member_lookup"),
        ({"email": "a@example.com", "phone": "+46701234567"}, "member_lookup"),
        ({"external_id": "c-991"}, "member_lookup.channel"),
    ],
    ids=["empty", "channel-only", "two", "external-id-without-channel"],
)
@pytest.mark.parametrize("url", [URL, URL + "/preview"])
def test_a_member_lookup_without_exactly_one_identifier_is_a_400_naming_it_and_writes_nothing(
    api, member, route, url, lookup, field
):
    # given
    body = purchase(None, member_lookup=lookup)
    del body["member"]
    before = snapshot()
    # when
    response = post(api, url, body)
    # then
    assert_problem(response, 400, "invalid")
    assert field in response.json()["errors"]
    assert snapshot() == before


def test_an_empty_member_lookup_beside_a_member_is_refused(api, member):
    # given
    before = snapshot()
    # when
    response = post(api, URL, purchase(member, member_lookup={}))
    # then
    assert_problem(response, 400, "validation_error")
    assert "member" in response.json()["errors"]
    assert snapshot() == before


def test_an_empty_member_lookup_in_a_batch_is_refused_on_its_item(api, member):
    # given
    body = purchase(None, member_lookup={})
    del body["member"]
    # when
    response = post(api, URL + "/batch", {"transactions": [body]})
    # then
    assert [r["status"] for r in response.json()["results"]] == [400]
    assert not Transaction.objects.exists()


# --- an external id's channel in any letter case (defect 11) -------------------------------------------------------


@pytest.mark.parametrize("channel", ["web", "Web", "WEB", " web "])
def test_a_member_is_found_by_external_id_whatever_the_case_of_its_channel(api, program, channel):
    # given: enrolled with the channel written "Web", which enrolment keeps as "web"
    enrolled = member_enroll(program=program, source="test", email="a@example.com", external_ids={"Web": "c-991"})
    assert Identifier.objects.get(member=enrolled, kind=Identifier.Kind.EXTERNAL).channel == "web"
    # when
    response = api.get("/api/v1/members/lookup", {"external_id": "c-991", "channel": channel})
    # then
    assert response.status_code == 200
    assert response.json()["member_number"] == enrolled.member_number


def test_a_purchase_finds_its_member_by_external_id_whatever_the_case_of_its_channel(api, program):
    # given
    enrolled = member_enroll(program=program, source="test", email="a@example.com", external_ids={"web": "c-991"})
    body = purchase(None, member_lookup={"external_id": "c-991", "channel": "WEB"})
    del body["member"]
    # when
    response = post(api, URL, body)
    # then
    assert response.status_code == 201
    assert response.json()["member"] == enrolled.member_number
    assert Account.objects.get(pk=enrolled.pk).available == 129
