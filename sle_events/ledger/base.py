"""What every ledger stage shares: opening the tables, the state row, stored nodes and checkpoints."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from .checkpoint import Checkpoint
from .merkle import EMPTY_ROOT, HASH_SIZE, CompactRangeState, NodeID, range_nodes, root_at, root_of_leaves
from .note import parse_note
from .proof_file import TlogProof, format_consistency_proof
from .tables import (
    EVENTS_TABLE,
    LEDGER_TABLES,
    STATE_ID,
    events_table,
    ledger_checkpoints,
    ledger_state,
    metadata,
)

BATCH = 5000
"""Events integrated per transaction."""

_STATE_ID = STATE_ID


class LedgerError(RuntimeError):
    """The ledger cannot do what was asked (no ledger, not integrated yet, not covered, inconsistent...)."""


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class LedgerState:
    size: int
    position: int
    frontier: CompactRangeState
    root: bytes
    origin: str | None
    vkey: str | None

    def same_tree(self, other: LedgerState) -> bool:
        return (self.size, self.position, self.frontier) == (other.size, other.position, other.frontier)


@dataclass(frozen=True)
class StoredCheckpoint:
    id: int
    size: int
    root: bytes
    note: str
    issued_at: datetime

    @property
    def checkpoint(self) -> Checkpoint:
        return Checkpoint.parse(parse_note(self.note)[0])


@dataclass(frozen=True)
class LeafRecord:
    index: int
    position: int
    leaf_hash: bytes
    stream: str | None
    version: int | None


@dataclass(frozen=True)
class InclusionProof:
    """A tlog-proof for one leaf, with the exact leaf bytes it proves."""

    leaf: LeafRecord
    size: int
    hashes: tuple[bytes, ...]
    checkpoint: str  # the signed checkpoint note the proof is relative to
    leaf_bytes: bytes | None

    @property
    def index(self) -> int:
        return self.leaf.index

    @property
    def position(self) -> int:
        return self.leaf.position

    @property
    def text(self) -> str:
        """The c2sp.org/tlog-proof@v1 file."""
        return TlogProof(self.leaf.index, self.hashes, self.checkpoint).format()


@dataclass(frozen=True)
class ConsistencyProof:
    old_size: int
    new: StoredCheckpoint
    hashes: tuple[bytes, ...]

    @property
    def text(self) -> str:
        return format_consistency_proof(self.hashes)


@dataclass(frozen=True)
class Recomputed:
    size: int
    root: bytes


# --------------------------------------------------------------------------- the ledger


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _frontier_bytes(state: CompactRangeState) -> bytes:
    return b"".join(state.hashes)


def _frontier_state(size: int, raw: bytes) -> CompactRangeState:
    raw = bytes(raw)
    if len(raw) % HASH_SIZE:
        raise LedgerError(f"ledger_state frontier has {len(raw)} bytes, not a multiple of {HASH_SIZE}")
    hashes = tuple(raw[i : i + HASH_SIZE] for i in range(0, len(raw), HASH_SIZE))
    try:
        return CompactRangeState(size, hashes)
    except ValueError as e:
        raise LedgerError(f"ledger_state is inconsistent: {e}") from None


class LedgerBase:
    """The Merkle log over a study record's events, stored next to them.

    ``Ledger(url)`` opens (and by default creates) the ledger tables on the database at ``url``;
    ``Ledger(engine=...)`` shares an existing engine (e.g. ``StudyRecord.recorder.datastore.engine``).
    """

    def __init__(self, url: str | None = None, *, engine: Engine | None = None, create: bool = True) -> None:
        if engine is None:
            if url is None:
                raise ValueError("Ledger needs a database url or an engine")
            u = sa.engine.make_url(url)
            if (
                u.get_backend_name() == "sqlite"
                and u.database not in (None, "", ":memory:")
                and not Path(u.database).exists()  # do not leave an empty database file behind
            ):
                raise LedgerError(f"no database at {u.database}")
            engine = sa.create_engine(url)
            self._owns_engine = True
        else:
            self._owns_engine = False
        self.engine = engine
        self.url = url or str(engine.url)
        self.dialect = engine.dialect.name
        if self.dialect not in ("sqlite", "postgresql"):
            self.close()
            raise LedgerError(f"the ledger runs on SQLite and PostgreSQL, not {self.dialect}")
        self.events = events_table()
        names = set(sa.inspect(engine).get_table_names())
        if EVENTS_TABLE not in names:
            self.close()
            raise LedgerError(f"no study record here: table {EVENTS_TABLE} does not exist")
        if create:
            self.create()
        elif not all(t in names for t in LEDGER_TABLES):
            self.close()
            raise LedgerError("this database has no ledger yet: run `sle ledger integrate`")

    @classmethod
    def for_record(cls, record: Any, *, create: bool = True) -> Any:
        """The ledger of a `StudyRecord`, on the record's own engine."""
        return cls(record.url, engine=record.engine, create=create)

    def close(self) -> None:
        if self._owns_engine:
            self.engine.dispose()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- schema -----------------------------------------------------------------------------------------
    def create(self) -> None:
        """Create the ledger tables and the state row if missing (idempotent, safe to race)."""
        for table in metadata.sorted_tables:
            try:
                table.create(self.engine, checkfirst=True)
            except sa.exc.DBAPIError:
                if not sa.inspect(self.engine).has_table(table.name):  # not just another process being first
                    raise
        from sqlalchemy.dialects import postgresql, sqlite

        insert = postgresql.insert if self.dialect == "postgresql" else sqlite.insert
        with self.engine.begin() as conn:
            conn.execute(
                insert(ledger_state)
                .values(
                    id=_STATE_ID,
                    size=0,
                    position=0,
                    frontier=b"",
                    root=EMPTY_ROOT,
                    updated_at=_utcnow(),
                )
                .on_conflict_do_nothing(index_elements=["id"])
            )

    # --- state ------------------------------------------------------------------------------------------
    def _read_state(self, conn: Connection, *, lock: bool = False) -> LedgerState:
        if lock:
            if self.dialect == "sqlite":
                # The first write of a transaction takes SQLite's write lock (held to commit); the read that
                # follows then sees the latest committed state.
                conn.execute(
                    ledger_state.update().where(ledger_state.c.id == _STATE_ID).values(size=ledger_state.c.size)
                )
            query = sa.select(ledger_state).where(ledger_state.c.id == _STATE_ID)
            if self.dialect != "sqlite":
                query = query.with_for_update()
        else:
            query = sa.select(ledger_state).where(ledger_state.c.id == _STATE_ID)
        row = conn.execute(query).mappings().first()
        if row is None:
            raise LedgerError("ledger_state has no row: the ledger tables were emptied; run `sle verify`")
        frontier = _frontier_state(row["size"], row["frontier"])
        return LedgerState(row["size"], row["position"], frontier, bytes(row["root"]), row["origin"], row["vkey"])

    def state(self) -> LedgerState:
        with self.engine.connect() as conn:
            return self._read_state(conn)

    @property
    def size(self) -> int:
        return self.state().size

    def root(self) -> bytes:
        return self.state().root

    def pending(self) -> int:
        """Events stored but not integrated yet."""
        with self.engine.connect() as conn:
            position = self._read_state(conn).position
            return conn.execute(
                sa.select(sa.func.count()).select_from(self.events).where(self.events.c.id > position)
            ).scalar_one()

    # --- nodes ------------------------------------------------------------------------------------------
    def _fetch_nodes(self, conn: Connection, ids: Sequence[NodeID]) -> dict[NodeID, bytes]:
        """The hashes of these perfect subtrees, in one round trip (level 0 from ledger_leaves)."""
        leaves = [i for level, i in ids if level == 0]
        inner = [(level, i) for level, i in ids if level > 0]
        # Plain SQL, one statement: proofs are latency-bound and compiling an expression per proof costs more
        # than the queries. Every (level, idx) term is a primary-key lookup on both engines.
        ph = "?" if self.dialect == "sqlite" else "%s"
        parts, params = [], []
        if leaves:
            parts.append(f"SELECT 0, idx, leaf_hash FROM ledger_leaves WHERE idx IN ({', '.join([ph] * len(leaves))})")
            params += leaves
        if inner:
            terms = " OR ".join([f"(level = {ph} AND idx = {ph})"] * len(inner))
            parts.append(f"SELECT level, idx, hash FROM ledger_nodes WHERE {terms}")
            params += [x for nid in inner for x in nid]
        rows: Iterable[Any] = conn.exec_driver_sql(" UNION ALL ".join(parts), tuple(params)) if parts else []
        found = {(int(level), int(i)): bytes(h) for level, i, h in rows}
        missing = [nid for nid in ids if nid not in found]
        if missing:
            raise LedgerError(f"ledger node(s) {missing[:3]} missing: the ledger tables were altered; run `sle verify`")
        return found

    def get_node(self, level: int, index: int) -> bytes:
        with self.engine.connect() as conn:
            return self._fetch_nodes(conn, [(level, index)])[(level, index)]

    def _root_at(self, conn: Connection, size: int) -> bytes:
        ids = range_nodes(0, size)
        nodes = self._fetch_nodes(conn, ids)
        return root_at(size, lambda level, i: nodes[(level, i)])

    def root_at(self, size: int) -> bytes:
        """Root of the stored tree at ``size`` (<= current size) from stored perfect subtrees."""
        with self.engine.connect() as conn:
            current = self._read_state(conn).size
            if not 0 <= size <= current:
                raise LedgerError(f"size {size} is beyond the integrated tree ({current} leaves)")
            return self._root_at(conn, size)

    # --- checkpoints ------------------------------------------------------------------------------------
    @staticmethod
    def _checkpoint_row(row: Any) -> StoredCheckpoint:
        return StoredCheckpoint(row.id, row.size, bytes(row.root), row.note, row.issued_at)

    def latest_checkpoint(self) -> StoredCheckpoint | None:
        with self.engine.connect() as conn:
            return self._latest_checkpoint(conn)

    def _latest_checkpoint(self, conn: Connection) -> StoredCheckpoint | None:
        row = conn.execute(sa.select(ledger_checkpoints).order_by(ledger_checkpoints.c.id.desc()).limit(1)).first()
        return None if row is None else self._checkpoint_row(row)

    def checkpoints(self) -> list[StoredCheckpoint]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(ledger_checkpoints).order_by(ledger_checkpoints.c.id))
            return [self._checkpoint_row(r) for r in rows]

    # --- recomputation ----------------------------------------------------------------------------------
    def recompute(self, size: int | None = None) -> Recomputed:
        """The tree as the events table says it should be: every event (or the first ``size``) in id order."""
        query = sa.select(self.events.c.state).order_by(self.events.c.id)
        if size is not None:
            query = query.limit(size)
        counts: list[int] = []
        with self.engine.connect() as conn:
            result = conn.execution_options(stream_results=True, yield_per=BATCH).execute(query)

            def leaves() -> Iterator[bytes]:
                for part in result.scalars().partitions():
                    counts.append(len(part))
                    yield from part

            root = root_of_leaves(leaves())
        return Recomputed(sum(counts), root)
