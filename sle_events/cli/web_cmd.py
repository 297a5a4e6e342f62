"""`sle web link`: a short-lived, one-use sign-in link for the web view, signed with your registered key."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import typer

from sle_events.cli.common import err, fail, new_app, print_json, signer
from sle_events.cli.serve_cmd import DEFAULT_HOST, DEFAULT_PORT, WEB_PREFIX

web_app = new_app(no_args_is_help=True, help="The read-only web view (served by `sle serve` under /web).")

DEFAULT_URL = f"http://{DEFAULT_HOST}:{DEFAULT_PORT}{WEB_PREFIX}"  # where `sle serve` serves the view by default


@web_app.command("link")
def link(
    key: Path = typer.Option(
        ..., "--key", metavar="FILE", help="your private key file (0600), as the study registered it"
    ),
    url: str = typer.Option(
        DEFAULT_URL, "--url", metavar="URL", help=f"the web view's address (default {DEFAULT_URL})"
    ),
    study: str | None = typer.Option(
        None, "--study", metavar="ID|CODE", help="the study to sign in to (needed if your key is in several)"
    ),
    minutes: int = typer.Option(5, "--minutes", metavar="N", help="how long the link works (1-15 minutes; once)"),
    as_json: bool = typer.Option(False, "--json", help="print {url, token, expires_at} as JSON"),
) -> None:
    """Print a sign-in link for the web view. It works once, for a few minutes; nothing is sent anywhere."""
    from sle_events.web.signin import MAX_LIFETIME, make_token, read_token

    if not 1 <= minutes <= MAX_LIFETIME.total_seconds() // 60:
        fail(f"--minutes must be 1 to {int(MAX_LIFETIME.total_seconds() // 60)}, got {minutes}")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        fail(f"--url must be the web view's http(s) address, e.g. {DEFAULT_URL}; got {url!r}")
    if parts.scheme == "http" and parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        err.print("[yellow]warning:[/yellow] plain http beyond this machine: the session cookie can be read on the way")
    # The key's actor and role are not needed to sign: the registry tells the server whose key it is.
    token = make_token(signer(key, "web-sign-in", "monitor"), study, lifetime=timedelta(minutes=minutes))
    base = url.rstrip("/").removesuffix("/signin")
    full = f"{base}/signin?{urlencode({'token': token})}"
    if as_json:
        print_json({"url": full, "token": token, "expires_at": read_token(token).expires_at.isoformat()})
    else:
        print(full)  # plain print: a URL must not be wrapped at 80 columns
