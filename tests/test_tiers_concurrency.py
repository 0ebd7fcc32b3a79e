"""Concurrent purchases of one member move them up once: one status change, one history row."""

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from loyalty import tier_review
from loyalty.tier_models import TierChange, TierCounter, TierStatus
from loyalty.tier_setup import tier_create
from loyalty.tiers import tiers_review_due
from tests.factories import MemberFactory, record
from tests.threads import at_once, failures

NOW = datetime(2025, 6, 20, 12, 0, tzinfo=UTC)


def _buy(program, member, total, *, key, at):
    return record(program, member, total, external_id=key, at=at, now=NOW)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("spread_over_months", [False, True])
def test_concurrent_purchases_of_one_member_upgrade_once(program, spread_over_months):
    # given: 900 points, Silver at 1,000; eight purchases of 200 arrive at once (in one period, or late-arriving
    # ones in different periods, which do not queue on one counter row)
    silver = tier_create(program=program, code="silver", name_en="Silver", rank=1, threshold=Decimal(1000))
    tier_create(program=program, code="gold", name_en="Gold", rank=2, threshold=Decimal(5000))
    member = MemberFactory(program=program, enrolled_at=NOW - timedelta(days=400))
    _buy(program, member, "900", key="seed", at=NOW)

    def work(i):
        _buy(program, member, "200", key=f"p{i}", at=NOW - timedelta(days=31 * i if spread_over_months else 0))

    # when
    errors = failures(at_once(8, work))
    # then
    assert errors == []
    assert TierStatus.objects.get(member=member).tier_id == silver.pk
    assert TierChange.objects.filter(member=member).count() == 1
    assert sum(TierCounter.objects.filter(member=member).values_list("points", flat=True)) == 2500


@pytest.mark.django_db(transaction=True)
def test_concurrent_reviews_review_each_member_once(program):
    # given
    tier_create(program=program, code="gold", name_en="Gold", rank=1, threshold=Decimal(1000))
    members = [MemberFactory(program=program, enrolled_at=NOW - timedelta(days=400)) for _ in range(40)]
    for i, m in enumerate(members):
        _buy(program, m, "1000", key=f"p{i}", at=NOW)
    due = TierStatus.objects.first().review_at + timedelta(hours=1)
    results = []
    # when
    errors = failures(at_once(4, lambda i: results.append(tiers_review_due(now=due, batch_size=7))))
    # then
    assert errors == []
    assert sum(r.changed for r in results) == 40
    assert TierChange.objects.filter(reason="downgrade").count() == 40
    assert not TierStatus.objects.exclude(tier=None).exists()


@pytest.mark.django_db(transaction=True)
def test_the_review_in_parallel_ranges_does_what_one_connection_does(program):
    # given: 30 members due for review, half of whom keep Gold; members with ids spread so that ranges split them
    gold = tier_create(program=program, code="gold", name_en="Gold", rank=1, threshold=Decimal(1000))
    members = [MemberFactory(program=program, enrolled_at=NOW - timedelta(days=400)) for _ in range(30)]
    for i, m in enumerate(members):
        _buy(program, m, "1000", key=f"p{i}", at=NOW)
        if i % 2:
            record(program, m, "1000", external_id=f"q{i}", at=NOW + timedelta(days=300))
    due = TierStatus.objects.first().review_at + timedelta(hours=1)

    def state():
        statuses = TierStatus.objects.order_by("member_id").values_list("member_id", "tier_id", "review_at", "since")
        history = TierChange.objects.order_by("member_id", "id").values_list("member_id", "from_tier_id", "to_tier_id")
        return list(statuses), list(history)

    before = state()
    serial = tiers_review_due(now=due, batch_size=4, workers=1)
    after_serial = state()
    # put everything back as it was before the review
    TierChange.objects.filter(reason="downgrade").delete()
    for member_id, tier_id, review_at, since in before[0]:
        TierStatus.objects.filter(member_id=member_id).update(tier_id=tier_id, review_at=review_at, since=since)
    assert state() == before
    # when
    parallel = tiers_review_due(now=due, batch_size=4, workers=3)
    # then: each member reviewed once, with the same outcome; no connection is left open by the workers
    assert parallel == serial
    assert (serial.reviewed, serial.changed) == (30, 15)
    assert state() == after_serial
    assert TierStatus.objects.filter(tier=gold).count() == 15
    assert tiers_review_due(now=due, workers=3).reviewed == 0


@pytest.mark.django_db(transaction=True)
def test_a_range_that_fails_leaves_whole_batches_and_a_second_run_finishes_the_review(program, monkeypatch):
    # given: 30 members due; the last range's second batch fails (the database went away, say)
    tier_create(program=program, code="gold", name_en="Gold", rank=1, threshold=Decimal(1000))
    for i, m in enumerate(MemberFactory(program=program, enrolled_at=NOW - timedelta(days=400)) for _ in range(30)):
        _buy(program, m, "1000", key=f"p{i}", at=NOW)
    due = TierStatus.objects.first().review_at + timedelta(hours=1)
    real, last_range_batches = tier_review._review_batch_sql, []

    def failing(program, now, batch_size, after, upto):
        if upto is None:
            last_range_batches.append(after)
            if len(last_range_batches) == 2:
                raise RuntimeError("the database went away")
        return real(program, now, batch_size, after, upto)

    monkeypatch.setattr(tier_review, "_review_batch_sql", failing)
    # when
    with pytest.raises(RuntimeError):
        tiers_review_due(now=due, batch_size=4, workers=3)
    # then: every member moved has their history row, and no one else changed
    moved = set(TierChange.objects.filter(reason="downgrade").values_list("member_id", flat=True))
    assert 4 <= len(moved) < 30
    assert set(TierStatus.objects.filter(tier=None).values_list("member_id", flat=True)) == moved
    # when the job runs again
    monkeypatch.undo()
    rest = tiers_review_due(now=due, batch_size=4, workers=3)
    # then: the others are reviewed, each member once
    assert rest.changed == 30 - len(moved)
    assert TierChange.objects.filter(reason="downgrade").count() == 30
