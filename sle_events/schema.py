"""Every table the project owns, for Alembic (`migrations/`) and its model check.

The events table is the one `eventsourcing-sqlalchemy` defines for `StudyRecord`; the ledger's tables and the
read models' are listed here too.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import MetaData

# The revisions ship as the package `migrations` (in a wheel as in a checkout): found by import, not by a path.
MIGRATIONS = Path(str(resources.files("migrations")))


# The HTTP API's Idempotency-Key records and the request signatures it has seen (replays), per caller key.
api_metadata = MetaData()
api_idempotency = sa.Table(
    "api_idempotency",
    api_metadata,
    sa.Column("key_id", sa.String(64), primary_key=True),  # the caller's registered key
    sa.Column("idempotency_key", sa.String(255), primary_key=True),
    sa.Column("request_hash", sa.String(64), nullable=False),  # SHA-256 of method, path, query and body
    sa.Column("state", sa.String(16), nullable=False),  # in_flight | done
    sa.Column("status", sa.Integer, nullable=True),
    sa.Column("response", sa.LargeBinary, nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),  # kept `idempotency.KEPT`
)
api_nonces = sa.Table(
    "api_nonces",
    api_metadata,
    sa.Column("key_id", sa.String(64), primary_key=True),
    sa.Column("nonce", sa.String(128), primary_key=True),
    sa.Column("created", sa.BigInteger, nullable=False, index=True),  # the signature's `created` (Unix seconds)
)


def target_metadata() -> MetaData:
    from sle_events.store.record import StudyRecord

    meta = MetaData()
    StudyRecord.events_table().to_metadata(meta)
    for extra in _extra_metadata():
        for table in extra.tables.values():
            table.to_metadata(meta)
    return meta


def _extra_metadata() -> list[MetaData]:
    from sle_events.audit.results import metadata as results_metadata
    from sle_events.ledger.tables import metadata as ledger_metadata
    from sle_events.web.tables import metadata as web_metadata

    found = [ledger_metadata, results_metadata, api_metadata, web_metadata]
    try:
        from projections.schema import metadata as projection_metadata

        found.append(projection_metadata)
    except ImportError:  # pragma: no cover - projections are optional at import time
        pass
    return found


def alembic_config(url: str):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url)
    return config


def upgrade(url: str, revision: str = "head") -> None:
    from alembic import command

    command.upgrade(alembic_config(url), revision)


def current(url: str) -> str | None:
    from alembic.migration import MigrationContext
    from sqlalchemy import create_engine

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def compare_type(context, inspected_column, metadata_column, inspected_type, metadata_type):
    """Alembic type comparison that knows `UUIDType`: SQLite reflects its BINARY(16) as NUMERIC(16)."""
    from sqlalchemy_utils.types.uuid import UUIDType

    if isinstance(metadata_type, UUIDType):
        reflected = str(inspected_type).upper()
        return not ("UUID" in reflected or "BINARY" in reflected or reflected.startswith("NUMERIC(16"))
    return None  # Alembic's own comparison
