"""The trial's names for its facts: what a signed envelope's ``type`` and the events table's ``topic`` say.

A name is ``<Record>.<Fact>``: the record (``Study``, ``Subject``, ``ProductLot``) and the fact in the past
tense, as the protocol and the study's permission table (signed into every ``Study.Created``) already call
them: ``Subject.LabResultRecorded``. Each is written here once and never changes, whatever the classes are
called or wherever they move: the record outlives the code, and a regulator reads these names, not our
modules. A new fact gets a new name; a changed payload gets a new schema version (``class_version`` and an
``upcast_vN_vN+1``), not a new name.

Events signed before 2026-12-06 named their type by Python path (``sle_events.domain.subject:Subject.Screened``).
Those exact strings stay readable as aliases of the names (``LEGACY_TOPICS``), so old databases still verify,
load and project.
"""

from __future__ import annotations

from typing import Any

from sle_events.domain.casebook import Casebook
from sle_events.domain.product import ProductLot
from sle_events.domain.review import Query, SourceVerification
from sle_events.domain.study import Study
from sle_events.domain.subject import Subject

__all__ = [
    "EVENT_TYPES",
    "LEGACY_TOPICS",
    "UnknownEventName",
    "event_class",
    "name_of",
    "register_event_type",
    "stored_topics",
    "type_name",
]


class UnknownEventName(LookupError):
    """A stored or sent event type that names no fact of this trial."""

    def __init__(self, name: str):
        self.name = name
        super().__init__(f"unknown event type {name!r}: not one of the trial's {len(EVENT_TYPES)} event names")


def _facts(record: str, aggregate: type, facts: str) -> dict[str, type]:
    return {f"{record}.{fact}": getattr(aggregate, fact) for fact in facts.split()}


#: name -> event class. The left-hand names are the stable part; the classes may move.
EVENT_TYPES: dict[str, type] = {
    **_facts(
        "Study",
        Study,
        """
        Created KeyRegistered KeyRotated KeyRevoked PermissionsChanged NewStudyApproved
        SiteAdded SiteClosed IcfVersionApproved VisitScheduleDefined SettingsAdopted""",
    ),
    **_facts(
        "Subject",
        Subject,
        """
        Screened Rescreened ConsentObtained ScreenFailed DemographicsRecorded MedicalHistoryRecorded
        ClassificationRecorded BiopsyRecorded EligibilityConfirmed Enrolled
        Admitted Discharged VitalSignsRecorded PregnancyTestRecorded CyclophosphamideGiven MSCInfused
        TransplantNotPerformed
        LabResultRecorded DerivedResultRecorded RenalResponseAssessed TregPanelRecorded SledaiAssessed
        TeamEvaluationRecorded
        VisitRecorded VisitMissed UnscheduledVisitRecorded MainStudyCompleted ContactAttempted
        AdverseEventReported AdverseEventAssessed ExpectednessAssessed SeriousAdverseEventReported
        AdverseEventFollowedUp ConcomitantMedicationRecorded DeviationRecorded
        Corrected Voided
        Withdrawn LostToFollowUp Returned DeathRecorded StudyCompleted""",
    ),
    **_facts("ProductLot", ProductLot, "ReleaseTested Infused"),
    # investigator sign-off, freeze, lock and unlock (regulated acts on their own stream, never the subject's)
    **_facts("Casebook", Casebook, "Opened SignedOff Frozen Locked Unlocked"),
    # source data verification and queries (sle_events/domain/review.py): never on the subject's own stream
    **_facts("SourceVerification", SourceVerification, "Opened Verified"),
    **_facts("Query", Query, "Raised Answered Closed Reopened"),
}

# Where each record's classes lived when types were Python paths (fixed strings: they describe stored bytes).
_LEGACY_MODULES = {
    "Study": "sle_events.domain.study",
    "Subject": "sle_events.domain.subject",
    "ProductLot": "sle_events.domain.product",
}
_NAMED_SINCE = {"Study.NewStudyApproved"}  # facts added after stable names: they never had a Python path
_NAMED_SINCE |= {f"Casebook.{fact}" for fact in ("Opened", "SignedOff", "Frozen", "Locked", "Unlocked")}
_NAMED_SINCE |= {n for n in EVENT_TYPES if n.split(".", 1)[0] in ("SourceVerification", "Query")}
#: old stored topic -> name
LEGACY_TOPICS: dict[str, str] = {
    f"{_LEGACY_MODULES[name.split('.', 1)[0]]}:{name}": name for name in EVENT_TYPES if name not in _NAMED_SINCE
}
_NAMES: dict[type, str] = {cls: name for name, cls in EVENT_TYPES.items()}


def name_of(event_or_class: Any) -> str:
    """The stable name of an event (or event class)."""
    cls = event_or_class if isinstance(event_or_class, type) else type(event_or_class)
    try:
        return _NAMES[cls]
    except KeyError:
        raise UnknownEventName(cls.__qualname__) from None


def type_name(topic: str) -> str:
    """The stable name behind a stored topic or envelope type (a name, or a legacy alias)."""
    if topic in EVENT_TYPES:
        return topic
    try:
        return LEGACY_TOPICS[topic]
    except KeyError:
        raise UnknownEventName(topic) from None


def event_class(topic: str) -> type:
    """The event class of a name or legacy alias. Only registered names resolve: nothing is imported."""
    return EVENT_TYPES[type_name(topic)]


def stored_topics(of: str) -> list[str]:
    """Every topic that events of a record (``Study``) or of one name (``Subject.Screened``) may be stored under
    (names and legacy aliases), for SQL ``IN``."""
    names = [n for n in EVENT_TYPES if n == of or n.startswith(of + ".")]
    return names + [t for t, n in LEGACY_TOPICS.items() if n in names]


def register_event_type(name: str, cls: type) -> None:
    """Name one more event class (an extension's fact, a test's). A name, once given, is never moved."""
    if EVENT_TYPES.get(name, cls) is not cls or _NAMES.get(cls, name) != name:
        raise ValueError(f"{name} or {cls.__qualname__} already has another registration")
    EVENT_TYPES[name] = cls
    _NAMES[cls] = name
