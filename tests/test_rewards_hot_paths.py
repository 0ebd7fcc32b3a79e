"""The rewards hot paths (redemptions and paying with points at tills) stay within their round trips to the database
(docs/benchmarks.md), and the answers they build without re-reading say what the database holds."""

from datetime import timedelta

from django.utils import timezone

from loyalty.ledger import ledger_balance
from loyalty.models import Draw, Entry, Lot
from loyalty.points import points_adjust
from loyalty.verify import ledger_verify
from rewards.models import Hold, Redemption
from rewards.services.catalogue import reward_create
from rewards.services.redemptions import reward_redeem

# A statement each, with a savepoint pair where the service runs in a transaction (inside the test's own one).
REDEEM_QUERIES = 5  # member and reward; savepoint; lock-and-spend; entry, draws, redemption and voucher; release
HOLD_QUERIES = 2  # member; the hold and its points set aside
CAPTURE_QUERIES = 6  # hold; savepoint; claim; lock-and-spend; entry, draws and the hold's entry; release
RELEASE_QUERIES = 2  # hold; claim and give back


def _warm(api, member):
    # The first request of a key looks its client up; later ones use the per-process cache.
    assert api.get(f"/api/v1/members/{member.member_number}/balance").status_code == 200


def test_a_redemption_takes_five_queries_and_answers_the_balance_it_left(
    api, member, program, django_assert_num_queries
):
    # given
    points_adjust(member=member, points=500, reason="seed")
    reward = reward_create(program=program, code="coffee", kind="product", points_cost=120, name_en="Coffee")
    _warm(api, member)

    # when
    with django_assert_num_queries(REDEEM_QUERIES):
        response = api.post("/api/v1/redemptions", {"member": member.member_number, "reward": "coffee"}, format="json")

    # then
    assert response.status_code == 201, response.content
    body = response.json()
    redemption = Redemption.objects.select_related("voucher", "entry").get(pk=body["id"])
    assert body["voucher"]["code"].replace("-", "") == redemption.voucher.code
    assert redemption.entry.points == -120 and redemption.reward_id == reward.pk
    balance = ledger_balance(member_id=member.pk)
    assert body["balance"] == {"available": balance.spendable, "held": balance.held, "pending": balance.pending}
    assert balance.available == 380
    assert ledger_verify() == []


def test_a_spend_takes_from_several_lots_soonest_to_expire_first_in_one_statement(program, member):
    # given: three lots of 100 expiring at different times, the latest first
    now = timezone.now()
    for days in (300, 100, 200):
        points_adjust(member=member, points=100, reason="seed", now=now)
        newest = Lot.objects.filter(account_id=member.pk).latest("pk")
        Lot.objects.filter(pk=newest.pk).update(expires_at=now + timedelta(days=days))
    reward = reward_create(program=program, code="big", kind="product", points_cost=250, name_en="Big")

    # when
    redemption = reward_redeem(member=member, reward=reward)

    # then: 100 from the lot expiring in 100 days, 100 from 200 days, 50 from 300 days
    draws = Draw.objects.filter(entry_id=redemption.entry_id).select_related("lot").order_by("lot__expires_at")
    assert [(d.lot.expires_at - now).days for d in draws] == [100, 200, 300]
    assert [d.points for d in draws] == [100, 100, 50]
    assert sorted(Lot.objects.filter(account_id=member.pk).values_list("remaining", flat=True)) == [0, 0, 50]
    assert Entry.objects.get(pk=redemption.entry_id).available_after == 50
    assert ledger_verify() == []


def test_paying_with_points_stays_within_its_queries(api, member, django_assert_num_queries):
    # given
    points_adjust(member=member, points=500, reason="seed")
    _warm(api, member)
    body = {"member": member.member_number, "points": 40, "store": "S1"}

    # when
    with django_assert_num_queries(HOLD_QUERIES):
        placed = api.post("/api/v1/points/holds", body, format="json")
    second = api.post("/api/v1/points/holds", body, format="json")
    capture_path = f"/api/v1/points/holds/{placed.json()['hold_id']}/capture"
    with django_assert_num_queries(CAPTURE_QUERIES):
        captured = api.post(capture_path, {"external_id": "t1"}, format="json")
    with django_assert_num_queries(RELEASE_QUERIES):
        released = api.post(f"/api/v1/points/holds/{second.json()['hold_id']}/release")

    # then
    assert placed.status_code == 201 and placed.json()["balance"] == {"available": 460, "held": 40, "pending": 0}
    assert captured.status_code == 200 and captured.json()["balance"] == {"available": 420, "held": 40, "pending": 0}
    assert released.status_code == 200 and released.json()["balance"] == {"available": 460, "held": 0, "pending": 0}
    capture_hold = Hold.objects.get(pk=placed.json()["hold_id"])
    assert capture_hold.entry.points == -40 and capture_hold.status == Hold.Status.CAPTURED
    assert Hold.objects.get(pk=second.json()["hold_id"]).status == Hold.Status.RELEASED
    assert ledger_verify() == []


def test_a_release_of_a_closed_hold_gives_nothing_back_twice(api, member):
    # given
    points_adjust(member=member, points=100, reason="seed")
    hold_id = api.post(
        "/api/v1/points/holds", {"member": member.member_number, "points": 60, "store": "S1"}, format="json"
    ).json()["hold_id"]
    api.post(f"/api/v1/points/holds/{hold_id}/release")

    # when
    again = api.post(f"/api/v1/points/holds/{hold_id}/release")

    # then
    assert again.status_code == 200 and again.json()["status"] == "released"
    assert again.json()["balance"] == {"available": 100, "held": 0, "pending": 0}
    assert ledger_balance(member_id=member.pk).held == 0
