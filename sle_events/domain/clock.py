"""The one clock the domain reads: real time by default, a simulated clock for replays and the demo.

Event timestamps (``recorded_at``, set by :class:`~sle_events.domain.base.TrialAggregate`) and the R9
"not in the future" checks both read :func:`now`. A simulated multi-year demo installs a
:class:`SimulatedClock` with :func:`use_clock` and passes the same clock to the store
(``StudyRecord(clock=...)``), so the store's "recorded_at is now" check agrees with the events.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime, timedelta

__all__ = ["now", "use_clock", "SimulatedClock"]

_CLOCK: ContextVar[Callable[[], datetime] | None] = ContextVar("sle_events_clock", default=None)


def now() -> datetime:
    """The current instant (UTC, tz-aware) from the installed clock, else the system clock."""
    clock = _CLOCK.get()
    if clock is None:
        return datetime.now(UTC)
    value = clock()
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("the installed clock returned a naive datetime")
    return value.astimezone(UTC)


@contextmanager
def use_clock(clock: Callable[[], datetime]) -> Iterator[Callable[[], datetime]]:
    """Install ``clock`` for the current context (thread / task) until the block ends."""
    token = _CLOCK.set(clock)
    try:
        yield clock
    finally:
        _CLOCK.reset(token)


class SimulatedClock:
    """A clock that only moves when told to (never backwards)."""

    def __init__(self, start: datetime) -> None:
        if start.tzinfo is None or start.utcoffset() is None:
            raise ValueError("a simulated clock starts at a tz-aware instant")
        self._now = start.astimezone(UTC)

    def __call__(self) -> datetime:
        return self._now

    def advance(self, delta: timedelta) -> datetime:
        if delta < timedelta(0):
            raise ValueError("a clock does not run backwards")
        self._now += delta
        return self._now

    def set(self, when: datetime) -> datetime:
        """Move to ``when`` if it is later than now (earlier instants leave the clock where it is)."""
        when = when.astimezone(UTC)
        if when > self._now:
            self._now = when
        return self._now
