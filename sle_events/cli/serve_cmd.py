"""`sle serve`: the HTTP API (sle_events.api) under uvicorn, with the web view (sle_events.web) at /web."""

from __future__ import annotations

import os
from typing import Any

import typer

from sle_events.cli.common import DbOption, database_url, err, fail

URL_VARIABLE = "SLE_DATABASE_URL"
DEMO_VARIABLE = "SLE_API_DEMO_CLOCK"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
WEB_PREFIX = "/web"  # `sle web link`'s default URL points here


def serving_app(url: str, *, demo_clock: bool = False) -> Any:
    """What `sle serve` runs: the API under /v1 and the read-only web view under /web, over one database. The
    view has its own sessions (signed sign-in links), never the API's request signatures."""
    from sle_events.api import create_app
    from sle_events.web import create_web_app

    return create_app(url, demo_clock=demo_clock, mounts={WEB_PREFIX: create_web_app(url)})


def app_from_env() -> Any:  # uvicorn's factory for worker processes: each opens the database named in the environment
    return serving_app(os.environ[URL_VARIABLE], demo_clock=os.environ.get(DEMO_VARIABLE) == "1")


def serve(
    db: str | None = DbOption,
    host: str = typer.Option(DEFAULT_HOST, metavar="ADDRESS", help="address to listen on (loopback by default)"),
    port: int = typer.Option(DEFAULT_PORT, min=1, max=65535, metavar="PORT", help="TCP port"),
    workers: int = typer.Option(
        1, min=1, max=64, metavar="N", help="worker processes (PostgreSQL only; SQLite has one writer)"
    ),
    demo_clock: bool = typer.Option(
        False, "--demo-clock", help="accept any recorded_at, for `sle demo --api` only: never for a real study"
    ),
) -> None:
    """Serve the study record over HTTP: the API at /v1 (signed requests, client-signed events, docs/api.md) and
    the read-only web view at /web (sign in with `sle web link`, docs/web.md)."""
    import uvicorn

    url = database_url(db)
    if url.startswith("sqlite") and workers > 1:
        err.print(
            f"[yellow]SQLite has a single writer: serving with 1 worker process, not {workers} "
            "(use PostgreSQL for more)[/yellow]"
        )
        workers = 1
    try:
        app = serving_app(url, demo_clock=demo_clock) if workers == 1 else None
        if app is None:  # the tables once, here, rather than by every worker at once
            from sqlalchemy import create_engine

            from sle_events.api.app import prepare_database
            from sle_events.store.record import StudyRecord

            StudyRecord(url).close()  # the events table, as the library creates it
            engine = create_engine(url)
            prepare_database(engine)
            engine.dispose()
    except Exception as e:  # an unreachable or unusable database: say so, no traceback
        fail(f"cannot open the study record at {url}: {type(e).__name__}: {e}")
    from sle_events.api.workers import listening_sockets, run_workers

    try:  # several workers: their sockets are bound here, so a taken port is said before anything is served
        sockets = listening_sockets(host, port, workers) if app is None else []
    except OSError as e:
        fail(f"cannot serve on {host}:{port}: {e.strerror}")
    if demo_clock:
        err.print("[red]DEMO CLOCK: recorded_at is not checked against this server's clock (backdating allowed)[/red]")
    err.print(f"serving {url.split('@')[-1]} on http://{host}:{port} with {workers} worker(s)")
    err.print(f"  the API at /v1, the web view at {WEB_PREFIX}/ (sign in with `sle web link`)")
    from sle_events.api.nodelay import NoDelayProtocol

    loop = "auto"  # uvloop, a dependency: it hands work back from the thread pool faster (bench/RESULTS.md)

    if app is not None:
        uvicorn.run(app, host=host, port=port, log_level="warning", http=NoDelayProtocol, loop=loop)
    else:
        os.environ[URL_VARIABLE] = url
        os.environ[DEMO_VARIABLE] = "1" if demo_clock else "0"
        config = uvicorn.Config(
            "sle_events.cli.serve_cmd:app_from_env",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            log_level="warning",
            http=NoDelayProtocol,
            loop=loop,
        )
        run_workers(config, sockets)
