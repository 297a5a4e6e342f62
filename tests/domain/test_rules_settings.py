"""StudySettings defaults (PROTOCOL.md §9) and validation."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from pydantic import ValidationError

from sle_events.domain.bounds import DEFAULT_BOUNDS
from sle_events.domain.settings import DEFAULT_SETTINGS, StudySettings, resolve


def test_section_9_defaults():
    s = StudySettings()
    assert (s.cyc_msc_window_min_hours, s.cyc_msc_window_max_hours) == (Decimal(18), Decimal(36))
    assert s.cyc_dose_mg_per_m2 == Decimal(750)
    assert (s.cyc_dose_min_mg_per_m2, s.cyc_dose_max_mg_per_m2) == (Decimal(500), Decimal(1000))
    assert s.cyc_total_cap_mg == Decimal(1800)
    assert s.cyc_administered_tolerance == Decimal("0.10")
    assert s.msc_dose_target_1e6_per_kg == Decimal("1.0")
    assert (s.msc_dose_min_1e6_per_kg, s.msc_dose_max_1e6_per_kg) == (Decimal("0.8"), Decimal("1.2"))
    assert s.msc_min_viability_pct == Decimal(70)
    assert s.msc_max_hours_release_to_infusion == Decimal(6)
    assert (s.stay_min_days, s.stay_max_days) == (3, 5)
    assert (s.monthly_window_days, s.long_term_window_days) == (7, 30)
    assert (s.long_term_interval_months, s.last_scheduled_month) == (6, 48)
    assert s.eligibility_validity_days == s.screening_lab_validity_days == 28
    assert s.renal_egfr_tolerance == Decimal("0.15")
    assert s.future_clock_skew_minutes == 5
    assert s.future_clock_skew.total_seconds() == 300
    assert s.days_per_month == 30
    assert s.sledai_lookback_days == 10
    assert s.sae_report_hours == Decimal(24)
    assert s.plausibility_bounds == dict(DEFAULT_BOUNDS)
    assert resolve(None) is DEFAULT_SETTINGS and resolve(s) is s


def test_decimal_fields_are_decimals_and_serialise_as_strings():
    s = StudySettings()
    for name, value in s:
        if name == "plausibility_bounds":
            continue
        assert not isinstance(value, float), name
    data = json.loads(s.model_dump_json())
    assert data["renal_egfr_tolerance"] == "0.15"
    assert data["cyc_msc_window_min_hours"] == "18"
    assert data["plausibility_bounds"]["serum_creatinine"]["low"] == "0.1"
    assert data["stay_min_days"] == 3
    # round trip through JSON
    assert StudySettings.model_validate_json(s.model_dump_json()) == s
    assert s.model_dump(mode="json")["msc_dose_min_1e6_per_kg"] == "0.8"


def test_float_settings_refused():
    with pytest.raises(ValidationError) as exc:
        StudySettings(renal_egfr_tolerance=0.10)
    assert "float" in str(exc.value)
    with pytest.raises(ValidationError):
        StudySettings(stay_min_days=3.0)
    with pytest.raises(ValidationError):
        StudySettings(stay_min_days="3")


def test_string_decimals_accepted():
    assert StudySettings(renal_egfr_tolerance="0.10").renal_egfr_tolerance == Decimal("0.10")


@pytest.mark.parametrize(
    "overrides",
    [
        {"cyc_msc_window_min_hours": "40"},
        {"stay_min_days": 6},
        {"msc_dose_min_1e6_per_kg": "1.3"},
        {"renal_egfr_tolerance": "1"},
        {"renal_egfr_tolerance": "-0.1"},
        {"cyc_administered_tolerance": "1.5"},
        {"msc_min_viability_pct": "101"},
        {"cyc_total_cap_mg": "0"},
        {"monthly_window_days": -1},
        {"last_scheduled_month": 50},
        {"unknown_setting": 1},
    ],
)
def test_inconsistent_settings_refused(overrides):
    with pytest.raises(ValidationError):
        StudySettings(**overrides)


def test_frozen():
    with pytest.raises(ValidationError):
        DEFAULT_SETTINGS.stay_min_days = 2  # type: ignore[misc]  # frozen: the test checks the runtime refusal too
