"""An index on the API's Idempotency-Key records by creation time: keys are forgotten after a day
(`sle_events.api.idempotency.KEPT`), and the statement that forgets them would otherwise read every record.

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None

INDEX = "ix_api_idempotency_created_at"


def upgrade() -> None:
    # `sle serve` creates its tables on first use, with the index: an upgrade after that only records the revision.
    inspector = sa.inspect(op.get_bind())
    if INDEX not in {i["name"] for i in inspector.get_indexes("api_idempotency")}:
        op.create_index(INDEX, "api_idempotency", ["created_at"])


def downgrade() -> None:
    op.drop_index(INDEX, table_name="api_idempotency")
