"""The web view's own tables: open sign-in sessions and the sign-in nonces already used (revision 0015).

Nothing else is ever written by the web view. A session is stored by the SHA-256 of its cookie value, so a
copy of the table does not let anyone sign in; a nonce row makes a sign-in link usable once, across workers.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

web_sessions = sa.Table(
    "web_sessions",
    metadata,
    sa.Column("id_hash", sa.String(64), primary_key=True),  # SHA-256 hex of the cookie value
    sa.Column("study", sa.String(64), nullable=False),
    sa.Column("key", sa.String(64), nullable=False),
    sa.Column("actor", sa.Text, nullable=False),
    sa.Column("role", sa.Text, nullable=False),
    sa.Column("printed_name", sa.Text, nullable=True),
    sa.Column("opened_at", sa.Text, nullable=False),  # UTC ISO 8601
    sa.Column("expires_at", sa.Text, nullable=False),
)

web_signin_nonces = sa.Table(
    "web_signin_nonces",
    metadata,
    sa.Column("nonce", sa.String(32), primary_key=True),
    sa.Column("key", sa.String(64), nullable=False),
    sa.Column("expires_at", sa.Text, nullable=False),  # the token's: the row may go once the token is dead
)
