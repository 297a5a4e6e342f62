"""Where a visit is checked against the schedule (PROTOCOL §6, R7): windows, early termination,
unscheduled visit numbers, and the missed-visit streak behind "lost to follow-up" (T13)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import date, datetime, timedelta
from decimal import Decimal

from sle_events.domain.study_config import VisitDefinition, VisitSchedule

__all__ = ["OUT_OF_WINDOW", "scheduled_window", "early_termination_window", "unscheduled_visitnum", "missed_in_a_row"]

OUT_OF_WINDOW = "VISIT_OUT_OF_WINDOW"


def _day(when: date | datetime) -> date:
    return when.date() if isinstance(when, datetime) else when


def scheduled_window(
    defn: VisitDefinition, tx: date | datetime, visit_at: date | datetime
) -> tuple[date, date, date, bool]:
    """(target, earliest, latest, in window) of a follow-up visit: target = TX + target day, ± window
    (both ends inclusive; formulas.md §7)."""
    target = _day(tx) + timedelta(days=defn.target_day or 0)
    w = timedelta(days=defn.window_days or 0)
    earliest, latest = target - w, target + w
    return target, earliest, latest, earliest <= _day(visit_at) <= latest


def early_termination_window(
    defn: VisitDefinition, withdrawn_at: date | datetime, visit_at: date | datetime
) -> tuple[date, date, bool]:
    """ET: within ``window_days`` (30) after the withdrawal."""
    start = _day(withdrawn_at)
    latest = start + timedelta(days=defn.window_days or 0)
    return start, latest, start <= _day(visit_at) <= latest


def unscheduled_visitnum(previous_visitnum: Decimal, k: int) -> Decimal:
    """UNS: previous VISITNUM + 0.01·k (PROTOCOL §6)."""
    return previous_visitnum + Decimal(k) / 100


def missed_in_a_row(schedule: VisitSchedule, outcomes: Mapping[str, str]) -> int:
    """How many of the most recent recorded scheduled follow-up visits were missed in a row.

    ``outcomes`` maps a visit code to ``"attended"`` or ``"missed"``; visits without an outcome are skipped
    (they are not due yet or not entered)."""
    streak = 0
    recorded: Iterable[VisitDefinition] = [v for v in schedule.follow_up if v.code in outcomes]
    for v in reversed(list(recorded)):
        if outcomes[v.code] != "missed":
            break
        streak += 1
    return streak
