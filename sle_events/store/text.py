"""What the record's text columns can hold on every engine: PostgreSQL's text cannot hold NUL (SQLite's can), so
a name or filter carrying one is refused where it comes in, never sent to a query (that was a 500)."""

from __future__ import annotations

from collections.abc import Iterable


def storable(path: str, query: Iterable[tuple[str, str]]) -> bool:
    """Whether a request's path and query parameters (names and values) hold no NUL."""
    return "\x00" not in path and not any("\x00" in k or "\x00" in v for k, v in query)
