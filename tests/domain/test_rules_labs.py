"""Analyte table, packaged reference data, unit conversion and abnormal flags."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import pytest

from sle_events.domain import labs
from sle_events.domain.errors import (
    FloatNotAllowed,
    IncompatibleUnit,
    InvalidQuantity,
    UnknownAnalyte,
)
from sle_events.domain.quantities import display

# The shared folder sits beside the repository (as in CI: a copy of shared/ next to the clone).
SHARED = Path(__file__).resolve().parents[3] / "shared" / "protocol"
PACKAGE_DATA = Path(labs.__file__).parent / "data"


# --------------------------------------------------------------------------- package data
@pytest.mark.parametrize("name", ["labs.csv", "sledai2k.csv"])
def test_packaged_copy_equals_shared_protocol_file(name):
    shared = SHARED / name
    if not SHARED.is_dir():
        pytest.skip("shared protocol folder beside the repository is not available")
    assert shared.is_file(), f"{shared} missing from the shared protocol folder"
    assert labs.read_data_file(name) == shared.read_bytes()
    assert (PACKAGE_DATA / name).read_bytes() == shared.read_bytes()


def test_packaged_data_is_read_through_importlib_resources():
    assert labs.read_data_file("labs.csv").startswith(b"code,name,loinc,ucum_unit")


# --------------------------------------------------------------------------- table
def test_table_has_every_row():
    assert len(labs.ANALYTES) == 29
    assert list(labs.ANALYTES)[:3] == ["DSDNA", "C3", "C4"]


def test_analyte_fields():
    creat = labs.get_analyte("CREAT")
    assert creat == labs.Analyte(
        code="CREAT",
        name="Creatinine, serum",
        loinc="2160-0",
        ucum_unit="mg/dL",
        specimen="serum/plasma",
        panel="renal",
        low=Decimal("0.6"),
        high=Decimal("1.2"),
        notes=creat.notes,
    )
    assert "88.42" in creat.notes
    treg = labs.get_analyte("TREGPCT")
    assert treg.loinc is None and treg.low is None and treg.high is None and treg.ucum_unit == "%"
    egfr = labs.get_analyte("EGFR")
    assert egfr.low == Decimal("90") and egfr.high is None
    assert labs.get_analyte("ALB").high == Decimal("5.0")


def test_load_from_explicit_path(tmp_path):
    p = tmp_path / "labs.csv"
    p.write_bytes(labs.read_data_file("labs.csv"))
    assert labs.load_analytes(p) == dict(labs.ANALYTES)


def test_every_analyte_has_its_canonical_unit_with_factor_one():
    for code, a in labs.ANALYTES.items():
        assert labs.conversion_factor(code, a.ucum_unit) == 1, code
        assert labs.canonical_unit(code) == a.ucum_unit


def test_unknown_analyte():
    with pytest.raises(UnknownAnalyte) as exc:
        labs.normalise("CREATININE", "1.0", "mg/dL")
    assert "CREATININE" in str(exc.value) and "CREAT" in str(exc.value)
    with pytest.raises(UnknownAnalyte):
        labs.get_analyte("creat")  # codes are exact


# --------------------------------------------------------------------------- constants
def test_creatinine_constants_are_exact_derivations_of_88_42():
    assert Decimal("88.42") == labs.CREAT_UMOL_PER_MGDL
    assert Fraction(10000) / Fraction("88.42") == labs.CREAT_MG_PER_MMOL
    assert display(labs.convert("UPCR", "1", "mg/mg", "mg/mmol"), 4) == "113.0966"
    # labs.csv UCREAT note: mmol/L x 11.3097 = mg/dL (from 88.42)
    assert display(labs.convert("UCREAT", "1", "mmol/L", "mg/dL"), 4) == "11.3097"


# --------------------------------------------------------------------------- fixtures §1
@pytest.mark.parametrize(
    ("value", "unit", "to_unit", "expected"),
    [
        ("1.00", "mg/dL", "umol/L", "88.42"),
        ("0.85", "mg/dL", "umol/L", "75.16"),
        ("2.30", "mg/dL", "umol/L", "203.37"),
        ("150", "umol/L", "mg/dL", "1.70"),
        ("62", "umol/L", "mg/dL", "0.70"),
        ("300", "umol/L", "mg/dL", "3.39"),
    ],
)
def test_creatinine_fixtures(value, unit, to_unit, expected):
    assert display(labs.convert("CREAT", value, unit, to_unit)) == expected
    # via normalise on the analyte whose canonical unit is the target
    code = "CREATSI" if to_unit == "umol/L" else "CREAT"
    got, canonical = labs.normalise(code, value, unit)
    assert canonical == to_unit
    assert display(got) == expected


def test_creatinine_conversion_is_unrounded():
    got, unit = labs.normalise("CREAT", "53", "umol/L")
    assert unit == "mg/dL"
    assert got == Decimal(53) / Decimal("88.42")  # one correctly rounded division
    assert format(got, ".6f") == "0.599412"
    assert format(labs.normalise("CREAT", "150", "umol/L")[0], ".6f") == "1.696449"


@pytest.mark.parametrize(("bun", "urea"), [("14", "5.00"), ("28", "10.00"), ("50", "17.85")])
def test_bun_urea_fixtures(bun, urea):
    assert display(labs.bun_to_urea(bun)) == urea
    assert labs.urea_to_bun(labs.bun_to_urea(bun)).quantize(Decimal(1)) == Decimal(bun)


def test_urea_to_bun_exact():
    assert labs.urea_to_bun("5") == Decimal("14.0070")


# --------------------------------------------------------------------------- both ways
@pytest.mark.parametrize(
    ("code", "value", "unit", "canonical_value"),
    [
        ("C3", "1.2", "g/L", "120"),
        ("C4", "0.12", "g/L", "12"),
        ("C4", "120", "mg/L", "12"),
        ("ALB", "35", "g/L", "3.5"),
        ("HGB", "120", "g/L", "12"),
        ("CRP", "1.5", "mg/dL", "15"),
        ("WBC", "5.5", "10*9/L", "5.5"),
        ("NEUT", "3.1", "10*9/L", "3.1"),
        ("LYMPH", "1.2", "10*9/L", "1.2"),
        ("PLAT", "250", "10*9/L", "250"),
        ("UPCR", "500", "mg/g", "0.5"),
        ("UPCR", "1.5", "g/g", "1.5"),
        ("UPCR", "1.5", "mg/mg{creat}", "1.5"),
        ("UPCR24", "2000", "mg/g", "2"),
        ("UPROT24", "1500", "mg/(24.h)", "1.5"),
        ("UPROT24", "1.5", "g/d", "1.5"),
        ("UPROT", "1.2", "g/L", "120"),
        ("UPROT", "1200", "mg/L", "120"),
        ("UCREAT", "8.842", "mmol/L", "100"),
        ("UCREAT", "8842", "umol/L", "100"),
        ("CREAT", "88.42", "umol/L", "1"),
        ("CREATSI", "1", "mg/dL", "88.42"),
        ("CD4", "450", "/uL", "450"),
        ("C3", "120", "mg/dl", "120"),  # litre may be written l in UCUM
        ("CREAT", "88.42", "umol/l", "1"),
        ("DSDNA", "45", "[IU]/ml", "45"),
    ],
)
def test_conversion_both_ways(code, value, unit, canonical_value):
    canonical = labs.canonical_unit(code)
    got, got_unit = labs.normalise(code, value, unit)
    assert got_unit == canonical
    assert got == Decimal(canonical_value)
    back = labs.convert(code, got, canonical, unit)
    assert back == Decimal(value)


def test_upcr_mg_per_mmol_thresholds():
    # formulas.md §4 U4: 0.5 mg/mg = 56.55 mg/mmol; 50 mg/mmol = 0.442 mg/mg
    assert display(labs.convert("UPCR", "0.5", "mg/mg", "mg/mmol")) == "56.55"
    assert display(labs.normalise("UPCR", "50", "mg/mmol")[0], 3) == "0.442"
    assert labs.normalise("UPCR", "50", "mg/mmol")[0] == Decimal("0.4421")
    assert display(labs.normalise("UPCR", "300", "mg/mmol")[0], 3) == "2.653"


def test_normalise_canonical_value_unchanged():
    got, unit = labs.normalise("CREAT", "1.00", "mg/dL")
    assert str(got) == "1.00" and unit == "mg/dL"


@pytest.mark.parametrize(
    ("code", "unit"),
    [
        ("CREAT", "mmol/g"),
        ("CREAT", "µmol/L"),  # not UCUM
        ("DSDNA", "IU/mL"),  # not UCUM
        ("BUN", "mmol/L"),  # urea nitrogen in mmol/L is ambiguous: use UREA
        ("UREA", "mg/dL"),  # urea mass ≠ urea nitrogen mass
        ("URBC", "/[LPF]"),
        ("ALB", "mg/dL"),
        ("C3", "MG/DL"),
        ("EGFR", "mL/min"),
        ("TREGPCT", "{cells}/uL"),
        ("WBC", ""),
    ],
)
def test_incompatible_unit(code, unit):
    with pytest.raises(IncompatibleUnit) as exc:
        labs.normalise(code, "1", unit)
    err = exc.value
    assert err.analyte == code and err.unit == unit
    assert err.canonical_unit == labs.canonical_unit(code)
    msg = str(err)
    assert code in msg and repr(unit) in msg and labs.canonical_unit(code) in msg
    assert "accepted units" in msg


def test_convert_to_incompatible_unit():
    with pytest.raises(IncompatibleUnit):
        labs.convert("CREAT", "1", "mg/dL", "mmol/L")


def test_normalise_rejects_float_and_garbage():
    with pytest.raises(FloatNotAllowed):
        labs.normalise("CREAT", 1.0, "mg/dL")  # type: ignore[arg-type]  # a float on purpose: it must be refused
    with pytest.raises(InvalidQuantity):
        labs.normalise("CREAT", "1,0", "mg/dL")


# --------------------------------------------------------------------------- ANA titer
@pytest.mark.parametrize(("raw", "denominator"), [("1:160", 160), ("1:80", 80), ("640", 640), (1280, 1280)])
def test_ana_titer(raw, denominator):
    assert labs.normalise("ANA", raw, "{titer}") == (Decimal(denominator), "{titer}")


@pytest.mark.parametrize("raw", ["1:0", "2:160", "1:", "positive", "1:80.5", Decimal("80.5"), 0])
def test_ana_titer_invalid(raw):
    with pytest.raises(InvalidQuantity):
        labs.normalise("ANA", raw, "{titer}")


# --------------------------------------------------------------------------- flags
@pytest.mark.parametrize(
    ("value", "low", "high", "expected"),
    [
        ("0.5", "0.6", "1.2", "L"),
        ("0.6", "0.6", "1.2", "N"),
        ("1.2", "0.6", "1.2", "N"),
        ("1.21", "0.6", "1.2", "H"),
        ("95", "90", None, "N"),
        ("89", "90", None, "L"),
        ("1000", None, "5", "H"),
        ("3", None, None, None),
    ],
)
def test_flag(value, low, high, expected):
    lo = None if low is None else Decimal(low)
    hi = None if high is None else Decimal(high)
    assert labs.flag(Decimal(value), lo, hi) == expected


def test_abnormal_flag_uses_lab_range_when_given():
    assert labs.abnormal_flag("C3", "85", "mg/dL") == "L"  # default 90–180
    assert labs.abnormal_flag("C3", "85", "mg/dL", lab_low="80", lab_high="160") == "N"
    assert labs.abnormal_flag("C3", "0.85", "g/L", lab_low="0.8", lab_high="1.6") == "N"
    # lab range in a different unit than the result
    assert labs.abnormal_flag("C3", "85", "mg/dL", lab_low="0.9", lab_high="1.8", lab_unit="g/L") == "L"
    # only one side given: the other side is open, defaults are not mixed in
    assert labs.abnormal_flag("DSDNA", "500", "[IU]/mL", lab_low="0") == "N"
    assert labs.abnormal_flag("DSDNA", "45", "[IU]/mL") == "H"
    assert labs.abnormal_flag("DSDNA", "45", "[IU]/mL", lab_high="50") == "N"


def test_abnormal_flag_without_any_range():
    assert labs.abnormal_flag("TREGPCT", "4.5", "%") is None
    assert labs.abnormal_flag("UPROT", "30", "mg/dL") is None


def test_abnormal_flag_creatinine_in_si_against_default_mg_range():
    assert labs.abnormal_flag("CREAT", "150", "umol/L") == "H"  # 1.70 mg/dL > 1.2
    assert labs.abnormal_flag("CREATSI", "150", "umol/L") == "H"  # > 106
    assert labs.abnormal_flag("CREATSI", "1.0", "mg/dL") == "N"  # 88.42 umol/L
