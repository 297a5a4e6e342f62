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

from projections.base import Fact, VerifyingReader, fold_fact
from sle_events.domain.event_types import stored_topics
from sle_events.signing.envelope import SealedEvent, parse_time
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
    with record.engine.connect() as conn:
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


def events_as_of(
    stream: list[Any], *, as_of: datetime | None = None, occurred_as_of: datetime | None = None
) -> list[Any]:
    """The stream's events (facts or sealed events) the database held at recorded time `as_of`, or that
    happened by `occurred_as_of`, with every later correction or void of those."""
    chosen = stream
    if as_of is not None:
        chosen = [e for e in chosen if parse_time("recorded_at", e.envelope["recorded_at"]) <= as_of]
    if occurred_as_of is not None:
        occurred = {e.version: parse_time("occurred_at", e.envelope["occurred_at"]) for e in chosen}
        kept: list[Any] = []
        for e in chosen:
            target = _targets(e.envelope)
            when = occurred.get(target, occurred[e.version]) if target is not None else occurred[e.version]
            if when <= occurred_as_of and (target is None or target in {k.version for k in kept}):
                kept.append(e)
        chosen = kept
    return chosen


def fold(events: list[Fact | SealedEvent]) -> Any:
    """Rebuild the aggregate from a (possibly gapped) selection of its events, in version order. A signed event
    the domain cannot load raises `StreamHalted` naming it."""
    aggregate = None
    for e in events:
        fact = e if isinstance(e, Fact) else Fact(0, e)  # a bare sealed event: its log position is not known here
        if aggregate is not None:
            aggregate.version = fact.version - 1  # skipped versions are facts of another time
        aggregate = fold_fact(aggregate, fact)
    return aggregate


def read_stream(record: StudyRecord, stream_id: UUID) -> list[Fact]:
    """A stream's events, each hash-chain and signature checked like every projected event."""
    with record.engine.connect() as conn:
        return VerifyingReader(record.table).stream(conn, stream_id)


def replay(
    record: StudyRecord, subject: str, *, as_of: datetime | None = None, occurred_as_of: datetime | None = None
) -> Any:
    stream = read_stream(record, find_subject(record, subject))
    chosen = events_as_of(stream, as_of=as_of, occurred_as_of=occurred_as_of)
    if not chosen:
        raise SubjectNotFound(f"subject {subject} had no recorded events by then")
    return fold(chosen)
