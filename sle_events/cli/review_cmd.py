"""`sle sdv`, `sle query raise|answer|close|reopen|auto` and `sle queries`: source data verification and queries,
for the monitors, data managers and site staff doing them (sle_events/domain/review.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from sle_events.cli.common import (
    DbOption,
    JsonOption,
    existing_database,
    fail,
    handled,
    new_app,
    out,
    print_json,
    print_table,
    signer,
    table,
)
from sle_events.cli.study_cmd import ActorOption, KeyOption, StudyOption, _role_option, _trial

query_app = new_app(no_args_is_help=True, help="Queries on the record: raise, answer, close, re-open, automatic.")

SubjectOption = typer.Option(..., "--subject", metavar="SUBJECT", help="screening number or subject (stream) id")
QueryIdOption = typer.Option(..., "--id", metavar="QUERY", help="the query's id (sle queries lists them)")
TextOption = typer.Option(..., "--text", metavar="TEXT", help="what you say (kept in the record)")


def _reader(db: str | None) -> Any:
    from sle_events.cli.projections_cmd import _reader as reader

    return reader(db)


def _act(db: str | None, study: str | None, work: Any) -> Any:
    url = existing_database(db)
    with handled():
        trial = _trial(url, study)
        try:
            return work(trial)
        finally:
            trial.record.close()


# --------------------------------------------------------------------------------------------------- SDV
def sdv(
    subject: str | None = typer.Option(None, "--subject", metavar="SUBJECT", help="screening number or id"),
    version: list[int] | None = typer.Option(
        None, "--version", min=1, metavar="N", help="a fact (its version in the subject's stream) to mark verified"
    ),
    field: str | None = typer.Option(None, "--field", metavar="FIELD", help="only this field of each fact"),
    visit: str | None = typer.Option(None, "--visit", metavar="VISIT", help="every source-data fact of a visit"),
    pending: bool = typer.Option(False, "--pending", help="the work list: facts not verified (or changed since)"),
    by: str = typer.Option("subject", "--by", metavar="subject|visit|site", help="progress grouped by"),
    key_file: Path | None = typer.Option(None, "--key-file", metavar="FILE", help="your private key (to mark)"),
    actor: str | None = typer.Option(None, "--actor", metavar="ID", help="your user id (to mark)"),
    role: str = _role_option("monitor"),
    study: str | None = StudyOption,
    db: str | None = DbOption,
    as_json: bool = JsonOption,
) -> None:
    """Source data verification. With --key-file: mark facts (--version, repeatable; --field) or a --visit of
    --subject verified. Without: SDV progress (--by), or with --pending the facts still to verify."""
    marking = key_file is not None or actor is not None or version or visit is not None
    if marking:
        if key_file is None or actor is None:
            fail("marking facts verified needs --key-file and --actor")
        if subject is None or not (version or visit):
            fail("say what to mark: --subject with --version N (repeatable) or --visit VISIT")
        if pending:
            fail("--pending lists the work; it does not go with marking")
        who = signer(key_file, actor, role)
        marks = _act(
            db,
            study,
            lambda t: t.verify_source(subject, version or [], field=field, visit=visit, signer=who),
        )
        doc = {"subject": subject, "verified": [m.model_dump() for m in marks]}
        if as_json:
            print_json(doc)
        else:
            shown = ", ".join(f"v{m.version}" + (f" {m.field}" if m.field else "") for m in marks)
            out.print(f"verified {len(marks)} of {escape(subject)}: {escape(shown)}")
        return
    reader = _reader(db)
    try:
        with handled():
            rows = reader.sdv(subject=subject, pending=True) if pending else reader.sdv_progress(by, subject=subject)
    finally:
        reader.close()
    if as_json:
        print_json(rows)
        return
    if pending:
        t = table("subject", "site", "visit", "version", "fact", "status", title="SDV pending")
        for r in rows:
            status = r["status"].replace("_SINCE_VERIFIED", "")  # CHANGED (since verified): 80 columns
            if r["changed_fields"]:
                status += f" ({', '.join(r['changed_fields'])})"
            t.add_row(r["screening_number"], r["site"], r["visit"] or "", f"v{r['version']}", r["type"], status)
        print_table(t)
        return
    t = table(by, "facts", "verified", "changed", "partial", "pending", "% verified", title=f"SDV progress by {by}")
    for r in rows:
        t.add_row(
            str(r[by]),
            str(r["total"]),
            str(r["VERIFIED"]),
            str(r["CHANGED_SINCE_VERIFIED"]),
            str(r["PARTIAL"]),
            str(r["PENDING"]),
            r["verified_pct"],
        )
    print_table(t)


# --------------------------------------------------------------------------------------------------- queries
def _query_done(as_json: bool, doc: dict[str, Any], message: str) -> None:
    if as_json:
        print_json(doc)
    else:
        out.print(escape(message))


@query_app.command("raise")
def raise_query(
    subject: str = SubjectOption,
    version: int = typer.Option(..., "--version", min=1, metavar="N", help="the fact queried (its version)"),
    text: str = TextOption,
    field: str | None = typer.Option(None, "--field", metavar="FIELD", help="the field queried"),
    key_file: Path = KeyOption,
    actor: str = ActorOption,
    role: str = _role_option("monitor"),
    study: str | None = StudyOption,
    db: str | None = DbOption,
    as_json: bool = JsonOption,
) -> None:
    """Raise a query on a fact (and field) of a subject's record (monitor, data manager)."""
    who = signer(key_file, actor, role)
    qid = _act(db, study, lambda t: t.raise_query(subject, version, text, field=field, signer=who))
    _query_done(
        as_json,
        {"query": str(qid), "subject": subject, "version": version, "field": field, "status": "OPEN"},
        f"raised query {qid} on v{version}{' ' + field if field else ''} of {subject}",
    )


def _on_query(verb: str, status: str, default_role: str) -> Any:
    def command(
        query: str = QueryIdOption,
        text: str = TextOption,
        key_file: Path = KeyOption,
        actor: str = ActorOption,
        role: str = _role_option(default_role),
        study: str | None = StudyOption,
        db: str | None = DbOption,
        as_json: bool = JsonOption,
    ) -> None:
        who = signer(key_file, actor, role)
        _act(db, study, lambda t: getattr(t, f"{verb}_query")(query, text, signer=who))
        _query_done(as_json, {"query": query, "status": status}, f"query {query}: {status}")

    return command


answer_cmd = _on_query("answer", "ANSWERED", "coordinator")
answer_cmd.__doc__ = "Answer a query (site staff: coordinator, investigator)."
close_cmd = _on_query("close", "CLOSED", "monitor")
close_cmd.__doc__ = "Close a query (its raiser; an automatic query also a data manager)."
reopen_cmd = _on_query("reopen", "OPEN", "monitor")
reopen_cmd.__doc__ = "Re-open a closed query (its raiser; an automatic query also a data manager)."
query_app.command("answer")(answer_cmd)
query_app.command("close")(close_cmd)
query_app.command("reopen")(reopen_cmd)


@query_app.command("auto")
def auto_queries(
    key_file: Path = KeyOption,
    actor: str = ActorOption,
    role: str = _role_option("data_manager"),
    study: str | None = StudyOption,
    db: str | None = DbOption,
    as_json: bool = JsonOption,
) -> None:
    """Raise the record's automatic queries (stale derived results, out-of-window visits, flagged values) and
    close those whose cause is gone. Idempotent: run it from cron with the study's checking service key."""
    from sle_events.cli.common import progress

    who = signer(key_file, actor, role)

    def work(t: Any) -> dict[str, list[Any]]:
        subjects = t._subject_streams()
        done: dict[str, list[Any]] = {"raised": [], "closed": [], "reopened": []}
        with progress("checking subjects", not as_json) as bar:
            task = bar.add_task("auto", total=len(subjects))
            for sid in subjects:
                for k, v in t.run_automatic_queries(signer=who, subjects=[sid]).items():
                    done[k] += v
                bar.advance(task)
        return done

    done = _act(db, study, work)
    doc = {k: [str(q) for q in v] for k, v in done.items()}
    _query_done(
        as_json,
        doc,
        f"automatic queries: {len(doc['raised'])} raised, {len(doc['closed'])} closed, "
        f"{len(doc['reopened'])} re-opened",
    )


def queries_cmd(
    open_only: bool = typer.Option(False, "--open", help="only queries not closed (the work list)"),
    subject: str | None = typer.Option(None, "--subject", metavar="SUBJECT", help="screening number or id"),
    status: str | None = typer.Option(None, "--status", metavar="STATUS", help="OPEN, ANSWERED or CLOSED"),
    db: str | None = DbOption,
    as_json: bool = JsonOption,
) -> None:
    """Queries, in the order raised (brings the read models up to date first)."""
    reader = _reader(db)
    try:
        with handled():
            rows = reader.queries(subject=subject, status=status, open_only=open_only)
    finally:
        reader.close()
    if as_json:
        print_json(rows)
        return
    if not rows:
        out.print("queries: " + ("none matched" if (open_only or subject or status) else "none"))
        return
    # One block per query (a table of seven columns does not fit 80 columns): what, where, state, then the text.
    for r in rows:
        target = f"v{r['version']} {r['fact']}" + (f".{r['field']}" if r["field"] else "")
        raiser = r["raised_by"] + (" (automatic)" if r["cause"] else "")
        out.print(
            f"[bold]{r['query_id'][:8]}[/bold]  {escape(r['screening_number'])}  {escape(target)}  "
            f"[bold]{r['status']}[/bold]"
        )
        out.print(f"    raised by {escape(raiser)} {r['raised_at'][:10]}: {escape(r['text'])}", highlight=False)
        if r["last_act"] != "raised":
            out.print(f"    {r['last_act']} by {escape(r['last_by'])}: {escape(r['last_text'])}", highlight=False)
    out.print(f"{len(rows)} queries", highlight=False)
