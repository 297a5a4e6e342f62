"""Source data verification and queries: the acts monitors, data managers and site staff perform *on* the record
(ICH E6(R3) §3.11 monitoring, 21 CFR 11.10(e)). They never go onto the subject's clinical stream, so they never
change the data they cover:

* **SDV** (``SourceVerification``): one stream per subject, id :meth:`SourceVerification.id_for`. A monitor marks
  facts of the subject's record (or single fields of them, or every fact of a visit) verified against the source.
  Each mark names the fact's version, type and the SHA-256 of its signed bytes, and the subject's version at the
  time: a correction recorded after it shows the fact as *changed since verified* until it is verified again.
* **Queries** (``Query``): one stream per query (a random id, or :meth:`Query.automatic_id` for automatic ones, so
  they are never raised twice). Raised on a fact (and field) by a monitor or data manager, answered by site staff,
  closed or re-opened by the raiser (and, for an automatic query, by a data manager). OPEN → ANSWERED → CLOSED,
  CLOSED → OPEN again by a re-opening.

:func:`check_act` is the one rule book for these acts: the verbs call it through their aggregates, and the store
calls it for events signed elsewhere (``StudyRecord.append``), so a refusal is the same either way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any
from uuid import UUID, uuid4, uuid5

from eventsourcing.domain import event
from pydantic import BaseModel, ConfigDict

from sle_events.domain import clock, formulas, visits
from sle_events.domain.base import TrialAggregate
from sle_events.domain.errors import (
    ActorMismatch,
    MissingValue,
    NotTheRaiser,
    QueryStateConflict,
    UnknownFact,
    UnknownQuery,
    UnknownSubject,
)
from sle_events.domain.roles import DATA_MANAGER
from sle_events.domain.study_config import DEFAULT_CONFIG, StudyConfig

__all__ = [
    "NOT_SOURCE_DATA",
    "AutomaticCause",
    "FactSdv",
    "Query",
    "QueryStatus",
    "SdvItem",
    "SdvStatus",
    "SourceVerification",
    "automatic_causes",
    "check_act",
    "fact_status",
    "sdv_progress",
    "sdv_status",
]

# Facts that are not source data: changes to other facts (verify the fact they changed) and computed results.
NOT_SOURCE_DATA = frozenset({"Corrected", "Voided", "DerivedResultRecorded"})


def _text(field: str, value: Any, action: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise MissingValue(field, action)
    return value.strip()


def _fact_of(subject: Any, version: int, field: str | None, *, source_data: bool) -> Any:
    """The subject's fact at ``version`` (and its field), or `UnknownFact` saying why there is none."""
    who = subject.screening_number
    fact = subject.facts.get(version) if isinstance(version, int) and not isinstance(version, bool) else None
    if fact is None:
        raise UnknownFact(who, version, f"the record has versions 1–{subject.version}")
    if source_data and fact.type in NOT_SOURCE_DATA:
        raise UnknownFact(who, version, f"a {fact.type} is not source data (verify the fact it changed or derived)")
    if source_data and fact.voided:
        raise UnknownFact(who, version, f"the {fact.type} was voided")
    if field is not None and (fact.record is None or field not in type(fact.record).model_fields):
        raise UnknownFact(who, version, f"a {fact.type} has no field {field!r}")
    return fact


# =========================================================================== source data verification
class SdvItem(BaseModel):
    """One mark: a fact of the subject's record (``field`` None: the whole fact) and the hash of its signed bytes."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    version: int
    type: str
    field: str | None
    hash: str


class SdvStatus(StrEnum):
    PENDING = "PENDING"  # never verified
    PARTIAL = "PARTIAL"  # some fields verified, not the whole fact
    VERIFIED = "VERIFIED"
    CHANGED = "CHANGED_SINCE_VERIFIED"  # corrected after it was verified, not verified again since


@dataclass(frozen=True)
class FactSdv:
    version: int
    type: str
    visit: str | None
    status: SdvStatus
    changed_fields: tuple[str, ...] = ()


class SourceVerification(TrialAggregate):
    """The SDV marks of one subject."""

    @staticmethod
    def id_for(study_id: UUID, subject_id: UUID) -> UUID:
        """The subject's SDV stream: one per subject, derived from its id (a second one is a conflict)."""
        return uuid5(study_id, f"sdv/{subject_id}")

    @classmethod
    def open(cls, study_id: UUID, subject: Any, occurred_at: datetime) -> SourceVerification:
        return cls._create(
            cls.Opened,  # type: ignore[attr-defined]  # the event class @event("Opened") builds
            id=cls.id_for(study_id, subject.id),
            study_id=study_id,
            subject_id=subject.id,
            screening_number=subject.screening_number,
            site=subject.site,
            occurred_at=occurred_at,
        )

    @event("Opened")
    def __init__(
        self, study_id: UUID, subject_id: UUID, screening_number: str, site: str, occurred_at: datetime
    ) -> None:
        self.study_id = study_id
        self.subject_id = subject_id
        self.screening_number = screening_number  # the subject's, for read models fed one stream at a time
        self.site = site
        # fact version -> field (None: the whole fact) -> the subject's version when it was verified
        self.marks: dict[int, dict[str | None, int]] = {}

    def verify(
        self,
        subject: Any,
        items: Iterable[tuple[int, str | None]],
        *,
        by: str,
        occurred_at: datetime,
        hash_of: Callable[[int], str],
        visit: str | None = None,
        config: StudyConfig = DEFAULT_CONFIG,
    ) -> list[SdvItem]:
        """Mark facts (or fields) of ``subject`` verified against the source. ``hash_of(version)`` gives the SHA-256
        of the fact's signed bytes. Refused: a fact that does not exist, was voided or is not source data."""
        formulas.check_not_in_future("occurred_at", occurred_at, clock.now(), settings=config.settings)
        if subject.id != self.subject_id:
            raise UnknownSubject(subject.id)
        marks: dict[tuple[int, str | None], SdvItem] = {}
        for version, field in items:
            fact = _fact_of(subject, version, field, source_data=True)
            marks[(version, field)] = SdvItem(version=version, type=fact.type, field=field, hash=hash_of(version))
        if not marks:
            raise MissingValue("facts to verify", "source data verification")
        built = [marks[k] for k in sorted(marks, key=lambda k: (k[0], k[1] or ""))]
        self._verified(
            subject_id=subject.id,
            subject_version=subject.version,
            items=built,
            visit=visit,
            by=_text("by", by, "SDV"),
            occurred_at=occurred_at,
        )
        return built

    @event("Verified")
    def _verified(
        self,
        subject_id: UUID,
        subject_version: int,
        items: list[SdvItem],
        visit: str | None,
        by: str,
        occurred_at: datetime,
    ) -> None:
        for item in items:
            self.marks.setdefault(item.version, {})[item.field] = subject_version


def visit_days(subject: Any) -> dict[Any, str]:
    """Day (site-local) -> the scheduled visit attended that day."""
    days = {}
    for visit, version in getattr(subject, "visit_versions", {}).items():
        fact = subject.facts.get(version)
        when = getattr(getattr(fact, "record", None), "occurred_at", None)
        if when is not None and not fact.voided:
            days[when.date()] = visit
    return days


def visit_of(fact: Any, days: Mapping[Any, str] | None = None) -> str | None:
    """The visit a fact belongs to: the one it names (visits, assessments), else the visit attended the day it
    happened (a lab result of that visit's specimen), else None."""
    visit = getattr(fact.record, "visit", None)
    if isinstance(visit, str):
        return visit
    when = getattr(fact.record, "occurred_at", None)
    return (days or {}).get(when.date()) if isinstance(when, datetime) else None


def facts_of_visit(subject: Any, visit: str) -> list[int]:
    """The source-data facts of one visit (what "verify the visit" marks)."""
    days = visit_days(subject)
    return [
        v
        for v, f in sorted(subject.facts.items())
        if f.type not in NOT_SOURCE_DATA and not f.voided and visit_of(f, days) == visit
    ]


def last_changes(subject: Any, fact: Any) -> dict[str, int]:
    """Field -> the subject's version of the last correction that changed it."""
    changed_by = getattr(subject, "changed_fields", {})
    return {name: c for c in fact.corrections for name in changed_by.get(c, ())}


def fact_status(last_changed: Mapping[str, int], marks: Mapping[str | None, int]) -> tuple[SdvStatus, tuple[str, ...]]:
    """A fact's SDV status from when each field last changed and its marks (field, None for the whole fact ->
    the subject's version when verified): a field changed after the mark that covers it is *changed since
    verified* until it (or the whole fact) is verified again."""
    whole = marks.get(None)
    changed = []
    for name, c in sorted(last_changed.items()):
        cover = max((x for x in (whole, marks.get(name)) if x is not None), default=None)
        if cover is not None and cover < c:
            changed.append(name)
    if changed:
        return SdvStatus.CHANGED, tuple(changed)
    if whole is not None:
        return SdvStatus.VERIFIED, ()
    return (SdvStatus.PARTIAL if marks else SdvStatus.PENDING), ()


def sdv_status(subject: Any, sdv: SourceVerification | None) -> list[FactSdv]:
    """Each source-data fact of the subject (not voided) with its SDV status (:func:`fact_status`)."""
    marks = sdv.marks if sdv is not None else {}
    days = visit_days(subject)
    out = []
    for v, f in sorted(subject.facts.items()):
        if f.type in NOT_SOURCE_DATA or f.voided:
            continue
        status, changed = fact_status(last_changes(subject, f), marks.get(v, {}))
        out.append(FactSdv(v, f.type, visit_of(f, days), status, changed))
    return out


def sdv_progress(facts: Iterable[FactSdv]) -> dict[str, int]:
    """Counts by status, with ``total`` and ``verified`` (fully, and not changed since)."""
    counts = {s.value: 0 for s in SdvStatus}
    for f in facts:
        counts[f.status.value] += 1
    counts["total"] = sum(counts.values())
    return counts


# =========================================================================== queries
class QueryStatus(StrEnum):
    OPEN = "OPEN"
    ANSWERED = "ANSWERED"
    CLOSED = "CLOSED"


class Query(TrialAggregate):
    """A question about one fact (or field) of a subject's record, and its thread of answers."""

    @staticmethod
    def automatic_id(study_id: UUID, subject_id: UUID, cause: str) -> UUID:
        """An automatic query's stream id: one per subject and cause, so re-running the checks raises nothing new."""
        return uuid5(study_id, f"auto-query/{subject_id}/{cause}")

    @classmethod
    def raise_on(
        cls,
        study_id: UUID,
        subject: Any,
        version: int,
        text: str,
        *,
        by: str,
        occurred_at: datetime,
        field: str | None = None,
        query_id: UUID | None = None,
        cause: str | None = None,
        config: StudyConfig = DEFAULT_CONFIG,
    ) -> Query:
        formulas.check_not_in_future("occurred_at", occurred_at, clock.now(), settings=config.settings)
        fact = _fact_of(subject, version, field, source_data=False)
        return cls._create(
            cls.Raised,  # type: ignore[attr-defined]  # the event class @event("Raised") builds
            id=query_id or uuid4(),
            study_id=study_id,
            subject_id=subject.id,
            screening_number=subject.screening_number,
            site=subject.site,
            version=version,
            fact=fact.type,
            field=field,
            text=_text("text", text, "a query"),
            by=_text("by", by, "a query"),
            cause=cause,
            occurred_at=occurred_at,
        )

    @event("Raised")
    def __init__(
        self,
        study_id: UUID,
        subject_id: UUID,
        screening_number: str,
        site: str,
        version: int,
        fact: str,
        field: str | None,
        text: str,
        by: str,
        cause: str | None,
        occurred_at: datetime,
    ) -> None:
        self.study_id = study_id
        self.subject_id = subject_id
        self.screening_number = screening_number  # the subject's, for read models fed one stream at a time
        self.site = site
        self.target_version = version
        self.fact = fact
        self.field = field
        self.text = text
        self.raised_by = by
        self.raised_at = occurred_at
        self.cause = cause
        self.status = QueryStatus.OPEN
        # (act, who, text, when) in order: raised, answered, closed, reopened
        self.thread: list[tuple[str, str, str, datetime]] = [("raised", by, text, occurred_at)]

    # --- verbs ------------------------------------------------------------------------------------------
    def answer(self, text: str, *, by: str, occurred_at: datetime, config: StudyConfig = DEFAULT_CONFIG) -> None:
        formulas.check_not_in_future("occurred_at", occurred_at, clock.now(), settings=config.settings)
        self.check_may("Query.Answered", by, None)
        self._answered(text=_text("text", text, "an answer"), by=by, occurred_at=occurred_at)

    def close(
        self, text: str, *, by: str, role: str, occurred_at: datetime, config: StudyConfig = DEFAULT_CONFIG
    ) -> None:
        formulas.check_not_in_future("occurred_at", occurred_at, clock.now(), settings=config.settings)
        self.check_may("Query.Closed", by, role)
        self._closed(text=_text("text", text, "closing a query"), by=by, occurred_at=occurred_at)

    def reopen(
        self, text: str, *, by: str, role: str, occurred_at: datetime, config: StudyConfig = DEFAULT_CONFIG
    ) -> None:
        formulas.check_not_in_future("occurred_at", occurred_at, clock.now(), settings=config.settings)
        self.check_may("Query.Reopened", by, role)
        self._reopened(text=_text("text", text, "re-opening a query"), by=by, occurred_at=occurred_at)

    def check_may(self, act: str, actor: str, role: str | None) -> None:
        """The query's state and raiser rule for an act (``Query.Answered``...): a specific refusal, or nothing."""
        if act == "Query.Answered":
            if self.status == QueryStatus.CLOSED:
                raise QueryStateConflict(self.id, "answered", self.status)
            return
        action = "close" if act == "Query.Closed" else "re-open"
        if act == "Query.Closed" and self.status == QueryStatus.CLOSED:
            raise QueryStateConflict(self.id, "closed again", self.status)
        if act == "Query.Reopened" and self.status != QueryStatus.CLOSED:
            raise QueryStateConflict(self.id, "re-opened", self.status)
        if actor != self.raised_by and not (self.cause is not None and role == DATA_MANAGER):
            raise NotTheRaiser(self.id, action, actor, self.raised_by)

    @event("Answered")
    def _answered(self, text: str, by: str, occurred_at: datetime) -> None:
        self.status = QueryStatus.ANSWERED
        self.thread.append(("answered", by, text, occurred_at))

    @event("Closed")
    def _closed(self, text: str, by: str, occurred_at: datetime) -> None:
        self.status = QueryStatus.CLOSED
        self.thread.append(("closed", by, text, occurred_at))

    @event("Reopened")
    def _reopened(self, text: str, by: str, occurred_at: datetime) -> None:
        self.status = QueryStatus.OPEN
        self.thread.append(("reopened", by, text, occurred_at))

    @property
    def is_open(self) -> bool:
        """Not closed (OPEN or ANSWERED): what blocks a lock."""
        return self.status != QueryStatus.CLOSED


# =========================================================================== automatic queries
@dataclass(frozen=True)
class AutomaticCause:
    """Something the record itself says needs a query: a stale derived result, an out-of-window visit, a flagged
    value. ``key`` names it stably (the query's id is derived from it)."""

    key: str
    version: int
    kind: str  # stale_result | out_of_window | flagged_value
    text: str


def automatic_causes(subject: Any) -> dict[str, AutomaticCause]:
    """Every cause for an automatic query the subject's record holds now."""
    found: dict[str, AutomaticCause] = {}
    for s in subject.stale_results():
        key = f"stale/v{s['version']}"
        inputs = ", ".join(f"v{i}" for i in s["changed_inputs"])
        found[key] = AutomaticCause(
            key,
            s["version"],
            "stale_result",
            f"{s['code']} at v{s['version']} was computed from {inputs}, changed since: derive or assess it again",
        )
    for version, flag in subject.flags:
        fact = subject.facts.get(version)
        if fact is None or fact.voided:
            continue
        key = f"flag/v{version}/{flag}"
        if flag == visits.OUT_OF_WINDOW:
            visit = visit_of(fact) or "the visit"
            found[key] = AutomaticCause(
                key, version, "out_of_window", f"{visit} at v{version} is out of its window: confirm the date"
            )
        else:
            found[key] = AutomaticCause(
                key, version, "flagged_value", f"{fact.type} at v{version} is flagged {flag}: confirm or correct it"
            )
    return found


# =========================================================================== the one rule book
def check_act(
    name: str,
    payload: Mapping[str, Any],
    *,
    actor: str,
    role: str,
    stream: UUID,
    study_id: UUID,
    before: Any,
    subject: Any,
    hash_of: Callable[[int], str] | None,
) -> None:
    """Refuse an SDV or query event (signed anywhere) that its verb would have refused. ``before`` is the stream's
    aggregate before this event (None for a new stream), ``subject`` the subject it concerns (None if unknown),
    ``hash_of(version)`` the hash of the subject's stored fact. Raises a `ProtocolViolation`."""
    if payload.get("by") is not None and payload.get("by") != actor:
        raise ActorMismatch(str(payload.get("by")), actor)
    if subject is not None and "screening_number" in payload:
        named = (payload["screening_number"], payload["site"])
        if named != (subject.screening_number, subject.site):
            raise UnknownSubject(f"{named[0]} at {named[1]} (subject {subject.id} is {subject.screening_number})")
    if name == "Query.Raised":
        if subject is None:
            raise UnknownSubject(payload.get("subject_id"))
        fact = _fact_of(subject, payload["version"], payload["field"], source_data=False)
        if fact.type != payload["fact"]:
            raise UnknownFact(
                subject.screening_number, payload["version"], f"it is a {fact.type}, not {payload['fact']}"
            )
        cause = payload["cause"]
        if cause is not None and stream != Query.automatic_id(study_id, subject.id, cause):
            # an automatic query's id is its cause's: so it is raised once, and only then may a data manager close it
            raise UnknownQuery(f"{stream} (an automatic query's id is derived from its subject and cause {cause!r})")
        return
    if name.startswith("Query."):
        if not isinstance(before, Query):
            raise UnknownQuery(stream)
        before.check_may(name, actor, role)
        return
    if name == "SourceVerification.Opened":
        if subject is None:
            raise UnknownSubject(payload.get("subject_id"))
        if stream != SourceVerification.id_for(study_id, subject.id):
            raise UnknownFact(subject.screening_number, 0, "a subject's SDV stream id is derived from its id")
        return
    if name == "SourceVerification.Verified":
        if not isinstance(before, SourceVerification):
            raise UnknownSubject(stream)
        if subject is None or subject.id != before.subject_id or payload["subject_id"] != str(before.subject_id):
            raise UnknownSubject(payload["subject_id"])
        if not isinstance(payload["subject_version"], int) or not (0 < payload["subject_version"] <= subject.version):
            raise UnknownFact(
                subject.screening_number, payload["subject_version"], "the subject's record has no such version yet"
            )
        if not payload["items"]:
            raise MissingValue("facts to verify", "source data verification")
        for item in payload["items"]:
            version = item["version"]
            fact = _fact_of(subject, version, item["field"], source_data=True)
            if version > payload["subject_version"]:
                raise UnknownFact(subject.screening_number, version, "it was recorded after the version verified")
            if fact.type != item["type"]:
                raise UnknownFact(subject.screening_number, version, f"it is a {fact.type}, not {item['type']}")
            if hash_of is not None and hash_of(version) != item["hash"]:
                raise UnknownFact(subject.screening_number, version, "its signed bytes are not the ones verified")
