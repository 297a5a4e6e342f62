"""The verifier's issue-11 items and incremental verification (`--since`), on both engines, tampering by SQL.

Each test here failed before its fix: a dropped ledger table turned the ledger check off, a topic edit or a
deeply nested state crashed `sle verify` (exit 1, no report), a zeroed leaf hash blamed the intact event, an
edited KeyRevoked topic reported a false `missing_event`, and a stalled integrator went unreported.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from test_ledger_store import ORIGIN, add_subject, build, located, logged
from test_tamper import replace_in_state
from typer.testing import CliRunner

from sle_events.audit.errors import UnusableInput
from sle_events.audit.verifier import verify_record
from sle_events.cli.main import app
from sle_events.ledger.log import Ledger, create_log_key

from conftest import execute_sql, position_of

pytestmark = pytest.mark.storage


def kinds(report) -> set[str]:
    return {f.kind for f in report.findings}


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


# --- item 5: dropping or emptying a ledger table does not turn the ledger check off ------------------------------
@pytest.mark.parametrize("how", ["drop table ledger_checkpoints", "delete from ledger_checkpoints"])
def test_a_dropped_or_emptied_ledger_table_is_a_finding_and_the_deletion_is_still_located(trial, tmp_path, how):
    subjects = build(trial)
    logged(trial, tmp_path)
    assert verify_record(trial.url, workers=1).ok
    last = position_of(trial, subjects[2].id, 4)  # a stream's newest event: the chains cannot see it go
    execute_sql(trial.url, "delete from study_events where id = :id", id=last)
    execute_sql(trial.url, how)

    report = verify_record(trial.url, workers=1)
    table_kind = "ledger_table_missing" if how.startswith("drop") else "ledger_checkpoints_emptied"
    assert {table_kind, "ledger_leaf_missing_event"} <= kinds(report)
    [gone] = [f for f in report.findings if f.kind == "ledger_leaf_missing_event"]
    assert (gone.position, gone.stream, gone.version) == (last, str(subjects[2].id), 4)
    assert cli("verify", "--db", trial.url, "--workers", "1").exit_code == 1


def test_all_ledger_tables_dropped_is_a_finding_for_an_auditor_holding_the_vkey(trial, tmp_path):
    build(trial)
    _, signer, _ = logged(trial, tmp_path)
    for table in ("ledger_checkpoints", "ledger_nodes", "ledger_leaves", "ledger_state"):
        execute_sql(trial.url, f"drop table {table}")
    # Without a trust root naming the log nothing here says a ledger existed: the documented residual risk.
    assert verify_record(trial.url, workers=1).ok
    report = verify_record(trial.url, workers=1, vkey=signer.vkey)
    assert kinds(report) == {"ledger_missing"}
    assert "trust root names a log" in report.findings[0].detail


# --- item 6: any stored byte pattern gives findings, never a crash ---------------------------------------------
def test_a_subject_v1_topic_naming_study_created_is_a_topic_mismatch_not_a_crash(trial):
    subjects = build(trial)
    pos = position_of(trial, subjects[0].id, 1)
    execute_sql(
        trial.url,
        "update study_events set topic = :t where id = :id",
        t="sle_events.domain.study:Study.Created",
        id=pos,
    )
    report = verify_record(trial.url, workers=1)
    assert located(report.findings) == {(str(subjects[0].id), 1, "topic_mismatch")}
    done = cli("verify", "--db", trial.url, "--workers", "1", "--json")
    assert done.exit_code == 1 and json.loads(done.stdout)["findings"][0]["kind"] == "topic_mismatch"


def test_a_state_nested_100000_deep_is_a_finding_not_a_crash(trial):
    subjects = build(trial)
    pos = position_of(trial, subjects[1].id, 2)
    execute_sql(
        trial.url, "update study_events set state = :s where id = :id", s=b"[" * 100_000 + b"]" * 100_000, id=pos
    )
    report = verify_record(trial.url, workers=1)
    assert (str(subjects[1].id), 2, "malformed") in located(report.findings)
    assert (str(subjects[1].id), 3, "chain_broken") in located(report.findings)
    done = cli("verify", "--db", trial.url, "--workers", "1")
    assert done.exit_code == 1 and "malformed" in done.stdout


def test_a_crash_of_the_tool_is_exit_3_with_a_message_never_exit_1(trial, monkeypatch):
    from sle_events.audit import verifier

    def broken(self, url, **kw):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(verifier.Verifier, "verify", broken)
    done = cli("verify", "--db", trial.url, "--workers", "1")
    assert done.exit_code == 3 and "disk on fire" in done.output and "Traceback" not in done.output


# --- item 12: findings name what was changed ---------------------------------------------------------------------
def test_a_zeroed_leaf_hash_names_the_ledger_row_not_the_intact_event(trial, tmp_path):
    subjects = build(trial)
    logged(trial, tmp_path)
    for version in (2, 4):  # one leaf with a sibling, and (16 leaves) any other
        pos = position_of(trial, subjects[0].id, version)
        execute_sql(trial.url, "update ledger_leaves set leaf_hash = :h where position = :p", h=bytes(32), p=pos)
    report = verify_record(trial.url, workers=1)
    rows = [f for f in report.findings if f.kind == "ledger_leaf_row_altered"]
    assert {(f.stream, f.version) for f in rows} == {(str(subjects[0].id), 2), (str(subjects[0].id), 4)}
    assert "ledger_leaf_mismatch" not in kinds(report)  # the events were not altered
    assert all("leaf row was edited" in f.detail for f in rows)


def test_an_edited_key_revoked_topic_is_one_topic_mismatch_not_a_missing_event(trial):
    build(trial)
    trial.study.revoke_key(trial.lab.key_id, "left the lab", datetime.now(UTC))
    trial.record.record(trial.study, signer=trial.admin)
    version = trial.study.version
    pos = position_of(trial, trial.study.id, version)
    execute_sql(
        trial.url,
        "update study_events set topic = :t where id = :id",
        t="sle_events.domain.subject:Subject.Screened",
        id=pos,
    )
    report = verify_record(trial.url, workers=1)
    assert located(report.findings) == {(str(trial.study.id), version, "topic_mismatch")}


# --- item 10: events waiting for integration -------------------------------------------------------------------
def test_events_pending_integration_longer_than_the_limit_are_a_finding(trial, tmp_path):
    build(trial)
    logged(trial, tmp_path)
    s = add_subject(trial, 9, labs=1)  # appended after the last integration
    assert verify_record(trial.url, workers=1).ok  # just appended: within the default 15 minutes
    report = verify_record(trial.url, workers=1, pending_limit=timedelta(0))
    [f] = report.findings
    assert (f.kind, f.stream, f.version) == ("ledger_pending_too_long", str(s.id), 1)
    assert "3 events are not integrated yet" in f.detail
    assert cli("verify", "--db", trial.url, "--workers", "1", "--max-pending", "0").exit_code == 1


# --- incremental verification ----------------------------------------------------------------------------------
def saved_checkpoint(trial, tmp_path):
    subjects = build(trial)
    _, signer, notes = logged(trial, tmp_path)
    saved = tmp_path / "auditor.cp"
    saved.write_text(notes[-1])
    later = [add_subject(trial, 10 + i, labs=2) for i in range(2)]
    Ledger(trial.url).integrate()
    return subjects, later, signer, saved


def test_since_checks_only_the_new_events_in_full_and_rehashes_the_rest(trial, tmp_path):
    _subjects, _later, signer, saved = saved_checkpoint(trial, tmp_path)
    report = verify_record(trial.url, workers=2, since=saved, vkey=signer.vkey)
    assert report.ok, report.findings
    assert report.since is not None
    assert report.since["size"] == 16 and report.since["rehashed"] == 16
    assert report.events == 4 + 8  # the registry (4) and the two new subjects (8)
    done = cli("verify", "--db", trial.url, "--since", str(saved), "--vkey", signer.vkey, "--workers", "1")
    assert done.exit_code == 0 and "re-hashed against their ledger leaves" in " ".join(done.stdout.split())


def test_since_locates_an_edit_before_and_after_the_checkpoint(trial, tmp_path):
    subjects, later, signer, saved = saved_checkpoint(trial, tmp_path)
    before = position_of(trial, subjects[0].id, 3)
    after = position_of(trial, later[0].id, 3)
    for pos in (before, after):
        replace_in_state(trial.url, pos, '"unit":"mg/dL"', '"unit":"mg/dl"')
    report = verify_record(trial.url, workers=1, since=saved, vkey=signer.vkey)
    where = located(report.findings)
    assert (str(subjects[0].id), 3, "ledger_leaf_mismatch") in where  # before: its leaf no longer matches
    assert (str(later[0].id), 3, "bad_signature") in where  # after: checked in full
    assert (str(later[0].id), 4, "chain_broken") in where
    assert "inconsistent_with_saved_checkpoint" in kinds(report)


def test_since_refuses_a_checkpoint_of_another_log_and_reports_a_rolled_back_one(trial, tmp_path):
    subjects, _later, signer, saved = saved_checkpoint(trial, tmp_path)
    other = create_log_key(tmp_path / "other.key", "sle.local/OTHER")
    with pytest.raises(UnusableInput, match="does not verify"):
        verify_record(trial.url, workers=1, since=saved, vkey=other.vkey)
    done = cli("verify", "--db", trial.url, "--since", str(saved), "--vkey", other.vkey)
    assert done.exit_code == 2 and "does not verify" in " ".join(done.output.split())
    # Rolled back: the log now holds fewer events than the auditor's checkpoint covered.
    execute_sql(trial.url, "delete from study_events where id > :p", p=position_of(trial, subjects[2].id, 2))
    for table in ("ledger_checkpoints", "ledger_nodes", "ledger_leaves", "ledger_state"):
        execute_sql(trial.url, f"delete from {table}")
    Ledger(trial.url).integrate()
    report = verify_record(trial.url, workers=1, since=saved, vkey=signer.vkey)
    [f] = [f for f in report.findings if f.kind == "inconsistent_with_saved_checkpoint"]
    assert "covers 16 events but the log now holds only" in f.detail


def test_ledger_run_integrates_continuously_between_checkpoints(trial, tmp_path):
    import threading
    import time

    build(trial)
    signer = create_log_key(tmp_path / "log.key", ORIGIN)
    ledger = Ledger(trial.url)
    stop = threading.Event()
    worker = threading.Thread(target=ledger.run, args=(signer, 3600), kwargs={"stop": stop, "integrate_every": 0.05})
    worker.start()
    try:
        deadline = time.monotonic() + 10
        while not ledger.checkpoints() and time.monotonic() < deadline:  # the first cycle: integrate, checkpoint
            time.sleep(0.05)
        assert len(ledger.checkpoints()) == 1
        before = ledger.size
        add_subject(trial, 7, labs=1)  # 3 events, long before the next checkpoint is due
        while (ledger.pending() or ledger.size < before + 3) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ledger.pending() == 0 and ledger.size == before + 3 and len(ledger.checkpoints()) == 1
    finally:
        stop.set()
        worker.join()
        ledger.close()


# --- item 9: a stored verification result cannot be turned from FAILED into ok -----------------------------------
def test_a_forged_stored_verification_result_reads_unverifiable(trial, tmp_path):
    from projections.audit_trail import last_verification
    from sle_events.audit.results import result_document, run_tree, seal_result
    from sle_events.signing.keys import Signer

    subjects = build(trial)
    auditor = Signer.generate("auditor.zhang", "auditor")
    auditor.save(tmp_path / "auditor.pem")
    trial.study.register_key(auditor.actor, "auditor", auditor.public_key_b64, datetime.now(UTC))
    trial.record.record(trial.study, signer=trial.admin)
    replace_in_state(trial.url, position_of(trial, subjects[0].id, 3), '"unit":"mg/dL"', '"unit":"mg/dl"')
    done = cli(
        "verify",
        "--db",
        trial.url,
        "--workers",
        "1",
        "--sign-key",
        str(tmp_path / "auditor.pem"),
        "--actor",
        auditor.actor,
    )
    assert done.exit_code == 1

    def last():
        engine = sa.create_engine(trial.url)
        try:
            with engine.begin() as conn:
                return last_verification(conn)
        finally:
            engine.dispose()

    genuine = last()
    assert genuine["unverifiable"] is None and not genuine["ok"] and genuine["findings_by_position"]
    execute_sql(trial.url, "update verification_runs set ok = 1, findings = 0")  # FAILED → ok, by SQL
    execute_sql(trial.url, "delete from verification_findings")
    assert last()["unverifiable"] == "the stored result differs from what the verifier signed"
    execute_sql(trial.url, "delete from verification_seals")
    assert last()["unverifiable"] == "not signed by a verifier"
    # Resealed with a key of the forger's own: not one the study registered for results.
    forger = Signer.generate(auditor.actor, "auditor")
    engine = sa.create_engine(trial.url)
    with engine.begin() as conn:
        run = conn.execute(sa.text("select id, run_at, ok, events from verification_runs")).one()
        seal_result(conn, run.id, result_document(run.run_at, True, run.events, [], run_tree(conn, run.id)), forger)
    engine.dispose()
    assert "which no study registered" in last()["unverifiable"]


def test_a_study_created_with_an_admin_key_outside_the_trust_root_is_untrusted(trial):
    from sle_events.signing.keys import Signer

    build(trial)
    assert verify_record(trial.url, workers=1, admin_keys=[trial.admin.public_key_b64]).ok
    stranger = Signer.generate("someone", "admin").public_key_b64
    report = verify_record(trial.url, workers=1, admin_keys=[stranger])
    assert (str(trial.study.id), 1, "untrusted_root") in located(report.findings)
    done = cli("verify", "--db", trial.url, "--workers", "1", "--admin-key", stranger)
    assert done.exit_code == 1 and "untrusted_root" in done.stdout
