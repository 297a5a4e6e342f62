"""The auditor's trust root: what `sle verify` trusts before it reads a byte of the database.

* the study's admin key(s): the public keys a study's `Study.Created` must name (without them, each study's own
  creation event is its trust root, as recorded);
* the log's vkey(s): checkpoint signatures are checked with these (without one, with the vkey the ledger
  recorded: it then shows only that the database is self-consistent);
* checkpoints the auditor saved: the log must still extend each of them.

Everything here is stdlib and the ledger's pure core: reading a vkey or a CHECKPOINT file never imports the
database code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sle_events.audit.errors import UnusableInput
from sle_events.ledger.checkpoint import Checkpoint, CheckpointError, open_checkpoint
from sle_events.ledger.note import KeyFormatError, NoteError, Verifier, parse_note

__all__ = ["TrustRoot", "load_vkey", "read_checkpoint_notes", "check_auditor_input", "open_saved"]


@dataclass(frozen=True)
class TrustRoot:
    """What the auditor brings. Build it with :meth:`load`, which refuses unusable input (`UnusableInput`)."""

    admin_keys: frozenset[str] = frozenset()  # base64 Ed25519 public keys a study's creation must name
    vkey: Verifier | None = None  # the log's key the auditor holds
    checkpoints: tuple[tuple[str, str], ...] = ()  # (label, signed note) saved earlier
    since: tuple[str, str] | None = None  # the checkpoint up to which the record was verified before
    since_checkpoint: Checkpoint | None = field(default=None, compare=False)  # `since`, parsed (its signature
    # was checked with `vkey`, or is checked against the log's key rotations by the ledger check)

    @classmethod
    def load(cls, *, admin_keys: Any = (), vkey: Any = None, checkpoints: Any = None, since: Any = None) -> TrustRoot:
        verifier = load_vkey(vkey) if vkey is not None else None
        notes = read_checkpoint_notes(checkpoints)
        since_notes = read_checkpoint_notes(since)
        if len(since_notes) > 1:
            raise UnusableInput("--since takes one checkpoint")
        if (notes or since_notes) and verifier is None:
            raise UnusableInput("a saved checkpoint needs the log's vkey to be checked (--vkey)")
        if verifier is not None:
            _check_notes(notes + since_notes, verifier)
        since_cp = None
        if since_notes:
            label, note = since_notes[0]
            try:
                since_cp = Checkpoint.parse(parse_note(note)[0])
            except (NoteError, CheckpointError) as e:
                raise UnusableInput(f"--since {label} is not a checkpoint: {e}") from None
        return cls(
            frozenset(admin_keys or ()), verifier, tuple(notes), since_notes[0] if since_notes else None, since_cp
        )

    @property
    def has_log(self) -> bool:
        """The auditor expects this record to have a ledger."""
        return self.vkey is not None or bool(self.checkpoints) or self.since is not None


def load_vkey(vkey: str | os.PathLike[str] | Verifier) -> Verifier:
    """A verifier from a vkey string (``name+id+base64``) or a file holding one."""
    if isinstance(vkey, Verifier):
        return vkey
    text = str(vkey).strip()
    try:
        return Verifier.from_vkey(text)
    except KeyFormatError as direct:
        path = Path(text)
        if "\n" not in text and path.is_file():
            try:
                return Verifier.from_vkey(path.read_text(encoding="utf-8").strip())
            except (KeyFormatError, UnicodeDecodeError, OSError) as e:
                raise UnusableInput(f"{path} does not hold a log vkey: {e}") from None
        raise UnusableInput(
            f"not a log vkey (want <origin>+<8 hex>+<base64>) nor a file holding one: {direct}"
        ) from None


def read_checkpoint_notes(source: Any) -> list[tuple[str, str]]:
    """``[(label, note text)]`` from a note text, bytes, a path, or a list of those."""
    if source is None:
        return []
    if isinstance(source, (str, bytes, os.PathLike)):
        source = [source]
    out: list[tuple[str, str]] = []
    for i, item in enumerate(source):
        if isinstance(item, bytes):
            label, raw = f"checkpoint {i + 1}", item
        elif isinstance(item, str) and "\n" in item:
            label, raw = f"checkpoint {i + 1}", item.encode("utf-8")
        else:
            path = Path(item)
            label = str(path)
            try:
                raw = path.read_bytes()
            except OSError as e:
                raise UnusableInput(f"cannot read saved checkpoint {path}: {e.strerror}") from None
        try:
            out.append((label, raw.decode("utf-8")))
        except UnicodeDecodeError:
            raise UnusableInput(f"saved checkpoint {label} is not UTF-8 text") from None
    return out


def check_auditor_input(checkpoints_from: Any, vkey: Any) -> list[tuple[str, Checkpoint]]:
    """Check an auditor's vkey and saved checkpoints before any work; raise :class:`UnusableInput`.

    Saved checkpoints without a vkey are left to :func:`verify_ledger` (which may use the ledger's own).
    """
    verifier = load_vkey(vkey) if vkey is not None else None
    notes = read_checkpoint_notes(checkpoints_from)
    if verifier is None:
        return []
    return _check_notes(notes, verifier)


def _check_notes(notes: list[tuple[str, str]], verifier: Verifier) -> list[tuple[str, Checkpoint]]:
    # A checkpoint signed by another key of this origin may come from either side of a key rotation: only the
    # log's own rotation checkpoints can say, so `verify_ledger` checks it against them.
    return [
        (label, open_saved(label, note, [verifier]))
        for label, note in notes
        if not _signed_by_another_key_of(note, verifier)
    ]


def _signed_by_another_key_of(note: str, verifier: Verifier) -> bool:
    try:
        signatures = parse_note(note)[1]
    except NoteError:
        return False
    names = {(sig.name, sig.key_id) for sig in signatures}
    return (verifier.name, verifier.key_id) not in names and any(name == verifier.name for name, _ in names)


def open_saved(label: str, note: str, verifiers: list[Verifier]) -> Checkpoint:
    try:
        return open_checkpoint(note, verifiers, verifiers[0].name)
    except (NoteError, CheckpointError) as e:
        raise UnusableInput(
            f"saved checkpoint {label} does not verify with {' or '.join(v.vkey for v in verifiers)}: {e}"
        ) from None
