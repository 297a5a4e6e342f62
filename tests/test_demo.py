"""The demo trial (synthetic-cohort.md): deterministic for its seed, recorded through the trial's use cases on a
simulated clock, verifying, and with the showcase facts a reviewer expects (screen failures, SAE with its 24-h
report, corrections with reasons, a withdrawal, missed and out-of-window visits, re-consent, refused commands).
The CLI test runs it on PostgreSQL too."""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta
from uuid import UUID

import pytest

from sle_events.audit.verifier import verify_record
from sle_events.demo import Rng, _all_streams, run_demo
from sle_events.store.record import StudyRecord

from record_rules import check_stream

pytestmark = pytest.mark.storage


def _demo(tmp_path, name: str, subjects: int, seed: int):
    url = f"sqlite:///{tmp_path / name}.db"
    record = StudyRecord(url)
    try:
        result = run_demo(record, tmp_path / "keys", subjects=subjects, seed=seed)
        streams = [record.stream(s) for s in _all_streams(record, UUID(result.study_id))]
    finally:
        record.close()
        record.engine.dispose()
    return url, result, streams


def test_the_prng_is_the_written_down_algorithm():
    a, b = Rng(20070311, 1, "labs"), Rng(20070311, 1, "labs")
    assert [a.next() for _ in range(3)] == [b.next() for _ in range(3)]
    assert Rng(20070311, 1, "labs").next() != Rng(20070311, 2, "labs").next()
    normals = [Rng(7, k, "n").normal() for k in range(2000)]
    mean = sum(normals) / len(normals)
    assert abs(mean) < 0.1 and 0.9 < (sum(x * x for x in normals) / len(normals)) ** 0.5 < 1.1


def test_same_seed_same_record_and_another_seed_another(tmp_path):
    _, first, _ = _demo(tmp_path, "a", 2, 20070311)
    _, again, _ = _demo(tmp_path, "b", 2, 20070311)
    _, other, _ = _demo(tmp_path, "c", 2, 1)
    assert first.digest == again.digest and first.events == again.events
    assert other.digest != first.digest


def test_a_demo_trial_verifies_breaks_no_rule_and_shows_the_protocol(tmp_path):
    url, result, streams = _demo(tmp_path, "demo", 8, 20070311)
    assert verify_record(url, workers=1).ok
    types = Counter(result.events_by_type)
    subjects = [s for s in streams if s[0].topic == "Subject.Screened"]
    for stream in subjects:
        check_stream(stream)
    assert result.subjects == 8 and types["Subject.Enrolled"] == 8 and types["Subject.Screened"] > 8
    assert types["Subject.ScreenFailed"] >= 1
    assert types["Subject.MSCInfused"] + types["Subject.TransplantNotPerformed"] == 8
    assert types["ProductLot.ReleaseTested"] >= 8 and types["Subject.SeriousAdverseEventReported"] >= 1
    assert types["Subject.Withdrawn"] >= 1 and types["Subject.VisitMissed"] >= 1
    assert types["Subject.Corrected"] >= 1 and types["Subject.MainStudyCompleted"] >= 1
    assert types["Subject.ConsentObtained"] > types["Subject.Screened"] - types["Subject.ScreenFailed"]  # re-consent
    assert result.refused_as_expected == {
        "OutsideWindow": 1,
        "UntrustedKey": 1,
        "ReasonRequired": 1,
        "CasebookLocked": 1,  # a lab result on the locked subject (docs/regulated-acts.md)
        "OpenQueriesBlockLock": 1,  # a lock of the subject the monitor's queries are open on
        "UnknownFact": 1,  # SDV of data that does not exist (the monitoring visit)
        "QueryStateConflict": 1,  # answering a closed query
    }
    # sign-offs (one invalidated by a correction and signed again, one by an unlock), a lock, a freeze, an unlock
    assert types["Casebook.SignedOff"] >= 5 and types["Casebook.Locked"] == 1 and types["Casebook.Unlocked"] == 1
    # the monitoring visit: SDV and queries in every state, each act on a stream of its own
    assert types["SourceVerification.Opened"] == 2 and types["SourceVerification.Verified"] >= 3
    assert types["Query.Raised"] >= 4 and types["Query.Answered"] >= 3
    assert types["Query.Closed"] >= 3 and types["Query.Reopened"] >= 1

    events = [e for s in subjects for e in s]
    out_of_window = [e for e in events if e.topic == "Subject.VisitRecorded" and not e.envelope["payload"]["in_window"]]
    assert out_of_window and all(
        e.envelope["payload"]["deviation_flags"] == ["VISIT_OUT_OF_WINDOW"] for e in out_of_window
    )
    for e in events:
        env = e.envelope
        recorded, occurred = (datetime.fromisoformat(env[k]) for k in ("recorded_at", "occurred_at"))
        assert recorded >= occurred - timedelta(minutes=5)  # R9
        if e.topic == "Subject.Corrected":
            assert env["reason"] in ("transcription error", "re-read from the source report")
    by_subject = {s[0].envelope["stream"]: [e.topic.rsplit(".", 1)[-1] for e in s] for s in subjects}
    for names in by_subject.values():
        assert names.count("CyclophosphamideGiven") <= 1


def test_a_larger_trial_with_a_second_site_and_a_new_icf_records_and_verifies(tmp_path):
    """Above 50 subjects the second site opens and more subjects straddle the ICF change: every command of the
    plan must still be accepted (the demo raises on any unexpected refusal) and the record must verify."""
    url, result, streams = _demo(tmp_path, "larger", 70, 3)
    assert result.subjects == 70 and result.events > 20000
    assert {e.envelope["payload"].get("site") for s in streams for e in s if e.topic == "Subject.Screened"} > {"NJ01"}
    assert verify_record(url, workers=2).ok
