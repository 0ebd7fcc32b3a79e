"""Custom events: points per event, idempotency on external_id, per-member limits that hold under concurrency."""

import threading
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from dateutil.relativedelta import relativedelta
from django.db import connection
from django.utils import timezone

from core.errors import Unprocessable
from loyalty.event_models import EventType, MemberEvent
from loyalty.event_services import event_type_create
from loyalty.events import EventMismatch, event_record
from loyalty.models import Account, Entry, Lot
from loyalty.verify import ledger_verify
from tests.factories import MemberFactory

STOCKHOLM = ZoneInfo("Europe/Stockholm")
AT = datetime(2025, 11, 19, 14, 30, tzinfo=STOCKHOLM)


def event_type(program, code="review", **fields):
    fields.setdefault("points", 50)
    return event_type_create(program=program, code=code, name=code.title(), **fields)


def record(program, member, external_id="e-1", code="review", at=AT, attributes=None):
    return event_record(
        program=program,
        member=member,
        event_code=code,
        external_id=external_id,
        occurred_at=at,
        attributes=attributes if attributes is not None else {"sku": "MILK"},
    )


def account(member) -> Account:
    return Account.objects.get(pk=member.pk)


def body(member, external_id="e-1", event="review", at=AT, **extra):
    return {"member": member.member_number, "event": event, "external_id": external_id, "occurred_at": at.isoformat()}


def test_an_event_gives_its_points_as_a_bonus_that_counts_as_earned_and_expires_like_a_purchase(program, member):
    # given
    event_type(program, points=50)
    # when
    result = record(program, member)
    # then
    assert result.created and result.points == 50
    assert (account(member).available, account(member).lifetime_earned) == (50, 50)
    entry = Entry.objects.get(account_id=member.pk)
    assert (entry.kind, entry.points, entry.occurred_at) == ("bonus", 50, AT)
    assert Lot.objects.get(entry=entry).expires_at == AT + relativedelta(months=program.expiry_months)
    assert MemberEvent.objects.get().entry == entry
    assert ledger_verify() == []


def test_the_same_event_sent_again_returns_the_first_result_and_gives_nothing_more(program, member):
    # given
    event_type(program)
    first = record(program, member)
    # when
    again = record(program, member)
    # then
    assert not again.created
    assert (again.event.pk, again.points, again.balance) == (first.event.pk, 50, first.balance)
    assert account(member).available == 50
    assert MemberEvent.objects.count() == 1


def test_another_event_under_a_used_external_id_is_a_conflict_and_changes_nothing(program, member):
    # given
    event_type(program)
    record(program, member)
    # when
    with pytest.raises(EventMismatch):
        record(program, member, attributes={"sku": "BREAD"})
    with pytest.raises(EventMismatch):
        record(program, MemberFactory(program=program))
    # then
    assert account(member).available == 50
    assert MemberEvent.objects.count() == 1


def test_an_unknown_or_retired_event_type_is_refused_and_nothing_is_recorded(program, member):
    # given
    event_type(program, code="survey", active=False)
    # when / then
    with pytest.raises(Unprocessable) as unknown:
        record(program, member, code="nope")
    with pytest.raises(Unprocessable) as retired:
        record(program, member, code="survey")
    assert (unknown.value.code, retired.value.code) == ("unknown_event_type", "event_type_inactive")
    assert not MemberEvent.objects.exists()
    assert not Entry.objects.exists()


def test_over_the_limit_an_event_is_recorded_without_points_until_the_next_period(program, member):
    # given: twice a day at most
    event_type(program, limit_count=2, limit_period="day")
    # when
    results = [record(program, member, external_id=f"e-{n}", at=AT + timedelta(minutes=n)) for n in range(3)]
    next_day = record(program, member, external_id="e-next", at=AT + timedelta(days=1))
    # then
    assert [r.points for r in results] == [50, 50, 0]
    assert results[2].event.outcome == MemberEvent.Outcome.LIMIT_REACHED
    assert results[2].event.entry is None
    assert next_day.points == 50
    assert account(member).available == 150
    assert ledger_verify() == []


def test_a_monthly_limit_counts_the_month_in_the_programme_time_zone(program, member):
    # given: once a month; 23:30 UTC on 31 October is already 1 November in Stockholm
    event_type(program, limit_count=1, limit_period="month")
    october_utc = datetime(2025, 10, 31, 23, 30, tzinfo=ZoneInfo("UTC"))
    # when
    first = record(program, member, external_id="a", at=october_utc)
    second = record(program, member, external_id="b", at=datetime(2025, 11, 20, 12, 0, tzinfo=STOCKHOLM))
    earlier = record(program, member, external_id="c", at=datetime(2025, 10, 31, 12, 0, tzinfo=STOCKHOLM))
    # then
    assert (first.points, second.points, earlier.points) == (50, 0, 50)


@pytest.mark.django_db(transaction=True)
def test_a_limit_holds_under_concurrent_events_of_one_member(program):
    # given: three times ever, and twelve events sent at once
    event_type(program, limit_count=3, limit_period="ever")
    member = MemberFactory(program=program)
    barrier = threading.Barrier(12)
    errors = []

    def send(n):
        try:
            barrier.wait()
            record(program, member, external_id=f"c-{n}")
        except Exception as exc:  # collected, asserted below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=send, args=(n,)) for n in range(12)]
    # when
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # then
    assert errors == []
    assert MemberEvent.objects.filter(outcome="awarded").count() == 3
    assert MemberEvent.objects.filter(outcome="limit_reached").count() == 9
    assert account(member).available == 150
    assert ledger_verify() == []


@pytest.mark.django_db(transaction=True)
def test_the_same_event_sent_concurrently_is_recorded_once(program):
    # given
    event_type(program)
    member = MemberFactory(program=program)
    barrier = threading.Barrier(8)
    results, errors = [], []

    def send():
        try:
            barrier.wait()
            results.append(record(program, member, external_id="same"))
        except Exception as exc:  # collected, asserted below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=send) for _ in range(8)]
    # when
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # then
    assert errors == []
    assert sorted(r.created for r in results) == [False] * 7 + [True]
    assert account(member).available == 50
    assert ledger_verify() == []


def test_post_events_answers_201_then_200_with_the_same_body(api, program, member):
    # given
    event_type(program, points=25)
    # when
    first = api.post("/api/v1/events", {**body(member), "attributes": {"stars": 5}}, format="json")
    again = api.post("/api/v1/events", {**body(member), "attributes": {"stars": 5}}, format="json")
    # then
    assert first.status_code == 201, first.content
    assert first.json()["points"] == 25
    assert first.json()["balance"] == {"available": 25, "held": 0, "pending": 0}
    assert first.json()["reason"] is None
    assert again.status_code == 200
    assert again.json() == first.json()


def test_post_events_over_the_limit_says_why_no_points_were_given(api, program, member):
    # given
    event_type(program, limit_count=1)
    api.post("/api/v1/events", body(member, external_id="a"), format="json")
    # when
    response = api.post("/api/v1/events", body(member, external_id="b"), format="json")
    # then
    assert response.status_code == 201
    assert (response.json()["points"], response.json()["outcome"]) == (0, "limit_reached")
    assert "limit" in response.json()["reason"]


@pytest.mark.parametrize(
    ("change", "status", "field"),
    [
        ({"external_id": None}, 400, "external_id"),
        ({"occurred_at": "2025-11-19T14:30:00"}, 400, "occurred_at"),
        ({"attributes": ["not", "an", "object"]}, 400, "attributes"),
        ({"attributes": {"blob": "x" * 5000}}, 400, "attributes"),
        ({"event": "no-such-event"}, 422, "event"),
        ({"member": "0000000000"}, 422, "member"),
        ({"occurred_at": (timezone.now() + timedelta(days=1)).isoformat()}, 422, "occurred_at"),
    ],
)
def test_bad_event_input_is_a_problem_and_changes_nothing(api, program, member, change, status, field):
    # given
    event_type(program)
    payload = {k: v for k, v in {**body(member), **change}.items() if v is not None}
    # when
    response = api.post("/api/v1/events", payload, format="json")
    # then
    assert response.status_code == status, response.content
    assert response["Content-Type"] == "application/problem+json"
    assert field in response.json()["errors"]
    assert not MemberEvent.objects.exists()
    assert not Account.objects.filter(available__gt=0).exists()


def test_post_events_needs_the_points_write_scope(make_client, program, member):
    # given
    from tests.clients import APIClient

    event_type(program)
    _, raw = make_client(scopes=["members:read"])
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Api-Key {raw}")
    # when
    response = client.post("/api/v1/events", body(member), format="json")
    # then
    assert response.status_code == 403
    assert not MemberEvent.objects.exists()


def test_event_types_are_managed_over_the_api(api, program, member):
    # when
    created = api.post(
        "/api/v1/event-types",
        {"code": "profile", "name": "Profile completed", "points": 100, "limit_count": 1, "limit_period": "ever"},
        format="json",
    )
    duplicate = api.post("/api/v1/event-types", {"code": "profile", "name": "Again", "points": 5}, format="json")
    patched = api.patch("/api/v1/event-types/profile", {"points": 150, "qualifying": True}, format="json")
    listed = api.get("/api/v1/event-types")
    retired = api.delete("/api/v1/event-types/profile")
    refused = api.post("/api/v1/events", body(member, event="profile"), format="json")
    missing = api.get("/api/v1/event-types/nope")
    # then
    assert created.status_code == 201, created.content
    assert duplicate.status_code == 409 and duplicate.json()["code"] == "event_type_exists"
    assert created.json()["qualifying"] is False
    assert (patched.json()["points"], patched.json()["qualifying"]) == (150, True)
    assert [t["code"] for t in listed.json()["results"]] == ["profile"]
    assert retired.status_code == 200 and retired.json()["active"] is False
    assert refused.status_code == 422 and refused.json()["code"] == "event_type_inactive"
    assert missing.status_code == 404
    assert (EventType.objects.get().points, EventType.objects.get().qualifying) == (150, True)


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"code": "x", "name": "X", "points": 0}, "points"),
        ({"code": "x", "name": "X", "points": 10, "limit_count": 0}, "limit_count"),
        ({"code": "x", "name": "X", "points": 10, "limit_period": "fortnight"}, "limit_period"),
        ({"code": "not a slug", "name": "X", "points": 10}, "code"),
        ({"name": "X", "points": 10}, "code"),
        ({"code": "x", "name": "X", "points": 10, "limit": 1}, "limit"),
    ],
)
def test_a_bad_event_type_is_refused_with_a_clear_error(api, program, payload, field):
    # when
    response = api.post("/api/v1/event-types", payload, format="json")
    # then
    assert response.status_code == 400, response.content
    assert field in response.json()["errors"]
    assert not EventType.objects.exists()


def test_an_event_types_code_never_changes(api, program):
    # given
    api.post("/api/v1/event-types", {"code": "profile", "name": "Profile", "points": 10}, format="json")
    # when
    response = api.patch("/api/v1/event-types/profile", {"code": "survey"}, format="json")
    # then
    assert response.status_code == 400
    assert "code" in response.json()["errors"]
    assert list(EventType.objects.values_list("code", flat=True)) == ["profile"]


def test_a_change_to_an_event_type_never_rewrites_points_already_given(program, member):
    # given
    kind = event_type(program, points=50)
    record(program, member, external_id="before")
    # when
    from loyalty.event_services import event_type_update

    event_type_update(event_type=kind, points=10)
    record(program, member, external_id="after")
    # then
    assert list(MemberEvent.objects.order_by("pk").values_list("points", flat=True)) == [50, 10]
    assert account(member).available == 60
