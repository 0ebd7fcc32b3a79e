"""Tiers: qualification in the member's window, moving up at once, review with grace and downgrade, manual tiers,
returns, and tier definitions that are refused whole."""

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest
from django.db import transaction

from core.errors import Conflict, InvalidInput
from core.models import Program
from loyalty.tier_models import Tier, TierChange, TierCounter, TierStatus
from loyalty.tier_selectors import tier_multiplier_for, tier_progress_get
from loyalty.tier_setup import (
    TierCodeTaken,
    TierRankTaken,
    TierThresholdsNotIncreasing,
    program_settings_update,
    tier_create,
)
from loyalty.tier_windows import anniversary, current_window_start, first_review_at, period_of
from loyalty.tiers import tier_set_manual, tiers_review_due
from tests.factories import MemberFactory, record

NOW = datetime(2025, 3, 10, 12, 0, tzinfo=UTC)


def _ladder(program, **settings):
    if settings:
        program_settings_update(program=program, **settings)
    base = tier_create(program=program, code="member", name_en="Member", rank=0, threshold=Decimal(0))
    silver = tier_create(
        program=program, code="silver", name_en="Silver", rank=1, threshold=Decimal(1000), earn_multiplier=Decimal(1.25)
    )
    gold = tier_create(
        program=program, code="gold", name_en="Gold", rank=2, threshold=Decimal(5000), earn_multiplier=Decimal(2)
    )
    return base, silver, gold


def _buy(program, member, total, *, key, at=NOW, now=None):
    return record(program, member, total, external_id=key, at=at, now=now)


def _return(program, member, total, *, key, original, at=NOW):
    return record(program, member, total, external_id=key, kind="return", original=original, at=at)


def _tier(member):
    status = TierStatus.objects.filter(member=member).select_related("tier").first()
    return status.tier.code if status and status.tier else None


def test_a_programme_without_tiers_counts_nothing_and_keeps_no_status(program, member):
    # when
    _buy(program, member, "2000", key="p1")
    # then
    assert not program.has_tiers
    assert not TierCounter.objects.exists()
    assert not TierStatus.objects.exists()
    assert tier_progress_get(member=member) is None
    assert tier_multiplier_for(member=member) == Decimal(1)


def test_a_purchase_that_reaches_a_threshold_upgrades_at_once_with_one_history_row(program, member):
    # given
    _, silver, gold = _ladder(program)
    _buy(program, member, "600", key="p1")
    assert _tier(member) is None  # still at the implicit base tier
    # when
    _buy(program, member, "500", key="p2")
    # then
    assert _tier(member) == "silver"
    change = TierChange.objects.get()
    assert (change.from_tier.code, change.to_tier_id, change.reason) == ("member", silver.pk, "upgrade")
    assert change.transaction.external_id == "p2"
    assert tier_multiplier_for(member=member) == Decimal("1.25")
    progress = tier_progress_get(member=member, now=NOW)
    assert (progress.tier.code, progress.next_tier.code) == ("silver", "gold")
    assert (progress.value, progress.needed) == (1100, 3900)


def test_spending_points_never_lowers_the_measure_but_every_purchase_counts(program, member):
    # given
    _ladder(program, tier_measure=Program.TierMeasure.SPEND)
    # when
    _buy(program, member, "999.99", key="p1")
    # then
    assert _tier(member) is None
    assert TierCounter.objects.get().spend_cents == 99999
    _buy(program, member, "0.01", key="p2")
    assert _tier(member) == "silver"
    assert tier_progress_get(member=member, now=NOW).needed == Decimal("4000.00")


def test_the_period_is_the_members_local_month_not_the_utc_one(program):
    # given: 23:30 UTC on 31 December is already New Year in Stockholm, and still 31 December in New York
    _ladder(program, tier_window=Program.TierWindow.CALENDAR_YEAR)
    at = datetime(2025, 12, 31, 23, 30, tzinfo=UTC)
    stockholm = MemberFactory(program=program, timezone="Europe/Stockholm", enrolled_at=at - timedelta(days=400))
    new_york = MemberFactory(program=program, timezone="America/New_York", enrolled_at=at - timedelta(days=400))
    # when
    _buy(program, stockholm, "1500", key="s1", at=at)
    _buy(program, new_york, "1500", key="n1", at=at)
    # then
    assert TierCounter.objects.get(member=stockholm).period == date(2026, 1, 1)
    assert TierCounter.objects.get(member=new_york).period == date(2025, 12, 1)
    # the calendar-year window for moving up starts on 1 January local time
    assert current_window_start(program=program, member=stockholm, now=at) == date(2026, 1, 1)
    assert current_window_start(program=program, member=new_york, now=at) == date(2025, 1, 1)


def test_a_rolling_window_counts_this_month_and_the_ones_before_it(program):
    # given
    program_settings_update(program=program, tier_window_months=3)
    member = MemberFactory(program=program, timezone="Europe/Oslo", enrolled_at=NOW - timedelta(days=500))
    _ladder(program)
    _buy(program, member, "900", key="old", at=datetime(2024, 12, 31, 22, 59, tzinfo=UTC))  # 23:59 in Oslo
    # when: on 1 March local time, December has left the three-month window
    _buy(
        program,
        member,
        "200",
        key="new",
        at=datetime(2025, 2, 28, 23, 30, tzinfo=UTC),  # 1 March 00:30 in Oslo
        now=datetime(2025, 2, 28, 23, 30, tzinfo=UTC),
    )
    # then
    assert _tier(member) is None
    assert sorted(TierCounter.objects.values_list("period", flat=True)) == [date(2024, 12, 1), date(2025, 3, 1)]


def test_a_29_february_anniversary_falls_on_28_february_in_common_years(program):
    # given
    program_settings_update(program=program, tier_window=Program.TierWindow.ANNIVERSARY_YEAR)
    member = MemberFactory(
        program=program, timezone="Europe/Stockholm", enrolled_at=datetime(2024, 2, 29, 10, tzinfo=UTC)
    )
    # then
    assert anniversary(member=member, year=2025) == date(2025, 2, 28)
    assert anniversary(member=member, year=2028) == date(2028, 2, 29)
    assert period_of(date(2025, 2, 28), 29) == date(2025, 2, 28)
    assert period_of(date(2025, 3, 28), 29) == date(2025, 2, 28)
    assert period_of(date(2025, 3, 29), 29) == date(2025, 3, 29)
    assert current_window_start(program=program, member=member, now=datetime(2025, 2, 27, 12, tzinfo=UTC)) == date(
        2024, 2, 29
    )
    assert current_window_start(program=program, member=member, now=datetime(2025, 2, 28, 12, tzinfo=UTC)) == date(
        2025, 2, 28
    )
    # a tier reached in the 2026/27 anniversary year is reviewed on the anniversary two years on: 29 Feb 2028
    review = first_review_at(program=program, member=member, since=datetime(2026, 6, 1, tzinfo=UTC))
    assert review == datetime(2028, 2, 29, tzinfo=member.tz)


def test_a_tier_is_kept_at_review_when_the_window_supports_it(program, member):
    # given
    _, _, gold = _ladder(program)
    _buy(program, member, "5000", key="p1")
    status = TierStatus.objects.get(member=member)
    review_at = status.review_at
    assert review_at == datetime(2026, 4, 1, tzinfo=member.tz)  # the 12 whole months after March 2025
    _buy(program, member, "5000", key="p2", at=datetime(2025, 9, 1, 12, tzinfo=UTC))
    # when
    result = tiers_review_due(now=review_at + timedelta(hours=1))
    # then
    status.refresh_from_db()
    assert (result.reviewed, result.changed) == (1, 0)
    assert status.tier_id == gold.pk
    assert status.review_at == datetime(2027, 4, 1, tzinfo=member.tz)
    assert TierChange.objects.count() == 1  # only the upgrade


@pytest.mark.parametrize(
    "mode, expected", [(Program.TierDowngrade.ONE_STEP, "silver"), (Program.TierDowngrade.TO_SUPPORTED, "member")]
)
def test_after_the_grace_days_a_member_moves_down_one_tier_or_to_the_supported_one(program, member, mode, expected):
    # given
    _ladder(program, tier_grace_days=14, tier_downgrade=mode)
    _buy(program, member, "5000", key="p1")
    review_at = TierStatus.objects.get(member=member).review_at
    # when: within the grace days nothing happens
    assert tiers_review_due(now=review_at + timedelta(days=14) - timedelta(seconds=1)).reviewed == 0
    assert _tier(member) == "gold"
    result = tiers_review_due(now=review_at + timedelta(days=14))
    # then
    assert (result.reviewed, result.changed) == (1, 1)
    assert _tier(member) == expected
    change = TierChange.objects.latest("id")
    assert (change.from_tier.code, change.to_tier.code, change.reason) == ("gold", expected, "downgrade")


def test_activity_in_the_grace_days_counts_for_the_review(program, member):
    # given
    _ladder(program, tier_grace_days=14)
    _buy(program, member, "5000", key="p1")
    review_at = TierStatus.objects.get(member=member).review_at
    # when: a big purchase during the grace days (period of April 2026 starts before the grace ends)
    _buy(program, member, "5000", key="p2", at=review_at + timedelta(days=3))
    tiers_review_due(now=review_at + timedelta(days=14))
    # then
    assert _tier(member) == "gold"


def test_a_review_run_twice_changes_nothing_the_second_time(program):
    # given
    _ladder(program)
    members = [MemberFactory(program=program) for _ in range(3)]
    for i, m in enumerate(members):
        _buy(program, m, "5000", key=f"p{i}")
    later = TierStatus.objects.first().review_at + timedelta(hours=1)
    first = tiers_review_due(now=later, batch_size=2)
    snapshot = list(TierStatus.objects.order_by("pk").values_list("tier_id", "since", "review_at"))
    changes = TierChange.objects.count()
    # when
    second = tiers_review_due(now=later, batch_size=2)
    # then
    assert (first.reviewed, first.changed) == (3, 3)
    assert (second.reviewed, second.changed) == (0, 0)
    assert list(TierStatus.objects.order_by("pk").values_list("tier_id", "since", "review_at")) == snapshot
    assert TierChange.objects.count() == changes


@pytest.mark.parametrize("window", Program.TierWindow.values)
@pytest.mark.parametrize("mode", Program.TierDowngrade.values)
def test_the_set_based_review_agrees_with_the_row_by_row_rules(program, window, mode):
    # given: members in different zones, enrolled on awkward days, with different activity
    _ladder(program, tier_window=window, tier_downgrade=mode, tier_grace_days=3)
    people = []
    for i, (tz, enrolled) in enumerate(
        [
            ("Europe/Stockholm", datetime(2024, 2, 29, 23, 30, tzinfo=UTC)),
            ("Pacific/Auckland", datetime(2023, 12, 31, 11, 0, tzinfo=UTC)),
            ("America/New_York", datetime(2024, 1, 31, 4, 0, tzinfo=UTC)),
            ("UTC", datetime(2024, 7, 15, tzinfo=UTC)),
        ]
    ):
        m = MemberFactory(program=program, timezone=tz, enrolled_at=enrolled)
        _buy(program, m, "6000", key=f"up{i}", at=datetime(2024, 8, 1, tzinfo=UTC))
        for j, month in enumerate(range(1, 1 + i * 3)):
            _buy(program, m, str(400 * i), key=f"a{i}-{j}", at=datetime(2025, month, 28, 23, tzinfo=UTC))
        people.append(m)
    when = datetime(2027, 6, 1, tzinfo=UTC)

    def run(set_based):
        with transaction.atomic():
            result = tiers_review_due(now=when, batch_size=3, set_based=set_based)
            state = list(TierStatus.objects.order_by("pk").values_list("member_id", "tier_id", "review_at", "since"))
            history = list(
                TierChange.objects.order_by("member_id", "id").values_list(
                    "member_id", "from_tier_id", "to_tier_id", "reason"
                )
            )
            transaction.set_rollback(True)
        return result, state, history

    # when
    set_based, row_by_row = run(True), run(False)
    # then
    assert set_based[0].reviewed == len(people)
    assert set_based == row_by_row


def test_a_manual_tier_holds_until_its_end_and_then_the_window_decides(program, member, django_user_model):
    # given
    _, silver, gold = _ladder(program)
    staff = django_user_model.objects.create_user("staff")
    _buy(program, member, "1200", key="p1")
    until = NOW + timedelta(days=30)
    # when
    change = tier_set_manual(member=member, tier=gold, reason="Goodwill", until=until, staff_user=staff, now=NOW)
    # then
    assert (change.from_tier_id, change.to_tier_id, change.reason, change.staff_user) == (
        silver.pk,
        gold.pk,
        "manual",
        staff,
    )
    assert tiers_review_due(now=until - timedelta(seconds=1)).manual_expired == 0
    assert _tier(member) == "gold"
    result = tiers_review_due(now=until)
    assert result.manual_expired == 1
    status = TierStatus.objects.get(member=member)
    assert (status.tier_id, status.manual_until, status.manual_reason) == (silver.pk, None, "")
    expired = TierChange.objects.latest("id")
    assert (expired.from_tier_id, expired.to_tier_id, expired.reason) == (gold.pk, silver.pk, "manual_expired")
    assert tiers_review_due(now=until).manual_expired == 0


def test_a_manual_tier_needs_a_reason_and_a_future_end_and_writes_nothing_otherwise(program, member):
    # given
    _, _, gold = _ladder(program)
    # when / then
    with pytest.raises(InvalidInput) as err:
        tier_set_manual(member=member, tier=gold, reason=" ", until=NOW - timedelta(days=1), now=NOW)
    assert set(err.value.errors) == {"reason", "until"}
    assert not TierStatus.objects.exists()
    assert not TierChange.objects.exists()


def test_by_default_a_return_keeps_the_tier_until_the_review(program, member):
    # given
    _ladder(program)
    _buy(program, member, "5000", key="p1")
    # when
    _return(program, member, "5000", key="r1", original="p1")
    # then
    assert _tier(member) == "gold"
    counter = TierCounter.objects.get()
    assert (counter.points, counter.spend_cents, counter.purchases) == (0, 0, 0)
    assert tier_progress_get(member=member, now=NOW).value == 0


def test_a_programme_may_re_evaluate_the_tier_at_once_on_a_return(program, member):
    # given
    _ladder(program, tier_return_policy=Program.TierReturnPolicy.REEVALUATE)
    _buy(program, member, "5000", key="p1")
    # when
    _return(program, member, "3000", key="r1", original="p1")
    # then
    assert _tier(member) == "silver"
    change = TierChange.objects.latest("id")
    assert (change.from_tier.code, change.to_tier.code, change.reason) == ("gold", "silver", "return")


def test_only_a_full_return_takes_a_purchase_off_the_count(program, member):
    # given
    _ladder(program, tier_measure=Program.TierMeasure.PURCHASES)
    _buy(program, member, "100", key="p1")
    # when
    _return(program, member, "40", key="r1", original="p1")
    # then
    assert TierCounter.objects.get().purchases == 1
    _return(program, member, "60", key="r2", original="p1")
    assert TierCounter.objects.get().purchases == 0


def test_a_return_lowers_the_period_of_the_purchase_it_returns(program, member):
    # given
    _ladder(program)
    _buy(program, member, "700", key="p1", at=datetime(2025, 1, 15, tzinfo=UTC), now=NOW)
    # when
    _return(program, member, "700", key="r1", original="p1")
    # then
    assert list(TierCounter.objects.values_list("period", "points")) == [(date(2025, 1, 1), 0)]


@pytest.mark.parametrize(
    "change, error",
    [
        ({"code": "silver", "rank": 5, "threshold": Decimal(9000)}, TierCodeTaken),
        ({"code": "SILVER", "rank": 5, "threshold": Decimal(9000)}, TierCodeTaken),
        ({"code": "plat", "rank": 2, "threshold": Decimal(9000)}, TierRankTaken),
        ({"code": "plat", "rank": 3, "threshold": Decimal(4000)}, TierThresholdsNotIncreasing),
        ({"code": "bronze", "rank": 1, "threshold": Decimal(500)}, TierRankTaken),
        ({"code": "plat", "rank": 3, "threshold": Decimal(9000), "earn_multiplier": Decimal("0.9")}, InvalidInput),
        ({"code": "plat", "rank": 3, "threshold": Decimal("9000.5")}, InvalidInput),
        ({"code": "bad code", "rank": 3, "threshold": Decimal(9000)}, InvalidInput),
    ],
)
def test_bad_tier_definitions_are_refused_and_write_nothing(program, change, error):
    # given
    _ladder(program)
    before = list(Tier.objects.order_by("pk").values())
    # when
    with pytest.raises(error) as err:
        tier_create(program=program, name_en="Platinum", **change)
    # then
    assert err.value.detail
    assert issubclass(error, Conflict) == (err.value.status == 409)
    assert list(Tier.objects.order_by("pk").values()) == before


def test_switching_to_a_whole_number_measure_is_refused_while_thresholds_have_cents(program):
    # given
    program_settings_update(program=program, tier_measure=Program.TierMeasure.SPEND)
    tier_create(program=program, code="silver", name_en="Silver", rank=1, threshold=Decimal("999.50"))
    # when
    with pytest.raises(InvalidInput):
        program_settings_update(program=program, tier_measure=Program.TierMeasure.POINTS)
    # then
    program.refresh_from_db()
    assert program.tier_measure == Program.TierMeasure.SPEND
