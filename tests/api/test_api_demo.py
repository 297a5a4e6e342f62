"""The synthetic trial recorded over HTTP: the server stores exactly what the in-process demo stores, and it
verifies."""

from __future__ import annotations

import warnings

import pytest
import sqlalchemy as sa

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from sle_events.api import create_app
from sle_events.audit.verifier import verify_record
from sle_events.demo import run_demo
from sle_events.store.errors import ClockSkew
from sle_events.store.record import StudyRecord

pytestmark = pytest.mark.storage


def test_the_demo_over_http_stores_the_same_trial_and_verifies(db_url, tmp_path):
    app = create_app(db_url, demo_clock=True)
    local = StudyRecord(f"sqlite:///{tmp_path / 'mirror.db'}")
    with TestClient(app) as http:
        result = run_demo(local, tmp_path / "keys", subjects=1, seed=7, api=http)
    served = StudyRecord(db_url)
    try:
        t = local.table

        def rows(record):
            with record.engine.connect() as conn:
                return [
                    (r.originator_id, r.originator_version, bytes(r.state))
                    for r in conn.execute(
                        sa.select(t.c.originator_id, t.c.originator_version, t.c.state).order_by(t.c.id)
                    )
                ]

        assert rows(served) == rows(local)  # every event, byte for byte, in the same order
        assert len(rows(served)) == result.events
        report = verify_record(db_url, workers=1)
        assert report.ok, report.findings[:3]
        assert sum(result.refused_as_expected.values()) > 0  # the deliberate refusals came back from the server
    finally:
        served.close()
        local.close()
        served.engine.dispose()


def test_without_the_demo_clock_the_server_refuses_the_simulated_past(db_url, tmp_path):
    app = create_app(db_url)
    local = StudyRecord(f"sqlite:///{tmp_path / 'mirror.db'}")
    with TestClient(app) as http, pytest.raises(ClockSkew, match="the API refused"):
        run_demo(local, tmp_path / "keys", subjects=1, seed=7, api=http)
    local.close()
