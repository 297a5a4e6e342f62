"""`sle`: the command line for data managers, auditors and the demo."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.progress import Progress

from sle_events.cli.common import DbOption, JsonOption, database_url, err, fail, new_app, out, print_json, table
from sle_events.cli.common import no_record_at as _no_record_at
from sle_events.cli.common import progress as _common_progress
from sle_events.cli.export_cmd import export_app
from sle_events.cli.ledger_cmd import ledger_app
from sle_events.cli.serve_cmd import serve

app = new_app(no_args_is_help=True, help="Signed, event-sourced study record.")


def _progress(label: str, enabled: bool) -> Progress:
    return _common_progress(label, enabled)


def _verify(
    url: str,
    as_json: bool,
    workers: int | None,
    checkpoint: list[Path] | None = None,
    vkey: str | None = None,
    since: Path | None = None,
    max_pending: float | None = None,
    sign_key: Path | None = None,
    actor: str | None = None,
    admin_keys: list[str] | None = None,
) -> int:
    """Verify, print the report, keep the result; the exit code comes from `sle_events.audit.errors`."""
    from datetime import timedelta

    from sle_events.audit.errors import AuditError, UnusableInput, exit_code
    from sle_events.audit.trust import TrustRoot
    from sle_events.audit.verifier import DEFAULT_PENDING_LIMIT, Verifier

    try:
        if (checkpoint or since) and vkey is None:
            raise UnusableInput(
                "--checkpoint and --since need the log's --vkey to check the saved checkpoint's signature"
            )
        missing = _no_record_at(url) or _no_events_at(url)
        if missing:
            raise UnusableInput(missing)
        trust = TrustRoot.load(admin_keys=admin_keys or (), vkey=vkey, checkpoints=checkpoint or None, since=since)
        signer = _result_signer(sign_key, actor)
        limit = DEFAULT_PENDING_LIMIT if max_pending is None else timedelta(minutes=max_pending)
        with _progress("verifying", not as_json and err.is_terminal) as bar:
            task = bar.add_task("verify", total=None)
            report = Verifier(trust, workers=workers, pending_limit=limit).verify(
                url, on_progress=lambda d, t: bar.update(task, completed=d, total=t)
            )
    except AuditError as e:
        if as_json:  # a script reading --json gets JSON on every path
            print_json({"ok": False, "events": 0, "error": e.diagnostics(), "findings": []})
        err.print(f"[red]error:[/red] {escape(e.diagnostics())}")
        return exit_code(e)
    except Exception as e:
        err.print(f"[red]sle verify failed (exit 3, no report):[/red] {type(e).__name__}: {escape(str(e))}")
        return exit_code(e)
    _keep_result(url, report, signer)
    if as_json:
        print_json(report.to_dict())
    else:
        rate = report.events / report.seconds if report.seconds else 0
        out.print(
            f"{report.events} events in {report.streams} streams ({report.studies} studies) "
            f"checked in {report.seconds:.2f} s ({rate:,.0f} events/s)"
        )
        if report.since is not None:
            out.print(
                escape(
                    f"since checkpoint {report.since['checkpoint']} (size {report.since['size']}): events "
                    f"after log position {report.since['position']} fully checked, "
                    f"{report.since.get('rehashed', 0)} earlier events re-hashed against their ledger leaves"
                )
            )
        if report.ledger is not None:
            out.print(_ledger_line(report.ledger))
        if report.ok:
            out.print("[green]verified: every signature, key, role and chain holds[/green]")
        else:
            out.print(_findings_table(report.findings))
    return exit_code(report)


def _result_signer(path: Path | None, actor: str | None):
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


def _keep_result(url: str, report, signer=None) -> None:
    """Record the run for the audit trail, sealed by the verifier's key if it holds one (`audit.results`); an
    auditor without write access still gets the result printed."""
    from sqlalchemy import create_engine, select
    from sqlalchemy.exc import SQLAlchemyError

    from projections.audit_trail import save_verification
    from projections.schema import verification_findings, verification_runs
    from sle_events.audit.results import result_document, save_tree, seal_result

    engine = create_engine(url)
    try:
        verification_runs.create(engine, checkfirst=True)
        verification_findings.create(engine, checkfirst=True)
        with engine.begin() as conn:
            run_id = save_verification(conn, report)
            tree = save_tree(conn, run_id, report)
            if signer is not None:
                run = conn.execute(select(verification_runs).where(verification_runs.c.id == run_id)).one()
                document = result_document(run.run_at, bool(run.ok), run.events, report.findings, tree)
                seal_result(conn, run_id, document, signer)
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
    since: Path | None = typer.Option(
        None,
        "--since",
        metavar="FILE",
        help="a checkpoint up to which you verified the record "
        "before: check only the events after it in full, re-hash the earlier "
        "ones against their ledger leaves",
    ),
    max_pending: float | None = typer.Option(
        None,
        "--max-pending",
        metavar="MINUTES",
        min=0,
        help="minutes an event may wait for ledger integration before it is a finding (default 15)",
    ),
    sign_key: Path | None = typer.Option(
        None,
        "--sign-key",
        metavar="PEM",
        help="your Ed25519 key (PEM), registered in the "
        "study as auditor, monitor or admin: the stored result is sealed with "
        "it, so the audit trail can tell a forged one",
    ),
    actor: str | None = typer.Option(
        None, "--actor", metavar="ID", help="who you are (the id --sign-key is registered under)"
    ),
    admin_key: list[str] | None = typer.Option(
        None,
        "--admin-key",
        metavar="KEY",
        help="a study admin's public key (base64) "
        "you trust: a study created with any other is untrusted_root "
        "(repeatable; default: each study's own creation)",
    ),
) -> None:
    """Re-read every stream; check canonical bytes, hashes, chains, keys, roles, signatures and the ledger.
    Exit 0 verified, 1 findings, 2 unusable input, 3 the tool failed."""
    url = database_url(db)
    raise typer.Exit(_verify(url, as_json, workers, checkpoint, vkey, since, max_pending, sign_key, actor, admin_key))


@app.command()
def demo(
    db: str | None = DbOption,
    subjects: int = typer.Option(30, min=1, metavar="N", help="subjects to enroll (screen failures come on top)"),
    seed: int = typer.Option(20070311, metavar="S", help="random seed (same seed and keys, same trial)"),
    keys: Path = typer.Option(Path("demo-keys"), metavar="DIR", help="where the demo's private keys are kept (0600)"),
    api: str | None = typer.Option(
        None, "--api", metavar="URL", help="record over HTTP through `sle serve --demo-clock` at URL; --db keeps a copy"
    ),
) -> None:
    """Record a synthetic trial (synthetic-cohort.md) through the trial's use cases, then verify it."""
    from sle_events.demo import PEOPLE, run_demo
    from sle_events.store.record import StudyRecord

    if api is not None:  # a typo is said before anything is made
        import httpx

        from sle_events.client.connections import check_server_url

        try:
            check_server_url(api)
        except httpx.UnsupportedProtocol:
            fail(f"--api wants the server's URL, such as http://127.0.0.1:8000, not {api!r}")
    url = database_url(db)
    _refuse_a_used_database(url)
    started = time.perf_counter()
    record = StudyRecord(url)
    with _progress("recording", err.is_terminal) as bar, _server_errors(api):
        task = bar.add_task("demo", total=subjects)
        result = run_demo(
            record,
            keys,
            subjects=subjects,
            seed=seed,
            on_progress=lambda d, t: bar.update(task, completed=d, total=t),
            api=api,
        )
    record.close()
    took = time.perf_counter() - started
    t = table("event type", "count", title=f"study {result.study_id}: {result.subjects} subjects")
    for name, count in sorted(result.events_by_type.items()):
        t.add_row(name, str(count))
    out.print(t)
    out.print(f"{result.events} signed events in {took:.2f} s → {url}" + (f" (sent through {api})" if api else ""))
    refused = ", ".join(f"{k} {v}" for k, v in sorted(result.refused_as_expected.items())) or "none"
    out.print(
        f"{result.screened} screened, {result.subjects} enrolled; deliberately invalid commands refused: "
        f"{refused}; {result.backlog} entries after the data cut left out; content digest {result.digest[:16]}"
    )
    vkey = _set_up_ledger(url, keys)
    # the monitor verifies and seals the result: the web view then shows it signed, and exports verify once
    # per checkpoint against the tree it sealed (`audit.results.vouched_tree`)
    code = _verify(url, False, None, vkey=vkey, sign_key=keys / "monitor.pem", actor=PEOPLE["monitor"][0])
    if code == 0:
        _build_read_models(url)
        out.print(
            escape(
                f"ledger: every event integrated, a signed checkpoint; the log key is {keys / 'log.key'} and its "
                f"vkey (give it to auditors):\n{vkey}\n"
                f"export and check: sle export odm --type transactional --key {keys / 'data_manager.pem'} "
                f"--out odm.xml, then sle export verify odm.xml --vkey <the vkey>"
            )
        )
    raise typer.Exit(code)


@contextmanager
def _server_errors(api: str | None) -> Iterator[None]:
    """`sle demo --api`: a server that cannot be reached or refuses the demo is exit 2 with why, not a traceback."""
    if api is None:
        yield
        return
    import httpx

    try:
        yield
    except httpx.HTTPError as e:
        fail(f"cannot reach the API at {api}: {e} (is `sle serve --demo-clock` running there?)")


def _set_up_ledger(url: str, keys: Path) -> str:
    """The demo's ledger (`sle_events.demo.setup_demo_ledger`): a newcomer can export and prove straight away."""
    from sle_events.demo import setup_demo_ledger

    with _progress("ledger", err.is_terminal) as bar:
        bar.add_task("integrating and signing a checkpoint", total=None)
        return setup_demo_ledger(url, keys)


def _refuse_a_used_database(url: str) -> None:
    """The demo records a whole study from its first event: into an empty database only (exit 2 otherwise)."""
    from sqlalchemy.engine import make_url

    if _no_record_at(url) is not None or _no_events_at(url) is not None:
        return
    parsed = make_url(url)
    afresh = (
        f"delete {parsed.database} (and its demo-keys folder) or give another --db"
        if parsed.get_backend_name() == "sqlite"
        else "give another --db (an empty database)"
    )
    fail(
        f"this database already holds a study record, so the demo will not record into it: see it with "
        f"`sle patients`, `sle dashboard` or `sle verify`; to start afresh, {afresh}"
    )


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
app.add_typer(export_app, name="export")


@keys_app.command("generate")
def keys_generate(
    out_file: Path = typer.Option(..., "--out", metavar="FILE", help="private key file to write (0600)"),
    actor: str = typer.Option(..., metavar="ID", help="user or service id"),
    role: str = typer.Option(
        ..., metavar="ROLE", help="role the key acts in (admin, coordinator, investigator, lab, data_manager, ...)"
    ),
    passphrase: bool = typer.Option(
        False,
        "--passphrase",
        help="encrypt the key file with a passphrase (asked for twice, hidden): an investigator's signing key, "
        "whose passphrase is asked for at each sign-off",
    ),
    passphrase_stdin: bool = typer.Option(
        False, "--passphrase-stdin", help="with --passphrase: read it from the first line of standard input"
    ),
) -> None:
    """Make a key pair; write the private key (0600, encrypted with --passphrase) and print the public key."""
    from sle_events.cli.casebook_cmd import _passphrase
    from sle_events.domain.roles import ROLES
    from sle_events.signing.keys import MIN_PASSPHRASE, Signer

    if role not in ROLES:
        fail(f"unknown role {role!r}; roles are {', '.join(sorted(ROLES))}")
    if passphrase_stdin and not passphrase:
        fail("--passphrase-stdin goes with --passphrase")
    secret = None
    if passphrase:
        secret = _passphrase(passphrase_stdin, "passphrase for the new key file")
        if not passphrase_stdin and secret != _passphrase(False, "the same passphrase again"):
            fail("the two passphrases differ; nothing was written")
        if len(secret) < MIN_PASSPHRASE:
            fail(f"a passphrase has at least {MIN_PASSPHRASE} characters; nothing was written")
    signer = Signer.generate(actor, role)
    try:
        signer.save(out_file, passphrase=secret)
    except FileExistsError:
        fail(f"{out_file} exists; refusing to overwrite a key")
    except OSError as e:
        fail(
            f"cannot write {out_file}: {e.strerror}"
            + (" (create its folder first)" if not out_file.parent.exists() else "")
        )
    doc = {"actor": actor, "role": role, "key": signer.key_id, "public_key": signer.public_key_b64}
    print_json(doc if secret is None else {**doc, "passphrase_protected": True})


from sle_events.cli.casebook_cmd import lock, sign, unlock  # noqa: E402  # sub-commands imported where they are attached to app
from sle_events.cli.projections_cmd import (  # noqa: E402  # sub-commands imported where they are attached to app
    audit_trail,
    dashboard_cmd,
    db_app,
    patients,
    projections_app,
    replay,
)
from sle_events.cli.study_cmd import correct, study_app, void  # noqa: E402  # sub-commands imported where they are attached to app
from sle_events.cli.web_cmd import web_app  # noqa: E402  # sub-commands imported where they are attached to app

app.add_typer(db_app, name="db")
app.add_typer(study_app, name="study")
app.add_typer(projections_app, name="projections")
app.add_typer(web_app, name="web")
app.command("audit-trail")(audit_trail)
app.command("replay")(replay)
app.command("serve")(serve)
app.command("patients")(patients)
app.command("dashboard")(dashboard_cmd)
app.command("correct")(correct)
app.command("void")(void)
app.command("sign")(sign)
app.command("lock")(lock)
app.command("unlock")(unlock)
from sle_events.cli.review_cmd import queries_cmd, query_app, sdv  # noqa: E402  # SDV and queries, attached here

app.command("sdv")(sdv)
app.add_typer(query_app, name="query")
app.command("queries")(queries_cmd)
