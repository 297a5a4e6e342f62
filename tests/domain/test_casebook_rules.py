"""The casebook's pure rules: which facts a visit sign-off covers, the content hash, lock levels, and the verbs'
refusals (before any event exists). No database."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import pytest

from sle_events.domain.casebook import (
    SIGNATURE_DEFS,
    Casebook,
    CasebookError,
    CoveredStream,
    LockStateError,
    NothingToSign,
    UnknownMeaning,
    content_hash,
    lock_level,
    visit_versions,
)

NOW = datetime.now(UTC) - timedelta(hours=1)
STUDY, SUBJECT = UUID(int=1), UUID(int=2)
M1 = datetime(2024, 3, 1, 9, 0, tzinfo=UTC)


def test_a_visit_covers_what_names_it_what_happened_near_it_and_their_corrections():
    facts: list[tuple[int, str, dict[str, Any], datetime]] = [
        (1, "Subject.Screened", {}, M1 - timedelta(days=90)),
        (2, "Subject.VisitRecorded", {"visit": "M1"}, M1),
        (3, "Subject.LabResultRecorded", {}, M1 + timedelta(days=1)),  # within 2 days: the visit's
        (4, "Subject.LabResultRecorded", {}, M1 + timedelta(days=5)),  # not
        (5, "Subject.SledaiAssessed", {"visit": "M1"}, M1 + timedelta(days=9)),  # names it
        (6, "Subject.Corrected", {"corrected_version": 3}, M1 + timedelta(days=20)),
        (7, "Subject.Corrected", {"corrected_version": 4}, M1 + timedelta(days=20)),
    ]
    assert visit_versions(facts, "M1") == [2, 3, 5, 6]
    assert visit_versions(facts, "M2") == []


def test_the_content_hash_is_the_documented_function_of_the_stored_bytes():
    stream = str(SUBJECT)
    rows = {(stream, v): f"event {v}".encode() for v in (1, 2, 3)}
    h = hashlib.sha256(b"sle-signoff-content-v1\n")
    for v in (1, 2, 3):
        h.update(f"{stream}:{v}:{hashlib.sha256(rows[(stream, v)]).hexdigest()}\n".encode())
    assert content_hash([CoveredStream(stream=stream, through_version=3)], rows) == h.hexdigest()
    only = content_hash([CoveredStream(stream=stream, through_version=3, versions=[1, 3])], rows)
    assert only != h.hexdigest()
    changed = {**rows, (stream, 2): b"event 2, altered"}
    assert content_hash([CoveredStream(stream=stream, through_version=3)], changed) != h.hexdigest()
    assert content_hash([CoveredStream(stream=stream, through_version=3, versions=[1, 3])], changed) == only


def test_lock_levels_fold_in_order():
    assert lock_level([]) is None
    assert lock_level([("Casebook.Frozen", {}), ("Casebook.Locked", {})]) == "locked"
    assert lock_level([("Casebook.Locked", {}), ("Casebook.Unlocked", {"reason": "r"})]) is None


def test_the_verbs_refuse_before_any_event_exists():
    book = Casebook.open(STUDY, SUBJECT, NOW, "NJ01-0001")
    cover = [CoveredStream(stream=str(SUBJECT), through_version=3)]
    with pytest.raises(UnknownMeaning):
        book.sign_off(NOW, meaning="agree", printed_name="Dr. Wang Li", covers=cover, content_hash="ab" * 32)
    with pytest.raises(CasebookError, match="printed name"):
        book.sign_off(NOW, meaning="review", printed_name=" ", covers=cover, content_hash="ab" * 32)
    with pytest.raises(NothingToSign, match="visit M9"):
        empty = [CoveredStream(stream=str(SUBJECT), through_version=3, versions=[])]
        book.sign_off(NOW, meaning="review", printed_name="Dr. Wang Li", covers=empty, content_hash="x", visit="M9")
    with pytest.raises(LockStateError, match="neither frozen nor locked"):
        book.unlock(NOW, "no reason to")
    book.freeze(NOW)
    with pytest.raises(LockStateError, match="already frozen"):
        book.freeze(NOW)
    with pytest.raises(LockStateError, match="reason"):
        book.unlock(NOW, "")
    book.lock(NOW, "ready")
    with pytest.raises(LockStateError, match="locked; unlock"):
        book.freeze(NOW)
    assert [type(e).__name__ for e in book.collect_events()] == ["Opened", "Frozen", "Locked"]
    study = Casebook.open(STUDY, None, NOW)
    with pytest.raises(NothingToSign, match="study-wide"):
        study.sign_off(NOW, meaning="review", printed_name="Dr. Wang Li", covers=cover, content_hash="ab" * 32)
    assert study.id == Casebook.study_id_for(STUDY) != Casebook.id_for(STUDY, SUBJECT)


def test_the_signature_defs_are_the_three_meanings():
    assert {m: d.oid for m, d in SIGNATURE_DEFS.items()} == {
        "review": "SD.INV.REVIEW",
        "approval": "SD.INV.APPROVE",
        "responsibility": "SD.INV.RESP",
    }
