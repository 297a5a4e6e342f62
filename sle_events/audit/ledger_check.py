"""The ledger check (`sle verify`'s ledger half): recompute the Merkle tree from the events and hold the ledger
against it.

:func:`verify_ledger` trusts nothing the ledger stored. It re-hashes every event (in log order) into the tree
the log *should* be, then checks:

* every ledger leaf against the event at its log position (``ledger_leaf_missing_event``,
  ``ledger_leaf_mismatch``), the leaves' order (``ledger_order``), events the sequencer skipped
  (``event_not_in_ledger``; events not integrated *yet* are fine and only counted);
* every stored perfect subtree against its children (``ledger_node_mismatch``) and the state row against the
  stored tree (``ledger_state_mismatch``);
* every stored checkpoint: its signature (``checkpoint_bad_signature``, ``checkpoint_malformed``) and its
  root against the recomputed root at its size (``checkpoint_root_mismatch``);
* checkpoints an auditor saved earlier: the log must still hold at least that many events and reproduce the
  saved root at that size (``inconsistent_with_saved_checkpoint``). This is what catches a log rewritten
  from scratch and re-signed with the right key.
"""

from __future__ import annotations

import base64
import hashlib
import os
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from sle_events.audit.errors import UnusableInput
from sle_events.audit.findings import Finding
from sle_events.audit.trust import TrustRoot, load_vkey, open_saved, read_checkpoint_notes
from sle_events.ledger.checkpoint import Checkpoint, CheckpointError, KeyChain, follow_key_rotations, open_checkpoint
from sle_events.ledger.merkle import EMPTY_ROOT, HASH_SIZE, pair_level, perfect_levels, range_nodes, root_at
from sle_events.ledger.note import (
    InvalidSignatureError,
    KeyFormatError,
    NoteError,
    UnverifiedNoteError,
    Verifier,
    parse_note,
)
from sle_events.ledger.tables import (
    EVENTS_TABLE,
    LEDGER_TABLES,
    events_table,
    ledger_checkpoints,
    ledger_leaves,
    ledger_nodes,
    ledger_state,
)
from sle_events.signing.envelope import open_stored, parse_time

__all__ = ["LedgerFindings", "verify_ledger"]

BATCH = 5000
_H = HASH_SIZE
_LEAF = hashlib.sha256(b"\x00")


class LedgerFindings(list):
    """The findings (a list of :class:`Finding`), plus ``info``: counts and what was checked."""

    def __init__(self, findings: Iterable[Finding] = (), info: dict[str, Any] | None = None) -> None:
        super().__init__(findings)
        self.info: dict[str, Any] = info or {}


def _getter(levels: Sequence[bytes]) -> Callable[[int, int], bytes]:
    def get(level: int, idx: int) -> bytes:
        return levels[level][idx * _H : (idx + 1) * _H]

    return get


def _b64(h: bytes) -> str:
    return base64.b64encode(h).decode("ascii")


# --------------------------------------------------------------------------- the audit


@dataclass
class _Audit:
    engine: Any
    events: Any
    findings: list[Finding] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    present: set[str] = field(default_factory=set)  # the ledger tables that exist (a dropped one reads as empty)

    def rows(self, conn: Any, table: Any, query: Any) -> list[Any]:
        return list(conn.execute(query)) if table.name in self.present else []

    def found(
        self,
        kind: str,
        detail: str,
        *,
        position: int | None = None,
        stream: str | None = None,
        version: int | None = None,
    ) -> None:
        self.findings.append(Finding(stream, version, kind, detail, position))

    def event_rows(self, positions: Iterable[int]) -> dict[int, tuple[str, int]]:
        """(stream, version) of the events now at these positions."""
        ev = self.events
        wanted = sorted(set(positions))
        out: dict[int, tuple[str, int]] = {}
        with self.engine.connect() as conn:
            for k in range(0, len(wanted), 500):
                rows = conn.execute(
                    sa.select(ev.c.id, ev.c.originator_id, ev.c.originator_version).where(
                        ev.c.id.in_(wanted[k : k + 500])
                    )
                )
                out.update((p, (str(s), v)) for p, s, v in rows)
        return out

    def leaf_rows(self, indexes: Iterable[int]) -> dict[int, tuple[str | None, int | None]]:
        """(stream, version) the ledger recorded for these leaves when it logged them."""
        lv = ledger_leaves.c
        wanted = sorted(set(indexes))
        out: dict[int, tuple[str | None, int | None]] = {}
        with self.engine.connect() as conn:
            for k in range(0, len(wanted), 500):
                rows = conn.execute(sa.select(lv.idx, lv.stream, lv.version).where(lv.idx.in_(wanted[k : k + 500])))
                out.update((i, (s, v)) for i, s, v in rows)
        return out


def verify_ledger(
    url: str,
    checkpoints_from: Any = None,
    vkey: str | os.PathLike[str] | Verifier | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    *,
    trust: TrustRoot | None = None,
    pending_limit: timedelta | None = None,
) -> LedgerFindings:
    """Check the ledger of the record at ``url`` against the events; return the findings.

    ``checkpoints_from``: checkpoint(s) an auditor saved earlier (note text, bytes, a path, or a list); each
    must verify with ``vkey`` (or, failing that, the vkey the ledger recorded) or :class:`UnusableInput`
    is raised. ``vkey`` also checks the stored checkpoints' signatures (default: the ledger's recorded vkey).
    ``trust`` (a :class:`TrustRoot`) gives both at once. ``pending_limit``: events waiting longer than this for
    integration are a finding. ``on_progress(done, total)`` is called as rows are read. ``.info`` of the
    result says what was checked.
    """
    if trust is not None:
        verifier = trust.vkey
        saved_notes = list(trust.checkpoints) + ([trust.since] if trust.since else [])
        expected = trust.has_log
    else:
        verifier = load_vkey(vkey) if vkey is not None else None
        saved_notes = read_checkpoint_notes(checkpoints_from)
        expected = verifier is not None or bool(saved_notes)
    engine = sa.create_engine(url)
    try:
        names = set(sa.inspect(engine).get_table_names())
        if EVENTS_TABLE not in names:
            raise UnusableInput(f"no study record at {url}: table {EVENTS_TABLE} does not exist")
        audit = _Audit(engine, events_table())
        has_ledger = _ledger_present(audit, names, expected)
        _run(audit, has_ledger, verifier, saved_notes, on_progress)
        first_pending = audit.info.pop("_first_pending", None)
        if has_ledger and pending_limit is not None and first_pending is not None:
            _check_pending(audit, pending_limit, first_pending)
    finally:
        engine.dispose()
    audit.findings.sort(key=lambda f: (f.position or 0, f.kind))
    return LedgerFindings(audit.findings, audit.info)


def _ledger_present(audit: _Audit, names: set[str], expected: bool) -> bool:
    """Whether the ledger can be checked; a ledger that was (or must be) here and is gone is a finding.

    Evidence that a ledger existed: any of its tables (dropping one must not turn the check off), the Alembic
    revision (0004 created the tables), or the auditor's trust root naming a log. Dropping all four tables of
    a database the tables were created in on first use, with no auditor holding the vkey, leaves no trace
    here: that is what the auditor's saved checkpoints are for (README, "Ledger")."""
    present = [t for t in LEDGER_TABLES if t in names]
    missing = [t for t in LEDGER_TABLES if t not in names]
    audit.present = set(present)
    if present:
        for table in missing:  # checked as if empty: what it would have shown is then found elsewhere too
            audit.found(
                "ledger_table_missing",
                f"table {table} is gone while {', '.join(present)} remain: a ledger table was dropped",
            )
        return True
    why = []
    if expected:
        why.append("the auditor's trust root names a log (--vkey/--checkpoint/--since)")
    revision = _alembic_revision(audit.engine, names)
    if revision is not None and revision >= "0004":
        why.append(f"the schema is at revision {revision}, which has the ledger's tables")
    if why:
        audit.found(
            "ledger_missing",
            "this database has no ledger tables, but "
            + " and ".join(why)
            + ": the ledger was dropped (or this is not the database the auditor knows)",
        )
    return False


def _alembic_revision(engine: Any, names: set[str]) -> str | None:
    if "alembic_version" not in names:
        return None
    with engine.connect() as conn:
        return conn.execute(sa.text("select version_num from alembic_version")).scalar()


def _check_pending(audit: _Audit, limit: timedelta, first: int) -> None:
    """Events waiting for integration longer than `limit` (by their signed recorded_at): until integrated, an
    event deleted by SQL leaves no trace, so a stalled integrator is a finding."""
    pending = audit.info.get("pending", 0)
    ev = audit.events
    with audit.engine.connect() as conn:
        row = conn.execute(
            sa.select(ev.c.originator_id, ev.c.originator_version, ev.c.state).where(ev.c.id == first)
        ).first()
    try:
        recorded = parse_time("recorded_at", open_stored(bytes(row.state)).envelope["recorded_at"])
    except Exception:
        return
    waited = datetime.now(UTC) - recorded
    audit.info["oldest_pending_seconds"] = round(waited.total_seconds())
    if waited > limit:
        audit.found(
            "ledger_pending_too_long",
            f"{pending} events are not integrated yet, the oldest (log position {first}, recorded "
            f"{recorded.isoformat()}) for {_span(waited)}, more than {_span(limit)}: until integrated, an "
            "event deleted by SQL leaves no trace; is `sle ledger run` running?",
            position=first,
            stream=str(row.originator_id),
            version=row.originator_version,
        )


def _span(t: timedelta) -> str:
    s = int(t.total_seconds())
    return f"{s // 3600} h {s % 3600 // 60} min" if s >= 3600 else f"{s // 60} min {s % 60} s"


def _run(
    audit: _Audit,
    has_ledger: bool,
    verifier: Verifier | None,
    saved_notes: list[tuple[str, str]],
    on_progress: Callable[[int, int], None] | None,
) -> None:
    engine, ev = audit.engine, audit.events
    info = audit.info
    info["ledger"] = has_ledger

    # --- the stored state and the log's key ------------------------------------------------------------
    state = None
    if has_ledger:
        with engine.connect() as conn:
            found = audit.rows(conn, ledger_state, sa.select(ledger_state).where(ledger_state.c.id == 1))
            state = found[0]._mapping if found else None
            n_leaves = sum(
                r[0] for r in audit.rows(conn, ledger_leaves, sa.select(sa.func.count()).select_from(ledger_leaves))
            )
            n_nodes = sum(
                r[0] for r in audit.rows(conn, ledger_nodes, sa.select(sa.func.count()).select_from(ledger_nodes))
            )
    else:
        n_leaves = n_nodes = 0
    if verifier is None and state is not None and state["vkey"]:
        try:
            verifier = Verifier.from_vkey(state["vkey"])
            info["checkpoint_key"] = "the vkey recorded in ledger_state (pass --vkey to use your own)"
        except KeyFormatError as e:
            audit.found("ledger_state_mismatch", f"ledger_state holds a malformed vkey: {e}")
    elif verifier is not None:
        info["checkpoint_key"] = verifier.vkey
    # Stored checkpoints are read before the events, so none covers an event appended after that read.
    checkpoints: list[Any] = []
    if has_ledger:
        with engine.connect() as conn:
            checkpoints = audit.rows(
                conn, ledger_checkpoints, sa.select(ledger_checkpoints).order_by(ledger_checkpoints.c.id)
            )
        if state is not None and state["vkey"] and not checkpoints and "ledger_checkpoints" in audit.present:
            audit.found(
                "ledger_checkpoints_emptied",
                "ledger_state names the log key that signed checkpoints, but "
                "ledger_checkpoints holds none: its rows were deleted",
            )
    # The log's keys, followed from the auditor's (or the recorded) key through rotation checkpoints.
    chain = None
    if verifier is not None:
        chain = follow_key_rotations([row.note for row in checkpoints], verifier.vkey)
        if len(chain.keys) > 1:
            info["log_keys"] = chain.keys
        current = chain.linked[-1] if chain.linked else verifier.vkey  # the newest key a held rotation links
        if state is not None and state["vkey"] and state["vkey"] != current:
            audit.found(
                "ledger_state_mismatch", f"ledger_state names the log key {state['vkey']}, not the expected {current}"
            )

    # --- the auditor's saved checkpoints verify first: bad input stops before any reading ---------------
    saved: list[tuple[str, Checkpoint]] = []
    if saved_notes:
        if verifier is None or chain is None:
            raise UnusableInput("a saved checkpoint needs the log's vkey to be checked (--vkey)")
        linked = [Verifier.from_vkey(k) for k in chain.linked] or [verifier]
        saved = [(label, open_saved(label, note, linked)) for label, note in saved_notes]

    # --- every event, in log order: the tree the log should be ------------------------------------------
    with engine.connect() as conn:
        total_events = conn.execute(sa.select(sa.func.count()).select_from(ev)).scalar_one()
    total = total_events + n_leaves + n_nodes
    done = 0
    ev_pos = array("q")
    ev_hash = bytearray()
    new = _LEAF.copy
    with engine.connect() as conn:
        result = conn.execution_options(stream_results=True, yield_per=BATCH).execute(
            sa.select(ev.c.id, ev.c.state).order_by(ev.c.id)
        )
        for part in result.partitions():
            for position, data in part:
                h = new()
                h.update(data)
                ev_hash += h.digest()
                ev_pos.append(position)
            done += len(part)
            if on_progress:
                on_progress(done, total)
    ev_hash_b = bytes(ev_hash)
    n_ev = len(ev_pos)
    info["events"] = n_ev

    stored_levels: list[bytes] | None = None
    stored_ok = False
    logged_position = 0
    if has_ledger:
        stored_levels, stored_ok, logged_position, done = _check_ledger(
            audit, state, ev_pos, ev_hash_b, done, total, on_progress
        )
    first_pending = bisect_left(ev_pos, logged_position + 1)
    info["pending"] = n_ev - first_pending
    if first_pending < n_ev:
        info["_first_pending"] = ev_pos[first_pending]

    # --- roots of the recomputed tree ------------------------------------------------------------------
    ev_levels: list[bytes] | None = None

    def recomputed_root(size: int) -> bytes:
        nonlocal ev_levels
        if size == 0:
            return EMPTY_ROOT
        if stored_ok and stored_levels is not None and size <= len(stored_levels[0]) // _H:
            return root_at(size, _getter(stored_levels))  # the stored tree IS the recomputed one here
        if ev_levels is None:
            ev_levels = perfect_levels(ev_hash_b)
        return root_at(size, _getter(ev_levels))

    info["root"] = _b64(recomputed_root(n_ev))
    if has_ledger:  # the integrated events' tree: what a sealed result vouches for (`audit.results.save_tree`)
        info["logged"] = {"size": first_pending, "root": _b64(recomputed_root(first_pending))}

    # --- stored checkpoints --------------------------------------------------------------------------
    if has_ledger:
        _check_checkpoints(audit, checkpoints, verifier, chain, ev_pos, n_ev, recomputed_root)

    # --- the auditor's saved checkpoints ---------------------------------------------------------------
    results = []
    for label, cp in saved:
        if cp.size > n_ev:
            audit.found(
                "inconsistent_with_saved_checkpoint",
                f"saved checkpoint {label} covers {cp.size} events but the log now holds only {n_ev}: "
                f"{cp.size - n_ev} or more events were removed",
            )
            ok = False
        elif recomputed_root(cp.size) != cp.root_hash:
            audit.found(
                "inconsistent_with_saved_checkpoint",
                f"saved checkpoint {label} signs root {_b64(cp.root_hash)} for the first {cp.size} events, "
                f"but the events now give {_b64(recomputed_root(cp.size))}: history before log position "
                f"{ev_pos[cp.size - 1] if cp.size else 0} was rewritten, removed or reordered "
                "since the checkpoint was saved",
                position=None,
            )
            ok = False
        else:
            ok = True
        results.append({"checkpoint": label, "size": cp.size, "consistent": ok})
    if results:
        info["saved_checkpoints"] = results


def _check_ledger(
    audit: _Audit,
    state: Any,
    ev_pos: array,
    ev_hash: bytes,
    done: int,
    total: int,
    on_progress: Callable[[int, int], None] | None,
) -> tuple[list[bytes], bool, int, int]:
    engine = audit.engine
    found = audit.found
    n_ev = len(ev_pos)
    # --- leaves ----------------------------------------------------------------------------------------
    lf_idx = array("q")
    lf_pos = array("q")
    lf_hash = bytearray()
    with engine.connect() as conn:
        lv = ledger_leaves.c
        result = (
            conn.execution_options(stream_results=True, yield_per=BATCH).execute(
                sa.select(lv.idx, lv.position, lv.leaf_hash).order_by(lv.idx)
            )
            if "ledger_leaves" in audit.present
            else None
        )
        for part in result.partitions() if result is not None else ():
            for idx, position, h in part:
                lf_idx.append(idx)
                lf_pos.append(position)
                h = bytes(h)
                lf_hash += h if len(h) == _H else (h + bytes(_H))[:_H]
            done += len(part)
            if on_progress:
                on_progress(done, total)
    n = len(lf_idx)
    lf_hash_b = bytes(lf_hash)
    audit.info["leaves"] = n
    ok = True

    # Leaf indexes are 0, 1, 2...: a gap is a deleted leaf row.
    if n and (lf_idx[0] != 0 or lf_idx[-1] != n - 1):
        ok = False
        expected = 0
        for k in range(n):
            if lf_idx[k] != expected:
                found(
                    "ledger_order",
                    f"ledger_leaves has no leaf {expected}"
                    + (f"–{lf_idx[k] - 1}" if lf_idx[k] - 1 > expected else "")
                    + ": leaf rows were deleted",
                    position=lf_pos[k],
                )
            expected = lf_idx[k] + 1

    # Leaves are in log order: leaf k holds the k-th smallest logged position.
    if any(lf_pos[k] >= lf_pos[k + 1] for k in range(n - 1)):
        ok = False
        in_order = sorted(lf_pos)
        dups = {p for k, p in enumerate(in_order[1:]) if p == in_order[k]}
        for k in range(n):
            if lf_pos[k] != in_order[k] or lf_pos[k] in dups:
                found(
                    "ledger_order",
                    f"leaf {lf_idx[k]} holds log position {lf_pos[k]}, but in log order its place "
                    f"belongs to position {in_order[k]}: the leaves were reordered",
                    position=lf_pos[k],
                )

    # Each leaf against the event at its position.
    logged_position = (
        max(int(state["position"]), lf_pos[-1] if n else 0) if state is not None else (lf_pos[-1] if n else 0)
    )
    if not (lf_pos == ev_pos[:n] and lf_hash_b == ev_hash[: n * _H]):
        ok = False
        missing: list[int] = []
        changed: list[int] = []
        for k in range(n):
            p = lf_pos[k]
            j = bisect_left(ev_pos, p)
            if j == n_ev or ev_pos[j] != p:
                missing.append(k)
            elif ev_hash[j * _H : (j + 1) * _H] != lf_hash_b[k * _H : (k + 1) * _H]:
                changed.append(k)
        logged = audit.leaf_rows(lf_idx[k] for k in missing + changed)
        now = audit.event_rows(lf_pos[k] for k in changed)
        for k in missing:
            stream, version = logged.get(lf_idx[k], (None, None))
            what = f"{stream} v{version}" if stream else "an event"
            found(
                "ledger_leaf_missing_event",
                f"leaf {lf_idx[k]} logged {what} at log position {lf_pos[k]}; that event is gone from the record",
                position=lf_pos[k],
                stream=stream,
                version=version,
            )
        row_altered = _leaf_rows_altered(audit, state, changed, lf_idx, lf_pos, lf_hash_b, ev_pos, ev_hash)
        for k in changed:
            stream, version = now.get(lf_pos[k], (None, None))
            if k in row_altered:
                found(
                    "ledger_leaf_row_altered",
                    f"ledger_leaves row {lf_idx[k]} (log position {lf_pos[k]}, {stream} v{version}) holds leaf hash "
                    f"{_b64(lf_hash_b[k * _H : (k + 1) * _H])}, but the event still hashes to what the tree above it "
                    "was built from: the leaf row was edited, not the event",
                    position=lf_pos[k],
                    stream=stream,
                    version=version,
                )
                continue
            was_stream, was_version = logged.get(lf_idx[k], (None, None))
            was = (
                ""
                if (was_stream, was_version) == (stream, version) or was_stream is None
                else f" (the ledger logged {was_stream} v{was_version} there)"
            )
            found(
                "ledger_leaf_mismatch",
                f"the event at log position {lf_pos[k]} ({stream} v{version}) does not hash to leaf {lf_idx[k]} "
                f"{_b64(lf_hash_b[k * _H : (k + 1) * _H])}{was}: it was altered, replaced or moved after it was logged",
                position=lf_pos[k],
                stream=stream,
                version=version,
            )
        # Events at or below the last integrated position that no leaf holds: the sequencer cannot reach them.
        logged_set = sorted(lf_pos)
        skipped = [
            p
            for p in ev_pos[: bisect_left(ev_pos, logged_position + 1)]
            if (i := bisect_left(logged_set, p)) == len(logged_set) or logged_set[i] != p
        ]
    else:
        skipped = list(ev_pos[n : bisect_left(ev_pos, logged_position + 1)])
    if skipped:
        rows = audit.event_rows(skipped)
        for p in skipped:
            stream, version = rows.get(p, (None, None))
            found(
                "event_not_in_ledger",
                f"the event at log position {p} ({stream} v{version}) lies within the integrated part of the log "
                f"(up to position {logged_position}) but no leaf holds it: it was inserted behind the ledger's back "
                "or its leaf row was deleted",
                position=p,
                stream=stream,
                version=version,
            )

    # --- perfect subtrees against their children --------------------------------------------------------
    # Leaf hashes by index; a deleted leaf row leaves a hole of zeros, so only the subtrees above it differ.
    size = lf_idx[-1] + 1 if n else 0
    if size == n:
        levels, pos_of = [lf_hash_b], lf_pos
    else:
        hole = bytearray(size * _H)
        pos_of = array("q", [0] * size)
        for k in range(n):
            i = lf_idx[k]
            hole[i * _H : (i + 1) * _H] = lf_hash_b[k * _H : (k + 1) * _H]
            pos_of[i] = lf_pos[k]
        levels = [bytes(hole)]
    stored_nodes: dict[int, dict[int, bytes]] = {}
    extra: list[tuple[int, int]] = []
    with engine.connect() as conn:
        nd = ledger_nodes.c
        result = (
            conn.execution_options(stream_results=True, yield_per=BATCH).execute(
                sa.select(nd.level, nd.idx, nd.hash).order_by(nd.level, nd.idx)
            )
            if "ledger_nodes" in audit.present
            else None
        )
        level_rows: dict[int, list[bytes]] = {}
        for part in result.partitions() if result is not None else ():
            for level, idx, h in part:
                row = level_rows.setdefault(level, [])
                if level >= 1 and idx == len(row) and idx < (size >> level):
                    row.append(bytes(h))
                elif level >= 1 and 0 <= idx < (size >> level):
                    stored_nodes.setdefault(level, {})[idx] = bytes(h)  # out of sequence: after a gap
                else:
                    extra.append((level, idx))
            done += len(part)
            if on_progress:
                on_progress(done, total)
    for level, idx in extra:
        ok = False
        found(
            "ledger_node_mismatch",
            f"ledger_nodes holds a node (level {level}, index {idx}) outside the tree of "
            f"{size} leaves: the ledger tables were altered",
        )
    level = 1
    while (size >> level) > 0:
        count = size >> level
        expected_level = pair_level(levels[-1][: count * 2 * _H])
        row = level_rows.get(level, [])
        late = stored_nodes.get(level, {})
        if len(row) == count:
            stored_level = b"".join(row)
        else:  # some nodes are missing: fill them in from the children
            stored_list = row + [b""] * (count - len(row))
            for i, h in late.items():
                stored_list[i] = h
            for i in range(count):
                if not stored_list[i]:
                    ok = False
                    a, b = i << level, ((i + 1) << level) - 1
                    found(
                        "ledger_node_mismatch",
                        f"ledger_nodes lacks the perfect subtree (level {level}, index {i}) "
                        f"over leaves {a}–{b}: the ledger tables were altered",
                        position=pos_of[a],
                    )
                    stored_list[i] = expected_level[i * _H : (i + 1) * _H]
            stored_level = b"".join(stored_list)
        if stored_level != expected_level:
            ok = False
            for i in range(count):
                if stored_level[i * _H : (i + 1) * _H] != expected_level[i * _H : (i + 1) * _H]:
                    a, b = i << level, ((i + 1) << level) - 1
                    held = [p for p in pos_of[a : b + 1] if p] or [0]  # 0: a deleted leaf row
                    lo, hi = min(held), max(held)
                    found(
                        "ledger_node_mismatch",
                        f"the perfect subtree (level {level}, index {i}) over leaves {a}–{b} (log positions "
                        f"{lo}–{hi}) does not hash from its two children: a node or a leaf under it was altered",
                        position=lo,
                    )
        levels.append(stored_level)
        level += 1

    # --- the state row -------------------------------------------------------------------------------
    if state is None:
        ok = False
        found("ledger_state_mismatch", "ledger_state has no row: the ledger tables were emptied or altered")
    else:
        problems = []
        if state["size"] != n:
            problems.append(f"it says {state['size']} leaves, ledger_leaves holds {n}")
        if n and state["position"] != lf_pos[-1]:
            problems.append(
                f"it says the last integrated position is {state['position']}, the last leaf holds {lf_pos[-1]}"
            )
        frontier = bytes(state["frontier"])
        want = b"".join(_getter(levels)(lvl, i) for lvl, i in range_nodes(0, size))
        if frontier != want:
            problems.append("its frontier differs from the stored tree's")
        if bytes(state["root"]) != (root_at(size, _getter(levels)) if size else EMPTY_ROOT):
            problems.append("its root differs from the stored tree's")
        if problems:
            ok = False
            found("ledger_state_mismatch", "ledger_state disagrees with the stored tree: " + "; ".join(problems))
    return levels, ok, logged_position, done


def _leaf_rows_altered(
    audit: _Audit,
    state: Any,
    changed: list[int],
    lf_idx: array,
    lf_pos: array,
    lf_hash: bytes,
    ev_pos: array,
    ev_hash: bytes,
) -> set[int]:
    """Which of the `changed` leaves (event hash ≠ leaf hash) had their ledger_leaves row edited rather than
    their event: the event's hash, with its sibling leaf, still gives the stored parent node (or, for a lone
    last leaf, the stored frontier)."""
    by_idx = {lf_idx[k]: k for k in range(len(lf_idx))}
    size = int(state["size"]) if state is not None else len(lf_idx)
    parents = {lf_idx[k] >> 1 for k in changed if (lf_idx[k] ^ 1) < size}
    stored: dict[int, bytes] = {}
    if parents and "ledger_nodes" in audit.present:
        nd = ledger_nodes.c
        with audit.engine.connect() as conn:
            wanted = sorted(parents)
            for j in range(0, len(wanted), 500):
                rows = conn.execute(sa.select(nd.idx, nd.hash).where(nd.level == 1, nd.idx.in_(wanted[j : j + 500])))
                stored.update((int(i), bytes(h)) for i, h in rows)
    frontier = bytes(state["frontier"]) if state is not None else b""
    out = set()
    for k in changed:
        j = bisect_left(ev_pos, lf_pos[k])
        event_h = ev_hash[j * _H : (j + 1) * _H]
        idx = lf_idx[k]
        sibling = by_idx.get(idx ^ 1)
        if (idx ^ 1) < size and sibling is not None and (idx >> 1) in stored:
            sib_h = lf_hash[sibling * _H : (sibling + 1) * _H]
            pair = event_h + sib_h if idx % 2 == 0 else sib_h + event_h
            if pair_level(pair) == stored[idx >> 1]:
                out.add(k)
        elif idx == size - 1 and size % 2 == 1 and frontier[-_H:] == event_h:
            out.add(k)
    return out


def _check_checkpoints(
    audit: _Audit,
    rows: list[Any],
    verifier: Verifier | None,
    chain: KeyChain | None,
    ev_pos: array,
    n_ev: int,
    recomputed_root: Callable[[int], bytes],
) -> None:
    found = audit.found
    audit.info["checkpoints"] = len(rows)
    if verifier is None and rows:
        audit.info["checkpoint_key"] = "none: signatures were not checked (pass --vkey)"
    problems = dict(chain.problems) if chain is not None else {}
    good_sizes: list[int] = []
    bad: list[tuple[Any, Checkpoint]] = []
    for i, row in enumerate(rows):
        where = f"checkpoint #{row.id} (issued {row.issued_at:%Y-%m-%d %H:%M:%S})"
        if i in problems:
            found("checkpoint_bad_signature", f"{where}: key rotation does not hold: {problems[i]}")
        key = chain.signer[i] if chain is not None else None
        if verifier is not None and key is None:
            found(
                "checkpoint_bad_signature",
                f"{where} is signed by a log key that no rotation signed by both keys links to {verifier.vkey}",
            )
            continue
        try:
            if key is not None:
                cp = open_checkpoint(row.note, Verifier.from_vkey(key), verifier.name)  # type: ignore[union-attr]  # key comes from the chain, built only with a verifier
            else:
                cp = Checkpoint.parse(parse_note(row.note)[0])
        except (InvalidSignatureError, UnverifiedNoteError) as e:
            found("checkpoint_bad_signature", f"{where}: the signature does not verify with {key}: {e}")
            continue
        except (NoteError, CheckpointError) as e:
            found("checkpoint_malformed", f"{where} is not a valid checkpoint of this log: {e}")
            continue
        if (cp.size, cp.root_hash) != (row.size, bytes(row.root)):
            found(
                "checkpoint_malformed",
                f"{where}: the size/root columns ({row.size}, {_b64(bytes(row.root))}) "
                f"differ from the signed note ({cp.size}, {_b64(cp.root_hash)})",
            )
        if cp.size <= n_ev and recomputed_root(cp.size) == cp.root_hash:
            good_sizes.append(cp.size)
        else:
            bad.append((row, cp))
    good_sizes.sort()
    for row, cp in bad:
        where = f"checkpoint #{row.id} (size {cp.size}, issued {row.issued_at:%Y-%m-%d %H:%M:%S})"
        if cp.size > n_ev:
            found(
                "checkpoint_root_mismatch",
                f"{where} covers {cp.size} events but the record holds only {n_ev}: events it signed were deleted",
            )
            continue
        g = good_sizes[bisect_left(good_sizes, cp.size) - 1] if good_sizes and good_sizes[0] < cp.size else 0
        lo, hi = ev_pos[g], ev_pos[cp.size - 1]
        found(
            "checkpoint_root_mismatch",
            f"{where} signs root {_b64(cp.root_hash)}, the events give {_b64(recomputed_root(cp.size))}: "
            f"among leaves {g}–{cp.size - 1} (today's log positions {lo}–{hi}) an event was altered, deleted, "
            f"inserted or moved after this checkpoint was signed"
            + (f" (checkpoints up to size {g} still match)" if g else ""),
            position=lo,
        )
