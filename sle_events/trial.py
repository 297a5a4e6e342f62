"""The trial's use cases: load the aggregate, call the verb, record what it decided.

:class:`Trial` wraps a :class:`~sle_events.store.record.StudyRecord` and one study. Each method is one use case
(``trial.screen(...)``, ``trial.record_lab_result(subject_id, ..., signer=lab)``): it loads the subject (or lot,
or study), passes the study's current configuration into the domain verb, and records the resulting events,
signed by ``signer``, in one atomic append. A verb that refuses raises before any event exists; a store that
refuses (role, key, clock, concurrent writer) stores nothing and the cached aggregate is dropped.

Aggregates are cached between use cases (a subject is not replayed for every command). Another writer's event
makes the cached copy stale; the store then refuses the append (``VersionConflict``), the copy is dropped, and a
retry works on the current stream. The study's configuration is the store's current view of the study.

Besides the verbs, the application does what needs more than one aggregate or the study's permission table:
unique screening numbers and lot numbers (deterministic stream ids), marking an MSC lot infused with the
infusion, deriving eGFR and UPCR when the lab's inputs arrive, and refusing a correction by a role that may not
record the corrected event (R10/R11).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from datetime import date, datetime
from typing import Any, TypeVar, cast
from uuid import UUID

from sqlalchemy import select

from sle_events.domain import clock, lab_results, review
from sle_events.domain.casebook import (
    SIGNATURE_DEFS,
    Casebook,
    CoveredStream,
    LockStateError,
    OpenQueriesBlockLock,
    RoleMayNotSign,
    SigningKeyNotUsable,
    UnknownMeaning,
    content_hash,
    visit_versions,
)
from sle_events.domain.errors import (
    DuplicateScreeningNumber,
    LotUnavailable,
    ProtocolViolation,
    RoleMayNotCorrect,
    UnknownEventVersion,
    UnknownFact,
    UnknownQuery,
    UnknownSubject,
)
from sle_events.domain.event_types import stored_topics, type_name
from sle_events.domain.payloads import EligibilityChecklist, LabResult
from sle_events.domain.product import ProductLot
from sle_events.domain.review import FactSdv, Query, QueryStatus, SdvItem, SourceVerification, sdv_status
from sle_events.domain.roles import DEFAULT_PERMISSIONS
from sle_events.domain.settings import StudySettings
from sle_events.domain.study import Study
from sle_events.domain.study_config import StudyConfig, VisitSchedule
from sle_events.domain.subject import Subject
from sle_events.signing.envelope import SealedEvent, open_stored, parse_time
from sle_events.signing.keys import Signer
from sle_events.store import review as review_store
from sle_events.store.casebook import open_queries_blocking_lock
from sle_events.store.errors import VersionConflict
from sle_events.store.record import StudyRecord

__all__ = ["Trial"]

T = TypeVar("T")


class Trial:
    """One study's use cases over a study record."""

    def __init__(self, record: StudyRecord, study_id: UUID, *, cache_size: int = 4096) -> None:
        self.record = record
        self.study_id = study_id
        self._cache: OrderedDict[UUID, Any] = OrderedDict()
        self._cache_size = cache_size
        self.record.study(study_id)  # UnknownStudy early

    # ------------------------------------------------------------------------------------------ the study
    @classmethod
    def create(
        cls,
        record: StudyRecord,
        *,
        code: str,
        title: str,
        admin: Signer,
        people: Iterable[Signer | tuple[Signer, str | None]] = (),
        occurred_at: datetime | None = None,
        permissions: dict[str, list[str]] | None = None,
        study_id: UUID | None = None,
        admin_printed_name: str | None = None,
    ) -> Trial:
        """Create a study with ``admin`` as its trust root (with their printed name) and register the keys of
        ``people`` (one batch): each a ``(signer, printed name)`` of a person, or a service's signer alone."""
        when = occurred_at or clock.now()
        study = Study.create(
            code,
            title,
            admin.actor,
            admin.public_key_b64,
            when,
            permissions,
            study_id=study_id,
            admin_printed_name=admin_printed_name,
        )
        for entry in people:
            person, name = entry if isinstance(entry, tuple) else (entry, None)
            study.register_key(person.actor, person.role, person.public_key_b64, when, printed_name=name)
        record.record(study, signer=admin)
        return cls(record, study.id)

    @property
    def study(self) -> Study:
        """The study as the store last saw it (trust root, keys, permissions, configuration). Read-only."""
        return self.record.study(self.study_id)

    @property
    def config(self) -> StudyConfig:
        return self.study.config

    def _on_study(self, signer: Signer, verb: Callable[[Study], T]) -> T:
        study: Study = self.record.get(self.study_id)
        result = verb(study)
        self.record.record(study, signer=signer)
        return result

    def register_key(
        self,
        person: Signer,
        *,
        admin: Signer,
        occurred_at: datetime | None = None,
        printed_name: str | None = None,
    ) -> str:
        """Register a person's key with their printed name, or a service's key (``printed_name`` None)."""
        return self._on_study(
            admin,
            lambda s: s.register_key(
                person.actor, person.role, person.public_key_b64, occurred_at or clock.now(), printed_name=printed_name
            ),
        )

    def change_permissions(
        self, event_type: str, roles: list[str], *, admin: Signer, occurred_at: datetime | None = None
    ) -> None:
        self._on_study(admin, lambda s: s.change_permissions(event_type, roles, occurred_at or clock.now()))

    def approve_new_study(
        self, code: str, admin_actor: str, admin_public_key: str, *, signer: Signer, occurred_at: datetime | None = None
    ) -> str:
        """Let a study with this code and trust-root key be created in the same database (this study's admin
        decides, signed and logged). Returns the approved key's id."""
        approved: list[str] = []
        self._on_study(
            signer,
            lambda s: approved.append(
                s.approve_new_study(code, admin_actor, admin_public_key, occurred_at or clock.now())
            ),
        )
        return approved[0]

    def add_site(
        self, site_id: str, name: str, timezone: str, *, signer: Signer, occurred_at: datetime | None = None
    ) -> None:
        self._on_study(signer, lambda s: s.add_site(site_id, name, timezone, occurred_at or clock.now()))

    def close_site(self, site_id: str, reason: str, *, signer: Signer, occurred_at: datetime | None = None) -> None:
        self._on_study(signer, lambda s: s.close_site(site_id, reason, occurred_at or clock.now()))

    def approve_icf_version(
        self, version: str, effective_from: datetime, *, signer: Signer, occurred_at: datetime | None = None
    ) -> None:
        self._on_study(signer, lambda s: s.approve_icf_version(version, effective_from, occurred_at or clock.now()))

    def define_visit_schedule(
        self, schedule: VisitSchedule, *, signer: Signer, occurred_at: datetime | None = None
    ) -> None:
        self._on_study(signer, lambda s: s.define_visit_schedule(schedule, occurred_at or clock.now()))

    def adopt_settings(self, settings: StudySettings, *, signer: Signer, occurred_at: datetime | None = None) -> None:
        self._on_study(signer, lambda s: s.adopt_settings(settings, occurred_at or clock.now()))

    # ------------------------------------------------------------------------------------------ plumbing
    def _exists(self, stream: UUID) -> bool:
        return stream in self._cache or bool(self.record.recorder.select_events(stream, limit=1))

    def subject_id(self, subject: UUID | str) -> UUID:
        """A subject's stream id from its id or its screening number (either form is accepted wherever a use case
        takes a subject); anything else is `UnknownSubject`."""
        if isinstance(subject, UUID):
            return subject
        if not isinstance(subject, str) or not subject.strip():
            raise UnknownSubject(subject)
        try:
            return UUID(subject.strip())
        except ValueError:
            return Subject.id_for(self.study_id, subject.strip())

    def _load(self, stream: UUID | str, kind: type) -> Any:
        if kind is Subject:
            stream = self.subject_id(stream)
        elif not isinstance(stream, UUID):
            raise LotUnavailable(str(stream), "not a lot id")
        agg = self._cache.get(stream)
        if agg is None:
            if not self._exists(stream):
                raise UnknownSubject(stream) if kind is Subject else LotUnavailable(str(stream), "not recorded")
            agg = self.record.get(stream)
            if not isinstance(agg, kind):
                raise UnknownSubject(stream) if kind is Subject else LotUnavailable(str(stream), "not a lot")
        self._remember(agg)
        return agg

    def _remember(self, agg: Any) -> None:
        self._cache[agg.id] = agg
        self._cache.move_to_end(agg.id)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def _forget(self, *aggregates: Any) -> None:
        for agg in aggregates:
            agg.collect_events()
            self._cache.pop(agg.id, None)

    def _record(self, signer: Signer, aggregates: list[Any], verb: Callable[[], T]) -> T:
        """Run the verb, then record every aggregate's new events in one append; on any refusal nothing is
        stored and the touched aggregates are dropped from the cache (they are reloaded next time)."""
        try:
            result = verb()
            self.record.record(*aggregates, signer=signer)
        except BaseException:
            self._forget(*aggregates)
            raise
        for agg in aggregates:
            self._remember(agg)
        return result

    def _subject_verb(self, subject_id: UUID, signer: Signer, verb: Callable[[Subject, StudyConfig], T]) -> T:
        subject: Subject = self._load(subject_id, Subject)
        config = self.config
        return self._record(signer, [subject], lambda: verb(subject, config))

    def subject(self, subject_id: UUID) -> Subject:
        """The subject's current state (read-only: use the use cases to change it)."""
        return self._load(subject_id, Subject)

    def lot(self, lot_id: str) -> ProductLot:
        return self._load(ProductLot.id_for(self.study_id, lot_id), ProductLot)

    def stream(self, subject_id: UUID) -> list[SealedEvent]:
        return self.record.stream(subject_id)

    # ------------------------------------------------------------------------------------------ screening
    def screen(
        self,
        site: str,
        screening_number: str,
        occurred_at: datetime,
        *,
        signer: Signer,
        rescreen_of: UUID | None = None,
    ) -> UUID:
        """T1 (a new stream per screening number; re-screening links the old stream in the same batch)."""
        number = screening_number.strip() if isinstance(screening_number, str) else screening_number
        new_id = Subject.id_for(self.study_id, number) if isinstance(number, str) and number else None
        if new_id is not None and self._exists(new_id):
            raise DuplicateScreeningNumber(number)
        old = None if rescreen_of is None else self._load(rescreen_of, Subject)
        config = self.config
        holder: list[Subject] = []

        def verb() -> UUID:
            subject = Subject.screen(self.study_id, site, screening_number, occurred_at, config=config, rescreen_of=old)
            holder.append(subject)
            aggregates.insert(0, subject)
            return subject.id

        aggregates: list[Any] = [] if old is None else [old]
        try:
            return self._record(signer, aggregates, verb)
        except VersionConflict as e:
            if holder and e.stream == str(holder[0].id):
                raise DuplicateScreeningNumber(number) from e
            raise

    def obtain_consent(
        self,
        subject_id: UUID,
        icf_version: str,
        occurred_at: datetime,
        *,
        signer: Signer,
        taken_by: str,
        signed_by: str = "subject",
    ) -> None:
        self._subject_verb(
            subject_id,
            signer,
            lambda s, c: s.obtain_consent(icf_version, occurred_at, config=c, taken_by=taken_by, signed_by=signed_by),
        )

    def screen_fail(
        self,
        subject_id: UUID,
        occurred_at: datetime,
        *,
        signer: Signer,
        reason: str,
        failed_criteria: Iterable[str] = (),
    ) -> None:
        self._subject_verb(
            subject_id,
            signer,
            lambda s, c: s.screen_fail(occurred_at, config=c, reason=reason, failed_criteria=failed_criteria),
        )

    def record_demographics(
        self,
        subject_id: UUID,
        sex: str,
        birth_date: date,
        occurred_at: datetime,
        *,
        signer: Signer,
        childbearing_potential: bool,
    ) -> int:
        return self._subject_verb(
            subject_id,
            signer,
            lambda s, c: s.record_demographics(
                sex, birth_date, occurred_at, config=c, childbearing_potential=childbearing_potential
            ),
        )

    def record_medical_history(
        self, subject_id: UUID, term: str, occurred_at: datetime, *, signer: Signer, **details: Any
    ) -> int:
        return self._subject_verb(
            subject_id, signer, lambda s, c: s.record_medical_history(term, occurred_at, config=c, **details)
        )

    def record_classification(
        self, subject_id: UUID, ana_titer: str, items: Iterable[str], occurred_at: datetime, *, signer: Signer
    ) -> Any:
        return self._subject_verb(
            subject_id, signer, lambda s, c: s.record_classification(ana_titer, items, occurred_at, config=c)
        )

    def record_biopsy(
        self, subject_id: UUID, biopsy_date: date, biopsy_class: str, occurred_at: datetime, *, signer: Signer
    ) -> None:
        self._subject_verb(
            subject_id, signer, lambda s, c: s.record_biopsy(biopsy_date, biopsy_class, occurred_at, config=c)
        )

    def confirm_eligibility(
        self, subject_id: UUID, occurred_at: datetime, checklist: EligibilityChecklist, *, signer: Signer
    ) -> None:
        self._subject_verb(
            subject_id, signer, lambda s, c: s.confirm_eligibility(occurred_at, config=c, checklist=checklist)
        )

    def enroll(self, subject_id: UUID, occurred_at: datetime, *, signer: Signer) -> None:
        self._subject_verb(subject_id, signer, lambda s, c: s.enroll(occurred_at, config=c))

    # ------------------------------------------------------------------------------------------ treatment
    def admit(self, subject_id: UUID, occurred_at: datetime, *, signer: Signer, purpose: str = "pretreatment") -> None:
        self._subject_verb(subject_id, signer, lambda s, c: s.admit(occurred_at, config=c, purpose=purpose))

    def discharge(
        self, subject_id: UUID, occurred_at: datetime, *, signer: Signer, prolonged_by_ae: str | None = None
    ) -> int:
        return self._subject_verb(
            subject_id, signer, lambda s, c: s.discharge(occurred_at, config=c, prolonged_by_ae=prolonged_by_ae)
        )

    def record_vital_signs(self, subject_id: UUID, occurred_at: datetime, *, signer: Signer, **values: Any) -> int:
        return self._subject_verb(
            subject_id, signer, lambda s, c: s.record_vital_signs(occurred_at, config=c, **values)
        )

    def record_pregnancy_test(self, subject_id: UUID, occurred_at: datetime, result: str, *, signer: Signer) -> int:
        return self._subject_verb(
            subject_id, signer, lambda s, c: s.record_pregnancy_test(occurred_at, result, config=c)
        )

    def give_pretreatment(
        self,
        subject_id: UUID,
        occurred_at: datetime,
        stopped_at: datetime,
        prescribed_mg_per_m2: Any,
        administered_mg: Any,
        lot: str,
        *,
        signer: Signer,
        route: str = "IV",
    ) -> Any:
        return self._subject_verb(
            subject_id,
            signer,
            lambda s, c: s.give_pretreatment(
                occurred_at, stopped_at, prescribed_mg_per_m2, administered_mg, lot, config=c, route=route
            ),
        )

    def release_product_lot(
        self, lot_id: str, subject_id: UUID, occurred_at: datetime, *, signer: Signer, **results: Any
    ) -> ProductLot:
        """The cell-processing facility records the release testing of a lot made for ``subject_id``."""
        if isinstance(lot_id, str) and self._exists(ProductLot.id_for(self.study_id, lot_id.strip())):
            raise LotUnavailable(lot_id, "its release is already recorded")
        self._load(subject_id, Subject)
        lot = ProductLot.record_release(self.study_id, lot_id, subject_id, occurred_at, config=self.config, **results)
        return self._record(signer, [lot], lambda: lot)

    def infuse_msc(
        self,
        subject_id: UUID,
        lot_id: str,
        occurred_at: datetime,
        stopped_at: datetime,
        *,
        signer: Signer,
        volume_ml: Any = None,
        premedication: str | None = None,
    ) -> Any:
        """T8: the subject's ``MSCInfused`` and the lot's ``Infused`` in one append."""
        subject: Subject = self._load(subject_id, Subject)
        lot: ProductLot = self.lot(lot_id)
        config = self.config

        def verb() -> Any:
            infusion = subject.infuse_msc(
                occurred_at, stopped_at, lot, config=config, volume_ml=volume_ml, premedication=premedication
            )
            lot.mark_infused(subject.id, occurred_at, config=config)
            return infusion

        return self._record(signer, [subject, lot], verb)

    def record_transplant_not_performed(
        self, subject_id: UUID, occurred_at: datetime, reason: str, *, signer: Signer
    ) -> None:
        self._subject_verb(
            subject_id, signer, lambda s, c: s.record_transplant_not_performed(occurred_at, reason, config=c)
        )

    # ------------------------------------------------------------------------------------------ results
    def _derive_after(self, subject: Subject, version: int, config: StudyConfig, signer: Signer) -> None:
        """Derived values follow their inputs in the same append, when the signer may record them."""
        if signer.role not in self.study.permissions.get("Subject.DerivedResultRecorded", []):
            return
        lab = cast(LabResult, subject.facts[version].record)  # the fact at `version` is a LabResultRecorded
        try:
            if lab.code in lab_results.CREATININE_CODES:
                subject.derive_egfr(version, config=config)
            elif lab.code in ("UPROT", "UCREAT"):
                other = "UCREAT" if lab.code == "UPROT" else "UPROT"
                match = [
                    v
                    for v, r in subject.records("LabResultRecorded")
                    if r.code == other and r.occurred_at == lab.occurred_at  # type: ignore[attr-defined]  # lab results
                ]
                if match:
                    pair = (version, match[-1]) if lab.code == "UPROT" else (match[-1], version)
                    subject.derive_upcr(*pair, config=config)
        except ProtocolViolation:
            pass  # an input that cannot be derived from is still a valid result; nothing derived is recorded

    def record_lab_result(
        self,
        subject_id: UUID,
        code: str,
        value: Any,
        unit: str,
        occurred_at: datetime,
        *,
        signer: Signer,
        derive: bool = True,
        **details: Any,
    ) -> int:
        """A lab result; CREAT/CREATSI also record the derived eGFR, UPROT+UCREAT of one specimen the UPCR."""

        def verb(s: Subject, c: StudyConfig) -> int:
            version = s.record_lab_result(code, value, unit, occurred_at, config=c, **details)
            if derive:
                self._derive_after(s, version, c, signer)
            return version

        return self._subject_verb(subject_id, signer, verb)

    def record_lab_panel(
        self,
        subject_id: UUID,
        results: Iterable[tuple[str, Any, str]],
        occurred_at: datetime,
        *,
        signer: Signer,
        reported_at: datetime | None = None,
        derive: bool = True,
        ranges: Mapping[str, tuple[Any, Any]] | None = None,
    ) -> dict[str, int]:
        """Several results of one collection, as a lab reports a panel, in one append (with their derived
        values). ``ranges`` gives the reporting lab's range per code. Returns each code's version."""

        def verb(s: Subject, c: StudyConfig) -> dict[str, int]:
            versions = {}
            for code, value, unit in results:
                low, high = (ranges or {}).get(code, (None, None))
                versions[code] = s.record_lab_result(
                    code, value, unit, occurred_at, config=c, reported_at=reported_at, lab_low=low, lab_high=high
                )
                if derive:
                    self._derive_after(s, versions[code], c, signer)
            return versions

        return self._subject_verb(subject_id, signer, verb)

    def record_treg_panel(
        self,
        subject_id: UUID,
        occurred_at: datetime,
        treg_pct: Any,
        cd4_per_ul: Any,
        *,
        signer: Signer,
        reported_at: datetime | None = None,
    ) -> int:
        return self._subject_verb(
            subject_id,
            signer,
            lambda s, c: s.record_treg_panel(occurred_at, treg_pct, cd4_per_ul, config=c, reported_at=reported_at),
        )

    def assess_sledai(
        self,
        subject_id: UUID,
        occurred_at: datetime,
        descriptors: Iterable[str],
        *,
        signer: Signer,
        visit: str | None = None,
    ) -> Any:
        return self._subject_verb(
            subject_id, signer, lambda s, c: s.assess_sledai(occurred_at, descriptors, config=c, visit=visit)
        )

    def assess_renal_response(
        self, subject_id: UUID, occurred_at: datetime, *, signer: Signer, visit: str | None = None
    ) -> Any:
        return self._subject_verb(
            subject_id, signer, lambda s, c: s.assess_renal_response(occurred_at, config=c, visit=visit)
        )

    # ------------------------------------------------------------------------------------------ visits
    def record_visit(self, subject_id: UUID, visit: str, occurred_at: datetime, *, signer: Signer) -> Any:
        return self._subject_verb(subject_id, signer, lambda s, c: s.record_visit(visit, occurred_at, config=c))

    def record_missed_visit(
        self, subject_id: UUID, visit: str, occurred_at: datetime, *, signer: Signer, reason: str | None = None
    ) -> None:
        self._subject_verb(
            subject_id, signer, lambda s, c: s.record_missed_visit(visit, occurred_at, config=c, reason=reason)
        )

    def record_unscheduled_visit(self, subject_id: UUID, occurred_at: datetime, *, signer: Signer, purpose: str) -> Any:
        return self._subject_verb(
            subject_id, signer, lambda s, c: s.record_unscheduled_visit(occurred_at, config=c, purpose=purpose)
        )

    def record_team_evaluation(
        self,
        subject_id: UUID,
        occurred_at: datetime,
        *,
        signer: Signer,
        disciplines: Iterable[str],
        assessment: str,
        visit: str | None = None,
    ) -> None:
        self._subject_verb(
            subject_id,
            signer,
            lambda s, c: s.record_team_evaluation(
                occurred_at, config=c, disciplines=disciplines, assessment=assessment, visit=visit
            ),
        )

    def record_contact_attempt(
        self, subject_id: UUID, occurred_at: datetime, *, signer: Signer, method: str, outcome: str
    ) -> None:
        self._subject_verb(
            subject_id,
            signer,
            lambda s, c: s.record_contact_attempt(occurred_at, config=c, method=method, outcome=outcome),
        )

    # ------------------------------------------------------------------------------------------ safety
    def report_adverse_event(
        self, subject_id: UUID, term: str, onset: date, occurred_at: datetime, *, signer: Signer, **details: Any
    ) -> str:
        return self._subject_verb(
            subject_id, signer, lambda s, c: s.report_adverse_event(term, onset, occurred_at, config=c, **details)
        )

    def assess_adverse_event(
        self, subject_id: UUID, ae_id: str, occurred_at: datetime, *, signer: Signer, **assessment: Any
    ) -> None:
        self._subject_verb(
            subject_id, signer, lambda s, c: s.assess_adverse_event(ae_id, occurred_at, config=c, **assessment)
        )

    def assess_expectedness(
        self,
        subject_id: UUID,
        ae_id: str,
        occurred_at: datetime,
        *,
        signer: Signer,
        expectedness_cyc: str,
        expectedness_msc: str,
    ) -> bool:
        return self._subject_verb(
            subject_id,
            signer,
            lambda s, c: s.assess_expectedness(
                ae_id, occurred_at, config=c, expectedness_cyc=expectedness_cyc, expectedness_msc=expectedness_msc
            ),
        )

    def report_sae(self, subject_id: UUID, ae_id: str, occurred_at: datetime, *, signer: Signer) -> Any:
        return self._subject_verb(subject_id, signer, lambda s, c: s.report_sae(ae_id, occurred_at, config=c))

    def record_ae_outcome(
        self, subject_id: UUID, ae_id: str, occurred_at: datetime, outcome: str, *, signer: Signer, **details: Any
    ) -> None:
        self._subject_verb(
            subject_id, signer, lambda s, c: s.record_ae_outcome(ae_id, occurred_at, outcome, config=c, **details)
        )

    def record_concomitant_medication(
        self, subject_id: UUID, name: str, start_date: date, occurred_at: datetime, *, signer: Signer, **details: Any
    ) -> int:
        return self._subject_verb(
            subject_id,
            signer,
            lambda s, c: s.record_concomitant_medication(name, start_date, occurred_at, config=c, **details),
        )

    def record_deviation(
        self,
        subject_id: UUID,
        occurred_at: datetime,
        *,
        signer: Signer,
        category: str,
        description: str,
        lot_id: str | None = None,
    ) -> int:
        return self._subject_verb(
            subject_id,
            signer,
            lambda s, c: s.record_deviation(
                occurred_at, config=c, category=category, description=description, lot_id=lot_id
            ),
        )

    # ------------------------------------------------------------------------------------------ corrections
    def _may_change(self, subject: Subject, version: int, signer: Signer) -> str:
        fact = subject.facts.get(version)
        if fact is None:
            raise UnknownEventVersion(version)
        event_type = f"Subject.{fact.type}"
        allowed = self.study.permissions.get(event_type, DEFAULT_PERMISSIONS.get(event_type, []))
        if signer.role not in allowed:
            raise RoleMayNotCorrect(signer.role, event_type, allowed)
        return fact.type

    def correct(
        self,
        subject_id: UUID,
        version: int,
        new_values: Mapping[str, Any],
        reason: str,
        occurred_at: datetime | None = None,
        *,
        signer: Signer,
        derive: bool = True,
    ) -> Any:
        """R11: correct the fact at ``version`` (only by a role that may record that fact); a corrected serum
        creatinine also records a new eGFR citing the correction (unless ``derive`` is False: the eGFR derived
        from the old value is then a stale result until one is derived again)."""

        def verb(s: Subject, c: StudyConfig) -> Any:
            kind = self._may_change(s, version, signer)
            record = s.correct(version, new_values, reason, occurred_at or clock.now(), config=c)
            if kind == "LabResultRecorded" and derive:
                self._derive_after(s, version, c, signer)
            return record

        return self._subject_verb(subject_id, signer, verb)

    def void(
        self, subject_id: UUID, version: int, reason: str, occurred_at: datetime | None = None, *, signer: Signer
    ) -> None:
        def verb(s: Subject, c: StudyConfig) -> None:
            self._may_change(s, version, signer)
            s.void(version, reason, occurred_at or clock.now(), config=c)

        self._subject_verb(subject_id, signer, verb)

    # ------------------------------------------------------------------------------------------ disposition
    def withdraw(
        self,
        subject_id: UUID,
        occurred_at: datetime,
        *,
        signer: Signer,
        reason_code: str,
        reason: str,
        decided_by: str,
        safety_follow_up_agreed: bool,
    ) -> None:
        self._subject_verb(
            subject_id,
            signer,
            lambda s, c: s.withdraw(
                occurred_at,
                config=c,
                reason_code=reason_code,
                reason=reason,
                decided_by=decided_by,
                safety_follow_up_agreed=safety_follow_up_agreed,
            ),
        )

    def mark_lost_to_follow_up(self, subject_id: UUID, occurred_at: datetime, *, signer: Signer) -> None:
        self._subject_verb(subject_id, signer, lambda s, c: s.mark_lost_to_follow_up(occurred_at, config=c))

    def record_return(self, subject_id: UUID, occurred_at: datetime, reason: str, *, signer: Signer) -> None:
        self._subject_verb(subject_id, signer, lambda s, c: s.record_return(occurred_at, reason, config=c))

    def record_death(
        self,
        subject_id: UUID,
        occurred_at: datetime,
        cause: str,
        *,
        signer: Signer,
        ae_id: str | None = None,
        aware_at: datetime | None = None,
    ) -> str | None:
        return self._subject_verb(
            subject_id,
            signer,
            lambda s, c: s.record_death(occurred_at, cause, config=c, ae_id=ae_id, aware_at=aware_at),
        )

    def complete_study(self, subject_id: UUID, occurred_at: datetime, *, signer: Signer) -> None:
        self._subject_verb(subject_id, signer, lambda s, c: s.complete_study(occurred_at, config=c))

    # ------------------------------------------------------------------------------------------ sign-off and lock
    def casebook(self, subject: UUID | str | None) -> Casebook | None:
        """A subject's casebook review stream (``None``: the study-wide one), or None before its first act."""
        sid = None if subject is None else self.subject_id(subject)
        stream = Casebook.study_id_for(self.study_id) if sid is None else Casebook.id_for(self.study_id, sid)
        if not self._exists(stream):
            return None
        book = self._cache.get(stream) or self.record.get(stream)
        self._remember(book)
        return cast(Casebook, book)

    def _on_casebook(self, subject: UUID | str | None, signer: Signer, verb: Callable[[Casebook], T]) -> T:
        loaded = None if subject is None else self._load(subject, Subject)
        sid = None if loaded is None else loaded.id
        number = None if loaded is None else loaded.screening_number
        book = self.casebook(sid) or Casebook.open(self.study_id, sid, clock.now(), number)
        return self._record(signer, [book], lambda: verb(book))

    def sign_off(
        self,
        subject: UUID | str,
        *,
        signer: Signer,
        meaning: str = "review",
        visit: str | None = None,
        occurred_at: datetime | None = None,
    ) -> int:
        """21 CFR 11.50/11.70/11.200: the investigator signs off the subject's casebook (or one ``visit``) with a
        meaning of the study's SignatureDefs, bound to the content hash of exactly the events it covers. The
        signer's key must come from a passphrase-encrypted key file opened at this signing (``Signer.from_file(
        ..., passphrase=...)``): the id and the passphrase are the two components. Returns the sign-off's
        version on the subject's casebook stream."""
        study = self.study
        allowed = study.permissions.get("Casebook.SignedOff", DEFAULT_PERMISSIONS["Casebook.SignedOff"])
        if signer.role not in allowed:
            raise RoleMayNotSign(signer.role, allowed)
        entry = study.keys.get(signer.key_id)
        if entry is None or entry["actor"] != signer.actor or entry["role"] != signer.role:
            raise SigningKeyNotUsable(f"key {signer.key_id} is not registered to {signer.actor} as {signer.role}")
        if entry["status"] != "active":
            raise SigningKeyNotUsable(f"key {signer.key_id} of {signer.actor} was {entry['status']}")
        if not signer.passphrase_protected:
            raise SigningKeyNotUsable(
                "a sign-off needs the signer's passphrase-encrypted key file, opened with its passphrase at each "
                "signing (sle keys generate --passphrase)"
            )
        if meaning not in SIGNATURE_DEFS:
            raise UnknownMeaning(meaning)
        subject_state: Subject = self._load(subject, Subject)
        sid = subject_state.id
        stream = self.record.stream(sid)
        through = len(stream)
        if visit is None:
            cover = CoveredStream(stream=str(sid), through_version=through)
        else:
            facts = [
                (
                    e.version,
                    type_name(e.topic),
                    e.envelope["payload"],
                    parse_time("occurred_at", e.envelope["occurred_at"]),
                )
                for e in stream
            ]
            cover = CoveredStream(stream=str(sid), through_version=through, versions=visit_versions(facts, visit))
        digest = content_hash([cover], {(str(sid), e.version): e.sealed for e in stream})
        printed = entry.get("printed_name") or ""
        when = occurred_at or clock.now()
        return self._on_casebook(
            sid,
            signer,
            lambda b: b.sign_off(
                when, meaning=meaning, printed_name=printed, covers=[cover], content_hash=digest, visit=visit
            ),
        )

    def freeze(
        self,
        subject: UUID | str | None = None,
        *,
        signer: Signer,
        reason: str | None = None,
        occurred_at: datetime | None = None,
    ) -> None:
        """No new clinical facts on the subject (``None``: the whole study) until it is unlocked; an SAE can still be
        reported (flagged). Queries and source data verification go on."""
        self._on_casebook(subject, signer, lambda b: b.freeze(occurred_at or clock.now(), reason))

    def lock(
        self,
        subject: UUID | str | None = None,
        *,
        signer: Signer,
        reason: str | None = None,
        occurred_at: datetime | None = None,
    ) -> None:
        """Lock the subject (``None``: the study): refused while a query on it is not closed."""
        sid = None if subject is None else self.subject_id(subject)
        blocking = open_queries_blocking_lock(self.record, self.study_id, sid)
        if blocking:
            raise OpenQueriesBlockLock("the study" if sid is None else f"subject {subject}", blocking)
        self._on_casebook(subject, signer, lambda b: b.lock(occurred_at or clock.now(), reason))

    def unlock(
        self, subject: UUID | str | None = None, *, signer: Signer, reason: str, occurred_at: datetime | None = None
    ) -> None:
        """An audited unlock with a mandatory reason; every sign-off made before it is invalidated."""
        if self.casebook(subject) is None:
            raise LockStateError(("the study" if subject is None else f"subject {subject}") + " is not locked")
        self._on_casebook(subject, signer, lambda b: b.unlock(occurred_at or clock.now(), reason))

    # ------------------------------------------------------------------------------------------ SDV and queries
    # Regulated acts on the data (sle_events/domain/review.py): each on a stream of its own, never the subject's.
    def source_verification(self, subject_id: UUID | str) -> SourceVerification | None:
        """The subject's SDV marks (None before the first)."""
        stream = SourceVerification.id_for(self.study_id, self.subject_id(subject_id))
        return self.record.get(stream) if self._exists(stream) else None

    def sdv_status(self, subject_id: UUID | str) -> list[FactSdv]:
        """Each source-data fact of the subject: PENDING, PARTIAL, VERIFIED or CHANGED_SINCE_VERIFIED."""
        subject = self._load(subject_id, Subject)
        return sdv_status(subject, self.source_verification(subject.id))

    def verify_source(
        self,
        subject_id: UUID | str,
        versions: Iterable[int] = (),
        *,
        signer: Signer,
        field: str | None = None,
        visit: str | None = None,
        occurred_at: datetime | None = None,
    ) -> list[SdvItem]:
        """A monitor marks facts of the subject's record verified against the source: ``versions`` (with ``field``:
        that field of each), or every source-data fact of ``visit``. Refused (nothing stored): a version the
        record does not have, a voided fact, a field the fact does not have, a visit with no facts."""
        subject = self._load(subject_id, Subject)
        when = occurred_at or clock.now()
        wanted = list(versions)
        if visit is not None:
            found = review.facts_of_visit(subject, visit)
            if not found:
                raise UnknownFact(subject.screening_number, 0, f"no source-data fact belongs to visit {visit!r}")
            wanted += found
        sdv = self.source_verification(subject.id) or SourceVerification.open(self.study_id, subject, when)
        hashes = review_store.fact_hashes(self.record, subject.id, wanted)
        marks = sdv.verify(
            subject,
            [(v, field) for v in wanted],
            by=signer.actor,
            occurred_at=when,
            hash_of=lambda v: hashes.get(v, ""),
            visit=visit,
            config=self.config,
        )
        self.record.record(sdv, signer=signer)
        return marks

    def query(self, query_id: UUID | str) -> Query:
        """A query by its id (`UnknownQuery` if there is none)."""
        try:
            stream = query_id if isinstance(query_id, UUID) else UUID(str(query_id).strip())
        except ValueError:
            raise UnknownQuery(query_id) from None
        found = self.record.get(stream) if self._exists(stream) else None
        if not isinstance(found, Query) or found.study_id != self.study_id:
            raise UnknownQuery(query_id)
        return found

    def raise_query(
        self,
        subject_id: UUID | str,
        version: int,
        text: str,
        *,
        signer: Signer,
        field: str | None = None,
        query_id: UUID | None = None,
        occurred_at: datetime | None = None,
    ) -> UUID:
        """A monitor or data manager raises a query on a fact (and field) of the subject's record. Returns its id."""
        subject = self._load(subject_id, Subject)
        q = Query.raise_on(
            self.study_id,
            subject,
            version,
            text,
            by=signer.actor,
            occurred_at=occurred_at or clock.now(),
            field=field,
            query_id=query_id,
            config=self.config,
        )
        self.record.record(q, signer=signer)
        return q.id

    def answer_query(
        self, query_id: UUID | str, text: str, *, signer: Signer, occurred_at: datetime | None = None
    ) -> None:
        q = self.query(query_id)
        q.answer(text, by=signer.actor, occurred_at=occurred_at or clock.now(), config=self.config)
        self.record.record(q, signer=signer)

    def close_query(
        self, query_id: UUID | str, text: str, *, signer: Signer, occurred_at: datetime | None = None
    ) -> None:
        """The raiser (or, for an automatic query, a data manager) closes the query."""
        q = self.query(query_id)
        q.close(text, by=signer.actor, role=signer.role, occurred_at=occurred_at or clock.now(), config=self.config)
        self.record.record(q, signer=signer)

    def reopen_query(
        self, query_id: UUID | str, text: str, *, signer: Signer, occurred_at: datetime | None = None
    ) -> None:
        q = self.query(query_id)
        q.reopen(text, by=signer.actor, role=signer.role, occurred_at=occurred_at or clock.now(), config=self.config)
        self.record.record(q, signer=signer)

    def queries(self, subject_id: UUID | str | None = None) -> list[Query]:
        """Every query of the study (or subject), in the order raised."""
        sid = None if subject_id is None else self.subject_id(subject_id)
        return review_store.queries(self.record, self.study_id, sid)

    def open_queries(self, subject_id: UUID | str | None = None) -> list[Query]:
        """The queries not closed (OPEN or ANSWERED): what blocks a lock."""
        return [q for q in self.queries(subject_id) if q.is_open]

    def run_automatic_queries(
        self, *, signer: Signer, subjects: Iterable[UUID | str] | None = None, occurred_at: datetime | None = None
    ) -> dict[str, list[UUID]]:
        """Raise a query for every cause the record itself holds (stale derived results, out-of-window visits,
        flagged values), close the automatic queries whose cause is gone (saying so), and re-open those it
        closed whose cause came back. Idempotent: a second run changes nothing. ``signer`` is the study's
        checking service (a data-manager key without a printed name) or a data manager."""
        when = occurred_at or clock.now()
        done: dict[str, list[UUID]] = {"raised": [], "closed": [], "reopened": []}
        existing = {q.id: q for q in self.queries() if q.cause is not None}
        ids = sorted(set(self._subject_streams())) if subjects is None else [self.subject_id(s) for s in subjects]
        for sid in ids:
            subject = self._load(sid, Subject)
            causes = review.automatic_causes(subject)
            touched: list[Query] = []
            for key, cause in causes.items():
                qid = Query.automatic_id(self.study_id, subject.id, key)
                q = existing.get(qid)
                if q is None:
                    q = Query.raise_on(
                        self.study_id, subject, cause.version, cause.text, by=signer.actor, occurred_at=when,
                        query_id=qid, cause=key, config=self.config,
                    )  # fmt: skip
                    done["raised"].append(qid)
                    touched.append(q)
                elif q.status == QueryStatus.CLOSED and q.thread[-1][1] == signer.actor:
                    q.reopen(f"the cause is back: {cause.text}", by=signer.actor, role=signer.role, occurred_at=when)
                    done["reopened"].append(qid)
                    touched.append(q)
            for qid, q in existing.items():
                if q.subject_id == subject.id and q.is_open and q.cause not in causes:
                    q.close(
                        f"closed automatically: the cause ({q.cause}) is no longer in the record",
                        by=signer.actor,
                        role=signer.role,
                        occurred_at=when,
                    )
                    done["closed"].append(qid)
                    touched.append(q)
            if touched:
                self.record.record(*touched, signer=signer)
        return done

    def _subject_streams(self) -> list[UUID]:
        t = self.record.table
        with self.record.engine.connect() as conn:
            rows = conn.execute(
                select(t.c.originator_id, t.c.state).where(
                    t.c.topic.in_(stored_topics("Subject.Screened")), t.c.originator_version == 1
                )
            )
            return [
                UUID(str(stream))
                for stream, state in rows
                if open_stored(state).envelope["study"] == str(self.study_id)
            ]

    def derive_egfr_again(self, subject_id: UUID | str, creatinine_version: int, *, signer: Signer) -> Any:
        """Derive the eGFR again from a (corrected) creatinine: what resolves a stale derived result."""
        return self._subject_verb(
            self.subject_id(subject_id), signer, lambda s, c: s.derive_egfr(creatinine_version, config=c)
        )
