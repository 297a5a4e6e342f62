"""Reading the study record from Python: the audit trail, patient state, the dashboard and as-of replay.

The `sle` read commands (`audit-trail`, `patients`, `dashboard`, `replay`) are this class and a printer::

    from projections.read import StudyReader

    with StudyReader("sqlite:///sle-study.db") as reader:       # brings the read models up to date first
        rows = reader.audit_trail(subject="NJ01-0002", change="corrected")   # one dict per changed field
        state = reader.patient("NJ01-0002")                       # patient state (dict), as `sle patients --json`
        then = reader.replay("NJ01-0002", as_of=datetime(2008, 1, 1, tzinfo=timezone.utc))
        numbers = reader.dashboard()

A filter value that names nothing (a subject not in the record, an event type that does not exist, a status
that is not one) raises `UnknownFilter` naming the valid values: an empty answer always means "none matched".
A read model halted by an event that fails its checks raises `ProjectionHalted`; a database whose read models
are from an older schema revision, `SchemaBehind`.
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, select

from projections import review
from projections.audit_trail import CHANGES, COLUMNS, query
from projections.dashboard import dashboard
from projections.patient_state import PatientState, summarise
from projections.runner import ProjectionRunner
from projections.schema import audit_events, halted_streams, patient_state
from sle_events.domain.lifecycle import SubjectStatus

__all__ = ["StudyReader", "UnknownFilter", "display_value", "visit_order", "AUDIT_COLUMNS"]

# The columns of an audit-trail row (`StudyReader.audit_trail`): the view's, then what the reader adds.
AUDIT_COLUMNS = (
    *(c for c in COLUMNS if c != "changes"),
    "seq",
    "field",
    "old_value",
    "new_value",
    "last_verification",
    "item",
)

# Display precision of the labs a monitor follows (signed values keep every digit; this is only for reading).
DISPLAY_PLACES = {"DSDNA": 0, "C3": 0, "C4": 1, "CREAT": 2, "CREATSI": 0, "EGFR": 0, "UPCR": 2, "TREGPCT": 1}
LAB_FORMS = ("Subject.LabResultRecorded", "Subject.DerivedResultRecorded")
NEAR_VISIT_DAYS = 2  # a lab result belongs to the visit within two days of it (as the dashboard counts them)


class UnknownFilter(ValueError):
    """A filter value that names nothing in the record (the message names the valid ones)."""


def display_value(code: str, value: str | Decimal | None) -> str:
    """A lab value rounded for reading to its analyte's precision (half up); the signed value is unchanged."""
    from sle_events.domain.quantities import display

    if value is None:
        return ""
    return display(Decimal(value), DISPLAY_PLACES.get(code, 2))


def visit_order(code: str) -> tuple[int, float, str]:
    """Protocol order of visit codes: screening and baseline, then M1, M2 … M24, long-term, then the rest."""
    head = {"SCR": -3, "BL": -2, "D0": -1}.get(code)
    if head is not None:
        return (0, head, code)
    if code[:1] == "M" and code[1:].replace(".", "", 1).isdigit():
        return (1, float(code[1:]), code)
    return (2, 0, code)


def _one_of(what: str, value: str, known: list[str], hint: str = "") -> UnknownFilter:
    shown = ", ".join(known[:20]) + (f" … ({len(known)} in all)" if len(known) > 20 else "")
    plural = what + ("es" if what.endswith("s") else "s")  # statuses
    return UnknownFilter(f"unknown {what} {value!r}{hint}; {plural}: {shown or 'none in this record'}")


def _instant(value: datetime | str | None, name: str) -> datetime | None:
    from sle_events.signing.envelope import MalformedEnvelope, parse_time

    if value is None or isinstance(value, datetime):
        if value is not None and value.tzinfo is None:
            raise UnknownFilter(f"{name} {value.isoformat()} has no UTC offset")
        return value
    try:
        return parse_time(name, value)
    except MalformedEnvelope as e:
        raise UnknownFilter(str(e)) from None


class StudyReader:
    """The read models of one database, brought up to date (`catch_up`) when opened."""

    def __init__(self, url: str | None = None, *, catch_up: bool = True) -> None:
        self.runner = ProjectionRunner(url) if url is not None else ProjectionRunner(_default_url())
        self.record = self.runner.record
        self.engine = self.runner.engine
        if catch_up:
            try:
                self.runner.catch_up()
            except BaseException:
                self.runner.close()
                raise

    def close(self) -> None:
        self.runner.close()

    def __enter__(self) -> StudyReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------------------------------- audit trail
    def audit_trail(
        self,
        *,
        subject: str | None = None,
        stream: str | None = None,
        user: str | None = None,
        event_type: str | None = None,
        since: datetime | str | None = None,
        until: datetime | str | None = None,
        change: str | None = None,
    ) -> list[dict[str, Any]]:
        """One row per recorded change of a field, oldest first, with `item` (what was changed: the analyte
        and unit of a lab result) and `visit` (for a lab result, the visit within two days of it)."""
        start, end = _instant(since, "since"), _instant(until, "until")
        if change is not None and change not in CHANGES:
            raise _one_of("change", change, list(CHANGES))
        with self.engine.connect() as conn:
            self._check_filters(conn, subject=subject, user=user, event_type=event_type)
            rows = query(
                conn,
                subject=subject,
                stream=stream,
                actor=user,
                event_type=event_type,
                since=start,
                until=end,
                change=change,
            )
            _name_items(conn, rows)
        return rows

    def _check_filters(
        self, conn: Connection, *, subject: str | None, user: str | None, event_type: str | None
    ) -> None:
        from sle_events.domain.event_types import EVENT_TYPES

        t = audit_events
        if subject is not None:
            known = conn.execute(select(t.c.subject).where(t.c.subject == subject).limit(1)).first()
            if known is None:
                raise _one_of("subject", subject, self._subjects(conn), " (give a screening number)")
        if user is not None:
            actors = sorted(a for (a,) in conn.execute(select(t.c.actor).distinct()))
            if user not in actors:
                raise _one_of("user", user, actors)
        if event_type is not None and event_type not in EVENT_TYPES:
            near = [n for n in EVENT_TYPES if n.split(".", 1)[-1] == event_type.split(".", 1)[-1]]
            hint = f" (did you mean {' or '.join(near)}?)" if near else ""
            raise _one_of("event type", event_type, sorted(EVENT_TYPES), hint)

    def _subjects(self, conn: Connection) -> list[str]:
        t = audit_events
        return sorted(s for (s,) in conn.execute(select(t.c.subject).where(t.c.subject.is_not(None)).distinct()))

    # ----------------------------------------------------------------------------------------- patient state
    def patients(self, *, status: str | None = None) -> list[dict[str, Any]]:
        """Every subject's patient state (JSON columns as data; `days_since_transplant` as of today; `halted`
        names the fact a halted subject stopped at)."""
        if status is not None and status not in {s.value for s in SubjectStatus}:
            raise _one_of("status", status, [s.value for s in SubjectStatus])
        q = select(patient_state).order_by(patient_state.c.screening_number)
        if status:
            q = q.where(patient_state.c.status == status)
        with self.engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(q)]
            halted = self.halted_streams(conn)
            counts = review.query_counts_by_subject(conn)
        today = date.today()
        by_stream = {h["stream"]: h for h in halted}
        for r in rows:
            r["queries"] = counts.get(r["subject"], dict.fromkeys(review.QUERY_STATUSES, 0))
            decode_json_fields(r)
            r["days_since_transplant"] = (today - date.fromisoformat(r["tx_date"])).days if r["tx_date"] else None
            h = by_stream.get(r["subject"])
            r["halted"] = {k: h[k] for k in ("version", "position", "detail")} if h else None
        return rows

    def patient(self, subject: str) -> dict[str, Any]:
        """One subject's patient state, by screening number or subject (stream) id."""
        for row in self.patients():
            if subject in (row["screening_number"], row["subject"]):
                with self.engine.connect() as conn:
                    row["sdv"] = review.sdv_progress(review.sdv_facts_status(conn, subject=row["subject"]))[0:1]
                row["sdv"] = row["sdv"][0] if row["sdv"] else None
                return row
        with self.engine.connect() as conn:
            raise _one_of("subject", subject, self._subjects(conn))

    def halted_streams(
        self, conn: Connection | None = None, projection: str = PatientState.name
    ) -> list[dict[str, Any]]:
        hs = halted_streams
        q = (
            select(hs.c.subject, hs.c.stream, hs.c.version, hs.c.position, hs.c.detail)
            .where(hs.c.projection == projection)
            .order_by(hs.c.position)
        )
        if conn is not None:
            return [dict(r._mapping) for r in conn.execute(q)]
        with self.engine.connect() as c:
            return [dict(r._mapping) for r in c.execute(q)]

    # ----------------------------------------------------------------------------------------- dashboard
    def dashboard(self) -> dict[str, Any]:
        """Enrollment by status and site, visit compliance and lab completeness (visits in protocol order), AEs
        by grade, stale results by site, halted streams."""
        with self.engine.connect() as conn:
            data = dashboard(conn)
            data.update(review.review_dashboard(conn))  # queries and SDV by site
        for section in ("visit_compliance", "lab_completeness"):
            data[section].sort(key=lambda r: (visit_order(r["visit"]), r.get("outcome") or ""))
        return data

    # ----------------------------------------------------------------------------------------- SDV and queries
    def _subject_stream(self, conn: Connection, subject: str) -> str:
        """A subject's stream id from its screening number or id (UnknownFilter naming the subjects otherwise)."""
        ps = patient_state
        found = conn.execute(
            select(ps.c.subject).where((ps.c.screening_number == subject) | (ps.c.subject == subject))
        ).scalar()
        if found is None:
            raise _one_of("subject", subject, self._subjects(conn), " (give a screening number)")
        return str(found)

    def queries(
        self, *, subject: str | None = None, status: str | None = None, open_only: bool = False
    ) -> list[dict[str, Any]]:
        """Queries (`review_queries` rows), in the order raised; ``open_only``: OPEN or ANSWERED."""
        if status is not None and status not in review.QUERY_STATUSES:
            raise _one_of("query status", status, list(review.QUERY_STATUSES))
        with self.engine.connect() as conn:
            stream = self._subject_stream(conn, subject) if subject is not None else None
            return review.queries(conn, subject=stream, status=status, open_only=open_only)

    def sdv(self, *, subject: str | None = None, pending: bool = False) -> list[dict[str, Any]]:
        """Each source-data fact with its SDV status; ``pending``: those not VERIFIED (the monitor's work list)."""
        with self.engine.connect() as conn:
            stream = self._subject_stream(conn, subject) if subject is not None else None
            rows = review.sdv_facts_status(conn, subject=stream)
        return [r for r in rows if r["status"] != "VERIFIED"] if pending else rows

    def sdv_progress(self, by: str = "subject", *, subject: str | None = None) -> list[dict[str, Any]]:
        """SDV progress by ``subject``, ``visit`` or ``site``."""
        if by not in review.SDV_GROUPS:
            raise _one_of("grouping", by, list(review.SDV_GROUPS))
        return review.sdv_progress(self.sdv(subject=subject), by)

    # ----------------------------------------------------------------------------------------- replay
    def replay(
        self, subject: str, *, as_of: datetime | str | None = None, occurred_as_of: datetime | str | None = None
    ) -> dict[str, Any]:
        """A subject's state (the patient-state shape) as the database said it at recorded time `as_of`, or as
        true in the clinic at `occurred_as_of` given today's knowledge. Flags name their visit."""
        from projections.replay import SubjectNotFound, find_subject
        from projections.replay import replay as replay_subject

        when, occurred = _instant(as_of, "as_of"), _instant(occurred_as_of, "occurred_as_of")
        try:
            find_subject(self.record, subject)
        except SubjectNotFound:
            with self.engine.connect() as conn:
                raise _one_of("subject", subject, self._subjects(conn), " (give a screening number)") from None
        then = replay_subject(self.record, subject, as_of=when, occurred_as_of=occurred)
        state = summarise(then, self.record.study(then.study_id).config.visits)
        decode_json_fields(state)
        state["flags"] = [_flag_with_visit(then, version, flag) for version, flag in then.flags]
        return state


def _default_url() -> str:
    from sle_events.store.record import database_url

    return database_url(None)


def decode_json_fields(state: dict[str, Any]) -> None:
    """A patient-state row's JSON columns, as data."""
    for name in ("key_labs", "flags", "stale_results"):
        if isinstance(state.get(name), str):
            state[name] = json.loads(state[name])


def _flag_with_visit(subject: Any, version: int, flag: str) -> str:
    fact = subject.facts.get(version)
    visit = getattr(getattr(fact, "record", None), "visit", None) if fact is not None else None
    return f"{flag} ({visit}, v{version})" if visit else f"{flag} (v{version})"


def _name_items(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """Give each audit row `item`: what it changed, named as a monitor reads it (a lab result's analyte and
    unit), and a lab result's `visit` (the attended visit within two days of when it was collected)."""
    t = audit_events
    record_ids = sorted({r["record_id"] for r in rows if r["form"] in LAB_FORMS})
    originals: dict[str, tuple[dict[str, Any], str]] = {}
    for i in range(0, len(record_ids), 500):
        chunk = record_ids[i : i + 500]
        for event_id, changes, occurred in conn.execute(
            # A recorded fact's record id is its own event id: found through the record index.
            select(t.c.event_id, t.c.changes, t.c.occurred_at).where(
                t.c.record_id.in_(chunk), t.c.event_id == t.c.record_id
            )
        ):
            originals[event_id] = ({name: new for name, _, new in json.loads(changes)}, occurred)
    streams = sorted({r["stream"] for r in rows if r["record_id"] in originals})
    visits: dict[str, list[tuple[date, str]]] = {}
    for i in range(0, len(streams), 500):
        for stream, visit, occurred in conn.execute(
            select(t.c.stream, t.c.visit, t.c.occurred_at).where(
                t.c.event_type == "Subject.VisitRecorded", t.c.stream.in_(streams[i : i + 500])
            )
        ):
            visits.setdefault(stream, []).append((datetime.fromisoformat(occurred).date(), visit))
    for r in rows:
        original = originals.get(r["record_id"])
        if original is None:
            r["item"] = r["field"]
            continue
        fields, occurred = original
        code, unit = fields.get("code") or "", fields.get("unit") or fields.get("canonical_unit") or ""
        field = "" if r["field"] in ("value", "code") else f" {r['field']}"
        r["item"] = f"{code}{field} ({unit})" if unit else f"{code}{field}"
        if not r["visit"]:
            day = datetime.fromisoformat(occurred).astimezone(UTC).date()
            near = [
                (abs((d - day).days), v)
                for d, v in visits.get(r["stream"], ())
                if abs((d - day).days) <= NEAR_VISIT_DAYS
            ]
            r["visit"] = min(near)[1] if near else None
