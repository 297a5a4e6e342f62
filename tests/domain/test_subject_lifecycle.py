"""The subject's state machine (PROTOCOL §3, T1–T15) and the ordering rules R1, R2, R8, R9: pure domain, no DB.

Each refusal is a specific error and creates no event (``refused`` checks the version and pending events).
"""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any

import pytest

from sle_events.domain.errors import (
    AlreadyConsented,
    ChecklistContradictsRecord,
    CompletionNotDue,
    ConsentRequired,
    DeathBeforeLastKnownAlive,
    EligibilityExpired,
    EligibilityIncomplete,
    EligibilityNotMet,
    EnrollmentBeforeEligibility,
    FutureTimestamp,
    IcfNotApproved,
    ImplausibleValue,
    InconsistentTimestamps,
    InvalidChoice,
    InvalidTransition,
    LostToFollowUpNotDue,
    MissingValue,
    NaiveTimestamp,
    NotAllowedAfterExit,
    ReasonRequired,
    ReconsentRequired,
    RescreenNotAllowed,
    ScreeningLabsTooOld,
    SiteNotActive,
    UnknownSite,
)
from sle_events.domain.lifecycle import Epoch, SubjectStatus
from sle_events.domain.payloads import CriterionAnswer, EligibilityChecklist
from sle_events.domain.subject import Subject

import subject_scenarios as sc
from subject_scenarios import (
    CONFIG,
    CONFIG_V2,
    STUDY,
    at,
    refused,
    sim_clock,  # noqa: F401 (a fixture)
    visit_day,
)

pytestmark = pytest.mark.usefixtures("sim_clock")


# --------------------------------------------------------------------------- T1 screening
def test_t1_screening_creates_a_screened_subject_with_a_stream_id_per_screening_number():
    s = sc.to_screened()
    assert s.status == SubjectStatus.SCREENED and s.epoch == Epoch.SCREENING
    assert s.id == Subject.id_for(STUDY, "SCR-001") != Subject.id_for(STUDY, "SCR-002")
    e: Any  # an @event-built class: mypy does not see its fields
    [e] = s.collect_events()
    assert type(e).__qualname__ == "Subject.Screened" and e.occurred_at == sc.SCREENED


def test_t1_screening_at_an_unknown_site_is_refused():
    with pytest.raises(UnknownSite, match="XX01"):
        Subject.screen(STUDY, "XX01", "SCR-001", sc.SCREENED, config=CONFIG)


def test_t1_screening_at_an_inactive_site_is_refused():
    with pytest.raises(SiteNotActive, match="NJ99"):
        Subject.screen(STUDY, "NJ99", "SCR-001", sc.SCREENED, config=CONFIG)


def test_t1_screening_needs_a_screening_number():
    with pytest.raises(MissingValue):
        Subject.screen(STUDY, "NJ01", "  ", sc.SCREENED, config=CONFIG)


def test_r9_occurred_at_more_than_5_minutes_ahead_is_refused(sim_clock):  # noqa: F811 - the fixture, imported above for pytest
    with pytest.raises(FutureTimestamp):
        Subject.screen(STUDY, "NJ01", "SCR-001", sim_clock() + timedelta(minutes=6), config=CONFIG)
    Subject.screen(STUDY, "NJ01", "SCR-001", sim_clock() + timedelta(minutes=5), config=CONFIG)


def test_r9_a_time_without_utc_offset_is_refused():
    with pytest.raises(NaiveTimestamp):
        Subject.screen(STUDY, "NJ01", "SCR-001", sc.SCREENED.replace(tzinfo=None), config=CONFIG)


def test_rescreening_links_both_streams_and_is_allowed_once():
    old = sc.to_consented()
    old.screen_fail(at("2025-02-05 09:00"), reason="UPCR 0.8 g/g at screening", failed_criteria=["I3"])
    new = Subject.screen(STUDY, "NJ01", "SCR-001R", at("2025-03-01 09:00"), config=CONFIG, rescreen_of=old)
    assert new.rescreen_of == old.id and old.rescreened_as == new.id
    assert type(old.pending_events[-1]).__qualname__ == "Subject.Rescreened"
    err = refused(
        old,
        RescreenNotAllowed,
        Subject.screen,
        STUDY,
        "NJ01",
        "SCR-001S",
        at("2025-03-02 09:00"),
        config=CONFIG,
        rescreen_of=old,
    )
    assert "already re-screened" in str(err)
    new.screen_fail(at("2025-03-02 09:00"), reason="declined")
    with pytest.raises(RescreenNotAllowed, match="1 time"):
        Subject.screen(STUDY, "NJ01", "SCR-001T", at("2025-03-05 09:00"), config=CONFIG, rescreen_of=new)


def test_rescreening_needs_a_screen_failure():
    with pytest.raises(RescreenNotAllowed, match="not SCREEN_FAILED"):
        Subject.screen(STUDY, "NJ01", "SCR-002", sc.SCREENED, config=CONFIG, rescreen_of=sc.to_consented())


# --------------------------------------------------------------------------- T2 consent, R1
def test_t2_consent_records_version_taker_and_signer():
    s = sc.to_consented()
    assert s.status == SubjectStatus.CONSENTED and s.consent_version == "ICF v1.0"
    e: Any = s.pending_events[-1]  # an @event-built class: mypy does not see its fields
    assert (e.icf_version, e.taken_by, e.signed_by.value, e.reconsent) == ("ICF v1.0", "dr.wang", "subject", False)


def test_t2_consent_on_an_unapproved_icf_version_is_refused():
    s = sc.to_screened()
    err = refused(s, IcfNotApproved, s.obtain_consent, "ICF v9", sc.CONSENTED, config=CONFIG, taken_by="dr.wang")
    assert err.current == "ICF v1.0"


def test_t2_consent_on_a_superseded_icf_version_is_refused():
    s = sc.to_screened()
    refused(
        s, IcfNotApproved, s.obtain_consent, "ICF v1.0", at("2025-07-01 09:00"), config=CONFIG_V2, taken_by="dr.wang"
    )


def test_t2_consent_without_an_icf_in_effect_is_refused():
    s = sc.to_screened()
    refused(
        s, IcfNotApproved, s.obtain_consent, "ICF v1.0", sc.CONSENTED, config=sc.StudyConfig.build(), taken_by="dr.wang"
    )


def test_t2_consent_needs_the_person_taking_it():
    s = sc.to_screened()
    refused(s, MissingValue, s.obtain_consent, "ICF v1.0", sc.CONSENTED, config=CONFIG, taken_by=" ")


def test_t2_consent_before_screening_is_refused():
    s = sc.to_screened()
    refused(
        s,
        InconsistentTimestamps,
        s.obtain_consent,
        "ICF v1.0",
        at("2025-02-01 09:00"),
        config=CONFIG,
        taken_by="dr.wang",
    )


def test_r1_no_study_procedure_before_consent():
    s = sc.to_screened()
    refused(s, ConsentRequired, s.record_lab_result, "CREAT", "0.9", "mg/dL", at("2025-02-03 09:30"), config=CONFIG)
    s.obtain_consent("ICF v1.0", sc.CONSENTED, config=CONFIG, taken_by="dr.wang")
    err = refused(s, ConsentRequired, s.record_vital_signs, at("2025-02-03 09:59"), config=CONFIG, weight_kg="52")
    assert err.consented_at == sc.CONSENTED


def test_r1_a_new_icf_version_requires_re_consent_before_the_next_procedure():
    s = sc.to_follow_up()
    after = visit_day(3)  # 2025-06-09: ICF v2.0 is in effect from 2025-06-01
    err = refused(s, ReconsentRequired, s.record_visit, "M3", after, config=CONFIG_V2)
    assert err.current_icf == "ICF v2.0"
    s.record_visit("M2", visit_day(2), config=CONFIG_V2)  # before v2.0 took effect: still fine
    s.record_vital_signs(after, config=CONFIG_V2, weight_kg="53")  # safety data stay allowed
    refused(s, AlreadyConsented, s.obtain_consent, "ICF v1.0", after, config=CONFIG, taken_by="dr.wang")
    s.obtain_consent("ICF v2.0", after, config=CONFIG_V2, taken_by="dr.wang")
    reconsented: Any = s.pending_events[-1]  # an @event-built class: mypy does not see its fields
    assert reconsented.reconsent is True and s.status == SubjectStatus.IN_FOLLOW_UP
    s.record_visit("M3", after + timedelta(hours=1), config=CONFIG_V2)


# --------------------------------------------------------------------------- T3 / T5 screen failure
def test_t3_screen_failure_before_consent_needs_a_reason():
    s = sc.to_screened()
    refused(s, ReasonRequired, s.screen_fail, at("2025-02-03 09:30"), reason="")
    s.screen_fail(at("2025-02-03 09:30"), reason="consent declined")
    assert s.status == SubjectStatus.SCREEN_FAILED


def test_t5_screen_failure_lists_valid_criteria():
    s = sc.to_consented()
    refused(s, InvalidChoice, s.screen_fail, at("2025-02-05 09:00"), reason="labs", failed_criteria=["I99"])
    s.screen_fail(at("2025-02-05 09:00"), reason="eGFR 25", failed_criteria=["E4"])
    assert s.failed_criteria == ("E4",)


def test_t5_consent_withdrawn_after_eligibility_is_a_screen_failure():
    s = sc.to_eligible()
    s.screen_fail(at("2025-02-10 15:00"), reason="consent withdrawn before enrollment")
    assert s.status == SubjectStatus.SCREEN_FAILED


def test_screen_failure_is_terminal_and_after_enrollment_is_refused():
    s = sc.to_enrolled()
    refused(s, InvalidTransition, s.screen_fail, at("2025-02-12 09:00"), reason="x")
    f = sc.to_consented()
    f.screen_fail(at("2025-02-05 09:00"), reason="declined")
    refused(
        f, InvalidTransition, f.obtain_consent, "ICF v1.0", at("2025-02-06 09:00"), config=CONFIG, taken_by="dr.wang"
    )
    refused(f, NotAllowedAfterExit, f.record_lab_result, "CREAT", "1", "mg/dL", at("2025-02-06 09:00"))


# --------------------------------------------------------------------------- T4 eligibility
def _checklist(**answers: bool) -> EligibilityChecklist:
    base = dict(sc.CHECKLIST.answers)
    base.update({k: CriterionAnswer(met=v) for k, v in answers.items()})
    return EligibilityChecklist(answers=base, screening_labs_collected_at=sc.SCREENING_LABS)


def test_t4_eligibility_confirmed_with_a_complete_passing_checklist():
    s = sc.to_eligible()
    assert s.status == SubjectStatus.ELIGIBLE and s.eligible_at == sc.ELIGIBLE


def test_t4_every_criterion_must_be_answered():
    s = sc.with_screening_data(sc.to_consented())
    answers = {k: v for k, v in sc.CHECKLIST.answers.items() if k not in ("I5", "E9")}
    err = refused(
        s,
        EligibilityIncomplete,
        s.confirm_eligibility,
        sc.ELIGIBLE,
        config=CONFIG,
        checklist=EligibilityChecklist(answers=answers, screening_labs_collected_at=sc.SCREENING_LABS),
    )
    assert err.missing == ("I5", "E9")


def test_t4_an_inclusion_not_met_or_an_exclusion_met_is_refused():
    s = sc.with_screening_data(sc.to_consented())
    err = refused(
        s, EligibilityNotMet, s.confirm_eligibility, sc.ELIGIBLE, config=CONFIG, checklist=_checklist(I3=False, E4=True)
    )
    assert err.failed == ("I3", "E4")


def test_t4_screening_labs_older_than_28_days_are_refused():
    s = sc.with_screening_data(sc.to_consented())
    refused(
        s,
        ScreeningLabsTooOld,
        s.confirm_eligibility,
        sc.SCREENING_LABS + timedelta(days=28, minutes=1),
        config=CONFIG,
        checklist=sc.CHECKLIST,
    )
    s.confirm_eligibility(sc.SCREENING_LABS + timedelta(days=28), config=CONFIG, checklist=sc.CHECKLIST)


def test_t4_screening_labs_from_before_consent_do_not_count():
    s = sc.with_screening_data(sc.to_consented())
    early = EligibilityChecklist(answers=sc.CHECKLIST.answers, screening_labs_collected_at=at("2025-02-01 09:00"))
    refused(s, ScreeningLabsTooOld, s.confirm_eligibility, sc.ELIGIBLE, config=CONFIG, checklist=early)


def test_t4_eligibility_needs_consent_first():
    s = sc.to_screened()
    refused(s, InvalidTransition, s.confirm_eligibility, sc.ELIGIBLE, config=CONFIG, checklist=sc.CHECKLIST)


def test_t4_answers_that_contradict_the_recorded_classification_biopsy_or_age_are_refused():
    s = sc.with_screening_data(sc.to_consented())
    s.record_classification("1:160", ["JOINT_INVOLVEMENT"], at("2025-02-04 09:00"), config=CONFIG)  # 6 points
    err = refused(
        s, ChecklistContradictsRecord, s.confirm_eligibility, sc.ELIGIBLE, config=CONFIG, checklist=sc.CHECKLIST
    )
    assert err.criterion == "I1"
    t = sc.with_screening_data(sc.to_consented(number="SCR-002"))
    t.record_biopsy(date(2023, 12, 1), "IV", at("2025-02-04 09:00"), config=CONFIG)  # > 12 months before screening
    assert (
        refused(
            t, ChecklistContradictsRecord, t.confirm_eligibility, sc.ELIGIBLE, config=CONFIG, checklist=sc.CHECKLIST
        ).criterion
        == "I2"
    )
    u = sc.to_consented(number="SCR-003")
    u.record_demographics("F", date(1955, 1, 1), at("2025-02-03 10:30"), config=CONFIG, childbearing_potential=False)
    assert (
        refused(
            u, ChecklistContradictsRecord, u.confirm_eligibility, sc.ELIGIBLE, config=CONFIG, checklist=sc.CHECKLIST
        ).criterion
        == "I6"
    )


def test_classification_2019_score_and_class_iii_iv_biopsy_support_eligibility():
    s = sc.with_screening_data(sc.to_consented())
    result = s.record_classification(
        "1:320",
        ["BIOPSY_CLASS_III_OR_IV", "ANTI_DSDNA_OR_ANTI_SM", "LOW_C3_OR_LOW_C4", "LOW_C3_AND_LOW_C4"],
        at("2025-02-04 09:00"),
        config=CONFIG,
    )
    assert (result.points, result.classified) == (20, True)  # 10 + 6 + max(3, 4)
    s.record_biopsy(date(2024, 12, 1), "IV+V", at("2025-02-04 09:00"), config=CONFIG)
    s.confirm_eligibility(sc.ELIGIBLE, config=CONFIG, checklist=sc.CHECKLIST)


def test_age_at_consent_outside_the_plausibility_bound_is_refused():
    s = sc.to_consented()
    refused(
        s,
        ImplausibleValue,
        s.record_demographics,
        "F",
        date(2020, 1, 1),
        at("2025-02-03 10:30"),
        config=CONFIG,
        childbearing_potential=False,
    )


# --------------------------------------------------------------------------- T6 enrollment, R2
def test_r2_enrollment_before_eligibility_is_refused():
    s = sc.with_screening_data(sc.to_consented())
    err = refused(s, EnrollmentBeforeEligibility, s.enroll, sc.ENROLLED)
    assert "investigator" in str(err)


def test_t6_enrollment_more_than_28_days_after_eligibility_is_refused():
    s = sc.to_eligible()
    refused(s, EligibilityExpired, s.enroll, sc.ELIGIBLE + timedelta(days=29))
    s.enroll(sc.ELIGIBLE + timedelta(days=28))
    assert s.status == SubjectStatus.ENROLLED and s.epoch == Epoch.TREATMENT


def test_t6_enrollment_before_the_eligibility_confirmation_is_refused():
    s = sc.to_eligible()
    refused(s, InconsistentTimestamps, s.enroll, sc.ELIGIBLE - timedelta(hours=1))


# --------------------------------------------------------------------------- T12 withdrawal, R8
def _withdraw(s: Subject, agreed: bool, when=None) -> None:
    s.withdraw(
        when or visit_day(4),
        reason_code="lack_of_efficacy",
        reason="no response by M4",
        decided_by="investigator",
        safety_follow_up_agreed=agreed,
    )


def test_t12_withdrawal_records_reason_decider_and_safety_follow_up():
    s = sc.to_follow_up()
    _withdraw(s, agreed=True)
    assert s.status == SubjectStatus.WITHDRAWN and s.safety_follow_up_agreed
    e: Any = s.pending_events[-1]  # an @event-built class: mypy does not see its fields
    assert (e.reason_code.value, e.decided_by.value) == ("lack_of_efficacy", "investigator")
    assert e.reason == "no response by M4"


def test_t12_withdrawal_needs_a_coded_reason_text_and_decider():
    s = sc.to_follow_up()
    kw = dict(reason_code="lack_of_efficacy", reason="x", decided_by="investigator", safety_follow_up_agreed=True)
    refused(s, InvalidChoice, s.withdraw, visit_day(4), **{**kw, "reason_code": "bored"})
    refused(s, InvalidChoice, s.withdraw, visit_day(4), **{**kw, "decided_by": "nurse"})
    refused(s, ReasonRequired, s.withdraw, visit_day(4), **{**kw, "reason": " "})
    refused(s, InvalidChoice, s.withdraw, visit_day(4), **{**kw, "safety_follow_up_agreed": "yes"})


def test_t12_withdrawal_before_enrollment_is_refused_it_is_a_screen_failure():
    s = sc.to_eligible()
    err = refused(
        s,
        InvalidTransition,
        s.withdraw,
        sc.ELIGIBLE,
        reason_code="withdrawal_by_subject",
        reason="x",
        decided_by="subject",
        safety_follow_up_agreed=False,
    )
    assert "screen failure" in str(err)


def test_r8_after_withdrawal_without_agreement_only_aes_corrections_and_death():
    s = sc.to_follow_up()
    lab = s.record_lab_result("CREAT", "0.8", "mg/dL", visit_day(3))
    _withdraw(s, agreed=False)
    later = visit_day(5)
    refused(s, NotAllowedAfterExit, s.record_lab_result, "CREAT", "0.8", "mg/dL", later)
    refused(s, NotAllowedAfterExit, s.record_vital_signs, later, weight_kg="50")
    refused(s, NotAllowedAfterExit, s.record_visit, "M5", later)
    refused(s, NotAllowedAfterExit, s.record_team_evaluation, later, disciplines=["bmt"], assessment="x")
    s.record_lab_result("C3", "70", "mg/dL", visit_day(3, hour=10))  # a late entry of a sample taken before: fine
    ae = s.report_adverse_event("herpes zoster", later.date(), later)
    s.assess_adverse_event(ae, later, grade=2, serious=False)
    s.correct(lab, {"value": "0.85"}, "transcription error", later)
    s.record_death(visit_day(6), "pneumonia")
    assert s.status == SubjectStatus.DIED


def test_r8_after_withdrawal_with_agreement_safety_data_are_allowed_but_not_procedures():
    s = sc.to_follow_up()
    _withdraw(s, agreed=True)
    later = visit_day(5)
    s.record_lab_result("NEUT", "2.1", "10*3/uL", later)
    s.record_vital_signs(later, weight_kg="50")
    s.record_unscheduled_visit(later, purpose="safety follow-up")
    s.record_visit("ET", visit_day(4, shift_days=10))
    refused(s, NotAllowedAfterExit, s.record_visit, "M5", later)
    refused(s, NotAllowedAfterExit, s.record_team_evaluation, later, disciplines=["bmt"], assessment="x")


# --------------------------------------------------------------------------- T13 / T14 lost to follow-up
def test_t13_lost_to_follow_up_needs_two_consecutive_missed_visits_and_three_contact_attempts():
    s = sc.to_follow_up()
    s.record_visit("M1", visit_day(1))
    s.record_missed_visit("M2", visit_day(2, 8), reason="no show")
    s.record_contact_attempt(visit_day(2, 9), method="phone", outcome="no answer")
    err = refused(s, LostToFollowUpNotDue, s.mark_lost_to_follow_up, visit_day(3, 9))
    assert (err.missed_in_a_row, err.attempts) == (1, 1)
    s.record_missed_visit("M3", visit_day(3, 8))
    s.record_contact_attempt(visit_day(3, 9), method="phone", outcome="no answer")
    refused(s, LostToFollowUpNotDue, s.mark_lost_to_follow_up, visit_day(3, 10))
    s.record_contact_attempt(visit_day(3, 10), method="letter", outcome="returned")
    s.mark_lost_to_follow_up(visit_day(3, 11))
    assert s.status == SubjectStatus.LOST_TO_FOLLOW_UP
    refused(s, NotAllowedAfterExit, s.record_visit, "M4", visit_day(4))
    s.record_contact_attempt(visit_day(4), method="phone", outcome="reached")  # still allowed while lost


def test_t14_return_from_lost_to_follow_up_needs_a_reason():
    s = sc.to_follow_up()
    s.record_missed_visit("M1", visit_day(1, 8))
    s.record_missed_visit("M2", visit_day(2, 8))
    for i in range(3):
        s.record_contact_attempt(visit_day(2, 9 + i), method="phone", outcome="no answer")
    s.mark_lost_to_follow_up(visit_day(2, 12))
    refused(s, ReasonRequired, s.record_return, visit_day(4), "")
    s.record_return(visit_day(4), "subject moved and called back")
    assert s.status == SubjectStatus.IN_FOLLOW_UP
    s.record_visit("M4", visit_day(4, hour=10))


def test_t14_return_only_from_lost_to_follow_up():
    s = sc.to_follow_up()
    refused(s, InvalidTransition, s.record_return, visit_day(4), "back")


# --------------------------------------------------------------------------- T15 death
def test_t15_death_opens_a_serious_grade_5_ae_when_none_is_open():
    s = sc.to_follow_up()
    opened = s.record_death(visit_day(5), "pneumonia")
    assert s.status == SubjectStatus.DIED and opened == "AE-001"
    ae = s.adverse_events[opened]
    assert (ae.grade, ae.serious, [c.value for c in ae.seriousness]) == (5, True, ["death"])
    assert [type(e).__qualname__ for e in s.pending_events[-3:]] == [
        "Subject.DeathRecorded",
        "Subject.AdverseEventReported",
        "Subject.AdverseEventAssessed",
    ]


def test_t15_death_with_an_open_sae_opens_no_new_one():
    s = sc.to_follow_up()
    ae = s.report_adverse_event("pneumonia", visit_day(4).date(), visit_day(4))
    s.assess_adverse_event(ae, visit_day(4, hour=12), grade=4, serious=True, seriousness=["life_threatening"])
    assert s.record_death(visit_day(5), "pneumonia") is None
    assert len(s.adverse_events) == 1


def test_t15_death_before_the_last_known_alive_date_is_refused():
    s = sc.to_follow_up()
    s.record_lab_result("CREAT", "0.8", "mg/dL", visit_day(5))
    err = refused(s, DeathBeforeLastKnownAlive, s.record_death, visit_day(4), "pneumonia")
    assert err.last_known_alive == visit_day(5)


def test_t15_death_needs_a_cause_and_a_post_consent_state():
    s = sc.to_follow_up()
    refused(s, MissingValue, s.record_death, visit_day(5), " ")
    t = sc.to_screened()
    refused(t, InvalidTransition, t.record_death, at("2025-02-04 09:00"), "accident")


def test_t15_death_after_withdrawal_or_lost_to_follow_up_is_allowed():
    s = sc.to_follow_up()
    _withdraw(s, agreed=False)
    s.record_death(visit_day(6), "renal failure")
    assert s.status == SubjectStatus.DIED
    refused(s, InvalidTransition, s.record_death, visit_day(7), "again")


# --------------------------------------------------------------------------- T11 completion and milestone
def test_m24_records_the_main_study_milestone_without_changing_the_state():
    s = sc.to_follow_up()
    s.record_visit("M24", visit_day(24))
    assert [type(e).__qualname__ for e in s.pending_events[-2:]] == [
        "Subject.VisitRecorded",
        "Subject.MainStudyCompleted",
    ]
    assert s.status == SubjectStatus.IN_FOLLOW_UP and s.epoch == Epoch.LONG_TERM_FOLLOW_UP


def test_a_missed_m24_also_ends_the_main_study():
    s = sc.to_follow_up()
    s.record_missed_visit("M24", visit_day(24, 10))
    assert s.main_study_completed_at == visit_day(24, 10)


def test_t11_completion_needs_the_last_scheduled_visit_done_or_missed(sim_clock):  # noqa: F811 - the fixture, imported above for pytest
    s = sc.to_follow_up()
    refused(s, CompletionNotDue, s.complete_study, visit_day(30))
    s.record_missed_visit("M48", visit_day(48, 31))
    s.complete_study(visit_day(48, 32))
    assert s.status == SubjectStatus.COMPLETED
    refused(s, NotAllowedAfterExit, s.record_lab_result, "C3", "80", "mg/dL", visit_day(48, 33))
