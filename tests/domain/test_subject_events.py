"""Every event type of the trial: it has a role in the permission table (R10), carries occurred_at and a schema
version, and survives the signed payload (no floats; decoded by the event class's type hints) so that replaying
the stream rebuilds the same subject, lot and study. Pure: sealed with a generated key, no database."""

from __future__ import annotations

from datetime import date, datetime, timedelta
from typing import Any

import pytest
from eventsourcing.domain import CanMutateAggregate

from sle_events.domain.casebook import Casebook, CoveredStream
from sle_events.domain.product import ProductLot
from sle_events.domain.review import Query, SourceVerification
from sle_events.domain.roles import DEFAULT_PERMISSIONS, ROLES
from sle_events.domain.settings import StudySettings
from sle_events.domain.study import Study
from sle_events.domain.study_config import default_schedule
from sle_events.domain.subject import Subject
from sle_events.signing.envelope import GENESIS, open_sealed, seal
from sle_events.signing.keys import Signer
from sle_events.store.codec import domain_event_from, envelope_for

import subject_scenarios as sc
from subject_scenarios import (
    CONFIG,
    at,
    sim_clock,  # noqa: F401 (a fixture)
    visit_day,
)

pytestmark = pytest.mark.usefixtures("sim_clock")
SIGNER = Signer.generate("tester", "investigator")


def event_types(cls: type) -> list[str]:
    return sorted(
        f"{cls.__name__}.{name}"
        for name, v in vars(cls).items()
        if isinstance(v, type) and issubclass(v, CanMutateAggregate) and name not in ("Event", "Created")
    )


ALL_TYPES = event_types(Subject) + event_types(ProductLot) + event_types(Study)
ALL_TYPES += event_types(Casebook)  # sign-off, freeze, lock, unlock (sle_events/domain/casebook.py)
ALL_TYPES += event_types(SourceVerification) + event_types(Query)  # regulated acts on the data (review.py)


def course() -> dict[str, Any]:
    """Aggregates whose pending events cover every event type."""
    study = Study.create(
        "ALLOMSC", "AlloMSC", "admin", Signer.generate("admin", "admin").public_key_b64, at("2024-01-01 09:00")
    )
    study.add_site("NJ01", "Drum Tower", "Asia/Shanghai", at("2024-01-02 09:00"))
    study.add_site("BE01", "Charité", "Europe/Berlin", at("2024-01-02 09:00"))
    study.close_site("BE01", "never opened", at("2024-01-03 09:00"))
    study.approve_icf_version("ICF v1.0", at("2024-01-01 00:00"), at("2024-01-02 09:00"))
    study.define_visit_schedule(default_schedule(), at("2024-01-02 09:00"))
    study.adopt_settings(StudySettings(version="v2", monthly_window_days=7), at("2024-01-02 10:00"))
    nurse, new_key, lab = (
        Signer.generate(*who) for who in (("nurse", "coordinator"), ("nurse", "coordinator"), ("lab", "lab"))
    )
    old = study.register_key(nurse.actor, nurse.role, nurse.public_key_b64, at("2024-01-02 11:00"))
    study.rotate_key(old, new_key.public_key_b64, at("2024-01-03 11:00"))
    study.revoke_key(
        study.register_key(lab.actor, lab.role, lab.public_key_b64, at("2024-01-02 11:00")),
        "service retired",
        at("2024-01-04 11:00"),
    )
    study.change_permissions(
        "Subject.VitalSignsRecorded", ["coordinator", "investigator", "lab"], at("2024-01-05 11:00")
    )
    study.approve_new_study("ALLOMSC-2", "admin@elsewhere", new_key.public_key_b64, at("2024-01-06 11:00"))

    a, lot = sc.to_transplanted()
    a.record_medical_history("SLE", at("2025-02-04 09:00"), start_date=date(2019, 1, 1), ongoing=True)
    a.discharge(sc.DISCHARGED)
    a.record_concomitant_medication("prednisone", date(2025, 3, 11), sc.DISCHARGED, dose="20", dose_unit="mg")
    a.record_visit("M1", visit_day(1))
    creat = a.record_lab_result("CREAT", "0.70", "mg/dL", visit_day(1), lab_low="0.5", lab_high="1.1")
    a.derive_egfr(creat)
    a.record_lab_result("UPCR", "0.4", "mg/mg", visit_day(1))
    a.assess_renal_response(visit_day(1, hour=12), visit="M1")
    a.record_treg_panel(visit_day(1), "4.1", "520", reported_at=visit_day(4))
    a.assess_sledai(visit_day(1), ["SLED2K20", "SLED2K21"], visit="M1")
    a.record_team_evaluation(visit_day(1), disciplines=["rheumatology", "haematology", "bmt"], assessment="stable")
    a.record_unscheduled_visit(visit_day(1, 5), purpose="fever")
    ae = a.report_adverse_event("pneumonia", visit_day(1, 5).date(), visit_day(1, 5), grade_proposal=3)
    a.assess_adverse_event(
        ae,
        visit_day(1, 6),
        grade=3,
        serious=True,
        seriousness=["hospitalisation"],
        relatedness_cyc="possible",
        relatedness_msc="unlikely",
    )
    a.report_sae(ae, visit_day(1, 6) + timedelta(hours=3))
    a.assess_expectedness(ae, visit_day(1, 8), expectedness_cyc="expected", expectedness_msc="unexpected")
    a.record_ae_outcome(ae, visit_day(1, 20), "recovered", resolved_on=visit_day(1, 19).date())
    a.record_deviation(visit_day(1, 20), category="specimen", description="C4 tube haemolysed")
    a.correct(creat, {"value": "0.72"}, "transcription error", visit_day(1, 21))
    a.void(creat + 1, "recomputed", visit_day(1, 21))
    a.record_missed_visit("M2", visit_day(2, 8))
    a.record_missed_visit("M3", visit_day(3, 8))
    for i in range(3):
        a.record_contact_attempt(visit_day(3, 9 + i), method="phone", outcome="no answer")
    a.mark_lost_to_follow_up(visit_day(3, 12))
    a.record_return(visit_day(4), "called back")
    a.record_visit("M24", visit_day(24))
    a.record_missed_visit("M48", visit_day(48, 31))
    a.complete_study(visit_day(48, 32))

    failed = sc.to_consented(number="SCR-010")
    failed.record_classification("1:320", ["BIOPSY_CLASS_III_OR_IV", "ANTI_DSDNA_OR_ANTI_SM"], at("2025-02-04 08:00"))
    failed.record_biopsy(date(2024, 12, 1), "III", at("2025-02-04 08:00"))
    failed.screen_fail(at("2025-02-04 09:00"), reason="UPCR 0.8", failed_criteria=["I3"])
    again = Subject.screen(
        failed.study_id, "NJ01", "SCR-010R", at("2025-03-01 09:00"), config=CONFIG, rescreen_of=failed
    )

    tnp = sc.to_pretreated(number="SCR-011")
    tnp.record_transplant_not_performed(sc.MSC_START, "lot failed sterility")

    gone = sc.to_follow_up(number="SCR-012")
    gone.withdraw(
        visit_day(3),
        reason_code="adverse_event",
        reason="recurrent infections",
        decided_by="subject",
        safety_follow_up_agreed=True,
    )
    gone.record_death(visit_day(5), "sepsis")
    book = Casebook.open(a.study_id, a.id, visit_day(48, 33))
    covers = [CoveredStream(stream=str(a.id), through_version=a.version)]
    book.sign_off(
        visit_day(48, 33), meaning="approval", printed_name="Dr. Wang Li", covers=covers, content_hash="ab" * 32
    )
    book.freeze(visit_day(48, 34), "interim analysis")
    book.unlock(visit_day(48, 35), "late lab result")
    book.lock(visit_day(48, 36))

    # source data verification and a query's whole life, each on a stream of its own
    review_at = visit_day(48, 33)
    sdv = SourceVerification.open(a.study_id, a, review_at)
    sdv.verify(a, [(creat, None), (creat, "value")], by="cra", occurred_at=review_at, hash_of=lambda v: f"{v:064x}")
    query = Query.raise_on(a.study_id, a, creat, "source says 0.72?", by="cra", occurred_at=review_at, field="value")
    query.answer("corrected", by="nurse", occurred_at=review_at)
    query.close("resolved", by="cra", role="monitor", occurred_at=review_at)
    query.reopen("still unclear", by="cra", role="monitor", occurred_at=review_at)
    return {
        "study": study,
        "a": a,
        "lot": lot,
        "failed": failed,
        "again": again,
        "tnp": tnp,
        "gone": gone,
        "casebook": book,
        "sdv": sdv,
        "query": query,
    }


@pytest.fixture(scope="module")
def built() -> dict[str, Any]:
    from sle_events.domain.clock import SimulatedClock, use_clock

    with use_clock(SimulatedClock(sc.CLOCK_AT)):
        aggregates = course()
        events = {name: list(agg.pending_events) for name, agg in aggregates.items()}
    return {"aggregates": aggregates, "events": events}


def _state(agg: Any) -> dict[str, Any]:
    return {k: v for k, v in vars(agg).items() if k not in ("_pending_events", "_config")}


def _replay(events: list[Any]) -> tuple[Any, list[Any]]:
    agg, sealed, prev = None, [], GENESIS
    for e in events:
        one = seal(envelope_for(e, study=sc.STUDY, prev=prev), SIGNER)
        prev = one.hash
        sealed.append(one)
        agg = domain_event_from(open_sealed(one.sealed)).mutate(agg)
    return agg, sealed


def test_every_event_type_has_roles_in_the_permission_table():
    for name in ALL_TYPES:
        assert name in DEFAULT_PERMISSIONS, name
        assert DEFAULT_PERMISSIONS[name] and set(DEFAULT_PERMISSIONS[name]) <= ROLES, name


def test_the_course_covers_every_event_type(built):
    seen = {type(e).__qualname__ for events in built["events"].values() for e in events}
    assert sorted(set(ALL_TYPES) - seen) == []


@pytest.mark.parametrize("name", ["study", "a", "lot", "failed", "again", "tnp", "gone", "casebook", "sdv", "query"])
def test_replaying_the_signed_stream_rebuilds_the_same_aggregate(built, name):
    original = built["aggregates"][name]
    replayed, _ = _replay(built["events"][name])
    assert _state(replayed) == _state(original)


@pytest.mark.parametrize("event_type", ALL_TYPES)
def test_each_event_type_round_trips_with_occurred_at_and_schema(built, event_type):
    matches = [e for events in built["events"].values() for e in events if type(e).__qualname__ == event_type]
    assert matches, f"no {event_type} in the course"
    e = matches[0]
    env = envelope_for(e, study=sc.STUDY, prev=GENESIS)
    assert isinstance(e.occurred_at, datetime) and e.occurred_at.utcoffset() is not None
    assert (
        env["schema"]
        == getattr(type(e), "class_version", 1)
        == (2 if event_type in ("Study.KeyRegistered", "Study.Created") else 1)
    )
    back = domain_event_from(open_sealed(seal(env, SIGNER).sealed))
    assert type(back) is type(e)
    assert dict(vars(back).items()) == dict(vars(e).items())
    if "reason" in vars(e):
        assert env["reason"] == e.reason
