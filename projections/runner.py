"""Running projections: catch up, follow, rebuild, report status.

Each batch of rows and the projection's new position are written in one transaction, so a crash never loses
or double-applies an event, and a restart carries on from the stored position. On PostgreSQL several workers
may run against one database: a session advisory lock makes each projection processed by one worker at a time,
and followers wake on the library's LISTEN/NOTIFY subscription; on SQLite the worker polls.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import threading
import zlib
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, func, inspect, select, text

from projections.base import Projection, ProjectionHalted, VerifyingReader
from projections.patient_state import SubjectFolder
from projections.schema import halted_streams, metadata, projection_tracking
from sle_events.store.record import StudyRecord
from sle_events.store.streams import split_streams

BATCH = 2000
REBUILDING = -1  # a projection's position while it is being rebuilt
ANALYZE_AFTER = 10_000  # events applied in one catch-up after which the tables' statistics are refreshed
REBUILD_BATCH = 10000  # a rebuild commits less often: its rows only count once every range is done


class SchemaBehind(RuntimeError):
    """The database's read-model tables are from an earlier revision: `sle db upgrade` first."""


class RebuildFailed(RuntimeError):
    """A rebuild worker process died without an answer (killed, out of memory): nothing of the rebuild counts."""


def _schema_behind(engine: Engine) -> str | None:
    """What an older revision left that the read models cannot work with, if anything."""
    inspector = inspect(engine)
    names = set(inspector.get_table_names())
    if "audit_trail" in names:
        return "audit_trail is a table (revision 0002), now a view"
    for table in metadata.sorted_tables:
        if table.name in names:
            missing = {c.name for c in table.c} - {c["name"] for c in inspector.get_columns(table.name)}
            if missing:
                return f"{table.name} lacks {', '.join(sorted(missing))}"
    return None


def all_projections() -> list[Projection]:
    from projections.audit_trail import AuditTrail

    found: list[Projection] = [AuditTrail()]
    try:
        from projections.dashboard import StudyDashboard
        from projections.patient_state import PatientState

        found += [PatientState(), StudyDashboard()]
    except ImportError:
        pass
    from projections.casebook import CasebookReview

    found.append(CasebookReview())
    from projections.review import ReviewActs, SdvFacts  # SDV and queries

    found += [ReviewActs(), SdvFacts()]
    return found


class ProjectionRunner:
    def __init__(self, url: str, projections: Sequence[Projection] | None = None, *, batch: int = BATCH) -> None:
        self.record = StudyRecord(url)
        self.engine = self.record.engine
        self.events = self.record.table
        self.projections = list(projections) if projections is not None else all_projections()
        for p in self.projections:
            p.bind(self.record)
        self.batch = batch
        self.is_postgres = self.engine.dialect.name == "postgresql"
        behind = _schema_behind(self.engine)
        if behind:
            self.record.close()
            raise SchemaBehind(
                f"{self.record.url}: the read models are from an earlier schema revision "
                f"({behind}); run `sle db upgrade` first"
            )
        metadata.create_all(self.engine, checkfirst=True)
        self._owner: Connection | None = None
        self.stopping = threading.Event()

    def close(self) -> None:
        if self._owner is not None:
            # The connection goes back to a pool, where its session (and locks) would live on.
            self._owner.execute(text("select pg_advisory_unlock_all()"))
            self._owner.commit()
            self._owner.close()
            self._owner = None
        self.record.close()
        self.engine.dispose()

    # --- positions -------------------------------------------------------------------------------------
    def position(self, name: str, conn: Connection | None = None) -> int:
        q = select(projection_tracking.c.position).where(projection_tracking.c.name == name)
        if conn is not None:
            return conn.execute(q).scalar() or 0
        with self.engine.connect() as c:
            return c.execute(q).scalar() or 0

    def head(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(select(func.max(self.events.c.id))).scalar() or 0

    def halted(self, name: str, conn: Connection | None = None) -> ProjectionHalted | None:
        """What stopped the projection, if it is stopped (a broken chain or bad signature it met)."""
        q = select(projection_tracking.c.halted).where(projection_tracking.c.name == name)
        if conn is not None:
            stored = conn.execute(q).scalar()
        else:
            with self.engine.connect() as c:
                stored = c.execute(q).scalar()
        return ProjectionHalted(**json.loads(stored)) if stored else None

    def status(self) -> list[dict[str, object]]:
        head = self.head()
        rows = []
        with self.engine.connect() as conn:
            for p in self.projections:
                pos = self.position(p.name, conn)
                behind = conn.execute(select(func.count()).where(self.events.c.id > pos)).scalar() or 0
                updated = conn.execute(
                    select(projection_tracking.c.updated_at).where(projection_tracking.c.name == p.name)
                ).scalar()
                halted = self.halted(p.name, conn)
                streams = conn.execute(
                    select(
                        halted_streams.c.stream,
                        halted_streams.c.subject,
                        halted_streams.c.version,
                        halted_streams.c.position,
                        halted_streams.c.detail,
                    )
                    .where(halted_streams.c.projection == p.name)
                    .order_by(halted_streams.c.position)
                ).all()
                rows.append(
                    {
                        "projection": p.name,
                        "position": pos,
                        "head": head,
                        "lag_events": behind,
                        "updated_at": updated,
                        "halted": str(halted) if halted else None,
                        "halted_streams": [dict(r._mapping) for r in streams],
                    }
                )
        return rows

    # --- processing ------------------------------------------------------------------------------------
    def catch_up(self, on_progress: Callable[[int, int], None] | None = None) -> int:
        """Project every event not yet projected; return how many events were read and applied.

        Projections at the same position are processed together: each batch is read and chain-checked once,
        subjects are folded once, and every projection's rows and position are written in one transaction."""
        done = 0
        groups: dict[int, list[Projection]] = {}
        for p in self.projections:
            if self._own(p):
                groups.setdefault(self.position(p.name), []).append(p)
        interrupted = groups.pop(REBUILDING, [])
        for p in interrupted:
            halted = self.halted(p.name)
            if halted is not None:  # rebuilding again would stop at the same event: say why, and wait for
                raise halted  # `sle projections rebuild` once the record is repaired
        if interrupted:  # a rebuild stopped half-way: its tables are incomplete, so build them again
            self.rebuild([p.name for p in interrupted], on_progress)
            return self.head()
        for group in groups.values():
            reader = VerifyingReader(self.events)
            _fold_once(group, reader)
            try:
                while True:
                    applied = self._step(group, reader)
                    if not applied:
                        break
                    done += applied
                    if on_progress:
                        on_progress(self.position(group[0].name), self.head())
            except ProjectionHalted as halted:
                self._halt([p.name for p in group], halted)
                raise
        if done >= ANALYZE_AFTER:
            self.analyze(self.projections)
        return done

    def analyze(self, projections: Sequence[Projection]) -> None:
        """Refresh the planner's statistics of these projections' tables after a bulk load. Without them
        PostgreSQL (autovacuum off, or not yet round) planned an audit-trail filter on 160,000 fresh rows as if
        they were a few hundred: 2.9 s instead of 3 ms."""
        tables = sorted({t.name for p in projections for t in p.tables})
        with self.engine.begin() as conn:
            for name in tables:
                conn.exec_driver_sql(f'ANALYZE "{name}"')

    def _halt(self, names: Sequence[str], halted: ProjectionHalted) -> None:
        """Keep why the projections stopped (the batch that met it was rolled back), for status and readers."""
        stored = json.dumps(
            {"position": halted.position, "stream": halted.stream, "version": halted.version, "detail": halted.detail}
        )
        with self.engine.begin() as conn:
            for name in names:
                self._lock_position(conn, name)
                conn.execute(
                    projection_tracking.update()
                    .where(projection_tracking.c.name == name)
                    .values(halted=stored, updated_at=_now())
                )

    def _step(self, group: Sequence[Projection], reader: VerifyingReader) -> int:
        with self.engine.begin() as conn:
            positions = {self._lock_position(conn, p.name) for p in group}
            if len(positions) != 1:  # another worker moved one of them: regroup on the next pass
                return 0
            facts = reader.read(conn, positions.pop(), self.batch)
            if not facts:
                return 0
            for p in group:
                p.apply(conn, facts)
                self._save_position(conn, p.name, facts[-1].position)
        return len(facts)

    def _lock_position(self, conn: Connection, name: str) -> int:
        t = projection_tracking
        if self.is_postgres:
            row = conn.execute(select(t.c.position).where(t.c.name == name).with_for_update()).first()
        else:
            conn.exec_driver_sql("select 1")  # SQLite: serialised by its single writer
            row = conn.execute(select(t.c.position).where(t.c.name == name)).first()
        if row is None:
            conn.execute(t.insert().values(name=name, position=0, updated_at=_now()))
            return 0
        return row[0]

    def _save_position(self, conn: Connection, name: str, position: int) -> None:
        t = projection_tracking
        conn.execute(t.update().where(t.c.name == name).values(position=position, updated_at=_now(), halted=None))

    def _own(self, projection: Projection) -> bool:
        """On PostgreSQL, hold a session advisory lock per projection: one worker processes it at a time."""
        if not self.is_postgres:
            return True
        if self._owner is None:
            self._owner = self.engine.connect()
        key = zlib.crc32(f"sle-projection:{projection.name}".encode())
        got = self._owner.execute(text("select pg_try_advisory_lock(:k)"), {"k": key}).scalar()
        self._owner.commit()
        return bool(got)

    # --- rebuild ---------------------------------------------------------------------------------------
    def rebuild(
        self,
        names: Iterable[str] | None = None,
        on_progress: Callable[[int, int], None] | None = None,
        *,
        workers: int | None = None,
    ) -> None:
        """Drop and rebuild from event 1, one process per range of streams; positions are marked REBUILDING
        until every range is done, so an interrupted rebuild is started again rather than continued from a
        half-built table."""
        wanted = set(names) if names else None
        chosen = [p for p in self.projections if wanted is None or p.name in wanted]
        unknown = (wanted or set()) - {p.name for p in self.projections}
        if unknown:
            raise ValueError(f"unknown projections {sorted(unknown)}; known: {[p.name for p in self.projections]}")
        dropped = [i for p in chosen for t in p.tables for i in t.indexes if i.name in p.reader_indexes]
        with self.engine.begin() as conn:
            for p in chosen:
                self._lock_position(conn, p.name)
                p.reset(conn)
                self._save_position(conn, p.name, REBUILDING)
            for index in dropped:
                index.drop(conn, checkfirst=True)
        for p in chosen:
            p.forget()
        head = self.head()
        # Rows of one stream depend only on that stream, so ranges of streams are rebuilt side by side. (On
        # SQLite they queue for its one writer, but the writes are small: the time goes in folding subjects.)
        ranges = split_streams(self.engine, self.events, workers or os.cpu_count() or 1)
        chosen_names = [p.name for p in chosen]
        done = 0

        def advance(n: int) -> None:
            nonlocal done
            done += n
            if on_progress:
                on_progress(min(done, head), head)  # positions may have gaps: count, capped

        # A projection whose rows join several streams (`partitionable = False`) reads the whole log in one pass.
        whole = [p for p in chosen if not p.partitionable]
        parted = [p for p in chosen if p.partitionable]
        try:
            if whole:
                _project_range(self, whole, (None, None), head, advance if not parted else None)
            if not parted:
                pass
            elif len(ranges) == 1:
                _project_range(self, parted, ranges[0], head, advance)
            else:
                self._rebuild_in_workers([p.name for p in parted], ranges, head, advance if on_progress else None)
        except ProjectionHalted as halted:
            self._halt(chosen_names, halted)
            raise
        with self.engine.begin() as conn:
            for name in chosen_names:
                self._save_position(conn, name, head)
            for index in dropped:
                index.create(conn, checkfirst=True)
        self.analyze(chosen)
        if on_progress:
            on_progress(head, head)
        saved, self.projections = self.projections, chosen
        try:
            self.catch_up(on_progress)  # anything appended meanwhile
        finally:
            self.projections = saved

    def _rebuild_in_workers(
        self, names: list[str], ranges: list[tuple[object, object]], head: int, advance: Callable[[int], None] | None
    ) -> None:
        """One process per range. The first failure stops the others (between batches) and is raised here;
        a worker that dies without an answer raises RebuildFailed rather than leaving us waiting."""
        self.engine.dispose()  # the workers are forked: they must not share our connections
        ctx = multiprocessing.get_context("fork")
        with ctx.Manager() as manager, ProcessPoolExecutor(len(ranges), mp_context=ctx) as pool:
            queue = manager.Queue() if advance else None
            stop = manager.Event()
            pending = [pool.submit(_rebuild_worker, self.record.url, names, r, head, queue, stop) for r in ranges]
            failure: BaseException | None = None
            try:
                while True:
                    finished, _ = wait(pending, timeout=0.05, return_when=FIRST_EXCEPTION)
                    while queue is not None and not queue.empty():
                        advance(queue.get())  # type: ignore[misc]  # queue is only made when advance is set
                    failed = [f.exception() for f in finished if f.exception() is not None]
                    if failed and failure is None:
                        failure = failed[0]
                        stop.set()
                    if len(finished) == len(pending):
                        break
            except BaseException:  # Ctrl-C: the workers stop at their next batch
                stop.set()
                raise
        if isinstance(failure, BrokenProcessPool):
            raise RebuildFailed(
                f"a rebuild worker process died ({failure}); nothing of the rebuild counts: run it again"
            ) from failure
        if failure is not None:
            raise failure

    # --- following -------------------------------------------------------------------------------------
    def run_forever(self, poll_seconds: float = 0.5, on_batch: Callable[[int], None] | None = None) -> None:
        """Catch up, then follow new events until `stop()`: LISTEN/NOTIFY on PostgreSQL, polling on SQLite."""
        while not self.stopping.is_set():
            applied = self.catch_up()
            if on_batch and applied:
                on_batch(applied)
            if self.is_postgres:
                self._wait_for_notification(poll_seconds)
            else:
                self.stopping.wait(poll_seconds)

    def _wait_for_notification(self, timeout: float) -> None:
        start = min(self.position(p.name) for p in self.projections) if self.projections else 0
        subscription = self.record.recorder.subscribe(gt=start)
        waiter = threading.Thread(target=lambda: next(iter(subscription), None), daemon=True)
        waiter.start()
        waiter.join(timeout)
        subscription.stop()

    def stop(self) -> None:
        self.stopping.set()


def _project_range(
    runner: ProjectionRunner,
    projections: Sequence[Projection],
    streams: tuple[object, object],
    head: int,
    advance: Callable[[int], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> None:
    """Project the events of a range of streams up to `head`, batch by batch (positions are set by the caller);
    `advance(n)` after each batch of n events; `stop()` true: give up between batches (another range failed)."""
    reader = VerifyingReader(runner.events)
    _fold_once(projections, reader)
    for p in projections:
        p.hold_back()
    after = 0
    try:
        while True:
            if stop is not None and stop():
                for p in projections:
                    p.forget()
                return
            with runner.engine.begin() as conn:
                facts = reader.read(conn, after, REBUILD_BATCH, streams=streams, upto=head)
                if not facts:
                    for p in projections:
                        p.flush(conn)
                    return
                for p in projections:
                    p.apply(conn, facts)
            after = facts[-1].position
            if advance:
                advance(len(facts))
    except BaseException:
        for p in projections:
            p.forget()  # what was folded or held back is not in the tables: drop it, the rebuild starts again
        raise


def _fold_once(projections: Sequence[Projection], reader: VerifyingReader) -> None:
    """Projections that fold subjects share one folder: each subject is folded once per fact."""
    folders = [p for p in projections if hasattr(p, "share")]
    if folders:
        shared = SubjectFolder(reader)
        for p in folders:
            p.share(shared)


def _rebuild_worker(
    url: str, names: list[str], streams: tuple[object, object], head: int, queue: Any, stop: Any
) -> None:
    runner = ProjectionRunner(url, [p for p in all_projections() if p.name in names])
    try:
        _project_range(runner, runner.projections, streams, head, queue.put if queue is not None else None, stop.is_set)
    finally:
        runner.close()


def _now() -> str:
    return datetime.now(UTC).isoformat()
