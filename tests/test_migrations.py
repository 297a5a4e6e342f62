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


def test_upgrade_from_the_row_per_field_audit_table_reprojects_into_audit_events(trial, db_url):
    """0005 drops 0002's row-per-field `audit_trail` table, puts the view in its place, and makes the projection
    run again from event 1; a downgrade brings the table back."""
    from alembic import command

    from projections.audit_trail import query
    from projections.runner import ProjectionRunner, SchemaBehind

    schema.upgrade(db_url, "0004")
    with pytest.raises(SchemaBehind, match="sle db upgrade"):
        ProjectionRunner(db_url)
    engine = sa.create_engine(db_url)
    with engine.begin() as conn:
        conn.execute(sa.text("insert into projection_tracking (name, position, updated_at) "
                             "values ('audit_trail', 3, '2026-11-25T00:00:00+00:00')"))  # fmt: skip
    schema.upgrade(db_url)
    inspector = sa.inspect(engine)
    assert "audit_trail" in inspector.get_view_names() and "audit_trail" not in inspector.get_table_names()
    assert _diffs(db_url) == []
    runner = ProjectionRunner(db_url)
    assert runner.position("audit_trail") == 0, "the new table is filled from event 1"
    runner.catch_up()
    with runner.engine.connect() as conn:
        rows = query(conn, event_type="Study.KeyRegistered")
    runner.close()
    assert {r["new_value"] for r in rows if r["field"] == "actor"} == {"nurse.li", "dr.wang", "lab.service"}

    command.downgrade(schema.alembic_config(db_url), "0004")
    inspector = sa.inspect(engine)
    assert "audit_trail" in inspector.get_table_names() and "audit_events" not in inspector.get_table_names()
    engine.dispose()


def _head() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(schema.alembic_config("sqlite://")).get_current_head()
