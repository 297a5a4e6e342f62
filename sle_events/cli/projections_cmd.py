"""`sle db`, `sle projections`, `sle audit-trail`: schema, read models and what auditors read."""

from __future__ import annotations

import csv
import json
import signal
import sys
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sle_events.store.url import database_url

err = Console(stderr=True)
out = Console()
DbOption = typer.Option(None, "--db", help="SQLAlchemy URL (default: $SLE_DATABASE_URL or ./sle-study.db)")

db_app = typer.Typer(help="Database schema (Alembic revisions in migrations/).")
projections_app = typer.Typer(help="Read models built from the signed events.")


@db_app.command("upgrade")
def db_upgrade(db: Optional[str] = DbOption, revision: str = typer.Argument("head")) -> None:
    """Apply schema revisions up to REVISION (default head)."""
    from sle_events import schema

    url = database_url(db)
    schema.upgrade(url, revision)
    out.print(f"database at revision {schema.current(url)}")


def _existing(db: Optional[str]) -> str:
    """The URL of an existing study record; a typo exits 2 rather than creating an empty database."""
    from sle_events.cli.main import _no_record_at

    url = database_url(db)
    missing = _no_record_at(url)
    if missing:
        err.print(f"[red]error:[/red] {missing}")
        raise typer.Exit(2)
    return url


def _runner(db: Optional[str]):  # type: ignore[no-untyped-def]
    from projections.runner import ProjectionRunner, SchemaBehind

    try:
        return ProjectionRunner(_existing(db))
    except SchemaBehind as e:
        err.print(f"[red]{e}[/red]")
        raise typer.Exit(2) from None


def _caught_up(db: Optional[str]):  # type: ignore[no-untyped-def]
    """A runner whose read models are up to date; if a projection is halted, say where and why and exit 1."""
    from projections.base import ProjectionHalted

    runner = _runner(db)
    try:
        runner.catch_up()
    except ProjectionHalted as e:
        runner.close()
        err.print(f"[red]read models halted: {escape(str(e))}[/red]\n`sle verify` names what was altered; once the "
                  "record is repaired, `sle projections rebuild`")  # fmt: skip
        raise typer.Exit(1) from None
    return runner


@projections_app.command("status")
def projections_status(db: Optional[str] = DbOption, as_json: bool = typer.Option(False, "--json")) -> None:
    """Each projection's position in the log and how far behind it is."""
    runner = _runner(db)
    rows = runner.status()
    runner.close()
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    t = Table("projection", "position", "head", "lag (events)", "updated at", "halted")
    for r in rows:
        t.add_row(str(r["projection"]), str(r["position"]), str(r["head"]), str(r["lag_events"]), str(r["updated_at"]),
                  escape(str(r["halted"] or "")))  # fmt: skip
    out.print(t)
    _print_halted_streams([dict(s, projection=r["projection"]) for r in rows for s in r["halted_streams"]])


def _print_halted_streams(rows: list[dict]) -> None:  # type: ignore[type-arg]
    if not rows:
        return
    t = Table(*(["projection"] if "projection" in rows[0] else []), "subject", "stream", "version", "log position",
              "why", title="halted streams (rows as of the version before)")  # fmt: skip
    for r in rows:
        t.add_row(*([r["projection"]] if "projection" in r else []), r["subject"] or "", r["stream"], str(r["version"]),
                  str(r["position"]), escape(r["detail"]))  # fmt: skip
    out.print(t)


@projections_app.command("rebuild")
def projections_rebuild(
    name: Optional[list[str]] = typer.Argument(None, help="projections to rebuild (default: all)"),
    db: Optional[str] = DbOption,
    verify: bool = typer.Option(False, "--verify", help="re-verify every signature first (slower)"),
    workers: Optional[int] = typer.Option(None, help="processes to use (default: all cores)"),
) -> None:
    """Drop and rebuild projections from event 1 (checking every event's chain and signature)."""
    if verify:
        from sle_events.audit.verifier import verify_record

        report = verify_record(_existing(db))
        if not report.ok:
            err.print(f"[red]verification found {len(report.findings)} problems; not rebuilding[/red]")
            raise typer.Exit(1)
    from projections.base import ProjectionHalted
    from projections.runner import RebuildFailed
    from sle_events.cli.main import _progress

    runner = _runner(db)
    try:
        with _progress("rebuilding", err.is_terminal) as bar:
            task = bar.add_task("rebuild", total=runner.head())
            runner.rebuild(name or None, on_progress=lambda d, t: bar.update(task, completed=d, total=t),
                           workers=workers)  # fmt: skip
    except (ProjectionHalted, RebuildFailed) as e:
        err.print(f"[red]{escape(str(e))}[/red]")
        raise typer.Exit(1) from None
    except ValueError as e:
        err.print(f"[red]{e}[/red]")
        raise typer.Exit(2) from None
    finally:
        runner.close()
    out.print("rebuilt: " + ", ".join(p.name for p in runner.projections if not name or p.name in name))


@projections_app.command("run")
def projections_run(db: Optional[str] = DbOption, poll: float = typer.Option(0.5, help="SQLite poll interval (s)")) -> None:
    """A long-running worker: catch up, then follow new events (LISTEN/NOTIFY on PostgreSQL, polling on SQLite)."""
    from projections.base import ProjectionHalted

    runner = _runner(db)
    signal.signal(signal.SIGTERM, lambda *_: runner.stop())
    err.print(f"projecting into {runner.engine.url.render_as_string(hide_password=True)}; Ctrl-C to stop")
    try:
        runner.run_forever(poll, on_batch=lambda n: err.print(f"applied {n} events"))
    except KeyboardInterrupt:
        pass
    except ProjectionHalted as e:
        err.print(f"[red]{escape(str(e))}[/red]")
        raise typer.Exit(1) from None
    finally:
        runner.close()


def audit_trail(
    subject: Optional[str] = typer.Option(None, help="screening number"),
    stream: Optional[str] = typer.Option(None, help="stream (aggregate) id"),
    user: Optional[str] = typer.Option(None, help="actor id"),
    event_type: Optional[str] = typer.Option(None, "--type", help="e.g. Subject.LabResultRecorded"),
    since: Optional[str] = typer.Option(None, help="recorded at or after (ISO 8601, UTC)"),
    until: Optional[str] = typer.Option(None, help="recorded at or before (ISO 8601, UTC)"),
    change: Optional[str] = typer.Option(None, help="recorded, corrected or voided"),
    fmt: str = typer.Option("table", "--format", help="table, csv or json"),
    db: Optional[str] = DbOption,
) -> None:
    """Who changed what, when (occurred and recorded), why, old → new value, and the signature status."""
    from projections.audit_trail import CHANGES, query

    if fmt not in ("table", "csv", "json"):
        err.print("[red]--format is table, csv or json[/red]")
        raise typer.Exit(2)
    if change is not None and change not in CHANGES:
        err.print(f"[red]--change is {', '.join(CHANGES)}[/red]")
        raise typer.Exit(2)
    runner = _caught_up(db)
    with runner.engine.connect() as conn:
        rows = query(conn, subject=subject, stream=stream, actor=user, event_type=event_type, since=since, until=until,
                     change=change)  # fmt: skip
    runner.close()
    if fmt == "json":
        print(json.dumps(rows, indent=2, default=str))
    elif fmt == "csv":
        columns = list(rows[0]) if rows else []
        writer = csv.DictWriter(sys.stdout, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    else:
        t = Table("recorded at", "subject", "form", "field", "old", "new", "who", "role", "reason", title="audit trail")
        for r in rows:
            t.add_row(r["recorded_at"], r["subject"] or "", r["form"], r["field"], r["old_value"] or "",
                      r["new_value"] or "", r["printed_name"], r["role"], r["reason"] or "")  # fmt: skip
        out.print(t)


def _time(text: Optional[str], name: str):  # type: ignore[no-untyped-def]
    from sle_events.signing.envelope import MalformedEnvelope, parse_time

    if text is None:
        return None
    try:
        return parse_time(name, text)
    except MalformedEnvelope as e:
        err.print(f"[red]{name}: {e} (give ISO 8601 with an offset, e.g. 2008-03-01T00:00:00+08:00)[/red]")
        raise typer.Exit(2) from None


def replay(
    subject: str = typer.Option(..., help="screening number or subject (stream) id"),
    as_of: Optional[str] = typer.Option(None, "--as-of", help="what the database said at this recorded time"),
    occurred_as_of: Optional[str] = typer.Option(None, "--occurred-as-of",
                                                 help="what was true in the clinic then, given today's knowledge"),
    as_json: bool = typer.Option(False, "--json"),
    db: Optional[str] = DbOption,
) -> None:  # fmt: skip
    """A subject's state as of a past moment, on either time axis (bitemporal)."""
    from projections.base import ProjectionHalted
    from projections.patient_state import summarise
    from projections.replay import SubjectNotFound, replay as replay_subject
    from sle_events.store.record import StudyRecord

    when, occurred = _time(as_of, "--as-of"), _time(occurred_as_of, "--occurred-as-of")
    record = StudyRecord(_existing(db))
    try:
        subject_then = replay_subject(record, subject, as_of=when, occurred_as_of=occurred)
        state = summarise(subject_then, record.study(subject_then.study_id).config.visits)
    except SubjectNotFound as e:
        err.print(f"[red]{e}[/red]")
        raise typer.Exit(1) from None
    except ProjectionHalted as e:  # a broken chain, a bad signature, or a signed fact that cannot be loaded
        err.print(f"[red]cannot replay: {escape(str(e))}[/red]")
        raise typer.Exit(1) from None
    finally:
        record.close()
    _decode_json_fields(state)
    if as_json:
        print(json.dumps(state, indent=2))
        return
    t = Table("field", "value", title=f"subject {state['screening_number']} as of "
              f"{'recorded ' + as_of if as_of else ''}{' / ' if as_of and occurred_as_of else ''}"
              f"{'occurred ' + occurred_as_of if occurred_as_of else ''}{'now' if not (as_of or occurred_as_of) else ''}")  # fmt: skip
    for k, v in state.items():
        if k != "key_labs":
            t.add_row(k, "" if v is None else str(v))
    for code, lab in state["key_labs"].items():
        t.add_row(code, f"{_display(lab['value'])} {lab['unit']} ({lab['trend'] or 'first'}) at {lab['at']}")
    out.print(t)


def _decode_json_fields(state: dict) -> None:  # type: ignore[type-arg]
    """A patient-state row's JSON columns, as data."""
    for name in ("key_labs", "flags", "stale_results"):
        state[name] = json.loads(state[name])


def _display(value: str) -> str:
    from decimal import Decimal

    from sle_events.domain.quantities import display

    return display(Decimal(value))


def patients(
    status: Optional[str] = typer.Option(None, help="only subjects in this state, e.g. IN_FOLLOW_UP"),
    as_json: bool = typer.Option(False, "--json"),
    db: Optional[str] = DbOption,
) -> None:
    """Current patient state of every subject (brings the projection up to date first)."""
    from datetime import date

    from sqlalchemy import select

    from projections.patient_state import PatientState
    from projections.schema import halted_streams, patient_state

    runner = _caught_up(db)
    q = select(patient_state).order_by(patient_state.c.screening_number)
    if status:
        q = q.where(patient_state.c.status == status)
    hs = halted_streams
    with runner.engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(q)]
        halted = [dict(r._mapping) for r in conn.execute(
            select(hs.c.subject, hs.c.stream, hs.c.version, hs.c.position, hs.c.detail)
            .where(hs.c.projection == PatientState.name).order_by(hs.c.position))]  # fmt: skip
    runner.close()
    today = date.today()
    halted_by_stream = {h["stream"]: h for h in halted}
    for r in rows:
        _decode_json_fields(r)
        r["days_since_transplant"] = (today - date.fromisoformat(r["tx_date"])).days if r["tx_date"] else None
        h = halted_by_stream.get(r["subject"])
        r["halted"] = {k: h[k] for k in ("version", "position", "detail")} if h else None
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    t = Table("subject", "status", "epoch", "TX", "next visit (window)", "SLEDAI", "renal", "UPCR", "eGFR", "open AEs/SAEs",
              "stale")  # fmt: skip
    for r in rows:
        labs = r["key_labs"]
        window = f"{r['next_visit']} ({r['next_visit_earliest']}…{r['next_visit_latest']})" if r["next_visit"] else ""
        status_shown = f"{r['status']} (HALTED at v{r['halted']['version']})" if r["halted"] else r["status"]
        t.add_row(r["screening_number"], status_shown, r["epoch"], r["tx_date"] or "", window,
                  str(r["sledai_total"] if r["sledai_total"] is not None else ""), r["renal_response"] or "",
                  _display(labs["UPCR"]["value"]) if "UPCR" in labs else "",
                  _display(labs["EGFR"]["value"]) if "EGFR" in labs else "",
                  f"{r['open_adverse_events']}/{r['open_serious_adverse_events']}",
                  ", ".join(f"{x['code']} v{x['version']}" for x in r["stale_results"]))  # fmt: skip
    out.print(t)
    _print_halted_streams(halted)


def dashboard_cmd(
    as_json: bool = typer.Option(False, "--json"),
    db: Optional[str] = DbOption,
) -> None:
    """Enrollment by status and site, visit compliance, AEs by grade, lab completeness per visit, stale results."""
    from projections.dashboard import dashboard

    runner = _caught_up(db)
    with runner.engine.connect() as conn:
        data = dashboard(conn)
    runner.close()
    if as_json:
        print(json.dumps(data, indent=2, default=str))
        return
    for title, rows in data.items():
        if not rows:
            continue
        t = Table(*rows[0].keys(), title=title.replace("_", " "))
        for r in rows:
            t.add_row(*("" if v is None else escape(str(v)) for v in r.values()))
        out.print(t)
