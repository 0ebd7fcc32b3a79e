"""Paying with points: holds set points aside, are captured (a redeem entry) or released, lapse by themselves, and
close exactly once whatever races them."""

import threading
from datetime import UTC, datetime, timedelta

import pytest
from django.db import connection
from django.utils import timezone

from core.errors import InsufficientPoints, InvalidInput
from loyalty.ledger import ledger_expire_due
from loyalty.models import Account, Entry
from loyalty.points import points_adjust
from loyalty.verify import ledger_verify
from rewards.errors import HoldClosed
from rewards.models import Hold
from rewards.services.catalogue import reward_create
from rewards.services.holds import hold_capture, hold_place, hold_release, holds_lapse_due
from rewards.services.redemptions import reward_redeem
from rewards.tasks import lapse_holds

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def _give(member, points, *, now=NOW):
    points_adjust(member=member, points=points, reason="seed", now=now)


def _balance(member):
    return Account.objects.values_list("available", "held").get(pk=member.pk)


def test_a_hold_sets_points_aside_from_every_other_spend(program, member):
    # given
    _give(member, 100)

    # when
    result = hold_place(member=member, points=70, store="S1", now=NOW)

    # then
    assert (result.balance.available, result.balance.held, result.balance.spendable) == (100, 70, 30)
    assert result.hold.expires_at == NOW + timedelta(minutes=program.hold_minutes)
    with pytest.raises(InsufficientPoints):
        points_adjust(member=member, points=-31, reason="correction", now=NOW)
    with pytest.raises(InsufficientPoints):
        hold_place(member=member, points=31, store="S1", now=NOW)
    reward = reward_create(program=program, code="c", kind="product", points_cost=31, name_en="Coffee")
    with pytest.raises(InsufficientPoints):
        reward_redeem(member=member, reward=reward, now=NOW)
    assert _balance(member) == (100, 70)
    assert Hold.objects.count() == 1
    assert not Entry.objects.filter(points__lt=0).exists()


def test_a_captured_hold_becomes_a_redeem_entry(program, member):
    # given
    _give(member, 100)
    hold = hold_place(member=member, points=70, store="S1", now=NOW).hold

    # when
    result = hold_capture(hold=hold, transaction_external_id="t1", now=NOW)
    again = hold_capture(hold=hold, transaction_external_id="t1", now=NOW)

    # then
    assert result.hold.status == again.hold.status == "captured"
    assert _balance(member) == (30, 0)
    entry = Entry.objects.get(kind="redeem")
    assert (entry.points, result.hold.entry_id) == (-70, entry.pk)
    assert ledger_verify() == []


def test_capturing_part_of_a_hold_gives_the_rest_back(program, member):
    # given
    _give(member, 100)
    hold = hold_place(member=member, points=70, store="S1", now=NOW).hold

    # when
    hold_capture(hold=hold, transaction_external_id="t1", points=40, now=NOW)

    # then
    assert _balance(member) == (60, 0)


@pytest.mark.parametrize("close", ["release", "lapse", "capture"])
def test_a_closed_hold_is_never_captured_again(program, member, close):
    # given
    _give(member, 100)
    hold = hold_place(member=member, points=70, store="S1", now=NOW).hold
    if close == "release":
        hold_release(hold=hold, now=NOW)
    elif close == "lapse":
        assert holds_lapse_due(now=NOW + timedelta(hours=1)) == 1
    else:
        hold_capture(hold=hold, transaction_external_id="t1", now=NOW)
    before = (_balance(member), Entry.objects.count())

    # when
    with pytest.raises(HoldClosed) as caught:
        hold_capture(hold=hold, transaction_external_id="t2", now=NOW)

    # then
    assert caught.value.code == {"release": "hold_released", "lapse": "hold_lapsed", "capture": "hold_captured"}[close]
    assert (_balance(member), Entry.objects.count()) == before


def test_releasing_is_idempotent_and_a_captured_hold_cannot_be_released(program, member):
    # given
    _give(member, 100)
    first = hold_place(member=member, points=70, store="S1", now=NOW).hold
    second = hold_place(member=member, points=30, store="S1", now=NOW).hold

    # when
    hold_release(hold=first, now=NOW)
    hold_release(hold=first, now=NOW)
    hold_capture(hold=second, transaction_external_id="t1", now=NOW)

    # then
    assert _balance(member) == (70, 0)
    with pytest.raises(HoldClosed):
        hold_release(hold=second, now=NOW)
    assert _balance(member) == (70, 0)


def test_a_hold_past_its_time_cannot_be_captured_and_the_job_lapses_it(program, member):
    # given
    _give(member, 100)
    hold = hold_place(member=member, points=70, store="S1", now=NOW).hold
    later = NOW + timedelta(minutes=program.hold_minutes)

    # when
    with pytest.raises(HoldClosed) as caught:
        hold_capture(hold=hold, transaction_external_id="t1", now=later)

    # then
    assert caught.value.code == "hold_lapsed"
    assert _balance(member) == (100, 70)
    assert holds_lapse_due(now=later) == 1
    assert holds_lapse_due(now=later) == 0
    assert _balance(member) == (100, 0)
    hold.refresh_from_db()
    assert hold.status == "lapsed"


def test_the_periodic_job_lapses_due_holds(program, member):
    # given
    _give(member, 100, now=timezone.now())
    hold_place(member=member, points=10, store="S1", now=timezone.now() - timedelta(hours=1))
    hold_place(member=member, points=20, store="S1")

    # when
    lapsed = lapse_holds.apply().get()

    # then
    assert lapsed == 1
    assert _balance(member) == (100, 20)


def test_held_points_that_expired_meanwhile_cannot_be_captured_and_the_hold_stays_open(program, member):
    # given points expiring while held
    _give(member, 100)
    hold = hold_place(member=member, points=70, store="S1", now=NOW).hold
    ledger_expire_due(now=NOW + timedelta(days=365 * 3))

    # when
    with pytest.raises(InsufficientPoints):
        hold_capture(hold=hold, transaction_external_id="t1", now=NOW)

    # then
    hold.refresh_from_db()
    assert hold.status == "open"
    assert _balance(member) == (0, 70)
    hold_release(hold=hold, now=NOW)
    assert _balance(member) == (0, 0)
    assert ledger_verify() == []


@pytest.mark.parametrize("points, store", [(0, "S1"), (-5, "S1"), (10, " ")])
def test_a_bad_hold_is_refused_and_changes_nothing(program, member, points, store):
    # given
    _give(member, 100)

    # when
    with pytest.raises(InvalidInput):
        hold_place(member=member, points=points, store=store, now=NOW)

    # then
    assert _balance(member) == (100, 0)
    assert not Hold.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_capture_release_and_lapse_racing_each_other_close_each_hold_exactly_once(program, member):
    # given many holds past their time, each raced by a capture, a release and the lapse job
    _give(member, 10_000, now=timezone.now())
    holds = [hold_place(member=member, points=10, store="S1").hold for _ in range(20)]
    Hold.objects.update(expires_at=timezone.now() + timedelta(seconds=1))
    outcomes = {"capture": 0, "release": 0}

    def run(action, hold, barrier):
        try:
            barrier.wait()
            if action == "capture":
                hold_capture(hold=hold, transaction_external_id=f"t{hold.pk}")
            elif action == "release":
                hold_release(hold=hold)
            else:
                holds_lapse_due(now=timezone.now() + timedelta(seconds=2))
            if action in outcomes:
                outcomes[action] += 1
        except HoldClosed:
            pass
        finally:
            connection.close()

    # when
    for hold in holds:
        barrier = threading.Barrier(3)
        threads = [threading.Thread(target=run, args=(a, hold, barrier)) for a in ("capture", "release", "lapse")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    # then every hold closed once, and the points add up
    statuses = list(Hold.objects.values_list("status", flat=True))
    assert "open" not in statuses
    captured = statuses.count("captured")
    assert Entry.objects.filter(kind="redeem").count() == captured
    assert _balance(member) == (10_000 - 10 * captured, 0)
    assert ledger_verify() == []


@pytest.mark.django_db(transaction=True)
def test_holds_racing_for_the_last_points_never_overdraw(program, member):
    # given
    _give(member, 100, now=timezone.now())
    barrier = threading.Barrier(10)
    placed = []

    def place():
        try:
            barrier.wait()
            hold_place(member=member, points=30, store="S1")
            placed.append(1)
        except InsufficientPoints:
            pass
        finally:
            connection.close()

    # when
    threads = [threading.Thread(target=place) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    # then
    assert len(placed) == 3
    assert _balance(member) == (100, 90)
