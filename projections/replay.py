"""As-of replay of one subject, in both time axes.

`as_of` (recorded time): what the database said then — the events recorded by that moment. Versions are
appended in recorded order, so this is a prefix of the stream.
`occurred_as_of` (world time, bitemporal): what was true in the clinic at that moment given everything known
today — every event that happened by then, including corrections recorded later of facts that happened by
then (a correction counts at the time of the fact it corrects).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

from sqlalchemy import select

from projections.base import ChainCheckingReader
from sle_events.domain.event_types import stored_topics
from sle_events.signing.envelope import SealedEvent, parse_time
from sle_events.store.codec import domain_event_from
from sle_events.store.record import StudyRecord

SCREENED_TOPICS = stored_topics("Subject.Screened")


class SubjectNotFound(LookupError):
    pass


def find_subject(record: StudyRecord, subject: str) -> UUID:
    """A subject's stream id from its id or its screening number."""
    try:
        return UUID(subject)
    except ValueError:
        pass
    t = record.table
    with record.recorder.datastore.engine.connect() as conn:
        rows = conn.execute(select(t.c.originator_id, t.c.state).where(t.c.topic.in_(SCREENED_TOPICS))).all()
    for stream_id, state in rows:
        if f'"screening_number":"{subject}"'.encode() in bytes(state):
            return stream_id
    raise SubjectNotFound(f"no subject with screening number {subject!r}")


def _targets(env: dict[str, Any]) -> int | None:
    payload = env["payload"]
    for name in ("corrected_version", "voided_version"):
        if isinstance(payload.get(name), int):
            return payload[name]
    return None


def events_as_of(stream: list[SealedEvent], *, as_of: datetime | None = None,
                 occurred_as_of: datetime | None = None) -> list[SealedEvent]:  # fmt: skip
    chosen = stream
    if as_of is not None:
        chosen = [e for e in chosen if parse_time("recorded_at", e.envelope["recorded_at"]) <= as_of]
    if occurred_as_of is not None:
        occurred = {e.version: parse_time("occurred_at", e.envelope["occurred_at"]) for e in chosen}
        kept = []
        for e in chosen:
            target = _targets(e.envelope)
            when = occurred.get(target, occurred[e.version]) if target is not None else occurred[e.version]
            if when <= occurred_as_of and (target is None or target in {k.version for k in kept}):
                kept.append(e)
        chosen = kept
    return chosen


def fold(events: list[SealedEvent]) -> Any:
    """Rebuild the aggregate from a (possibly gapped) selection of its events, in version order."""
    aggregate = None
    for e in events:
        event = domain_event_from(e)
        if aggregate is not None:
            aggregate.version = e.version - 1  # skipped versions are facts of another time
        aggregate = event.mutate(aggregate)
    return aggregate


def read_stream(record: StudyRecord, stream_id: UUID) -> list[SealedEvent]:
    """A stream's events, read with SQLAlchemy Core and hash-chain checked like every projected event."""
    t = record.table
    with record.recorder.datastore.engine.connect() as conn:
        rows = conn.execute(select(t.c.id, t.c.originator_version, t.c.state)
                            .where(t.c.originator_id == stream_id).order_by(t.c.originator_version)).all()  # fmt: skip
    reader = ChainCheckingReader(t)
    return [reader.check(None, position, stream_id, version, state).sealed  # type: ignore[arg-type]
            for position, version, state in rows]  # fmt: skip


def replay(record: StudyRecord, subject: str, *, as_of: datetime | None = None,
           occurred_as_of: datetime | None = None) -> Any:  # fmt: skip
    stream = read_stream(record, find_subject(record, subject))
    chosen = events_as_of(stream, as_of=as_of, occurred_as_of=occurred_as_of)
    if not chosen:
        raise SubjectNotFound(f"subject {subject} had no recorded events by then")
    return fold(chosen)
