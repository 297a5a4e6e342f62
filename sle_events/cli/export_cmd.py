"""`sle export ...`: the trial in the formats monitors' and sponsors' tools read, each export beside a signed
manifest that ties it to a ledger checkpoint (`sle_events.exports.manifest`).

Every export command takes the shared options below and goes through `prepare_export` (checks everything:
the database, the scope, the exporter's key, the checkpoint; exit 2 and nothing written on any problem) and
`finish_export` (writes the manifest, prints what was written). Exit codes: 0 written / verified, 1 findings,
2 bad usage or unusable input.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from sle_events.cli.common import (
    DbOption,
    JsonOption,
    err,
    existing_database,
    fail,
    new_app,
    out,
    parse_instant,
    print_json,
    progress,
    table,
)

__all__ = [
    "DbOption",
    "export_app",
    "ExportContext",
    "prepare_export",
    "finish_export",
    "KeyOption",
    "SubjectOption",
    "SiteOption",
    "FromOption",
    "ToOption",
]

export_app = new_app(
    no_args_is_help=True,
    help="Exports (ODM, SDTM, FHIR, PDF), each with a signed manifest tying it to a ledger checkpoint.",
)

# The options every export command shares.
KeyOption = typer.Option(
    ..., "--key", metavar="FILE", help="your private key (PEM, 0600), registered in the study: it signs the manifest"
)
SubjectOption = typer.Option(None, "--subject", metavar="ID", help="one subject (id or screening number)")
SiteOption = typer.Option(None, "--site", metavar="ID", help="one site's subjects")
FromOption = typer.Option(
    None, "--from", metavar="TIME", help="events recorded at or after TIME (ISO 8601 with offset)"
)
ToOption = typer.Option(None, "--to", metavar="TIME", help="events recorded before TIME (ISO 8601 with offset)")


@dataclass(frozen=True)
class ExportContext:
    """Everything an export command needs, checked before anything is written."""

    url: str
    scope: Any  # ExportScope, resolved
    checkpoint: Any  # ExportCheckpoint
    exporter: Any  # Exporter
    out: Path


def prepare_export(
    db: str | None,
    key: Path,
    out_path: Path,
    subject: str | None = None,
    site: str | None = None,
    recorded_from: str | None = None,
    recorded_to: str | None = None,
    *,
    folder: bool = False,
) -> ExportContext:
    """Check the database, scope, key and checkpoint; exit 2 naming the problem (nothing written)."""
    from sle_events.exports.manifest import ExportError, latest_checkpoint, load_exporter
    from sle_events.exports.scope import ExportScope, ExportScopeError

    url = existing_database(db)
    if folder:
        if out_path.exists() and (not out_path.is_dir() or any(out_path.iterdir())):
            fail(f"--out {out_path}: an export folder must be new or empty")
    else:
        if out_path.is_dir():
            fail(f"--out {out_path} is a folder; give a file name")
        if not out_path.parent.is_dir():
            fail(f"--out {out_path}: the folder {out_path.parent} does not exist")
    try:
        scope = ExportScope(
            subject=subject,
            site=site,
            recorded_from=parse_instant(recorded_from, "--from"),
            recorded_to=parse_instant(recorded_to, "--to"),
        ).resolve(url)
        checkpoint = latest_checkpoint(url)
        exporter = load_exporter(key, url, study_id=scope.study_id, checkpoint=checkpoint)
    except (ExportScopeError, ExportError) as e:
        fail(str(e))
    return ExportContext(url, scope, checkpoint, exporter, out_path)


def run_exporter(label: str, export: Any, ctx: ExportContext, **options: Any) -> Any:
    """One exporter over the prepared scope and checkpoint, its subjects counted on a progress bar."""
    with progress(label) as bar:
        task = bar.add_task("subjects", total=None)
        return export(
            ctx.url,
            ctx.out,
            scope=ctx.scope,
            checkpoint=ctx.checkpoint,
            on_progress=lambda d, t: bar.update(task, completed=d, total=t),
            **options,
        )


def finish_export(ctx: ExportContext, files: Sequence[Path], kind: str) -> Path:
    """Sign the manifest beside the export and say what was written."""
    from sle_events.exports.manifest import write_manifest

    manifest = write_manifest(
        ctx.out, files, kind=kind, scope=ctx.scope, exporter=ctx.exporter, checkpoint=ctx.checkpoint
    )
    err.print(
        escape(
            f"{kind}: {', '.join(str(f) for f in files)} ({ctx.scope.describe()}; ledger checkpoint of "
            f"{ctx.checkpoint.size} events); manifest {manifest} signed by key {ctx.exporter.signer.key_id} "
            f"({ctx.exporter.signer.actor})"
        )
    )
    return manifest


@export_app.command("verify")
def verify(
    path: Path = typer.Argument(..., metavar="PATH", help="the export (file or folder) or its manifest"),
    vkey: str = typer.Option(..., "--vkey", metavar="VKEY|FILE", help="the log's vkey, or a file holding it"),
    db: str | None = typer.Option(
        None,
        "--db",
        metavar="URL|FILE",
        help="also check against the record: the key still active, the log still extends the checkpoint",
    ),
    as_json: bool = JsonOption,
) -> None:
    """Check an export against its signed manifest, the manifest against the log's checkpoint (offline with
    the vkey alone; with --db also against the record). Exit 0 verified, 1 findings, 2 unusable input."""
    from sle_events.audit.errors import UnusableInput
    from sle_events.exports.manifest import verify_export

    url = existing_database(db) if db is not None else None
    if not path.exists():
        fail(f"{path} does not exist")
    try:
        findings = verify_export(path, vkey=vkey, db_url=url)
    except UnusableInput as e:
        fail(str(e))
    if as_json:
        from dataclasses import asdict

        print_json({"ok": not findings, "offline": url is None, "findings": [asdict(f) for f in findings]})
    elif findings:
        t = table("file", "kind", "detail", title=f"{len(findings)} findings")
        for f in findings:
            t.add_row(escape(f.stream or ""), f.kind, escape(f.detail))
        out.print(t)
    else:
        what = "against the record" if url else "offline (add --db to check the key's status and the log today)"
        out.print(
            f"[green]verified {what}: the files match the signed manifest, its checkpoint is the log's "
            "and its signer's key is registered in it[/green]"
        )
    raise typer.Exit(1 if findings else 0)


@export_app.command("odm")
def odm(
    file_type: str = typer.Option(
        ..., "--type", metavar="snapshot|transactional", help="current values, or every change with its audit record"
    ),
    out_file: Path = typer.Option(
        ..., "--out", metavar="FILE", help="the ODM XML file to write (its manifest goes beside it)"
    ),
    db: str | None = DbOption,
    key: Path = KeyOption,
    subject: str | None = SubjectOption,
    site: str | None = SiteOption,
    recorded_from: str | None = FromOption,
    recorded_to: str | None = ToOption,
) -> None:
    """CDISC ODM 1.3.2: the study's metadata, users, sites and clinical data (transactional: every change with
    its audit record, Archival="Yes"), built from the ledger's latest checkpoint, with a signed manifest."""
    from sle_events.exports.odm import OdmExportError, export_odm

    if file_type not in ("snapshot", "transactional"):
        fail(f"--type {file_type!r}: give snapshot or transactional")
    ctx = prepare_export(db, key, out_file, subject, site, recorded_from, recorded_to)
    try:
        stats = run_exporter("ODM " + file_type, export_odm, ctx, file_type=file_type)
    except OdmExportError as e:
        fail(str(e), 1)
    finish_export(ctx, [out_file], f"odm-{file_type}")
    out.print(
        f"{stats.subjects} subjects, {stats.written_events} facts and changes, {stats.item_data} ItemData "
        f"({stats.bytes / 1e6:.1f} MB) in {stats.seconds:.1f} s → {out_file}"
    )


@export_app.command("sdtm")
def sdtm(
    out_dir: Path = typer.Option(..., "--out", metavar="DIR", help="a new or empty folder for the datasets"),
    db: str | None = DbOption,
    key: Path = KeyOption,
    subject: str | None = SubjectOption,
    site: str | None = SiteOption,
    recorded_from: str | None = FromOption,
    recorded_to: str | None = ToOption,
) -> None:
    """CDISC SDTM (DM, DS, SV, IE, EX, AE, CM, MH, LB, VS, QS) as SAS Transport v5 (.xpt) and CSV, checked
    against the XPT v5 limits before anything is written, with a signed manifest in the folder."""
    from sle_events.exports.sdtm import SdtmRefused, export_sdtm

    ctx = prepare_export(db, key, out_dir, subject, site, recorded_from, recorded_to, folder=True)
    try:
        files = run_exporter("SDTM", export_sdtm, ctx)
    except SdtmRefused as e:
        fail(str(e), 1)
    finish_export(ctx, files, "sdtm")


@export_app.command("fhir")
def fhir(
    out_dir: Path = typer.Option(..., "--out", metavar="DIR", help="a new or empty folder for the bundles"),
    db: str | None = DbOption,
    key: Path = KeyOption,
    subject: str | None = SubjectOption,
    site: str | None = SiteOption,
    recorded_from: str | None = FromOption,
    recorded_to: str | None = ToOption,
) -> None:
    """FHIR R4 JSON: a Bundle per subject (ResearchStudy, ResearchSubject, Patient by screening number,
    Observations with LOINC and UCUM, AdverseEvents, MedicationAdministrations, Provenance naming each signer
    and ledger index), with a signed manifest in the folder."""
    from sle_events.exports.fhir import export_fhir

    ctx = prepare_export(db, key, out_dir, subject, site, recorded_from, recorded_to, folder=True)
    files = run_exporter("FHIR", export_fhir, ctx)
    finish_export(ctx, files, "fhir")


@export_app.command("report")
def report(
    out_file: Path = typer.Option(..., "--out", metavar="FILE.pdf", help="the PDF to write (its manifest beside)"),
    db: str | None = DbOption,
    key: Path = KeyOption,
    subject: str | None = SubjectOption,
    site: str | None = SiteOption,
    recorded_from: str | None = FromOption,
    recorded_to: str | None = ToOption,
    audit: str | None = typer.Option(
        None,
        "--audit-trail",
        metavar="all|changes",
        help="every recorded fact and change, or only corrections and voids (default: all for one subject, "
        "changes for the study)",
    ),
) -> None:
    """The PDF report for monitors and inspectors: verification result, ledger checkpoint, key registry; per
    subject lab-trend plots, timeline and audit trail; the study report adds enrolment, visit compliance, AE
    and response summaries. With a signed manifest beside it."""
    from sle_events.exports.report import AUDIT_DETAIL, export_report

    if audit is not None and audit not in AUDIT_DETAIL:
        fail(f"--audit-trail {audit!r}: give {' or '.join(AUDIT_DETAIL)}")
    if out_file.suffix.lower() != ".pdf":
        fail(f"--out {out_file}: give a file name ending in .pdf")
    ctx = prepare_export(db, key, out_file, subject, site, recorded_from, recorded_to)
    run_exporter("report", export_report, ctx, audit=audit)
    finish_export(ctx, [out_file], "report")
