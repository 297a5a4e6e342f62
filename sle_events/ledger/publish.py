"""Stage 3: sign checkpoints of the integrated tree (and hand the log to a new key); `run` loops stages 2-3."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from .base import _STATE_ID, BATCH, LedgerError, StoredCheckpoint, _utcnow
from .checkpoint import KEY_ROTATION, Checkpoint, sign_checkpoint
from .merkle import CompactRange, range_nodes
from .note import Signer
from .tables import ledger_checkpoints, ledger_state

INTEGRATE_EVERY = 0.5
"""Seconds between integrations in `run`: new events get their leaves almost at once."""


if TYPE_CHECKING:  # the mixin works on LedgerBase's state; at run time Ledger inherits both
    from .base import LedgerBase as _Ledger
else:
    _Ledger = object


class Publishing(_Ledger):
    """`Ledger.checkpoint`, `Ledger.rotate_key`, `Ledger.run`."""

    if TYPE_CHECKING:  # Integrating's, which Ledger also inherits

        def integrate(
            self,
            limit: int | None = None,
            *,
            batch: int = BATCH,
            on_progress: Callable[[int, int], None] | None = None,
        ) -> int: ...

    def rotate_key(self, old: Signer, new: Signer) -> StoredCheckpoint:
        """Hand the log to a new key (same origin): a checkpoint of the current tree whose extension line names
        the old and the new vkey, signed by both. Later checkpoints are signed by the new key alone; an auditor
        holding either vkey follows the rotation (`verify_ledger`). Refused like `checkpoint`, and if ``old``
        is not the log's key or ``new`` is not another key of its origin."""
        return self.checkpoint(old, rotate_to=new)

    def checkpoint(
        self, signer: Signer, origin: str | None = None, *, rotate_to: Signer | None = None
    ) -> StoredCheckpoint:
        """Sign and store a checkpoint for the current integrated size (`rotate_key` passes ``rotate_to``).

        Refuses (:class:`LedgerError`, nothing stored) if ``origin`` is not the key's name, if the ledger was
        already signed by another key or for another origin, or if the stored tree no longer reproduces the
        frontier or the last checkpoint's root (the ledger tables were altered: the log key must not sign
        over that).
        """
        origin = signer.name if origin is None else origin
        if origin != signer.name:
            raise LedgerError(
                f"origin {origin!r} differs from the log key's name {signer.name!r}; "
                "the log key is made for one origin (sle ledger init --origin)"
            )
        if rotate_to is not None and (rotate_to.name != origin or rotate_to.vkey == signer.vkey):
            raise LedgerError(f"the new log key must be another key for origin {origin!r} (given {rotate_to.vkey})")
        vkey = signer.vkey
        with self.engine.begin() as conn:
            st = self._read_state(conn, lock=True)
            if st.vkey is not None and st.vkey != vkey:
                raise LedgerError(f"this ledger is signed by {st.vkey}, not by the given key ({vkey})")
            if st.origin is not None and st.origin != origin:
                raise LedgerError(f"this ledger's origin is {st.origin!r}, not {origin!r}")
            if st.size:
                ids = range_nodes(0, st.size)
                nodes = self._fetch_nodes(conn, ids)
                if tuple(nodes[nid] for nid in ids) != st.frontier.hashes:
                    raise LedgerError(
                        "ledger_nodes do not reproduce the stored frontier: the ledger tables were "
                        "altered; run `sle verify` before signing anything"
                    )
            root = CompactRange.from_state(st.frontier).root()
            if root != st.root:
                raise LedgerError("ledger_state root does not match its frontier: run `sle verify`")
            last = self._latest_checkpoint(conn)
            if last is not None:
                if last.size > st.size:
                    raise LedgerError(
                        f"the last checkpoint covers {last.size} leaves but the tree has only "
                        f"{st.size}: the ledger was truncated; run `sle verify`"
                    )
                if self._root_at(conn, last.size) != last.root:
                    raise LedgerError(
                        f"the stored tree at size {last.size} no longer has the root of checkpoint "
                        f"#{last.id}: the ledger was altered; run `sle verify`"
                    )
            if rotate_to is None:
                note = sign_checkpoint(Checkpoint(origin, st.size, root), signer)
            else:
                rotation = f"{KEY_ROTATION} {vkey} {rotate_to.vkey}"
                note = sign_checkpoint(Checkpoint(origin, st.size, root, (rotation,)), signer, rotate_to)
            issued = _utcnow()
            new_id = conn.execute(
                ledger_checkpoints.insert()
                .values(size=st.size, root=root, note=note, issued_at=issued)
                .returning(ledger_checkpoints.c.id)
            ).scalar_one()
            if rotate_to is not None:
                conn.execute(
                    ledger_state.update()
                    .where(ledger_state.c.id == _STATE_ID)
                    .values(vkey=rotate_to.vkey, origin=origin)
                )
            elif st.vkey is None or st.origin is None:
                conn.execute(
                    ledger_state.update().where(ledger_state.c.id == _STATE_ID).values(vkey=vkey, origin=origin)
                )
        return StoredCheckpoint(new_id, st.size, root, note, issued)

    # --- periodic mode ----------------------------------------------------------------------------------
    def run(
        self,
        signer: Signer,
        interval: float = 5.0,
        *,
        origin: str | None = None,
        stop: threading.Event | None = None,
        batch: int = BATCH,
        integrate_every: float = INTEGRATE_EVERY,
        on_cycle: Callable[[int, StoredCheckpoint | None], None] | None = None,
        on_error: Callable[[Exception], None] | None = None,
    ) -> None:
        """Integrate new events every ``integrate_every`` seconds and sign a checkpoint every ``interval``
        seconds (when the tree grew) until ``stop`` is set (or SIGINT/SIGTERM).

        Integrating continuously keeps short the window in which an appended event can be deleted by SQL
        without a trace (README, "Ledger"). Database outages are reported through ``on_error`` and retried
        next cycle; anything else (e.g. an altered ledger) ends the loop.
        """
        if interval <= 0 or integrate_every <= 0:
            raise ValueError("interval must be positive")
        stop = stop or threading.Event()
        signed_at = None
        with _stop_on_signals(stop):
            while not stop.is_set():
                try:
                    added = self.integrate(batch=batch)
                    issued = None
                    if signed_at is None or time.monotonic() - signed_at >= interval:
                        latest = self.latest_checkpoint()
                        size = self.size
                        if size and (latest is None or latest.size != size):
                            issued = self.checkpoint(signer, origin)
                        signed_at = time.monotonic()
                    if on_cycle is not None:
                        on_cycle(added, issued)
                except (sa.exc.OperationalError, sa.exc.InterfaceError) as e:
                    if on_error is None:
                        raise
                    on_error(e)
                stop.wait(min(interval, integrate_every))


@contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum: int, frame: Any) -> None:
        stop.set()

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
