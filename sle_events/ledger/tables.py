"""The ledger's tables (SQLAlchemy Core), created on the events' engine; see `sle_events.ledger.log`."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from .merkle import HASH_SIZE

__all__ = [
    "EVENTS_TABLE",
    "LEDGER_TABLES",
    "metadata",
    "ledger_leaves",
    "ledger_nodes",
    "ledger_state",
    "ledger_checkpoints",
    "events_table",
    "ledger_exists",
]

EVENTS_TABLE = "study_events"
STATE_ID = 1
_Big = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # INTEGER PRIMARY KEY = rowid on SQLite

metadata = sa.MetaData()

ledger_leaves = sa.Table(
    "ledger_leaves",
    metadata,
    sa.Column("idx", _Big, primary_key=True, autoincrement=False),
    sa.Column("position", sa.BigInteger, nullable=False, unique=True),
    sa.Column("leaf_hash", sa.LargeBinary(HASH_SIZE), nullable=False),
    sa.Column("stream", sa.String(36), nullable=True),
    sa.Column("version", sa.BigInteger, nullable=True),
    # exports find a subject's leaves by stream (revision 0017)
    sa.Index("ix_ledger_leaves_stream_version", "stream", "version"),
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
    """The events table exactly as `StudyRecord` defines it (one definition, column types included)."""
    from sle_events.store.record import StudyRecord

    return StudyRecord.events_table()


def ledger_exists(engine: Engine) -> bool:
    names = set(sa.inspect(engine).get_table_names())
    return all(t in names for t in LEDGER_TABLES)
