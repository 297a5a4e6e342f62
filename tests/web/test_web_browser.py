"""The web view as a person uses it: Debian's headless Chromium (selenium, no browser download) against the
view served by uvicorn over a small SQLite demo. Sign in with a link from `sle web link`, open the dashboard, a
subject, filter the audit trail, view as of a date; at 1280 px and at a phone's 390 px. Screenshots are saved
under tests/artifacts/web/ (ignored by git) for a person to look at."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sle_events.web import create_web_app
from web.webkit import browser_problem, chromium, screenshot, serve


def go(driver, element) -> None:
    """Click what leads to another page and wait until that page has replaced this one: a click returns before the
    navigation, and anything read in between comes from the old page (or goes stale under us)."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    old = driver.find_element("tag name", "html")
    element.click()

    def replaced(d) -> bool:
        try:
            return bool(expected_conditions.staleness_of(old)(d))
        except WebDriverException as exc:
            # Chromium's other way of saying the old page is gone, when asked mid-navigation (seen in CI)
            if "does not belong to the document" in str(exc):
                return True
            raise

    WebDriverWait(driver, 15).until(replaced)
    WebDriverWait(driver, 15).until(lambda d: d.execute_script("return document.readyState") == "complete")


pytestmark = [
    pytest.mark.skipif(browser_problem() is not None, reason=browser_problem() or ""),
]

SLE = str(Path(sys.executable).with_name("sle"))
SUBJECT = "NJ01-0002"  # the demo's subject with a corrected creatinine and a stale eGFR

# In the page: every visible form control has a label; headings start at one h1 and never skip a level; text
# has a contrast of 4.5:1 against the background it is drawn on (3:1 for large text), WCAG 2.x's formula.
A11Y_JS = (Path(__file__).with_name("a11y.js")).read_text(encoding="utf-8")


def sle(*args: str, cwd: Path) -> str:
    env = dict(os.environ, COLUMNS="200", NO_COLOR="1")
    env.pop("SLE_DATABASE_URL", None)
    done = subprocess.run([SLE, *args], capture_output=True, text=True, timeout=300, cwd=cwd, env=env)
    assert done.returncode == 0, (args, done.stdout, done.stderr)
    return done.stdout


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A small demo (4 enrolled subjects), a monitor's key, a ledger with a checkpoint and a sealed verification."""
    folder = tmp_path_factory.mktemp("web-demo")
    db = folder / "demo.db"
    url = f"sqlite:///{db}"
    sle("demo", "--subjects", "4", "--db", url, "--keys", "keys", cwd=folder)
    key = json.loads(sle("keys", "generate", "--out", "monitor.pem", "--actor", "mon.chen", "--role", "monitor",
                         cwd=folder))  # fmt: skip
    sle("study", "register-key", "--db", url, "--actor", "mon.chen", "--role", "monitor", "--public-key",
        key["public_key"], "--printed-name", "Chen Jing", "--admin-key", "keys/admin.pem", "--admin",
        "admin@drum-tower", cwd=folder)  # fmt: skip
    # `sle demo` made the ledger (its log key in keys/log.key): bring in the monitor's registration and sign anew
    sle("ledger", "integrate", "--db", url, cwd=folder)
    sle("ledger", "checkpoint", "--db", url, "--log-key", "keys/log.key", cwd=folder)
    sle("verify", "--db", url, cwd=folder)
    yield url, folder


@pytest.fixture(scope="module")
def server(demo: tuple[str, Path]) -> Iterator[str]:
    url, _ = demo
    with serve(create_web_app(url)) as base:
        yield base


def sign_in(driver, base: str, folder: Path) -> None:
    from selenium.webdriver.common.by import By

    link = sle("web", "link", "--key", "monitor.pem", "--url", base, cwd=folder).strip()
    driver.get(link)
    assert driver.find_element(By.TAG_NAME, "h1").text == "Sign in"
    assert driver.find_element(By.ID, "token").get_attribute("value") in link  # the link's token, ready to send
    go(driver, driver.find_element(By.ID, "signin-button"))


def check_page(driver, name: str) -> None:
    """Accessibility basics and no sideways scrolling of the page itself, then a screenshot."""
    found = driver.execute_script(A11Y_JS)
    assert found["problems"] == [], (name, found["problems"])
    assert found["checked"] > 10
    assert found["overflow"] <= 1, f"{name}: the page is {found['overflow']} px wider than the window"
    print(f"screenshot: {screenshot(driver, name)}")


@pytest.mark.parametrize("width", [1280, 390], ids=["desktop", "phone"])
def test_a_monitor_signs_in_and_reads_the_record(server, demo, width):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    _, folder = demo
    with chromium(width=width) as driver:
        driver.get(server + "/")
        assert driver.find_element(By.TAG_NAME, "h1").text == "Sign in"  # nothing without a session
        check_page(driver, "signin")

        sign_in(driver, server, folder)
        assert driver.find_element(By.TAG_NAME, "h1").text == "Study dashboard"
        body = driver.find_element(By.TAG_NAME, "main").text
        assert "Chen Jing (mon.chen), monitor" in driver.find_element(By.CLASS_NAME, "who").text
        for expected in ("Enrolment by site", "Visit compliance by month", "SAE 24-hour clock", "Open queries",
                         "Stale results to query", "Latest signed checkpoint", "Last verification"):  # fmt: skip
            assert expected in body, expected
        assert "Tree size" in body and "NJ01" in body
        assert "Verified: every signature, key, role and chain holds" in body or "UNVERIFIABLE" in body
        check_page(driver, "dashboard")

        go(driver, driver.find_element(By.LINK_TEXT, "Subjects"))
        assert driver.find_element(By.TAG_NAME, "h1").text == "Subjects"
        go(driver, driver.find_element(By.LINK_TEXT, SUBJECT))
        assert driver.find_element(By.TAG_NAME, "h1").text == f"Subject {SUBJECT}"
        labs = driver.find_element(By.CSS_SELECTOR, "section[aria-labelledby=h-labs]").text
        assert "eGFR" in labs and "creatinine" in labs and "mL/min" in labs
        plots = driver.find_elements(By.CSS_SELECTOR, "svg.trend")
        assert len(plots) >= 5 and all(p.size["width"] > 200 for p in plots)
        assert driver.find_elements(By.CSS_SELECTOR, "svg.trend line.transplant")
        review = driver.find_element(By.CSS_SELECTOR, "section[aria-labelledby=h-status]").text
        assert "Sign-off" in review and "Stale results to query" in review
        timeline = driver.find_element(By.CSS_SELECTOR, "section[aria-labelledby=h-timeline]").text
        assert "screening" in timeline and "AlloMSC infusion" in timeline and "correction" in timeline
        check_page(driver, "subject")

        go(driver, driver.find_element(By.LINK_TEXT, "Audit trail"))
        Select(driver.find_element(By.ID, "f-subject")).select_by_visible_text(SUBJECT)
        Select(driver.find_element(By.ID, "f-change")).select_by_visible_text("corrected")
        go(driver, driver.find_element(By.ID, "filter-button"))
        rows = driver.find_elements(By.CSS_SELECTOR, "table.audit tbody tr")
        assert rows
        for row in rows:
            text = row.text
            assert SUBJECT in text and "corrected" in text and "transcription error" in text, text
            assert "→" in text and "key " in text
        first_event = rows[0].find_element(By.PARTIAL_LINK_TEXT, "#")
        check_page(driver, "audit")

        go(driver, first_event)
        assert driver.find_element(By.TAG_NAME, "h1").text.startswith("Event at log position")
        proof = driver.find_element(By.CSS_SELECTOR, "section[aria-labelledby=h-proof]").text
        assert "of the signed tree of size" in proof and "sle ledger verify-proof" in proof
        check_page(driver, "event")

        go(driver, driver.find_element(By.LINK_TEXT, "Dashboard"))
        assert driver.find_element(By.TAG_NAME, "h1").text == "Study dashboard"
        now_subjects = driver.find_element(By.CLASS_NAME, "lead").text
        as_of = driver.find_element(By.ID, "as_of")
        as_of.send_keys("2007-09-30")
        Select(driver.find_element(By.ID, "axis")).select_by_value("recorded")
        go(driver, driver.find_element(By.CSS_SELECTOR, "form.asof button"))
        banner = driver.find_element(By.CLASS_NAME, "banner").text
        assert "as of 2007-09-30T23:59:59.999999+00:00" in banner and "recorded" in banner
        then_subjects = driver.find_element(By.CLASS_NAME, "lead").text
        assert then_subjects != now_subjects and "with events by then" in then_subjects
        check_page(driver, "dashboard-as-of")
        go(driver, driver.find_element(By.LINK_TEXT, "Subjects"))  # the as-of goes along
        assert driver.find_element(By.TAG_NAME, "h1").text == "Subjects"
        assert "as of 2007-09-30" in driver.find_element(By.CLASS_NAME, "banner").text

        go(driver, driver.find_element(By.LINK_TEXT, "Verification"))
        assert "Verify it yourself" in driver.find_element(By.TAG_NAME, "main").text
        check_page(driver, "verification")

        go(driver, driver.find_element(By.CSS_SELECTOR, ".who button"))  # sign out
        driver.get(server + "/")
        assert driver.find_element(By.TAG_NAME, "h1").text == "Sign in"
