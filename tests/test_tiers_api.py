"""Tiers over the API: the programme lists them, `program:manage` manages them, the balance shows progress."""

import json
from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from core.models import Program
from loyalty.tier_models import Tier, TierChange
from loyalty.tier_setup import tier_create
from loyalty.transactions import TransactionInput, transaction_record
from tests.clients import APIClient

GOLD = {"code": "gold", "name": {"en": "Gold", "sv": "Guld"}, "rank": 2, "threshold": 5000, "earn_multiplier": "1.5"}


def post(api, url, body):
    return api.post(url, json.dumps(body), content_type="application/json")


def patch(api, url, body):
    return api.patch(url, json.dumps(body), content_type="application/json")


@pytest.fixture
def silver(program):
    return tier_create(
        program=program, code="silver", name_en="Silver", name_sv="Silver", rank=1, threshold=Decimal(1000)
    )


@pytest.fixture
def reader(make_client):
    _, raw = make_client(scopes=["members:read", "transactions:write"])
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Api-Key {raw}")
    return client


def test_the_programme_lists_its_active_tiers_and_how_they_qualify(api, silver):
    # when
    body = api.get("/api/v1/program").json()
    # then
    assert body["tiers"] == [
        {
            "code": "silver",
            "name": "Silver",
            "names": {"en": "Silver", "sv": "Silver", "nb": "Silver"},
            "rank": 1,
            "threshold": 1000,
            "measure": "points",
            "benefits": {"earn_multiplier": "1", "perks": {"en": "", "sv": "", "nb": ""}},
        }
    ]
    assert body["tier_qualification"]["window"] == "rolling"


def test_a_tier_is_created_with_the_manage_scope(api, silver, program):
    # when
    response = post(api, "/api/v1/tiers", GOLD)
    # then
    assert response.status_code == 201
    body = response.json()
    assert (body["code"], body["names"]["sv"], body["names"]["nb"], body["benefits"]["earn_multiplier"]) == (
        "gold",
        "Guld",
        "Gold",
        "1.5",
    )
    program.refresh_from_db()
    assert program.has_tiers
    assert [t["code"] for t in api.get("/api/v1/tiers").json()["results"]] == ["silver", "gold"]


@pytest.mark.parametrize(
    "body, status, code, field",
    [
        ({**GOLD, "code": "silver"}, 409, "tier_code_taken", None),
        ({**GOLD, "rank": 1}, 409, "tier_rank_taken", "rank"),
        ({**GOLD, "threshold": 800}, 400, "tier_thresholds_not_increasing", "threshold"),
        ({**GOLD, "earn_multiplier": "0.5"}, 400, "validation_error", "earn_multiplier"),
        ({**GOLD, "threshold": -1}, 400, "validation_error", "threshold"),
        ({**GOLD, "name": {"sv": "Guld"}}, 400, "validation_error", "name"),
        ({**GOLD, "colour": "gold"}, 400, "validation_error", "colour"),
        ({**GOLD, "threshold": "5000.50"}, 400, "invalid", "threshold"),
    ],
)
def test_bad_tiers_are_refused_with_a_clear_problem_and_nothing_written(api, silver, body, status, code, field):
    # when
    response = post(api, "/api/v1/tiers", body)
    # then
    assert response.status_code == status
    assert response["Content-Type"] == "application/problem+json"
    problem = response.json()
    assert problem["code"] == code
    if field:
        assert field in problem["errors"]
    assert list(Tier.objects.values_list("code", flat=True)) == ["silver"]


def test_managing_tiers_and_the_programme_needs_the_manage_scope(reader, silver):
    # when / then
    assert post(reader, "/api/v1/tiers", GOLD).status_code == 403
    assert reader.get("/api/v1/tiers").status_code == 403
    assert patch(reader, "/api/v1/tiers/silver", {"threshold": 2000}).status_code == 403
    assert reader.delete("/api/v1/tiers/silver").status_code == 403
    assert patch(reader, "/api/v1/program", {"tier_qualification": {"grace_days": 3}}).status_code == 403
    assert Tier.objects.get().threshold == 1000


def test_a_tier_is_changed_and_retired_but_never_deleted(api, silver, member, program):
    # given
    post(api, "/api/v1/tiers", GOLD)
    program.refresh_from_db()
    transaction_record(
        program=program,
        data=TransactionInput(
            store="S1",
            external_id="p1",
            channel="pos",
            kind="purchase",
            occurred_at=timezone.now(),
            currency="SEK",
            total=Decimal(1200),
            member=member,
        ),
    )
    assert TierChange.objects.get().to_tier_id == silver.pk
    # when
    changed = patch(api, "/api/v1/tiers/silver", {"threshold": 1500, "perks": {"en": "Free coffee"}})
    bad = patch(api, "/api/v1/tiers/silver", {"code": "bronze"})
    retired = api.delete("/api/v1/tiers/silver")
    # then
    assert changed.status_code == 200
    assert (changed.json()["threshold"], changed.json()["benefits"]["perks"]["en"]) == (1500, "Free coffee")
    assert bad.status_code == 400 and "code" in bad.json()["errors"]
    assert retired.status_code == 200 and retired.json()["retired_at"]
    assert api.delete("/api/v1/tiers/silver").status_code == 200  # retiring again is harmless
    assert patch(api, "/api/v1/tiers/silver", {"threshold": 1600}).json()["code"] == "tier_retired"
    assert [t["code"] for t in api.get("/api/v1/program").json()["tiers"]] == ["gold"]
    assert TierChange.objects.get().to_tier_id == silver.pk  # history kept
    assert api.get("/api/v1/tiers/nope").json()["code"] == "tier_not_found"


def test_the_programme_settings_are_patched_and_bad_ones_refused(api, program):
    # when
    ok = patch(
        api,
        "/api/v1/program",
        {"tier_qualification": {"measure": "spend", "window": "calendar_year", "grace_days": 30}},
    )
    bad = [
        patch(api, "/api/v1/program", {"tier_qualification": {"window_months": 0}}),
        patch(api, "/api/v1/program", {"tier_qualification": {"window": "fortnight"}}),
        patch(api, "/api/v1/program", {"currency": "EUR"}),
        patch(api, "/api/v1/program", {}),
    ]
    # then
    assert ok.status_code == 200
    assert ok.json()["tier_qualification"]["measure"] == "spend"
    assert [r.status_code for r in bad] == [400, 400, 400, 400]
    program.refresh_from_db()
    assert (program.tier_measure, program.tier_window, program.tier_grace_days, program.currency) == (
        Program.TierMeasure.SPEND,
        Program.TierWindow.CALENDAR_YEAR,
        30,
        "SEK",
    )


def test_the_balance_shows_the_tier_and_what_the_next_one_still_needs(reader, api, silver, member, program):
    # given
    post(api, "/api/v1/tiers", GOLD)
    before = reader.get(f"/api/v1/members/{member.member_number}/balance").json()
    post(
        reader,
        "/api/v1/transactions",
        {
            "external_id": "R1",
            "store": "S1",
            "channel": "pos",
            "member": member.member_number,
            "type": "purchase",
            "occurred_at": (timezone.now() - timedelta(minutes=1)).isoformat(),
            "currency": "SEK",
            "total": "1200.00",
        },
    )
    # when
    body = reader.get(f"/api/v1/members/{member.member_number}/balance").json()
    # then
    assert before["tier"] is None
    assert before["next_tier"]["code"] == "silver" and before["next_tier"]["needed"] == 1000
    assert body["tier"]["code"] == "silver" and body["tier"]["review_at"]
    assert body["next_tier"] == {"code": "gold", "name": "Gold", "measure": "points", "current": 1200, "needed": 3800}
