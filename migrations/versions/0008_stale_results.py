"""Patient state lists stale derived results and renal-response assessments (computed from a result that was
corrected or voided since); the projection is rebuilt from event 1 to fill it.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def _columns() -> set[str]:
    return {c["name"] for c in sa.inspect(op.get_bind()).get_columns("patient_state")}


def upgrade() -> None:
    if "stale_results" in _columns():
        return
    op.add_column("patient_state", sa.Column("stale_results", sa.Text(), nullable=False, server_default="[]"))
    op.execute("DELETE FROM patient_state")
    op.execute("DELETE FROM projection_tracking WHERE name = 'patient_state'")


def downgrade() -> None:
    with op.batch_alter_table("patient_state") as batch:
        batch.drop_column("stale_results")
