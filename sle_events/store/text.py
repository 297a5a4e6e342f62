"""What the record's text columns can hold on every engine: PostgreSQL's text cannot hold NUL (SQLite's can), so
a name or filter carrying one is refused where it comes in, never sent to a query (that was a 500)."""

from __future__ import annotations

from collections.abc import Iterable


def storable(texts: Iterable[str]) -> bool:
    return not any("\x00" in t for t in texts)
