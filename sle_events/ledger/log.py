"""The ledger's storage side: one RFC 9162 Merkle log over every event of the record, in commit order.

Appending and integrating are separate stages (as in transparency-dev/tessera). `StudyRecord.append` writes
events; :meth:`Ledger.integrate` is the single sequencer that later gives each new event the next leaf index.
The leaf bytes are the event's stored ``state`` (the sealed envelope), so one byte string is signed, chained,
stored and logged.

Tables, created if missing on the events' engine (SQLAlchemy Core):

* ``ledger_leaves(idx, position, leaf_hash, stream, version)`` -- leaf ``idx`` is the event at log position
  ``position`` (``study_events.id``). ``stream``/``version`` are a copy of the event's row, kept so that a leaf
  whose event disappears can still be named.
* ``ledger_nodes(level, idx, hash)`` -- every *perfect* subtree of level >= 1 (level 0 is ``ledger_leaves``).
  The table is append-only, so it serves proofs for every past tree size.
* ``ledger_state`` -- one row: tree size, last integrated position, the compact-range frontier (one hash per
  set bit of the size, largest first) and root; the log's vkey and origin once a checkpoint was signed.
* ``ledger_checkpoints(id, size, root, note, issued_at)`` -- every signed checkpoint ever issued.

Integration reads events with ``id`` greater than the last integrated position in ``id`` order (ids are
handed out under the events table's write lock, so id order is commit order; PostgreSQL may leave gaps after
rollbacks, which are simply skipped), computes the new leaves, nodes and frontier, and writes them with the
new state in ONE transaction after taking the ledger lock (``SELECT ... FOR UPDATE`` on the state row on
PostgreSQL; the database write lock on SQLite) and checking that nobody integrated meanwhile. A crash loses
at most the uncommitted batch; running again continues from the stored state. Events are read and hashed
before the lock is taken, so the lock is held only for the inserts: writers are never blocked for long.

The log's signing key is an Ed25519 key in the Go ``sumdb/note`` signer format
(``PRIVATE+KEY+<origin>+<key id>+<base64>``), kept in a 0600 file; its name is the checkpoint origin.
"""

from __future__ import annotations

import os
import re
import signal
import stat
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence
from uuid import UUID

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from .checkpoint import KEY_ROTATION, Checkpoint, CheckpointError, follow_key_rotations, sign_checkpoint
from .merkle import (
    EMPTY_ROOT,
    HASH_SIZE,
    CompactRange,
    CompactRangeState,
    NodeID,
    ProofError,
    consistency_proof,
    consistency_proof_nodes,
    inclusion_proof,
    inclusion_proof_nodes,
    leaf_hash,
    range_nodes,
    root_at,
    root_of_leaves,
    verify_consistency,
    verify_inclusion,
)
from .note import KeyFormatError, NoteError, Signer, Verifier, is_valid_key_name, open_note, parse_note
from .proof_file import TlogProof, format_consistency_proof

__all__ = [
    "BATCH",
    "EVENTS_TABLE",
    "LedgerError",
    "LogKeyError",
    "Ledger",
    "LedgerState",
    "StoredCheckpoint",
    "LeafRecord",
    "InclusionProof",
    "ConsistencyProof",
    "Recomputed",
    "metadata",
    "ledger_leaves",
    "ledger_nodes",
    "ledger_state",
    "ledger_checkpoints",
    "LEDGER_TABLES",
    "events_table",
    "ledger_exists",
    "create_log_key",
    "load_log_key",
    "default_origin",
    "parse_event_id",
]

BATCH = 5000
"""Events integrated per transaction."""

EVENTS_TABLE = "study_events"
_STATE_ID = 1
_Big = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # INTEGER PRIMARY KEY = rowid on SQLite


class LedgerError(RuntimeError):
    """The ledger cannot do what was asked (no ledger, not integrated yet, not covered, inconsistent...)."""


class LogKeyError(ValueError):
    """The log key file is missing, unsafe or malformed. Never carries key material."""


# --------------------------------------------------------------------------- schema

metadata = sa.MetaData()

ledger_leaves = sa.Table(
    "ledger_leaves",
    metadata,
    sa.Column("idx", _Big, primary_key=True, autoincrement=False),
    sa.Column("position", sa.BigInteger, nullable=False, unique=True),
    sa.Column("leaf_hash", sa.LargeBinary(HASH_SIZE), nullable=False),
    sa.Column("stream", sa.String(36), nullable=True),
    sa.Column("version", sa.BigInteger, nullable=True),
)

ledger_nodes = sa.Table(
    "ledger_nodes",
    metadata,
    sa.Column("level", sa.SmallInteger, primary_key=True, autoincrement=False),
    sa.Column("idx", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("hash", sa.LargeBinary(HASH_SIZE), nullable=False),
)

ledger_state = sa.Table(
    "ledger_state",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("position", sa.BigInteger, nullable=False),  # last integrated log position (0: none)
    sa.Column("frontier", sa.LargeBinary, nullable=False),  # concatenated hashes, largest subtree first
    sa.Column("root", sa.LargeBinary(HASH_SIZE), nullable=False),
    sa.Column("origin", sa.Text, nullable=True),
    sa.Column("vkey", sa.Text, nullable=True),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=True),
)

ledger_checkpoints = sa.Table(
    "ledger_checkpoints",
    metadata,
    sa.Column("id", _Big, primary_key=True, autoincrement=True),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("root", sa.LargeBinary(HASH_SIZE), nullable=False),
    sa.Column("note", sa.Text, nullable=False),
    sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
)

LEDGER_TABLES = ("ledger_leaves", "ledger_nodes", "ledger_state", "ledger_checkpoints")


def events_table() -> sa.Table:
    """The events table exactly as `StudyRecord` defines it (same column types), without starting an app."""
    from eventsourcing_sqlalchemy.datastore import SQLAlchemyDatastore
    from eventsourcing_sqlalchemy.models import StoredEventRecord

    record_cls = SQLAlchemyDatastore.define_record_class(
        cls_name="StudyEvent", table_name=EVENTS_TABLE, schema_name=None, base_cls=StoredEventRecord
    )
    return record_cls.__table__  # type: ignore[no-any-return]


def ledger_exists(engine: Engine) -> bool:
    names = set(sa.inspect(engine).get_table_names())
    return all(t in names for t in LEDGER_TABLES)


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
    return datetime.now(timezone.utc)


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


@dataclass
class _Batch:
    base: LedgerState
    leaves: list[tuple[int, int, bytes, str, int]]  # idx, position, leaf_hash, stream, version
    nodes: list[tuple[int, int, bytes]]  # level, idx, hash
    frontier: CompactRange
    last_position: int


class Ledger:
    """The Merkle log over a study record's events, stored next to them.

    ``Ledger(url)`` opens (and by default creates) the ledger tables on the database at ``url``;
    ``Ledger(engine=...)`` shares an existing engine (e.g. ``StudyRecord.recorder.datastore.engine``).
    """

    def __init__(self, url: str | None = None, *, engine: Engine | None = None, create: bool = True) -> None:
        if engine is None:
            if url is None:
                raise ValueError("Ledger needs a database url or an engine")
            u = sa.engine.make_url(url)
            if u.get_backend_name() == "sqlite" and u.database not in (None, "", ":memory:"):
                if not Path(u.database).exists():  # do not leave an empty database file behind
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
    def for_record(cls, record: Any, *, create: bool = True) -> Ledger:
        """The ledger of a `StudyRecord`, on the record's own engine."""
        return cls(record.url, engine=record.recorder.datastore.engine, create=create)

    def close(self) -> None:
        if self._owns_engine:
            self.engine.dispose()

    def __enter__(self) -> Ledger:
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
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        with self.engine.begin() as conn:
            conn.execute(insert(ledger_state).values(
                id=_STATE_ID, size=0, position=0, frontier=b"", root=EMPTY_ROOT, updated_at=_utcnow(),
            ).on_conflict_do_nothing(index_elements=["id"]))  # fmt: skip

    # --- state ------------------------------------------------------------------------------------------
    def _read_state(self, conn: Connection, *, lock: bool = False) -> LedgerState:
        if lock:
            if self.dialect == "sqlite":
                # The first write of a transaction takes SQLite's write lock (held to commit); the read that
                # follows then sees the latest committed state.
                conn.execute(ledger_state.update().where(ledger_state.c.id == _STATE_ID)
                             .values(size=ledger_state.c.size))  # fmt: skip
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

    # --- integration ------------------------------------------------------------------------------------
    def _prepare(self, conn: Connection, base: LedgerState, limit: int) -> _Batch:
        ev = self.events
        rows = conn.execute(
            sa.select(ev.c.id, ev.c.originator_id, ev.c.originator_version, ev.c.state)
            .where(ev.c.id > base.position)
            .order_by(ev.c.id)
            .limit(limit)
        ).all()
        cr = CompactRange.from_state(base.frontier)
        leaves: list[tuple[int, int, bytes, str, int]] = []
        nodes: list[tuple[int, int, bytes]] = []
        append = cr.append
        for position, stream, version, state in rows:
            created = append(leaf_hash(state))
            _, idx, lh = created[0]
            leaves.append((idx, position, lh, str(stream), version))
            nodes.extend(created[1:])
        last = rows[-1][0] if rows else base.position
        return _Batch(base, leaves, nodes, cr, last)

    def _bulk_insert(self, conn: Connection, table: str, columns: tuple[str, ...], rows: list[tuple[Any, ...]]) -> None:
        """Rows straight to the driver: COPY on PostgreSQL, executemany on SQLite (least CPU on both sides)."""
        if not rows:
            return
        if self.dialect == "postgresql":
            with conn.connection.driver_connection.cursor() as cursor:  # type: ignore[union-attr]
                with cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
                    for row in rows:
                        copy.write_row(row)
        else:
            marks = ", ".join("?" * len(columns))
            conn.exec_driver_sql(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", rows)

    def _integrate_once(self, limit: int) -> int:
        with self.engine.connect() as conn:  # read and hash outside the lock
            base = self._read_state(conn)
            batch = self._prepare(conn, base, limit)
            conn.rollback()
        if not batch.leaves:
            return 0
        with self.engine.begin() as conn:
            locked = self._read_state(conn, lock=True)
            if not locked.same_tree(base):  # another integrator got there first: redo from its state
                batch = self._prepare(conn, locked, limit)
                if not batch.leaves:
                    return 0
            self._bulk_insert(conn, "ledger_leaves", ("idx", "position", "leaf_hash", "stream", "version"), batch.leaves)
            self._bulk_insert(conn, "ledger_nodes", ("level", "idx", "hash"), batch.nodes)
            new = batch.frontier.to_state()
            conn.execute(ledger_state.update().where(ledger_state.c.id == _STATE_ID).values(
                size=new.size, position=batch.last_position, frontier=_frontier_bytes(new),
                root=batch.frontier.root(), updated_at=_utcnow()))  # fmt: skip
        return len(batch.leaves)

    def integrate(
        self,
        limit: int | None = None,
        *,
        batch: int = BATCH,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> int:
        """Integrate up to ``limit`` (default: all) not yet integrated events; return how many.

        Each batch of at most ``batch`` events is one transaction. ``on_progress(done, total)`` is called
        after each committed batch.
        """
        if batch < 1:
            raise ValueError("batch must be at least 1")
        if limit is not None and limit < 0:
            raise ValueError("limit must not be negative")
        total = self.pending() if on_progress is not None else 0
        if limit is not None:
            total = min(total, limit)
        done = 0
        while limit is None or done < limit:
            step = batch if limit is None else min(batch, limit - done)
            added = self._integrate_once(step)
            if not added:
                break
            done += added
            if on_progress is not None:
                on_progress(done, max(total, done))
        return done

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
        rows = conn.exec_driver_sql(" UNION ALL ".join(parts), tuple(params)) if parts else []
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

    def rotate_key(self, old: Signer, new: Signer) -> StoredCheckpoint:
        """Hand the log to a new key (same origin): a checkpoint of the current tree whose extension line names
        the old and the new vkey, signed by both. Later checkpoints are signed by the new key alone; an auditor
        holding either vkey follows the rotation (`verify_ledger`). Refused like `checkpoint`, and if ``old``
        is not the log's key or ``new`` is not another key of its origin."""
        return self.checkpoint(old, rotate_to=new)

    def checkpoint(self, signer: Signer, origin: str | None = None, *, rotate_to: Signer | None = None) -> StoredCheckpoint:  # fmt: skip
        """Sign and store a checkpoint for the current integrated size (`rotate_key` passes ``rotate_to``).

        Refuses (:class:`LedgerError`, nothing stored) if ``origin`` is not the key's name, if the ledger was
        already signed by another key or for another origin, or if the stored tree no longer reproduces the
        frontier or the last checkpoint's root (the ledger tables were altered: the log key must not sign
        over that).
        """
        origin = signer.name if origin is None else origin
        if origin != signer.name:
            raise LedgerError(f"origin {origin!r} differs from the log key's name {signer.name!r}; "
                              "the log key is made for one origin (sle ledger init --origin)")  # fmt: skip
        if rotate_to is not None and (rotate_to.name != origin or rotate_to.vkey == signer.vkey):
            raise LedgerError(f"the new log key must be another key for origin {origin!r} "
                              f"(given {rotate_to.vkey})")  # fmt: skip
        vkey = signer.vkey
        with self.engine.begin() as conn:
            st = self._read_state(conn, lock=True)
            if st.vkey is not None and st.vkey != vkey:
                raise LedgerError(f"this ledger is signed by {st.vkey}, not by the given key ({vkey})")
            if st.origin is not None and st.origin != origin:
                raise LedgerError(f"this ledger's origin is {st.origin!r}, not {origin!r}")
            if st.size:
                ids = range_nodes(0, st.size)
                nodes = self._fetch_nodes(conn, ids)
                if tuple(nodes[nid] for nid in ids) != st.frontier.hashes:
                    raise LedgerError("ledger_nodes do not reproduce the stored frontier: the ledger tables were "
                                      "altered; run `sle verify` before signing anything")  # fmt: skip
            root = CompactRange.from_state(st.frontier).root()
            if root != st.root:
                raise LedgerError("ledger_state root does not match its frontier: run `sle verify`")
            last = self._latest_checkpoint(conn)
            if last is not None:
                if last.size > st.size:
                    raise LedgerError(f"the last checkpoint covers {last.size} leaves but the tree has only "
                                      f"{st.size}: the ledger was truncated; run `sle verify`")  # fmt: skip
                if self._root_at(conn, last.size) != last.root:
                    raise LedgerError(f"the stored tree at size {last.size} no longer has the root of checkpoint "
                                      f"#{last.id}: the ledger was altered; run `sle verify`")  # fmt: skip
            if rotate_to is None:
                note = sign_checkpoint(Checkpoint(origin, st.size, root), signer)
            else:
                rotation = f"{KEY_ROTATION} {vkey} {rotate_to.vkey}"
                note = sign_checkpoint(Checkpoint(origin, st.size, root, (rotation,)), signer, rotate_to)
            issued = _utcnow()
            new_id = conn.execute(
                ledger_checkpoints.insert().values(size=st.size, root=root, note=note, issued_at=issued)
                .returning(ledger_checkpoints.c.id)
            ).scalar_one()
            if rotate_to is not None:
                conn.execute(ledger_state.update().where(ledger_state.c.id == _STATE_ID)
                             .values(vkey=rotate_to.vkey, origin=origin))  # fmt: skip
            elif st.vkey is None or st.origin is None:
                conn.execute(ledger_state.update().where(ledger_state.c.id == _STATE_ID).values(vkey=vkey, origin=origin))
        return StoredCheckpoint(new_id, st.size, root, note, issued)

    def _verifiers(self, conn: Connection) -> list[Verifier]:
        """The log's key and the earlier keys its rotation checkpoints (signed by both keys) link to it."""
        vkey = self._read_state(conn).vkey
        if not vkey:
            return []
        notes = list(conn.execute(sa.select(ledger_checkpoints.c.note).order_by(ledger_checkpoints.c.id)).scalars())
        return [Verifier.from_vkey(k) for k in follow_key_rotations(notes, vkey).linked]

    def _resolve_checkpoint(self, conn: Connection, note: str | None) -> tuple[int, bytes, str]:
        """(size, root, note): the given checkpoint note, checked against this log, or the latest stored one."""
        if note is None:
            latest = self._latest_checkpoint(conn)
            if latest is None:
                raise LedgerError("no checkpoint has been issued yet: run `sle ledger checkpoint`")
            return latest.size, latest.root, latest.note
        verifiers = self._verifiers(conn)
        try:
            text = open_note(note, verifiers)[0] if verifiers else parse_note(note)[0]
            cp = Checkpoint.parse(text)
        except (NoteError, CheckpointError) as e:
            raise LedgerError(f"the given checkpoint is not one of this log's: {e}") from None
        st = self._read_state(conn)
        if st.origin is not None and cp.origin != st.origin:
            raise LedgerError(f"the given checkpoint is for origin {cp.origin!r}, this log is {st.origin!r}")
        if cp.size > st.size:
            raise LedgerError(f"the given checkpoint covers {cp.size} leaves; this ledger has integrated {st.size}")
        if self._root_at(conn, cp.size) != cp.root_hash:
            raise LedgerError(f"this log's tree at size {cp.size} does not have the given checkpoint's root: "
                              "the log is not consistent with it")  # fmt: skip
        return cp.size, cp.root_hash, note

    # --- leaves and proofs ------------------------------------------------------------------------------
    def _leaf(self, conn: Connection, *, index: int | None = None, position: int | None = None) -> LeafRecord:
        lv = ledger_leaves.c
        cond = lv.idx == index if index is not None else lv.position == position
        row = conn.execute(sa.select(lv.idx, lv.position, lv.leaf_hash, lv.stream, lv.version).where(cond)).first()
        if row is not None:
            return LeafRecord(row.idx, row.position, bytes(row.leaf_hash), row.stream, row.version)
        st = self._read_state(conn)
        if index is not None:
            raise LedgerError(f"leaf index {index} does not exist: the tree has {st.size} leaves")
        exists = conn.execute(sa.select(self.events.c.id).where(self.events.c.id == position)).first()
        if exists is None:
            raise LedgerError(f"there is no event at log position {position}")
        if position is not None and position > st.position:
            raise LedgerError(f"the event at log position {position} is not integrated yet: run `sle ledger integrate`")
        raise LedgerError(f"the event at log position {position} is not in the ledger: run `sle verify`")

    def leaf(self, *, index: int | None = None, position: int | None = None) -> LeafRecord:
        if (index is None) == (position is None):
            raise ValueError("give exactly one of index or position")
        with self.engine.connect() as conn:
            return self._leaf(conn, index=index, position=position)

    def position_of(self, stream: UUID | str, version: int) -> int:
        """Log position of an event given its stream and version."""
        ev = self.events
        stream_id = stream if isinstance(stream, UUID) else UUID(str(stream))
        with self.engine.connect() as conn:
            pos = conn.execute(sa.select(ev.c.id).where(ev.c.originator_id == stream_id,
                                                        ev.c.originator_version == version)).scalar()  # fmt: skip
        if pos is None:
            raise LedgerError(f"there is no event {stream_id} v{version}")
        return int(pos)

    def leaf_bytes(self, position: int) -> bytes:
        with self.engine.connect() as conn:
            state = conn.execute(sa.select(self.events.c.state).where(self.events.c.id == position)).scalar()
        if state is None:
            raise LedgerError(f"there is no event at log position {position}")
        return bytes(state)

    def inclusion_proof(
        self,
        position: int | None = None,
        *,
        index: int | None = None,
        checkpoint: str | None = None,
        with_leaf: bool = True,
    ) -> InclusionProof:
        """Inclusion proof for the leaf at log ``position`` (or leaf ``index``) in a checkpoint's tree.

        ``checkpoint`` is a signed checkpoint note of this log (e.g. one an auditor holds); default the latest
        stored checkpoint. The proof is checked against the checkpoint before it is returned, and the leaf
        bytes (the event's stored state) against the logged leaf hash.
        """
        if (index is None) == (position is None):
            raise ValueError("give exactly one of position or index")
        with self.engine.connect() as conn:
            leaf = self._leaf(conn, index=index, position=position)
            size, root, note = self._resolve_checkpoint(conn, checkpoint)
            if leaf.index >= size:
                raise LedgerError(f"leaf {leaf.index} (log position {leaf.position}) is not covered by the "
                                  f"checkpoint (size {size}) yet: run `sle ledger checkpoint`")  # fmt: skip
            nodes = self._fetch_nodes(conn, inclusion_proof_nodes(leaf.index, size))
            hashes = inclusion_proof(leaf.index, size, lambda level, i: nodes[(level, i)])
            data: bytes | None = None
            if with_leaf:
                state = conn.execute(sa.select(self.events.c.state).where(self.events.c.id == leaf.position)).scalar()
                if state is None:
                    raise LedgerError(f"the event of leaf {leaf.index} (log position {leaf.position}, "
                                      f"{leaf.stream} v{leaf.version}) is gone from the record: run `sle verify`")  # fmt: skip
                data = bytes(state)
                if leaf_hash(data) != leaf.leaf_hash:
                    raise LedgerError(f"the event at log position {leaf.position} no longer matches its logged leaf "
                                      "hash: it was altered after it was logged; run `sle verify`")  # fmt: skip
        try:
            verify_inclusion(leaf.leaf_hash, leaf.index, size, hashes, root)
        except ProofError as e:
            raise LedgerError(f"the stored tree does not prove leaf {leaf.index} in its own checkpoint ({e}): "
                              "the ledger tables were altered; run `sle verify`") from None  # fmt: skip
        return InclusionProof(leaf, size, tuple(hashes), note, data)

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> list[bytes]:
        """RFC 9162 consistency proof between two sizes of the stored tree (``new_size`` default: current)."""
        with self.engine.connect() as conn:
            current = self._read_state(conn).size
            new_size = current if new_size is None else new_size
            if not 0 < old_size <= new_size <= current:
                raise LedgerError(f"no consistency proof from size {old_size} to {new_size} "
                                  f"(need 0 < old <= new <= {current})")  # fmt: skip
            nodes = self._fetch_nodes(conn, consistency_proof_nodes(old_size, new_size))
            return consistency_proof(old_size, new_size, lambda level, i: nodes[(level, i)])

    def prove_consistency(self, old_note: str, new_note: str | None = None) -> ConsistencyProof:
        """Consistency proof from a checkpoint an auditor saved to a newer one (default: the latest).

        Refuses with :class:`LedgerError` if this log's tree does not reproduce the old checkpoint's root.
        """
        with self.engine.connect() as conn:
            old_size, old_root, _ = self._resolve_checkpoint(conn, old_note)
            if new_note is None:
                latest = self._latest_checkpoint(conn)
                if latest is None:
                    raise LedgerError("no checkpoint has been issued yet: run `sle ledger checkpoint`")
                new = latest
            else:
                size, root, note = self._resolve_checkpoint(conn, new_note)
                new = StoredCheckpoint(0, size, root, note, _utcnow())
            if self._root_at(conn, new.size) != new.root:
                raise LedgerError(f"this log's tree at size {new.size} does not have the root of the newest "
                                  "checkpoint: the ledger was altered; run `sle verify`")  # fmt: skip
            if old_size > new.size:
                raise LedgerError(f"the old checkpoint (size {old_size}) is newer than the new one ({new.size})")
            if old_size == 0:
                return ConsistencyProof(0, new, ())
            nodes = self._fetch_nodes(conn, consistency_proof_nodes(old_size, new.size))
            hashes = consistency_proof(old_size, new.size, lambda level, i: nodes[(level, i)])
        verify_consistency(old_size, new.size, hashes, old_root, new.root)
        return ConsistencyProof(old_size, new, tuple(hashes))

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

    # --- periodic mode ----------------------------------------------------------------------------------
    def run(
        self,
        signer: Signer,
        interval: float = 5.0,
        *,
        origin: str | None = None,
        stop: threading.Event | None = None,
        batch: int = BATCH,
        on_cycle: Callable[[int, StoredCheckpoint | None], None] | None = None,
        on_error: Callable[[Exception], None] | None = None,
    ) -> None:
        """Integrate and checkpoint every ``interval`` seconds until ``stop`` is set (or SIGINT/SIGTERM).

        A checkpoint is issued when the tree grew since the last one. Database outages are reported through
        ``on_error`` and retried next cycle; anything else (e.g. an altered ledger) ends the loop.
        """
        if interval <= 0:
            raise ValueError("interval must be positive")
        stop = stop or threading.Event()
        with _stop_on_signals(stop):
            while not stop.is_set():
                try:
                    added = self.integrate(batch=batch)
                    latest = self.latest_checkpoint()
                    issued = None
                    size = self.size
                    if size and (latest is None or latest.size != size):
                        issued = self.checkpoint(signer, origin)
                    if on_cycle is not None:
                        on_cycle(added, issued)
                except (sa.exc.OperationalError, sa.exc.InterfaceError) as e:
                    if on_error is None:
                        raise
                    on_error(e)
                stop.wait(interval)


@contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum: int, frame: Any) -> None:
        stop.set()

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# --------------------------------------------------------------------------- the log key


def create_log_key(path: str | os.PathLike[str], origin: str) -> Signer:
    """Generate the log's Ed25519 key for ``origin`` and write it to a new 0600 file (never overwrites)."""
    if not is_valid_key_name(origin):
        raise LogKeyError(f"origin {origin!r} cannot name a key: no spaces, no '+', no control characters")
    path = Path(path)
    signer = Signer.generate(origin)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise LogKeyError(f"{path} exists; refusing to overwrite a key") from None
    except OSError as e:
        raise LogKeyError(f"cannot create {path}: {e.strerror}") from None
    with os.fdopen(fd, "w", encoding="ascii") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(signer.export_skey() + "\n")
    return signer


def load_log_key(path: str | os.PathLike[str]) -> Signer:
    """Read the log key file; it must be a regular file readable by its owner only."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise LogKeyError(f"log key {path} does not exist (create it with `sle ledger init --log-key {path}`)") from None
    except OSError as e:
        raise LogKeyError(f"cannot read log key {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise LogKeyError(f"log key {path} is not a regular file")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise LogKeyError(f"log key {path} is accessible by group or others (mode {mode:04o}); chmod 600 {path}")
    try:
        text = path.read_text(encoding="ascii").strip()
        return Signer.from_skey(text)
    except (UnicodeDecodeError, KeyFormatError, ValueError):
        raise LogKeyError(f"{path} is not a log signing key (want the PRIVATE+KEY+... form `sle ledger init` writes)") from None
    except OSError as e:
        raise LogKeyError(f"cannot read log key {path}: {e.strerror}") from None


_ORIGIN_CHARS = re.compile(r"[^A-Za-z0-9._~/-]+")


def default_origin(url: str) -> str:
    """``sle.local/<study code>`` if the database holds exactly one study, else ``sle.local/<database name>``."""
    name = None
    try:
        engine = sa.create_engine(url)
        try:
            if not url.startswith("sqlite") or _sqlite_path(url).exists():
                if EVENTS_TABLE in sa.inspect(engine).get_table_names():
                    from sle_events.domain.event_types import stored_topics

                    ev = events_table()
                    with engine.connect() as conn:
                        rows = conn.execute(sa.select(ev.c.state).where(ev.c.topic.in_(stored_topics("Study.Created")))).scalars().all()
                    if len(rows) == 1:
                        from sle_events.signing.envelope import open_sealed

                        name = open_sealed(bytes(rows[0])).envelope["payload"].get("code")
        finally:
            engine.dispose()
    except Exception:  # noqa: BLE001 - fall back to the database name
        name = None
    if not name:
        u = sa.engine.make_url(url)
        name = Path(u.database).stem if u.get_backend_name() == "sqlite" and u.database else (u.database or "study")
    name = _ORIGIN_CHARS.sub("-", str(name)).strip("-") or "study"
    return f"sle.local/{name}"


def _sqlite_path(url: str) -> Path:
    return Path(sa.engine.make_url(url).database or "")


def parse_event_id(text: str) -> tuple[UUID, int] | int:
    """``<stream uuid>:<version>`` -> (stream, version); a decimal -> log position. ValueError otherwise."""
    text = text.strip()
    if ":" in text:
        stream_s, _, version_s = text.rpartition(":")
        try:
            stream = UUID(stream_s)
        except ValueError:
            raise ValueError(f"{stream_s!r} is not a stream UUID") from None
        if not version_s.isdigit() or int(version_s) < 1:
            raise ValueError(f"{version_s!r} is not a version (a positive integer)")
        return stream, int(version_s)
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise ValueError(f"{text!r} is neither <stream uuid>:<version> nor a log position")
