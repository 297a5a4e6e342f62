"""A worked subject for the domain tests: the formulas.md fixtures strung into one course (no database).

Times are site-local (+08:00) and lie in 2025–2027, so the tests run on a simulated clock set to 2030
(``sim_clock``). Each ``to_*`` function returns a fresh subject advanced to that state by the verbs themselves.

B2 (158 cm, 52 kg → BSA 1.51 m², 750 mg/m² → 1132.50 mg), W1 (CYC 2025-03-10 08:00, MSC 2025-03-11 09:30 →
25.50 h), LOS (admission 2025-03-09, discharge 2025-03-12 → 3 d), M2 (5.7 × 10^7 viable cells / 52 kg → 1.10),
visit windows from TX = 2025-03-11.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any, TypeVar
from uuid import UUID, uuid4

import pytest

from sle_events.domain.payloads import EligibilityChecklist, Record
from sle_events.domain.product import ProductLot
from sle_events.domain.study_config import IcfVersion, Site, StudyConfig
from sle_events.domain.subject import Subject

CST = timezone(timedelta(hours=8))
CLOCK_AT = datetime(2030, 1, 1, tzinfo=UTC)


def at(text: str) -> datetime:
    """``"2025-03-10 08:00"`` in the site's zone (+08:00)."""
    return datetime.fromisoformat(text).replace(tzinfo=CST)


STUDY = UUID("00000000-0000-4000-8000-000000000001")
ICF_V1 = IcfVersion(version="ICF v1.0", effective_from=at("2024-01-01 00:00"))
ICF_V2 = IcfVersion(version="ICF v2.0", effective_from=at("2025-06-01 00:00"))
SITES = [
    Site(site_id="NJ01", name="Nanjing Drum Tower", timezone="Asia/Shanghai"),
    Site(site_id="NJ99", name="closed site", timezone="Asia/Shanghai", active=False),
]
CONFIG = StudyConfig.build(sites=SITES, icf_versions=[ICF_V1])
CONFIG_V2 = StudyConfig.build(sites=SITES, icf_versions=[ICF_V1, ICF_V2])

SCREENED = at("2025-02-03 09:00")
CONSENTED = at("2025-02-03 10:00")
SCREENING_LABS = at("2025-02-03 11:00")
ELIGIBLE = at("2025-02-10 09:00")
ENROLLED = at("2025-02-11 09:00")
ADMITTED = at("2025-03-09 08:00")
MEASURED = at("2025-03-09 09:00")
BASELINE = at("2025-03-09 10:00")
CYC_START = at("2025-03-10 08:00")
CYC_STOP = at("2025-03-10 09:00")
RELEASED = at("2025-03-11 07:00")
MSC_START = at("2025-03-11 09:30")
MSC_STOP = at("2025-03-11 10:30")
DISCHARGED = at("2025-03-12 10:00")
TX = date(2025, 3, 11)
CHECKLIST = EligibilityChecklist.all_met(screening_labs_collected_at=SCREENING_LABS)
MARKERS = {
    "CD73": "98",
    "CD90": "97",
    "CD105": "96",
    "CD45": "1.0",
    "CD34": "0.5",
    "CD14": "0.4",
    "CD19": "0.3",
    "HLA-DR": "0.6",
}
BASELINE_LABS = [
    ("DSDNA", "120", "[IU]/mL"),
    ("C3", "60", "mg/dL"),
    ("C4", "8", "mg/dL"),
    ("CREAT", "0.70", "mg/dL"),
    ("UPCR", "3.20", "mg/mg"),
    ("EGFR", "72.00", "mL/min/{1.73_m2}"),
]


def to_screened(number: str = "SCR-001", study: UUID = STUDY) -> Subject:
    return Subject.screen(study, "NJ01", number, SCREENED, config=CONFIG)


def to_consented(**kw) -> Subject:
    s = to_screened(**kw)
    s.obtain_consent("ICF v1.0", CONSENTED, config=CONFIG, taken_by="dr.wang")
    return s


def with_screening_data(s: Subject, *, childbearing_potential: bool = True, sex: str = "F") -> Subject:
    s.record_demographics(
        sex, date(1995, 6, 15), at("2025-02-03 10:30"), config=CONFIG, childbearing_potential=childbearing_potential
    )
    for code, value, unit in (("UPCR", "2.6", "mg/mg"), ("CREAT", "0.70", "mg/dL"), ("WBC", "5.5", "10*3/uL")):
        s.record_lab_result(code, value, unit, SCREENING_LABS, config=CONFIG)
    return s


def to_eligible(**kw) -> Subject:
    s = with_screening_data(to_consented(**kw))
    s.confirm_eligibility(ELIGIBLE, config=CONFIG, checklist=CHECKLIST)
    return s


def to_enrolled(**kw) -> Subject:
    s = to_eligible(**kw)
    s.enroll(ENROLLED, config=CONFIG)
    return s


def to_admitted(*, baseline: bool = True, **kw) -> Subject:
    s = to_enrolled(**kw)
    s.admit(ADMITTED, config=CONFIG)
    s.record_vital_signs(MEASURED, config=CONFIG, height_cm="158", weight_kg="52", temperature_c="36.8")
    s.record_pregnancy_test(MEASURED, "negative", config=CONFIG)
    if baseline:
        for code, value, unit in BASELINE_LABS:
            s.record_lab_result(code, value, unit, BASELINE, config=CONFIG)
    return s


def to_pretreated(**kw) -> Subject:
    s = to_admitted(**kw)
    s.give_pretreatment(CYC_START, CYC_STOP, "750", "1132.5", "CYC-2025-01", config=CONFIG)
    return s


def lot_for(subject: Subject, *, lot_id: str = "MSC-001", released_at: datetime = RELEASED, **changes) -> ProductLot:
    results: dict[str, Any] = dict(
        donor_id="DONOR-7",
        hla_match="10/10",
        total_cells="6.0E7",
        viability_pct="95",
        identity_markers_pct=MARKERS,
        sterility_negative=True,
        mycoplasma_negative=True,
        endotoxin_eu_per_kg="0.5",
    )
    results.update(changes)
    return ProductLot.record_release(subject.study_id, lot_id, subject.id, released_at, config=CONFIG, **results)


def to_transplanted(**kw) -> tuple[Subject, ProductLot]:
    s = to_pretreated(**kw)
    lot = lot_for(s)
    s.infuse_msc(MSC_START, MSC_STOP, lot, config=CONFIG)
    lot.mark_infused(s.id, MSC_START, config=CONFIG)
    return s, lot


def to_follow_up(**kw) -> Subject:
    s, _ = to_transplanted(**kw)
    s.discharge(DISCHARGED, config=CONFIG)
    return s


def visit_day(month: int, shift_days: int = 0, hour: int = 9) -> datetime:
    """The target day of month ``month`` (TX + 30·n) at ``hour``, shifted by ``shift_days``."""
    day = TX + timedelta(days=30 * month + shift_days)
    return datetime(day.year, day.month, day.day, hour, tzinfo=CST)


R = TypeVar("R", bound=Record)


def record_of(s: Subject, version: int, kind: type[R]) -> R:
    """The current record of fact ``version``, checked to be a ``kind`` (``Fact.record`` is typed as any record;
    which one follows from the fact's type)."""
    record = s.facts[version].record
    assert isinstance(record, kind), f"fact {version} holds {type(record).__name__}, not {kind.__name__}"
    return record


def new_study() -> UUID:
    return uuid4()


def refused(aggregate, error: type[Exception], verb, *args, **kwargs):
    """Call the verb, expect ``error``, and check that no event was created (version and pending events unchanged)."""
    version, pending = aggregate.version, len(aggregate.pending_events)
    with pytest.raises(error) as info:
        verb(*args, **kwargs)
    got = type(info.value).__name__
    assert type(info.value) is error, f"expected exactly {error.__name__}, got {got}: {info.value}"
    assert (aggregate.version, len(aggregate.pending_events)) == (version, pending), "an event was created"
    return info.value


@pytest.fixture
def sim_clock():
    """A simulated clock after the worked course (2025–2027), so no time of it lies in the future (R9)."""
    from sle_events.domain.clock import SimulatedClock, use_clock

    clock = SimulatedClock(CLOCK_AT)
    with use_clock(clock):
        yield clock
