"""Decimal gate, rounding and display (sle_events.domain.quantities)."""

from __future__ import annotations

from decimal import Decimal

import pytest
from pydantic import BaseModel, ValidationError

from sle_events.domain.errors import FloatNotAllowed, InvalidQuantity, ProtocolViolation
from sle_events.domain.quantities import (
    MAX_SIGNIFICANT_DIGITS,
    DecimalValue,
    display,
    parse_decimal,
    parse_optional_decimal,
    round_half_up,
    to_decimal_string,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1.5", Decimal("1.5")),
        ("1.50", Decimal("1.50")),
        ("-0.25", Decimal("-0.25")),
        ("+3", Decimal("3")),
        (".5", Decimal("0.5")),
        ("6.0E7", Decimal("6.0E7")),
        ("6.0e-3", Decimal("0.0060")),
        (5, Decimal(5)),
        (Decimal("88.42"), Decimal("88.42")),
        ("0", Decimal("0")),
    ],
)
def test_parse_decimal_accepts(raw, expected):
    got = parse_decimal("x", raw)
    assert got == expected
    assert isinstance(got, Decimal)


def test_parse_decimal_keeps_trailing_zeros():
    assert str(parse_decimal("x", "1.00")) == "1.00"


@pytest.mark.parametrize("raw", ["-0", "-0.00", Decimal("-0.0")])
def test_negative_zero_becomes_zero(raw):
    d = parse_decimal("x", raw)
    assert d == 0 and not d.is_signed()


@pytest.mark.parametrize("raw", [0.1, 1.0, float("nan"), float("inf"), -2.5])
def test_float_rejected(raw):
    with pytest.raises(FloatNotAllowed) as exc:
        parse_decimal("weight", raw)
    msg = str(exc.value)
    assert "weight" in msg and repr(raw) in msg and "float" in msg
    assert isinstance(exc.value, InvalidQuantity)
    assert isinstance(exc.value, ProtocolViolation)
    assert isinstance(exc.value, ValueError)


@pytest.mark.parametrize(
    "raw",
    [
        True,
        False,
        None,
        [1],
        b"1.5",
        object(),
        "NaN",
        "nan",
        "sNaN",
        "Infinity",
        "inf",
        "-Infinity",
        Decimal("NaN"),
        Decimal("sNaN"),
        Decimal("Infinity"),
        Decimal("-Infinity"),
        "",
        " ",
        " 1.5",
        "1.5 ",
        "1,5",
        "1_000",
        "1.",
        "abc",
        "1.2.3",
        "0x10",
        "١٢",
        "1e",
        "--1",
        "1" * (MAX_SIGNIFICANT_DIGITS + 1),
        "1e31",
        "1e-31",
        Decimal("1E+40"),
    ],
)
def test_garbage_rejected(raw):
    with pytest.raises(InvalidQuantity) as exc:
        parse_decimal("creatinine", raw)
    assert "creatinine" in str(exc.value)
    assert exc.value.field == "creatinine"


def test_float_message_is_specific_for_nan_float():
    with pytest.raises(FloatNotAllowed):
        parse_decimal("x", float("nan"))


def test_parse_optional_decimal():
    assert parse_optional_decimal("x", None) is None
    assert parse_optional_decimal("x", "") is None
    assert parse_optional_decimal("x", "2") == 2


@pytest.mark.parametrize(
    ("value", "places", "expected"),
    [
        ("1.005", 2, "1.01"),  # half-up (banker's would give 1.00)
        ("2.675", 2, "2.68"),
        ("1.004999", 2, "1.00"),
        ("-1.005", 2, "-1.01"),  # ties away from zero
        ("-0.001", 2, "0.00"),  # no negative zero on display
        ("1.5", 2, "1.50"),
        ("6.0E7", 2, "60000000.00"),
        ("0.4421", 3, "0.442"),
        ("2.5", 0, "3"),
        ("119.2445747588725395054645370", 2, "119.24"),
    ],
)
def test_display_round_half_up(value, places, expected):
    assert display(Decimal(value), places) == expected
    assert round_half_up(Decimal(value), places) == Decimal(expected)


def test_display_default_two_places():
    assert display(Decimal("127.695")) == "127.70"


def test_display_rejects_float():
    with pytest.raises(FloatNotAllowed):
        display(1.005)  # type: ignore[arg-type]  # a float on purpose: it must be refused


def test_to_decimal_string_plain_notation():
    assert to_decimal_string(Decimal("6.0E7")) == "60000000"
    assert to_decimal_string(Decimal("1.2300")) == "1.2300"
    assert to_decimal_string(Decimal("-0.0")) == "0.0"
    with pytest.raises(InvalidQuantity):
        to_decimal_string(Decimal("NaN"))


class _M(BaseModel):
    v: DecimalValue


def test_pydantic_decimal_value_refuses_float_and_serialises_string():
    assert _M(v="1.50").v == Decimal("1.50")
    assert _M(v=2).v == Decimal(2)
    with pytest.raises(ValidationError) as exc:
        _M(v=1.5)
    assert "float" in str(exc.value)
    assert _M(v="6.0E7").model_dump_json() == '{"v":"60000000"}'
    assert _M.model_validate_json('{"v":"0.15"}').v == Decimal("0.15")
    assert _M(v="0.15").model_dump()["v"] == Decimal("0.15")
