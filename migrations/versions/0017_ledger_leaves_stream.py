"""An index on the ledger's leaves by (stream, version): the exports look a subject's leaves up by stream, and
without it each lookup read every leaf.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None

INDEX = "ix_ledger_leaves_stream_version"


def upgrade() -> None:
    # The ledger creates its tables on first use, with the index: an upgrade after that only records the revision.
    inspector = sa.inspect(op.get_bind())
    if not inspector.has_table("ledger_leaves"):
        return
    if INDEX not in {i["name"] for i in inspector.get_indexes("ledger_leaves")}:
        op.create_index(INDEX, "ledger_leaves", ["stream", "version"])


def downgrade() -> None:
    op.drop_index(INDEX, table_name="ledger_leaves")
