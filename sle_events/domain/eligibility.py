"""Eligibility (PROTOCOL §4): the checklist rules of T4 and the 2019 EULAR/ACR classification score.

Pure functions. :func:`check_checklist` is what ``Subject.confirm_eligibility`` runs; it refuses an
incomplete checklist, a failed criterion, stale screening labs, and answers that contradict what is already
recorded for the subject (classification score, biopsy, age).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta

from sle_events.domain.errors import (
    ChecklistContradictsRecord,
    EligibilityIncomplete,
    EligibilityNotMet,
    InconsistentTimestamps,
    InvalidChoice,
    ScreeningLabsTooOld,
)
from sle_events.domain.payloads import BiopsyClass, EligibilityChecklist
from sle_events.domain.settings import StudySettings

__all__ = [
    "INCLUSION",
    "EXCLUSION",
    "CRITERIA",
    "CLASSIFICATION_ITEMS",
    "ClassificationItem",
    "Classification",
    "classify_2019",
    "LN_QUALIFYING_CLASSES",
    "check_checklist",
    "check_failed_criteria",
]

INCLUSION = ("I1", "I2", "I3", "I4", "I5", "I6", "I7", "I8")
EXCLUSION = ("E1", "E2", "E3", "E4", "E5", "E6", "E7", "E8", "E9")
CRITERIA = INCLUSION + EXCLUSION

#: I2: biopsy-proven LN class III or IV, with or without V
LN_QUALIFYING_CLASSES = frozenset({BiopsyClass.III, BiopsyClass.IV, BiopsyClass.III_V, BiopsyClass.IV_V})


@dataclass(frozen=True, slots=True)
class ClassificationItem:
    code: str
    domain: str
    weight: int
    clinical: bool


def _items() -> dict[str, ClassificationItem]:
    rows = [
        # clinical domains (Aringer 2019)
        ("FEVER", "constitutional", 2, True),
        ("LEUKOPENIA", "hematologic", 3, True),
        ("THROMBOCYTOPENIA", "hematologic", 4, True),
        ("AUTOIMMUNE_HEMOLYSIS", "hematologic", 4, True),
        ("DELIRIUM", "neuropsychiatric", 2, True),
        ("PSYCHOSIS", "neuropsychiatric", 3, True),
        ("SEIZURE", "neuropsychiatric", 5, True),
        ("NON_SCARRING_ALOPECIA", "mucocutaneous", 2, True),
        ("ORAL_ULCERS", "mucocutaneous", 2, True),
        ("SUBACUTE_OR_DISCOID_LUPUS", "mucocutaneous", 4, True),
        ("ACUTE_CUTANEOUS_LUPUS", "mucocutaneous", 6, True),
        ("PLEURAL_OR_PERICARDIAL_EFFUSION", "serosal", 5, True),
        ("ACUTE_PERICARDITIS", "serosal", 6, True),
        ("JOINT_INVOLVEMENT", "musculoskeletal", 6, True),
        ("PROTEINURIA_GT_0_5G", "renal", 4, True),
        ("BIOPSY_CLASS_II_OR_V", "renal", 8, True),
        ("BIOPSY_CLASS_III_OR_IV", "renal", 10, True),
        # immunologic domains
        ("ANTIPHOSPHOLIPID_ANTIBODIES", "antiphospholipid", 2, False),
        ("LOW_C3_OR_LOW_C4", "complement", 3, False),
        ("LOW_C3_AND_LOW_C4", "complement", 4, False),
        ("ANTI_DSDNA_OR_ANTI_SM", "sle_specific_antibodies", 6, False),
    ]
    return {code: ClassificationItem(code, dom, w, clin) for code, dom, w, clin in rows}


#: 2019 EULAR/ACR classification items (code → domain, weight, clinical?)
CLASSIFICATION_ITEMS: Mapping[str, ClassificationItem] = _items()
CLASSIFICATION_VERSION = "eular_acr_2019.v1"
_ANA_MIN_TITER = 80
_MIN_POINTS = 10


@dataclass(frozen=True, slots=True)
class Classification:
    ana_titer: int
    items: tuple[str, ...]
    points: int
    has_clinical: bool
    classified: bool


def classify_2019(ana_titer: int, items: Iterable[str]) -> Classification:
    """Score the 2019 EULAR/ACR criteria: entry ANA ≥ 1:80; within each domain only the highest item
    counts; classified as SLE with ≥ 10 points including ≥ 1 clinical item."""
    chosen = sorted(set(items))
    best: dict[str, int] = {}
    clinical = False
    for code in chosen:
        item = CLASSIFICATION_ITEMS.get(code)
        if item is None:
            raise InvalidChoice("classification item", code, CLASSIFICATION_ITEMS)
        best[item.domain] = max(best.get(item.domain, 0), item.weight)
        clinical = clinical or item.clinical
    points = sum(best.values())
    classified = ana_titer >= _ANA_MIN_TITER and points >= _MIN_POINTS and clinical
    return Classification(ana_titer, tuple(chosen), points, clinical, classified)


def _months_before(later: date, months: int) -> date:
    y, m = divmod(later.year * 12 + later.month - 1 - months, 12)
    day = min(
        later.day,
        [31, 29 if (y % 4 == 0 and (y % 100 or y % 400 == 0)) else 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31][m],
    )
    return date(y, m + 1, day)


def check_checklist(
    checklist: EligibilityChecklist,
    confirmed_at: datetime,
    *,
    consented_at: datetime,
    screened_at: datetime,
    settings: StudySettings,
    classification: Classification | None = None,
    biopsy: tuple[BiopsyClass, date] | None = None,
    age_at_consent: int | None = None,
) -> None:
    """T4: refuse unless every criterion is answered, every inclusion is met, no exclusion applies, the
    screening labs are ≤ 28 d old (and after consent), and no answer contradicts the record."""
    unknown = sorted(set(checklist.answers) - set(CRITERIA))
    if unknown:
        raise InvalidChoice("eligibility criterion", unknown[0], CRITERIA)
    missing = [c for c in CRITERIA if c not in checklist.answers]
    if missing:
        raise EligibilityIncomplete(missing)
    failed = [c for c in INCLUSION if not checklist.answers[c].met]
    failed += [c for c in EXCLUSION if checklist.answers[c].met]
    if failed:
        raise EligibilityNotMet(failed)
    labs_at = checklist.screening_labs_collected_at
    if labs_at.tzinfo is None or labs_at.utcoffset() is None:
        from sle_events.domain.errors import NaiveTimestamp

        raise NaiveTimestamp("screening_labs_collected_at", labs_at)
    if labs_at > confirmed_at:
        raise InconsistentTimestamps("screening_labs_collected_at", labs_at, "eligibility confirmed", confirmed_at)
    if labs_at < consented_at or confirmed_at - labs_at > timedelta(days=settings.screening_lab_validity_days):
        raise ScreeningLabsTooOld(labs_at, confirmed_at, settings.screening_lab_validity_days)
    # answers against what is already recorded
    if classification is not None and not classification.classified:
        raise ChecklistContradictsRecord(
            "I1",
            f"the recorded 2019 EULAR/ACR classification scores {classification.points} points "
            f"(ANA 1:{classification.ana_titer}, clinical item: {classification.has_clinical})",
        )
    if biopsy is not None:
        klass, biopsied_on = biopsy
        if klass not in LN_QUALIFYING_CLASSES:
            raise ChecklistContradictsRecord("I2", f"the recorded biopsy class is {klass.value}, not III or IV (±V)")
        oldest = _months_before(screened_at.date(), settings.eligibility_biopsy_max_months)
        if biopsied_on < oldest:
            raise ChecklistContradictsRecord(
                "I2",
                f"the recorded biopsy of {biopsied_on} is more than "
                f"{settings.eligibility_biopsy_max_months} months before screening",
            )
    if age_at_consent is not None and not (
        settings.eligibility_min_age_years <= age_at_consent <= settings.eligibility_max_age_years
    ):
        raise ChecklistContradictsRecord(
            "I6",
            f"the recorded age at consent is {age_at_consent} y, outside "
            f"{settings.eligibility_min_age_years}–{settings.eligibility_max_age_years} y",
        )


def check_failed_criteria(failed: Iterable[str]) -> tuple[str, ...]:
    """The criterion ids a screen failure lists (T5), validated and in checklist order."""
    failed = set(failed)
    unknown = sorted(failed - set(CRITERIA))
    if unknown:
        raise InvalidChoice("failed criterion", unknown[0], CRITERIA)
    return tuple(c for c in CRITERIA if c in failed)
