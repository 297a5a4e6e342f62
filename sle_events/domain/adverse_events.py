"""Where an adverse event is checked (PROTOCOL §7): CTCAE grade, seriousness (ICH E2A), relatedness per
product (investigator), expectedness per product (sponsor), SUSAR, and the SAE 24-hour clock.

The subject keeps one :class:`AdverseEventState` per AE (its entry is a correctable fact record)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

from sle_events.domain import formulas
from sle_events.domain.errors import InconsistentAssessment, InvalidChoice, MissingValue
from sle_events.domain.payloads import (
    RELATED_FOR_REPORTING,
    AeAction,
    AeOutcome,
    Expectedness,
    Relatedness,
    Seriousness,
    codes,
)
from sle_events.domain.settings import StudySettings

__all__ = ["GRADES", "CLOSED_OUTCOMES", "check_grade", "check_assessment", "AdverseEventState", "is_susar"]

GRADES = (1, 2, 3, 4, 5)
#: outcomes after which the AE is no longer open
CLOSED_OUTCOMES = frozenset({AeOutcome.RECOVERED, AeOutcome.RECOVERED_WITH_SEQUELAE, AeOutcome.FATAL})


def check_grade(field: str, grade: Any) -> int:
    if isinstance(grade, bool) or not isinstance(grade, int) or grade not in GRADES:
        raise InvalidChoice(field, grade, GRADES)
    return grade


Assessment = tuple[int, tuple[Seriousness, ...], Relatedness | None, Relatedness | None]


def check_assessment(
    grade: Any, serious: bool, seriousness: Iterable[Any], relatedness_cyc: Any, relatedness_msc: Any
) -> Assessment:
    """Grade 1–5; serious ⇔ at least one ICH E2A criterion; grade 5 (death related to the AE) ⇔ the
    'death' criterion. Relatedness may be left for later (None) but must come from the §7 scale."""
    g = check_grade("grade", grade)
    if not isinstance(serious, bool):
        raise InvalidChoice("serious", serious, (True, False))
    criteria = tuple(sorted({codes(Seriousness, "seriousness", c) for c in seriousness}))
    if serious and not criteria:
        raise InconsistentAssessment("a serious AE needs at least one seriousness criterion")
    if criteria and not serious:
        raise InconsistentAssessment(f"seriousness criteria {[c.value for c in criteria]} given for a non-serious AE")
    if (g == 5) != (Seriousness.DEATH in criteria):
        raise InconsistentAssessment("CTCAE grade 5 (death related to the AE) goes with the 'death' criterion")
    rc = None if relatedness_cyc is None else codes(Relatedness, "relatedness_cyc", relatedness_cyc)
    rm = None if relatedness_msc is None else codes(Relatedness, "relatedness_msc", relatedness_msc)
    return g, criteria, rc, rm


@dataclass
class AdverseEventState:
    ae_id: str
    entry_version: int
    grade: int | None = None
    serious: bool = False
    seriousness: tuple[Seriousness, ...] = ()
    relatedness_cyc: Relatedness | None = None
    relatedness_msc: Relatedness | None = None
    aware_at: datetime | None = None
    reported_at: datetime | None = None
    expectedness_cyc: Expectedness | None = None
    expectedness_msc: Expectedness | None = None
    outcome: AeOutcome | None = None
    resolved_on: date | None = None
    action: AeAction | None = None
    voided: bool = False
    history: list[int] = field(default_factory=list)  # versions of every event about this AE

    @property
    def open(self) -> bool:
        return not self.voided and self.outcome not in CLOSED_OUTCOMES

    @property
    def related(self) -> bool:
        return self.relatedness_cyc in RELATED_FOR_REPORTING or self.relatedness_msc in RELATED_FOR_REPORTING

    def report_status(self, now: datetime, settings: StudySettings) -> formulas.SaeReportStatus | None:
        """SAE clock (OPEN / REPORTED_ON_TIME / REPORTED_LATE / OVERDUE); None for a non-serious AE."""
        if not self.serious or self.aware_at is None:
            return None
        return formulas.sae_report_status(self.aware_at, self.reported_at, now, settings=settings)


def is_susar(ae: AdverseEventState) -> bool:
    """Serious + related + unexpected, judged per product (§7)."""
    if not ae.serious:
        return False
    return (ae.relatedness_cyc in RELATED_FOR_REPORTING and ae.expectedness_cyc == Expectedness.UNEXPECTED) or (
        ae.relatedness_msc in RELATED_FOR_REPORTING and ae.expectedness_msc == Expectedness.UNEXPECTED
    )


def require_text(field: str, value: Any, action: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise MissingValue(field, action)
    return value.strip()
