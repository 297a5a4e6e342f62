"""Lab results (labs.csv, units, bounds, ranges, flags), derived eGFR/UPCR citing their inputs, the Treg panel,
SLEDAI-2K and the renal response. Pure domain; fixtures from formulas.md (E1, E7, E8, U1, U3, S1, S2, R1–R8)."""

from __future__ import annotations

from datetime import date, timedelta
from decimal import Decimal

import pytest

from sle_events.domain.errors import (
    FloatNotAllowed,
    ImplausibleValue,
    IncompatibleUnit,
    InconsistentTimestamps,
    InvalidChoice,
    InvalidQuantity,
    MissingValue,
    UnknownAnalyte,
    UnknownDescriptor,
    UnknownEventVersion,
    UnknownVisit,
    VisitBeforeTransplant,
)
from sle_events.domain.formulas import EGFR_FORMULA_VERSION, UPCR_FORMULA_VERSION
from sle_events.domain.payloads import LabResult, TregPanel
from sle_events.domain.quantities import display

import subject_scenarios as sc
from subject_scenarios import (
    at,
    refused,
    sim_clock,  # noqa: F401 (a fixture)
    visit_day,
)

pytestmark = pytest.mark.usefixtures("sim_clock")
LATER = at("2025-02-05 09:00")


# --------------------------------------------------------------------------- lab results
def test_lab_result_is_normalised_ranged_and_flagged():
    s = sc.to_consented()
    v = s.record_lab_result("CREATSI", "150", "umol/L", LATER, reported_at=LATER + timedelta(hours=3))
    lab = sc.record_of(s, v, LabResult)
    assert (lab.code, lab.loinc, lab.value, lab.unit, lab.canonical_unit) == (
        "CREATSI",
        "14682-9",
        Decimal("150"),
        "umol/L",
        "umol/L",
    )
    assert lab.range_source == "default" and lab.flag == "H"
    c4 = sc.record_of(s, s.record_lab_result("C4", "0.12", "g/L", LATER), LabResult)
    assert (c4.canonical_value, c4.canonical_unit, c4.flag) == (Decimal("12.00"), "mg/dL", "N")


def test_the_reporting_labs_range_wins_over_labs_csv():
    s = sc.to_consented()
    lab = sc.record_of(s, s.record_lab_result("DSDNA", "45", "[IU]/mL", LATER, lab_low="0", lab_high="100"), LabResult)
    assert (lab.range_source, lab.range_high, lab.flag) == ("lab", Decimal("100"), "N")
    assert sc.record_of(s, s.record_lab_result("DSDNA", "45", "[IU]/mL", LATER), LabResult).flag == "H"  # default 0-30


def test_ana_titer_is_kept_as_its_denominator():
    s = sc.to_consented()
    assert sc.record_of(s, s.record_lab_result("ANA", "1:320", "{titer}", LATER), LabResult).value == Decimal(320)


@pytest.mark.parametrize(
    ("code", "value", "unit", "error"),
    [
        ("XYZ", "1", "mg/dL", UnknownAnalyte),
        ("CREAT", "1.0", "µmol/L", IncompatibleUnit),
        ("CREAT", "40", "mg/dL", ImplausibleValue),  # bound 0.1–25 mg/dL
        ("ALB", "32", "g/dL", ImplausibleValue),  # unit error: g/L written as g/dL
        ("C3", 85.5, "mg/dL", FloatNotAllowed),
        ("C3", "eighty", "mg/dL", InvalidQuantity),
        ("UCASTS", "-1", "/[LPF]", ImplausibleValue),  # no §9 bound: only "not negative"
    ],
)
def test_bad_lab_results_are_refused_with_a_specific_error(code, value, unit, error):
    s = sc.to_consented()
    refused(s, error, s.record_lab_result, code, value, unit, LATER)


def test_an_inverted_lab_range_and_a_report_before_collection_are_refused():
    s = sc.to_consented()
    refused(s, InvalidQuantity, s.record_lab_result, "C3", "80", "mg/dL", LATER, lab_low="180", lab_high="90")
    refused(
        s,
        InconsistentTimestamps,
        s.record_lab_result,
        "C3",
        "80",
        "mg/dL",
        LATER,
        reported_at=LATER - timedelta(minutes=1),
    )


# --------------------------------------------------------------------------- derived values
@pytest.mark.parametrize(
    ("fid", "value", "unit", "birth", "sex", "egfr"),
    [
        ("E1", "0.70", "mg/dL", date(1994, 6, 1), "F", "119.24"),  # 30 y on 2025-02-05
        ("E7", "53", "umol/L", date(1999, 6, 1), "F", "127.70"),  # 25 y, not rounded first
        ("E8", "150", "umol/L", date(1986, 6, 1), "M", "52.40"),  # 38 y
    ],
)
def test_egfr_is_derived_from_creatinine_citing_its_inputs_and_formula(fid, value, unit, birth, sex, egfr):
    s = sc.to_consented()
    demo = s.record_demographics(sex, birth, at("2025-02-03 10:30"), childbearing_potential=False)
    v = s.record_lab_result("CREAT" if unit == "mg/dL" else "CREATSI", value, unit, LATER)
    derived = s.derive_egfr(v)
    assert derived.value is not None, fid
    assert display(derived.value) == egfr, fid
    assert derived.inputs == (v, demo) and derived.formula_version == EGFR_FORMULA_VERSION
    assert derived.occurred_at == LATER and derived.unit == "mL/min/{1.73_m2}"


def test_egfr_not_computable_is_recorded_with_its_reason():
    s = sc.to_consented()
    v = s.record_lab_result("CREAT", "0.9", "mg/dL", LATER)
    assert s.derive_egfr(v).not_computed_reason == "sex and date of birth are not recorded"
    s.record_demographics("U", date(1990, 1, 1), at("2025-02-03 10:30"), childbearing_potential=False)
    derived = s.derive_egfr(v)
    assert derived.not_computed_reason is not None
    assert derived.value is None and "not 'F' or 'M'" in derived.not_computed_reason
    assert type(s.pending_events[-1]).__qualname__ == "Subject.DerivedResultRecorded"


def test_egfr_needs_a_creatinine_result():
    s = sc.to_consented()
    v = s.record_lab_result("C3", "80", "mg/dL", LATER)
    refused(s, InvalidChoice, s.derive_egfr, v)
    refused(s, UnknownEventVersion, s.derive_egfr, 999)


@pytest.mark.parametrize(
    ("fid", "protein", "creat", "upcr"),
    [
        ("U1", ("150", "mg/dL"), ("100", "mg/dL"), "1.50"),
        ("U3", ("1.2", "g/L"), ("8.0", "mmol/L"), "1.33"),
    ],
)
def test_upcr_is_derived_from_one_specimen(fid, protein: tuple[str, str], creat: tuple[str, str], upcr):
    s = sc.to_consented()
    p = s.record_lab_result("UPROT", *protein, LATER)
    c = s.record_lab_result("UCREAT", *creat, LATER)
    derived = s.derive_upcr(p, c)
    assert derived.value is not None, fid
    assert display(derived.value) == upcr and derived.inputs == (p, c)
    assert derived.formula_version == UPCR_FORMULA_VERSION


def test_upcr_from_two_specimens_is_refused():
    s = sc.to_consented()
    p = s.record_lab_result("UPROT", "150", "mg/dL", LATER)
    c = s.record_lab_result("UCREAT", "100", "mg/dL", LATER + timedelta(hours=1))
    refused(s, MissingValue, s.derive_upcr, p, c)


# --------------------------------------------------------------------------- Treg panel
def test_treg_panel_is_recorded_with_its_flag_and_bounds():
    s = sc.to_consented()
    s.record_treg_panel(LATER, "2.8", "450", reported_at=LATER + timedelta(days=3))
    panel = s.records("TregPanelRecorded")[-1][1]
    assert isinstance(panel, TregPanel)
    # labs.csv gives no consensus Treg range (no flag); CD4 450 is below 500 /uL
    assert (panel.treg_pct, panel.cd4_per_ul, panel.treg_flag, panel.cd4_flag) == (
        Decimal("2.8"),
        Decimal("450"),
        None,
        "L",
    )
    refused(s, ImplausibleValue, s.record_treg_panel, LATER, "101", "450")
    refused(s, ImplausibleValue, s.record_treg_panel, LATER, "5", "6000")


# --------------------------------------------------------------------------- SLEDAI-2K
@pytest.mark.parametrize(
    ("fid", "codes", "total"),
    [
        ("S1", ["SLED2K13", "SLED2K12", "SLED2K20", "SLED2K21"], 12),
        ("S2", ["SLED2K09", "SLED2K15", "SLED2K16", "SLED2K20", "SLED2K21", "SLED2K24"], 13),
        ("S3", [], 0),
    ],
)
def test_sledai_total_is_derived_from_the_descriptors(fid, codes, total):
    s = sc.to_consented()
    assessed = s.assess_sledai(LATER, codes + codes[:1], visit="SCR")
    assert assessed.total == total and assessed.descriptors == tuple(sorted(set(codes)))
    assert assessed.formula_version == "sledai2k.total.v1"


def test_sledai_unknown_descriptor_or_visit_is_refused():
    s = sc.to_consented()
    refused(s, UnknownDescriptor, s.assess_sledai, LATER, ["SLED2K99"])
    refused(s, InvalidChoice, s.assess_sledai, LATER, "SLED2K13")
    refused(s, UnknownVisit, s.assess_sledai, LATER, ["SLED2K13"], visit="M99")


# --------------------------------------------------------------------------- renal response (KDIGO 2024)
@pytest.mark.parametrize(
    ("fid", "month", "upcr", "egfr", "status"),
    [
        ("R1", 12, "0.40", "70.00", "CR"),
        ("R2", 6, "1.40", "66.00", "PR"),
        ("R3", 6, "1.80", "70.00", "NR"),
        ("R4", 12, "0.32", "55.00", "NR"),
        ("R5", 3, "1.80", "70.00", "PENDING"),
        ("R6", 6, "1.60", "61.20", "PR"),
        ("R7", 12, "0.50", "72.00", "PR"),
    ],
)
def test_renal_response_at_a_visit_against_baseline_fixtures(fid, month, upcr, egfr, status):
    s = sc.to_follow_up()  # baseline UPCR 3.20, eGFR 72.00 at BASE
    day = visit_day(month)
    u = s.record_lab_result("UPCR", upcr, "mg/mg", day)
    e = s.record_lab_result("EGFR", egfr, "mL/min/{1.73_m2}", day)
    r = s.assess_renal_response(day + timedelta(hours=3), visit=f"M{month}")
    assert r.status == status, fid
    assert (r.baseline_upcr, r.baseline_egfr, r.month) == (Decimal("3.20"), Decimal("72.00"), month)
    assert r.inputs[-2:] == (u, e) and r.upcr_specimen == "UPCR"


def test_renal_response_with_a_missing_input_is_not_evaluable():
    s = sc.to_follow_up()
    s.record_lab_result("UPCR", "0.4", "mg/mg", visit_day(6))
    assert s.assess_renal_response(visit_day(6, hour=12), visit="M6").status == "NOT_EVALUABLE"


def test_renal_response_uses_a_derived_egfr_and_upcr():
    s = sc.to_follow_up()
    day = visit_day(6)
    s.derive_egfr(s.record_lab_result("CREAT", "0.70", "mg/dL", day))
    p, c = s.record_lab_result("UPROT", "40", "mg/dL", day), s.record_lab_result("UCREAT", "100", "mg/dL", day)
    s.derive_upcr(p, c)
    r = s.assess_renal_response(day + timedelta(hours=2), visit="M6")
    assert r.status == "CR" and r.upcr == Decimal("0.4")


def test_results_derived_from_a_later_corrected_or_voided_value_are_stale_until_derived_again():
    s = sc.to_follow_up()
    day = visit_day(6)
    creat = s.record_lab_result("CREAT", "0.70", "mg/dL", day)
    s.derive_egfr(creat)
    egfr = s.version
    p, c = s.record_lab_result("UPROT", "40", "mg/dL", day), s.record_lab_result("UCREAT", "100", "mg/dL", day)
    s.derive_upcr(p, c)
    upcr = s.version
    s.assess_renal_response(day + timedelta(hours=2), visit="M6")
    assessed = s.version
    assert s.stale_results() == []

    def stale() -> list[tuple[int, str, list[int]]]:
        return [(x["version"], x["code"], x["changed_inputs"]) for x in s.stale_results()]

    s.correct(creat, {"value": Decimal("0.90")}, "transcription error", day + timedelta(hours=5))
    assert s.stale_results()[0] == {
        "version": egfr,
        "type": "DerivedResultRecorded",
        "code": "EGFR",
        "changed_inputs": [creat],
    }
    assert stale() == [(egfr, "EGFR", [creat]), (assessed, "RENAL_RESPONSE", [egfr])]  # through the eGFR
    s.derive_egfr(creat)  # derived again from the corrected creatinine: the old eGFR is superseded...
    assert stale() == [(assessed, "RENAL_RESPONSE", [egfr])]  # ...but the assessment still cites it
    s.void(p, "entered on the wrong subject", day + timedelta(hours=6))
    assert stale() == [(upcr, "UPCR", [p]), (assessed, "RENAL_RESPONSE", [upcr, egfr])]
    s.assess_renal_response(day + timedelta(hours=8), visit="M6")  # assessed again, from current results
    assert stale() == [(upcr, "UPCR", [p])]
    s.void(upcr, "its protein result was voided", day + timedelta(hours=9))
    assert stale() == []


def test_renal_response_before_transplant_is_refused():
    s = sc.to_pretreated()
    refused(s, VisitBeforeTransplant, s.assess_renal_response, sc.CYC_STOP)
