"""What an export covers: one subject, one site, a window of recording times (or all of the study).

Stable API (the ODM, SDTM, FHIR and PDF exports build on it):

* ``ExportScope(subject=None, site=None, recorded_from=None, recorded_to=None, study=None)``: what was asked
  (a subject by id or screening number, a site id, times with their offset). ``recorded_from`` is inclusive,
  ``recorded_to`` exclusive; both compare with the event's ``recorded_at`` (when it entered the record).
* ``ExportScope.resolve(url) -> ExportScope``: checked against the record at ``url`` (no write): an unknown
  subject, site or study, a subject of another site, a reversed or offset-less window is an
  ``ExportScopeError`` saying which (the CLI maps it to exit 2 and writes nothing). The resolved scope carries
  the study's id and code and, for ``--subject``, the subject's stream id and screening number.
* ``scope.covers_subject(site, subject_id=None) -> bool``, ``scope.covers_time(recorded_at) -> bool`` and
  ``scope.covers(envelope, site) -> bool``: whether an event (its envelope dict) of a subject at ``site`` is in.
  Study events (configuration, keys) are not subject data: exports take what they need of them regardless.
* ``scope.to_dict()`` / ``ExportScope.from_dict(doc)``: the form signed into the export manifest.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import sqlalchemy as sa

__all__ = ["ExportScope", "ExportScopeError", "SubjectRef", "study_subjects"]


class ExportScopeError(ValueError):
    """The scope names nothing in the record, or makes no sense (reversed window, time without offset)."""


@dataclass(frozen=True)
class SubjectRef:
    """A subject as its first event (``Subject.Screened``) recorded it."""

    id: str  # the subject's stream id (UUID text)
    screening_number: str
    site: str


@dataclass(frozen=True)
class ExportScope:
    subject: str | None = None  # as asked: a stream id or a screening number
    site: str | None = None
    recorded_from: datetime | None = None  # inclusive
    recorded_to: datetime | None = None  # exclusive
    study: str | None = None  # the study's id or code; None: the record's only study
    # Filled in by `resolve`:
    study_id: str | None = field(default=None, compare=False)
    study_code: str | None = field(default=None, compare=False)
    subject_id: str | None = field(default=None, compare=False)
    screening_number: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        for name in ("recorded_from", "recorded_to"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, datetime) or value.tzinfo is None):
                raise ExportScopeError(f"{name} {value!r} needs a UTC offset (e.g. 2008-03-01T00:00:00+08:00)")
        if self.recorded_from is not None and self.recorded_to is not None and self.recorded_to <= self.recorded_from:
            raise ExportScopeError(
                f"the window is reversed or empty: --from {self.recorded_from.isoformat()} is not before "
                f"--to {self.recorded_to.isoformat()}"
            )
        for name in ("subject", "site", "study"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ExportScopeError(f"{name} must be a non-blank id when given")

    @property
    def resolved(self) -> bool:
        return self.study_id is not None

    @property
    def whole_study(self) -> bool:
        return self.subject is None and self.site is None and self.recorded_from is None and self.recorded_to is None

    # --- membership -------------------------------------------------------------------------------------
    def covers_subject(self, site: str | None, subject_id: str | None = None) -> bool:
        """Whether a subject (its stream id) at ``site`` is in scope."""
        if self.site is not None and site != self.site:
            return False
        if self.subject is not None:
            wanted = self.subject_id if self.subject_id is not None else self.subject
            return subject_id is not None and str(subject_id) == wanted
        return True

    def covers_time(self, recorded_at: datetime | str) -> bool:
        when = datetime.fromisoformat(recorded_at) if isinstance(recorded_at, str) else recorded_at
        if self.recorded_from is not None and when < self.recorded_from:
            return False
        return not (self.recorded_to is not None and when >= self.recorded_to)

    def covers(self, envelope: dict[str, Any], site: str | None) -> bool:
        """Whether a subject's event (its signed envelope) is in scope; ``site`` is the subject's site."""
        return self.covers_subject(site, envelope.get("stream")) and self.covers_time(envelope["recorded_at"])

    # --- the manifest's form ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON (no floats, times ISO 8601 with offset) as signed into the manifest."""
        return {
            "study": self.study_code or self.study,
            "study_id": self.study_id,
            "subject": self.screening_number or self.subject,
            "subject_id": self.subject_id,
            "site": self.site,
            "recorded_from": None if self.recorded_from is None else self.recorded_from.isoformat(),
            "recorded_to": None if self.recorded_to is None else self.recorded_to.isoformat(),
        }

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> ExportScope:
        def when(key: str) -> datetime | None:
            text = doc.get(key)
            return None if text is None else datetime.fromisoformat(text)

        return cls(
            subject=doc.get("subject"),
            site=doc.get("site"),
            recorded_from=when("recorded_from"),
            recorded_to=when("recorded_to"),
            study=doc.get("study"),
            study_id=doc.get("study_id"),
            study_code=doc.get("study"),
            subject_id=doc.get("subject_id"),
            screening_number=doc.get("subject") if doc.get("subject_id") else None,
        )

    def describe(self) -> str:
        """One line for people: `subject NJ01-0007, recorded 2008-01-01T00:00:00+00:00 →`."""
        parts = []
        if self.subject is not None:
            parts.append(f"subject {self.screening_number or self.subject}")
        if self.site is not None:
            parts.append(f"site {self.site}")
        if self.recorded_from or self.recorded_to:
            lo = self.recorded_from.isoformat() if self.recorded_from else ""
            hi = self.recorded_to.isoformat() if self.recorded_to else ""
            parts.append(f"recorded {lo} → {hi}".strip())
        return ", ".join(parts) or f"the whole study {self.study_code or ''}".strip()

    # --- checking against the record ---------------------------------------------------------------------
    def resolve(self, url: str) -> ExportScope:
        """This scope checked against the record at ``url`` and filled in (see the module docstring)."""
        engine = sa.create_engine(url)
        try:
            with engine.connect() as conn:
                study_id, study_code = _one_study(conn, self.study)
                sites = _sites(conn, study_id)
                subjects = study_subjects(conn, study_id)
        finally:
            engine.dispose()
        if self.site is not None and self.site not in sites:
            raise ExportScopeError(
                f"unknown site {self.site!r}; the study's sites are {', '.join(sorted(sites)) or 'none'}"
            )
        subject_id = number = None
        if self.subject is not None:
            wanted = self.subject.strip()
            found = [s for s in subjects.values() if wanted in (s.id, s.screening_number)]
            if not found:
                raise ExportScopeError(f"unknown subject {wanted!r}: no subject with that id or screening number")
            ref = found[0]
            if self.site is not None and ref.site != self.site:
                raise ExportScopeError(f"subject {ref.screening_number} is at site {ref.site}, not {self.site}")
            subject_id, number = ref.id, ref.screening_number
        return replace(self, study_id=study_id, study_code=study_code, subject_id=subject_id, screening_number=number)


def _events() -> sa.Table:
    from sle_events.ledger.tables import events_table

    return events_table()


def _envelopes(conn: sa.Connection, name: str) -> list[dict[str, Any]]:
    from sle_events.domain.event_types import stored_topics
    from sle_events.signing.envelope import open_sealed

    ev = _events()
    rows = conn.execute(sa.select(ev.c.state).where(ev.c.topic.in_(stored_topics(name))).order_by(ev.c.id)).scalars()
    return [open_sealed(bytes(r)).envelope for r in rows]


def _one_study(conn: sa.Connection, wanted: str | None) -> tuple[str, str]:
    studies = [(env["stream"], env["payload"].get("code", "")) for env in _envelopes(conn, "Study.Created")]
    if not studies:
        raise ExportScopeError("the record holds no study")
    if wanted is not None:
        found = [s for s in studies if wanted in s]
        if not found:
            raise ExportScopeError(f"unknown study {wanted!r}; the record holds {', '.join(c for _, c in studies)}")
        return found[0]
    if len(studies) > 1:
        raise ExportScopeError(
            f"the record holds {len(studies)} studies: name one ({', '.join(c for _, c in studies)})"
        )
    return studies[0]


def _sites(conn: sa.Connection, study_id: str) -> set[str]:
    return {env["payload"]["site_id"] for env in _envelopes(conn, "Study.SiteAdded") if env["stream"] == study_id}


def study_subjects(conn: sa.Connection, study_id: str) -> dict[str, SubjectRef]:
    """Every subject of the study by stream id, from its ``Subject.Screened`` event (site, screening number)."""
    out: dict[str, SubjectRef] = {}
    for env in _envelopes(conn, "Subject.Screened"):
        if env["study"] == study_id:
            p = env["payload"]
            out[env["stream"]] = SubjectRef(env["stream"], p["screening_number"], p["site"])
    return out
