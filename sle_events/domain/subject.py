"""A trial subject, from screening to the end of follow-up (PROTOCOL §3–§8).

The public methods are the trial's verbs (``screen``, ``obtain_consent``, ``confirm_eligibility``, ``enroll``,
``give_pretreatment``, ``infuse_msc``, ``record_lab_result``, ``withdraw``...). Each checks the protocol and
raises a specific :class:`~sle_events.domain.errors.ProtocolViolation` **before** any event exists; only then
does it trigger one or more past-tense facts (``Subject.ConsentObtained``, ``Subject.LabResultRecorded``...).
The ``@event`` methods below each verb apply the fact to the state and never refuse.

Every verb takes ``config`` (:class:`~sle_events.domain.study_config.StudyConfig`): the study's settings,
sites, ICF versions and visit schedule. The pure checks live in sibling modules, named for what they check:
``lab_results`` (analytes, units, bounds, ranges, derived eGFR/UPCR), ``treatment`` (stay, CYC, MSC),
``eligibility`` (§4 checklist, 2019 EULAR/ACR score), ``visits`` (windows), ``adverse_events`` (grade,
seriousness, relatedness, SAE clock) and ``corrections`` (R11). This module holds the state machine and the
ordering rules R1–R8 that need the subject's history.

Who may record each fact is not checked here: the store refuses a signer whose role may not record the event
type (R10, ``sle_events.domain.roles``).

``Subject.screen(...)`` is the screening verb (T1 checks, a stream id per screening number). Calling
``Subject(study_id, site, screening_number, occurred_at)`` directly records the ``Screened`` fact without those
checks, with a random id; it is kept for the storage tests that only need a stream.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any, cast
from uuid import UUID, uuid5

from eventsourcing.domain import event

from sle_events.domain import bounds, clock, corrections, formulas, lab_results, treatment, visits
from sle_events.domain.adverse_events import AdverseEventState, check_assessment, check_grade, require_text
from sle_events.domain.base import TrialAggregate
from sle_events.domain.eligibility import (
    CLASSIFICATION_VERSION,
    Classification,
    check_checklist,
    check_failed_criteria,
    classify_2019,
)
from sle_events.domain.errors import (
    AdverseEventBeforeConsent,
    AlreadyAdmitted,
    AlreadyConsented,
    CompletionNotDue,
    ConsentRequired,
    DeathBeforeLastKnownAlive,
    DischargeBeforeInfusionEnd,
    DuplicatePretreatment,
    EligibilityExpired,
    EnrollmentBeforeEligibility,
    IcfNotApproved,
    InconsistentAssessment,
    InconsistentTimestamps,
    InvalidChoice,
    InvalidTransition,
    LostToFollowUpNotDue,
    LotNotReleased,
    MeasurementMissing,
    MissingValue,
    NotAdmitted,
    NotAllowedAfterExit,
    NotCorrectable,
    PregnancyTestRequired,
    ProtocolViolation,
    ReasonRequired,
    ReconsentRequired,
    RescreenNotAllowed,
    SiteNotActive,
    UnknownAdverseEvent,
    UnknownEventVersion,
    UnknownVisit,
    VisitAlreadyRecorded,
    VisitBeforeTransplant,
)
from sle_events.domain.labs import get_analyte
from sle_events.domain.lifecycle import EXITED, ON_TREATMENT, POST_CONSENT, WITHDRAWABLE, AfterExit, Epoch
from sle_events.domain.lifecycle import SubjectStatus as S
from sle_events.domain.payloads import (
    AdverseEventEntry,
    AeAction,
    AeOutcome,
    BiopsyClass,
    ConcomitantMedication,
    DecidedBy,
    Demographics,
    DerivedResult,
    DeviationCategory,
    Discipline,
    Disposition,
    EligibilityChecklist,
    Expectedness,
    Infusion,
    LabResult,
    MedicalHistoryItem,
    PregnancyResult,
    PregnancyTest,
    Pretreatment,
    Record,
    RenalResponse,
    Seriousness,
    Sex,
    SignedBy,
    SledaiAssessment,
    TregPanel,
    VisitRecord,
    VitalSigns,
    codes,
)
from sle_events.domain.quantities import parse_optional_decimal
from sle_events.domain.sledai2k import get_descriptor
from sle_events.domain.study_config import DEFAULT_CONFIG, StudyConfig, VisitKind

__all__ = ["Subject", "Fact", "Stay", "ProtocolError", "ARM"]

#: the single arm (PROTOCOL §1)
ARM = "CYCMSC"
#: the in-patient stay outside 3–5 days (R6)
STAY_FLAG = "STAY_OUTSIDE_NORMAL_LENGTH"
BASELINE_FLAG = "BASELINE_SPECIMENS_MISSING"
TNP_FLAG = "TRANSPLANT_NOT_PERFORMED"
TEAM_FLAG = "TEAM_INCOMPLETE"
AE_SERIOUSNESS_FLAG = "PROLONGED_STAY_AE_NOT_SERIOUS"

#: the first, minimal Subject raised ProtocolError; every refusal is now a specific ProtocolViolation
ProtocolError = ProtocolViolation

_VITAL_BOUNDS = {
    "height_cm": "height",
    "weight_kg": "weight",
    "temperature_c": "temperature",
    "systolic_bp": "systolic_bp",
    "diastolic_bp": "diastolic_bp",
    "heart_rate": "heart_rate",
}


# `Fact.record` is typed as the union of every record class; which one it holds follows from `Fact.type`.
# Code that reads a fact of a known type says so with `# type: ignore[...]` (record type follows fact.type).
@dataclass
class Fact:
    """One event of the subject's stream as the subject remembers it: its type, its current record
    (for facts that carry one) and what corrections or a void did to it."""

    type: str
    record: Record | None = None
    voided: bool = False
    corrections: list[int] = field(default_factory=list)


@dataclass
class Stay:
    admitted_at: datetime
    admission_version: int
    discharged_at: datetime | None = None
    length_of_stay_days: int | None = None


def _day(when: date | datetime) -> date:
    return when.date() if isinstance(when, datetime) else when


def _fields(record: Record) -> dict[str, Any]:
    """A record's fields as event attributes (without ``occurred_at``; tuples as the lists events carry)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in record.model_dump(exclude={"occurred_at"}).items()}


def _in(at: datetime, stay: Stay) -> bool:
    return stay.admitted_at <= at and (stay.discharged_at is None or at <= stay.discharged_at)


class Subject(TrialAggregate):
    """One subject's record. Read the verbs top to bottom in the order the protocol uses them."""

    # =================================================================== screening (T1) and re-screening
    @staticmethod
    def id_for(study_id: UUID, screening_number: str) -> UUID:
        """The subject's stream id: one per screening number in a study, so a second screening under the same
        number is a version conflict in the store even when two writers race (T1 "unique")."""
        return uuid5(study_id, f"subject/{screening_number}")

    @classmethod
    def screen(
        cls,
        study_id: UUID,
        site: str,
        screening_number: str,
        occurred_at: datetime,
        *,
        config: StudyConfig,
        rescreen_of: Subject | None = None,
    ) -> Subject:
        """T1: register a screened subject at an active site. ``rescreen_of`` links a re-screening of a screen
        failure (allowed ``settings.rescreen_max`` times); the old stream records the link in the same batch."""
        formulas.check_not_in_future("occurred_at", occurred_at, clock.now(), settings=config.settings)
        if not isinstance(screening_number, str) or not screening_number.strip():
            raise MissingValue("a screening number", "screening")
        if not config.site(site).active:
            raise SiteNotActive(site)
        number = 0
        if rescreen_of is not None:
            if rescreen_of.status != S.SCREEN_FAILED:
                raise RescreenNotAllowed(
                    f"subject {rescreen_of.screening_number} is {rescreen_of.status}, not SCREEN_FAILED"
                )
            if rescreen_of.rescreened_as is not None:
                raise RescreenNotAllowed(f"subject {rescreen_of.screening_number} was already re-screened")
            number = rescreen_of.rescreen_number + 1
            if number > config.settings.rescreen_max:
                raise RescreenNotAllowed(f"a subject may be re-screened {config.settings.rescreen_max} time(s)")
            if occurred_at < rescreen_of.exited_at:  # type: ignore[operator]  # record type follows fact.type (see Fact)
                raise InconsistentTimestamps("screen failure", rescreen_of.exited_at, "re-screening", occurred_at)
        subject = cls._create(
            cls.Screened,  # type: ignore[attr-defined]  # the event class @event("Screened") builds
            id=cls.id_for(study_id, screening_number.strip()),
            study_id=study_id,
            site=site,
            screening_number=screening_number.strip(),
            occurred_at=occurred_at,
            rescreen_of=None if rescreen_of is None else rescreen_of.id,
            rescreen_number=number,
        )
        if rescreen_of is not None:
            rescreen_of._rescreened(new_subject=subject.id, occurred_at=occurred_at)
        return subject

    @event("Screened")
    def __init__(
        self,
        study_id: UUID,
        site: str,
        screening_number: str,
        occurred_at: datetime,
        rescreen_of: UUID | None = None,
        rescreen_number: int = 0,
    ) -> None:
        self.study_id = study_id
        self.site = site
        self.screening_number = screening_number
        self.screened_at = occurred_at
        self.rescreen_of = rescreen_of
        self.rescreen_number = rescreen_number
        self.rescreened_as: UUID | None = None
        self.status = S.SCREENED
        self.epoch = Epoch.SCREENING
        self.facts: dict[int, Fact] = {1: Fact("Screened")}
        # consent
        self.consent_version: str | None = None
        self.consented_at: datetime | None = None
        self.consented_versions: list[str] = []
        # screening data
        self.demographics_version: int | None = None
        self.classification: Classification | None = None
        self.biopsy: tuple[BiopsyClass, date] | None = None
        self.eligibility: EligibilityChecklist | None = None
        self.eligible_at: datetime | None = None
        self.failed_criteria: tuple[str, ...] = ()
        self.enrolled_at: datetime | None = None
        # treatment
        self.stays: list[Stay] = []
        self.cyc_version: int | None = None
        self.msc_version: int | None = None
        self.transplant_not_performed: str | None = None
        # follow-up
        self.visit_outcomes: dict[str, str] = {}  # code → "attended" | "missed"
        self.visit_versions: dict[str, int] = {}
        self.unscheduled: list[tuple[int, Decimal]] = []
        self.contact_attempts: list[tuple[int, datetime]] = []
        self.main_study_completed_at: datetime | None = None
        self.adverse_events: dict[str, AdverseEventState] = {}
        self.deviations: dict[int, dict[str, Any]] = {}
        self.flags: list[tuple[int, str]] = []
        # Correction version -> the fields it changed (source data verification: "changed since verified").
        self.changed_fields: dict[int, tuple[str, ...]] = {}
        # disposition
        self.exited_at: datetime | None = None
        self.withdrawal: dict[str, Any] | None = None
        self.safety_follow_up_agreed = False
        self.died_at: datetime | None = None
        self.completed_at: datetime | None = None
        self.ltfu_at: datetime | None = None

    @event("Rescreened")
    def _rescreened(self, new_subject: UUID, occurred_at: datetime) -> None:
        self._fact("Rescreened")
        self.rescreened_as = new_subject

    # =================================================================== shared checks
    def _fact(self, type_: str, record: Record | None = None) -> int:
        """Remember the fact being applied (during an ``@event`` method the new version is version + 1)."""
        version = self.version + 1
        self.facts[version] = Fact(type_, record)
        return version

    def _status_in(self, action: str, allowed: Iterable[S], hint: str = "") -> None:
        allowed = list(allowed)
        if self.status not in allowed:
            raise InvalidTransition(action, self.status, [a.value for a in allowed], hint)

    def _at(
        self,
        action: str,
        occurred_at: datetime,
        config: StudyConfig,
        *,
        consent: bool = True,
        reconsent: bool = True,
        after_exit: AfterExit = AfterExit.NEVER,
    ) -> None:
        """The time rules every fact obeys: a UTC offset and not in the future (R9), not before consent
        (R1), re-consent after a new ICF version (R1), and R8 once the subject is out of the study."""
        formulas.check_not_in_future("occurred_at", occurred_at, clock.now(), settings=config.settings)
        if occurred_at < self.screened_at:
            raise InconsistentTimestamps("screened_at", self.screened_at, f"{action} occurred_at", occurred_at)
        if consent and (self.consented_at is None or occurred_at < self.consented_at):
            raise ConsentRequired(action, occurred_at, self.consented_at)
        if self.exited_at is not None and occurred_at >= self.exited_at:
            allowed = (
                after_exit == AfterExit.ALWAYS
                or (after_exit == AfterExit.SAFETY and self.status == S.WITHDRAWN and self.safety_follow_up_agreed)
                or (after_exit == AfterExit.CONTACT and self.status == S.LOST_TO_FOLLOW_UP)
            )
            if not allowed:
                detail = (
                    "no safety follow-up was agreed"
                    if self.status == S.WITHDRAWN and after_exit == AfterExit.SAFETY
                    else ""
                )
                raise NotAllowedAfterExit(action, self.status, self.exited_at, detail)
            return
        if reconsent and self.consented_at is not None:
            current = config.icf_in_effect(occurred_at)
            if current is not None and current.version not in self.consented_versions:
                raise ReconsentRequired(action, occurred_at, current.version, self.consented_versions)

    def _current(self, version: int, *types: str) -> Record:
        fact = self.facts.get(version)
        if fact is None or fact.record is None or (types and fact.type not in types):
            raise UnknownEventVersion(version)
        if fact.voided:
            raise NotCorrectable(version, fact.type, "it was voided")
        return fact.record

    def records(self, *types: str) -> list[tuple[int, Record]]:
        """(version, current record) of every fact of these types that is not voided, in stream order."""
        return [
            (v, f.record)
            for v, f in sorted(self.facts.items())
            if f.type in types and not f.voided and f.record is not None
        ]

    # =================================================================== consent (T2) and screen failure (T3, T5)
    def obtain_consent(
        self,
        icf_version: str,
        occurred_at: datetime,
        *,
        config: StudyConfig,
        taken_by: str,
        signed_by: SignedBy | str = SignedBy.SUBJECT,
    ) -> None:
        """T2 (first consent) or a re-consent to a new ICF version. The version must be approved and the one in
        effect at ``occurred_at``; who took the consent and who signed are recorded."""
        first = self.status == S.SCREENED
        if not first:
            self._status_in(
                "re-consent",
                [S.CONSENTED, S.ELIGIBLE, *ON_TREATMENT],
                "consent is taken from a SCREENED subject; later only re-consent to a new ICF version",
            )
        formulas.check_not_in_future("occurred_at", occurred_at, clock.now(), settings=config.settings)
        if occurred_at < self.screened_at:
            raise InconsistentTimestamps("screened_at", self.screened_at, "consent", occurred_at)
        if not first and occurred_at < self.consented_at:  # type: ignore[operator]  # record type follows fact.type (see Fact)
            raise InconsistentTimestamps("first consent", self.consented_at, "re-consent", occurred_at)
        current = config.icf_in_effect(occurred_at)
        if current is None or current.version != icf_version:
            raise IcfNotApproved(icf_version, occurred_at, None if current is None else current.version)
        if icf_version in self.consented_versions:
            raise AlreadyConsented(icf_version)
        taken_by = require_text("taken_by (who took the consent)", taken_by, "consent")
        signed = codes(SignedBy, "signed_by", signed_by)
        self._consent_obtained(
            icf_version=icf_version, taken_by=taken_by, signed_by=signed, reconsent=not first, occurred_at=occurred_at
        )

    @event("ConsentObtained")
    def _consent_obtained(
        self, icf_version: str, taken_by: str, signed_by: SignedBy, reconsent: bool, occurred_at: datetime
    ) -> None:
        self._fact("ConsentObtained")
        self.consent_version = icf_version
        self.consented_versions.append(icf_version)
        if self.consented_at is None:
            self.consented_at = occurred_at
        if self.status == S.SCREENED:
            self.status = S.CONSENTED

    def screen_fail(
        self,
        occurred_at: datetime,
        *,
        config: StudyConfig = DEFAULT_CONFIG,
        reason: str,
        failed_criteria: Iterable[str] = (),
    ) -> None:
        """T3 (before consent: a reason such as consent declined) or T5 (after consent, before enrollment:
        the failed criteria, or a reason such as consent withdrawn)."""
        self._status_in(
            "screen failure",
            [S.SCREENED, S.CONSENTED, S.ELIGIBLE],
            "after enrollment a subject is withdrawn, not screen-failed",
        )
        failed = check_failed_criteria(failed_criteria)
        text = reason.strip() if isinstance(reason, str) else ""
        if not text:
            raise ReasonRequired("a screen failure")
        self._at("screen failure", occurred_at, config, consent=False, reconsent=False)
        self._screen_failed(reason=text, failed_criteria=list(failed), occurred_at=occurred_at)

    @event("ScreenFailed")
    def _screen_failed(self, reason: str, failed_criteria: list[str], occurred_at: datetime) -> None:
        self._fact("ScreenFailed")
        self.status = S.SCREEN_FAILED
        self.failed_criteria = tuple(failed_criteria)
        self.exited_at = occurred_at

    # =================================================================== screening data
    def record_demographics(
        self,
        sex: Sex | str,
        birth_date: date,
        occurred_at: datetime,
        *,
        config: StudyConfig = DEFAULT_CONFIG,
        childbearing_potential: bool,
    ) -> int:
        record = self._demographics(
            config,
            dict(
                occurred_at=occurred_at, sex=sex, birth_date=birth_date, childbearing_potential=childbearing_potential
            ),
        )
        if self.demographics_version is not None:
            raise NotCorrectable(
                self.demographics_version, "DemographicsRecorded", "demographics are recorded once; correct that entry"
            )
        self._demographics_recorded(**_fields(record), occurred_at=occurred_at)
        return self.version

    def _demographics(self, config: StudyConfig, i: dict[str, Any], replacing: int | None = None) -> Demographics:
        self._at("demographics", i["occurred_at"], config, reconsent=False)
        sex = codes(Sex, "sex", i["sex"])
        birth = i["birth_date"]
        if isinstance(birth, str):
            birth = date.fromisoformat(birth)
        if not isinstance(birth, date) or isinstance(birth, datetime):
            raise InvalidChoice("birth_date", birth, ["a date"])
        if not isinstance(i["childbearing_potential"], bool):
            raise InvalidChoice("childbearing_potential", i["childbearing_potential"], (True, False))
        if sex == Sex.M and i["childbearing_potential"]:
            raise InvalidChoice("childbearing_potential", True, [False])
        consent_day = _day(self.consented_at)  # type: ignore[arg-type]  # record type follows fact.type (see Fact)
        age = formulas.completed_years(birth, consent_day) if birth <= consent_day else -1
        bounds.check_bound("age_at_consent", age, settings=config.settings)
        return Demographics(
            occurred_at=i["occurred_at"],
            sex=sex,
            birth_date=birth,
            childbearing_potential=i["childbearing_potential"],
            age_at_consent=age,
        )

    @event("DemographicsRecorded")
    def _demographics_recorded(
        self, sex: Sex, birth_date: date, childbearing_potential: bool, age_at_consent: int, occurred_at: datetime
    ) -> None:
        self.demographics_version = self._fact(
            "DemographicsRecorded",
            Demographics(
                occurred_at=occurred_at,
                sex=sex,
                birth_date=birth_date,
                childbearing_potential=childbearing_potential,
                age_at_consent=age_at_consent,
            ),
        )

    @property
    def demographics(self) -> Demographics | None:
        if self.demographics_version is None:
            return None
        return self.facts[self.demographics_version].record  # type: ignore[return-value]  # record type follows fact.type (see Fact)

    def record_medical_history(
        self,
        term: str,
        occurred_at: datetime,
        *,
        config: StudyConfig = DEFAULT_CONFIG,
        start_date: date | None = None,
        ongoing: bool = False,
        category: str = "general",
    ) -> int:
        """A medical-history item (abstracted after consent; ``start_date`` may lie years back)."""
        record = self._medical_history(
            config, dict(occurred_at=occurred_at, term=term, start_date=start_date, ongoing=ongoing, category=category)
        )
        self._medical_history_recorded(**_fields(record), occurred_at=occurred_at)
        return self.version

    def _medical_history(
        self, config: StudyConfig, i: dict[str, Any], replacing: int | None = None
    ) -> MedicalHistoryItem:
        self._at("medical history", i["occurred_at"], config, reconsent=False)
        term = require_text("a term", i["term"], "medical history")
        start = i["start_date"]
        if isinstance(start, str):
            start = date.fromisoformat(start)
        if start is not None and start > _day(i["occurred_at"]):
            raise InconsistentTimestamps("start_date", start, "recorded on", _day(i["occurred_at"]))
        return MedicalHistoryItem(
            occurred_at=i["occurred_at"],
            term=term,
            start_date=start,
            ongoing=bool(i["ongoing"]),
            category=require_text("a category", i["category"], "medical history"),
        )

    @event("MedicalHistoryRecorded")
    def _medical_history_recorded(
        self, term: str, start_date: date | None, ongoing: bool, category: str, occurred_at: datetime
    ) -> None:
        self._fact(
            "MedicalHistoryRecorded",
            MedicalHistoryItem(
                occurred_at=occurred_at, term=term, start_date=start_date, ongoing=ongoing, category=category
            ),
        )

    def record_classification(
        self, ana_titer: str | int, items: Iterable[str], occurred_at: datetime, *, config: StudyConfig = DEFAULT_CONFIG
    ) -> Classification:
        """The 2019 EULAR/ACR classification (I1): ANA titer and the criteria present; the score is derived."""
        self._status_in("classification", [S.CONSENTED, S.ELIGIBLE])
        self._at("classification", occurred_at, config)
        from sle_events.domain.labs import parse_titer

        result = classify_2019(parse_titer(ana_titer, "ana_titer"), items)
        self._classification_recorded(
            ana_titer=result.ana_titer,
            items=list(result.items),
            points=result.points,
            has_clinical=result.has_clinical,
            classified=result.classified,
            criteria_version=CLASSIFICATION_VERSION,
            occurred_at=occurred_at,
        )
        return result

    @event("ClassificationRecorded")
    def _classification_recorded(
        self,
        ana_titer: int,
        items: list[str],
        points: int,
        has_clinical: bool,
        classified: bool,
        criteria_version: str,
        occurred_at: datetime,
    ) -> None:
        self._fact("ClassificationRecorded")
        self.classification = Classification(ana_titer, tuple(items), points, has_clinical, classified)

    def record_biopsy(
        self,
        biopsy_date: date,
        biopsy_class: BiopsyClass | str,
        occurred_at: datetime,
        *,
        config: StudyConfig = DEFAULT_CONFIG,
    ) -> None:
        """The kidney biopsy behind I2: ISN/RPS class and date (it may predate consent; the entry may not)."""
        self._status_in("biopsy", [S.CONSENTED, S.ELIGIBLE])
        self._at("biopsy", occurred_at, config, reconsent=False)
        klass = codes(BiopsyClass, "biopsy_class", biopsy_class)
        if not isinstance(biopsy_date, date) or isinstance(biopsy_date, datetime):
            raise InvalidChoice("biopsy_date", biopsy_date, ["a date"])
        if biopsy_date > _day(occurred_at):
            raise InconsistentTimestamps("biopsy_date", biopsy_date, "recorded on", _day(occurred_at))
        self._biopsy_recorded(biopsy_date=biopsy_date, biopsy_class=klass, occurred_at=occurred_at)

    @event("BiopsyRecorded")
    def _biopsy_recorded(self, biopsy_date: date, biopsy_class: BiopsyClass, occurred_at: datetime) -> None:
        self._fact("BiopsyRecorded")
        self.biopsy = (biopsy_class, biopsy_date)

    # =================================================================== eligibility (T4) and enrollment (T6)
    def confirm_eligibility(
        self, occurred_at: datetime, *, config: StudyConfig = DEFAULT_CONFIG, checklist: EligibilityChecklist
    ) -> None:
        """T4 (investigator only, R2/R10): every criterion answered, inclusions met, no exclusion, screening
        labs ≤ 28 d old, and no answer contradicting the recorded classification, biopsy or age."""
        self._status_in("eligibility confirmation", [S.CONSENTED])
        self._at("eligibility confirmation", occurred_at, config)
        demo = self.demographics
        check_checklist(
            checklist,
            occurred_at,
            consented_at=self.consented_at,  # type: ignore[arg-type]  # record type follows fact.type (see Fact)
            screened_at=self.screened_at,
            settings=config.settings,
            classification=self.classification,
            biopsy=self.biopsy,
            age_at_consent=None if demo is None else demo.age_at_consent,
        )
        self._eligibility_confirmed(checklist=checklist, occurred_at=occurred_at)

    @event("EligibilityConfirmed")
    def _eligibility_confirmed(self, checklist: EligibilityChecklist, occurred_at: datetime) -> None:
        self._fact("EligibilityConfirmed")
        self.eligibility = checklist
        self.eligible_at = occurred_at
        self.status = S.ELIGIBLE

    def enroll(self, occurred_at: datetime, *, config: StudyConfig = DEFAULT_CONFIG, arm: str = ARM) -> None:
        """T6: an eligible subject, within 28 d of the eligibility confirmation (R2)."""
        if self.status in (S.SCREENED, S.CONSENTED):
            raise EnrollmentBeforeEligibility(self.status)
        self._status_in("enrollment", [S.ELIGIBLE])
        self._at("enrollment", occurred_at, config)
        eligible_at = cast(datetime, self.eligible_at)  # status ELIGIBLE (checked above): it is set
        if occurred_at < eligible_at:
            raise InconsistentTimestamps("eligibility confirmed", eligible_at, "enrollment", occurred_at)
        if not formulas.eligibility_still_valid(eligible_at, occurred_at, settings=config.settings):
            raise EligibilityExpired(eligible_at, occurred_at, config.settings.eligibility_validity_days)
        if arm != ARM:
            raise InvalidChoice("arm", arm, [ARM])
        self._enrolled(arm=arm, occurred_at=occurred_at)

    @event("Enrolled")
    def _enrolled(self, arm: str, occurred_at: datetime) -> None:
        self._fact("Enrolled")
        self.enrolled_at = occurred_at
        self.status = S.ENROLLED
        self.epoch = Epoch.TREATMENT

    # =================================================================== in-patient stay (R3, R6)
    @property
    def open_stay(self) -> Stay | None:
        return self.stays[-1] if self.stays and self.stays[-1].discharged_at is None else None

    def admit(
        self, occurred_at: datetime, *, config: StudyConfig = DEFAULT_CONFIG, purpose: str = "pretreatment"
    ) -> None:
        """An in-patient admission after enrollment (BASE)."""
        self._status_in("admission", ON_TREATMENT)
        self._at("admission", occurred_at, config)
        if self.open_stay is not None:
            raise AlreadyAdmitted(self.open_stay.admitted_at)
        if occurred_at < self.enrolled_at:  # type: ignore[operator]  # record type follows fact.type (see Fact)
            raise InconsistentTimestamps("enrolled_at", self.enrolled_at, "admitted_at", occurred_at)
        if self.stays and occurred_at < self.stays[-1].discharged_at:  # type: ignore[operator]  # record type follows fact.type (see Fact)
            raise InconsistentTimestamps("previous discharge", self.stays[-1].discharged_at, "admission", occurred_at)
        self._admitted(purpose=require_text("a purpose", purpose, "admission"), occurred_at=occurred_at)

    @event("Admitted")
    def _admitted(self, purpose: str, occurred_at: datetime) -> None:
        version = self._fact("Admitted")
        self.stays.append(Stay(occurred_at, version))

    def discharge(
        self, occurred_at: datetime, *, config: StudyConfig = DEFAULT_CONFIG, prolonged_by_ae: str | None = None
    ) -> int:
        """R6: the stay's length is computed in site-local calendar days and flagged outside 3–5 d (never
        refused). Discharge before the MSC infusion ends is refused unless the transplant was recorded as not
        performed (T10). A discharge after TX (T9) or after T10 starts follow-up. Returns the length of stay."""
        stay = self.open_stay
        if stay is None:
            raise NotAdmitted("discharge", "the subject has no open in-patient stay")
        self._at("discharge", occurred_at, config, reconsent=False, after_exit=AfterExit.SAFETY)
        los, flagged = treatment.stay(stay.admitted_at, occurred_at, config.settings)
        if self.status == S.PRETREATED and self.transplant_not_performed is None:
            raise DischargeBeforeInfusionEnd(
                occurred_at,
                "cyclophosphamide was given but no MSC infusion is "
                "recorded; record the infusion or TransplantNotPerformed (T10) first",
            )
        msc = self.msc
        if msc is not None and _in(msc.occurred_at, stay) and occurred_at < msc.stopped_at:
            raise DischargeBeforeInfusionEnd(occurred_at, f"the MSC infusion ends at {msc.stopped_at.isoformat()}")
        flags = [STAY_FLAG] if flagged else []
        if prolonged_by_ae is not None:
            ae = self._ae(prolonged_by_ae)
            if los > config.settings.stay_max_days and Seriousness.HOSPITALISATION not in ae.seriousness:
                flags.append(AE_SERIOUSNESS_FLAG)
        self._discharged(
            admitted_at=stay.admitted_at,
            length_of_stay_days=los,
            flags=flags,
            prolonged_by_ae=prolonged_by_ae,
            occurred_at=occurred_at,
        )
        return los

    @event("Discharged")
    def _discharged(
        self,
        admitted_at: datetime,
        length_of_stay_days: int,
        flags: list[str],
        prolonged_by_ae: str | None,
        occurred_at: datetime,
    ) -> None:
        version = self._fact("Discharged")
        stay = self.stays[-1]
        stay.discharged_at = occurred_at
        stay.length_of_stay_days = length_of_stay_days
        self.flags.extend((version, f) for f in flags)
        if self.status == S.TRANSPLANTED or (self.status == S.PRETREATED and self.transplant_not_performed):
            self.status = S.IN_FOLLOW_UP
            self.epoch = Epoch.FOLLOW_UP

    # =================================================================== vitals and pregnancy test
    def record_vital_signs(
        self,
        occurred_at: datetime,
        *,
        config: StudyConfig = DEFAULT_CONFIG,
        height_cm: Any = None,
        weight_kg: Any = None,
        temperature_c: Any = None,
        systolic_bp: Any = None,
        diastolic_bp: Any = None,
        heart_rate: Any = None,
        timepoint: str | None = None,
    ) -> int:
        record = self._vital_signs(
            config,
            dict(
                occurred_at=occurred_at,
                height_cm=height_cm,
                weight_kg=weight_kg,
                temperature_c=temperature_c,
                systolic_bp=systolic_bp,
                diastolic_bp=diastolic_bp,
                heart_rate=heart_rate,
                timepoint=timepoint,
            ),
        )
        self._vital_signs_recorded(**_fields(record), occurred_at=occurred_at)
        return self.version

    def _vital_signs(self, config: StudyConfig, i: dict[str, Any], replacing: int | None = None) -> VitalSigns:
        self._at("vital signs", i["occurred_at"], config, reconsent=False, after_exit=AfterExit.SAFETY)
        values = {}
        for name, bound in _VITAL_BOUNDS.items():
            if i.get(name) is not None:
                values[name] = bounds.check_bound(bound, i[name], settings=config.settings)
        if not values:
            raise MissingValue("at least one vital sign", "vital signs")
        return VitalSigns(occurred_at=i["occurred_at"], timepoint=i.get("timepoint") or None, **values)

    @event("VitalSignsRecorded")
    def _vital_signs_recorded(
        self,
        height_cm: Decimal | None,
        weight_kg: Decimal | None,
        temperature_c: Decimal | None,
        systolic_bp: Decimal | None,
        diastolic_bp: Decimal | None,
        heart_rate: Decimal | None,
        timepoint: str | None,
        occurred_at: datetime,
    ) -> None:
        self._fact(
            "VitalSignsRecorded",
            VitalSigns(
                occurred_at=occurred_at,
                height_cm=height_cm,
                weight_kg=weight_kg,
                temperature_c=temperature_c,
                systolic_bp=systolic_bp,
                diastolic_bp=diastolic_bp,
                heart_rate=heart_rate,
                timepoint=timepoint,
            ),
        )

    def record_pregnancy_test(
        self,
        occurred_at: datetime,
        result: PregnancyResult | str,
        *,
        config: StudyConfig = DEFAULT_CONFIG,
        specimen: str = "serum",
    ) -> int:
        record = self._pregnancy_test(config, dict(occurred_at=occurred_at, result=result, specimen=specimen))
        self._pregnancy_test_recorded(result=record.result, specimen=record.specimen, occurred_at=occurred_at)
        return self.version

    def _pregnancy_test(self, config: StudyConfig, i: dict[str, Any], replacing: int | None = None) -> PregnancyTest:
        self._at("pregnancy test", i["occurred_at"], config, reconsent=False, after_exit=AfterExit.SAFETY)
        return PregnancyTest(
            occurred_at=i["occurred_at"],
            result=codes(PregnancyResult, "result", i["result"]),
            specimen=require_text("a specimen", i["specimen"], "pregnancy test"),
        )

    @event("PregnancyTestRecorded")
    def _pregnancy_test_recorded(self, result: PregnancyResult, specimen: str, occurred_at: datetime) -> None:
        self._fact("PregnancyTestRecorded", PregnancyTest(occurred_at=occurred_at, result=result, specimen=specimen))

    # =================================================================== cyclophosphamide (T7, R3, R4)
    @property
    def cyc(self) -> Pretreatment | None:
        return None if self.cyc_version is None else self.facts[self.cyc_version].record  # type: ignore[return-value]  # record type follows fact.type (see Fact)

    def give_pretreatment(
        self,
        occurred_at: datetime,
        stopped_at: datetime,
        prescribed_mg_per_m2: Any,
        administered_mg: Any,
        lot: str,
        *,
        config: StudyConfig = DEFAULT_CONFIG,
        route: str = "IV",
    ) -> Pretreatment:
        """T7 / R3 / R4: IV cyclophosphamide, once, during an open in-patient stay that began after enrollment,
        with height and weight measured at this admission (BSA, Mosteller, 2 dp) and, for a woman of
        child-bearing potential, a negative pregnancy test ≤ 72 h before. Dose deviations are flagged; missing
        baseline specimens (collected after admission, before CYC) are flagged as a deviation (R3)."""
        if self.cyc is not None:
            raise DuplicatePretreatment(self.cyc.occurred_at)
        self._status_in("cyclophosphamide", [S.ENROLLED])
        record = self._pretreatment(
            config,
            dict(
                occurred_at=occurred_at,
                stopped_at=stopped_at,
                prescribed_mg_per_m2=prescribed_mg_per_m2,
                administered_mg=administered_mg,
                route=route,
                lot=lot,
            ),
        )
        self._cyclophosphamide_given(**_fields(record), occurred_at=occurred_at)
        return record

    def _pretreatment(self, config: StudyConfig, i: dict[str, Any], replacing: int | None = None) -> Pretreatment:
        start = i["occurred_at"]
        self._at("cyclophosphamide", start, config)
        if replacing is None:
            stay = self.open_stay
            if stay is None or stay.admitted_at < self.enrolled_at:  # type: ignore[operator]  # record type follows fact.type (see Fact)
                raise NotAdmitted(
                    "cyclophosphamide",
                    "it is given only during an open in-patient stay that began after enrollment (R3)",
                )
        else:
            original = self.facts[replacing].record
            stay = next(s for s in self.stays if _in(original.occurred_at, s))  # type: ignore[union-attr]  # record type follows fact.type (see Fact)
        if not _in(start, stay):
            raise NotAdmitted(
                "cyclophosphamide",
                f"start {start.isoformat()} is outside the in-patient stay from {stay.admitted_at.isoformat()} (R3)",
            )
        measured = [
            (v, r)
            for v, r in self.records("VitalSignsRecorded")
            if r.height_cm is not None  # type: ignore[attr-defined]  # record type follows fact.type (see Fact)
            and r.weight_kg is not None  # type: ignore[attr-defined]  # record type follows fact.type (see Fact)
            and stay.admitted_at <= r.occurred_at <= start
        ]
        if not measured:
            raise MeasurementMissing(
                "height and weight", "cyclophosphamide", "at this admission, before the CYC start (T7)"
            )
        measured_version, vitals = measured[-1]
        demo = self.demographics
        if demo is None:
            raise MissingValue("demographics (sex, child-bearing potential)", "cyclophosphamide")
        test_version = None
        if demo.childbearing_potential:
            window = timedelta(hours=int(config.settings.pregnancy_test_max_hours_before_cyc))
            tests = [
                (v, r) for v, r in self.records("PregnancyTestRecorded") if start - window <= r.occurred_at <= start
            ]
            if not tests or tests[-1][1].result != PregnancyResult.NEGATIVE:  # type: ignore[attr-defined]  # record type follows fact.type (see Fact)
                raise PregnancyTestRequired(start, config.settings.pregnancy_test_max_hours_before_cyc)
            test_version = tests[-1][0]
        extra = () if self._baseline_collected(stay.admitted_at, start) else (BASELINE_FLAG,)
        if replacing is not None and self.msc is not None:
            formulas.check_cyc_msc_interval(start, self.msc.occurred_at, settings=config.settings)
        record = treatment.check_pretreatment(
            started_at=start,
            stopped_at=i["stopped_at"],
            prescribed_mg_per_m2=i["prescribed_mg_per_m2"],
            administered_mg=i["administered_mg"],
            route=i["route"],
            lot=i["lot"],
            height_cm=vitals.height_cm,  # type: ignore[attr-defined]  # record type follows fact.type (see Fact)
            weight_kg=vitals.weight_kg,  # type: ignore[attr-defined]  # record type follows fact.type (see Fact)
            measured_version=measured_version,
            settings=config.settings,
            extra_flags=extra,
        )
        return record.model_copy(update={"pregnancy_test_version": test_version})

    def _baseline_collected(self, admitted_at: datetime, cyc_start: datetime) -> bool:
        """R3: baseline serology (anti-dsDNA, C3, C4) and renal specimens (creatinine, proteinuria) collected
        after admission and before the CYC start."""
        labs = self.records("LabResultRecorded")
        codes_seen = {r.code for _, r in labs if admitted_at <= r.occurred_at < cyc_start}  # type: ignore[attr-defined]  # record type follows fact.type (see Fact)
        return all(c in codes_seen for c in treatment.BASELINE_SEROLOGY) and all(
            any(c in codes_seen for c in group) for group in treatment.BASELINE_RENAL
        )

    @event("CyclophosphamideGiven")
    def _cyclophosphamide_given(
        self,
        stopped_at: datetime,
        prescribed_mg_per_m2: Decimal,
        height_cm: Decimal,
        weight_kg: Decimal,
        bsa_m2: Decimal,
        calculated_mg: Decimal,
        administered_mg: Decimal,
        route: str,
        lot: str,
        measured_version: int,
        pregnancy_test_version: int | None,
        bsa_formula: str,
        dose_formula: str,
        flags: list[str],
        occurred_at: datetime,
    ) -> None:
        record = Pretreatment(
            occurred_at=occurred_at,
            stopped_at=stopped_at,
            prescribed_mg_per_m2=prescribed_mg_per_m2,
            height_cm=height_cm,
            weight_kg=weight_kg,
            bsa_m2=bsa_m2,
            calculated_mg=calculated_mg,
            administered_mg=administered_mg,
            route=route,
            lot=lot,
            measured_version=measured_version,
            pregnancy_test_version=pregnancy_test_version,
            bsa_formula=bsa_formula,
            dose_formula=dose_formula,
            flags=tuple(flags),
        )
        self.cyc_version = self._fact("CyclophosphamideGiven", record)
        self.flags.extend((self.cyc_version, f) for f in flags)
        self.status = S.PRETREATED

    # =================================================================== AlloMSC infusion (T8, R4, R5) and T10
    @property
    def msc(self) -> Infusion | None:
        return None if self.msc_version is None else self.facts[self.msc_version].record  # type: ignore[return-value]  # record type follows fact.type (see Fact)

    @property
    def tx_date(self) -> date | None:
        """Protocol day 0: the local date of the MSC infusion start."""
        return None if self.msc is None else self.msc.occurred_at.date()

    def infuse_msc(
        self,
        occurred_at: datetime,
        stopped_at: datetime,
        lot: Any,
        *,
        config: StudyConfig = DEFAULT_CONFIG,
        volume_ml: Any = None,
        premedication: str | None = None,
    ) -> Infusion:
        """T8: the infusion starts 18–36 h after the CYC start (R4, refused outside); the lot was made for this
        subject, is not used, and passes release — viability, identity, sterility, dose 0.8–1.2 × 10^6/kg,
        ≤ 6 h after release — unless a deviation naming the lot was recorded first (R5).
        ``lot`` is the :class:`~sle_events.domain.product.ProductLot`; the caller marks it infused."""
        if self.msc is not None:
            raise InvalidTransition(
                "MSC infusion",
                self.status,
                [S.PRETREATED.value],
                f"the infusion was already given at {self.msc.occurred_at.isoformat()}",
            )
        self._status_in("MSC infusion", [S.PRETREATED])
        cyc = cast(Pretreatment, self.cyc)  # status PRETREATED (checked above): the CYC fact exists
        if self.transplant_not_performed is not None:
            raise InvalidTransition(
                "MSC infusion", self.status, [S.PRETREATED.value], "the transplant was recorded as not performed (T10)"
            )
        lot.check_available_for(self.id)
        self._at("MSC infusion", occurred_at, config)
        stay = self.open_stay
        if stay is None or not _in(cyc.occurred_at, stay) or occurred_at < stay.admitted_at:
            raise NotAdmitted("MSC infusion", "it is given during the in-patient stay of the pretreatment")
        record = treatment.check_infusion(
            started_at=occurred_at,
            stopped_at=stopped_at,
            cyc_started_at=cyc.occurred_at,
            lot_id=lot.lot_id,
            viable_cells=lot.viable_cells,
            viability_pct=lot.viability_pct,
            sterility_negative=lot.sterility_negative,
            mycoplasma_negative=lot.mycoplasma_negative,
            identity=lot.identity,
            endotoxin_eu_per_kg=lot.endotoxin_eu_per_kg,
            released_at=lot.released_at,
            weight_kg=cyc.weight_kg,
            settings=config.settings,
            volume_ml=volume_ml,
            premedication=premedication,
        )
        if record.release_failures:
            authorised = [v for v, d in self.deviations.items() if d["lot_id"] == lot.lot_id]
            if not authorised:
                raise LotNotReleased(lot.lot_id, record.release_failures)
            record = record.model_copy(update={"authorised_by_deviation": authorised[-1]})
        self._msc_infused(**_fields(record), occurred_at=occurred_at)
        return record

    def _infusion(self, config: StudyConfig, i: dict[str, Any], replacing: int | None = None) -> Infusion:
        """Re-check a corrected infusion: R4 window, stop after start, within its stay, before discharge."""
        original: Infusion = self.facts[replacing].record  # type: ignore[assignment,index]  # record type follows fact.type (see Fact)
        start, stop = i["occurred_at"], i["stopped_at"]
        self._at("MSC infusion", start, config)
        formulas.require_aware("stopped_at", stop)
        if stop < start:
            raise InconsistentTimestamps("msc start", start, "msc stop", stop)
        cyc = cast(Pretreatment, self.cyc)  # an infusion is being corrected: the CYC fact before it exists
        hours = formulas.check_cyc_msc_interval(cyc.occurred_at, start, settings=config.settings)
        stay = next(s for s in self.stays if _in(original.occurred_at, s))
        if not _in(start, stay) or not _in(stop, stay):
            raise NotAdmitted("MSC infusion", "the corrected times fall outside the in-patient stay")
        return original.model_copy(
            update={
                "occurred_at": start,
                "stopped_at": stop,
                "cyc_to_msc_hours": hours,
                "volume_ml": parse_optional_decimal("volume_ml", i["volume_ml"]),
                "premedication": i["premedication"] or None,
            }
        )

    @event("MSCInfused")
    def _msc_infused(
        self,
        stopped_at: datetime,
        lot_id: str,
        viable_cells: Decimal,
        weight_kg: Decimal,
        dose_1e6_per_kg: Decimal,
        dose_formula: str,
        cyc_to_msc_hours: Decimal,
        interval_formula: str,
        volume_ml: Decimal | None,
        premedication: str | None,
        release_failures: list[str],
        authorised_by_deviation: int | None,
        occurred_at: datetime,
    ) -> None:
        self.msc_version = self._fact(
            "MSCInfused",
            Infusion(
                occurred_at=occurred_at,
                stopped_at=stopped_at,
                lot_id=lot_id,
                viable_cells=viable_cells,
                weight_kg=weight_kg,
                dose_1e6_per_kg=dose_1e6_per_kg,
                dose_formula=dose_formula,
                cyc_to_msc_hours=cyc_to_msc_hours,
                interval_formula=interval_formula,
                volume_ml=volume_ml,
                premedication=premedication,
                release_failures=tuple(release_failures),
                authorised_by_deviation=authorised_by_deviation,
            ),
        )
        self.status = S.TRANSPLANTED

    def record_transplant_not_performed(
        self, occurred_at: datetime, reason: str, *, config: StudyConfig = DEFAULT_CONFIG
    ) -> None:
        """T10: after CYC, the infusion will not be given (flagged); the subject is followed for safety."""
        self._status_in("transplant not performed", [S.PRETREATED])
        if self.transplant_not_performed is not None:
            raise InvalidTransition("transplant not performed", self.status, [S.PRETREATED.value], "already recorded")
        text = reason.strip() if isinstance(reason, str) else ""
        if not text:
            raise ReasonRequired("transplant not performed")
        self._at("transplant not performed", occurred_at, config, reconsent=False)
        self._transplant_not_performed(reason=text, occurred_at=occurred_at)

    @event("TransplantNotPerformed")
    def _transplant_not_performed(self, reason: str, occurred_at: datetime) -> None:
        version = self._fact("TransplantNotPerformed")
        self.transplant_not_performed = reason
        self.flags.append((version, TNP_FLAG))

    # =================================================================== lab results and derived values
    @property
    def labs(self) -> list[LabResult]:
        """Current (corrected, not voided) lab results in stream order."""
        return [r for _, r in self.records("LabResultRecorded")]  # type: ignore[misc]  # record type follows fact.type (see Fact)

    def record_lab_result(
        self,
        code: str,
        value: Any,
        unit: str,
        occurred_at: datetime,
        *,
        config: StudyConfig = DEFAULT_CONFIG,
        reported_at: datetime | None = None,
        lab_low: Any = None,
        lab_high: Any = None,
        specimen_id: str | None = None,
    ) -> int:
        """A result of any labs.csv analyte, ``occurred_at`` = specimen collection. Returns its version."""
        record = self._lab_result(
            config,
            dict(
                code=code,
                value=value,
                unit=unit,
                occurred_at=occurred_at,
                reported_at=reported_at,
                lab_low=lab_low,
                lab_high=lab_high,
                specimen_id=specimen_id,
            ),
        )
        self._lab_result_recorded(**_fields(record), occurred_at=occurred_at)
        return self.version

    def _lab_result(self, config: StudyConfig, i: dict[str, Any], replacing: int | None = None) -> LabResult:
        if not isinstance(i["code"], str):
            get_analyte(i["code"])
        self._at(f"lab result {i['code']}", i["occurred_at"], config, after_exit=AfterExit.SAFETY)
        return lab_results.validate_lab_result(
            i["code"],
            i["value"],
            i["unit"],
            i["occurred_at"],
            settings=config.settings,
            reported_at=i["reported_at"],
            lab_low=i["lab_low"],
            lab_high=i["lab_high"],
            specimen_id=i["specimen_id"],
        )

    @event("LabResultRecorded")
    def _lab_result_recorded(
        self,
        code: str,
        loinc: str | None,
        value: Decimal,
        unit: str,
        canonical_value: Decimal,
        canonical_unit: str,
        lab_low: Decimal | None,
        lab_high: Decimal | None,
        range_low: Decimal | None,
        range_high: Decimal | None,
        range_source: str,
        flag: str | None,
        reported_at: datetime | None,
        specimen_id: str | None,
        occurred_at: datetime,
    ) -> None:
        # The verb validated these values before the fact existed, and a stored fact is signed: rebuilding it
        # (replay, projections) need not validate again. The most frequent fact, so this matters.
        self._fact(
            "LabResultRecorded",
            LabResult.model_construct(
                occurred_at=occurred_at,
                code=code,
                loinc=loinc,
                value=value,
                unit=unit,
                canonical_value=canonical_value,
                canonical_unit=canonical_unit,
                lab_low=lab_low,
                lab_high=lab_high,
                range_low=range_low,
                range_high=range_high,
                range_source=range_source,  # type: ignore[arg-type]  # validated by the verb (see above)
                flag=flag,  # type: ignore[arg-type]  # validated by the verb (see above)
                reported_at=reported_at,
                specimen_id=specimen_id,
            ),
        )

    def _cite(self, version: int) -> list[int]:
        """An input's version and, if it was corrected, the correction that gave its current values."""
        fact = self.facts[version]
        return [version, *fact.corrections[-1:]]

    def derive_egfr(self, creatinine_version: int, *, config: StudyConfig = DEFAULT_CONFIG) -> DerivedResult:
        """eGFR (CKD-EPI 2021) from a recorded serum creatinine, citing it (and the demographics) and the formula
        version. Recorded as "not computed" with the reason when it cannot be computed."""
        lab: LabResult = self._current(creatinine_version, "LabResultRecorded")  # type: ignore[assignment]  # record type follows fact.type (see Fact)
        if lab.code not in lab_results.CREATININE_CODES:
            raise InvalidChoice("creatinine result", lab.code, lab_results.CREATININE_CODES)
        self._at("derived eGFR", lab.occurred_at, config, reconsent=False, after_exit=AfterExit.ALWAYS)
        value, why = lab_results.derive_egfr(lab, self.demographics, config.settings)
        inputs = self._cite(creatinine_version) + (
            [] if self.demographics_version is None else self._cite(self.demographics_version)
        )
        record = DerivedResult(
            occurred_at=lab.occurred_at,
            code=lab_results.EGFR_CODE,
            value=value,
            unit="mL/min/{1.73_m2}",
            inputs=tuple(inputs),
            formula_version=formulas.EGFR_FORMULA_VERSION,
            not_computed_reason=why,
        )
        self._derived(record)
        return record

    def derive_upcr(
        self, protein_version: int, creatinine_version: int, *, config: StudyConfig = DEFAULT_CONFIG
    ) -> DerivedResult:
        """Spot UPCR from urine protein and creatinine of the same specimen (formulas.md §4)."""
        protein: LabResult = self._current(protein_version, "LabResultRecorded")  # type: ignore[assignment]  # record type follows fact.type (see Fact)
        creat: LabResult = self._current(creatinine_version, "LabResultRecorded")  # type: ignore[assignment]  # record type follows fact.type (see Fact)
        value = lab_results.derive_upcr(protein, creat)
        self._at("derived UPCR", protein.occurred_at, config, reconsent=False, after_exit=AfterExit.ALWAYS)
        bounds.check_bound("upcr", value, settings=config.settings)
        record = DerivedResult(
            occurred_at=protein.occurred_at,
            code="UPCR",
            value=value,
            unit="mg/mg",
            inputs=tuple(self._cite(protein_version) + self._cite(creatinine_version)),
            formula_version=formulas.UPCR_FORMULA_VERSION,
        )
        self._derived(record)
        return record

    def _derived(self, r: DerivedResult) -> None:
        self._derived_result_recorded(
            code=r.code,
            value=r.value,
            unit=r.unit,
            inputs=list(r.inputs),
            formula_version=r.formula_version,
            not_computed_reason=r.not_computed_reason,
            occurred_at=r.occurred_at,
        )

    @event("DerivedResultRecorded")
    def _derived_result_recorded(
        self,
        code: str,
        value: Decimal | None,
        unit: str,
        inputs: list[int],
        formula_version: str,
        not_computed_reason: str | None,
        occurred_at: datetime,
    ) -> None:
        self._fact(
            "DerivedResultRecorded",
            DerivedResult(
                occurred_at=occurred_at,
                code=code,
                value=value,
                unit=unit,
                inputs=tuple(inputs),
                formula_version=formula_version,
                not_computed_reason=not_computed_reason,
            ),
        )

    def _values(self, codes_: Iterable[str]) -> list[tuple[int, str, Decimal, datetime]]:
        """(version, code, canonical value, collected) of reported and derived results of these codes whose
        inputs are all still valid, in stream order."""
        wanted = set(codes_)
        out = []
        for v, f in sorted(self.facts.items()):
            if f.voided or f.record is None:
                continue
            r = f.record
            if f.type == "LabResultRecorded" and r.code in wanted:  # type: ignore[attr-defined]  # record type follows fact.type (see Fact)
                out.append((v, r.code, r.canonical_value, r.occurred_at))  # type: ignore[attr-defined]  # record type follows fact.type (see Fact)
            elif (
                f.type == "DerivedResultRecorded"
                and r.code in wanted  # type: ignore[attr-defined]  # record type follows fact.type (see Fact)
                and r.value is not None  # type: ignore[attr-defined]  # record type follows fact.type (see Fact)
                and all(not self.facts[i].voided for i in r.inputs)  # type: ignore[attr-defined]  # record type follows fact.type (see Fact)
            ):
                out.append((v, r.code, r.value, r.occurred_at))  # type: ignore[attr-defined]  # record type follows fact.type (see Fact)
        return out

    def stale_results(self) -> list[dict[str, Any]]:
        """Derived results and renal-response assessments computed from a result that was corrected or voided
        after them, or from one that is stale itself, and not derived or assessed again since (a later one for
        the same code and time, or the same visit, supersedes). Their signed values stay as they were; this is
        what a monitor raises a query on."""
        latest: dict[tuple[Any, ...], int] = {}
        changed: dict[int, list[int]] = {}
        for v, f in self.facts.items():  # in version order, so an input's staleness is known before its use
            if f.voided or f.record is None or f.type not in ("DerivedResultRecorded", "RenalResponseAssessed"):
                continue
            r = f.record
            key = (r.code, r.occurred_at) if f.type == "DerivedResultRecorded" else (r.visit or r.occurred_at.date())  # type: ignore[attr-defined]  # record type follows fact.type (see Fact)
            latest[(f.type, key)] = v
            inputs = [
                i
                for i in r.inputs  # type: ignore[attr-defined]  # record type follows fact.type (see Fact)
                if (g := self.facts.get(i)) is not None
                and (g.voided or i in changed or any(c > v for c in g.corrections))
            ]
            if inputs:
                changed[v] = inputs
        return [
            {
                "version": v,
                "type": kind,
                "code": getattr(self.facts[v].record, "code", "RENAL_RESPONSE"),
                "changed_inputs": changed[v],
            }
            for (kind, _), v in sorted(latest.items(), key=lambda x: x[1])
            if v in changed
        ]

    def assess_renal_response(
        self, occurred_at: datetime, *, config: StudyConfig = DEFAULT_CONFIG, visit: str | None = None
    ) -> RenalResponse:
        """KDIGO 2024 renal response (§8) at a follow-up visit day, from the UPCR and eGFR collected that day
        against the baseline (the last values on or before the CYC start). Recorded with its inputs; a missing
        input gives NOT_EVALUABLE."""
        if self.msc is None or self.cyc is None:
            raise VisitBeforeTransplant(visit or "UNS", "no MSC infusion (TX) is recorded")
        self._at("renal response", occurred_at, config, reconsent=False, after_exit=AfterExit.SAFETY)
        if visit is not None:
            config.visits.get(visit)
        day = occurred_at.date()
        upcrs = self._values(lab_results.UPCR_CODES)
        egfrs = self._values([lab_results.EGFR_CODE])
        base_u = [x for x in upcrs if x[3] <= self.cyc.occurred_at]
        base_e = [x for x in egfrs if x[3] <= self.cyc.occurred_at]
        now_u = [x for x in upcrs if x[3].date() == day]
        now_e = [x for x in egfrs if x[3].date() == day]

        def pick(xs: list[tuple[int, str, Decimal, datetime]]) -> tuple[int, str, Decimal, datetime] | None:
            return xs[-1] if xs else None

        bu, be, cu, ce = pick(base_u), pick(base_e), pick(now_u), pick(now_e)
        days = (day - self.tx_date).days  # type: ignore[operator]  # record type follows fact.type (see Fact)
        if visit is not None and visit.startswith("M"):
            month = formulas.assessment_month(visit, settings=config.settings)
        else:
            month = formulas.assessment_month(None, days_since_tx=days, settings=config.settings)
        bu_v, be_v, cu_v, ce_v = (None if x is None else x[2] for x in (bu, be, cu, ce))
        status = formulas.renal_response(bu_v, be_v, cu_v, ce_v, month, settings=config.settings)
        record = RenalResponse(
            occurred_at=occurred_at,
            status=status.value,
            month=month,
            visit=visit,
            baseline_upcr=None if bu is None else bu[2],
            baseline_egfr=None if be is None else be[2],
            upcr=None if cu is None else cu[2],
            egfr=None if ce is None else ce[2],
            upcr_specimen=None if cu is None else cu[1],
            inputs=tuple(x[0] for x in (bu, be, cu, ce) if x is not None),
            formula_version=formulas.RENAL_RESPONSE_FORMULA_VERSION,
        )
        self._renal_response_assessed(
            **record.model_dump(exclude={"occurred_at", "inputs"}), inputs=list(record.inputs), occurred_at=occurred_at
        )
        return record

    @event("RenalResponseAssessed")
    def _renal_response_assessed(
        self,
        status: str,
        month: int,
        visit: str | None,
        baseline_upcr: Decimal | None,
        baseline_egfr: Decimal | None,
        upcr: Decimal | None,
        egfr: Decimal | None,
        upcr_specimen: str | None,
        inputs: list[int],
        formula_version: str,
        occurred_at: datetime,
    ) -> None:
        self._fact(
            "RenalResponseAssessed",
            RenalResponse(
                occurred_at=occurred_at,
                status=status,
                month=month,
                visit=visit,
                baseline_upcr=baseline_upcr,
                baseline_egfr=baseline_egfr,
                upcr=upcr,
                egfr=egfr,
                upcr_specimen=upcr_specimen,
                inputs=tuple(inputs),
                formula_version=formula_version,
            ),
        )

    def record_treg_panel(
        self,
        occurred_at: datetime,
        treg_pct: Any,
        cd4_per_ul: Any,
        *,
        config: StudyConfig = DEFAULT_CONFIG,
        reported_at: datetime | None = None,
    ) -> int:
        """Treg (CD4+CD25+FOXP3+ % of CD4+) and CD4 count, from the flow-cytometry lab."""
        record = self._treg_panel(
            config, dict(occurred_at=occurred_at, treg_pct=treg_pct, cd4_per_ul=cd4_per_ul, reported_at=reported_at)
        )
        self._treg_panel_recorded(**_fields(record), occurred_at=occurred_at)
        return self.version

    def _treg_panel(self, config: StudyConfig, i: dict[str, Any], replacing: int | None = None) -> TregPanel:
        self._at("Treg panel", i["occurred_at"], config, after_exit=AfterExit.SAFETY)
        return lab_results.validate_treg_panel(
            i["occurred_at"], i["treg_pct"], i["cd4_per_ul"], settings=config.settings, reported_at=i["reported_at"]
        )

    @event("TregPanelRecorded")
    def _treg_panel_recorded(
        self,
        treg_pct: Decimal,
        cd4_per_ul: Decimal,
        treg_flag: str | None,
        cd4_flag: str | None,
        reported_at: datetime | None,
        occurred_at: datetime,
    ) -> None:
        self._fact(
            "TregPanelRecorded",
            TregPanel(
                occurred_at=occurred_at,
                treg_pct=treg_pct,
                cd4_per_ul=cd4_per_ul,
                treg_flag=treg_flag,
                cd4_flag=cd4_flag,
                reported_at=reported_at,
            ),
        )

    # =================================================================== SLEDAI-2K
    def assess_sledai(
        self,
        occurred_at: datetime,
        descriptors: Iterable[str],
        *,
        config: StudyConfig = DEFAULT_CONFIG,
        visit: str | None = None,
    ) -> SledaiAssessment:
        """SLEDAI-2K (investigator): the descriptor codes present; the total is derived (formula version kept)."""
        record = self._sledai(config, dict(occurred_at=occurred_at, descriptors=descriptors, visit=visit))
        self._sledai_assessed(
            descriptors=list(record.descriptors),
            total=record.total,
            formula_version=record.formula_version,
            visit=record.visit,
            occurred_at=occurred_at,
        )
        return record

    def _sledai(self, config: StudyConfig, i: dict[str, Any], replacing: int | None = None) -> SledaiAssessment:
        self._at("SLEDAI-2K", i["occurred_at"], config, after_exit=AfterExit.SAFETY)
        if isinstance(i["descriptors"], str):
            raise InvalidChoice("descriptors", i["descriptors"], ["a list of SLED2Knn codes"])
        found = sorted({get_descriptor(c).code for c in i["descriptors"]})
        total = formulas.sledai2k_total(found)
        bounds.check_bound("sledai2k_total", total, settings=config.settings)
        if i["visit"] is not None:
            config.visits.get(i["visit"])
        return SledaiAssessment(
            occurred_at=i["occurred_at"],
            descriptors=tuple(found),
            total=int(total),
            formula_version=formulas.SLEDAI2K_FORMULA_VERSION,
            visit=i["visit"],
        )

    @event("SledaiAssessed")
    def _sledai_assessed(
        self, descriptors: list[str], total: int, formula_version: str, visit: str | None, occurred_at: datetime
    ) -> None:
        self._fact(
            "SledaiAssessed",
            SledaiAssessment(
                occurred_at=occurred_at,
                descriptors=tuple(descriptors),
                total=total,
                formula_version=formula_version,
                visit=visit,
            ),
        )

    # =================================================================== visits (R7), milestone, team review
    def record_visit(self, visit: str, occurred_at: datetime, *, config: StudyConfig = DEFAULT_CONFIG) -> VisitRecord:
        """An attended scheduled visit. Follow-up visits (M1…, ET) exist only after TX; an out-of-window
        visit is recorded and flagged as a deviation. The M24 visit also records ``MainStudyCompleted``."""
        defn = config.visits.get(visit)
        if visit in self.visit_outcomes:
            raise VisitAlreadyRecorded(visit, self.visit_outcomes[visit])
        record = self._visit(config, dict(visit=visit, occurred_at=occurred_at))
        self._visit_recorded(**_fields(record), occurred_at=occurred_at)
        if defn.month == config.settings.monthly_visits_through_month and self.main_study_completed_at is None:
            self._main_study_completed(visit=visit, occurred_at=occurred_at)
        return record

    def _visit(self, config: StudyConfig, i: dict[str, Any], replacing: int | None = None) -> VisitRecord:
        defn = config.visits.get(i["visit"])
        at = i["occurred_at"]
        target = earliest = latest = None
        in_window = True
        if defn.kind == VisitKind.SCREENING:
            self._at(f"visit {defn.code}", at, config)
        elif defn.kind == VisitKind.TREATMENT:
            if self.enrolled_at is None:
                raise InvalidTransition(f"visit {defn.code}", self.status, [s.value for s in ON_TREATMENT])
            self._at(f"visit {defn.code}", at, config)
        elif defn.kind == VisitKind.FOLLOW_UP:
            if self.tx_date is None:
                raise VisitBeforeTransplant(defn.code, "no MSC infusion (TX) is recorded")
            if at.date() < self.tx_date:
                raise VisitBeforeTransplant(defn.code, f"{at.date()} is before TX on {self.tx_date}")
            self._at(f"visit {defn.code}", at, config)
            target, earliest, latest, in_window = visits.scheduled_window(defn, self.tx_date, at)
        else:  # early termination
            if self.tx_date is None:
                raise VisitBeforeTransplant(defn.code, "no MSC infusion (TX) is recorded")
            if self.withdrawal is None:
                raise InvalidTransition(
                    f"visit {defn.code}", self.status, [S.WITHDRAWN.value], "early termination follows a withdrawal"
                )
            self._at(f"visit {defn.code}", at, config, reconsent=False, after_exit=AfterExit.SAFETY)
            earliest, latest, in_window = visits.early_termination_window(
                defn,
                cast(datetime, self.exited_at),  # withdrawn (checked above): the exit time is set
                at,
            )
        return VisitRecord(
            occurred_at=at,
            visit=defn.code,
            visitnum=defn.visitnum,
            target_date=target,
            earliest=earliest,
            latest=latest,
            in_window=in_window,
            deviation_flags=() if in_window else (visits.OUT_OF_WINDOW,),
        )

    @event("VisitRecorded")
    def _visit_recorded(
        self,
        visit: str,
        visitnum: Decimal,
        target_date: date | None,
        earliest: date | None,
        latest: date | None,
        in_window: bool,
        deviation_flags: list[str],
        occurred_at: datetime,
    ) -> None:
        version = self._fact(
            "VisitRecorded",
            VisitRecord(
                occurred_at=occurred_at,
                visit=visit,
                visitnum=visitnum,
                target_date=target_date,
                earliest=earliest,
                latest=latest,
                in_window=in_window,
                deviation_flags=tuple(deviation_flags),
            ),
        )
        self.visit_outcomes[visit] = "attended"
        self.visit_versions[visit] = version
        self.flags.extend((version, f) for f in deviation_flags)

    def record_missed_visit(
        self, visit: str, occurred_at: datetime, *, config: StudyConfig = DEFAULT_CONFIG, reason: str | None = None
    ) -> None:
        """A scheduled follow-up visit that did not happen (R7: recorded explicitly)."""
        defn = config.visits.get(visit)
        if defn.kind != VisitKind.FOLLOW_UP:
            raise UnknownVisit(visit, [v.code for v in config.visits.follow_up])
        if self.tx_date is None:
            raise VisitBeforeTransplant(visit, "no MSC infusion (TX) is recorded")
        if visit in self.visit_outcomes:
            raise VisitAlreadyRecorded(visit, self.visit_outcomes[visit])
        self._at(f"missed visit {visit}", occurred_at, config, reconsent=False)
        self._visit_missed(
            visit=visit, visitnum=defn.visitnum, reason=(reason or "").strip() or None, occurred_at=occurred_at
        )
        if defn.month == config.settings.monthly_visits_through_month and self.main_study_completed_at is None:
            self._main_study_completed(visit=visit, occurred_at=occurred_at)

    @event("VisitMissed")
    def _visit_missed(self, visit: str, visitnum: Decimal, reason: str | None, occurred_at: datetime) -> None:
        version = self._fact("VisitMissed")
        self.visit_outcomes[visit] = "missed"
        self.visit_versions[visit] = version

    @event("MainStudyCompleted")
    def _main_study_completed(self, visit: str, occurred_at: datetime) -> None:
        """The 2-year main study is over (M24): the epoch becomes LONG-TERM FOLLOW-UP; the state is unchanged."""
        self._fact("MainStudyCompleted")
        self.main_study_completed_at = occurred_at
        self.epoch = Epoch.LONG_TERM_FOLLOW_UP

    def record_unscheduled_visit(
        self, occurred_at: datetime, *, config: StudyConfig = DEFAULT_CONFIG, purpose: str
    ) -> Decimal:
        """An unscheduled visit (always allowed after consent); VISITNUM = previous VISITNUM + 0.01·k."""
        self._at("unscheduled visit", occurred_at, config, reconsent=False, after_exit=AfterExit.SAFETY)
        purpose = require_text("a purpose", purpose, "unscheduled visit")
        attended = [
            (self.facts[v].record.occurred_at, self.facts[v].record.visitnum)  # type: ignore[union-attr]  # record type follows fact.type (see Fact)
            for code, v in self.visit_versions.items()
            if self.visit_outcomes[code] == "attended" and not self.facts[v].voided
        ]
        earlier = sorted(x for x in attended if x[0] <= occurred_at)
        previous = earlier[-1][1] if earlier else config.visits.get("SCR").visitnum
        k = 1 + sum(1 for _, num in self.unscheduled if previous < num < previous + 1)
        visitnum = visits.unscheduled_visitnum(previous, k)
        self._unscheduled_visit_recorded(visitnum=visitnum, purpose=purpose, occurred_at=occurred_at)
        return visitnum

    @event("UnscheduledVisitRecorded")
    def _unscheduled_visit_recorded(self, visitnum: Decimal, purpose: str, occurred_at: datetime) -> None:
        version = self._fact("UnscheduledVisitRecorded")
        self.unscheduled.append((version, visitnum))

    def record_team_evaluation(
        self,
        occurred_at: datetime,
        *,
        config: StudyConfig = DEFAULT_CONFIG,
        disciplines: Iterable[str],
        assessment: str,
        visit: str | None = None,
    ) -> None:
        """The integrated-team review (rheumatology, haematology, BMT); a missing discipline is flagged."""
        self._at("team evaluation", occurred_at, config)
        present = sorted({codes(Discipline, "discipline", d) for d in disciplines})
        if not present:
            raise MissingValue("the disciplines present", "team evaluation")
        if visit is not None:
            config.visits.get(visit)
        flags = [] if set(present) == set(Discipline) else [TEAM_FLAG]
        self._team_evaluation_recorded(
            disciplines=[d.value for d in present],
            assessment=require_text("an assessment", assessment, "team evaluation"),
            visit=visit,
            flags=flags,
            occurred_at=occurred_at,
        )

    @event("TeamEvaluationRecorded")
    def _team_evaluation_recorded(
        self, disciplines: list[str], assessment: str, visit: str | None, flags: list[str], occurred_at: datetime
    ) -> None:
        version = self._fact("TeamEvaluationRecorded")
        self.flags.extend((version, f) for f in flags)

    # =================================================================== adverse events (§7)
    def _ae(self, ae_id: str) -> AdverseEventState:
        ae = self.adverse_events.get(ae_id)
        if ae is None or ae.voided:
            raise UnknownAdverseEvent(ae_id)
        return ae

    def report_adverse_event(
        self,
        term: str,
        onset: date,
        occurred_at: datetime,
        *,
        config: StudyConfig = DEFAULT_CONFIG,
        grade_proposal: int | None = None,
        description: str | None = None,
        linked_to: str | None = None,
    ) -> str:
        """First AE entry (coordinator or investigator): term, onset, a grade proposal, no causality.
        Allowed from consent on, also after withdrawal or death (R8). Returns the AE id."""
        ae_id = f"AE-{len(self.adverse_events) + 1:03d}"
        record = self._ae_entry(
            config,
            dict(
                ae_id=ae_id,
                occurred_at=occurred_at,
                term=term,
                onset=onset,
                grade_proposal=grade_proposal,
                description=description,
                linked_to=linked_to,
            ),
        )
        self._adverse_event_reported(**_fields(record), occurred_at=occurred_at)
        return ae_id

    def _ae_entry(self, config: StudyConfig, i: dict[str, Any], replacing: int | None = None) -> AdverseEventEntry:
        at = i["occurred_at"]
        self._at("adverse event entry", at, config, reconsent=False, after_exit=AfterExit.ALWAYS)
        term = require_text("a term", i["term"], "adverse event")
        onset = i["onset"]
        if isinstance(onset, str):
            onset = date.fromisoformat(onset)
        onset = _day(onset)
        if onset < _day(self.consented_at):  # type: ignore[arg-type]  # record type follows fact.type (see Fact)
            raise AdverseEventBeforeConsent(onset, self.consented_at)  # type: ignore[arg-type]  # record type follows fact.type (see Fact)
        if onset > _day(at):
            raise InconsistentTimestamps("onset", onset, "entered on", _day(at))
        grade = None if i["grade_proposal"] is None else check_grade("grade_proposal", i["grade_proposal"])
        linked = i["linked_to"]
        given = [name for name, done in (("CYC", self.cyc), ("MSC", self.msc)) if done is not None]
        if linked is not None and linked not in given:
            raise InvalidChoice("linked_to", linked, given)
        return AdverseEventEntry(
            occurred_at=at,
            ae_id=i["ae_id"],
            term=term,
            onset=onset,
            grade_proposal=grade,
            description=i["description"] or None,
            linked_to=linked,
        )

    @event("AdverseEventReported")
    def _adverse_event_reported(
        self,
        ae_id: str,
        term: str,
        onset: date,
        grade_proposal: int | None,
        description: str | None,
        linked_to: str | None,
        occurred_at: datetime,
    ) -> None:
        version = self._fact(
            "AdverseEventReported",
            AdverseEventEntry(
                occurred_at=occurred_at,
                ae_id=ae_id,
                term=term,
                onset=onset,
                grade_proposal=grade_proposal,
                description=description,
                linked_to=linked_to,
            ),
        )
        self.adverse_events[ae_id] = AdverseEventState(ae_id, version, history=[version])

    def adverse_event_entry(self, ae_id: str) -> AdverseEventEntry:
        return self.facts[self._ae(ae_id).entry_version].record  # type: ignore[return-value]  # record type follows fact.type (see Fact)

    def assess_adverse_event(
        self,
        ae_id: str,
        occurred_at: datetime,
        *,
        config: StudyConfig = DEFAULT_CONFIG,
        grade: int,
        serious: bool,
        seriousness: Iterable[Seriousness | str] = (),
        relatedness_cyc: Any = None,
        relatedness_msc: Any = None,
        aware_at: datetime | None = None,
    ) -> None:
        """Investigator only: CTCAE grade, seriousness (ICH E2A) and relatedness to CYC and to AlloMSC.
        A serious AE starts the 24-h reporting clock at ``aware_at`` (default: this assessment)."""
        ae = self._ae(ae_id)
        self._at("adverse event assessment", occurred_at, config, reconsent=False, after_exit=AfterExit.ALWAYS)
        g, criteria, rc, rm = check_assessment(grade, serious, seriousness, relatedness_cyc, relatedness_msc)
        aware = ae.aware_at
        if serious and aware is None:
            aware = occurred_at if aware_at is None else aware_at
            formulas.check_not_in_future("aware_at", aware, clock.now(), settings=config.settings)
            if _day(aware) < self.adverse_event_entry(ae_id).onset:
                raise InconsistentTimestamps("onset", self.adverse_event_entry(ae_id).onset, "aware_at", aware)
        self._adverse_event_assessed(
            ae_id=ae_id,
            grade=g,
            serious=serious,
            seriousness=list(criteria),
            relatedness_cyc=rc,
            relatedness_msc=rm,
            aware_at=aware if serious else None,
            occurred_at=occurred_at,
        )

    @event("AdverseEventAssessed")
    def _adverse_event_assessed(
        self,
        ae_id: str,
        grade: int,
        serious: bool,
        seriousness: list[Seriousness],
        relatedness_cyc: Any,
        relatedness_msc: Any,
        aware_at: datetime | None,
        occurred_at: datetime,
    ) -> None:
        from sle_events.domain.payloads import Relatedness

        version = self._fact("AdverseEventAssessed")
        ae = self.adverse_events[ae_id]
        ae.grade, ae.serious = grade, serious
        ae.seriousness = tuple(Seriousness(s) for s in seriousness)
        ae.relatedness_cyc = None if relatedness_cyc is None else Relatedness(relatedness_cyc)
        ae.relatedness_msc = None if relatedness_msc is None else Relatedness(relatedness_msc)
        if aware_at is not None and ae.aware_at is None:
            ae.aware_at = aware_at
        ae.history.append(version)

    def assess_expectedness(
        self,
        ae_id: str,
        occurred_at: datetime,
        *,
        config: StudyConfig = DEFAULT_CONFIG,
        expectedness_cyc: Expectedness | str,
        expectedness_msc: Expectedness | str,
    ) -> bool:
        """Sponsor only: expectedness against the reference safety information, per product. Returns whether
        the AE is now a SUSAR (serious + related + unexpected)."""
        from sle_events.domain.adverse_events import is_susar

        ae = self._ae(ae_id)
        self._at("expectedness assessment", occurred_at, config, reconsent=False, after_exit=AfterExit.ALWAYS)
        ec = codes(Expectedness, "expectedness_cyc", expectedness_cyc)
        em = codes(Expectedness, "expectedness_msc", expectedness_msc)
        probe = AdverseEventState(**{**ae.__dict__, "expectedness_cyc": ec, "expectedness_msc": em})
        susar = is_susar(probe)
        self._expectedness_assessed(
            ae_id=ae_id, expectedness_cyc=ec, expectedness_msc=em, susar=susar, occurred_at=occurred_at
        )
        return susar

    @event("ExpectednessAssessed")
    def _expectedness_assessed(
        self,
        ae_id: str,
        expectedness_cyc: Expectedness,
        expectedness_msc: Expectedness,
        susar: bool,
        occurred_at: datetime,
    ) -> None:
        version = self._fact("ExpectednessAssessed")
        ae = self.adverse_events[ae_id]
        ae.expectedness_cyc, ae.expectedness_msc = Expectedness(expectedness_cyc), Expectedness(expectedness_msc)
        ae.history.append(version)

    def report_sae(
        self, ae_id: str, occurred_at: datetime, *, config: StudyConfig = DEFAULT_CONFIG
    ) -> formulas.SaeReportStatus:
        """The investigator reports a serious AE to the sponsor at ``occurred_at``; the status against the 24-h
        clock (aware_at + 24 h) is derived and recorded. Later calls are follow-up reports."""
        ae = self._ae(ae_id)
        if not ae.serious or ae.aware_at is None:
            raise InconsistentAssessment(
                f"{ae_id} is not assessed as serious; only SAEs are reported to the sponsor on the 24-h clock"
            )
        self._at("SAE report", occurred_at, config, reconsent=False, after_exit=AfterExit.ALWAYS)
        status = formulas.sae_report_status(
            ae.aware_at, ae.reported_at or occurred_at, clock.now(), settings=config.settings
        )
        self._serious_adverse_event_reported(
            ae_id=ae_id,
            aware_at=ae.aware_at,
            initial=ae.reported_at is None,
            status=status.value,
            occurred_at=occurred_at,
        )
        return status

    @event("SeriousAdverseEventReported")
    def _serious_adverse_event_reported(
        self, ae_id: str, aware_at: datetime, initial: bool, status: str, occurred_at: datetime
    ) -> None:
        version = self._fact("SeriousAdverseEventReported")
        ae = self.adverse_events[ae_id]
        if ae.reported_at is None:
            ae.reported_at = occurred_at
        ae.history.append(version)

    def sae_status(
        self, ae_id: str, *, config: StudyConfig = DEFAULT_CONFIG, now: datetime | None = None
    ) -> formulas.SaeReportStatus | None:
        return self._ae(ae_id).report_status(now or clock.now(), config.settings)

    def record_ae_outcome(
        self,
        ae_id: str,
        occurred_at: datetime,
        outcome: AeOutcome | str,
        *,
        config: StudyConfig = DEFAULT_CONFIG,
        resolved_on: date | None = None,
        action: AeAction | str | None = None,
    ) -> None:
        """AE follow-up: outcome (with the resolution date when it resolved or was fatal) and action taken."""
        ae = self._ae(ae_id)
        self._at("adverse event follow-up", occurred_at, config, reconsent=False, after_exit=AfterExit.ALWAYS)
        out = codes(AeOutcome, "outcome", outcome)
        act = None if action is None else codes(AeAction, "action", action)
        onset = self.adverse_event_entry(ae_id).onset
        final = out in (AeOutcome.RECOVERED, AeOutcome.RECOVERED_WITH_SEQUELAE, AeOutcome.FATAL)
        if final and resolved_on is None:
            raise MissingValue("the resolution date", f"outcome {out.value}")
        if resolved_on is not None:
            if resolved_on < onset:
                raise InconsistentTimestamps("onset", onset, "resolved_on", resolved_on)
            if resolved_on > _day(occurred_at):
                raise InconsistentTimestamps("resolved_on", resolved_on, "entered on", _day(occurred_at))
        if out == AeOutcome.FATAL and ae.grade != 5:
            raise InconsistentAssessment("a fatal outcome needs the AE assessed as CTCAE grade 5 first")
        self._adverse_event_followed_up(
            ae_id=ae_id, outcome=out, resolved_on=resolved_on, action=act, occurred_at=occurred_at
        )

    @event("AdverseEventFollowedUp")
    def _adverse_event_followed_up(
        self, ae_id: str, outcome: AeOutcome, resolved_on: date | None, action: AeAction | None, occurred_at: datetime
    ) -> None:
        version = self._fact("AdverseEventFollowedUp")
        ae = self.adverse_events[ae_id]
        ae.outcome, ae.resolved_on, ae.action = AeOutcome(outcome), resolved_on, action
        ae.history.append(version)

    # =================================================================== concomitant medication, deviations
    def record_concomitant_medication(
        self,
        name: str,
        start_date: date,
        occurred_at: datetime,
        *,
        config: StudyConfig = DEFAULT_CONFIG,
        dose: Any = None,
        dose_unit: str | None = None,
        route: str | None = None,
        frequency: str | None = None,
        end_date: date | None = None,
        indication: str | None = None,
    ) -> int:
        record = self._conmed(
            config,
            dict(
                occurred_at=occurred_at,
                name=name,
                dose=dose,
                dose_unit=dose_unit,
                route=route,
                frequency=frequency,
                start_date=start_date,
                end_date=end_date,
                indication=indication,
            ),
        )
        self._concomitant_medication_recorded(**_fields(record), occurred_at=occurred_at)
        return self.version

    def _conmed(self, config: StudyConfig, i: dict[str, Any], replacing: int | None = None) -> ConcomitantMedication:
        self._at("concomitant medication", i["occurred_at"], config, reconsent=False, after_exit=AfterExit.SAFETY)
        name = require_text("a medication name", i["name"], "concomitant medication")
        start, end = i["start_date"], i["end_date"]
        start = date.fromisoformat(start) if isinstance(start, str) else start
        end = date.fromisoformat(end) if isinstance(end, str) else end
        if not isinstance(start, date):
            raise MissingValue("a start date", "concomitant medication")
        if end is not None and end < start:
            raise InconsistentTimestamps("start_date", start, "end_date", end)
        dose = parse_optional_decimal("dose", i["dose"])
        if dose is not None and dose < 0:
            raise InvalidChoice("dose", i["dose"], ["a non-negative decimal"])
        if dose is not None and not i["dose_unit"]:
            raise MissingValue("the dose unit", "concomitant medication")
        return ConcomitantMedication(
            occurred_at=i["occurred_at"],
            name=name,
            dose=dose,
            dose_unit=i["dose_unit"] or None,
            route=i["route"] or None,
            frequency=i["frequency"] or None,
            start_date=start,
            end_date=end,
            indication=i["indication"] or None,
        )

    @event("ConcomitantMedicationRecorded")
    def _concomitant_medication_recorded(
        self,
        name: str,
        dose: Decimal | None,
        dose_unit: str | None,
        route: str | None,
        frequency: str | None,
        start_date: date,
        end_date: date | None,
        indication: str | None,
        occurred_at: datetime,
    ) -> None:
        self._fact(
            "ConcomitantMedicationRecorded",
            ConcomitantMedication(
                occurred_at=occurred_at,
                name=name,
                dose=dose,
                dose_unit=dose_unit,
                route=route,
                frequency=frequency,
                start_date=start_date,
                end_date=end_date,
                indication=indication,
            ),
        )

    def record_deviation(
        self,
        occurred_at: datetime,
        *,
        config: StudyConfig = DEFAULT_CONFIG,
        category: DeviationCategory | str,
        description: str,
        lot_id: str | None = None,
    ) -> int:
        """A protocol deviation (investigator). One naming an MSC lot, recorded before the infusion, authorises
        infusing a lot that fails release (R5)."""
        self._at("deviation", occurred_at, config, consent=False, reconsent=False)
        cat = codes(DeviationCategory, "category", category)
        text = require_text("a description", description, "deviation")
        if lot_id is not None and not str(lot_id).strip():
            raise MissingValue("the lot id", "deviation")
        self._deviation_recorded(category=cat, description=text, lot_id=lot_id, occurred_at=occurred_at)
        return self.version

    @event("DeviationRecorded")
    def _deviation_recorded(
        self, category: DeviationCategory, description: str, lot_id: str | None, occurred_at: datetime
    ) -> None:
        version = self._fact("DeviationRecorded")
        self.deviations[version] = {
            "category": DeviationCategory(category),
            "description": description,
            "lot_id": lot_id,
            "occurred_at": occurred_at,
        }

    # =================================================================== corrections and voids (R11)
    _CHECKS = {  # noqa: RUF012 - a lookup table, never mutated (no annotation: the aggregate has no fields)
        "LabResultRecorded": "_lab_result",
        "VitalSignsRecorded": "_vital_signs",
        "DemographicsRecorded": "_demographics",
        "MedicalHistoryRecorded": "_medical_history",
        "ConcomitantMedicationRecorded": "_conmed",
        "AdverseEventReported": "_ae_entry",
        "SledaiAssessed": "_sledai",
        "TregPanelRecorded": "_treg_panel",
        "PregnancyTestRecorded": "_pregnancy_test",
        "VisitRecorded": "_visit",
        "CyclophosphamideGiven": "_pretreatment",
        "MSCInfused": "_infusion",
    }

    def _relied_on(self, version: int) -> str | None:
        cyc = self.cyc
        if cyc is not None and version in (cyc.measured_version, cyc.pregnancy_test_version):
            return f"the cyclophosphamide record v{self.cyc_version} relies on it"
        return None

    def correct(
        self,
        version: int,
        new_values: Mapping[str, Any],
        reason: str,
        occurred_at: datetime,
        *,
        config: StudyConfig = DEFAULT_CONFIG,
    ) -> Record:
        """R11: correct the fact recorded at ``version`` with ``new_values`` and a mandatory reason. The original
        stays; the corrected values pass the same checks as the original verb, so a correction that would break
        a rule is refused like the original. Returns the corrected record."""
        text = corrections.require_reason(reason, "a correction")
        fact = self.facts.get(version)
        if fact is None:
            raise UnknownEventVersion(version)
        spec = corrections.CORRECTABLE.get(fact.type)
        if spec is None or fact.record is None:
            raise NotCorrectable(
                version, fact.type, f"only {', '.join(sorted(corrections.CORRECTABLE))} can be corrected"
            )
        if fact.voided:
            raise NotCorrectable(version, fact.type, "it was voided")
        relied = self._relied_on(version)
        if relied:
            raise NotCorrectable(version, fact.type, relied)
        formulas.check_not_in_future("occurred_at", occurred_at, clock.now(), settings=config.settings)
        inputs = corrections.merged_inputs(fact.record, spec, new_values)
        new: Record = getattr(self, self._CHECKS[fact.type])(config, inputs, replacing=version)
        changed = corrections.changed_values(fact.record, new)
        self._corrected(
            corrected_version=version,
            corrected_type=fact.type,
            new_values=changed,
            reason=text,
            occurred_at=occurred_at,
        )
        return new

    @event("Corrected")
    def _corrected(
        self,
        corrected_version: int,
        corrected_type: str,
        new_values: dict[str, Any],
        reason: str,
        occurred_at: datetime,
    ) -> None:
        version = self._fact("Corrected")
        fact = self.facts[corrected_version]
        self.changed_fields[version] = tuple(sorted(new_values))  # as signed (canonical JSON sorts keys)
        fact.record = corrections.apply(fact.record, new_values)  # type: ignore[arg-type]  # record type follows fact.type (see Fact)
        fact.corrections.append(version)
        if corrected_type == "VisitRecorded":
            self.flags = [(v, f) for v, f in self.flags if v != corrected_version]
            self.flags.extend((corrected_version, f) for f in fact.record.deviation_flags)  # type: ignore[attr-defined]  # record type follows fact.type (see Fact)
        elif corrected_type == "CyclophosphamideGiven":
            self.flags = [(v, f) for v, f in self.flags if v != corrected_version]
            self.flags.extend((corrected_version, f) for f in fact.record.flags)  # type: ignore[attr-defined]  # record type follows fact.type (see Fact)

    def void(self, version: int, reason: str, occurred_at: datetime, *, config: StudyConfig = DEFAULT_CONFIG) -> None:
        """R11: retire a fact entered in error (duplicate, wrong subject...) with a mandatory reason."""
        text = corrections.require_reason(reason, "a void")
        fact = self.facts.get(version)
        if fact is None:
            raise UnknownEventVersion(version)
        if fact.type not in corrections.VOIDABLE:
            raise NotCorrectable(version, fact.type, f"only {', '.join(sorted(corrections.VOIDABLE))} can be voided")
        if fact.voided:
            raise NotCorrectable(version, fact.type, "it was already voided")
        relied = self._relied_on(version)
        if relied:
            raise NotCorrectable(version, fact.type, relied)
        formulas.check_not_in_future("occurred_at", occurred_at, clock.now(), settings=config.settings)
        self._voided(voided_version=version, voided_type=fact.type, reason=text, occurred_at=occurred_at)

    @event("Voided")
    def _voided(self, voided_version: int, voided_type: str, reason: str, occurred_at: datetime) -> None:
        self._fact("Voided")
        fact = self.facts[voided_version]
        fact.voided = True
        if voided_type == "AdverseEventReported":
            self.adverse_events[fact.record.ae_id].voided = True  # type: ignore[union-attr]  # record type follows fact.type (see Fact)
        elif voided_type == "UnscheduledVisitRecorded":
            self.unscheduled = [(v, n) for v, n in self.unscheduled if v != voided_version]
        elif voided_type == "ContactAttempted":
            self.contact_attempts = [(v, t) for v, t in self.contact_attempts if v != voided_version]

    # =================================================================== disposition (T11–T15)
    def withdraw(
        self,
        occurred_at: datetime,
        *,
        config: StudyConfig = DEFAULT_CONFIG,
        reason_code: Disposition | str,
        reason: str,
        decided_by: DecidedBy | str,
        safety_follow_up_agreed: bool,
    ) -> None:
        """T12: a reason from the disposition list, who decided, and whether the subject agrees to safety
        follow-up (which decides what may still be recorded, R8)."""
        self._status_in("withdrawal", WITHDRAWABLE, "before enrollment, consent withdrawn is a screen failure (T5)")
        code = codes(Disposition, "reason_code", reason_code)
        who = codes(DecidedBy, "decided_by", decided_by)
        text = reason.strip() if isinstance(reason, str) else ""
        if not text:
            raise ReasonRequired("a withdrawal")
        if not isinstance(safety_follow_up_agreed, bool):
            raise InvalidChoice("safety_follow_up_agreed", safety_follow_up_agreed, (True, False))
        self._at("withdrawal", occurred_at, config, reconsent=False)
        self._withdrawn(
            reason_code=code,
            reason=text,
            decided_by=who,
            safety_follow_up_agreed=safety_follow_up_agreed,
            occurred_at=occurred_at,
        )

    @event("Withdrawn")
    def _withdrawn(
        self,
        reason_code: Disposition,
        reason: str,
        decided_by: DecidedBy,
        safety_follow_up_agreed: bool,
        occurred_at: datetime,
    ) -> None:
        self._fact("Withdrawn")
        self.status = S.WITHDRAWN
        self.exited_at = occurred_at
        self.safety_follow_up_agreed = safety_follow_up_agreed
        self.withdrawal = {
            "reason_code": Disposition(reason_code),
            "reason": reason,
            "decided_by": DecidedBy(decided_by),
            "occurred_at": occurred_at,
        }

    def record_contact_attempt(
        self, occurred_at: datetime, *, config: StudyConfig = DEFAULT_CONFIG, method: str, outcome: str
    ) -> None:
        """A documented attempt to reach a subject who misses visits (T13 needs ≥ 3)."""
        self._status_in("contact attempt", [S.TRANSPLANTED, S.IN_FOLLOW_UP, S.LOST_TO_FOLLOW_UP])
        self._at("contact attempt", occurred_at, config, reconsent=False, after_exit=AfterExit.CONTACT)
        self._contact_attempted(
            method=require_text("a method", method, "contact attempt"),
            outcome=require_text("an outcome", outcome, "contact attempt"),
            occurred_at=occurred_at,
        )

    @event("ContactAttempted")
    def _contact_attempted(self, method: str, outcome: str, occurred_at: datetime) -> None:
        version = self._fact("ContactAttempted")
        self.contact_attempts.append((version, occurred_at))

    def mark_lost_to_follow_up(self, occurred_at: datetime, *, config: StudyConfig = DEFAULT_CONFIG) -> None:
        """T13: ≥ 2 consecutive scheduled visits missed and ≥ 3 documented contact attempts since the last
        attended visit."""
        self._status_in("lost to follow-up", [S.IN_FOLLOW_UP])
        self._at("lost to follow-up", occurred_at, config, reconsent=False)
        s = config.settings
        streak = visits.missed_in_a_row(config.visits, self.visit_outcomes)
        attended = [
            self.facts[v].record.occurred_at  # type: ignore[union-attr]  # record type follows fact.type (see Fact)
            for c, v in self.visit_versions.items()
            if self.visit_outcomes[c] == "attended" and not self.facts[v].voided
        ]
        since = max(attended) if attended else self.msc.occurred_at  # type: ignore[union-attr]  # record type follows fact.type (see Fact)
        attempts = sum(1 for _, t in self.contact_attempts if since <= t <= occurred_at)
        if streak < s.ltfu_min_consecutive_missed_visits or attempts < s.ltfu_min_contact_attempts:
            raise LostToFollowUpNotDue(
                streak, attempts, s.ltfu_min_consecutive_missed_visits, s.ltfu_min_contact_attempts
            )
        self._lost_to_follow_up(missed_in_a_row=streak, contact_attempts=attempts, occurred_at=occurred_at)

    @event("LostToFollowUp")
    def _lost_to_follow_up(self, missed_in_a_row: int, contact_attempts: int, occurred_at: datetime) -> None:
        self._fact("LostToFollowUp")
        self.status = S.LOST_TO_FOLLOW_UP
        self.exited_at = occurred_at
        self.ltfu_at = occurred_at

    def record_return(self, occurred_at: datetime, reason: str, *, config: StudyConfig = DEFAULT_CONFIG) -> None:
        """T14: a subject lost to follow-up comes back (investigator, with a reason)."""
        self._status_in("return", [S.LOST_TO_FOLLOW_UP])
        text = reason.strip() if isinstance(reason, str) else ""
        if not text:
            raise ReasonRequired("a return from lost to follow-up")
        self._at("return", occurred_at, config, reconsent=False, after_exit=AfterExit.ALWAYS)
        self._returned(reason=text, occurred_at=occurred_at)

    @event("Returned")
    def _returned(self, reason: str, occurred_at: datetime) -> None:
        self._fact("Returned")
        self.status = S.IN_FOLLOW_UP
        self.exited_at = None
        self.ltfu_at = None

    @property
    def last_known_alive(self) -> datetime:
        """The latest instant the subject was seen or sampled (clinical facts, not reviews or corrections)."""
        seen = [self.screened_at]
        if self.consented_at:
            seen.append(self.consented_at)
        for _v, f in self.facts.items():
            if (
                f.voided
                or f.record is None
                or f.type
                in (
                    "DerivedResultRecorded",
                    "AdverseEventReported",
                    "DemographicsRecorded",
                    "MedicalHistoryRecorded",
                    "RenalResponseAssessed",
                )
            ):
                continue
            seen.append(f.record.occurred_at)
        seen.extend(s.admitted_at for s in self.stays)
        seen.extend(s.discharged_at for s in self.stays if s.discharged_at)
        return max(seen)

    def record_death(
        self,
        occurred_at: datetime,
        cause: str,
        *,
        config: StudyConfig = DEFAULT_CONFIG,
        ae_id: str | None = None,
        aware_at: datetime | None = None,
    ) -> str | None:
        """T15: from any post-consent state (also WITHDRAWN or LOST_TO_FOLLOW_UP); the date of death is not
        before the last known alive date; the cause is recorded. Unless a serious AE is already open (or
        ``ae_id`` names the AE that caused it), a serious grade-5 AE is opened in the same batch and its 24-h
        clock starts at ``aware_at`` (default: now). Returns the id of the AE opened, if any."""
        self._status_in("death", POST_CONSENT)
        text = require_text("a cause of death", cause, "death")
        self._at("death", occurred_at, config, reconsent=False, after_exit=AfterExit.ALWAYS)
        alive = self.last_known_alive
        if occurred_at.date() < alive.date():
            raise DeathBeforeLastKnownAlive(occurred_at, alive)
        if ae_id is not None:
            self._ae(ae_id)
        open_sae = ae_id is not None or any(a.serious and a.open for a in self.adverse_events.values())
        aware = aware_at or max(clock.now(), occurred_at)
        if aware < occurred_at:
            raise InconsistentTimestamps("date of death", occurred_at, "aware_at", aware)
        formulas.check_not_in_future("aware_at", aware, clock.now(), settings=config.settings)
        self._death_recorded(cause=text, ae_id=ae_id, occurred_at=occurred_at)
        if open_sae:
            return None
        new_id = f"AE-{len(self.adverse_events) + 1:03d}"
        self._adverse_event_reported(
            ae_id=new_id,
            term=text,
            onset=occurred_at.date(),
            grade_proposal=5,
            description="opened with the death record (T15)",
            linked_to=None,
            occurred_at=occurred_at,
        )
        self._adverse_event_assessed(
            ae_id=new_id,
            grade=5,
            serious=True,
            seriousness=[Seriousness.DEATH],
            relatedness_cyc=None,
            relatedness_msc=None,
            aware_at=aware,
            occurred_at=occurred_at,
        )
        return new_id

    @event("DeathRecorded")
    def _death_recorded(self, cause: str, ae_id: str | None, occurred_at: datetime) -> None:
        self._fact("DeathRecorded")
        self.status = S.DIED
        self.died_at = occurred_at
        self.exited_at = occurred_at if self.exited_at is None else min(self.exited_at, occurred_at)

    def complete_study(self, occurred_at: datetime, *, config: StudyConfig = DEFAULT_CONFIG) -> None:
        """T11: the last scheduled visit of the configured schedule (M48 by default) is done or missed."""
        self._status_in("study completion", [S.IN_FOLLOW_UP])
        last = config.visits.last_scheduled
        if last.code not in self.visit_outcomes:
            raise CompletionNotDue(last.code)
        self._at("study completion", occurred_at, config, reconsent=False)
        self._study_completed(last_visit=last.code, occurred_at=occurred_at)

    @event("StudyCompleted")
    def _study_completed(self, last_visit: str, occurred_at: datetime) -> None:
        self._fact("StudyCompleted")
        self.status = S.COMPLETED
        self.completed_at = occurred_at
        self.exited_at = occurred_at

    # =================================================================== questions
    @property
    def exited(self) -> bool:
        return self.status in EXITED
