"""Analyte table (``labs.csv``), UCUM unit conversion and abnormal flags.

The table is shipped as package data (``sle_events/domain/data/labs.csv``, a byte-for-byte copy
of the protocol's ``labs.csv``). An analyte is identified by its study ``code``; ``loinc`` is kept
where one exists (``None`` for TREGPCT).

Unit conversion (formulas.md §1 and the labs.csv notes)
-------------------------------------------------------
Every accepted unit of an analyte has an **exact rational factor** to the analyte's canonical
unit (``canonical = value × factor``). Conversions are done on exact fractions and rounded once
(in :data:`~sle_events.domain.quantities.CONTEXT`, 28 significant digits), so there is no
intermediate rounding. The study factor for creatinine is **88.42** umol/L per mg/dL; every
creatinine-derived factor (1 mmol creatinine = 10000/88.42 mg = 113.0966… mg; urine creatinine
mmol/L × 1000/88.42 = mg/dL, i.e. the "11.3097" of labs.csv) is derived from that one constant,
exactly, never from a rounded print of it.

Units are UCUM, case-sensitive, with one tolerance: the litre may be written ``L`` or ``l`` (both
are valid UCUM). Non-UCUM spellings (``µmol/L``, ``IU/mL``) are refused with the list of
accepted units. BUN (urea nitrogen, mg/dL) and UREA (mmol/L) are different analyte codes; the
study conversion between them is :func:`bun_to_urea` / :func:`urea_to_bun` (÷/× 2.8014), not a
unit conversion, because "urea mg/dL" and "urea nitrogen mg/dL" are different quantities.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Literal

from sle_events.domain.errors import IncompatibleUnit, InvalidQuantity, UnknownAnalyte
from sle_events.domain.quantities import from_fraction, parse_decimal, parse_optional_decimal

__all__ = [
    "CREAT_UMOL_PER_MGDL",
    "CREAT_MG_PER_MMOL",
    "BUN_MGDL_PER_UREA_MMOLL",
    "Analyte",
    "ANALYTES",
    "UNIT_FACTORS",
    "load_analytes",
    "read_data_file",
    "get_analyte",
    "accepted_units",
    "canonical_unit",
    "conversion_factor",
    "to_canonical_exact",
    "normalise",
    "normalize",
    "convert",
    "bun_to_urea",
    "urea_to_bun",
    "parse_titer",
    "flag",
    "reference_range",
    "abnormal_flag",
]

# --------------------------------------------------------------------------- constants
#: Study factor (formulas.md §1): umol/L = mg/dL × 88.42. One constant for every conversion.
CREAT_UMOL_PER_MGDL = Decimal("88.42")
#: mg of creatinine in 1 mmol, derived from 88.42 (= 113.0966… mg), kept exact.
CREAT_MG_PER_MMOL = Fraction(10000) / Fraction(CREAT_UMOL_PER_MGDL)
#: urea mmol/L = BUN mg/dL ÷ 2.8014 (2 N × 14.007 g/mol) (formulas.md §1).
BUN_MGDL_PER_UREA_MMOLL = Decimal("2.8014")

_CREAT = Fraction(CREAT_UMOL_PER_MGDL)  # 4421/50 umol/L per mg/dL

Flag = Literal["L", "H", "N"]


# --------------------------------------------------------------------------- table
@dataclass(frozen=True, slots=True)
class Analyte:
    """One row of labs.csv. ``low``/``high`` are generic adult defaults in ``ucum_unit``."""

    code: str
    name: str
    loinc: str | None
    ucum_unit: str
    specimen: str
    panel: str
    low: Decimal | None
    high: Decimal | None
    notes: str = ""


def read_data_file(name: str) -> bytes:
    """Bytes of a packaged reference file (``labs.csv`` or ``sledai2k.csv``)."""
    return resources.files("sle_events.domain").joinpath("data", name).read_bytes()


def load_analytes(path: str | Path | None = None) -> dict[str, Analyte]:
    """Parse labs.csv (the packaged copy unless ``path`` is given) into ``{code: Analyte}``."""
    raw = Path(path).read_bytes() if path is not None else read_data_file("labs.csv")
    reader = csv.DictReader(io.StringIO(raw.decode("utf-8")))
    table: dict[str, Analyte] = {}
    for row in reader:
        code = row["code"].strip()
        if not code:
            continue
        if code in table:
            raise ValueError(f"labs.csv: duplicate analyte code {code!r}")
        table[code] = Analyte(
            code=code,
            name=row["name"].strip(),
            loinc=row["loinc"].strip() or None,
            ucum_unit=row["ucum_unit"].strip(),
            specimen=row["specimen"].strip(),
            panel=row["panel"].strip(),
            low=parse_optional_decimal(f"labs.csv {code}.low", row["low"].strip()),
            high=parse_optional_decimal(f"labs.csv {code}.high", row["high"].strip()),
            notes=(row.get("notes") or "").strip(),
        )
    return table


#: The analyte table, loaded once from the packaged labs.csv (read-only).
ANALYTES: Mapping[str, Analyte] = MappingProxyType(load_analytes())


# --------------------------------------------------------------------------- conversions
_F = Fraction
# canonical mg/dL, mass concentration
_MG_DL = {"mg/dL": _F(1), "mg/L": _F(1, 10), "g/L": _F(100)}
# canonical g/dL
_G_DL = {"g/dL": _F(1), "g/L": _F(1, 10)}
# counts per volume, canonical 10*3/uL (10*9/L is numerically equal)
_K_UL = {"10*3/uL": _F(1), "10*9/L": _F(1)}
# creatinine, canonical mg/dL / umol/L
_CREAT_MG_DL = {"mg/dL": _F(1), "umol/L": 1 / _CREAT}
_CREAT_UMOL_L = {"umol/L": _F(1), "mg/dL": _CREAT}
# urine creatinine, canonical mg/dL: mmol/L × 1000/88.42 (labs.csv "× 11.3097")
_UCREAT = {"mg/dL": _F(1), "mmol/L": 1000 / _CREAT, "umol/L": 1 / _CREAT}
# UPCR, canonical mg/mg (= g/g). mg/mmol = mg/mg × 113.0966… ⇒ mg/mg = mg/mmol ÷ 113.0966…
_UPCR = {"mg/mg": _F(1), "g/g": _F(1), "mg/g": _F(1, 1000), "mg/mmol": 1 / CREAT_MG_PER_MMOL}
for _u, _f in list(_UPCR.items()):  # UCUM annotations are unit-less: mg/g{creat} = mg/g
    _UPCR[_u + "{creat}"] = _f
_UPROT24 = {"g/(24.h)": _F(1), "mg/(24.h)": _F(1, 1000), "g/d": _F(1), "mg/d": _F(1, 1000)}

#: ``{code: {accepted unit: factor to the canonical unit}}`` (exact rationals).
_BASE_FACTORS: dict[str, dict[str, Fraction]] = {
    "DSDNA": {"[IU]/mL": _F(1)},
    "C3": dict(_MG_DL),
    "C4": dict(_MG_DL),
    "ANA": {"{titer}": _F(1)},
    "CREAT": dict(_CREAT_MG_DL),
    "CREATSI": dict(_CREAT_UMOL_L),
    "EGFR": {"mL/min/{1.73_m2}": _F(1)},
    "BUN": {"mg/dL": _F(1)},
    "UREA": {"mmol/L": _F(1)},
    "ALB": dict(_G_DL),
    "UPCR": dict(_UPCR),
    "UPCR24": dict(_UPCR),
    "UPROT24": dict(_UPROT24),
    "UPROT": dict(_MG_DL),
    "UCREAT": dict(_UCREAT),
    "URBC": {"/[HPF]": _F(1)},
    "UWBC": {"/[HPF]": _F(1)},
    "UCASTS": {"/[LPF]": _F(1)},
    "URBCCAST": {"/[LPF]": _F(1)},
    "UGRCAST": {"/[LPF]": _F(1)},
    "WBC": dict(_K_UL),
    "NEUT": dict(_K_UL),
    "LYMPH": dict(_K_UL),
    "HGB": dict(_G_DL),
    "PLAT": dict(_K_UL),
    "ESR": {"mm/h": _F(1)},
    "CRP": {"mg/L": _F(1), "mg/dL": _F(10)},
    "TREGPCT": {"%": _F(1)},
    "CD4": {"{cells}/uL": _F(1), "/uL": _F(1)},
}

_BRACKETED = re.compile(r"(\[[^\]]*\]|\{[^}]*\})")


def _litre_variant(unit: str) -> str:
    """The same unit with the litre written ``l`` (outside ``[...]`` and ``{...}``)."""
    parts = _BRACKETED.split(unit)
    return "".join(p if _BRACKETED.fullmatch(p) else p.replace("L", "l") for p in parts)


def _build_factors() -> dict[str, Mapping[str, Fraction]]:
    out: dict[str, Mapping[str, Fraction]] = {}
    for code, units in _BASE_FACTORS.items():
        full = dict(units)
        for u, f in units.items():
            full.setdefault(_litre_variant(u), f)
        out[code] = MappingProxyType(full)
    return out


#: Accepted units per analyte (incl. litre-case aliases) and their exact factors.
UNIT_FACTORS: Mapping[str, Mapping[str, Fraction]] = MappingProxyType(_build_factors())


def get_analyte(code: str) -> Analyte:
    """The labs.csv row for ``code``; :class:`UnknownAnalyte` otherwise."""
    try:
        return ANALYTES[code]
    except (KeyError, TypeError):
        raise UnknownAnalyte(str(code), ANALYTES.keys()) from None


def canonical_unit(code: str) -> str:
    """The canonical UCUM unit of ``code`` (labs.csv ``ucum_unit``)."""
    return get_analyte(code).ucum_unit


def accepted_units(code: str) -> tuple[str, ...]:
    """The units accepted for ``code`` as written in the conversion table (no case aliases)."""
    get_analyte(code)
    return tuple(_BASE_FACTORS.get(code, {}))


def conversion_factor(code: str, unit: str) -> Fraction:
    """Exact factor such that ``value[canonical] = value[unit] × factor``."""
    analyte = get_analyte(code)
    factors = UNIT_FACTORS.get(code, {})
    if not isinstance(unit, str) or unit not in factors:
        raise IncompatibleUnit(code, str(unit), analyte.ucum_unit, accepted_units(code))
    return factors[unit]


def parse_titer(value: str | int | Decimal, field: str = "ANA") -> int:
    """Titer denominator: ``'1:160'`` (or ``'160'``/``160``) → ``160``."""
    if isinstance(value, str):
        m = re.fullmatch(r"(?:1:)?(\d{1,9})", value, re.ASCII)
        if not m:
            raise InvalidQuantity(field, value, "expected a titer such as '1:160'")
        denominator = int(m.group(1))
    else:
        d = parse_decimal(field, value)
        if d != d.to_integral_value():
            raise InvalidQuantity(field, value, "a titer denominator is a whole number")
        denominator = int(d)
    if denominator < 1:
        raise InvalidQuantity(field, value, "a titer denominator is at least 1")
    return denominator


def _parse_value(code: str, value: str | int | Decimal) -> Decimal:
    if code == "ANA":
        return Decimal(parse_titer(value, code))
    return parse_decimal(code, value)


def to_canonical_exact(code: str, value: str | int | Decimal, unit: str) -> Fraction:
    """The value in the canonical unit as an exact fraction (for formulas that combine units)."""
    factor = conversion_factor(code, unit)
    return Fraction(_parse_value(code, value)) * factor


def normalise(code: str, value: str | int | Decimal, unit: str) -> tuple[Decimal, str]:
    """Convert a reported result to ``(value in the canonical unit, canonical unit)``.

    ``value`` is a decimal string (or int/Decimal; floats are refused). The conversion is exact
    and rounded once at full precision; a value already in the canonical unit (or in a unit with
    factor 1) is returned unchanged, trailing zeros included. ANA takes a titer (``'1:160'``) and
    returns its denominator.

    Raises :class:`UnknownAnalyte`, :class:`IncompatibleUnit`, :class:`InvalidQuantity`.
    """
    factor = conversion_factor(code, unit)
    d = _parse_value(code, value)
    canonical = ANALYTES[code].ucum_unit
    if factor == 1:
        return d, canonical
    return from_fraction(Fraction(d) * factor), canonical


normalize = normalise


def convert(code: str, value: str | int | Decimal, from_unit: str, to_unit: str) -> Decimal:
    """Convert between two accepted units of the same analyte (exact, rounded once)."""
    f_from = conversion_factor(code, from_unit)
    f_to = conversion_factor(code, to_unit)
    d = _parse_value(code, value)
    if f_from == f_to:
        return d
    return from_fraction(Fraction(d) * f_from / f_to)


def bun_to_urea(bun_mg_dl: str | int | Decimal) -> Decimal:
    """Urea (mmol/L) from BUN (mg/dL): ÷ 2.8014 (formulas.md §1)."""
    d = parse_decimal("BUN", bun_mg_dl)
    return from_fraction(Fraction(d) / Fraction(BUN_MGDL_PER_UREA_MMOLL))


def urea_to_bun(urea_mmol_l: str | int | Decimal) -> Decimal:
    """BUN (mg/dL) from urea (mmol/L): × 2.8014 (formulas.md §1)."""
    d = parse_decimal("UREA", urea_mmol_l)
    return from_fraction(Fraction(d) * Fraction(BUN_MGDL_PER_UREA_MMOLL))


# --------------------------------------------------------------------------- flags
def flag(value: Decimal, low: Decimal | None, high: Decimal | None) -> Flag | None:
    """Abnormal flag: ``'L'`` below ``low``, ``'H'`` above ``high``, ``'N'`` otherwise.

    Both limits are inclusive-normal (a value equal to a limit is ``'N'``). A missing limit is
    open on that side. With no limit at all there is no flag (``None``).
    """
    if low is None and high is None:
        return None
    v = parse_decimal("value", value)
    if low is not None and v < parse_decimal("low", low):
        return "L"
    if high is not None and v > parse_decimal("high", high):
        return "H"
    return "N"


def reference_range(code: str) -> tuple[Decimal | None, Decimal | None]:
    """The labs.csv default range of ``code`` in its canonical unit."""
    a = get_analyte(code)
    return a.low, a.high


def abnormal_flag(
    code: str,
    value: str | int | Decimal,
    unit: str,
    lab_low: str | int | Decimal | None = None,
    lab_high: str | int | Decimal | None = None,
    lab_unit: str | None = None,
) -> Flag | None:
    """Flag a reported result against the **reporting lab's range** if one is given, else the
    labs.csv default range (PROTOCOL §10: the lab's own range wins).

    The lab range is "given" when at least one of ``lab_low``/``lab_high`` is present; its other
    side is then open (the labs.csv default is *not* mixed in). ``lab_unit`` defaults to ``unit``.
    Everything is compared in the canonical unit.
    """
    v, _ = normalise(code, value, unit)
    if lab_low is not None or lab_high is not None:
        ru = lab_unit or unit
        low = normalise(code, lab_low, ru)[0] if lab_low is not None else None
        high = normalise(code, lab_high, ru)[0] if lab_high is not None else None
    else:
        low, high = reference_range(code)
    return flag(v, low, high)
