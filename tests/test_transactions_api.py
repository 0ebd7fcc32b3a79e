"""The transaction API as a till sees it: each purchase earns once, and bad input changes nothing."""

import json
from datetime import timedelta
from zoneinfo import ZoneInfo

import hypothesis
import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from hypothesis import strategies as st
from rest_framework import serializers

from core import auth
from core.models import IdempotencyRecord
from core.validation import validate
from loyalty.api import TransactionInputSerializer, _plain_purchase
from loyalty.models import Account, Entry, Lot, Transaction
from loyalty.points import points_adjust
from loyalty.verify import ledger_verify

URL = "/api/v1/transactions"


def purchase(who, **overrides):
    body = {
        "external_id": "R-1001",
        "store": "STHLM-01",
        "channel": "pos",
        "member": who.member_number if who else None,
        "type": "purchase",
        "occurred_at": timezone.now().isoformat(),
        "currency": "SEK",
        "total": "129.90",
        "lines": [
            {"sku": "MILK", "category": "dairy", "quantity": "2", "unit_price": "14.95", "amount": "29.90"},
            {"sku": "COFFEE", "category": "pantry", "quantity": "1", "unit_price": "100.00", "amount": "100.00"},
        ],
    }
    body.update(overrides)
    return body


def post(api, url, body, **headers):
    return api.post(url, json.dumps(body), content_type="application/json", **headers)


def ledger_snapshot():
    return (
        Transaction.objects.count(),
        Entry.objects.count(),
        Lot.objects.count(),
        list(Account.objects.order_by("pk").values_list("available", "pending", "lifetime_earned")),
    )


def test_a_purchase_earns_one_point_per_whole_krona(api, member):
    # when
    response = post(api, URL, purchase(member))
    # then
    assert response.status_code == 201
    body = response.json()
    assert body["points"] == {
        "earned": 129,
        "pending": 0,
        "available_at": None,
        "breakdown": [{"rule": "base", "points": 129}],
    }
    assert body["balance"] == {"available": 129, "held": 0, "pending": 0}
    assert ledger_verify() == []


@pytest.mark.parametrize("tiers", [False, True], ids=["one statement", "in steps"])
def test_points_held_for_a_till_are_not_answered_as_available(api, member, program, tiers):
    # given: 500 points, 200 of them held to pay at a till; with tiers the purchase takes the step-by-step path
    if tiers:
        from loyalty.tier_setup import tier_create

        tier_create(program=program, code="member", name_en="Member", rank=0, threshold=0)
    points_adjust(member=member, points=500, reason="seed")
    hold = post(api, "/api/v1/points/holds", {"member": member.member_number, "points": 200, "store": "S1"})
    assert hold.status_code == 201
    # when: the purchase the hold pays for, earning 129, and the same purchase again
    first = post(api, URL, purchase(member))
    again = post(api, URL, purchase(member))
    adjusted = post(api, f"/api/v1/members/{member.member_number}/adjustments", {"points": 10, "reason": "goodwill"})
    # then: every answer counts the held points out of what is available, as the balance endpoint does
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json()["balance"] == again.json()["balance"] == {"available": 429, "held": 200, "pending": 0}
    assert adjusted.json()["balance"] == {"available": 439, "held": 200, "pending": 0}
    balance = api.get(f"/api/v1/members/{member.member_number}/balance").json()
    assert (balance["available"], balance["held"]) == (439, 200)
    assert list(Entry.objects.order_by("pk").values_list("available_after", "held_after")) == [
        (500, 0),
        (629, 200),
        (639, 200),
    ]


def test_the_same_purchase_sent_again_returns_the_first_result_and_awards_nothing(api, member):
    # given
    first = post(api, URL, purchase(member))
    # when
    again = post(api, URL, purchase(member))
    # then
    assert again.status_code == 200
    assert again.json() == first.json()
    assert Entry.objects.count() == 1
    assert Account.objects.get(pk=member.pk).available == 129


@pytest.mark.parametrize("change", ["member suspended", "maximum age shortened"])
def test_a_purchase_sent_again_after_its_checks_would_now_refuse_it_returns_the_first_result(
    api, member, program, change
):
    # given: a 40-day-old purchase recorded, then its member suspended or the programme's maximum age cut to 30 days
    body = purchase(member, occurred_at=(timezone.now() - timedelta(days=40)).isoformat())
    first = post(api, URL, body)
    if change == "member suspended":
        member.status = "suspended"
        member.save()
    else:
        program.max_transaction_age_days = 30
        program.save()
        auth._clients.clear()  # as after the few seconds API clients and their programme are remembered
    before = ledger_snapshot()
    # when: the till, never having seen the first answer, sends it again
    again = post(api, URL, body)
    # then
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json() == first.json()
    assert ledger_snapshot() == before


def test_another_purchase_under_a_used_external_id_is_a_conflict(api, member):
    # given
    post(api, URL, purchase(member))
    before = ledger_snapshot()
    # when
    response = post(api, URL, purchase(member, total="500.00", lines=[]))
    # then
    assert response.status_code == 409
    assert response.json()["code"] == "transaction_mismatch"
    assert ledger_snapshot() == before


def test_the_same_external_id_in_another_store_is_another_purchase(api, member):
    # given
    post(api, URL, purchase(member))
    # when
    response = post(api, URL, purchase(member, store="GBG-02"))
    # then
    assert response.status_code == 201
    assert Account.objects.get(pk=member.pk).available == 258


def test_an_anonymous_purchase_is_recorded_and_earns_nothing(api):
    # when
    response = post(api, URL, purchase(None))
    # then
    assert response.status_code == 201
    assert response.json()["points"]["earned"] == 0
    assert response.json()["balance"] is None
    assert Transaction.objects.get().member is None
    assert not Entry.objects.exists()


def test_a_member_found_by_email_earns(api, member):
    # when
    response = post(api, URL, purchase(None, member_lookup={"email": member.email.upper()}))
    # then
    assert response.status_code == 201
    assert response.json()["member"] == member.member_number


def test_pending_points_become_available_later(api, member, program):
    # given
    program.pending_days = 14
    program.save()
    # when
    response = post(api, URL, purchase(member))
    # then
    points = response.json()["points"]
    assert points["pending"] == 129
    assert points["available_at"] is not None
    assert response.json()["balance"] == {"available": 0, "held": 0, "pending": 129}


def test_a_purchase_sent_late_expires_counted_from_its_own_date(api, member):
    # given: a till that was offline sends a purchase made on a leap day
    occurred = "2024-02-29T18:30:00+01:00"
    # when
    post(api, URL, purchase(member, occurred_at=occurred))
    # then: 24 months later, clamped to the end of February
    assert Lot.objects.get().expires_at.isoformat() == "2026-02-28T17:30:00+00:00"


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"external_id": None}, "external_id"),
        ({"store": ""}, "store"),
        ({"total": "-1.00"}, "total"),
        ({"total": "abc"}, "total"),
        ({"total": "12.345"}, "total"),
        ({"total": "NaN"}, "total"),
        ({"currency": "XYZ"}, "currency"),
        ({"channel": "fax"}, "channel"),
        ({"type": "gift"}, "type"),
        ({"occurred_at": "yesterday"}, "occurred_at"),
        ({"occurred_at": "2026-01-01T10:00:00"}, "occurred_at"),
        ({"lines": [{"sku": "A", "quantity": "1", "unit_price": "1", "amount": "-1"}]}, "lines[0].amount"),
        ({"type": "return"}, "original_external_id"),
    ],
)
def test_bad_input_is_a_validation_problem_and_writes_nothing(api, member, overrides, field):
    # given
    before = ledger_snapshot()
    # when
    response = post(api, URL, purchase(member, **overrides))
    # then
    assert response.status_code == 400
    assert response["Content-Type"] == "application/problem+json"
    assert response.json()["code"] == "validation_error"
    assert field in response.json()["errors"]
    assert ledger_snapshot() == before


@pytest.mark.parametrize(
    ("overrides", "code"),
    [
        ({"total": "100.00"}, "lines_do_not_add_up"),
        ({"currency": "NOK"}, "currency_mismatch"),
        ({"member": "1234567890"}, "unknown_member"),
        ({"occurred_at": (timezone.now() + timedelta(days=1)).isoformat()}, "occurred_in_future"),
        ({"type": "return", "original_external_id": "NO-SUCH"}, "original_not_found"),
    ],
)
def test_input_the_programme_cannot_accept_is_refused_and_writes_nothing(api, member, overrides, code):
    # given
    before = ledger_snapshot()
    # when
    response = post(api, URL, purchase(member, **overrides))
    # then
    assert response.status_code == 422
    assert response.json()["code"] == code
    assert ledger_snapshot() == before


def test_a_return_finds_its_purchase_without_reading_the_programmes_other_transactions(api, member):
    # given: the member's purchase among 6,000 of the programme's, and a return that does not name its store
    now = timezone.now()
    Transaction.objects.bulk_create(
        Transaction(
            program=member.program,
            store=f"S{i % 30}",
            external_id=f"X-{i:05d}",
            channel="pos",
            kind=Transaction.Kind.PURCHASE,
            occurred_at=now,
            currency="SEK",
            total=10,
            lines=[],
            points=0,
            breakdown=[],
            created_at=now,
        )
        for i in range(6000)
    )
    assert post(api, URL, purchase(member)).status_code == 201
    body = purchase(member, external_id="RET-1", type="return", original_external_id="R-1001", total="29.90", lines=[])
    # when
    with CaptureQueriesContext(connection) as queries:
        response = post(api, URL, body)
    # then: the return is recorded, and its lookup of the purchase read a few pages (6 here: the index's root and
    # leaf, the purchase's row versions), not the programme's range of the index (41 pages with store second)
    assert response.status_code == 201
    lookup = [q["sql"] for q in queries if "LIMIT 50" in q["sql"] and '"external_id" =' in q["sql"]]
    assert len(lookup) == 1
    with connection.cursor() as cursor:
        cursor.execute(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {lookup[0]}")
        plan = cursor.fetchone()[0][0]["Plan"]
    assert plan["Shared Hit Blocks"] + plan["Shared Read Blocks"] <= 10, plan


def test_a_return_of_more_than_was_bought_is_refused_and_changes_nothing(api, member):
    # given
    post(api, URL, purchase(member))
    before = ledger_snapshot()
    # when
    response = post(
        api,
        URL,
        purchase(member, external_id="RET-1", type="return", original_external_id="R-1001", total="200.00", lines=[]),
    )
    # then
    assert response.status_code == 422
    assert response.json()["code"] == "return_exceeds_purchase"
    assert ledger_snapshot() == before


def test_a_return_of_spent_points_answers_the_debt_as_the_balance_endpoint_does(api, member):
    # given: 129 points earned, 100 of them spent (the programme lets a return make the balance negative)
    assert post(api, URL, purchase(member)).status_code == 201
    points_adjust(member=member, points=-100, reason="spent")
    # when: the whole purchase comes back
    returned = post(
        api, URL, purchase(member, external_id="RET-1", type="return", original_external_id="R-1001", lines=[])
    )
    # then
    assert returned.status_code == 201
    assert returned.json()["balance"] == {"available": -100, "held": 0, "pending": 0}
    assert api.get(f"/api/v1/members/{member.member_number}/balance").json()["available"] == -100


def test_a_full_return_reverses_exactly_what_was_earned(api, member):
    # given
    post(api, URL, purchase(member))
    # when
    response = post(
        api,
        URL,
        purchase(member, external_id="RET-1", type="return", original_external_id="R-1001", lines=[]),
    )
    # then
    assert response.status_code == 201
    assert response.json()["points"]["reversed"] == 129
    assert Account.objects.get(pk=member.pk).available == 0
    assert ledger_verify() == []


def test_malformed_json_is_a_problem_and_writes_nothing(api, member):
    # when
    response = api.post(URL, "{not json", content_type="application/json")
    # then
    assert response.status_code == 400
    assert response.json()["code"] == "malformed_request"
    assert not Transaction.objects.exists()


def test_a_suspended_member_cannot_earn(api, member):
    # given
    member.status = "suspended"
    member.save()
    # when
    response = post(api, URL, purchase(member))
    # then
    assert response.status_code == 409
    assert response.json()["code"] == "member_not_active"
    assert not Transaction.objects.exists()


# A plain purchase by a member with an account is written in one statement that finds the member too
# (transaction_record_by_number). Whatever that statement may not write, the general way records or refuses.


def _with_account(member):
    points_adjust(member=member, points=10, reason="seed")


def test_a_suspended_member_with_an_account_cannot_earn_either(api, member):
    # given
    _with_account(member)
    member.status = "suspended"
    member.save()
    before = ledger_snapshot()
    # when
    response = post(api, URL, purchase(member))
    # then
    assert (response.status_code, response.json()["code"]) == (409, "member_not_active")
    assert ledger_snapshot() == before


def test_a_member_of_another_programme_is_unknown_here_and_an_unknown_member_is_named_before_a_wrong_currency(
    api, member
):
    # given: a member with an account, in another programme
    from core.models import Program
    from tests.factories import MemberFactory

    elsewhere = MemberFactory(program=Program.objects.create(code="OTHER", name="Other", currency="SEK"))
    _with_account(elsewhere)
    before = ledger_snapshot()
    # when
    other = post(api, URL, purchase(elsewhere))
    both_wrong = post(api, URL, purchase(member, member="0000000000", currency="EUR"))
    # then
    assert (other.status_code, other.json()["code"]) == (422, "unknown_member")
    assert (both_wrong.status_code, both_wrong.json()["code"]) == (422, "unknown_member")
    assert ledger_snapshot() == before


def test_a_referred_members_purchase_pays_the_referral(api, program):
    # given: referrals on, and a referred member with an account
    from tests.factories import MemberFactory

    program.referrals_enabled, program.referral_referrer_points, program.referral_referee_points = True, 500, 200
    program.save()
    referrer = MemberFactory(program=program)
    referee = MemberFactory(program=program, referral_code=referrer.referral_code)
    _with_account(referee)
    # when
    response = post(api, URL, purchase(referee))
    # then
    assert response.status_code == 201
    assert Account.objects.get(pk=referee.pk).available == 10 + 129 + 200
    assert Account.objects.get(pk=referrer.pk).available == 500
    assert ledger_verify() == []


def test_a_birthday_rule_reads_the_member_and_pays_its_bonus(api, program):
    # given: a birthday rule, and a member with an account whose birthday month it is
    from loyalty.rule_services import earning_rule_create
    from tests.factories import MemberFactory

    earning_rule_create(
        program=program, code="birthday", name="Birthday", birthday_month=True, benefit="fixed", value=50
    )
    today = timezone.now().astimezone(ZoneInfo(program.timezone)).date()
    member = MemberFactory(program=program, birth_date=today.replace(year=1990, day=1))
    _with_account(member)
    # when
    response = post(api, URL, purchase(member))
    # then
    assert response.status_code == 201
    assert response.json()["points"]["breakdown"] == [
        {"rule": "base", "points": 129},
        {"rule": "birthday", "points": 50},
    ]
    assert Account.objects.get(pk=member.pk).available == 10 + 129 + 50
    assert ledger_verify() == []


def test_preview_tells_what_a_purchase_would_earn_and_writes_nothing(api, member):
    # given
    before = ledger_snapshot()
    # when
    response = post(api, URL + "/preview", purchase(member))
    # then
    assert response.status_code == 200
    assert response.json()["points"]["earned"] == 129
    assert "id" not in response.json()
    assert ledger_snapshot() == before


@pytest.mark.parametrize(
    "outer",
    [
        pytest.param("database transaction", id="savepoint-rolled-back"),
        pytest.param("none", id="transaction-rolled-back", marks=pytest.mark.django_db(transaction=True)),
    ],
)
def test_a_preview_keeps_the_connections_prepared_statements_and_a_schema_change_still_forgets_them(
    api, member, prepared_plans, outer
):
    # given: a till's purchases, often enough for the driver to prepare their statement and for PostgreSQL to settle
    # on its generic plan
    purchase_statement = ("WITH m AS (SELECT id FROM members_member WHERE member_number",)
    for n in range(12):
        assert post(api, URL, purchase(member, external_id=f"P-{n}")).status_code == 201
    generic, custom = prepared_plans(*purchase_statement)
    # when: a preview, rolled back by design, then the next purchase
    preview = post(api, URL + "/preview", purchase(member, external_id="V-1"))
    after = post(api, URL, purchase(member, external_id="P-12"))
    # then: the statement is still prepared, its plans counted on
    assert (preview.status_code, after.status_code) == (200, 201)
    assert prepared_plans(*purchase_statement) == (generic + 1, custom)
    assert not Transaction.objects.filter(external_id="V-1").exists()
    # and outside a preview psycopg's own rule holds: a schema change forgets every prepared statement
    with connection.cursor() as cursor:
        cursor.execute("DROP TABLE IF EXISTS loyalty_no_such_table")
    assert post(api, URL, purchase(member, external_id="P-13")).status_code == 201
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_prepared_statements")
        assert cursor.fetchone()[0] == 0


def test_a_batch_answers_each_transaction_on_its_own(api, member):
    # given
    items = [purchase(member, external_id=f"B-{i}") for i in range(3)] + [purchase(member, total="x")]
    # when
    response = post(api, URL + "/batch", {"transactions": items})
    # then
    assert response.status_code == 200
    statuses = [r["status"] for r in response.json()["results"]]
    assert statuses == [201, 201, 201, 400]
    assert Account.objects.get(pk=member.pk).available == 3 * 129


def test_an_oversized_batch_is_refused_whole(api, member, settings):
    # given
    settings.TRANSACTION_BATCH_MAX = 3
    items = [purchase(member, external_id=f"B-{i}") for i in range(4)]
    # when
    response = post(api, URL + "/batch", {"transactions": items})
    # then
    assert response.status_code == 400
    assert "transactions" in response.json()["errors"]
    assert not Transaction.objects.exists()


def test_an_idempotency_key_replays_the_first_answer(api, member):
    # given
    body = purchase(member)
    first = post(api, URL, body, HTTP_IDEMPOTENCY_KEY="k-1")
    # when
    again = post(api, URL, body, HTTP_IDEMPOTENCY_KEY="k-1")
    reused = post(api, URL, {**body, "external_id": "other"}, HTTP_IDEMPOTENCY_KEY="k-1")
    # then
    assert first.status_code == 201
    assert (again.status_code, again.json()) == (first.status_code, first.json())
    assert again["Idempotent-Replayed"] == "true"
    assert reused.status_code == 422
    assert reused.json()["code"] == "idempotency_key_reused"
    assert Transaction.objects.count() == 1
    assert IdempotencyRecord.objects.count() == 1


def test_a_key_without_the_transactions_scope_cannot_post(make_client, member):
    # given
    from tests.clients import APIClient

    _, raw = make_client(scopes=["members:read"])
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Api-Key {raw}")
    # when
    response = post(client, URL, purchase(member))
    # then
    assert response.status_code == 403
    assert not Transaction.objects.exists()


def test_adjustments_need_a_reason_and_enough_points(api, member):
    # given
    url = f"/api/v1/members/{member.member_number}/adjustments"
    # when
    no_reason = post(api, url, {"points": 10, "reason": "  "})
    overdraft = post(api, url, {"points": -10, "reason": "correction"})
    credit = post(api, url, {"points": 25, "reason": "goodwill: broken bag"})
    # then
    assert no_reason.status_code == 400
    assert overdraft.status_code == 409
    assert overdraft.json()["code"] == "insufficient_points"
    assert credit.status_code == 201
    assert credit.json()["balance"] == {"available": 25, "held": 0, "pending": 0}
    entry = Entry.objects.get()
    assert (entry.kind, entry.points, entry.reason) == ("adjust", 25, "goodwill: broken bag")
    assert entry.api_client is not None


def test_balance_and_activity_show_the_ledger_newest_first(api, member):
    # given
    post(api, URL, purchase(member))
    post(
        api,
        URL,
        purchase(member, external_id="RET-1", type="return", original_external_id="R-1001", total="29.90", lines=[]),
    )
    # when
    balance = api.get(f"/api/v1/members/{member.member_number}/balance").json()
    activity = api.get(f"/api/v1/members/{member.member_number}/activity").json()
    # then
    assert (balance["available"], balance["pending"], balance["lifetime_earned"]) == (100, 0, 100)
    assert balance["expiring"][0]["points"] == 100
    kinds = [e["kind"] for e in activity["results"]]
    assert kinds == ["reversal", "earn"]
    assert activity["results"][0]["source"]["external_id"] == "RET-1"


def test_a_member_of_another_programme_is_not_found(api, program):
    # given
    from tests.factories import MemberFactory, ProgramFactory

    stranger = MemberFactory(program=ProgramFactory())
    # when
    response = api.get(f"/api/v1/members/{stranger.member_number}/balance")
    # then
    assert response.status_code == 404


# Values a field of a purchase body may be sent with: good ones, and every kind of bad or borderline one.
_ODD_VALUES = {
    "external_id": ["R-1", " R-1", "R-1 ", "", "x" * 128, "x" * 129, "Ö-1", "R\t1", 12, 1.5, True, None, ["R"]],
    "store": ["S1", "S 1", "", "x" * 64, "x" * 65, 7, None, "Ö"],
    "channel": ["pos", "web", "app", "POS", "", 1, None],
    "member": ["1234567890", "12345678901", "", " 123", None, 123, "abc"],
    "type": ["purchase", "return", "PURCHASE", None],
    "occurred_at": [
        "2026-11-22T10:00:00+00:00",
        "2026-11-22T10:00:00Z",
        "2026-11-22T10:00:00.123456+01:00",
        "2026-11-22T10:00:00",
        "2026-11-22",
        "2026-02-30T10:00:00+00:00",
        "yesterday",
        "",
        20261122,
        None,
    ],
    "currency": ["SEK", "NOK", "sek", "SEKK", "XXQ", "", 752, None],
    "total": ["129.90", "0", "0.5", "129.9", "129.901", "-1.00", "1e3", "NaN", " 1.00", "99999999999", 129.9, 130],
    "lines": [
        [{"sku": "A", "quantity": "1", "unit_price": "129.90", "amount": "129.90"}],
        [{"sku": "A", "category": "c", "quantity": "1.5", "unit_price": "2", "amount": "3.00"}],
        [],
        [{"sku": "", "quantity": "1", "unit_price": "1", "amount": "1"}],
        [{"quantity": "1", "unit_price": "1", "amount": "1"}],
        "nope",
        None,
    ],
    "paid_with_points": ["10.00"],
    "original_external_id": ["R-0"],
    "member_lookup": [{"email": "a@example.com"}],
    "unknown": ["x"],
}


_ANY_VALUE = [v for values in _ODD_VALUES.values() for v in values]
_PLAIN_BODY = {
    "external_id": "R-1",
    "store": "S1",
    "channel": "pos",
    "member": "1234567890",
    "type": "purchase",
    "occurred_at": "2026-11-22T10:00:00+01:00",
    "currency": "SEK",
    "total": "129.90",
    "lines": [{"sku": "A", "quantity": "1", "unit_price": "129.90", "amount": "129.90"}],
}


@hypothesis.settings(max_examples=1500, derandomize=True, database=None, deadline=None)
@hypothesis.given(
    changes=st.lists(
        st.sampled_from(sorted(_ODD_VALUES)).flatmap(
            lambda k: st.tuples(st.just(k), st.sampled_from(_ODD_VALUES[k]) | st.sampled_from(_ANY_VALUE))
        ),
        max_size=4,
    ),
    drop=st.sets(st.sampled_from(sorted(_PLAIN_BODY)), max_size=2),
)
def test_the_quick_check_of_a_plain_purchase_agrees_with_the_serializer_on_any_body(changes, drop):
    """loyalty.api._plain_purchase stands in for TransactionInputSerializer on plain purchases: whatever it accepts,
    the serializer accepts with the same validated data; anything else it leaves to the serializer."""
    body = {k: v for k, v in {**_PLAIN_BODY, **dict(changes)}.items() if k not in drop}
    quick = _plain_purchase(body)
    if quick is None:
        return
    try:
        full = validate(TransactionInputSerializer, body)
    except serializers.ValidationError as exc:
        raise AssertionError(f"the quick check took {body}, the serializer refuses it: {exc.detail}") from exc
    assert quick == full
    assert {k: str(v) for k, v in quick.items()} == {k: str(v) for k, v in full.items()}


def test_the_quick_check_takes_a_plain_purchase():
    assert _plain_purchase(_PLAIN_BODY) == validate(TransactionInputSerializer, _PLAIN_BODY)
    assert _plain_purchase({**_PLAIN_BODY, "member": None}) is not None  # anonymous
