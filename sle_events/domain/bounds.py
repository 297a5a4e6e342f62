"""Plausibility bounds (PROTOCOL.md §9): hard limits, not reference ranges.

A value outside its bound is **refused** with :class:`ImplausibleValue`, whose message names the
field, the value and the bound, e.g. ``"serum creatinine 40 mg/dL is outside the plausible range
0.1–25 mg/dL [field serum_creatinine]"``. Both ends are inclusive.

:data:`DEFAULT_BOUNDS` is the **one** table of bounds. All bounds are [CONFIG]: the study
configuration (``StudySettings.plausibility_bounds``) starts from this table and a data manager
may version it, so every check accepts ``settings=`` (or an explicit ``bounds=`` mapping).

Lab results are checked through :data:`LAB_BOUND_FIELDS` (labs.csv code → bound field). A lab
value is first normalised to its canonical unit and then expressed in the bound's unit
(CREATSI umol/L → mg/dL by 88.42, UREA mmol/L → BUN mg/dL by × 2.8014). Lab codes that have no
bound in §9 (ANA, UPROT, UCREAT, casts) must still be ≥ 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from types import MappingProxyType
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, model_validator

from sle_events.domain import labs
from sle_events.domain.errors import ImplausibleValue, UnknownField
from sle_events.domain.quantities import DecimalValue, parse_decimal

if TYPE_CHECKING:  # pragma: no cover
    from sle_events.domain.settings import StudySettings

__all__ = [
    "Bound",
    "DEFAULT_BOUNDS",
    "LAB_BOUND_FIELDS",
    "get_bound",
    "check_bound",
    "is_plausible",
    "lab_bound_field",
    "check_lab_value",
]


class Bound(BaseModel):
    """Inclusive plausibility interval ``low … high`` in ``unit`` (UCUM)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    label: str
    low: DecimalValue
    high: DecimalValue
    unit: str
    #: unit as shown in messages when the UCUM code reads badly (``a`` → ``years``)
    display_unit: str | None = None

    @model_validator(mode="after")
    def _ordered(self) -> Bound:
        if self.low > self.high:
            raise ValueError(f"bound {self.label}: low {self.low} > high {self.high}")
        return self

    def contains(self, value: Decimal) -> bool:
        return self.low <= value <= self.high


def _b(label: str, low: str, high: str, unit: str, display_unit: str | None = None) -> Bound:
    return Bound(label=label, low=low, high=high, unit=unit, display_unit=display_unit)


#: PROTOCOL.md §9 plausibility bounds: field → Bound (canonical UCUM unit). [CONFIG]
DEFAULT_BOUNDS: Mapping[str, Bound] = MappingProxyType(
    {
        "height": _b("height", "100", "230", "cm"),
        "weight": _b("weight", "25", "250", "kg"),
        "temperature": _b("temperature", "30", "45", "Cel", "°C"),
        "systolic_bp": _b("systolic BP", "50", "300", "mm[Hg]", "mmHg"),
        "diastolic_bp": _b("diastolic BP", "20", "200", "mm[Hg]", "mmHg"),
        "heart_rate": _b("heart rate", "20", "250", "/min"),
        "serum_creatinine": _b("serum creatinine", "0.1", "25", "mg/dL"),
        "egfr": _b("eGFR", "1", "200", "mL/min/{1.73_m2}"),
        "bun": _b("BUN", "1", "300", "mg/dL"),
        "albumin": _b("albumin", "0.5", "7", "g/dL"),
        "upcr": _b("UPCR", "0", "30", "mg/mg"),
        "protein_24h": _b("24-h protein", "0", "40", "g/(24.h)"),
        "urine_rbc": _b("urine RBC", "0", "1000", "/[HPF]"),
        "urine_wbc": _b("urine WBC", "0", "1000", "/[HPF]"),
        "anti_dsdna": _b("anti-dsDNA", "0", "100000", "[IU]/mL"),
        "c3": _b("C3", "1", "500", "mg/dL"),
        "c4": _b("C4", "0.1", "200", "mg/dL"),
        "wbc": _b("WBC", "0", "200", "10*3/uL"),
        "neutrophils": _b("neutrophils", "0", "150", "10*3/uL"),
        "lymphocytes": _b("lymphocytes", "0", "150", "10*3/uL"),
        "hb": _b("Hb", "2", "25", "g/dL"),
        "platelets": _b("platelets", "0", "2000", "10*3/uL"),
        "esr": _b("ESR", "0", "200", "mm/h"),
        "crp": _b("CRP", "0", "500", "mg/L"),
        "treg": _b("Treg", "0", "100", "%"),
        "cd4": _b("CD4", "0", "5000", "{cells}/uL"),
        "msc_viability": _b("MSC viability", "0", "100", "%"),
        "msc_dose": _b("MSC dose", "0.1", "10", "10*6/kg", "× 10^6 cells/kg"),
        "cyc_administered": _b("CYC administered", "100", "3000", "mg"),
        "sledai2k_total": _b("SLEDAI-2K total", "0", "105", "{score}", ""),
        "age_at_consent": _b("age at consent", "12", "90", "a", "years"),
    }
)

#: labs.csv code → bound field. Codes absent here have no §9 bound (only "≥ 0" applies).
LAB_BOUND_FIELDS: Mapping[str, str] = MappingProxyType(
    {
        "CREAT": "serum_creatinine",
        "CREATSI": "serum_creatinine",
        "EGFR": "egfr",
        "BUN": "bun",
        "UREA": "bun",
        "ALB": "albumin",
        "UPCR": "upcr",
        "UPCR24": "upcr",
        "UPROT24": "protein_24h",
        "URBC": "urine_rbc",
        "UWBC": "urine_wbc",
        "DSDNA": "anti_dsdna",
        "C3": "c3",
        "C4": "c4",
        "WBC": "wbc",
        "NEUT": "neutrophils",
        "LYMPH": "lymphocytes",
        "HGB": "hb",
        "PLAT": "platelets",
        "ESR": "esr",
        "CRP": "crp",
        "TREGPCT": "treg",
        "CD4": "cd4",
    }
)


def _table(bounds: Mapping[str, Bound] | None, settings: StudySettings | None) -> Mapping[str, Bound]:
    if bounds is not None:
        return bounds
    if settings is not None:
        return settings.plausibility_bounds
    return DEFAULT_BOUNDS


def get_bound(field: str, *, bounds: Mapping[str, Bound] | None = None, settings: StudySettings | None = None) -> Bound:
    """The bound of ``field``; :class:`UnknownField` if there is none."""
    table = _table(bounds, settings)
    try:
        return table[field]
    except KeyError:
        raise UnknownField(field, table.keys()) from None


def _refuse(
    field: str, b: Bound, value: Decimal, *, reported_value: Decimal | None = None, reported_unit: str | None = None
) -> ImplausibleValue:
    shown_unit = b.unit if b.display_unit is None else b.display_unit
    return ImplausibleValue(
        field,
        value,
        (b.low, b.high),
        shown_unit,
        label=b.label,
        reported_value=reported_value,
        reported_unit=reported_unit,
    )


def check_bound(
    field: str,
    value: str | int | Decimal,
    *,
    bounds: Mapping[str, Bound] | None = None,
    settings: StudySettings | None = None,
) -> Decimal:
    """Refuse ``value`` (in the field's canonical unit) if it is outside the bound of ``field``.

    Returns the parsed value. Raises :class:`ImplausibleValue`, :class:`UnknownField`, or
    :class:`~sle_events.domain.errors.InvalidQuantity` / ``FloatNotAllowed`` for bad input.
    """
    b = get_bound(field, bounds=bounds, settings=settings)
    d = parse_decimal(field, value)
    if not b.contains(d):
        raise _refuse(field, b, d)
    return d


def is_plausible(
    field: str,
    value: str | int | Decimal,
    *,
    bounds: Mapping[str, Bound] | None = None,
    settings: StudySettings | None = None,
) -> bool:
    """``True`` if ``value`` is within the bound of ``field`` (no exception for out of range)."""
    b = get_bound(field, bounds=bounds, settings=settings)
    return b.contains(parse_decimal(field, value))


def lab_bound_field(code: str) -> str | None:
    """The bound field of a labs.csv code (``None`` if §9 has no bound for it)."""
    labs.get_analyte(code)
    return LAB_BOUND_FIELDS.get(code)


def _to_bound_unit(code: str, canonical_value: Decimal, bound: Bound) -> Decimal:
    if code == "UREA":  # urea mmol/L expressed as BUN mg/dL
        return labs.urea_to_bun(canonical_value)
    canonical = labs.canonical_unit(code)
    if bound.unit == canonical:
        return canonical_value
    return labs.convert(code, canonical_value, canonical, bound.unit)


def check_lab_value(
    code: str,
    value: str | int | Decimal,
    unit: str,
    *,
    bounds: Mapping[str, Bound] | None = None,
    settings: StudySettings | None = None,
) -> tuple[Decimal, str]:
    """Normalise a lab result and refuse it if implausible.

    Returns ``(value in the canonical unit, canonical unit)`` like :func:`labs.normalise`.
    Raises ``UnknownAnalyte``/``IncompatibleUnit``/``InvalidQuantity`` from normalisation, and
    :class:`ImplausibleValue` (in the bound's unit, with the reported value and unit) when out of
    range. Codes without a §9 bound are refused only when negative.
    """
    canonical_value, canonical = labs.normalise(code, value, unit)
    field = LAB_BOUND_FIELDS.get(code)
    if field is None:
        if canonical_value < 0:
            raise ImplausibleValue(code, canonical_value, (Decimal(0), None), canonical, label=code)
        return canonical_value, canonical
    b = get_bound(field, bounds=bounds, settings=settings)
    in_bound_unit = _to_bound_unit(code, canonical_value, b)
    if not b.contains(in_bound_unit):
        reported = parse_decimal(code, value) if code != "ANA" else canonical_value
        raise _refuse(field, b, in_bound_unit, reported_value=reported, reported_unit=unit)
    return canonical_value, canonical
