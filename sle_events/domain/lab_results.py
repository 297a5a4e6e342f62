"""Where a lab result is validated, and where the derived renal values are computed.

* :func:`validate_lab_result`: analyte (labs.csv), unit (UCUM, converted exactly), plausibility bound
  (PROTOCOL §9), reference range (the reporting lab's wins over labs.csv) and abnormal flag.
* :func:`derive_egfr`, :func:`derive_upcr`: the derived results (formulas.md §2, §4), each recorded as its own
  event citing the versions of its input events and the formula version.
* :func:`validate_treg_panel`: the Treg panel (CD4+CD25+FOXP3+ % of CD4+, and CD4 count).
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from sle_events.domain import bounds, formulas, labs
from sle_events.domain.errors import InconsistentTimestamps, InvalidQuantity, MissingValue, NotComputable
from sle_events.domain.payloads import Demographics, LabResult, Sex, TregPanel
from sle_events.domain.quantities import parse_decimal, parse_optional_decimal, round_half_up
from sle_events.domain.settings import StudySettings

__all__ = [
    "validate_lab_result",
    "validate_treg_panel",
    "derive_egfr",
    "derive_upcr",
    "CREATININE_CODES",
    "UPCR_CODES",
    "EGFR_CODE",
]

CREATININE_CODES = ("CREAT", "CREATSI")
#: analytes that carry a spot or 24-h UPCR (mg/mg) for the renal response
UPCR_CODES = ("UPCR", "UPCR24")
EGFR_CODE = "EGFR"


def _reported_value(code: str, value: Any) -> Decimal:
    if code == "ANA":
        return Decimal(labs.parse_titer(value))
    return parse_decimal(code, value)


def validate_lab_result(
    code: str,
    value: Any,
    unit: str,
    occurred_at: datetime,
    *,
    settings: StudySettings,
    reported_at: datetime | None = None,
    lab_low: Any = None,
    lab_high: Any = None,
    specimen_id: str | None = None,
) -> LabResult:
    """A validated :class:`LabResult`, or a specific refusal (UnknownAnalyte, IncompatibleUnit,
    InvalidQuantity/FloatNotAllowed, ImplausibleValue, InconsistentTimestamps)."""
    analyte = labs.get_analyte(code)
    canonical_value, canonical_unit = bounds.check_lab_value(code, value, unit, settings=settings)
    reported = _reported_value(code, value)
    low = parse_optional_decimal("lab_low", lab_low)
    high = parse_optional_decimal("lab_high", lab_high)
    if low is not None and high is not None and low > high:
        raise InvalidQuantity("lab_high", lab_high, f"the lab's range upper limit is below its lower limit {low}")
    if low is not None or high is not None:
        range_low = labs.normalise(code, low, unit)[0] if low is not None else None
        range_high = labs.normalise(code, high, unit)[0] if high is not None else None
        source = "lab"
    else:
        range_low, range_high = labs.reference_range(code)
        source = "default" if (range_low is not None or range_high is not None) else "none"
    if reported_at is not None:
        formulas.require_aware("reported_at", reported_at)
        if reported_at < occurred_at:
            raise InconsistentTimestamps("occurred_at (collection)", occurred_at, "reported_at", reported_at)
    return LabResult(
        occurred_at=occurred_at,
        code=code,
        loinc=analyte.loinc,
        value=reported,
        unit=unit,
        canonical_value=canonical_value,
        canonical_unit=canonical_unit,
        lab_low=low,
        lab_high=high,
        range_low=range_low,
        range_high=range_high,
        range_source=source,
        flag=labs.flag(canonical_value, range_low, range_high),
        reported_at=reported_at,
        specimen_id=specimen_id or None,
    )


def validate_treg_panel(
    occurred_at: datetime,
    treg_pct: Any,
    cd4_per_ul: Any,
    *,
    settings: StudySettings,
    reported_at: datetime | None = None,
) -> TregPanel:
    treg = bounds.check_lab_value("TREGPCT", treg_pct, "%", settings=settings)[0]
    cd4 = bounds.check_lab_value("CD4", cd4_per_ul, "{cells}/uL", settings=settings)[0]
    if reported_at is not None:
        formulas.require_aware("reported_at", reported_at)
        if reported_at < occurred_at:
            raise InconsistentTimestamps("occurred_at (collection)", occurred_at, "reported_at", reported_at)
    return TregPanel(
        occurred_at=occurred_at,
        treg_pct=treg,
        cd4_per_ul=cd4,
        treg_flag=labs.flag(treg, *labs.reference_range("TREGPCT")),
        cd4_flag=labs.flag(cd4, *labs.reference_range("CD4")),
        reported_at=reported_at,
    )


def derive_egfr(
    creatinine: LabResult, demographics: Demographics | None, settings: StudySettings
) -> tuple[Decimal | None, str | None]:
    """eGFR (CKD-EPI 2021) from a serum creatinine result: ``(value, None)`` or ``(None, reason)`` when
    it cannot be computed (sex not F/M, age < 18, no demographics, implausible result)."""
    if creatinine.code not in CREATININE_CODES:
        raise InvalidQuantity("creatinine", creatinine.code, "eGFR is derived from CREAT or CREATSI")
    if demographics is None:
        return None, "sex and date of birth are not recorded"
    if demographics.sex not in (Sex.F, Sex.M):
        return None, f"sex {demographics.sex.value!r} is not 'F' or 'M'"
    age = formulas.completed_years(demographics.birth_date, creatinine.occurred_at.date())
    try:
        value = formulas.egfr_from_creatinine(creatinine.value, creatinine.unit, age, demographics.sex.value)
    except NotComputable as e:
        return None, e.reason
    if not bounds.is_plausible("egfr", value, settings=settings):
        return None, f"computed eGFR {round_half_up(value)} is outside the plausible range"
    return value, None


def derive_upcr(protein: LabResult, creatinine: LabResult) -> Decimal:
    """Spot UPCR (mg/mg) from urine protein and urine creatinine of the same specimen (formulas.md §4)."""
    if protein.code != "UPROT" or creatinine.code != "UCREAT":
        raise InvalidQuantity("upcr inputs", f"{protein.code}/{creatinine.code}", "UPCR needs UPROT and UCREAT")
    if protein.occurred_at != creatinine.occurred_at:
        raise MissingValue("urine protein and creatinine from the same specimen (same collection time)", "UPCR")
    return formulas.upcr(protein.value, protein.unit, creatinine.value, creatinine.unit)
