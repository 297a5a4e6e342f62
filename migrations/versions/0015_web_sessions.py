"""The web view's sign-in sessions and used sign-in nonces (`sle web link`, `sle_events/web/`).

Revision ID: 0015
Revises: 0011
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "web_sessions",
        sa.Column("id_hash", sa.String(64), primary_key=True),
        sa.Column("study", sa.String(64), nullable=False),
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("actor", sa.Text, nullable=False),
        sa.Column("role", sa.Text, nullable=False),
        sa.Column("printed_name", sa.Text, nullable=True),
        sa.Column("opened_at", sa.Text, nullable=False),
        sa.Column("expires_at", sa.Text, nullable=False),
    )
    op.create_table(
        "web_signin_nonces",
        sa.Column("nonce", sa.String(32), primary_key=True),
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("expires_at", sa.Text, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("web_signin_nonces")
    op.drop_table("web_sessions")
