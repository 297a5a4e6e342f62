"""Stage 2 of the log (after `StudyRecord.append`): the single sequencer gives new events the next leaf indexes.

Each batch (leaves, new perfect subtrees, new frontier) is one transaction under the ledger lock, with the
events read and hashed before the lock is taken (see `sle_events.ledger.log`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from .base import _STATE_ID, BATCH, LedgerState, _frontier_bytes, _utcnow
from .merkle import CompactRange, leaf_hash
from .tables import ledger_state


@dataclass
class _Batch:
    base: LedgerState
    leaves: list[tuple[int, int, bytes, str, int]]  # idx, position, leaf_hash, stream, version
    nodes: list[tuple[int, int, bytes]]  # level, idx, hash
    frontier: CompactRange
    last_position: int


if TYPE_CHECKING:  # the mixin works on LedgerBase's state; at run time Ledger inherits both
    from .base import LedgerBase as _Ledger
else:
    _Ledger = object


class Integrating(_Ledger):
    """`Ledger.integrate`."""

    def _prepare(self, conn: Connection, base: LedgerState, limit: int) -> _Batch:
        ev = self.events
        rows = conn.execute(
            sa.select(ev.c.id, ev.c.originator_id, ev.c.originator_version, ev.c.state)
            .where(ev.c.id > base.position)
            .order_by(ev.c.id)
            .limit(limit)
        ).all()
        cr = CompactRange.from_state(base.frontier)
        leaves: list[tuple[int, int, bytes, str, int]] = []
        nodes: list[tuple[int, int, bytes]] = []
        append = cr.append
        for position, stream, version, state in rows:
            created = append(leaf_hash(state))
            _, idx, lh = created[0]
            leaves.append((idx, position, lh, str(stream), version))
            nodes.extend(created[1:])
        last = rows[-1][0] if rows else base.position
        return _Batch(base, leaves, nodes, cr, last)

    def _bulk_insert(self, conn: Connection, table: str, columns: tuple[str, ...], rows: list[tuple[Any, ...]]) -> None:
        """Rows straight to the driver: COPY on PostgreSQL, executemany on SQLite (least CPU on both sides)."""
        if not rows:
            return
        if self.dialect == "postgresql":
            with (
                conn.connection.driver_connection.cursor() as cursor,  # type: ignore[union-attr]  # open: never None
                cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy,
            ):
                for row in rows:
                    copy.write_row(row)
        else:
            marks = ", ".join("?" * len(columns))
            conn.exec_driver_sql(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", rows)

    def _integrate_once(self, limit: int) -> int:
        with self.engine.connect() as conn:  # read and hash outside the lock
            base = self._read_state(conn)
            batch = self._prepare(conn, base, limit)
            conn.rollback()
        if not batch.leaves:
            return 0
        with self.engine.begin() as conn:
            locked = self._read_state(conn, lock=True)
            if not locked.same_tree(base):  # another integrator got there first: redo from its state
                batch = self._prepare(conn, locked, limit)
                if not batch.leaves:
                    return 0
            self._bulk_insert(
                conn, "ledger_leaves", ("idx", "position", "leaf_hash", "stream", "version"), batch.leaves
            )
            self._bulk_insert(conn, "ledger_nodes", ("level", "idx", "hash"), batch.nodes)
            new = batch.frontier.to_state()
            conn.execute(
                ledger_state.update()
                .where(ledger_state.c.id == _STATE_ID)
                .values(
                    size=new.size,
                    position=batch.last_position,
                    frontier=_frontier_bytes(new),
                    root=batch.frontier.root(),
                    updated_at=_utcnow(),
                )
            )
        return len(batch.leaves)

    def integrate(
        self,
        limit: int | None = None,
        *,
        batch: int = BATCH,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> int:
        """Integrate up to ``limit`` (default: all) not yet integrated events; return how many.

        Each batch of at most ``batch`` events is one transaction. ``on_progress(done, total)`` is called
        after each committed batch.
        """
        if batch < 1:
            raise ValueError("batch must be at least 1")
        if limit is not None and limit < 0:
            raise ValueError("limit must not be negative")
        total = self.pending() if on_progress is not None else 0
        if limit is not None:
            total = min(total, limit)
        done = 0
        while limit is None or done < limit:
            step = batch if limit is None else min(batch, limit - done)
            added = self._integrate_once(step)
            if not added:
                break
            done += added
            if on_progress is not None:
                on_progress(done, max(total, done))
        return done
