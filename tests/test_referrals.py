"""Referrals: a code per member; both members rewarded once, on the referee's first qualifying purchase; abuse
refused."""

import threading
from datetime import datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from core.errors import Conflict, InvalidInput, Unprocessable
from loyalty.event_models import Referral
from loyalty.models import Account, Entry
from loyalty.verify import ledger_verify
from members.models import Member
from members.referrals import ALPHABET, REFERRAL_ATTACH_DAYS
from members.services import member_update
from tests.factories import MemberFactory, record

AT = datetime(2025, 11, 19, 14, 30, tzinfo=ZoneInfo("Europe/Stockholm"))


@pytest.fixture
def referring(program):
    program.referrals_enabled = True
    program.referral_referrer_points = 500
    program.referral_referee_points = 200
    program.referral_min_purchase = Decimal("100.00")
    program.save()
    return program


def buy(program, member, external_id, total, kind="purchase", original=None):
    return record(
        program,
        member,
        total,
        external_id=external_id,
        kind=kind,
        original=original,
        at=AT,
        now=timezone.now(),
        store="STHLM-01",
    )


def available(member) -> int:
    row = Account.objects.filter(pk=member.pk).values_list("available", flat=True).first()
    return row or 0


def test_every_member_gets_a_short_unambiguous_referral_code(program):
    # when
    members = [MemberFactory(program=program) for _ in range(20)]
    # then
    codes = {m.referral_code for m in members}
    assert len(codes) == 20
    assert all(len(c) == 8 and set(c) <= set(ALPHABET) for c in codes)
    assert not set("01OIL") & set(ALPHABET)


def test_a_member_enrolled_with_a_code_has_a_referrer(program):
    # given
    referrer = MemberFactory(program=program)
    # when: typed in lower case with a dash
    typed = f"{referrer.referral_code[:4].lower()}-{referrer.referral_code[4:]}"
    referee = MemberFactory(program=program, referral_code=typed)
    # then
    assert referee.referred_by == referrer


def test_an_unknown_referral_code_refuses_the_enrolment(program):
    # when
    with pytest.raises(InvalidInput) as refused:
        MemberFactory(program=program, referral_code="ZZZZZZZZ")
    # then
    assert "referral_code" in refused.value.errors
    assert not Member.objects.exists()


def test_post_members_takes_a_referral_code_and_answers_400_for_an_unknown_one(api, program):
    # given
    referrer = MemberFactory(program=program)
    # when
    ok = api.post(
        "/api/v1/members", {"email": "new@example.com", "referral_code": referrer.referral_code}, format="json"
    )
    bad = api.post("/api/v1/members", {"email": "bad@example.com", "referral_code": "ZZZZZZZZ"}, format="json")
    # then
    assert ok.status_code == 201, ok.content
    assert Member.objects.get(email="new@example.com").referred_by == referrer
    assert len(ok.json()["referral_code"]) == 8
    assert bad.status_code == 400
    assert bad["Content-Type"] == "application/problem+json"
    assert "referral_code" in bad.json()["errors"]
    assert not Member.objects.filter(email="bad@example.com").exists()


def test_both_members_are_rewarded_once_on_the_first_qualifying_purchase_not_on_a_smaller_one(referring):
    # given
    referrer = MemberFactory(program=referring)
    referee = MemberFactory(program=referring, referral_code=referrer.referral_code)
    # when: too small, then qualifying, then qualifying again
    buy(referring, referee, "small", "99.99")
    assert not Referral.objects.exists()
    assert available(referrer) == 0
    buy(referring, referee, "first", "150.00")
    buy(referring, referee, "second", "300.00")
    # then
    referral = Referral.objects.get()
    assert (referral.referrer, referral.referee, referral.transaction.external_id) == (referrer, referee, "first")
    assert available(referrer) == 500
    assert available(referee) == 99 + 150 + 300 + 200
    assert Entry.objects.filter(kind="bonus").count() == 2
    assert Account.objects.get(pk=referrer.pk).lifetime_earned == 500
    assert ledger_verify() == []


def test_the_purchase_sent_again_rewards_nothing_more(referring):
    # given
    referrer = MemberFactory(program=referring)
    referee = MemberFactory(program=referring, referral_code=referrer.referral_code)
    buy(referring, referee, "first", "150.00")
    # when
    again = buy(referring, referee, "first", "150.00")
    # then
    assert not again.created
    assert Referral.objects.count() == 1
    assert available(referrer) == 500


def test_no_reward_when_referrals_are_off_and_no_referral_query_is_made(program):
    # given
    referrer = MemberFactory(program=program)
    referee = MemberFactory(program=program, referral_code=referrer.referral_code)
    # when
    with CaptureQueriesContext(connection) as queries:
        buy(program, referee, "first", "500.00")
    # then
    assert not any("loyalty_referral" in q["sql"] for q in queries.captured_queries)
    assert not Referral.objects.exists()
    assert available(referrer) == 0


def test_a_purchase_of_a_member_nobody_referred_costs_no_referral_query(referring):
    # given
    member = MemberFactory(program=referring)
    # when
    with CaptureQueriesContext(connection) as queries:
        buy(referring, member, "first", "500.00")
    # then
    assert not any("loyalty_referral" in q["sql"] for q in queries.captured_queries)


def test_a_partial_return_of_the_qualifying_purchase_keeps_the_referral_points(referring):
    # given
    referrer = MemberFactory(program=referring)
    referee = MemberFactory(program=referring, referral_code=referrer.referral_code)
    buy(referring, referee, "first", "150.00")
    # when
    buy(referring, referee, "ret", "100.00", kind="return", original="first")
    # then
    assert available(referrer) == 500
    assert available(referee) == 50 + 200
    assert Referral.objects.get().undone_by is None
    assert ledger_verify() == []


@pytest.mark.parametrize("policy", ["allow_negative", "available_only"])
def test_returning_all_of_the_qualifying_purchase_takes_both_referral_rewards_back(referring, policy):
    # given: the referee bought, spent the points, and returns the goods in two parts
    from loyalty.points import points_adjust

    referring.return_policy = policy
    referring.save()
    referrer = MemberFactory(program=referring)
    referee = MemberFactory(program=referring, referral_code=referrer.referral_code)
    buy(referring, referee, "first", "150.00")
    points_adjust(member=referee, points=-300, reason="spent at the till")
    buy(referring, referee, "ret-1", "100.00", kind="return", original="first")
    # when
    last = buy(referring, referee, "ret-2", "50.00", kind="return", original="first")
    again = buy(referring, referee, "ret-2", "50.00", kind="return", original="first")
    buy(referring, referee, "second", "400.00")
    # then: the referrer's 500 back, and the referee's 200 as far as the policy lets; once; no second reward
    referral = Referral.objects.get()
    assert referral.undone_by == last.transaction and not again.created
    assert available(referrer) == 0
    if policy == "allow_negative":
        assert available(referee) == 150 + 200 - 300 - 150 - 200 + 400
    else:
        assert available(referee) == 400  # nothing was left to take back
    assert Entry.objects.filter(kind="reversal", reason__startswith="Referral undone").count() == (
        2 if policy == "allow_negative" else 1
    )
    assert Account.objects.get(pk=referrer.pk).lifetime_earned == 0
    assert ledger_verify() == []


def test_a_member_cannot_add_their_own_code(program):
    # given
    member = MemberFactory(program=program)
    # when
    with pytest.raises(Unprocessable) as refused:
        member_update(member=member, referral_code=member.referral_code, source="test")
    # then
    assert refused.value.code == "self_referral"
    member.refresh_from_db()
    assert member.referred_by is None


def test_a_referral_loop_is_refused(program):
    # given: A referred B, B referred C
    a = MemberFactory(program=program)
    b = MemberFactory(program=program, referral_code=a.referral_code)
    c = MemberFactory(program=program, referral_code=b.referral_code)
    # when: A tries to name B, or C, as their referrer
    for referrer in (b, c):
        with pytest.raises(Unprocessable) as refused:
            member_update(member=a, referral_code=referrer.referral_code, source="test")
        assert refused.value.code == "referral_loop"
    # then
    a.refresh_from_db()
    assert a.referred_by is None


def test_a_member_is_referred_once(program):
    # given
    first, second = MemberFactory(program=program), MemberFactory(program=program)
    referee = MemberFactory(program=program, referral_code=first.referral_code)
    # when
    with pytest.raises(Conflict) as refused:
        member_update(member=referee, referral_code=second.referral_code, source="test")
    # then
    assert refused.value.code == "already_referred"
    referee.refresh_from_db()
    assert referee.referred_by == first


def test_a_code_can_be_added_shortly_after_enrolment_but_not_later(program):
    # given
    referrer = MemberFactory(program=program)
    recent = MemberFactory(program=program)
    old = MemberFactory(program=program, enrolled_at=AT - timedelta(days=REFERRAL_ATTACH_DAYS + 400))
    # when
    member_update(member=recent, referral_code=referrer.referral_code, source="test")
    with pytest.raises(Unprocessable) as refused:
        member_update(member=old, referral_code=referrer.referral_code, source="test")
    # then
    recent.refresh_from_db()
    old.refresh_from_db()
    assert recent.referred_by == referrer
    assert refused.value.code == "referral_too_late"
    assert old.referred_by is None


def test_patch_members_refuses_abuse_with_problems_and_changes_nothing(api, program):
    # given
    a = MemberFactory(program=program)
    b = MemberFactory(program=program, referral_code=a.referral_code)
    # when
    own = api.patch(f"/api/v1/members/{a.member_number}", {"referral_code": a.referral_code}, format="json")
    loop = api.patch(f"/api/v1/members/{a.member_number}", {"referral_code": b.referral_code}, format="json")
    again = api.patch(f"/api/v1/members/{b.member_number}", {"referral_code": a.referral_code}, format="json")
    unknown = api.patch(f"/api/v1/members/{a.member_number}", {"referral_code": "ZZZZZZZZ"}, format="json")
    # then
    assert (own.status_code, own.json()["code"]) == (422, "self_referral")
    assert (loop.status_code, loop.json()["code"]) == (422, "referral_loop")
    assert (again.status_code, again.json()["code"]) == (409, "already_referred")
    assert unknown.status_code == 400
    assert all("referral_code" in r.json()["errors"] for r in (own, loop, again, unknown))
    a.refresh_from_db()
    assert a.referred_by is None


def test_a_member_who_already_made_a_qualifying_purchase_earns_no_referral_by_adding_a_code(referring):
    # given
    referrer = MemberFactory(program=referring)
    member = MemberFactory(program=referring)
    buy(referring, member, "before", "200.00")
    member_update(member=member, referral_code=referrer.referral_code, source="test")
    member.refresh_from_db()
    # when
    buy(referring, member, "after", "200.00")
    # then
    assert not Referral.objects.exists()
    assert available(referrer) == 0


def test_a_referrer_who_left_gets_nothing_but_the_referee_still_does(referring):
    # given
    referrer = MemberFactory(program=referring)
    referee = MemberFactory(program=referring, referral_code=referrer.referral_code)
    member_update(member=referrer, status="closed", source="test")
    # when
    buy(referring, referee, "first", "150.00")
    # then
    referral = Referral.objects.get()
    assert (referral.referrer_points, referral.referee_points, referral.referrer_entry) == (0, 200, None)
    assert available(referrer) == 0
    assert available(referee) == 350
    assert ledger_verify() == []


@pytest.mark.django_db(transaction=True)
def test_concurrent_first_purchases_reward_the_referral_once(program):
    # given
    program.referrals_enabled = True
    program.referral_referrer_points = 500
    program.referral_referee_points = 200
    program.save()
    referrer = MemberFactory(program=program)
    referees = [MemberFactory(program=program, referral_code=referrer.referral_code) for _ in range(3)]
    barrier = threading.Barrier(9)
    errors = []

    def shop(member, n):
        try:
            barrier.wait()
            buy(program, member, f"{member.pk}-{n}", "100.00")
        except Exception as exc:  # collected, asserted below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=shop, args=(m, n)) for m in referees for n in range(3)]
    # when
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # then
    assert errors == []
    assert Referral.objects.count() == 3
    assert available(referrer) == 3 * 500
    assert all(available(m) == 3 * 100 + 200 for m in referees)
    assert ledger_verify() == []
