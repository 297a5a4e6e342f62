"""Every table the project owns, for Alembic (`migrations/`) and its model check.

The events table is the one `eventsourcing-sqlalchemy` defines for `StudyRecord`; the ledger's tables and the
read models' are listed here too.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from sqlalchemy import MetaData

# The revisions ship as the package `migrations` (in a wheel as in a checkout): found by import, not by a path.
MIGRATIONS = Path(str(resources.files("migrations")))


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

    found = [ledger_metadata, results_metadata, web_metadata]
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
