"""Every worked example of formulas.md §2–§8, plus the refusals around them."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest

from sle_events.domain import formulas as f
from sle_events.domain.errors import (
    FloatNotAllowed,
    IncompatibleUnit,
    InconsistentTimestamps,
    InvalidQuantity,
    NotComputable,
    UnknownDescriptor,
    UnknownVisit,
)
from sle_events.domain.formulas import RenalStatus
from sle_events.domain.quantities import display
from sle_events.domain.settings import StudySettings
from sle_events.domain.sledai2k import DESCRIPTORS, MAX_TOTAL


# =========================================================================== versions
def test_every_formula_carries_a_version():
    # Any: FORMULA_VERSION and FORMULA_ID are attributes formulas._formula sets on the function objects
    formulas: list[tuple[Any, str]] = [
        (f.egfr_ckd_epi_2021, "egfr.ckd_epi_2021.v1"),
        (f.egfr_from_creatinine, "egfr.ckd_epi_2021.v1"),
        (f.bsa_mosteller, "bsa.mosteller.v1"),
        (f.bsa_mosteller_exact, "bsa.mosteller.v1"),
        (f.cyc_calculated_dose, "cyc.dose_bsa.v1"),
        (f.check_cyc_dose, "cyc.dose_bsa.v1"),
        (f.upcr, "upcr.spot_ratio.v1"),
        (f.msc_dose_per_kg, "msc.dose_per_kg.v1"),
        (f.renal_response, "renal_response.kdigo_2024.v1"),
        (f.sledai2k_total, "sledai2k.total.v1"),
        (f.sae_report_status, "sae.report_clock.v1"),
        (f.cyc_to_msc_hours, "time.cyc_msc_interval.v1"),
        (f.length_of_stay_days, "time.length_of_stay.v1"),
        (f.visit_window, "time.visit_window.v1"),
        (f.percent_change, "percent_change.v1"),
    ]
    for fn, version in formulas:
        assert version == fn.FORMULA_VERSION
        assert f.FORMULA_VERSIONS[fn.FORMULA_ID] == version
    assert f.EGFR_FORMULA_VERSION == "egfr.ckd_epi_2021.v1"


# =========================================================================== §2 eGFR
EGFR_FIXTURES = [
    ("E1", "0.70", 30, "F", "119.24"),
    ("E2", "0.60", 25, "F", "127.67"),
    ("E3", "2.10", 52, "F", "27.83"),
    ("E4", "1.40", 45, "M", "63.17"),
    ("E5", "0.80", 60, "M", "101.32"),
    ("E6", "1.40", 60, "M", "57.54"),
]


@pytest.mark.parametrize(("fid", "scr", "age", "sex", "expected"), EGFR_FIXTURES)
def test_egfr_fixtures(fid, scr, age, sex, expected):
    got = f.egfr_ckd_epi_2021(scr, age, sex)
    assert isinstance(got, Decimal)
    assert display(got) == expected
    assert display(f.egfr_from_creatinine(scr, "mg/dL", age, sex)) == expected


@pytest.mark.parametrize(
    ("fid", "umol", "age", "sex", "expected", "wrong_if_rounded_first"),
    [("E7", "53", 25, "F", "127.70", "127.67"), ("E8", "150", 38, "M", "52.40", "52.26")],
)
def test_egfr_from_si_creatinine_is_unrounded(fid, umol, age, sex, expected, wrong_if_rounded_first):
    assert display(f.egfr_from_creatinine(umol, "umol/L", age, sex)) == expected
    rounded_scr = display(Decimal(umol) / Decimal("88.42"))
    assert display(f.egfr_ckd_epi_2021(rounded_scr, age, sex)) == wrong_if_rounded_first


def test_egfr_with_factor_88_4_would_differ():
    # documents why the study factor matters (formulas.md E7/E8 notes)
    assert display(f.egfr_ckd_epi_2021(Decimal(53) / Decimal("88.4"), 25, "F")) == "127.69"
    assert display(f.egfr_ckd_epi_2021(Decimal(150) / Decimal("88.4"), 38, "M")) == "52.38"


def test_egfr_full_precision_value():
    # E1 exercises Scr/kappa = 1 exactly: 142 × 0.9938^30 × 1.012
    expected = Decimal(142) * Decimal("0.9938") ** 30 * Decimal("1.012")
    assert f.egfr_ckd_epi_2021("0.70", 30, "F") == expected
    assert len(f.egfr_ckd_epi_2021("0.70", 30, "F").as_tuple().digits) == 28


@pytest.mark.parametrize("sex", ["U", "f", "", "X", None])
def test_egfr_not_computed_for_other_sex(sex):
    with pytest.raises(NotComputable) as exc:
        f.egfr_ckd_epi_2021("1.0", 40, sex)
    assert "sex" in exc.value.reason


def test_egfr_not_computed_below_18():
    with pytest.raises(NotComputable) as exc:
        f.egfr_ckd_epi_2021("1.0", 17, "F")
    assert "17" in str(exc.value)
    assert f.egfr_ckd_epi_2021("1.0", 18, "F") > 0


@pytest.mark.parametrize("scr", ["0", "-1"])
def test_egfr_refuses_non_positive_creatinine(scr):
    with pytest.raises(InvalidQuantity):
        f.egfr_ckd_epi_2021(scr, 40, "F")


def test_egfr_refuses_float_and_bad_age_and_unit():
    with pytest.raises(FloatNotAllowed):
        f.egfr_ckd_epi_2021(0.7, 30, "F")
    with pytest.raises(InvalidQuantity):
        f.egfr_ckd_epi_2021("0.7", 30.0, "F")  # type: ignore[arg-type]  # a float age on purpose
    with pytest.raises(InvalidQuantity):
        f.egfr_ckd_epi_2021("0.7", True, "F")
    with pytest.raises(IncompatibleUnit):
        f.egfr_from_creatinine("1", "mmol/L", 30, "F")


@pytest.mark.parametrize(
    ("birth", "on", "years"),
    [
        (date(1990, 5, 10), date(2025, 5, 9), 34),
        (date(1990, 5, 10), date(2025, 5, 10), 35),
        (date(2000, 2, 29), date(2025, 2, 28), 24),
        (date(2000, 2, 29), date(2025, 3, 1), 25),
        (date(2000, 2, 29), date(2024, 2, 29), 24),
    ],
)
def test_completed_years(birth, on, years):
    assert f.completed_years(birth, on) == years


def test_completed_years_refuses_birth_after_date():
    with pytest.raises(InconsistentTimestamps):
        f.completed_years(date(2025, 1, 2), date(2025, 1, 1))


# =========================================================================== §3 BSA / CYC
BSA_FIXTURES = [
    ("B1", "170", "65", "1.751983", "1.75", "750", "1312.50"),
    ("B2", "158", "52", "1.510703", "1.51", "750", "1132.50"),
    ("B3", "182", "90", "2.133073", "2.13", "750", "1597.50"),
    ("B4", "165", "58.5", "1.637452", "1.64", "1000", "1640.00"),
]


@pytest.mark.parametrize(("fid", "h", "w", "full", "bsa2", "mgm2", "dose"), BSA_FIXTURES)
def test_bsa_and_cyc_dose_fixtures(fid, h, w, full, bsa2, mgm2, dose):
    exact = f.bsa_mosteller_exact(h, w)
    assert format(exact, ".6f") == full
    bsa = f.bsa_mosteller(h, w)
    assert bsa == Decimal(bsa2) and str(bsa) == bsa2
    calc = f.cyc_calculated_dose(mgm2, bsa)
    assert display(calc) == dose


def test_cyc_dose_uses_two_decimal_bsa():
    unrounded = f.cyc_calculated_dose("1000", f.bsa_mosteller_exact("165", "58.5"))
    assert display(unrounded) == "1637.45"  # the wrong answer formulas.md warns about
    assert display(f.cyc_calculated_dose("1000", f.bsa_mosteller("165", "58.5"))) == "1640.00"


def test_bsa_decimals_come_from_settings():
    s = StudySettings(bsa_dosing_decimals=3)
    assert f.bsa_mosteller("170", "65", settings=s) == Decimal("1.752")


@pytest.mark.parametrize(
    ("administered", "calculated", "flags"),
    [
        ("1312.50", "1312.50", ()),
        ("1443.75", "1312.50", ()),  # exactly +10 % is not flagged
        ("1181.25", "1312.50", ()),  # exactly −10 %
        ("1443.76", "1312.50", ("CYC_DOSE_OUTSIDE_TOLERANCE",)),
        ("1181.24", "1312.50", ("CYC_DOSE_OUTSIDE_TOLERANCE",)),
        ("1800", "1750", ()),  # at the cap
        ("1801", "1750", ("CYC_DOSE_OVER_CAP",)),
        ("2100", "1750", ("CYC_DOSE_OUTSIDE_TOLERANCE", "CYC_DOSE_OVER_CAP")),
    ],
)
def test_cyc_dose_flags(administered, calculated, flags):
    check = f.check_cyc_dose(administered, calculated)
    assert check.flags == flags
    assert check.flagged == bool(flags)
    assert check.deviation == (Decimal(administered) - Decimal(calculated)) / Decimal(calculated)


def test_cyc_prescription_range_flag_and_settings():
    assert f.check_cyc_dose("1312.5", "1312.5", prescribed_mg_per_m2="750").flags == ()
    assert f.check_cyc_dose("1312.5", "1312.5", prescribed_mg_per_m2="1000").flags == ()
    assert f.check_cyc_dose("1312.5", "1312.5", prescribed_mg_per_m2="1100").flags == ("CYC_PRESCRIBED_OUTSIDE_RANGE",)
    tight = StudySettings(cyc_administered_tolerance="0.05", cyc_total_cap_mg="1500")
    assert f.check_cyc_dose("1400", "1312.50", settings=tight).flags == ("CYC_DOSE_OUTSIDE_TOLERANCE",)
    assert f.check_cyc_dose("1501", "1500", settings=tight).flags == ("CYC_DOSE_OVER_CAP",)
    assert f.check_cyc_dose("1400", "1312.50", tolerance="0.07").flags == ()


# =========================================================================== §4 UPCR
def test_upcr_fixtures():
    assert display(f.upcr("150", "mg/dL", "100", "mg/dL")) == "1.50"  # U1
    assert display(f.upcr("45", "mg/dL", "150", "mg/dL")) == "0.30"  # U2
    # U3: 1.2 g/L protein, 8.0 mmol/L creatinine
    assert display(f.upcr("1.2", "g/L", "8.0", "mmol/L", out_unit="mg/mmol")) == "150.00"
    assert display(f.upcr("1200", "mg/L", "8.0", "mmol/L")) == "1.33"
    assert f.upcr("1.2", "g/L", "8.0", "mmol/L") == Decimal("1.3263")  # exact
    assert f.upcr("150", "mg/dL", "100", "mg/dL", out_unit="mg/g") == Decimal(1500)


def test_upcr_refusals():
    with pytest.raises(InvalidQuantity):
        f.upcr("150", "mg/dL", "0", "mg/dL")
    with pytest.raises(InvalidQuantity):
        f.upcr("-1", "mg/dL", "100", "mg/dL")
    with pytest.raises(IncompatibleUnit):
        f.upcr("150", "mg/dL", "100", "mg/g")
    with pytest.raises(IncompatibleUnit):
        f.upcr("150", "mg/dL", "100", "mg/dL", out_unit="%")


# =========================================================================== §5 MSC dose
@pytest.mark.parametrize(
    ("fid", "cells", "weight", "dose"),
    [("M1", "6.0E7", "60", "1.00"), ("M2", "5.7E7", "52", "1.10"), ("M3", "6.9E7", "75", "0.92")],
)
def test_msc_dose_fixtures(fid, cells, weight, dose):
    got = f.msc_dose_per_kg(cells, weight)
    assert display(got) == dose
    assert f.msc_dose_in_range(got)


def test_msc_dose_range_inclusive():
    assert f.msc_dose_in_range("0.8") and f.msc_dose_in_range("1.2")
    assert not f.msc_dose_in_range("0.79") and not f.msc_dose_in_range("1.21")


def test_viable_cells():
    assert f.viable_cells("8.0E7", "75") == Decimal("6.0E7")
    with pytest.raises(InvalidQuantity):
        f.viable_cells("8.0E7", "101")


GOOD_MARKERS = {
    "CD73": "98",
    "CD90": "99",
    "CD105": "96",
    "CD45": "0.5",
    "CD34": "0.3",
    "CD14": "1.0",
    "CD19": "0.2",
    "HLA-DR": "1.9",
}


def test_msc_release_pass_and_failures():
    ok: dict[str, Any] = dict(
        viability_pct="85",
        dose_1e6_per_kg="1.0",
        sterility_negative=True,
        mycoplasma_negative=True,
        identity_markers_pct=GOOD_MARKERS,
        endotoxin_eu_per_kg="1",
    )
    assert f.msc_release_failures(**ok) == ()
    assert f.msc_release_failures(**{**ok, "viability_pct": "70"}) == ()
    reasons = f.msc_release_failures(**{**ok, "viability_pct": "69.9"})
    assert len(reasons) == 1 and "viability 69.9%" in reasons[0]
    assert "dose 1.3" in f.msc_release_failures(**{**ok, "dose_1e6_per_kg": "1.3"})[0]
    assert f.msc_release_failures(**{**ok, "sterility_negative": False}) == ("sterility not negative",)
    assert f.msc_release_failures(**{**ok, "endotoxin_eu_per_kg": "5.1"})[0].startswith("endotoxin")
    bad = {**GOOD_MARKERS, "CD105": "94", "HLA-DR": "2.1"}
    del bad["CD14"]
    reasons = f.msc_release_failures(**{**ok, "identity_markers_pct": bad})
    assert "identity: CD105 94% < 95%" in reasons
    assert "identity: HLA-DR 2.1% > 2%" in reasons
    assert "identity: CD14 or CD11b not measured" in reasons


def test_msc_infusion_release_window():
    rel = datetime(2025, 3, 11, 3, 0, tzinfo=timezone(timedelta(hours=8)))
    assert f.msc_infusion_within_release_window(rel, rel + timedelta(hours=6))
    assert not f.msc_infusion_within_release_window(rel, rel + timedelta(hours=6, seconds=1))
    assert not f.msc_infusion_within_release_window(rel, rel - timedelta(minutes=1))


# =========================================================================== §6 renal response
BASE_UPCR, BASE_EGFR = "3.20", "72.00"
RENAL_FIXTURES = [
    ("R1", "M12", "0.40", "70.00", RenalStatus.CR),
    ("R2", "M6", "1.40", "66.00", RenalStatus.PR),
    ("R3", "M6", "1.80", "70.00", RenalStatus.NR),
    ("R4", "M12", "0.32", "55.00", RenalStatus.NR),
    ("R5", "M3", "1.80", "70.00", RenalStatus.PENDING),
    ("R6", "M6", "1.60", "61.20", RenalStatus.PR),
    ("R7", "M12", "0.50", "72.00", RenalStatus.PR),
]


@pytest.mark.parametrize(("fid", "visit", "upcr", "egfr", "status"), RENAL_FIXTURES)
def test_renal_response_fixtures(fid, visit, upcr, egfr, status):
    month = f.assessment_month(visit)
    assert f.renal_response(BASE_UPCR, BASE_EGFR, upcr, egfr, month) is status


def test_renal_response_r8_low_baseline_not_evaluable():
    assert f.renal_response("0.40", "90", "0.30", "90", 6) is RenalStatus.NOT_EVALUABLE


@pytest.mark.parametrize("missing", range(4))
def test_renal_response_missing_input(missing):
    args: list[str | None] = [BASE_UPCR, BASE_EGFR, "0.4", "70"]
    args[missing] = None
    baseline_upcr, baseline_egfr, upcr, egfr = args
    assert f.renal_response(baseline_upcr, baseline_egfr, upcr, egfr, 12) is RenalStatus.NOT_EVALUABLE


@pytest.mark.parametrize(
    ("fid", "upcr", "egfr", "month", "pct_upcr", "ratio"),
    [
        ("R1", "0.40", "70.00", 12, "-87.5", "0.9722"),
        ("R2", "1.40", "66.00", 6, "-56.25", "0.9167"),
        ("R3", "1.80", "70.00", 6, "-43.75", "0.9722"),
        ("R4", "0.32", "55.00", 12, "-90.0", "0.7639"),
        ("R6", "1.60", "61.20", 6, "-50.0", "0.8500"),
        ("R7", "0.50", "72.00", 12, "-84.375", "1.0000"),
    ],
)
def test_renal_fixture_columns(fid, upcr, egfr, month, pct_upcr, ratio):
    assert f.percent_change(upcr, BASE_UPCR) == Decimal(pct_upcr)
    assert (Decimal(egfr) / Decimal(BASE_EGFR)).quantize(Decimal("0.0001")) == Decimal(ratio)


def test_renal_tolerance_is_configurable():
    # eGFR 63 / 72 = 0.875: stable with 15 %, not with 10 %
    assert f.renal_response(BASE_UPCR, BASE_EGFR, "0.40", "63", 12) is RenalStatus.CR
    assert f.renal_response(BASE_UPCR, BASE_EGFR, "0.40", "63", 12, tolerance="0.10") is RenalStatus.NR
    s = StudySettings(renal_egfr_tolerance="0.10")
    assert f.renal_response(BASE_UPCR, BASE_EGFR, "0.40", "63", 12, settings=s) is RenalStatus.NR
    # boundary with 10 %: 64.8 = 0.9 × 72 is stable
    assert f.renal_response(BASE_UPCR, BASE_EGFR, "0.40", "64.80", 12, settings=s) is RenalStatus.CR
    with pytest.raises(InvalidQuantity):
        f.renal_response(BASE_UPCR, BASE_EGFR, "0.40", "63", 12, tolerance="1")
    with pytest.raises(FloatNotAllowed):
        f.renal_response(BASE_UPCR, BASE_EGFR, "0.40", "63", 12, tolerance=0.1)


def test_renal_pr_needs_upcr_below_3():
    # 50 % fall from 7.0 = 3.5 but not < 3.0 → not PR
    assert f.renal_response("7.0", "72", "3.5", "72", 6) is RenalStatus.NR
    assert f.renal_response("7.0", "72", "2.99", "72", 6) is RenalStatus.PR


def test_assessment_month():
    assert f.assessment_month("M6") == 6
    assert f.assessment_month("M30") == 30
    assert f.assessment_month("UNS", days_since_tx=179) == 5
    assert f.assessment_month("ET", days_since_tx=180) == 6
    assert f.assessment_month(None, days_since_tx=-1) == -1
    with pytest.raises(InvalidQuantity):
        f.assessment_month("UNS")
    with pytest.raises(UnknownVisit) as exc:
        f.assessment_month("M25")
    assert "M25" in str(exc.value)


def test_percent_change_zero_baseline():
    assert f.percent_change("1", "0") is None
    assert f.percent_change("1.5", "1") == Decimal(50)


# =========================================================================== §8 SLEDAI-2K
def _codes(*names: str) -> list[str]:
    by_name = {d.descriptor.lower(): d.code for d in DESCRIPTORS.values()}
    return [by_name[n] for n in names]


@pytest.mark.parametrize(
    ("fid", "names", "total"),
    [
        ("S1", ("proteinuria", "hematuria", "low complement", "increased dna binding"), 12),
        ("S2", ("arthritis", "rash", "alopecia", "low complement", "increased dna binding", "leukopenia"), 13),
        ("S3", (), 0),
    ],
)
def test_sledai_fixtures(fid, names, total):
    assert f.sledai2k_total(_codes(*names)) == Decimal(total)


def test_sledai_all_24_is_105():
    assert len(DESCRIPTORS) == 24
    assert f.sledai2k_total(DESCRIPTORS) == Decimal(105) == MAX_TOTAL
    weights = sorted(d.weight for d in DESCRIPTORS.values())
    assert weights == [1] * 3 + [2] * 7 + [4] * 6 + [8] * 8


def test_sledai_descriptor_counts_once():
    assert f.sledai2k_total(["SLED2K09", "SLED2K09", "SLED2K15"]) == Decimal(6)


@pytest.mark.parametrize("bad", ["SLED2K25", "sled2k01", "Arthritis", "", None])
def test_sledai_unknown_descriptor(bad):
    with pytest.raises(UnknownDescriptor) as exc:
        f.sledai2k_total(["SLED2K01", bad])
    assert str(bad) in str(exc.value)


def test_sledai_refuses_a_bare_string():
    with pytest.raises(TypeError):
        f.sledai2k_total("SLED2K01")


def test_sledai_lookback_and_change():
    visit = date(2025, 6, 10)
    assert f.sledai2k_in_lookback(date(2025, 6, 10), visit)
    assert f.sledai2k_in_lookback(date(2025, 5, 31), visit)  # 10 days before: counts
    assert not f.sledai2k_in_lookback(date(2025, 5, 30), visit)
    assert not f.sledai2k_in_lookback(date(2025, 6, 11), visit)
    assert f.sledai2k_in_lookback(date(2025, 5, 12), visit, lookback_days=30)
    assert f.sledai2k_in_lookback(date(2025, 5, 12), visit, settings=StudySettings(sledai_lookback_days=30))
    assert f.sledai2k_change(12, 8) == Decimal(-4)
    assert f.sledai2k_meaningful_improvement(12, 8)
    assert not f.sledai2k_meaningful_improvement(12, 9)
