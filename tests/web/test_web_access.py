"""Who may see the web view, and that it never writes: each refusal, on SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from sle_events.signing.canonical import canonical_json
from sle_events.signing.keys import Signer
from sle_events.web.app import COOKIE
from sle_events.web.signin import BadToken, make_token, read_token
from web.webkit import WebStudy

pytestmark = pytest.mark.storage


def sign_in(client, web_study: WebStudy, who: str = "monitor"):
    return client.post("/signin", data={"token": web_study.token(who)})


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def forged(signer: Signer, **claims) -> str:
    """A token with the claims given, signed by `signer` (what `make_token` would refuse to build)."""
    now = datetime.now(UTC).replace(microsecond=0)
    body = {
        "purpose": "sle-web-signin",
        "key": signer.key_id,
        "study": None,
        "issued_at": now.isoformat(),
        "expires_at": (now + timedelta(minutes=5)).isoformat(),
        "nonce": "0" * 32,
    }
    body.update(claims)
    message = canonical_json(body)
    return f"{b64url(message)}.{b64url(signer.sign(message))}"


def test_no_session_sees_the_sign_in_page_and_no_data(client, web_study):
    for path in ("/", "/subjects", f"/subjects/{web_study.subject}", "/audit", "/verification",
                 f"/events/{web_study.positions['own']}"):  # fmt: skip
        r = client.get(path)
        assert r.status_code == 401, path
        assert "Sign in" in r.text and web_study.subject not in r.text
    r = client.get(f"/events/{web_study.positions['own']}/proof")
    assert r.status_code == 401 and "not signed in" in r.text


def test_a_registered_monitor_signs_in_once_and_sees_their_study(client, web_study):
    token = web_study.token()
    page = client.get("/signin", params={"token": token})  # the link opens a form: nothing is used up yet
    assert page.status_code == 200 and token in page.text
    r = client.post("/signin", data={"token": token})
    assert r.status_code == 303 and r.headers["location"] == "/"
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    home = client.get("/")
    assert home.status_code == 200 and "Chen Jing (mon.chen), monitor" in home.text
    assert "Content-Security-Policy" in home.headers and home.headers["Cache-Control"] == "no-store"
    subject = client.get(f"/subjects/{web_study.subject}")
    assert subject.status_code == 200 and "Subject NJ01-0007" in subject.text
    again = client.post("/signin", data={"token": token})  # one use
    assert again.status_code == 403 and "used already" in again.text


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (lambda s: "not-a-token", "not a sign-in token"),
        (lambda s: s.token() + "x", "signature"),
        (lambda s: forged(s.people["monitor"], expires_at="2020-01-01T00:00:00+00:00"), "expired"),
        (
            lambda s: forged(
                s.people["monitor"],
                issued_at=(datetime.now(UTC) + timedelta(hours=1)).replace(microsecond=0).isoformat(),
                expires_at=(datetime.now(UTC) + timedelta(hours=1, minutes=5)).replace(microsecond=0).isoformat(),
            ),
            "issued in the future",
        ),
        (
            lambda s: forged(
                s.people["monitor"],
                expires_at=(datetime.now(UTC) + timedelta(days=1)).replace(microsecond=0).isoformat(),
            ),
            "lives longer",
        ),
        (lambda s: make_token(Signer.generate("mon.chen", "monitor"), None), "not registered in any study"),
        (lambda s: s.token("lab"), "may not use the web view"),
        (lambda s: s.token("coordinator"), "may not use the web view"),
        (lambda s: s.token(study="NO-SUCH-STUDY"), "not in this record"),
        (lambda s: s.token(study="OTHER-STUDY"), "not registered in study OTHER-STUDY"),
        (lambda s: forged(s.people["auditor"], key=s.people["monitor"].key_id), "signature does not hold"),
        (lambda s: forged(s.people["monitor"], purpose="sle-something-else"), "not a sign-in token"),
    ],
    ids=[
        "garbage",
        "bad-signature-bytes",
        "expired",
        "future",
        "too-long-lived",
        "unregistered-key",
        "lab-service",
        "coordinator",
        "unknown-study",
        "other-study",
        "signed-by-another-key",
        "other-purpose",
    ],
)
def test_a_sign_in_is_refused_with_the_reason_and_opens_no_session(client, web_study, make, why):
    assert client.get("/").status_code == 401  # the view's own tables exist from its first request
    before = web_study.counts()
    r = client.post("/signin", data={"token": make(web_study)})
    assert r.status_code == 403, r.text
    assert why in r.text
    assert COOKIE not in r.headers.get("set-cookie", "")
    assert client.get("/").status_code == 401
    assert web_study.counts() == before  # nothing stored: no session, no nonce


def test_a_revoked_key_cannot_sign_in_and_ends_its_open_session(client, web_study):
    assert sign_in(client, web_study).status_code == 303
    assert client.get("/").status_code == 200
    waiting = web_study.token()
    web_study.revoke("monitor")
    r = client.get("/")
    assert r.status_code == 401 and "was revoked" in r.text
    assert client.get("/subjects").status_code == 401  # the session is gone, not only refused once
    refused = client.post("/signin", data={"token": waiting})
    assert refused.status_code == 403 and "revoked" in refused.text


def test_a_session_expires(web_study):
    import warnings

    from sle_events.web import create_web_app

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient

    app = create_web_app(web_study.url, session_ttl=timedelta(seconds=1))
    with TestClient(app, follow_redirects=False) as client:
        assert sign_in(client, web_study).status_code == 303
        assert client.get("/").status_code == 200
        store = app.state.sessions()
        cookie = client.cookies.get(COOKIE)
        later = datetime.now(UTC) + timedelta(seconds=2)
        with pytest.raises(Exception, match="expired"):
            store.current(cookie, now=later)
        r = client.get("/")  # the server-side session was ended by the check above, or expires by itself
        assert r.status_code == 401 and "Sign in" in r.text


def test_a_monitor_sees_only_their_study(client, web_study):
    assert sign_in(client, web_study).status_code == 303
    other = web_study.other_subject
    assert client.get(f"/subjects/{other}").status_code == 404
    assert client.get(f"/subjects/{web_study.other.subject_id(other)}").status_code == 404
    assert client.get(f"/events/{web_study.positions['other']}").status_code == 404
    assert client.get(f"/events/{web_study.positions['other']}/proof").status_code == 404
    r = client.get("/audit", params={"subject": other})
    assert r.status_code == 400 and "no subject" in r.text
    for path in ("/", "/subjects", "/audit"):
        assert other not in client.get(path).text, path
    assert "nurse.xu" not in client.get("/audit").text  # nor the other study's people among the user choices
    theirs = client.get("/audit", params={"user": "nurse.xu"})
    assert "No change matches" in theirs.text and other not in theirs.text
    assert client.get(f"/events/{web_study.positions['own']}").status_code == 200
    # The other study's monitor sees theirs and not this one.
    client.cookies.clear()
    assert client.post("/signin", data={"token": web_study.token("other_monitor")}).status_code == 303
    assert other in client.get("/subjects").text
    assert client.get(f"/subjects/{web_study.subject}").status_code == 404


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
def test_the_view_never_writes(client, web_study, method):
    assert sign_in(client, web_study).status_code == 303
    before = web_study.counts()
    for path in ("/", "/subjects", f"/subjects/{web_study.subject}", "/audit", "/verification",
                 f"/events/{web_study.positions['own']}", f"/events/{web_study.positions['own']}/proof"):  # fmt: skip
        r = client.request(method, path, data={"value": "9.99"})
        assert r.status_code == 405, (method, path)
    if method != "POST":
        assert client.request(method, "/signin").status_code == 405
    assert web_study.counts() == before
    assert client.get("/").status_code == 200  # still signed in: a refused write ends nothing


def test_signing_out_ends_the_session(client, web_study):
    assert sign_in(client, web_study).status_code == 303
    cookie = client.cookies.get(COOKIE)
    r = client.post("/signout")
    assert r.status_code == 200 and "Signed out" in r.text
    client.cookies.set(COOKIE, cookie)  # a copied cookie no longer works either
    assert client.get("/").status_code == 401


def test_what_people_recorded_is_shown_escaped(client, web_study):
    assert sign_in(client, web_study, "auditor").status_code == 303
    r = client.get("/audit", params={"subject": web_study.subject, "change": "corrected"})
    assert r.status_code == 200
    assert "<script>alert(1)</script>" not in r.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt; transcription" in r.text


def test_read_token_refuses_what_is_not_a_sign_in_token():
    signer = Signer.generate("mon.chen", "monitor")
    claims = read_token(make_token(signer, "ALLOMSC-SLE"))
    assert claims.key == signer.key_id and claims.study == "ALLOMSC-SLE" and len(claims.nonce) == 32
    for bad in ("", "a.b.c", "!!!.???", b64url(b"[]") + "." + b64url(b"x" * 64), "x" * 3000):
        with pytest.raises(BadToken):
            read_token(bad)
    not_canonical = json.dumps(json.loads(base64.urlsafe_b64decode(make_token(signer, None).split(".")[0] + "==")),
                               indent=1).encode()  # fmt: skip
    with pytest.raises(BadToken, match="canonical"):
        read_token(f"{b64url(not_canonical)}.{b64url(signer.sign(not_canonical))}")
    with pytest.raises(ValueError):
        make_token(signer, None, lifetime=timedelta(hours=1))


def run_sle(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, COLUMNS="200", NO_COLOR="1")
    sle = str(Path(sys.executable).with_name("sle"))
    return subprocess.run([sle, *args], capture_output=True, text=True, timeout=120, env=env)


def test_sle_web_link_prints_a_link_the_view_accepts(client, web_study, tmp_path):
    key = tmp_path / "monitor.pem"
    web_study.people["monitor"].save(key)
    done = run_sle("web", "link", "--key", str(key), "--url", "http://testserver/web", "--study", "ALLOMSC-SLE")
    assert done.returncode == 0, done.stderr
    url = done.stdout.strip()
    assert re.fullmatch(r"http://testserver/web/signin\?token=[A-Za-z0-9_.%-]+", url), url
    from urllib.parse import parse_qs, urlsplit

    token = parse_qs(urlsplit(url).query)["token"][0]
    assert client.post("/signin", data={"token": token}).status_code == 303
    for args, why in [
        (("--minutes", "60"), "--minutes must be 1 to 15"),
        (("--url", "ftp://x"), "--url must be"),
    ]:
        bad = run_sle("web", "link", "--key", str(key), *args)
        assert bad.returncode == 2 and why in bad.stderr + bad.stdout
    missing = run_sle("web", "link", "--key", str(tmp_path / "nope.pem"))
    assert missing.returncode == 2 and "cannot use" in missing.stderr + missing.stdout
    assert "Traceback" not in missing.stderr


def test_mounted_under_web_in_another_app(web_study):
    """As `sle serve` mounts it: links, redirects and the cookie's path carry the /web prefix."""
    import warnings

    from starlette.applications import Starlette
    from starlette.routing import Mount

    from sle_events.web import create_web_app

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient

    web = create_web_app(web_study.url)
    host = Starlette(routes=[Mount("/web", app=web)])
    with TestClient(host, follow_redirects=False) as client:
        assert client.get("/web/").status_code == 401
        r = client.post("/web/signin", data={"token": web_study.token()})
        assert r.status_code == 303 and r.headers["location"] == "/web/"
        assert "path=/web/" in r.headers["set-cookie"].lower()
        page = client.get("/web/")
        assert page.status_code == 200
        assert 'href="/web/static/style.css"' in page.text and 'href="/web/audit"' in page.text
        assert client.get("/web/static/style.css").status_code == 200
    web.state.close()
