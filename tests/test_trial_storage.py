"""The trial end to end through `sle_events.trial.Trial` and the signed study record, on SQLite and PostgreSQL.

Every use case is recorded with a real signer; every refusal (a protocol rule in the domain, a role in the store)
is specific and stores nothing (row counts unchanged). A hypothesis property test plays random command
sequences, valid and invalid, and checks that the record still verifies and that no stored event breaks a rule,
judged by an independent reading of the stored envelopes.

All tests of this module share one database per engine (module scope) and a simulated clock in 2030, after
the worked course of `subject_scenarios` (2025–2027). Each test uses its own subjects or its own study.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any
from uuid import UUID

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from sle_events.audit.verifier import verify_record
from sle_events.domain import errors as E
from sle_events.domain.clock import SimulatedClock, use_clock
from sle_events.domain.errors import ProtocolViolation
from sle_events.domain.payloads import CriterionAnswer, EligibilityChecklist
from sle_events.domain.roles import DEFAULT_PERMISSIONS
from sle_events.signing.keys import Signer
from sle_events.store.errors import AppendRejected, UntrustedKey
from sle_events.store.record import StudyRecord
from sle_events.trial import Trial

import subject_scenarios as sc
from conftest import clean_postgres_url, count_rows
from record_rules import check_stream
from subject_scenarios import at, visit_day

pytestmark = pytest.mark.storage

PEOPLE = {
    "coordinator": "nurse.li",
    "investigator": "dr.wang",
    "lab": "lab.service",
    "data_manager": "dm.zhao",
    "sponsor": "pv.sponsor",
}
_numbers = itertools.count(1)


@dataclass
class World:
    url: str
    record: StudyRecord
    clock: SimulatedClock
    admin: Signer
    people: dict[str, Signer]
    trial: Trial = field(init=False)

    def __getattr__(self, role: str) -> Signer:  # world.lab, world.investigator...
        try:
            return self.__dict__["people"][role]
        except KeyError:
            raise AttributeError(role) from None

    def rows(self) -> int:
        return count_rows(self.url)

    def new_trial(self) -> Trial:
        code = f"ALLOMSC-{next(_numbers)}"
        if getattr(self, "trial", None) is not None:  # the database's first study approves every later one
            self.trial.approve_new_study(
                code, self.admin.actor, self.admin.public_key_b64, signer=self.admin, occurred_at=at("2024-01-01 08:00")
            )
        t = Trial.create(
            self.record,
            code=code,
            title="AlloMSC for refractory LN",
            admin=self.admin,
            people=self.people.values(),
            occurred_at=at("2024-01-01 09:00"),
        )
        t.add_site(
            "NJ01", "Nanjing Drum Tower", "Asia/Shanghai", signer=self.data_manager, occurred_at=at("2024-01-02 09:00")
        )
        t.approve_icf_version(
            "ICF v1.0", at("2024-01-01 00:00"), signer=self.data_manager, occurred_at=at("2024-01-02 09:00")
        )
        return t


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('trial') / 'study.db'}"
    else:
        url = clean_postgres_url()
    clock = SimulatedClock(sc.CLOCK_AT)
    with use_clock(clock):
        record = StudyRecord(url, clock=clock)
        w = World(
            url,
            record,
            clock,
            Signer.generate("admin@drum-tower", "admin"),
            {role: Signer.generate(actor, role) for role, actor in PEOPLE.items()},
        )
        w.trial = w.new_trial()
        yield w
        record.close()
        record.engine.dispose()


# --------------------------------------------------------------------------- the worked course through the store
STATES = ["screened", "consented", "eligible", "enrolled", "admitted", "pretreated", "transplanted", "follow_up"]


def drive(w: World, upto: str, trial: Trial | None = None, number: str | None = None) -> UUID:
    """A new subject taken through the worked course (subject_scenarios) up to ``upto``, with the right signers."""
    t = trial or w.trial
    number = number or f"SCR-{next(_numbers):04d}"
    sid = t.screen("NJ01", number, sc.SCREENED, signer=w.coordinator)

    def screening_data() -> None:
        t.record_demographics(
            sid, "F", date(1995, 6, 15), at("2025-02-03 10:30"), signer=w.coordinator, childbearing_potential=True
        )
        for c, v, u in (("UPCR", "2.6", "mg/mg"), ("CREAT", "0.70", "mg/dL")):
            t.record_lab_result(sid, c, v, u, sc.SCREENING_LABS, signer=w.lab)
        t.confirm_eligibility(sid, sc.ELIGIBLE, sc.CHECKLIST, signer=w.investigator)

    def admission() -> None:
        t.admit(sid, sc.ADMITTED, signer=w.coordinator)
        t.record_vital_signs(sid, sc.MEASURED, signer=w.coordinator, height_cm="158", weight_kg="52")
        t.record_pregnancy_test(sid, sc.MEASURED, "negative", signer=w.lab)
        for c, v, u in sc.BASELINE_LABS:
            t.record_lab_result(sid, c, v, u, sc.BASELINE, signer=w.lab)

    steps: list[Callable[[], Any]] = [
        lambda: t.obtain_consent(sid, "ICF v1.0", sc.CONSENTED, signer=w.investigator, taken_by="dr.wang"),
        screening_data,
        lambda: t.enroll(sid, sc.ENROLLED, signer=w.investigator),
        admission,
        lambda: t.give_pretreatment(sid, sc.CYC_START, sc.CYC_STOP, "750", "1132.5", "CYC-L1", signer=w.investigator),
        lambda: (
            t.release_product_lot(
                f"MSC-{number}",
                sid,
                sc.RELEASED,
                signer=w.lab,
                donor_id="D-7",
                hla_match="10/10",
                total_cells="6.0E7",
                viability_pct="95",
                identity_markers_pct=sc.MARKERS,
                sterility_negative=True,
                mycoplasma_negative=True,
            ),
            t.infuse_msc(sid, f"MSC-{number}", sc.MSC_START, sc.MSC_STOP, signer=w.investigator),
        ),
        lambda: t.discharge(sid, sc.DISCHARGED, signer=w.coordinator),
    ]
    for step in steps[: STATES.index(upto)]:
        step()
    return sid


def types_of(w: World, sid: UUID) -> list[str]:
    return [e.topic for e in w.record.stream(sid)]


def test_patient_state_lists_an_assessment_whose_egfr_was_corrected_until_it_is_assessed_again(world):
    import json

    import sqlalchemy as sa

    from projections.dashboard import dashboard
    from projections.patient_state import PatientState
    from projections.runner import ProjectionRunner
    from projections.schema import patient_state

    w, t = world, world.trial
    sid = drive(w, "follow_up")
    creat = t.record_lab_result(sid, "CREAT", "0.70", "mg/dL", visit_day(1), signer=w.lab)
    t.record_lab_result(sid, "UPROT", "40", "mg/dL", visit_day(1), signer=w.lab)
    t.record_lab_result(sid, "UCREAT", "100", "mg/dL", visit_day(1), signer=w.lab)
    t.assess_renal_response(sid, visit_day(1, hour=12), signer=w.investigator, visit="M1")
    assessed = w.record.get(sid).version
    egfr = w.record.get(sid).facts[assessed].record.inputs[-1]
    runner = ProjectionRunner(w.url, [PatientState()])

    def stale() -> list[dict[str, Any]]:
        runner.catch_up()
        with runner.engine.connect() as conn:
            row = conn.execute(sa.select(patient_state.c.stale_results).where(patient_state.c.subject == str(sid)))
            return json.loads(row.scalar_one())

    assert stale() == []
    t.correct(sid, creat, {"value": "0.90"}, "transcription error", visit_day(1, hour=14), signer=w.lab)
    assert stale() == [
        {"version": assessed, "type": "RenalResponseAssessed", "code": "RENAL_RESPONSE", "changed_inputs": [egfr]}
    ]  # the eGFR was derived again by the correction; not the assessment
    with runner.engine.connect() as conn:
        site = conn.execute(sa.select(patient_state.c.site).where(patient_state.c.subject == str(sid))).scalar_one()
        assert dashboard(conn)["stale_results"] == [{"site": site, "subjects": 1, "results": 1}]
    t.assess_renal_response(sid, visit_day(1, hour=15), signer=w.investigator, visit="M1")
    assert stale() == []
    runner.close()


def test_a_full_course_is_recorded_signed_and_replays_to_the_same_subject(world):
    w, t = world, world.trial
    before = w.rows()
    sid = drive(w, "follow_up")
    t.record_visit(sid, "M1", visit_day(1), signer=w.coordinator)
    t.record_lab_result(sid, "CREAT", "0.70", "mg/dL", visit_day(1), signer=w.lab)
    t.record_lab_result(sid, "UPROT", "40", "mg/dL", visit_day(1), signer=w.lab)
    t.record_lab_result(sid, "UCREAT", "100", "mg/dL", visit_day(1), signer=w.lab)
    assert t.assess_renal_response(sid, visit_day(1, hour=12), signer=w.investigator, visit="M1").status == "CR"
    t.assess_sledai(sid, visit_day(1), ["SLED2K20"], signer=w.investigator, visit="M1")
    t.record_treg_panel(sid, visit_day(1), "5.2", "610", signer=w.lab)
    t.record_team_evaluation(
        sid,
        visit_day(1),
        signer=w.investigator,
        disciplines=["rheumatology", "haematology", "bmt"],
        assessment="responding",
    )
    ae = t.report_adverse_event(
        sid, "herpes zoster", visit_day(2).date(), visit_day(2, hour=12), signer=w.coordinator, grade_proposal=2
    )
    t.assess_adverse_event(
        sid,
        ae,
        visit_day(2, hour=14),
        signer=w.investigator,
        grade=3,
        serious=True,
        seriousness=["hospitalisation"],
        relatedness_cyc="possible",
        relatedness_msc="unlikely",
    )
    assert t.report_sae(sid, ae, visit_day(2, hour=20), signer=w.investigator).value == "REPORTED_ON_TIME"
    assert (
        t.assess_expectedness(
            sid, ae, visit_day(3), signer=w.sponsor, expectedness_cyc="expected", expectedness_msc="expected"
        )
        is False
    )
    t.record_visit(sid, "M24", visit_day(24), signer=w.coordinator)

    types = types_of(w, sid)
    assert types[:3] == ["Subject.Screened", "Subject.ConsentObtained", "Subject.DemographicsRecorded"]
    assert types.count("Subject.DerivedResultRecorded") == 4  # eGFR ×3 (screening, baseline, M1) and UPCR
    assert types[-2:] == ["Subject.VisitRecorded", "Subject.MainStudyCompleted"]
    lot = t.lot(f"MSC-{t.subject(sid).screening_number}")
    assert [e.topic for e in w.record.stream(lot.id)] == ["ProductLot.ReleaseTested", "ProductLot.Infused"]
    assert w.rows() == before + len(types) + 2

    fresh = w.record.get(sid)
    mine = t.subject(sid)
    assert {k: v for k, v in vars(fresh).items() if k != "_pending_events"} == {
        k: v for k, v in vars(mine).items() if k != "_pending_events"
    }
    roles = {e.envelope["role"] for e in w.record.stream(sid)}
    assert roles == {"coordinator", "investigator", "lab", "sponsor"}
    for e in w.record.stream(sid):
        assert e.envelope["role"] in DEFAULT_PERMISSIONS[e.topic]
    assert verify_record(w.url, workers=1).ok


# --------------------------------------------------------------------------- refusals store nothing
def _checklist_without_e9() -> EligibilityChecklist:
    answers = {k: v for k, v in sc.CHECKLIST.answers.items() if k != "E9"}
    return EligibilityChecklist(answers=answers, screening_labs_collected_at=sc.SCREENING_LABS)


def _failing_checklist() -> EligibilityChecklist:
    answers = dict(sc.CHECKLIST.answers, E1=CriterionAnswer(met=True, evidence="HBsAg positive"))
    return EligibilityChecklist(answers=answers, screening_labs_collected_at=sc.SCREENING_LABS)


def _release(w: World, sid: UUID, lot_id: str, released_at: datetime, viability_pct: str = "95") -> None:
    w.trial.release_product_lot(
        lot_id,
        sid,
        released_at,
        signer=w.lab,
        donor_id="D",
        hla_match="10/10",
        total_cells="6.0E7",
        viability_pct=viability_pct,
        identity_markers_pct=sc.MARKERS,
        sterility_negative=True,
        mycoplasma_negative=True,
    )


#: (name, state the subject is brought to, the specific error, the command — or (setup, command))
REFUSALS: list[tuple[str, str, type[Exception], Any]] = [
    (
        "T1 inactive/unknown site",
        "screened",
        E.UnknownSite,
        lambda w, s: w.trial.screen("XX01", "SCR-X1", sc.SCREENED, signer=w.coordinator),
    ),
    (
        "T1 duplicate screening number",
        "screened",
        E.DuplicateScreeningNumber,
        lambda w, s: w.trial.screen("NJ01", w.trial.subject(s).screening_number, sc.SCREENED, signer=w.coordinator),
    ),
    (
        "T2 unapproved ICF",
        "screened",
        E.IcfNotApproved,
        lambda w, s: w.trial.obtain_consent(s, "ICF v0.9", sc.CONSENTED, signer=w.investigator, taken_by="dr.wang"),
    ),
    (
        "R1 lab before consent",
        "screened",
        E.ConsentRequired,
        lambda w, s: w.trial.record_lab_result(s, "C3", "80", "mg/dL", sc.CONSENTED, signer=w.lab),
    ),
    (
        "T3 screen failure without reason",
        "screened",
        E.ReasonRequired,
        lambda w, s: w.trial.screen_fail(s, sc.CONSENTED, signer=w.coordinator, reason=""),
    ),
    (
        "T4 incomplete checklist",
        "consented",
        E.EligibilityIncomplete,
        lambda w, s: w.trial.confirm_eligibility(s, sc.ELIGIBLE, _checklist_without_e9(), signer=w.investigator),
    ),
    (
        "T4 exclusion applies",
        "consented",
        E.EligibilityNotMet,
        lambda w, s: w.trial.confirm_eligibility(s, sc.ELIGIBLE, _failing_checklist(), signer=w.investigator),
    ),
    (
        "R2 enrollment before eligibility",
        "consented",
        E.EnrollmentBeforeEligibility,
        lambda w, s: w.trial.enroll(s, sc.ENROLLED, signer=w.investigator),
    ),
    (
        "T6 eligibility expired",
        "eligible",
        E.EligibilityExpired,
        lambda w, s: w.trial.enroll(s, sc.ELIGIBLE + timedelta(days=29), signer=w.investigator),
    ),
    (
        "lab: unknown analyte",
        "consented",
        E.UnknownAnalyte,
        lambda w, s: w.trial.record_lab_result(s, "GLUC", "5", "mmol/L", sc.SCREENING_LABS, signer=w.lab),
    ),
    (
        "lab: unit not convertible",
        "consented",
        E.IncompatibleUnit,
        lambda w, s: w.trial.record_lab_result(s, "C3", "0.8", "mmol/L", sc.SCREENING_LABS, signer=w.lab),
    ),
    (
        "lab: implausible value",
        "consented",
        E.ImplausibleValue,
        lambda w, s: w.trial.record_lab_result(s, "HGB", "30", "g/dL", sc.SCREENING_LABS, signer=w.lab),
    ),
    (
        "lab: float",
        "consented",
        E.FloatNotAllowed,
        lambda w, s: w.trial.record_lab_result(s, "HGB", 10.5, "g/dL", sc.SCREENING_LABS, signer=w.lab),
    ),
    (
        "R9 future occurred_at",
        "consented",
        E.FutureTimestamp,
        lambda w, s: w.trial.record_lab_result(s, "HGB", "10.5", "g/dL", w.clock() + timedelta(hours=1), signer=w.lab),
    ),
    (
        "R3 CYC without an open stay",
        "enrolled",
        E.NotAdmitted,
        lambda w, s: w.trial.give_pretreatment(
            s, sc.CYC_START, sc.CYC_STOP, "750", "1132.5", "L", signer=w.investigator
        ),
    ),
    (
        "T7 no height/weight at this admission",
        "enrolled",
        E.MeasurementMissing,
        (
            lambda w, s: w.trial.admit(s, sc.ADMITTED, signer=w.coordinator),
            lambda w, s: w.trial.give_pretreatment(
                s, sc.CYC_START, sc.CYC_STOP, "750", "1132.5", "L", signer=w.investigator
            ),
        ),
    ),
    (
        "R4 second CYC",
        "pretreated",
        E.DuplicatePretreatment,
        lambda w, s: w.trial.give_pretreatment(
            s, sc.CYC_START, sc.CYC_STOP, "750", "1132.5", "L", signer=w.investigator
        ),
    ),
    (
        "R4 MSC 38 h after CYC (W4)",
        "pretreated",
        E.OutsideWindow,
        (
            lambda w, s: _release(w, s, f"W4-{s}", sc.CYC_START + timedelta(hours=35)),
            lambda w, s: w.trial.infuse_msc(
                s,
                f"W4-{s}",
                sc.CYC_START + timedelta(hours=38),
                sc.CYC_START + timedelta(hours=39),
                signer=w.investigator,
            ),
        ),
    ),
    (
        "R5 lot failing release, no deviation",
        "pretreated",
        E.LotNotReleased,
        (
            lambda w, s: _release(w, s, f"BAD-{s}", sc.RELEASED, viability_pct="60"),
            lambda w, s: w.trial.infuse_msc(s, f"BAD-{s}", sc.MSC_START, sc.MSC_STOP, signer=w.investigator),
        ),
    ),
    (
        "R5 unknown lot",
        "pretreated",
        E.LotUnavailable,
        lambda w, s: w.trial.infuse_msc(s, "NO-SUCH-LOT", sc.MSC_START, sc.MSC_STOP, signer=w.investigator),
    ),
    (
        "R6 discharge before the infusion",
        "pretreated",
        E.DischargeBeforeInfusionEnd,
        lambda w, s: w.trial.discharge(s, sc.DISCHARGED, signer=w.coordinator),
    ),
    (
        "R7 visit before TX",
        "pretreated",
        E.VisitBeforeTransplant,
        lambda w, s: w.trial.record_visit(s, "M1", visit_day(1), signer=w.coordinator),
    ),
    (
        "T11 completion not due",
        "follow_up",
        E.CompletionNotDue,
        lambda w, s: w.trial.complete_study(s, visit_day(30), signer=w.investigator),
    ),
    (
        "T13 LTFU not due",
        "follow_up",
        E.LostToFollowUpNotDue,
        lambda w, s: w.trial.mark_lost_to_follow_up(s, visit_day(3), signer=w.investigator),
    ),
    (
        "T15 death before last known alive",
        "follow_up",
        E.DeathBeforeLastKnownAlive,
        lambda w, s: w.trial.record_death(s, sc.ADMITTED, "sepsis", signer=w.investigator),
    ),
    (
        "AE onset before consent",
        "follow_up",
        E.AdverseEventBeforeConsent,
        lambda w, s: w.trial.report_adverse_event(s, "rash", date(2025, 1, 1), visit_day(1), signer=w.coordinator),
    ),
    (
        "SAE report of a non-assessed AE",
        "follow_up",
        E.UnknownAdverseEvent,
        lambda w, s: w.trial.report_sae(s, "AE-042", visit_day(1), signer=w.investigator),
    ),
    (
        "R11 correction without reason",
        "follow_up",
        E.ReasonRequired,
        lambda w, s: w.trial.correct(s, 5, {"value": "2.7"}, "", visit_day(1), signer=w.lab),
    ),
    (
        "R11 correction breaking a bound",
        "follow_up",
        E.ImplausibleValue,
        lambda w, s: w.trial.correct(s, 5, {"value": "31"}, "typo", visit_day(1), signer=w.lab),
    ),
    (
        "R11 correction by a role that may not record the original",
        "follow_up",
        E.RoleMayNotCorrect,
        lambda w, s: w.trial.correct(s, 5, {"value": "2.7"}, "typo", visit_day(1), signer=w.coordinator),
    ),
    (
        "R11 void of a lifecycle event",
        "follow_up",
        E.NotCorrectable,
        lambda w, s: w.trial.void(s, 2, "mistake", visit_day(1), signer=w.investigator),
    ),
    (
        "R8 visit after withdrawal without agreement",
        "withdrawn",
        E.NotAllowedAfterExit,
        lambda w, s: w.trial.record_visit(s, "M5", visit_day(5), signer=w.coordinator),
    ),
]


def _prepared(w: World, state: str) -> UUID:
    if state == "withdrawn":
        sid = drive(w, "follow_up")
        w.trial.withdraw(
            sid,
            visit_day(4),
            signer=w.investigator,
            reason_code="withdrawal_by_subject",
            reason="moved away",
            decided_by="subject",
            safety_follow_up_agreed=False,
        )
        return sid
    return drive(w, state)


@pytest.mark.parametrize(("state", "error", "command"), [pytest.param(s, e, c, id=name) for name, s, e, c in REFUSALS])
def test_a_refused_command_stores_nothing(world, state, error, command):
    w = world
    sid = _prepared(w, state)
    if isinstance(command, tuple):
        setup, command = command
        setup(w, sid)
    version, rows = w.trial.subject(sid).version, w.rows()
    with pytest.raises(error):
        command(w, sid)
    assert w.rows() == rows
    assert w.trial.subject(sid).version == version == w.record.get(sid).version
    assert not w.trial.subject(sid).pending_events


# --------------------------------------------------------------------------- roles through the store (R10)
def _ae(w: World, sid: UUID) -> None:
    w.trial.report_adverse_event(sid, "rash", visit_day(1).date(), visit_day(1), signer=w.coordinator)


#: (name, state, the role that tries, the command — or (setup by the right roles, command))
ROLE_REFUSALS: list[tuple[str, str, str, Any]] = [
    (
        "a lab key cannot confirm eligibility",
        "consented",
        "lab",
        lambda w, s, who: w.trial.confirm_eligibility(s, sc.ELIGIBLE, sc.CHECKLIST, signer=who),
    ),
    (
        "a coordinator cannot confirm eligibility",
        "consented",
        "coordinator",
        lambda w, s, who: w.trial.confirm_eligibility(s, sc.ELIGIBLE, sc.CHECKLIST, signer=who),
    ),
    (
        "a coordinator cannot assess AE seriousness and relatedness",
        "follow_up",
        "coordinator",
        (
            _ae,
            lambda w, s, who: w.trial.assess_adverse_event(
                s, "AE-001", visit_day(1, hour=12), signer=who, grade=1, serious=False, relatedness_cyc="unlikely"
            ),
        ),
    ),
    (
        "an investigator cannot set expectedness (sponsor only)",
        "follow_up",
        "investigator",
        (
            _ae,
            lambda w, s, who: w.trial.assess_expectedness(
                s, "AE-001", visit_day(1, hour=12), signer=who, expectedness_cyc="expected", expectedness_msc="expected"
            ),
        ),
    ),
    (
        "a lab cannot record the MSC infusion",
        "pretreated",
        "lab",
        (
            lambda w, s: _release(w, s, f"ROLE-{s}", sc.RELEASED),
            lambda w, s, who: w.trial.infuse_msc(s, f"ROLE-{s}", sc.MSC_START, sc.MSC_STOP, signer=who),
        ),
    ),
    (
        "a lab cannot record a death",
        "follow_up",
        "lab",
        lambda w, s, who: w.trial.record_death(s, visit_day(1), "sepsis", signer=who),
    ),
    (
        "a sponsor cannot record a lab result",
        "consented",
        "sponsor",
        lambda w, s, who: w.trial.record_lab_result(s, "C3", "80", "mg/dL", sc.SCREENING_LABS, signer=who),
    ),
    (
        "a coordinator cannot record a withdrawal decision",
        "follow_up",
        "coordinator",
        lambda w, s, who: w.trial.withdraw(
            s,
            visit_day(2),
            signer=who,
            reason_code="other",
            reason="x",
            decided_by="subject",
            safety_follow_up_agreed=False,
        ),
    ),
    (
        "a coordinator cannot change the study configuration",
        "screened",
        "coordinator",
        lambda w, s, who: w.trial.add_site("NJ02", "Gulou", "Asia/Shanghai", signer=who, occurred_at=sc.SCREENED),
    ),
]


@pytest.mark.parametrize(
    ("state", "role", "command"), [pytest.param(s, r, c, id=name) for name, s, r, c in ROLE_REFUSALS]
)
def test_the_store_refuses_a_role_that_may_not_record_the_event(world, state, role, command):
    w = world
    sid = _prepared(w, state)
    if isinstance(command, tuple):
        setup, command = command
        setup(w, sid)
    rows = w.rows()
    with pytest.raises(UntrustedKey, match="may not record"):
        command(w, sid, w.people[role])
    assert w.rows() == rows
    assert w.trial.subject(sid).version == w.record.get(sid).version  # the dropped cache reloads the truth


def test_an_allowed_role_succeeds_after_a_refused_one(world):
    w = world
    sid = drive(w, "consented")
    w.trial.record_lab_result(sid, "C3", "80", "mg/dL", sc.SCREENING_LABS, signer=w.lab)
    with pytest.raises(UntrustedKey):
        w.trial.confirm_eligibility(sid, sc.ELIGIBLE, sc.CHECKLIST, signer=w.lab)
    w.trial.confirm_eligibility(sid, sc.ELIGIBLE, sc.CHECKLIST, signer=w.investigator)
    assert w.record.get(sid).status == "ELIGIBLE"


# --------------------------------------------------------------------------- multi-stream use cases
def test_rescreening_records_both_streams_in_one_append(world):
    w, t = world, world.trial
    old = drive(w, "consented")
    t.screen_fail(old, at("2025-02-04 09:00"), signer=w.coordinator, reason="UPCR 0.8", failed_criteria=["I3"])
    rows = w.rows()
    new = t.screen("NJ01", f"R-{old}", at("2025-03-01 09:00"), signer=w.coordinator, rescreen_of=old)
    assert w.rows() == rows + 2
    assert w.record.get(old).rescreened_as == new and w.record.get(new).rescreen_of == old
    with pytest.raises(E.RescreenNotAllowed):
        t.screen("NJ01", f"R2-{old}", at("2025-03-02 09:00"), signer=w.coordinator, rescreen_of=old)
    assert w.rows() == rows + 2


def test_a_second_writer_cannot_reuse_a_screening_number(world):
    w = world
    sid = drive(w, "screened")
    other = Trial(w.record, w.trial.study_id)  # a fresh application cache
    with pytest.raises(E.DuplicateScreeningNumber):
        other.screen("NJ01", w.trial.subject(sid).screening_number, sc.SCREENED, signer=w.coordinator)


def test_a_lot_is_released_once_and_infused_once(world):
    w, t = world, world.trial
    sid = drive(w, "transplanted")
    lot_id = f"MSC-{t.subject(sid).screening_number}"
    with pytest.raises(E.LotUnavailable, match="already recorded"):
        t.release_product_lot(
            lot_id,
            sid,
            sc.RELEASED,
            signer=w.lab,
            donor_id="D",
            hla_match="10/10",
            total_cells="6.0E7",
            viability_pct="95",
            identity_markers_pct=sc.MARKERS,
            sterility_negative=True,
            mycoplasma_negative=True,
        )
    assert t.lot(lot_id).infused_into == sid


def test_a_deviation_recorded_first_lets_a_failed_lot_be_infused(world):
    w, t = world, world.trial
    sid = drive(w, "pretreated")
    t.release_product_lot(
        "LOW-VIA",
        sid,
        sc.RELEASED,
        signer=w.lab,
        donor_id="D",
        hla_match="9/10",
        total_cells="6.0E7",
        viability_pct="65",
        identity_markers_pct=sc.MARKERS,
        sterility_negative=True,
        mycoplasma_negative=True,
    )
    v = t.record_deviation(
        sid,
        sc.RELEASED,
        signer=w.investigator,
        category="product_release",
        description="viability 65 %: sponsor approved",
        lot_id="LOW-VIA",
    )
    assert t.infuse_msc(sid, "LOW-VIA", sc.MSC_START, sc.MSC_STOP, signer=w.investigator).authorised_by_deviation == v


def test_death_opens_its_sae_in_the_same_append(world):
    w, t = world, world.trial
    sid = drive(w, "follow_up")
    rows = w.rows()
    assert t.record_death(sid, visit_day(3), "pneumonia", signer=w.investigator) == "AE-001"
    assert w.rows() == rows + 3
    assert types_of(w, sid)[-3:] == [
        "Subject.DeathRecorded",
        "Subject.AdverseEventReported",
        "Subject.AdverseEventAssessed",
    ]


def test_a_lab_correction_with_a_reason_rederives_egfr_citing_it(world):
    w, t = world, world.trial
    sid = drive(w, "follow_up")
    creat = t.record_lab_result(sid, "CREAT", "0.70", "mg/dL", visit_day(1), signer=w.lab)
    rows = w.rows()
    t.correct(sid, creat, {"value": "0.90"}, "transcription error", visit_day(2), signer=w.lab)
    assert w.rows() == rows + 2
    stream = w.record.stream(sid)
    corrected, derived = stream[-2], stream[-1]
    assert corrected.envelope["reason"] == "transcription error"
    assert corrected.envelope["payload"]["corrected_version"] == creat
    assert derived.envelope["payload"]["inputs"][:2] == [creat, corrected.version]
    t.void(sid, creat, "specimen from another subject", visit_day(2, hour=12), signer=w.lab)
    assert w.record.get(sid).facts[creat].voided


# --------------------------------------------------------------------------- property: random command sequences
PLAN = [
    "consent",
    "demographics",
    "screening_labs",
    "eligibility",
    "enroll",
    "admit",
    "vitals",
    "pregnancy",
    "baseline",
    "cyc",
    "lot",
    "infuse",
    "discharge",
    "m1",
    "m1_labs",
    "m2",
    "m3",
]
NOISE = [
    "ae",
    "assess_ae",
    "withdraw",
    "death",
    "correct",
    "void",
    "ltfu",
    "return",
    "unscheduled",
    "missed",
    "wrong_role",
    "complete",
    "deviation",
    "screen_fail",
]
MUTATIONS = ["keep", "skip", "early", "late", "wrong_role", "bad_value"]


def _run(w: World, t: Trial, sid: UUID, label: str, step: str, mutation: str, k: int) -> None:
    """One command of the plan (or noise), possibly mutated into an invalid one."""
    shift = {"early": -timedelta(hours=20 + k % 30), "late": timedelta(days=1 + k % 40)}.get(mutation, timedelta(0))
    bad = mutation == "bad_value"
    who = (
        (lambda role: w.people["lab" if role != "lab" else "coordinator"])
        if mutation == "wrong_role"
        else (lambda role: w.people[role])
    )
    lot = f"L-{label}"
    table: dict[str, Callable[[], Any]] = {
        "consent": lambda: t.obtain_consent(
            sid, "ICF v9" if bad else "ICF v1.0", sc.CONSENTED + shift, signer=who("investigator"), taken_by="dr.wang"
        ),
        "demographics": lambda: t.record_demographics(
            sid,
            "F",
            date(2020 if bad else 1995, 6, 15),
            at("2025-02-03 10:30") + shift,
            signer=who("coordinator"),
            childbearing_potential=True,
        ),
        "screening_labs": lambda: t.record_lab_result(
            sid, "CREAT", "40" if bad else "0.7", "mg/dL", sc.SCREENING_LABS + shift, signer=who("lab")
        ),
        "eligibility": lambda: t.confirm_eligibility(
            sid, sc.ELIGIBLE + shift, _failing_checklist() if bad else sc.CHECKLIST, signer=who("investigator")
        ),
        "enroll": lambda: t.enroll(sid, sc.ENROLLED + shift, signer=who("investigator")),
        "admit": lambda: t.admit(sid, sc.ADMITTED + shift, signer=who("coordinator")),
        "vitals": lambda: t.record_vital_signs(
            sid, sc.MEASURED + shift, signer=who("coordinator"), height_cm="158", weight_kg="300" if bad else "52"
        ),
        "pregnancy": lambda: t.record_pregnancy_test(
            sid, sc.MEASURED + shift, "positive" if bad else "negative", signer=who("lab")
        ),
        "baseline": lambda: [
            t.record_lab_result(sid, c, v, u, sc.BASELINE + shift, signer=who("lab")) for c, v, u in sc.BASELINE_LABS
        ],
        "cyc": lambda: t.give_pretreatment(
            sid,
            sc.CYC_START + shift,
            sc.CYC_STOP + shift,
            "750",
            "3500" if bad else "1132.5",
            "CYC-L",
            signer=who("investigator"),
        ),
        "lot": lambda: t.release_product_lot(
            lot,
            sid,
            sc.RELEASED + shift,
            signer=who("lab"),
            donor_id="D",
            hla_match="10/10",
            total_cells="6.0E7",
            viability_pct="60" if bad else "95",
            identity_markers_pct=sc.MARKERS,
            sterility_negative=True,
            mycoplasma_negative=True,
        ),
        "infuse": lambda: t.infuse_msc(sid, lot, sc.MSC_START + shift, sc.MSC_STOP + shift, signer=who("investigator")),
        "discharge": lambda: t.discharge(sid, sc.DISCHARGED + shift, signer=who("coordinator")),
        "m1": lambda: t.record_visit(sid, "M1", visit_day(1) + shift, signer=who("coordinator")),
        "m1_labs": lambda: t.record_lab_result(
            sid, "UPCR", "-1" if bad else "0.4", "mg/mg", visit_day(1) + shift, signer=who("lab")
        ),
        "m2": lambda: t.record_visit(sid, "M2", visit_day(2) + shift, signer=who("coordinator")),
        "m3": lambda: t.record_visit(sid, "M3", visit_day(3) + shift, signer=who("coordinator")),
        # noise
        "ae": lambda: t.report_adverse_event(
            sid, "fever", (visit_day(k % 5) + shift).date(), visit_day(k % 5) + shift, signer=who("coordinator")
        ),
        "assess_ae": lambda: t.assess_adverse_event(
            sid,
            "AE-001",
            visit_day(k % 5, hour=20) + shift,
            signer=who("investigator"),
            grade=5 if bad else 3,
            serious=True,
            seriousness=["hospitalisation"],
        ),
        "withdraw": lambda: t.withdraw(
            sid,
            visit_day(k % 4) + shift,
            signer=who("investigator"),
            reason_code="other",
            reason="" if bad else "moved",
            decided_by="subject",
            safety_follow_up_agreed=bool(k % 2),
        ),
        "death": lambda: t.record_death(
            sid, visit_day(k % 6) + shift, "" if bad else "sepsis", signer=who("investigator")
        ),
        "correct": lambda: t.correct(
            sid,
            2 + k % 20,
            {"value": "31" if bad else "0.8", "occurred_at": sc.CYC_START + timedelta(hours=k % 50)}
            if k % 3 == 0
            else {"value": "31" if bad else "0.8"},
            "" if k % 4 == 0 else "transcription error",
            visit_day(3),
            signer=who("lab"),
        ),
        "void": lambda: t.void(sid, 2 + k % 25, "" if bad else "duplicate", visit_day(3), signer=who("lab")),
        "ltfu": lambda: t.mark_lost_to_follow_up(sid, visit_day(4) + shift, signer=who("investigator")),
        "return": lambda: t.record_return(sid, visit_day(5) + shift, "" if bad else "back", signer=who("investigator")),
        "unscheduled": lambda: t.record_unscheduled_visit(
            sid, visit_day(k % 4) + shift, signer=who("coordinator"), purpose="" if bad else "flare"
        ),
        "missed": lambda: t.record_missed_visit(
            sid, f"M{1 + k % 4}", visit_day(1 + k % 4, 8) + shift, signer=who("coordinator")
        ),
        "wrong_role": lambda: t.record_lab_result(sid, "C3", "80", "mg/dL", visit_day(1), signer=w.coordinator),
        "complete": lambda: t.complete_study(sid, visit_day(48) + shift, signer=who("investigator")),
        "deviation": lambda: t.record_deviation(
            sid,
            sc.RELEASED + shift,
            signer=who("investigator"),
            category="product_release",
            description="approved",
            lot_id=lot if not bad else None,
        ),
        "screen_fail": lambda: t.screen_fail(
            sid, sc.ELIGIBLE + shift, signer=who("coordinator"), reason="" if bad else "declined"
        ),
    }
    table[step]()


@given(
    mutated=st.lists(
        st.tuples(st.integers(0, len(PLAN) - 1), st.sampled_from(MUTATIONS[1:]), st.integers(0, 10_000)), max_size=4
    ),
    noise=st.lists(
        st.tuples(
            st.integers(0, len(PLAN)), st.sampled_from(NOISE), st.sampled_from(MUTATIONS), st.integers(0, 10_000)
        ),
        max_size=8,
    ),
)
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_random_command_sequences_keep_the_record_valid(world, mutated, noise):
    """The worked course with a few steps mutated (skipped, early, late, wrong role, bad value) and random other
    commands inserted: whatever is refused stores nothing, and what is stored verifies and breaks no rule."""
    w = world
    with use_clock(w.clock):
        t = w.new_trial()
        label = str(next(_numbers))
        sid = t.screen("NJ01", f"P-{label}", sc.SCREENED, signer=w.coordinator)
        plan = {i: (m, k) for i, m, k in mutated}
        steps = [(step, *plan.get(i, ("keep", i))) for i, step in enumerate(PLAN)]
        for position, step, mutation, k in sorted(noise, key=lambda n: n[0], reverse=True):
            steps.insert(position, (step, mutation, k))
        for step, mutation, k in steps:
            if mutation == "skip":
                continue
            rows = w.rows()
            try:
                _run(w, t, sid, label, step, mutation, k)
            except (ProtocolViolation, AppendRejected):
                assert w.rows() == rows, f"{step}/{mutation} was refused but stored something"
        sealed = w.record.stream(sid)
        event(f"reached {t.subject(sid).status}")
        check_stream(sealed)
        replayed = w.record.get(sid)
        assert replayed.version == t.subject(sid).version == len(sealed)
        assert replayed.status == t.subject(sid).status
    report = verify_record(w.url, workers=1)
    assert report.ok, report.findings[:3]
