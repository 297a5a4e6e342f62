"""Ed25519 checkpoint cosignatures (c2sp.org/tlog-cosignature, ``cosignature/v1``) and a witness.

A cosignature is a note signature line on a checkpoint whose blob is
``key_id(4) || timestamp(8, big-endian, <= 2**63-1) || Ed25519 signature(64)``; the
Ed25519 signature covers::

    cosignature/v1\\n
    time <timestamp, decimal>\\n
    <the whole checkpoint body, including its final newline>

Key ID = ``SHA-256(name || 0x0A || 0x04 || public key)[:4]`` (type byte 0x04).

:class:`Witness` keeps the last checkpoint it cosigned for one log and only cosigns a
new checkpoint that is signed by the log and provably consistent with it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NoReturn

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from .checkpoint import Checkpoint, CheckpointError, ExtensionError, check_extension, key_rotation, open_checkpoint
from .merkle import HASH_SIZE
from .note import (
    ALG_ED25519,
    KeyFormatError,
    NoteError,
    NoteVerifier,
    PublicKeyHolder,
    Signature,
    Signer,
    Verifier,
    key_id,
    parse_note,
    parse_vkey,
    sign_note,
    vkey_for,
)

__all__ = [
    "ALG_COSIGNATURE_V1",
    "MAX_TIMESTAMP",
    "cosignature_message",
    "cosignature_timestamp",
    "cosignature_vkey",
    "CosignatureSigner",
    "CosignatureVerifier",
    "WitnessError",
    "WitnessState",
    "Witness",
]

ALG_COSIGNATURE_V1 = 0x04
MAX_TIMESTAMP = (1 << 63) - 1
_HEADER = "cosignature/v1\n"


def cosignature_message(timestamp: int, checkpoint_text: str | bytes) -> bytes:
    """The message an Ed25519 cosignature/v1 signs for ``checkpoint_text`` at ``timestamp``."""
    if not isinstance(timestamp, int) or not 0 <= timestamp <= MAX_TIMESTAMP:
        raise ValueError(f"cosignature timestamp {timestamp!r} out of range")
    body = checkpoint_text.encode("utf-8") if isinstance(checkpoint_text, str) else bytes(checkpoint_text)
    if body.count(b"\n") < 3 or not body.endswith(b"\n"):
        raise ValueError("cosigned message must be a checkpoint body (>= 3 newline-terminated lines)")
    return f"{_HEADER}time {timestamp}\n".encode("ascii") + body


def cosignature_timestamp(sig: Signature | bytes) -> int:
    """Timestamp embedded in a cosignature (a :class:`Signature` or the blob after the key ID)."""
    raw = sig.raw if isinstance(sig, Signature) else bytes(sig)
    if len(raw) != 8 + 64:
        raise ValueError(f"cosignature has {len(raw)} bytes after the key id, want 72")
    return int.from_bytes(raw[:8], "big")


def cosignature_vkey(name: str, public_key: bytes | Ed25519PublicKey) -> str:
    """Verifier key with type 0x04 for an Ed25519 cosigner."""
    return vkey_for(name, public_key, ALG_COSIGNATURE_V1)


class CosignatureVerifier(PublicKeyHolder):
    """Verifies Ed25519 cosignature/v1 note signatures (key ID type byte 0x04)."""

    __slots__ = ()
    ALG = ALG_COSIGNATURE_V1

    @classmethod
    def from_vkey(cls, vkey: str) -> CosignatureVerifier:
        """Accept a type 0x04 vkey, or a plain Ed25519 (0x01) vkey of the same key."""
        name, _kid, alg, raw = parse_vkey(vkey)
        if alg not in (ALG_COSIGNATURE_V1, ALG_ED25519):
            raise KeyFormatError(f"unsupported cosigner key type 0x{alg:02x}")
        if len(raw) != 32:
            raise KeyFormatError(f"Ed25519 public key must be 32 bytes, got {len(raw)}")
        return cls(name, raw)

    def verify(self, msg: bytes, sig: bytes) -> bool:
        if len(sig) != 8 + 64:
            return False
        ts = int.from_bytes(sig[:8], "big")
        try:
            m = cosignature_message(ts, msg)
            self._public_key.verify(bytes(sig[8:]), m)
        except (ValueError, InvalidSignature):
            return False
        return True

    def __repr__(self) -> str:
        return f"CosignatureVerifier({self.vkey!r})"


class CosignatureSigner:
    """Produces Ed25519 cosignature/v1 signatures.  The private key never appears in repr."""

    __slots__ = ("_clock", "_key_id", "_signer")

    def __init__(
        self,
        name: str,
        private_key: Ed25519PrivateKey,
        clock: Callable[[], int] | None = None,
    ) -> None:
        self._signer = Signer(name, private_key)
        self._key_id = key_id(name, bytes([ALG_COSIGNATURE_V1]) + self._signer.public_key)
        self._clock = clock or (lambda: int(time.time()))

    @classmethod
    def generate(cls, name: str, clock: Callable[[], int] | None = None) -> CosignatureSigner:
        return cls(name, Ed25519PrivateKey.generate(), clock)

    @property
    def name(self) -> str:
        return self._signer.name

    @property
    def key_id(self) -> int:
        return self._key_id

    @property
    def public_key(self) -> bytes:
        return self._signer.public_key

    @property
    def vkey(self) -> str:
        return cosignature_vkey(self.name, self.public_key)

    def verifier(self) -> CosignatureVerifier:
        return CosignatureVerifier(self.name, self.public_key)

    def sign(self, msg: bytes) -> bytes:
        ts = int(self._clock())
        return ts.to_bytes(8, "big") + self._signer.sign(cosignature_message(ts, msg))

    def __repr__(self) -> str:
        return f"CosignatureSigner(name={self.name!r}, key_id={self._key_id:08x})"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("CosignatureSigner objects cannot be pickled")


# --------------------------------------------------------------------------- witness


class WitnessError(ValueError):
    """The witness refuses to cosign (bad log signature, wrong origin, inconsistency...)."""


@dataclass(frozen=True, slots=True)
class WitnessState:
    """Last checkpoint a witness cosigned for a log (persist this)."""

    size: int
    root_hash: bytes

    def __post_init__(self) -> None:
        if self.size < 0 or len(self.root_hash) != HASH_SIZE:
            raise ValueError("invalid witness state")


class Witness:
    """Cosigns checkpoints of one log, only ever moving forward consistently.

    ``state`` is the last cosigned (size, root); ``None`` means nothing seen yet, in
    which case the first checkpoint is accepted on its log signature alone (trust on
    first use, like a tlog-witness whose recorded size is 0).
    """

    def __init__(
        self,
        signer: CosignatureSigner,
        log_verifier: NoteVerifier,
        origin: str,
        state: WitnessState | None = None,
    ) -> None:
        self._signer = signer
        self._log_verifier = log_verifier
        self._origin = origin
        self._state = state

    @property
    def origin(self) -> str:
        return self._origin

    @property
    def state(self) -> WitnessState | None:
        return self._state

    @property
    def verifier(self) -> CosignatureVerifier:
        return self._signer.verifier()

    def cosign(self, new_note: str | bytes, consistency_proof: Sequence[bytes]) -> str:
        """Verify ``new_note`` and its consistency with the last state, then cosign it.

        Returns the note with the witness's cosignature appended (other signatures are
        kept).  The state is only advanced after a successful cosignature.
        """
        try:
            cp = open_checkpoint(new_note, self._log_verifier, self._origin)
            rotation = key_rotation(cp)
            next_key = None
            if rotation is not None and rotation[0] == getattr(self._log_verifier, "vkey", None):
                # The log hands over to a new key: follow it once that key's signature is on the note too.
                next_key = Verifier.from_vkey(rotation[1])
                open_checkpoint(new_note, next_key, self._origin)
        except (NoteError, CheckpointError, KeyFormatError) as e:
            raise WitnessError(f"refusing to cosign: log checkpoint not acceptable: {e}") from e
        proof = [bytes(h) for h in consistency_proof]
        self._check_consistency(cp, proof)
        text, sigs = parse_note(new_note)
        out = sign_note(text, [self._signer], existing=sigs)
        self._state = WitnessState(cp.size, cp.root_hash)
        if next_key is not None:
            self._log_verifier = next_key
        return out

    @property
    def log_verifier(self) -> NoteVerifier:
        """The log key this witness expects next (it follows the log's key rotations)."""
        return self._log_verifier

    def _check_consistency(self, cp: Checkpoint, proof: list[bytes]) -> None:
        old_size, old_root = (self._state.size, self._state.root_hash) if self._state else (0, b"")
        try:
            check_extension(old_size, old_root, cp.size, cp.root_hash, proof)
        except ExtensionError as e:
            why = {"rollback": "rollback", "split_view": "split view"}.get(
                e.reason,
                f"checkpoint of size {cp.size} is not proven consistent with the last cosigned size {old_size}",
            )
            raise WitnessError(f"refusing to cosign: {why}: {e}") from e
