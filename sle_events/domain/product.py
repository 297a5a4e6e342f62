"""An AlloMSC product lot (PROTOCOL §5.2), released — or not — by the cell-processing facility.

The lab service records the release testing once per lot (``ProductLot.ReleaseTested``): donor, HLA match,
cell count, viability, ISCT identity markers, sterility, mycoplasma and endotoxin. Criteria that do not depend
on the recipient are judged at once (a failed lot is recorded as such, with its failures); the dose range
(10^6 viable cells per kg of the recipient) and the 6-hour release-to-infusion limit are judged at the
infusion (:meth:`sle_events.domain.subject.Subject.infuse_msc`). The investigator's infusion marks the lot as
used (``ProductLot.Infused``) in the same atomic append, so a lot is infused once.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any, cast
from uuid import UUID, uuid5

from eventsourcing.domain import event

from sle_events.domain import bounds, clock, formulas
from sle_events.domain.base import TrialAggregate
from sle_events.domain.errors import InvalidChoice, InvalidQuantity, LotUnavailable, MissingValue
from sle_events.domain.payloads import IdentityMarkers
from sle_events.domain.quantities import parse_decimal, parse_optional_decimal
from sle_events.domain.study_config import StudyConfig
from sle_events.domain.treatment import lot_release_failures

__all__ = ["LotStatus", "ProductLot"]


class LotStatus(StrEnum):
    RELEASED = "RELEASED"
    FAILED_RELEASE = "FAILED_RELEASE"
    INFUSED = "INFUSED"


def _text(field: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise MissingValue(field, "MSC lot release")
    return value.strip()


def _flag(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidChoice(field, value, (True, False))
    return value


class ProductLot(TrialAggregate):
    """One lot of allogeneic bone-marrow MSCs made for one recipient."""

    @staticmethod
    def id_for(study_id: UUID, lot_id: str) -> UUID:
        """The lot's stream id: one stream per lot number in a study (a second release is a conflict)."""
        return uuid5(study_id, f"product-lot/{lot_id}")

    @classmethod
    def record_release(
        cls,
        study_id: UUID,
        lot_id: str,
        subject_id: UUID,
        occurred_at: datetime,
        *,
        config: StudyConfig,
        donor_id: str,
        hla_match: str,
        total_cells: Any,
        viability_pct: Any,
        identity_markers_pct: Mapping[str, Any],
        sterility_negative: bool,
        mycoplasma_negative: bool,
        endotoxin_eu_per_kg: Any = None,
        volume_ml: Any = None,
    ) -> ProductLot:
        """Record the release testing of a lot (lab / cell-processing service). ``occurred_at`` is the release
        (or thaw) time. Refused: implausible or malformed values; recorded with its failures otherwise."""
        formulas.check_not_in_future("occurred_at", occurred_at, clock.now(), settings=config.settings)
        lot_id = _text("lot_id", lot_id)
        donor_id = _text("donor_id", donor_id)
        hla_match = _text("hla_match", hla_match)
        total = parse_decimal("total_cells", total_cells)
        if total <= 0:
            raise InvalidQuantity("total_cells", total_cells, "must be greater than 0")
        viability = bounds.check_bound("msc_viability", viability_pct, settings=config.settings)
        markers = {}
        for name, pct in dict(identity_markers_pct).items():
            v = parse_decimal(name, pct)
            if not (Decimal(0) <= v <= Decimal(100)):
                raise InvalidQuantity(name, pct, "a marker percentage lies within 0–100")
            markers[str(name)] = v
        identity = IdentityMarkers(pct=markers)
        endotoxin = parse_optional_decimal("endotoxin_eu_per_kg", endotoxin_eu_per_kg)
        if endotoxin is not None and endotoxin < 0:
            raise InvalidQuantity("endotoxin_eu_per_kg", endotoxin_eu_per_kg, "must not be negative")
        volume = parse_optional_decimal("volume_ml", volume_ml)
        if volume is not None and volume <= 0:
            raise InvalidQuantity("volume_ml", volume_ml, "must be greater than 0")
        sterile = _flag("sterility_negative", sterility_negative)
        mycoplasma = _flag("mycoplasma_negative", mycoplasma_negative)
        failures = lot_release_failures(
            viability_pct=viability,
            dose_1e6_per_kg=None,
            sterility_negative=sterile,
            mycoplasma_negative=mycoplasma,
            identity=identity,
            endotoxin_eu_per_kg=endotoxin,
            settings=config.settings,
        )
        return cls._create(
            cls.ReleaseTested,  # type: ignore[attr-defined]  # the event class @event("ReleaseTested") builds
            id=cls.id_for(study_id, lot_id),
            study_id=study_id,
            lot_id=lot_id,
            subject_id=subject_id,
            donor_id=donor_id,
            hla_match=hla_match,
            total_cells=total,
            viability_pct=viability,
            viable_cells=formulas.viable_cells(total, viability),
            identity=identity,
            sterility_negative=sterile,
            mycoplasma_negative=mycoplasma,
            endotoxin_eu_per_kg=endotoxin,
            volume_ml=volume,
            release_failures=list(failures),
            occurred_at=occurred_at,
        )

    @event("ReleaseTested")
    def __init__(
        self,
        study_id: UUID,
        lot_id: str,
        subject_id: UUID,
        donor_id: str,
        hla_match: str,
        total_cells: Decimal,
        viability_pct: Decimal,
        viable_cells: Decimal,
        identity: IdentityMarkers,
        sterility_negative: bool,
        mycoplasma_negative: bool,
        endotoxin_eu_per_kg: Decimal | None,
        volume_ml: Decimal | None,
        release_failures: list[str],
        occurred_at: datetime,
    ) -> None:
        self.study_id = study_id
        self.lot_id = lot_id
        self.subject_id = subject_id
        self.donor_id = donor_id
        self.hla_match = hla_match
        self.total_cells = total_cells
        self.viability_pct = viability_pct
        self.viable_cells = viable_cells
        self.identity = identity
        self.sterility_negative = sterility_negative
        self.mycoplasma_negative = mycoplasma_negative
        self.endotoxin_eu_per_kg = endotoxin_eu_per_kg
        self.volume_ml = volume_ml
        self.release_failures = tuple(release_failures)
        self.released_at = occurred_at
        self.infused_into: UUID | None = None
        self.infused_at: datetime | None = None

    # --- verbs -----------------------------------------------------------------------------------------------
    def mark_infused(self, subject_id: UUID, occurred_at: datetime, *, config: StudyConfig) -> None:
        """The lot went into ``subject_id`` (recorded with the subject's ``MSCInfused``)."""
        formulas.check_not_in_future("occurred_at", occurred_at, clock.now(), settings=config.settings)
        self.check_available_for(subject_id)
        self._infused(subject_id=subject_id, occurred_at=occurred_at)

    def check_available_for(self, subject_id: UUID) -> None:
        if self.subject_id != subject_id:
            raise LotUnavailable(self.lot_id, f"it was made for subject {self.subject_id}, not {subject_id}")
        if self.infused_into is not None:
            raise LotUnavailable(
                self.lot_id,
                f"it was already infused at {cast(datetime, self.infused_at).isoformat()}",  # set with infused_into
            )

    @event("Infused")
    def _infused(self, subject_id: UUID, occurred_at: datetime) -> None:
        self.infused_into = subject_id
        self.infused_at = occurred_at

    # --- questions -------------------------------------------------------------------------------------------
    @property
    def status(self) -> LotStatus:
        if self.infused_into is not None:
            return LotStatus.INFUSED
        return LotStatus.FAILED_RELEASE if self.release_failures else LotStatus.RELEASED
