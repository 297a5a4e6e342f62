"""What the web view's pages show, read through the projections, the ledger and the verification results.

Every function takes the signed-in session's study and returns plain data for a template; nothing here writes.
Current pages read the read models (SQL); a page "as of" a past recorded or occurred time folds each subject's
signed stream again, as `sle replay` does (each event's chain and signature re-checked on the way).
"""

from __future__ import annotations

import json
import re
import threading
import time as time_module
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from typing import Any
from uuid import UUID

import sqlalchemy as sa

from projections.audit_trail import CHANGES, last_verification
from projections.base import ProjectionHalted
from projections.dashboard import dashboard as dashboard_rows
from projections.dashboard import visit_rows
from projections.patient_state import current_records, lab_series, summarise
from projections.read import (
    LAB_FORMS,
    StudyReader,
    UnknownFilter,
    _name_items,
    decode_json_fields,
    display_value,
    visit_order,
)
from projections.replay import events_as_of, fold, read_stream
from projections.schema import (
    audit_events,
    audit_trail,
    patient_state,
    projection_tracking,
    verification_findings,
    verification_runs,
)
from sle_events.ledger.base import LedgerError
from sle_events.ledger.log import Ledger
from sle_events.web.sessions import RegistryCache

PAGE_SIZE = 50
DASHBOARD_SECONDS = 30
INLINE_FOLDS = 3  # subjects a page may fold itself; more are folded in the background
TREND_LABS = ("EGFR", "UPCR", "DSDNA", "C3", "C4", "TREGPCT")
LAB_NAMES = {
    "EGFR": "eGFR",
    "UPCR": "UPCR",
    "DSDNA": "anti-dsDNA",
    "C3": "C3",
    "C4": "C4",
    "TREGPCT": "Treg %",
    "CREAT": "creatinine",
}
# The subject page's status section: each kind lists the facts whose stable name matches. Sign-off, SDV and
# query facts are being added to the domain; once their names exist they show here without another change.
STATUS_KINDS = {
    "Sign-off": re.compile(r"Sign(ed)?Off|Signature", re.I),
    "Source data verification": re.compile(r"SDV|SourceData|SourceVerified", re.I),
    "Queries": re.compile(r"Query|Queries", re.I),
}
QUERY_OPENED = re.compile(r"Query(Raised|Opened|Issued)$")
QUERY_CLOSED = re.compile(r"Query(Closed|Resolved|Cancelled|Canceled)$")
MILESTONES = {
    "Subject.Screened": "screening",
    "Subject.Rescreened": "rescreening",
    "Subject.ConsentObtained": "consent",
    "Subject.ScreenFailed": "screen failure",
    "Subject.EligibilityConfirmed": "eligibility",
    "Subject.Enrolled": "enrolment",
    "Subject.Admitted": "admission",
    "Subject.Discharged": "discharge",
    "Subject.CyclophosphamideGiven": "cyclophosphamide",
    "Subject.MSCInfused": "AlloMSC infusion",
    "Subject.TransplantNotPerformed": "no transplant",
    "Subject.VisitRecorded": "visit",
    "Subject.VisitMissed": "missed visit",
    "Subject.UnscheduledVisitRecorded": "unscheduled visit",
    "Subject.AdverseEventReported": "adverse event",
    "Subject.AdverseEventAssessed": "AE assessed",
    "Subject.AdverseEventFollowedUp": "AE follow-up",
    "Subject.SeriousAdverseEventReported": "SAE report",
    "Subject.DeviationRecorded": "deviation",
    "Subject.Corrected": "correction",
    "Subject.Voided": "void",
    "Subject.Withdrawn": "withdrawal",
    "Subject.LostToFollowUp": "lost to follow-up",
    "Subject.Returned": "returned",
    "Subject.DeathRecorded": "death",
    "Subject.MainStudyCompleted": "main study completed",
    "Subject.StudyCompleted": "study completed",
    "Subject.RenalResponseAssessed": "renal response",
    "Subject.SledaiAssessed": "SLEDAI-2K",
}


class NotFound(LookupError):
    """Nothing of that name in the signed-in study (another study's subject or event looks the same)."""


@dataclass(frozen=True)
class AsOf:
    """A page's point in time: none (now), a recorded time or an occurred (clinical) time."""

    when: datetime | None = None
    axis: str = "recorded"  # or "occurred"

    @property
    def recorded(self) -> datetime | None:
        return self.when if self.when is not None and self.axis == "recorded" else None

    @property
    def occurred(self) -> datetime | None:
        return self.when if self.when is not None and self.axis == "occurred" else None

    @property
    def label(self) -> str:
        if self.when is None:
            return ""
        kind = "recorded" if self.axis == "recorded" else "occurred (clinical time, as known today)"
        return f"as of {self.when.isoformat()} — {kind}"


def parse_as_of(text: str | None, axis: str | None) -> AsOf:
    """`as_of` from a query string: ISO 8601 with an offset, or a date (the end of that day, UTC)."""
    axis = axis or "recorded"
    if axis not in ("recorded", "occurred"):
        raise UnknownFilter(f"unknown time axis {axis!r}; axes: recorded, occurred")
    text = (text or "").strip()
    if not text:
        return AsOf(None, axis)
    return AsOf(parse_instant(text, "as of", end_of_day=True), axis)


def parse_instant(text: str, name: str, *, end_of_day: bool = False) -> datetime:
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            return datetime.combine(day, time.max if end_of_day else time.min, tzinfo=UTC)
        when = datetime.fromisoformat(text)
    except ValueError:
        raise UnknownFilter(
            f"{name} {text!r} is not a date (2008-03-01) or a time with its offset (2008-03-01T09:00:00+08:00)"
        ) from None
    if when.tzinfo is None:
        raise UnknownFilter(f"{name} {text!r} has no UTC offset (write e.g. {text}+00:00)")
    return when


def _utc(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text).astimezone(UTC) if text else None


class WebData:
    """The read side of one database for the web view (one per app; thread-safe for reads)."""

    def __init__(self, url: str, *, catch_up: bool = False) -> None:
        self.reader = StudyReader(url, catch_up=False)
        self.record = self.reader.record
        self.engine = self.reader.engine
        self.catch_up = catch_up
        self._ledger: Ledger | None = None
        self._lock = threading.Lock()
        self._seen_head = -1
        self._folded: dict[str, tuple[int, Any]] = {}  # stream -> (version, subject aggregate): current folds
        self._warming: threading.Thread | None = None
        self._verification: tuple[tuple[Any, ...], dict[str, Any]] | None = None
        self.registries = RegistryCache(self.record)
        self._dashboards: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}

    def close(self) -> None:
        self.reader.close()

    @property
    def ledger(self) -> Ledger | None:
        """The record's ledger, once it has one (a record is usable before its first integration)."""
        from sle_events.ledger.tables import ledger_exists

        if self._ledger is None and ledger_exists(self.engine):
            self._ledger = Ledger(engine=self.engine, create=False)
        return self._ledger

    def fresh(self) -> int:
        """How many events the read models are behind the record (0: up to date). The view reads what the
        projections' worker (`sle projections run`) wrote and never writes them itself, unless it was made with
        `catch_up=True` (a demo or a test). A halted read model raises ProjectionHalted: nothing is shown."""
        from projections.runner import REBUILDING

        with self.engine.connect() as conn:
            head = conn.execute(sa.select(sa.func.max(self.record.table.c.id))).scalar() or 0
            tracked = conn.execute(sa.select(projection_tracking.c.position, projection_tracking.c.halted)).all()
        for _, halted in tracked:
            if halted:
                raise ProjectionHalted(**json.loads(halted))
        positions = [p for p, _ in tracked]
        if len(positions) < len(self.reader.runner.projections) or REBUILDING in positions:
            behind = head
        else:
            behind = head - min(positions, default=0)
        if behind and self.catch_up and head != self._seen_head:
            with self._lock:
                self.reader.runner.catch_up()
                self._seen_head = head
            return 0
        return max(behind, 0)

    # ------------------------------------------------------------------------------------------ subjects
    def subject_rows(self, study: str) -> list[dict[str, Any]]:
        ps = patient_state
        with self.engine.connect() as conn:
            rows = [
                dict(r._mapping)
                for r in conn.execute(sa.select(ps).where(ps.c.study == study).order_by(ps.c.screening_number))
            ]
        for r in rows:
            decode_json_fields(r)
        return rows

    def _stream_of(self, study: str, subject: str) -> tuple[str, int]:
        ps = patient_state
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(ps.c.subject, ps.c.version).where(
                    ps.c.study == study, sa.or_(ps.c.screening_number == subject, ps.c.subject == subject)
                )
            ).first()
        if row is None:
            raise NotFound(f"no subject {subject!r} in this study")
        return row.subject, row.version

    def folded(self, stream: str, version: int | None, as_of: AsOf) -> Any:
        """A subject aggregate from its signed stream: now (cached by the stream's projected version) or as of."""
        if as_of.when is None and version is not None:
            cached = self._folded.get(stream)
            if cached is not None and cached[0] == version:
                return cached[1]
        events: list[Any] = read_stream(self.record, UUID(stream))
        if as_of.when is not None:
            events = events_as_of(events, as_of=as_of.recorded, occurred_as_of=as_of.occurred)
            if not events:
                return None
        subject = fold(events)
        if as_of.when is None:
            self._folded[stream] = (subject.version, subject)
        return subject

    def schedule(self, study: str) -> Any:
        return self.record.study(study).config.visits

    def settings(self, study: str) -> Any:
        return self.record.study(study).config.settings

    def summaries_as_of(self, study: str, as_of: AsOf) -> list[tuple[dict[str, Any], Any]]:
        """(patient-state row, aggregate) of every subject that had events by then."""
        found = []
        schedule = self.schedule(study)
        for row in self.subject_rows(study):
            subject = self.folded(row["subject"], None, as_of)
            if subject is None:
                continue
            state = summarise(subject, schedule)
            decode_json_fields(state)
            found.append((state, subject))
        return found

    # ------------------------------------------------------------------------------------------ dashboard
    def dashboard(self, study: str, as_of: AsOf) -> dict[str, Any]:
        """The dashboard's numbers. Now: kept for DASHBOARD_SECONDS while the read models stay where they are
        (monitors reload it; the SAE clock moves in hours, the cached page says when it was computed)."""
        if as_of.when is not None:
            return self._dashboard(study, as_of)
        with self.engine.connect() as conn:
            positions = tuple(
                conn.execute(sa.select(projection_tracking.c.position).order_by(projection_tracking.c.name)).scalars()
            )
        key = (study, positions, int(time_module.monotonic() // DASHBOARD_SECONDS))
        cached = self._dashboards.get(study)
        if cached is not None and cached[0] == key:
            return cached[1]
        found = self._dashboard(study, as_of)
        if not found["sae_folding"]:  # a dashboard still folding subjects is not kept
            self._dashboards[study] = (key, found)
        return found

    def _dashboard(self, study: str, as_of: AsOf) -> dict[str, Any]:
        now = as_of.when or datetime.now(UTC)
        if as_of.when is None:
            with self.engine.connect() as conn:
                data = dashboard_rows(conn, study)
            ps = patient_state
            with self.engine.connect() as conn:
                states = [
                    {"subject": r.subject, "screening_number": r.screening_number, "site": r.site,
                     "stale_results": json.loads(r.stale_results or "[]")}
                    for r in conn.execute(
                        sa.select(ps.c.subject, ps.c.screening_number, ps.c.site, ps.c.stale_results)
                        .where(ps.c.study == study)
                        .order_by(ps.c.screening_number)
                    )
                ]  # fmt: skip
            aggregates, folding = self._serious_folds(study)
        else:
            folding = 0
            folded = self.summaries_as_of(study, as_of)
            data = _dashboard_from(folded)
            states = [s for s, _ in folded]
            aggregates = {s["subject"]: agg for s, agg in folded}
        sites: dict[str, dict[str, Any]] = {}
        for r in data["enrollment"]:
            site = sites.setdefault(r["site"], {"site": r["site"], "by_status": {}, "total": 0})
            site["by_status"][r["status"]] = r["subjects"]
            site["total"] += r["subjects"]
        statuses = sorted({r["status"] for r in data["enrollment"]})
        compliance: dict[str, dict[str, int]] = {}
        for r in data["visit_compliance"]:
            compliance.setdefault(r["visit"], {"done": 0, "out_of_window": 0, "missed": 0})[r["outcome"]] = r["visits"]
        visits = []
        for code in sorted(compliance, key=visit_order):
            c = compliance[code]
            total = sum(c.values())
            visits.append(dict(c, visit=code, total=total, pct=round(100 * (c["done"] + c["out_of_window"]) / total)))
        stale = [
            {"screening_number": s["screening_number"], "site": s["site"], "results": s["stale_results"]}
            for s in states
            if s["stale_results"]
        ]
        saes = self._sae_clock(study, aggregates, {s["subject"]: s for s in states}, now)
        return {
            "sites": list(sites.values()),
            "statuses": statuses,
            "visits": visits,
            "stale": stale,
            "saes": saes,
            "overdue_saes": [s for s in saes if s["status"] in ("OVERDUE", "OPEN")],
            "sae_folding": folding,
            "aes_by_grade": data["adverse_events_by_grade"],
            "halted": data["halted_streams"],
            "queries": self.query_counts(study, as_of),
            "subjects": len(states),
            "computed_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }

    def _serious_folds(self, study: str) -> tuple[dict[str, Any], int]:
        """The folded subjects that have a serious AE (the SAE clock needs the domain's own fold), and how many
        are still being folded. A few missing folds (a subject that moved on) are made now; many (a server just
        started) in the background, so no page waits for a whole study to be folded."""
        serious = self._subjects_with_serious_aes(study)
        missing = [(s, v) for s, v in serious if self._folded.get(s, (None,))[0] != v]
        if len(missing) > INLINE_FOLDS:
            self._fold_in_background(missing)
        else:
            for stream, version in missing:
                self.folded(stream, version, AsOf())
        ready = {s: self._folded[s][1] for s, _ in serious if s in self._folded}
        return ready, len(serious) - len(ready)

    def _fold_in_background(self, missing: list[tuple[str, int]]) -> None:
        with self._lock:
            if self._warming is not None and self._warming.is_alive():
                return

            def warm() -> None:
                for stream, version in missing:
                    try:
                        self.folded(stream, version, AsOf())
                    except Exception:  # a stream that cannot be folded shows on its own subject page
                        continue

            self._warming = threading.Thread(target=warm, name="sle-web-fold", daemon=True)
            self._warming.start()

    def _subjects_with_serious_aes(self, study: str) -> list[tuple[str, int]]:
        from projections.schema import subject_adverse_events as sae

        ps = patient_state
        with self.engine.connect() as conn:
            return [
                (r.subject, r.version)
                for r in conn.execute(
                    sa.select(ps.c.subject, ps.c.version)
                    .where(
                        ps.c.study == study,
                        ps.c.subject.in_(sa.select(sae.c.subject).where(sae.c.serious == 1, sae.c.study == study)),
                    )
                    .order_by(ps.c.screening_number)
                )
            ]

    def _sae_clock(
        self, study: str, aggregates: dict[str, Any], states: dict[str, dict[str, Any]], now: datetime
    ) -> list[dict[str, Any]]:
        """Every serious AE with its 24-hour report clock (PROTOCOL §7), worst first."""
        settings = self.settings(study)
        rank = {"OVERDUE": 0, "OPEN": 1, "REPORTED_LATE": 2, "REPORTED_ON_TIME": 3}
        found = []
        for stream, subject in aggregates.items():
            if subject is None:
                continue
            for ae in subject.adverse_events.values():
                if ae.voided or not ae.serious:
                    continue
                status = ae.report_status(now, settings)
                if status is None:
                    continue
                found.append(
                    {
                        "screening_number": states.get(stream, {}).get("screening_number", subject.screening_number),
                        "ae_id": ae.ae_id,
                        "grade": ae.grade,
                        "aware_at": ae.aware_at.isoformat() if ae.aware_at else "",
                        "reported_at": ae.reported_at.isoformat() if ae.reported_at else "",
                        "status": str(getattr(status, "value", status)),
                    }
                )
        found.sort(key=lambda r: (rank.get(r["status"], 9), r["aware_at"]))
        return found

    # ------------------------------------------------------------------------------------------ queries etc.
    def status_facts(self, study: str, stream: str | None, as_of: AsOf) -> dict[str, list[dict[str, Any]]]:
        """Sign-off, SDV and query facts (STATUS_KINDS), by kind; empty where the record has none yet. The names
        come from the registry of event types, so a fact added to the domain shows here without a change."""
        from sle_events.domain.event_types import EVENT_TYPES

        wanted = {t: kind for t in EVENT_TYPES for kind, pattern in STATUS_KINDS.items() if pattern.search(t)}
        found: dict[str, list[dict[str, Any]]] = {kind: [] for kind in STATUS_KINDS}
        if not wanted:
            return found
        ae = audit_events
        q = sa.select(ae).where(ae.c.study == study, ae.c.event_type.in_(list(wanted))).order_by(ae.c.position)
        if stream is not None:
            q = q.where(ae.c.stream == stream)
        with self.engine.connect() as conn:
            for r in conn.execute(q):
                row = dict(r._mapping)
                if not _in_time(row, as_of):
                    continue
                row["fields"] = [(f, new) for f, _, new in json.loads(row["changes"] or "[]")]
                found[wanted[row["event_type"]]].append(row)
        return found

    def query_counts(self, study: str, as_of: AsOf) -> dict[str, Any]:
        facts = self.status_facts(study, None, as_of)["Queries"]
        opened = sum(1 for f in facts if QUERY_OPENED.search(f["event_type"]))
        closed = sum(1 for f in facts if QUERY_CLOSED.search(f["event_type"]))
        return {"recorded": len(facts), "open": max(opened - closed, 0)}

    # ------------------------------------------------------------------------------------------ subject page
    def subject(self, study: str, subject: str, as_of: AsOf, *, all_events: bool = False) -> dict[str, Any]:
        stream, version = self._stream_of(study, subject)
        aggregate = self.folded(stream, version, as_of)
        if aggregate is None:
            raise NotFound(f"subject {subject} had no recorded events {as_of.label}")
        state = summarise(aggregate, self.schedule(study))
        decode_json_fields(state)
        records = current_records(aggregate)
        series = lab_series(records)
        visits = sorted(
            (
                (aggregate.facts[v].record.occurred_at, code)
                for code, v in aggregate.visit_versions.items()
                if v in aggregate.facts and aggregate.facts[v].record is not None
            ),
            key=lambda p: p[0],
        )
        timeline = self.timeline(study, stream, as_of, all_events=all_events)
        labs = []
        for code, points in sorted(series.items()):
            at, value, unit, flag = points[-1]
            labs.append(
                {
                    "code": code,
                    "name": LAB_NAMES.get(code, code),
                    "value": display_value(code, value),
                    "unit": unit,
                    "flag": flag or "",
                    "at": at.isoformat(),
                    "n": len(points),
                }
            )
        return {
            "state": state,
            "stream": stream,
            "labs": labs,
            "series": {c: series[c] for c in TREND_LABS if c in series},
            "tx_date": aggregate.tx_date,
            "visits": visits,
            "timeline": timeline,
            "status": self.status_facts(study, stream, as_of),
            "saes": self._sae_clock(study, {stream: aggregate}, {stream: state}, as_of.when or datetime.now(UTC)),
        }

    def timeline(self, study: str, stream: str, as_of: AsOf, *, all_events: bool) -> dict[str, Any]:
        ae = audit_events
        cols = [
            ae.c.position,
            ae.c.event_type,
            ae.c.visit,
            ae.c.change,
            ae.c.actor,
            ae.c.printed_name,
            ae.c.role,
            ae.c.occurred_at,
            ae.c.recorded_at,
            ae.c.reason,
        ]
        with self.engine.connect() as conn:
            rows = [
                dict(r._mapping)
                for r in conn.execute(
                    sa.select(*cols).where(ae.c.study == study, ae.c.stream == stream).order_by(ae.c.position)
                )
            ]
        rows = [r for r in rows if _in_time(r, as_of)]
        total = len(rows)
        if not all_events:
            rows = [r for r in rows if r["event_type"] in MILESTONES or r["change"] != "recorded"]
        for r in rows:
            r["what"] = MILESTONES.get(r["event_type"], r["event_type"].split(".", 1)[-1])
        return {"rows": rows, "total": total}

    # ------------------------------------------------------------------------------------------ audit trail
    def audit(self, study: str, filters: dict[str, str], as_of: AsOf) -> dict[str, Any]:
        """One page of the filtered audit trail, old → new (keyset pages: `after` / `before` a row).

        The events are chosen first (`audit_events`, one row per event, by its indexes) and only the page's
        events are unnested into one row per changed field: a page costs the same early or late in a long trail."""
        ae = audit_events
        q = sa.select(ae.c.position).where(ae.c.study == study)
        if filters.get("subject"):
            q = q.where(ae.c.subject == filters["subject"])
        if filters.get("user"):
            q = q.where(ae.c.actor == filters["user"])
        if filters.get("change"):
            if filters["change"] not in CHANGES:
                raise UnknownFilter(f"unknown change {filters['change']!r}; changes: {', '.join(CHANGES)}")
            q = q.where(ae.c.change == filters["change"])
        if filters.get("type"):
            q = q.where(ae.c.event_type == filters["type"])
        item = filters.get("item") or ""
        if item:
            q = q.where(_item_events(item))
        for name, column, end in (
            ("recorded_from", ae.c.recorded_at, False),
            ("recorded_to", ae.c.recorded_at, True),
            ("occurred_from", ae.c.occurred_at, False),
            ("occurred_to", ae.c.occurred_at, True),
        ):
            if filters.get(name):
                when = parse_instant(filters[name], name.replace("_", " "), end_of_day=end)
                q = q.where(column <= _text(when) if end else column >= _text(when))
        if as_of.recorded is not None:
            q = q.where(ae.c.recorded_at <= _text(as_of.recorded))
        if as_of.occurred is not None:
            q = q.where(ae.c.occurred_at <= _text(as_of.occurred))
        backwards = bool(filters.get("before")) and not filters.get("after")
        cursor = (
            _cursor(filters["after"] if filters.get("after") else filters["before"])
            if (filters.get("after") or filters.get("before"))
            else None
        )
        if cursor is not None:
            q = q.where(ae.c.position <= cursor[0] if backwards else ae.c.position >= cursor[0])
        q = q.order_by(ae.c.position.desc() if backwards else ae.c.position)
        with self.engine.connect() as conn:
            self._check_filters(conn, study, filters)
            rows: list[dict[str, Any]] = []
            offset, more = 0, False
            batch = PAGE_SIZE + 1
            while True:  # events until a page of field rows (an event has one row per changed field, or none)
                positions = [p for (p,) in conn.execute(q.limit(batch).offset(offset))]
                if positions:
                    rows += self._field_rows(conn, positions, item)
                if cursor is not None:
                    rows = [r for r in rows if ((r["position"], r["seq"]) < cursor if backwards
                                                 else (r["position"], r["seq"]) > cursor)]  # fmt: skip
                rows.sort(key=lambda r: (r["position"], r["seq"]), reverse=backwards)
                if len(rows) > PAGE_SIZE or len(positions) < batch:
                    more = len(rows) > PAGE_SIZE
                    break
                offset += batch
            rows = rows[:PAGE_SIZE]
            if backwards:
                rows.reverse()
            _name_items(conn, rows)
            last = last_verification(conn)
        for row in rows:
            row["last_verification"] = _verified(row["position"], last, short=True)
        first_page = cursor is None or (backwards and not more)
        return {
            "rows": rows,
            "verification": _run_summary(last),
            "next": f"{rows[-1]['position']}.{rows[-1]['seq']}" if rows and (more or backwards) else None,
            "previous": f"{rows[0]['position']}.{rows[0]['seq']}" if rows and not first_page else None,
        }

    def _field_rows(self, conn: sa.Connection, positions: list[int], item: str) -> list[dict[str, Any]]:
        t = audit_trail
        rows = [dict(r._mapping) for r in conn.execute(sa.select(t).where(t.c.position.in_(positions)))]
        if item:
            labs = _lab_records(conn, {r["record_id"] for r in rows}, item)
            rows = [r for r in rows if r["field"] == item or r["record_id"] in labs]
        return rows

    def _check_filters(self, conn: sa.Connection, study: str, filters: dict[str, str]) -> None:
        ae = audit_events
        if filters.get("subject"):
            known = conn.execute(
                sa.select(ae.c.subject).where(ae.c.study == study, ae.c.subject == filters["subject"]).limit(1)
            ).first()
            if known is None:
                raise UnknownFilter(f"no subject {filters['subject']!r} in this study")
        if filters.get("type"):
            from sle_events.domain.event_types import EVENT_TYPES

            if filters["type"] not in EVENT_TYPES:
                raise UnknownFilter(f"unknown event type {filters['type']!r}")

    def filter_choices(self, study: str) -> dict[str, list[str]]:
        """The audit trail's choices: the study's key holders (its registry), the subject facts the domain
        knows, the study's subjects; none of them needs a scan of the trail."""
        from sle_events.domain.event_types import EVENT_TYPES

        ps = patient_state
        with self.engine.connect() as conn:
            subjects = [
                s
                for (s,) in conn.execute(
                    sa.select(ps.c.screening_number).where(ps.c.study == study).order_by(ps.c.screening_number)
                )
            ]
        users = sorted({entry["actor"] for entry in self.registries.get(study).keys.values()})
        types = sorted(t for t in EVENT_TYPES if t.startswith(("Subject.", "ProductLot.")))
        return {"users": users, "types": types, "subjects": subjects, "changes": list(CHANGES)}

    # ------------------------------------------------------------------------------------------ one event
    def event(self, study: str, position: int) -> dict[str, Any]:
        from sle_events.signing.envelope import open_sealed

        ev = self.record.table
        with self.engine.connect() as conn:
            state = conn.execute(sa.select(ev.c.state).where(ev.c.id == position)).scalar()
            row = conn.execute(sa.select(audit_events).where(audit_events.c.position == position)).first()
            last = last_verification(conn)
        if state is None:
            raise NotFound(f"no event at log position {position}")
        sealed = open_sealed(bytes(state))
        if sealed.envelope["study"] != study:
            raise NotFound(f"no event at log position {position} in this study")
        audit = dict(row._mapping) if row is not None else {}
        try:
            if self.ledger is None:
                raise LedgerError("this record has no ledger yet: run `sle ledger integrate`")
            proof = self.ledger.inclusion_proof(position, with_leaf=False)
            proof_doc: dict[str, Any] = {
                "index": proof.index,
                "size": proof.size,
                "hashes": [h.hex() for h in proof.hashes],
                "checkpoint": proof.checkpoint,
            }
        except LedgerError as e:
            proof_doc = {"error": str(e)}
        return {
            "position": position,
            "envelope": json.dumps(sealed.envelope, indent=2, ensure_ascii=False, sort_keys=True),
            "env": sealed.envelope,
            "audit": audit,
            "last_verification": _verified(position, last),
            "proof": proof_doc,
        }

    def proof_text(self, study: str, position: int) -> str:
        self.event_study_check(study, position)
        try:
            if self.ledger is None:
                raise LedgerError("this record has no ledger yet")
            return self.ledger.inclusion_proof(position).text
        except LedgerError as e:
            raise NotFound(str(e)) from None

    def event_study_check(self, study: str, position: int) -> None:
        with self.engine.connect() as conn:
            found = conn.execute(sa.select(audit_events.c.study).where(audit_events.c.position == position)).scalar()
        if found != study:
            raise NotFound(f"no event at log position {position} in this study")

    # ------------------------------------------------------------------------------------------ verification
    def verification(self) -> dict[str, Any]:
        """The last verification and the ledger (cached until a run, a checkpoint or an event is added)."""
        ledger = self.ledger
        with self.engine.connect() as conn:
            key: tuple[Any, ...] = (
                conn.execute(sa.select(sa.func.max(verification_runs.c.id))).scalar(),
                conn.execute(sa.select(sa.func.max(self.record.table.c.id))).scalar(),
            )
            if ledger is not None:
                from sle_events.ledger.tables import ledger_checkpoints, ledger_state

                key += (
                    conn.execute(sa.select(sa.func.max(ledger_checkpoints.c.id))).scalar(),
                    conn.execute(sa.select(ledger_state.c.size)).scalar(),
                )
        cached = self._verification
        if cached is not None and cached[0] == key:
            return cached[1]
        found = self._verification_now()
        self._verification = (key, found)
        return found

    def _verification_now(self) -> dict[str, Any]:
        runs, f = verification_runs, verification_findings
        with self.engine.connect() as conn:
            run = conn.execute(sa.select(runs).order_by(runs.c.id.desc()).limit(1)).first()
            last = last_verification(conn)
            findings = []
            if run is not None:
                findings = [
                    dict(r._mapping)
                    for r in conn.execute(
                        sa.select(f.c.kind, f.c.stream, f.c.version, f.c.position, f.c.detail)
                        .where(f.c.run_id == run.id)
                        .order_by(f.c.seq)
                        .limit(500)
                    )
                ]
        return {
            "run": dict(run._mapping) if run is not None else None,
            "unverifiable": last["unverifiable"] if last else None,
            "findings": findings,
            "ledger": self.ledger_summary(),
        }

    def ledger_summary(self) -> dict[str, Any]:
        ledger = self.ledger
        if ledger is None:
            return {"present": False}
        state = ledger.state()
        latest = ledger.latest_checkpoint()
        return {
            "present": True,
            "size": state.size,
            "pending": ledger.pending(),
            "vkey": state.vkey,
            "origin": state.origin,
            "checkpoint": latest,
        }


def _text(when: datetime) -> str:
    return when.astimezone(UTC).isoformat()


def _cursor(text: str) -> tuple[int, int]:
    try:
        pos, seq = text.split(".")
        return int(pos), int(seq)
    except ValueError:
        raise UnknownFilter(f"{text!r} is not a page position") from None


def _code(item: str) -> str:
    return item.split(" ", 1)[0].upper()


def _lab_result_events(item: str) -> Any:
    """The lab results (and derived results) of an analyte code, as a subquery of their event ids."""
    ae = audit_events
    return sa.select(ae.c.event_id).where(
        ae.c.event_type.in_(LAB_FORMS),
        ae.c.changes.like(f'%["code",%"{_code(item)}"]%'),
    )


def _item_events(item: str) -> Any:
    """Events that may have changed `item` (a field name, or an analyte code: its results and their
    corrections); their field rows are filtered exactly afterwards. The original of each row is looked up
    through the record index (a recorded fact's record id is its own event id), so a page stops early."""
    ae = audit_events
    original = audit_events.alias("original")
    lab = (
        sa.select(sa.literal(1))
        .where(
            original.c.record_id == ae.c.record_id,
            original.c.event_id == original.c.record_id,
            original.c.event_type.in_(LAB_FORMS),
            original.c.changes.like(f'%["code",%"{_code(item)}"]%'),
        )
        .exists()
    )
    return sa.or_(ae.c.changes.like(f'%["{item}",%'), lab)


def _lab_records(conn: sa.Connection, records: set[str], item: str) -> set[str]:
    """Which of these record ids are lab results of the analyte `item`."""
    ae = audit_events
    found: set[str] = set()
    ids = sorted(records)
    for i in range(0, len(ids), 500):
        found.update(
            e
            for (e,) in conn.execute(
                sa.select(ae.c.event_id).where(
                    ae.c.record_id.in_(ids[i : i + 500]),
                    ae.c.event_id == ae.c.record_id,
                    ae.c.event_type.in_(LAB_FORMS),
                    ae.c.changes.like(f'%["code",%"{_code(item)}"]%'),
                )
            )
        )
    return found


def _verified(position: int, last: dict[str, Any] | None, *, short: bool = False) -> str:
    """What the last full verification said of one event (`short`: without the run's time and seal, which a
    page of rows shows once, in `_run_summary`)."""
    if last is None:
        return "never verified"
    kinds = last["findings_by_position"].get(position)
    text = f"FAILED {', '.join(kinds)}" if kinds else "ok"
    if short:
        return text if not last["unverifiable"] else f"{text} (unverifiable run)"
    text += f" at {last['run_at'][:19]}Z"
    if last["unverifiable"]:
        return f"UNVERIFIABLE ({last['unverifiable']}): stored as {text}"
    return text


def _run_summary(last: dict[str, Any] | None) -> str:
    if last is None:
        return "no full verification has been run (sle verify)"
    text = f"last full verification {last['run_at'][:19]}Z: {'ok' if last['ok'] else 'FAILED'}"
    if last["unverifiable"]:
        text += f" — UNVERIFIABLE ({last['unverifiable']}): nobody vouches for this stored result"
    return text


def _in_time(row: dict[str, Any], as_of: AsOf) -> bool:
    if as_of.recorded is not None and _utc(row["recorded_at"]) > as_of.recorded:  # type: ignore[operator]
        return False
    return not (as_of.occurred is not None and _utc(row["occurred_at"]) > as_of.occurred)  # type: ignore[operator]


def _dashboard_from(folded: list[tuple[dict[str, Any], Any]]) -> dict[str, Any]:
    """The dashboard's rows (as `projections.dashboard.dashboard` gives them) from folded subjects."""
    enrollment: dict[tuple[str, str], int] = {}
    compliance: dict[tuple[str, str], int] = {}
    grades: dict[Any, dict[str, Any]] = {}
    for state, subject in folded:
        key = (state["site"], state["status"])
        enrollment[key] = enrollment.get(key, 0) + 1
        for v in visit_rows(subject):
            compliance[(v["visit"], v["outcome"])] = compliance.get((v["visit"], v["outcome"]), 0) + 1
        for ae in subject.adverse_events.values():
            if ae.voided:
                continue
            g = grades.setdefault(ae.grade, {"grade": ae.grade, "events": 0, "serious": 0, "open": 0})
            g["events"] += 1
            g["serious"] += int(ae.serious)
            g["open"] += int(ae.open)
    return {
        "enrollment": [{"site": s, "status": st, "subjects": n} for (s, st), n in sorted(enrollment.items())],
        "visit_compliance": [{"visit": v, "outcome": o, "visits": n} for (v, o), n in sorted(compliance.items())],
        "adverse_events_by_grade": [grades[g] for g in sorted(grades, key=lambda g: (g is None, g or 0))],
        "halted_streams": [],
    }


__all__ = ["AsOf", "NotFound", "UnknownFilter", "WebData", "parse_as_of", "parse_instant"]
