"""Decimal handling for quantities (PROTOCOL.md §10, formulas.md conventions).

* Quantities travel as **decimal strings** with a UCUM unit, never as binary floats.
  :func:`parse_decimal` is the single gate: it accepts ``str``, ``int`` and ``Decimal`` and refuses
  ``float``, ``bool``, NaN, infinities and anything that is not a plain decimal literal.
* All arithmetic in the rule layer runs in :data:`CONTEXT`: 28 significant digits (the precision
  the formulas.md appendix script uses, so our full-precision values are the reference values),
  ``ROUND_HALF_EVEN`` for the inevitable last-digit rounding of an inexact operation, and traps on
  invalid operations, division by zero and overflow. "Full precision" in this package means
  "in this context"; nothing is rounded to a fixed number of decimals in between.
* Rounding **half-up to 2 decimals** happens only for display and export (:func:`display`,
  :func:`round_half_up`). The one protocol exception (BSA rounded before dosing) lives in
  ``formulas.py``.
"""

from __future__ import annotations

import re
from contextlib import AbstractContextManager
from decimal import (
    ROUND_HALF_EVEN,
    ROUND_HALF_UP,
    Context,
    Decimal,
    DivisionByZero,
    InvalidOperation,
    Overflow,
    localcontext,
)
from fractions import Fraction
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer

from sle_events.domain.errors import FloatNotAllowed, InvalidQuantity

__all__ = [
    "CONTEXT",
    "MAX_SIGNIFICANT_DIGITS",
    "MAX_ADJUSTED_EXPONENT",
    "DecimalValue",
    "decimal_context",
    "parse_decimal",
    "parse_optional_decimal",
    "round_half_up",
    "display",
    "to_decimal_string",
    "to_fraction",
    "from_fraction",
]

#: Arithmetic context of the whole rule layer. Precision 28 = the formulas.md appendix.
CONTEXT = Context(
    prec=28,
    rounding=ROUND_HALF_EVEN,
    traps=[InvalidOperation, DivisionByZero, Overflow],
)

#: A quantity may carry at most as many significant digits as the context holds, so a stored
#: full-precision derived value (28 digits) can be read back. A unit conversion and its inverse
#: each round once (relative error <= 5e-28), so converting a reported value of up to 26
#: significant digits to the canonical unit and back recovers the reported digits exactly.
MAX_SIGNIFICANT_DIGITS = CONTEXT.prec
#: |adjusted exponent| limit (1e-30 … 9.99e30): keeps garbage like "1e999999" out.
MAX_ADJUSTED_EXPONENT = 30

_DECIMAL_RE = re.compile(r"[+-]?(?:\d+(?:\.\d+)?|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)


def decimal_context() -> AbstractContextManager[Context]:
    """``with decimal_context(): ...`` runs a block in :data:`CONTEXT`."""
    return localcontext(CONTEXT)


def _check_decimal(field: str, original: Any, d: Decimal) -> Decimal:
    if d.is_nan():
        raise InvalidQuantity(field, original, "NaN is not a quantity")
    if d.is_infinite():
        raise InvalidQuantity(field, original, "infinity is not a quantity")
    if d.is_zero():
        # normalise -0 / +0 to an unsigned zero, keeping the exponent (0.00 stays 0.00)
        return d.copy_abs()
    digits = len(d.as_tuple().digits)
    if digits > MAX_SIGNIFICANT_DIGITS:
        raise InvalidQuantity(
            field,
            original,
            f"{digits} significant digits; at most {MAX_SIGNIFICANT_DIGITS} are accepted",
        )
    if abs(d.adjusted()) > MAX_ADJUSTED_EXPONENT:
        raise InvalidQuantity(
            field,
            original,
            f"magnitude 1e{d.adjusted()} is outside 1e-{MAX_ADJUSTED_EXPONENT}…1e{MAX_ADJUSTED_EXPONENT}",
        )
    return d


def parse_decimal(field: str, value: Any) -> Decimal:
    """Return ``value`` as an exact :class:`~decimal.Decimal`, or refuse it.

    Accepted: ``str`` holding a plain ASCII decimal literal (``"1.5"``, ``"-0.25"``, ``"6.0E7"``;
    no surrounding blanks, no thousands separators or underscores, no ``"1."``/``"inf"``/``"nan"``),
    ``int`` (not ``bool``) and finite ``Decimal``. The value is kept exactly as given (trailing
    zeros included); a negative zero becomes zero.

    Raises :class:`FloatNotAllowed` for floats and :class:`InvalidQuantity` for everything else.
    """
    if isinstance(value, bool):
        raise InvalidQuantity(field, value, "a boolean is not a quantity")
    if isinstance(value, float):
        raise FloatNotAllowed(field, value)
    if isinstance(value, Decimal):
        return _check_decimal(field, value, value)
    if isinstance(value, int):
        return _check_decimal(field, value, Decimal(value))
    if isinstance(value, str):
        if not _DECIMAL_RE.fullmatch(value):
            shown = value if len(value) <= 40 else value[:37] + "..."
            raise InvalidQuantity(
                field,
                shown,
                "expected a decimal string such as '1.5', '-0.25' or '6.0E7'",
            )
        return _check_decimal(field, value, Decimal(value))
    raise InvalidQuantity(field, value, f"type {type(value).__name__} is not accepted; send a decimal string")


def parse_optional_decimal(field: str, value: Any) -> Decimal | None:
    """Like :func:`parse_decimal` but ``None`` and ``""`` mean "absent"."""
    if value is None or value == "":
        return None
    return parse_decimal(field, value)


def round_half_up(value: Decimal | int | str, places: int = 2) -> Decimal:
    """Round half-up to ``places`` decimals (display/export only). ``-0.00`` becomes ``0.00``."""
    d = parse_decimal("value", value)
    if places < 0:
        raise ValueError("places must be >= 0")
    with localcontext(CONTEXT) as ctx:
        ctx.prec = max(CONTEXT.prec, d.adjusted() + places + 2)
        q = d.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP)
    return q.copy_abs() if q.is_zero() else q


def display(value: Decimal | int | str, places: int = 2) -> str:
    """Display/export string: half-up to ``places`` decimals, plain notation (no exponent)."""
    return format(round_half_up(value, places), "f")


def to_decimal_string(value: Decimal) -> str:
    """Full-precision transport string in plain notation (``Decimal('6.0E7')`` → ``'60000000'``)."""
    if not isinstance(value, Decimal) or not value.is_finite():
        raise InvalidQuantity("value", value, "only finite Decimals can be serialised")
    text = format(value, "f")
    return text[1:] if text.startswith("-") and value.is_zero() else text


def to_fraction(value: Decimal | int) -> Fraction:
    """Exact rational value of a finite Decimal or int."""
    return Fraction(value)


def from_fraction(value: Fraction) -> Decimal:
    """The rational ``value`` as a Decimal, correctly rounded once in :data:`CONTEXT`."""
    with localcontext(CONTEXT):
        return Decimal(value.numerator) / Decimal(value.denominator)


def _validate_decimal_field(value: Any, info: Any = None) -> Decimal:
    field = getattr(info, "field_name", None) or "value"
    return parse_decimal(field, value)


#: Pydantic field type: a Decimal that refuses floats on input and serialises to a plain
#: decimal string in JSON mode.
DecimalValue = Annotated[
    Decimal,
    BeforeValidator(_validate_decimal_field),
    PlainSerializer(to_decimal_string, return_type=str, when_used="json"),
]
