"""RFC 8785 canonical JSON (the fast path against the reference) and the sealed-envelope parser."""

from __future__ import annotations

import json
import re
from datetime import UTC, timedelta, timezone
from typing import Any

import pytest
import rfc8785
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sle_events.signing.canonical import FloatNotAllowed, NotCanonicalisable, canonical_json
from sle_events.signing.envelope import ENVELOPE_FIELDS, GENESIS, MalformedEnvelope, SealedEvent, open_sealed, seal
from sle_events.signing.keys import Signer, b64, verify_signature

MAX_SAFE = 2**53 - 1
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Characters that stress an encoder: controls (escaped as \uXXXX or short forms), DEL, quotes and backslashes,
# Latin-1, line/paragraph separators, the top of the BMP around the surrogate block, and astral characters
# (whose UTF-16 order differs from their code point order against U+E000..U+FFFF).
TRICKY = [
    "\x00",
    "\x01",
    "\x08",
    "\t",
    "\n",
    "\x0c",
    "\r",
    "\x1f",
    "\x7f",
    '"',
    "\\",
    "/",
    "é",
    "ß",
    "\u00a0",
    "\u2028",
    "\u2029",
    "\ud7ff",
    "\ue000",
    "\uff61",
    "\ufeff",
    "\uffff",
    "😀",
    "𝄞",
    "\U0010ffff",
    "a",
    "Z",
    "0",
]
chars = st.one_of(st.sampled_from(TRICKY), st.characters(exclude_categories=["Cs"]))
texts = st.text(chars, max_size=12)
ascii_texts = st.text(st.characters(max_codepoint=127), max_size=8)
keys = st.one_of(texts, ascii_texts)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-MAX_SAFE, MAX_SAFE),
    st.sampled_from([MAX_SAFE, -MAX_SAFE, 0, -1]),
    texts,
    ascii_texts,
)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(keys, inner, max_size=5), max_leaves=25
)
ascii_json = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-MAX_SAFE, MAX_SAFE), ascii_texts),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ascii_texts, inner, max_size=4),
    max_leaves=15,
)


# --- canonical_json == rfc8785 --------------------------------------------------------------------------------
@SETTINGS
@given(json_values)
def test_canonical_json_matches_the_rfc8785_reference(value):
    assert canonical_json(value) == rfc8785.dumps(value)


@SETTINGS
@given(ascii_json)
def test_ascii_only_values_take_the_fast_path_and_still_match(value):
    assert canonical_json(value) == rfc8785.dumps(value)


@pytest.mark.parametrize(
    "value, expected",
    [
        ({"b": 1, "a": [True, None, "x"]}, b'{"a":[true,null,"x"],"b":1}'),
        (
            {"\u20ac": 1, "\r": 2, "1": 3, "\U0001f600": 4, "\ufb33": 5, "\u00f6": 6},
            # RFC 8785 §3.2.3's example: keys sorted by UTF-16 code units, so U+1F600 (D83D DE00) before U+FB33.
            '{"\\r":2,"1":3,"\u00f6":6,"\u20ac":1,"\U0001f600":4,"\ufb33":5}'.encode(),
        ),
        (['\x00\x1f\x7f\u2028"\\/'], b'["\\u0000\\u001f\x7f\xe2\x80\xa8\\"\\\\/"]'),
        ({"k": MAX_SAFE, "m": -MAX_SAFE}, b'{"k":9007199254740991,"m":-9007199254740991}'),
    ],
)
def test_known_canonical_forms(value, expected):
    assert canonical_json(value) == expected == rfc8785.dumps(value)


# --- refusals -------------------------------------------------------------------------------------------------
@st.composite
def float_somewhere(draw) -> tuple[Any, str]:
    """A JSON value with exactly one float, nested in lists and objects, and the path that leads to it."""
    value: Any = draw(st.one_of(st.floats(), st.sampled_from([0.0, -0.0, 1.0, 1.5, float("nan"), float("inf")])))
    path = ""
    for _ in range(draw(st.integers(0, 4))):
        if draw(st.booleans()):
            before = draw(st.lists(json_values, max_size=3))
            after = draw(st.lists(json_values, max_size=3))
            value, path = [*before, value, *after], f"[{len(before)}]{path}"
        else:
            others = draw(st.dictionaries(keys, json_values, max_size=3))

            def fresh(k: str, others: dict[str, Any] = others) -> bool:
                return k not in others

            key = draw(keys.filter(fresh))
            others[key] = value
            value, path = others, f".{key}{path}"
    return value, "$" + path


@SETTINGS
@given(float_somewhere())
def test_a_float_anywhere_is_refused_naming_its_path(case):
    value, path = case
    with pytest.raises(FloatNotAllowed) as info:
        canonical_json(value)
    assert info.value.path == path
    assert str(info.value).startswith(f"{path}: float ")


@SETTINGS
@given(
    st.one_of(st.integers(min_value=2**53), st.integers(max_value=-(2**53))), st.lists(st.text(max_size=3), max_size=3)
)
def test_integers_outside_the_safe_range_are_refused(n, names):
    value: Any = n
    for name in reversed(names):  # built inside out
        value = {name: value}
    path = "$" + "".join(f".{name}" for name in names)
    with pytest.raises(NotCanonicalisable, match="exceeds the 2\\^53 range") as info:
        canonical_json(value)
    assert info.value.path == path and not isinstance(info.value, FloatNotAllowed)


@pytest.mark.parametrize("value", [["\ud800"], {"a": "x\udfff"}, {"\ud800": 1}, {"é": {"\udc00x": None}}])
def test_lone_surrogates_are_refused_as_not_canonicalisable(value):
    with pytest.raises(NotCanonicalisable):
        canonical_json(value)


@pytest.mark.parametrize("value", [{1: "a"}, {"a": b"bytes"}, {"a": {1, 2}}, object()])
def test_non_json_values_are_refused(value):
    with pytest.raises(NotCanonicalisable):
        canonical_json(value)


# --- open_sealed ----------------------------------------------------------------------------------------------
SIGNER = Signer.generate("nurse.li", "coordinator")
hex64 = st.binary(min_size=32, max_size=32).map(bytes.hex)
times = st.datetimes(
    timezones=st.sampled_from([UTC, timezone(timedelta(hours=8)), timezone(timedelta(hours=-5, minutes=-30))])
).map(lambda t: t.isoformat())
utc_times = st.datetimes(timezones=st.just(UTC)).map(lambda t: t.isoformat())  # recorded_at is UTC
names = st.text(chars, min_size=1, max_size=10)


@st.composite
def envelopes(draw) -> dict[str, Any]:
    version = draw(st.integers(1, MAX_SAFE))
    return {
        "study": str(draw(st.uuids())),
        "stream": str(draw(st.uuids())),
        "version": version,
        "type": draw(names),
        "schema": draw(st.integers(1, 5)),
        "payload": draw(st.dictionaries(keys, json_values, max_size=5)),
        "occurred_at": draw(times),
        "recorded_at": draw(utc_times),
        "actor": "",
        "role": "",
        "key": "",
        "reason": draw(st.one_of(st.none(), names.filter(lambda s: s.strip()))),
        "prev": GENESIS if version == 1 else draw(hex64),
    }


@SETTINGS
@given(envelopes(), names, names)
def test_open_sealed_round_trips_what_seal_made(env, actor, role):
    signer = Signer(actor, role, SIGNER._private_key)
    sealed = seal(env, signer)
    opened = open_sealed(sealed.sealed)
    assert opened.envelope == dict(env, actor=actor, role=role, key=signer.key_id)
    assert (opened.signed, opened.signature, opened.sealed, opened.hash) == (
        sealed.signed,
        sealed.signature,
        sealed.sealed,
        sealed.hash,
    )
    assert opened.signed == canonical_json(opened.envelope) == rfc8785.dumps(opened.envelope)
    assert verify_signature(Ed25519PublicKey.from_public_bytes(signer.public_key), opened.signature, opened.signed)
    assert open_sealed(bytearray(sealed.sealed)).sealed == sealed.sealed  # type: ignore[arg-type]  # bytes-like on purpose


@SETTINGS
@given(
    envelopes(),
    st.booleans(),
    st.sampled_from([(",", ":"), (", ", ": "), (",", ": ")]),
    st.booleans(),
    st.sampled_from([None, 0, 2]),
)
def test_any_other_spelling_of_the_same_json_is_refused(env, ascii_only, separators, sort_keys, indent):
    sealed = seal(env, SIGNER)
    value = json.loads(sealed.sealed)
    other = json.dumps(
        value, ensure_ascii=ascii_only, separators=separators, sort_keys=sort_keys, indent=indent
    ).encode()
    assume(other != sealed.sealed)
    assert json.loads(other) == value
    with pytest.raises(MalformedEnvelope, match="canonical"):
        open_sealed(other)


def _valid(**changes: Any) -> SealedEvent:
    env = {
        "study": "6f1e3c58-8f0c-4c5f-9a47-3b2f1d6b8e11",
        "stream": "0c7d2a4e-5b61-4f7a-8d3e-9a1b2c3d4e5f",
        "version": 2,
        "type": "sle_events.domain.subject:Subject.ConsentObtained",
        "schema": 1,
        "payload": {"icf_version": "ICF v1.0"},
        "occurred_at": "2025-01-02T03:04:05+00:00",
        "recorded_at": "2025-01-01T19:04:06.123456+00:00",
        "actor": "",
        "role": "",
        "key": "",
        "reason": None,
        "prev": "ab" * 32,
    }
    env.update(changes)
    return seal(env, SIGNER)


def _bytes(envelope: Any, signature: Any) -> bytes:
    """Canonical bytes of an outer object, so only the named defect is wrong."""
    return rfc8785.dumps({"envelope": envelope, "signature": signature})


def test_the_valid_example_opens():
    e = _valid()
    assert open_sealed(e.sealed).envelope == e.envelope


@pytest.mark.parametrize(
    "data",
    [
        b"[]",
        b'"sealed"',
        b"null",
        b"{}",
        rfc8785.dumps({"envelope": {}}),
        rfc8785.dumps({"signature": "AA=="}),
        rfc8785.dumps({"envelope": {}, "signature": "AA==", "x": 1}),
        rfc8785.dumps({"Envelope": {}, "signature": "AA=="}),
    ],
)
def test_wrong_outer_shape_is_refused(data):
    with pytest.raises(MalformedEnvelope, match=re.escape('sealed event must be {"envelope": ..., "signature": ...}')):
        open_sealed(data)


def test_envelope_that_is_not_an_object_is_refused():
    with pytest.raises(MalformedEnvelope, match="envelope must be a JSON object"):
        open_sealed(_bytes([1, 2], b64(bytes(64))))


@pytest.mark.parametrize(
    "data", [b"", b"{", b"not json", b'{"envelope":{},"signature":NaN}', b'{"a":1.5}', b"\xff\xfe"]
)
def test_bytes_that_are_not_json_without_floats_are_refused(data):
    with pytest.raises(MalformedEnvelope, match="not valid JSON without floats"):
        open_sealed(data)


@pytest.mark.parametrize("signature", ["!!!", "AAAA AAAA", "A", "é", 5, None, ["AA=="], b64(bytes(64)) + "\n"])
def test_signature_that_is_not_base64_is_refused(signature):
    e = _valid()
    with pytest.raises(MalformedEnvelope, match="signature is not base64"):
        open_sealed(_bytes(e.envelope, signature))


@pytest.mark.parametrize("length", [0, 32, 63, 65, 128])
def test_signature_of_the_wrong_length_is_refused(length):
    e = _valid()
    with pytest.raises(MalformedEnvelope, match=f"64 bytes, got {length}"):
        open_sealed(_bytes(e.envelope, b64((e.signature * 2)[:length])))


@pytest.mark.parametrize(
    "variant",
    [
        "spaces",
        "escaped_unicode",
        "escaped_slash",
        "reordered_outer",
        "reordered_inner",
        "duplicate_key",
        "trailing_newline",
        "leading_space",
        "escaped_letter",
    ],
)
def test_non_canonical_bytes_are_refused(variant):
    e = _valid(payload={"icf_version": "ICF v1.0 é/ü"})
    good = e.sealed
    sig = b64(e.signature)
    inner = e.signed
    bad = {
        "spaces": good.replace(b'"version":2', b'"version": 2'),
        "escaped_unicode": good.replace("é".encode(), b"\\u00e9"),
        "escaped_slash": good.replace(b"/", b"\\/", 1),
        "reordered_outer": b'{"signature":"' + sig.encode() + b'","envelope":' + inner + b"}",
        "reordered_inner": good.replace(b'"actor":"nurse.li",', b"").replace(
            b'"version":2', b'"version":2,"actor":"nurse.li"'
        ),
        "duplicate_key": good.replace(b'"version":2', b'"version":2,"version":2'),
        "trailing_newline": good + b"\n",
        "leading_space": b" " + good,
        "escaped_letter": good.replace(b'"ICF', b'"\\u0049CF'),
    }[variant]
    assert bad != good
    assert json.loads(bad) == json.loads(good)  # the same JSON value, spelled differently
    with pytest.raises(MalformedEnvelope, match="not in RFC 8785 canonical form"):
        open_sealed(bad)


@pytest.mark.parametrize("missing", ENVELOPE_FIELDS)
def test_envelope_missing_a_field_is_refused(missing):
    e = _valid()
    env = {k: v for k, v in e.envelope.items() if k != missing}
    with pytest.raises(MalformedEnvelope, match=re.escape(f"envelope fields missing ['{missing}']")):
        open_sealed(_bytes(env, b64(e.signature)))


def test_envelope_with_an_unexpected_field_is_refused():
    e = _valid()
    with pytest.raises(MalformedEnvelope, match=re.escape("unexpected ['site']")):
        open_sealed(_bytes(dict(e.envelope, site="NJ01"), b64(e.signature)))


@SETTINGS
@given(hex64.filter(lambda h: h != GENESIS))
def test_version_1_must_name_the_genesis_prev(prev):
    e = _valid(version=1, prev=GENESIS)
    assert open_sealed(e.sealed).version == 1
    env = dict(e.envelope, prev=prev)
    with pytest.raises(MalformedEnvelope, match="version 1 must have the genesis prev"):
        open_sealed(_bytes(env, b64(e.signature)))


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("version", 0, "version must be a positive integer"),
        ("version", "2", "version must be a positive integer"),
        ("version", True, "version must be a positive integer"),
        ("stream", "0C7D2A4E-5B61-4F7A-8D3E-9A1B2C3D4E5F", "stream must be a lowercase UUID"),
        ("prev", "AB" * 32, "prev must be 64 lowercase hex digits"),
        ("payload", [], "payload must be a JSON object"),
        ("reason", " ", "reason must be null or a non-empty string"),
        ("recorded_at", "2025-01-02T03:04:05", "no UTC offset"),
        ("recorded_at", "2025-01-02T03:04:05+08:00", "must be in UTC"),
        ("key", "", "key must be a non-empty string"),
    ],
)
def test_envelope_fields_of_the_wrong_form_are_refused(field, value, message):
    e = _valid()
    with pytest.raises(MalformedEnvelope, match=re.escape(message)):
        open_sealed(_bytes(dict(e.envelope, **{field: value}), b64(e.signature)))


@pytest.mark.parametrize("n", [2**53, -(2**53), 10**30])
def test_open_sealed_refuses_integers_outside_the_safe_range_even_if_signed(n):
    """A signer that bypassed `seal` could sign such bytes; RFC 8785 (I-JSON) has no canonical form for them."""
    env = dict(_valid().envelope, payload={"count": n})
    signed = json.dumps(env, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode()
    forged = SealedEvent.build(env, signed, SIGNER.sign(signed))
    with pytest.raises(MalformedEnvelope, match="2\\^53"):
        open_sealed(forged.sealed)


@pytest.mark.parametrize("spelling", ['"\\ud800"', '"x\\udfff"', '"\\udc00\\ud800"'])
@pytest.mark.parametrize("where", ["key", "value"])
def test_open_sealed_refuses_unpaired_surrogates_in_keys_and_values(spelling, where):
    """JSON can spell a lone surrogate; no signer could have signed it. It is malformed, not a crash."""
    good = _valid().sealed
    mark = b'"icf_version":"ICF v1.0"'
    bad = good.replace(
        mark, spelling.encode() + b':"ICF v1.0"' if where == "key" else b'"icf_version":' + spelling.encode()
    )
    assert bad != good
    with pytest.raises(MalformedEnvelope):
        open_sealed(bad)


@given(envelopes())
def test_the_stores_fast_canonical_comparison_agrees_with_rfc8785(env):
    from sle_events.signing.canonical import matches_canonical

    reference = rfc8785.dumps(env)
    assert matches_canonical(env, reference)
    assert not matches_canonical(env, reference.replace(b":", b": ", 1))


@pytest.mark.parametrize("value", [{"a": 1.5}, {"a": [10**16]}, {"a": float("nan")}, {"a": b"x"}])
def test_the_fast_comparison_never_accepts_what_rfc8785_refuses(value):
    import json as _json

    from sle_events.signing.canonical import matches_canonical

    try:
        written = _json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
    except (TypeError, ValueError):
        written = b'{"a":"x"}'
    assert not matches_canonical(value, written)
