"""The web view as `sle serve` serves it: at /web beside the API (/v1), signed in by the link `sle web link`
prints, with its own sessions (the API's request signatures and the view's cookie never stand in for each other).
Both engines: through `serving_app` in-process, and through a real `sle serve` with httpx."""

from __future__ import annotations

import inspect
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from sle_events.cli import serve_cmd, web_cmd
from sle_events.cli.serve_cmd import WEB_PREFIX, serving_app
from sle_events.client import Client
from web.webkit import WebStudy

pytestmark = pytest.mark.storage
SLE = str(Path(sys.executable).with_name("sle"))


def link(web_study: WebStudy, tmp_path: Path, *url: str) -> str:
    """The sign-in URL `sle web link` prints for the study's monitor (default --url unless one is given)."""
    key = tmp_path / "monitor.pem"
    web_study.people["monitor"].save(key)
    extra = ["--url", url[0]] if url else []
    done = subprocess.run(
        [SLE, "web", "link", "--key", str(key), "--study", "ALLOMSC-SLE", *extra],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"},
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_sle_web_links_default_url_is_where_sle_serve_serves_the_view():
    defaults = {n: p.default.default for n, p in inspect.signature(serve_cmd.serve).parameters.items()}
    assert f"http://{defaults['host']}:{defaults['port']}{WEB_PREFIX}" == web_cmd.DEFAULT_URL
    assert web_cmd.DEFAULT_URL == "http://127.0.0.1:8000/web"


def test_a_signed_in_session_gets_pages_at_web_through_sle_serves_app(web_study, tmp_path):
    url = link(web_study, tmp_path)
    assert url.startswith(web_cmd.DEFAULT_URL + "/signin?token=")
    parts = urlsplit(url)
    token = parse_qs(parts.query)["token"][0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient

    app = serving_app(web_study.url)
    with TestClient(app, follow_redirects=False) as browser:
        assert browser.get("/web/").status_code == 401  # no session: the sign-in page, no data
        form = browser.get(parts.path, params={"token": token})
        assert form.status_code == 200 and token in form.text
        signed_in = browser.post(parts.path, data={"token": token})
        assert signed_in.status_code == 303 and signed_in.headers["location"] == "/web/"
        assert "path=/web/" in signed_in.headers["set-cookie"].lower()
        home = browser.get("/web/")
        assert home.status_code == 200 and "Chen Jing (mon.chen), monitor" in home.text
        for page in ("/web/subjects", f"/web/subjects/{web_study.subject}", "/web/audit", "/web/verification"):
            assert browser.get(page).status_code == 200, page
        assert browser.get("/web/static/style.css").status_code == 200
        # The view's cookie is no API credential; the API still answers signed requests beside the view.
        study = web_study.trial.study_id
        refused = browser.get(f"/v1/studies/{study}/dashboard")
        assert refused.status_code == 401 and refused.json()["type"].endswith("signature_missing")
        api = Client("http://testserver", web_study.people["monitor"], study, http=browser)
        assert api.get("/dashboard") is not None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_sle_serve_serves_the_web_view_at_web(web_study, tmp_path):
    port = free_port()
    server = subprocess.Popen(
        [SLE, "serve", "--db", web_study.url, "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                first = httpx.get(f"{base}/web/", timeout=1)
                break
            except httpx.HTTPError:
                assert server.poll() is None, server.stderr.read() if server.stderr else "server exited"
                assert time.monotonic() < deadline, "sle serve did not answer within 60 s"
                time.sleep(0.3)
        assert first.status_code == 401 and "sign in" in first.text.lower()
        url = link(web_study, tmp_path, f"{base}/web")
        token = parse_qs(urlsplit(url).query)["token"][0]
        with httpx.Client(base_url=base) as browser:
            signed_in = browser.post("/web/signin", data={"token": token})
            assert signed_in.status_code == 303 and signed_in.headers["location"] == "/web/"
            home = browser.get("/web/")
            assert home.status_code == 200 and "Chen Jing (mon.chen), monitor" in home.text
            assert browser.get(f"/web/subjects/{web_study.subject}").status_code == 200
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server this test started
        _, err = server.communicate(timeout=30)
    assert "/web" in err and "Traceback" not in err
