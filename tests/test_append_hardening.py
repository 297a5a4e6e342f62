"""What an adversarial sweep found `append` trusted too much (issue 11): each refusal is specific, stores
nothing, and what slips in by SQL instead is named by `sle verify`."""

from __future__ import annotations

import copy
import os
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from uuid import UUID

import pytest
import sqlalchemy as sa

from sle_events.audit.verifier import verify_record
from sle_events.domain.study import Study
from sle_events.domain.subject import Subject
from sle_events.signing.envelope import GENESIS, SealedEvent, seal
from sle_events.signing.keys import KeyFileExposed, Signer
from sle_events.store.codec import envelope_for
from sle_events.store.errors import InvalidPayload, MalformedEvent, StudyNotApproved, WrongStudy
from sle_events.store.record import StudyRecord

from conftest import STUDY_CONFIG, position_of

pytestmark = pytest.mark.storage
NOW = datetime.now(UTC)


def insert_by_sql(url: str, stream: UUID, version: int, event: SealedEvent) -> None:
    """A row written around `append`, as someone with write access to the database could."""
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(
                StudyRecord.events_table()
                .insert()
                .values(originator_id=stream, originator_version=version, topic=event.topic, state=event.sealed)
            )
    finally:
        engine.dispose()


def subject_with_a_lab_result(trial) -> Subject:
    subject = Subject(trial.study.id, "NJ01", "SCR-001", NOW - timedelta(days=1))
    trial.record.record(subject, signer=trial.coordinator)
    subject.obtain_consent("ICF v1.0", NOW - timedelta(hours=20), config=STUDY_CONFIG, taken_by="dr.wang")
    trial.record.record(subject, signer=trial.investigator)
    subject.record_lab_result("CREAT", Decimal("1.23"), "mg/dL", NOW - timedelta(hours=10))
    trial.record.record(subject, signer=trial.lab)
    return subject


def next_lab_result(trial, subject: Subject, *, study: UUID | None = None, **payload: object) -> dict:
    """The envelope of the subject's next lab result, with payload fields changed as given."""
    subject.record_lab_result("CREAT", Decimal("0.98"), "mg/dL", NOW - timedelta(hours=2))
    [event] = subject.collect_events()
    prev = trial.record.stream(subject.id)[-1].hash
    env = envelope_for(event, study=study or trial.study.id, prev=prev)
    env["payload"].update(payload)
    return env


def second_study(trial, lab_actor: str) -> tuple[Study, Signer, Signer]:
    """A second study, approved by the first's admin, with its own key for the first study's lab actor."""
    admin2 = Signer.generate("admin@elsewhere", "admin")
    lab2 = Signer.generate(lab_actor, "lab")
    study = trial.record.get(trial.study.id)
    study.approve_new_study("OTHER", admin2.actor, admin2.public_key_b64, NOW)
    trial.record.record(study, signer=trial.admin)
    other = Study.create("OTHER", "another study", admin2.actor, admin2.public_key_b64, NOW)
    other.register_key(lab2.actor, "lab", lab2.public_key_b64, NOW)
    trial.record.record(other, signer=admin2)
    return other, admin2, lab2


# --- 1. one study cannot write into another's subjects --------------------------------------------------------
def test_a_study_cannot_append_to_another_studys_subject(trial):
    subject = subject_with_a_lab_result(trial)
    other, _, lab2 = second_study(trial, trial.lab.actor)
    forged = seal(next_lab_result(trial, subject, study=other.id), lab2)  # right prev and version, other study
    rows = trial.rows()
    with pytest.raises(WrongStudy, match=f"belongs to study {trial.study.id}"):
        trial.record.append([forged])
    assert trial.rows() == rows
    assert trial.record.get(subject.id).version == 3


def test_a_stream_whose_study_changed_is_named_by_verify(trial):
    subject = subject_with_a_lab_result(trial)
    other, _, lab2 = second_study(trial, trial.lab.actor)
    forged = seal(next_lab_result(trial, subject, study=other.id), lab2)
    insert_by_sql(trial.url, subject.id, 4, forged)
    report = verify_record(trial.url, workers=1)
    assert {(f.stream, f.version, f.kind) for f in report.findings} == {(str(subject.id), 4, "study_mismatch")}
    assert str(other.id) in report.findings[0].detail and str(trial.study.id) in report.findings[0].detail


def test_a_second_trust_root_needs_an_existing_admins_approval(trial):
    intruder = Signer.generate("admin@elsewhere", "admin")
    rows = trial.rows()
    with pytest.raises(StudyNotApproved, match="already holds a study"):
        trial.record.record(
            Study.create("OTHER", "self-made", intruder.actor, intruder.public_key_b64, NOW), signer=intruder
        )
    assert trial.rows() == rows
    # Approved by the first study's admin: accepted once, and the approval is used up.
    second_study(trial, "lab.elsewhere")
    with pytest.raises(StudyNotApproved):
        trial.record.record(
            Study.create("OTHER", "again", intruder.actor, intruder.public_key_b64, NOW), signer=intruder
        )


def test_an_unapproved_study_slipped_in_by_sql_is_named_by_verify(tmp_path, db_url):
    # Built in a database of its own, then copied in by SQL beside the real study.
    intruder = Signer.generate("admin@elsewhere", "admin")
    elsewhere = StudyRecord(f"sqlite:///{tmp_path / 'elsewhere.db'}")
    made = Study.create("OTHER", "self-made", intruder.actor, intruder.public_key_b64, NOW)
    [created] = elsewhere.record(made, signer=intruder)
    elsewhere.close()
    record = StudyRecord(db_url)
    admin = Signer.generate("admin@site", "admin")
    record.record(Study.create("REAL", "real", admin.actor, admin.public_key_b64, NOW), signer=admin)
    record.close()
    insert_by_sql(db_url, made.id, 1, created)
    report = verify_record(db_url, workers=1)
    assert [(f.stream, f.version, f.kind) for f in report.findings] == [(str(made.id), 1, "study_not_approved")]


def test_study_facts_only_on_the_studys_own_stream(trial):
    subject = subject_with_a_lab_result(trial)
    env = next_lab_result(trial, subject)
    env["type"] = "Study.SiteClosed"
    env["payload"] = {"site_id": "NJ01", "reason": "x"}
    with pytest.raises(WrongStudy, match="study facts live on the study's own stream"):
        trial.record.append([seal(env, trial.lab)])


def test_a_screening_that_names_another_study_in_its_payload_is_refused(trial):
    subject = Subject(trial.study.id, "NJ01", "SCR-009", NOW - timedelta(days=1))
    [event] = subject.collect_events()
    env = envelope_for(event, study=trial.study.id, prev=GENESIS)
    env["payload"]["study_id"] = "00000000-0000-4000-8000-000000000000"
    rows = trial.rows()
    with pytest.raises(WrongStudy, match="payload names study"):
        trial.record.append([seal(env, trial.coordinator)])
    assert trial.rows() == rows


# --- 2. only signed bytes are stored -----------------------------------------------------------------------------
@pytest.mark.parametrize("sealed_bytes", ["other value", "invalid utf-8"])
def test_sealed_bytes_that_differ_from_the_signed_envelope_are_refused(trial, sealed_bytes):
    subject = subject_with_a_lab_result(trial)
    good = seal(next_lab_result(trial, subject), trial.lab)
    if sealed_bytes == "other value":
        sealed = good.sealed.replace(b'"value":"0.98"', b'"value":"777"')
        assert sealed != good.sealed
    else:
        sealed = good.sealed.replace(b'"CREAT"', b'"\xff\xfe"', 1)
    rows = trial.rows()
    with pytest.raises(MalformedEvent, match="sealed bytes are not the signed envelope"):
        trial.record.append([SealedEvent(good.envelope, good.signed, good.signature, sealed)])
    assert trial.rows() == rows
    assert trial.record.stream(subject.id)[-1].envelope["payload"]["value"] == "1.23"  # nothing new


# --- 3. a validly signed but impossible fact ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "field, value, says",
    [
        ("value", "not-a-number", "valid decimal"),
        ("value", 48, "not written as the domain writes it"),
        ("value", "1e3", "not written as the domain writes it"),
        ("code", 5, "valid string"),
        ("reported_at", "2026-01-01T00:00:00", "no UTC offset"),
        ("surprise", "x", "Extra inputs"),
    ],
)
def test_a_payload_its_type_refuses_is_refused_naming_the_field(trial, field, value, says):
    subject = subject_with_a_lab_result(trial)
    env = next_lab_result(trial, subject, **{field: value})
    rows = trial.rows()
    with pytest.raises(InvalidPayload, match=f"field {field}: .*{says}") as refused:
        trial.record.append([seal(env, trial.lab)])
    assert refused.value.kind == "invalid_payload" and refused.value.version == 4
    assert trial.rows() == rows
    assert trial.record.get(subject.id).version == 3


def test_a_missing_payload_field_is_refused(trial):
    subject = subject_with_a_lab_result(trial)
    env = next_lab_result(trial, subject)
    del env["payload"]["unit"]
    with pytest.raises(InvalidPayload, match="field unit: Field required"):
        trial.record.append([seal(env, trial.lab)])


def test_a_signed_invalid_payload_stored_by_sql_is_named_by_verify(trial):
    subject = subject_with_a_lab_result(trial)
    bad = seal(next_lab_result(trial, subject, value="not-a-number"), trial.lab)  # signed by the real lab key
    insert_by_sql(trial.url, subject.id, 4, bad)
    report = verify_record(trial.url, workers=1)
    assert [(f.stream, f.version, f.kind) for f in report.findings] == [(str(subject.id), 4, "invalid_payload")]
    assert "field value" in report.findings[0].detail


# --- 11. duplicates, limits, key files ---------------------------------------------------------------------------
def test_an_exact_resend_gets_its_original_position_however_late(trial):
    subject = subject_with_a_lab_result(trial)
    first = seal(next_lab_result(trial, subject), trial.lab)
    [position] = trial.record.append([first])
    rows = trial.rows()
    later = StudyRecord(trial.url, clock=lambda: datetime.now(UTC) + timedelta(hours=3))
    try:
        assert later.append([first]) == [position] == [position_of(trial, subject.id, 4)]
    finally:
        later.close()
    assert trial.rows() == rows


def test_an_event_over_the_size_limit_is_refused(trial):
    subject = subject_with_a_lab_result(trial)
    env = next_lab_result(trial, subject, specimen_id="S" * 2048)
    small = StudyRecord(trial.url, max_event_bytes=2000)
    try:
        with pytest.raises(MalformedEvent, match="the limit is 2,000"):
            small.append([seal(env, trial.lab)])
    finally:
        small.close()
    assert trial.record.get(subject.id).version == 3


def test_deep_nesting_is_malformed_not_a_recursion_error(trial):
    subject = subject_with_a_lab_result(trial)
    good = seal(next_lab_result(trial, subject), trial.lab)
    env = copy.deepcopy(good.envelope)
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    env["payload"]["specimen_id"] = deep
    signed = b"[" * 100_000 + b"]" * 100_000  # what such an envelope's bytes would start like: too deep to walk
    with pytest.raises(MalformedEvent, match=r"nests 100,?\d* levels deep; the limit is 32"):
        trial.record.append([SealedEvent.build(env, signed, good.signature)])
    assert trial.record.get(subject.id).version == 3


def test_a_private_key_file_readable_by_others_is_refused(tmp_path):
    path = tmp_path / "nurse.pem"
    Signer.generate("nurse.li", "coordinator").save(path)
    assert Signer.from_file(path, "nurse.li", "coordinator").actor == "nurse.li"
    os.chmod(path, 0o644)
    with pytest.raises(KeyFileExposed, match="chmod 600"):
        Signer.from_file(path, "nurse.li", "coordinator")
