"""Corrections and voids (R11): which facts can be changed, and how a correction is merged.

A ``Corrected`` event names the corrected event's stream version, carries only the values that change
(JSON-safe: decimals as strings, times with their offset) and a mandatory reason; a ``Voided`` event names the
voided version and a reason. The original event always stays. The subject re-runs the original verb's checks
on the corrected values, so a correction that would break a rule is refused like the original would be.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sle_events.domain.errors import InvalidCorrection, ReasonRequired
from sle_events.domain.payloads import Record

__all__ = ["Correctable", "CORRECTABLE", "VOIDABLE", "require_reason", "merged_inputs", "changed_values", "apply"]


@dataclass(frozen=True)
class Correctable:
    #: the check's inputs, read from the current record
    inputs: tuple[str, ...]
    #: the inputs a correction may change
    editable: frozenset[str]


def _c(inputs: str, editable: str | None = None) -> Correctable:
    names = tuple(inputs.split())
    return Correctable(names, frozenset((editable or inputs).split()))


#: event name → what a correction may change (every other event type is not correctable)
CORRECTABLE: Mapping[str, Correctable] = {
    "LabResultRecorded": _c(
        "code value unit occurred_at reported_at lab_low lab_high specimen_id",
        "value unit occurred_at reported_at lab_low lab_high specimen_id",
    ),
    "VitalSignsRecorded": _c(
        "occurred_at height_cm weight_kg temperature_c systolic_bp diastolic_bp heart_rate timepoint"
    ),
    "DemographicsRecorded": _c(
        "occurred_at sex birth_date childbearing_potential", "sex birth_date childbearing_potential"
    ),
    "MedicalHistoryRecorded": _c("occurred_at term start_date ongoing category", "term start_date ongoing category"),
    "ConcomitantMedicationRecorded": _c(
        "occurred_at name dose dose_unit route frequency start_date end_date indication"
    ),
    "AdverseEventReported": _c(
        "ae_id occurred_at term onset grade_proposal description linked_to",
        "term onset grade_proposal description linked_to",
    ),
    "SledaiAssessed": _c("occurred_at descriptors visit"),
    "TregPanelRecorded": _c("occurred_at treg_pct cd4_per_ul reported_at"),
    "PregnancyTestRecorded": _c("occurred_at result specimen"),
    "VisitRecorded": _c("visit occurred_at", "occurred_at"),
    "CyclophosphamideGiven": _c("occurred_at stopped_at prescribed_mg_per_m2 administered_mg route lot"),
    "MSCInfused": _c("occurred_at stopped_at volume_ml premedication"),
}

#: event names that may be voided (entered in error, duplicate, wrong subject...)
VOIDABLE = frozenset(
    {
        "LabResultRecorded",
        "DerivedResultRecorded",
        "VitalSignsRecorded",
        "MedicalHistoryRecorded",
        "ConcomitantMedicationRecorded",
        "AdverseEventReported",
        "SledaiAssessed",
        "TregPanelRecorded",
        "PregnancyTestRecorded",
        "UnscheduledVisitRecorded",
        "ContactAttempted",
    }
)


def require_reason(reason: Any, action: str) -> str:
    if not isinstance(reason, str) or not reason.strip():
        raise ReasonRequired(action)
    return reason.strip()


def merged_inputs(record: Record, spec: Correctable, new_values: Mapping[str, Any]) -> dict[str, Any]:
    """The check's inputs: the record's current values, overridden by ``new_values``."""
    if not new_values:
        raise InvalidCorrection("no new values given")
    unknown = sorted(set(new_values) - spec.editable)
    if unknown:
        raise InvalidCorrection(
            f"{', '.join(unknown)} cannot be corrected here; correctable: {', '.join(sorted(spec.editable))}"
        )
    inputs = {name: getattr(record, name) for name in spec.inputs}
    inputs.update(new_values)
    return inputs


def changed_values(old: Record, new: Record) -> dict[str, Any]:
    """The JSON-safe values of ``new`` that differ from ``old``; refuses a correction that changes nothing."""
    a, b = old.model_dump(mode="json"), new.model_dump(mode="json")
    changed = {k: v for k, v in b.items() if a.get(k) != v}
    if not changed:
        raise InvalidCorrection("the new values change nothing")
    return changed


def apply(old: Record, new_values: Mapping[str, Any]) -> Record:
    """The record after a stored correction (deterministic on replay)."""
    return type(old).model_validate({**old.model_dump(mode="json"), **new_values})
