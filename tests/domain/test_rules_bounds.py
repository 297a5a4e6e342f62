"""Plausibility bounds (PROTOCOL.md §9)."""

from __future__ import annotations

from decimal import Decimal

import pytest

from sle_events.domain import bounds, labs
from sle_events.domain.bounds import DEFAULT_BOUNDS, LAB_BOUND_FIELDS, check_bound, check_lab_value
from sle_events.domain.errors import (
    FloatNotAllowed,
    ImplausibleValue,
    IncompatibleUnit,
    ProtocolViolation,
    UnknownAnalyte,
    UnknownField,
)
from sle_events.domain.settings import StudySettings

# field, low, high, unit as written in PROTOCOL.md §9 (canonical UCUM)
PROTOCOL_TABLE = [
    ("height", "100", "230", "cm"),
    ("weight", "25", "250", "kg"),
    ("temperature", "30", "45", "Cel"),
    ("systolic_bp", "50", "300", "mm[Hg]"),
    ("diastolic_bp", "20", "200", "mm[Hg]"),
    ("heart_rate", "20", "250", "/min"),
    ("serum_creatinine", "0.1", "25", "mg/dL"),
    ("egfr", "1", "200", "mL/min/{1.73_m2}"),
    ("bun", "1", "300", "mg/dL"),
    ("albumin", "0.5", "7", "g/dL"),
    ("upcr", "0", "30", "mg/mg"),
    ("protein_24h", "0", "40", "g/(24.h)"),
    ("urine_rbc", "0", "1000", "/[HPF]"),
    ("urine_wbc", "0", "1000", "/[HPF]"),
    ("anti_dsdna", "0", "100000", "[IU]/mL"),
    ("c3", "1", "500", "mg/dL"),
    ("c4", "0.1", "200", "mg/dL"),
    ("wbc", "0", "200", "10*3/uL"),
    ("neutrophils", "0", "150", "10*3/uL"),
    ("lymphocytes", "0", "150", "10*3/uL"),
    ("hb", "2", "25", "g/dL"),
    ("platelets", "0", "2000", "10*3/uL"),
    ("esr", "0", "200", "mm/h"),
    ("crp", "0", "500", "mg/L"),
    ("treg", "0", "100", "%"),
    ("cd4", "0", "5000", "{cells}/uL"),
    ("msc_viability", "0", "100", "%"),
    ("msc_dose", "0.1", "10", "10*6/kg"),
    ("cyc_administered", "100", "3000", "mg"),
    ("sledai2k_total", "0", "105", "{score}"),
    ("age_at_consent", "12", "90", "a"),
]


def test_table_matches_protocol_section_9():
    assert set(DEFAULT_BOUNDS) == {row[0] for row in PROTOCOL_TABLE}
    for field, low, high, unit in PROTOCOL_TABLE:
        b = DEFAULT_BOUNDS[field]
        assert (b.low, b.high, b.unit) == (Decimal(low), Decimal(high), unit), field


@pytest.mark.parametrize(("field", "low", "high", "unit"), PROTOCOL_TABLE)
def test_bounds_are_inclusive(field, low, high, unit):
    assert check_bound(field, low) == Decimal(low)
    assert check_bound(field, high) == Decimal(high)
    assert bounds.is_plausible(field, low) and bounds.is_plausible(field, high)


@pytest.mark.parametrize(("field", "low", "high", "unit"), PROTOCOL_TABLE)
@pytest.mark.parametrize("side", ["below", "above"])
def test_refusal_names_field_value_and_bound(field, low, high, unit, side):
    value = Decimal(low) - Decimal("0.01") if side == "below" else Decimal(high) + Decimal("0.01")
    with pytest.raises(ImplausibleValue) as exc:
        check_bound(field, str(value))
    err = exc.value
    b = DEFAULT_BOUNDS[field]
    assert err.field == field
    assert err.value == value
    assert err.bound == (Decimal(low), Decimal(high))
    msg = str(err)
    assert b.label in msg and field in msg
    assert format(value, "f") in msg
    assert f"{low}–{high}" in msg
    shown_unit = b.unit if b.display_unit is None else b.display_unit
    assert shown_unit in msg
    assert not bounds.is_plausible(field, str(value))


def test_example_message():
    with pytest.raises(ImplausibleValue) as exc:
        check_bound("serum_creatinine", "40")
    assert str(exc.value).startswith("serum creatinine 40 mg/dL is outside the plausible range 0.1–25 mg/dL")
    assert isinstance(exc.value, ProtocolViolation)
    assert exc.value.to_dict()["code"] == "implausible_value"


def test_unknown_field_and_bad_values():
    with pytest.raises(UnknownField) as exc:
        check_bound("creatinine_level", "1")
    assert "creatinine_level" in str(exc.value)
    with pytest.raises(FloatNotAllowed):
        check_bound("weight", 70.0)  # type: ignore[arg-type]  # a float on purpose: it must be refused


def test_settings_override_bounds():
    custom = dict(DEFAULT_BOUNDS)
    custom["height"] = bounds.Bound(label="height", low="120", high="200", unit="cm")
    s = StudySettings(plausibility_bounds=custom)
    with pytest.raises(ImplausibleValue) as exc:
        check_bound("height", "210", settings=s)
    assert "120–200 cm" in str(exc.value)
    assert check_bound("height", "210") == Decimal("210")  # default table unaffected


def test_bound_must_be_ordered():
    with pytest.raises(ValueError):
        bounds.Bound(label="x", low="2", high="1", unit="cm")


# --------------------------------------------------------------------------- lab results
def test_lab_mapping_is_consistent():
    for code, field in LAB_BOUND_FIELDS.items():
        assert code in labs.ANALYTES, code
        assert field in DEFAULT_BOUNDS, field
        if code != "UREA":
            # the bound's unit must be reachable from the analyte's canonical unit
            labs.conversion_factor(code, DEFAULT_BOUNDS[field].unit)
    assert bounds.lab_bound_field("CREATSI") == "serum_creatinine"
    assert bounds.lab_bound_field("ANA") is None
    with pytest.raises(UnknownAnalyte):
        bounds.lab_bound_field("NOPE")


def test_lab_value_in_canonical_unit():
    assert check_lab_value("CREAT", "1.00", "mg/dL") == (Decimal("1.00"), "mg/dL")
    with pytest.raises(ImplausibleValue) as exc:
        check_lab_value("CREAT", "40", "mg/dL")
    assert exc.value.field == "serum_creatinine"
    assert "serum creatinine 40 mg/dL is outside the plausible range 0.1–25 mg/dL" in str(exc.value)


def test_lab_value_converted_before_the_bound_check():
    # 25 mg/dL = 2210.5 umol/L exactly
    assert check_lab_value("CREATSI", "2210.5", "umol/L") == (Decimal("2210.5"), "umol/L")
    assert check_lab_value("CREAT", "2210.5", "umol/L")[0] == Decimal("25")
    with pytest.raises(ImplausibleValue) as exc:
        check_lab_value("CREATSI", "2211", "umol/L")
    msg = str(exc.value)
    assert "2211 umol/L" in msg and "0.1–25 mg/dL" in msg and "serum creatinine" in msg
    assert exc.value.reported_value == Decimal("2211") and exc.value.reported_unit == "umol/L"
    # C4 reported in g/L: 0.12 g/L = 12 mg/dL fine; 2.5 g/L = 250 mg/dL > 200
    assert check_lab_value("C4", "0.12", "g/L") == (Decimal("12"), "mg/dL")
    with pytest.raises(ImplausibleValue) as exc:
        check_lab_value("C4", "2.5", "g/L")
    assert "2.5 g/L" in str(exc.value) and "0.1–200 mg/dL" in str(exc.value)
    # albumin 32 "g/dL" (a g/L value mislabelled) is refused
    with pytest.raises(ImplausibleValue):
        check_lab_value("ALB", "32", "g/dL")
    assert check_lab_value("ALB", "32", "g/L") == (Decimal("3.2"), "g/dL")


def test_urea_checked_against_the_bun_bound():
    # 300 mg/dL BUN = 107.089... mmol/L urea
    assert check_lab_value("UREA", "107.08", "mmol/L") == (Decimal("107.08"), "mmol/L")
    with pytest.raises(ImplausibleValue) as exc:
        check_lab_value("UREA", "107.1", "mmol/L")
    assert exc.value.field == "bun" and "1–300 mg/dL" in str(exc.value)


def test_lab_without_protocol_bound_must_not_be_negative():
    assert check_lab_value("UPROT", "30", "mg/dL") == (Decimal("30"), "mg/dL")
    assert check_lab_value("ANA", "1:160", "{titer}") == (Decimal("160"), "{titer}")
    with pytest.raises(ImplausibleValue) as exc:
        check_lab_value("UPROT", "-1", "mg/dL")
    assert "UPROT -1 mg/dL" in str(exc.value) and "≥ 0" in str(exc.value)


def test_lab_value_unit_and_code_errors_pass_through():
    with pytest.raises(IncompatibleUnit):
        check_lab_value("CREAT", "1", "mmol/L")
    with pytest.raises(UnknownAnalyte):
        check_lab_value("XYZ", "1", "mg/dL")
