"""C2SP transparency-log checkpoints (c2sp.org/tlog-checkpoint).

The note text (body) is::

    <origin>\\n
    <tree size, ASCII decimal, no leading zeros except "0">\\n
    <base64 RFC 6962 root hash (32 bytes)>\\n
    [<non-empty extension line>\\n ...]

:func:`open_checkpoint` verifies the note signature first, then parses the *signed*
text and checks the origin line; size and root are only ever taken from the signed
text.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from .merkle import HASH_SIZE
from .note import NoteSigner, NoteVerifier, b64decode_strict, open_note, sign_note

__all__ = [
    "MAX_TREE_SIZE",
    "CheckpointError",
    "Checkpoint",
    "sign_checkpoint",
    "open_checkpoint",
]

MAX_TREE_SIZE = (1 << 63) - 1
"""Largest accepted tree size (int64, as golang.org/x/mod/sumdb/tlog and SQL BIGINT)."""

_SIZE_RE = re.compile(r"0|[1-9][0-9]*")


class CheckpointError(ValueError):
    """A checkpoint body is malformed, or its origin is not the expected one."""


def _check_line(what: str, line: str) -> None:
    if not isinstance(line, str):
        raise CheckpointError(f"{what} must be a str")
    if line == "":
        raise CheckpointError(f"{what} must be non-empty")
    for c in line:
        if c < " ":
            raise CheckpointError(f"{what} contains control character U+{ord(c):04X}")


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A log checkpoint: origin, tree size, root hash and optional extension lines."""

    origin: str
    size: int
    root_hash: bytes
    extensions: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        _check_line("origin", self.origin)
        if not isinstance(self.size, int) or isinstance(self.size, bool):
            raise CheckpointError("tree size must be an int")
        if not 0 <= self.size <= MAX_TREE_SIZE:
            raise CheckpointError(f"tree size {self.size} out of range")
        if not isinstance(self.root_hash, bytes) or len(self.root_hash) != HASH_SIZE:
            raise CheckpointError(f"root hash must be {HASH_SIZE} bytes")
        object.__setattr__(self, "extensions", tuple(self.extensions))
        for line in self.extensions:
            _check_line("extension line", line)

    def format(self) -> str:
        """The checkpoint note text (ends in a newline)."""
        root = base64.b64encode(self.root_hash).decode("ascii")
        lines = [self.origin, str(self.size), root, *self.extensions]
        return "".join(line + "\n" for line in lines)

    @classmethod
    def parse(cls, text: str | bytes) -> Checkpoint:
        """Parse a checkpoint body (the note text, not the signed note)."""
        if isinstance(text, (bytes, bytearray)):
            try:
                text = bytes(text).decode("utf-8")
            except UnicodeDecodeError:
                raise CheckpointError("checkpoint is not valid UTF-8") from None
        if not isinstance(text, str):
            raise TypeError("checkpoint text must be str or bytes")
        if not text.endswith("\n"):
            raise CheckpointError("checkpoint must end in a newline")
        lines = text[:-1].split("\n")
        if len(lines) < 3:
            raise CheckpointError("checkpoint needs an origin, a tree size and a root hash line")
        origin, size_s, root_s, *extensions = lines
        if origin == "":
            raise CheckpointError("checkpoint origin is empty")
        if not _SIZE_RE.fullmatch(size_s):
            raise CheckpointError(f"checkpoint tree size {size_s!r} is not a canonical decimal")
        if len(size_s) > 19 or int(size_s) > MAX_TREE_SIZE:
            raise CheckpointError("checkpoint tree size is too large")
        try:
            root = b64decode_strict(root_s)
        except ValueError:
            raise CheckpointError("checkpoint root hash is not valid base64") from None
        if len(root) != HASH_SIZE:
            raise CheckpointError(f"checkpoint root hash has {len(root)} bytes, want {HASH_SIZE}")
        for line in extensions:
            if line == "":
                raise CheckpointError("checkpoint extension lines must be non-empty")
        return cls(origin, int(size_s), root, tuple(extensions))


def sign_checkpoint(cp: Checkpoint, signer: NoteSigner) -> str:
    """Return ``cp`` as a signed note, signed by ``signer``."""
    return sign_note(cp.format(), [signer])


def open_checkpoint(
    note: str | bytes,
    verifier: NoteVerifier | Iterable[NoteVerifier],
    origin: str,
) -> Checkpoint:
    """Verify the note signature(s), parse the signed text and check its origin line.

    Raises :class:`~sle_events.ledger.note.NoteError` for signature problems and
    :class:`CheckpointError` for a malformed body or an unexpected origin.
    """
    text, _sigs = open_note(note, verifier)
    cp = Checkpoint.parse(text)
    if cp.origin != origin:
        raise CheckpointError(f"checkpoint origin {cp.origin!r} is not the expected {origin!r}")
    return cp
