"""What every `sle` command shares: the `--db` and `--json` options, the consoles, the one place that turns a
typed error into a message and an exit code, and the database checks.

Exit codes: 0 done; 1 findings, or the record refused what was asked (the reason is printed); 2 bad usage or
unusable input (a database that is not there, a URL that is not one, a key file that cannot be read, an id that
names nothing). Nothing is written when a command exits 2.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

__all__ = [
    "DbOption",
    "JsonOption",
    "out",
    "err",
    "fail",
    "new_app",
    "database_url",
    "existing_database",
    "no_record_at",
    "safe_url",
    "handled",
    "describe_error",
    "print_json",
    "write_stdout",
    "progress",
    "parse_instant",
    "signer",
    "table",
    "print_table",
]

SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")
DEFAULT_DB_FILE = "sle-study.db"


def _quiet_exit() -> NoReturn:
    """The reader went away (`sle audit-trail | head`): stop quietly, as a Unix filter does."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that flushing stdout at exit does not complain again
    except OSError:
        pass
    raise SystemExit(0)


class _Console(Console):
    def on_broken_pipe(self) -> None:
        self.quiet = True
        _quiet_exit()


out = _Console()
err = _Console(stderr=True)

DbOption = typer.Option(
    None,
    "--db",
    metavar="URL|FILE",
    help="SQLAlchemy URL (sqlite:///study.db, postgresql+psycopg://user@host/name) or the path "
    "of an SQLite file; default $SLE_DATABASE_URL, else ./sle-study.db",
)
JsonOption = typer.Option(False, "--json", help="print one JSON document instead of a table")


def new_app(**kwargs: Any) -> typer.Typer:
    """A command group. Plain help (click's layout): real types for options, none shown for flags."""
    kwargs.setdefault("rich_markup_mode", None)
    kwargs.setdefault("pretty_exceptions_enable", False)
    kwargs.setdefault("add_completion", False)
    return typer.Typer(**kwargs)


def _argument_help_name(self: Any, ctx: Any) -> str | None:
    """An argument's help line shows its metavar (PROOF_FILE), not a Python type (`<path>`, `<list[str]>`): typer
    shows the type beside an argument even when it has a metavar, which options do not do."""
    return None


typer.core.TyperArgument.display_type_rich = _argument_help_name  # type: ignore[method-assign]  # see above


def fail(message: str, code: int = 2) -> NoReturn:
    err.print(f"[red]error:[/red] {escape(message)}")
    raise typer.Exit(code)


def print_json(doc: Any) -> None:
    write_stdout(json.dumps(doc, indent=2, default=str) + "\n")


def write_stdout(text: str) -> None:
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        _quiet_exit()


def progress(label: str, enabled: bool = True) -> Progress:
    """A progress bar on stderr, shown only on a terminal."""
    return Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err,
        disable=not (enabled and err.is_terminal),
        transient=False,
    )


# --------------------------------------------------------------------------------------------- the database
def database_url(db: str | None) -> str:
    """`--db` (or $SLE_DATABASE_URL, or ./sle-study.db) as a usable SQLAlchemy URL; exit 2 saying how to write it
    when it is not one. A path to an SQLite file (`study.db`, `./x.sqlite`, any existing file) is accepted."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    url = db or os.environ.get("SLE_DATABASE_URL") or f"sqlite:///{Path.cwd() / DEFAULT_DB_FILE}"
    if "://" not in url:
        path = Path(url).expanduser()
        if path.suffix.lower() in SQLITE_SUFFIXES or path.is_file():
            return f"sqlite:///{path.resolve()}"
        fail(
            f"--db {url!r} is neither a database URL nor an SQLite file (.db); write e.g. "
            "sqlite:///path/to/study.db or postgresql+psycopg://postgres@127.0.0.1:5432/study"
        )
    scheme = url.split("://", 1)[0]
    if scheme in ("postgres", "postgresql", "postgresql+psycopg2"):
        fail(
            f"{scheme}:// needs a driver this install does not use; write postgresql+psycopg://{url.split('://', 1)[1]}"
        )
    try:
        parsed = make_url(url)
        parsed.get_dialect().import_dbapi()
    except NoSuchModuleError:
        fail(f"unknown database kind {scheme!r} in --db; sle works with sqlite:/// and postgresql+psycopg://")
    except ArgumentError:
        fail(
            f"--db {url!r} is not a database URL; write e.g. sqlite:///study.db or "
            "postgresql+psycopg://postgres@127.0.0.1:5432/study"
        )
    except ImportError as e:
        fail(
            f"the database driver for {scheme}:// is not installed ({e.name}); sle works with sqlite:/// and "
            "postgresql+psycopg://"
        )
    return url


def safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "the given URL"


def no_record_at(url: str) -> str | None:
    """Why there is no study record at `url`, without creating anything (a typo must not make a database)."""
    from sqlalchemy import create_engine, inspect
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    local = parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:")
    if local and not Path(str(parsed.database)).exists():
        return f"no database file at {parsed.database}"
    engine = create_engine(url)
    try:
        if not inspect(engine).has_table("study_events"):
            return f"no study record (table study_events) in {safe_url(url)}"
    except Exception as e:
        return f"cannot open {safe_url(url)}: {type(e).__name__}: {e}"
    finally:
        engine.dispose()
    return None


def existing_database(db: str | None) -> str:
    """The URL of an existing study record; anything else exits 2 and creates nothing."""
    url = database_url(db)
    missing = no_record_at(url)
    if missing:
        fail(missing)
    return url


# ------------------------------------------------------------------------------------------------- errors
def describe_error(e: BaseException) -> tuple[int, str] | None:
    """The exit code and message for a typed error a command may meet; None for a bug (let it show)."""
    from sqlalchemy.exc import OperationalError

    from projections.base import ProjectionHalted
    from projections.read import UnknownFilter
    from projections.replay import SubjectNotFound
    from projections.runner import SchemaBehind
    from sle_events.domain.errors import ProtocolViolation, UnknownEventVersion, UnknownSubject
    from sle_events.domain.study import KeyProblem, RegistryError
    from sle_events.store.errors import AppendRejected, StudyNotApproved, UnknownStudy

    name = type(e).__name__
    if isinstance(e, (UnknownStudy, UnknownSubject, UnknownEventVersion)):
        return 2, f"{name}: {e}"
    if isinstance(e, SubjectNotFound):  # a subject with nothing recorded by the moment asked for
        return 1, str(e)
    if isinstance(e, StudyNotApproved):
        return 1, (
            f"{name}: {e}\nAn admin of an existing study approves it first: sle study approve-new --study ID "
            "--code CODE --new-admin ID --new-admin-public-key KEY --admin-key FILE --admin ID"
        )
    if isinstance(e, (ProtocolViolation, RegistryError, KeyProblem, AppendRejected)):
        return 1, f"refused: {name}: {e}"
    if isinstance(e, ProjectionHalted):
        return 1, (
            f"read models halted: {e}\n`sle verify` names what was altered; once the record is repaired, "
            "`sle projections rebuild`"
        )
    if isinstance(e, SchemaBehind):
        return 2, str(e)
    if isinstance(e, UnknownFilter):
        return 2, str(e)
    if isinstance(e, OperationalError):
        return 2, f"cannot use the database: {e.orig or e}"
    return None


@contextmanager
def handled() -> Iterator[None]:
    """Run a command's work: a typed error becomes its message and exit code (`describe_error`)."""
    try:
        yield
    except (typer.Exit, typer.Abort, SystemExit, KeyboardInterrupt):
        raise
    except BrokenPipeError:
        _quiet_exit()
    except Exception as e:
        known = describe_error(e)
        if known is None:
            raise
        fail(known[1], known[0])


# ------------------------------------------------------------------------------------------------- inputs
def parse_instant(text: str | None, option: str) -> datetime | None:
    """An ISO 8601 time with its offset (as the signed envelopes carry them); exit 2 otherwise."""
    from sle_events.signing.envelope import MalformedEnvelope, parse_time

    if text is None:
        return None
    try:
        return parse_time(option, text)
    except MalformedEnvelope as e:
        fail(f"{option}: {e} (give ISO 8601 with an offset, e.g. 2008-03-01T00:00:00+08:00)")


def signer(key: Path, actor: str, role: str) -> Any:
    """A private key file as the signer of `actor` in `role`; exit 2 if it cannot be used."""
    from sle_events.signing.keys import Signer

    try:
        return Signer.from_file(key, actor, role)
    except (OSError, ValueError) as e:  # missing, exposed (0644) or not an Ed25519 key
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        fail(f"cannot use {role} key {key}: {why}")


# ------------------------------------------------------------------------------------------------- output
def table(*columns: str, title: str | None = None) -> Any:
    """A table that wraps long cells rather than cutting them (`…`), readable at 80 columns."""
    from rich import box
    from rich.table import Column, Table

    return Table(
        *(Column(c, overflow="fold") for c in columns),
        title=title,
        box=box.SIMPLE_HEAD,
        title_justify="left",
        pad_edge=False,
    )


def print_table(t: Any, empty: str = "none") -> None:
    """Print a table; one with no rows says so (`title: none`) instead of an empty frame."""
    if t.row_count:
        out.print(t)
    else:
        out.print(f"{t.title or 'rows'}: {empty}")
