"""Time rules: formulas.md §7, R4, R6, R7, R9, SAE clock (PROTOCOL §7)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal

import pytest

from sle_events.domain import formulas as f
from sle_events.domain.errors import (
    FutureTimestamp,
    InconsistentTimestamps,
    NaiveTimestamp,
    OutsideWindow,
    ProtocolViolation,
    UnknownVisit,
)
from sle_events.domain.formulas import SaeReportStatus
from sle_events.domain.quantities import display
from sle_events.domain.settings import StudySettings

CST = timezone(timedelta(hours=8))
CYC_START = datetime.fromisoformat("2025-03-10T08:00:00+08:00")


# --------------------------------------------------------------------------- CYC → MSC
@pytest.mark.parametrize(
    ("fid", "msc_start", "hours", "accept"),
    [
        ("W1", "2025-03-11T09:30:00+08:00", "25.50", True),
        ("W2", "2025-03-11T01:00:00+00:00", "25.00", True),
        ("W3", "2025-03-10T20:00:00+08:00", "12.00", False),
        ("W4", "2025-03-11T22:00:00+08:00", "38.00", False),
    ],
)
def test_cyc_msc_window_fixtures(fid, msc_start, hours, accept):
    msc = datetime.fromisoformat(msc_start)
    h = f.cyc_to_msc_hours(CYC_START, msc)
    assert display(h) == hours
    assert f.cyc_msc_interval_ok(CYC_START, msc) is accept
    if accept:
        assert f.check_cyc_msc_interval(CYC_START, msc) == h
    else:
        with pytest.raises(OutsideWindow) as exc:
            f.check_cyc_msc_interval(CYC_START, msc)
        msg = str(exc.value)
        assert "CYC→MSC interval" in msg and "18–36 h" in msg and format(h, "f") in msg
        assert exc.value.bound == (Decimal(18), Decimal(36))


def test_cyc_msc_window_boundaries_inclusive():
    assert f.cyc_msc_interval_ok(CYC_START, CYC_START + timedelta(hours=18))
    assert f.cyc_msc_interval_ok(CYC_START, CYC_START + timedelta(hours=36))
    assert not f.cyc_msc_interval_ok(CYC_START, CYC_START + timedelta(hours=36, microseconds=1))
    assert not f.cyc_msc_interval_ok(CYC_START, CYC_START + timedelta(hours=18) - timedelta(microseconds=1))
    s = StudySettings(cyc_msc_window_min_hours="20", cyc_msc_window_max_hours="30")
    assert not f.cyc_msc_interval_ok(CYC_START, CYC_START + timedelta(hours=19), settings=s)


def test_hours_are_exact():
    assert f.cyc_to_msc_hours(CYC_START, CYC_START + timedelta(minutes=1)) == Decimal(1) / Decimal(60)
    assert f.cyc_to_msc_hours(CYC_START, CYC_START + timedelta(hours=24, minutes=30)) == Decimal("24.5")


def test_naive_timestamps_refused():
    with pytest.raises(NaiveTimestamp) as exc:
        f.cyc_to_msc_hours(datetime(2025, 3, 10, 8), CYC_START)
    assert "cyc_start" in str(exc.value) and "UTC offset" in str(exc.value)


# --------------------------------------------------------------------------- stay
@pytest.mark.parametrize(
    ("discharge", "days", "flagged"),
    [
        (date(2025, 3, 12), 3, False),
        (date(2025, 3, 14), 5, False),
        (date(2025, 3, 16), 7, True),
        (date(2025, 3, 11), 2, True),
    ],
)
def test_length_of_stay_fixtures(discharge, days, flagged):
    los = f.length_of_stay_days(date(2025, 3, 9), discharge)
    assert los == days
    assert f.stay_flagged(los) is flagged


def test_length_of_stay_uses_site_local_calendar_dates():
    adm = datetime(2025, 3, 9, 23, 30, tzinfo=CST)
    dis = datetime(2025, 3, 12, 0, 15, tzinfo=CST)  # 48.75 h later, but 3 calendar days
    assert f.length_of_stay_days(adm, dis) == 3
    with pytest.raises(InconsistentTimestamps):
        f.length_of_stay_days(date(2025, 3, 12), date(2025, 3, 9))


# --------------------------------------------------------------------------- visits
VISIT_FIXTURES = [
    ("M1", 30, "2025-04-10", "2025-04-03", "2025-04-17"),
    ("M3", 90, "2025-06-09", "2025-06-02", "2025-06-16"),
    ("M12", 360, "2026-03-06", "2026-02-27", "2026-03-13"),
    ("M24", 720, "2027-03-01", "2027-02-22", "2027-03-08"),
    ("M30", 900, "2027-08-28", "2027-07-29", "2027-09-27"),
    ("M48", 1440, "2029-02-18", "2029-01-19", "2029-03-20"),
]


@pytest.mark.parametrize(("visit", "day", "target", "earliest", "latest"), VISIT_FIXTURES)
def test_visit_window_fixtures(visit, day, target, earliest, latest):
    w = f.visit_window(date(2025, 3, 11), visit)
    assert (w.visit, w.day) == (visit, day)
    assert w.target == date.fromisoformat(target)
    assert (w.earliest, w.latest) == (date.fromisoformat(earliest), date.fromisoformat(latest))
    assert w.contains(w.earliest) and w.contains(w.latest)
    assert not w.contains(w.earliest - timedelta(days=1))
    assert not w.contains(w.latest + timedelta(days=1))
    assert f.visit_in_window(date(2025, 3, 11), visit, date.fromisoformat(target))


def test_schedule():
    months = f.scheduled_follow_up_months()
    assert months == (*tuple(range(1, 25)), 30, 36, 42, 48)
    assert f.visit_month(12) == 12


@pytest.mark.parametrize("visit", ["M0", "M25", "M49", "M54", "SCR", "m1", "M01x", 25])
def test_unknown_visit(visit):
    with pytest.raises(UnknownVisit) as exc:
        f.visit_window(date(2025, 3, 11), visit)
    shown = f"M{visit}" if isinstance(visit, int) else visit
    assert repr(shown) in str(exc.value) and exc.value.visit == shown


def test_visit_window_accepts_datetime_tx():
    tx = datetime(2025, 3, 11, 9, 30, tzinfo=CST)
    assert f.visit_window(tx, "M1").target == date(2025, 4, 10)


@pytest.mark.parametrize(("when", "dy"), [(date(2025, 3, 11), 2), (date(2025, 3, 10), 1), (date(2025, 3, 9), -1)])
def test_sdtm_study_day(when, dy):
    assert f.study_day(when, date(2025, 3, 10)) == dy


# --------------------------------------------------------------------------- clock skew
def test_future_clock_skew():
    now = datetime(2025, 3, 10, 0, 0, tzinfo=UTC)
    assert f.check_not_in_future("occurred_at", now + timedelta(minutes=5), now)
    assert f.check_not_in_future("occurred_at", now - timedelta(days=400), now)
    later = (now + timedelta(minutes=5, seconds=1)).astimezone(CST)
    with pytest.raises(FutureTimestamp) as exc:
        f.check_not_in_future("occurred_at", later, now)
    assert "occurred_at" in str(exc.value) and "300 s" in str(exc.value)
    assert isinstance(exc.value, ProtocolViolation)
    # configurable
    s = StudySettings(future_clock_skew_minutes=10)
    assert f.check_not_in_future("occurred_at", later, now, settings=s)
    with pytest.raises(NaiveTimestamp):
        f.check_not_in_future("occurred_at", datetime(2025, 3, 10), now)


# --------------------------------------------------------------------------- validity
def test_validity_periods():
    assert f.eligibility_still_valid(date(2025, 1, 1), date(2025, 1, 29))  # 28 d
    assert not f.eligibility_still_valid(date(2025, 1, 1), date(2025, 1, 30))
    assert not f.eligibility_still_valid(date(2025, 1, 2), date(2025, 1, 1))
    assert f.screening_labs_valid(date(2025, 1, 1), date(2025, 1, 29))
    assert not f.screening_labs_valid(date(2025, 1, 1), date(2025, 1, 30))
    assert f.pregnancy_test_valid(CYC_START - timedelta(hours=72), CYC_START)
    assert not f.pregnancy_test_valid(CYC_START - timedelta(hours=72, seconds=1), CYC_START)


# --------------------------------------------------------------------------- SAE clock
AWARE = datetime(2025, 4, 1, 10, 0, tzinfo=CST)


@pytest.mark.parametrize(
    ("reported", "now", "status"),
    [
        (None, AWARE + timedelta(hours=1), SaeReportStatus.OPEN),
        (None, AWARE + timedelta(hours=24), SaeReportStatus.OPEN),  # deadline instant: still open
        (None, AWARE + timedelta(hours=24, seconds=1), SaeReportStatus.OVERDUE),
        (AWARE + timedelta(hours=3), AWARE + timedelta(days=9), SaeReportStatus.REPORTED_ON_TIME),
        (AWARE + timedelta(hours=24), AWARE + timedelta(days=9), SaeReportStatus.REPORTED_ON_TIME),
        (AWARE + timedelta(hours=24, seconds=1), AWARE + timedelta(days=9), SaeReportStatus.REPORTED_LATE),
        (AWARE, AWARE, SaeReportStatus.REPORTED_ON_TIME),
    ],
)
def test_sae_status(reported, now, status):
    assert f.sae_report_status(AWARE, reported, now) is status


def test_sae_status_offsets_cancel_and_errors():
    reported = (AWARE + timedelta(hours=23)).astimezone(UTC)
    assert f.sae_report_status(AWARE, reported, reported) is SaeReportStatus.REPORTED_ON_TIME
    assert f.sae_report_due_at(AWARE) == AWARE + timedelta(hours=24)
    with pytest.raises(InconsistentTimestamps):
        f.sae_report_status(AWARE, AWARE - timedelta(minutes=1), AWARE)
    with pytest.raises(NaiveTimestamp):
        f.sae_report_status(datetime(2025, 4, 1, 10), None, AWARE)
    s = StudySettings(sae_report_hours="12")
    assert f.sae_report_status(AWARE, None, AWARE + timedelta(hours=13), settings=s) is SaeReportStatus.OVERDUE
