"""The Merkle tree a full verification checked (size, root), sealed with its result: exports verify once per
checkpoint by matching leaves to a sealed, clean run's tree (`sle_events.audit.results.vouched_tree`).

Revision ID: 0016
Revises: 0014
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0014"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    # Created on first use too (`sle verify`): an upgrade after that only records the revision.
    if not sa.inspect(op.get_bind()).has_table("verification_trees"):
        op.create_table(
            "verification_trees",
            sa.Column("run_id", _ID, primary_key=True, autoincrement=False),
            sa.Column("size", _ID, nullable=False),
            sa.Column("root", sa.String(64), nullable=False),
        )


def downgrade() -> None:
    op.drop_table("verification_trees")
