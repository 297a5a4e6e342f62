"""C2SP signed notes (c2sp.org/signed-note), Ed25519 (signature type 0x01).

A signed note is a UTF-8 text ending in a newline, a blank line, then one or more
signature lines ``"\u2014 <key name> <base64(4-byte key ID || signature)>\\n"``.  The signed
message is the text including its final newline but not the blank separator line.
Notes must not contain ASCII control characters other than newline (so no ``\\r``).

Key ID = first 4 bytes (big-endian uint32) of ``SHA-256(name || 0x0A || type || public key)``.
A verifier key ("vkey") is ``<name>+<8 hex key ID>+<base64(type || public key)>``.

:func:`open_note` ignores signatures from unknown keys, rejects the whole note if a
signature from a known key fails to verify, and requires at least one verified
signature.  Signers and verifiers are duck-typed (:class:`NoteSigner`,
:class:`NoteVerifier`) so other signature types (e.g. cosignatures) plug in.

Private key material is never included in ``repr``/``str`` of any object here; the
only ways to get it out are the explicit :meth:`Signer.export_skey` and
:func:`generate_key`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NoReturn, Protocol, runtime_checkable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from sle_events.picklable import Picklable

__all__ = [
    "ALG_ED25519",
    "MAX_SIGNATURES",
    "NoteError",
    "MalformedNoteError",
    "InvalidSignatureError",
    "UnverifiedNoteError",
    "KeyFormatError",
    "NoteSigner",
    "NoteVerifier",
    "Signature",
    "Signer",
    "Verifier",
    "b64decode_strict",
    "is_valid_key_name",
    "key_id",
    "parse_vkey",
    "vkey_for",
    "generate_key",
    "sign_note",
    "parse_note",
    "open_note",
]

ALG_ED25519 = 0x01
MAX_SIGNATURES = 100
_SIG_PREFIX = "\u2014 "  # em dash, space
_B64_RE = re.compile(r"[A-Za-z0-9+/]*={0,2}")
_HEX8_RE = re.compile(r"[0-9a-fA-F]{8}")


# --------------------------------------------------------------------------- errors


class NoteError(ValueError):
    """Base class for signed-note failures."""


class MalformedNoteError(NoteError):
    """The note is not a syntactically valid signed note."""


class InvalidSignatureError(Picklable, NoteError):
    """A signature from a known key did not verify; the whole note is rejected."""

    def __init__(self, name: str, key_id: int) -> None:
        self.name = name
        self.key_id = key_id
        super().__init__(f"invalid signature for key {name}+{key_id:08x}")


class UnverifiedNoteError(Picklable, NoteError):
    """The note parsed, but no signature from a known key was present."""

    def __init__(self, text: str, signatures: Sequence[Signature]) -> None:
        self.text = text
        self.signatures = list(signatures)
        super().__init__("note has no verifiable signatures from known keys")


class KeyFormatError(ValueError):
    """A verifier/signer key string or key name is malformed or inconsistent."""


# --------------------------------------------------------------------------- helpers


def b64decode_strict(s: str) -> bytes:
    """Decode canonical standard base64 (RFC 4648 section 4), padding required.

    Rejects characters outside the alphabet, whitespace, missing/extra padding and
    non-zero trailing bits (i.e. only the unique canonical encoding is accepted).
    """
    if not isinstance(s, str) or len(s) % 4 or not _B64_RE.fullmatch(s):
        raise ValueError("invalid base64")
    try:
        raw = base64.b64decode(s, validate=True)
    except binascii.Error as e:
        raise ValueError(f"invalid base64: {e}") from None
    if base64.b64encode(raw).decode("ascii") != s:
        raise ValueError("non-canonical base64")
    return raw


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def is_valid_key_name(name: str) -> bool:
    """Key names are non-empty, contain no Unicode space, no ``+`` and no control char."""
    return (
        isinstance(name, str)
        and name != ""
        and "+" not in name
        and not any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in name)
        and _is_utf8_encodable(name)
    )


def _is_utf8_encodable(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def key_id(name: str, typed_public_key: bytes) -> int:
    """``SHA-256(name || 0x0A || typed_public_key)[:4]`` as a big-endian uint32.

    ``typed_public_key`` is the signature type byte followed by the public key.
    """
    digest = hashlib.sha256(name.encode("utf-8") + b"\n" + bytes(typed_public_key)).digest()
    return int.from_bytes(digest[:4], "big")


def _raw_public_key(public_key: bytes | Ed25519PublicKey) -> bytes:
    if isinstance(public_key, Ed25519PublicKey):
        return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    raw = bytes(public_key)
    if len(raw) != 32:
        raise KeyFormatError(f"Ed25519 public key must be 32 bytes, got {len(raw)}")
    return raw


def parse_vkey(vkey: str) -> tuple[str, int, int, bytes]:
    """Split a verifier key into ``(name, key_id, type_byte, public_key)``.

    Splits only on the first two ``+`` (base64 may contain ``+``) and checks that the
    key ID matches the name, type byte and key.  Does not check the key type.
    """
    if not isinstance(vkey, str):
        raise KeyFormatError("verifier key must be a str")
    parts = vkey.split("+", 2)
    if len(parts) != 3:
        raise KeyFormatError("malformed verifier key: want <name>+<hex key id>+<base64 key>")
    name, hex_id, key64 = parts
    if not is_valid_key_name(name):
        raise KeyFormatError(f"malformed verifier key: invalid key name {name!r}")
    if not _HEX8_RE.fullmatch(hex_id):
        raise KeyFormatError("malformed verifier key: key id must be 8 hex digits")
    try:
        typed = b64decode_strict(key64)
    except ValueError:
        raise KeyFormatError("malformed verifier key: key is not valid base64") from None
    if len(typed) < 2:
        raise KeyFormatError("malformed verifier key: key too short")
    kid = int(hex_id, 16)
    if kid != key_id(name, typed):
        raise KeyFormatError(f"verifier key id {hex_id} does not match the key")
    return name, kid, typed[0], typed[1:]


def vkey_for(name: str, public_key: bytes | Ed25519PublicKey, alg: int = ALG_ED25519) -> str:
    """Verifier key string ``name+<hex8 key id>+base64(alg || public key)``."""
    if not is_valid_key_name(name):
        raise KeyFormatError(f"invalid key name {name!r}")
    typed = bytes([alg]) + _raw_public_key(public_key)
    return f"{name}+{key_id(name, typed):08x}+{_b64(typed)}"


# --------------------------------------------------------------------------- signers / verifiers


@runtime_checkable
class NoteVerifier(Protocol):
    """Anything that can verify note signatures for one (name, key ID)."""

    @property
    def name(self) -> str: ...

    @property
    def key_id(self) -> int: ...

    def verify(self, msg: bytes, sig: bytes) -> bool: ...


@runtime_checkable
class NoteSigner(Protocol):
    """Anything that can produce note signatures for one (name, key ID)."""

    @property
    def name(self) -> str: ...

    @property
    def key_id(self) -> int: ...

    def sign(self, msg: bytes) -> bytes: ...


class PublicKeyHolder:
    """A named Ed25519 public key whose key ID is derived with the signature type byte `ALG` (shared by the note
    verifier and the cosignature verifier, which differ only in that byte and in what they verify)."""

    __slots__ = ("_key_id", "_name", "_public_key", "_raw")
    ALG = ALG_ED25519

    def __init__(self, name: str, public_key: bytes | Ed25519PublicKey) -> None:
        if not is_valid_key_name(name):
            raise KeyFormatError(f"invalid key name {name!r}")
        self._raw = _raw_public_key(public_key)
        self._name = name
        self._key_id = key_id(name, bytes([self.ALG]) + self._raw)
        self._public_key = Ed25519PublicKey.from_public_bytes(self._raw)

    @property
    def name(self) -> str:
        return self._name

    @property
    def key_id(self) -> int:
        return self._key_id

    @property
    def public_key(self) -> bytes:
        return self._raw

    @property
    def vkey(self) -> str:
        return vkey_for(self._name, self._raw, self.ALG)


class Verifier(PublicKeyHolder):
    """Ed25519 (type 0x01) note verifier."""

    __slots__ = ()

    @classmethod
    def from_vkey(cls, vkey: str) -> Verifier:
        name, _kid, alg, raw = parse_vkey(vkey)
        if alg != ALG_ED25519:
            raise KeyFormatError(f"unsupported verifier key type 0x{alg:02x}, want 0x01 (Ed25519)")
        if len(raw) != 32:
            raise KeyFormatError(f"Ed25519 public key must be 32 bytes, got {len(raw)}")
        return cls(name, raw)

    def verify(self, msg: bytes, sig: bytes) -> bool:
        if len(sig) != 64:
            return False
        try:
            self._public_key.verify(bytes(sig), bytes(msg))
        except InvalidSignature:
            return False
        return True

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Verifier) and self._name == other._name and self._raw == other._raw

    def __hash__(self) -> int:
        return hash((self._name, self._raw))

    def __repr__(self) -> str:
        return f"Verifier({self.vkey!r})"


class Signer(PublicKeyHolder):
    """Ed25519 (type 0x01) note signer.  Its private key never appears in repr/str."""

    __slots__ = ("_private_key",)

    def __init__(self, name: str, private_key: Ed25519PrivateKey) -> None:
        if not is_valid_key_name(name):
            raise KeyFormatError(f"invalid key name {name!r}")
        if not isinstance(private_key, Ed25519PrivateKey):
            raise TypeError("private_key must be an Ed25519PrivateKey")
        super().__init__(name, private_key.public_key())
        self._private_key = private_key

    @classmethod
    def generate(cls, name: str) -> Signer:
        return cls(name, Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, name: str, seed: bytes) -> Signer:
        if len(seed) != 32:
            raise KeyFormatError("Ed25519 seed must be 32 bytes")
        return cls(name, Ed25519PrivateKey.from_private_bytes(bytes(seed)))

    @classmethod
    def from_skey(cls, skey: str) -> Signer:
        """Parse a Go ``golang.org/x/mod/sumdb/note`` signer key ``PRIVATE+KEY+name+id+b64``."""
        if not isinstance(skey, str):
            raise KeyFormatError("signer key must be a str")
        parts = skey.split("+", 4)
        if len(parts) != 5 or parts[0] != "PRIVATE" or parts[1] != "KEY":
            raise KeyFormatError("malformed signer key")
        _, _, name, hex_id, key64 = parts
        if not is_valid_key_name(name) or not _HEX8_RE.fullmatch(hex_id):
            raise KeyFormatError("malformed signer key")
        try:
            typed = b64decode_strict(key64)
        except ValueError:
            raise KeyFormatError("malformed signer key: key is not valid base64") from None
        if len(typed) != 33 or typed[0] != ALG_ED25519:
            raise KeyFormatError("malformed signer key: want type 0x01 and a 32-byte seed")
        signer = cls.from_seed(name, typed[1:])
        if signer.key_id != int(hex_id, 16):
            raise KeyFormatError("signer key id does not match the key")
        return signer

    def export_skey(self) -> str:
        """Explicitly export the secret key as ``PRIVATE+KEY+name+id+base64(0x01||seed)``."""
        seed = self._private_key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        return f"PRIVATE+KEY+{self._name}+{self._key_id:08x}+{_b64(bytes([ALG_ED25519]) + seed)}"

    def verifier(self) -> Verifier:
        return Verifier(self._name, self._raw)

    def sign(self, msg: bytes) -> bytes:
        return self._private_key.sign(bytes(msg))

    def __repr__(self) -> str:
        return f"Signer(name={self._name!r}, key_id={self._key_id:08x})"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("Signer objects cannot be pickled; use export_skey() explicitly")


def generate_key(name: str) -> tuple[str, str]:
    """Generate an Ed25519 key: returns ``(skey, vkey)`` in the Go sumdb/note formats."""
    signer = Signer.generate(name)
    return signer.export_skey(), signer.vkey


# --------------------------------------------------------------------------- notes


@dataclass(frozen=True, slots=True)
class Signature:
    """One signature line of a note: key name, key ID and the base64 blob as written."""

    name: str
    key_id: int
    base64: str

    @property
    def raw(self) -> bytes:
        """The signature bytes after the 4-byte key ID."""
        return b64decode_strict(self.base64)[4:]

    def line(self) -> str:
        return f"{_SIG_PREFIX}{self.name} {self.base64}\n"


def _check_note_chars(s: str) -> None:
    for c in s:
        if c < " " and c != "\n":
            raise MalformedNoteError(f"note contains control character U+{ord(c):04X}")
    if not _is_utf8_encodable(s):
        raise MalformedNoteError("note is not valid UTF-8")


def _as_text(note: str | bytes) -> str:
    if isinstance(note, (bytes, bytearray, memoryview)):
        try:
            return bytes(note).decode("utf-8", errors="strict")
        except UnicodeDecodeError:
            raise MalformedNoteError("note is not valid UTF-8") from None
    if not isinstance(note, str):
        raise TypeError("note must be str or bytes")
    return note


def _parse_sig_line(line: str) -> Signature:
    if not line.startswith(_SIG_PREFIX):
        raise MalformedNoteError("signature line does not start with an em dash and a space")
    name, sep, b64 = line[len(_SIG_PREFIX) :].partition(" ")
    if not sep or not is_valid_key_name(name):
        raise MalformedNoteError(f"signature line has an invalid key name {name!r}")
    try:
        blob = b64decode_strict(b64)
    except ValueError:
        raise MalformedNoteError(f"signature by {name!r} is not valid base64") from None
    if len(blob) < 5:
        raise MalformedNoteError(f"signature by {name!r} is too short")
    return Signature(name, int.from_bytes(blob[:4], "big"), b64)


def parse_note(note: str | bytes) -> tuple[str, list[Signature]]:
    """Split a note into its text and signature lines, checking syntax only (no crypto)."""
    msg = _as_text(note)
    _check_note_chars(msg)
    split = msg.rfind("\n\n")
    if split < 0:
        raise MalformedNoteError("note has no blank line before the signatures")
    text, block = msg[: split + 1], msg[split + 2 :]
    if not block or not block.endswith("\n"):
        raise MalformedNoteError("note has no signature lines or does not end in a newline")
    lines = block[:-1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        raise MalformedNoteError(f"note has more than {MAX_SIGNATURES} signatures")
    return text, [_parse_sig_line(line) for line in lines]


def _index_verifiers(verifiers: Iterable[NoteVerifier]) -> dict[tuple[str, int], list[NoteVerifier]]:
    known: dict[tuple[str, int], list[NoteVerifier]] = {}
    for v in verifiers:
        known.setdefault((v.name, v.key_id), []).append(v)
    return known


def open_note(note: str | bytes, verifiers: NoteVerifier | Iterable[NoteVerifier]) -> tuple[str, list[Signature]]:
    """Verify a signed note; return ``(text, verified signatures)``.

    * signatures whose (name, key ID) is unknown are ignored;
    * every signature from a known key is verified, and one that fails rejects the
      whole note (:class:`InvalidSignatureError`);
    * at least one verified signature is required (:class:`UnverifiedNoteError`).
    """
    if isinstance(verifiers, NoteVerifier):
        verifiers = [verifiers]
    known = _index_verifiers(verifiers)
    text, sigs = parse_note(note)
    msg = text.encode("utf-8")
    verified: list[Signature] = []
    seen: set[tuple[str, int]] = set()
    for sig in sigs:
        candidates = known.get((sig.name, sig.key_id))
        if candidates is None:
            continue
        if len(candidates) > 1:
            raise NoteError(f"ambiguous verifier key {sig.name}+{sig.key_id:08x}")
        if not candidates[0].verify(msg, sig.raw):
            raise InvalidSignatureError(sig.name, sig.key_id)
        if (sig.name, sig.key_id) not in seen:
            seen.add((sig.name, sig.key_id))
            verified.append(sig)
    if not verified:
        raise UnverifiedNoteError(text, sigs)
    return text, verified


def sign_note(text: str, signers: NoteSigner | Sequence[NoteSigner], existing: Sequence[Signature] = ()) -> str:
    """Sign ``text`` (which must end in a newline) and return the encoded note.

    ``existing`` signatures (e.g. from :func:`parse_note`) are kept, first, except those
    by a key that is signing again; new signatures follow in ``signers`` order.
    """
    if isinstance(signers, NoteSigner):
        signers = [signers]
    if not isinstance(text, str):
        raise TypeError("note text must be a str")
    if not text.endswith("\n"):
        raise MalformedNoteError("note text must end in a newline")
    _check_note_chars(text)
    msg = text.encode("utf-8")
    new_lines: list[str] = []
    signing: set[tuple[str, int]] = set()
    for s in signers:
        if not is_valid_key_name(s.name):
            raise KeyFormatError(f"invalid signer name {s.name!r}")
        signing.add((s.name, s.key_id))
        blob = s.key_id.to_bytes(4, "big") + bytes(s.sign(msg))
        new_lines.append(f"{_SIG_PREFIX}{s.name} {_b64(blob)}\n")
    old_lines: list[str] = []
    for sig in existing:
        if (sig.name, sig.key_id) in signing:
            continue
        checked = _parse_sig_line(sig.line()[:-1])
        if checked != sig:
            raise MalformedNoteError(f"existing signature by {sig.name!r} has a mismatched key id")
        old_lines.append(checked.line())
    if not old_lines and not new_lines:
        raise NoteError("a signed note needs at least one signature")
    if len(old_lines) + len(new_lines) > MAX_SIGNATURES:
        raise NoteError(f"more than {MAX_SIGNATURES} signatures")
    return text + "\n" + "".join(old_lines) + "".join(new_lines)
