"""The event store: signed envelopes as `eventsourcing-sqlalchemy` stores them.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy_utils.types.uuid import UUIDType

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    # StudyRecord may already have created it (the embedded default needs no setup step).
    if sa.inspect(op.get_bind()).has_table("study_events"):
        return
    op.create_table(
        "study_events",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("originator_id", UUIDType(), nullable=False),
        sa.Column("originator_version", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("topic", sa.Text(), nullable=False),
        sa.Column("state", sa.LargeBinary(), nullable=False),
    )
    op.create_index("study_events_aggregate_idx", "study_events", ["originator_id", "originator_version"], unique=True)


def downgrade() -> None:
    op.drop_index("study_events_aggregate_idx", table_name="study_events")
    op.drop_table("study_events")
