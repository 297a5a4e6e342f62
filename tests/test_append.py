"""Appending: every refusal is specific and stores nothing; what is accepted reads back intact."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from uuid import uuid4

import pytest

from sle_events.domain.errors import FloatNotAllowed as DomainFloatNotAllowed
from sle_events.domain.subject import Subject
from sle_events.signing.canonical import FloatNotAllowed
from sle_events.signing.envelope import GENESIS, MalformedEnvelope, SealedEvent, open_sealed, seal
from sle_events.signing.keys import Signer
from sle_events.store.casebook import casebook_stream
from sle_events.store.codec import envelope_for
from sle_events.store.errors import (
    BadSignature,
    ChainBroken,
    ClockSkew,
    MalformedEvent,
    UnknownEventType,
    UnknownStudy,
    UntrustedKey,
    VersionConflict,
)
from sle_events.store.record import StudyRecord

from conftest import STUDY_CONFIG, rival_consents

pytestmark = pytest.mark.storage
NOW = datetime.now(UTC)


def screened(trial, number: str = "SCR-001") -> Subject:
    return Subject(trial.study.id, "NJ01", number, NOW - timedelta(days=1))


def sealed_screening(trial, signer=None, **changes) -> SealedEvent:
    subject = screened(trial)
    event = subject.collect_events()[0]
    env = envelope_for(event, study=trial.study.id, prev=GENESIS, reason=None)
    env.update(changes)
    return seal(env, signer or trial.coordinator)


def test_recorded_events_read_back_as_the_domain_made_them(trial):
    subject = screened(trial)
    trial.record.record(subject, signer=trial.coordinator)
    subject.obtain_consent("ICF v1.0", NOW - timedelta(hours=20), config=STUDY_CONFIG, taken_by="dr.wang")
    trial.record.record(subject, signer=trial.investigator)
    subject.record_lab_result("CREAT", Decimal("1.23"), "mg/dL", NOW - timedelta(hours=10))
    trial.record.record(subject, signer=trial.lab)

    copy = trial.record.get(subject.id)
    assert copy.status == "CONSENTED"
    assert copy.labs[0]["value"] == Decimal("1.23")
    assert copy.labs[0]["occurred_at"] == subject.labs[0]["occurred_at"]
    stream = trial.record.stream(subject.id)
    assert [e.version for e in stream] == [1, 2, 3]
    assert stream[1].envelope["prev"] == stream[0].hash
    assert stream[2].envelope["actor"] == "lab.service" and stream[2].envelope["role"] == "lab"


def test_the_signed_bytes_bind_ids_version_topic_times_actor_and_prev(trial):
    e = sealed_screening(trial)
    env = e.envelope
    for name in (
        "study",
        "stream",
        "version",
        "type",
        "schema",
        "payload",
        "occurred_at",
        "recorded_at",
        "actor",
        "role",
        "key",
        "reason",
        "prev",
    ):
        assert f'"{name}":'.encode() in e.signed
    assert env["stream"] in e.signed.decode() and env["prev"] == GENESIS


def _refused(trial, error, events):
    before = trial.rows()
    with pytest.raises(error) as info:
        trial.record.append(events)
    assert trial.rows() == before, "a refused append must store nothing"
    return info.value


def test_bad_signature_is_refused(trial):
    good = sealed_screening(trial)
    forged = SealedEvent.build(good.envelope, good.signed, bytes(64))
    err = _refused(trial, BadSignature, [forged])
    assert err.stream == good.envelope["stream"] and err.version == 1


def test_unregistered_key_is_refused(trial):
    stranger = Signer.generate("nurse.li", "coordinator")
    err = _refused(trial, UntrustedKey, [sealed_screening(trial, stranger)])
    assert "not registered" in str(err)


def test_changing_the_study_the_record_hands_out_trusts_no_key(trial):
    """`record.study()` is a copy: a key registered on it but never recorded is still refused, and the next
    `study()` shows the registry as stored; a registration recorded through `get` + `record` shows up."""
    stranger = Signer.generate("stranger", "coordinator")
    handed_out = trial.record.study(trial.study.id)
    handed_out.register_key(stranger.actor, stranger.role, stranger.public_key_b64, NOW)
    _refused(trial, UntrustedKey, [sealed_screening(trial, stranger)])
    assert not any(e["actor"] == "stranger" for e in trial.record.study(trial.study.id).keys.values())
    study = trial.record.get(trial.study.id)
    study.register_key(stranger.actor, stranger.role, stranger.public_key_b64, NOW)
    trial.record.record(study, signer=trial.admin)
    assert any(e["actor"] == "stranger" for e in trial.record.study(trial.study.id).keys.values())
    assert trial.record.append([sealed_screening(trial, stranger)])


def test_role_not_allowed_for_event_type(trial):
    # A lab service may not screen subjects.
    err = _refused(trial, UntrustedKey, [sealed_screening(trial, trial.lab)])
    assert "may not record Subject.Screened" in str(err)


def test_actor_claiming_another_role_is_refused(trial):
    impostor = Signer(trial.coordinator.actor, "investigator", trial.coordinator._private_key)
    err = _refused(trial, UntrustedKey, [sealed_screening(trial, impostor)])
    assert "not nurse.li as investigator" in str(err)


def test_revoked_key_refused_after_revocation_but_earlier_events_stay_valid(trial):
    from sle_events.audit.verifier import verify_record

    subject = screened(trial)
    trial.record.record(subject, signer=trial.coordinator)
    trial.study.revoke_key(trial.coordinator.key_id, "left the site", NOW)
    trial.record.record(trial.study, signer=trial.admin)
    err = _refused(trial, UntrustedKey, [sealed_screening(trial)])
    assert "revoked" in str(err)
    assert verify_record(trial.url, workers=1).ok


def test_rotated_key_is_refused_and_new_key_works(trial):
    new = Signer.generate(trial.coordinator.actor, "coordinator")
    trial.study.rotate_key(trial.coordinator.key_id, new.public_key_b64, NOW)
    trial.record.record(trial.study, signer=trial.admin)
    _refused(trial, UntrustedKey, [sealed_screening(trial)])
    trial.record.append([sealed_screening(trial, new)])


def test_only_admin_changes_the_registry(trial):
    other = Signer.generate("mallory", "investigator")
    trial.study.register_key(other.actor, other.role, other.public_key_b64, NOW)
    before = trial.rows()
    with pytest.raises(UntrustedKey):
        trial.record.record(trial.study, signer=trial.investigator)
    assert trial.rows() == before


def test_chain_must_name_the_previous_event(trial):
    subject = screened(trial)
    trial.record.record(subject, signer=trial.coordinator)
    subject.obtain_consent("ICF v1.0", NOW, config=STUDY_CONFIG, taken_by="dr.wang")
    event = subject.collect_events()[0]
    env = envelope_for(event, study=trial.study.id, prev="ab" * 32, reason=None)
    err = _refused(trial, ChainBroken, [seal(env, trial.investigator)])
    assert "does not match the hash of v1" in str(err)


def test_version_gap_is_refused(trial):
    subject = screened(trial)
    trial.record.record(subject, signer=trial.coordinator)
    head = trial.record.stream(subject.id)[-1]
    subject.obtain_consent("ICF v1.0", NOW, config=STUDY_CONFIG, taken_by="dr.wang")
    event = subject.collect_events()[0]
    env = envelope_for(event, study=trial.study.id, prev=head.hash, reason=None)
    env["version"] = 3
    _refused(trial, ChainBroken, [seal(env, trial.investigator)])


def test_resent_batch_gets_the_same_answer_and_stores_nothing_new(trial):
    """A client retrying after a lost answer (or a captured request replayed) records nothing twice."""
    e = sealed_screening(trial)
    first = trial.record.append([e])
    rows = trial.rows()
    assert StudyRecord(trial.url).append([e]) == first
    assert trial.rows() == rows


def test_a_different_event_at_a_taken_version_is_a_version_conflict(trial):
    first = sealed_screening(trial)
    trial.record.append([first])
    rival = sealed_screening(
        trial, stream=first.envelope["stream"], payload=dict(first.envelope["payload"], screening_number="SCR-999")
    )
    _refused(trial, VersionConflict, [rival])


def test_one_bad_event_refuses_the_whole_batch(trial):
    good = [sealed_screening(trial) for _ in range(30)]
    bad = SealedEvent.build(good[7].envelope, good[7].signed, bytes(64))
    _refused(trial, BadSignature, [*good[:7], bad, *good[8:]])


def test_float_in_payload_is_refused_before_signing(trial):
    subject = screened(trial)
    subject.record_lab_result  # noqa: B018  # a lookup with no effect, kept as written (no behaviour change)
    event = subject.collect_events()[0]
    env = envelope_for(event, study=trial.study.id, prev=GENESIS, reason=None)
    env["payload"]["weight"] = 61.5
    with pytest.raises(MalformedEnvelope, match=r"float 61\.5 is not allowed"):
        seal(env, trial.coordinator)


def test_float_in_sent_bytes_is_refused():
    with pytest.raises(MalformedEnvelope, match="float"):
        open_sealed(b'{"envelope":{"payload":{"x":1.5}},"signature":""}')


def test_decimal_attribute_travels_as_string(trial):
    subject = screened(trial)
    trial.record.record(subject, signer=trial.coordinator)
    subject.obtain_consent("ICF v1.0", NOW, config=STUDY_CONFIG, taken_by="dr.wang")
    trial.record.record(subject, signer=trial.investigator)
    subject.record_lab_result("C3", Decimal("85.50"), "mg/dL", NOW)
    [e] = trial.record.record(subject, signer=trial.lab)
    assert e.envelope["payload"]["value"] == "85.50"


def test_float_attribute_is_refused_by_the_codec(trial):
    subject = screened(trial)
    trial.record.record(subject, signer=trial.coordinator)
    subject.obtain_consent("ICF v1.0", NOW, config=STUDY_CONFIG, taken_by="dr.wang")
    trial.record.record(subject, signer=trial.investigator)
    with pytest.raises(DomainFloatNotAllowed):  # the verb refuses a float before any event exists
        subject.record_lab_result("C3", 85.5, "mg/dL", NOW)
    assert subject.pending_events == []
    # An event made without its verb still cannot carry a float into a signed payload.
    subject._unscheduled_visit_recorded(visitnum=10.5, purpose="float smuggled past the verb", occurred_at=NOW)  # type: ignore[arg-type]  # the float is the point
    before = trial.rows()
    with pytest.raises(FloatNotAllowed):
        trial.record.record(subject, signer=trial.lab)
    assert trial.rows() == before


def test_unknown_event_type_is_refused(trial):
    e = sealed_screening(trial, type="sle_events.domain.subject:Subject.Teleported")
    _refused(trial, UnknownEventType, [e])


def test_unknown_study_is_refused(trial):
    import uuid

    e = sealed_screening(trial, study=str(uuid.uuid4()))
    _refused(trial, UnknownStudy, [e])


def test_recorded_at_far_from_the_store_clock_is_refused(trial):
    e = sealed_screening(trial, recorded_at=(NOW - timedelta(hours=2)).isoformat())
    _refused(trial, ClockSkew, [e])


def test_occurred_at_in_the_future_is_refused(trial):
    e = sealed_screening(trial, occurred_at=(NOW + timedelta(hours=1)).isoformat())
    _refused(trial, ClockSkew, [e])


def test_late_entry_in_the_past_is_accepted(trial):
    e = sealed_screening(trial, occurred_at=(NOW - timedelta(days=40)).isoformat())
    trial.record.append([e])


def test_time_without_offset_is_refused(trial):
    with pytest.raises(MalformedEnvelope, match="no UTC offset"):
        sealed_screening(trial, occurred_at="2026-01-01T10:00:00")


def test_envelope_whose_dict_differs_from_signed_bytes_is_refused(trial):
    e = sealed_screening(trial)
    tampered = SealedEvent(dict(e.envelope, site="XX"), e.signed, e.signature, e.sealed)
    _refused(trial, MalformedEvent, [tampered])


def test_concurrent_appends_to_one_stream_one_wins(trial):
    """Two writers (separate connections) race for the same version: one stores, the other conflicts."""
    subject, contenders = rival_consents(trial)
    records = [StudyRecord(trial.url), StudyRecord(trial.url)]
    results: list[object] = [None, None]
    barrier = threading.Barrier(2)

    def race(i: int) -> None:
        barrier.wait()
        try:
            results[i] = records[i].append([contenders[i]])
        except Exception as e:
            results[i] = e

    threads = [threading.Thread(target=race, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in records:
        r.close()
    conflicts = [r for r in results if isinstance(r, VersionConflict)]
    wins = [r for r in results if isinstance(r, list)]
    assert len(conflicts) == 1 and len(wins) == 1, results
    stream = trial.record.stream(subject.id)
    assert [e.version for e in stream] == [1, 2]


def test_a_key_revoked_by_another_writer_is_refused_at_once(trial):
    """The registry this record trusted moved under another writer (an API worker, `sle study revoke-key`): the
    append sees it under the write lock, reads the registry again and refuses."""
    trial.record.record(screened(trial, "SCR-001"), signer=trial.coordinator)  # the record trusts the registry
    elsewhere = StudyRecord(trial.url)
    try:
        study = elsewhere.get(trial.study.id)
        study.revoke_key(trial.coordinator.key_id, "left the site", NOW)
        elsewhere.record(study, signer=trial.admin)
    finally:
        elsewhere.close()
        elsewhere.engine.dispose()
    err = _refused(trial, UntrustedKey, [sealed_screening(trial)])
    assert "revoked" in str(err)


def test_the_lock_check_under_the_write_lock_reads_the_casebooks_by_their_index(trial):
    """PostgreSQL: under the table lock, the append asks for the newest freeze/lock/unlock of the batch's
    casebooks. Written as a bare `max(id)`, the planner walks the id index backwards until a row matches, and
    for casebooks never locked (nearly all) that is the whole table: appends slowed from ~880/s to under 300/s as the
    table grew. The plan must look the streams up by their index, whatever the table's size."""
    if not trial.url.startswith("postgresql"):
        pytest.skip("SQLite checks the lock levels inside its own write transaction (lock_levels)")
    import psycopg

    from sle_events.store.casebook import LOCK_TOPICS
    from sle_events.store.record import last_lock_event_sql

    table = trial.record.recorder.events_table_name
    # As in a growing trial before autovacuum first analyses the table: subjects' streams of a thousand lab
    # results of ~1 KiB, no statistics yet.
    with trial.record.engine.begin() as conn:
        conn.exec_driver_sql(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")
        conn.exec_driver_sql(
            f"INSERT INTO {table} (originator_id, originator_version, topic, state) "
            "SELECT ('00000000-0000-0000-0000-' || lpad(mod(i, 20)::text, 12, '0'))::uuid, i / 20 + 1, "
            "'Subject.LabResultRecorded', decode(repeat('7b', 1000), 'hex') FROM generate_series(0, 19999) AS i"
        )
    casebooks = [casebook_stream(trial.study.id, uuid4()), casebook_stream(trial.study.id, None)]
    with trial.record.engine.connect() as conn:
        cursor = psycopg.ClientCursor(conn.connection.driver_connection)
        cursor.execute(f"EXPLAIN (FORMAT JSON) SELECT {last_lock_event_sql(table)}", [casebooks, list(LOCK_TOPICS)])
        plan = json.dumps(cursor.fetchall()[0][0])
        cursor.execute(f"SELECT {last_lock_event_sql(table)}", [casebooks, list(LOCK_TOPICS)])
        assert cursor.fetchall() == [(0,)]
    assert '"Scan Direction": "Backward"' not in plan, plan
    assert "study_events_aggregate_idx" in plan, plan  # the (stream, version) index
