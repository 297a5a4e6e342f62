"""The signed export manifest: what ties every export (ODM, SDTM, FHIR, PDF) to the signed, logged record.

Stable API:

* ``latest_checkpoint(url) -> ExportCheckpoint``: the ledger's newest signed checkpoint (the note, its size,
  root, origin, the log's vkey and ``position``, the log position of its last leaf). An export is built from
  exactly the events the checkpoint covers: ``study_events.id <= checkpoint.position``. No checkpoint, or a
  database without a ledger: ``ExportError`` (run ``sle ledger integrate`` and ``sle ledger checkpoint``).
* ``load_exporter(key_file, url, *, study_id, checkpoint) -> Exporter``: the exporter's private key (PEM, 0600),
  which must be registered in the study and active now, and whose registration event the checkpoint covers;
  the exporter carries the key's registration event and its inclusion proof. ``ExportError`` otherwise: check
  this BEFORE writing anything.
* ``write_manifest(out, files, *, kind, scope, exporter, checkpoint, created_at=None) -> Path``: writes the
  manifest beside the export and returns its path. ``out`` is the export (a file, or a folder of files);
  the manifest is ``<out>.manifest.json`` beside a file, ``<out>/export.manifest.json`` inside a folder.
  ``files`` must lie in the manifest's folder (or below it).
* ``verify_export(path, *, vkey, db_url=None) -> list[Finding]`` (``sle_events.audit.findings.Finding``; empty:
  verified): ``path`` is the manifest, the export file or the export folder. Unusable input (no manifest, a
  malformed vkey) is ``UnusableInput`` (exit 2).
* ``manifest_path(out) -> Path``, ``MANIFEST_FORMAT``, ``ExportError``.

The manifest (JSON; the signature covers ``MANIFEST_FORMAT + "\\n"`` followed by the RFC 8785 bytes of
``manifest``, so it can never pass for a signed event)::

    {"manifest": {"format", "kind", "created_at", "software": {"name", "version"}, "scope": {...},
                  "files": [{"name", "sha256", "size"}...],
                  "checkpoint": "<the signed checkpoint note>", "position": <last log position covered>,
                  "exporter": {"key", "public_key", "actor", "role", "printed_name",
                               "registration": {"event": "<base64 sealed bytes>", "index", "proof": [b64...]}}},
     "signature": "<base64 Ed25519>"}

What the checks prove. **Offline** (the export and the log's vkey): the files are the ones the manifest lists
(nothing changed, missing, or added beside them); the checkpoint is the log's (signature, origin); the key that
signed the manifest was registered in that log (its ``Study.KeyRegistered``/``KeyRotated``/``Created`` event,
whose bytes name this public key, actor and role, is a leaf of the checkpointed tree: the store accepted it only
from an admin, and ``sle verify`` re-checks that). Offline cannot show the key was not revoked since: revocations
are other events. **With** ``--db``: also that the key is still registered and active in the study's registry
(a revoked or rotated-out key is a finding), that this database's log is the one that signed the checkpoint
and still extends it (a consistency proof, checked), and that every event the checkpoint covers is still there.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sle_events.audit.errors import UnusableInput
from sle_events.audit.findings import Finding
from sle_events.exports.scope import ExportScope
from sle_events.signing.canonical import NotCanonicalisable, canonical_json, loads_strict
from sle_events.signing.keys import Signer, b64, key_id, public_key_from_b64, unb64, verify_signature

__all__ = [
    "MANIFEST_FORMAT",
    "MANIFEST_SUFFIX",
    "FOLDER_MANIFEST",
    "ExportError",
    "ExportCheckpoint",
    "Exporter",
    "latest_checkpoint",
    "load_exporter",
    "key_registration",
    "manifest_path",
    "write_manifest",
    "verify_export",
    "software_version",
]

MANIFEST_FORMAT = "sle-export-manifest/1"
MANIFEST_SUFFIX = ".manifest.json"
FOLDER_MANIFEST = "export.manifest.json"
_REGISTRATIONS = ("Study.Created", "Study.KeyRegistered", "Study.KeyRotated")


class ExportError(ValueError):
    """An export cannot be made as asked (no checkpoint, an unregistered key...): nothing was written."""


@dataclass(frozen=True)
class ExportCheckpoint:
    note: str  # the signed checkpoint note, verbatim
    origin: str
    size: int
    root: bytes
    position: int  # log position (study_events.id) of the last leaf covered; 0 for the empty tree
    vkey: str | None


@dataclass(frozen=True)
class Exporter:
    signer: Signer
    printed_name: str | None
    registration: dict[str, Any]  # {"event": b64 sealed bytes, "index": leaf index, "proof": [b64 hashes]}


def software_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sle-events")
    except PackageNotFoundError:
        return "unknown"


def manifest_path(out: Path) -> Path:
    out = Path(out)
    return out / FOLDER_MANIFEST if out.is_dir() else out.with_name(out.name + MANIFEST_SUFFIX)


# ------------------------------------------------------------------------------------------ the ledger side
def _ledger(url: str) -> Any:
    from sle_events.ledger.log import Ledger, LedgerError

    try:
        return Ledger(url, create=False)
    except LedgerError as e:
        raise ExportError(f"{e} (an export is built from a signed ledger checkpoint)") from None


def latest_checkpoint(url: str) -> ExportCheckpoint:
    """The newest signed checkpoint of the database's ledger (see the module docstring)."""
    import sqlalchemy as sa

    from sle_events.ledger.log import ledger_leaves

    ledger = _ledger(url)
    try:
        stored = ledger.latest_checkpoint()
        if stored is None:
            raise ExportError(
                "the ledger has no signed checkpoint yet: run `sle ledger integrate` then `sle ledger checkpoint`"
            )
        cp = stored.checkpoint
        position = 0
        if cp.size:
            with ledger.engine.connect() as conn:
                position = conn.execute(
                    sa.select(ledger_leaves.c.position).where(ledger_leaves.c.idx == cp.size - 1)
                ).scalar()
            if position is None:
                raise ExportError(f"leaf {cp.size - 1} of the checkpoint is missing from the ledger: run `sle verify`")
        return ExportCheckpoint(stored.note, cp.origin, cp.size, cp.root_hash, int(position), ledger.state().vkey)
    finally:
        ledger.close()


def load_exporter(key_file: Path, url: str, *, study_id: str | None, checkpoint: ExportCheckpoint) -> Exporter:
    """The exporter's key, checked against the study's registry and the checkpoint (module docstring);
    ``study_id`` is a resolved scope's."""
    from sle_events.store.record import StudyRecord

    try:
        probe = Signer.from_file(key_file, "exporter", "exporter")
    except (OSError, ValueError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ExportError(f"cannot use the exporter's key {key_file}: {why}") from None
    if study_id is None:
        raise ExportError("no study to check the exporter's key against: resolve the export's scope first")
    record = StudyRecord(url)
    try:
        entry = record.study(study_id).keys.get(probe.key_id)
    finally:
        record.close()
    if entry is None:
        raise ExportError(
            f"key {probe.key_id} ({key_file}) is not registered in the study: an admin registers it first"
        )
    if entry["status"] != "active":
        raise ExportError(f"key {probe.key_id} of {entry['actor']} is {entry['status']}: it may no longer sign exports")
    signer = Signer.from_file(key_file, entry["actor"], entry["role"])
    return Exporter(
        signer, entry.get("printed_name"), key_registration(url, study_id, signer.public_key_b64, checkpoint)
    )


def key_registration(url: str, study_id: str, public_key: str, checkpoint: ExportCheckpoint) -> dict[str, Any]:
    """The event that registered ``public_key`` in the study, with its inclusion proof in ``checkpoint``: what
    the manifest's ``exporter.registration`` holds. Public data only, so a server can hand it to the key's
    holder, who signs the manifest with their own key (`sle_events.exports.remote`)."""
    from sle_events.ledger.log import LedgerError
    from sle_events.signing.envelope import open_sealed

    ledger = _ledger(url)
    kid = key_id(unb64(public_key))
    try:
        position = _registration_position(ledger, study_id, public_key)
        if position is None:
            raise ExportError(f"the registration of key {kid} was not found in the record")
        try:
            proof = ledger.inclusion_proof(position, checkpoint=checkpoint.note)
        except LedgerError as e:
            raise ExportError(
                f"the registration of key {kid} is not covered by the ledger's latest checkpoint ({e}); "
                "run `sle ledger integrate` then `sle ledger checkpoint`"
            ) from None
    finally:
        ledger.close()
    assert proof.leaf_bytes is not None
    open_sealed(proof.leaf_bytes)  # the stored bytes are a sealed event (the ledger checked them against the leaf)
    return {"event": b64(proof.leaf_bytes), "index": proof.index, "proof": [b64(h) for h in proof.hashes]}


def _registration_position(ledger: Any, study_id: str, public_key: str) -> int | None:
    """Log position of the study event that brought ``public_key`` into the registry."""
    import sqlalchemy as sa

    from sle_events.domain.event_types import stored_topics
    from sle_events.signing.envelope import open_sealed

    ev = ledger.events
    topics = [t for name in _REGISTRATIONS for t in stored_topics(name)]
    with ledger.engine.connect() as conn:
        rows = conn.execute(sa.select(ev.c.id, ev.c.state).where(ev.c.topic.in_(topics)).order_by(ev.c.id))
        for pos, state in rows:
            env = open_sealed(bytes(state)).envelope
            p = env["payload"]
            if env["study"] == study_id and public_key in (p.get("public_key"), p.get("admin_public_key")):
                return int(pos)
    return None


# ------------------------------------------------------------------------------------------------- writing
def _sha256_file(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _signed_bytes(body: dict[str, Any]) -> bytes:
    return MANIFEST_FORMAT.encode() + b"\n" + canonical_json(body)


def write_manifest(
    out: Path,
    files: Sequence[Path],
    *,
    kind: str,
    scope: ExportScope,
    exporter: Exporter,
    checkpoint: ExportCheckpoint,
    created_at: datetime | None = None,
) -> Path:
    """Write the signed manifest beside the export ``out`` (module docstring); returns its path."""
    path = manifest_path(out)
    folder = path.parent.resolve()
    entries: list[dict[str, Any]] = []
    for f in files:
        full = Path(f).resolve()
        if not full.is_relative_to(folder):
            raise ExportError(f"{f} is not in the export's folder {folder}")
        if full == path.resolve():
            continue
        digest, size = _sha256_file(full)
        entries.append({"name": full.relative_to(folder).as_posix(), "sha256": digest, "size": size})
    if not entries:
        raise ExportError("an export manifest needs at least one file")
    signer = exporter.signer
    body = {
        "format": MANIFEST_FORMAT,
        "kind": kind,
        "created_at": (created_at or datetime.now(UTC)).isoformat(),
        "software": {"name": "sle-events", "version": software_version()},
        "scope": scope.to_dict(),
        "files": sorted(entries, key=lambda e: e["name"]),
        "checkpoint": checkpoint.note,
        "position": checkpoint.position,
        "exporter": {
            "key": signer.key_id,
            "public_key": signer.public_key_b64,
            "actor": signer.actor,
            "role": signer.role,
            "printed_name": exporter.printed_name,
            "registration": exporter.registration,
        },
    }
    doc = {"manifest": body, "signature": b64(signer.sign(_signed_bytes(body)))}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)  # never a half-written manifest
    return path


# ----------------------------------------------------------------------------------------------- verifying
def _finding(kind: str, detail: str, where: str | None = None, position: int | None = None) -> Finding:
    return Finding(where, None, kind, detail, position)


def _locate(path: Path) -> tuple[Path, bool]:
    """(manifest file, whether the export is a folder)."""
    path = Path(path)
    if path.is_dir():
        return path / FOLDER_MANIFEST, True
    if path.name.endswith(MANIFEST_SUFFIX) or path.name == FOLDER_MANIFEST:
        return path, path.name == FOLDER_MANIFEST
    return manifest_path(path), False


def _read_manifest(mpath: Path) -> tuple[dict[str, Any] | None, bytes | None, list[Finding]]:
    if not mpath.is_file():
        raise UnusableInput(f"no export manifest at {mpath}")
    try:
        doc = loads_strict(mpath.read_bytes())
        body, sig = doc["manifest"], unb64(doc["signature"])
        if not isinstance(body, dict) or body.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"not a {MANIFEST_FORMAT} document")
        for field in ("files", "checkpoint", "exporter", "scope", "kind"):
            if field not in body:
                raise ValueError(f"no {field!r}")
        return body, sig, []
    except (ValueError, KeyError, TypeError, NotCanonicalisable, UnicodeDecodeError) as e:
        return None, None, [_finding("manifest_malformed", f"{mpath.name}: {e}", mpath.name)]


def verify_export(path: Path, *, vkey: Any, db_url: str | None = None) -> list[Finding]:
    """Check an export against its manifest, the manifest against the log (module docstring)."""
    from sle_events.audit.trust import load_vkey

    verifier = load_vkey(vkey)  # UnusableInput if malformed
    mpath, is_folder = _locate(Path(path))
    body, signature, findings = _read_manifest(mpath)
    if body is None or signature is None:
        return findings
    findings += _check_files(body, mpath, is_folder)
    cp, cp_findings = _check_checkpoint(body, verifier)
    findings += cp_findings
    key_findings = _check_exporter(body, signature, cp)
    findings += key_findings
    if db_url is not None:
        findings += _check_against_database(body, cp, db_url, verifier)
    return findings


def _check_files(body: dict[str, Any], mpath: Path, is_folder: bool) -> list[Finding]:
    findings = []
    folder = mpath.parent
    listed: set[str] = set()
    for entry in body["files"]:
        name = str(entry.get("name", ""))
        listed.add(name)
        full = folder / name
        if ".." in Path(name).parts or Path(name).is_absolute():
            findings.append(_finding("manifest_malformed", f"file name {name!r} leaves the export's folder", name))
        elif not full.is_file():
            findings.append(_finding("file_missing", f"{name} is listed in the manifest but not there", name))
        else:
            digest, size = _sha256_file(full)
            if digest != entry.get("sha256") or size != entry.get("size"):
                findings.append(
                    _finding(
                        "file_altered",
                        f"{name}: {size} bytes with SHA-256 {digest[:16]}…, the manifest lists "
                        f"{entry.get('size')} bytes with {str(entry.get('sha256'))[:16]}…",
                        name,
                    )
                )
    # Files added beside the export: everything in an export folder, or a single file's namesakes
    # (`odm.xml.extra`), must be listed.
    if is_folder:
        present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    else:
        stems = {Path(n).name for n in listed}
        present = {p.name for p in folder.iterdir() if p.is_file() and any(p.name.startswith(s) for s in stems)}
    for name in sorted(present - listed - {mpath.name, mpath.name + ".tmp"}):
        findings.append(_finding("file_unlisted", f"{name} is beside the export but not in its manifest", name))
    return findings


def _check_checkpoint(body: dict[str, Any], verifier: Any) -> tuple[Any, list[Finding]]:
    from sle_events.ledger.checkpoint import CheckpointError, open_checkpoint
    from sle_events.ledger.note import InvalidSignatureError, NoteError, UnverifiedNoteError

    try:
        return open_checkpoint(body["checkpoint"], verifier, verifier.name), []
    except (InvalidSignatureError, UnverifiedNoteError) as e:
        why = "its signature does not verify" if isinstance(e, InvalidSignatureError) else "it is not signed"
        return None, [_finding("checkpoint_bad_signature", f"the manifest's checkpoint: {why} with {verifier.vkey}")]
    except (NoteError, CheckpointError, TypeError) as e:
        return None, [_finding("checkpoint_other_log", f"the manifest's checkpoint is not one of {verifier.name}: {e}")]


def _check_exporter(body: dict[str, Any], signature: bytes, cp: Any) -> list[Finding]:
    """The manifest's signature by the key it names, and that key's registration in the checkpointed log."""
    from sle_events.ledger.merkle import ProofError, leaf_hash, verify_inclusion
    from sle_events.signing.envelope import MalformedEnvelope, open_sealed

    ex = body["exporter"]
    try:
        public = public_key_from_b64(ex["public_key"])
        raw = unb64(ex["public_key"])
    except (KeyError, ValueError, TypeError) as e:
        return [_finding("manifest_malformed", f"the exporter's public key: {e}")]
    kid = key_id(raw)
    if ex.get("key") != kid:
        return [
            _finding(
                "manifest_malformed", f"the exporter's key id {ex.get('key')} is not that of its public key ({kid})"
            )
        ]
    try:
        signed = _signed_bytes(body)
    except NotCanonicalisable as e:
        return [_finding("manifest_malformed", str(e))]
    findings = []
    if not verify_signature(public, signature, signed):
        findings.append(
            _finding(
                "manifest_bad_signature",
                f"the manifest's signature does not verify with key {kid}: it was edited or signed by another key",
            )
        )
    reg = ex.get("registration") or {}
    try:
        leaf = unb64(reg["event"])
        env = open_sealed(leaf).envelope
        hashes = [unb64(h) for h in reg["proof"]]
        index = int(reg["index"])
    except (KeyError, ValueError, TypeError, MalformedEnvelope) as e:
        return [
            *findings,
            _finding("key_unregistered", f"key {kid}: the manifest carries no usable registration event ({e})"),
        ]
    p = env["payload"]
    names_key = env["type"].rsplit(".", 1)[-1] in ("Created", "KeyRegistered", "KeyRotated") and raw == _raw(
        p.get("public_key") or p.get("admin_public_key")
    )
    same_holder = env["type"].endswith("KeyRotated") or (
        (p.get("actor") or p.get("admin_actor")) == ex.get("actor")
        and ex.get("role") == (p.get("role") or ("admin" if env["type"].endswith("Created") else None))
    )
    study_id = (body.get("scope") or {}).get("study_id")
    if not names_key or not same_holder or (study_id is not None and env["study"] != study_id):
        findings.append(
            _finding(
                "key_unregistered",
                f"key {kid}: the event the manifest carries does not register it to "
                f"{ex.get('actor')} as {ex.get('role')} in this study",
                env.get("stream"),
            )
        )
    elif cp is not None:
        try:
            if index >= cp.size:
                raise ProofError(f"leaf {index} is beyond the checkpoint's {cp.size} leaves")
            verify_inclusion(leaf_hash(leaf), index, cp.size, hashes, cp.root_hash)
        except (ProofError, ValueError) as e:
            findings.append(
                _finding(
                    "key_unregistered",
                    f"key {kid}: its registration event is not proven in the checkpointed log ({e})",
                    env.get("stream"),
                )
            )
    return findings


def _raw(text: Any) -> bytes | None:
    try:
        return base64.b64decode(str(text), validate=True)
    except ValueError:
        return None


def _check_against_database(body: dict[str, Any], cp: Any, url: str, verifier: Any) -> list[Finding]:
    from sle_events.ledger.log import LedgerError
    from sle_events.store.record import StudyRecord

    findings = []
    ex = body["exporter"]
    study_id = (body.get("scope") or {}).get("study_id")
    try:
        ledger = _ledger(url)
    except ExportError as e:
        raise UnusableInput(str(e)) from None
    try:
        state = ledger.state()
        if state.vkey is not None and state.vkey != verifier.vkey:
            findings.append(
                _finding("checkpoint_other_log", f"this database's log is signed by {state.vkey}, not {verifier.vkey}")
            )
        elif cp is not None:
            try:
                ledger.prove_consistency(body["checkpoint"])
            except LedgerError as e:
                findings.append(
                    _finding(
                        "log_does_not_extend_checkpoint",
                        f"the database's log does not extend the manifest's checkpoint (size {cp.size}): {e}",
                    )
                )
    finally:
        ledger.close()
    if study_id is not None:
        record = StudyRecord(url)
        try:
            entry = record.study(study_id).keys.get(ex.get("key"))
        except Exception as e:  # an unknown study: the manifest names another record
            entry = None
            findings.append(
                _finding("key_unregistered", f"study {study_id} is not in this database: {type(e).__name__}")
            )
        finally:
            record.close()
        if entry is None:
            findings.append(_finding("key_unregistered", f"key {ex.get('key')} is not in the study's registry"))
        elif entry["status"] != "active":
            findings.append(
                _finding(
                    f"key_{entry['status']}",
                    f"key {ex.get('key')} of {entry['actor']} is {entry['status']} in the study's registry",
                )
            )
    return findings
