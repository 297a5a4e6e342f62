"""Projections check each event's signature (not only its hash chain) and halt a stream whose signed event the
domain cannot load: `projection_tracking.halted` keeps why a projection stopped, `halted_streams` which streams
it stopped following. Every read model was built without the signature check, so each is projected again from
event 1.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

READ_MODELS = ("audit_events", "patient_state", "subject_visits", "subject_adverse_events")


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    if "halted_streams" not in inspector.get_table_names():
        op.create_table(
            "halted_streams",
            sa.Column("projection", sa.String(64), primary_key=True),
            sa.Column("stream", sa.String(36), primary_key=True),
            sa.Column("study", sa.String(36), nullable=False),
            sa.Column("subject", sa.String(64)),
            sa.Column("version", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
            sa.Column("position", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
            sa.Column("detail", sa.Text(), nullable=False),
        )
    if "halted" in {c["name"] for c in inspector.get_columns("projection_tracking")}:
        return  # made by this code on first use: already projected with signatures checked
    op.add_column("projection_tracking", sa.Column("halted", sa.Text()))
    for table in READ_MODELS:
        op.execute(f"DELETE FROM {table}")
    op.execute("DELETE FROM projection_tracking")


def downgrade() -> None:
    op.drop_table("halted_streams")
    with op.batch_alter_table("projection_tracking") as batch:
        batch.drop_column("halted")
