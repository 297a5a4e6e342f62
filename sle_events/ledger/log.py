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

import re
from pathlib import Path

import sqlalchemy as sa

from .base import (
    BATCH,
    ConsistencyProof,
    InclusionProof,
    LeafRecord,
    LedgerBase,
    LedgerError,
    LedgerState,
    Recomputed,
    StoredCheckpoint,
)
from .integrate import Integrating
from .keyfile import LogKeyError, create_log_key, load_log_key
from .prove import Proving, parse_event_id
from .publish import Publishing
from .tables import (
    EVENTS_TABLE,
    LEDGER_TABLES,
    events_table,
    ledger_checkpoints,
    ledger_exists,
    ledger_leaves,
    ledger_nodes,
    ledger_state,
    metadata,
)

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


class Ledger(Integrating, Publishing, Proving, LedgerBase):
    """The Merkle log over a study record's events, stored next to them: its stages in one object.

    ``Ledger(url)`` opens (and by default creates) the ledger tables on the database at ``url``;
    ``Ledger(engine=...)`` shares an existing engine (e.g. ``StudyRecord.recorder.datastore.engine``).
    """


_ORIGIN_CHARS = re.compile(r"[^A-Za-z0-9._~/-]+")


def default_origin(url: str) -> str:
    """``sle.local/<study code>`` if the database holds exactly one study, else ``sle.local/<database name>``."""
    name = None
    try:
        engine = sa.create_engine(url)
        try:
            exists = not url.startswith("sqlite") or _sqlite_path(url).exists()  # inspect() would create the file
            if exists and EVENTS_TABLE in sa.inspect(engine).get_table_names():
                from sle_events.domain.event_types import stored_topics

                ev = events_table()
                with engine.connect() as conn:
                    rows = (
                        conn.execute(sa.select(ev.c.state).where(ev.c.topic.in_(stored_topics("Study.Created"))))
                        .scalars()
                        .all()
                    )
                if len(rows) == 1:
                    from sle_events.signing.envelope import open_sealed

                    name = open_sealed(bytes(rows[0])).envelope["payload"].get("code")
        finally:
            engine.dispose()
    except Exception:
        name = None
    if not name:
        u = sa.engine.make_url(url)
        name = Path(u.database).stem if u.get_backend_name() == "sqlite" and u.database else (u.database or "study")
    name = _ORIGIN_CHARS.sub("-", str(name)).strip("-") or "study"
    return f"sle.local/{name}"


def _sqlite_path(url: str) -> Path:
    return Path(sa.engine.make_url(url).database or "")
