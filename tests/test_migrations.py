"""Alembic: an empty database of each engine upgrades to head, and the tables then match the models."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from sle_events.store import schema

pytestmark = pytest.mark.storage


def _diffs(url: str) -> list[object]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": schema.compare_type})
            return compare_metadata(ctx, schema.target_metadata())
    finally:
        engine.dispose()


def test_empty_database_upgrades_to_head_and_matches_the_models(db_url):
    schema.upgrade(db_url)
    assert schema.current(db_url) == _head()
    assert _diffs(db_url) == []


def test_upgrade_after_first_use_only_records_the_revision(trial, db_url):
    """The embedded default creates tables on first use; `sle db upgrade` then succeeds and matches."""
    from projections.runner import ProjectionRunner

    runner = ProjectionRunner(db_url)
    runner.catch_up()
    runner.close()
    schema.upgrade(db_url)
    assert _diffs(db_url) == []


def _head() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(schema.alembic_config("sqlite://")).get_current_head()
