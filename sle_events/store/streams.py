"""Contiguous ranges of stream ids, for work split across processes (verification, projection rebuilds)."""

from __future__ import annotations

from collections.abc import Collection
from itertools import pairwise
from typing import Any

from sqlalchemy import func, select

from sle_events.domain.event_types import stored_topics


def registry_topic(column: Any) -> Any:
    """A condition on an events table's topic column: a `Study` (registry) event under its stable name or any
    older alias (`sle_events.domain.event_types`). Only a hint: the signed envelope says what an event is."""
    return column.in_(stored_topics("Study"))


def split_streams(
    engine: Any, table: Any, parts: int, *, exclude: Collection[Any] = (), skip_registry: bool = False
) -> list[tuple[Any, Any]]:
    """Contiguous ranges of stream ids holding about the same number of events (`None` = open end); streams in
    `exclude` (e.g. the study registries, checked apart) and, with `skip_registry`, registry events are not
    counted."""
    query = select(table.c.originator_id, func.count())
    if skip_registry:
        query = query.where(~registry_topic(table.c.topic))
    if exclude:
        query = query.where(table.c.originator_id.not_in(list(exclude)))
    query = query.group_by(table.c.originator_id).order_by(table.c.originator_id)
    with engine.connect() as conn:
        counts = list(conn.execute(query))
    total = sum(c for _, c in counts)
    if parts <= 1 or len(counts) < parts:
        return [(None, None)]
    bounds: list[Any] = []
    acc = 0
    share = total / parts
    for stream_id, count in counts:
        if acc >= share * (len(bounds) + 1) and len(bounds) < parts - 1:
            bounds.append(stream_id)
        acc += count
    edges = [None, *bounds, None]
    return list(pairwise(edges))
