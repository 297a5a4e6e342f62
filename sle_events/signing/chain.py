"""The one chain-link check: does an event follow the head of its stream?

Each sealed envelope names in `prev` the SHA-256 of its stream's previous sealed event (`GENESIS` for version 1).
The store refuses an append that does not follow, the verifier reports one, the projections' reader stops at
one: all three ask this function.
"""

from __future__ import annotations

from sle_events.signing.envelope import GENESIS

__all__ = ["GENESIS", "TAKEN", "GAP", "BROKEN", "link_problem"]

TAKEN = "taken"  # the version is at or below the head: someone stored it first
GAP = "gap"  # versions between the head and this one are missing
BROKEN = "broken"  # prev is not the hash of the head


def link_problem(head_version: int, head_hash: str, version: int, prev: str) -> str | None:
    """None if event `version` whose envelope names `prev` follows the head (`head_version`, `head_hash`);
    else `TAKEN`, `GAP` or `BROKEN`."""
    if version <= head_version:
        return TAKEN
    if version != head_version + 1:
        return GAP
    if prev != head_hash:
        return BROKEN
    return None
