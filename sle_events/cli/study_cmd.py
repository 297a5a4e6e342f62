"""`sle study`: create a study with its trust root, and manage its key registry (admins)."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional
from uuid import UUID

import typer
from rich.console import Console
from rich.table import Table

from sle_events.store.url import database_url

err = Console(stderr=True)
out = Console()
DbOption = typer.Option(None, "--db", help="SQLAlchemy URL (default: $SLE_DATABASE_URL or ./sle-study.db)")
study_app = typer.Typer(help="Studies, their trust root and key registry.")


def _admin(key: Path, actor: str):  # type: ignore[no-untyped-def]
    from sle_events.signing.keys import Signer

    try:
        return Signer.from_file(key, actor, "admin")
    except (OSError, ValueError) as e:  # missing, exposed (0644) or not an Ed25519 key
        err.print(f"[red]cannot use admin key {key}: {e.strerror if isinstance(e, OSError) and e.strerror else e}[/red]")
        raise typer.Exit(2) from None


def _record_registry_change(db: Optional[str], study_id: str, key: Path, actor: str, change) -> None:  # type: ignore[no-untyped-def]
    from sle_events.domain.study import RegistryError
    from sle_events.store.errors import AppendRejected
    from sle_events.store.record import StudyRecord

    record = StudyRecord(database_url(db))
    try:
        study = record.get(UUID(study_id))
        change(study, datetime.now(timezone.utc))
        record.record(study, signer=_admin(key, actor))
    except (RegistryError, AppendRejected, ValueError) as e:
        err.print(f"[red]{type(e).__name__}: {e}[/red]")
        raise typer.Exit(1) from None
    finally:
        record.close()


@study_app.command("create")
def create(
    code: str = typer.Option(..., help="study code, e.g. ALLOMSC-SLE"),
    title: str = typer.Option(..., help="official title"),
    admin_key: Path = typer.Option(..., help="the admin's private key file: the study's trust root"),
    admin: str = typer.Option(..., help="the admin's user id"),
    db: Optional[str] = DbOption,
) -> None:
    """Create a study whose trust root is the admin's public key; prints the study id."""
    from sle_events.store.record import StudyRecord
    from sle_events.domain.study import Study

    from sle_events.store.errors import StudyNotApproved

    signer = _admin(admin_key, admin)
    record = StudyRecord(database_url(db))
    study = Study.create(code, title, admin, signer.public_key_b64, datetime.now(timezone.utc))
    try:
        record.record(study, signer=signer)
    except StudyNotApproved as e:
        err.print(f"[red]{e}[/red]\nAn admin of an existing study approves it first: sle study approve-new --study ID "
                  f"--code {code} --new-admin {admin} --new-admin-public-key <this key's public key> "
                  "--admin-key FILE --admin ID")
        raise typer.Exit(1) from None
    finally:
        record.close()
    print(json.dumps({"study": str(study.id), "code": code, "trust_root_key": signer.key_id}))


@study_app.command("approve-new")
def approve_new(
    study: str = typer.Option(..., help="id of an existing study whose admin approves"),
    code: str = typer.Option(..., help="code of the study to be created"),
    new_admin: str = typer.Option(..., help="user id of the new study's admin"),
    new_admin_public_key: str = typer.Option(..., help="base64 public key of the new study's trust root"),
    admin_key: Path = typer.Option(..., help="this (existing) study's admin private key file"),
    admin: str = typer.Option(..., help="this study's admin user id"),
    db: Optional[str] = DbOption,
) -> None:
    """Approve creating another study in this database (a database's first study needs no approval; every later
    trust root does, signed and logged by an existing study's admin)."""
    _record_registry_change(db, study, admin_key, admin,
                            lambda s, now: s.approve_new_study(code, new_admin, new_admin_public_key, now))  # fmt: skip
    out.print(f"approved study {code} with trust-root key of {new_admin}; now: sle study create --code {code} ...")


@study_app.command("register-key")
def register_key(
    study: str = typer.Option(..., help="study id"),
    actor: str = typer.Option(..., help="user or service id of the key's holder"),
    role: str = typer.Option(..., help="role the key acts in"),
    public_key: str = typer.Option(..., help="base64 Ed25519 public key (as `sle keys generate` prints it)"),
    admin_key: Path = typer.Option(..., help="admin's private key file"),
    admin: str = typer.Option(..., help="admin's user id"),
    db: Optional[str] = DbOption,
) -> None:
    """Register a user's or service's public key with a role (a signed registry event)."""
    _record_registry_change(db, study, admin_key, admin,
                            lambda s, now: s.register_key(actor, role, public_key, now))  # fmt: skip
    out.print(f"registered a {role} key for {actor}")


@study_app.command("rotate-key")
def rotate_key(
    study: str = typer.Option(...), key: str = typer.Option(..., help="key id being replaced"),
    public_key: str = typer.Option(..., help="the new base64 public key"),
    admin_key: Path = typer.Option(...), admin: str = typer.Option(...), db: Optional[str] = DbOption,
) -> None:  # fmt: skip
    """Replace a key: the old one signs nothing new from here on."""
    _record_registry_change(db, study, admin_key, admin, lambda s, now: s.rotate_key(key, public_key, now))
    out.print(f"rotated key {key}")


@study_app.command("revoke-key")
def revoke_key(
    study: str = typer.Option(...), key: str = typer.Option(..., help="key id"),
    reason: str = typer.Option(..., help="why (kept in the record)"),
    admin_key: Path = typer.Option(...), admin: str = typer.Option(...), db: Optional[str] = DbOption,
) -> None:  # fmt: skip
    """Revoke a key: events it signed before stay valid, anything it signs after is refused."""
    _record_registry_change(db, study, admin_key, admin, lambda s, now: s.revoke_key(key, reason, now))
    out.print(f"revoked key {key}")


@study_app.command("keys")
def keys(study: str = typer.Option(..., help="study id"), db: Optional[str] = DbOption,
         as_json: bool = typer.Option(False, "--json")) -> None:  # fmt: skip
    """The key registry as it stands now."""
    from sle_events.store.record import StudyRecord

    record = StudyRecord(database_url(db))
    entries = [{k: v for k, v in e.items()} for e in record.study(study).keys.values()]
    record.close()
    if as_json:
        print(json.dumps(entries, indent=2))
        return
    t = Table("key", "actor", "role", "status", title=f"key registry of study {study}")
    for e in entries:
        t.add_row(e["key"], e["actor"], e["role"], e["status"])
    out.print(t)
