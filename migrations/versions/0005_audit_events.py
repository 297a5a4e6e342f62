"""The audit trail stored one row per event (`audit_events`, its field changes as JSON) and read one row per
field through the `audit_trail` view; the row-per-field table of 0002 goes, and the projection is re-run.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
EVENT_COLUMNS = (
    "position, event_id, record_id, study, stream, subject, aggregate, event_type, visit, form, change, "
    "actor, printed_name, role, key, occurred_at, recorded_at, reason, signature_status"
)
# A snapshot of `projections.schema.audit_trail_view_sql` at this revision.
VIEW = {
    "sqlite": "CAST(c.key AS INTEGER) AS seq, json_extract(c.value, '$[0]') AS field, "
    "json_extract(c.value, '$[1]') AS old_value, json_extract(c.value, '$[2]') AS new_value "
    "FROM audit_events AS e, json_each(e.changes) AS c",
    "postgresql": "c.seq - 1 AS seq, c.item ->> 0 AS field, c.item ->> 1 AS old_value, c.item ->> 2 AS new_value "
    "FROM audit_events AS e CROSS JOIN LATERAL json_array_elements(e.changes::json) "
    "WITH ORDINALITY AS c(item, seq)",
}


def _common_columns() -> list[sa.Column]:
    return [
        sa.Column("event_id", sa.String(64), nullable=False),
        sa.Column("record_id", sa.String(64), nullable=False),
        sa.Column("study", sa.String(36), nullable=False),
        sa.Column("stream", sa.String(36), nullable=False),
        sa.Column("subject", sa.String(64)),
        sa.Column("aggregate", sa.String(64), nullable=False),
        sa.Column("event_type", sa.String(128), nullable=False),
        sa.Column("visit", sa.String(16)),
        sa.Column("form", sa.String(128), nullable=False),
    ]


def _who_when_why() -> list[sa.Column]:
    return [
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("printed_name", sa.String(256)),
        sa.Column("role", sa.String(32), nullable=False),
        sa.Column("key", sa.String(32), nullable=False),
        sa.Column("occurred_at", sa.String(40), nullable=False),
        sa.Column("recorded_at", sa.String(40), nullable=False),
        sa.Column("reason", sa.Text()),
        sa.Column("signature_status", sa.String(32), nullable=False),
    ]


def _rerun_audit_trail() -> None:
    op.execute("DELETE FROM projection_tracking WHERE name = 'audit_trail'")


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    if "audit_trail" in inspector.get_table_names():
        op.drop_table("audit_trail")
        _rerun_audit_trail()
    if "audit_events" not in inspector.get_table_names():
        op.create_table(
            "audit_events",
            sa.Column("position", ID, primary_key=True, autoincrement=False),
            *_common_columns(),
            sa.Column("change", sa.String(16), nullable=False),
            sa.Column("changes", sa.Text(), nullable=False),
            *_who_when_why(),
        )
        op.create_index("audit_events_record", "audit_events", ["record_id", "position"])
        op.create_index("audit_events_stream", "audit_events", ["stream", "position"])
        op.create_index("audit_events_subject", "audit_events", ["subject", "position"])
        op.create_index("audit_events_actor", "audit_events", ["actor", "recorded_at"])
        op.create_index("audit_events_recorded", "audit_events", ["recorded_at"])
        op.create_index("audit_events_type", "audit_events", ["event_type"])
    if "audit_trail" not in inspector.get_view_names():
        columns = ", ".join(f"e.{c}" for c in EVENT_COLUMNS.split(", "))
        op.execute(f"CREATE VIEW audit_trail AS SELECT {columns}, {VIEW[op.get_bind().dialect.name]}")


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS audit_trail")
    op.drop_table("audit_events")
    op.create_table(
        "audit_trail",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("position", ID, nullable=False),
        *_common_columns(),
        sa.Column("field", sa.String(128), nullable=False),
        sa.Column("change", sa.String(16), nullable=False),
        sa.Column("old_value", sa.Text()),
        sa.Column("new_value", sa.Text()),
        *_who_when_why(),
    )
    op.create_index("audit_trail_stream", "audit_trail", ["stream", "position"])
    op.create_index("audit_trail_record", "audit_trail", ["record_id", "field", "position"])
    op.create_index("audit_trail_actor", "audit_trail", ["actor", "recorded_at"])
    op.create_index("audit_trail_recorded", "audit_trail", ["recorded_at"])
    op.create_index("audit_trail_type", "audit_trail", ["event_type"])
    _rerun_audit_trail()
