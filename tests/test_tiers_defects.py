"""Tiers: a manual tier that ends gives back the tier earned before it, a return under the re-evaluate policy judges
the window that earned the tier, and activity from before the programme had tiers counts once it has them."""

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest
from django.db import transaction
from django.utils import timezone

from core.models import Program
from loyalty import tier_counts, tier_setup
from loyalty.tier_models import TierChange, TierCounter, TierStatus
from loyalty.tier_selectors import tier_progress_get
from loyalty.tier_setup import program_settings_update, tier_create
from loyalty.tier_windows import first_review_at
from loyalty.tiers import tier_set_manual, tiers_review_due
from tests.factories import MemberFactory, record

JUNE = datetime(2025, 6, 10, 12, 0, tzinfo=UTC)
FEB = datetime(2026, 2, 10, 12, 0, tzinfo=UTC)


LADDER = [("member", 0), ("silver", 1000), ("gold", 5000), ("plat", 20000)]


def _ladder(program, now=None, *, base_last=False, **settings):
    """Member, Silver, Gold, Platinum; created in rank order, or with the base tier last, so that the first tier
    created is one a member can move up to."""
    if settings:
        program_settings_update(program=program, **settings)
    order = [*range(1, len(LADDER)), 0] if base_last else range(len(LADDER))
    made = {}
    for rank in order:
        code, threshold = LADDER[rank]
        made[rank] = tier_create(
            program=program, code=code, name_en=code.title(), rank=rank, threshold=Decimal(threshold), now=now
        )
    return [made[rank] for rank in range(len(LADDER))]


def _buy(program, member, total, *, key, at):
    return record(program, member, total, external_id=key, at=at)


def _return(program, member, total, *, key, original, at):
    return record(program, member, total, external_id=key, kind="return", original=original, at=at)


def _status(member):
    status = TierStatus.objects.filter(member=member).select_related("tier").first()
    return (status.tier.code if status and status.tier else None), status


def _history(member):
    return list(
        TierChange.objects.filter(member=member)
        .order_by("id")
        .values_list("from_tier__code", "to_tier__code", "reason")
    )


def _counters(member):
    return list(
        TierCounter.objects.filter(member=member)
        .order_by("period")
        .values_list("period", "points", "spend_cents", "purchases")
    )


# A manual tier that ends


def test_a_manual_tier_that_ends_gives_back_the_earned_tier_until_its_review(program, member):
    # given: Gold earned in 2025 under the calendar-year window, reviewed on 1 January 2027
    _, _, gold, plat = _ladder(program, tier_window=Program.TierWindow.CALENDAR_YEAR)
    _buy(program, member, "5000", key="p1", at=JUNE)
    earned_review = datetime(2027, 1, 1, tzinfo=member.tz)
    assert _status(member)[1].review_at == earned_review
    tier_set_manual(
        member=member, tier=plat, reason="Goodwill", until=datetime(2026, 2, 1, tzinfo=UTC), now=FEB - timedelta(31)
    )
    # when
    result = tiers_review_due(now=datetime(2026, 2, 1, 1, tzinfo=UTC))
    # then: Gold again, with the review date it had; nothing reviewed or moved down early
    code, status = _status(member)
    assert (result.manual_expired, result.reviewed, result.changed) == (1, 0, 0)
    assert (code, status.review_at, status.manual_until, status.manual_reason) == ("gold", earned_review, None, "")
    assert _history(member) == [
        ("member", "gold", "upgrade"),
        ("gold", "plat", "manual"),
        ("plat", "gold", "manual_expired"),
    ]
    assert tier_progress_get(member=member, now=FEB).review_at == earned_review
    # and at its review date the review decides: nothing in 2026, one step down
    assert tiers_review_due(now=earned_review - timedelta(seconds=1)).reviewed == 0
    assert tiers_review_due(now=earned_review).changed == 1
    assert _status(member)[0] == "silver"


def test_a_manual_tier_that_ends_gives_the_higher_tier_the_window_supports_by_then(program, member):
    # given: Silver earned, then Platinum by hand, and purchases for Gold while it lasts
    _, silver, gold, plat = _ladder(program, tier_window=Program.TierWindow.CALENDAR_YEAR)
    _buy(program, member, "1000", key="p1", at=JUNE)
    until = JUNE + timedelta(days=60)
    tier_set_manual(member=member, tier=plat, reason="Goodwill", until=until, now=JUNE + timedelta(days=1))
    _buy(program, member, "4000", key="p2", at=JUNE + timedelta(days=2))
    assert _status(member)[0] == "plat"  # Gold is below the manual tier: no upgrade while it lasts
    # when
    tiers_review_due(now=until)
    # then: Gold, reviewed as if reached now
    code, status = _status(member)
    assert (code, status.review_at) == ("gold", first_review_at(program=program, member=member, since=until))
    assert _history(member)[-1] == ("plat", "gold", "manual_expired")


def test_while_a_manual_tier_lasts_the_member_sees_no_review_date(program, member):
    # given
    _, _, gold, plat = _ladder(program)
    _buy(program, member, "5000", key="p1", at=JUNE)
    # when
    tier_set_manual(member=member, tier=plat, reason="Goodwill", until=JUNE + timedelta(days=30), now=JUNE)
    # then
    progress = tier_progress_get(member=member, now=JUNE)
    assert (progress.tier.code, progress.review_at, progress.manual_until) == (
        "plat",
        None,
        JUNE + timedelta(days=30),
    )


# A return under the re-evaluate policy


def test_a_return_in_the_next_window_keeps_the_tier_the_previous_window_earned(program, member):
    # given: Gold earned in 2025, reviewed on 1 January 2027
    _ladder(
        program,
        tier_window=Program.TierWindow.CALENDAR_YEAR,
        tier_return_policy=Program.TierReturnPolicy.REEVALUATE,
    )
    _buy(program, member, "5000", key="big", at=JUNE)
    _buy(program, member, "100", key="small", at=FEB)
    # when: a 2026 purchase, which never counted towards Gold, is returned
    _return(program, member, "100", key="small-ret", original="small", at=FEB + timedelta(hours=1))
    # then
    code, status = _status(member)
    assert (code, status.review_at) == ("gold", datetime(2027, 1, 1, tzinfo=member.tz))
    assert _history(member) == [("member", "gold", "upgrade")]
    assert _counters(member) == [(date(2025, 6, 1), 5000, 500000, 1), (date(2026, 2, 1), 0, 0, 0)]


@pytest.mark.parametrize(
    "mode, expected", [(Program.TierDowngrade.ONE_STEP, "gold"), (Program.TierDowngrade.TO_SUPPORTED, "silver")]
)
def test_a_return_that_lowers_the_window_that_earned_the_tier_moves_down_by_the_programmes_rule(
    program, member, mode, expected
):
    # given: Platinum earned in 2025
    _ladder(
        program,
        tier_window=Program.TierWindow.CALENDAR_YEAR,
        tier_return_policy=Program.TierReturnPolicy.REEVALUATE,
        tier_downgrade=mode,
    )
    _buy(program, member, "20000", key="big", at=JUNE)
    _buy(program, member, "500", key="other", at=JUNE)
    # when: most of it comes back in 2026; 2025 then supports Silver, 2026 nothing
    _return(program, member, "18500", key="ret", original="big", at=FEB)
    # then: down one step, or to Silver, which 2025 still supports; reviewed when Platinum would have been
    code, status = _status(member)
    assert (code, status.review_at) == (expected, datetime(2027, 1, 1, tzinfo=member.tz))
    change = TierChange.objects.latest("id")
    assert (change.from_tier.code, change.to_tier.code, change.reason) == ("plat", expected, "return")
    assert change.transaction.external_id == "ret"


def test_a_return_that_the_current_window_still_outweighs_changes_nothing(program, member):
    # given: Gold earned in 2025, and enough for Gold again in 2026
    _ladder(
        program,
        tier_window=Program.TierWindow.CALENDAR_YEAR,
        tier_return_policy=Program.TierReturnPolicy.REEVALUATE,
        tier_downgrade=Program.TierDowngrade.TO_SUPPORTED,
    )
    _buy(program, member, "5000", key="p1", at=JUNE)
    _buy(program, member, "6000", key="p2", at=FEB)
    # when
    _return(program, member, "5000", key="r1", original="p1", at=FEB + timedelta(days=1))
    # then
    assert _status(member)[0] == "gold"
    assert _history(member) == [("member", "gold", "upgrade")]


# Activity from before the programme had tiers


def test_purchases_from_before_the_first_tier_count_once_it_is_created(program, member):
    # given: a programme without tiers
    _buy(program, member, "3000", key="before", at=JUNE)
    assert not TierCounter.objects.exists()
    # when: its first tier
    now = JUNE + timedelta(days=1)
    tier_create(program=program, code="silver", name_en="Silver", rank=1, threshold=Decimal(1000), now=now)
    # then: counted, and the member moved up at once, as a purchase would have moved them
    assert _counters(member) == [(date(2025, 6, 1), 3000, 300000, 1)]
    code, status = _status(member)
    assert (code, status.since, status.review_at) == (
        "silver",
        now,
        first_review_at(program=program, member=member, since=now),
    )
    assert _history(member) == [(None, "silver", "upgrade")]
    assert tier_progress_get(member=member, now=now).value == 3000
    # and a later purchase counts once on top
    _buy(program, member, "10", key="after", at=now)
    assert _counters(member) == [(date(2025, 6, 1), 3010, 301000, 2)]


def test_the_return_of_a_purchase_from_before_the_tiers_never_makes_the_measure_negative(program, member):
    # given
    _buy(program, member, "3000", key="before", at=JUNE)
    _ladder(program, now=JUNE + timedelta(days=1))
    # when
    _return(program, member, "3000", key="ret", original="before", at=JUNE + timedelta(days=2))
    # then
    assert _counters(member) == [(date(2025, 6, 1), 0, 0, 0)]
    assert tier_progress_get(member=member, now=JUNE + timedelta(days=2)).value == 0


def test_the_return_of_a_purchase_that_never_counted_subtracts_nothing(program, member):
    # given: a purchase three years before the tiers, older than any window looks at, and one counted since
    _buy(program, member, "3000", key="old", at=JUNE - timedelta(days=3 * 365))
    _ladder(program, now=JUNE)
    _buy(program, member, "200", key="new", at=JUNE)
    # when
    _return(program, member, "3000", key="ret", original="old", at=JUNE + timedelta(days=1))
    # then
    assert _counters(member) == [(date(2025, 6, 1), 200, 20000, 1)]
    assert not TierCounter.objects.filter(points__lt=0).exists()


@pytest.mark.parametrize("window", Program.TierWindow.values)
def test_the_backfill_counts_what_counting_at_each_purchase_would_have(program, window, monkeypatch):
    # given: members in different zones, enrolled on awkward days, buying around month ends, some returning
    program_settings_update(program=program, tier_window=window)
    people = [
        MemberFactory(program=program, timezone=tz, enrolled_at=enrolled)
        for tz, enrolled in [
            ("Europe/Stockholm", datetime(2024, 2, 29, 12, 0, tzinfo=UTC)),
            ("Pacific/Auckland", datetime(2023, 12, 31, 11, 0, tzinfo=UTC)),
            ("America/New_York", datetime(2024, 1, 31, 4, 0, tzinfo=UTC)),
        ]
    ]
    now = datetime(2025, 4, 5, tzinfo=UTC)

    def activity():
        for i, m in enumerate(people):
            for n in range(13):  # March 2024 to March 2025
                at = datetime(2024 + (2 + n) // 12, (2 + n) % 12 + 1, 28, 23, 30, tzinfo=UTC) + timedelta(days=i)
                _buy(program, m, str(300 * (i + 1)), key=f"p{i}-{n}", at=at)
            # the last days of a February and the days before the anchor day in March: clamped anniversary periods
            _buy(program, m, "70", key=f"f{i}", at=datetime(2025, 2, 28, 15, tzinfo=UTC))
            _buy(program, m, "80", key=f"m{i}", at=datetime(2025, 3, 10, 12, tzinfo=UTC))
            _return(program, m, "40", key=f"r{i}-a", original=f"p{i}-0", at=now - timedelta(days=2))
            _return(program, m, str(300 * (i + 1)), key=f"r{i}-b", original=f"p{i}-10", at=now - timedelta(days=2))
            _buy(program, m, "0", key=f"z{i}", at=now - timedelta(days=1))

    def run(*, tiers_first, set_based=True):
        with transaction.atomic():
            program.refresh_from_db()
            if not set_based:
                rows = tier_setup.tier_counters_backfill
                monkeypatch.setattr(tier_setup, "tier_counters_backfill", lambda **kw: rows(**kw, set_based=False))
            if tiers_first:
                _ladder(program, now=now)
            activity()
            if not tiers_first:
                _ladder(program, now=now, base_last=True)
            monkeypatch.undo()
            counters = list(
                TierCounter.objects.order_by("member_id", "period").values_list(
                    "member_id", "period", "points", "spend_cents", "purchases"
                )
            )
            statuses = list(
                TierStatus.objects.order_by("member_id").values_list(
                    "member_id", "tier__code", "since", "review_at", "manual_until"
                )
            )
            history = list(
                TierChange.objects.order_by("member_id", "id").values_list(
                    "member_id", "from_tier__code", "to_tier__code", "reason", "occurred_at"
                )
            )
            # what each member has yet to earn for the next tier: nothing reached and not moved up to
            needed = [tier_progress_get(member=m, program=program, now=now).needed for m in people]
            transaction.set_rollback(True)
        return counters, statuses, history, needed

    # when
    live = run(tiers_first=True)
    set_based = run(tiers_first=False)
    row_by_row = run(tiers_first=False, set_based=False)
    # then: the counters that counting each purchase and return gave; upgrades at `now`, as a purchase would make them
    assert set_based[0] == live[0]
    assert len(set_based[0]) >= 3 * 13
    assert set_based == row_by_row
    assert set_based[1] and all(code in ("silver", "gold") for _, code, *_ in set_based[1])
    assert all(needed is None or needed > 0 for needed in set_based[3])
    assert all((reason, at) == ("upgrade", now) for *_, reason, at in set_based[2])
    for member_id, _, since, review_at, manual_until in set_based[1]:
        member = next(m for m in people if m.pk == member_id)
        assert (since, review_at, manual_until) == (
            now,
            first_review_at(program=program, member=member, since=now),
            None,
        )


def test_a_new_window_recounts_the_periods_and_moves_up_who_qualifies_in_it(program):
    # given: a rolling three-month window; purchases in January and May, and a member already Silver
    member, kept = (
        MemberFactory(program=program, timezone="Europe/Stockholm", enrolled_at=datetime(2023, 1, 10, 12, tzinfo=UTC))
        for _ in range(2)
    )
    _ladder(program, tier_window_months=3)
    _buy(program, member, "600", key="jan", at=datetime(2025, 1, 20, tzinfo=UTC))
    _buy(program, member, "600", key="may", at=datetime(2025, 5, 20, tzinfo=UTC))
    _buy(program, kept, "1200", key="kept", at=datetime(2025, 5, 20, tzinfo=UTC))
    kept_before = TierStatus.objects.filter(member=kept).values_list("tier_id", "since", "review_at").get()
    assert (_status(member)[0], _status(kept)[0]) == (None, "silver")
    # when: the anniversary year from 10 January 2025 holds both
    now = datetime(2025, 6, 1, tzinfo=UTC)
    program_settings_update(program=program, tier_window=Program.TierWindow.ANNIVERSARY_YEAR, now=now)
    # then: periods start on the 10th, and the member is Silver at once, reviewed after the next anniversary year
    assert _counters(member) == [(date(2025, 1, 10), 600, 60000, 1), (date(2025, 5, 10), 600, 60000, 1)]
    code, status = _status(member)
    assert (code, status.since, status.review_at) == ("silver", now, datetime(2027, 1, 10, tzinfo=member.tz))
    assert _history(member) == [("member", "silver", "upgrade")]
    # and a member already at the tier their new window supports is left as they were
    assert TierStatus.objects.filter(member=kept).values_list("tier_id", "since", "review_at").get() == kept_before
    assert _history(kept) == [("member", "silver", "upgrade")]


def _program_form(program, **changes) -> dict:
    """The admin's change form for the programme as a browser sends it, with `changes`."""
    from core.admin import ProgramForm

    form = ProgramForm(instance=program)
    data = {name: form[name].value() for name in form.fields}
    data = {name: "on" if value is True else value for name, value in data.items() if value not in (None, "")}
    data = {name: value for name, value in data.items() if value is not False}  # an unticked box is not sent
    return {**data, **changes}


def test_a_window_changed_in_the_admin_recounts_and_moves_up_at_once_as_over_the_api(program, member, admin_client):
    # given: a three-month window, in which neither of two 600 purchases five months apart reaches Silver
    now = timezone.now()
    _ladder(program, tier_window_months=3)
    _buy(program, member, "600", key="1", at=now - timedelta(days=150))
    _buy(program, member, "600", key="2", at=now - timedelta(days=5))
    assert _status(member)[0] is None  # the base tier: no row
    # when: staff widen the window to twelve months
    response = admin_client.post(
        f"/admin/core/program/{program.pk}/change/", _program_form(program, tier_window_months=12)
    )
    # then
    assert response.status_code == 302
    program.refresh_from_db()
    assert program.tier_window_months == 12
    assert _status(member)[0] == "silver"


def test_a_measure_the_tiers_thresholds_do_not_fit_is_a_form_error_in_the_admin(program, admin_client):
    # given: a Silver threshold of 999.50, which only money can reach
    _ladder(program, tier_measure=Program.TierMeasure.SPEND)
    tier_setup.tier_update(tier=tier_setup.Tier.objects.get(code="silver"), threshold=Decimal("999.50"))
    # when
    response = admin_client.post(
        f"/admin/core/program/{program.pk}/change/", _program_form(program, tier_measure="purchases")
    )
    # then
    assert response.status_code == 200 and "not whole" in response.content.decode()
    program.refresh_from_db()
    assert program.tier_measure == Program.TierMeasure.SPEND


@pytest.mark.parametrize("set_based", [True, False])
def test_a_tier_added_or_lowered_moves_up_at_once_whoever_it_fits(program, member, set_based, monkeypatch):
    # given: a member at 26,000 points in Platinum, and another at 400 in the base tier
    if not set_based:  # as on SQLite, member by member
        monkeypatch.setattr(tier_counts.connection, "vendor", "sqlite")
    now = timezone.now()
    _ladder(program)
    other = MemberFactory(program=program)
    _buy(program, member, "26000", key="1", at=now - timedelta(days=3))
    _buy(program, other, "400", key="2", at=now - timedelta(days=3))
    # when: a tier above Platinum at 25,000, then Silver lowered to 300
    tier_create(program=program, code="diamond", name_en="Diamond", rank=4, threshold=Decimal(25000), now=now)
    tier_setup.tier_update(tier=tier_setup.Tier.objects.get(code="silver"), threshold=Decimal(300), now=now)
    # then
    assert _status(member)[0] == "diamond"
    assert _status(other)[0] == "silver"
    assert _history(member)[-1] == ("plat", "diamond", TierChange.Reason.UPGRADE)
    assert _history(other) == [("member", "silver", TierChange.Reason.UPGRADE)]


def test_a_tier_raised_or_renamed_moves_nobody(program, member):
    # given: a member in Silver
    now = timezone.now()
    silver = _ladder(program)[1]
    _buy(program, member, "1200", key="1", at=now - timedelta(days=3))
    before = _history(member)
    # when
    tier_setup.tier_update(tier=silver, threshold=Decimal(1500), name_en="Sølv", now=now)
    # then: moving down waits for the review
    assert _status(member)[0] == "silver"
    assert _history(member) == before


def _event(program, member, code, key, at):
    from loyalty.events import event_record

    return event_record(
        program=program, member=member, event_code=code, external_id=key, occurred_at=at, attributes={}, now=at
    )


def test_only_the_points_of_qualifying_event_types_count_toward_tiers(program, member):
    # given: 900 points from purchases, a survey whose 200 points do not qualify and a review whose 150 do
    from loyalty.event_services import event_type_create

    now = timezone.now()
    _ladder(program)
    event_type_create(program=program, code="survey", name="Survey", points=200)
    event_type_create(program=program, code="review", name="Review", points=150, qualifying=True)
    _buy(program, member, "900", key="1", at=now - timedelta(days=3))
    # when
    _event(program, member, "survey", "s1", now - timedelta(days=2))
    after_survey = _status(member)[0]
    _event(program, member, "review", "r1", now - timedelta(days=1))
    # then
    assert after_survey is None
    assert _status(member)[0] == "silver"
    assert sum(TierCounter.objects.filter(member=member).values_list("points", flat=True)) == 1050
    assert tier_progress_get(member=member, now=now).value == 1050


@pytest.mark.parametrize("set_based", [True, False])
def test_the_backfill_counts_the_points_of_qualifying_events(program, member, set_based, monkeypatch):
    # given: before the programme had tiers, 900 points of purchases and a qualifying 150-point review
    from loyalty.event_services import event_type_create

    if not set_based:
        monkeypatch.setattr(tier_counts.connection, "vendor", "sqlite")
    now = timezone.now()
    event_type_create(program=program, code="survey", name="Survey", points=200)
    event_type_create(program=program, code="review", name="Review", points=150, qualifying=True)
    _buy(program, member, "900", key="1", at=now - timedelta(days=3))
    _event(program, member, "survey", "s1", now - timedelta(days=2))
    _event(program, member, "review", "r1", now - timedelta(days=1))
    # when
    _ladder(program, now=now)
    # then
    assert _status(member)[0] == "silver"
    assert sum(TierCounter.objects.filter(member=member).values_list("points", flat=True)) == 1050


def test_an_event_counts_toward_tiers_as_its_type_was_when_it_was_recorded_also_after_a_recount(program, member):
    # given: a review recorded while reviews did not qualify, and a survey recorded while surveys did
    from loyalty.event_services import event_type_create, event_type_update

    now = timezone.now()
    _ladder(program)
    review = event_type_create(program=program, code="review", name="Review", points=150)
    survey = event_type_create(program=program, code="survey", name="Survey", points=40, qualifying=True)
    _event(program, member, "review", "r1", now - timedelta(days=2))
    _event(program, member, "survey", "s1", now - timedelta(days=2))
    event_type_update(event_type=review, qualifying=True)
    event_type_update(event_type=survey, qualifying=False)
    counted = sum(TierCounter.objects.filter(member=member).values_list("points", flat=True))
    # when: a new window recounts the counters, and the old one again
    program_settings_update(program=program, tier_window=Program.TierWindow.CALENDAR_YEAR)
    program_settings_update(program=program, tier_window=Program.TierWindow.ROLLING)
    # then
    assert counted == 40
    assert sum(TierCounter.objects.filter(member=member).values_list("points", flat=True)) == 40
