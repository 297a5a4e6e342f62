"""docs/api.md's first-event example runs as written against a running `sle serve` (only its URL and study id are
pointed at the test's)."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from test_api_serve import free_port, start, stop

from sle_events.domain.study import Study
from sle_events.signing.keys import Signer
from sle_events.store.record import StudyRecord

DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"
pytestmark = pytest.mark.storage


def test_the_first_event_example_runs(tmp_path):
    code = DOC.read_text(encoding="utf-8").split("```python\n", 1)[1].split("```", 1)[0]
    url = f"sqlite:///{tmp_path / 'study.db'}"
    now = datetime.now(UTC)
    admin = Signer.generate("admin", "admin")
    nurse = Signer.generate("nurse.li", "coordinator")
    nurse.save(tmp_path / "nurse.pem")
    record = StudyRecord(url)
    study = Study.create("ALLOMSC-SLE", "AlloMSC", admin.actor, admin.public_key_b64, now)
    study.register_key(nurse.actor, nurse.role, nurse.public_key_b64, now, printed_name="Li Na")
    record.record(study, signer=admin)
    record.close()
    port = free_port()
    server = start(url, port, workers=1)
    try:
        code = code.replace('UUID("…")', f'UUID("{study.id}")').replace(
            "http://127.0.0.1:8000", f"http://127.0.0.1:{port}"
        )
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "'version': 1" in done.stdout, done.stdout
    finally:
        stop(server)
