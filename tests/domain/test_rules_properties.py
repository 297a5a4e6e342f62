"""Hypothesis properties of the rule layer, and the formulas.md appendix as an oracle."""

from __future__ import annotations

import contextlib
import io
import re
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import ROUND_HALF_UP, Decimal, getcontext, localcontext
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sle_events.domain import formulas as f
from sle_events.domain import labs
from sle_events.domain.formulas import RenalStatus, SaeReportStatus
from sle_events.domain.quantities import display, parse_decimal, round_half_up, to_decimal_string
from sle_events.domain.sledai2k import DESCRIPTORS

# per-test settings (a global profile would leak into other test folders)
PROPS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

FORMULAS_MD = Path(__file__).resolve().parents[3] / "shared" / "protocol" / "formulas.md"


# --------------------------------------------------------------------------- appendix oracle
# A verbatim copy of the functions of the formulas.md appendix script (Python, decimal at 28
# significant digits). test_appendix_copy_is_verbatim checks the copy against formulas.md.
APPENDIX_FUNCTIONS = """
def egfr_ckd_epi_2021(scr_mg_dl: D, age_years: int, sex: str) -> D:
    kappa, alpha = (D("0.7"), D("-0.241")) if sex == "F" else (D("0.9"), D("-0.302"))
    ratio = scr_mg_dl / kappa
    egfr = (D(142) * min(ratio, D(1)) ** alpha * max(ratio, D(1)) ** D("-1.200")
            * D("0.9938") ** D(age_years))
    return egfr * D("1.012") if sex == "F" else egfr


def bsa_mosteller(height_cm: D, weight_kg: D) -> D:
    return (height_cm * weight_kg / D(3600)).sqrt()


def renal_response(base_upcr, base_egfr, upcr, egfr, month, tol=D("0.15")):
    if base_upcr is None or base_egfr is None or upcr is None or egfr is None or base_upcr < D("0.5"):
        return "NOT_EVALUABLE"
    stable = egfr >= (1 - tol) * base_egfr
    if stable and upcr < D("0.5"):
        return "CR"
    if stable and upcr <= base_upcr * D("0.5") and upcr < D("3.0"):
        return "PR"
    return "NR" if month >= 6 else "PENDING"
"""
_ORACLE: dict = {"D": Decimal}
exec(APPENDIX_FUNCTIONS, _ORACLE)


def _oracle(name, *args):
    with localcontext() as ctx:
        ctx.prec = 28
        return _ORACLE[name](*args)


def _appendix_script() -> str:
    text = FORMULAS_MD.read_text(encoding="utf-8")
    m = re.search(r"## Appendix.*?```python\n(.*?)```", text, re.S)
    assert m, "appendix script not found in formulas.md"
    return m.group(1)


def test_appendix_copy_is_verbatim():
    if not FORMULAS_MD.is_file():
        pytest.skip("shared protocol folder not available")
    script = _appendix_script()
    for block in APPENDIX_FUNCTIONS.strip().split("\n\n\n"):
        assert block.strip() in script


def test_appendix_script_prints_the_values_we_compute():
    """Run the appendix script itself and compare its printout with our functions."""
    if not FORMULAS_MD.is_file():
        pytest.skip("shared protocol folder not available")
    out = io.StringIO()
    saved = getcontext().prec
    try:
        with contextlib.redirect_stdout(out):
            exec(_appendix_script(), {"__name__": "__main__"})
    finally:
        getcontext().prec = saved
    printed = out.getvalue()
    cyc_at = datetime.fromisoformat("2025-03-10T08:00:00+08:00")
    msc_at = datetime.fromisoformat("2025-03-11T01:00:00+00:00")
    ours = [
        f"1.00 mg/dL -> {display(labs.convert('CREAT', '1.00', 'mg/dL', 'umol/L'))} umol/L",
        f"150 umol/L -> {display(labs.normalise('CREAT', '150', 'umol/L')[0])} mg/dL",
        f"BUN 50 mg/dL -> urea {display(labs.bun_to_urea('50'))} mmol/L",
        f"Scr 0.70 mg/dL, 30 y, F -> {display(f.egfr_ckd_epi_2021('0.70', 30, 'F'))}",
        f"Scr 1.40 mg/dL, 60 y, M -> {display(f.egfr_ckd_epi_2021('1.40', 60, 'M'))}",
        f"Scr 53 umol/L (0.599412 mg/dL), 25 y, F -> {display(f.egfr_from_creatinine('53', 'umol/L', 25, 'F'))}",
        f"Scr 150 umol/L (1.696449 mg/dL), 38 y, M -> {display(f.egfr_from_creatinine('150', 'umol/L', 38, 'M'))}",
        f"165 cm, 58.5 kg -> BSA {f.bsa_mosteller('165', '58.5')} m2 (full 1.637452); 1000 mg/m2 x 1.64 = "
        f"{display(f.cyc_calculated_dose('1000', f.bsa_mosteller('165', '58.5')))} mg",
        f"= {display(f.upcr('1.2', 'g/L', '8.0', 'mmol/L', out_unit='mg/mmol'))} mg/mmol = "
        f"{display(f.upcr('1.2', 'g/L', '8.0', 'mmol/L'))} mg/mg",
        f"6.9E7 viable cells / 75 kg = {display(f.msc_dose_per_kg('6.9E7', '75'))} x 10^6 cells/kg",
        f"2025-03-11T01:00:00+00:00: {display(f.cyc_to_msc_hours(cyc_at, msc_at))} h -> ACCEPT",
        f"M48: day 1440, target {f.visit_window(date(2025, 3, 11), 'M48').target}, window "
        f"{f.visit_window(date(2025, 3, 11), 'M48').earliest}..{f.visit_window(date(2025, 3, 11), 'M48').latest}",
        f"M6: UPCR 1.60, eGFR 61.20 -> {f.renal_response('3.20', '72.00', '1.60', '61.20', 6)}",
        f"M12: UPCR 0.50, eGFR 72.00 -> {f.renal_response('3.20', '72.00', '0.50', '72.00', 12)}",
    ]
    for line in ours:
        assert line in printed, line
    total_line = (
        f"{f.sledai2k_total(['SLED2K13', 'SLED2K12', 'SLED2K20', 'SLED2K21'])} 13 0 {f.sledai2k_total(DESCRIPTORS)}"
    )
    assert total_line in printed


# --------------------------------------------------------------------------- strategies
def decimals(min_value: str, max_value: str, places: int = 4):
    return st.decimals(
        min_value=Decimal(min_value), max_value=Decimal(max_value), places=places, allow_nan=False, allow_infinity=False
    )


def significant(max_digits: int = 20):
    """Positive decimals with up to ``max_digits`` significant digits over a wide range."""
    return st.builds(
        lambda digits, exp: Decimal(digits).scaleb(exp),
        st.integers(min_value=1, max_value=10**max_digits - 1),
        st.integers(min_value=-20, max_value=0),
    ).filter(lambda d: abs(d.adjusted()) <= 20)


UNIT_PAIRS = [(code, unit) for code, units in labs.UNIT_FACTORS.items() for unit in units if code != "ANA"]


# --------------------------------------------------------------------------- quantities
@PROPS
@given(
    st.decimals(allow_nan=False, allow_infinity=False, places=None).filter(
        lambda d: len(d.as_tuple().digits) <= 28 and abs(d.adjusted()) <= 30
    )
)
def test_parse_decimal_round_trips_its_own_serialisation(d):
    assert parse_decimal("x", to_decimal_string(d)) == d
    assert parse_decimal("x", str(d)) == d


@PROPS
@given(decimals("-100000", "100000", places=6), st.integers(min_value=0, max_value=4))
def test_round_half_up_is_within_half_a_unit(d, places):
    r = round_half_up(d, places)
    unit = Decimal(1).scaleb(-places)
    assert abs(r - d) <= unit / 2
    assert r == d.quantize(unit, rounding=ROUND_HALF_UP)
    assert display(d, places) == format(r, "f")


@PROPS
@given(st.floats(allow_nan=True))
def test_any_float_is_refused(x):
    with pytest.raises(ValueError):
        parse_decimal("x", x)


# --------------------------------------------------------------------------- conversions
@PROPS
@given(st.sampled_from(UNIT_PAIRS), significant(20))
def test_to_canonical_and_back_recovers_the_reported_value(pair, v):
    code, unit = pair
    canonical_value, canonical = labs.normalise(code, v, unit)
    back = labs.convert(code, canonical_value, canonical, unit)
    # exact recovery of every reported digit...
    assert back.quantize(Decimal(1).scaleb(v.as_tuple().exponent)) == v
    # ...and the residue is below 1e-26 relative (one rounding in each direction)
    assert abs(back - v) <= v * Decimal("1e-26")


@PROPS
@given(st.sampled_from(UNIT_PAIRS), significant(20))
def test_canonical_to_unit_and_back_is_identity_when_the_forward_factor_is_a_terminating_decimal(pair, c):
    code, unit = pair
    factor = labs.conversion_factor(code, unit)
    inverse = 1 / factor
    # canonical → unit multiplies by 1/factor; exact when that is a terminating decimal
    den = inverse.denominator
    while den % 2 == 0:
        den //= 2
    while den % 5 == 0:
        den //= 5
    assume(den == 1)
    canonical = labs.canonical_unit(code)
    there = labs.convert(code, c, canonical, unit)
    assert labs.convert(code, there, unit, canonical) == c


@PROPS
@given(st.sampled_from(UNIT_PAIRS), significant(12), significant(12))
def test_conversion_preserves_order(pair, a, b):
    code, unit = pair
    ca, _ = labs.normalise(code, a, unit)
    cb, _ = labs.normalise(code, b, unit)
    assert (a < b) == (ca < cb) or a == b


@PROPS
@given(decimals("0.1", "25", places=2))
def test_creatinine_si_round_trip_gives_the_same_egfr(scr):
    umol = labs.convert("CREAT", scr, "mg/dL", "umol/L")  # exact (× 88.42)
    assert f.egfr_from_creatinine(umol, "umol/L", 40, "F") == f.egfr_ckd_epi_2021(scr, 40, "F")


# --------------------------------------------------------------------------- eGFR
@PROPS
@given(decimals("0.1", "25", places=3), st.integers(min_value=18, max_value=110), st.sampled_from(["F", "M"]))
def test_egfr_equals_the_appendix_script_at_full_precision(scr, age, sex):
    assert f.egfr_ckd_epi_2021(scr, age, sex) == _oracle("egfr_ckd_epi_2021", scr, age, sex)


@PROPS
@given(
    decimals("0.1", "20", places=3),
    decimals("0.001", "5", places=3),
    st.integers(min_value=18, max_value=100),
    st.sampled_from(["F", "M"]),
)
def test_egfr_decreases_with_creatinine(scr, delta, age, sex):
    assert f.egfr_ckd_epi_2021(scr + delta, age, sex) < f.egfr_ckd_epi_2021(scr, age, sex)


@PROPS
@given(decimals("0.1", "25", places=3), st.integers(min_value=18, max_value=100), st.sampled_from(["F", "M"]))
def test_egfr_decreases_with_age(scr, age, sex):
    assert f.egfr_ckd_epi_2021(scr, age + 1, sex) < f.egfr_ckd_epi_2021(scr, age, sex)


@PROPS
@given(decimals("0.1", "25", places=3), st.integers(min_value=18, max_value=100), st.sampled_from(["F", "M"]))
def test_egfr_matches_an_independent_float_evaluation(scr, age, sex):
    # sanity check of the equation itself (floats only in the test, never in the domain)
    kappa, alpha, factor = {"F": (0.7, -0.241, 1.012), "M": (0.9, -0.302, 1.0)}[sex]
    r = float(scr) / kappa
    expected = 142 * min(r, 1) ** alpha * max(r, 1) ** -1.2 * 0.9938**age * factor
    got = f.egfr_ckd_epi_2021(scr, age, sex)
    assert abs(float(got) - expected) <= 1e-9 * expected


# --------------------------------------------------------------------------- BSA / CYC
@PROPS
@given(decimals("100", "230", places=1), decimals("25", "250", places=1))
def test_bsa_matches_appendix_and_two_dp_rounding(h, w):
    exact = f.bsa_mosteller_exact(h, w)
    assert exact == _oracle("bsa_mosteller", h, w)
    rounded = f.bsa_mosteller(h, w)
    assert abs(rounded - exact) <= Decimal("0.005")
    assert rounded.as_tuple().exponent == -2


@PROPS
@given(decimals("500", "1000", places=0), decimals("1.00", "2.60", places=2), decimals("-0.3", "0.3", places=4))
def test_cyc_tolerance_flag_is_symmetric(mgm2, bsa, rel):
    calc = f.cyc_calculated_dose(mgm2, bsa)
    up = f.check_cyc_dose(calc * (1 + rel), calc)
    down = f.check_cyc_dose(calc * (1 - rel), calc) if rel < 1 else up
    assert up.outside_tolerance == down.outside_tolerance == (abs(rel) > Decimal("0.10"))


# --------------------------------------------------------------------------- renal response
ORDER = {RenalStatus.NR: 0, RenalStatus.PENDING: 0, RenalStatus.PR: 1, RenalStatus.CR: 2}
renal_inputs = st.tuples(
    decimals("0.5", "12", places=2),  # baseline UPCR (evaluable)
    decimals("15", "150", places=2),  # baseline eGFR
    decimals("0", "12", places=2),  # UPCR
    decimals("1", "200", places=2),  # eGFR
    st.integers(min_value=-1, max_value=48),  # month
)


@PROPS
@given(renal_inputs)
def test_renal_response_matches_the_appendix(args):
    bu, be, u, e, m = args
    assert f.renal_response(bu, be, u, e, m).value == _oracle("renal_response", bu, be, u, e, m)


@PROPS
@given(renal_inputs, decimals("0", "5", places=2))
def test_lower_upcr_is_never_worse(args, drop):
    bu, be, u, e, m = args
    better = max(u - drop, Decimal(0))
    assert ORDER[f.renal_response(bu, be, better, e, m)] >= ORDER[f.renal_response(bu, be, u, e, m)]


@PROPS
@given(renal_inputs, decimals("0", "50", places=2))
def test_higher_egfr_is_never_worse(args, rise):
    bu, be, u, e, m = args
    assert ORDER[f.renal_response(bu, be, u, e + rise, m)] >= ORDER[f.renal_response(bu, be, u, e, m)]


@PROPS
@given(renal_inputs)
def test_wider_tolerance_is_never_worse(args):
    bu, be, u, e, m = args
    strict = f.renal_response(bu, be, u, e, m, tolerance="0.10")
    loose = f.renal_response(bu, be, u, e, m, tolerance="0.15")
    assert ORDER[loose] >= ORDER[strict]


@PROPS
@given(renal_inputs)
def test_month_only_separates_pending_from_nr(args):
    bu, be, u, e, m = args
    status = f.renal_response(bu, be, u, e, m)
    if status in (RenalStatus.CR, RenalStatus.PR):
        assert all(f.renal_response(bu, be, u, e, k) is status for k in (0, 5, 6, 24))
    else:
        assert status is (RenalStatus.NR if m >= 6 else RenalStatus.PENDING)


@PROPS
@given(decimals("0", "0.49", places=2), renal_inputs)
def test_low_baseline_is_never_evaluable(bu, args):
    _, be, u, e, m = args
    assert f.renal_response(bu, be, u, e, m) is RenalStatus.NOT_EVALUABLE


@PROPS
@given(renal_inputs)
def test_cr_implies_low_upcr_and_stable_egfr(args):
    bu, be, u, e, m = args
    if f.renal_response(bu, be, u, e, m) is RenalStatus.CR:
        assert u < Decimal("0.5") and e >= Decimal("0.85") * be


# --------------------------------------------------------------------------- SLEDAI-2K
codes = st.lists(st.sampled_from(sorted(DESCRIPTORS)), max_size=40)


@PROPS
@given(codes)
def test_sledai_total_is_sum_of_distinct_weights(cs):
    total = f.sledai2k_total(cs)
    assert total == sum(DESCRIPTORS[c].weight for c in set(cs))
    assert Decimal(0) <= total <= Decimal(105)


@PROPS
@given(codes, st.randoms(use_true_random=False))
def test_sledai_total_ignores_order_and_repetition(cs, rnd):
    shuffled = list(cs) * 2
    rnd.shuffle(shuffled)
    assert f.sledai2k_total(shuffled) == f.sledai2k_total(cs)


@PROPS
@given(codes, codes)
def test_sledai_total_is_monotonic_in_the_descriptor_set(a, b):
    assert f.sledai2k_total(a + b) >= max(f.sledai2k_total(a), f.sledai2k_total(b))


# --------------------------------------------------------------------------- time
offsets = st.integers(min_value=-12 * 60, max_value=14 * 60).map(lambda m: timezone(timedelta(minutes=m)))
instants = st.datetimes(min_value=datetime(2020, 1, 1), max_value=datetime(2030, 1, 1), timezones=st.just(UTC))


@PROPS
@given(instants, st.integers(min_value=-(10**11), max_value=10**11), offsets, offsets)
def test_interval_hours_do_not_depend_on_offsets(start, micros, o1, o2):
    end = start + timedelta(microseconds=micros)
    h = f.cyc_to_msc_hours(start.astimezone(o1), end.astimezone(o2))
    assert h == Decimal(micros) / Decimal(3_600_000_000)


@PROPS
@given(
    st.dates(min_value=date(2020, 1, 1), max_value=date(2030, 1, 1)), st.sampled_from(f.scheduled_follow_up_months())
)
def test_visit_window_is_centred_on_day_30n(tx, n):
    w = f.visit_window(tx, n)
    assert (w.target - tx).days == 30 * n
    assert (w.target - w.earliest).days == (w.latest - w.target).days == (7 if n <= 24 else 30)
    assert w.contains(w.target)


@PROPS
@given(
    instants,
    st.one_of(st.none(), st.integers(min_value=0, max_value=72 * 3600)),
    st.integers(min_value=0, max_value=72 * 3600),
)
def test_sae_status_is_consistent(aware, reported_after_s, now_after_s):
    reported = None if reported_after_s is None else aware + timedelta(seconds=reported_after_s)
    now = aware + timedelta(seconds=now_after_s)
    status = f.sae_report_status(aware, reported, now)
    deadline = 24 * 3600
    if reported_after_s is None:
        assert status is (SaeReportStatus.OVERDUE if now_after_s > deadline else SaeReportStatus.OPEN)
    else:
        assert status is (
            SaeReportStatus.REPORTED_ON_TIME if reported_after_s <= deadline else SaeReportStatus.REPORTED_LATE
        )


@PROPS
@given(st.dates(min_value=date(2020, 1, 1), max_value=date(2030, 1, 1)), st.integers(min_value=0, max_value=30))
def test_length_of_stay_counts_calendar_days(adm, days):
    los = f.length_of_stay_days(adm, adm + timedelta(days=days))
    assert los == days
    assert f.stay_flagged(los) is not (3 <= days <= 5)
