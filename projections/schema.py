"""Read-model tables. Alembic revisions in `migrations/` create them; `target_metadata()` lists them."""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Index, Integer, MetaData, String, Table, Text

metadata = MetaData()
_ID = BigInteger().with_variant(Integer(), "sqlite")

# Where each projection has got to, written in the same transaction as its rows.
projection_tracking = Table(
    "projection_tracking",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("position", _ID, nullable=False),
    Column("updated_at", String(40), nullable=False),
)

# One row per recorded change of a field: what an auditor reads. `record_id` names the form instance the field
# belongs to (the event that first recorded it), so a correction's old value is the record's latest value.
audit_trail = Table(
    "audit_trail",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("position", _ID, nullable=False),
    Column("event_id", String(64), nullable=False),  # "<stream>:<version>" of the event that made this change
    Column("record_id", String(64), nullable=False),  # "<stream>:<version>" of the form instance changed
    Column("study", String(36), nullable=False),
    Column("stream", String(36), nullable=False),
    Column("subject", String(64)),  # the subject's screening number when the stream is a subject
    Column("aggregate", String(64), nullable=False),
    Column("event_type", String(128), nullable=False),
    Column("visit", String(16)),
    Column("form", String(128), nullable=False),
    Column("field", String(128), nullable=False),
    Column("change", String(16), nullable=False),  # recorded | corrected | voided
    Column("old_value", Text),
    Column("new_value", Text),
    Column("actor", String(128), nullable=False),
    Column("printed_name", String(256)),
    Column("role", String(32), nullable=False),
    Column("key", String(32), nullable=False),
    Column("occurred_at", String(40), nullable=False),
    Column("recorded_at", String(40), nullable=False),
    Column("reason", Text),
    Column("signature_status", String(32), nullable=False),
    Index("audit_trail_stream", "stream", "position"),
    Index("audit_trail_record", "record_id", "field", "position"),
    Index("audit_trail_actor", "actor", "recorded_at"),
    Index("audit_trail_recorded", "recorded_at"),
    Index("audit_trail_type", "event_type"),
)

# Each full verification (`sle verify`) and what it found, so the audit trail can show the last result.
verification_runs = Table(
    "verification_runs",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("run_at", String(40), nullable=False),
    Column("ok", Integer, nullable=False),
    Column("events", _ID, nullable=False),
    Column("findings", _ID, nullable=False),
)

verification_findings = Table(
    "verification_findings",
    metadata,
    Column("run_id", _ID, primary_key=True),
    Column("seq", Integer, primary_key=True),
    Column("position", _ID),
    Column("stream", String(36)),
    Column("version", _ID),
    Column("kind", String(64), nullable=False),
    Column("detail", Text, nullable=False),
    Index("verification_findings_position", "position"),
)
