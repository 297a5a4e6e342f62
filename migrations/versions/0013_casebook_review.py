"""Casebook review read models: investigators' sign-offs, each subject's lock and sign-off state, and every
freeze, lock and unlock (projections/casebook.py). The projection fills them from event 1.

Revision ID: 0013
Revises: 0015
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0015"  # re-chained after main's 0012 → 0015 (merged 06:40)
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _missing(table: str) -> bool:
    """Tables are also created on first use (the embedded default): then only the revision is recorded."""
    return not sa.inspect(op.get_bind()).has_table(table)


def upgrade() -> None:
    if _missing("casebook_signoffs"):
        _signoffs()
    if _missing("casebook_state"):
        _state()
    if _missing("casebook_locks"):
        _locks()


def _signoffs() -> None:
    op.create_table(
        "casebook_signoffs",
        sa.Column("signoff_id", sa.String(64), primary_key=True),
        sa.Column("study", sa.String(36), nullable=False),
        sa.Column("subject", sa.String(36), nullable=False),
        sa.Column("screening_number", sa.String(64)),
        sa.Column("site", sa.String(32)),
        sa.Column("scope", sa.String(16), nullable=False),
        sa.Column("visit", sa.String(16)),
        sa.Column("meaning", sa.String(32), nullable=False),
        sa.Column("signature_def", sa.String(32), nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("printed_name", sa.String(256), nullable=False),
        sa.Column("role", sa.String(32), nullable=False),
        sa.Column("key", sa.String(32), nullable=False),
        sa.Column("signed_at", sa.String(40), nullable=False),
        sa.Column("recorded_at", sa.String(40), nullable=False),
        sa.Column("content_hash", sa.String(64), nullable=False),
        sa.Column("hash_method", sa.String(64), nullable=False),
        sa.Column("covers", sa.Text, nullable=False),
        sa.Column("through_version", _ID, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("invalidated_by", sa.String(64)),
        sa.Column("invalidated_reason", sa.Text),
        sa.Column("invalidated_at", sa.String(40)),
        sa.Column("position", _ID, nullable=False),
    )
    op.create_index("casebook_signoffs_subject", "casebook_signoffs", ["subject", "position"])


def _state() -> None:
    op.create_table(
        "casebook_state",
        sa.Column("subject", sa.String(36), primary_key=True),
        sa.Column("study", sa.String(36), nullable=False),
        sa.Column("site", sa.String(32), nullable=False),
        sa.Column("screening_number", sa.String(64), nullable=False),
        sa.Column("subject_version", _ID, nullable=False),
        sa.Column("lock_level", sa.String(16)),
        sa.Column("study_lock_level", sa.String(16)),
        sa.Column("signoff_status", sa.String(32), nullable=False),
        sa.Column("last_signoff", sa.String(64)),
        sa.Column("signed_through_version", _ID),
        sa.Column("signed_by", sa.String(256)),
        sa.Column("signed_at", sa.String(40)),
        sa.Column("visit_days", sa.Text, nullable=False),
        sa.Column("flags", sa.Text, nullable=False),
        sa.Column("position", _ID, nullable=False),
    )
    op.create_index("casebook_state_screening", "casebook_state", ["study", "screening_number"])


def _locks() -> None:
    op.create_table(
        "casebook_locks",
        sa.Column("event_id", sa.String(64), primary_key=True),
        sa.Column("study", sa.String(36), nullable=False),
        sa.Column("subject", sa.String(36)),
        sa.Column("screening_number", sa.String(64)),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("role", sa.String(32), nullable=False),
        sa.Column("at", sa.String(40), nullable=False),
        sa.Column("recorded_at", sa.String(40), nullable=False),
        sa.Column("position", _ID, nullable=False),
    )
    op.create_index("casebook_locks_study", "casebook_locks", ["study", "position"])


def downgrade() -> None:
    for name in ("casebook_locks", "casebook_state", "casebook_signoffs"):
        op.drop_table(name)
    op.execute("DELETE FROM projection_tracking WHERE name = 'casebook'")
