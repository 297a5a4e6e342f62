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

from projections.base import Fact, Projection
from projections.schema import audit_trail, verification_findings, verification_runs

SIGNATURE_VERIFIED_AT_APPEND = "verified_at_append"


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class AuditTrail(Projection):
    name = "audit_trail"
    tables = (audit_trail,)

    def __init__(self) -> None:
        self.subjects: dict[str, str] = {}  # stream -> screening number
        self.printed_names: dict[str, str] = {}  # actor -> printed name, from the key registry

    def forget(self) -> None:
        self.subjects.clear()
        self.printed_names.clear()

    def apply(self, conn: Connection, facts: Sequence[Fact]) -> None:
        rows: list[dict[str, Any]] = []
        latest: dict[tuple[str, str], str | None] = {}  # (record_id, field) -> value, within this batch
        for fact in facts:
            env, payload = fact.envelope, fact.payload
            aggregate = fact.type_name.split(".", 1)[0]
            if fact.type_name == "Subject.Screened":
                self.subjects[fact.stream] = payload.get("screening_number")
            if fact.type_name in ("Study.KeyRegistered", "Study.Created"):
                actor = payload.get("actor") or payload.get("admin_actor")
                name = payload.get("printed_name") or payload.get("admin_printed_name")
                if actor and name:
                    self.printed_names[actor] = name
            base = {
                "position": fact.position, "event_id": fact.event_id, "study": env["study"], "stream": fact.stream,
                "subject": self._subject(conn, fact.stream), "aggregate": aggregate, "event_type": fact.type_name,
                "visit": _text(payload.get("visit")), "actor": env["actor"],
                "printed_name": self.printed_names.get(env["actor"], env["actor"]), "role": env["role"],
                "key": env["key"], "occurred_at": env["occurred_at"], "recorded_at": env["recorded_at"],
                "reason": env["reason"], "signature_status": SIGNATURE_VERIFIED_AT_APPEND,
            }  # fmt: skip
            if isinstance(payload.get("corrected_version"), int):
                record_id = f"{fact.stream}:{payload['corrected_version']}"
                changes = payload.get("new_values") or {}
                for name, value in sorted(changes.items()):
                    old = self._current(conn, latest, record_id, name)
                    new = _text(value)
                    rows.append(dict(base, record_id=record_id, form=self._form(conn, record_id, fact), field=name,
                                     change="corrected", old_value=old, new_value=new))  # fmt: skip
                    latest[(record_id, name)] = new
            elif isinstance(payload.get("voided_version"), int):
                record_id = f"{fact.stream}:{payload['voided_version']}"
                for name in self._fields(conn, record_id):
                    old = self._current(conn, latest, record_id, name)
                    rows.append(dict(base, record_id=record_id, form=self._form(conn, record_id, fact), field=name,
                                     change="voided", old_value=old, new_value=None))  # fmt: skip
                    latest[(record_id, name)] = None
            else:
                for name, value in sorted(payload.items()):
                    if name.startswith("originator_"):  # the library's bookkeeping, not a recorded field
                        continue
                    new = _text(value)
                    rows.append(dict(base, record_id=fact.event_id, form=fact.type_name, field=name,
                                     change="recorded", old_value=None, new_value=new))  # fmt: skip
                    latest[(fact.event_id, name)] = new
        if rows:
            conn.execute(audit_trail.insert(), rows)

    def _subject(self, conn: Connection, stream: str) -> str | None:
        if stream not in self.subjects:
            found = conn.execute(
                select(audit_trail.c.subject).where(audit_trail.c.stream == stream, audit_trail.c.subject.is_not(None))
                .limit(1)
            ).scalar()  # fmt: skip
            if found is None:
                return None
            self.subjects[stream] = found
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
