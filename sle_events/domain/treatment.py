"""Where the treatment is checked: the in-patient stay, cyclophosphamide (§5.1) and the AlloMSC
infusion (§5.2). Pure functions; the subject supplies the facts they compare."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from sle_events.domain import bounds, formulas
from sle_events.domain.errors import InconsistentTimestamps, InvalidChoice, InvalidQuantity, MissingValue
from sle_events.domain.payloads import IdentityMarkers, Infusion, Pretreatment
from sle_events.domain.quantities import parse_decimal, parse_optional_decimal, round_half_up
from sle_events.domain.settings import StudySettings

__all__ = ["CYC_ROUTES", "check_pretreatment", "check_infusion", "lot_release_failures", "stay"]

CYC_ROUTES = ("IV",)
BASELINE_SEROLOGY = ("DSDNA", "C3", "C4")
BASELINE_RENAL = (("CREAT", "CREATSI"), ("UPCR", "UPROT24", "UPROT"))


def _ordered(start_field: str, start: datetime, stop_field: str, stop: datetime) -> None:
    formulas.require_aware(stop_field, stop)
    if stop < start:
        raise InconsistentTimestamps(start_field, start, stop_field, stop)


def check_pretreatment(
    *,
    started_at: datetime,
    stopped_at: datetime,
    prescribed_mg_per_m2: Any,
    administered_mg: Any,
    route: str,
    lot: str,
    height_cm: Decimal,
    weight_kg: Decimal,
    measured_version: int,
    settings: StudySettings,
    extra_flags: tuple[str, ...] = (),
) -> Pretreatment:
    """CYC record: BSA (Mosteller, 2 dp), calculated dose, administered dose and its flags (never refused
    for the ±10 % tolerance, the cap or a prescribed dose outside 500–1000 mg/m²; refused outside the
    100–3000 mg plausibility bound)."""
    _ordered("cyc start", started_at, "cyc stop", stopped_at)
    if route not in CYC_ROUTES:
        raise InvalidChoice("route", route, CYC_ROUTES)
    if not lot or not str(lot).strip():
        raise MissingValue("the CYC product lot", "cyclophosphamide")
    administered = bounds.check_bound("cyc_administered", administered_mg, settings=settings)
    prescribed = parse_decimal("prescribed_mg_per_m2", prescribed_mg_per_m2)
    if prescribed <= 0:
        raise InvalidQuantity("prescribed_mg_per_m2", prescribed_mg_per_m2, "must be greater than 0")
    bsa = formulas.bsa_mosteller(height_cm, weight_kg, settings=settings)
    calculated = formulas.cyc_calculated_dose(prescribed, bsa)
    check = formulas.check_cyc_dose(administered, calculated, prescribed_mg_per_m2=prescribed, settings=settings)
    return Pretreatment(
        occurred_at=started_at,
        stopped_at=stopped_at,
        prescribed_mg_per_m2=prescribed,
        height_cm=height_cm,
        weight_kg=weight_kg,
        bsa_m2=bsa,
        calculated_mg=calculated,
        administered_mg=administered,
        route=route,
        lot=str(lot),
        measured_version=measured_version,
        bsa_formula=formulas.BSA_FORMULA_VERSION,
        dose_formula=formulas.CYC_DOSE_FORMULA_VERSION,
        flags=tuple(check.flags) + tuple(extra_flags),
    )


def lot_release_failures(
    *,
    viability_pct: Decimal,
    dose_1e6_per_kg: Decimal | None,
    sterility_negative: bool,
    mycoplasma_negative: bool,
    identity: IdentityMarkers | None,
    endotoxin_eu_per_kg: Decimal | None,
    settings: StudySettings,
) -> tuple[str, ...]:
    """§5.2 release criteria. Without a dose (at release testing, before the recipient's weight is known)
    the dose range is not judged."""
    dose = settings.msc_dose_target_1e6_per_kg if dose_1e6_per_kg is None else dose_1e6_per_kg
    return formulas.msc_release_failures(
        viability_pct=viability_pct,
        dose_1e6_per_kg=dose,
        sterility_negative=sterility_negative,
        mycoplasma_negative=mycoplasma_negative,
        identity_markers_pct=None if identity is None else identity.pct,
        endotoxin_eu_per_kg=endotoxin_eu_per_kg,
        settings=settings,
    )


def check_infusion(
    *,
    started_at: datetime,
    stopped_at: datetime,
    cyc_started_at: datetime,
    lot_id: str,
    viable_cells: Decimal,
    viability_pct: Decimal,
    sterility_negative: bool,
    mycoplasma_negative: bool,
    identity: IdentityMarkers | None,
    endotoxin_eu_per_kg: Decimal | None,
    released_at: datetime,
    weight_kg: Decimal,
    settings: StudySettings,
    volume_ml: Any = None,
    premedication: str | None = None,
) -> Infusion:
    """R4 (18–36 h after the CYC start, refused outside), the dose in 10^6 cells/kg (refused outside the
    plausibility bound) and the release failures (judged by the caller against R5)."""
    _ordered("msc start", started_at, "msc stop", stopped_at)
    hours = formulas.check_cyc_msc_interval(cyc_started_at, started_at, settings=settings)
    dose = formulas.msc_dose_per_kg(viable_cells, weight_kg)
    bounds.check_bound("msc_dose", dose, settings=settings)
    failures = list(
        lot_release_failures(
            viability_pct=viability_pct,
            dose_1e6_per_kg=dose,
            sterility_negative=sterility_negative,
            mycoplasma_negative=mycoplasma_negative,
            identity=identity,
            endotoxin_eu_per_kg=endotoxin_eu_per_kg,
            settings=settings,
        )
    )
    since_release = formulas.hours_between(released_at, started_at, "released_at", "msc start")
    if since_release < 0:
        failures.append("infusion starts before the lot's release")
    elif since_release > settings.msc_max_hours_release_to_infusion:
        failures.append(
            f"infusion starts {round_half_up(since_release)} h after release "
            f"(> {settings.msc_max_hours_release_to_infusion} h)"
        )
    return Infusion(
        occurred_at=started_at,
        stopped_at=stopped_at,
        lot_id=lot_id,
        viable_cells=viable_cells,
        weight_kg=weight_kg,
        dose_1e6_per_kg=dose,
        dose_formula=formulas.MSC_DOSE_FORMULA_VERSION,
        cyc_to_msc_hours=hours,
        interval_formula=formulas.CYC_MSC_INTERVAL_FORMULA_VERSION,
        volume_ml=parse_optional_decimal("volume_ml", volume_ml),
        premedication=premedication or None,
        release_failures=tuple(failures),
    )


def stay(admitted_at: datetime, discharged_at: datetime, settings: StudySettings) -> tuple[int, bool]:
    """Length of stay in site-local calendar days and whether it is flagged (outside 3–5 d; R6)."""
    _ordered("admitted_at", admitted_at, "discharged_at", discharged_at)
    los = formulas.length_of_stay_days(admitted_at, discharged_at)
    return los, formulas.stay_flagged(los, settings=settings)
