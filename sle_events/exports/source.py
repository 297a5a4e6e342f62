"""What every export reads: the subjects in scope, each as its signed facts and the aggregate they fold to.

Read through the projections (`StudyReader`, the verifying stream reader, `fold`), so an export sees exactly
what the read models see: every event's chain and signature checked, corrections applied, voided facts gone.
Signatures are verified once per checkpoint, not once per export: where a sealed, clean, full verification run
checked the tree the ledger's leaves still rebuild (`audit.results.vouched_tree`), an event whose stored bytes
hash to its leaf in that tree is one whose Ed25519 signature the run checked, so only its chain and its key's
authorisation are checked here; every other event (none vouched, or newer than that run) has its signature
checked one by one.
A subject's current records are the domain's own (`Subject.facts`); facts without a record (consent,
enrolment, an AE assessment...) are read from their signed payload.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

from sqlalchemy import inspect, select

from projections.base import Fact, VerifyingReader
from projections.read import StudyReader
from projections.replay import fold
from sle_events.audit.results import VouchedTree, vouched_tree
from sle_events.exports.scope import ExportScope
from sle_events.ledger.merkle import leaf_hash
from sle_events.ledger.tables import ledger_checkpoints, ledger_leaves
from sle_events.signing.envelope import parse_time

T = TypeVar("T")
MAX_WORKERS = 4
PARALLEL_FROM = 12  # fewer subjects than this are exported in-process (starting workers costs seconds)
CHUNK = 8  # subjects per task

__all__ = ["ExportSource", "SubjectData", "Item", "progress_counter", "publish", "partial"]


@dataclass(frozen=True)
class Item:
    """One current (not voided) fact of a subject: the signed event, its type, its record or payload."""

    fact: Fact
    type: str  # `LabResultRecorded` (the subject's fact type, without `Subject.`)
    record: Any  # the domain's current record (corrections applied), or None
    ledger_index: int | None

    @property
    def payload(self) -> dict[str, Any]:
        return self.fact.payload

    @property
    def version(self) -> int:
        return self.fact.version

    @property
    def occurred_at(self) -> datetime:
        if self.record is not None:
            return self.record.occurred_at  # every record carries it
        return parse_time("occurred_at", self.fact.envelope["occurred_at"])

    @property
    def recorded_at(self) -> datetime:
        return parse_time("recorded_at", self.fact.envelope["recorded_at"])


@dataclass
class SubjectData:
    """One subject in scope: its signed facts, the aggregate they fold to, and its current items."""

    stream: str
    screening_number: str
    site: str
    aggregate: Any
    facts: list[Fact]
    items: list[Item] = field(default_factory=list)
    ledger_index: dict[int, int] = field(default_factory=dict)  # version → leaf index

    def of(self, *types: str) -> list[Item]:
        return [i for i in self.items if i.type in types]

    def first(self, type_: str) -> Item | None:
        found = self.of(type_)
        return found[0] if found else None


class ExportSource:
    """The study and the subjects an export covers, read from `url` through the read models.

    `scope` (an `ExportScope`; resolved here if it is not yet) narrows it to a subject or a site and a window
    of recording times; `upto_position` (the manifest's checkpoint position) to the events the signed
    checkpoint covers, so the export shows exactly what the manifest vouches for. A scope that names nothing
    is an `ExportScopeError` raised here, before anything is written."""

    def __init__(
        self,
        url: str,
        scope: ExportScope | None = None,
        *,
        upto_position: int | None = None,
        catch_up: bool = True,
        workers: int | None = None,
        vouch: VouchedTree | bool | None = True,
    ) -> None:
        scope = scope or ExportScope()
        self.url = url
        self.scope = scope if scope.resolved else scope.resolve(url)
        self.upto_position = upto_position
        self.workers = workers if workers is not None else min(os.cpu_count() or 1, MAX_WORKERS)
        self.reader = StudyReader(url, catch_up=catch_up)
        # one verifying reader for every subject: the key registries' timelines are built once, not per stream
        self.verifying = VerifyingReader(self.reader.record.table)
        try:
            self.study = self.reader.record.study(str(self.scope.study_id))
            self.rows = [
                r
                for r in self.reader.patients()
                if str(r["study"]) == self.scope.study_id and self.scope.covers_subject(r["site"], str(r["subject"]))
            ]
            self.has_ledger = inspect(self.reader.engine).has_table(ledger_leaves.name)
            # `vouch` True: look for a sealed run's tree (the parent does; its workers are handed the answer)
            self.vouch: VouchedTree | None = None
            if vouch is True and self.has_ledger:
                with self.reader.engine.connect() as conn:
                    self.vouch = vouched_tree(conn)
            elif isinstance(vouch, VouchedTree):
                self.vouch = vouch
        except BaseException:
            self.reader.close()
            raise

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> ExportSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def record(self) -> Any:
        return self.reader.record

    def __len__(self) -> int:
        return len(self.rows)

    def subjects(self, progress: Callable[[int], None] | None = None) -> Iterator[SubjectData]:
        """Each subject in scope, in screening-number order; `progress(1)` after each. A subject screened
        after the checkpoint is not in the export."""
        for row in self.rows:
            data = self.subject(row)
            if data.facts:
                yield data
            if progress is not None:
                progress(1)

    def map(
        self, fn: Callable[[ExportSource, SubjectData], T], progress: Callable[[int], None] | None = None
    ) -> Iterator[T]:
        """`fn(source, subject)` for each subject in scope, in screening-number order, on `workers` processes
        (each reads its subjects itself: reading, checking and folding is most of an export's time). `fn`
        must be a module-level function; a handful of subjects are done here, without a pool."""
        if self.workers <= 1 or len(self.rows) < PARALLEL_FROM:
            for data in self.subjects(progress):
                yield fn(self, data)
            return
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import get_context

        chunks = [self.rows[i : i + CHUNK] for i in range(0, len(self.rows), CHUNK)]
        with ProcessPoolExecutor(
            self.workers,
            mp_context=get_context("fork"),  # as the verifier and rebuild do; each worker opens its own engine
            initializer=_worker_start,
            initargs=(self.url, self.scope, self.upto_position, self.vouch),
        ) as pool:
            for rows, results in zip(chunks, pool.map(_worker_run, [(fn, c) for c in chunks]), strict=True):
                yield from results
                if progress is not None:
                    progress(len(rows))

    def stream_facts(self, stream: str) -> tuple[list[Fact], dict[int, int]]:
        """A stream's events up to the checkpoint, checked (`vouch`: see the module's doc), and its versions'
        ledger leaf indexes."""
        index: dict[int, int] = {}  # version → leaf index
        leaves: dict[int, tuple[int, bytes]] = {}  # log position → (leaf index, leaf hash)
        with self.reader.engine.connect() as conn:
            if self.has_ledger:  # a record without a ledger (a demo, say): no leaf indexes to name
                lv = ledger_leaves.c
                q = select(lv.version, lv.idx, lv.position, lv.leaf_hash).where(lv.stream == stream)
                for version, idx, position, hashed in conn.execute(q):
                    index[int(version)] = int(idx)
                    leaves[int(position)] = (int(idx), bytes(hashed))
            facts = self.verifying.stream(
                conn, UUID(stream), upto_position=self.upto_position, vouched=self._vouched(leaves)
            )
        return facts, index

    def subject(self, row: dict[str, Any]) -> SubjectData:
        stream = str(row["subject"])
        facts, index = self.stream_facts(stream)
        if not facts:
            return SubjectData(stream, row["screening_number"], row["site"], None, [])
        aggregate = fold(list(facts))
        data = SubjectData(stream, row["screening_number"], row["site"], aggregate, facts, ledger_index=index)
        for f in facts:
            known = aggregate.facts.get(f.version)
            if known is None or known.voided:
                continue
            item = Item(f, known.type, known.record, index.get(f.version))
            # who the subject is (screening, demographics) always belongs; the rest only if recorded in the window
            if item.type in ("Screened", "DemographicsRecorded") or self.scope.covers_time(item.recorded_at):
                data.items.append(item)
        return data

    def _vouched(self, leaves: dict[int, tuple[int, bytes]]) -> Callable[[int, bytes], bool] | None:
        """Whether the event at a log position is, byte for byte, one the sealed run's tree holds."""
        if self.vouch is None:
            return None
        size = self.vouch.size

        def vouched(position: int, state: bytes) -> bool:
            leaf = leaves.get(position)
            return leaf is not None and leaf[0] < size and leaf_hash(state) == leaf[1]

        return vouched

    def checkpoint(self) -> dict[str, Any] | None:
        """The ledger's latest signed checkpoint (size, root, note), if the ledger has one."""
        c = ledger_checkpoints
        if not self.has_ledger:
            return None
        with self.reader.engine.connect() as conn:
            row = conn.execute(
                select(c.c.size, c.c.root, c.c.note, c.c.issued_at).order_by(c.c.id.desc()).limit(1)
            ).first()
        return dict(row._mapping) if row is not None else None

    def signer_name(self, envelope: dict[str, Any]) -> str:
        """`Dr. Wang Li (dr.wang)` for a person's key, the actor id for a service or an unnamed key."""
        key = self.study.keys.get(envelope["key"]) or {}
        name = key.get("printed_name")
        return f"{name} ({envelope['actor']})" if name else str(envelope["actor"])


_worker_source: ExportSource | None = None


def _worker_start(url: str, scope: ExportScope, upto_position: int | None, vouch: VouchedTree | None) -> None:
    global _worker_source
    # the parent brought the read models up to date and checked the sealed tree; a worker only reads
    _worker_source = ExportSource(
        url, scope, upto_position=upto_position, catch_up=False, workers=1, vouch=vouch if vouch else False
    )


def _worker_run(task: tuple[Callable[[ExportSource, SubjectData], T], list[dict[str, Any]]]) -> list[T]:
    fn, rows = task
    assert _worker_source is not None  # set by _worker_start
    out = []
    for row in rows:
        data = _worker_source.subject(row)
        if data.facts:
            out.append(fn(_worker_source, data))
    return out


def progress_counter(source: ExportSource, on_progress: Callable[[int, int], None] | None) -> Callable[[int], None]:
    """`on_progress(done, total)` (the ODM export's form) as the per-subject step `ExportSource.subjects` calls."""
    done = [0]

    def step(n: int) -> None:
        done[0] += n
        if on_progress is not None:
            on_progress(done[0], len(source))

    return step


def publish(tmp: Path, out: Path) -> None:
    """Move a finished export from its `.partial` name to `out` (an empty folder there is replaced): a failed
    export leaves no file under the name asked for."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    os.replace(tmp, out)


def partial(out: Path) -> Path:
    """Where an export is written until it is complete; an older leftover is removed first."""
    tmp = out.with_name(out.name + ".partial")
    if tmp.is_dir():
        shutil.rmtree(tmp)
    elif tmp.exists():
        tmp.unlink()
    return tmp
