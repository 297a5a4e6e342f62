"""The audit trail shows occurred-at in UTC like recorded-at (envelopes keep the site's offset): re-project it.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-25
"""

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("DELETE FROM audit_events")
    op.execute("DELETE FROM projection_tracking WHERE name = 'audit_trail'")


def downgrade() -> None:
    pass  # the rows are rebuilt from the events either way
