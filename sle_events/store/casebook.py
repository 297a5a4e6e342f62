"""Sign-offs and locks as the stored events say them: lock levels, covered rows, the open queries that block a
lock. Used by `StudyRecord.append` (inside its write transaction), the trial's use cases and `sle verify`."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from uuid import UUID

from sqlalchemy import bindparam, select

from sle_events.domain.casebook import Casebook, CoveredStream, lock_level, stricter
from sle_events.domain.event_types import stored_topics, type_name
from sle_events.signing.envelope import open_stored

__all__ = [
    "LOCK_TOPICS",
    "LockState",
    "casebook_stream",
    "covered_rows",
    "lock_levels",
    "lock_marks",
    "lock_state",
    "open_queries_blocking_lock",
    "recompute_content_hash",
]

LOCK_TOPICS = tuple(
    stored_topics("Casebook.Frozen") + stored_topics("Casebook.Locked") + stored_topics("Casebook.Unlocked")
)


@dataclass(frozen=True)
class LockState:
    """A subject's lock level: its own, the study's, and the stricter of the two (what appends obey)."""

    subject: str | None
    study: str | None

    @property
    def level(self) -> str | None:
        return stricter(self.subject, self.study)


def casebook_stream(study_id: UUID | str, subject_id: UUID | str | None) -> UUID:
    study = UUID(str(study_id))
    return Casebook.study_id_for(study) if subject_id is None else Casebook.id_for(study, UUID(str(subject_id)))


@lru_cache(maxsize=16)
def _lock_events_query(table: Any, bounded: bool) -> Any:
    """Built once per table: `append` asks it under the write lock, where building it each time showed."""
    q = select(table.c.originator_id, table.c.state, table.c.id).where(
        table.c.originator_id.in_(bindparam("b_streams", expanding=True)), table.c.topic.in_(LOCK_TOPICS)
    )
    if bounded:
        q = q.where(table.c.id < bindparam("b_before"))
    return q.order_by(table.c.originator_id, table.c.originator_version)


def lock_levels(conn: Any, table: Any, streams: Iterable[UUID], *, before: int | None = None) -> dict[UUID, str | None]:
    """The lock level of each casebook stream from its stored freeze/lock/unlock events (those at log positions
    below ``before`` only, when given)."""
    return {s: level for s, (level, _) in lock_marks(conn, table, streams, before=before).items()}


def lock_marks(
    conn: Any, table: Any, streams: Iterable[UUID], *, before: int | None = None
) -> dict[UUID, tuple[str | None, int]]:
    """Each casebook stream's lock level and the log position of its latest freeze, lock or unlock (0: none):
    a later one has a higher position, so `append` can ask under its write lock whether any came since."""
    wanted = sorted(set(streams))
    if not wanted:
        return {}
    params: dict[str, Any] = {"b_streams": wanted}
    if before is not None:
        params["b_before"] = before
    found: dict[UUID, list[tuple[str, Any]]] = {s: [] for s in wanted}
    last = dict.fromkeys(wanted, 0)
    for stream, state, position in conn.execute(_lock_events_query(table, before is not None), params):
        s = UUID(str(stream))
        env = open_stored(bytes(state)).envelope
        found[s].append((type_name(env["type"]), env["payload"]))
        last[s] = max(last[s], position)
    return {s: (lock_level(found[s]), last[s]) for s in wanted}


def lock_state(record: Any, study_id: UUID | str, subject_id: UUID | str | None) -> LockState:
    """Whether a subject (or, with ``subject_id`` None, the study) is frozen or locked, as committed now."""
    study_stream = casebook_stream(study_id, None)
    mine = casebook_stream(study_id, subject_id)
    with record.engine.connect() as conn:
        levels = lock_levels(conn, record.table, {mine, study_stream})
    return LockState(subject=levels.get(mine) if subject_id is not None else None, study=levels.get(study_stream))


def covered_rows(conn: Any, table: Any, covers: Iterable[CoveredStream]) -> dict[tuple[str, int], bytes]:
    """The stored bytes (``state``) of every event a sign-off covers that is still stored."""
    rows: dict[tuple[str, int], bytes] = {}
    for cover in covers:
        wanted = cover.covered()
        if not wanted:
            continue
        q = select(table.c.originator_version, table.c.state).where(
            table.c.originator_id == UUID(cover.stream), table.c.originator_version <= cover.through_version
        )
        for version, state in conn.execute(q):
            rows[(cover.stream, version)] = bytes(state)
        for v in [v for v in list(rows) if v[0] == cover.stream and v[1] not in set(wanted)]:
            del rows[v]
    return rows


def recompute_content_hash(conn: Any, table: Any, covers: list[CoveredStream]) -> tuple[str | None, list[str]]:
    """The content hash of the covered events as stored now, and which covered events are missing (then the
    hash is None)."""
    from sle_events.domain.casebook import content_hash

    rows = covered_rows(conn, table, covers)
    missing = [f"{c.stream}:{v}" for c in covers for v in c.covered() if (c.stream, v) not in rows]
    if missing:
        return None, missing
    return content_hash(covers, rows), []


def event_digests(rows: dict[tuple[str, int], bytes]) -> dict[tuple[str, int], str]:
    return {k: hashlib.sha256(v).hexdigest() for k, v in rows.items()}


def open_queries_blocking_lock(
    record: Any, study_id: UUID | str, subject_id: UUID | str | None, conn: Any = None
) -> list[Any]:
    """The queries that are not closed on a subject (or, with ``subject_id`` None, anywhere in the study): any
    one of them blocks a lock. Queries are recorded by `sle_events.store.review` (source data verification and
    queries); without that module there are none. `conn`: read within that transaction."""
    try:
        from sle_events.store.review import open_queries  # type: ignore[import-not-found,unused-ignore]  # see above
    except ImportError:
        return []
    return list(
        open_queries(
            record, UUID(str(study_id)), subject_id=None if subject_id is None else UUID(str(subject_id)), conn=conn
        )
    )
