"""Read-model tables. Alembic revisions in `migrations/` create them; `target_metadata()` lists them."""

from __future__ import annotations

from sqlalchemy import DDL, BigInteger, Column, Index, Integer, MetaData, String, Table, Text, event

metadata = MetaData()
_ID = BigInteger().with_variant(Integer(), "sqlite")

# Where each projection has got to, written in the same transaction as its rows.
projection_tracking = Table(
    "projection_tracking",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("position", _ID, nullable=False),
    Column("updated_at", String(40), nullable=False),
    # JSON {position, stream, version, detail} of the event that stopped the projection (broken chain, bad
    # signature); null while it runs. A rebuild that halted is not started again by read commands: they say why.
    Column("halted", Text),
)

# Streams a projection stopped following: a signed event the domain cannot load (e.g. a lab value that is not a
# number, stored before append refused it). The stream's rows stay as of the version before; every other stream
# is projected on.
halted_streams = Table(
    "halted_streams",
    metadata,
    Column("projection", String(64), primary_key=True),
    Column("stream", String(36), primary_key=True),
    Column("study", String(36), nullable=False),
    Column("subject", String(64)),  # the subject's screening number, when known
    Column("version", _ID, nullable=False),
    Column("position", _ID, nullable=False),
    Column("detail", Text, nullable=False),
)

# The audit trail is stored one row per event (who, when, why, which record) with that event's field changes
# as a JSON array of [field, old value, new value]; the `audit_trail` view unnests it into what an auditor reads,
# one row per recorded change of a field. (A row per field cost ten rows per lab result and most of a rebuild.)
# `record_id` names the form instance changed (the event that first recorded it), so a correction's old value
# is the record's latest value.
audit_events = Table(
    "audit_events",
    metadata,
    Column("position", _ID, primary_key=True, autoincrement=False),
    Column("event_id", String(64), nullable=False),  # "<stream>:<version>" of the event that made the changes
    Column("record_id", String(64), nullable=False),  # "<stream>:<version>" of the form instance changed
    Column("study", String(36), nullable=False),
    Column("stream", String(36), nullable=False),
    Column("subject", String(64)),  # the subject's screening number when the stream is a subject
    Column("aggregate", String(64), nullable=False),
    Column("event_type", String(128), nullable=False),
    Column("visit", String(16)),
    Column("form", String(128), nullable=False),
    Column("change", String(16), nullable=False),  # recorded | corrected | voided
    Column("changes", Text, nullable=False),  # JSON [[field, old, new], ...]: values as text, null when absent
    Column("actor", String(128), nullable=False),
    Column("printed_name", String(256)),
    Column("role", String(32), nullable=False),
    Column("key", String(32), nullable=False),
    Column("occurred_at", String(40), nullable=False),
    Column("recorded_at", String(40), nullable=False),
    Column("reason", Text),
    Column("signature_status", String(32), nullable=False),
    Index("audit_events_record", "record_id", "position"),
    Index("audit_events_stream", "stream", "position"),
    Index("audit_events_subject", "subject", "position"),
    Index("audit_events_actor", "actor", "recorded_at"),
    Index("audit_events_recorded", "recorded_at"),
    Index("audit_events_type", "event_type"),
)

_EVENT_COLUMNS = (
    "position",
    "event_id",
    "record_id",
    "study",
    "stream",
    "subject",
    "aggregate",
    "event_type",
    "visit",
    "form",
    "change",
    "actor",
    "printed_name",
    "role",
    "key",
    "occurred_at",
    "recorded_at",
    "reason",
    "signature_status",
)
# The view's SQL per engine (the migration creates the same): one row per element of `changes`, `seq` from 0.
_UNNEST = {
    "sqlite": (
        "CAST(c.key AS INTEGER)",
        "json_extract(c.value, '$[0]')",
        "json_extract(c.value, '$[1]')",
        "json_extract(c.value, '$[2]')",
        "audit_events AS e, json_each(e.changes) AS c",
    ),
    "postgresql": (
        "c.seq - 1",
        "c.item ->> 0",
        "c.item ->> 1",
        "c.item ->> 2",
        "audit_events AS e CROSS JOIN LATERAL json_array_elements(e.changes::json) WITH ORDINALITY AS c(item, seq)",
    ),
}


def audit_trail_view_sql(dialect: str) -> str:
    seq, field, old, new, source = _UNNEST[dialect]
    columns = ", ".join(f"e.{c}" for c in _EVENT_COLUMNS)
    return (
        f"CREATE VIEW audit_trail AS SELECT {columns}, {seq} AS seq, {field} AS field, {old} AS old_value, "
        f"{new} AS new_value FROM {source}"
    )


for _dialect in _UNNEST:
    event.listen(audit_events, "after_create", DDL(audit_trail_view_sql(_dialect)).execute_if(dialect=_dialect))
    event.listen(audit_events, "before_drop", DDL("DROP VIEW IF EXISTS audit_trail").execute_if(dialect=_dialect))

# The view as SQLAlchemy sees it, for queries (kept out of `metadata`: it is not a table to create or compare).
audit_trail = Table(
    "audit_trail",
    MetaData(),
    *(Column(c.name, c.type) for c in audit_events.c if c.name != "changes"),
    Column("seq", Integer),
    Column("field", String(128)),
    Column("old_value", Text),
    Column("new_value", Text),
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

# One row per subject: where they stand now (PROTOCOL §3–§8). Rebuilt rows come out identical.
patient_state = Table(
    "patient_state",
    metadata,
    Column("subject", String(36), primary_key=True),
    Column("study", String(36), nullable=False),
    Column("site", String(32), nullable=False),
    Column("screening_number", String(64), nullable=False),
    Column("status", String(32), nullable=False),
    Column("epoch", String(32), nullable=False),
    Column("consent_version", String(32)),
    Column("eligible_at", String(40)),
    Column("enrolled_at", String(40)),
    Column("cyc_started_at", String(40)),
    Column("cyc_administered_mg", String(32)),
    Column("msc_started_at", String(40)),
    Column("msc_lot", String(64)),
    Column("msc_dose_1e6_per_kg", String(32)),
    Column("tx_date", String(10)),
    Column("next_visit", String(16)),
    Column("next_visit_target", String(10)),
    Column("next_visit_earliest", String(10)),
    Column("next_visit_latest", String(10)),
    Column("sledai_total", Integer),
    Column("renal_response", String(32)),
    Column("open_adverse_events", Integer, nullable=False),
    Column("open_serious_adverse_events", Integer, nullable=False),
    Column("deviations", Integer, nullable=False),
    Column("corrections", Integer, nullable=False),
    Column("flags", Text, nullable=False),  # JSON list
    Column("key_labs", Text, nullable=False),  # JSON: code -> latest value, unit, when, flag, previous, trend
    # JSON list: derived results and renal-response assessments computed from a result corrected or voided since
    Column("stale_results", Text, nullable=False, server_default="[]"),
    Column("version", _ID, nullable=False),
    Column("position", _ID, nullable=False),
    Index("patient_state_screening", "study", "screening_number"),
    Index("patient_state_status", "study", "status"),
)

# The study dashboard's grain: one row per subject visit and per adverse event; the dashboard is GROUP BYs.
subject_visits = Table(
    "subject_visits",
    metadata,
    Column("subject", String(36), primary_key=True),
    Column("visit", String(16), primary_key=True),
    Column("study", String(36), nullable=False),
    Column("site", String(32), nullable=False),
    Column("outcome", String(16), nullable=False),  # done | out_of_window | missed
    Column("labs_expected", Integer, nullable=False),
    Column("labs_present", Integer, nullable=False),
)

subject_adverse_events = Table(
    "subject_adverse_events",
    metadata,
    Column("subject", String(36), primary_key=True),
    Column("ae_id", String(64), primary_key=True),
    Column("study", String(36), nullable=False),
    Column("site", String(32), nullable=False),
    Column("grade", Integer),
    Column("serious", Integer, nullable=False),
    Column("open", Integer, nullable=False),
)

# Casebook review (projections/casebook.py): investigators' sign-offs, and freezes, locks and unlocks.
# One row per sign-off; never deleted: a later change or an unlock marks it invalidated, naming the event.
casebook_signoffs = Table(
    "casebook_signoffs",
    metadata,
    Column("signoff_id", String(64), primary_key=True),  # "<casebook stream>:<version>"
    Column("study", String(36), nullable=False),
    Column("subject", String(36), nullable=False),
    Column("screening_number", String(64)),
    Column("site", String(32)),
    Column("scope", String(16), nullable=False),  # casebook | visit
    Column("visit", String(16)),
    Column("meaning", String(32), nullable=False),  # review | approval | responsibility
    Column("signature_def", String(32), nullable=False),  # the SignatureDef OID (SD.INV.REVIEW ...)
    Column("actor", String(128), nullable=False),
    Column("printed_name", String(256), nullable=False),
    Column("role", String(32), nullable=False),
    Column("key", String(32), nullable=False),
    Column("signed_at", String(40), nullable=False),  # with the site's offset, as signed
    Column("recorded_at", String(40), nullable=False),
    Column("content_hash", String(64), nullable=False),
    Column("hash_method", String(64), nullable=False),
    Column("covers", Text, nullable=False),  # JSON [{stream, through_version, versions}]
    Column("through_version", _ID, nullable=False),
    Column("status", String(16), nullable=False),  # valid | invalidated
    Column("invalidated_by", String(64)),  # event id of the change or unlock
    Column("invalidated_reason", Text),
    Column("invalidated_at", String(40)),
    Column("position", _ID, nullable=False),
    Index("casebook_signoffs_subject", "subject", "position"),
)

# One row per subject: lock levels, sign-off status, flags (safety facts recorded on locked data).
casebook_state = Table(
    "casebook_state",
    metadata,
    Column("subject", String(36), primary_key=True),
    Column("study", String(36), nullable=False),
    Column("site", String(32), nullable=False),
    Column("screening_number", String(64), nullable=False),
    Column("subject_version", _ID, nullable=False),
    Column("lock_level", String(16)),  # the subject's own: null | frozen | locked
    Column("study_lock_level", String(16)),  # the whole study's
    Column(
        "signoff_status", String(32), nullable=False
    ),  # not signed | signed | new data since sign-off | needs re-signing
    Column("last_signoff", String(64)),
    Column("signed_through_version", _ID),
    Column("signed_by", String(256)),
    Column("signed_at", String(40)),
    Column("visit_days", Text, nullable=False),  # JSON visit -> [dates]: which facts belong to a signed visit
    Column("flags", Text, nullable=False),  # JSON list
    Column("position", _ID, nullable=False),
    Index("casebook_state_screening", "study", "screening_number"),
)

# Every freeze, lock and unlock (subject null: the whole study), with its reason.
casebook_locks = Table(
    "casebook_locks",
    metadata,
    Column("event_id", String(64), primary_key=True),
    Column("study", String(36), nullable=False),
    Column("subject", String(36)),
    Column("screening_number", String(64)),
    Column("action", String(16), nullable=False),  # frozen | locked | unlocked
    Column("reason", Text),
    Column("actor", String(128), nullable=False),
    Column("role", String(32), nullable=False),
    Column("at", String(40), nullable=False),
    Column("recorded_at", String(40), nullable=False),
    Column("position", _ID, nullable=False),
    Index("casebook_locks_study", "study", "position"),
)

# Source data verification and queries (projections/review.py). Each table is fed by one kind of stream, so a
# parallel rebuild (streams in ranges) gives the same rows: queries and SDV marks by their own streams (which
# carry the subject's screening number and site), the facts to verify by the subject's stream.
review_queries = Table(
    "review_queries",
    metadata,
    Column("query_id", String(36), primary_key=True),
    Column("study", String(36), nullable=False),
    Column("subject", String(36), nullable=False),  # the subject's stream
    Column("screening_number", String(64), nullable=False),
    Column("site", String(32), nullable=False),
    Column("version", _ID, nullable=False),  # the fact queried: its version on the subject's stream
    Column("fact", String(64), nullable=False),  # its type (LabResultRecorded)
    Column("field", String(64)),
    Column("text", Text, nullable=False),
    Column(
        "cause", String(128)
    ),  # automatic queries: stale/v12, flag/v30/VISIT_OUT_OF_WINDOW; null if raised by a person
    Column("status", String(16), nullable=False),  # OPEN | ANSWERED | CLOSED
    Column("raised_by", String(128), nullable=False),
    Column("raised_at", String(40), nullable=False),  # occurred-at, UTC
    Column("last_act", String(16), nullable=False),  # raised | answered | closed | reopened
    Column("last_by", String(128), nullable=False),
    Column("last_text", Text, nullable=False),
    Column("last_at", String(40), nullable=False),
    Column("acts", Integer, nullable=False),
    Column("position", _ID, nullable=False),
    Index("review_queries_subject", "study", "subject"),
    Index("review_queries_status", "study", "status"),
)

# The latest SDV mark of each fact (field "" = the whole fact) of a subject.
sdv_marks = Table(
    "sdv_marks",
    metadata,
    Column("subject", String(36), primary_key=True),
    Column("version", _ID, primary_key=True),
    Column("field", String(64), primary_key=True),
    Column("study", String(36), nullable=False),
    Column("subject_version", _ID, nullable=False),  # the subject's version when verified
    Column("hash", String(64), nullable=False),
    Column("verified_by", String(128), nullable=False),
    Column("verified_at", String(40), nullable=False),
    Column("position", _ID, nullable=False),
)

# Every source-data fact of every subject (not voided; not a correction, void or computed result) and when each
# of its fields was last changed by a correction: with sdv_marks, the SDV status (domain.review.fact_status).
sdv_facts = Table(
    "sdv_facts",
    metadata,
    Column("subject", String(36), primary_key=True),
    Column("version", _ID, primary_key=True),
    Column("study", String(36), nullable=False),
    Column("site", String(32), nullable=False),
    Column("screening_number", String(64), nullable=False),
    Column("type", String(64), nullable=False),
    Column("visit", String(16)),
    Column("last_changed", Text, nullable=False),  # JSON {field: version of the correction that last changed it}
    Index("sdv_facts_site", "study", "site"),
)
