"""Tampering with the stored table by SQL, as a DBA could: `verify_record` must locate every change.

Each test builds the same realistic record (a study, four subjects, events from four signers, single and
multi-stream batches), checks it verifies, tampers with `study_events` directly, and asserts the exact set of
(stream, version, kind) findings, with the log position and a detail that says what is wrong. Every
verification runs with one worker and with two processes, which must agree.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from uuid import UUID

import pytest
import sqlalchemy as sa

from sle_events.audit.findings import Report
from sle_events.audit.verifier import verify_record
from sle_events.domain.payloads import EligibilityChecklist
from sle_events.domain.subject import Subject
from sle_events.signing.envelope import open_sealed, seal
from sle_events.signing.keys import Signer
from sle_events.store.codec import envelope_for
from sle_events.store.errors import UntrustedKey
from sle_events.store.streams import split_streams

from conftest import STUDY_CONFIG, execute_sql

pytestmark = pytest.mark.storage
NOW = datetime.now(UTC)
T0 = NOW - timedelta(days=30)
CREATININE = ("1.23", "1.34", "1.45")
SUBJECT_TOPIC = "Subject."
ELIGIBLE = EligibilityChecklist.all_met(screening_labs_collected_at=T0 + timedelta(days=2))
EVENTS_IN_RECORD = 4 + 3 * 7 + 1  # study + three full subjects + one screened only


# --- building the record -----------------------------------------------------------------------------------
@dataclass
class Built:
    subjects: list[Subject]  # three subjects, seven events each
    screened: Subject  # one subject with only its screening (v1)

    def ids(self) -> list[UUID]:
        return [s.id for s in self.subjects]


def build(trial) -> Built:
    """Three subjects through screening, consent, eligibility, enrolment and labs; one only screened."""
    rec = trial.record
    subjects = [Subject(trial.study.id, "NJ01", f"SCR-{i + 1:03d}", T0 + timedelta(hours=i)) for i in range(3)]
    for s in subjects:
        rec.record(s, signer=trial.coordinator)  # v1 Screened
    screened = Subject(trial.study.id, "NJ01", "SCR-004", T0 + timedelta(hours=5))
    rec.record(screened, signer=trial.coordinator)
    for s in subjects:
        s.obtain_consent("ICF v1.0", T0 + timedelta(days=1), config=STUDY_CONFIG, taken_by="dr.wang")  # v2
    rec.record(*subjects, signer=trial.investigator)  # one batch over three streams
    for s in subjects:
        s.confirm_eligibility(T0 + timedelta(days=7), checklist=ELIGIBLE)  # v3
        s.enroll(T0 + timedelta(days=8))  # v4
        rec.record(s, signer=trial.investigator)
    for s, creatinine in zip(subjects, CREATININE, strict=True):
        s.record_lab_result("CREAT", Decimal(creatinine), "mg/dL", T0 + timedelta(days=9))  # v5
        s.record_lab_result("C3", Decimal("85.50"), "mg/dL", T0 + timedelta(days=9))  # v6
    rec.record(*subjects, signer=trial.lab)
    for s in subjects:
        s.record_lab_result("CREAT", Decimal("1.10"), "mg/dL", T0 + timedelta(days=20))  # v7
        rec.record(s, signer=trial.lab)
    assert trial.rows() == EVENTS_IN_RECORD
    return Built(subjects, screened)


# --- reading and tampering with the table --------------------------------------------------------------------
def position_of(trial, stream: UUID, version: int) -> int:
    """The row's id (log position), looked up through the application's own column types."""
    t = trial.record.table
    with trial.record.engine.connect() as conn:
        return conn.execute(
            sa.select(t.c.id).where(t.c.originator_id == stream, t.c.originator_version == version)
        ).scalar_one()


def state_at(url: str, position: int) -> bytes:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            value = conn.execute(sa.text("select state from study_events where id = :id"), {"id": position})
            return bytes(value.scalar_one())
    finally:
        engine.dispose()


def replace_in_state(url: str, position: int, old: str, new: str) -> None:
    """Edit the stored bytes of one row in place with SQL string functions (per dialect)."""
    before = state_at(url, position)
    assert before.count(old.encode()) == 1, f"{old!r} must occur exactly once in row {position}"
    if url.startswith("sqlite"):
        sql = "update study_events set state = cast(replace(cast(state as text), :old, :new) as blob) where id = :id"
    else:
        sql = (
            "update study_events set state = convert_to(replace(convert_from(state, 'UTF8'), :old, :new), "
            "'UTF8') where id = :id"
        )
    execute_sql(url, sql, old=old, new=new, id=position)
    after = state_at(url, position)
    assert after == before.replace(old.encode(), new.encode())


def set_state(url: str, position: int, state: bytes) -> None:
    execute_sql(url, "update study_events set state = :state where id = :id", state=state, id=position)


# --- verifying ---------------------------------------------------------------------------------------------
def verify(url: str) -> Report:
    """Verify in this process and with two worker processes; both must find exactly the same."""
    one = verify_record(url, workers=1)
    two = verify_record(url, workers=2)
    assert one.findings == two.findings
    assert (one.events, one.streams, one.studies) == (two.events, two.streams, two.studies)
    return one


def located(report: Report) -> set[tuple[str | None, int | None, str]]:
    return {(f.stream, f.version, f.kind) for f in report.findings}


def finding(report: Report, stream: UUID, version: int, kind: str):
    [f] = [f for f in report.findings if (f.stream, f.version, f.kind) == (str(stream), version, kind)]
    return f


def built_and_verified(trial) -> Built:
    built = build(trial)
    assert verify(trial.url).ok
    return built


# --- the intact record ---------------------------------------------------------------------------------------
def test_untampered_record_verifies_with_one_and_with_several_workers(trial):
    build(trial)
    report = verify(trial.url)
    assert report.ok, report.findings
    assert report.findings == []
    assert report.events == EVENTS_IN_RECORD == trial.rows()
    assert report.studies == 1
    assert report.streams == 5  # the study's registry and four subjects
    # The two-worker run really splits the subject streams over two processes.
    engine = trial.record.engine
    assert len(split_streams(engine, trial.record.table, 2, skip_registry=True)) == 2


# --- tampered rows -------------------------------------------------------------------------------------------
def test_changed_payload_byte_breaks_the_signature_and_the_next_link(trial):
    built = built_and_verified(trial)
    a = built.subjects[0].id
    pos = position_of(trial, a, 5)
    replace_in_state(trial.url, pos, '"value":"1.23"', '"value":"1.24"')

    report = verify(trial.url)
    assert located(report) == {(str(a), 5, "bad_signature"), (str(a), 6, "chain_broken")}
    bad = finding(report, a, 5, "bad_signature")
    assert bad.position == pos
    assert "lab.service" in bad.detail and trial.lab.key_id in bad.detail and "altered" in bad.detail
    link = finding(report, a, 6, "chain_broken")
    assert "v5" in link.detail and link.position == position_of(trial, a, 6)


def test_changed_topic_column_is_a_topic_mismatch(trial):
    built = built_and_verified(trial)
    c = built.subjects[2].id
    pos = position_of(trial, c, 5)
    execute_sql(
        trial.url, "update study_events set topic = :topic where id = :id", topic=SUBJECT_TOPIC + "Enrolled", id=pos
    )

    report = verify(trial.url)
    assert located(report) == {(str(c), 5, "topic_mismatch")}
    f = finding(report, c, 5, "topic_mismatch")
    assert f.position == pos
    assert SUBJECT_TOPIC + "Enrolled" in f.detail and SUBJECT_TOPIC + "LabResultRecorded" in f.detail


def test_changed_occurred_at_in_the_envelope_breaks_the_signature(trial):
    built = built_and_verified(trial)
    a = built.subjects[0].id
    pos = position_of(trial, a, 2)
    stored = open_sealed(state_at(trial.url, pos)).envelope["occurred_at"]
    backdated = (datetime.fromisoformat(stored) - timedelta(days=1)).isoformat()
    replace_in_state(trial.url, pos, f'"occurred_at":"{stored}"', f'"occurred_at":"{backdated}"')
    assert open_sealed(state_at(trial.url, pos)).envelope["occurred_at"] == backdated  # still well-formed

    report = verify(trial.url)
    assert located(report) == {(str(a), 2, "bad_signature"), (str(a), 3, "chain_broken")}
    bad = finding(report, a, 2, "bad_signature")
    assert bad.position == pos and "dr.wang" in bad.detail and trial.investigator.key_id in bad.detail


def test_deleted_event_in_the_middle_of_a_stream_is_missing_at_the_next_version(trial):
    built = built_and_verified(trial)
    b = built.subjects[1].id
    execute_sql(trial.url, "delete from study_events where id = :id", id=position_of(trial, b, 2))

    report = verify(trial.url)
    assert located(report) == {(str(b), 3, "missing_event")}
    f = finding(report, b, 3, "missing_event")
    assert f.position == position_of(trial, b, 3)
    assert "v2 missing" in f.detail and "from v1 to v3" in f.detail


def test_swapped_payloads_of_two_streams_are_both_flagged(trial):
    built = built_and_verified(trial)
    a, b = built.subjects[0].id, built.subjects[1].id
    pa, pb = position_of(trial, a, 5), position_of(trial, b, 5)
    state_a, state_b = state_at(trial.url, pa), state_at(trial.url, pb)
    assert open_sealed(state_a).topic == open_sealed(state_b).topic  # same event type, same version, other subject
    set_state(trial.url, pa, state_b)
    set_state(trial.url, pb, state_a)

    report = verify(trial.url)
    assert located(report) == {
        (str(a), 5, "row_mismatch"), (str(a), 5, "chain_broken"), (str(a), 6, "chain_broken"),
        (str(b), 5, "row_mismatch"), (str(b), 5, "chain_broken"), (str(b), 6, "chain_broken"),
    }  # fmt: skip  # one row per swapped subject
    in_a = finding(report, a, 5, "row_mismatch")
    in_b = finding(report, b, 5, "row_mismatch")
    assert in_a.position == pa and in_b.position == pb
    assert f"the signed envelope says {b} v5" in in_a.detail
    assert f"the signed envelope says {a} v5" in in_b.detail


def test_event_inserted_by_sql_with_a_revoked_key_is_key_revoked(trial):
    built = built_and_verified(trial)
    d = built.screened.id
    head = trial.record.stream(d)[-1]
    twin = trial.record.get(d)
    twin.obtain_consent("ICF v1.0", NOW - timedelta(hours=1), config=STUDY_CONFIG, taken_by="dr.wang")
    [event] = twin.collect_events()
    forged = seal(envelope_for(event, study=trial.study.id, prev=head.hash, reason=None), trial.coordinator)
    assert forged.version == 2 and forged.envelope["prev"] == head.hash  # chains correctly, signature valid

    trial.study.revoke_key(trial.coordinator.key_id, "left the site", NOW)
    trial.record.record(trial.study, signer=trial.admin)
    with pytest.raises(UntrustedKey, match="revoked"):
        trial.record.append([forged])  # the store refuses it, so it goes in behind the store's back
    execute_sql(
        trial.url,
        "insert into study_events (originator_id, originator_version, topic, state) "
        "select originator_id, :version, :topic, :state from study_events where id = :src",
        version=2,
        topic=forged.topic,
        state=forged.sealed,
        src=position_of(trial, d, 1),
    )
    assert [e.version for e in trial.record.stream(d)] == [1, 2]

    report = verify(trial.url)
    # The coordinator's screenings, signed before the revocation, still count.
    assert located(report) == {(str(d), 2, "key_revoked")}
    f = finding(report, d, 2, "key_revoked")
    pos = position_of(trial, d, 2)
    assert f.position == pos
    assert trial.coordinator.key_id in f.detail and "revoked" in f.detail and f"log position {pos}" in f.detail


def test_event_resigned_with_an_unregistered_key_is_key_unknown(trial):
    built = built_and_verified(trial)
    a = built.subjects[0].id
    pos = position_of(trial, a, 3)
    original = open_sealed(state_at(trial.url, pos))
    stranger = Signer.generate(trial.investigator.actor, trial.investigator.role)
    resealed = seal(original.envelope, stranger)
    assert resealed.envelope["actor"] == original.envelope["actor"] and resealed.key != original.key
    set_state(trial.url, pos, resealed.sealed)

    report = verify(trial.url)
    assert located(report) == {(str(a), 3, "key_unknown"), (str(a), 4, "chain_broken")}
    f = finding(report, a, 3, "key_unknown")
    assert f.position == pos and stranger.key_id in f.detail and "not registered" in f.detail


def test_deleted_registry_event_breaks_the_study_chain_and_unseats_its_key(trial):
    built = built_and_verified(trial)
    study = trial.study.id
    registrations = [
        e
        for e in trial.record.stream(study)
        if e.topic == "Study.KeyRegistered" and e.envelope["payload"]["actor"] == "dr.wang"
    ]
    [registration] = registrations
    signed_by_investigator = {
        (e.envelope["stream"], e.version)
        for s in [*built.ids(), built.screened.id]
        for e in trial.record.stream(s)
        if e.key == trial.investigator.key_id
    }
    assert len(signed_by_investigator) == 9  # consent, eligibility and enrolment of three subjects
    execute_sql(
        trial.url, "delete from study_events where id = :id", id=position_of(trial, study, registration.version)
    )

    report = verify(trial.url)
    gap = registration.version + 1
    expected = {(str(study), gap, "missing_event")} | {(s, v, "key_unknown") for s, v in signed_by_investigator}
    assert located(report) == expected
    assert f"v{registration.version} missing" in finding(report, study, gap, "missing_event").detail
    for f in report.findings:
        if f.kind == "key_unknown":
            assert trial.investigator.key_id in f.detail and "not registered" in f.detail


def test_non_canonical_rewrite_of_the_same_json_is_malformed(trial):
    built = built_and_verified(trial)
    a = built.subjects[0].id
    pos = position_of(trial, a, 6)
    before = state_at(trial.url, pos)
    replace_in_state(trial.url, pos, '{"envelope":{', '{"envelope": {')
    assert json.loads(state_at(trial.url, pos)) == json.loads(before)  # the same JSON value

    report = verify(trial.url)
    assert located(report) == {(str(a), 6, "malformed"), (str(a), 7, "chain_broken")}
    f = finding(report, a, 6, "malformed")
    assert f.position == pos and "canonical" in f.detail


def test_unpaired_surrogate_key_in_a_stored_payload_is_malformed_not_a_crash(trial):
    """JSON may spell a lone surrogate (\\ud800); no signer could have produced it. It must be a finding."""
    built = built_and_verified(trial)
    a = built.subjects[0].id
    pos = position_of(trial, a, 5)
    replace_in_state(trial.url, pos, '"code":"CREAT"', '"\\ud800":"CREAT"')

    report = verify(trial.url)
    assert located(report) == {(str(a), 5, "malformed"), (str(a), 6, "chain_broken")}
    assert finding(report, a, 5, "malformed").position == pos
