"""`sle`: the command line for data managers, auditors and the demo."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.progress import Progress

from sle_events.cli.common import DbOption, JsonOption, database_url, err, fail, new_app, out, print_json, table
from sle_events.cli.common import no_record_at as _no_record_at
from sle_events.cli.common import progress as _common_progress
from sle_events.cli.ledger_cmd import ledger_app

app = new_app(no_args_is_help=True, help="Signed, event-sourced study record.")


def _progress(label: str, enabled: bool) -> Progress:
    return _common_progress(label, enabled)


def _verify(url: str, as_json: bool, workers: int | None, checkpoint: list[Path] | None = None,
            vkey: str | None = None) -> int:  # fmt: skip
    from sle_events.store.verification import verify_record

    if checkpoint and vkey is None:
        err.print("[red]error:[/red] --checkpoint needs the log's --vkey to check the saved checkpoint's signature")
        return 2
    missing = _no_record_at(url) or _no_events_at(url)
    if missing:
        if as_json:
            print_json({"ok": False, "events": 0, "error": missing, "findings": []})
        err.print(f"[red]error:[/red] {escape(missing)}")
        return 2
    try:
        with _progress("verifying", not as_json and err.is_terminal) as bar:
            task = bar.add_task("verify", total=None)
            report = verify_record(url, workers=workers, checkpoint=checkpoint or None, vkey=vkey,
                                   on_progress=lambda d, t: bar.update(task, completed=d, total=t))  # fmt: skip
    except ValueError as e:  # the auditor's vkey or saved checkpoint is unusable
        err.print(f"[red]error:[/red] {escape(str(e))}")
        return 2
    _keep_result(url, report)
    if as_json:
        print_json(report.to_dict())
    else:
        rate = report.events / report.seconds if report.seconds else 0
        out.print(f"{report.events} events in {report.streams} streams ({report.studies} studies) "
                  f"checked in {report.seconds:.2f} s ({rate:,.0f} events/s)")  # fmt: skip
        if report.ledger is not None:
            out.print(_ledger_line(report.ledger))
        if report.ok:
            out.print("[green]verified: every signature, key, role and chain holds[/green]")
        else:
            out.print(_findings_table(report.findings))
    return 0 if report.ok else 1


def _no_events_at(url: str) -> str | None:
    """An empty study record verifies trivially: an auditor pointed at the wrong database must not get a pass."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            if conn.execute(text("select 1 from study_events limit 1")).first() is None:
                return "nothing to verify: the study record holds no events (is --db the right database?)"
    finally:
        engine.dispose()
    return None


def _findings_table(findings: list[Any]) -> Any:
    """Findings wrapped, never cut, at any width: each event named by log position, stream and version."""
    t = table("position", "stream:version", "kind", "detail", title=f"{len(findings)} findings")
    for f in findings:
        where = f"{f.stream}:{f.version}" if f.stream and f.version is not None else (f.stream or "")
        t.add_row(str(f.position if f.position is not None else ""), where, f.kind, escape(f.detail))
    return t


def _keep_result(url: str, report) -> None:  # type: ignore[no-untyped-def]
    """Record the run for the audit trail; an auditor without write access still gets the result printed."""
    from sqlalchemy import create_engine
    from sqlalchemy.exc import SQLAlchemyError

    from projections.audit_trail import save_verification
    from projections.schema import verification_findings, verification_runs

    engine = create_engine(url)
    try:
        verification_runs.create(engine, checkfirst=True)
        verification_findings.create(engine, checkfirst=True)
        with engine.begin() as conn:
            save_verification(conn, report)
    except SQLAlchemyError as e:
        err.print(f"[yellow]result not saved in the database: {e.__class__.__name__}[/yellow]")
    finally:
        engine.dispose()


def _ledger_line(info: dict) -> str:
    if not info.get("ledger"):
        return "ledger: none in this database (only the saved checkpoints were checked)"
    parts = [f"ledger: {info.get('leaves', 0)} leaves, {info.get('checkpoints', 0)} checkpoints checked"]
    if info.get("pending"):
        parts.append(f"{info['pending']} events not integrated yet")
    for saved in info.get("saved_checkpoints", []):
        parts.append(
            f"saved checkpoint of size {saved['size']} " + ("consistent" if saved["consistent"] else "INCONSISTENT")
        )
    return escape("; ".join(parts))


@app.command()
def verify(
    db: str | None = DbOption,
    as_json: bool = JsonOption,
    workers: int | None = typer.Option(None, min=1, metavar="N", help="processes to use (default: all cores)"),
    checkpoint: list[Path] | None = typer.Option(
        None,
        "--checkpoint",
        metavar="FILE",
        help="a ledger checkpoint you saved earlier: the log must still extend it (repeatable)",
    ),
    vkey: str | None = typer.Option(
        None, "--vkey", metavar="KEY", help="the log's vkey (or a file holding it) to check checkpoint signatures with"
    ),
) -> None:
    """Re-read every stream; check canonical bytes, hashes, chains, keys, roles, signatures and the ledger."""
    url = database_url(db)
    raise typer.Exit(_verify(url, as_json, workers, checkpoint, vkey))


@app.command()
def demo(
    db: str | None = DbOption,
    subjects: int = typer.Option(30, min=1, metavar="N", help="subjects to enroll (screen failures come on top)"),
    seed: int = typer.Option(20070311, metavar="S", help="random seed (same seed and keys, same trial)"),
    keys: Path = typer.Option(Path("demo-keys"), metavar="DIR", help="where the demo's private keys are kept (0600)"),
) -> None:  # fmt: skip
    """Record a synthetic trial (synthetic-cohort.md) through the trial's use cases, then verify it."""
    from sle_events.demo import run_demo
    from sle_events.store.record import StudyRecord

    url = database_url(db)
    _refuse_a_used_database(url)
    started = time.perf_counter()
    record = StudyRecord(url)
    with _progress("recording", err.is_terminal) as bar:
        task = bar.add_task("demo", total=subjects)
        result = run_demo(record, keys, subjects=subjects, seed=seed,
                          on_progress=lambda d, t: bar.update(task, completed=d, total=t))  # fmt: skip
    record.close()
    took = time.perf_counter() - started
    t = table("event type", "count", title=f"study {result.study_id}: {result.subjects} subjects")
    for name, count in sorted(result.events_by_type.items()):
        t.add_row(name, str(count))
    out.print(t)
    out.print(f"{result.events} signed events in {took:.2f} s → {url}")
    refused = ", ".join(f"{k} {v}" for k, v in sorted(result.refused_as_expected.items())) or "none"
    out.print(
        f"{result.screened} screened, {result.subjects} enrolled; deliberately invalid commands refused: "
        f"{refused}; {result.backlog} entries after the data cut left out; content digest {result.digest[:16]}"
    )
    code = _verify(url, False, None)
    if code == 0:
        _build_read_models(url)
    raise typer.Exit(code)


def _refuse_a_used_database(url: str) -> None:
    """The demo records a whole study from its first event: into an empty database only (exit 2 otherwise)."""
    from sqlalchemy.engine import make_url

    if _no_record_at(url) is not None or _no_events_at(url) is not None:
        return
    parsed = make_url(url)
    afresh = (f"delete {parsed.database} (and its demo-keys folder) or give another --db"
              if parsed.get_backend_name() == "sqlite" else "give another --db (an empty database)")  # fmt: skip
    fail(f"this database already holds a study record, so the demo will not record into it: see it with "
         f"`sle patients`, `sle dashboard` or `sle verify`; to start afresh, {afresh}")  # fmt: skip


def _build_read_models(url: str) -> None:
    """The demo leaves its read models built, so read commands and SQL on `audit_trail` work straight away."""
    from projections.runner import ProjectionRunner

    runner = ProjectionRunner(url)
    try:
        with _progress("projecting", err.is_terminal) as bar:
            task = bar.add_task("read models", total=runner.head())
            runner.rebuild(on_progress=lambda d, t: bar.update(task, completed=d, total=t))
    finally:
        runner.close()
    out.print(
        "read models built: sle patients | sle dashboard | sle audit-trail --subject NJ01-0002 | "
        "sle replay --subject NJ01-0002 --as-of 2008-01-01T00:00:00+00:00"
    )


keys_app = new_app(help="Ed25519 keys of users and services.")
app.add_typer(keys_app, name="keys")
app.add_typer(ledger_app, name="ledger")


@keys_app.command("generate")
def keys_generate(
    out_file: Path = typer.Option(..., "--out", metavar="FILE", help="private key file to write (0600)"),
    actor: str = typer.Option(..., metavar="ID", help="user or service id"),
    role: str = typer.Option(..., metavar="ROLE", help="role the key acts in (admin, coordinator, investigator, "
                             "lab, data_manager, ...)"),
) -> None:  # fmt: skip
    """Make a key pair; write the private key (0600) and print the public key."""
    from sle_events.domain.roles import ROLES
    from sle_events.signing.keys import Signer

    if role not in ROLES:
        fail(f"unknown role {role!r}; roles are {', '.join(sorted(ROLES))}")
    signer = Signer.generate(actor, role)
    try:
        signer.save(out_file)
    except FileExistsError:
        fail(f"{out_file} exists; refusing to overwrite a key")
    except OSError as e:
        fail(
            f"cannot write {out_file}: {e.strerror}"
            + (" (create its folder first)" if not out_file.parent.exists() else "")
        )
    print_json({"actor": actor, "role": role, "key": signer.key_id, "public_key": signer.public_key_b64})


from sle_events.cli.projections_cmd import (  # noqa: E402
    audit_trail,
    dashboard_cmd,
    db_app,
    patients,
    projections_app,
    replay,
)
from sle_events.cli.study_cmd import correct, study_app, void  # noqa: E402

app.add_typer(db_app, name="db")
app.add_typer(study_app, name="study")
app.add_typer(projections_app, name="projections")
app.command("audit-trail")(audit_trail)
app.command("replay")(replay)
app.command("patients")(patients)
app.command("dashboard")(dashboard_cmd)
app.command("correct")(correct)
app.command("void")(void)
