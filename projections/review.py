"""Read models of source data verification and queries (`sle_events/domain/review.py`), and what reads them.

Tables (`projections/schema.py`), each fed by one kind of stream so a parallel rebuild gives the same rows:

* ``review_queries`` — one row per query as it stands (status, raiser, the last act: who, what, when), from the
  query's own stream. Projection ``review_acts``.
* ``sdv_marks`` — the latest SDV mark of each fact (``field`` ``""`` = the whole fact), from the subject's SDV
  stream. Projection ``review_acts``.
* ``sdv_facts`` — every source-data fact of every subject and when each field was last corrected, from the
  subject's stream. Projection ``sdv_facts``.

Functions (a `Connection` in, plain data out; `StudyReader` and the CLI call them):
:func:`queries` (filter by subject, status, open), :func:`open_queries` (what blocks a lock),
:func:`sdv_facts_status` (each fact with its SDV status), :func:`sdv_progress` (by subject, visit or site),
:func:`query_counts` (per subject, for patient state) and :func:`review_dashboard` (per site).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, delete, func, select, update

from projections.audit_trail import _utc  # occurred-at in UTC, as the audit trail shows it
from projections.base import Fact, Projection
from projections.patient_state import SubjectProjection
from projections.schema import review_queries, sdv_facts, sdv_marks
from sle_events.domain.review import NOT_SOURCE_DATA, SdvStatus, fact_status, last_changes, visit_days, visit_of

__all__ = [
    "ReviewActs",
    "SdvFacts",
    "open_queries",
    "queries",
    "query_counts",
    "query_counts_by_subject",
    "review_dashboard",
    "sdv_facts_status",
    "sdv_progress",
]

QUERY_STATUSES = ("OPEN", "ANSWERED", "CLOSED")
SDV_GROUPS = ("subject", "visit", "site")
_ACTS = {"Query.Answered": "answered", "Query.Closed": "closed", "Query.Reopened": "reopened"}
_STATUS_AFTER = {"answered": "ANSWERED", "closed": "CLOSED", "reopened": "OPEN"}


class ReviewActs(Projection):
    """Queries and SDV marks, each from its own stream."""

    name = "review_acts"
    tables = (review_queries, sdv_marks)

    def apply(self, conn: Connection, facts: Sequence[Fact]) -> None:
        q = review_queries
        for fact in facts:
            name = fact.type_name
            if not name.startswith(("Query.", "SourceVerification.")):
                continue
            env, p = fact.envelope, fact.payload
            when = _utc(env["occurred_at"])
            if name == "Query.Raised":
                conn.execute(
                    q.insert().values(
                        query_id=fact.stream,
                        study=env["study"],
                        subject=p["subject_id"],
                        screening_number=p["screening_number"],
                        site=p["site"],
                        version=p["version"],
                        fact=p["fact"],
                        field=p["field"],
                        text=p["text"],
                        cause=p["cause"],
                        status="OPEN",
                        raised_by=p["by"],
                        raised_at=when,
                        last_act="raised",
                        last_by=p["by"],
                        last_text=p["text"],
                        last_at=when,
                        acts=1,
                        position=fact.position,
                    )
                )
            elif name in _ACTS:
                act = _ACTS[name]
                conn.execute(
                    update(q)
                    .where(q.c.query_id == fact.stream)
                    .values(
                        status=_STATUS_AFTER[act],
                        last_act=act,
                        last_by=p["by"],
                        last_text=p["text"],
                        last_at=when,
                        acts=q.c.acts + 1,
                        position=fact.position,
                    )
                )
            elif name == "SourceVerification.Verified":
                m = sdv_marks
                for item in p["items"]:
                    field = item["field"] or ""
                    conn.execute(
                        delete(m).where(
                            m.c.subject == p["subject_id"], m.c.version == item["version"], m.c.field == field
                        )
                    )
                    conn.execute(
                        m.insert().values(
                            subject=p["subject_id"],
                            version=item["version"],
                            field=field,
                            study=env["study"],
                            subject_version=p["subject_version"],
                            hash=item["hash"],
                            verified_by=p["by"],
                            verified_at=when,
                            position=fact.position,
                        )
                    )


class SdvFacts(SubjectProjection):
    """The facts a monitor verifies, from each subject's own stream."""

    name = "sdv_facts"
    tables = (sdv_facts,)

    EVERYTHING = 0  # in `touched`: rewrite all the subject's rows (a visit moved, so facts may change visit)

    def __init__(self) -> None:
        super().__init__()
        self.touched: dict[str, set[int]] = {}  # this batch: subject stream -> versions whose rows may change
        self.full = False

    def apply(self, conn: Connection, facts: Sequence[Fact]) -> None:
        # A subject with hundreds of facts gains one at a time: rewrite only the rows the batch's facts touch
        # (themselves, and what they correct or void), taken from the batch so a retried batch does the same.
        for fact in facts:
            if not fact.type_name.startswith("Subject."):
                continue
            touched = self.touched.setdefault(fact.stream, set())
            p = fact.payload
            touched.add(fact.version)
            touched.update(p[k] for k in ("corrected_version", "voided_version") if isinstance(p.get(k), int))
            if "VisitRecorded" in (fact.type_name, p.get("corrected_type"), p.get("voided_type")):
                touched.add(self.EVERYTHING)
        try:
            super().apply(conn, facts)
        finally:
            if self.held is None:
                self.touched.clear()

    def hold_back(self) -> None:
        super().hold_back()
        self.touched.clear()

    def flush(self, conn: Connection) -> None:
        self.full = True  # a rebuild: every held subject's rows, once
        try:
            super().flush(conn)
        finally:
            self.full = False
            self.touched.clear()

    def write(self, conn: Connection, changed: dict[str, tuple[Any, int]]) -> None:
        t = sdv_facts
        rows = []
        for stream, (subject, _) in changed.items():
            touched = self.touched.get(stream, {self.EVERYTHING})
            if self.full or self.EVERYTHING in touched:
                versions = sorted(subject.facts)
                conn.execute(delete(t).where(t.c.subject == stream))
            else:
                versions = sorted(v for v in touched if v in subject.facts)
                conn.execute(delete(t).where(t.c.subject == stream, t.c.version.in_(versions)))
            days = visit_days(subject)
            for v in versions:
                f = subject.facts[v]
                if f.type in NOT_SOURCE_DATA or f.voided:
                    continue
                rows.append(
                    {
                        "subject": stream,
                        "version": v,
                        "study": str(subject.study_id),
                        "site": subject.site,
                        "screening_number": subject.screening_number,
                        "type": f.type,
                        "visit": visit_of(f, days),
                        "last_changed": json.dumps(last_changes(subject, f), sort_keys=True),
                    }
                )
        if rows:
            conn.execute(t.insert(), rows)


# ============================================================================================ reading
def queries(
    conn: Connection,
    *,
    study: str | None = None,
    subject: str | None = None,
    status: str | None = None,
    open_only: bool = False,
) -> list[dict[str, Any]]:
    """Queries as `review_queries` rows (dicts), in the order raised. ``subject`` is the subject's stream id;
    ``open_only``: not CLOSED (OPEN or ANSWERED)."""
    q = review_queries
    sel = select(q).order_by(q.c.raised_at, q.c.query_id)
    if study:
        sel = sel.where(q.c.study == study)
    if subject:
        sel = sel.where(q.c.subject == subject)
    if status:
        sel = sel.where(q.c.status == status)
    if open_only:
        sel = sel.where(q.c.status != "CLOSED")
    return [dict(r._mapping) for r in conn.execute(sel)]


def open_queries(conn: Connection, *, study: str | None = None, subject: str | None = None) -> list[dict[str, Any]]:
    """The queries not closed (OPEN or ANSWERED): what blocks a lock, as the read model has it."""
    return queries(conn, study=study, subject=subject, open_only=True)


def query_counts(conn: Connection, subject: str) -> dict[str, int]:
    """A subject's queries by status (patient state): {"OPEN": n, "ANSWERED": n, "CLOSED": n}."""
    q = review_queries
    counts = dict.fromkeys(QUERY_STATUSES, 0)
    for status, n in conn.execute(select(q.c.status, func.count()).where(q.c.subject == subject).group_by(q.c.status)):
        counts[status] = n
    return counts


def query_counts_by_subject(conn: Connection, study: str | None = None) -> dict[str, dict[str, int]]:
    """Every subject's queries by status: subject stream -> {"OPEN": n, "ANSWERED": n, "CLOSED": n}."""
    q = review_queries
    sel = select(q.c.subject, q.c.status, func.count()).group_by(q.c.subject, q.c.status)
    if study:
        sel = sel.where(q.c.study == study)
    out: dict[str, dict[str, int]] = {}
    for subject, status, n in conn.execute(sel):
        out.setdefault(subject, dict.fromkeys(QUERY_STATUSES, 0))[status] = n
    return out


def sdv_facts_status(conn: Connection, *, study: str | None = None, subject: str | None = None) -> list[dict[str, Any]]:
    """Each source-data fact with its SDV status: subject, screening_number, site, version, type, visit,
    status (PENDING, PARTIAL, VERIFIED, CHANGED_SINCE_VERIFIED), changed_fields, verified_by, verified_at."""
    f, m = sdv_facts, sdv_marks
    fs = select(f).order_by(f.c.site, f.c.screening_number, f.c.version)
    ms = select(m)
    if study:
        fs, ms = fs.where(f.c.study == study), ms.where(m.c.study == study)
    if subject:
        fs, ms = fs.where(f.c.subject == subject), ms.where(m.c.subject == subject)
    marks: dict[tuple[str, int], dict[str | None, Any]] = {}
    for r in conn.execute(ms):
        marks.setdefault((r.subject, r.version), {})[r.field or None] = r
    out = []
    for r in conn.execute(fs):
        mine = marks.get((r.subject, r.version), {})
        status, changed = fact_status(json.loads(r.last_changed), {k: x.subject_version for k, x in mine.items()})
        latest = max(mine.values(), key=lambda x: x.position, default=None)
        out.append(
            {
                "subject": r.subject,
                "screening_number": r.screening_number,
                "site": r.site,
                "version": r.version,
                "type": r.type,
                "visit": r.visit,
                "status": status.value,
                "changed_fields": list(changed),
                "verified_by": latest.verified_by if latest is not None else None,
                "verified_at": latest.verified_at if latest is not None else None,
            }
        )
    return out


def sdv_progress(rows: Sequence[dict[str, Any]], by: str = "subject") -> list[dict[str, Any]]:
    """SDV progress grouped by ``subject`` (screening number), ``visit`` or ``site``: facts by status, the total
    and the share verified (percent, one decimal, as text)."""
    if by not in SDV_GROUPS:
        raise ValueError(f"SDV progress is by {', '.join(SDV_GROUPS)}, not {by!r}")
    key = {"subject": "screening_number", "visit": "visit", "site": "site"}[by]
    groups: dict[str, dict[str, Any]] = {}
    for r in rows:
        name = r[key] or "—"
        g = groups.setdefault(name, {by: name, "total": 0, **{s.value: 0 for s in SdvStatus}})
        g["total"] += 1
        g[r["status"]] += 1
    for g in groups.values():
        g["verified_pct"] = f"{100 * g[SdvStatus.VERIFIED.value] / g['total']:.1f}" if g["total"] else "0.0"
    return [groups[k] for k in sorted(groups)]


def review_dashboard(conn: Connection, study: str | None = None) -> dict[str, Any]:
    """The dashboard's SDV and query sections: per site, queries by status (and automatic ones open) and SDV
    progress."""
    q = review_queries
    sel = select(q.c.site, q.c.status, (q.c.cause.is_not(None)).label("automatic"), func.count().label("n"))
    if study:
        sel = sel.where(q.c.study == study)
    per_site: dict[str, dict[str, Any]] = {}
    for site, status, automatic, n in conn.execute(sel.group_by(q.c.site, q.c.status, "automatic")):
        row = per_site.setdefault(site, {"site": site, **dict.fromkeys(QUERY_STATUSES, 0), "automatic_open": 0})
        row[status] += n
        if automatic and status != "CLOSED":
            row["automatic_open"] += n
    return {
        "queries_by_site": [per_site[s] for s in sorted(per_site)],
        "sdv_by_site": sdv_progress(sdv_facts_status(conn, study=study), "site"),
    }
