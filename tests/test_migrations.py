"""Alembic: an empty database of each engine upgrades to head, and the tables then match the models."""

from __future__ import annotations

from datetime import UTC

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from sle_events import schema

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
        conn.execute(
            sa.text(
                "insert into projection_tracking (name, position, updated_at) "
                "values ('audit_trail', 3, '2026-11-25T00:00:00+00:00')"
            )
        )
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


def test_a_database_upgraded_to_head_verifies_clean(trial, db_url):
    """Upgrading before the ledger's first integration leaves an empty ledger, not one that looks emptied."""
    from sle_events.audit.verifier import verify_record

    schema.upgrade(db_url)
    report = verify_record(db_url, workers=1)
    assert report.ok and report.findings == [] and report.events == trial.rows()


def test_sqlite_events_table_made_before_autoincrement_is_copied_over_as_it_was(tmp_path):
    """0006 recreates an SQLite events table without AUTOINCREMENT: same rows and ids, same verification,
    and the position of a deleted newest event is not handed out again."""
    from datetime import datetime

    from sle_events.audit.verifier import verify_record
    from sle_events.domain.study import Study
    from sle_events.signing.keys import Signer
    from sle_events.store.record import StudyRecord

    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = sa.create_engine(url)
    with engine.begin() as conn:  # as eventsourcing-sqlalchemy made it
        conn.exec_driver_sql(
            "CREATE TABLE study_events (id INTEGER NOT NULL, originator_id BINARY(16) NOT NULL, "
            "originator_version INTEGER NOT NULL, topic TEXT NOT NULL, state BLOB NOT NULL, "
            "PRIMARY KEY (id))"
        )
        conn.exec_driver_sql(
            "CREATE UNIQUE INDEX study_events_aggregate_idx ON study_events (originator_id, originator_version)"
        )
    record = StudyRecord(url)
    admin = Signer.generate("admin@site", "admin")
    study = Study.create("ALLOMSC-SLE", "AlloMSC", admin.actor, admin.public_key_b64, datetime.now(UTC))
    for n in range(3):
        study.register_key(
            f"nurse{n}", "coordinator", Signer.generate(f"nurse{n}", "coordinator").public_key_b64, datetime.now(UTC)
        )
    record.record(study, signer=admin)
    record.close()

    def rows() -> list[tuple]:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.exec_driver_sql("select * from study_events order by id")]

    def table_sql() -> str:
        with engine.connect() as conn:
            sql = conn.exec_driver_sql("select sql from sqlite_master where name = 'study_events'").scalar()
        assert sql is not None
        return sql

    before = rows()
    assert len(before) == 4 and "AUTOINCREMENT" not in table_sql()
    schema.upgrade(url)
    assert "AUTOINCREMENT" in table_sql() and rows() == before
    assert verify_record(url, workers=1).ok and _diffs(url) == []
    with engine.begin() as conn:
        conn.exec_driver_sql("delete from study_events where id = 4")
    record = StudyRecord(url)
    study = record.get(study.id)
    study.register_key(
        "dr.wang", "investigator", Signer.generate("dr.wang", "investigator").public_key_b64, datetime.now(UTC)
    )
    [_appended] = record.record(study, signer=admin)
    record.close()
    assert [r[0] for r in rows()] == [1, 2, 3, 5]
    engine.dispose()


def test_read_models_missing_a_later_column_ask_for_an_upgrade(trial, db_url):
    from projections.runner import ProjectionRunner, SchemaBehind

    schema.upgrade(db_url, "0007")
    with pytest.raises(SchemaBehind, match="patient_state lacks stale_results"):
        ProjectionRunner(db_url)
    schema.upgrade(db_url)
    runner = ProjectionRunner(db_url)
    runner.catch_up()
    assert runner.position("patient_state") == runner.head()
    runner.close()


def _head() -> str:
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(schema.alembic_config("sqlite://")).get_current_head()
    assert head is not None
    return head


def test_the_api_adds_an_index_its_tables_were_made_without(db_url):
    """A database whose API tables predate revision 0018 gets the index when `sle serve` opens it, as the tables
    themselves are made on first use."""
    from sle_events.api.app import prepare_database

    engine = sa.create_engine(db_url)
    try:
        prepare_database(engine)
        with engine.begin() as conn:
            conn.execute(sa.text("DROP INDEX ix_api_idempotency_created_at"))
        assert "ix_api_idempotency_created_at" not in _indexes(engine, "api_idempotency")
        prepare_database(engine)
        assert "ix_api_idempotency_created_at" in _indexes(engine, "api_idempotency")
        prepare_database(engine)  # and once more: nothing to add, nothing refused
    finally:
        engine.dispose()


def _indexes(engine: sa.Engine, table: str) -> set[str]:
    return {str(i["name"]) for i in sa.inspect(engine).get_indexes(table)}
