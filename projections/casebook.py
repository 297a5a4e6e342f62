"""Casebook review: investigators' sign-offs (valid, or invalidated by change), and what is frozen or locked.

Three tables, for the CLI, the ODM export and the API alike:

* ``casebook_signoffs``: one row per sign-off (`Casebook.SignedOff`): the manifestation (printed name, signed
  at with its offset, meaning and SignatureDef OID, signer id, role and key), what it covers and its content
  hash, and ``status`` ``valid`` or ``invalidated`` with ``invalidated_by`` (the event that did it: a correction
  or void of a covered fact, a new fact of a signed visit, or an unlock) and ``invalidated_reason``. A sign-off
  is never deleted.
* ``casebook_state``: one row per subject: its own lock level and the study's, ``signoff_status`` (``not
  signed``, ``signed``, ``new data since sign-off``, ``needs re-signing``), the latest valid casebook sign-off,
  and ``flags`` (JSON: safety facts recorded while frozen or locked).
* ``casebook_locks``: every freeze, lock and unlock (``subject`` null: the whole study), with its reason.

A sign-off depends on two streams (the subject's and its casebook's), so this projection reads the log in order
and is rebuilt in one pass, not split by stream ranges (`partitionable = False`); it only reads payloads, never
folds an aggregate. Its in-memory state is a cache of its tables, dropped when another worker moved it on.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, delete, select, update

from projections.base import Fact, Projection
from projections.schema import casebook_locks, casebook_signoffs, casebook_state, projection_tracking
from sle_events.domain.casebook import CHANGE_FACTS, SAFETY_FACTS, VISIT_NEAR_DAYS, stricter

__all__ = ["CasebookReview", "casebook_dashboard", "casebook_rows", "lock_rows", "pending_signoffs", "signoff_rows"]

REBUILDING = -1
NOT_SIGNED, SIGNED, NEW_DATA, NEEDS_RESIGNING = "not signed", "signed", "new data since sign-off", "needs re-signing"


def _day(text: str) -> date:
    return datetime.fromisoformat(text).astimezone(UTC).date()


@dataclass
class _Subject:
    study: str
    site: str | None = None
    screening_number: str | None = None
    version: int = 0
    level: str | None = None
    visit_days: dict[str, list[str]] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)
    position: int = 0


class CasebookReview(Projection):
    name = "casebook"
    tables = (casebook_signoffs, casebook_state, casebook_locks)
    partitionable = False

    def __init__(self) -> None:
        self.forget()

    def forget(self) -> None:
        self.subjects: dict[str, _Subject] = {}
        self.valid: dict[str, dict[str, dict[str, Any]]] = {}  # subject -> sign-off id -> row (valid ones)
        self.study_levels: dict[str, str | None] = {}
        self._through: int | None = None

    # --- caches, loaded from the tables when a subject is first met --------------------------------------------
    def _subject(self, conn: Connection, subject: str, study: str) -> _Subject:
        s = self.subjects.get(subject)
        if s is None:
            row = conn.execute(select(casebook_state).where(casebook_state.c.subject == subject)).first()
            if row is None:
                s = _Subject(study)
            else:
                s = _Subject(
                    row.study,
                    row.site,
                    row.screening_number,
                    row.subject_version,
                    row.lock_level,
                    json.loads(row.visit_days),
                    json.loads(row.flags),
                    row.position,
                )
            self.subjects[subject] = s
            self.valid[subject] = {
                r.signoff_id: dict(r._mapping)
                for r in conn.execute(
                    select(casebook_signoffs).where(
                        casebook_signoffs.c.subject == subject, casebook_signoffs.c.status == "valid"
                    )
                )
            }
        return s

    def _study_level(self, conn: Connection, study: str) -> str | None:
        if study not in self.study_levels:
            last = conn.execute(
                select(casebook_locks.c.action)
                .where(casebook_locks.c.study == study, casebook_locks.c.subject.is_(None))
                .order_by(casebook_locks.c.position.desc())
                .limit(1)
            ).scalar()
            self.study_levels[study] = None if last in (None, "unlocked") else last
        return self.study_levels[study]

    # --- projecting ----------------------------------------------------------------------------------------------
    def apply(self, conn: Connection, facts: Sequence[Fact]) -> None:
        at = conn.execute(
            select(projection_tracking.c.position).where(projection_tracking.c.name == self.name)
        ).scalar()
        if at is not None and at != REBUILDING and at != self._through:
            self.forget()  # another worker projected since: the tables, not this cache, say where things stand
        changed: set[str] = set()
        signoffs: list[dict[str, Any]] = []
        invalidated: dict[str, dict[str, Any]] = {}
        locks: list[dict[str, Any]] = []
        for fact in facts:
            name, env, payload = fact.type_name, fact.envelope, fact.payload
            if name.startswith("Subject."):
                self._subject_fact(conn, fact, changed, invalidated)
            elif name == "Casebook.SignedOff":
                subject = payload["subject_id"]
                s = self._subject(conn, subject, env["study"])
                row = {
                    "signoff_id": fact.event_id,
                    "study": env["study"],
                    "subject": subject,
                    "screening_number": s.screening_number,
                    "site": s.site,
                    "scope": payload["scope"],
                    "visit": payload["visit"],
                    "meaning": payload["meaning"],
                    "signature_def": payload["signature_def"],
                    "actor": env["actor"],
                    "printed_name": payload["printed_name"],
                    "role": env["role"],
                    "key": env["key"],
                    "signed_at": env["occurred_at"],
                    "recorded_at": env["recorded_at"],
                    "content_hash": payload["content_hash"],
                    "hash_method": payload["hash_method"],
                    "covers": json.dumps(payload["covers"], sort_keys=True),
                    "through_version": max(c["through_version"] for c in payload["covers"]),
                    "status": "valid",
                    "invalidated_by": None,
                    "invalidated_reason": None,
                    "invalidated_at": None,
                    "position": fact.position,
                }
                row["_versions"] = _covered(payload["covers"])
                self.valid[subject][fact.event_id] = row
                signoffs.append(row)
                changed.add(subject)
            elif name in ("Casebook.Frozen", "Casebook.Locked", "Casebook.Unlocked"):
                action = {"Casebook.Frozen": "frozen", "Casebook.Locked": "locked"}.get(name, "unlocked")
                subject = payload["subject_id"]
                study = env["study"]
                number = None
                if subject is None:
                    self.study_levels[study] = None if action == "unlocked" else action
                    touched = [
                        r[0]
                        for r in conn.execute(select(casebook_state.c.subject).where(casebook_state.c.study == study))
                    ]
                    touched += [k for k, v in self.subjects.items() if v.study == study and k not in touched]
                else:
                    s = self._subject(conn, subject, study)
                    s.level = None if action == "unlocked" else action
                    number = s.screening_number
                    touched = [subject]
                for t in touched:
                    self._subject(conn, t, study)
                    changed.add(t)
                    if action == "unlocked":
                        why = f"unlocked ({'the study' if subject is None else 'the subject'}): {payload['reason']}"
                        self._invalidate(t, lambda _row: True, fact, why, invalidated)
                locks.append(
                    {
                        "event_id": fact.event_id,
                        "study": study,
                        "subject": subject,
                        "screening_number": number,
                        "action": action,
                        "reason": payload["reason"],
                        "actor": env["actor"],
                        "role": env["role"],
                        "at": env["occurred_at"],
                        "recorded_at": env["recorded_at"],
                        "position": fact.position,
                    }
                )
        self._write(conn, changed, signoffs, invalidated, locks, facts[-1].position if facts else 0)
        self._through = facts[-1].position if facts else self._through

    def _subject_fact(
        self, conn: Connection, fact: Fact, changed: set[str], invalidated: dict[str, dict[str, Any]]
    ) -> None:
        name, env, payload = fact.type_name, fact.envelope, fact.payload
        subject = fact.stream
        s = self._subject(conn, subject, env["study"])
        if name == "Subject.Screened":
            s.site, s.screening_number = payload.get("site"), payload.get("screening_number")
        s.version, s.position = fact.version, fact.position
        day = _day(env["occurred_at"])
        if name == "Subject.VisitRecorded" and payload.get("visit"):
            s.visit_days.setdefault(payload["visit"], []).append(day.isoformat())
        level = stricter(s.level, self._study_level(conn, env["study"]))
        if level is not None and name in SAFETY_FACTS:
            s.flags.append(f"{name.split('.', 1)[1]} v{fact.version} recorded while {level}")
        target = payload.get(CHANGE_FACTS[name]) if name in CHANGE_FACTS else None
        near = timedelta(days=VISIT_NEAR_DAYS)

        def touches(row: dict[str, Any]) -> bool:
            if target is not None:
                return target in row["_versions"]
            if row["scope"] != "visit" or fact.version <= row["through_version"]:
                return False
            days = [date.fromisoformat(d) for d in s.visit_days.get(row["visit"], [])]
            return payload.get("visit") == row["visit"] or any(abs(day - d) <= near for d in days)

        what = f"{name} v{fact.version}" + (f" of v{target}" if target is not None else "")
        reason = f": {env['reason']}" if env.get("reason") else ""
        self._invalidate(subject, touches, fact, f"changed by {what}{reason}", invalidated)
        changed.add(subject)

    def _invalidate(
        self, subject: str, touches: Any, fact: Fact, why: str, invalidated: dict[str, dict[str, Any]]
    ) -> None:
        for sid, row in list(self.valid.get(subject, {}).items()):
            if "_versions" not in row:
                row["_versions"] = _covered(json.loads(row["covers"]))
            if touches(row):
                row.update(
                    status="invalidated",
                    invalidated_by=fact.event_id,
                    invalidated_reason=why,
                    invalidated_at=fact.envelope["recorded_at"],
                )
                invalidated[sid] = row
                del self.valid[subject][sid]

    def _write(
        self,
        conn: Connection,
        changed: set[str],
        signoffs: list[dict[str, Any]],
        invalidated: dict[str, dict[str, Any]],
        locks: list[dict[str, Any]],
        position: int,
    ) -> None:
        columns = [c.name for c in casebook_signoffs.c]
        if signoffs:
            conn.execute(casebook_signoffs.insert(), [{k: r[k] for k in columns} for r in signoffs])
        for sid, row in invalidated.items():
            conn.execute(
                update(casebook_signoffs)
                .where(casebook_signoffs.c.signoff_id == sid)
                .values(
                    status=row["status"],
                    invalidated_by=row["invalidated_by"],
                    invalidated_reason=row["invalidated_reason"],
                    invalidated_at=row["invalidated_at"],
                )
            )
        if locks:
            conn.execute(casebook_locks.insert(), locks)
        if not changed:
            return
        rows = []
        for subject in changed:
            s = self.subjects[subject]
            if s.screening_number is None:
                continue  # not a subject's stream as far as this record says (no Screened)
            rows.append(self._state_row(conn, subject, s))
        conn.execute(delete(casebook_state).where(casebook_state.c.subject.in_(list(changed))))
        if rows:
            conn.execute(casebook_state.insert(), rows)

    def _state_row(self, conn: Connection, subject: str, s: _Subject) -> dict[str, Any]:
        valid = sorted(self.valid.get(subject, {}).values(), key=lambda r: r["position"])
        book = [r for r in valid if r["scope"] == "casebook"]
        latest = book[-1] if book else None
        ever = conn.execute(
            select(casebook_signoffs.c.signoff_id).where(casebook_signoffs.c.subject == subject).limit(1)
        ).first()
        invalid_unresigned = self._needs_resigning(conn, subject, valid)
        if invalid_unresigned:
            status = NEEDS_RESIGNING
        elif latest is not None:
            status = SIGNED if latest["through_version"] >= s.version else NEW_DATA
        elif valid:
            status = SIGNED  # visit sign-offs only
        else:
            status = NOT_SIGNED if ever is None else NEEDS_RESIGNING
        return {
            "subject": subject,
            "study": s.study,
            "site": s.site or "",
            "screening_number": s.screening_number,
            "subject_version": s.version,
            "lock_level": s.level,
            "study_lock_level": self._study_level(conn, s.study),
            "signoff_status": status,
            "last_signoff": latest["signoff_id"] if latest else None,
            "signed_through_version": latest["through_version"] if latest else None,
            "signed_by": latest["printed_name"] if latest else None,
            "signed_at": latest["signed_at"] if latest else None,
            "visit_days": json.dumps(s.visit_days, sort_keys=True),
            "flags": json.dumps(s.flags),
            "position": s.position,
        }

    def _needs_resigning(self, conn: Connection, subject: str, valid: list[dict[str, Any]]) -> bool:
        """An invalidated sign-off with no valid one of the same scope (casebook, or that visit) made after it."""
        t = casebook_signoffs
        gone = conn.execute(
            select(t.c.scope, t.c.visit, t.c.position).where(t.c.subject == subject, t.c.status == "invalidated")
        ).all()
        for scope, visit, position in gone:
            if not any(r["scope"] == scope and r["visit"] == visit and r["position"] > position for r in valid):
                return True
        return False


def _covered(covers: list[dict[str, Any]]) -> set[int]:
    found: set[int] = set()
    for c in covers:
        found |= set(c["versions"]) if c.get("versions") is not None else set(range(1, c["through_version"] + 1))
    return found


# --- reading (sle sign --pending, sle lock status, the export and the API) --------------------------------------
def signoff_rows(conn: Connection, *, subject: str | None = None, status: str | None = None) -> list[dict[str, Any]]:
    """Sign-offs, oldest first (``subject``: a screening number or subject id; ``status``: valid|invalidated)."""
    t = casebook_signoffs
    q = select(t).order_by(t.c.position)
    if subject is not None:
        q = q.where((t.c.subject == subject) | (t.c.screening_number == subject))
    if status is not None:
        q = q.where(t.c.status == status)
    rows = [dict(r._mapping) for r in conn.execute(q)]
    for r in rows:
        r["covers"] = json.loads(r["covers"])
    return rows


def casebook_rows(conn: Connection, *, subject: str | None = None) -> list[dict[str, Any]]:
    """Each subject's review state: lock level (its own, the study's, and the stricter ``level``), sign-off
    status and flags, by screening number."""
    t = casebook_state
    q = select(t).order_by(t.c.screening_number)
    if subject is not None:
        q = q.where((t.c.subject == subject) | (t.c.screening_number == subject))
    rows = [dict(r._mapping) for r in conn.execute(q)]
    for r in rows:
        r["flags"] = json.loads(r["flags"])
        r.pop("visit_days", None)
        r["level"] = stricter(r["lock_level"], r["study_lock_level"])
    return rows


def pending_signoffs(conn: Connection) -> list[dict[str, Any]]:
    """The investigator's work list: subjects not signed, with new data since their sign-off, or whose
    sign-off was invalidated (needs re-signing), the last first."""
    order = {NEEDS_RESIGNING: 0, NEW_DATA: 1, NOT_SIGNED: 2}
    rows = [r for r in casebook_rows(conn) if r["signoff_status"] in order]
    return sorted(rows, key=lambda r: (order[r["signoff_status"]], r["screening_number"]))


def lock_rows(conn: Connection, *, subject: str | None = None) -> list[dict[str, Any]]:
    """Every freeze, lock and unlock, oldest first (``subject`` null: the study's)."""
    t = casebook_locks
    q = select(t).order_by(t.c.position)
    if subject is not None:
        q = q.where((t.c.subject == subject) | (t.c.screening_number == subject))
    return [dict(r._mapping) for r in conn.execute(q)]


def casebook_dashboard(conn: Connection) -> dict[str, list[dict[str, Any]]]:
    """The dashboard's sign-off and lock section: per site, subjects by sign-off status and lock level."""
    by_site: dict[str, dict[str, Any]] = {}
    for r in casebook_rows(conn):
        site = by_site.setdefault(
            r["site"],
            {"site": r["site"], "subjects": 0, **dict.fromkeys((SIGNED, NEW_DATA, NEEDS_RESIGNING, NOT_SIGNED), 0)},
        )
        site["subjects"] += 1
        site[r["signoff_status"]] += 1
        site["frozen"] = site.get("frozen", 0) + (r["level"] == "frozen")
        site["locked"] = site.get("locked", 0) + (r["level"] == "locked")
    return {"signoff_and_lock_by_site": [by_site[s] for s in sorted(by_site)]}
