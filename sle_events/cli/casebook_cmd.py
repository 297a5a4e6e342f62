"""`sle sign` (the investigator's sign-off, and `--pending`: what awaits it), `sle lock` and `sle unlock` (the data
manager's freeze, lock and audited unlock). See docs/regulated-acts.md."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer

from sle_events.cli.common import (
    DbOption,
    JsonOption,
    err,
    existing_database,
    fail,
    handled,
    out,
    print_json,
    print_table,
    signer,
    table,
)
from sle_events.cli.study_cmd import ActorOption, StudyOption, _done, _role_option, _trial

PassphraseStdinOption = typer.Option(
    False,
    "--passphrase-stdin",
    help="read the key file's passphrase from the first line of standard input (scripts); otherwise it is asked "
    "for, hidden, at each signing",
)


def _passphrase(from_stdin: bool, prompt: str = "passphrase of your key file") -> str:
    if from_stdin:
        line = sys.stdin.readline().rstrip("\r\n")
        if not line:
            fail("--passphrase-stdin: standard input holds no passphrase")
        return line
    if not sys.stdin.isatty():
        fail("the passphrase is asked for on a terminal; in a script give --passphrase-stdin")
    return str(typer.prompt(prompt, hide_input=True, err=True))


def _protected_signer(key: Path, actor: str, role: str, passphrase: str) -> Any:
    """The key file opened with its passphrase (the second component of the signature, 11.200)."""
    from sle_events.signing.keys import PassphraseRequired, Signer, WrongPassphrase

    try:
        return Signer.from_file(key, actor, role, passphrase=passphrase)
    except (WrongPassphrase, PassphraseRequired) as e:
        fail(f"refused: {type(e).__name__}: {e}; nothing was signed", 1)
    except (OSError, ValueError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        fail(f"cannot use {role} key {key}: {why}")


def _short_time(text: str) -> str:
    """`2010-12-30T07:00:00+00:00` as `2010-12-30 07:00+00:00` (80 columns; --json keeps the full time)."""
    return f"{text[:10]} {text[11:16]}{text[-6:] if text[-6] in '+-' else ''}"


def _read(url: str, fn: Any, **kwargs: Any) -> Any:
    from projections.read import StudyReader

    with handled(), StudyReader(url) as reader, reader.engine.connect() as conn:
        return fn(conn, **kwargs)


def sign(
    subject: str | None = typer.Option(None, metavar="SUBJECT", help="screening number or subject id to sign off"),
    visit: str | None = typer.Option(
        None, metavar="VISIT", help="sign off one visit (e.g. M12) instead of the casebook"
    ),
    meaning: str = typer.Option(
        "review",
        metavar="MEANING",
        help="the signature's meaning (the study's SignatureDefs): review, approval, responsibility",
    ),
    pending: bool = typer.Option(False, "--pending", help="list the subjects awaiting (re-)signing instead"),
    study: str | None = StudyOption,
    key_file: Path | None = typer.Option(None, "--key-file", metavar="FILE", help="your passphrase-encrypted key file"),
    actor: str | None = typer.Option(None, "--actor", metavar="ID", help="your user id (the first component)"),
    role: str = _role_option("investigator"),
    passphrase_stdin: bool = PassphraseStdinOption,
    db: str | None = DbOption,
    as_json: bool = JsonOption,
) -> None:
    """Sign off a subject's casebook (or one visit), bound to the content hash of exactly the data signed; the
    key file's passphrase is asked for at each signing. `--pending`: the investigator's work list."""
    url = existing_database(db)
    if pending:
        from projections.casebook import pending_signoffs

        rows = _read(url, pending_signoffs)
        if as_json:
            print_json(rows)
            return
        t = table("subject", "site", "status", "last signed", "lock", title="awaiting sign-off")
        for r in rows:
            last = f"{r['signed_by']}, {_short_time(r['signed_at'])}" if r["signed_by"] else ""
            t.add_row(r["screening_number"], r["site"], r["signoff_status"], last, r["level"] or "")
        print_table(t)
        return
    if subject is None or key_file is None or actor is None:
        fail("sle sign needs --subject, --key-file and --actor (or --pending for the work list)")
    from sle_events.domain.casebook import SIGNATURE_DEFS, Casebook

    if meaning not in SIGNATURE_DEFS:
        fail(f"--meaning {meaning!r}: one of {', '.join(SIGNATURE_DEFS)}")
    who = _protected_signer(key_file, actor, role, _passphrase(passphrase_stdin))
    with handled():
        trial = _trial(url, study)
        try:
            sid = trial.subject_id(subject)
            version = trial.sign_off(sid, signer=who, meaning=meaning, visit=visit)
            book = trial.record.stream(Casebook.id_for(trial.study_id, sid))[-1].envelope
        finally:
            trial.record.close()
    p = book["payload"]
    _done(
        as_json,
        {
            "subject": str(sid),
            "signoff": f"{book['stream']}:{version}",
            "scope": p["scope"],
            "visit": p["visit"],
            "meaning": p["meaning"],
            "signature_def": p["signature_def"],
            "printed_name": p["printed_name"],
            "signed_at": book["occurred_at"],
            "covers": p["covers"],
            "content_hash": p["content_hash"],
        },
        f"signed off ({p['meaning']}) {subject}{' visit ' + visit if visit else ''} as {p['printed_name']} at "
        f"{book['occurred_at']}: content hash {p['content_hash'][:16]}…",
    )


def lock(
    subject: str | None = typer.Option(
        None, metavar="SUBJECT", help="screening number or subject id (default: the study)"
    ),
    freeze: bool = typer.Option(False, "--freeze", help="freeze instead of lock (open queries do not block it)"),
    reason: str | None = typer.Option(None, metavar="TEXT", help="why (kept in the record)"),
    status: bool = typer.Option(False, "--status", help="show what is frozen or locked, and every lock and unlock"),
    study: str | None = StudyOption,
    key_file: Path | None = typer.Option(None, "--key-file", metavar="FILE", help="your private key file (0600)"),
    actor: str | None = typer.Option(None, "--actor", metavar="ID", help="your user id"),
    role: str = _role_option("data_manager"),
    db: str | None = DbOption,
    as_json: bool = JsonOption,
) -> None:
    """Lock (or --freeze) a subject or the whole study: new clinical facts are refused until an audited unlock;
    an SAE can still be reported (flagged). A lock waits for every query to be closed."""
    url = existing_database(db)
    if status:
        _lock_status(url, subject, as_json)
        return
    if key_file is None or actor is None:
        fail("sle lock needs --key-file and --actor (or --status)")
    who = signer(key_file, actor, role)
    level = "frozen" if freeze else "locked"
    with handled():
        trial = _trial(url, study)
        try:
            act = trial.freeze if freeze else trial.lock
            act(subject, signer=who, reason=reason)
        finally:
            trial.record.close()
    what = subject or "the study"
    _done(as_json, {"subject": subject, "level": level, "reason": reason}, f"{what} {level}")


def unlock(
    subject: str | None = typer.Option(
        None, metavar="SUBJECT", help="screening number or subject id (default: the study)"
    ),
    reason: str = typer.Option(..., metavar="TEXT", help="why (mandatory, kept in the record and the audit trail)"),
    study: str | None = StudyOption,
    key_file: Path = typer.Option(..., "--key-file", metavar="FILE", help="your private key file (0600)"),
    actor: str = ActorOption,
    role: str = _role_option("data_manager"),
    db: str | None = DbOption,
    as_json: bool = JsonOption,
) -> None:
    """Unlock (or unfreeze) a subject or the study, with a reason; sign-offs made before are invalidated."""
    url = existing_database(db)
    who = signer(key_file, actor, role)
    with handled():
        trial = _trial(url, study)
        try:
            trial.unlock(subject, signer=who, reason=reason)
        finally:
            trial.record.close()
    what = subject or "the study"
    _done(
        as_json,
        {"subject": subject, "level": None, "reason": reason},
        f"{what} unlocked: {reason} (earlier sign-offs now need re-signing)",
    )


def _lock_status(url: str, subject: str | None, as_json: bool) -> None:
    from projections.casebook import casebook_rows, lock_rows

    states = _read(url, casebook_rows, subject=subject)
    history = _read(url, lock_rows, subject=subject)
    if subject is not None and not states:
        fail(f"unknown subject {subject!r} (give a screening number)")
    if as_json:
        print_json({"subjects": states, "history": history})
        return
    t = table("subject", "level", "sign-off", "flags", title="frozen or locked")
    for r in states:
        if r["level"] or r["flags"]:
            t.add_row(r["screening_number"], r["level"] or "", r["signoff_status"], "; ".join(r["flags"]))
    print_table(t)
    h = table("at", "what", "action", "by", "reason", title="locks and unlocks")
    for r in history:
        h.add_row(
            _short_time(r["at"]), r["screening_number"] or "the study", r["action"], r["actor"], r["reason"] or ""
        )
    print_table(h)
    if not history:
        err.print("nothing was ever frozen or locked")
    out.file.flush()
