"""Group commit: batches that threads append at the same time share one transaction, and none of them sees
another's refusal (`StudyRecord.append`)."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from sle_events.domain.subject import Subject
from sle_events.signing.envelope import GENESIS, SealedEvent, seal
from sle_events.signing.keys import Signer
from sle_events.store.codec import envelope_for
from sle_events.store.errors import BadSignature, VersionConflict
from sle_events.store.record import StudyRecord

from conftest import rival_consents

pytestmark = pytest.mark.storage
NOW = datetime.now(UTC)


def screening(trial: Any, number: str) -> SealedEvent:
    subject = Subject(trial.study.id, "NJ01", number, NOW - timedelta(days=1))
    [event] = subject.collect_events()
    return seal(envelope_for(event, study=trial.study.id, prev=GENESIS, reason=None), trial.coordinator)


def appended_together(record: StudyRecord, batches: list[list[SealedEvent]]) -> tuple[list[Any], list[int]]:
    """Each batch appended by a thread of its own, all of them waiting for the write lock at once; returns
    each thread's answer (positions or the exception) and the size of every batch the store then wrote."""
    written: list[int] = []
    write_batch = record._append_batch

    def spy(events: list[SealedEvent]) -> list[int]:
        written.append(len(events))
        return write_batch(events)

    record._append_batch = spy  # type: ignore[method-assign]
    answers: list[Any] = [None] * len(batches)

    def send(i: int) -> None:
        try:
            answers[i] = record.append(batches[i])
        except Exception as exc:
            answers[i] = exc

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(batches))]
    with record._lock:  # an append in progress: everyone who comes now waits
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while len(record._waiting) < len(batches):
            assert time.monotonic() < deadline, "the threads never queued"
            time.sleep(0.005)
    for t in threads:
        t.join(30)
    del record._append_batch
    return answers, written


def stored_at(record: StudyRecord, position: int) -> tuple[str, int]:
    t = record.table
    with record.engine.connect() as conn:
        row = conn.execute(sa.select(t.c.originator_id, t.c.originator_version).where(t.c.id == position)).one()
    return str(row.originator_id), row.originator_version


def test_concurrent_batches_share_one_transaction_and_each_gets_its_own_positions(trial):
    batches = [[screening(trial, f"SCR-{i:03}")] for i in range(6)]
    before = trial.rows()
    answers, written = appended_together(trial.record, batches)
    assert written == [6], "six waiting batches, one write"
    assert trial.rows() == before + 6
    for [event], positions in zip(batches, answers, strict=True):
        assert isinstance(positions, list) and len(positions) == 1
        assert stored_at(trial.record, positions[0]) == (event.envelope["stream"], 1)


def test_a_refused_batch_in_a_group_is_refused_alone_and_the_others_are_stored(trial):
    batches = [[screening(trial, f"SCR-{i:03}")] for i in range(5)]
    good = batches[2][0]
    batches[2] = [SealedEvent.build(good.envelope, good.signed, bytes(64))]  # a forged signature
    before = trial.rows()
    answers, written = appended_together(trial.record, batches)
    assert written == [5, 1, 1, 1, 1, 1], "the shared write was refused, so each batch went alone"
    assert isinstance(answers[2], BadSignature) and answers[2].stream == good.envelope["stream"]
    assert all(isinstance(a, list) for i, a in enumerate(answers) if i != 2), answers
    assert trial.rows() == before + 4
    assert trial.record.stream(good.stream) == []


def test_two_batches_racing_for_one_version_in_a_group_one_wins(trial):
    """Alone, the second gets the VersionConflict it would get from a twin writer; the others are unaffected."""
    subject, contenders = rival_consents(trial)
    batches = [[contenders[0]], [screening(trial, "SCR-101")], [contenders[1]], [screening(trial, "SCR-102")]]
    answers, written = appended_together(trial.record, batches)
    assert written == [4, 1, 1, 1, 1], "the shared write was refused, so each batch went alone"
    assert sum(isinstance(a, VersionConflict) for a in (answers[0], answers[2])) == 1, answers
    assert sum(isinstance(a, list) for a in (answers[0], answers[2])) == 1, answers
    assert all(isinstance(a, list) for a in (answers[1], answers[3])), answers
    assert [e.version for e in trial.record.stream(subject.id)] == [1, 2]


def test_study_acts_never_share_a_transaction(trial):
    """A registry change goes alone: its batch is exactly what its sender sent."""
    study = trial.record.study(trial.study.id)
    study.register_key("dr.zhao", "investigator", Signer.generate("dr.zhao", "investigator").public_key_b64, NOW)
    [event] = study.collect_events()
    head = trial.record.stream(trial.study.id)[-1]
    registration = seal(envelope_for(event, study=trial.study.id, prev=head.hash, reason=None), trial.admin)
    batches = [[screening(trial, "SCR-200")], [registration], [screening(trial, "SCR-201")]]
    answers, written = appended_together(trial.record, batches)
    assert all(isinstance(a, list) for a in answers), answers
    assert sorted(written) == [1, 2], "the two screenings together, the registration alone"
    assert "dr.zhao" in {k["actor"] for k in trial.record.study(trial.study.id).keys.values()}
