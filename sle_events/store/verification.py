"""`sle verify`: re-derive trust in every stored event from the bytes alone.

Like an fsck, it trusts nothing the store computed: it re-reads every row, re-canonicalises each envelope,
re-hashes the chains and re-checks every signature against the key registry *as it stood at that event's
position in the log*. It answers with findings (stream, version, kind, detail), never a bare boolean.

Phase 1 replays each study's registry stream in log order into a timeline of registry states. Phase 2 splits
all other streams into contiguous ranges of stream ids, one per core, and checks them in parallel processes.
"""

from __future__ import annotations

import base64
import bisect
import copy
import hashlib
import multiprocessing
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable
from uuid import UUID

from sqlalchemy import Connection, func, select

from sle_events.domain.event_types import UnknownEventName, stored_topics, type_name
from sle_events.domain.study import KeyProblem, KeyRevoked, KeyRotatedOut, RoleNotAllowed, Study, UnknownKey
from sle_events.signing.envelope import GENESIS, MalformedEnvelope, SealedEvent, open_sealed, open_stored
from sle_events.signing.keys import key_id, verify_signature
from sle_events.store.codec import PayloadSchemaError, check_payload, domain_event_from

REGISTRY_TOPICS = stored_topics("Study")
BATCH = 5000


@dataclass(frozen=True)
class Finding:
    """One thing that does not hold: which stream and version, what kind of problem, and why."""

    stream: str | None
    version: int | None
    kind: str
    detail: str
    position: int | None = None  # the event's place in the log (notification id)


@dataclass
class Report:
    events: int = 0
    streams: int = 0
    studies: int = 0
    seconds: float = 0.0
    findings: list[Finding] = field(default_factory=list)
    ledger: dict[str, Any] | None = None  # what the ledger check covered (None: the record has no ledger)

    @property
    def ok(self) -> bool:
        return not self.findings

    def to_dict(self) -> dict[str, Any]:
        doc = {
            "ok": self.ok,
            "events": self.events,
            "streams": self.streams,
            "studies": self.studies,
            "seconds": round(self.seconds, 3),
            "findings": [asdict(f) for f in self.findings],
        }
        if self.ledger is not None:
            doc["ledger"] = self.ledger
        return doc


_KEY_KINDS = {UnknownKey: "key_unknown", KeyRevoked: "key_revoked", KeyRotatedOut: "key_rotated",
              RoleNotAllowed: "role_not_allowed"}  # fmt: skip


Timelines = dict[str, tuple[list[int], list[Study]]]  # study -> (log positions, registry after each)


class SignatureCheck:
    """Whether an event's signature holds against the key registry as it stood at the event's log position:
    the key registered, active, the envelope's actor's and role's, the role allowed that event type, and the
    Ed25519 signature over the signed bytes valid. Shared by `sle verify` and the projections' reader."""

    def __init__(self, timelines: Timelines):
        self.timelines = timelines
        self._keys: dict[tuple[int, str], Any] = {}

    def registry_at(self, study: str, position: int) -> Study | None:
        """The registry just before `position` (what an event there is checked against)."""
        timeline = self.timelines.get(study)
        if timeline is None:
            return None
        positions, states = timeline
        i = bisect.bisect_left(positions, position) - 1
        return states[i] if i >= 0 else None

    def latest(self, study: str) -> Study | None:
        timeline = self.timelines.get(study)
        return timeline[1][-1] if timeline else None

    def problem(self, e: SealedEvent, position: int, registry: Study | None = None) -> tuple[str, str] | None:
        """(finding kind, detail) if the signature does not hold, else None."""
        env = e.envelope
        if registry is None:
            registry = self.registry_at(env["study"], position)
            if registry is None and env["stream"] == env["study"] and env["version"] == 1:
                timeline = self.timelines.get(env["study"])
                if timeline and timeline[0][0] == position:  # the trust root vouches for its own creation
                    registry = timeline[1][0]
        if registry is None:
            return "unknown_study", f"study {env['study']} has no valid registry before this event"
        try:
            name = type_name(env["type"])
        except UnknownEventName as exc:
            return "unknown_event_type", str(exc)
        try:
            entry = registry.authorise(env["key"], env["actor"], env["role"], name)
        except KeyProblem as exc:
            return _KEY_KINDS.get(type(exc), "key_problem"), f"{exc} at log position {position}"
        public_key = self._keys.get((id(registry), entry["key"]))
        if public_key is None:
            public_key = self._keys[(id(registry), entry["key"])] = _public_key(registry, entry["key"])
        if not verify_signature(public_key, e.signature, e.signed):
            return "bad_signature", (f"signature by {env['actor']} (key {env['key']}) does not verify: the signed "
                                     "envelope (payload, type, times, ids or prev) was altered after signing")  # fmt: skip
        return None


class _StreamChecker:
    """Checks one event after another, stream by stream, in version order."""

    def __init__(self, timelines: Timelines):
        self.signatures = SignatureCheck(timelines)
        self.findings: list[Finding] = []
        self.stream: str | None = None
        self.study: str | None = None  # the stream's study, from its first event
        self.version = 0
        self.hash = GENESIS
        self.events = 0

    def _found(self, stream: str, version: int | None, kind: str, detail: str, position: int) -> None:
        self.findings.append(Finding(stream, version, kind, detail, position))

    def check(self, position: int, stream_id: UUID, version: int, topic: str, state: bytes,
              registry: Study | None = None) -> SealedEvent | None:  # fmt: skip
        stream = str(stream_id)
        self.events += 1
        if stream != self.stream:
            self.stream, self.version, self.hash, self.study = stream, 0, GENESIS, None
        found = self._found
        try:
            e = open_stored(state)
        except MalformedEnvelope as exc:
            found(stream, version, "malformed", f"stored bytes are not a valid sealed envelope: {exc}", position)
            self.version, self.hash = version, hashlib.sha256(state).hexdigest()
            return None
        env = e.envelope
        if env["stream"] != stream or env["version"] != version:
            found(stream, version, "row_mismatch",
                  f"row says stream {stream} v{version}, the signed envelope says {env['stream']} v{env['version']}",
                  position)  # fmt: skip
        if env["type"] != topic:
            found(stream, version, "topic_mismatch",
                  f"topic column {topic!r} differs from the signed event type {env['type']!r}", position)  # fmt: skip
        if version != self.version + 1:
            missing = f"v{self.version + 1}" + (f"–v{version - 1}" if version - 1 > self.version + 1 else "")
            found(stream, version, "missing_event",
                  f"{missing} missing: the stream jumps from v{self.version} to v{version}", position)  # fmt: skip
        elif env["prev"] != self.hash:
            found(stream, version, "chain_broken",
                  f"prev {env['prev'][:16]}… does not match the hash of v{self.version} ({self.hash[:16]}…): "
                  "the previous event was altered, replaced or reordered", position)  # fmt: skip
        self.version, self.hash = version, e.hash
        if self.study is None:
            self.study = env["study"]
        elif env["study"] != self.study:
            found(stream, version, "study_mismatch",
                  f"the event speaks for study {env['study']}, but the stream belongs to study {self.study} (its "
                  "first event's)", position)  # fmt: skip
        problem = self.signatures.problem(e, position, registry)
        if problem is None or problem[0] not in ("unknown_study", "unknown_event_type"):
            name = type_name(env["type"])
            if name.startswith("Study.") != (stream == env["study"]):
                found(stream, version, "study_mismatch",
                      f"{name} on stream {stream} of study {env['study']}: study facts live on the study's own "
                      "stream, and only they do", position)  # fmt: skip
        if problem is not None:
            kind, detail = problem
            if kind == "bad_signature":
                try:
                    open_sealed(state)
                except MalformedEnvelope as exc:
                    kind, detail = "malformed", f"stored bytes were rewritten: {exc}"
            found(stream, version, kind, detail, position)
            return e
        try:  # signed as it is, yet not a payload this type may carry (stored before append checked it)
            check_payload(env)
        except PayloadSchemaError as exc:
            found(stream, version, "invalid_payload", f"{exc}: the stream cannot be loaded past it", position)
        return e


def _public_key(study: Study, key: str) -> Any:
    from sle_events.store.record import _public_key as cached  # one cache for both

    return cached(study.public_key(key))


def _open(url: str) -> tuple[Any, Any]:
    """The engine and the events table as the application defines them (column types included)."""
    from sle_events.store.record import StudyRecord

    app = StudyRecord(url, verify_threads=1)
    return app.recorder.datastore.engine, app.table




def build_registry_timelines(engine: Any, table: Any, checker_findings: list[Finding]) -> tuple[Timelines, int]:
    """Replay every study's registry stream in log order; keep the state after each valid event. `engine` may
    also be an open connection (a reader inside its transaction)."""
    timelines: Timelines = {}
    checker = _StreamChecker(timelines)
    current: dict[str, Study] = {}
    query = (
        select(table.c.id, table.c.originator_id, table.c.originator_version, table.c.topic, table.c.state)
        .where(table.c.topic.in_(REGISTRY_TOPICS))
        .order_by(table.c.originator_id, table.c.originator_version)
    )
    if isinstance(engine, Connection):
        rows = list(engine.execute(query))
    else:
        with engine.connect() as conn:
            rows = list(conn.execute(query))
    # Chains are checked per stream (version order), trust is applied in log order.
    sealed: dict[int, SealedEvent | None] = {}
    for position, stream_id, version, topic, state in rows:
        study_id = str(stream_id)
        before = len(checker.findings)
        # The registry vouches for its own changes as it stood just before them.
        registry = current.get(study_id)
        e = None
        if registry is None and version == 1:
            try:
                first = open_sealed(bytes(state))
                registry = domain_event_from(first).mutate(None)
            except Exception as exc:  # noqa: BLE001 - reported as a finding
                checker._found(study_id, version, "malformed", f"study creation cannot be read: {exc}", position)
        if registry is not None:
            e = checker.check(position, stream_id, version, topic, bytes(state), registry=registry)
        else:
            checker._found(study_id, version, "unknown_study", "registry event before the study's creation", position)
        ok = len(checker.findings) == before or all(
            f.kind in ("missing_event", "chain_broken") for f in checker.findings[before:]
        )
        sealed[position] = e if ok else None
        if e is not None and ok:
            state_after = copy.deepcopy(registry)
            try:
                event = domain_event_from(e)
                if version == 1:
                    state_after = event.mutate(None)
                else:
                    state_after.version = version - 1  # tolerate a gap: it is already a finding
                    event.mutate(state_after)
            except Exception as exc:  # noqa: BLE001 - a registry event that cannot apply grants nothing
                checker._found(study_id, version, "malformed", f"registry event cannot be applied: {exc}", position)
                continue
            current[study_id] = state_after
            positions, states = timelines.setdefault(study_id, ([], []))
            positions.append(position)
            states.append(state_after)
    checker_findings.extend(checker.findings)
    checker_findings.extend(_unapproved_studies(rows))
    return timelines, len(rows)


def _unapproved_studies(rows: list[Any]) -> list[Finding]:
    """Every study created after the database's first without an existing admin's unused approval, in log
    order (the append-time rule, `StudyRecord._check_new_study`)."""
    findings, approvals, created = [], [], 0
    for position, stream_id, version, topic, state in sorted(rows, key=lambda r: r[0]):
        try:
            env = open_stored(bytes(state)).envelope
            name = type_name(env["type"])
        except (MalformedEnvelope, UnknownEventName):
            continue  # reported by the chain check
        if name == "Study.NewStudyApproved":
            approvals.append((env["payload"].get("code"), env["payload"].get("admin_key")))
        elif name == "Study.Created" and version == 1:
            try:
                mine = (env["payload"]["code"], key_id(base64.b64decode(env["payload"]["admin_public_key"])))
            except (KeyError, ValueError, TypeError):
                continue  # an unreadable creation is reported as malformed
            if created and mine not in approvals:
                findings.append(Finding(str(stream_id), 1, "study_not_approved",
                                        f"study {mine[0]!r} (trust-root key {mine[1]}) was created in a database that "
                                        "already held a study, without an existing admin's approval", position))  # fmt: skip
            elif created:
                approvals.remove(mine)
            created += 1
    return findings


# Set in the parent before forking so workers inherit it without pickling.
_TIMELINES: Timelines = {}


def _check_range(url: str, lo: Any, hi: Any, progress: Any) -> tuple[list[Finding], int, int]:
    engine, table = _open(url)
    checker = _StreamChecker(_TIMELINES)
    query = select(table.c.id, table.c.originator_id, table.c.originator_version, table.c.topic, table.c.state)
    query = query.where(~table.c.topic.in_(REGISTRY_TOPICS))
    if lo is not None:
        query = query.where(table.c.originator_id >= lo)
    if hi is not None:
        query = query.where(table.c.originator_id < hi)
    query = query.order_by(table.c.originator_id, table.c.originator_version)
    streams = 0
    last_stream = None
    done = 0
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
    engine.dispose()
    return checker.findings, checker.events, streams


def split_streams(engine: Any, table: Any, parts: int, *, skip_registry: bool = False) -> list[tuple[Any, Any]]:
    """Contiguous ranges of stream ids holding about the same number of events (`None` = open end)."""
    query = select(table.c.originator_id, func.count())
    if skip_registry:
        query = query.where(~table.c.topic.in_(REGISTRY_TOPICS))
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
    return list(zip(edges[:-1], edges[1:]))


def verify_record(
    url: str,
    *,
    workers: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    checkpoint: Any = None,
    vkey: Any = None,
) -> Report:
    """Verify every event in the database at `url`. `on_progress(done, total)` is called as work advances.

    If the record has a ledger, or `checkpoint` (a checkpoint an auditor saved: path, note text or a list) is
    given, the ledger is checked too (`sle_events.ledger.audit.verify_ledger`, with the log's `vkey`); its
    findings join the report's and `report.ledger` says what it covered. Bad auditor input raises ValueError.
    """
    global _TIMELINES
    if checkpoint is not None or vkey is not None:
        from sle_events.ledger.audit import check_auditor_input

        check_auditor_input(checkpoint, vkey)  # bad auditor input fails before any work
    started = time.perf_counter()
    report = Report()
    engine, table = _open(url)
    with engine.connect() as conn:
        total = conn.execute(select(func.count()).select_from(table)).scalar() or 0
    timelines, registry_events = build_registry_timelines(engine, table, report.findings)
    report.studies = len(timelines)
    done = registry_events
    if on_progress:
        on_progress(done, total)
    workers = workers or os.cpu_count() or 1
    ranges = split_streams(engine, table, workers, skip_registry=True)
    engine.dispose()
    _TIMELINES = timelines
    results: list[tuple[list[Finding], int, int]] = []
    if len(ranges) == 1:
        results.append(_check_range(url, None, None, None))
        done += results[0][1]
    else:
        ctx = multiprocessing.get_context("fork")
        with ctx.Manager() as manager, ctx.Pool(len(ranges)) as pool:
            queue = manager.Queue() if on_progress else None
            pending = [pool.apply_async(_check_range, (url, lo, hi, queue)) for lo, hi in ranges]
            while not all(p.ready() for p in pending):
                if queue is not None:
                    while not queue.empty():
                        done += queue.get()
                        on_progress(done, total)  # type: ignore[misc]
                time.sleep(0.05)
            results = [p.get() for p in pending]
    for findings, events, streams in results:
        report.findings.extend(findings)
        report.streams += streams
    report.events = registry_events + sum(r[1] for r in results)
    report.streams += len(timelines)
    if on_progress:
        on_progress(report.events, total)
    if checkpoint is not None or vkey is not None or _has_ledger(url):
        from sle_events.ledger.audit import verify_ledger

        base = report.events
        ledger = verify_ledger(url, checkpoints_from=checkpoint, vkey=vkey,
                               on_progress=(lambda d, t: on_progress(base + d, base + t)) if on_progress else None)  # fmt: skip
        report.findings.extend(ledger)
        report.ledger = ledger.info
    report.findings.sort(key=lambda f: (f.position or 0, f.stream or "", f.version or 0))
    report.seconds = time.perf_counter() - started
    return report


def _has_ledger(url: str) -> bool:
    from sqlalchemy import create_engine

    from sle_events.ledger.log import ledger_exists

    engine = create_engine(url)
    try:
        return ledger_exists(engine)
    finally:
        engine.dispose()

