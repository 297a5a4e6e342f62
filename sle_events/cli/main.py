"""`sle`: the command line for data managers, auditors and the demo."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from sle_events.cli.ledger_cmd import ledger_app
from sle_events.store.url import database_url

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help="Signed, event-sourced study record.")
err = Console(stderr=True)
out = Console()

DbOption = typer.Option(None, "--db", help="SQLAlchemy URL (default: $SLE_DATABASE_URL or ./sle-study.db)")


def _progress(label: str, enabled: bool) -> Progress:
    return Progress(
        TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=err, disable=not enabled, transient=False,
    )  # fmt: skip


def _verify(url: str, as_json: bool, workers: Optional[int], checkpoint: Optional[list[Path]] = None,
            vkey: Optional[str] = None, since: Optional[Path] = None, max_pending: Optional[float] = None,
            sign_key: Optional[Path] = None, actor: Optional[str] = None,
            admin_keys: Optional[list[str]] = None) -> int:  # fmt: skip
    """Verify, print the report, keep the result; the exit code comes from `sle_events.audit.errors`."""
    from datetime import timedelta

    from sle_events.audit.errors import AuditError, UnusableInput, exit_code
    from sle_events.audit.trust import TrustRoot
    from sle_events.audit.verifier import DEFAULT_PENDING_LIMIT, Verifier

    try:
        if (checkpoint or since) and vkey is None:
            raise UnusableInput("--checkpoint and --since need the log's --vkey to check the saved checkpoint's signature")
        missing = _no_record_at(url)
        if missing:
            raise UnusableInput(missing)
        trust = TrustRoot.load(admin_keys=admin_keys or (), vkey=vkey, checkpoints=checkpoint or None, since=since)
        signer = _result_signer(sign_key, actor)
        limit = DEFAULT_PENDING_LIMIT if max_pending is None else timedelta(minutes=max_pending)
        with _progress("verifying", not as_json and err.is_terminal) as bar:
            task = bar.add_task("verify", total=None)
            report = Verifier(trust, workers=workers, pending_limit=limit).verify(
                url, on_progress=lambda d, t: bar.update(task, completed=d, total=t))  # fmt: skip
    except AuditError as e:
        err.print(f"[red]error:[/red] {escape(e.diagnostics())}")
        return exit_code(e)
    except Exception as e:  # noqa: BLE001 - the tool failed, which is not a finding: its own exit code
        err.print(f"[red]sle verify failed (exit 3, no report):[/red] {type(e).__name__}: {escape(str(e))}")
        return exit_code(e)
    _keep_result(url, report, signer)
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        rate = report.events / report.seconds if report.seconds else 0
        out.print(f"{report.events} events in {report.streams} streams ({report.studies} studies) "
                  f"checked in {report.seconds:.2f} s ({rate:,.0f} events/s)")  # fmt: skip
        if report.since is not None:
            out.print(escape(f"since checkpoint {report.since['checkpoint']} (size {report.since['size']}): events "
                             f"after log position {report.since['position']} fully checked, "
                             f"{report.since.get('rehashed', 0)} earlier events re-hashed against their ledger leaves"))  # fmt: skip
        if report.ledger is not None:
            out.print(_ledger_line(report.ledger))
        if report.ok:
            out.print("[green]verified: every signature, key, role and chain holds[/green]")
        else:
            t = Table("position", "stream", "version", "kind", "detail", title=f"{len(report.findings)} findings")
            for f in report.findings:
                t.add_row(str(f.position), f.stream or "", str(f.version or ""), f.kind, escape(f.detail))
            out.print(t)
    return exit_code(report)


def _result_signer(path: Optional[Path], actor: Optional[str]):  # type: ignore[no-untyped-def]
    """The verifier's own key (registered in the study as auditor, monitor or admin) to seal its result with."""
    from sle_events.audit.errors import UnusableInput
    from sle_events.signing.keys import Signer

    if path is None:
        return None
    if not actor:
        raise UnusableInput("--sign-key needs --actor (the id the key is registered under)")
    try:
        return Signer.from_file(path, actor, "auditor")
    except (OSError, ValueError) as e:
        raise UnusableInput(f"--sign-key {path}: {e}") from None


def _no_record_at(url: str) -> str | None:
    """Why there is no study record at `url` (an auditor's typo must not verify an empty, new database)."""
    from sqlalchemy import create_engine, inspect
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        if not Path(parsed.database).exists():
            return f"no database file at {parsed.database}"
    engine = create_engine(url)
    try:
        if not inspect(engine).has_table("study_events"):
            return f"no study record (table study_events) in {parsed.render_as_string(hide_password=True)}"
    except Exception as e:  # noqa: BLE001 - unreachable server, bad URL: say so, exit 2
        return f"cannot open {parsed.render_as_string(hide_password=True)}: {type(e).__name__}: {e}"
    finally:
        engine.dispose()
    return None


def _keep_result(url: str, report, signer=None) -> None:  # type: ignore[no-untyped-def]
    """Record the run for the audit trail, sealed by the verifier's key if it holds one (`audit.results`); an
    auditor without write access still gets the result printed."""
    from sqlalchemy import create_engine, select
    from sqlalchemy.exc import SQLAlchemyError

    from projections.audit_trail import save_verification
    from projections.schema import verification_findings, verification_runs
    from sle_events.audit.results import result_document, seal_result

    engine = create_engine(url)
    try:
        verification_runs.create(engine, checkfirst=True)
        verification_findings.create(engine, checkfirst=True)
        with engine.begin() as conn:
            run_id = save_verification(conn, report)
            if signer is not None:
                run = conn.execute(select(verification_runs).where(verification_runs.c.id == run_id)).one()
                seal_result(conn, run_id, result_document(run.run_at, bool(run.ok), run.events, report.findings), signer)
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
        parts.append(f"saved checkpoint of size {saved['size']} " + ("consistent" if saved["consistent"] else "INCONSISTENT"))
    return escape("; ".join(parts))


@app.command()
def verify(
    db: Optional[str] = DbOption,
    as_json: bool = typer.Option(False, "--json", help="print one JSON document"),
    workers: Optional[int] = typer.Option(None, help="processes to use (default: all cores)"),
    checkpoint: Optional[list[Path]] = typer.Option(None, "--checkpoint", help="a ledger checkpoint you saved "
                                                    "earlier: the log must still extend it (repeatable)"),  # fmt: skip
    vkey: Optional[str] = typer.Option(None, "--vkey", help="the log's vkey (or a file holding it) to check "
                                       "checkpoint signatures with"),  # fmt: skip
    since: Optional[Path] = typer.Option(None, "--since", help="a checkpoint up to which you verified the record "
                                         "before: check only the events after it in full, re-hash the earlier "
                                         "ones against their ledger leaves"),  # fmt: skip
    max_pending: Optional[float] = typer.Option(None, "--max-pending", min=0, help="minutes an event may wait for "
                                                "ledger integration before it is a finding (default 15)"),  # fmt: skip
    sign_key: Optional[Path] = typer.Option(None, "--sign-key", help="your Ed25519 key (PEM), registered in the "
                                            "study as auditor, monitor or admin: the stored result is sealed with "
                                            "it, so the audit trail can tell a forged one"),  # fmt: skip
    actor: Optional[str] = typer.Option(None, "--actor", help="who you are (the id --sign-key is registered under)"),
    admin_key: Optional[list[str]] = typer.Option(None, "--admin-key", help="a study admin's public key (base64) "
                                                  "you trust: a study created with any other is untrusted_root "
                                                  "(repeatable; default: each study's own creation)"),  # fmt: skip
) -> None:
    """Re-read every stream; check canonical bytes, hashes, chains, keys, roles, signatures and the ledger.
    Exit 0 verified, 1 findings, 2 unusable input, 3 the tool failed."""
    url = database_url(db)
    raise typer.Exit(_verify(url, as_json, workers, checkpoint, vkey, since, max_pending, sign_key, actor, admin_key))


@app.command()
def demo(
    db: Optional[str] = DbOption,
    subjects: int = typer.Option(30, min=1, help="how many subjects to enroll (screen failures come on top)"),
    seed: int = typer.Option(20070311, help="random seed (same seed, same trial)"),
    keys: Path = typer.Option(Path("demo-keys"), help="where the demo's private keys are kept (0600)"),
) -> None:
    """Record a synthetic trial (synthetic-cohort.md) through the trial's use cases, then verify it."""
    from sle_events.demo import run_demo
    from sle_events.store.record import StudyRecord

    url = database_url(db)
    started = time.perf_counter()
    record = StudyRecord(url)
    with _progress("recording", err.is_terminal) as bar:
        task = bar.add_task("demo", total=subjects)
        result = run_demo(record, keys, subjects=subjects, seed=seed,
                          on_progress=lambda d, t: bar.update(task, completed=d, total=t))  # fmt: skip
    record.close()
    took = time.perf_counter() - started
    t = Table("event type", "count", title=f"study {result.study_id}: {result.subjects} subjects")
    for name, count in sorted(result.events_by_type.items()):
        t.add_row(name, str(count))
    out.print(t)
    out.print(f"{result.events} signed events in {took:.2f} s → {url}")
    refused = ", ".join(f"{k} {v}" for k, v in sorted(result.refused_as_expected.items())) or "none"
    out.print(f"{result.screened} screened, {result.subjects} enrolled; deliberately invalid commands refused: "
              f"{refused}; {result.backlog} entries after the data cut left out; content digest {result.digest[:16]}")
    code = _verify(url, False, None)
    if code == 0:
        _build_read_models(url)
    raise typer.Exit(code)


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
    out.print("read models built: sle patients | sle dashboard | sle audit-trail --subject NJ01-0002 | "
              "sle replay --subject NJ01-0002 --as-of 2008-01-01T00:00:00+00:00")


keys_app = typer.Typer(help="Ed25519 keys of users and services.")
app.add_typer(keys_app, name="keys")
app.add_typer(ledger_app, name="ledger")


@keys_app.command("generate")
def keys_generate(
    out_file: Path = typer.Option(..., "--out", help="private key file to write (0600)"),
    actor: str = typer.Option(..., help="user or service id"),
    role: str = typer.Option(..., help="role the key acts in"),
) -> None:
    """Make a key pair; write the private key (0600) and print the public key."""
    from sle_events.domain.roles import ROLES
    from sle_events.signing.keys import Signer

    if role not in ROLES:
        err.print(f"[red]unknown role {role!r}; roles are {', '.join(sorted(ROLES))}[/red]")
        raise typer.Exit(2)
    signer = Signer.generate(actor, role)
    try:
        signer.save(out_file)
    except FileExistsError:
        err.print(f"[red]{out_file} exists; refusing to overwrite a key[/red]")
        raise typer.Exit(2) from None
    print(json.dumps({"actor": actor, "role": role, "key": signer.key_id, "public_key": signer.public_key_b64}))


from sle_events.cli.projections_cmd import (  # noqa: E402
    audit_trail,
    dashboard_cmd,
    db_app,
    patients,
    projections_app,
    replay,
)
from sle_events.cli.study_cmd import study_app  # noqa: E402

app.add_typer(db_app, name="db")
app.add_typer(study_app, name="study")
app.add_typer(projections_app, name="projections")
app.command("audit-trail")(audit_trail)
app.command("replay")(replay)
app.command("patients")(patients)
app.command("dashboard")(dashboard_cmd)

