"""Patient state: one row per subject, folded from the subject's own events by the domain aggregate.

The row is a pure function of the subject's events (`summarise`), so incremental and rebuilt tables are equal
and as-of replay shows the same shape for any past moment. Nothing here depends on the wall clock: "days
since transplant" is computed when read, from `tx_date`.
"""

from __future__ import annotations

import json
from abc import abstractmethod
from collections.abc import Sequence
from datetime import date, timedelta
from decimal import Decimal
from typing import Any, NamedTuple, overload
from uuid import UUID

from sqlalchemy import Connection, delete

from projections.base import Fact, Projection, StreamHalted, VerifyingReader, fold_fact
from projections.schema import halted_streams, patient_state
from sle_events.domain.study_config import VisitSchedule

# The labs a monitor follows (PROTOCOL §8): analyte code -> the facts that carry it.
KEY_LABS = ("DSDNA", "C3", "C4", "CREAT", "EGFR", "UPCR", "TREGPCT")


class HaltedStream(NamedTuple):
    halt: StreamHalted
    study: str
    subject: str | None  # screening number, when known


class SubjectFolder:
    """Keeps each subject's aggregate current as its facts arrive, loading it through the reader (chain and
    signatures checked) when needed. A subject whose signed fact the domain cannot load is halted there: its
    aggregate stays as of the version before, and later facts of that stream are not folded.

    Folding is idempotent per version, so projections processed together can share one folder, and a batch
    retried after a rolled-back transaction folds nothing twice."""

    def __init__(self, reader: VerifyingReader | None = None) -> None:
        self.subjects: dict[str, Any] = {}
        self.halted: dict[str, HaltedStream] = {}
        self.reader = reader

    def apply(self, conn: Connection, fact: Fact) -> Any | None:
        """The subject after `fact`; None if the fact is not a subject's or its stream is halted."""
        if not fact.type_name.startswith("Subject."):
            return None
        stream = fact.stream
        halted = self.halted.get(stream)
        if halted is not None and fact.version >= halted.halt.version:
            return None
        subject = self.subjects.get(stream)
        if subject is not None and subject.version >= fact.version:
            return subject
        try:
            if (subject is None and fact.version > 1) or (subject is not None and subject.version < fact.version - 1):
                subject = self._load(conn, fact.sealed.stream, fact.version - 1)
            subject = fold_fact(subject, fact)
        except StreamHalted as halt:
            before = self._load(conn, fact.sealed.stream, halt.version - 1) if halt.version > 1 else None
            self.subjects.pop(stream, None)
            if before is not None:
                self.subjects[stream] = before
            number = before.screening_number if before is not None else fact.payload.get("screening_number")
            self.halted[stream] = HaltedStream(halt, fact.envelope["study"], number)
            return None
        self.subjects[stream] = subject
        return subject

    def _load(self, conn: Connection, stream: UUID, version: int) -> Any:
        subject = None
        for fact in self.reader.stream(conn, stream, version):  # type: ignore[union-attr]  # bound by bind() first
            subject = fold_fact(subject, fact)
        return subject

    def study(self, study_id: str) -> Any:
        """The study's registry and configuration as its signed events have it now."""
        return self.reader.signatures.latest(study_id)  # type: ignore[union-attr]  # bound by bind() first

    def clear(self) -> None:
        self.subjects.clear()
        self.halted.clear()


def current_records(subject: Any) -> dict[str, list[Any]]:
    """Current (corrected, not voided) records by fact type, in version order, in one pass over the facts
    (`Subject.records` sorts all facts on every call: too slow for a projection's hot path)."""
    found: dict[str, list[Any]] = {}
    for fact in subject.facts.values():  # inserted as versions grow, so already in version order
        if fact.record is not None and not fact.voided:
            found.setdefault(fact.type, []).append(fact.record)
    return found


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    return value.isoformat() if hasattr(value, "isoformat") else str(value)


@overload
def _num(value: None) -> None: ...
@overload
def _num(value: Decimal | str | int) -> str: ...
def _num(value: Any) -> str | None:
    return None if value is None else format(Decimal(value), "f")


def lab_series(records: dict[str, list[Any]]) -> dict[str, list[tuple[Any, str, str, str | None]]]:
    """code -> [(occurred_at, value, unit, flag)] of current results, in clinical time order."""
    series: dict[str, list[tuple[Any, str, str, str | None]]] = {}
    for r in records.get("LabResultRecorded", ()):
        series.setdefault(r.code, []).append((r.occurred_at, _num(r.canonical_value), r.canonical_unit, r.flag))
    for r in records.get("DerivedResultRecorded", ()):
        if r.value is not None:
            series.setdefault(r.code, []).append((r.occurred_at, _num(r.value), r.unit, None))
    for r in records.get("TregPanelRecorded", ()):
        series.setdefault("TREGPCT", []).append((r.occurred_at, _num(r.treg_pct), "%", r.treg_flag))
    for points in series.values():
        points.sort(key=lambda p: p[0])
    return series


def key_labs(records: dict[str, list[Any]]) -> dict[str, dict[str, Any]]:
    found = {}
    series = lab_series(records)
    for code in KEY_LABS:
        points = series.get(code)
        if not points:
            continue
        at, value, unit, flag = points[-1]
        previous = points[-2][1] if len(points) > 1 else None
        trend = None
        if previous is not None:
            delta = Decimal(value) - Decimal(previous)
            trend = "up" if delta > 0 else "down" if delta < 0 else "same"
        found[code] = {"value": value, "unit": unit, "at": _iso(at), "flag": flag, "previous": previous, "trend": trend}
    return found


def next_visit(subject: Any, schedule: VisitSchedule) -> tuple[str, date, date, date] | None:
    """The first scheduled follow-up visit neither done nor recorded missed, with its target and window."""
    if subject.tx_date is None or subject.exited:
        return None
    for v in schedule.follow_up:
        if v.code not in subject.visit_outcomes:
            target = subject.tx_date + timedelta(days=v.target_day or 0)
            window = timedelta(days=v.window_days or 0)
            return v.code, target, target - window, target + window
    return None


def summarise(subject: Any, schedule: VisitSchedule) -> dict[str, Any]:
    """The patient-state row of a subject aggregate (also what `sle replay` prints)."""
    cyc, msc = subject.cyc, subject.msc
    records = current_records(subject)
    sledai = records.get("SledaiAssessed")
    renal = records.get("RenalResponseAssessed")
    aes = [ae for ae in subject.adverse_events.values() if not ae.voided]
    due = next_visit(subject, schedule)
    corrections = sum(1 for f in subject.facts.values() if f.type in ("Corrected", "Voided"))
    return {
        "subject": str(subject.id),
        "study": str(subject.study_id),
        "site": subject.site,
        "screening_number": subject.screening_number,
        "status": str(subject.status),
        "epoch": str(subject.epoch),
        "consent_version": subject.consent_version,
        "eligible_at": _iso(subject.eligible_at),
        "enrolled_at": _iso(subject.enrolled_at),
        "cyc_started_at": _iso(cyc.occurred_at) if cyc else None,
        "cyc_administered_mg": _num(cyc.administered_mg) if cyc else None,
        "msc_started_at": _iso(msc.occurred_at) if msc else None,
        "msc_lot": msc.lot_id if msc else None,
        "msc_dose_1e6_per_kg": _num(msc.dose_1e6_per_kg) if msc else None,
        "tx_date": _iso(subject.tx_date),
        "next_visit": due[0] if due else None,
        "next_visit_target": _iso(due[1]) if due else None,
        "next_visit_earliest": _iso(due[2]) if due else None,
        "next_visit_latest": _iso(due[3]) if due else None,
        "sledai_total": sledai[-1].total if sledai else None,
        "renal_response": renal[-1].status if renal else None,
        "open_adverse_events": sum(1 for ae in aes if ae.open),
        "open_serious_adverse_events": sum(1 for ae in aes if ae.open and ae.serious),
        "deviations": len(subject.deviations),
        "corrections": corrections,
        "flags": json.dumps([f for _, f in subject.flags]),
        "key_labs": json.dumps(key_labs(records), sort_keys=True),
        "stale_results": json.dumps(subject.stale_results()),
        "version": subject.version,
    }


class SubjectProjection(Projection):
    """Rows that are a function of one subject's state: keep every subject folded, and rewrite the rows of
    each subject a batch changed. A halted subject keeps its rows as of the version before the fact that
    halted it, and gets a `halted_streams` row saying which fact and why."""

    def __init__(self) -> None:
        self.folder = SubjectFolder()
        # During a rebuild, the subjects changed so far: their rows are written once, at the end, rather than
        # after every batch (a subject's rows cost more to compute the more facts it has).
        self.held: dict[str, tuple[Any, int]] | None = None
        self.held_halts: dict[str, HaltedStream] | None = None

    def share(self, folder: SubjectFolder) -> None:
        """Fold with `folder` (projections processed together fold each subject once)."""
        self.folder = folder

    def reset(self, conn: Connection) -> None:
        super().reset(conn)
        conn.execute(delete(halted_streams).where(halted_streams.c.projection == self.name))

    def forget(self) -> None:
        self.folder.clear()
        self.held = self.held_halts = None

    def hold_back(self) -> None:
        self.held, self.held_halts = {}, {}

    def flush(self, conn: Connection) -> None:
        held, halts = self.held, self.held_halts
        self.held = self.held_halts = None
        if held:
            self.write(conn, held)
        if halts:
            self.write_halts(conn, halts)

    def apply(self, conn: Connection, facts: Sequence[Fact]) -> None:
        changed: dict[str, tuple[Any, int]] = {} if self.held is None else self.held
        halts: dict[str, HaltedStream] = {} if self.held_halts is None else self.held_halts
        for fact in facts:
            subject = self.folder.apply(conn, fact)  # the aggregate is mutated in place, so held rows stay current
            if subject is not None:
                changed[fact.stream] = (subject, fact.position)
            elif fact.stream in self.folder.halted:
                halts[fact.stream] = self.folder.halted[fact.stream]
        if self.held is None:
            if changed:
                self.write(conn, changed)
            if halts:
                self.write_halts(conn, halts)

    @abstractmethod
    def write(self, conn: Connection, changed: dict[str, tuple[Any, int]]) -> None:
        """Replace the rows of the changed subjects: stream -> (subject, log position of its last fact)."""

    def write_halts(self, conn: Connection, halts: dict[str, HaltedStream]) -> None:
        t = halted_streams
        conn.execute(delete(t).where(t.c.projection == self.name, t.c.stream.in_(list(halts))))
        conn.execute(
            t.insert(),
            [
                {
                    "projection": self.name,
                    "stream": stream,
                    "study": h.study,
                    "subject": h.subject,
                    "version": h.halt.version,
                    "position": h.halt.position,
                    "detail": h.halt.detail,
                }
                for stream, h in halts.items()
            ],
        )


class PatientState(SubjectProjection):
    name = "patient_state"
    tables = (patient_state,)

    def write(self, conn: Connection, changed: dict[str, tuple[Any, int]]) -> None:
        schedules: dict[str, VisitSchedule] = {}
        rows = []
        for subject, position in changed.values():
            study = str(subject.study_id)
            if study not in schedules:
                schedules[study] = self.folder.study(study).config.visits
            rows.append(dict(summarise(subject, schedules[study]), position=position))
        conn.execute(delete(patient_state).where(patient_state.c.subject.in_(list(changed))))
        conn.execute(patient_state.insert(), rows)
