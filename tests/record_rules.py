"""An independent reading of a stored subject stream: does any stored event break a protocol rule?

Used by the storage property test and the demo test. It re-implements the rules from the envelopes alone (not
through the domain), so a bug in the domain's checks shows up as a stored event this reading rejects.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sle_events.domain.roles import DEFAULT_PERMISSIONS


def _time(p: dict[str, Any], key: str) -> datetime:
    return datetime.fromisoformat(p[key]) if isinstance(p.get(key), str) else p[key]


ALWAYS_AFTER_EXIT = {
    "AdverseEventReported",
    "AdverseEventAssessed",
    "ExpectednessAssessed",
    "SeriousAdverseEventReported",
    "AdverseEventFollowedUp",
    "DeathRecorded",
    "Returned",
    "Corrected",
    "Voided",
    "DerivedResultRecorded",
    "ContactAttempted",
}
SAFETY_AFTER_WITHDRAWAL = {
    "LabResultRecorded",
    "VitalSignsRecorded",
    "ConcomitantMedicationRecorded",
    "PregnancyTestRecorded",
    "UnscheduledVisitRecorded",
    "TregPanelRecorded",
    "SledaiAssessed",
    "RenalResponseAssessed",
    "Discharged",
    "VisitRecorded",
}
NO_CONSENT_NEEDED = {
    "Screened",
    "ConsentObtained",
    "ScreenFailed",
    "Rescreened",
    "DeviationRecorded",
    "Corrected",
    "Voided",
}


def check_stream(sealed: list[Any]) -> None:
    """An independent reading of one subject stream: no stored event breaks R1–R8, R10, R11."""
    consent = elig = enrolled = stay = cyc = msc = msc_stop = exit_at = None
    exit_kind, safety = None, False
    cyc_version = msc_version = None
    for e in sealed:
        env, name = e.envelope, e.topic.split(".", 1)[1]
        p, at_ = env["payload"], datetime.fromisoformat(env["occurred_at"])
        assert env["role"] in DEFAULT_PERMISSIONS[f"Subject.{name}"], (name, env["role"])
        if name not in NO_CONSENT_NEEDED:
            assert consent is not None and at_ >= consent, f"R1: {name} at {at_} before consent {consent}"
        if exit_at is not None and at_ >= exit_at and name not in ALWAYS_AFTER_EXIT:
            allowed = exit_kind == "Withdrawn" and safety and name in SAFETY_AFTER_WITHDRAWAL
            assert allowed, f"R8: {name} after {exit_kind}"
        if name == "ConsentObtained":
            consent = consent or at_
        elif name == "EligibilityConfirmed":
            elig = at_
        elif name == "Enrolled":
            assert elig is not None and timedelta(0) <= at_ - elig <= timedelta(days=28), "R2/T6"
            enrolled = at_
        elif name == "Admitted":
            assert enrolled is not None and stay is None
            stay = at_
        elif name == "Discharged":
            assert stay is not None
            if msc is not None and msc >= stay:
                assert msc_stop is not None and at_ >= msc_stop, "R6"
            stay = None
        elif name == "CyclophosphamideGiven":
            assert cyc is None, "R4: one CYC per subject"
            assert stay is not None and stay <= at_ and enrolled is not None and stay >= enrolled, "R3"
            cyc, cyc_version = at_, env["version"]
        elif name == "MSCInfused":
            assert cyc is not None and msc is None
            msc, msc_stop, msc_version = at_, _time(p, "stopped_at"), env["version"]
            assert timedelta(hours=18) <= msc - cyc <= timedelta(hours=36), "R4 window"
        elif name == "VisitRecorded" and p["visit"].startswith("M"):
            assert msc is not None and at_.date() >= msc.date(), "R7"
        elif name in ("Withdrawn", "LostToFollowUp", "DeathRecorded"):
            exit_at = at_ if exit_at is None else min(exit_at, at_)
            exit_kind = name if name != "DeathRecorded" else "DeathRecorded"
            safety = bool(p.get("safety_follow_up_agreed")) if name == "Withdrawn" else False
        elif name == "Returned":
            exit_at, exit_kind = None, None
        elif name in ("Corrected", "Voided"):
            assert env["reason"] and env["reason"].strip(), "R11: a reason"
            if name == "Corrected" and "occurred_at" in p["new_values"]:
                new = datetime.fromisoformat(p["new_values"]["occurred_at"])
                if p["corrected_version"] == cyc_version:
                    cyc = new
                elif p["corrected_version"] == msc_version:
                    msc = new
                if cyc is not None and msc is not None:
                    assert timedelta(hours=18) <= msc - cyc <= timedelta(hours=36), "R4 window after a correction"
