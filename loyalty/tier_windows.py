"""Calendar arithmetic of tier windows, in the member's own time zone.

Qualifying activity is counted per period: calendar months for rolling and calendar-year windows, and for
anniversary windows months that start on the member's enrolment day (clamped to the month's last day, so a member
enrolled on 29 February has periods starting on the 28th in February of common years). Every window boundary is a
period boundary, so summing whole periods is exact to the day.

The review of a tier reached at `since` is at the end of the qualification period that follows the one it was
reached in; there the member keeps it if that period supports it. loyalty.tier_review does the same arithmetic in
SQL; tests check that the two agree."""

import calendar
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from dateutil.relativedelta import relativedelta

from core.models import Program
from members.models import Member


def _clamped(year: int, month: int, day: int) -> date:
    return date(year, month, min(day, calendar.monthrange(year, month)[1]))


def anchor_day(*, program: Program, member: Member) -> int:
    """The day of the month periods start on: 1, or the member's enrolment day for anniversary windows."""
    if program.tier_window == Program.TierWindow.ANNIVERSARY_YEAR:
        return member.enrolled_at.astimezone(member.tz).day
    return 1


def period_of(local_day: date, anchor: int) -> date:
    """The first day of the period `local_day` falls in."""
    start = _clamped(local_day.year, local_day.month, anchor)
    if local_day >= start:
        return start
    previous = local_day.replace(day=1) - relativedelta(months=1)
    return _clamped(previous.year, previous.month, anchor)


def anniversary(*, member: Member, year: int) -> date:
    """The member's enrolment anniversary in `year` (28 February in common years for a 29 February enrolment)."""
    enrolled = member.enrolled_at.astimezone(member.tz).date()
    return enrolled + relativedelta(years=year - enrolled.year)


def current_window_start(*, program: Program, member: Member, now: datetime) -> date:
    """First period of the window that counts for moving up at `now`."""
    today = now.astimezone(member.tz).date()
    if program.tier_window == Program.TierWindow.CALENDAR_YEAR:
        return date(today.year, 1, 1)
    if program.tier_window == Program.TierWindow.ANNIVERSARY_YEAR:
        this_year = anniversary(member=member, year=today.year)
        return this_year if this_year <= today else anniversary(member=member, year=today.year - 1)
    # Rolling N months: this month and the N-1 before it.
    return today.replace(day=1) - relativedelta(months=program.tier_window_months - 1)


def _local_midnight(day: date, tz: ZoneInfo) -> datetime:
    return datetime.combine(day, time.min, tzinfo=tz)


def first_review_at(*, program: Program, member: Member, since: datetime) -> datetime:
    """When a tier reached at `since` is first reviewed: after the whole next qualification period."""
    tz = member.tz
    today = since.astimezone(tz).date()
    if program.tier_window == Program.TierWindow.CALENDAR_YEAR:
        return _local_midnight(date(today.year + 2, 1, 1), tz)
    if program.tier_window == Program.TierWindow.ANNIVERSARY_YEAR:
        start = current_window_start(program=program, member=member, now=since)
        years_since_enrolment = start.year - member.enrolled_at.astimezone(tz).year
        # Counted from the enrolment date, never from an earlier clamped anniversary: 29 Feb stays 29 Feb.
        enrolled = member.enrolled_at.astimezone(tz).date()
        return _local_midnight(enrolled + relativedelta(years=years_since_enrolment + 2), tz)
    return _local_midnight(today.replace(day=1) + relativedelta(months=program.tier_window_months + 1), tz)


def next_review_at(*, program: Program, member: Member, review_at: datetime) -> datetime:
    """The review after the one at `review_at`: one qualification period later."""
    tz = member.tz
    day = review_at.astimezone(tz).date()
    if program.tier_window == Program.TierWindow.CALENDAR_YEAR:
        return _local_midnight(date(day.year + 1, 1, 1), tz)
    if program.tier_window == Program.TierWindow.ANNIVERSARY_YEAR:
        enrolled = member.enrolled_at.astimezone(tz).date()
        return _local_midnight(enrolled + relativedelta(years=day.year - enrolled.year + 1), tz)
    return _local_midnight(day.replace(day=1) + relativedelta(months=program.tier_window_months), tz)


def review_window(*, program: Program, member: Member, review_at: datetime) -> tuple[date, date]:
    """The periods a review at `review_at` counts: [start, end). The grace days extend the end, so that activity
    during them still counts."""
    tz = member.tz
    day = review_at.astimezone(tz).date()
    if program.tier_window == Program.TierWindow.CALENDAR_YEAR:
        start = date(day.year - 1, 1, 1)
    elif program.tier_window == Program.TierWindow.ANNIVERSARY_YEAR:
        enrolled = member.enrolled_at.astimezone(tz).date()
        start = enrolled + relativedelta(years=day.year - enrolled.year - 1)
    else:
        start = day - relativedelta(months=program.tier_window_months)
    return start, day + relativedelta(days=program.tier_grace_days)


def earning_window(*, program: Program, member: Member, review_at: datetime) -> tuple[date, date]:
    """The periods that hold a tier until its review at `review_at`: [start, end), the window before the one that
    review counts. A tier reached by moving up was reached in it (see first_review_at); one kept at a review was
    kept on it."""
    end, _ = review_window(program=program, member=member, review_at=review_at)
    day = review_at.astimezone(member.tz).date()
    if program.tier_window == Program.TierWindow.CALENDAR_YEAR:
        return date(day.year - 2, 1, 1), end
    if program.tier_window == Program.TierWindow.ANNIVERSARY_YEAR:
        enrolled = member.enrolled_at.astimezone(member.tz).date()
        return enrolled + relativedelta(years=day.year - enrolled.year - 2), end
    return day - relativedelta(months=2 * program.tier_window_months), end


def counted_since(*, program: Program, now: datetime) -> date:
    """The first period that any member's current window, or the window before it, can hold at `now`: what moving
    up, a return's re-evaluation and the reviews due about now read. A day early, for every time zone's today."""
    day = (now.astimezone(UTC) - timedelta(days=1)).date()
    if program.tier_window == Program.TierWindow.CALENDAR_YEAR:
        return date(day.year - 1, 1, 1)
    if program.tier_window == Program.TierWindow.ANNIVERSARY_YEAR:
        return day - relativedelta(years=2, days=1)
    return day.replace(day=1) - relativedelta(months=2 * program.tier_window_months - 1)
