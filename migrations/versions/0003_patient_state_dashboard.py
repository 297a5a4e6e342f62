"""Read models: patient state, and the dashboard's subject visits and adverse events.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _missing(name: str) -> bool:
    return not sa.inspect(op.get_bind()).has_table(name)


def upgrade() -> None:
    if _missing("patient_state"):
        op.create_table(
            "patient_state",
            sa.Column("subject", sa.String(36), primary_key=True),
            sa.Column("study", sa.String(36), nullable=False),
            sa.Column("site", sa.String(32), nullable=False),
            sa.Column("screening_number", sa.String(64), nullable=False),
            sa.Column("status", sa.String(32), nullable=False),
            sa.Column("epoch", sa.String(32), nullable=False),
            sa.Column("consent_version", sa.String(32)),
            sa.Column("eligible_at", sa.String(40)),
            sa.Column("enrolled_at", sa.String(40)),
            sa.Column("cyc_started_at", sa.String(40)),
            sa.Column("cyc_administered_mg", sa.String(32)),
            sa.Column("msc_started_at", sa.String(40)),
            sa.Column("msc_lot", sa.String(64)),
            sa.Column("msc_dose_1e6_per_kg", sa.String(32)),
            sa.Column("tx_date", sa.String(10)),
            sa.Column("next_visit", sa.String(16)),
            sa.Column("next_visit_target", sa.String(10)),
            sa.Column("next_visit_earliest", sa.String(10)),
            sa.Column("next_visit_latest", sa.String(10)),
            sa.Column("sledai_total", sa.Integer()),
            sa.Column("renal_response", sa.String(32)),
            sa.Column("open_adverse_events", sa.Integer(), nullable=False),
            sa.Column("open_serious_adverse_events", sa.Integer(), nullable=False),
            sa.Column("deviations", sa.Integer(), nullable=False),
            sa.Column("corrections", sa.Integer(), nullable=False),
            sa.Column("flags", sa.Text(), nullable=False),
            sa.Column("key_labs", sa.Text(), nullable=False),
            sa.Column("version", ID, nullable=False),
            sa.Column("position", ID, nullable=False),
        )
        op.create_index("patient_state_screening", "patient_state", ["study", "screening_number"])
        op.create_index("patient_state_status", "patient_state", ["study", "status"])
    if _missing("subject_visits"):
        op.create_table(
            "subject_visits",
            sa.Column("subject", sa.String(36), primary_key=True),
            sa.Column("visit", sa.String(16), primary_key=True),
            sa.Column("study", sa.String(36), nullable=False),
            sa.Column("site", sa.String(32), nullable=False),
            sa.Column("outcome", sa.String(16), nullable=False),
            sa.Column("labs_expected", sa.Integer(), nullable=False),
            sa.Column("labs_present", sa.Integer(), nullable=False),
        )
    if _missing("subject_adverse_events"):
        op.create_table(
            "subject_adverse_events",
            sa.Column("subject", sa.String(36), primary_key=True),
            sa.Column("ae_id", sa.String(64), primary_key=True),
            sa.Column("study", sa.String(36), nullable=False),
            sa.Column("site", sa.String(32), nullable=False),
            sa.Column("grade", sa.Integer()),
            sa.Column("serious", sa.Integer(), nullable=False),
            sa.Column("open", sa.Integer(), nullable=False),
        )


def downgrade() -> None:
    for name in ("subject_adverse_events", "subject_visits", "patient_state"):
        op.drop_table(name)
