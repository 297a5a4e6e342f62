"""Signed envelopes: the unit the store keeps, the ledger logs and auditors verify.

The signed bytes are the RFC 8785 canonical JSON of the envelope below. The sealed bytes, which the store keeps
as the event's state and the ledger uses as leaf bytes, are the canonical JSON of
``{"envelope": <envelope>, "signature": <base64 Ed25519 signature>}``; because "envelope" sorts before
"signature" they are built by concatenation, never by encoding twice.

``prev`` is the SHA-256 (hex) of the sealed bytes of the stream's previous event, ``GENESIS`` for version 1.
"""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime, timedelta
from typing import Any, cast
from uuid import UUID

from sle_events.signing.canonical import NotCanonicalisable, canonical_json, loads_strict, matches_canonical
from sle_events.signing.keys import Signer, b64, unb64

GENESIS = "0" * 64

ENVELOPE_FIELDS = (
    "study",
    "stream",
    "version",
    "type",
    "schema",
    "payload",
    "occurred_at",
    "recorded_at",
    "actor",
    "role",
    "key",
    "reason",
    "prev",
)

_PREFIX = b'{"envelope":'
_SIG_MARK = b',"signature":"'
_HEX64 = re.compile(r"[0-9a-f]{64}")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class MalformedEnvelope(ValueError):
    """The bytes or fields do not form a well-formed signed envelope."""


def utc_now() -> datetime:
    return datetime.now(UTC)


def format_time(value: datetime) -> str:
    if value.tzinfo is None or value.utcoffset() is None:
        raise MalformedEnvelope(f"time {value.isoformat()} has no UTC offset")
    return value.isoformat()


def parse_time(field: str, text: Any) -> datetime:
    if not isinstance(text, str):
        raise MalformedEnvelope(f"{field} must be an ISO 8601 string, got {type(text).__name__}")
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise MalformedEnvelope(f"{field} {text!r} is not an ISO 8601 date-time") from None
    if value.tzinfo is None:
        raise MalformedEnvelope(f"{field} {text!r} has no UTC offset")
    return value


def check_envelope(env: Any) -> dict[str, Any]:
    """Check the envelope's shape and field types; return it."""
    if not isinstance(env, dict):
        raise MalformedEnvelope("envelope must be a JSON object")
    missing = [f for f in ENVELOPE_FIELDS if f not in env]
    extra = sorted(set(env) - set(ENVELOPE_FIELDS))
    if missing or extra:
        raise MalformedEnvelope(f"envelope fields missing {missing} / unexpected {extra}")
    for f in ("study", "stream"):
        if not isinstance(env[f], str) or not _UUID.fullmatch(env[f]):
            raise MalformedEnvelope(f"{f} must be a lowercase UUID string, got {env[f]!r}")
    for f in ("version", "schema"):
        if type(env[f]) is not int or env[f] < 1:
            raise MalformedEnvelope(f"{f} must be a positive integer, got {env[f]!r}")
    for f in ("type", "actor", "role", "key"):
        if not isinstance(env[f], str) or not env[f]:
            raise MalformedEnvelope(f"{f} must be a non-empty string, got {env[f]!r}")
    if not isinstance(env["payload"], dict):
        raise MalformedEnvelope("payload must be a JSON object")
    if env["reason"] is not None and (not isinstance(env["reason"], str) or not env["reason"].strip()):
        raise MalformedEnvelope("reason must be null or a non-empty string")
    if not isinstance(env["prev"], str) or not _HEX64.fullmatch(env["prev"]):
        raise MalformedEnvelope(f"prev must be 64 lowercase hex digits, got {env['prev']!r}")
    if env["version"] == 1 and env["prev"] != GENESIS:
        raise MalformedEnvelope("version 1 must have the genesis prev")
    parse_time("occurred_at", env["occurred_at"])
    if parse_time("recorded_at", env["recorded_at"]).utcoffset() != timedelta(0):
        raise MalformedEnvelope(f"recorded_at {env['recorded_at']} must be in UTC (offset +00:00)")
    return env


def nesting_depth(value: Any) -> int:
    """How deep `value` nests, without recursion (a hostile envelope may nest 100,000 levels)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, dict):
            v = list(v.values())
        elif not isinstance(v, (list, tuple)):
            continue
        deepest = max(deepest, depth)
        stack.extend((x, depth + 1) for x in v)
    return deepest


class SealedEvent:
    """An envelope with its signature; `sealed` are the exact bytes stored and logged."""

    __slots__ = ("_hash", "_stream", "envelope", "sealed", "signature", "signed")

    def __init__(self, envelope: dict[str, Any], signed: bytes, signature: bytes, sealed: bytes):
        self.envelope = envelope
        self.signed = signed
        self.signature = signature
        self.sealed = sealed
        self._hash: str | None = None
        self._stream: UUID | None = None

    @classmethod
    def build(cls, envelope: dict[str, Any], signed: bytes, signature: bytes) -> SealedEvent:
        sealed = _PREFIX + signed + _SIG_MARK + b64(signature).encode("ascii") + b'"}'
        return cls(envelope, signed, signature, sealed)

    @property
    def hash(self) -> str:
        """SHA-256 of the sealed bytes: what the next event's `prev` must name."""
        if self._hash is None:
            self._hash = hashlib.sha256(self.sealed).hexdigest()
        return self._hash

    @property
    def stream(self) -> UUID:
        if self._stream is None:
            self._stream = UUID(self.envelope["stream"])
        return self._stream

    @property
    def version(self) -> int:
        return cast(int, self.envelope["version"])  # checked when the envelope was sealed or opened

    @property
    def topic(self) -> str:
        return cast(str, self.envelope["type"])  # checked when the envelope was sealed or opened

    @property
    def key(self) -> str:
        return cast(str, self.envelope["key"])  # checked when the envelope was sealed or opened

    def __repr__(self) -> str:
        e = self.envelope
        return f"SealedEvent({e['type']} stream={e['stream']} v{e['version']} by {e['actor']})"


def seal(envelope: dict[str, Any], signer: Signer) -> SealedEvent:
    """Sign an envelope with the caller's key (client side)."""
    envelope = dict(envelope, actor=signer.actor, role=signer.role, key=signer.key_id)
    check_envelope(envelope)
    try:
        signed = canonical_json(envelope)
    except NotCanonicalisable as e:
        raise MalformedEnvelope(f"envelope cannot be canonicalised at {e}") from e
    return SealedEvent.build(envelope, signed, signer.sign(signed))


def _sealed_parts(outer: Any) -> tuple[dict[str, Any], bytes]:
    """The envelope (its form checked) and the signature of a parsed sealed event."""
    if not isinstance(outer, dict) or set(outer) != {"envelope", "signature"}:
        raise MalformedEnvelope('sealed event must be {"envelope": ..., "signature": ...}')
    env = check_envelope(outer["envelope"])
    try:
        signature = unb64(outer["signature"])
    except (ValueError, TypeError, AttributeError):
        raise MalformedEnvelope("signature is not base64") from None
    if len(signature) != 64:
        raise MalformedEnvelope(f"an Ed25519 signature has 64 bytes, got {len(signature)}")
    return env, signature


def sealed_from_json(outer: Any) -> SealedEvent:
    """A sealed event from its parsed JSON (an item of a batch a client sent): the signed bytes are the
    envelope's canonical form, whatever spacing or key order the client sent it in. Checks form, not trust."""
    env, signature = _sealed_parts(outer)
    try:
        signed = canonical_json(env)
    except NotCanonicalisable as e:
        raise MalformedEnvelope(f"envelope cannot be canonicalised at {e}") from e
    return SealedEvent.build(env, signed, signature)


def open_sealed(data: bytes) -> SealedEvent:
    """Parse sealed bytes as sent by a client or read from the store; check form, not trust."""
    try:
        outer = loads_strict(data)
    except (ValueError, NotCanonicalisable, UnicodeDecodeError) as e:
        raise MalformedEnvelope(f"not valid JSON without floats: {e}") from None
    except RecursionError:
        raise MalformedEnvelope("JSON nested too deeply to read") from None
    env, signature = _sealed_parts(outer)
    data = bytes(data)
    j = data.rfind(_SIG_MARK)
    signed = data[len(_PREFIX) : j] if data.startswith(_PREFIX) and j > 0 else b""
    if not matches_canonical(env, signed):
        try:
            canonical_json(env)  # says precisely why, when the envelope has no canonical form at all
        except NotCanonicalisable as e:
            raise MalformedEnvelope(f"envelope cannot be canonicalised at {e}") from e
        raise MalformedEnvelope("bytes are not in RFC 8785 canonical form")
    event = SealedEvent.build(env, signed, signature)
    if event.sealed != data:
        raise MalformedEnvelope("bytes are not in RFC 8785 canonical form")
    return event


_FIELD_SET = frozenset(ENVELOPE_FIELDS)


def open_stored(data: bytes) -> SealedEvent:
    """The verifier's fast path: take the signed bytes exactly as stored and parse only the envelope.

    Verifying the signature over those exact bytes then proves they are byte for byte what was signed, so
    re-canonicalising is not needed to detect an edit. Anything unusual goes through `open_sealed`, which
    says precisely what is wrong."""
    data = bytes(data)
    j = data.rfind(_SIG_MARK)  # the outer one is last: the signature itself is base64, without quotes
    if j < 0 or not data.startswith(_PREFIX) or not data.endswith(b'"}'):
        return open_sealed(data)
    signed = data[len(_PREFIX) : j]
    try:
        env = loads_strict(signed)
        signature = unb64(data[j + len(_SIG_MARK) : -2].decode("ascii"))
    except (ValueError, NotCanonicalisable, UnicodeDecodeError, RecursionError):
        return open_sealed(data)
    if (
        type(env) is not dict
        or env.keys() != _FIELD_SET
        or len(signature) != 64
        or type(env["version"]) is not int
        or type(env["schema"]) is not int
        or type(env["payload"]) is not dict
        or not all(type(env[f]) is str for f in ("study", "stream", "type", "actor", "role", "key", "prev"))
    ):
        return open_sealed(data)
    return SealedEvent(env, signed, signature, data)
