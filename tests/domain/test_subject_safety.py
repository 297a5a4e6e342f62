"""Adverse events (PROTOCOL §7): entry, CTCAE grade, seriousness, relatedness per product, expectedness and SUSAR,
the SAE 24-hour clock, outcome; concomitant medication, medical history and deviations. Pure domain."""

from __future__ import annotations

from datetime import date, timedelta

import pytest

from sle_events.domain.errors import (
    AdverseEventBeforeConsent,
    InconsistentAssessment,
    InconsistentTimestamps,
    InvalidChoice,
    MissingValue,
    UnknownAdverseEvent,
)
from sle_events.domain.formulas import SaeReportStatus

import subject_scenarios as sc
from subject_scenarios import (
    at,
    refused,
    sim_clock,  # noqa: F401 (a fixture)
    visit_day,
)

pytestmark = pytest.mark.usefixtures("sim_clock")


def reported(s=None, **kw):
    s = s or sc.to_follow_up()
    ae = s.report_adverse_event("pneumonia", visit_day(2).date(), visit_day(2, hour=12), grade_proposal=3, **kw)
    return s, ae


def test_first_ae_entry_has_term_onset_and_grade_proposal_but_no_causality():
    s, ae = reported(linked_to="MSC")
    entry = s.adverse_event_entry(ae)
    assert (ae, entry.term, entry.grade_proposal, entry.linked_to) == ("AE-001", "pneumonia", 3, "MSC")
    state = s.adverse_events[ae]
    assert state.relatedness_cyc is None and state.grade is None and state.open


def test_ae_onset_before_consent_is_medical_history_not_an_ae():
    s = sc.to_consented()
    refused(s, AdverseEventBeforeConsent, s.report_adverse_event, "rash", date(2025, 2, 1), at("2025-02-04 09:00"))


def test_ae_onset_after_its_entry_and_bad_grades_or_links_are_refused():
    s = sc.to_consented()
    refused(s, InconsistentTimestamps, s.report_adverse_event, "rash", date(2025, 2, 5), at("2025-02-04 09:00"))
    refused(
        s, InvalidChoice, s.report_adverse_event, "rash", date(2025, 2, 4), at("2025-02-04 09:00"), grade_proposal=6
    )
    refused(
        s, InvalidChoice, s.report_adverse_event, "rash", date(2025, 2, 4), at("2025-02-04 09:00"), linked_to="MSC"
    )  # no infusion given yet
    refused(s, MissingValue, s.report_adverse_event, " ", date(2025, 2, 4), at("2025-02-04 09:00"))


def test_assessment_records_grade_seriousness_and_relatedness_per_product():
    s, ae = reported()
    s.assess_adverse_event(
        ae,
        visit_day(2, hour=14),
        grade=3,
        serious=True,
        seriousness=["hospitalisation"],
        relatedness_cyc="possible",
        relatedness_msc="unlikely",
    )
    state = s.adverse_events[ae]
    assert (state.grade, state.serious, state.relatedness_cyc.value, state.relatedness_msc.value) == (
        3,
        True,
        "possible",
        "unlikely",
    )
    assert state.related and state.aware_at == visit_day(2, hour=14)


@pytest.mark.parametrize(
    ("kw", "detail"),
    [
        (dict(grade=3, serious=True, seriousness=[]), "at least one seriousness criterion"),
        (dict(grade=2, serious=False, seriousness=["hospitalisation"]), "non-serious"),
        (dict(grade=5, serious=True, seriousness=["hospitalisation"]), "grade 5"),
        (dict(grade=4, serious=True, seriousness=["death"]), "grade 5"),
    ],
)
def test_inconsistent_assessments_are_refused(kw, detail):
    s, ae = reported()
    err = refused(s, InconsistentAssessment, s.assess_adverse_event, ae, visit_day(2, hour=14), **kw)
    assert detail in str(err)


@pytest.mark.parametrize(
    "kw",
    [
        dict(grade=0, serious=False),
        dict(grade=3, serious=False, relatedness_msc="maybe"),
        dict(grade=3, serious=True, seriousness=["bad"]),
    ],
)
def test_assessment_values_come_from_their_code_lists(kw):
    s, ae = reported()
    refused(s, InvalidChoice, s.assess_adverse_event, ae, visit_day(2, hour=14), **kw)


def test_unknown_or_voided_ae_is_refused():
    s, ae = reported()
    refused(s, UnknownAdverseEvent, s.assess_adverse_event, "AE-009", visit_day(2, hour=14), grade=1, serious=False)
    s.void(s.adverse_events[ae].entry_version, "entered on the wrong subject", visit_day(2, hour=15))
    refused(s, UnknownAdverseEvent, s.assess_adverse_event, ae, visit_day(2, hour=16), grade=1, serious=False)


@pytest.mark.parametrize(
    ("reported_after", "status"),
    [
        (timedelta(hours=24), SaeReportStatus.REPORTED_ON_TIME),
        (timedelta(hours=24, seconds=1), SaeReportStatus.REPORTED_LATE),
    ],
)
def test_sae_report_status_against_the_24_h_clock(reported_after, status):
    s, ae = reported()
    aware = visit_day(2, hour=14)
    s.assess_adverse_event(ae, aware, grade=3, serious=True, seriousness=["hospitalisation"])
    assert s.sae_status(ae, now=aware + timedelta(hours=23)) == SaeReportStatus.OPEN
    assert s.sae_status(ae, now=aware + timedelta(hours=25)) == SaeReportStatus.OVERDUE
    assert s.report_sae(ae, aware + reported_after) == status
    e = s.pending_events[-1]
    assert (e.status, e.aware_at, e.initial) == (status.value, aware, True)
    s.report_sae(ae, aware + timedelta(days=3))  # a follow-up report keeps the first report's status
    assert s.sae_status(ae) == status and s.pending_events[-1].initial is False


def test_only_serious_aes_are_reported_on_the_clock_and_not_before_awareness():
    s, ae = reported()
    s.assess_adverse_event(ae, visit_day(2, hour=14), grade=2, serious=False)
    refused(s, InconsistentAssessment, s.report_sae, ae, visit_day(2, hour=15))
    s.assess_adverse_event(ae, visit_day(3), grade=3, serious=True, seriousness=["hospitalisation"])
    refused(s, InconsistentTimestamps, s.report_sae, ae, visit_day(3) - timedelta(hours=1))


def test_expectedness_by_the_sponsor_makes_a_serious_related_unexpected_ae_a_susar():
    s, ae = reported()
    s.assess_adverse_event(
        ae,
        visit_day(2, hour=14),
        grade=3,
        serious=True,
        seriousness=["hospitalisation"],
        relatedness_cyc="unlikely",
        relatedness_msc="possible",
    )
    assert s.assess_expectedness(ae, visit_day(3), expectedness_cyc="unexpected", expectedness_msc="expected") is False
    assert s.assess_expectedness(ae, visit_day(3), expectedness_cyc="expected", expectedness_msc="unexpected") is True
    assert s.pending_events[-1].susar is True
    refused(
        s, InvalidChoice, s.assess_expectedness, ae, visit_day(3), expectedness_cyc="rare", expectedness_msc="expected"
    )


def test_ae_outcome_needs_a_resolution_date_and_a_fatal_outcome_needs_grade_5():
    s, ae = reported()
    refused(s, MissingValue, s.record_ae_outcome, ae, visit_day(3), "recovered")
    refused(
        s, InconsistentTimestamps, s.record_ae_outcome, ae, visit_day(3), "recovered", resolved_on=visit_day(1).date()
    )
    refused(s, InconsistentAssessment, s.record_ae_outcome, ae, visit_day(3), "fatal", resolved_on=visit_day(3).date())
    refused(s, InvalidChoice, s.record_ae_outcome, ae, visit_day(3), "better")
    s.record_ae_outcome(ae, visit_day(3), "recovered", resolved_on=visit_day(3).date(), action="treatment_given")
    assert not s.adverse_events[ae].open


def test_a_prolonged_stay_caused_by_a_non_serious_ae_is_flagged():
    s, _ = sc.to_transplanted()
    ae = s.report_adverse_event("infusion reaction", sc.MSC_START.date(), sc.MSC_STOP, linked_to="MSC")
    s.discharge(at("2025-03-16 10:00"), prolonged_by_ae=ae)
    assert [f for _, f in s.flags] == ["STAY_OUTSIDE_NORMAL_LENGTH", "PROLONGED_STAY_AE_NOT_SERIOUS"]


# --------------------------------------------------------------------------- conmeds, history, deviations
def test_concomitant_medication_and_its_checks():
    s = sc.to_follow_up()
    s.record_concomitant_medication(
        "mesna", sc.CYC_START.date(), sc.CYC_STOP, dose="400", dose_unit="mg", route="IV", indication="uroprotection"
    )
    refused(
        s,
        InconsistentTimestamps,
        s.record_concomitant_medication,
        "prednisone",
        date(2025, 3, 1),
        visit_day(1),
        end_date=date(2025, 2, 1),
    )
    refused(s, MissingValue, s.record_concomitant_medication, "prednisone", date(2025, 3, 1), visit_day(1), dose="20")
    refused(s, MissingValue, s.record_concomitant_medication, "", date(2025, 3, 1), visit_day(1))


def test_medical_history_may_start_before_consent_but_is_entered_after():
    s = sc.to_consented()
    s.record_medical_history("SLE", at("2025-02-04 09:00"), start_date=date(2019, 5, 1), ongoing=True, category="SLE")
    refused(
        s, InconsistentTimestamps, s.record_medical_history, "LN", at("2025-02-04 09:00"), start_date=date(2025, 3, 1)
    )


def test_deviations_are_coded_and_described():
    s = sc.to_follow_up()
    s.record_deviation(visit_day(1), category="specimen", description="baseline C4 not drawn")
    refused(s, InvalidChoice, s.record_deviation, visit_day(1), category="late", description="x")
    refused(s, MissingValue, s.record_deviation, visit_day(1), category="other", description="")
