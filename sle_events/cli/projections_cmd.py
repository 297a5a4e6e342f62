"""`sle db`, `sle projections`, `sle audit-trail`: schema, read models and what auditors read."""

from __future__ import annotations

import csv
import io
import signal
from typing import Any

import typer
from rich.markup import escape

from sle_events.cli.common import (
    DbOption,
    JsonOption,
    database_url,
    err,
    existing_database,
    fail,
    handled,
    new_app,
    out,
    parse_instant,
    print_json,
    print_table,
    progress,
    table,
    write_stdout,
)

db_app = new_app(help="Database schema (Alembic revisions in migrations/).")
projections_app = new_app(help="Read models built from the signed events.")


@db_app.command("upgrade")
def db_upgrade(
    db: str | None = DbOption,
    revision: str = typer.Argument("head", metavar="REVISION", help="revision to upgrade to (default: head)"),
) -> None:
    """Apply schema revisions up to REVISION (default head)."""
    from sle_events import schema

    url = database_url(db)
    with handled():
        schema.upgrade(url, revision)
        out.print(f"database at revision {schema.current(url)}")


def _runner(db: str | None) -> Any:
    from projections.runner import ProjectionRunner

    url = existing_database(db)
    with handled():
        return ProjectionRunner(url)


@projections_app.command("status")
def projections_status(db: str | None = DbOption, as_json: bool = JsonOption) -> None:
    """Each projection's position in the log and how far behind it is."""
    runner = _runner(db)
    rows = runner.status()
    runner.close()
    if as_json:
        print_json(rows)
        return
    t = table("projection", "position", "head", "lag (events)", "updated at", "halted", title="projections")
    for r in rows:
        t.add_row(
            str(r["projection"]),
            str(r["position"]),
            str(r["head"]),
            str(r["lag_events"]),
            str(r["updated_at"]),
            escape(str(r["halted"] or "")),
        )
    print_table(t)
    _print_halted_streams([dict(s, projection=r["projection"]) for r in rows for s in r["halted_streams"]])


def _print_halted_streams(rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    t = table(
        *(["projection"] if "projection" in rows[0] else []),
        "subject",
        "stream",
        "version",
        "log position",
        "why",
        title="halted streams (rows as of the version before)",
    )
    for r in rows:
        t.add_row(
            *([r["projection"]] if "projection" in r else []),
            r["subject"] or "",
            r["stream"],
            str(r["version"]),
            str(r["position"]),
            escape(r["detail"]),
        )
    out.print(t)


@projections_app.command("rebuild")
def projections_rebuild(
    name: list[str] | None = typer.Argument(None, metavar="[NAME]...", help="projections to rebuild (default: all)"),
    db: str | None = DbOption,
    verify: bool = typer.Option(False, "--verify", help="re-verify every signature first (slower)"),
    workers: int | None = typer.Option(None, min=1, metavar="N", help="processes to use (default: all cores)"),
) -> None:
    """Drop and rebuild projections from event 1 (checking every event's chain and signature)."""
    from projections.base import ProjectionHalted
    from projections.runner import RebuildFailed

    if verify:
        from sle_events.audit.verifier import verify_record

        report = verify_record(existing_database(db))
        if not report.ok:
            fail(f"verification found {len(report.findings)} problems; not rebuilding", 1)
    runner = _runner(db)
    try:
        with progress("rebuilding") as bar:
            task = bar.add_task("rebuild", total=runner.head())
            runner.rebuild(
                name or None, on_progress=lambda d, t: bar.update(task, completed=d, total=t), workers=workers
            )
    except (ProjectionHalted, RebuildFailed) as e:
        fail(str(e), 1)
    except ValueError as e:
        fail(str(e), 2)
    finally:
        runner.close()
    out.print("rebuilt: " + ", ".join(p.name for p in runner.projections if not name or p.name in name))


@projections_app.command("run")
def projections_run(
    db: str | None = DbOption,
    poll: float = typer.Option(0.5, min=0.01, metavar="SECONDS", help="SQLite poll interval"),
) -> None:
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
        fail(str(e), 1)
    finally:
        runner.close()


def _reader(db: str | None) -> Any:
    """The read models of an existing study record, brought up to date (halted: exit 1 saying where and why)."""
    from projections.read import StudyReader

    url = existing_database(db)
    with handled():
        return StudyReader(url)


def audit_trail(
    subject: str | None = typer.Option(None, metavar="SCREENING_NO", help="a subject's screening number"),
    stream: str | None = typer.Option(None, metavar="UUID", help="stream (aggregate) id"),
    user: str | None = typer.Option(None, metavar="ID", help="actor (user or service) id"),
    event_type: str | None = typer.Option(None, "--type", metavar="TYPE", help="e.g. Subject.LabResultRecorded"),
    since: str | None = typer.Option(
        None,
        metavar="TIME",
        help="recorded at or after this instant (ISO 8601 with its offset, e.g. 2008-03-01T00:00:00+08:00)",
    ),
    until: str | None = typer.Option(
        None, metavar="TIME", help="recorded at or before this instant (ISO 8601 with its offset)"
    ),
    change: str | None = typer.Option(None, metavar="KIND", help="recorded, corrected or voided"),
    fmt: str = typer.Option("table", "--format", metavar="FORMAT", help="table, csv or json"),
    db: str | None = DbOption,
) -> None:
    """Who changed what, when (occurred and recorded, UTC), why, old → new value, and the signature status."""
    from projections.audit_trail import CHANGES
    from projections.read import AUDIT_COLUMNS

    if fmt not in ("table", "csv", "json"):
        fail(f"--format is table, csv or json, not {fmt!r}")
    if change is not None and change not in CHANGES:
        fail(f"--change is {', '.join(CHANGES)}, not {change!r}")
    start, end = parse_instant(since, "--since"), parse_instant(until, "--until")
    reader = _reader(db)
    try:
        with handled():
            rows = reader.audit_trail(
                subject=subject, stream=stream, user=user, event_type=event_type, since=start, until=end, change=change
            )
    finally:
        reader.close()
    if fmt == "json":
        print_json(rows)
    elif fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else list(AUDIT_COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
        write_stdout(buffer.getvalue())
    else:
        t = table(
            "recorded at (UTC)", "subject", "visit", "item", "change", "old → new", "who", "reason", title="audit trail"
        )
        for r in rows:
            who = r["printed_name"] if r["printed_name"] == r["actor"] else f"{r['printed_name']} ({r['actor']})"
            t.add_row(
                r["recorded_at"],
                r["subject"] or "",
                r["visit"] or "",
                escape(r["item"] or ""),
                r["change"],
                escape(f"{r['old_value'] or ''} → {r['new_value'] or ''}"),
                escape(f"{who}, {r['role']}"),
                escape(r["reason"] or ""),
            )
        print_table(t, "none matched")


def replay(
    subject: str = typer.Option(..., metavar="SUBJECT", help="screening number or subject (stream) id"),
    as_of: str | None = typer.Option(
        None, "--as-of", metavar="TIME", help="what the database said at this recorded time (ISO 8601 with offset)"
    ),
    occurred_as_of: str | None = typer.Option(
        None, "--occurred-as-of", metavar="TIME", help="what was true in the clinic then, given today's knowledge"
    ),
    as_json: bool = JsonOption,
    db: str | None = DbOption,
) -> None:
    """A subject's state as of a past moment, on either time axis (bitemporal)."""
    when, occurred = parse_instant(as_of, "--as-of"), parse_instant(occurred_as_of, "--occurred-as-of")
    from projections.read import StudyReader, display_value

    url = existing_database(db)
    with handled():
        reader = StudyReader(url, catch_up=False)
        try:
            state = reader.replay(subject, as_of=when, occurred_as_of=occurred)
        finally:
            reader.close()
    if as_json:
        print_json(state)
        return
    moment = (
        " / ".join(
            x
            for x in (f"recorded {as_of}" if as_of else "", f"occurred {occurred_as_of}" if occurred_as_of else "")
            if x
        )
        or "now"
    )
    t = table("field", "value", title=f"subject {state['screening_number']} as of {moment}")
    for k, v in state.items():
        if k in ("flags", "stale_results"):
            t.add_row(k, escape(", ".join(map(str, v))) or "none")
        elif k != "key_labs":
            t.add_row(k, "" if v is None else escape(str(v)))
    for code, lab in sorted(state["key_labs"].items()):
        t.add_row(
            code,
            escape(f"{display_value(code, lab['value'])} {lab['unit']} ({lab['trend'] or 'first'}) at {lab['at']}"),
        )
    out.print(t)


def patients(
    status: str | None = typer.Option(None, metavar="STATUS", help="only subjects in this state, e.g. IN_FOLLOW_UP"),
    as_json: bool = JsonOption,
    db: str | None = DbOption,
) -> None:
    """Current patient state of every subject (brings the projection up to date first)."""
    from projections.read import display_value

    reader = _reader(db)
    try:
        with handled():
            rows = reader.patients(status=status)
            halted = reader.halted_streams()
    finally:
        reader.close()
    if as_json:
        print_json(rows)
        return
    t = table(
        "subject",
        "status",
        "next visit (window)",
        "SLEDAI-2K",
        "renal response",
        "UPCR (mg/mg)",
        "eGFR (mL/min/1.73 m²)",
        "open AEs (SAEs)",
        "stale results",
        title="patients",
    )
    for r in rows:
        labs = r["key_labs"]
        window = f"{r['next_visit']} ({r['next_visit_earliest']} – {r['next_visit_latest']})" if r["next_visit"] else ""
        status_shown = f"{r['status']} (HALTED at v{r['halted']['version']})" if r["halted"] else r["status"]
        book = r.get("casebook") or {}
        if book.get("level") or book.get("signoff_status") == "needs re-signing":  # sign-off and lock
            status_shown += f" ({', '.join(x for x in (book.get('level'), book.get('signoff_status')) if x)})"
        t.add_row(
            r["screening_number"],
            status_shown,
            window,
            str(r["sledai_total"] if r["sledai_total"] is not None else ""),
            r["renal_response"] or "",
            display_value("UPCR", labs["UPCR"]["value"]) if "UPCR" in labs else "",
            display_value("EGFR", labs["EGFR"]["value"]) if "EGFR" in labs else "",
            f"{r['open_adverse_events']} ({r['open_serious_adverse_events']})",
            ", ".join(f"{x['code']} v{x['version']}" for x in r["stale_results"]),
        )
    print_table(t, "none matched" if status else "none")
    _print_halted_streams(halted)


def dashboard_cmd(as_json: bool = JsonOption, db: str | None = DbOption) -> None:
    """Enrollment by status and site, visit compliance, AEs by grade, lab completeness per visit, stale results."""
    reader = _reader(db)
    try:
        with handled():
            data = reader.dashboard()
    finally:
        reader.close()
    if as_json:
        print_json(data)
        return
    for title, rows in data.items():
        if not rows:
            out.print(f"{title.replace('_', ' ')}: none")
            continue
        t = table(*rows[0].keys(), title=title.replace("_", " "))
        for r in rows:
            t.add_row(*("" if v is None else escape(str(v)) for v in r.values()))
        out.print(t)
