"""The audit trail: one row per recorded change of a field, with who, when (both times), why and the old value.

A new fact records each of its fields (old value empty: nothing was there). A correction names the event it
corrects (`corrected_version` on the same stream) and the new values (`new_values`); a void names
`voided_version`.
For those the old value is the corrected record's latest value of that field, read from this table.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any, Sequence

from sqlalchemy import Connection, select

from projections.base import Fact, Projection, bulk_insert
from projections.schema import audit_trail, verification_findings, verification_runs

SIGNATURE_VERIFIED_AT_APPEND = "verified_at_append"
COLUMNS = ("position", "event_id", "record_id", "study", "stream", "subject", "aggregate", "event_type", "visit",
           "form", "field", "change", "old_value", "new_value", "actor", "printed_name", "role", "key",
           "occurred_at", "recorded_at", "reason", "signature_status")  # fmt: skip


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class AuditTrail(Projection):
    name = "audit_trail"
    tables = (audit_trail,)
    # Indexes for readers only: dropped during a rebuild and made again at the end (the record index stays:
    # corrections look up old values through it).
    reader_indexes = ("audit_trail_stream", "audit_trail_actor", "audit_trail_recorded", "audit_trail_type")

    def __init__(self) -> None:
        self.subjects: dict[str, str | None] = {}  # stream -> screening number (None: not a subject)
        self.printed_names: dict[str, str] = {}  # actor -> printed name, from the key registry

    def forget(self) -> None:
        self.subjects.clear()
        self.printed_names.clear()

    def apply(self, conn: Connection, facts: Sequence[Fact]) -> None:
        rows: list[tuple[Any, ...]] = []
        latest: dict[tuple[str, str], str | None] = {}  # (record_id, field) -> value, within this batch
        forms: dict[str, str] = {}  # record_id -> form, within this batch (not yet in the table)
        for fact in facts:
            env, payload, type_name, stream = fact.envelope, fact.payload, fact.type_name, fact.stream
            event_id = f"{stream}:{env['version']}"
            if type_name == "Subject.Screened":
                self.subjects[stream] = payload.get("screening_number")
            if type_name in ("Study.KeyRegistered", "Study.Created"):
                actor = payload.get("actor") or payload.get("admin_actor")
                name = payload.get("printed_name") or payload.get("admin_printed_name")
                if actor and name:
                    self.printed_names[actor] = name
            # Columns in COLUMNS order, around (record_id, form, field, change, old_value, new_value).
            head = (fact.position, event_id)
            middle = (env["study"], stream, self._subject(conn, stream), type_name.split(".", 1)[0], type_name,
                      _text(payload.get("visit")))  # fmt: skip
            tail = (env["actor"], self.printed_names.get(env["actor"], env["actor"]), env["role"], env["key"],
                    env["occurred_at"], env["recorded_at"], env["reason"], SIGNATURE_VERIFIED_AT_APPEND)  # fmt: skip
            if isinstance(payload.get("corrected_version"), int):
                record_id = f"{stream}:{payload['corrected_version']}"
                form = forms.get(record_id) or self._form(conn, record_id, fact)
                for name, value in sorted((payload.get("new_values") or {}).items()):
                    old, new = self._current(conn, latest, record_id, name), _text(value)
                    rows.append((*head, record_id, *middle, form, name, "corrected", old, new, *tail))
                    latest[(record_id, name)] = new
            elif isinstance(payload.get("voided_version"), int):
                record_id = f"{stream}:{payload['voided_version']}"
                form = forms.get(record_id) or self._form(conn, record_id, fact)
                names = set(self._fields(conn, record_id)) | {n for r, n in latest if r == record_id}
                for name in sorted(names):
                    old = self._current(conn, latest, record_id, name)
                    rows.append((*head, record_id, *middle, form, name, "voided", old, None, *tail))
                    latest[(record_id, name)] = None
            else:
                forms[event_id] = type_name
                for name, value in sorted(payload.items()):
                    # Nothing entered, nothing to audit; and the library's own bookkeeping is not a field.
                    if value is None or name.startswith("originator_"):
                        continue
                    new = _text(value)
                    rows.append((*head, event_id, *middle, type_name, name, "recorded", None, new, *tail))
                    latest[(event_id, name)] = new
        bulk_insert(conn, audit_trail, COLUMNS, rows)

    def _subject(self, conn: Connection, stream: str) -> str | None:
        if stream not in self.subjects:
            # A subject's stream starts with Subject.Screened, so a stream without one is not a subject's.
            self.subjects[stream] = conn.execute(
                select(audit_trail.c.subject).where(audit_trail.c.stream == stream, audit_trail.c.subject.is_not(None))
                .limit(1)
            ).scalar()  # fmt: skip
        return self.subjects[stream]

    def _current(self, conn: Connection, latest: dict[tuple[str, str], str | None], record_id: str, name: str) -> str | None:
        if (record_id, name) in latest:
            return latest[(record_id, name)]
        t = audit_trail
        return conn.execute(
            select(t.c.new_value).where(t.c.record_id == record_id, t.c.field == name)
            .order_by(t.c.position.desc(), t.c.id.desc()).limit(1)
        ).scalar()  # fmt: skip

    def _fields(self, conn: Connection, record_id: str) -> list[str]:
        t = audit_trail
        return sorted(set(conn.execute(select(t.c.field).where(t.c.record_id == record_id)).scalars()))

    def _form(self, conn: Connection, record_id: str, fact: Fact) -> str:
        t = audit_trail
        form = conn.execute(select(t.c.form).where(t.c.record_id == record_id).limit(1)).scalar()
        return form or fact.type_name


def query(conn: Connection, *, subject: str | None = None, stream: str | None = None, actor: str | None = None,
          event_type: str | None = None, since: str | None = None, until: str | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Audit-trail rows filtered by subject (screening number), stream, user, recorded-time range, event type."""
    t = audit_trail
    q = select(t).order_by(t.c.position, t.c.id)
    if subject:
        q = q.where(t.c.subject == subject)
    if stream:
        q = q.where(t.c.stream == stream)
    if actor:
        q = q.where(t.c.actor == actor)
    if event_type:
        q = q.where(t.c.event_type == event_type)
    if since:
        q = q.where(t.c.recorded_at >= since)
    if until:
        q = q.where(t.c.recorded_at <= until)
    rows = [dict(r._mapping) for r in conn.execute(q)]
    last = last_verification(conn)
    for row in rows:
        if last is None:
            row["last_verification"] = "never run"
        else:
            kinds = last["findings_by_position"].get(row["position"])
            row["last_verification"] = f"{'FAILED ' + ','.join(kinds) if kinds else 'ok'} at {last['run_at']}"
    return rows


def last_verification(conn: Connection) -> dict[str, Any] | None:
    """The latest full verification's time and findings by log position."""
    run = conn.execute(select(verification_runs).order_by(verification_runs.c.id.desc()).limit(1)).first()
    if run is None:
        return None
    f = verification_findings
    by_position: dict[int, list[str]] = {}
    for position, kind in conn.execute(select(f.c.position, f.c.kind).where(f.c.run_id == run.id)):
        by_position.setdefault(position, []).append(kind)
    return {"run_at": run.run_at, "ok": bool(run.ok), "findings_by_position": by_position}


def save_verification(conn: Connection, report: Any) -> int:
    """Keep a full verification's result (`sle verify`), so the audit trail can show it per event."""
    run_at = datetime.now(timezone.utc).isoformat()
    run_id = conn.execute(verification_runs.insert().values(
        run_at=run_at, ok=int(report.ok), events=report.events, findings=len(report.findings)
    )).inserted_primary_key[0]  # fmt: skip
    if report.findings:
        conn.execute(verification_findings.insert(), [
            {"run_id": run_id, "seq": i, "position": f.position, "stream": f.stream, "version": f.version,
             "kind": f.kind, "detail": f.detail} for i, f in enumerate(report.findings)
        ])  # fmt: skip
    return run_id
