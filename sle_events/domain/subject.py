"""A trial subject from screening on. (Issue 4 grows this into the full protocol.)"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

from eventsourcing.domain import Aggregate, event


class ProtocolError(ValueError):
    """The protocol forbids this: nothing is recorded."""


class Subject(Aggregate):
    @event("Screened")
    def __init__(self, study_id: UUID, site: str, screening_number: str, occurred_at: datetime) -> None:
        self.study_id = study_id
        self.site = site
        self.screening_number = screening_number
        self.status = "SCREENED"
        self.consent_version: str | None = None
        self.labs: list[dict[str, Any]] = []

    def obtain_consent(self, icf_version: str, occurred_at: datetime) -> None:
        if self.status != "SCREENED":
            raise ProtocolError(f"consent is taken from a SCREENED subject, not {self.status}")
        self._consent_obtained(icf_version=icf_version, occurred_at=occurred_at)

    def confirm_eligibility(self, occurred_at: datetime) -> None:
        if self.status != "CONSENTED":
            raise ProtocolError(f"eligibility is confirmed for a CONSENTED subject, not {self.status}")
        self._eligibility_confirmed(occurred_at=occurred_at)

    def enroll(self, occurred_at: datetime) -> None:
        if self.status != "ELIGIBLE":
            raise ProtocolError("no enrollment before eligibility is confirmed by an investigator")
        self._enrolled(occurred_at=occurred_at)

    def record_lab_result(self, code: str, value: Decimal, unit: str, occurred_at: datetime) -> None:
        if self.consent_version is None:
            raise ProtocolError("no study procedure before consent")
        self._lab_result_recorded(code=code, value=value, unit=unit, occurred_at=occurred_at)

    @event("ConsentObtained")
    def _consent_obtained(self, icf_version: str, occurred_at: datetime) -> None:
        self.consent_version = icf_version
        self.status = "CONSENTED"

    @event("EligibilityConfirmed")
    def _eligibility_confirmed(self, occurred_at: datetime) -> None:
        self.status = "ELIGIBLE"

    @event("Enrolled")
    def _enrolled(self, occurred_at: datetime) -> None:
        self.status = "ENROLLED"

    @event("LabResultRecorded")
    def _lab_result_recorded(self, code: str, value: Decimal, unit: str, occurred_at: datetime) -> None:
        self.labs.append({"code": code, "value": value, "unit": unit, "occurred_at": occurred_at})
