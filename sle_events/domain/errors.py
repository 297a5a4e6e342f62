"""Exceptions raised by the pure rule layer (``sle_events.domain``).

Every refusal is a :class:`ProtocolViolation` (a ``ValueError``), so callers that only care
whether input was refused can catch one class. Each subclass carries the offending facts as
attributes (``field``, ``value``, ``bound``/``unit`` ...) and a machine-readable ``code`` so an
API layer can map it without parsing the message. Messages always name the field, the value
and the bound or unit involved.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from decimal import Decimal
from typing import Any, ClassVar


def _fmt(value: Any) -> str:
    """Render a value for a message: Decimals in plain notation (no exponent), as given."""
    if isinstance(value, Decimal):
        if value.is_finite():
            text = format(value, "f")
            return "0" if text in ("-0", "+0") else text
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


class ProtocolViolation(ValueError):
    """Base class: the input breaks a rule of the protocol or of the data conventions."""

    code: ClassVar[str] = "protocol_violation"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = details

    def __str__(self) -> str:  # pragma: no cover - trivial
        return self.message

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly description (Decimals and datetimes rendered as strings)."""
        return {
            "code": self.code,
            "message": self.message,
            "details": {k: (None if v is None else _fmt(v) if not isinstance(v, (list, tuple))
                            else [_fmt(x) for x in v]) for k, v in self.details.items()},
        }


# --------------------------------------------------------------------------- quantities
class InvalidQuantity(ProtocolViolation):
    """A quantity is not a usable decimal (garbage text, NaN, infinity, bool, too many digits...)."""

    code = "invalid_quantity"

    def __init__(self, field: str, value: Any, reason: str) -> None:
        self.field = field
        self.value = value
        self.reason = reason
        super().__init__(f"{field}: {value!r} is not a valid quantity: {reason}",
                         field=field, value=repr(value), reason=reason)


class FloatNotAllowed(InvalidQuantity):
    """A binary float was passed where a decimal string is required."""

    code = "float_not_allowed"

    def __init__(self, field: str, value: Any) -> None:
        self.field = field
        self.value = value
        self.reason = "binary floats are not allowed"
        ProtocolViolation.__init__(
            self,
            f"{field}: float {value!r} is not allowed; quantities travel as decimal strings "
            f"(e.g. '{value!r}' as a string), never as binary floats",
            field=field, value=repr(value), reason=self.reason,
        )


# --------------------------------------------------------------------------- bounds
class ImplausibleValue(ProtocolViolation):
    """A value lies outside its hard plausibility bound (PROTOCOL.md §9).

    ``value`` is expressed in the bound's ``unit``. When the value was reported in another unit,
    ``reported_value``/``reported_unit`` keep what was sent.
    """

    code = "implausible_value"

    def __init__(
        self,
        field: str,
        value: Decimal,
        bound: tuple[Decimal | None, Decimal | None],
        unit: str,
        *,
        label: str | None = None,
        reported_value: Decimal | None = None,
        reported_unit: str | None = None,
    ) -> None:
        self.field = field
        self.value = value
        self.bound = bound
        self.low, self.high = bound
        self.unit = unit
        self.label = label or field
        self.reported_value = reported_value
        self.reported_unit = reported_unit
        u = f" {unit}" if unit else ""
        if self.low is not None and self.high is not None:
            rng = f"{_fmt(self.low)}–{_fmt(self.high)}{u}"
        elif self.low is not None:
            rng = f"≥ {_fmt(self.low)}{u}"
        else:
            rng = f"≤ {_fmt(self.high)}{u}"
        if reported_unit is not None and reported_unit != unit:
            shown = f"{_fmt(reported_value)} {reported_unit} (= {_fmt(value)}{u})"
        else:
            shown = f"{_fmt(value)}{u}"
        where = "" if self.label == field else f" [field {field}]"
        super().__init__(
            f"{self.label} {shown} is outside the plausible range {rng}{where}",
            field=field, value=value, low=self.low, high=self.high, unit=unit,
            reported_value=reported_value, reported_unit=reported_unit,
        )


class UnknownField(ProtocolViolation):
    """No plausibility bound (or setting) exists under that field name."""

    code = "unknown_field"

    def __init__(self, field: str, known: Iterable[str] = ()) -> None:
        self.field = field
        known = sorted(known)
        hint = f"; known fields: {', '.join(known)}" if known else ""
        super().__init__(f"no plausibility bound is defined for field {field!r}{hint}",
                         field=field)


# --------------------------------------------------------------------------- labs
class UnknownAnalyte(ProtocolViolation):
    """The analyte code is not in labs.csv."""

    code = "unknown_analyte"

    def __init__(self, analyte: str, known: Iterable[str] = ()) -> None:
        self.analyte = analyte
        known = sorted(known)
        hint = f"; known codes: {', '.join(known)}" if known else ""
        super().__init__(f"unknown analyte code {analyte!r} (not in labs.csv){hint}",
                         analyte=analyte)


class IncompatibleUnit(ProtocolViolation):
    """The unit cannot be converted to (or from) the analyte's canonical unit."""

    code = "incompatible_unit"

    def __init__(self, analyte: str, unit: str, canonical_unit: str,
                 accepted: Iterable[str] = ()) -> None:
        self.analyte = analyte
        self.unit = unit
        self.canonical_unit = canonical_unit
        self.accepted = tuple(accepted)
        hint = f"; accepted units: {', '.join(self.accepted)}" if self.accepted else ""
        super().__init__(
            f"{analyte}: unit {unit!r} cannot be converted to the canonical unit "
            f"{canonical_unit!r}{hint}",
            analyte=analyte, unit=unit, canonical_unit=canonical_unit, accepted=list(self.accepted),
        )


class UnknownDescriptor(ProtocolViolation):
    """The SLEDAI-2K descriptor code is not in sledai2k.csv."""

    code = "unknown_descriptor"

    def __init__(self, descriptor: str) -> None:
        self.descriptor = descriptor
        super().__init__(
            f"unknown SLEDAI-2K descriptor code {descriptor!r} (expected SLED2K01…SLED2K24 "
            f"from sledai2k.csv)",
            descriptor=descriptor,
        )


# --------------------------------------------------------------------------- formulas
class NotComputable(ProtocolViolation):
    """A formula cannot be applied to these inputs (e.g. eGFR with sex other than F/M).

    The caller records "not computed" with ``reason`` rather than storing a value.
    """

    code = "not_computable"

    def __init__(self, formula: str, reason: str, **details: Any) -> None:
        self.formula = formula
        self.reason = reason
        super().__init__(f"{formula} not computed: {reason}", formula=formula, reason=reason,
                         **details)


# --------------------------------------------------------------------------- time
class NaiveTimestamp(ProtocolViolation):
    """A timestamp lacks its UTC offset (PROTOCOL §10, R9: every timestamp carries one)."""

    code = "naive_timestamp"

    def __init__(self, field: str, value: datetime) -> None:
        self.field = field
        self.value = value
        super().__init__(
            f"{field} {value.isoformat()} has no UTC offset; every timestamp must carry one",
            field=field, value=value,
        )


class FutureTimestamp(ProtocolViolation):
    """``occurred_at`` lies further in the future than the allowed clock skew (R9)."""

    code = "future_timestamp"

    def __init__(self, field: str, value: datetime, now: datetime, skew_seconds: int) -> None:
        self.field = field
        self.value = value
        self.now = now
        self.skew_seconds = skew_seconds
        ahead = value - now
        super().__init__(
            f"{field} {value.isoformat()} is {ahead} ahead of now ({now.isoformat()}); "
            f"at most {skew_seconds} s in the future is allowed",
            field=field, value=value, now=now, skew_seconds=skew_seconds,
        )


class InconsistentTimestamps(ProtocolViolation):
    """Two timestamps/dates are in an impossible order (e.g. discharge before admission)."""

    code = "inconsistent_timestamps"

    def __init__(self, earlier_field: str, earlier: Any, later_field: str, later: Any) -> None:
        self.earlier_field = earlier_field
        self.earlier = earlier
        self.later_field = later_field
        self.later = later
        super().__init__(
            f"{later_field} {_fmt(later)} is before {earlier_field} {_fmt(earlier)}",
            earlier_field=earlier_field, earlier=earlier, later_field=later_field, later=later,
        )


class OutsideWindow(ProtocolViolation):
    """A timed interval lies outside its hard window (e.g. CYC→MSC 18–36 h, R4)."""

    code = "outside_window"

    def __init__(self, field: str, value: Decimal, low: Decimal, high: Decimal, unit: str) -> None:
        self.field = field
        self.value = value
        self.bound = (low, high)
        self.low, self.high = low, high
        self.unit = unit
        super().__init__(
            f"{field} {_fmt(value)} {unit} is outside the allowed window "
            f"{_fmt(low)}–{_fmt(high)} {unit}",
            field=field, value=value, low=low, high=high, unit=unit,
        )


class UnknownVisit(ProtocolViolation):
    """The visit code is not a scheduled follow-up visit of the configured schedule."""

    code = "unknown_visit"

    def __init__(self, visit: str, scheduled: Iterable[str] = ()) -> None:
        self.visit = visit
        scheduled = list(scheduled)
        hint = f"; scheduled: {', '.join(scheduled)}" if scheduled else ""
        super().__init__(f"{visit!r} is not a scheduled follow-up visit{hint}", visit=visit)
