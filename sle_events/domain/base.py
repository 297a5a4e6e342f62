"""The base class of the trial's aggregates: events take their timestamp from the domain clock."""

from __future__ import annotations

from datetime import datetime

from eventsourcing.domain import Aggregate

from sle_events.domain import clock

__all__ = ["TrialAggregate"]


class TrialAggregate(Aggregate):
    """An `eventsourcing` aggregate whose event timestamps (the envelope's ``recorded_at``) come from
    :func:`sle_events.domain.clock.now`, so a simulated clock drives a replayed or demo trial."""

    class Event(Aggregate.Event):
        @staticmethod
        def create_timestamp() -> datetime:
            return clock.now()

    class Created(Event, Aggregate.Created):
        pass
