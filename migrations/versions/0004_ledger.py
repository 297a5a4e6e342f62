"""The verifiable ledger: Merkle leaves, perfect-subtree nodes, the integration state, signed checkpoints.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

BIG = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _missing(name: str) -> bool:
    return not sa.inspect(op.get_bind()).has_table(name)


def upgrade() -> None:
    if _missing("ledger_leaves"):
        op.create_table(
            "ledger_leaves",
            sa.Column("idx", BIG, primary_key=True, autoincrement=False),
            sa.Column("position", sa.BigInteger(), nullable=False, unique=True),
            sa.Column("leaf_hash", sa.LargeBinary(32), nullable=False),
            sa.Column("stream", sa.String(36), nullable=True),
            sa.Column("version", sa.BigInteger(), nullable=True),
        )
    if _missing("ledger_nodes"):
        op.create_table(
            "ledger_nodes",
            sa.Column("level", sa.SmallInteger(), primary_key=True, autoincrement=False),
            sa.Column("idx", sa.BigInteger(), primary_key=True, autoincrement=False),
            sa.Column("hash", sa.LargeBinary(32), nullable=False),
        )
    if _missing("ledger_state"):
        op.create_table(
            "ledger_state",
            sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
            sa.Column("size", sa.BigInteger(), nullable=False),
            sa.Column("position", sa.BigInteger(), nullable=False),
            sa.Column("frontier", sa.LargeBinary(), nullable=False),
            sa.Column("root", sa.LargeBinary(32), nullable=False),
            sa.Column("origin", sa.Text(), nullable=True),
            sa.Column("vkey", sa.Text(), nullable=True),
            sa.Column("updated_at", sa.DateTime(timezone=True), nullable=True),
        )
    if _missing("ledger_checkpoints"):
        op.create_table(
            "ledger_checkpoints",
            sa.Column("id", BIG, primary_key=True, autoincrement=True),
            sa.Column("size", sa.BigInteger(), nullable=False),
            sa.Column("root", sa.LargeBinary(32), nullable=False),
            sa.Column("note", sa.Text(), nullable=False),
            sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
        )


def downgrade() -> None:
    for name in ("ledger_checkpoints", "ledger_state", "ledger_nodes", "ledger_leaves"):
        op.drop_table(name)
