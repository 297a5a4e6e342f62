"""What the pages show (dashboard, subject, audit-trail filters and pages, as of a past time, events and their
proofs), on SQLite and PostgreSQL, through the HTTP client as a browser would ask."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest

from sle_events.ledger.log import Ledger
from sle_events.ledger.note import Signer as LogSigner
from sle_events.web import data as web_data

pytestmark = pytest.mark.storage


@pytest.fixture
def signed_in(client, web_study):
    assert client.post("/signin", data={"token": web_study.token("auditor")}).status_code == 303
    return client


def log_checkpoint(url: str) -> None:
    ledger = Ledger(url)
    try:
        ledger.integrate()
        ledger.checkpoint(LogSigner.generate("sle.local/ALLOMSC-SLE"))
    finally:
        ledger.close()


def rows_of(html: str) -> list[str]:
    body = html.split("<tbody>", 1)[1].split("</tbody>", 1)[0]
    return re.findall(r"<tr[ >].*?</tr>", body, re.S)


def test_dashboard_shows_enrolment_the_last_verification_and_the_checkpoint(signed_in, web_study):
    page = signed_in.get("/").text
    assert "Study dashboard" in page and "1 subjects" in page
    assert "NJ01" in page and ("SCREENED" in page or "CONSENTED" in page)
    assert "Never verified" in page and "This record has no ledger" in page
    log_checkpoint(web_study.url)
    page = signed_in.get("/").text
    assert "Latest signed checkpoint" in page and re.search(r"Tree size <strong>\d+</strong>", page)


def test_subject_page_shows_current_values_status_timeline_and_trends(signed_in, web_study):
    page = signed_in.get(f"/subjects/{web_study.subject}").text
    assert "Subject NJ01-0007" in page
    labs = page.split('id="h-labs"', 1)[1].split("</table>", 1)[0]
    assert "creatinine" in labs and "1.03" in labs  # the corrected value, not 1.30
    assert "Sign-off" in page and "Source data verification" in page and "Queries" in page
    timeline = page.split('id="h-timeline"', 1)[1]
    assert "screening" in timeline and "consent" in timeline and "correction" in timeline
    assert "&lt;script&gt;" in timeline
    assert "<svg" in page and 'aria-labelledby="plot-c3-t plot-c3-d"' in page
    every = signed_in.get(f"/subjects/{web_study.subject}", params={"events": "all"}).text
    assert len(rows_of(every.split('id="h-timeline"', 1)[1])) > len(rows_of(timeline))


def test_subject_page_as_of_a_recorded_time_shows_what_the_database_said_then(signed_in, web_study):
    assert web_study.before_correction is not None
    before_correction = web_study.before_correction.isoformat()
    page = signed_in.get(f"/subjects/{web_study.subject}", params={"as_of": before_correction}).text
    assert "Viewing as of" in page
    labs = page.split('id="h-labs"', 1)[1].split("</table>", 1)[0]
    assert "1.30" in labs and "1.03" not in labs
    occurred = (datetime.now(UTC) - timedelta(days=1, hours=12)).isoformat()  # after the first result only
    page = signed_in.get(f"/subjects/{web_study.subject}", params={"as_of": occurred, "axis": "occurred"}).text
    labs = page.split('id="h-labs"', 1)[1].split("</table>", 1)[0]
    assert "1.10" in labs and "1.30" not in labs and "1.03" not in labs
    long_ago = signed_in.get(f"/subjects/{web_study.subject}", params={"as_of": "2001-01-01"})
    assert long_ago.status_code == 404 and "no recorded events" in long_ago.text
    bad = signed_in.get("/", params={"as_of": "yesterday"})
    assert bad.status_code == 400 and "not a date" in bad.text
    naive = signed_in.get("/", params={"as_of": "2026-01-01T00:00:00"})
    assert naive.status_code == 400 and "no UTC offset" in naive.text
    dash = signed_in.get("/", params={"as_of": "2001-01-01"}).text
    assert "0 subjects with events by then" in dash


def test_audit_trail_filters(signed_in, web_study):
    corrected = signed_in.get("/audit", params={"subject": web_study.subject, "change": "corrected"}).text
    rows = rows_of(corrected)
    assert rows and all(">corrected<" in r for r in rows)
    assert any("<del>1.30</del> → <ins>1.03</ins>" in r for r in rows)
    assert all("lab.drum-tower, lab" in r for r in rows)
    assert all(re.search(r'href="/events/\d+">#\d+</a> · <a href="/events/\d+/proof"', r) for r in rows)
    creat = rows_of(signed_in.get("/audit", params={"item": "CREAT"}).text)
    assert creat and all("CREAT" in r for r in creat)
    by_user = rows_of(signed_in.get("/audit", params={"user": "nurse.li"}).text)
    assert by_user and all("Li Na (nurse.li), coordinator" in r for r in by_user)
    screened = rows_of(signed_in.get("/audit", params={"type": "Subject.Screened"}).text)
    assert screened and all("NJ01-0007" in r for r in screened)
    recent = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    window = rows_of(signed_in.get("/audit", params={"recorded_from": recent, "subject": web_study.subject}).text)
    assert window  # everything here was recorded in this test's minute
    early = (datetime.now(UTC) - timedelta(days=2, hours=12)).isoformat()
    occurred = rows_of(signed_in.get("/audit", params={"occurred_to": early, "subject": web_study.subject}).text)
    assert occurred and not any("CREAT" in r for r in occurred)  # screening and consent only
    nothing = signed_in.get("/audit", params={"recorded_to": "2001-01-01"}).text
    assert "No change matches" in nothing
    refusals = [
        ({"change": "edited"}, "unknown change"),
        ({"type": "Screened"}, "unknown event type"),
        ({"recorded_from": "last week"}, "not a date"),
        ({"after": "x"}, "not a page position"),
    ]
    for params, why in refusals:
        r = signed_in.get("/audit", params=params)
        assert r.status_code == 400 and why in r.text, params


def test_audit_trail_pages_old_to_new_and_back(signed_in, web_study, monkeypatch):
    monkeypatch.setattr(web_data, "PAGE_SIZE", 7)
    positions: list[int] = []
    params: dict[str, str] = {"subject": web_study.subject}
    pages = []
    while True:
        html = signed_in.get("/audit", params=params).text
        pages.append(html)
        for r in rows_of(html):
            found_position = re.search(r'href="/events/(\d+)"', r)
            assert found_position is not None
            positions.append(int(found_position.group(1)))
        found = re.search(r'href="([^"]*after=[^"]*)" rel="next"', html)
        if not found:
            break
        params = dict(re.findall(r"([a-z_]+)=([^&]*)", found.group(1).split("?", 1)[1].replace("&amp;", "&")))
    assert len(pages) >= 3 and positions == sorted(positions)  # old → new across pages
    assert 'rel="prev"' not in pages[0] and 'rel="prev"' in pages[1]
    back = re.search(r'href="([^"]*before=[^"]*)" rel="prev"', pages[1]).group(1).replace("&amp;", "&")  # type: ignore[union-attr]
    assert rows_of(signed_in.get(back).text) == rows_of(pages[0])


def test_event_page_shows_the_signed_envelope_and_its_inclusion_proof(signed_in, web_study):
    position = web_study.positions["own"]
    page = signed_in.get(f"/events/{position}").text
    assert "The signed envelope" in page and "no ledger" in page
    log_checkpoint(web_study.url)
    page = signed_in.get(f"/events/{position}").text
    assert re.search(r"Leaf \d+ of the signed tree of size \d+", page)
    proof = signed_in.get(f"/events/{position}/proof")
    assert proof.status_code == 200 and proof.text.startswith("c2sp.org/tlog-proof@v1")
    assert "attachment" in proof.headers["content-disposition"]
    verification = signed_in.get("/verification").text
    assert "Verify it yourself" in verification and "sle ledger verify-proof" in verification
