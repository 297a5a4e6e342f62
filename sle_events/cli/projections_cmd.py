"""`sle db`, `sle projections`, `sle audit-trail`: schema, read models and what auditors read."""

from __future__ import annotations

import csv
import json
import signal
import sys
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from sle_events.store.record import database_url

err = Console(stderr=True)
out = Console()
DbOption = typer.Option(None, "--db", help="SQLAlchemy URL (default: $SLE_DATABASE_URL or ./sle-study.db)")

db_app = typer.Typer(help="Database schema (Alembic revisions in migrations/).")
projections_app = typer.Typer(help="Read models built from the signed events.")


@db_app.command("upgrade")
def db_upgrade(db: Optional[str] = DbOption, revision: str = typer.Argument("head")) -> None:
    """Apply schema revisions up to REVISION (default head)."""
    from sle_events.store import schema

    url = database_url(db)
    schema.upgrade(url, revision)
    out.print(f"database at revision {schema.current(url)}")


def _runner(db: Optional[str]):  # type: ignore[no-untyped-def]
    from projections.runner import ProjectionRunner

    return ProjectionRunner(database_url(db))


@projections_app.command("status")
def projections_status(db: Optional[str] = DbOption, as_json: bool = typer.Option(False, "--json")) -> None:
    """Each projection's position in the log and how far behind it is."""
    runner = _runner(db)
    rows = runner.status()
    runner.close()
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    t = Table("projection", "position", "head", "lag (events)", "updated at")
    for r in rows:
        t.add_row(str(r["projection"]), str(r["position"]), str(r["head"]), str(r["lag_events"]), str(r["updated_at"]))
    out.print(t)


@projections_app.command("rebuild")
def projections_rebuild(
    name: Optional[list[str]] = typer.Argument(None, help="projections to rebuild (default: all)"),
    db: Optional[str] = DbOption,
    verify: bool = typer.Option(False, "--verify", help="re-verify every signature first (slower)"),
) -> None:
    """Drop and rebuild projections from event 1."""
    url = database_url(db)
    if verify:
        from sle_events.store.verification import verify_record

        report = verify_record(url)
        if not report.ok:
            err.print(f"[red]verification found {len(report.findings)} problems; not rebuilding[/red]")
            raise typer.Exit(1)
    from projections.base import ProjectionHalted
    from sle_events.cli.main import _progress

    runner = _runner(db)
    try:
        with _progress("rebuilding", err.is_terminal) as bar:
            task = bar.add_task("rebuild", total=runner.head())
            runner.rebuild(name or None, on_progress=lambda d, t: bar.update(task, completed=d, total=t))
    except ProjectionHalted as e:
        err.print(f"[red]{e}[/red]")
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
        err.print(f"[red]{e}[/red]")
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
    fmt: str = typer.Option("table", "--format", help="table, csv or json"),
    db: Optional[str] = DbOption,
) -> None:
    """Who changed what, when (occurred and recorded), why, old → new value, and the signature status."""
    from projections.audit_trail import query

    if fmt not in ("table", "csv", "json"):
        err.print("[red]--format is table, csv or json[/red]")
        raise typer.Exit(2)
    runner = _runner(db)
    runner.catch_up()
    with runner.engine.connect() as conn:
        rows = query(conn, subject=subject, stream=stream, actor=user, event_type=event_type, since=since, until=until)
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
