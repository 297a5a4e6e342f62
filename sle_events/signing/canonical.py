"""RFC 8785 (JCS) canonical JSON with a fast path.

`rfc8785.dumps` is the reference. Most envelopes hold only ASCII keys, strings, small integers, booleans and
nulls; for those, `json.dumps(sort_keys=True, ensure_ascii=False, separators=(",", ":"))` produces the same
bytes several times faster (tests check both agree). Anything else goes through `rfc8785`.
Floats are refused everywhere: quantities travel as decimal strings or integers.
"""

from __future__ import annotations

import json
import re
from typing import Any

import rfc8785

from sle_events.picklable import Picklable

# RFC 8785 integers must be exactly representable as IEEE 754 doubles.
_MAX_SAFE_INT = 2**53 - 1

_fast_dumps = json.JSONEncoder(ensure_ascii=False, sort_keys=True, separators=(",", ":"), allow_nan=False).encode


class NotCanonicalisable(Picklable, ValueError):
    """A value that has no place in a signed payload (a float, an unsafe integer, a non-string key...)."""

    def __init__(self, path: str, message: str):
        self.path = path
        super().__init__(f"{path}: {message}")


class FloatNotAllowed(NotCanonicalisable):
    def __init__(self, path: str, value: float):
        super().__init__(
            path, f'float {value!r} is not allowed in a signed payload; send decimals as strings (e.g. "1.23")'
        )


def _check(value: Any, path: str) -> bool:
    """Raise on values JCS cannot carry; return True when the fast path is safe (ASCII keys only)."""
    t = type(value)
    if t is str or t is bool or value is None:
        return True
    if t is int:
        if -_MAX_SAFE_INT <= value <= _MAX_SAFE_INT:
            return True
        raise NotCanonicalisable(path, f"integer {value} exceeds the 2^53 range; send it as a string")
    if t is float:
        raise FloatNotAllowed(path, value)
    if t is dict:
        fast = True
        for k, v in value.items():
            if type(k) is not str:
                raise NotCanonicalisable(path, f"object key {k!r} is not a string")
            # Python sorts keys by code point, JCS by UTF-16 unit: they agree on ASCII.
            if not k.isascii():
                fast = False
            if not _check(v, f"{path}.{k}"):
                fast = False
        return fast
    if t is list or t is tuple:
        fast = True
        for i, v in enumerate(value):
            if not _check(v, f"{path}[{i}]"):
                fast = False
        return fast
    raise NotCanonicalisable(path, f"{t.__name__} is not a JSON value; encode it first")


# In `json` output, a number token that may differ from RFC 8785: 16+ digits (maybe beyond 2^53) or a
# fraction/exponent (a float). Strings are quoted, so their digits never follow `:`, `,` or `[` directly.
_NUMBER_TO_CHECK = re.compile(rb"(?:^|[:,\[])-?(?:\d{16}|\d+[.eE])")


def matches_canonical(value: Any, data: bytes) -> bool:
    """Whether `data` are the RFC 8785 bytes of `value`, cheaply when they can be: ASCII bytes (so keys sort the
    same by code point and by UTF-16 unit) without floats or long integers are canonical exactly when `json`
    writes `value` as them."""
    if data.isascii() and not _NUMBER_TO_CHECK.search(data):
        try:
            return _fast_dumps(value).encode("ascii") == data
        except (TypeError, ValueError, UnicodeEncodeError):
            return False
    try:
        return canonical_json(value) == data
    except NotCanonicalisable:
        return False


def canonical_json(value: Any) -> bytes:
    """Canonical bytes of `value` per RFC 8785."""
    if _check(value, "$"):
        try:
            return _fast_dumps(value).encode("utf-8")
        except UnicodeEncodeError as e:  # lone surrogates
            raise NotCanonicalisable("$", f"string is not valid Unicode: {e}") from e
    try:
        return rfc8785.dumps(value)
    except (rfc8785.CanonicalizationError, UnicodeEncodeError) as e:  # lone surrogate in a key
        raise NotCanonicalisable("$", str(e)) from e


def _refuse_float(text: str) -> Any:
    raise NotCanonicalisable("$", f"float {text} found in JSON; decimals must be strings")


def _refuse_constant(text: str) -> Any:
    raise NotCanonicalisable("$", f"{text} is not valid JSON")


_strict_decoder = json.JSONDecoder(parse_float=_refuse_float, parse_constant=_refuse_constant)


def loads_strict(data: bytes | str) -> Any:
    """Parse JSON refusing floats, NaN and Infinity (they could never have been signed)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        data = bytes(data).decode("utf-8")
    return _strict_decoder.decode(data)
