"""`sle verify`: one verifier, built from the auditor's explicit trust root, that reports every finding.

Its checks, in the order they run (as sigstore-python's `Verifier` numbers its own):

1. The trust root is usable: the log's vkey parses, every saved checkpoint (and the `--since` one) verifies
   with it. Otherwise `UnusableInput` (exit 2) before any row is read.
2. The record: each study's registry stream, replayed from its `Study.Created` (which must name an admin key
   of the trust root, when one is given), then every other stream in parallel: canonical form, row, topic,
   chain, key, role, signature (`record_check`). With `since`, only the events after the saved checkpoint
   are checked this way; every earlier event is re-hashed against its ledger leaf in step 3.
   Then every investigator's sign-off: the data it covers must still hash to its signed content hash
   (`signoff_check`: `signed_content_changed`).
3. The ledger: the tree recomputed from every stored event against the leaves, nodes, state and stored
   checkpoints, the saved checkpoints and how long events wait for integration (`ledger_check`). It runs
   whenever the database has (or had) a ledger or the trust root names a log.

Exit codes come from `sle_events.audit.errors.exit_code` alone.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy import func, select

from sle_events.audit.errors import UnusableInput
from sle_events.audit.findings import Finding, Report
from sle_events.audit.ledger_check import verify_ledger
from sle_events.audit.record_check import (
    BATCH,
    StreamChecker,
    Timelines,
    build_registry_timelines,
    heads_at,
    registry_streams,
)
from sle_events.audit.signoff_check import check_signoffs
from sle_events.audit.trust import TrustRoot
from sle_events.ledger.tables import EVENTS_TABLE, LEDGER_TABLES, events_table
from sle_events.store.streams import split_streams

__all__ = ["Verifier", "verify_record", "DEFAULT_PENDING_LIMIT"]

DEFAULT_PENDING_LIMIT = timedelta(minutes=15)
"""Events waiting for integration longer than this are a finding (`ledger_pending_too_long`)."""


class Verifier:
    """Verifies study records against one trust root. ``Verifier(TrustRoot.load(vkey=..., checkpoints=...))``."""

    def __init__(
        self,
        trust: TrustRoot | None = None,
        *,
        workers: int | None = None,
        pending_limit: timedelta | None = DEFAULT_PENDING_LIMIT,
    ) -> None:
        self.trust = trust or TrustRoot()
        self.workers = workers or os.cpu_count() or 1
        self.pending_limit = pending_limit

    def verify(self, url: str, *, on_progress: Callable[[int, int], None] | None = None) -> Report:
        """Every finding about the record at `url` (and its ledger); `UnusableInput` if there is no record."""
        started = time.perf_counter()
        report = Report()
        engine = sa.create_engine(url)
        try:
            names = set(sa.inspect(engine).get_table_names())
            if EVENTS_TABLE not in names:
                raise UnusableInput(f"no study record at {url}: table {EVENTS_TABLE} does not exist")
            table = events_table()
            has_ledger = self.trust.has_log or any(t in names for t in LEDGER_TABLES)
            after = self._since_position(engine, table, report) if self.trust.since else 0
            with engine.connect() as conn:
                total = conn.execute(select(func.count()).select_from(table).where(table.c.id > after)).scalar() or 0
            # -- 2. the record
            registries = registry_streams(engine, table)
            timelines, registry_events = build_registry_timelines(
                engine, table, report.findings, registries=registries, admin_keys=self.trust.admin_keys
            )
            report.studies = len(timelines)
            if on_progress:
                on_progress(registry_events, total + registry_events)
            ranges = split_streams(engine, table, self.workers, exclude=registries)
        finally:
            engine.dispose()
        done, events, streams = self._check_streams(
            url, ranges, registries, timelines, after, on_progress, registry_events, total + registry_events
        )
        report.findings.extend(done)
        # -- 2b. investigators' sign-offs: the data they signed still hash to what they signed
        engine = sa.create_engine(url)
        try:
            with engine.connect() as conn:
                report.findings.extend(check_signoffs(conn, table))
        finally:
            engine.dispose()
        report.events = registry_events + events
        report.streams = streams + len(registries)
        # -- 3. the ledger
        if has_ledger:
            base = report.events
            ledger = verify_ledger(
                url,
                trust=self.trust,
                pending_limit=self.pending_limit,
                on_progress=(lambda d, t: on_progress(base + d, base + t)) if on_progress else None,
            )
            report.findings.extend(ledger)
            report.ledger = ledger.info
        report.findings.sort(key=lambda f: (f.position or 0, f.stream or "", f.version or 0))
        report.seconds = time.perf_counter() - started
        return report

    def _since_position(self, engine: Any, table: Any, report: Report) -> int:
        """The log position of the last event the `since` checkpoint covers (0: it covers none)."""
        label, cp = self.trust.since[0], self.trust.since_checkpoint  # type: ignore[index]  # called only with --since
        assert cp is not None
        report.since = {"checkpoint": label, "size": cp.size, "position": 0}
        if cp.size == 0:
            return 0
        with engine.connect() as conn:
            position = conn.execute(select(table.c.id).order_by(table.c.id).offset(cp.size - 1).limit(1)).scalar()
            # Every event up to here is re-hashed against its leaf by the ledger check (no signature checks).
            report.since["rehashed"] = conn.execute(
                select(func.count()).select_from(table).where(table.c.id <= (position or 0))
            ).scalar()
        # A log now shorter than the checkpoint is a finding of the ledger check; check everything here.
        report.since["position"] = position or 0
        return position or 0

    def _check_streams(
        self,
        url: str,
        ranges: list[Any],
        registries: list[Any],
        timelines: Timelines,
        after: int,
        on_progress: Callable[[int, int], None] | None,
        done: int,
        total: int,
    ) -> tuple[list[Finding], int, int]:
        global _TIMELINES
        _TIMELINES = timelines  # set before forking so workers inherit it without pickling
        args = [(url, lo, hi, registries, after) for lo, hi in ranges]
        if len(args) == 1:
            results = [_check_range(*args[0], None)]
        else:
            ctx = multiprocessing.get_context("fork")
            with ctx.Manager() as manager, ctx.Pool(len(args)) as pool:
                queue = manager.Queue() if on_progress else None
                pending = [pool.apply_async(_check_range, (*a, queue)) for a in args]
                while not all(p.ready() for p in pending):
                    if queue is not None:
                        while not queue.empty():
                            done += queue.get()
                            on_progress(done, total)  # type: ignore[misc]  # queue is only made when on_progress is set
                    time.sleep(0.05)
                results = [p.get() for p in pending]
        findings = [f for r in results for f in r[0]]
        events = sum(r[1] for r in results)
        if on_progress:
            on_progress(total, total)
        return findings, events, sum(r[2] for r in results)


_TIMELINES: Timelines = {}


def _check_range(
    url: str, lo: Any, hi: Any, registries: list[Any], after: int, progress: Any
) -> tuple[list[Finding], int, int]:
    engine = sa.create_engine(url)
    table = events_table()
    query = select(table.c.id, table.c.originator_id, table.c.originator_version, table.c.topic, table.c.state)
    if registries:
        query = query.where(table.c.originator_id.not_in(registries))
    if lo is not None:
        query = query.where(table.c.originator_id >= lo)
    if hi is not None:
        query = query.where(table.c.originator_id < hi)
    heads: dict[str, tuple[int, str]] = {}
    if after:
        query = query.where(table.c.id > after)
        with engine.connect() as conn:
            touched = list(conn.execute(query.with_only_columns(table.c.originator_id).distinct()).scalars())
            heads = heads_at(conn, table, touched, after)
    query = query.order_by(table.c.originator_id, table.c.originator_version)
    checker = StreamChecker(_TIMELINES, heads)
    streams = 0
    last_stream = None
    done = 0
    try:
        with engine.connect() as conn:
            result = conn.execution_options(stream_results=True, yield_per=BATCH).execute(query)
            for position, stream_id, version, topic, state in result:
                if stream_id != last_stream:
                    streams += 1
                    last_stream = stream_id
                checker.check(position, stream_id, version, topic, bytes(state))
                done += 1
                if done == BATCH:
                    if progress is not None:
                        progress.put(done)
                    done = 0
        if progress is not None and done:
            progress.put(done)
    finally:
        engine.dispose()
    return checker.findings, checker.events, streams


def verify_record(
    url: str,
    *,
    workers: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    checkpoint: Any = None,
    vkey: Any = None,
    since: Any = None,
    admin_keys: Any = (),
    pending_limit: timedelta | None = DEFAULT_PENDING_LIMIT,
) -> Report:
    """Verify every event in the database at `url`; `on_progress(done, total)` is called as work advances.

    `checkpoint`: checkpoints an auditor saved (path, note text or a list); `vkey`: the log's vkey; `since`: a
    checkpoint up to which the record was verified before (incremental verification). Bad auditor input raises
    `UnusableInput` (a ValueError) before any work."""
    trust = TrustRoot.load(admin_keys=admin_keys, vkey=vkey, checkpoints=checkpoint, since=since)
    return Verifier(trust, workers=workers, pending_limit=pending_limit).verify(url, on_progress=on_progress)
