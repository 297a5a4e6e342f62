"""What a projection is, and the facts it is fed.

A projection turns facts (signed events, in log order) into rows. It never sees an event whose hash chain
is broken or whose signature does not hold: the reader checks each event's `prev` against the hash of its
stream's previous event, and its Ed25519 signature against the key the study's registry named for it at that
log position (as `sle verify` does).
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar
from uuid import UUID

from sqlalchemy import Connection, Table, func, select

from sle_events.audit.record_check import SignatureCheck, build_registry_timelines
from sle_events.domain.event_types import type_name
from sle_events.picklable import Picklable
from sle_events.signing.chain import link_problem
from sle_events.signing.envelope import GENESIS, MalformedEnvelope, SealedEvent, open_stored
from sle_events.store.codec import domain_event_from


class ProjectionHalted(Picklable, RuntimeError):
    """An event cannot be projected (broken chain, bad signature, unreadable bytes): the projection stops here."""

    def __init__(self, position: int, stream: str, version: int, detail: str):
        self.position, self.stream, self.version, self.detail = position, stream, version, detail
        super().__init__(f"projection stopped at log position {position} (stream {stream} v{version}): {detail}")


class StreamHalted(ProjectionHalted):
    """A signed event the domain cannot load (a payload stored before append refused it): only its own stream
    stops there; every other stream is still projected."""

    def __init__(self, position: int, stream: str, version: int, detail: str):
        super().__init__(position, stream, version, detail)
        self.args = (f"stream {stream} halted at v{version} (log position {position}): {detail}",)

    def __str__(self) -> str:
        return self.args[0]


@dataclass(frozen=True)
class Fact:
    """One stored event as projections see it."""

    position: int
    sealed: SealedEvent = field(repr=False)

    @property
    def envelope(self) -> dict[str, Any]:
        return self.sealed.envelope

    @property
    def payload(self) -> dict[str, Any]:
        return self.sealed.envelope["payload"]

    @property
    def type_name(self) -> str:
        """`Subject.LabResultRecorded`."""
        return type_name(self.sealed.envelope["type"])

    @property
    def stream(self) -> str:
        return self.sealed.envelope["stream"]

    @property
    def version(self) -> int:
        return self.sealed.envelope["version"]

    @property
    def event_id(self) -> str:
        return f"{self.stream}:{self.version}"

    @cached_property
    def event(self) -> Any:
        """The domain event, decoded (and upcast) as the aggregates see it."""
        return domain_event_from(self.sealed)


def fold_fact(aggregate: Any, fact: Fact) -> Any:
    """The aggregate with `fact` applied (in place). A signed fact the domain cannot load or apply raises
    `StreamHalted` naming it: what is wrong is that stream's, not the study's. (A payload's fields can raise
    anything, e.g. decimal.InvalidOperation for a value that is not a number.) After a failed apply the
    aggregate may be half-changed: fold it again up to the version before."""
    try:
        event = fact.event
    except Exception as e:
        raise StreamHalted(
            fact.position, fact.stream, fact.version, f"signed {fact.type_name} does not load: {type(e).__name__}: {e}"
        ) from e
    try:
        return event.mutate(aggregate)
    except Exception as e:
        raise StreamHalted(
            fact.position,
            fact.stream,
            fact.version,
            f"signed {fact.type_name} cannot be applied: {type(e).__name__}: {e}",
        ) from e


class Projection(ABC):
    name: ClassVar[str]
    tables: ClassVar[tuple[Table, ...]]
    reader_indexes: ClassVar[tuple[str, ...]] = ()  # not needed while projecting: dropped during a rebuild
    # Rows that depend on one stream only can be rebuilt by ranges of streams side by side; others read the log
    # in one pass (projections/casebook.py joins a subject's stream with its casebook stream).
    partitionable: ClassVar[bool] = True

    @abstractmethod
    def apply(self, conn: Connection, facts: Sequence[Fact]) -> None:
        """Project a batch of facts, in log order, inside the caller's transaction."""

    def reset(self, conn: Connection) -> None:
        for table in reversed(self.tables):
            conn.execute(table.delete())

    def bind(self, record: Any) -> None:  # noqa: B027  # an optional hook: doing nothing is the default
        """Given the study record, for projections that need to load aggregates or study configuration."""

    def forget(self) -> None:  # noqa: B027  # an optional hook: doing nothing is the default
        """Drop in-memory caches (before a rebuild)."""

    def hold_back(self) -> None:  # noqa: B027  # an optional hook: doing nothing is the default
        """A rebuild begins: rows may be kept in memory until `flush` (nothing reads them before it ends)."""

    def flush(self, conn: Connection) -> None:  # noqa: B027  # an optional hook: doing nothing is the default
        """Write what was held back since `hold_back`, and write as facts come again."""


def bulk_insert(conn: Connection, table: Table, columns: Sequence[str], rows: list[tuple[Any, ...]]) -> None:
    """Insert many rows fast: COPY on PostgreSQL, the driver's executemany elsewhere (SQLAlchemy's per-row
    parameter building cost more than the database's own work)."""
    if not rows:
        return
    names = ", ".join(columns)
    if conn.dialect.name == "postgresql":
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]  # open: never None
        with cursor.copy(f"COPY {table.name} ({names}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        return
    marks = ", ".join("?" for _ in columns)
    conn.exec_driver_sql(f"INSERT INTO {table.name} ({names}) VALUES ({marks})", rows)


class VerifyingReader:
    """Reads stored events in log order and refuses to hand over one whose chain is broken or whose signature
    does not hold."""

    def __init__(self, events_table: Table) -> None:
        self.table = events_table
        self.heads: dict[str, tuple[int, str]] = {}
        self.signatures = SignatureCheck({})
        self._registry_through = -1  # the log head when the registry timelines were built

    def read(
        self,
        conn: Connection,
        after: int,
        limit: int,
        *,
        streams: tuple[Any, Any] = (None, None),
        upto: int | None = None,
    ) -> list[Fact]:
        """The next events after log position `after`, optionally only those of a range of stream ids and up
        to a position (a partitioned rebuild)."""
        t = self.table
        q = select(t.c.id, t.c.originator_id, t.c.originator_version, t.c.state).where(t.c.id > after)
        if streams[0] is not None:
            q = q.where(t.c.originator_id >= streams[0])
        if streams[1] is not None:
            q = q.where(t.c.originator_id < streams[1])
        if upto is not None:
            q = q.where(t.c.id <= upto)
        rows = conn.execute(q.order_by(t.c.id).limit(limit)).all()
        if rows:
            self.registries(conn, rows[-1][0])
        return [self.check(conn, position, stream_id, version, state) for position, stream_id, version, state in rows]

    def stream(
        self,
        conn: Connection,
        stream_id: UUID,
        upto_version: int | None = None,
        *,
        upto_position: int | None = None,
        vouched: Callable[[int, bytes], bool] | None = None,
    ) -> list[Fact]:
        """One stream's events in version order (up to a version), each checked like those `read` hands over.
        `vouched(position, stored bytes)`: True where a sealed verification already checked that event's
        signature (an export matching leaves to it); the chain and the key's authorisation are checked anyway."""
        t = self.table
        q = select(t.c.id, t.c.originator_version, t.c.state).where(t.c.originator_id == stream_id)
        if upto_version is not None:
            q = q.where(t.c.originator_version <= upto_version)
        if upto_position is not None:  # a prefix of the stream too: positions grow with versions
            q = q.where(t.c.id <= upto_position)
        rows = conn.execute(q.order_by(t.c.originator_version)).all()
        if rows:
            self.registries(conn, max(r[0] for r in rows))
        reading = self.heads.pop(str(stream_id), None)  # where `read` has got to in this stream: kept
        try:
            return [
                self.check(
                    None, position, stream_id, version, state, vouched=vouched is not None and vouched(position, state)
                )
                for position, version, state in rows
            ]
        finally:
            if reading is not None:
                self.heads[str(stream_id)] = reading

    def registries(self, conn: Connection, position: int) -> SignatureCheck:
        """The key registries' timelines, read again when an event lies beyond what they were built from
        (a key registered since)."""
        if position > self._registry_through:
            head = conn.execute(select(func.max(self.table.c.id))).scalar() or 0
            timelines, _ = build_registry_timelines(conn, self.table, [])  # registry faults halt at their event
            self.signatures = SignatureCheck(timelines)
            self._registry_through = head
        return self.signatures

    def check(
        self,
        conn: Connection | None,
        position: int,
        stream_id: UUID,
        version: int,
        state: bytes,
        *,
        vouched: bool = False,
    ) -> Fact:
        """`conn` None: the stream is read whole and in order, so a version without its predecessor is a gap."""
        stream = str(stream_id)
        try:
            sealed = open_stored(state)
        except MalformedEnvelope as e:
            raise ProjectionHalted(position, stream, version, f"stored bytes unreadable: {e}") from e
        env = sealed.envelope
        if env["stream"] != stream or env["version"] != version:
            raise ProjectionHalted(position, stream, version, "row and signed envelope disagree on stream/version")
        expected = self._hash_before(conn, stream_id, version)
        if link_problem(version - 1, expected, version, env["prev"]):
            raise ProjectionHalted(
                position,
                stream,
                version,
                f"hash chain broken: prev {env['prev'][:16]}… ≠ hash of v{version - 1} {expected[:16]}…",
            )
        problem = self.signatures.problem(sealed, position, vouched=vouched)
        if problem is not None:
            raise ProjectionHalted(position, stream, version, f"{problem[0]}: {problem[1]}")
        self.heads[stream] = (version, sealed.hash)
        return Fact(position, sealed)

    def _hash_before(self, conn: Connection | None, stream_id: UUID, version: int) -> str:
        if version == 1:
            return GENESIS
        head = self.heads.get(str(stream_id))
        if head and head[0] == version - 1:
            return head[1]
        if conn is None:  # a whole stream read in order: a gap is a missing event
            return "(missing)"
        t = self.table
        state = conn.execute(
            select(t.c.state).where(t.c.originator_id == stream_id, t.c.originator_version == version - 1)
        ).scalar()
        if state is None:
            return "(missing)"
        return hashlib.sha256(bytes(state)).hexdigest()
