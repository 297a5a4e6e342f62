"""`sle study`: create a study with its trust root, manage its key registry (admins) and its configuration
(sites, ICF versions, visit schedule, settings: data managers); `sle correct` / `sle void` (R11)."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import typer

from sle_events.cli.common import (
    DbOption,
    JsonOption,
    database_url,
    existing_database,
    fail,
    handled,
    new_app,
    out,
    parse_instant,
    print_json,
    print_table,
    signer,
    table,
)

study_app = new_app(no_args_is_help=True, help="Studies, their trust root, key registry and configuration.")

StudyOption = typer.Option(
    None, "--study", metavar="ID|CODE", help="study id or code (default: the database's only study)"
)
AdminKeyOption = typer.Option(..., "--admin-key", metavar="FILE", help="the admin's private key file (0600)")
AdminOption = typer.Option(..., "--admin", metavar="ID", help="the admin's user id")
KeyOption = typer.Option(..., "--key-file", metavar="FILE", help="your private key file (0600)")
ActorOption = typer.Option(..., "--actor", metavar="ID", help="your user id (the key is registered under it)")


def _role_option(default: str) -> Any:
    return typer.Option(default, "--role", metavar="ROLE", help=f"the role your key acts in (default {default})")


# ------------------------------------------------------------------------------------------------ studies
def list_studies(url: str) -> list[dict[str, Any]]:
    """Every study in the record: id, code, title, trust-root admin, created at (from its signed Study.Created)."""
    from sqlalchemy import create_engine, select

    from sle_events.domain.event_types import stored_topics
    from sle_events.signing.envelope import open_sealed
    from sle_events.store.record import StudyRecord

    t = StudyRecord.events_table()
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            rows = (
                conn.execute(select(t.c.state).where(t.c.topic.in_(stored_topics("Study.Created"))).order_by(t.c.id))
                .scalars()
                .all()
            )
    finally:
        engine.dispose()
    studies = []
    for state in rows:
        env = open_sealed(bytes(state)).envelope
        p = env["payload"]
        studies.append(
            {
                "study": env["study"],
                "code": p.get("code"),
                "title": p.get("title"),
                "admin": p.get("admin_actor"),
                "created_at": env["recorded_at"],
            }
        )
    return studies


def _study_id(url: str, given: str | None) -> UUID:
    """`--study` as an id: a UUID, a code, or (when omitted) the database's only study; exit 2 otherwise."""
    studies = list_studies(url)
    known = ", ".join(f"{s['code']} ({s['study']})" for s in studies) or "none"
    if given is None:
        if len(studies) == 1:
            return UUID(studies[0]["study"])
        fail(f"--study is needed: this database holds {len(studies)} studies: {known}")
    for s in studies:
        if given in (s["study"], s["code"]):
            return UUID(s["study"])
    fail(f"no study {given!r} in this database; studies: {known} (`sle study list`)")


def _done(as_json: bool, doc: dict[str, Any], message: str) -> None:
    if as_json:
        print_json(doc)
    else:
        out.print(message)


@study_app.command("list")
def list_cmd(db: str | None = DbOption, as_json: bool = JsonOption) -> None:
    """The studies in this database (id, code, title, trust-root admin)."""
    studies = list_studies(existing_database(db))
    if as_json:
        print_json(studies)
        return
    t = table("study", "code", "title", "admin", "created at (UTC)", title="studies")
    for s in studies:
        t.add_row(s["study"], s["code"], s["title"], s["admin"], s["created_at"])
    print_table(t)


@study_app.command("create")
def create(
    code: str = typer.Option(..., metavar="CODE", help="study code, e.g. ALLOMSC-SLE (unique in the database)"),
    title: str = typer.Option(..., metavar="TEXT", help="official title"),
    admin_key: Path = typer.Option(..., metavar="FILE", help="the admin's private key file: the study's trust root"),
    admin: str = AdminOption,
    printed_name: str | None = typer.Option(
        None, "--printed-name", metavar="NAME", help="the admin's printed name, shown beside what their key signs"
    ),
    db: str | None = DbOption,
) -> None:
    """Create a study whose trust root is the admin's public key; prints the study id (JSON)."""
    from sle_events.domain.study import Study
    from sle_events.store.record import StudyRecord

    url = database_url(db)
    key = signer(admin_key, admin, "admin")
    if not _record_absent(url):
        same = [s for s in list_studies(url) if s["code"] == code]
        if same:
            fail(
                f"this database already holds study {code} ({same[0]['study']}); choose another --code "
                "(`sle study list`)"
            )
    with handled():
        record = StudyRecord(url)
        try:
            study = Study.create(
                code, title, admin, key.public_key_b64, datetime.now(UTC), admin_printed_name=printed_name
            )
            record.record(study, signer=key)
        finally:
            record.close()
    print_json({"study": str(study.id), "code": code, "trust_root_key": key.key_id})


def _record_absent(url: str) -> bool:
    from sle_events.cli.common import no_record_at

    return no_record_at(url) is not None


def _on_study(
    db: str | None, study: str | None, key: Path, actor: str, role: str, change: Callable[[Any, datetime], Any]
) -> Any:
    """Load the study, apply `change`, record it signed by the key; typed errors become exit codes."""
    from sle_events.store.record import StudyRecord

    url = existing_database(db)
    study_id = _study_id(url, study)
    who = signer(key, actor, role)
    with handled():
        record = StudyRecord(url)
        try:
            aggregate = record.get(study_id)
            result = change(aggregate, datetime.now(UTC))
            record.record(aggregate, signer=who)
        finally:
            record.close()
    return result


# ------------------------------------------------------------------------------------------------ key registry
@study_app.command("approve-new")
def approve_new(
    study: str | None = StudyOption,
    code: str = typer.Option(..., metavar="CODE", help="code of the study to be created"),
    new_admin: str = typer.Option(..., metavar="ID", help="user id of the new study's admin"),
    new_admin_public_key: str = typer.Option(
        ..., metavar="KEY", help="base64 public key of the new study's trust root (as `sle keys generate` prints it)"
    ),
    admin_key: Path = AdminKeyOption,
    admin: str = AdminOption,
    db: str | None = DbOption,
    as_json: bool = JsonOption,
) -> None:
    """Approve creating another study in this database (a database's first study needs no approval; every later
    trust root does, signed and logged by an existing study's admin)."""
    if any(s["code"] == code for s in list_studies(existing_database(db))):
        fail(f"this database already holds a study {code}; a new study needs a code of its own")
    kid = _on_study(
        db,
        study,
        admin_key,
        admin,
        "admin",
        lambda s, now: s.approve_new_study(code, new_admin, new_admin_public_key, now),
    )
    _done(
        as_json,
        {"approved": code, "admin": new_admin, "key": kid},
        f"approved study {code} with trust-root key {kid} of {new_admin}; now: sle study create --code {code} ...",
    )


@study_app.command("register-key")
def register_key(
    study: str | None = StudyOption,
    actor: str = typer.Option(..., metavar="ID", help="user or service id of the key's holder"),
    role: str = typer.Option(..., metavar="ROLE", help="role the key acts in"),
    public_key: str = typer.Option(
        ..., metavar="KEY", help="base64 Ed25519 public key (as `sle keys generate` prints it)"
    ),
    printed_name: str | None = typer.Option(
        None,
        "--printed-name",
        metavar="NAME",
        help="the person's printed name, shown by the audit trail (21 CFR 11.50); needed for a person's key",
    ),
    service: bool = typer.Option(
        False, "--service", help="the key is a service's (a lab interface, a verifier): it has no printed name"
    ),
    admin_key: Path = AdminKeyOption,
    admin: str = AdminOption,
    db: str | None = DbOption,
    as_json: bool = JsonOption,
) -> None:
    """Register a person's public key with their printed name, or a service's (--service), in a role (a signed
    registry event)."""
    if service and printed_name is not None:
        fail("--printed-name is a person's; a --service key has none")
    if not service and (printed_name is None or not printed_name.strip()):
        fail(
            f"--printed-name is needed for a person's key (the audit trail shows it, 21 CFR 11.50), e.g. "
            f'--printed-name "Dr. Wang Li"; for a service\'s key ({actor}) give --service'
        )
    kid = _on_study(
        db,
        study,
        admin_key,
        admin,
        "admin",
        lambda s, now: s.register_key(actor, role, public_key, now, printed_name=printed_name),
    )
    who = f"{printed_name} ({actor})" if printed_name else actor
    _done(
        as_json,
        {"key": kid, "actor": actor, "role": role, "printed_name": printed_name},
        f"registered {role} key {kid} for {who}",
    )


@study_app.command("rotate-key")
def rotate_key(
    study: str | None = StudyOption,
    key: str = typer.Option(..., metavar="KEY_ID", help="id of the key being replaced"),
    public_key: str = typer.Option(..., metavar="KEY", help="the new base64 public key"),
    admin_key: Path = AdminKeyOption,
    admin: str = AdminOption,
    db: str | None = DbOption,
    as_json: bool = JsonOption,
) -> None:
    """Replace a key: the old one signs nothing new from here on."""
    kid = _on_study(db, study, admin_key, admin, "admin", lambda s, now: s.rotate_key(key, public_key, now))
    _done(as_json, {"rotated": key, "key": kid}, f"rotated key {key} to {kid}")


@study_app.command("revoke-key")
def revoke_key(
    study: str | None = StudyOption,
    key: str = typer.Option(..., metavar="KEY_ID", help="id of the key to revoke"),
    reason: str = typer.Option(..., metavar="TEXT", help="why (kept in the record)"),
    admin_key: Path = AdminKeyOption,
    admin: str = AdminOption,
    db: str | None = DbOption,
    as_json: bool = JsonOption,
) -> None:
    """Revoke a key: events it signed before stay valid, anything it signs after is refused. The study's last
    active admin key cannot be revoked (register another admin first)."""
    _on_study(db, study, admin_key, admin, "admin", lambda s, now: s.revoke_key(key, reason, now))
    _done(as_json, {"revoked": key}, f"revoked key {key}")


@study_app.command("keys")
def keys(study: str | None = StudyOption, db: str | None = DbOption, as_json: bool = JsonOption) -> None:
    """The key registry as it stands now."""
    from sle_events.store.record import StudyRecord

    url = existing_database(db)
    study_id = _study_id(url, study)
    with handled():
        record = StudyRecord(url)
        try:
            entries = [dict(e) for e in record.study(study_id).keys.values()]
        finally:
            record.close()
    if as_json:
        print_json(entries)
        return
    t = table("key", "actor", "printed name", "role", "status", title=f"key registry of study {study_id}")
    for e in entries:
        t.add_row(e["key"], e["actor"], e.get("printed_name") or "", e["role"], e["status"])
    print_table(t)


# ------------------------------------------------------------------------------------------------ configuration
@study_app.command("add-site")
def add_site(
    site: str = typer.Option(..., metavar="SITE_ID", help="site id, e.g. NJ01"),
    name: str = typer.Option(..., metavar="TEXT", help="the site's name"),
    timezone_: str = typer.Option(..., "--timezone", metavar="ZONE", help="IANA time zone, e.g. Asia/Shanghai"),
    study: str | None = StudyOption,
    key_file: Path = KeyOption,
    actor: str = ActorOption,
    role: str = _role_option("data_manager"),
    db: str | None = DbOption,
    as_json: bool = JsonOption,
) -> None:
    """Add a site that may screen subjects."""
    _on_study(db, study, key_file, actor, role, lambda s, now: s.add_site(site, name, timezone_, now))
    _done(as_json, {"site": site, "name": name, "timezone": timezone_}, f"added site {site} ({name}, {timezone_})")


@study_app.command("close-site")
def close_site(
    site: str = typer.Option(..., metavar="SITE_ID", help="site id"),
    reason: str = typer.Option(..., metavar="TEXT", help="why (kept in the record)"),
    study: str | None = StudyOption,
    key_file: Path = KeyOption,
    actor: str = ActorOption,
    role: str = _role_option("data_manager"),
    db: str | None = DbOption,
    as_json: bool = JsonOption,
) -> None:
    """Close a site: it screens no one from now on."""
    _on_study(db, study, key_file, actor, role, lambda s, now: s.close_site(site, reason, now))
    _done(as_json, {"closed": site, "reason": reason}, f"closed site {site}")


@study_app.command("approve-icf")
def approve_icf(
    version: str = typer.Option(..., metavar="TEXT", help="ICF version, e.g. 'ICF v1.1'"),
    effective_from: str = typer.Option(
        ..., metavar="TIME", help="from when consent is taken on it (ISO 8601 with offset)"
    ),
    study: str | None = StudyOption,
    key_file: Path = KeyOption,
    actor: str = ActorOption,
    role: str = _role_option("data_manager"),
    db: str | None = DbOption,
    as_json: bool = JsonOption,
) -> None:
    """Approve an ICF version; active subjects re-consent on it before their next procedure."""
    effective = parse_instant(effective_from, "--effective-from")
    _on_study(db, study, key_file, actor, role, lambda s, now: s.approve_icf_version(version, effective, now))
    _done(
        as_json,
        {"icf_version": version, "effective_from": effective_from},
        f"approved {version}, effective from {effective_from}",
    )


def _model_file(path: Path, model: Any, what: str) -> Any:
    from pydantic import ValidationError

    try:
        return model.model_validate_json(path.read_text(encoding="utf-8"))
    except OSError as e:
        fail(f"cannot read {what} {path}: {e.strerror}")
    except ValidationError as e:
        fail(f"{what} {path} is not valid: {e}")


@study_app.command("define-schedule")
def define_schedule(
    file: Path = typer.Option(..., "--file", metavar="FILE", help="the visit schedule as JSON (version, visits)"),
    study: str | None = StudyOption,
    key_file: Path = KeyOption,
    actor: str = ActorOption,
    role: str = _role_option("data_manager"),
    db: str | None = DbOption,
    as_json: bool = JsonOption,
) -> None:
    """Record a new version of the visit schedule (codes, VISITNUM, target days, windows)."""
    from sle_events.domain.study_config import VisitSchedule

    schedule = _model_file(file, VisitSchedule, "visit schedule")
    _on_study(db, study, key_file, actor, role, lambda s, now: s.define_visit_schedule(schedule, now))
    _done(
        as_json,
        {"schedule": schedule.version, "visits": len(schedule.visits)},
        f"visit schedule {schedule.version} defined ({len(schedule.visits)} visits)",
    )


@study_app.command("adopt-settings")
def adopt_settings(
    file: Path = typer.Option(
        ...,
        "--file",
        metavar="FILE",
        help="study settings as JSON (a new version label; unnamed settings keep the protocol defaults)",
    ),
    study: str | None = StudyOption,
    key_file: Path = KeyOption,
    actor: str = ActorOption,
    role: str = _role_option("data_manager"),
    db: str | None = DbOption,
    as_json: bool = JsonOption,
) -> None:
    """Adopt a new version of the study settings (windows, doses, bounds; PROTOCOL §9)."""
    from sle_events.domain.settings import StudySettings

    settings = _model_file(file, StudySettings, "settings")
    _on_study(db, study, key_file, actor, role, lambda s, now: s.adopt_settings(settings, now))
    _done(as_json, {"settings": settings.version}, f"settings {settings.version} adopted")


# ------------------------------------------------------------------------------------------------ R11
def _values(pairs: list[str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or not name.strip():
            fail(f"--set {pair!r}: write FIELD=VALUE, e.g. --set value=84")
        # Numbers stay text (decimals are exact strings, never floats); JSON objects, lists and literals are data.
        if text[:1] in "[{" or text in ("true", "false", "null"):
            try:
                values[name.strip()] = json.loads(text)
                continue
            except json.JSONDecodeError:
                fail(f"--set {pair!r}: the value is not valid JSON")
        values[name.strip()] = text
    return values


def _trial(url: str, study: str | None) -> Any:
    from sle_events.store.record import StudyRecord
    from sle_events.trial import Trial

    study_id = _study_id(url, study)
    return Trial(StudyRecord(url), study_id)


def correct(
    subject: str = typer.Option(..., metavar="SUBJECT", help="screening number or subject (stream) id"),
    version: int = typer.Option(..., min=1, metavar="N", help="the version (in the subject's stream) to correct"),
    set_: list[str] = typer.Option(..., "--set", metavar="FIELD=VALUE", help="a corrected value (repeatable)"),
    reason: str = typer.Option(..., metavar="TEXT", help="why (mandatory, kept in the record)"),
    study: str | None = StudyOption,
    key_file: Path = KeyOption,
    actor: str = ActorOption,
    role: str = _role_option("data_manager"),
    db: str | None = DbOption,
    as_json: bool = JsonOption,
) -> None:
    """Correct a recorded fact (R11): the original stays; the corrected values pass the same checks."""
    values = _values(set_)
    url = existing_database(db)
    who = signer(key_file, actor, role)
    with handled():
        trial = _trial(url, study)
        try:
            sid = trial.subject_id(subject)
            trial.correct(sid, version, values, reason, signer=who)
            new_version = trial.subject(sid).version
        finally:
            trial.record.close()
    _done(
        as_json,
        {"subject": str(sid), "corrected_version": version, "version": new_version, "new_values": values},
        f"corrected v{version} of {subject} (now at v{new_version})",
    )


def void(
    subject: str = typer.Option(..., metavar="SUBJECT", help="screening number or subject (stream) id"),
    version: int = typer.Option(..., min=1, metavar="N", help="the version (in the subject's stream) to void"),
    reason: str = typer.Option(..., metavar="TEXT", help="why (mandatory, kept in the record)"),
    study: str | None = StudyOption,
    key_file: Path = KeyOption,
    actor: str = ActorOption,
    role: str = _role_option("data_manager"),
    db: str | None = DbOption,
    as_json: bool = JsonOption,
) -> None:
    """Void a fact entered in error (R11): the original stays, marked void."""
    url = existing_database(db)
    who = signer(key_file, actor, role)
    with handled():
        trial = _trial(url, study)
        try:
            sid = trial.subject_id(subject)
            trial.void(sid, version, reason, signer=who)
            new_version = trial.subject(sid).version
        finally:
            trial.record.close()
    _done(
        as_json,
        {"subject": str(sid), "voided_version": version, "version": new_version},
        f"voided v{version} of {subject} (now at v{new_version})",
    )
