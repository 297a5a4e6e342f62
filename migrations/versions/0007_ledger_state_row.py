"""The ledger's state row for an empty ledger, as `Ledger.create` makes it: 0004 made the tables without it,
so `sle verify` on a database upgraded before its first integration read the missing row as emptied tables.
Only where the ledger holds nothing at all (no leaves, no checkpoints).

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-25
"""

import hashlib
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    conn = op.get_bind()
    empty = all(
        conn.execute(sa.text(f"select count(*) from {t}")).scalar() == 0
        for t in ("ledger_state", "ledger_leaves", "ledger_checkpoints")
    )
    if empty:
        state = sa.table(
            "ledger_state",
            sa.column("id"),
            sa.column("size"),
            sa.column("position"),
            sa.column("frontier", sa.LargeBinary),
            sa.column("root", sa.LargeBinary),
            sa.column("updated_at", sa.DateTime(timezone=True)),
        )
        op.bulk_insert(
            state,
            [
                {
                    "id": 1,
                    "size": 0,
                    "position": 0,
                    "frontier": b"",
                    "root": hashlib.sha256(b"").digest(),
                    "updated_at": datetime.now(UTC),
                }
            ],
        )


def downgrade() -> None:
    pass  # the row is what `Ledger.create` would make anyway
