"""The study dashboard: enrollment by status and site, visit compliance, AEs by grade, lab completeness, the
stale results a monitor should query (by site), and the subjects whose record stopped at a fact that cannot be
loaded (halted streams).

Its tables hold one row per subject visit and per adverse event, recomputed from the subject aggregate
whenever the subject changes; the dashboard itself is GROUP BY queries over them and `patient_state`.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from sqlalchemy import Connection, delete, func, select

from projections.patient_state import SubjectProjection, current_records
from projections.schema import halted_streams, patient_state, subject_adverse_events, subject_visits

# What every monthly visit must carry from the lab (PROTOCOL §6): renal, urine, serology.
MONTHLY_LABS = ("CREAT", "UPCR", "DSDNA", "C3", "C4")


def visit_rows(subject: Any) -> list[dict[str, Any]]:
    rows = []
    labs_by_day: dict[Any, set[str]] = {}
    records = current_records(subject)
    for r in (*records.get("LabResultRecorded", ()), *records.get("DerivedResultRecorded", ())):
        labs_by_day.setdefault(r.occurred_at.date(), set()).add(r.code)
    for code, outcome in sorted(subject.visit_outcomes.items()):
        version = subject.visit_versions.get(code)
        record = subject.facts[version].record if version is not None else None
        if outcome == "attended" and record is not None:
            day = record.occurred_at.date()
            near = set().union(*(labs_by_day.get(day + timedelta(days=d), set()) for d in (-2, -1, 0, 1, 2)))
            present = len(set(MONTHLY_LABS) & near)
            rows.append(
                {
                    "visit": code,
                    "outcome": "done" if record.in_window else "out_of_window",
                    "labs_expected": len(MONTHLY_LABS),
                    "labs_present": present,
                }
            )
        else:
            rows.append({"visit": code, "outcome": "missed", "labs_expected": len(MONTHLY_LABS), "labs_present": 0})
    return rows


class StudyDashboard(SubjectProjection):
    name = "study_dashboard"
    tables = (subject_visits, subject_adverse_events)

    def write(self, conn: Connection, changed: dict[str, tuple[Any, int]]) -> None:
        visits, aes = [], []
        for stream, (subject, _) in changed.items():
            base = {"subject": stream, "study": str(subject.study_id), "site": subject.site}
            visits += [dict(base, **row) for row in visit_rows(subject)]
            aes += [
                dict(base, ae_id=ae.ae_id, grade=ae.grade, serious=int(ae.serious), open=int(ae.open))
                for ae in subject.adverse_events.values()
                if not ae.voided
            ]
        for table in (subject_visits, subject_adverse_events):
            conn.execute(delete(table).where(table.c.subject.in_(list(changed))))
        if visits:
            conn.execute(subject_visits.insert(), visits)
        if aes:
            conn.execute(subject_adverse_events.insert(), aes)


def dashboard(conn: Connection, study: str | None = None) -> dict[str, Any]:
    """The dashboard's numbers, as plain data (the CLI prints and plots them)."""
    ps, sv, ae = patient_state, subject_visits, subject_adverse_events

    def where(q: Any, table: Any) -> Any:
        return q.where(table.c.study == study) if study else q

    enrollment = [
        dict(r._mapping)
        for r in conn.execute(
            where(
                select(ps.c.site, ps.c.status, func.count().label("subjects"))
                .group_by(ps.c.site, ps.c.status)
                .order_by(ps.c.site, ps.c.status),
                ps,
            )
        )
    ]
    compliance = [
        dict(r._mapping)
        for r in conn.execute(
            where(
                select(sv.c.visit, sv.c.outcome, func.count().label("visits"))
                .group_by(sv.c.visit, sv.c.outcome)
                .order_by(sv.c.visit, sv.c.outcome),
                sv,
            )
        )
    ]
    by_grade = [
        dict(r._mapping)
        for r in conn.execute(
            where(
                select(
                    ae.c.grade,
                    func.count().label("events"),
                    func.sum(ae.c.serious).label("serious"),
                    func.sum(ae.c.open).label("open"),
                )
                .group_by(ae.c.grade)
                .order_by(ae.c.grade),
                ae,
            )
        )
    ]
    completeness = [
        dict(r._mapping)
        for r in conn.execute(
            where(
                select(
                    sv.c.visit,
                    func.sum(sv.c.labs_present).label("present"),
                    func.sum(sv.c.labs_expected).label("expected"),
                )
                .where(sv.c.outcome != "missed")
                .group_by(sv.c.visit)
                .order_by(sv.c.visit),
                sv,
            )
        )
    ]
    stale: dict[str, dict[str, Any]] = {}  # site -> subjects and results to query (JSON column: counted here)
    for site, items in conn.execute(where(select(ps.c.site, ps.c.stale_results).order_by(ps.c.site), ps)):
        found = json.loads(items)
        if found:
            row = stale.setdefault(site, {"site": site, "subjects": 0, "results": 0})
            row["subjects"] += 1
            row["results"] += len(found)
    hs = halted_streams
    halted = [
        dict(r._mapping)
        for r in conn.execute(
            where(
                select(hs.c.subject, hs.c.stream, hs.c.version, hs.c.position, hs.c.detail)
                .where(hs.c.projection == StudyDashboard.name)
                .order_by(hs.c.position),
                hs,
            )
        )
    ]
    return {
        "enrollment": enrollment,
        "visit_compliance": compliance,
        "adverse_events_by_grade": by_grade,
        "lab_completeness": completeness,
        "stale_results": list(stale.values()),
        "halted_streams": halted,
    }
