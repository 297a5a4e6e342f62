"""Read models: projection tracking, audit trail, verification runs.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _missing(name: str) -> bool:
    # The embedded default creates tables on first use; an upgrade then only records the revision.
    return not sa.inspect(op.get_bind()).has_table(name)


def upgrade() -> None:
    if _missing("projection_tracking"):
        op.create_table(
            "projection_tracking",
            sa.Column("name", sa.String(64), primary_key=True),
            sa.Column("position", ID, nullable=False),
            sa.Column("updated_at", sa.String(40), nullable=False),
        )
    if _missing("audit_trail"):
        op.create_table(
            "audit_trail",
            sa.Column("id", ID, primary_key=True, autoincrement=True),
            sa.Column("position", ID, nullable=False),
            sa.Column("event_id", sa.String(64), nullable=False),
            sa.Column("record_id", sa.String(64), nullable=False),
            sa.Column("study", sa.String(36), nullable=False),
            sa.Column("stream", sa.String(36), nullable=False),
            sa.Column("subject", sa.String(64)),
            sa.Column("aggregate", sa.String(64), nullable=False),
            sa.Column("event_type", sa.String(128), nullable=False),
            sa.Column("visit", sa.String(16)),
            sa.Column("form", sa.String(128), nullable=False),
            sa.Column("field", sa.String(128), nullable=False),
            sa.Column("change", sa.String(16), nullable=False),
            sa.Column("old_value", sa.Text()),
            sa.Column("new_value", sa.Text()),
            sa.Column("actor", sa.String(128), nullable=False),
            sa.Column("printed_name", sa.String(256)),
            sa.Column("role", sa.String(32), nullable=False),
            sa.Column("key", sa.String(32), nullable=False),
            sa.Column("occurred_at", sa.String(40), nullable=False),
            sa.Column("recorded_at", sa.String(40), nullable=False),
            sa.Column("reason", sa.Text()),
            sa.Column("signature_status", sa.String(32), nullable=False),
        )
        op.create_index("audit_trail_stream", "audit_trail", ["stream", "position"])
        op.create_index("audit_trail_record", "audit_trail", ["record_id", "field", "position"])
        op.create_index("audit_trail_actor", "audit_trail", ["actor", "recorded_at"])
        op.create_index("audit_trail_recorded", "audit_trail", ["recorded_at"])
        op.create_index("audit_trail_type", "audit_trail", ["event_type"])
    if _missing("verification_runs"):
        op.create_table(
            "verification_runs",
            sa.Column("id", ID, primary_key=True, autoincrement=True),
            sa.Column("run_at", sa.String(40), nullable=False),
            sa.Column("ok", sa.Integer(), nullable=False),
            sa.Column("events", ID, nullable=False),
            sa.Column("findings", ID, nullable=False),
        )
    if _missing("verification_findings"):
        op.create_table(
            "verification_findings",
            sa.Column("run_id", ID, primary_key=True),
            sa.Column("seq", sa.Integer(), primary_key=True),
            sa.Column("position", ID),
            sa.Column("stream", sa.String(36)),
            sa.Column("version", ID),
            sa.Column("kind", sa.String(64), nullable=False),
            sa.Column("detail", sa.Text(), nullable=False),
        )
        op.create_index("verification_findings_position", "verification_findings", ["position"])


def downgrade() -> None:
    for name in ("verification_findings", "verification_runs", "audit_trail", "projection_tracking"):
        op.drop_table(name)
