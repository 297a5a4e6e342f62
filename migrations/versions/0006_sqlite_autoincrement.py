"""SQLite: the events table gets AUTOINCREMENT, so a log position is never handed out twice (PostgreSQL's
sequence never did). The table is copied as it is, ids included; SQLite's sequence starts after the largest.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy_utils.types.uuid import UUIDType

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def _events_sql() -> str:
    return (
        op.get_bind()
        .execute(sa.text("select sql from sqlite_master where type = 'table' and name = 'study_events'"))
        .scalar()
        or ""
    )


def _events(autoincrement: bool) -> sa.Table:
    """The events table as 0001 made it (a snapshot: reflection would read BINARY(16) back as NUMERIC)."""
    return sa.Table(
        "study_events",
        sa.MetaData(),
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("originator_id", UUIDType(), nullable=False),
        sa.Column("originator_version", sa.Integer(), nullable=False),
        sa.Column("topic", sa.Text(), nullable=False),
        sa.Column("state", sa.LargeBinary(), nullable=False),
        sa.Index("study_events_aggregate_idx", "originator_id", "originator_version", unique=True),
        sqlite_autoincrement=autoincrement,
    )


def _recreate(autoincrement: bool) -> None:
    with op.batch_alter_table(
        "study_events",
        recreate="always",
        copy_from=_events(autoincrement),
        table_kwargs={"sqlite_autoincrement": autoincrement},
    ):
        pass


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite" and "AUTOINCREMENT" not in _events_sql().upper():
        _recreate(True)


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        _recreate(False)
