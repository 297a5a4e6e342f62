"""Exceptions raised by the pure rule layer (``sle_events.domain``).

Every refusal is a :class:`ProtocolViolation` (a ``ValueError``), so callers that only care
whether input was refused can catch one class. Each subclass carries the offending facts as
attributes (``field``, ``value``, ``bound``/``unit`` ...) and a machine-readable ``code`` so an
API layer can map it without parsing the message. Messages always name the field, the value
and the bound or unit involved.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from decimal import Decimal
from typing import Any, ClassVar

from sle_events.picklable import Picklable


def _fmt(value: Any) -> str:
    """Render a value for a message: Decimals in plain notation (no exponent), as given."""
    if isinstance(value, Decimal):
        if value.is_finite():
            text = format(value, "f")
            return "0" if text in ("-0", "+0") else text
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


class ProtocolViolation(Picklable, ValueError):
    """Base class: the input breaks a rule of the protocol or of the data conventions."""

    code: ClassVar[str] = "protocol_violation"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = details

    def __str__(self) -> str:  # pragma: no cover - trivial
        return self.message

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly description (Decimals and datetimes rendered as strings)."""
        return {
            "code": self.code,
            "message": self.message,
            "details": {
                k: (None if v is None else _fmt(v) if not isinstance(v, (list, tuple)) else [_fmt(x) for x in v])
                for k, v in self.details.items()
            },
        }


# --------------------------------------------------------------------------- quantities
class InvalidQuantity(ProtocolViolation):
    """A quantity is not a usable decimal (garbage text, NaN, infinity, bool, too many digits...)."""

    code = "invalid_quantity"

    def __init__(self, field: str, value: Any, reason: str) -> None:
        self.field = field
        self.value = value
        self.reason = reason
        super().__init__(
            f"{field}: {value!r} is not a valid quantity: {reason}", field=field, value=repr(value), reason=reason
        )


class FloatNotAllowed(InvalidQuantity):
    """A binary float was passed where a decimal string is required."""

    code = "float_not_allowed"

    def __init__(self, field: str, value: Any) -> None:
        self.field = field
        self.value = value
        self.reason = "binary floats are not allowed"
        ProtocolViolation.__init__(
            self,
            f"{field}: float {value!r} is not allowed; quantities travel as decimal strings "
            f"(e.g. '{value!r}' as a string), never as binary floats",
            field=field,
            value=repr(value),
            reason=self.reason,
        )


# --------------------------------------------------------------------------- bounds
class ImplausibleValue(ProtocolViolation):
    """A value lies outside its hard plausibility bound (PROTOCOL.md §9).

    ``value`` is expressed in the bound's ``unit``. When the value was reported in another unit,
    ``reported_value``/``reported_unit`` keep what was sent.
    """

    code = "implausible_value"

    def __init__(
        self,
        field: str,
        value: Decimal,
        bound: tuple[Decimal | None, Decimal | None],
        unit: str,
        *,
        label: str | None = None,
        reported_value: Decimal | None = None,
        reported_unit: str | None = None,
    ) -> None:
        self.field = field
        self.value = value
        self.bound = bound
        self.low, self.high = bound
        self.unit = unit
        self.label = label or field
        self.reported_value = reported_value
        self.reported_unit = reported_unit
        u = f" {unit}" if unit else ""
        if self.low is not None and self.high is not None:
            rng = f"{_fmt(self.low)}–{_fmt(self.high)}{u}"
        elif self.low is not None:
            rng = f"≥ {_fmt(self.low)}{u}"
        else:
            rng = f"≤ {_fmt(self.high)}{u}"
        if reported_unit is not None and reported_unit != unit:
            shown = f"{_fmt(reported_value)} {reported_unit} (= {_fmt(value)}{u})"
        else:
            shown = f"{_fmt(value)}{u}"
        where = "" if self.label == field else f" [field {field}]"
        super().__init__(
            f"{self.label} {shown} is outside the plausible range {rng}{where}",
            field=field,
            value=value,
            low=self.low,
            high=self.high,
            unit=unit,
            reported_value=reported_value,
            reported_unit=reported_unit,
        )


class UnknownField(ProtocolViolation):
    """No plausibility bound (or setting) exists under that field name."""

    code = "unknown_field"

    def __init__(self, field: str, known: Iterable[str] = ()) -> None:
        self.field = field
        known = sorted(known)
        hint = f"; known fields: {', '.join(known)}" if known else ""
        super().__init__(f"no plausibility bound is defined for field {field!r}{hint}", field=field)


# --------------------------------------------------------------------------- labs
class UnknownAnalyte(ProtocolViolation):
    """The analyte code is not in labs.csv."""

    code = "unknown_analyte"

    def __init__(self, analyte: str, known: Iterable[str] = ()) -> None:
        self.analyte = analyte
        known = sorted(known)
        hint = f"; known codes: {', '.join(known)}" if known else ""
        super().__init__(f"unknown analyte code {analyte!r} (not in labs.csv){hint}", analyte=analyte)


class IncompatibleUnit(ProtocolViolation):
    """The unit cannot be converted to (or from) the analyte's canonical unit."""

    code = "incompatible_unit"

    def __init__(self, analyte: str, unit: str, canonical_unit: str, accepted: Iterable[str] = ()) -> None:
        self.analyte = analyte
        self.unit = unit
        self.canonical_unit = canonical_unit
        self.accepted = tuple(accepted)
        hint = f"; accepted units: {', '.join(self.accepted)}" if self.accepted else ""
        super().__init__(
            f"{analyte}: unit {unit!r} cannot be converted to the canonical unit {canonical_unit!r}{hint}",
            analyte=analyte,
            unit=unit,
            canonical_unit=canonical_unit,
            accepted=list(self.accepted),
        )


class UnknownDescriptor(ProtocolViolation):
    """The SLEDAI-2K descriptor code is not in sledai2k.csv."""

    code = "unknown_descriptor"

    def __init__(self, descriptor: str) -> None:
        self.descriptor = descriptor
        super().__init__(
            f"unknown SLEDAI-2K descriptor code {descriptor!r} (expected SLED2K01…SLED2K24 from sledai2k.csv)",
            descriptor=descriptor,
        )


# --------------------------------------------------------------------------- formulas
class NotComputable(ProtocolViolation):
    """A formula cannot be applied to these inputs (e.g. eGFR with sex other than F/M).

    The caller records "not computed" with ``reason`` rather than storing a value.
    """

    code = "not_computable"

    def __init__(self, formula: str, reason: str, **details: Any) -> None:
        self.formula = formula
        self.reason = reason
        super().__init__(f"{formula} not computed: {reason}", formula=formula, reason=reason, **details)


# --------------------------------------------------------------------------- time
class NaiveTimestamp(ProtocolViolation):
    """A timestamp lacks its UTC offset (PROTOCOL §10, R9: every timestamp carries one)."""

    code = "naive_timestamp"

    def __init__(self, field: str, value: datetime) -> None:
        self.field = field
        self.value = value
        super().__init__(
            f"{field} {value.isoformat()} has no UTC offset; every timestamp must carry one",
            field=field,
            value=value,
        )


class FutureTimestamp(ProtocolViolation):
    """``occurred_at`` lies further in the future than the allowed clock skew (R9)."""

    code = "future_timestamp"

    def __init__(self, field: str, value: datetime, now: datetime, skew_seconds: int) -> None:
        self.field = field
        self.value = value
        self.now = now
        self.skew_seconds = skew_seconds
        ahead = value - now
        super().__init__(
            f"{field} {value.isoformat()} is {ahead} ahead of now ({now.isoformat()}); "
            f"at most {skew_seconds} s in the future is allowed",
            field=field,
            value=value,
            now=now,
            skew_seconds=skew_seconds,
        )


class InconsistentTimestamps(ProtocolViolation):
    """Two timestamps/dates are in an impossible order (e.g. discharge before admission)."""

    code = "inconsistent_timestamps"

    def __init__(self, earlier_field: str, earlier: Any, later_field: str, later: Any) -> None:
        self.earlier_field = earlier_field
        self.earlier = earlier
        self.later_field = later_field
        self.later = later
        super().__init__(
            f"{later_field} {_fmt(later)} is before {earlier_field} {_fmt(earlier)}",
            earlier_field=earlier_field,
            earlier=earlier,
            later_field=later_field,
            later=later,
        )


class OutsideWindow(ProtocolViolation):
    """A timed interval lies outside its hard window (e.g. CYC→MSC 18–36 h, R4)."""

    code = "outside_window"

    def __init__(self, field: str, value: Decimal, low: Decimal, high: Decimal, unit: str) -> None:
        self.field = field
        self.value = value
        self.bound = (low, high)
        self.low, self.high = low, high
        self.unit = unit
        super().__init__(
            f"{field} {_fmt(value)} {unit} is outside the allowed window {_fmt(low)}–{_fmt(high)} {unit}",
            field=field,
            value=value,
            low=low,
            high=high,
            unit=unit,
        )


class UnknownVisit(ProtocolViolation):
    """The visit code is not a scheduled follow-up visit of the configured schedule."""

    code = "unknown_visit"

    def __init__(self, visit: str, scheduled: Iterable[str] = ()) -> None:
        self.visit = visit
        scheduled = list(scheduled)
        hint = f"; scheduled: {', '.join(scheduled)}" if scheduled else ""
        super().__init__(f"{visit!r} is not a scheduled follow-up visit{hint}", visit=visit)


# =========================================================================== the trial's verbs
# Refusals raised by the aggregates (sle_events.domain.subject, .product, .study) before any event
# exists: the state machine (PROTOCOL §3), the ordering rules R1–R11 and the record-keeping rules.
def _listed(items: Iterable[Any]) -> str:
    items = [str(i) for i in items]
    return ", ".join(items) if items else "none"


class InvalidTransition(ProtocolViolation):
    """The subject's state does not allow this action (PROTOCOL §3)."""

    code = "invalid_transition"

    def __init__(self, action: str, status: str, allowed: Iterable[str], hint: str = "") -> None:
        self.action = action
        self.status = str(status)
        self.allowed = tuple(str(a) for a in allowed)
        tail = f"; {hint}" if hint else ""
        super().__init__(
            f"{action} is not allowed for a subject in state {self.status} "
            f"(allowed from: {_listed(self.allowed)}){tail}",
            action=action,
            status=self.status,
            allowed=list(self.allowed),
        )


class EnrollmentBeforeEligibility(InvalidTransition):
    """R2: enrollment needs an investigator's eligibility confirmation first."""

    code = "enrollment_before_eligibility"

    def __init__(self, status: str) -> None:
        super().__init__(
            "enrollment", status, ["ELIGIBLE"], "no enrollment before eligibility is confirmed by an investigator (R2)"
        )


class NotAllowedAfterExit(ProtocolViolation):
    """R8: after WITHDRAWN / LOST_TO_FOLLOW_UP / DIED only AEs, SAE follow-up, death, a return,
    corrections and (when agreed) safety follow-up data may be recorded."""

    code = "not_allowed_after_exit"

    def __init__(self, action: str, status: str, exited_at: datetime, detail: str = "") -> None:
        self.action = action
        self.status = str(status)
        self.exited_at = exited_at
        tail = f" ({detail})" if detail else ""
        super().__init__(
            f"{action} on or after {exited_at.isoformat()} is not allowed: the subject is {self.status}{tail} (R8)",
            action=action,
            status=self.status,
            exited_at=exited_at,
        )


class ConsentRequired(ProtocolViolation):
    """R1: no study procedure or measurement before informed consent."""

    code = "consent_required"

    def __init__(self, action: str, occurred_at: datetime, consented_at: datetime | None) -> None:
        self.action = action
        self.occurred_at = occurred_at
        self.consented_at = consented_at
        when = (
            "the subject has not consented"
            if consented_at is None
            else f"consent was obtained at {consented_at.isoformat()}"
        )
        super().__init__(
            f"{action} at {occurred_at.isoformat()} is before informed consent: {when} (R1)",
            action=action,
            occurred_at=occurred_at,
            consented_at=consented_at,
        )


class ReconsentRequired(ProtocolViolation):
    """R1: a new ICF version took effect; the subject must re-consent before the next procedure."""

    code = "reconsent_required"

    def __init__(self, action: str, occurred_at: datetime, current_icf: str, consented: Iterable[str]) -> None:
        self.action = action
        self.occurred_at = occurred_at
        self.current_icf = current_icf
        self.consented = tuple(consented)
        super().__init__(
            f"{action} at {occurred_at.isoformat()}: ICF {current_icf} is in effect and the subject "
            f"has consented only to {_listed(self.consented)}; re-consent first (R1)",
            action=action,
            occurred_at=occurred_at,
            current_icf=current_icf,
            consented=list(self.consented),
        )


class IcfNotApproved(ProtocolViolation):
    """T2: the ICF version is not approved, or not the current one at the consent date."""

    code = "icf_not_approved"

    def __init__(self, icf_version: str, occurred_at: datetime, current: str | None) -> None:
        self.icf_version = icf_version
        self.occurred_at = occurred_at
        self.current = current
        now = f"the current version is {current}" if current else "no ICF version is in effect"
        super().__init__(
            f"ICF {icf_version!r} is not the approved, current version at {occurred_at.isoformat()}: {now} (T2)",
            icf_version=icf_version,
            occurred_at=occurred_at,
            current=current,
        )


class AlreadyConsented(ProtocolViolation):
    """The subject already consented to this ICF version."""

    code = "already_consented"

    def __init__(self, icf_version: str) -> None:
        self.icf_version = icf_version
        super().__init__(f"the subject already consented to ICF {icf_version!r}", icf_version=icf_version)


class UnknownSite(ProtocolViolation):
    code = "unknown_site"

    def __init__(self, site: str, known: Iterable[str] = ()) -> None:
        self.site = site
        super().__init__(f"site {site!r} is not a site of this study (sites: {_listed(sorted(known))})", site=site)


class SiteNotActive(ProtocolViolation):
    """T1: screening needs an active site."""

    code = "site_not_active"

    def __init__(self, site: str) -> None:
        self.site = site
        super().__init__(f"site {site!r} is not active; it cannot screen subjects (T1)", site=site)


class DuplicateScreeningNumber(ProtocolViolation):
    """T1: the screening number is already used in this study."""

    code = "duplicate_screening_number"

    def __init__(self, screening_number: str) -> None:
        self.screening_number = screening_number
        super().__init__(
            f"screening number {screening_number!r} is already taken in this study (T1)",
            screening_number=screening_number,
        )


class RescreenNotAllowed(ProtocolViolation):
    """§3: a screen failure may be re-screened once, as a new stream linked to the old one."""

    code = "rescreen_not_allowed"

    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(f"re-screening refused: {detail}", detail=detail)


class ReasonRequired(ProtocolViolation):
    """A reason is mandatory (screen failure, withdrawal, return, correction, void...)."""

    code = "reason_required"

    def __init__(self, action: str) -> None:
        self.action = action
        super().__init__(f"{action} needs a non-empty reason", action=action)


class MissingValue(ProtocolViolation):
    """A value the protocol requires was not given."""

    code = "missing_value"

    def __init__(self, field: str, action: str) -> None:
        self.field = field
        self.action = action
        super().__init__(f"{action} needs {field}", field=field, action=action)


class InvalidChoice(ProtocolViolation):
    """A coded value is not in its code list."""

    code = "invalid_choice"

    def __init__(self, field: str, value: Any, allowed: Iterable[Any]) -> None:
        self.field = field
        self.value = value
        self.allowed = tuple(str(a) for a in allowed)
        super().__init__(
            f"{field} {value!r} is not one of {_listed(self.allowed)}",
            field=field,
            value=repr(value),
            allowed=list(self.allowed),
        )


# --------------------------------------------------------------------------- eligibility (§4, T4–T6)
class EligibilityIncomplete(ProtocolViolation):
    """T4: every inclusion and exclusion criterion must be answered."""

    code = "eligibility_incomplete"

    def __init__(self, missing: Iterable[str]) -> None:
        self.missing = tuple(missing)
        super().__init__(
            f"eligibility checklist is incomplete: no answer for {_listed(self.missing)} (T4)",
            missing=list(self.missing),
        )


class EligibilityNotMet(ProtocolViolation):
    """T4: an inclusion criterion is not met or an exclusion criterion applies."""

    code = "eligibility_not_met"

    def __init__(self, failed: Iterable[str]) -> None:
        self.failed = tuple(failed)
        super().__init__(
            f"eligibility cannot be confirmed: criteria failed {_listed(self.failed)}; record a screen "
            f"failure listing them instead (T4/T5)",
            failed=list(self.failed),
        )


class ChecklistContradictsRecord(ProtocolViolation):
    """An eligibility answer contradicts data already recorded for the subject."""

    code = "checklist_contradicts_record"

    def __init__(self, criterion: str, detail: str) -> None:
        self.criterion = criterion
        self.detail = detail
        super().__init__(
            f"eligibility criterion {criterion} answered as met, but {detail}", criterion=criterion, detail=detail
        )


class ScreeningLabsTooOld(ProtocolViolation):
    """T4: screening labs must be at most 28 days old at the confirmation (and after consent)."""

    code = "screening_labs_too_old"

    def __init__(self, collected_at: datetime, confirmed_at: datetime, max_days: int) -> None:
        self.collected_at = collected_at
        self.confirmed_at = confirmed_at
        self.max_days = max_days
        super().__init__(
            f"screening labs collected {collected_at.isoformat()} are not within {max_days} d before "
            f"the eligibility confirmation at {confirmed_at.isoformat()} (T4)",
            collected_at=collected_at,
            confirmed_at=confirmed_at,
            max_days=max_days,
        )


class EligibilityExpired(ProtocolViolation):
    """T6: enrollment within 28 days of the eligibility confirmation."""

    code = "eligibility_expired"

    def __init__(self, confirmed_at: datetime, enrolled_at: datetime, max_days: int) -> None:
        self.confirmed_at = confirmed_at
        self.enrolled_at = enrolled_at
        self.max_days = max_days
        super().__init__(
            f"eligibility confirmed {confirmed_at.isoformat()} is more than {max_days} d before "
            f"enrollment at {enrolled_at.isoformat()}; re-confirm eligibility (T6)",
            confirmed_at=confirmed_at,
            enrolled_at=enrolled_at,
            max_days=max_days,
        )


# --------------------------------------------------------------------------- treatment (§5, R3–R6)
class NotAdmitted(ProtocolViolation):
    """R3/R6: the action needs an open in-patient stay (that began after enrollment)."""

    code = "not_admitted"

    def __init__(self, action: str, detail: str) -> None:
        self.action = action
        self.detail = detail
        super().__init__(f"{action}: {detail}", action=action, detail=detail)


class AlreadyAdmitted(ProtocolViolation):
    code = "already_admitted"

    def __init__(self, admitted_at: datetime) -> None:
        self.admitted_at = admitted_at
        super().__init__(f"the subject is already admitted (since {admitted_at.isoformat()})", admitted_at=admitted_at)


class MeasurementMissing(ProtocolViolation):
    """T7: e.g. height and weight must be measured at this admission before CYC."""

    code = "measurement_missing"

    def __init__(self, measurement: str, action: str, where: str) -> None:
        self.measurement = measurement
        self.action = action
        super().__init__(
            f"{action} needs {measurement} measured {where}", measurement=measurement, action=action, where=where
        )


class PregnancyTestRequired(ProtocolViolation):
    """T7: a negative pregnancy test ≤ 72 h before CYC for a woman of child-bearing potential."""

    code = "pregnancy_test_required"

    def __init__(self, cyc_start: datetime, max_hours: int | Decimal) -> None:
        self.cyc_start = cyc_start
        self.max_hours = max_hours
        super().__init__(
            f"cyclophosphamide at {cyc_start.isoformat()} needs a negative pregnancy test within "
            f"{max_hours} h before it (subject of child-bearing potential, T7)",
            cyc_start=cyc_start,
            max_hours=max_hours,
        )


class DuplicatePretreatment(ProtocolViolation):
    """R4: one CYC pretreatment per subject."""

    code = "duplicate_pretreatment"

    def __init__(self, first_at: datetime) -> None:
        self.first_at = first_at
        super().__init__(
            f"cyclophosphamide was already given at {first_at.isoformat()}; one pretreatment per subject (R4)",
            first_at=first_at,
        )


class LotNotReleased(ProtocolViolation):
    """R5: the MSC lot fails release and no deviation naming it was recorded first."""

    code = "lot_not_released"

    def __init__(self, lot_id: str, failures: Iterable[str]) -> None:
        self.lot_id = lot_id
        self.failures = tuple(failures)
        super().__init__(
            f"MSC lot {lot_id!r} fails release ({'; '.join(self.failures)}) and no deviation naming "
            f"this lot was recorded first (R5)",
            lot_id=lot_id,
            failures=list(self.failures),
        )


class LotUnavailable(ProtocolViolation):
    """The lot is unknown, meant for another subject, already infused, or already recorded."""

    code = "lot_unavailable"

    def __init__(self, lot_id: str, detail: str) -> None:
        self.lot_id = lot_id
        self.detail = detail
        super().__init__(f"MSC lot {lot_id!r}: {detail}", lot_id=lot_id, detail=detail)


class DischargeBeforeInfusionEnd(ProtocolViolation):
    """R6/T9: discharge before the MSC infusion ends is refused unless T10 applies."""

    code = "discharge_before_infusion_end"

    def __init__(self, discharge_at: datetime, detail: str) -> None:
        self.discharge_at = discharge_at
        super().__init__(
            f"discharge at {discharge_at.isoformat()} refused: {detail} (R6)", discharge_at=discharge_at, detail=detail
        )


# --------------------------------------------------------------------------- visits and disposition
class VisitBeforeTransplant(ProtocolViolation):
    """R7: follow-up visits (M1 onward, ET) exist only after TX (day 0)."""

    code = "visit_before_transplant"

    def __init__(self, visit: str, detail: str) -> None:
        self.visit = visit
        super().__init__(
            f"visit {visit}: {detail}; follow-up visits exist only after TX (R7)", visit=visit, detail=detail
        )


class VisitAlreadyRecorded(ProtocolViolation):
    code = "visit_already_recorded"

    def __init__(self, visit: str, how: str) -> None:
        self.visit = visit
        super().__init__(
            f"visit {visit} is already recorded as {how}; correct that entry instead", visit=visit, how=how
        )


class CompletionNotDue(ProtocolViolation):
    """T11: the last scheduled visit must be done or recorded as missed."""

    code = "completion_not_due"

    def __init__(self, last_visit: str) -> None:
        self.last_visit = last_visit
        super().__init__(
            f"study completion needs the last scheduled visit {last_visit} done or recorded as missed (T11)",
            last_visit=last_visit,
        )


class LostToFollowUpNotDue(ProtocolViolation):
    """T13: ≥ 2 consecutive scheduled visits missed and ≥ 3 documented contact attempts."""

    code = "ltfu_not_due"

    def __init__(self, missed_in_a_row: int, attempts: int, need_missed: int, need_attempts: int) -> None:
        self.missed_in_a_row = missed_in_a_row
        self.attempts = attempts
        super().__init__(
            f"lost to follow-up needs ≥ {need_missed} consecutive missed scheduled visits and ≥ "
            f"{need_attempts} documented contact attempts; found {missed_in_a_row} and {attempts} (T13)",
            missed_in_a_row=missed_in_a_row,
            attempts=attempts,
        )


class DeathBeforeLastKnownAlive(ProtocolViolation):
    """T15: the date of death is not before the last date the subject was known alive."""

    code = "death_before_last_known_alive"

    def __init__(self, died_at: datetime, last_known_alive: datetime) -> None:
        self.died_at = died_at
        self.last_known_alive = last_known_alive
        super().__init__(
            f"date of death {died_at.isoformat()} is before the last known alive date "
            f"{last_known_alive.isoformat()} (T15)",
            died_at=died_at,
            last_known_alive=last_known_alive,
        )


# --------------------------------------------------------------------------- adverse events (§7)
class UnknownAdverseEvent(ProtocolViolation):
    code = "unknown_adverse_event"

    def __init__(self, ae_id: str) -> None:
        self.ae_id = ae_id
        super().__init__(f"no adverse event {ae_id!r} is recorded for this subject", ae_id=ae_id)


class AdverseEventBeforeConsent(ProtocolViolation):
    """AEs are collected from consent on; an earlier onset is medical history."""

    code = "adverse_event_before_consent"

    def __init__(self, onset: Any, consented_at: datetime) -> None:
        self.onset = onset
        self.consented_at = consented_at
        super().__init__(
            f"AE onset {_fmt(onset)} is before consent ({consented_at.isoformat()}); record it as medical history",
            onset=onset,
            consented_at=consented_at,
        )


class InconsistentAssessment(ProtocolViolation):
    """The parts of an AE assessment contradict each other (e.g. serious without a criterion)."""

    code = "inconsistent_assessment"

    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(f"adverse event assessment is inconsistent: {detail}", detail=detail)


# --------------------------------------------------------------------------- corrections (R11)
class UnknownEventVersion(ProtocolViolation):
    code = "unknown_event_version"

    def __init__(self, version: int) -> None:
        self.version = version
        super().__init__(f"the subject's record has no event at version {version}", version=version)


class NotCorrectable(ProtocolViolation):
    """The named event cannot be corrected or voided this way."""

    code = "not_correctable"

    def __init__(self, version: int, event_type: str, detail: str) -> None:
        self.version = version
        self.event_type = event_type
        self.detail = detail
        super().__init__(
            f"event v{version} ({event_type}) cannot be changed: {detail}",
            version=version,
            event_type=event_type,
            detail=detail,
        )


class InvalidCorrection(ProtocolViolation):
    code = "invalid_correction"

    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(f"correction refused: {detail}", detail=detail)


class RoleMayNotCorrect(ProtocolViolation):
    """R10/R11: a correction may be made only by a role that may record the original."""

    code = "role_may_not_correct"

    def __init__(self, role: str, event_type: str, allowed: Iterable[str]) -> None:
        self.role = role
        self.event_type = event_type
        self.allowed = tuple(allowed)
        super().__init__(
            f"role {role} may not correct {event_type} (recorded by: {_listed(self.allowed)})",
            role=role,
            event_type=event_type,
            allowed=list(self.allowed),
        )


class UnknownSubject(ProtocolViolation):
    code = "unknown_subject"

    def __init__(self, subject: Any) -> None:
        self.subject = str(subject)
        super().__init__(f"subject {self.subject} is not in this study's record", subject=self.subject)


# --------------------------------------------------------------------------- source data verification and queries
class UnknownFact(ProtocolViolation):
    """SDV of (or a query on) data that does not exist: no such fact on the subject's record, a field it does not
    have, a fact that was voided, or one whose signed bytes are not the ones named."""

    code = "unknown_fact"

    def __init__(self, subject: Any, version: int, detail: str) -> None:
        self.subject = str(subject)
        self.version = version
        self.detail = detail
        super().__init__(
            f"subject {self.subject} has no verifiable fact at v{version}: {detail}",
            subject=self.subject,
            version=version,
            detail=detail,
        )


class UnknownQuery(ProtocolViolation):
    code = "unknown_query"

    def __init__(self, query_id: Any) -> None:
        self.query_id = str(query_id)
        super().__init__(f"query {self.query_id} is not in this study's record", query_id=self.query_id)


class QueryStateConflict(ProtocolViolation):
    """The query's state does not allow this act (answering or closing a closed query, re-opening an open one)."""

    code = "query_state_conflict"

    def __init__(self, query_id: Any, action: str, status: str) -> None:
        self.query_id = str(query_id)
        self.action = action
        self.status = status
        super().__init__(
            f"query {self.query_id} is {status}: it cannot be {action}",
            query_id=self.query_id,
            action=action,
            status=status,
        )


class NotTheRaiser(ProtocolViolation):
    """Only the raiser closes or re-opens a query (a data manager also may, for an automatic query)."""

    code = "not_the_raiser"

    def __init__(self, query_id: Any, action: str, actor: str, raised_by: str) -> None:
        self.query_id = str(query_id)
        self.action = action
        self.actor = actor
        self.raised_by = raised_by
        super().__init__(
            f"{actor} may not {action} query {self.query_id}: only its raiser {raised_by} may",
            query_id=self.query_id,
            action=action,
            actor=actor,
            raised_by=raised_by,
        )


class ActorMismatch(ProtocolViolation):
    """A regulated act names someone other than its signer as the person acting."""

    code = "actor_mismatch"

    def __init__(self, named: str, signer: str) -> None:
        self.named = named
        self.signer = signer
        super().__init__(f"the act names {named} but was signed by {signer}", named=named, signer=signer)
