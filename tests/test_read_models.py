"""Patient state, dashboard, audit trail and as-of replay over a synthetic trial, on both engines."""

from __future__ import annotations

import json
import time
from datetime import timedelta
from uuid import UUID

import pytest
import sqlalchemy as sa

from projections.patient_state import summarise
from projections.replay import events_as_of, fold, replay
from projections.runner import ProjectionRunner
from projections.schema import (
    audit_trail,
    casebook_locks,
    casebook_signoffs,
    casebook_state,
    patient_state,
    subject_adverse_events,
    subject_visits,
)
from sle_events.demo import run_demo
from sle_events.signing.envelope import parse_time
from sle_events.store.record import StudyRecord

pytestmark = pytest.mark.storage


@pytest.fixture
def demo_url(db_url, tmp_path):
    record = StudyRecord(db_url)
    run_demo(record, tmp_path / "keys", subjects=3, seed=7)
    record.close()
    return db_url


def dump(runner: ProjectionRunner) -> dict[str, list[tuple]]:
    tables = {}
    with runner.engine.connect() as conn:
        for table in (patient_state, subject_visits, subject_adverse_events, audit_trail):
            cols = [c for c in table.c if c.name != "id"]
            tables[table.name] = sorted(tuple(map(str, r)) for r in conn.execute(sa.select(*cols)))
        for table in (casebook_signoffs, casebook_state, casebook_locks):  # sign-offs and locks of the demo
            cols = [c for c in table.c if c.name != "id"]
            tables[table.name] = sorted(tuple(map(str, r)) for r in conn.execute(sa.select(*cols)))
    return tables


def test_every_projection_rebuilds_identical(demo_url):
    runner = ProjectionRunner(demo_url, batch=257)
    runner.catch_up()
    incremental = dump(runner)
    assert all(incremental.values()), {k: len(v) for k, v in incremental.items()}
    runner.rebuild()
    assert dump(runner) == incremental
    assert {r["projection"]: r["lag_events"] for r in runner.status()} == {
        "audit_trail": 0,
        "patient_state": 0,
        "study_dashboard": 0,
        "review_acts": 0,
        "sdv_facts": 0,
        "casebook": 0,
    }
    runner.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_rebuild_reports_progress_up_to_the_head(demo_url, workers):
    """In one process or several (one per range of streams), the same tables."""
    runner = ProjectionRunner(demo_url)
    runner.catch_up()
    incremental = dump(runner)
    seen: list[tuple[int, int]] = []
    runner.rebuild(on_progress=lambda done, total: seen.append((done, total)), workers=workers)
    head = runner.head()
    assert dump(runner) == incremental
    runner.close()
    assert seen[-1] == (head, head) and len(seen) >= 2
    assert all(total == head and 0 <= done <= head for done, total in seen)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen), "progress never goes back"


def test_a_parallel_rebuild_beside_a_process_that_keeps_appending(db_url, tmp_path):
    """Two rebuild processes and an appending one (on SQLite all three queue for its one writer): no lock
    errors, and once the writer stops and the projections catch up, the tables equal a rebuild from scratch."""
    import os
    import subprocess
    import sys
    import threading
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    (tmp_path / "keys").mkdir()
    # Paced: unpaced, the writer outran the rebuild's catch-up once appends got faster (330,000 events in one CI run).
    writer = subprocess.Popen(
        [sys.executable, str(root / "tests" / "crash_writer.py"), db_url, str(tmp_path / "keys")],
        env={**os.environ, "CRASH_WRITER_PAUSE": "0.01"},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=root,
    )
    acks: list[str] = []
    pump = threading.Thread(
        target=lambda: acks.extend(line for line in writer.stdout if line.startswith("ACK")),  # type: ignore[union-attr]  # stdout=PIPE: never None
        daemon=True,
    )
    pump.start()
    try:
        deadline = time.monotonic() + 30
        while len(acks) < 300 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(acks) >= 300, "the writer got going"
        runner = ProjectionRunner(db_url)
        before = len(acks)
        runner.rebuild(workers=2)
        assert len(acks) > before, "the writer kept appending during the rebuild"
    finally:
        writer.kill()
        writer.wait()
    runner.catch_up()
    assert runner.position("patient_state") == runner.head()
    alongside = dump(runner)
    runner.rebuild(workers=1)
    assert alongside["patient_state"] and alongside["audit_trail"]
    assert dump(runner) == alongside
    runner.close()


def test_audit_trail_times_are_utc_and_the_same_instants_as_signed(demo_url):
    """Envelopes keep the site's offset (+08:00 in the demo); the audit trail shows both times in UTC."""
    runner = ProjectionRunner(demo_url)
    runner.catch_up()
    with runner.engine.connect() as conn:
        rows = conn.execute(
            sa.select(
                audit_trail.c.stream, audit_trail.c.event_id, audit_trail.c.occurred_at, audit_trail.c.recorded_at
            ).distinct()
        ).all()
    runner.close()
    record = StudyRecord(demo_url)
    signed = {
        f"{e.envelope['stream']}:{e.version}": e.envelope["occurred_at"]
        for stream in {r.stream for r in rows}
        for e in record.stream(UUID(stream))
    }
    record.close()
    assert any(not t.endswith("+00:00") for t in signed.values()), "the demo signs local clinic times"
    for r in rows:
        assert r.occurred_at.endswith("+00:00") and r.recorded_at.endswith("+00:00")
        assert parse_time("occurred_at", r.occurred_at) == parse_time("occurred_at", signed[r.event_id])


def test_patient_state_and_dashboard_match_the_subjects_own_history(demo_url):
    runner = ProjectionRunner(demo_url)
    runner.catch_up()
    with runner.engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(sa.select(patient_state))]
        visits = {(r.subject, r.visit): r.outcome for r in conn.execute(sa.select(subject_visits))}
    assert rows
    for row in rows:
        subject = runner.record.get(UUID(row["subject"]))
        assert row["status"] == str(subject.status) and row["version"] == subject.version
        assert row["screening_number"] == subject.screening_number
        assert row["tx_date"] == (subject.tx_date.isoformat() if subject.tx_date else None)
        for _code, lab in json.loads(row["key_labs"]).items():
            assert lab["trend"] in (None, "up", "down", "same") and lab["value"] and lab["unit"]
        mine = {v: o for (s, v), o in visits.items() if s == row["subject"]}
        assert set(mine) == set(subject.visit_outcomes)
        assert all((o == "missed") == (subject.visit_outcomes[v] == "missed") for v, o in mine.items())
    runner.close()


def test_replay_as_of_recorded_time_shows_what_the_database_said_then(demo_url):
    record = StudyRecord(demo_url)
    t = record.table
    with record.engine.connect() as conn:
        corrected = conn.execute(
            sa.select(t.c.originator_id, t.c.state).where(t.c.topic == "Subject.Corrected").order_by(t.c.id).limit(1)
        ).first()
    assert corrected is not None, "the demo records corrections"
    stream = record.stream(corrected.originator_id)
    correction = next(e for e in stream if e.topic == "Subject.Corrected")
    target = correction.envelope["payload"]["corrected_version"]
    field, new_value = next(iter(correction.envelope["payload"]["new_values"].items()))
    recorded = parse_time("recorded_at", correction.envelope["recorded_at"])

    before = replay(record, str(corrected.originator_id), as_of=recorded - timedelta(microseconds=1))
    after = replay(record, str(corrected.originator_id), as_of=recorded)
    old_then = before.facts[target].record.model_dump(mode="json")[field]
    now = after.facts[target].record.model_dump(mode="json")[field]
    assert now == new_value and old_then != new_value
    assert before.version < correction.version <= after.version
    record.close()


def test_replay_as_of_occurred_time_keeps_later_corrections_of_earlier_facts(demo_url):
    record = StudyRecord(demo_url)
    t = record.table
    with record.engine.connect() as conn:
        busiest = conn.execute(
            sa.select(t.c.originator_id)
            .where(t.c.topic == "Subject.LabResultRecorded")
            .group_by(t.c.originator_id)
            .order_by(sa.func.count().desc())
            .limit(1)
        ).scalar()
    assert busiest is not None
    subject = record.get(busiest)
    stream = record.stream(subject.id)
    times = sorted(
        {parse_time("occurred_at", e.envelope["occurred_at"]) for e in stream if e.topic == "Subject.LabResultRecorded"}
    )
    assert len(times) > 2
    midpoint = times[len(times) // 2]
    then = fold(events_as_of(stream, occurred_as_of=midpoint))
    assert all(r.occurred_at <= midpoint for r in then.labs)
    assert len(then.labs) < len(subject.labs)
    # Every correction recorded later of a fact that happened by then is applied.
    for e in stream:
        payload = e.envelope["payload"]
        if e.topic == "Subject.Corrected" and payload["corrected_version"] in then.facts:
            fact = then.facts[payload["corrected_version"]]
            dumped = fact.record.model_dump(mode="json")
            assert all(dumped[k] == v for k, v in payload["new_values"].items() if k != "occurred_at")
    state = summarise(then, record.study(subject.study_id).config.visits)
    assert state["version"] == then.version
    record.close()


def test_replay_of_an_unknown_subject_says_so(demo_url):
    from projections.replay import SubjectNotFound

    record = StudyRecord(demo_url)
    with pytest.raises(SubjectNotFound, match="NJ99-9999"):
        replay(record, "NJ99-9999")
    record.close()
