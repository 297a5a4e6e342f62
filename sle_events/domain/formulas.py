"""Derived values and time rules of the protocol (formulas.md §2–§8, PROTOCOL.md §5–§8, R4, R6, R9).

Pure functions: no I/O, no clock (callers pass ``now``), no event store.

Arithmetic
----------
* Inputs go through :func:`~sle_events.domain.quantities.parse_decimal` (decimal strings, ints
  or Decimals; floats are refused). Outputs are ``Decimal`` at **full precision**: the 28-digit
  context :data:`~sle_events.domain.quantities.CONTEXT`, the same precision as the formulas.md
  appendix script, and the same operation order where the appendix gives one, so a value we
  compute equals the appendix's value digit for digit. Rounding to 2 decimals is for display
  only (``quantities.display``); the one exception is BSA, rounded half-up to 2 dp *before* the
  CYC dose is computed, as the protocol requires.
* **eGFR powers.** CKD-EPI needs non-integer powers (``ratio ** -0.241``). We use ``Decimal.__pow__``
  in the 28-digit context, exactly as the appendix does. For a non-integer exponent libmpdec
  evaluates ``exp(y·ln x)`` internally with extra guard digits and returns the result rounded to
  28 significant digits ("almost always correctly rounded" per the ``decimal`` docs; the error is
  at most about 1 unit in the 28th digit). The whole equation is 5 such rounded operations, so
  the relative error of the full-precision eGFR is < 1e-26, i.e. it can never change the
  2-decimal value except at an exact tie, which a transcendental result cannot hit. No float is
  used anywhere.

Versions
--------
Every formula function carries ``FORMULA_ID`` and ``FORMULA_VERSION`` attributes (also exported as
module constants and in :data:`FORMULA_VERSIONS`). A derived event cites ``FORMULA_VERSION``
(e.g. ``"egfr.ckd_epi_2021.v1"``). Change the version whenever a change could alter any digit of
an output.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal, localcontext
from enum import StrEnum
from fractions import Fraction
from typing import Any, TypeVar

from sle_events.domain import labs
from sle_events.domain.errors import (
    FutureTimestamp,
    InconsistentTimestamps,
    InvalidQuantity,
    NaiveTimestamp,
    NotComputable,
    OutsideWindow,
    UnknownVisit,
)
from sle_events.domain.quantities import CONTEXT, from_fraction, parse_decimal, round_half_up
from sle_events.domain.settings import StudySettings, resolve
from sle_events.domain.sledai2k import get_descriptor

__all__ = [
    # registry
    "FORMULA_VERSIONS",
    "BSA_FORMULA_VERSION",
    "CYC_DOSE_FORMULA_VERSION",
    "EGFR_FORMULA_VERSION",
    "UPCR_FORMULA_VERSION",
    "MSC_DOSE_FORMULA_VERSION",
    "RENAL_RESPONSE_FORMULA_VERSION",
    "SLEDAI2K_FORMULA_VERSION",
    "PERCENT_CHANGE_FORMULA_VERSION",
    "SAE_CLOCK_FORMULA_VERSION",
    "CYC_MSC_INTERVAL_FORMULA_VERSION",
    "LENGTH_OF_STAY_FORMULA_VERSION",
    "VISIT_WINDOW_FORMULA_VERSION",
    # BSA / CYC
    "bsa_mosteller_exact",
    "bsa_mosteller",
    "cyc_calculated_dose",
    "CycDoseCheck",
    "check_cyc_dose",
    # eGFR
    "completed_years",
    "egfr_ckd_epi_2021",
    "egfr_from_creatinine",
    # UPCR
    "upcr",
    # MSC
    "viable_cells",
    "msc_dose_per_kg",
    "msc_dose_in_range",
    "msc_release_failures",
    "msc_infusion_within_release_window",
    # renal
    "RenalStatus",
    "assessment_month",
    "renal_response",
    "percent_change",
    # SLEDAI
    "sledai2k_total",
    "sledai2k_in_lookback",
    "sledai2k_change",
    "sledai2k_meaningful_improvement",
    # safety
    "SaeReportStatus",
    "sae_report_due_at",
    "sae_report_status",
    # time
    "require_aware",
    "hours_between",
    "cyc_to_msc_hours",
    "cyc_msc_interval_ok",
    "check_cyc_msc_interval",
    "length_of_stay_days",
    "stay_flagged",
    "VisitWindow",
    "scheduled_follow_up_months",
    "visit_month",
    "visit_window",
    "visit_in_window",
    "study_day",
    "check_not_in_future",
    "within_days",
    "eligibility_still_valid",
    "screening_labs_valid",
    "pregnancy_test_valid",
]

F = TypeVar("F", bound=Callable[..., Any])

#: formula id → versioned id cited by derived events
FORMULA_VERSIONS: dict[str, str] = {}


def _formula(formula_version: str) -> Callable[[F], F]:
    formula_id, _, _ = formula_version.rpartition(".")

    def deco(fn: F) -> F:
        fn.FORMULA_ID = formula_id  # type: ignore[attr-defined]  # metadata attached to the function object
        fn.FORMULA_VERSION = formula_version  # type: ignore[attr-defined]  # metadata attached to the function object
        FORMULA_VERSIONS[formula_id] = formula_version
        return fn

    return deco


BSA_FORMULA_VERSION = "bsa.mosteller.v1"
CYC_DOSE_FORMULA_VERSION = "cyc.dose_bsa.v1"
EGFR_FORMULA_VERSION = "egfr.ckd_epi_2021.v1"
UPCR_FORMULA_VERSION = "upcr.spot_ratio.v1"
MSC_DOSE_FORMULA_VERSION = "msc.dose_per_kg.v1"
RENAL_RESPONSE_FORMULA_VERSION = "renal_response.kdigo_2024.v1"
SLEDAI2K_FORMULA_VERSION = "sledai2k.total.v1"
PERCENT_CHANGE_FORMULA_VERSION = "percent_change.v1"
SAE_CLOCK_FORMULA_VERSION = "sae.report_clock.v1"
CYC_MSC_INTERVAL_FORMULA_VERSION = "time.cyc_msc_interval.v1"
LENGTH_OF_STAY_FORMULA_VERSION = "time.length_of_stay.v1"
VISIT_WINDOW_FORMULA_VERSION = "time.visit_window.v1"


def _positive(field: str, value: Any) -> Decimal:
    d = parse_decimal(field, value)
    if d <= 0:
        raise InvalidQuantity(field, value, "must be greater than 0")
    return d


def _non_negative(field: str, value: Any) -> Decimal:
    d = parse_decimal(field, value)
    if d < 0:
        raise InvalidQuantity(field, value, "must not be negative")
    return d


# =========================================================================== BSA and CYC
@_formula(BSA_FORMULA_VERSION)
def bsa_mosteller_exact(height_cm: Any, weight_kg: Any) -> Decimal:
    """Mosteller BSA (m²) = √(height cm × weight kg / 3600) at full precision."""
    h = _positive("height_cm", height_cm)
    w = _positive("weight_kg", weight_kg)
    with localcontext(CONTEXT):
        return (h * w / Decimal(3600)).sqrt()


@_formula(BSA_FORMULA_VERSION)
def bsa_mosteller(
    height_cm: Any, weight_kg: Any, *, decimals: int | None = None, settings: StudySettings | None = None
) -> Decimal:
    """Mosteller BSA rounded half-up to 2 decimals (``settings.bsa_dosing_decimals``).

    This rounded value is the one the protocol records and doses from (formulas.md §3).
    """
    places = resolve(settings).bsa_dosing_decimals if decimals is None else decimals
    return round_half_up(bsa_mosteller_exact(height_cm, weight_kg), places)


@_formula(CYC_DOSE_FORMULA_VERSION)
def cyc_calculated_dose(prescribed_mg_per_m2: Any, bsa_m2: Any) -> Decimal:
    """CYC calculated dose (mg) = prescribed mg/m² × BSA. Pass the **2-dp** BSA
    (:func:`bsa_mosteller`), as the protocol doses from the rounded BSA."""
    p = _positive("prescribed_mg_per_m2", prescribed_mg_per_m2)
    b = _positive("bsa_m2", bsa_m2)
    with localcontext(CONTEXT):
        return p * b


@dataclass(frozen=True, slots=True)
class CycDoseCheck:
    """Result of :func:`check_cyc_dose`. Each condition is a **flag**, never a refusal."""

    administered_mg: Decimal
    calculated_mg: Decimal
    #: (administered − calculated) ÷ calculated, full precision, signed
    deviation: Decimal
    tolerance: Decimal
    cap_mg: Decimal
    outside_tolerance: bool
    over_cap: bool
    prescribed_outside_range: bool

    @property
    def flags(self) -> tuple[str, ...]:
        out = []
        if self.outside_tolerance:
            out.append("CYC_DOSE_OUTSIDE_TOLERANCE")
        if self.over_cap:
            out.append("CYC_DOSE_OVER_CAP")
        if self.prescribed_outside_range:
            out.append("CYC_PRESCRIBED_OUTSIDE_RANGE")
        return tuple(out)

    @property
    def flagged(self) -> bool:
        return bool(self.flags)


@_formula(CYC_DOSE_FORMULA_VERSION)
def check_cyc_dose(
    administered_mg: Any,
    calculated_mg: Any,
    *,
    prescribed_mg_per_m2: Any = None,
    tolerance: Any = None,
    cap_mg: Any = None,
    settings: StudySettings | None = None,
) -> CycDoseCheck:
    """Flags for an administered CYC dose (PROTOCOL §5.1, formulas.md §3).

    * outside tolerance: |administered − calculated| **>** tolerance × calculated (exactly ±10 %
      is not flagged);
    * over cap: administered **>** cap (1800 mg; equal is allowed);
    * prescribed outside range: the prescribed mg/m² is outside 500–1000 (when given).
    """
    s = resolve(settings)
    adm = _positive("administered_mg", administered_mg)
    calc = _positive("calculated_mg", calculated_mg)
    tol = s.cyc_administered_tolerance if tolerance is None else _non_negative("tolerance", tolerance)
    cap = s.cyc_total_cap_mg if cap_mg is None else _positive("cap_mg", cap_mg)
    with localcontext(CONTEXT):
        deviation = (adm - calc) / calc
        outside = abs(adm - calc) > tol * calc
    prescribed_out = False
    if prescribed_mg_per_m2 is not None:
        p = _positive("prescribed_mg_per_m2", prescribed_mg_per_m2)
        prescribed_out = not (s.cyc_dose_min_mg_per_m2 <= p <= s.cyc_dose_max_mg_per_m2)
    return CycDoseCheck(
        administered_mg=adm,
        calculated_mg=calc,
        deviation=deviation,
        tolerance=tol,
        cap_mg=cap,
        outside_tolerance=outside,
        over_cap=adm > cap,
        prescribed_outside_range=prescribed_out,
    )


# =========================================================================== eGFR
#: CKD-EPI 2021 constants (Inker 2021): sex → (kappa, alpha, sex factor)
_CKD_EPI_2021: Mapping[str, tuple[Decimal, Decimal, Decimal | None]] = {
    "F": (Decimal("0.7"), Decimal("-0.241"), Decimal("1.012")),
    "M": (Decimal("0.9"), Decimal("-0.302"), None),
}
_CKD_EPI_2021_INTERCEPT = Decimal(142)
_CKD_EPI_2021_HIGH_EXPONENT = Decimal("-1.200")
_CKD_EPI_2021_AGE_BASE = Decimal("0.9938")
#: the equation is validated for adults only (formulas.md §2)
EGFR_MIN_AGE_YEARS = 18


def completed_years(birth_date: date, on_date: date) -> int:
    """Age in completed years on ``on_date`` (formulas.md §2: age at specimen collection).

    A 29 February birthday completes a year on 1 March in non-leap years.
    """
    if isinstance(birth_date, datetime) or isinstance(on_date, datetime):
        raise TypeError("completed_years takes dates, not datetimes")
    if on_date < birth_date:
        raise InconsistentTimestamps("birth_date", birth_date, "on_date", on_date)
    return on_date.year - birth_date.year - ((on_date.month, on_date.day) < (birth_date.month, birth_date.day))


@_formula(EGFR_FORMULA_VERSION)
def egfr_ckd_epi_2021(scr_mg_dl: Any, age_years: int, sex: str) -> Decimal:
    """eGFR (mL/min/{1.73_m2}), CKD-EPI 2021 race-free creatinine equation.

    ``142 × min(Scr/κ, 1)^α × max(Scr/κ, 1)^−1.200 × 0.9938^age × 1.012 [female]``

    ``scr_mg_dl`` in mg/dL, unrounded (convert umol/L with :func:`egfr_from_creatinine`);
    ``age_years`` = completed years (int) at collection; ``sex`` = ``"F"`` or ``"M"`` (DM.SEX).
    Raises :class:`NotComputable` for another sex or an age below 18 (the caller records
    "not computed" with the reason), :class:`InvalidQuantity` for a creatinine ≤ 0.
    """
    if sex not in _CKD_EPI_2021:
        raise NotComputable(EGFR_FORMULA_VERSION, f"sex {sex!r} is not 'F' or 'M'", sex=sex)
    if isinstance(age_years, bool) or not isinstance(age_years, int):
        raise InvalidQuantity("age_years", age_years, "age is a whole number of completed years")
    if age_years < EGFR_MIN_AGE_YEARS:
        raise NotComputable(EGFR_FORMULA_VERSION, f"age {age_years} y is below {EGFR_MIN_AGE_YEARS} y", age=age_years)
    scr = _positive("scr_mg_dl", scr_mg_dl)
    kappa, alpha, sex_factor = _CKD_EPI_2021[sex]
    one = Decimal(1)
    with localcontext(CONTEXT):
        ratio = scr / kappa
        # same operation order as the formulas.md appendix, so full-precision values agree
        egfr = (
            _CKD_EPI_2021_INTERCEPT
            * min(ratio, one) ** alpha
            * max(ratio, one) ** _CKD_EPI_2021_HIGH_EXPONENT
            * _CKD_EPI_2021_AGE_BASE ** Decimal(age_years)
        )
        return egfr * sex_factor if sex_factor is not None else egfr


@_formula(EGFR_FORMULA_VERSION)
def egfr_from_creatinine(value: Any, unit: str, age_years: int, sex: str) -> Decimal:
    """eGFR from a serum creatinine in any accepted creatinine unit (mg/dL, umol/L).

    The conversion to mg/dL is done at full precision first (formulas.md E7/E8).
    """
    scr, _ = labs.normalise("CREAT", value, unit)
    return egfr_ckd_epi_2021(scr, age_years, sex)


# =========================================================================== UPCR
@_formula(UPCR_FORMULA_VERSION)
def upcr(protein: Any, protein_unit: str, creatinine: Any, creatinine_unit: str, *, out_unit: str = "mg/mg") -> Decimal:
    """Spot urine protein-to-creatinine ratio (formulas.md §4).

    Protein (UPROT units: mg/dL, mg/L, g/L) ÷ creatinine (UCREAT units: mg/dL, mmol/L, umol/L),
    both brought to mg/dL exactly, then expressed in ``out_unit`` (default mg/mg = g/g; also
    ``mg/g``, ``mg/mmol``). One rounding at the end.
    """
    p = labs.to_canonical_exact("UPROT", protein, protein_unit)
    c = labs.to_canonical_exact("UCREAT", creatinine, creatinine_unit)
    if p < 0:
        raise InvalidQuantity("protein", protein, "must not be negative")
    if c <= 0:
        raise InvalidQuantity("creatinine", creatinine, "must be greater than 0")
    ratio_mg_mg = p / c
    return from_fraction(ratio_mg_mg / labs.conversion_factor("UPCR", out_unit))


# =========================================================================== MSC
def viable_cells(total_nucleated_cells: Any, viability_pct: Any) -> Decimal:
    """Viable cells = total nucleated cells × viability % ÷ 100."""
    total = _non_negative("total_nucleated_cells", total_nucleated_cells)
    v = _non_negative("viability_pct", viability_pct)
    if v > 100:
        raise InvalidQuantity("viability_pct", viability_pct, "a percentage cannot exceed 100")
    return from_fraction(Fraction(total) * Fraction(v) / 100)


@_formula(MSC_DOSE_FORMULA_VERSION)
def msc_dose_per_kg(viable_cells_infused: Any, weight_kg: Any) -> Decimal:
    """AlloMSC dose in 10^6 viable cells/kg = viable cells ÷ weight (kg) ÷ 10^6 (formulas.md §5)."""
    cells = _non_negative("viable_cells", viable_cells_infused)
    w = _positive("weight_kg", weight_kg)
    return from_fraction(Fraction(cells) / Fraction(w) / 10**6)


def msc_dose_in_range(dose_1e6_per_kg: Any, *, settings: StudySettings | None = None) -> bool:
    """True if the dose is within the accepted range (0.8–1.2 × 10^6/kg, inclusive)."""
    s = resolve(settings)
    d = parse_decimal("msc_dose", dose_1e6_per_kg)
    return s.msc_dose_min_1e6_per_kg <= d <= s.msc_dose_max_1e6_per_kg


_POSITIVE_MARKERS = ("CD73", "CD90", "CD105")
#: each group needs ≥ 1 measured marker, and every measured marker must be ≤ the maximum
_NEGATIVE_MARKER_GROUPS = (("CD45",), ("CD34",), ("CD14", "CD11b"), ("CD79a", "CD19"), ("HLA-DR",))


def msc_release_failures(
    *,
    viability_pct: Any,
    dose_1e6_per_kg: Any,
    sterility_negative: bool,
    mycoplasma_negative: bool,
    identity_markers_pct: Mapping[str, Any] | None = None,
    endotoxin_eu_per_kg: Any = None,
    settings: StudySettings | None = None,
) -> tuple[str, ...]:
    """Reasons an MSC lot fails release (PROTOCOL §5.2, R5); empty tuple = released.

    Identity (ISCT, Dominici 2006) is checked when ``identity_markers_pct`` is given:
    CD73/CD90/CD105 each ≥ 95 %, CD45, CD34, CD14 or CD11b, CD79a or CD19 and HLA-DR ≤ 2 %.
    A missing positive marker or a negative group with no measured marker fails identity.
    Endotoxin is checked when given.
    """
    s = resolve(settings)
    reasons: list[str] = []
    viability = parse_decimal("viability_pct", viability_pct)
    if viability < s.msc_min_viability_pct:
        reasons.append(f"viability {viability}% < {s.msc_min_viability_pct}%")
    dose = parse_decimal("msc_dose", dose_1e6_per_kg)
    if not (s.msc_dose_min_1e6_per_kg <= dose <= s.msc_dose_max_1e6_per_kg):
        reasons.append(
            f"dose {dose} × 10^6/kg outside {s.msc_dose_min_1e6_per_kg}–{s.msc_dose_max_1e6_per_kg} × 10^6/kg"
        )
    if sterility_negative is not True:
        reasons.append("sterility not negative")
    if mycoplasma_negative is not True:
        reasons.append("mycoplasma not negative")
    if identity_markers_pct is not None:
        markers = {k: parse_decimal(k, v) for k, v in identity_markers_pct.items()}
        for m in _POSITIVE_MARKERS:
            if m not in markers:
                reasons.append(f"identity: {m} not measured")
            elif markers[m] < s.msc_positive_marker_min_pct:
                reasons.append(f"identity: {m} {markers[m]}% < {s.msc_positive_marker_min_pct}%")
        for group in _NEGATIVE_MARKER_GROUPS:
            measured = [m for m in group if m in markers]
            if not measured:
                reasons.append(f"identity: {' or '.join(group)} not measured")
            for m in measured:
                if markers[m] > s.msc_negative_marker_max_pct:
                    reasons.append(f"identity: {m} {markers[m]}% > {s.msc_negative_marker_max_pct}%")
    if endotoxin_eu_per_kg is not None:
        e = parse_decimal("endotoxin_eu_per_kg", endotoxin_eu_per_kg)
        if e > s.msc_max_endotoxin_eu_per_kg:
            reasons.append(f"endotoxin {e} EU/kg > {s.msc_max_endotoxin_eu_per_kg} EU/kg")
    return tuple(reasons)


def msc_infusion_within_release_window(
    release_at: datetime, infusion_start: datetime, *, settings: StudySettings | None = None
) -> bool:
    """True if the infusion starts 0 … 6 h (inclusive) after release or thaw (PROTOCOL §5.2)."""
    h = hours_between(release_at, infusion_start, "release_at", "infusion_start")
    return Decimal(0) <= h <= resolve(settings).msc_max_hours_release_to_infusion


# =========================================================================== renal response
class RenalStatus(StrEnum):
    CR = "CR"
    PR = "PR"
    NR = "NR"
    PENDING = "PENDING"
    NOT_EVALUABLE = "NOT_EVALUABLE"


_VISIT_RE = re.compile(r"M([1-9][0-9]{0,2})", re.ASCII)


def assessment_month(
    visit: str | None = None, *, days_since_tx: int | None = None, settings: StudySettings | None = None
) -> int:
    """The ``month`` used by :func:`renal_response` (formulas.md §6).

    A scheduled visit ``"M<n>"`` gives ``n`` (an ``"M<n>"`` not in the schedule is refused with
    :class:`UnknownVisit`). Otherwise (UNS, ET, or no visit code) ``floor(days_since_tx ÷ 30)``;
    before TX that is negative.
    """
    s = resolve(settings)
    if visit is not None and _VISIT_RE.fullmatch(visit):
        return visit_month(visit, settings=s)  # UnknownVisit for e.g. "M25"
    if days_since_tx is None or isinstance(days_since_tx, bool) or not isinstance(days_since_tx, int):
        raise InvalidQuantity(
            "days_since_tx", days_since_tx, "an unscheduled/ET visit needs the whole number of days since TX"
        )
    return days_since_tx // s.days_per_month


@_formula(RENAL_RESPONSE_FORMULA_VERSION)
def renal_response(
    baseline_upcr: Any,
    baseline_egfr: Any,
    upcr_value: Any,
    egfr_value: Any,
    month: int,
    *,
    tolerance: Any = None,
    settings: StudySettings | None = None,
) -> RenalStatus:
    """KDIGO 2024 renal response (PROTOCOL §8, formulas.md §6). UPCR in mg/mg (= g/g).

    ::

        if any input missing or baseline_upcr < 0.5:                 NOT_EVALUABLE
        stable := egfr >= (1 - tol) * baseline_egfr                  # boundary is stable
        if stable and upcr < 0.5:                                    CR  (strict <)
        elif stable and upcr <= 0.5 * baseline_upcr and upcr < 3.0:  PR  (≥ 50 % fall, inclusive)
        elif month >= 6:                                             NR
        else:                                                        PENDING

    ``tolerance`` defaults to ``settings.renal_egfr_tolerance`` (0.15); thresholds come from
    ``settings`` (``renal_*``).
    """
    s = resolve(settings)
    tol = s.renal_egfr_tolerance if tolerance is None else parse_decimal("tolerance", tolerance)
    if not (Decimal(0) <= tol < Decimal(1)):
        raise InvalidQuantity("tolerance", tolerance, "must satisfy 0 <= tolerance < 1")
    if isinstance(month, bool) or not isinstance(month, int):
        raise InvalidQuantity("month", month, "month is a whole number")
    if baseline_upcr is None or baseline_egfr is None or upcr_value is None or egfr_value is None:
        return RenalStatus.NOT_EVALUABLE
    b_upcr = _non_negative("baseline_upcr", baseline_upcr)
    b_egfr = _non_negative("baseline_egfr", baseline_egfr)
    u = _non_negative("upcr", upcr_value)
    e = _non_negative("egfr", egfr_value)
    if b_upcr < s.renal_min_baseline_upcr:
        return RenalStatus.NOT_EVALUABLE
    with localcontext(CONTEXT):
        stable = e >= (1 - tol) * b_egfr
        pr_limit = b_upcr * (1 - s.renal_pr_min_fall)
    if stable and u < s.renal_cr_upcr_below:
        return RenalStatus.CR
    if stable and u <= pr_limit and u < s.renal_pr_upcr_below:
        return RenalStatus.PR
    return RenalStatus.NR if month >= s.renal_nr_from_month else RenalStatus.PENDING


@_formula(PERCENT_CHANGE_FORMULA_VERSION)
def percent_change(value: Any, baseline: Any) -> Decimal | None:
    """(value − baseline) ÷ baseline × 100 at full precision; ``None`` when baseline is 0
    (formulas.md §6: a baseline of 0 has no percent change)."""
    v = parse_decimal("value", value)
    b = parse_decimal("baseline", baseline)
    if b == 0:
        return None
    return from_fraction((Fraction(v) - Fraction(b)) / Fraction(b) * 100)


# =========================================================================== SLEDAI-2K
@_formula(SLEDAI2K_FORMULA_VERSION)
def sledai2k_total(descriptor_codes: Iterable[str]) -> Decimal:
    """SLEDAI-2K total = sum of the weights of the **distinct** descriptors present.

    ``descriptor_codes`` are sledai2k.csv codes (``SLED2K01``…); each counts once however often it
    is listed. An unknown code raises :class:`~sle_events.domain.errors.UnknownDescriptor`.
    """
    if isinstance(descriptor_codes, (str, bytes)):
        raise TypeError("sledai2k_total takes an iterable of descriptor codes, not one string")
    codes = set(descriptor_codes)
    return Decimal(sum(get_descriptor(c).weight for c in sorted(codes, key=str)))


def _as_date(field: str, value: date | datetime) -> date:
    if isinstance(value, datetime):
        return value.date()  # site-local wall date, in the offset the timestamp carries
    if isinstance(value, date):
        return value
    raise TypeError(f"{field} must be a date or datetime, not {type(value).__name__}")


def sledai2k_in_lookback(
    observed: date | datetime,
    visit: date | datetime,
    *,
    lookback_days: int | None = None,
    settings: StudySettings | None = None,
) -> bool:
    """True if a descriptor observed on ``observed`` counts at the visit on ``visit``:
    ``visit − lookback_days ≤ observed ≤ visit`` in calendar days, both ends inclusive
    (10 days by default; ``settings.sledai_lookback_days``)."""
    days = resolve(settings).sledai_lookback_days if lookback_days is None else lookback_days
    o, v = _as_date("observed", observed), _as_date("visit", visit)
    return v - timedelta(days=days) <= o <= v


def sledai2k_change(baseline_total: Any, total: Any) -> Decimal:
    """Change from baseline (total − baseline); negative is improvement."""
    return parse_decimal("total", total) - parse_decimal("baseline_total", baseline_total)


def sledai2k_meaningful_improvement(baseline_total: Any, total: Any, *, settings: StudySettings | None = None) -> bool:
    """True for a fall of ≥ 4 points from baseline (SRI-4 cut; ``settings.sledai_meaningful_drop``)."""
    return -sledai2k_change(baseline_total, total) >= resolve(settings).sledai_meaningful_drop


# =========================================================================== SAE clock
class SaeReportStatus(StrEnum):
    OPEN = "OPEN"
    REPORTED_ON_TIME = "REPORTED_ON_TIME"
    REPORTED_LATE = "REPORTED_LATE"
    OVERDUE = "OVERDUE"


def require_aware(field: str, value: datetime) -> datetime:
    """Refuse a naive datetime (every timestamp carries its UTC offset, R9)."""
    if not isinstance(value, datetime):
        raise TypeError(f"{field} must be a datetime, not {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise NaiveTimestamp(field, value)
    return value


def sae_report_due_at(
    aware_at: datetime, *, deadline_hours: Any = None, settings: StudySettings | None = None
) -> datetime:
    """When the SAE report to the sponsor is due: aware_at + 24 h."""
    require_aware("aware_at", aware_at)
    hours = (
        resolve(settings).sae_report_hours
        if deadline_hours is None
        else _non_negative("deadline_hours", deadline_hours)
    )
    micro = int(hours * 3_600_000_000)
    if Decimal(micro) != hours * 3_600_000_000:
        raise InvalidQuantity("deadline_hours", deadline_hours, "finer than a microsecond")
    return aware_at + timedelta(microseconds=micro)


@_formula(SAE_CLOCK_FORMULA_VERSION)
def sae_report_status(
    aware_at: datetime,
    reported_at: datetime | None,
    now: datetime,
    *,
    deadline_hours: Any = None,
    settings: StudySettings | None = None,
) -> SaeReportStatus:
    """SAE 24-hour reporting status (PROTOCOL §7).

    * reported at or before aware_at + 24 h → ``REPORTED_ON_TIME`` (the deadline instant counts);
    * reported after it → ``REPORTED_LATE``;
    * not reported and ``now`` > aware_at + 24 h → ``OVERDUE``; otherwise ``OPEN``.

    Instants are compared in UTC (offsets cancel). A report before awareness is refused.
    """
    due = sae_report_due_at(aware_at, deadline_hours=deadline_hours, settings=settings)
    require_aware("now", now)
    if reported_at is not None:
        require_aware("reported_at", reported_at)
        if reported_at < aware_at:
            raise InconsistentTimestamps("aware_at", aware_at, "reported_at", reported_at)
        return SaeReportStatus.REPORTED_ON_TIME if reported_at <= due else SaeReportStatus.REPORTED_LATE
    return SaeReportStatus.OVERDUE if now > due else SaeReportStatus.OPEN


# =========================================================================== time rules
def hours_between(start: datetime, end: datetime, start_field: str = "start", end_field: str = "end") -> Decimal:
    """``end − start`` in hours, exact to the microsecond, on absolute instants (UTC)."""
    require_aware(start_field, start)
    require_aware(end_field, end)
    micro = (end - start) // timedelta(microseconds=1)
    return from_fraction(Fraction(micro, 3_600_000_000))


@_formula(CYC_MSC_INTERVAL_FORMULA_VERSION)
def cyc_to_msc_hours(cyc_start: datetime, msc_start: datetime) -> Decimal:
    """MSC infusion start − CYC infusion start, in hours (formulas.md §7)."""
    return hours_between(cyc_start, msc_start, "cyc_start", "msc_start")


def cyc_msc_interval_ok(cyc_start: datetime, msc_start: datetime, *, settings: StudySettings | None = None) -> bool:
    """True if 18 h ≤ MSC start − CYC start ≤ 36 h (R4; ``settings.cyc_msc_window_*``)."""
    s = resolve(settings)
    h = cyc_to_msc_hours(cyc_start, msc_start)
    return s.cyc_msc_window_min_hours <= h <= s.cyc_msc_window_max_hours


def check_cyc_msc_interval(
    cyc_start: datetime, msc_start: datetime, *, settings: StudySettings | None = None
) -> Decimal:
    """Return the CYC→MSC interval in hours or refuse it with :class:`OutsideWindow` (R4)."""
    s = resolve(settings)
    h = cyc_to_msc_hours(cyc_start, msc_start)
    if not (s.cyc_msc_window_min_hours <= h <= s.cyc_msc_window_max_hours):
        raise OutsideWindow("CYC→MSC interval", h, s.cyc_msc_window_min_hours, s.cyc_msc_window_max_hours, "h")
    return h


@_formula(LENGTH_OF_STAY_FORMULA_VERSION)
def length_of_stay_days(admission: date | datetime, discharge: date | datetime) -> int:
    """Length of stay = discharge date − admission date in site-local calendar days (R6).

    Datetimes are reduced to their local calendar date (in the offset they carry), so an
    admission at 23:00 and a discharge at 01:00 two days later is 2 days.
    """
    a = _as_date("admission", admission)
    d = _as_date("discharge", discharge)
    if d < a:
        raise InconsistentTimestamps("admission", admission, "discharge", discharge)
    return (d - a).days


def stay_flagged(los_days: int, *, settings: StudySettings | None = None) -> bool:
    """True if the stay is outside 3–5 days (R6: flagged, never refused)."""
    s = resolve(settings)
    return not (s.stay_min_days <= los_days <= s.stay_max_days)


@dataclass(frozen=True, slots=True)
class VisitWindow:
    """Target and inclusive window of a scheduled follow-up visit (protocol day 0 = TX)."""

    visit: str
    month: int
    day: int
    target: date
    earliest: date
    latest: date
    window_days: int

    def contains(self, when: date | datetime) -> bool:
        return self.earliest <= _as_date("visit_date", when) <= self.latest


def scheduled_follow_up_months(*, settings: StudySettings | None = None) -> tuple[int, ...]:
    """M1…M24 monthly, then every 6 months to M48 (defaults)."""
    s = resolve(settings)
    monthly = range(1, s.monthly_visits_through_month + 1)
    long_term = range(
        s.monthly_visits_through_month + s.long_term_interval_months,
        s.last_scheduled_month + 1,
        s.long_term_interval_months,
    )
    return tuple(monthly) + tuple(long_term)


def visit_month(visit: str | int, *, settings: StudySettings | None = None) -> int:
    """``"M12"`` (or ``12``) → 12, if it is a scheduled follow-up visit; else :class:`UnknownVisit`."""
    months = scheduled_follow_up_months(settings=settings)
    if isinstance(visit, int) and not isinstance(visit, bool):
        n = visit
    elif isinstance(visit, str) and (m := _VISIT_RE.fullmatch(visit)):
        n = int(m.group(1))
    else:
        raise UnknownVisit(str(visit), [f"M{k}" for k in months])
    if n not in months:
        raise UnknownVisit(f"M{n}" if isinstance(visit, int) else visit, [f"M{k}" for k in months])
    return n


@_formula(VISIT_WINDOW_FORMULA_VERSION)
def visit_window(tx_date: date | datetime, visit: str | int, *, settings: StudySettings | None = None) -> VisitWindow:
    """Target day 30·n after TX and the window ±7 d (M1–M24) or ±30 d (M30–M48), inclusive."""
    s = resolve(settings)
    n = visit_month(visit, settings=s)
    tx = _as_date("tx_date", tx_date)
    day = s.days_per_month * n
    w = s.monthly_window_days if n <= s.monthly_visits_through_month else s.long_term_window_days
    target = tx + timedelta(days=day)
    return VisitWindow(
        visit=f"M{n}",
        month=n,
        day=day,
        target=target,
        earliest=target - timedelta(days=w),
        latest=target + timedelta(days=w),
        window_days=w,
    )


def visit_in_window(
    tx_date: date | datetime, visit: str | int, visit_date: date | datetime, *, settings: StudySettings | None = None
) -> bool:
    """True if ``visit_date`` lies in the visit's window (out of window = deviation flag, R7)."""
    return visit_window(tx_date, visit, settings=settings).contains(visit_date)


def study_day(when: date | datetime, reference: date | datetime) -> int:
    """SDTM ``--DY`` relative to RFSTDTC (the CYC start date): no day 0 (formulas.md §7)."""
    d = (_as_date("date", when) - _as_date("reference", reference)).days
    return d + 1 if d >= 0 else d


def check_not_in_future(
    field: str,
    occurred_at: datetime,
    now: datetime,
    *,
    skew: timedelta | None = None,
    settings: StudySettings | None = None,
) -> datetime:
    """Refuse ``occurred_at`` more than 5 min after ``now`` (R9); exactly 5 min is allowed.
    Both timestamps must carry a UTC offset."""
    require_aware(field, occurred_at)
    require_aware("now", now)
    allowed = resolve(settings).future_clock_skew if skew is None else skew
    if occurred_at - now > allowed:
        raise FutureTimestamp(field, occurred_at, now, int(allowed.total_seconds()))
    return occurred_at


def within_days(earlier: date | datetime, later: date | datetime, max_days: int) -> bool:
    """True if ``later`` is 0 … ``max_days`` calendar days after ``earlier`` (inclusive)."""
    delta = (_as_date("later", later) - _as_date("earlier", earlier)).days
    return 0 <= delta <= max_days


def eligibility_still_valid(
    confirmed: date | datetime, enrolled: date | datetime, *, settings: StudySettings | None = None
) -> bool:
    """T6: eligibility confirmed ≤ 28 d before enrollment."""
    return within_days(confirmed, enrolled, resolve(settings).eligibility_validity_days)


def screening_labs_valid(
    collected: date | datetime, confirmed: date | datetime, *, settings: StudySettings | None = None
) -> bool:
    """T4: screening labs ≤ 28 d old at eligibility confirmation."""
    return within_days(collected, confirmed, resolve(settings).screening_lab_validity_days)


def pregnancy_test_valid(test_at: datetime, cyc_start: datetime, *, settings: StudySettings | None = None) -> bool:
    """T7: pregnancy test taken 0 … 72 h (inclusive) before the CYC start."""
    h = hours_between(test_at, cyc_start, "pregnancy_test_at", "cyc_start")
    return Decimal(0) <= h <= resolve(settings).pregnancy_test_max_hours_before_cyc
