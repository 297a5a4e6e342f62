"""Value objects carried by the trial's events: code lists (string enums) and fact records (pydantic).

A *fact record* is the current content of a correctable fact (a lab result, a vital-signs panel...). The
subject keeps one per event version; a ``Corrected`` event replaces its values and a ``Voided`` event
retires it, while the original event stays in the stream (R11). Records dump to JSON-safe dicts
(``model_dump(mode="json")``: decimals as strings, times with their offset) and validate back exactly.
"""

from __future__ import annotations

from datetime import date, datetime
from enum import StrEnum
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict

from sle_events.domain.quantities import DecimalValue

__all__ = [
    "Sex",
    "Relatedness",
    "Expectedness",
    "Seriousness",
    "AeOutcome",
    "AeAction",
    "Disposition",
    "DecidedBy",
    "BiopsyClass",
    "Discipline",
    "DeviationCategory",
    "PregnancyResult",
    "SignedBy",
    "RELATED_FOR_REPORTING",
    "codes",
    "Record",
    "LabResult",
    "VitalSigns",
    "Demographics",
    "MedicalHistoryItem",
    "ConcomitantMedication",
    "AdverseEventEntry",
    "SledaiAssessment",
    "TregPanel",
    "PregnancyTest",
    "VisitRecord",
    "Pretreatment",
    "Infusion",
    "IdentityMarkers",
    "DerivedResult",
    "RenalResponse",
    "CriterionAnswer",
    "EligibilityChecklist",
]


# =========================================================================== code lists
class Sex(StrEnum):  # CDISC DM.SEX
    F = "F"
    M = "M"
    U = "U"
    UNDIFFERENTIATED = "UNDIFFERENTIATED"


class Relatedness(StrEnum):  # PROTOCOL §7, per product (CYC, AlloMSC)
    NOT_RELATED = "not_related"
    UNLIKELY = "unlikely"
    POSSIBLE = "possible"
    PROBABLE = "probable"
    DEFINITE = "definite"


#: "Related" for reporting = possible, probable or definite (§7)
RELATED_FOR_REPORTING = frozenset({Relatedness.POSSIBLE, Relatedness.PROBABLE, Relatedness.DEFINITE})


class Expectedness(StrEnum):  # sponsor, against the reference safety information
    EXPECTED = "expected"
    UNEXPECTED = "unexpected"


class Seriousness(StrEnum):  # ICH E2A; tick all that apply
    DEATH = "death"
    LIFE_THREATENING = "life_threatening"
    HOSPITALISATION = "hospitalisation"  # requires or prolongs in-patient hospitalisation
    DISABILITY = "disability"
    CONGENITAL_ANOMALY = "congenital_anomaly"
    IMPORTANT_MEDICAL_EVENT = "important_medical_event"


class AeOutcome(StrEnum):
    RECOVERED = "recovered"
    RECOVERING = "recovering"
    NOT_RECOVERED = "not_recovered"
    RECOVERED_WITH_SEQUELAE = "recovered_with_sequelae"
    FATAL = "fatal"
    UNKNOWN = "unknown"


class AeAction(StrEnum):  # action taken with the study treatment / for the event
    NONE = "none"
    NOT_APPLICABLE = "not_applicable"
    INFUSION_INTERRUPTED = "infusion_interrupted"
    INFUSION_STOPPED = "infusion_stopped"
    TREATMENT_GIVEN = "treatment_given"
    UNKNOWN = "unknown"


class Disposition(StrEnum):  # withdrawal reasons (T12), after CDISC NCOMPLT
    ADVERSE_EVENT = "adverse_event"
    LACK_OF_EFFICACY = "lack_of_efficacy"
    WITHDRAWAL_BY_SUBJECT = "withdrawal_by_subject"
    PHYSICIAN_DECISION = "physician_decision"
    PREGNANCY = "pregnancy"
    PROTOCOL_DEVIATION = "protocol_deviation"
    SPONSOR_DECISION = "sponsor_decision"
    OTHER = "other"


class DecidedBy(StrEnum):  # who decided a withdrawal (T12)
    SUBJECT = "subject"
    INVESTIGATOR = "investigator"
    SPONSOR = "sponsor"


class BiopsyClass(StrEnum):  # ISN/RPS 2003 (revised 2018)
    I = "I"  # noqa: E741  # the ISN/RPS class is called I
    II = "II"
    III = "III"
    IV = "IV"
    V = "V"
    VI = "VI"
    III_V = "III+V"
    IV_V = "IV+V"


class Discipline(StrEnum):  # the integrated team (§1)
    RHEUMATOLOGY = "rheumatology"
    HAEMATOLOGY = "haematology"
    BMT = "bmt"


class DeviationCategory(StrEnum):
    CONSENT = "consent"
    ELIGIBILITY = "eligibility"
    VISIT_WINDOW = "visit_window"
    TREATMENT = "treatment"
    PRODUCT_RELEASE = "product_release"
    SPECIMEN = "specimen"
    OTHER = "other"


class PregnancyResult(StrEnum):
    NEGATIVE = "negative"
    POSITIVE = "positive"


class SignedBy(StrEnum):  # who signed the consent form (T2)
    SUBJECT = "subject"
    LEGAL_REPRESENTATIVE = "legal_representative"


_Code = TypeVar("_Code", bound=StrEnum)


def codes(enum: type[_Code], field: str, value: Any) -> _Code:
    """``value`` as a member of ``enum`` or :class:`~sle_events.domain.errors.InvalidChoice`."""
    from sle_events.domain.errors import InvalidChoice

    try:
        return enum(value)
    except ValueError:
        raise InvalidChoice(field, value, [m.value for m in enum]) from None


# =========================================================================== fact records
class Record(BaseModel):
    """A correctable fact. ``occurred_at`` is when it happened clinically (site offset kept)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    occurred_at: datetime

    def json(self) -> dict[str, Any]:  # type: ignore[override]  # pydantic's deprecated json() is replaced on purpose
        return self.model_dump(mode="json")

    def __getitem__(self, name: str) -> Any:
        """``record["value"]`` reads like ``record.value`` (records were dicts in the first Subject)."""
        try:
            return getattr(self, name)
        except AttributeError:
            raise KeyError(name) from None


class LabResult(Record):
    """A lab result (labs.csv analyte) as reported, in canonical units, with its range and flag.
    ``occurred_at`` is the specimen collection time (§10)."""

    code: str
    loinc: str | None
    value: DecimalValue  # as reported (ANA: the titer denominator)
    unit: str
    canonical_value: DecimalValue
    canonical_unit: str
    lab_low: DecimalValue | None = None  # the reporting lab's range, in the reported unit
    lab_high: DecimalValue | None = None
    range_low: DecimalValue | None = None  # the range used for the flag, canonical unit
    range_high: DecimalValue | None = None
    range_source: Literal["lab", "default", "none"]
    flag: Literal["L", "H", "N"] | None
    reported_at: datetime | None = None
    specimen_id: str | None = None


class VitalSigns(Record):
    height_cm: DecimalValue | None = None
    weight_kg: DecimalValue | None = None
    temperature_c: DecimalValue | None = None
    systolic_bp: DecimalValue | None = None
    diastolic_bp: DecimalValue | None = None
    heart_rate: DecimalValue | None = None
    timepoint: str | None = None  # e.g. "pre-infusion", "15 min"


class Demographics(Record):
    sex: Sex
    birth_date: date
    childbearing_potential: bool
    age_at_consent: int


class MedicalHistoryItem(Record):
    term: str
    start_date: date | None = None
    ongoing: bool = False
    category: str = "general"


class ConcomitantMedication(Record):
    name: str
    dose: DecimalValue | None = None
    dose_unit: str | None = None
    route: str | None = None
    frequency: str | None = None
    start_date: date
    end_date: date | None = None
    indication: str | None = None


class AdverseEventEntry(Record):
    """The first AE entry (coordinator or investigator): no causality here."""

    ae_id: str
    term: str
    onset: date
    grade_proposal: int | None = None
    description: str | None = None
    linked_to: Literal["CYC", "MSC"] | None = None


class SledaiAssessment(Record):
    descriptors: tuple[str, ...]
    total: int
    formula_version: str
    visit: str | None = None


class TregPanel(Record):
    treg_pct: DecimalValue
    cd4_per_ul: DecimalValue
    treg_flag: Literal["L", "H", "N"] | None = None  # labs.csv has no consensus Treg range: usually None
    cd4_flag: Literal["L", "H", "N"] | None = None
    reported_at: datetime | None = None


class PregnancyTest(Record):
    result: PregnancyResult
    specimen: str = "serum"


class VisitRecord(Record):
    visit: str
    visitnum: DecimalValue
    target_date: date | None = None
    earliest: date | None = None
    latest: date | None = None
    in_window: bool = True
    deviation_flags: tuple[str, ...] = ()


class Pretreatment(Record):
    """Cyclophosphamide (§5.1). ``occurred_at`` is the infusion start."""

    stopped_at: datetime
    prescribed_mg_per_m2: DecimalValue
    height_cm: DecimalValue
    weight_kg: DecimalValue
    bsa_m2: DecimalValue  # rounded as the protocol doses from it
    calculated_mg: DecimalValue
    administered_mg: DecimalValue
    route: str
    lot: str
    measured_version: int  # the vital-signs event the height and weight come from
    pregnancy_test_version: int | None = None  # the negative test it relies on (T7), if any
    bsa_formula: str
    dose_formula: str
    flags: tuple[str, ...] = ()


class IdentityMarkers(BaseModel):
    """ISCT identity panel of an MSC lot: marker → % of cells."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    pct: dict[str, DecimalValue]


class Infusion(Record):
    """AlloMSC infusion (§5.2). ``occurred_at`` is the infusion start."""

    stopped_at: datetime
    lot_id: str
    viable_cells: DecimalValue
    weight_kg: DecimalValue
    dose_1e6_per_kg: DecimalValue
    dose_formula: str
    cyc_to_msc_hours: DecimalValue
    interval_formula: str
    volume_ml: DecimalValue | None = None
    premedication: str | None = None
    release_failures: tuple[str, ...] = ()
    authorised_by_deviation: int | None = None  # version of the deviation that names this lot


class DerivedResult(Record):
    """A derived value (eGFR, UPCR) citing the versions of its input events and the formula version.
    ``value`` is None when it could not be computed (then ``not_computed_reason`` says why)."""

    code: str
    value: DecimalValue | None
    unit: str
    inputs: tuple[int, ...]
    formula_version: str
    not_computed_reason: str | None = None


class RenalResponse(Record):
    status: str
    month: int
    visit: str | None
    baseline_upcr: DecimalValue | None
    baseline_egfr: DecimalValue | None
    upcr: DecimalValue | None
    egfr: DecimalValue | None
    upcr_specimen: str | None
    inputs: tuple[int, ...]
    formula_version: str


class CriterionAnswer(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    met: bool
    evidence: str = ""


class EligibilityChecklist(BaseModel):
    """The investigator's answers to §4 (I1–I8, E1–E9), with the date of the screening labs used."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    answers: dict[str, CriterionAnswer]
    screening_labs_collected_at: datetime

    @classmethod
    def all_met(cls, screening_labs_collected_at: datetime, evidence: str = "source documents") -> EligibilityChecklist:
        """Every inclusion met, no exclusion applies (a convenience for a subject who qualifies)."""
        from sle_events.domain.eligibility import EXCLUSION, INCLUSION

        answers = {c: CriterionAnswer(met=True, evidence=evidence) for c in INCLUSION}
        answers.update({c: CriterionAnswer(met=False, evidence=evidence) for c in EXCLUSION})
        return cls(answers=answers, screening_labs_collected_at=screening_labs_collected_at)
