"""Visits (PROTOCOL §6, R7): windows from TX, out-of-window flagged as a deviation, missed and unscheduled visits,
early termination, the integrated-team evaluation. Pure domain; windows from formulas.md §7 (TX = 2025-03-11)."""

from __future__ import annotations

from datetime import date, datetime, timedelta
from decimal import Decimal

import pytest

from sle_events.domain.errors import (
    InvalidChoice,
    InvalidTransition,
    MissingValue,
    UnknownVisit,
    VisitAlreadyRecorded,
    VisitBeforeTransplant,
)

import subject_scenarios as sc
from subject_scenarios import (
    CST,
    at,
    refused,
    sim_clock,  # noqa: F401 (a fixture)
    visit_day,
)

pytestmark = pytest.mark.usefixtures("sim_clock")


def day(d: date, hour: int = 9) -> datetime:
    return datetime(d.year, d.month, d.day, hour, tzinfo=CST)


@pytest.mark.parametrize(
    ("visit", "earliest", "latest"),
    [
        ("M1", date(2025, 4, 3), date(2025, 4, 17)),
        ("M3", date(2025, 6, 2), date(2025, 6, 16)),
        ("M12", date(2026, 2, 27), date(2026, 3, 13)),
        ("M24", date(2027, 2, 22), date(2027, 3, 8)),
        ("M30", date(2027, 7, 29), date(2027, 9, 27)),
        ("M48", date(2029, 1, 19), date(2029, 3, 20)),
    ],
)
def test_r7_visit_windows_are_inclusive_and_out_of_window_is_recorded_and_flagged(visit, earliest, latest):
    for when, in_window in (
        (earliest, True),
        (latest, True),
        (earliest - timedelta(days=1), False),
        (latest + timedelta(days=1), False),
    ):
        s = sc.to_follow_up()
        record = s.record_visit(visit, day(when))
        assert (record.earliest, record.latest, record.in_window) == (earliest, latest, in_window)
        flagged = "VISIT_OUT_OF_WINDOW" in record.deviation_flags
        assert flagged is (not in_window)
        assert ((s.visit_versions[visit], "VISIT_OUT_OF_WINDOW") in s.flags) is flagged


def test_r7_follow_up_visits_exist_only_after_tx():
    s = sc.to_pretreated()
    err = refused(s, VisitBeforeTransplant, s.record_visit, "M1", visit_day(1))
    assert "no MSC infusion" in str(err)
    refused(s, VisitBeforeTransplant, s.record_missed_visit, "M1", visit_day(1))
    t = sc.to_follow_up()
    refused(t, VisitBeforeTransplant, t.record_visit, "M1", at("2025-03-10 09:00"))


def test_a_visit_is_recorded_once_then_corrected():
    s = sc.to_follow_up()
    s.record_visit("M1", visit_day(1))
    refused(s, VisitAlreadyRecorded, s.record_visit, "M1", visit_day(1, 1))
    refused(s, VisitAlreadyRecorded, s.record_missed_visit, "M1", visit_day(1, 1))
    s.record_missed_visit("M2", visit_day(2, 8))
    refused(s, VisitAlreadyRecorded, s.record_visit, "M2", visit_day(2, 9))


def test_unknown_visit_codes_are_refused():
    s = sc.to_follow_up()
    refused(s, UnknownVisit, s.record_visit, "M25", visit_day(25))
    refused(s, UnknownVisit, s.record_missed_visit, "SCR", visit_day(1))


def test_screening_and_treatment_visits_follow_consent_and_enrollment():
    s = sc.to_consented()
    s.record_visit("SCR", at("2025-02-03 10:30"))
    refused(s, InvalidTransition, s.record_visit, "BASE", at("2025-02-04 10:30"))
    t = sc.to_admitted(number="SCR-002")
    assert t.record_visit("BASE", sc.ADMITTED).in_window


def test_unscheduled_visits_are_numbered_after_the_previous_visit():
    s = sc.to_follow_up()
    s.record_visit("M1", visit_day(1))
    assert s.record_unscheduled_visit(visit_day(1, 5), purpose="rash") == Decimal("101.01")
    assert s.record_unscheduled_visit(visit_day(1, 9), purpose="rash again") == Decimal("101.02")
    s.record_visit("M2", visit_day(2))
    assert s.record_unscheduled_visit(visit_day(2, 3), purpose="fever") == Decimal("102.01")
    refused(s, MissingValue, s.record_unscheduled_visit, visit_day(2, 4), purpose="")


def test_unscheduled_visits_are_allowed_from_consent_on():
    s = sc.to_consented()
    assert s.record_unscheduled_visit(at("2025-02-04 09:00"), purpose="flare") == Decimal("10.01")


def test_early_termination_follows_a_withdrawal_and_is_flagged_late_after_30_days():
    s = sc.to_follow_up()
    refused(s, InvalidTransition, s.record_visit, "ET", visit_day(4))
    s.withdraw(
        visit_day(4),
        reason_code="withdrawal_by_subject",
        reason="moving abroad",
        decided_by="subject",
        safety_follow_up_agreed=True,
    )
    record = s.record_visit("ET", visit_day(4, 31))
    assert not record.in_window and record.deviation_flags == ("VISIT_OUT_OF_WINDOW",)


def test_team_evaluation_with_a_missing_discipline_is_flagged():
    s = sc.to_follow_up()
    s.record_team_evaluation(
        visit_day(1), disciplines=["rheumatology", "haematology", "bmt"], assessment="stable", visit="M1"
    )
    assert not s.flags
    s.record_team_evaluation(visit_day(2), disciplines=["rheumatology"], assessment="improving")
    assert s.flags == [(s.version, "TEAM_INCOMPLETE")]
    refused(s, InvalidChoice, s.record_team_evaluation, visit_day(2), disciplines=["nephrology"], assessment="x")
    refused(s, MissingValue, s.record_team_evaluation, visit_day(2), disciplines=[], assessment="x")
    refused(s, MissingValue, s.record_team_evaluation, visit_day(2), disciplines=["bmt"], assessment=" ")
