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

from sle_events.picklable import Picklable  # stdlib only, like this core

from .merkle import HASH_SIZE, ProofError, RootMismatchError, verify_consistency
from .note import NoteError, NoteSigner, NoteVerifier, Verifier, b64decode_strict, open_note, parse_note, sign_note

__all__ = [
    "MAX_TREE_SIZE",
    "CheckpointError",
    "Checkpoint",
    "sign_checkpoint",
    "open_checkpoint",
    "KEY_ROTATION",
    "key_rotation",
    "KeyChain",
    "follow_key_rotations",
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


def sign_checkpoint(cp: Checkpoint, signer: NoteSigner, *also: NoteSigner) -> str:
    """Return ``cp`` as a signed note, signed by ``signer`` (and ``also``)."""
    return sign_note(cp.format(), [signer, *also])


KEY_ROTATION = "sle-log-key-rotation"
"""Extension line of the checkpoint that hands a log to a new key: ``sle-log-key-rotation <old vkey> <new vkey>``,
in a note signed by both keys (the old one vouches for the new, the new one shows it is held)."""


def key_rotation(cp: Checkpoint) -> tuple[str, str] | None:
    """(old vkey, new vkey) if ``cp`` is a key rotation checkpoint."""
    for line in cp.extensions:
        word, *rest = line.split(" ")
        if word == KEY_ROTATION:
            if len(rest) != 2 or not all(rest) or rest[0] == rest[1]:
                raise CheckpointError(f"malformed key rotation line {line!r}")
            return rest[0], rest[1]
    return None


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


@dataclass
class KeyChain:
    """The log keys a sequence of checkpoint notes was signed with, as seen from one trusted key (the anchor).

    ``keys``: vkeys in the order the log used them. ``linked``: those linked to the anchor by rotation
    checkpoints signed by both keys (the anchor included). ``signer``: for each note, the vkey that must have
    signed it, or None where that key is not linked. ``problems``: (note index, what is wrong) for rotations
    that do not hold."""

    keys: list[str]
    linked: list[str]
    signer: list[str | None]
    problems: list[tuple[int, str]]


def follow_key_rotations(notes: list[str], anchor: str) -> KeyChain:
    """Follow the key rotations in ``notes`` (in the order they were issued) outwards from the ``anchor``
    vkey: each rotation checkpoint must carry good signatures by both its old and its new key, so trust passes
    through it; it never passes through one that does not."""
    rotations: list[tuple[int, str, str]] = []
    problems: list[tuple[int, str]] = []
    for i, note in enumerate(notes):
        try:
            rotation = key_rotation(Checkpoint.parse(parse_note(note)[0]))
        except (NoteError, CheckpointError):
            continue  # a malformed note is reported where the notes are checked
        if rotation is None:
            continue
        if rotations and rotation[0] != rotations[-1][2]:
            problems.append((i, f"rotates from {rotation[0]}, but the log's key by then was {rotations[-1][2]}"))
            continue
        rotations.append((i, *rotation))
    keys = [rotations[0][1], *(new for _, _, new in rotations)] if rotations else [anchor]
    period, j = [], 0  # the index in `keys` of the key in effect for each note
    for i in range(len(notes)):
        period.append(j)
        if j < len(rotations) and rotations[j][0] == i:
            j += 1
    linked = set()
    if anchor in keys:
        m = keys.index(anchor)
        linked.add(m)
        held = [_signed_by_both(notes[i], old, new) for i, old, new in rotations]
        for k in range(m, len(rotations)):  # forwards: rotation k hands keys[k] over to keys[k + 1]
            if not held[k]:
                problems.append((rotations[k][0], f"the rotation to {keys[k + 1]} is not signed by both keys"))
                break
            linked.add(k + 1)
        for k in range(m - 1, -1, -1):  # backwards from the anchor
            if not held[k]:
                problems.append((rotations[k][0], f"the rotation from {keys[k]} is not signed by both keys"))
                break
            linked.add(k)
    return KeyChain(
        keys, [keys[k] for k in sorted(linked)], [keys[p] if p in linked else None for p in period], problems
    )


def _signed_by_both(note: str, old: str, new: str) -> bool:
    try:
        for vkey in (old, new):
            open_note(note, Verifier.from_vkey(vkey))
    except (NoteError, ValueError):
        return False
    return True


class ExtensionError(Picklable, CheckpointError):
    """A newer tree is not proven to extend an older one. ``reason``: ``rollback`` (the newer tree is smaller),
    ``split_view`` (same size, other root), ``rewritten`` (the proof leads elsewhere: history changed) or
    ``bad_proof`` (the proof itself does not fit the sizes)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def check_extension(old_size: int, old_root: bytes, new_size: int, new_root: bytes, proof: Iterable[bytes]) -> None:
    """The one checkpoint-extension check: raise :class:`ExtensionError` unless the tree (``new_size``,
    ``new_root``) is append-only over (``old_size``, ``old_root``) by the RFC 9162 consistency ``proof``."""
    proof = [bytes(h) for h in proof]
    if old_size == 0:
        if proof:
            raise ExtensionError("bad_proof", "expected an empty proof from the empty tree")
        return
    if new_size < old_size:
        raise ExtensionError(
            "rollback",
            f"the newer tree (size {new_size}) is smaller than the older one ({old_size}): the log was rolled back",
        )
    if new_size == old_size and new_root != old_root:
        raise ExtensionError("split_view", f"two different roots for size {new_size} (split view)")
    try:
        verify_consistency(old_size, new_size, proof, old_root, new_root)
    except RootMismatchError as e:
        b64 = base64.b64encode
        raise ExtensionError(
            "rewritten",
            f"the tree of size {new_size} is NOT an extension of the old checkpoint "
            f"(size {old_size}): the proof leads to root {b64(e.calculated).decode()}, expected "
            f"{b64(e.expected).decode()}; history was rewritten, or the proof is not for these "
            "trees",
        ) from None
    except ProofError as e:
        raise ExtensionError(
            "bad_proof", f"the consistency proof from size {old_size} to {new_size} does not verify: {e}"
        ) from None
