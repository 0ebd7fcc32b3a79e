"""The rewards endpoints over HTTP: catalogue, management, redemptions, vouchers and holds, and problem+json answers
to bad input that change nothing."""

import pytest

from loyalty.models import Account, Entry
from loyalty.points import points_adjust
from rewards.models import Hold, Redemption, Reward, Voucher
from rewards.services.catalogue import reward_create
from tests.clients import APIClient


@pytest.fixture
def rich(member):
    points_adjust(member=member, points=1000, reason="seed")
    return member


@pytest.fixture
def coffee(program):
    return reward_create(
        program=program, code="coffee", kind="product", points_cost=100, name_en="Coffee", name_sv="Kaffe", stock=5
    )


def _client(make_client, scopes):
    _, raw = make_client(scopes=scopes)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Api-Key {raw}")
    return client


def _problem(response, status, code):
    assert response.status_code == status, response.content
    assert response["Content-Type"] == "application/problem+json"
    assert response.json()["code"] == code
    return response.json()


def test_the_catalogue_is_listed_in_the_callers_language_with_filters(api, rich, coffee, program):
    # given
    reward_create(program=program, code="trip", kind="experience", points_cost=5000, name_en="Trip")

    # when
    swedish = api.get("/api/v1/rewards", HTTP_ACCEPT_LANGUAGE="sv")
    affordable = api.get("/api/v1/rewards", {"affordable_for": rich.member_number})
    experiences = api.get("/api/v1/rewards", {"kind": "experience"})

    # then
    assert [r["name"] for r in swedish.json()["results"]] == ["Kaffe", "Trip"]
    assert swedish.json()["results"][0]["names"] == {"en": "Coffee", "sv": "Kaffe", "nb": ""}
    assert [r["code"] for r in affordable.json()["results"]] == ["coffee"]
    assert [r["code"] for r in experiences.json()["results"]] == ["trip"]


def test_bad_catalogue_filters_are_refused(api, make_client, rich):
    _problem(api.get("/api/v1/rewards", {"kind": "car"}), 400, "validation_error")
    _problem(api.get("/api/v1/rewards", {"affordable_for": "nobody"}), 422, "unknown_member")
    reader = _client(make_client, ["rewards:redeem"])
    _problem(reader.get("/api/v1/rewards", {"affordable_for": rich.member_number}), 403, "permission_denied")


def test_rewards_are_managed_with_the_program_manage_scope(api, make_client):
    # given
    body = {"code": "cake", "kind": "discount", "points_cost": 300, "name_en": "Cake", "discount_percent": "10.00"}

    # when
    created = api.post("/api/v1/rewards", body, format="json")
    changed = api.patch("/api/v1/rewards/cake", {"points_cost": 250, "name_nb": "Kake"}, format="json")
    retired = api.delete("/api/v1/rewards/cake")
    stocked = api.post("/api/v1/rewards/cake/stock", {"delta": 3, "reason": "x"}, format="json")

    # then
    assert created.status_code == 201, created.content
    assert changed.json()["points_cost"] == 250 and changed.json()["names"]["nb"] == "Kake"
    assert retired.json()["active"] is False
    _problem(stocked, 409, "stock_unlimited")
    till = _client(make_client, ["rewards:redeem"])
    _problem(till.post("/api/v1/rewards", {**body, "code": "other"}, format="json"), 403, "permission_denied")
    assert Reward.objects.count() == 1


@pytest.mark.parametrize(
    "body, field",
    [
        ({"code": "x", "kind": "product", "points_cost": 0, "name_en": "X"}, "points_cost"),
        ({"code": "x", "kind": "discount", "points_cost": 10, "name_en": "X"}, "discount_amount"),
        ({"code": "x", "kind": "product", "points_cost": 10, "name_en": "X", "stok": 3}, "stok"),
        ({"code": "x", "kind": "product", "points_cost": 10}, "name_en"),
        (
            {"code": "x", "kind": "product", "points_cost": 10, "name_en": "X", "available_from": "2025-01-01T00:00"},
            "available_from",
        ),
    ],
)
def test_a_bad_reward_is_refused_with_the_field_named(api, body, field):
    problem = _problem(api.post("/api/v1/rewards", body, format="json"), 400, problem_code(body))
    assert field in problem["errors"]
    assert not Reward.objects.exists()


def problem_code(body):
    return "invalid" if body.get("kind") == "discount" else "validation_error"


def test_changing_stock_through_a_patch_is_refused(api, coffee):
    _problem(api.patch("/api/v1/rewards/coffee", {"stock": 99}, format="json"), 400, "validation_error")
    coffee.refresh_from_db()
    assert coffee.stock == 5


def test_redeeming_over_http_issues_a_voucher_consumed_once_at_the_till(api, rich, coffee):
    # when
    redeemed = api.post("/api/v1/redemptions", {"member": rich.member_number, "reward": "coffee"}, format="json")
    code = redeemed.json()["voucher"]["code"]
    looked_up = api.get(f"/api/v1/vouchers/{code.lower()}")
    consume = {"store": "S1", "transaction_external_id": "t1"}
    first = api.post(f"/api/v1/vouchers/{code}/consume", consume, format="json")
    repeat = api.post(f"/api/v1/vouchers/{code}/consume", consume, format="json")
    other = api.post(f"/api/v1/vouchers/{code}/consume", {**consume, "transaction_external_id": "t2"}, format="json")
    after = api.get(f"/api/v1/vouchers/{code}")

    # then
    assert redeemed.status_code == 201, redeemed.content
    assert redeemed.json()["balance"]["available"] == 900
    assert looked_up.json()["usable"] is True and looked_up.json()["reward"]["name"] == "Coffee"
    assert first.status_code == repeat.status_code == 200
    assert first.json() == repeat.json()
    _problem(other, 409, "voucher_used")
    assert after.json()["usable"] is False and after.json()["refusal"]["code"] == "voucher_used"


def test_cancelling_a_redemption_over_http_refunds_it(api, rich, coffee):
    # given
    redeemed = api.post("/api/v1/redemptions", {"member": rich.member_number, "reward": "coffee"}, format="json")

    # when
    cancelled = api.post(f"/api/v1/redemptions/{redeemed.json()['id']}/cancel")

    # then
    assert cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["balance"]["available"] == 1000
    _problem(
        api.post(
            f"/api/v1/vouchers/{redeemed.json()['voucher']['code']}/consume",
            {"store": "S1", "transaction_external_id": "t1"},
            format="json",
        ),
        409,
        "voucher_cancelled",
    )


@pytest.mark.parametrize(
    "body, status, code",
    [
        ({"member": "nobody", "reward": "coffee"}, 422, "unknown_member"),
        ({"reward": "coffee"}, 400, "validation_error"),
        ({"member": "M", "reward": "tea"}, 422, "unknown_reward"),
        ("not json", 400, "validation_error"),
    ],
)
def test_a_bad_redemption_is_refused_and_changes_nothing(api, rich, coffee, body, status, code):
    if isinstance(body, dict) and body.get("member") == "M":
        body["member"] = rich.member_number
    _problem(api.post("/api/v1/redemptions", body, format="json"), status, code)
    assert not Redemption.objects.exists()
    assert Account.objects.get(pk=rich.pk).available == 1000


def test_redeeming_too_much_is_409_insufficient_points(api, member, coffee):
    _problem(
        api.post("/api/v1/redemptions", {"member": member.member_number, "reward": "coffee"}, format="json"),
        409,
        "insufficient_points",
    )
    coffee.refresh_from_db()
    assert coffee.stock == 5
    assert not Entry.objects.filter(kind="redeem").exists()


def test_a_redemption_repeated_with_its_idempotency_key_happens_once(api, rich, coffee):
    body = {"member": rich.member_number, "reward": "coffee"}
    first = api.post("/api/v1/redemptions", body, format="json", HTTP_IDEMPOTENCY_KEY="k1")
    again = api.post("/api/v1/redemptions", body, format="json", HTTP_IDEMPOTENCY_KEY="k1")
    assert first.status_code == again.status_code == 201
    assert first.json() == again.json()
    assert Redemption.objects.count() == 1


@pytest.mark.parametrize(
    "path, status, code",
    [
        ("/api/v1/vouchers/ABCD", 400, "invalid_voucher_code"),
        ("/api/v1/vouchers/0000-0000-0000-0000", 404, "voucher_not_found"),
        ("/api/v1/redemptions/99999999999999999999999", 404, "redemption_not_found"),
        ("/api/v1/points/holds/99999999999999999999999", 404, "hold_not_found"),
        ("/api/v1/rewards/nothing", 404, "reward_not_found"),
    ],
)
def test_unknown_things_are_clear_problems(api, path, status, code):
    _problem(api.get(path), status, code)


def test_paying_with_points_over_http(api, rich):
    # when
    placed = api.post(
        "/api/v1/points/holds", {"member": rich.member_number, "points": 300, "store": "S1"}, format="json"
    )
    hold_id = placed.json()["hold_id"]
    balance = api.get(f"/api/v1/members/{rich.member_number}/balance")
    captured = api.post(f"/api/v1/points/holds/{hold_id}/capture", {"external_id": "t1"}, format="json")
    released = api.post(f"/api/v1/points/holds/{hold_id}/release")

    # then
    assert placed.status_code == 201, placed.content
    assert placed.json()["balance"] == {"available": 700, "held": 300, "pending": 0}
    assert balance.json()["available"] == 700
    assert captured.json()["status"] == "captured"
    assert captured.json()["value"] == {"amount": "3.00", "currency": "SEK"}
    _problem(released, 409, "hold_captured")


@pytest.mark.parametrize(
    "body, status, code",
    [
        ({"member": "M", "points": 0, "store": "S1"}, 400, "validation_error"),
        ({"member": "M", "points": 1001, "store": "S1"}, 409, "insufficient_points"),
        ({"member": "M", "points": 10}, 400, "validation_error"),
        ({"member": "nobody", "points": 10, "store": "S1"}, 422, "unknown_member"),
    ],
)
def test_a_bad_hold_is_refused_over_http_and_changes_nothing(api, rich, body, status, code):
    body = {**body, "member": rich.member_number if body["member"] == "M" else body["member"]}
    _problem(api.post("/api/v1/points/holds", body, format="json"), status, code)
    assert not Hold.objects.exists()
    assert Account.objects.values_list("available", "held").get(pk=rich.pk) == (1000, 0)


def test_scopes_guard_tills(make_client, rich, coffee):
    reader = _client(make_client, ["members:read"])
    _problem(
        reader.post("/api/v1/redemptions", {"member": rich.member_number, "reward": "coffee"}, format="json"),
        403,
        "permission_denied",
    )
    _problem(
        reader.post("/api/v1/points/holds", {"member": rich.member_number, "points": 1, "store": "S"}, format="json"),
        403,
        "permission_denied",
    )
    assert not Voucher.objects.exists() and not Hold.objects.exists()
