"""SDV marks and queries as the store holds them: the append-time check of acts signed elsewhere, and the open
queries of a study or subject (what blocks a lock).

The rules themselves are the domain's (:func:`sle_events.domain.review.check_act`); this module only gathers
what they look at: the stream's state before the event (stored events, then earlier events of the same batch),
the subject it concerns and the hashes of the subject's stored facts.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any
from uuid import UUID

from sqlalchemy import select

from sle_events.domain.errors import ProtocolViolation
from sle_events.domain.event_types import stored_topics
from sle_events.domain.review import Query, check_act
from sle_events.domain.subject import Subject
from sle_events.signing.envelope import SealedEvent, open_stored
from sle_events.store.codec import domain_event_from
from sle_events.store.errors import ActRefused

if TYPE_CHECKING:
    from sle_events.store.record import StudyRecord

__all__ = ["REVIEW_RECORDS", "check_review_act", "fact_hashes", "is_review_act", "open_queries", "queries"]

REVIEW_RECORDS = ("SourceVerification.", "Query.")


def is_review_act(name: str) -> bool:
    return name.startswith(REVIEW_RECORDS)


def _stored(record: StudyRecord, stream: UUID) -> Any:
    """The aggregate as stored, or None if the stream has no events."""
    if not record.recorder.select_events(stream, limit=1):
        return None
    return record.get(stream)


_SUBJECTS_KEPT = 256  # subjects kept folded per record for these checks (a monitor works through a few)


def _subject(record: StudyRecord, stream: UUID) -> Any:
    """The subject as stored, folded once and then brought up to date with the events stored since (a query on
    a subject of 600 facts would otherwise replay all of them on every act). Called under the record's lock."""
    cache: OrderedDict[UUID, Any] = record.__dict__.setdefault("_review_subjects", OrderedDict())
    subject = cache.get(stream)
    if subject is None:
        subject = _stored(record, stream)
    else:
        for stored in record.recorder.select_events(stream, gt=subject.version):
            subject = domain_event_from(open_stored(stored.state)).mutate(subject)
    if not isinstance(subject, Subject):
        return None
    cache[stream] = subject
    cache.move_to_end(stream)
    while len(cache) > _SUBJECTS_KEPT:
        cache.popitem(last=False)
    return subject


def fact_hashes(record: StudyRecord, stream: UUID, versions: Iterable[int]) -> dict[int, str]:
    """SHA-256 of the stored events at these versions of a stream (one query): what an SDV mark names."""
    wanted = sorted({v for v in versions if isinstance(v, int)})
    if not wanted:
        return {}
    t = record.table
    with record.engine.connect() as conn:
        rows = conn.execute(
            select(t.c.originator_version, t.c.state).where(
                t.c.originator_id == stream, t.c.originator_version.in_(wanted)
            )
        )
        return {version: hashlib.sha256(bytes(state)).hexdigest() for version, state in rows}


def check_review_act(
    record: StudyRecord, e: SealedEvent, name: str, batch: Sequence[SealedEvent], where: dict[str, Any]
) -> None:
    """Refuse (`ActRefused`) an SDV or query event that its verb would have refused."""
    env = e.envelope
    payload = env["payload"]
    stream = UUID(env["stream"])
    try:
        before = _stored(record, stream) if env["version"] > 1 else None
        for x in batch:
            if x is e:
                break
            if x.stream == e.stream:
                before = domain_event_from(x).mutate(before)
        subject_id = payload.get("subject_id") or getattr(before, "subject_id", None)
        subject = None
        if subject_id is not None:
            subject = _subject(record, UUID(str(subject_id)))
            if subject is not None and str(subject.study_id) != env["study"]:
                subject = None
        hashes: dict[int, str] = {}
        if subject is not None and name == "SourceVerification.Verified":
            hashes = fact_hashes(record, subject.id, (i.get("version") for i in payload.get("items") or []))
        check_act(
            name,
            payload,
            actor=env["actor"],
            role=env["role"],
            stream=stream,
            study_id=UUID(env["study"]),
            before=before,
            subject=subject,
            hash_of=lambda v: hashes.get(v, ""),
        )
    except ProtocolViolation as exc:
        raise ActRefused(str(exc), violation=exc, **where) from None


def queries(
    record: StudyRecord, study_id: UUID | str, subject_id: UUID | str | None = None, *, conn: Any = None
) -> list[Query]:
    """Every query of the study (or of one subject), folded from the stored ``Query.*`` events in log order;
    `conn`: read in that connection's transaction (the append's own, under its write lock)."""
    t = record.table
    found: dict[UUID, Any] = {}
    q = select(t.c.originator_id, t.c.state).where(t.c.topic.in_(stored_topics("Query"))).order_by(t.c.id)
    with nullcontext(conn) if conn is not None else record.engine.connect() as reading:
        for stream, state in reading.execute(q):
            sealed = open_stored(state)
            if sealed.envelope["study"] != str(study_id):
                continue
            found[stream] = domain_event_from(sealed).mutate(found.get(stream))
    wanted = None if subject_id is None else str(subject_id)
    return [q for q in found.values() if wanted is None or str(q.subject_id) == wanted]


def open_queries(
    record: StudyRecord, study_id: UUID | str, subject_id: UUID | str | None = None, *, conn: Any = None
) -> list[Query]:
    """The queries of the study (or of one subject) that are not closed (OPEN or ANSWERED): what blocks a lock.
    Each is a `sle_events.domain.review.Query` (``id``, ``subject_id``, ``status``, ``target_version``,
    ``field``, ``text``, ``raised_by``, ``cause``)."""
    return [q for q in queries(record, study_id, subject_id, conn=conn) if q.is_open]
