"""Exports through the HTTP API, with the manifest signed by the caller's own key (the server never holds one).

The server (`GET /v1/studies/{study}/exports/{kind}`, `build_export`) builds the export from its ledger's latest
signed checkpoint exactly as `sle export` does and answers, as JSON: the export's files (base64), the checkpoint
they were built from (its signed note, size, root, origin, vkey, last log position), the resolved scope, and the
event that registered the *caller's* key with its inclusion proof in that checkpoint. Everything in it is public
to a reader allowed to export; nothing is signed by the server.

The client (`download_export`) checks that each file is what the answer says (SHA-256, size), writes the files
(atomically: nothing under ``out`` unless all were written), and signs the manifest with its own key through
`manifest.write_manifest`: the same format as `sle export`, so `sle export verify` accepts it and proves the
files, the checkpoint (with the log's vkey) and the signer's registration. The signer vouches for what it
received; `verify --db` re-checks the checkpoint against the database.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sle_events.exports.manifest import (
    ExportCheckpoint,
    Exporter,
    ExportError,
    key_registration,
    write_manifest,
)
from sle_events.exports.scope import ExportScope

__all__ = ["EXPORT_KINDS", "ExportKind", "build_export", "download_export"]


@dataclass(frozen=True)
class ExportKind:
    folder: bool  # a folder of files (SDTM, FHIR) or one file (ODM, the PDF report)
    suffix: str  # the one file's suffix, as `sle export` names it
    build: Callable[[str, Path, ExportScope, ExportCheckpoint], Any]


def _odm(file_type: str) -> Callable[[str, Path, ExportScope, ExportCheckpoint], Any]:
    def build(url: str, out: Path, scope: ExportScope, checkpoint: ExportCheckpoint) -> Any:
        from sle_events.exports.odm import export_odm

        return export_odm(url, out, file_type=file_type, scope=scope, checkpoint=checkpoint)  # type: ignore[arg-type]

    return build


def _sdtm(url: str, out: Path, scope: ExportScope, checkpoint: ExportCheckpoint) -> Any:
    from sle_events.exports.sdtm import export_sdtm

    return export_sdtm(url, out, scope=scope, checkpoint=checkpoint)


def _fhir(url: str, out: Path, scope: ExportScope, checkpoint: ExportCheckpoint) -> Any:
    from sle_events.exports.fhir import export_fhir

    return export_fhir(url, out, scope=scope, checkpoint=checkpoint)


def _report(url: str, out: Path, scope: ExportScope, checkpoint: ExportCheckpoint) -> Any:
    from sle_events.exports.report import export_report

    return export_report(url, out, scope=scope, checkpoint=checkpoint)


# The manifest's `kind` -> how to build it (the names `sle export` signs into its manifests).
EXPORT_KINDS: dict[str, ExportKind] = {
    "odm-snapshot": ExportKind(False, ".xml", _odm("snapshot")),
    "odm-transactional": ExportKind(False, ".xml", _odm("transactional")),
    "sdtm": ExportKind(True, "", _sdtm),
    "fhir": ExportKind(True, "", _fhir),
    "report": ExportKind(False, ".pdf", _report),
}


def _checkpoint_doc(cp: ExportCheckpoint) -> dict[str, Any]:
    return {
        "note": cp.note,
        "origin": cp.origin,
        "size": cp.size,
        "root": base64.b64encode(cp.root).decode("ascii"),
        "position": cp.position,
        "vkey": cp.vkey,
    }


def _checkpoint_of(doc: dict[str, Any]) -> ExportCheckpoint:
    return ExportCheckpoint(
        note=str(doc["note"]),
        origin=str(doc["origin"]),
        size=int(doc["size"]),
        root=base64.b64decode(doc["root"], validate=True),
        position=int(doc["position"]),
        vkey=doc.get("vkey"),
    )


# ------------------------------------------------------------------------------------------------ server
def build_export(
    url: str, kind: str, scope: ExportScope, *, public_key: str, printed_name: str | None
) -> dict[str, Any]:
    """The export ``kind`` of ``scope`` (resolved) from the latest checkpoint, with the registration of the
    caller's ``public_key`` (see the module docstring). `ExportError` when it cannot be made (no checkpoint, the
    key's registration not yet covered); the builders' own refusals (SDTM limits...) pass through."""
    from sle_events.exports.manifest import latest_checkpoint

    how = EXPORT_KINDS[kind]
    if scope.study_id is None:
        raise ExportError("resolve the export's scope against the record first")
    checkpoint = latest_checkpoint(url)
    registration = key_registration(url, scope.study_id, public_key, checkpoint)  # before building anything
    with tempfile.TemporaryDirectory(prefix="sle-export-") as folder:
        out = Path(folder) / ("export" if how.folder else f"export{how.suffix}")
        how.build(url, out, scope, checkpoint)
        paths = sorted(p for p in out.rglob("*") if p.is_file()) if how.folder else [out]
        files = []
        for p in paths:
            data = p.read_bytes()
            name = p.relative_to(out).as_posix() if how.folder else p.name
            files.append(
                {
                    "name": name,
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "size": len(data),
                    "content": base64.b64encode(data).decode("ascii"),
                }
            )
    return {
        "kind": kind,
        "folder": how.folder,
        "scope": scope.to_dict(),
        "checkpoint": _checkpoint_doc(checkpoint),
        "exporter": {"public_key": public_key, "printed_name": printed_name, "registration": registration},
        "files": files,
    }


# ------------------------------------------------------------------------------------------------ client
def _safe_name(name: Any) -> str:
    parts = str(name).split("/")
    if not isinstance(name, str) or not name or any(p in ("", ".", "..") or "\\" in p for p in parts):
        raise ExportError(f"the server named a file {name!r}: not a plain relative path")
    return name


def download_export(
    client: Any,
    kind: str,
    out: Path,
    *,
    subject: str | None = None,
    site: str | None = None,
    recorded_from: str | None = None,
    recorded_to: str | None = None,
) -> Path:
    """Fetch the export ``kind`` through ``client`` (a `sle_events.client.Client`), write it to ``out`` (a new
    file; for SDTM and FHIR a new or empty folder) and sign its manifest with the client's key. Returns the
    manifest's path. `ExportError` (nothing written) when what came back does not add up; `ApiProblem` for a
    refusal of the server."""
    if kind not in EXPORT_KINDS:
        raise ExportError(f"unknown export {kind!r}: one of {', '.join(EXPORT_KINDS)}")
    how = EXPORT_KINDS[kind]
    out = Path(out)
    if how.folder and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out}: an export folder must be new or empty")
    if not how.folder and (out.is_dir() or not out.parent.is_dir()):
        raise ExportError(f"{out}: give a file name in an existing folder")
    doc = client.get(
        f"/exports/{kind}", subject=subject, site=site, recorded_from=recorded_from, recorded_to=recorded_to
    )
    signer = client.signer
    exporter = doc["exporter"]
    if doc.get("kind") != kind or exporter.get("public_key") != signer.public_key_b64:
        raise ExportError("the server's answer is for another export or another key")
    contents: list[tuple[str, bytes]] = []
    for f in doc["files"]:
        try:
            data = base64.b64decode(f["content"], validate=True)
        except (binascii.Error, ValueError, TypeError):
            raise ExportError(f"file {f.get('name')!r} is not base64") from None
        if hashlib.sha256(data).hexdigest() != f["sha256"] or len(data) != f["size"]:
            raise ExportError(f"file {f.get('name')!r} does not match its SHA-256 and size")
        contents.append((_safe_name(f["name"]) if how.folder else out.name, data))
    if not contents or (not how.folder and len(contents) != 1):
        raise ExportError(f"the server sent {len(contents)} files for a {kind} export")
    # Written beside `out` first, moved into place whole: never a half-written export.
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name, data in contents:
            target = staging / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        if how.folder:
            if out.exists():
                out.rmdir()  # new or empty, checked above
            staging.rename(out)
            files = [out / name for name, _ in contents]
        else:
            (staging / out.name).replace(out)
            files = [out]
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return write_manifest(
        out,
        files,
        kind=kind,
        scope=ExportScope.from_dict(doc["scope"]),
        exporter=Exporter(signer, exporter.get("printed_name"), exporter["registration"]),
        checkpoint=_checkpoint_of(doc["checkpoint"]),
    )
