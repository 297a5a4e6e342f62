"""The audit trail: every recorded change of a field, with who, when (both times), why and the old value.

Stored one row per event in `audit_events` (its changes as a JSON array of [field, old, new]) and read one row
per field through the `audit_trail` view. A new fact records each of its fields (old value empty: nothing was
there). A correction names the event it corrects (`corrected_version` on the same stream) and the new values
(`new_values`); a void names `voided_version`. For those the old value is the corrected record's latest value
of that field, folded from the record's earlier rows.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Table, func, select

from projections.base import Fact, Projection, bulk_insert
from projections.schema import audit_events, audit_trail, verification_findings, verification_runs
from sle_events.audit.record_check import build_registry_timelines
from sle_events.audit.results import check_result, result_document, run_tree

SIGNATURE_VERIFIED_AT_APPEND = "verified_at_append"
COLUMNS = (
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
    "changes",
    "actor",
    "printed_name",
    "role",
    "key",
    "occurred_at",
    "recorded_at",
    "reason",
    "signature_status",
)
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _utc(text: str) -> str:
    """An envelope time in UTC (the envelope keeps the site's offset; `recorded_at` is UTC already)."""
    return datetime.fromisoformat(text).astimezone(UTC).isoformat()


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class AuditTrail(Projection):
    name = "audit_trail"
    tables = (audit_events,)
    # Indexes for readers only: dropped during a rebuild and made again at the end (the record index stays:
    # corrections look up old values through it).
    reader_indexes = (
        "audit_events_stream",
        "audit_events_subject",
        "audit_events_actor",
        "audit_events_recorded",
        "audit_events_type",
    )

    def __init__(self) -> None:
        self.subjects: dict[str, str | None] = {}  # stream -> screening number (None: not a subject)
        # (study, key id) -> the printed name registered with that key (None: a service's, or registered before
        # printed names were), from the study registries as the verifier replays them; read again when a fact
        # lies beyond what they were read from. Not from the facts of a batch: a restarted worker, or one
        # rebuilding a range of subject streams, never sees the registry's events.
        self.printed_names: dict[tuple[str, str], str | None] = {}
        self._names_through = -1
        self._events: Table | None = None

    def bind(self, record: Any) -> None:
        self._events = record.table

    def forget(self) -> None:
        self.subjects.clear()
        self.printed_names.clear()
        self._names_through = -1

    def apply(self, conn: Connection, facts: Sequence[Fact]) -> None:
        rows: list[tuple[Any, ...]] = []
        # Within this batch (not yet in the table): record_id -> its form and its latest value of each field.
        forms: dict[str, str] = {}
        latest: dict[str, dict[str, str | None]] = {}
        for fact in facts:
            env, payload, type_name, stream = fact.envelope, fact.payload, fact.type_name, fact.stream
            event_id = f"{stream}:{env['version']}"
            # A subject's own stream, or an act on a subject on a stream of its own (a query, the SDV marks)
            if type_name in ("Subject.Screened", "Query.Raised", "SourceVerification.Opened", "Casebook.Opened"):
                self.subjects[stream] = payload.get("screening_number")
            if isinstance(payload.get("corrected_version"), int):
                record_id, change = f"{stream}:{payload['corrected_version']}", "corrected"
                values = self._values(conn, latest, forms, record_id, fact)
                changes = [
                    [name, values.get(name), _text(value)]
                    for name, value in sorted((payload.get("new_values") or {}).items())
                ]
            elif isinstance(payload.get("voided_version"), int):
                record_id, change = f"{stream}:{payload['voided_version']}", "voided"
                values = self._values(conn, latest, forms, record_id, fact)
                changes = [[name, old, None] for name, old in sorted(values.items())]
            else:
                record_id, change, values = event_id, "recorded", {}
                forms[record_id] = type_name
                # Nothing entered, nothing to audit; and the library's own bookkeeping is not a field.
                changes = [
                    [name, None, _text(value)]
                    for name, value in sorted(payload.items())
                    if value is not None and not name.startswith("originator_")
                ]
            values.update((name, new) for name, _, new in changes)
            latest[record_id] = values
            rows.append(
                (
                    fact.position,
                    event_id,
                    record_id,
                    env["study"],
                    stream,
                    self._subject(conn, stream),
                    type_name.split(".", 1)[0],
                    type_name,
                    _text(payload.get("visit")),
                    forms[record_id],
                    change,
                    _dumps(changes),
                    env["actor"],
                    self._printed_name(conn, fact),
                    env["role"],
                    env["key"],
                    _utc(env["occurred_at"]),
                    env["recorded_at"],
                    env["reason"],
                    SIGNATURE_VERIFIED_AT_APPEND,
                )
            )
        bulk_insert(conn, audit_events, COLUMNS, rows)

    def _printed_name(self, conn: Connection, fact: Fact) -> str:
        """The printed name registered with the key that signed `fact`, else the signer's actor id."""
        env = fact.envelope
        key = (env["study"], env["key"])
        if key not in self.printed_names and fact.position > self._names_through:
            self._read_printed_names(conn)
        return self.printed_names.get(key) or env["actor"]

    def _read_printed_names(self, conn: Connection) -> None:
        from sle_events.store.record import StudyRecord

        events = self._events if self._events is not None else StudyRecord.events_table()
        self._names_through = conn.execute(select(func.max(events.c.id))).scalar() or 0
        timelines, _ = build_registry_timelines(conn, events, [])  # what the registries' valid events say
        for study, (_, states) in timelines.items():
            for kid, entry in states[-1].keys.items():  # every key ever registered stays in the registry
                self.printed_names[(study, kid)] = entry.get("printed_name")

    def _subject(self, conn: Connection, stream: str) -> str | None:
        if stream not in self.subjects:
            # A subject's stream starts with Subject.Screened, so a stream without one is not a subject's.
            self.subjects[stream] = conn.execute(
                select(audit_events.c.subject)
                .where(audit_events.c.stream == stream, audit_events.c.subject.is_not(None))
                .limit(1)
            ).scalar()
        return self.subjects[stream]

    def _values(
        self,
        conn: Connection,
        latest: dict[str, dict[str, str | None]],
        forms: dict[str, str],
        record_id: str,
        fact: Fact,
    ) -> dict[str, str | None]:
        """The record's latest value of each field (a copy), folded from its stored rows unless this batch
        has them; and its form, noted in `forms`."""
        if record_id in latest:
            return dict(latest[record_id])
        values: dict[str, str | None] = {}
        t = audit_events
        rows = conn.execute(select(t.c.form, t.c.changes).where(t.c.record_id == record_id).order_by(t.c.position))
        for form, changes in rows:
            forms.setdefault(record_id, form)
            values.update((name, new) for name, _, new in json.loads(changes))
        forms.setdefault(record_id, fact.type_name)
        return values


CHANGES = ("recorded", "corrected", "voided")


def query(
    conn: Connection,
    *,
    subject: str | None = None,
    stream: str | None = None,
    actor: str | None = None,
    event_type: str | None = None,
    since: datetime | str | None = None,
    until: datetime | str | None = None,
    change: str | None = None,
) -> list[dict[str, Any]]:
    """Audit-trail rows filtered by subject (screening number), stream, user, recorded-time range (instants with
    an offset, compared as instants), event type and kind of change (recorded, corrected, voided)."""
    since, until = _instant(since, "since"), _instant(until, "until")
    if change is not None and change not in CHANGES:
        raise ValueError(f"unknown change {change!r}; one of {', '.join(CHANGES)}")
    t = audit_trail
    q = select(t).order_by(t.c.position, t.c.seq)
    if change:
        q = q.where(t.c.change == change)
    if subject:
        q = q.where(t.c.subject == subject)
    if stream:
        q = q.where(t.c.stream == stream)
    if actor:
        q = q.where(t.c.actor == actor)
    if event_type:
        q = q.where(t.c.event_type == event_type)
    # recorded_at is stored as UTC ISO 8601 text: narrow in SQL with a second's slack (the text's form may vary:
    # with or without microseconds), then compare the instants exactly.
    if since is not None:
        q = q.where(t.c.recorded_at >= _utc_text(since - timedelta(seconds=1)))
    if until is not None:
        q = q.where(t.c.recorded_at <= _utc_text(until + timedelta(seconds=1)))
    rows = [dict(r._mapping) for r in conn.execute(q)]
    if since is not None or until is not None:
        rows = [r for r in rows if (since is None or _when(r) >= since) and (until is None or _when(r) <= until)]
    last = last_verification(conn)
    for row in rows:
        if last is None:
            row["last_verification"] = "never run"
        else:
            kinds = last["findings_by_position"].get(row["position"])
            row["last_verification"] = f"{'FAILED ' + ','.join(kinds) if kinds else 'ok'} at {last['run_at']}"
            if last["unverifiable"]:  # a result nobody can vouch for is shown as such
                row["last_verification"] = (
                    f"UNVERIFIABLE ({last['unverifiable']}): stored as {row['last_verification']}"
                )
    return rows


def _instant(value: datetime | str | None, name: str) -> datetime | None:
    """A time bound as an instant: a datetime or ISO 8601 text, with its offset (a ValueError otherwise)."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)  # ValueError for anything that is not ISO 8601
    if value is not None and value.tzinfo is None:
        raise ValueError(f"{name} {value.isoformat()} has no UTC offset")
    return value


def _utc_text(when: datetime) -> str:
    return when.astimezone(UTC).isoformat()


def _when(row: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(row["recorded_at"])


def last_verification(conn: Connection) -> dict[str, Any] | None:
    """The latest full verification's time and findings by log position."""
    run = conn.execute(select(verification_runs).order_by(verification_runs.c.id.desc()).limit(1)).first()
    if run is None:
        return None
    f = verification_findings
    by_position: dict[int, list[str]] = {}
    stored = conn.execute(
        select(f.c.position, f.c.stream, f.c.version, f.c.kind, f.c.detail)
        .where(f.c.run_id == run.id)
        .order_by(f.c.seq)
    ).all()
    for row in stored:
        by_position.setdefault(row.position, []).append(row.kind)
    document = result_document(run.run_at, bool(run.ok), run.events, list(stored), run_tree(conn, run.id))
    why = check_result(conn, run.id, document)
    return {"run_at": run.run_at, "ok": bool(run.ok), "findings_by_position": by_position, "unverifiable": why}


def save_verification(conn: Connection, report: Any) -> int:
    """Keep a full verification's result (`sle verify`), so the audit trail can show it per event."""
    run_at = datetime.now(UTC).isoformat()
    inserted = conn.execute(
        verification_runs.insert().values(
            run_at=run_at, ok=int(report.ok), events=report.events, findings=len(report.findings)
        )
    ).inserted_primary_key
    assert inserted is not None  # an INSERT of one row always has its primary key
    run_id: int = inserted[0]
    if report.findings:
        conn.execute(
            verification_findings.insert(),
            [
                {
                    "run_id": run_id,
                    "seq": i,
                    "position": f.position,
                    "stream": f.stream,
                    "version": f.version,
                    "kind": f.kind,
                    "detail": f.detail,
                }
                for i, f in enumerate(report.findings)
            ],
        )
    return run_id
