"""Study settings: every [CONFIG] default of PROTOCOL.md (§9 and the rules that cite it).

``StudySettings`` is the versioned study configuration the rule layer reads. Nothing else in
``sle_events.domain`` hard-codes a protocol number: functions take ``settings=`` (or an explicit
parameter) and fall back to :data:`DEFAULT_SETTINGS`.

Conventions
-----------
* Decimal fields are ``Decimal`` (floats are refused on input) and serialise to decimal
  **strings** in JSON mode (``model_dump(mode="json")`` / ``model_dump_json()``).
* Fractions are fractions, not percents: ``cyc_administered_tolerance = 0.10`` means ±10 %,
  ``renal_egfr_tolerance = 0.15`` means 15 %. Percent-valued clinical quantities (viability,
  marker expression) keep the unit in the name (``..._pct``).
* Durations carry their unit in the field name (``_hours``, ``_days``, ``_minutes``).
* Ranges are inclusive on both ends, and each (min, max) pair is validated ``min <= max``.
* The model is frozen; a new configuration version is a new instance. Build it with
  ``StudySettings(**{...})`` (``model_copy(update=...)`` would skip validation).
"""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator

from sle_events.domain.bounds import DEFAULT_BOUNDS, Bound
from sle_events.domain.quantities import DecimalValue

__all__ = ["StudySettings", "DEFAULT_SETTINGS", "resolve"]


def _d(text: str) -> Decimal:
    return Decimal(text)


class StudySettings(BaseModel):
    """All study settings with their PROTOCOL.md defaults."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    version: str = Field("protocol-defaults.v1", description="configuration version label")

    # ---- R4 / §5.1: CYC → MSC interval (hours, inclusive) -------------------------------
    cyc_msc_window_min_hours: DecimalValue = _d("18")
    cyc_msc_window_max_hours: DecimalValue = _d("36")

    # ---- §5.1 cyclophosphamide dose ------------------------------------------------------
    cyc_dose_mg_per_m2: DecimalValue = _d("750")
    cyc_dose_min_mg_per_m2: DecimalValue = _d("500")
    cyc_dose_max_mg_per_m2: DecimalValue = _d("1000")
    cyc_total_cap_mg: DecimalValue = _d("1800")
    #: administered vs calculated: flag when |administered − calculated| > tolerance × calculated
    cyc_administered_tolerance: DecimalValue = _d("0.10")
    #: decimals BSA is rounded to (half-up) before the dose is computed (formulas.md §3)
    bsa_dosing_decimals: StrictInt = 2

    # ---- §5.2 AlloMSC dose and release ---------------------------------------------------
    msc_dose_target_1e6_per_kg: DecimalValue = _d("1.0")
    msc_dose_min_1e6_per_kg: DecimalValue = _d("0.8")
    msc_dose_max_1e6_per_kg: DecimalValue = _d("1.2")
    msc_min_viability_pct: DecimalValue = _d("70")
    msc_max_hours_release_to_infusion: DecimalValue = _d("6")
    #: ISCT identity (Dominici 2006): CD73, CD90, CD105 ≥ 95 %
    msc_positive_marker_min_pct: DecimalValue = _d("95")
    #: CD45, CD34, CD14/CD11b, CD79a/CD19, HLA-DR ≤ 2 %
    msc_negative_marker_max_pct: DecimalValue = _d("2")
    msc_max_endotoxin_eu_per_kg: DecimalValue = _d("5")

    # ---- R6 in-patient stay (flag outside, never refuse) ---------------------------------
    stay_min_days: StrictInt = 3
    stay_max_days: StrictInt = 5

    # ---- §6 schedule and windows ---------------------------------------------------------
    days_per_month: StrictInt = 30
    monthly_visits_through_month: StrictInt = 24
    monthly_window_days: StrictInt = 7
    long_term_interval_months: StrictInt = 6
    last_scheduled_month: StrictInt = 48
    long_term_window_days: StrictInt = 30
    early_termination_max_days_after_withdrawal: StrictInt = 30

    # ---- T4 / T6 validity periods --------------------------------------------------------
    eligibility_validity_days: StrictInt = 28
    screening_lab_validity_days: StrictInt = 28
    #: T7: negative pregnancy test ≤ 72 h before CYC (WOCBP)
    pregnancy_test_max_hours_before_cyc: DecimalValue = _d("72")

    # ---- §8 renal response (KDIGO 2024 default) ------------------------------------------
    renal_egfr_tolerance: DecimalValue = _d("0.15")
    renal_cr_upcr_below: DecimalValue = _d("0.5")
    renal_pr_upcr_below: DecimalValue = _d("3.0")
    #: PR needs UPCR ≤ (1 − fall) × baseline, i.e. a fall of ≥ 50 %
    renal_pr_min_fall: DecimalValue = _d("0.5")
    renal_nr_from_month: StrictInt = 6
    renal_min_baseline_upcr: DecimalValue = _d("0.5")

    # ---- §8 SLEDAI-2K ------------------------------------------------------------------------
    sledai_lookback_days: StrictInt = 10
    sledai_meaningful_drop: StrictInt = 4

    # ---- §7 safety clocks ------------------------------------------------------------------
    sae_report_hours: DecimalValue = _d("24")
    susar_fatal_report_days: StrictInt = 7
    susar_fatal_followup_days: StrictInt = 8
    susar_other_report_days: StrictInt = 15

    # ---- R9 time ----------------------------------------------------------------------------
    future_clock_skew_minutes: StrictInt = 5

    # ---- §3 lifecycle ------------------------------------------------------------------------
    ltfu_min_consecutive_missed_visits: StrictInt = 2
    ltfu_min_contact_attempts: StrictInt = 3
    rescreen_max: StrictInt = 1

    # ---- §4 eligibility thresholds [CONFIG] -------------------------------------------------
    eligibility_min_age_years: StrictInt = 18
    eligibility_max_age_years: StrictInt = 65
    eligibility_biopsy_max_months: StrictInt = 12
    eligibility_min_upcr_mg_per_mg: DecimalValue = _d("1.0")
    eligibility_min_protein_24h_g: DecimalValue = _d("1.0")
    eligibility_min_sledai2k: StrictInt = 8
    eligibility_min_egfr: DecimalValue = _d("30")
    contraception_months_after_infusion: StrictInt = 12

    # ---- §9 plausibility bounds -------------------------------------------------------------
    plausibility_bounds: dict[str, Bound] = Field(default_factory=lambda: dict(DEFAULT_BOUNDS))

    # ---- validation --------------------------------------------------------------------------
    @model_validator(mode="after")
    def _consistent(self) -> StudySettings:
        def ordered(lo: str, hi: str) -> None:
            if getattr(self, lo) > getattr(self, hi):
                raise ValueError(f"{lo} ({getattr(self, lo)}) must be <= {hi} ({getattr(self, hi)})")

        ordered("cyc_msc_window_min_hours", "cyc_msc_window_max_hours")
        ordered("cyc_dose_min_mg_per_m2", "cyc_dose_mg_per_m2")
        ordered("cyc_dose_mg_per_m2", "cyc_dose_max_mg_per_m2")
        ordered("msc_dose_min_1e6_per_kg", "msc_dose_target_1e6_per_kg")
        ordered("msc_dose_target_1e6_per_kg", "msc_dose_max_1e6_per_kg")
        ordered("stay_min_days", "stay_max_days")
        ordered("monthly_visits_through_month", "last_scheduled_month")
        ordered("eligibility_min_age_years", "eligibility_max_age_years")
        ordered("renal_cr_upcr_below", "renal_pr_upcr_below")

        for name in ("cyc_administered_tolerance", "renal_egfr_tolerance", "renal_pr_min_fall"):
            v = getattr(self, name)
            if not (Decimal(0) <= v < Decimal(1)):
                raise ValueError(f"{name} is a fraction and must satisfy 0 <= {name} < 1 (got {v})")
        for name in ("msc_min_viability_pct", "msc_positive_marker_min_pct", "msc_negative_marker_max_pct"):
            v = getattr(self, name)
            if not (Decimal(0) <= v <= Decimal(100)):
                raise ValueError(f"{name} is a percentage and must be within 0–100 (got {v})")
        positive = (
            "cyc_msc_window_max_hours",
            "cyc_dose_mg_per_m2",
            "cyc_total_cap_mg",
            "msc_dose_target_1e6_per_kg",
            "sae_report_hours",
            "days_per_month",
            "monthly_visits_through_month",
            "long_term_interval_months",
            "last_scheduled_month",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0 (got {getattr(self, name)})")
        non_negative = (
            "cyc_msc_window_min_hours",
            "monthly_window_days",
            "long_term_window_days",
            "stay_min_days",
            "eligibility_validity_days",
            "screening_lab_validity_days",
            "sledai_lookback_days",
            "future_clock_skew_minutes",
            "renal_nr_from_month",
            "bsa_dosing_decimals",
            "msc_max_hours_release_to_infusion",
            "pregnancy_test_max_hours_before_cyc",
        )
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (got {getattr(self, name)})")
        if (self.last_scheduled_month - self.monthly_visits_through_month) % self.long_term_interval_months:
            raise ValueError(
                "last_scheduled_month must be monthly_visits_through_month plus a whole number of "
                "long_term_interval_months"
            )
        return self

    # ---- conveniences -----------------------------------------------------------------------
    @property
    def future_clock_skew(self) -> timedelta:
        return timedelta(minutes=self.future_clock_skew_minutes)


#: The protocol defaults (PROTOCOL.md §9 and the [CONFIG] rules).
DEFAULT_SETTINGS = StudySettings()


def resolve(settings: StudySettings | None) -> StudySettings:
    """``settings`` or the protocol defaults."""
    return DEFAULT_SETTINGS if settings is None else settings
