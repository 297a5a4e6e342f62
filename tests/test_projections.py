"""Projections: tracked in the same transaction as their rows, rebuildable to identical tables, halted by a
broken chain, followed live (LISTEN/NOTIFY on PostgreSQL, polling on SQLite)."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
import sqlalchemy as sa

from projections.audit_trail import AuditTrail, query
from projections.base import ProjectionHalted
from projections.runner import ProjectionRunner
from projections.schema import audit_events, audit_trail
from sle_events.domain.subject import Subject

from conftest import STUDY_CONFIG, execute_sql

pytestmark = pytest.mark.storage
NOW = datetime.now(UTC)


def add_subject(trial, number: str, labs: int = 3) -> Subject:
    s = Subject(trial.study.id, "NJ01", number, NOW - timedelta(days=10))
    trial.record.record(s, signer=trial.coordinator)
    s.obtain_consent("ICF v1.0", NOW - timedelta(days=9), config=STUDY_CONFIG, taken_by="dr.wang")
    trial.record.record(s, signer=trial.investigator)
    for i in range(labs):
        s.record_lab_result("CREAT", Decimal("1.0") + Decimal(i) / 10, "mg/dL", NOW - timedelta(days=8 - i))
    trial.record.record(s, signer=trial.lab)
    return s


def dump(runner: ProjectionRunner) -> list[tuple]:
    cols = [c for c in audit_trail.c if c.name != "id"]
    with runner.engine.connect() as conn:
        return [
            tuple(r)
            for r in conn.execute(
                sa.select(*cols).order_by(audit_trail.c.position, audit_trail.c.field, audit_trail.c.record_id)
            )
        ]


def test_incremental_equals_rebuild(trial):
    runner = ProjectionRunner(trial.url, [AuditTrail()], batch=7)
    for n in range(3):
        add_subject(trial, f"SCR-00{n}")
        runner.catch_up()  # incrementally, in small batches, between appends
    incremental = dump(runner)
    assert incremental, "the audit trail has rows"
    runner.rebuild()
    assert dump(runner) == incremental
    assert runner.status()[0]["lag_events"] == 0
    runner.close()


def test_audit_rows_say_who_when_why_and_both_times(trial):
    s = add_subject(trial, "SCR-100", labs=1)
    runner = ProjectionRunner(trial.url, [AuditTrail()])
    runner.catch_up()
    with runner.engine.connect() as conn:
        rows = query(conn, subject="SCR-100", event_type="Subject.LabResultRecorded")
        by_lab = query(conn, actor=trial.lab.actor)
        none = query(conn, since=(NOW + timedelta(days=1)).isoformat())
    runner.close()
    value = next(r for r in rows if r["field"] == "value")
    assert value["new_value"] == "1.0" and value["old_value"] is None and value["change"] == "recorded"
    assert value["actor"] == "lab.service" and value["role"] == "lab" and value["key"] == trial.lab.key_id
    assert value["occurred_at"] != value["recorded_at"] and value["recorded_at"].endswith("+00:00")
    assert value["stream"] == str(s.id) and value["signature_status"] == "verified_at_append"
    assert {r["event_type"] for r in by_lab} == {"Subject.LabResultRecorded"}
    assert none == []


@pytest.mark.parametrize("batch", [1, 1000], ids=["a-batch-per-event", "one-batch"])
def test_corrections_and_voids_show_the_old_value_and_the_reason(trial, batch):
    """Old values come from the table when the corrected record was projected in an earlier batch, and from
    the batch itself otherwise; both ways give the same rows."""
    s = add_subject(trial, "SCR-150", labs=2)
    first, second = [v for v, f in s.facts.items() if f.type == "LabResultRecorded"]
    s.correct(
        first,
        {"value": Decimal("1.4")},
        "transcription error: 1.4 on the lab report",
        NOW - timedelta(days=2),
        config=STUDY_CONFIG,
    )
    trial.record.record(s, signer=trial.investigator, reason="transcription error: 1.4 on the lab report")
    s.correct(
        first, {"value": Decimal("1.5")}, "second look at the report", NOW - timedelta(days=1), config=STUDY_CONFIG
    )
    trial.record.record(s, signer=trial.investigator, reason="second look at the report")
    s.void(second, "entered on the wrong subject", NOW - timedelta(days=1), config=STUDY_CONFIG)
    trial.record.record(s, signer=trial.investigator, reason="entered on the wrong subject")
    runner = ProjectionRunner(trial.url, [AuditTrail()], batch=batch)
    runner.catch_up()
    with runner.engine.connect() as conn:
        rows = query(conn, subject="SCR-150")
        corrections = query(conn, subject="SCR-150", change="corrected")
        with pytest.raises(ValueError, match="unknown change"):
            query(conn, change="edited")
    runner.close()
    assert corrections == [r for r in rows if r["change"] == "corrected"]
    corrected = [
        (r["old_value"], r["new_value"], r["reason"], r["actor"])
        for r in rows
        if r["change"] == "corrected" and r["field"] == "value"
    ]
    assert corrected == [
        ("1.0", "1.4", "transcription error: 1.4 on the lab report", "dr.wang"),
        ("1.4", "1.5", "second look at the report", "dr.wang"),
    ]
    assert {r["form"] for r in rows if r["change"] == "corrected"} == {"Subject.LabResultRecorded"}
    assert {r["record_id"] for r in rows if r["change"] == "corrected"} == {f"{s.id}:{first}"}
    voided = {r["field"]: (r["old_value"], r["new_value"]) for r in rows if r["change"] == "voided"}
    assert voided["value"] == ("1.1", None) and voided["code"] == ("CREAT", None) and voided["unit"] == ("mg/dL", None)
    recorded = {r["field"] for r in rows if r["event_id"] == f"{s.id}:{second}"}
    assert set(voided) == recorded, "a void lists every field the record had"


def test_a_failing_batch_leaves_neither_rows_nor_position(trial):
    add_subject(trial, "SCR-200")

    class Flaky(AuditTrail):
        def apply(self, conn, facts):
            super().apply(conn, facts)
            raise RuntimeError("power cut mid-batch")

    runner = ProjectionRunner(trial.url, [Flaky()])
    with pytest.raises(RuntimeError):
        runner.catch_up()
    assert runner.position("audit_trail") == 0
    assert dump(runner) == []
    runner.close()
    healthy = ProjectionRunner(trial.url, [AuditTrail()])
    healthy.catch_up()
    after_restart = dump(healthy)
    healthy.rebuild()
    assert dump(healthy) == after_restart != []
    healthy.close()


def test_broken_chain_halts_the_projection_with_a_clear_error(trial):
    s = add_subject(trial, "SCR-300", labs=3)
    execute_sql(
        trial.url,
        "delete from study_events where originator_version = 4 and id = "
        "(select max(id) from study_events where originator_version = 4)",
    )  # a middle lab result
    runner = ProjectionRunner(trial.url, [AuditTrail()], batch=2)
    with pytest.raises(ProjectionHalted) as info:
        runner.catch_up()
    assert info.value.stream == str(s.id) and info.value.version == 5
    assert "hash chain broken" in str(info.value)
    position = runner.position("audit_trail")
    assert position < info.value.position  # nothing at or after the break was projected
    runner.close()


def test_a_worker_follows_new_events(trial):
    runner = ProjectionRunner(trial.url, [AuditTrail()])
    worker = threading.Thread(target=runner.run_forever, kwargs={"poll_seconds": 0.1}, daemon=True)
    worker.start()
    add_subject(trial, "SCR-400", labs=1)
    head = runner.head()
    deadline = time.monotonic() + 10
    while runner.position("audit_trail") < head and time.monotonic() < deadline:
        time.sleep(0.05)
    runner.stop()
    worker.join(10)
    assert runner.position("audit_trail") == head
    runner.close()


def test_one_worker_per_projection_on_postgres(trial):
    if not trial.url.startswith("postgresql"):
        pytest.skip("advisory locks: PostgreSQL only (SQLite is one machine, serialised by its writer)")
    add_subject(trial, "SCR-500")
    first, second = ProjectionRunner(trial.url, [AuditTrail()]), ProjectionRunner(trial.url, [AuditTrail()])
    assert first.catch_up() > 0
    add_subject(trial, "SCR-501")
    assert second.catch_up() == 0, "the projection is owned by the first worker"
    first.close()  # its session ends, the lock is released
    assert second.catch_up() > 0
    second.close()


def test_a_rebuild_interrupted_half_way_is_started_again(trial):
    """Positions read REBUILDING while a rebuild runs; a worker finding that rebuilds instead of continuing
    from a half-built table (which would duplicate rows)."""
    from projections.runner import REBUILDING

    for n in range(3):
        add_subject(trial, f"SCR-60{n}")
    runner = ProjectionRunner(trial.url, [AuditTrail()])
    runner.catch_up()
    complete = dump(runner)
    with runner.engine.begin() as conn:  # as a killed rebuild leaves it: some rows, position REBUILDING
        conn.execute(audit_events.delete().where(audit_events.c.position > 5))
        runner._save_position(conn, "audit_trail", REBUILDING)
    runner.close()
    restarted = ProjectionRunner(trial.url, [AuditTrail()])
    restarted.catch_up()
    assert dump(restarted) == complete
    assert restarted.position("audit_trail") == restarted.head()
    restarted.close()


def test_a_rebuild_that_fails_leaves_nothing_held_back_and_the_next_run_rebuilds(trial, monkeypatch):
    """A rebuild keeps subject rows in memory until the end of its range; if it fails, the in-process
    runner drops them and its next catch-up rebuilds to the same tables as before."""
    import projections.runner as runner_module
    from projections.patient_state import PatientState
    from projections.schema import patient_state

    for n in range(3):
        add_subject(trial, f"SCR-70{n}", labs=4)
    runner = ProjectionRunner(trial.url, [PatientState()])
    runner.catch_up()

    def rows() -> list[tuple]:
        with runner.engine.connect() as conn:
            return sorted(tuple(r) for r in conn.execute(sa.select(patient_state)))

    before = rows()
    monkeypatch.setattr(runner_module, "REBUILD_BATCH", 4)
    calls = {"n": 0}
    original = PatientState.apply

    def fails_on_the_third_batch(self, conn, facts):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk full")
        original(self, conn, facts)

    monkeypatch.setattr(PatientState, "apply", fails_on_the_third_batch)
    with pytest.raises(RuntimeError, match="disk full"):
        runner.rebuild(workers=1)
    [projection] = runner.projections
    assert isinstance(projection, PatientState)  # held and folder are PatientState's
    assert projection.held is None and not projection.folder.subjects
    assert rows() == [] and runner.position("patient_state") == -1  # REBUILDING: nothing half-written counts
    runner.catch_up()
    assert rows() == before and runner.position("patient_state") == runner.head()
    runner.close()


def _analyzed(url: str, table: str) -> bool:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            if engine.dialect.name == "postgresql":
                q = "select last_analyze is not null from pg_stat_user_tables where relname = :t"
                return bool(conn.execute(sa.text(q), {"t": table}).scalar())
            if not sa.inspect(conn).has_table("sqlite_stat1"):
                return False
            stat = sa.text("select count(*) from sqlite_stat1 where tbl = :t")
            return conn.execute(stat, {"t": table}).scalar_one() > 0
    finally:
        engine.dispose()


def test_a_bulk_catch_up_and_a_rebuild_refresh_the_planner_statistics(trial, monkeypatch):
    """Fresh read-model rows without statistics made PostgreSQL pick a plan 1,000 times slower (the web view's
    subject + item audit filter): a catch-up of many events, and every rebuild, analyse the tables they wrote."""
    import projections.runner as runner_module

    add_subject(trial, "SCR-200", labs=2)
    runner = ProjectionRunner(trial.url, [AuditTrail()], batch=7)
    assert not _analyzed(trial.url, "audit_events")
    monkeypatch.setattr(runner_module, "ANALYZE_AFTER", 10**9)
    runner.catch_up()
    assert not _analyzed(trial.url, "audit_events")  # a small catch-up leaves it to autovacuum
    add_subject(trial, "SCR-201", labs=2)
    monkeypatch.setattr(runner_module, "ANALYZE_AFTER", 1)
    assert runner.catch_up() > 0
    assert _analyzed(trial.url, "audit_events")
    analysed: list[list[str]] = []
    monkeypatch.setattr(runner, "analyze", lambda chosen: analysed.append([p.name for p in chosen]))
    runner.rebuild()
    assert analysed[0] == [p.name for p in runner.projections]  # a rebuild always ends with it
    runner.close()
