"""Treatment: the in-patient stay (R3, R6, T9, T10), cyclophosphamide (T7, R3, R4, §5.1), the MSC lot and the
infusion (T8, R4, R5, §5.2). Pure domain; fixtures from formulas.md (B2, W1–W4, M2, length of stay)."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest

from sle_events.domain.errors import (
    AlreadyAdmitted,
    DischargeBeforeInfusionEnd,
    DuplicatePretreatment,
    FloatNotAllowed,
    ImplausibleValue,
    InconsistentTimestamps,
    InvalidChoice,
    InvalidQuantity,
    InvalidTransition,
    LotNotReleased,
    LotUnavailable,
    MeasurementMissing,
    MissingValue,
    NotAdmitted,
    OutsideWindow,
    PregnancyTestRequired,
    ReasonRequired,
)
from sle_events.domain.lifecycle import SubjectStatus
from sle_events.domain.product import LotStatus, ProductLot
from sle_events.domain.quantities import display

import subject_scenarios as sc
from subject_scenarios import (
    CONFIG,
    at,
    refused,
    sim_clock,  # noqa: F401 (a fixture)
)

pytestmark = pytest.mark.usefixtures("sim_clock")


# --------------------------------------------------------------------------- admission and discharge (R6)
def test_admission_needs_enrollment():
    s = sc.to_eligible()
    refused(s, InvalidTransition, s.admit, sc.ADMITTED)


def test_a_second_admission_while_admitted_is_refused():
    s = sc.to_admitted()
    refused(s, AlreadyAdmitted, s.admit, sc.ADMITTED + timedelta(hours=5))


@pytest.mark.parametrize(
    ("discharge", "los", "flagged"),
    [
        ("2025-03-12 10:00", 3, False),
        ("2025-03-14 10:00", 5, False),
        ("2025-03-16 10:00", 7, True),
    ],
)
def test_r6_length_of_stay_is_flagged_outside_3_to_5_days_never_refused(discharge, los, flagged):
    s, _ = sc.to_transplanted()
    assert s.discharge(at(discharge)) == los
    assert s.stays[-1].length_of_stay_days == los
    assert (any(f == "STAY_OUTSIDE_NORMAL_LENGTH" for _, f in s.flags)) is flagged
    assert s.status == SubjectStatus.IN_FOLLOW_UP


def test_r6_a_short_stay_is_flagged_too():
    s = sc.to_enrolled()
    s.admit(at("2025-03-09 08:00"))
    s.discharge(at("2025-03-10 08:00"))  # no CYC given: the subject stays ENROLLED
    assert s.flags[-1][1] == "STAY_OUTSIDE_NORMAL_LENGTH" and s.status == SubjectStatus.ENROLLED


def test_r6_discharge_before_the_msc_infusion_ends_is_refused():
    s, _ = sc.to_transplanted()
    refused(s, DischargeBeforeInfusionEnd, s.discharge, sc.MSC_STOP - timedelta(minutes=1))
    p = sc.to_pretreated(number="SCR-002")
    refused(p, DischargeBeforeInfusionEnd, p.discharge, sc.DISCHARGED)


def test_r6_discharge_without_an_open_stay_or_before_admission_is_refused():
    s = sc.to_enrolled()
    refused(s, NotAdmitted, s.discharge, sc.DISCHARGED)
    a = sc.to_admitted(number="SCR-002")
    refused(a, InconsistentTimestamps, a.discharge, sc.ADMITTED - timedelta(hours=1))


def test_t10_transplant_not_performed_is_flagged_and_discharge_starts_safety_follow_up():
    s = sc.to_pretreated()
    refused(s, ReasonRequired, s.record_transplant_not_performed, sc.MSC_START, "")
    s.record_transplant_not_performed(sc.MSC_START, "lot failed sterility; no replacement")
    assert "TRANSPLANT_NOT_PERFORMED" in [f for _, f in s.flags]
    refused(s, InvalidTransition, s.infuse_msc, sc.MSC_START, sc.MSC_STOP, sc.lot_for(s), config=CONFIG)
    s.discharge(sc.DISCHARGED)
    assert s.status == SubjectStatus.IN_FOLLOW_UP and s.tx_date is None


def test_t10_only_after_pretreatment():
    s = sc.to_admitted()
    refused(s, InvalidTransition, s.record_transplant_not_performed, sc.MSC_START, "x")


# --------------------------------------------------------------------------- cyclophosphamide (T7, R3, R4)
def test_cyc_dose_from_bsa_mosteller_rounded_to_2_dp_fixture_b2():
    s = sc.to_pretreated()
    cyc = s.cyc
    assert cyc is not None
    assert (cyc.bsa_m2, display(cyc.calculated_mg), cyc.administered_mg) == (
        Decimal("1.51"),
        "1132.50",
        Decimal("1132.5"),
    )
    assert cyc.measured_version == s.records("VitalSignsRecorded")[-1][0]
    assert cyc.bsa_formula == "bsa.mosteller.v1" and cyc.dose_formula == "cyc.dose_bsa.v1" and cyc.flags == ()
    assert s.status == SubjectStatus.PRETREATED


@pytest.mark.parametrize(
    ("administered", "flags"),
    [
        ("1245.75", ()),  # +10.0 %: not flagged
        ("1250", ("CYC_DOSE_OUTSIDE_TOLERANCE",)),
        ("1900", ("CYC_DOSE_OUTSIDE_TOLERANCE", "CYC_DOSE_OVER_CAP")),
    ],
)
def test_cyc_dose_deviations_are_flagged_not_refused(administered, flags):
    s = sc.to_admitted()
    assert s.give_pretreatment(sc.CYC_START, sc.CYC_STOP, "750", administered, "L1", config=CONFIG).flags == flags


def test_cyc_prescribed_outside_500_to_1000_is_flagged():
    s = sc.to_admitted()
    assert (
        "CYC_PRESCRIBED_OUTSIDE_RANGE"
        in s.give_pretreatment(sc.CYC_START, sc.CYC_STOP, "1100", "1661", "L1", config=CONFIG).flags
    )


def test_cyc_implausible_administered_dose_is_refused():
    s = sc.to_admitted()
    err = refused(
        s, ImplausibleValue, s.give_pretreatment, sc.CYC_START, sc.CYC_STOP, "750", "3500", "L1", config=CONFIG
    )
    assert err.field == "cyc_administered"


def test_r3_cyc_outside_an_open_stay_is_refused():
    s = sc.to_enrolled()
    refused(s, NotAdmitted, s.give_pretreatment, sc.CYC_START, sc.CYC_STOP, "750", "1132.5", "L1")
    a = sc.to_admitted(number="SCR-002")
    refused(a, NotAdmitted, a.give_pretreatment, sc.ADMITTED - timedelta(hours=1), sc.CYC_STOP, "750", "1132.5", "L1")


def test_r3_cyc_before_enrollment_is_refused():
    s = sc.to_eligible()
    refused(s, InvalidTransition, s.give_pretreatment, sc.CYC_START, sc.CYC_STOP, "750", "1132.5", "L1")


def test_r4_one_cyc_per_subject():
    s = sc.to_pretreated()
    refused(
        s,
        DuplicatePretreatment,
        s.give_pretreatment,
        sc.CYC_START + timedelta(hours=2),
        sc.CYC_STOP + timedelta(hours=2),
        "750",
        "1132.5",
        "L2",
    )


def test_t7_height_and_weight_measured_at_this_admission_are_required():
    s = sc.to_enrolled()
    s.record_vital_signs(sc.ENROLLED, height_cm="158", weight_kg="52")  # before admission: does not count
    s.admit(sc.ADMITTED)
    s.record_pregnancy_test(sc.MEASURED, "negative")
    err = refused(s, MeasurementMissing, s.give_pretreatment, sc.CYC_START, sc.CYC_STOP, "750", "1132.5", "L1")
    assert err.measurement == "height and weight"


def test_t7_a_negative_pregnancy_test_within_72_h_for_a_woman_of_childbearing_potential():
    s = sc.to_enrolled()
    s.admit(sc.ADMITTED)
    s.record_vital_signs(sc.MEASURED, height_cm="158", weight_kg="52")
    refused(s, PregnancyTestRequired, s.give_pretreatment, sc.CYC_START, sc.CYC_STOP, "750", "1132.5", "L1")
    s.record_pregnancy_test(sc.CYC_START - timedelta(hours=72, minutes=1), "negative")
    refused(s, PregnancyTestRequired, s.give_pretreatment, sc.CYC_START, sc.CYC_STOP, "750", "1132.5", "L1")
    s.record_pregnancy_test(sc.CYC_START - timedelta(hours=72), "negative")
    valid_test = s.version
    assert s.give_pretreatment(sc.CYC_START, sc.CYC_STOP, "750", "1132.5", "L1").pregnancy_test_version == valid_test


def test_t7_a_positive_pregnancy_test_blocks_cyc():
    s = sc.to_enrolled()
    s.admit(sc.ADMITTED)
    s.record_vital_signs(sc.MEASURED, height_cm="158", weight_kg="52")
    s.record_pregnancy_test(sc.MEASURED, "positive")
    refused(s, PregnancyTestRequired, s.give_pretreatment, sc.CYC_START, sc.CYC_STOP, "750", "1132.5", "L1")


def test_t7_no_pregnancy_test_needed_without_childbearing_potential():
    s = sc.with_screening_data(sc.to_consented(), childbearing_potential=False)
    s.confirm_eligibility(sc.ELIGIBLE, checklist=sc.CHECKLIST)
    s.enroll(sc.ENROLLED)
    s.admit(sc.ADMITTED)
    s.record_vital_signs(sc.MEASURED, height_cm="158", weight_kg="52")
    assert s.give_pretreatment(sc.CYC_START, sc.CYC_STOP, "750", "1132.5", "L1").pregnancy_test_version is None


def test_r3_missing_baseline_specimens_are_flagged_as_a_deviation_not_refused():
    s = sc.to_admitted(baseline=False)
    s.record_lab_result("C3", "60", "mg/dL", sc.BASELINE)
    assert s.give_pretreatment(sc.CYC_START, sc.CYC_STOP, "750", "1132.5", "L1").flags == (
        "BASELINE_SPECIMENS_MISSING",
    )


def test_cyc_route_must_be_iv_and_a_lot_is_required():
    s = sc.to_admitted()
    refused(s, InvalidChoice, s.give_pretreatment, sc.CYC_START, sc.CYC_STOP, "750", "1132.5", "L1", route="PO")
    refused(s, MissingValue, s.give_pretreatment, sc.CYC_START, sc.CYC_STOP, "750", "1132.5", " ")
    refused(
        s,
        InconsistentTimestamps,
        s.give_pretreatment,
        sc.CYC_START,
        sc.CYC_START - timedelta(minutes=1),
        "750",
        "1132.5",
        "L1",
    )


# --------------------------------------------------------------------------- the MSC lot (§5.2)
def test_lot_release_records_viable_cells_and_passes():
    s = sc.to_pretreated()
    lot = sc.lot_for(s)
    assert lot.viable_cells == Decimal("5.7E7") and lot.status == LotStatus.RELEASED and lot.release_failures == ()
    assert lot.id == ProductLot.id_for(s.study_id, "MSC-001")


@pytest.mark.parametrize(
    ("change", "failure"),
    [
        ({"viability_pct": "65"}, "viability 65% < 70%"),
        ({"sterility_negative": False}, "sterility not negative"),
        ({"mycoplasma_negative": False}, "mycoplasma not negative"),
        ({"identity_markers_pct": {**sc.MARKERS, "CD90": "90"}}, "identity: CD90 90% < 95%"),
        ({"endotoxin_eu_per_kg": "6"}, "endotoxin 6 EU/kg > 5 EU/kg"),
    ],
)
def test_lot_release_failures_are_recorded_with_the_lot(change, failure):
    lot = sc.lot_for(sc.to_pretreated(), **change)
    assert lot.status == LotStatus.FAILED_RELEASE and failure in lot.release_failures


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"viability_pct": "101"}, ImplausibleValue),
        ({"total_cells": "0"}, InvalidQuantity),
        ({"donor_id": ""}, MissingValue),
        ({"sterility_negative": "no"}, InvalidChoice),
        ({"total_cells": 6.0e7}, FloatNotAllowed),
    ],
)
def test_lot_release_with_bad_values_is_refused(change, error):
    with pytest.raises(error):
        sc.lot_for(sc.to_pretreated(), **change)


# --------------------------------------------------------------------------- the infusion (T8, R4, R5)
def test_t8_infusion_computes_the_dose_and_interval_fixtures_m2_w1():
    s, lot = sc.to_transplanted()
    msc = s.msc
    assert msc is not None
    assert (display(msc.dose_1e6_per_kg), display(msc.cyc_to_msc_hours)) == ("1.10", "25.50")
    assert s.status == SubjectStatus.TRANSPLANTED and s.tx_date == sc.TX
    assert lot.status == LotStatus.INFUSED and lot.infused_into == s.id


@pytest.mark.parametrize(
    ("msc_start", "accept"),
    [
        ("2025-03-11T09:30:00+08:00", True),  # W1 25.50 h
        ("2025-03-11T01:00:00+00:00", True),  # W2 25.00 h, other offset
        ("2025-03-10T20:00:00+08:00", False),  # W3 12 h
        ("2025-03-11T22:00:00+08:00", False),  # W4 38 h
    ],
)
def test_r4_infusion_outside_18_to_36_h_after_cyc_is_refused(msc_start, accept):
    from datetime import datetime

    s = sc.to_pretreated()
    start = datetime.fromisoformat(msc_start)
    lot = sc.lot_for(s, released_at=start - timedelta(hours=2))
    if accept:
        s.infuse_msc(start, start + timedelta(hours=1), lot, config=CONFIG)
    else:
        err = refused(s, OutsideWindow, s.infuse_msc, start, start + timedelta(hours=1), lot, config=CONFIG)
        assert err.field == "CYC→MSC interval"


def test_r5_a_lot_failing_release_is_refused_without_a_prior_deviation():
    s = sc.to_pretreated()
    lot = sc.lot_for(s, viability_pct="65")
    err = refused(s, LotNotReleased, s.infuse_msc, sc.MSC_START, sc.MSC_STOP, lot, config=CONFIG)
    assert err.lot_id == "MSC-001" and "viability 65% < 70%" in err.failures


def test_r5_a_deviation_naming_the_lot_recorded_first_authorises_it():
    s = sc.to_pretreated()
    lot = sc.lot_for(s, viability_pct="65")
    s.record_deviation(sc.RELEASED, category="product_release", description="other lot", lot_id="MSC-999")
    refused(s, LotNotReleased, s.infuse_msc, sc.MSC_START, sc.MSC_STOP, lot, config=CONFIG)
    v = s.record_deviation(
        sc.RELEASED,
        category="product_release",
        description="viability 65 %: sponsor approved use of lot MSC-001",
        lot_id="MSC-001",
    )
    msc = s.infuse_msc(sc.MSC_START, sc.MSC_STOP, lot, config=CONFIG)
    assert msc.authorised_by_deviation == v and msc.release_failures


def test_r5_a_dose_outside_0_8_to_1_2_per_kg_fails_release():
    s = sc.to_pretreated()
    lot = sc.lot_for(s, total_cells="4.0E7")  # 3.8e7 viable / 52 kg = 0.73
    err = refused(s, LotNotReleased, s.infuse_msc, sc.MSC_START, sc.MSC_STOP, lot, config=CONFIG)
    assert any(f.startswith("dose 0.73") for f in err.failures)


def test_r5_infusion_more_than_6_h_after_release_fails_release():
    s = sc.to_pretreated()
    lot = sc.lot_for(s, released_at=sc.MSC_START - timedelta(hours=6, minutes=1))
    err = refused(s, LotNotReleased, s.infuse_msc, sc.MSC_START, sc.MSC_STOP, lot, config=CONFIG)
    assert any("after release" in f for f in err.failures)


def test_implausible_msc_dose_is_refused():
    s = sc.to_pretreated()
    lot = sc.lot_for(s, total_cells="1.0E10")
    refused(s, ImplausibleValue, s.infuse_msc, sc.MSC_START, sc.MSC_STOP, lot, config=CONFIG)


def test_a_lot_made_for_another_subject_or_already_infused_is_refused():
    s = sc.to_pretreated()
    other = sc.to_pretreated(number="SCR-002")
    lot = sc.lot_for(other)
    refused(s, LotUnavailable, s.infuse_msc, sc.MSC_START, sc.MSC_STOP, lot, config=CONFIG)
    other.infuse_msc(sc.MSC_START, sc.MSC_STOP, lot, config=CONFIG)
    lot.mark_infused(other.id, sc.MSC_START, config=CONFIG)
    refused(lot, LotUnavailable, lot.mark_infused, other.id, sc.MSC_START, config=CONFIG)


def test_t8_infusion_needs_pretreatment_and_an_open_stay():
    s = sc.to_admitted()
    lot = sc.lot_for(s)
    refused(s, InvalidTransition, s.infuse_msc, sc.MSC_START, sc.MSC_STOP, lot, config=CONFIG)
    t, _ = sc.to_transplanted(number="SCR-002")
    refused(t, InvalidTransition, t.infuse_msc, sc.MSC_START, sc.MSC_STOP, sc.lot_for(t, lot_id="MSC-2"), config=CONFIG)
