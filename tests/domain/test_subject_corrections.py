"""Corrections and voids (R11): a Corrected/Voided event names the event's stream version, the new values and a
mandatory reason; the original stays; a correction that would break a rule is refused like the original."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest

from sle_events.domain.errors import (
    ConsentRequired,
    ImplausibleValue,
    IncompatibleUnit,
    InvalidCorrection,
    NotAdmitted,
    NotCorrectable,
    OutsideWindow,
    ReasonRequired,
    UnknownDescriptor,
    UnknownEventVersion,
)
from sle_events.domain.payloads import LabResult, SledaiAssessment, VisitRecord

import subject_scenarios as sc
from subject_scenarios import (
    at,
    refused,
    sim_clock,  # noqa: F401 (a fixture)
    visit_day,
)

pytestmark = pytest.mark.usefixtures("sim_clock")
LATER = at("2025-02-05 09:00")
FIX = at("2025-02-20 09:00")


def lab(s=None):
    s = s or sc.to_consented()
    return s, s.record_lab_result("C3", "138", "mg/dL", LATER)  # transcription error: 183 was meant


def test_a_correction_names_the_version_the_changed_values_and_the_reason():
    s, v = lab()
    new = s.correct(v, {"value": "183"}, "transcription error", FIX)
    assert new.value == Decimal("183") and new.flag == "H" and s.labs[-1] == new
    e = s.pending_events[-1]
    assert type(e).__qualname__ == "Subject.Corrected"
    assert (e.corrected_version, e.corrected_type, e.reason) == (v, "LabResultRecorded", "transcription error")
    assert e.new_values == {"value": "183", "canonical_value": "183", "flag": "H"}
    assert s.facts[v].corrections == [s.version]


@pytest.mark.parametrize("reason", ["", "   ", None])
def test_a_correction_without_a_reason_is_refused(reason):
    s, v = lab()
    refused(s, ReasonRequired, s.correct, v, {"value": "183"}, reason, FIX)


def test_a_void_without_a_reason_is_refused():
    s, v = lab()
    refused(s, ReasonRequired, s.void, v, "", FIX)


def test_unknown_or_lifecycle_versions_cannot_be_corrected():
    s, _v = lab()
    refused(s, UnknownEventVersion, s.correct, 999, {"value": "1"}, "typo", FIX)
    err = refused(s, NotCorrectable, s.correct, 2, {"icf_version": "ICF v2"}, "typo", FIX)  # the consent
    assert err.event_type == "ConsentObtained"
    refused(s, NotCorrectable, s.void, 1, "duplicate", FIX)  # the screening


def test_fields_outside_the_correctable_set_and_no_op_corrections_are_refused():
    s, v = lab()
    refused(s, InvalidCorrection, s.correct, v, {"code": "C4"}, "typo", FIX)
    refused(s, InvalidCorrection, s.correct, v, {"value": "138"}, "typo", FIX)
    refused(s, InvalidCorrection, s.correct, v, {}, "typo", FIX)


@pytest.mark.parametrize(
    ("values", "error"),
    [
        ({"value": "900"}, ImplausibleValue),  # C3 bound 1–500 mg/dL
        ({"unit": "IU/mL"}, IncompatibleUnit),
        ({"occurred_at": at("2025-02-03 09:30")}, ConsentRequired),  # before consent (R1)
    ],
)
def test_a_correction_that_would_break_a_rule_is_refused_like_the_original(values, error):
    s, v = lab()
    refused(s, error, s.correct, v, values, "fix", FIX)


def test_unit_error_correction_converts_again():
    s = sc.to_consented()
    v = s.record_lab_result("C4", "0.12", "mg/dL", LATER)
    corrected = s.correct(v, {"unit": "g/L"}, "unit error: reported g/L as mg/dL", FIX)
    assert isinstance(corrected, LabResult)
    assert corrected.canonical_value == Decimal("12.00")


def test_void_retires_the_fact_and_the_original_event_stays():
    s, v = lab()
    s.void(v, "duplicate entry", FIX)
    assert s.labs == [r for r in s.labs if r.code != "C3"] and s.facts[v].voided
    assert type(s.pending_events[-1]).__qualname__ == "Subject.Voided"
    refused(s, NotCorrectable, s.void, v, "again", FIX)
    refused(s, NotCorrectable, s.correct, v, {"value": "183"}, "fix", FIX)


def test_a_corrected_visit_date_recomputes_the_window_flag():
    s = sc.to_follow_up()
    s.record_visit("M1", visit_day(1, 9))  # out of window: deviation flagged
    v = s.visit_versions["M1"]
    assert (v, "VISIT_OUT_OF_WINDOW") in s.flags
    s.correct(v, {"occurred_at": visit_day(1, 1)}, "wrong date entered", visit_day(2))
    assert sc.record_of(s, v, VisitRecord).in_window and (v, "VISIT_OUT_OF_WINDOW") not in s.flags


def test_correcting_cyc_start_so_that_the_msc_window_breaks_is_refused():
    s, _ = sc.to_transplanted()
    assert s.cyc_version is not None
    err = refused(
        s,
        OutsideWindow,
        s.correct,
        s.cyc_version,
        {"occurred_at": sc.CYC_START - timedelta(hours=13)},
        "wrong start time",
        sc.DISCHARGED,
    )
    assert err.field == "CYC→MSC interval"
    s.correct(s.cyc_version, {"occurred_at": sc.CYC_START + timedelta(hours=1)}, "wrong start time", sc.DISCHARGED)
    assert s.cyc is not None
    assert s.cyc.occurred_at == sc.CYC_START + timedelta(hours=1)


def test_correcting_cyc_start_out_of_its_stay_is_refused():
    s = sc.to_pretreated()
    refused(
        s,
        NotAdmitted,
        s.correct,
        s.cyc_version,
        {"occurred_at": sc.ADMITTED - timedelta(hours=2)},
        "wrong start time",
        sc.CYC_STOP,
    )


def test_correcting_the_msc_start_outside_18_to_36_h_is_refused():
    s, _ = sc.to_transplanted()
    refused(
        s,
        OutsideWindow,
        s.correct,
        s.msc_version,
        {"occurred_at": sc.CYC_START + timedelta(hours=37), "stopped_at": sc.CYC_START + timedelta(hours=38)},
        "wrong time",
        sc.DISCHARGED,
    )


def test_correcting_cyc_dose_recomputes_the_flags():
    s = sc.to_pretreated()
    assert s.cyc_version is not None
    s.correct(s.cyc_version, {"administered_mg": "1300"}, "pump log read", sc.CYC_STOP)
    assert s.cyc is not None
    assert s.cyc.flags == ("CYC_DOSE_OUTSIDE_TOLERANCE",)
    assert (s.cyc_version, "CYC_DOSE_OUTSIDE_TOLERANCE") in s.flags


def test_facts_the_cyc_relies_on_cannot_be_changed():
    s = sc.to_pretreated()
    assert s.cyc is not None
    vitals = s.cyc.measured_version
    err = refused(s, NotCorrectable, s.correct, vitals, {"weight_kg": "60"}, "scale error", sc.CYC_STOP)
    assert "relies on it" in err.detail
    refused(s, NotCorrectable, s.void, s.cyc.pregnancy_test_version, "wrong subject", sc.CYC_STOP)


def test_sledai_and_ae_entry_corrections_are_checked_again():
    s = sc.to_follow_up()
    s.assess_sledai(visit_day(1), ["SLED2K13"], visit="M1")
    v = s.version
    refused(s, UnknownDescriptor, s.correct, v, {"descriptors": ["SLED2K99"]}, "typo", visit_day(2))
    corrected = s.correct(v, {"descriptors": ["SLED2K13", "SLED2K20"]}, "missed item", visit_day(2))
    assert isinstance(corrected, SledaiAssessment)
    assert corrected.total == 6
    ae = s.report_adverse_event("fever", visit_day(2).date(), visit_day(2, hour=12))
    entry = s.adverse_events[ae].entry_version
    s.correct(entry, {"term": "pyrexia", "grade_proposal": 2}, "coded term", visit_day(3))
    assert s.adverse_event_entry(ae).term == "pyrexia"
