"""Read models of source data verification and queries: review_queries, sdv_marks, sdv_facts.

Revision ID: 0014
Revises: 0011
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"  # chained after 0013 (casebook review) when sdv was merged into signoff
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _missing(name: str) -> bool:
    # Tables are created on first use (the embedded default): an upgrade after that only records the revision.
    return not sa.inspect(op.get_bind()).has_table(name)


def upgrade() -> None:
    if _missing("review_queries"):
        _create_review_queries()
    if _missing("sdv_marks"):
        _create_sdv_marks()
    if _missing("sdv_facts"):
        _create_sdv_facts()
    # The new projections start from event 1 on their own (no tracking row yet).


def _create_review_queries() -> None:
    op.create_table(
        "review_queries",
        sa.Column("query_id", sa.String(36), primary_key=True),
        sa.Column("study", sa.String(36), nullable=False),
        sa.Column("subject", sa.String(36), nullable=False),
        sa.Column("screening_number", sa.String(64), nullable=False),
        sa.Column("site", sa.String(32), nullable=False),
        sa.Column("version", _ID, nullable=False),
        sa.Column("fact", sa.String(64), nullable=False),
        sa.Column("field", sa.String(64)),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("cause", sa.String(128)),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("raised_by", sa.String(128), nullable=False),
        sa.Column("raised_at", sa.String(40), nullable=False),
        sa.Column("last_act", sa.String(16), nullable=False),
        sa.Column("last_by", sa.String(128), nullable=False),
        sa.Column("last_text", sa.Text, nullable=False),
        sa.Column("last_at", sa.String(40), nullable=False),
        sa.Column("acts", sa.Integer, nullable=False),
        sa.Column("position", _ID, nullable=False),
    )
    op.create_index("review_queries_subject", "review_queries", ["study", "subject"])
    op.create_index("review_queries_status", "review_queries", ["study", "status"])


def _create_sdv_marks() -> None:
    op.create_table(
        "sdv_marks",
        sa.Column("subject", sa.String(36), primary_key=True),
        sa.Column("version", _ID, primary_key=True),
        sa.Column("field", sa.String(64), primary_key=True),
        sa.Column("study", sa.String(36), nullable=False),
        sa.Column("subject_version", _ID, nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("verified_by", sa.String(128), nullable=False),
        sa.Column("verified_at", sa.String(40), nullable=False),
        sa.Column("position", _ID, nullable=False),
    )


def _create_sdv_facts() -> None:
    op.create_table(
        "sdv_facts",
        sa.Column("subject", sa.String(36), primary_key=True),
        sa.Column("version", _ID, primary_key=True),
        sa.Column("study", sa.String(36), nullable=False),
        sa.Column("site", sa.String(32), nullable=False),
        sa.Column("screening_number", sa.String(64), nullable=False),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("visit", sa.String(16)),
        sa.Column("last_changed", sa.Text, nullable=False),
    )
    op.create_index("sdv_facts_site", "sdv_facts", ["study", "site"])


def downgrade() -> None:
    op.drop_index("sdv_facts_site", "sdv_facts")
    op.drop_table("sdv_facts")
    op.drop_table("sdv_marks")
    op.drop_index("review_queries_status", "review_queries")
    op.drop_index("review_queries_subject", "review_queries")
    op.drop_table("review_queries")
