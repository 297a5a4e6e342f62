"""What the read models do with a record that is not as signed: a deleted middle event (the rebuild fails fast,
naming it; read commands say the projection is halted), an edited or forged event (never projected: the
signature is checked against the registry at its log position), and a signed event the domain cannot load
(only its own subject stops). Every case edits the real database by SQL, on both engines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from datetime import timedelta
from pathlib import Path
from typing import cast

import pytest
import sqlalchemy as sa
from test_projections import add_subject

from projections.base import ProjectionHalted
from projections.runner import REBUILDING, ProjectionRunner
from projections.schema import audit_events, halted_streams, patient_state, subject_visits
from sle_events.signing.envelope import SealedEvent, format_time, seal, utc_now
from sle_events.signing.keys import Signer

from conftest import execute_sql, position_of

pytestmark = pytest.mark.storage
SLE = str(Path(sys.executable).with_name("sle"))


def sle(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """The installed command; a hang fails the test (TimeoutExpired) instead of hanging the suite."""
    env = dict(os.environ, COLUMNS="250", NO_COLOR="1")
    env.pop("SLE_DATABASE_URL", None)
    return subprocess.run([SLE, *args], capture_output=True, text=True, timeout=timeout, env=env)


def subjects(trial, n: int = 4, labs: int = 3) -> list:
    return [add_subject(trial, f"SCR-9{i:02d}", labs=labs) for i in range(n)]


def rows(url: str, table: sa.Table, **where: object) -> list[dict]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            q = sa.select(table)
            for name, value in where.items():
                q = q.where(table.c[name] == value)
            return [dict(r._mapping) for r in conn.execute(q)]
    finally:
        engine.dispose()


def newest(trial, subject) -> SealedEvent:
    return trial.record.stream(subject.id)[-1]


def store_by_sql(trial, sealed) -> None:
    """Insert a sealed event as a DBA could, past every check `append` makes."""
    engine = sa.create_engine(trial.url)
    try:
        with engine.begin() as conn:
            conn.execute(
                trial.record.table.insert().values(
                    originator_id=sealed.stream,
                    originator_version=sealed.version,
                    topic=sealed.topic,
                    state=sealed.sealed,
                )
            )
    finally:
        engine.dispose()


def next_lab_event(trial, subject, signer: Signer, **payload: object) -> SealedEvent:
    """A lab result sealed by `signer`, chained to the subject's newest event."""
    last = newest(trial, subject)
    env = dict(
        last.envelope,
        version=last.version + 1,
        prev=last.hash,
        recorded_at=format_time(utc_now()),
        payload=dict(last.envelope["payload"], **payload),
    )
    return seal(env, signer)


# --- item 4: a deleted middle event ------------------------------------------------------------------------
def test_a_rebuild_meeting_a_deleted_middle_event_exits_1_naming_it_and_read_commands_say_halted(trial):
    """Was: the worker's ProjectionHalted could not be unpickled, the pool's result thread died and the parent
    spun forever; positions stayed REBUILDING and every read command started the rebuild again."""
    victim = subjects(trial)[1]
    execute_sql(trial.url, "delete from study_events where id = :id", id=position_of(trial, victim.id, 4))
    done = sle("projections", "rebuild", "--db", trial.url, "--workers", "2", timeout=60)
    assert done.returncode == 1, done.stderr
    assert str(victim.id) in done.stderr and "v5" in done.stderr and "hash chain broken" in done.stderr
    for command in (["patients"], ["dashboard"], ["audit-trail"]):
        read = sle(*command, "--db", trial.url, timeout=60)
        assert read.returncode == 1, (command, read.stdout)
        assert "halted" in read.stderr and str(victim.id) in read.stderr and "v5" in read.stderr
    status = sle("projections", "status", "--db", trial.url, "--json")
    assert status.returncode == 0
    for row in json.loads(status.stdout):
        assert row["position"] == REBUILDING and str(victim.id) in row["halted"] and "v5" in row["halted"]


def test_a_rebuild_worker_that_dies_fails_the_rebuild_instead_of_hanging(trial):
    subjects(trial)
    script = textwrap.dedent(f"""
        import os, sys
        import projections.runner as runner_module
        from projections.runner import ProjectionRunner, RebuildFailed

        parent = os.getpid()
        original = runner_module._project_range

        def dies_in_a_worker(*args, **kwargs):
            if os.getpid() != parent:
                os._exit(9)  # killed: no answer, no exception
            return original(*args, **kwargs)

        runner_module._project_range = dies_in_a_worker
        runner = ProjectionRunner({trial.url!r})
        try:
            runner.rebuild(workers=2)
        except RebuildFailed as e:
            print("failed:", e)
            sys.exit(0)
        sys.exit(1)
    """)
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 0, done.stderr
    assert "a rebuild worker process died" in done.stdout


# --- item 7: signatures ------------------------------------------------------------------------------------
def test_an_edited_newest_event_is_never_shown(trial):
    """Its chain holds (nothing follows it), so only its signature shows the edit."""
    victim = subjects(trial, 2)[0]
    last = newest(trial, victim)
    assert b'"value":"1.2"' in last.sealed
    execute_sql(
        trial.url,
        "update study_events set state = :state where id = :id",
        state=last.sealed.replace(b'"value":"1.2"', b'"value":"0.4"'),
        id=position_of(trial, victim.id, last.version),
    )
    where = f"(stream {victim.id} v{last.version})"
    for command in (["patients", "--json"], ["audit-trail", "--format", "json"], ["replay", "--subject", "SCR-900"]):
        read = sle(*command, "--db", trial.url)
        assert read.returncode == 1, (command, read.stdout)
        assert where in read.stderr and "bad_signature" in read.stderr and "0.4" not in read.stdout
    runner = ProjectionRunner(trial.url)
    with pytest.raises(ProjectionHalted, match="bad_signature") as info:
        runner.rebuild(workers=2)
    assert (info.value.stream, info.value.version) == (str(victim.id), last.version)
    assert info.value.position == position_of(trial, victim.id, last.version)
    assert rows(trial.url, audit_events, stream=str(victim.id), event_id=f"{victim.id}:{last.version}") == []
    runner.close()


def test_an_event_forged_with_an_unregistered_key_is_never_shown(trial):
    victim = subjects(trial, 2)[1]
    forger = Signer.generate(trial.lab.actor, "lab")  # the lab's name, not the lab's registered key
    forged = next_lab_event(trial, victim, forger, value="0.2")
    store_by_sql(trial, forged)
    runner = ProjectionRunner(trial.url)
    with pytest.raises(ProjectionHalted, match="key_unknown") as info:
        runner.catch_up()
    assert (info.value.stream, info.value.version) == (str(victim.id), forged.version)
    assert "key_unknown" in cast(str, runner.status()[0]["halted"])  # status() rows are dict[str, object]
    runner.close()


def test_a_key_registered_after_the_projection_started_is_trusted_from_its_position(trial):
    """The reader reads the registry again when events lie beyond it: an incremental run keeps up."""
    runner = ProjectionRunner(trial.url)
    first = subjects(trial, 1)[0]
    runner.catch_up()
    lab2 = Signer.generate("lab.second", "lab")
    study = trial.record.get(trial.study.id)
    study.register_key(lab2.actor, lab2.role, lab2.public_key_b64, utc_now())
    trial.record.record(study, signer=trial.admin)
    [signed_by_lab2] = trial.record.append([next_lab_event(trial, first, lab2)])
    runner.catch_up()
    assert all(r["lag_events"] == 0 and r["halted"] is None for r in runner.status())
    [state] = rows(trial.url, patient_state, subject=str(first.id))
    assert state["position"] == signed_by_lab2
    runner.close()


# --- item 3 (read side): a signed fact the domain cannot load ----------------------------------------------
@pytest.mark.parametrize("workers", [1, 2])
def test_a_signed_lab_result_that_does_not_load_halts_only_its_subject(trial, workers):
    """Was: decimal.InvalidOperation from the folder, and `sle patients` failed for the whole study."""
    first, bad, _third = subjects(trial, 3)
    good_version = newest(trial, bad).version
    unloadable = next_lab_event(trial, bad, trial.lab, value="not-a-number")
    store_by_sql(trial, unloadable)
    where = {"version": unloadable.version, "position": position_of(trial, bad.id, unloadable.version)}

    runner = ProjectionRunner(trial.url)
    runner.catch_up()
    incremental = {
        t.name: sorted(tuple(map(str, r.values())) for r in rows(trial.url, t))
        for t in (patient_state, subject_visits, halted_streams, audit_events)
    }
    runner.rebuild(workers=workers)
    for t in (patient_state, subject_visits, halted_streams, audit_events):
        assert sorted(tuple(map(str, r.values())) for r in rows(trial.url, t)) == incremental[t.name], t.name
    assert all(r["lag_events"] == 0 and r["halted"] is None for r in runner.status())
    runner.close()

    states = {r["screening_number"]: r for r in rows(trial.url, patient_state)}
    assert set(states) == {"SCR-900", "SCR-901", "SCR-902"}
    assert states["SCR-901"]["version"] == good_version  # as of the version before
    assert states["SCR-900"]["version"] == newest(trial, first).version == states["SCR-902"]["version"]
    halted = rows(trial.url, halted_streams)
    assert {h["projection"] for h in halted} == {"patient_state", "study_dashboard", "sdv_facts"}
    for h in halted:
        assert (h["stream"], h["subject"], h["version"], h["position"]) == (str(bad.id), "SCR-901", *where.values())
        assert "LabResultRecorded" in h["detail"] and "InvalidOperation" in h["detail"]

    patients = sle("patients", "--db", trial.url, "--json")
    assert patients.returncode == 0, patients.stderr
    by_number = {r["screening_number"]: r for r in json.loads(patients.stdout)}
    assert by_number["SCR-901"]["halted"]["version"] == unloadable.version
    assert by_number["SCR-900"]["halted"] is None and by_number["SCR-902"]["halted"] is None
    table = sle("patients", "--db", trial.url)
    assert f"HALTED at v{unloadable.version}" in table.stdout and "InvalidOperation" in table.stdout
    dashboard = json.loads(sle("dashboard", "--db", trial.url, "--json").stdout)
    assert [(h["subject"], h["version"]) for h in dashboard["halted_streams"]] == [("SCR-901", unloadable.version)]
    status = json.loads(sle("projections", "status", "--db", trial.url, "--json").stdout)
    assert {r["projection"]: [h["version"] for h in r["halted_streams"]] for r in status} == {
        "audit_trail": [],
        "patient_state": [unloadable.version],
        "study_dashboard": [unloadable.version],
        "review_acts": [],
        "sdv_facts": [unloadable.version],  # the facts to verify stop at the same fact
        "casebook": [],  # no regulated act on this subject
    }
    replay = sle("replay", "--subject", "SCR-901", "--db", trial.url)
    assert replay.returncode == 1 and f"v{unloadable.version}" in replay.stderr and "InvalidOperation" in replay.stderr
    earlier = sle(
        "replay", "--subject", "SCR-901", "--db", trial.url, "--as-of", format_time(utc_now() - timedelta(minutes=10))
    )
    assert earlier.returncode in (0, 1) and "InvalidOperation" not in earlier.stderr


def test_a_halted_subject_loaded_by_a_later_run_halts_at_the_same_fact(trial):
    """A new process has no folded subjects: it loads the stream (checked) and finds the same fact."""
    bad = subjects(trial, 2)[0]
    runner = ProjectionRunner(trial.url)
    runner.catch_up()
    runner.close()
    unloadable = next_lab_event(trial, bad, trial.lab, value="not-a-number")
    store_by_sql(trial, unloadable)
    later = ProjectionRunner(trial.url)
    later.catch_up()
    assert {(h["projection"], h["version"]) for h in rows(trial.url, halted_streams)} == {
        ("patient_state", unloadable.version),
        ("study_dashboard", unloadable.version),
        ("sdv_facts", unloadable.version),
    }
    [state] = rows(trial.url, patient_state, subject=str(bad.id))
    assert state["version"] == unloadable.version - 1
    later.close()
