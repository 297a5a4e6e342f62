"""Helpers of the web view's tests: a small record with two studies, signing in, and a headless Chromium."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from projections.runner import ProjectionRunner
from sle_events.signing.keys import Signer
from sle_events.store.record import StudyRecord
from sle_events.trial import Trial
from sle_events.web.signin import make_token

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "web"


@dataclass
class WebStudy:
    """Two studies in one record: ALLOMSC-SLE (site NJ01, subject NJ01-0007) and OTHER-STUDY (subject SH01-0001)."""

    url: str
    trial: Trial
    other: Trial
    people: dict[str, Signer]
    subject: str = "NJ01-0007"
    other_subject: str = "SH01-0001"
    positions: dict[str, int] = field(default_factory=dict)
    before_correction: datetime | None = None

    def token(self, who: str = "monitor", study: str | None = None, **kw: Any) -> str:
        return make_token(self.people[who], study, **kw)

    def revoke(self, who: str, reason: str = "left the study") -> None:
        record = StudyRecord(self.url)  # the one that built the record was closed
        try:
            study = record.get(self.trial.study_id)
            study.revoke_key(self.people[who].key_id, reason, datetime.now(UTC))
            record.record(study, signer=self.people["admin"])
        finally:
            record.close()

    def counts(self) -> dict[str, int]:
        """Rows of every table: what a refused request must leave exactly as it was (sessions aside)."""
        engine = sa.create_engine(self.url)
        try:
            names = sorted(sa.inspect(engine).get_table_names())
            with engine.connect() as conn:
                return {n: conn.execute(sa.text(f'select count(*) from "{n}"')).scalar_one() for n in names}
        finally:
            engine.dispose()


def make_web_study(url: str) -> WebStudy:
    now = datetime.now(UTC)
    people = {
        name: Signer.generate(actor, role)
        for name, actor, role in [
            ("admin", "admin@drum-tower", "admin"),
            ("dm", "dm.zhao", "data_manager"),
            ("coordinator", "nurse.li", "coordinator"),
            ("investigator", "dr.wang", "investigator"),
            ("lab", "lab.drum-tower", "lab"),
            ("monitor", "mon.chen", "monitor"),
            ("auditor", "insp.gao", "auditor"),
            ("other_admin", "admin@ruijin", "admin"),
            ("other_dm", "dm.qian", "data_manager"),
            ("other_coordinator", "nurse.xu", "coordinator"),
            ("other_monitor", "mon.sun", "monitor"),
        ]
    }
    p = people
    record = StudyRecord(url)
    trial = Trial.create(
        record,
        code="ALLOMSC-SLE",
        title="AlloMSC for lupus nephritis",
        admin=p["admin"],
        people=[
            (p["dm"], "Zhao Min"),
            (p["coordinator"], "Li Na"),
            (p["investigator"], "Dr. Wang Li"),
            p["lab"],
            (p["monitor"], "Chen Jing"),
            (p["auditor"], "Gao Yan"),
        ],
        occurred_at=now - timedelta(days=40),
    )
    trial.add_site("NJ01", "Drum Tower Hospital, Nanjing", "Asia/Shanghai", signer=p["dm"])
    trial.approve_icf_version("ICF v1.1", now - timedelta(days=30), signer=p["dm"])
    sid = trial.screen("NJ01", "NJ01-0007", now - timedelta(days=3), signer=p["coordinator"])
    trial.obtain_consent(
        sid, "ICF v1.1", now - timedelta(days=3, hours=-1), signer=p["investigator"], taken_by="dr.wang"
    )
    for days, value in ((2, "1.10"), (1, "1.30")):
        trial.record_lab_result(sid, "CREAT", value, "mg/dL", now - timedelta(days=days), signer=p["lab"])
    lab_version = trial.subject(sid).version - 1  # the second creatinine (a derived eGFR, without a value, followed)
    for days, value in ((2, "85"), (1, "62")):  # C3 falling: a trend to plot
        trial.record_lab_result(sid, "C3", value, "mg/dL", now - timedelta(days=days, hours=-1), signer=p["lab"])
    time.sleep(0.01)
    before_correction = datetime.now(UTC)  # recorded time: the database held 1.30 then
    time.sleep(0.01)
    trial.correct(sid, lab_version, {"value": "1.03"}, "<script>alert(1)</script> transcription", signer=p["lab"])

    trial.approve_new_study("OTHER-STUDY", "admin@ruijin", p["other_admin"].public_key_b64, signer=p["admin"])
    other = Trial.create(
        record,
        code="OTHER-STUDY",
        title="Another study in the same database",
        admin=p["other_admin"],
        people=[(p["other_dm"], "Qian Hui"), (p["other_coordinator"], "Xu Lan"), (p["other_monitor"], "Sun Wei")],
    )
    other.add_site("SH01", "Ruijin Hospital, Shanghai", "Asia/Shanghai", signer=p["other_dm"])
    other.screen("SH01", "SH01-0001", now - timedelta(days=1), signer=p["other_coordinator"])
    t = record.table
    with record.engine.connect() as conn:
        other_position = conn.execute(
            sa.select(sa.func.max(t.c.id)).where(t.c.originator_id == other.subject_id("SH01-0001"))
        ).scalar_one()
        own_position = conn.execute(sa.select(sa.func.max(t.c.id)).where(t.c.originator_id == sid)).scalar_one()
    record.close()
    runner = ProjectionRunner(url)  # what `sle projections run` does beside the view
    try:
        runner.catch_up()
    finally:
        runner.close()
    return WebStudy(
        url,
        trial,
        other,
        people,
        positions={"own": own_position, "other": other_position},
        before_correction=before_correction,
    )


# ---------------------------------------------------------------------------------------------- browser
def browser_problem() -> str | None:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} is missing (Debian's chromium and chromium-driver; .ci/run installs them)"
    return None


@contextmanager
def chromium(width: int = 1280, height: int = 900) -> Iterator[Any]:
    """Debian's headless Chromium through its own chromedriver; nothing is downloaded (SE_OFFLINE)."""
    os.environ["SE_OFFLINE"] = "1"  # selenium-manager must never fetch a browser or a driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="sle-web-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        f"--window-size={width},{height}",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.set_window_size(width, height)
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def screenshot(driver: Any, name: str) -> Path:
    """The whole page as a PNG under tests/artifacts/web/ (ignored by git), for a person to look at."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    width = driver.get_window_size()["width"]
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(width, min(max(height, 600), 6000))
    path = ARTIFACTS / f"{name}-{width}.png"
    driver.save_screenshot(str(path))
    driver.set_window_size(width, 900)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serve(app: Any) -> Iterator[str]:
    """Run an ASGI app with uvicorn on a free loopback port in a thread; yield its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
