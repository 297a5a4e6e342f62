"""Offline-verifiable log proofs (c2sp.org/tlog-proof@v1) and consistency proof files.

A tlog-proof is::

    c2sp.org/tlog-proof@v1
    [extra <base64 opaque data>]
    index <decimal, no leading zeros>
    <base64 hash>          (zero or more: inclusion proof, leaf's sibling first)
    <empty line>
    <signed checkpoint note, verbatim>

The extra data is NOT authenticated; never trust it implicitly.

A consistency proof file is simply one base64 hash per line (each line ends in a
newline; the empty proof is the empty file).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from .checkpoint import Checkpoint, open_checkpoint
from .merkle import HASH_SIZE, leaf_hash, verify_inclusion
from .note import NoteVerifier, Verifier, b64decode_strict

__all__ = [
    "TLOG_PROOF_HEADER",
    "ProofFileError",
    "TlogProof",
    "VerifiedProof",
    "verify_proof_file",
    "format_consistency_proof",
    "parse_consistency_proof",
]

TLOG_PROOF_HEADER = "c2sp.org/tlog-proof@v1"
_INDEX_RE = re.compile(r"0|[1-9][0-9]*")
_MAX_UINT64 = (1 << 64) - 1


class ProofFileError(ValueError):
    """A proof file is malformed."""


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _as_text(data: str | bytes) -> str:
    if isinstance(data, (bytes, bytearray, memoryview)):
        try:
            return bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            raise ProofFileError("proof is not valid UTF-8") from None
    if not isinstance(data, str):
        raise TypeError("proof must be str or bytes")
    return data


def _hash_line(line: str, what: str) -> bytes:
    try:
        h = b64decode_strict(line)
    except ValueError:
        raise ProofFileError(f"{what} is not valid base64") from None
    if len(h) != HASH_SIZE:
        raise ProofFileError(f"{what} has {len(h)} bytes, want {HASH_SIZE}")
    return h


@dataclass(frozen=True, slots=True)
class TlogProof:
    """A parsed ``c2sp.org/tlog-proof@v1``; ``checkpoint`` is the signed note verbatim."""

    index: int
    hashes: tuple[bytes, ...]
    checkpoint: str
    extra: bytes | None = field(default=None)

    def __post_init__(self) -> None:
        if not isinstance(self.index, int) or not 0 <= self.index <= _MAX_UINT64:
            raise ProofFileError(f"index {self.index!r} is not a uint64")
        object.__setattr__(self, "hashes", tuple(bytes(h) for h in self.hashes))
        for h in self.hashes:
            if len(h) != HASH_SIZE:
                raise ProofFileError(f"proof hash has {len(h)} bytes, want {HASH_SIZE}")
        if not isinstance(self.checkpoint, str) or not self.checkpoint.endswith("\n"):
            raise ProofFileError("checkpoint must be a non-empty text ending in a newline")
        if self.extra is not None:
            object.__setattr__(self, "extra", bytes(self.extra))

    def format(self) -> str:
        out = [TLOG_PROOF_HEADER + "\n"]
        if self.extra is not None:
            out.append(f"extra {_b64(self.extra)}\n")
        out.append(f"index {self.index}\n")
        out.extend(_b64(h) + "\n" for h in self.hashes)
        out.append("\n")
        out.append(self.checkpoint)
        return "".join(out)

    @classmethod
    def parse(cls, data: str | bytes) -> TlogProof:
        """Parse structure only (no signature or inclusion check)."""
        text = _as_text(data)
        sep = text.find("\n\n")
        if sep < 0:
            raise ProofFileError("proof has no empty line before the checkpoint")
        head, checkpoint = text[:sep].split("\n"), text[sep + 2 :]
        if head[0] != TLOG_PROOF_HEADER:
            raise ProofFileError(f"proof does not start with {TLOG_PROOF_HEADER!r}")
        pos = 1
        extra: bytes | None = None
        if pos < len(head) and head[pos].startswith("extra "):
            try:
                extra = b64decode_strict(head[pos][len("extra ") :])
            except ValueError:
                raise ProofFileError("proof extra data is not valid base64") from None
            pos += 1
        if pos >= len(head) or not head[pos].startswith("index "):
            raise ProofFileError("proof is missing the index line")
        index_s = head[pos][len("index ") :]
        if not _INDEX_RE.fullmatch(index_s) or len(index_s) > 20 or int(index_s) > _MAX_UINT64:
            raise ProofFileError(f"proof index {index_s!r} is not a canonical uint64")
        hashes = tuple(_hash_line(line, "proof hash") for line in head[pos + 1 :])
        if checkpoint == "" or not checkpoint.endswith("\n"):
            raise ProofFileError("proof checkpoint is missing or does not end in a newline")
        return cls(int(index_s), hashes, checkpoint, extra)


@dataclass(frozen=True, slots=True)
class VerifiedProof:
    """Result of :func:`verify_proof_file`: the verified checkpoint and leaf index."""

    checkpoint: Checkpoint
    index: int
    extra: bytes | None  # unauthenticated


def verify_proof_file(
    text: str | bytes,
    leaf_bytes: bytes,
    vkey: str | NoteVerifier,
    origin: str | None = None,
) -> VerifiedProof:
    """Verify a tlog-proof for ``leaf_bytes`` (the raw leaf, hashed here with 0x00 prefix).

    Checks the checkpoint signature with ``vkey`` (a vkey string or a verifier), checks
    the origin line (``origin`` defaults to the log key's name), then verifies the
    inclusion proof against the signed size and root.  Raises ``ValueError`` subclasses
    (``ProofFileError``, ``NoteError``, ``CheckpointError``, ``ProofError``) on failure.
    """
    proof = TlogProof.parse(text)
    verifier = Verifier.from_vkey(vkey) if isinstance(vkey, str) else vkey
    expected_origin = verifier.name if origin is None else origin
    cp = open_checkpoint(proof.checkpoint, verifier, expected_origin)
    verify_inclusion(leaf_hash(leaf_bytes), proof.index, cp.size, list(proof.hashes), cp.root_hash)
    return VerifiedProof(cp, proof.index, proof.extra)


def format_consistency_proof(hashes: Sequence[bytes]) -> str:
    """One base64 hash per line, each ending in a newline."""
    out = []
    for h in hashes:
        if len(h) != HASH_SIZE:
            raise ProofFileError(f"proof hash has {len(h)} bytes, want {HASH_SIZE}")
        out.append(_b64(bytes(h)) + "\n")
    return "".join(out)


def parse_consistency_proof(data: str | bytes) -> list[bytes]:
    """Parse :func:`format_consistency_proof` output (empty text = empty proof)."""
    text = _as_text(data)
    if text == "":
        return []
    if not text.endswith("\n"):
        raise ProofFileError("consistency proof must end in a newline")
    return [_hash_line(line, f"consistency proof hash {i}") for i, line in enumerate(text[:-1].split("\n"))]
