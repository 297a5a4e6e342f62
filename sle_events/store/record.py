"""The study record: an `eventsourcing` application whose events are signed envelopes.

Writes go through `append()`, which takes envelopes already signed by the caller (the store never sees a
private key), checks form, clock, key registry, role, hash chain and signatures, then stores the whole batch in
one transaction or nothing. Reads go through the library's repository, decoding the envelopes back into the
domain's events.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache, partial
from typing import Any, cast
from uuid import UUID

import sqlalchemy
import sqlalchemy.exc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from eventsourcing.application import Application
from eventsourcing.persistence import IntegrityError, Mapper, StoredEvent, Transcoder
from eventsourcing_sqlalchemy.recorders import SQLAlchemyApplicationRecorder
from sqlalchemy import func, select

from sle_events.domain.casebook import (
    CONTENT_HASH_METHOD,
    SAFETY_FACTS,
    SIGNATURE_DEFS,
    CoveredStream,
    lock_level,
    stricter,
)
from sle_events.domain.event_types import UnknownEventName, stored_topics, type_name
from sle_events.domain.study import KeyProblem, Study
from sle_events.signing.canonical import NotCanonicalisable, matches_canonical
from sle_events.signing.chain import BROKEN, GAP, TAKEN, link_problem
from sle_events.signing.envelope import (
    GENESIS,
    MalformedEnvelope,
    SealedEvent,
    check_envelope,
    nesting_depth,
    open_sealed,
    open_stored,
    parse_time,
    seal,
    utc_now,
)
from sle_events.signing.keys import Signer, key_id, verify_signature
from sle_events.store.casebook import (
    LOCK_TOPICS,
    casebook_stream,
    lock_levels,
    lock_marks,
    open_queries_blocking_lock,
    recompute_content_hash,
)
from sle_events.store.codec import PayloadSchemaError, check_payload, domain_event_from, envelope_for
from sle_events.store.errors import (
    BadSignature,
    CasebookLocked,
    ChainBroken,
    ClockSkew,
    InvalidPayload,
    LockBlockedByOpenQueries,
    MalformedEvent,
    SignOffMismatch,
    StudyNotApproved,
    UnknownEventType,
    UnknownStudy,
    UntrustedKey,
    VersionConflict,
    WrongStudy,
)
from sle_events.store.review import check_review_act, is_review_act
from sle_events.store.url import DEFAULT_DB_FILE, database_url  # noqa: F401 - re-exported

STUDY_CREATED = "Study.Created"
# Signatures of a batch are verified on a thread pool while the rest of it is checked; a smaller batch is
# verified inline, where handing it to the pool costs more than it overlaps (PostgreSQL single appends: 946/s
# inline against 820/s on the pool, `bench/RESULTS.md`).
PARALLEL_VERIFY_MIN = 16
MAX_EVENT_BYTES = 1 << 20  # one signed envelope; a lab result is ~1 KiB
MAX_NESTING = 32  # the deepest payload the domain writes is 4 levels
GROUP_MAX_EVENTS = 1000  # events of concurrent batches one transaction takes (group commit)


class EnvelopeMapper(Mapper):
    """Reads stored envelopes back as domain events. Writing goes through `StudyRecord.append`."""

    def __init__(self) -> None:
        super().__init__(transcoder=_NoTranscoder())

    def to_stored_event(self, domain_event: Any) -> StoredEvent:
        raise TypeError("unsigned events cannot be stored; seal them and call StudyRecord.append()")

    def to_domain_event(self, stored_event: StoredEvent) -> Any:
        return domain_event_from(open_sealed(stored_event.state))


class _NoTranscoder(Transcoder):
    def encode(self, obj: Any) -> bytes:  # pragma: no cover - never used
        raise TypeError

    def decode(self, data: bytes) -> Any:  # pragma: no cover - never used
        raise TypeError


@dataclass(eq=False)
class _Waiting:
    """A batch a thread asked to append, and its answer once some thread stored it."""

    events: list[SealedEvent]
    positions: list[int] | None = None
    error: Exception | None = None
    done: bool = False


def _may_share(events: list[SealedEvent]) -> bool:
    """Only clinical facts share a transaction: study, casebook and review acts are checked against the batch
    they come in, and go alone so that their batch is exactly what their sender sent."""
    for e in events:
        try:
            name = type_name(e.topic)
        except UnknownEventName:
            return False
        if name.startswith(("Study.", "Casebook.")) or is_review_act(name):
            return False
    return True


@lru_cache(maxsize=4096)
def public_key(raw: bytes) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(raw)


class StudyRecord(Application[UUID]):
    """Signed, hash-chained study events persisted with `eventsourcing` + `eventsourcing-sqlalchemy`."""

    name = "Study"  # tables: study_events
    # The persistence module is always eventsourcing-sqlalchemy (set in __init__): its recorder, not the base type.
    recorder: SQLAlchemyApplicationRecorder

    def __init__(
        self,
        url: str | None = None,
        *,
        clock: Callable[[], datetime] = utc_now,
        clock_skew: timedelta = timedelta(minutes=5),
        verify_threads: int | None = None,
        max_event_bytes: int = MAX_EVENT_BYTES,
        max_nesting: int = MAX_NESTING,
    ) -> None:
        self.url = database_url(url)
        self.events_table()  # the library creates the table from this same definition, with the flag below
        super().__init__(
            env={
                "PERSISTENCE_MODULE": "eventsourcing_sqlalchemy",
                "SQLALCHEMY_URL": self.url,
                "CREATE_TABLE": "y",
            }
        )
        self.clock = clock
        self.clock_skew = clock_skew
        self.max_event_bytes = max_event_bytes
        self.max_nesting = max_nesting
        self.table = self.recorder.events_record_cls.__table__
        self._heads: dict[UUID, tuple[int, str, str]] = {}  # stream -> (version, hash, study) of its head
        self._studies: dict[str, Study] = {}
        self._copies: dict[str, tuple[int, Study]] = {}  # study -> (version copied, what `study()` hands out)
        # Every event at or below this log position is reflected in the cached studies.
        self._valid_through: int | None = None
        self._lock = threading.RLock()
        self._waiting: list[_Waiting] = []  # batches waiting for the write lock (group commit, `append`)
        self._waiting_lock = threading.Lock()
        threads = verify_threads or os.cpu_count() or 1
        self._pool = ThreadPoolExecutor(threads) if threads > 1 else None
        self._threads = threads
        # The write path's statements, built once (compiled and cache-keyed once); see `_insert` (SQLite) and
        # `_append_statement` (PostgreSQL).
        t = self.table
        self._insert_statement = sqlalchemy.insert(t).returning(t.c.id, sort_by_parameter_order=True)
        self._casebooks: dict[UUID, tuple[str | None, int]] = {}  # open casebooks -> (None, last lock event's position)
        # PostgreSQL: the single-round-trip write runs outside any session transaction (`_write_postgresql`).
        self._autocommit = self.engine.execution_options(isolation_level="AUTOCOMMIT")
        self._lock_sql = (
            f"LOCK TABLE {self.recorder.events_table_name} IN EXCLUSIVE MODE; NOTIFY {self.recorder.channel_name}"
        )
        # A stream's newest version (bind `b_stream`): the registry check under the write lock, and the API's
        # check of a study's registry on every request.
        self.stream_version_query = select(func.max(t.c.originator_version)).where(
            t.c.originator_id == sqlalchemy.bindparam("b_stream")
        )

    @property
    def engine(self) -> sqlalchemy.Engine:
        """The database engine. eventsourcing-sqlalchemy types it `Engine | Connection | None`; a datastore
        built from a URL (as here) always holds an Engine."""
        return cast(sqlalchemy.Engine, self.recorder.datastore.engine)

    @staticmethod
    def events_table() -> sqlalchemy.Table:
        """The events table's definition, as `eventsourcing-sqlalchemy` builds it (for Alembic)."""
        from eventsourcing_sqlalchemy.datastore import SQLAlchemyDatastore

        # The module opens with `# type: ignore` upstream, so mypy sees none of its names.
        from eventsourcing_sqlalchemy.models import StoredEventRecord  # type: ignore[attr-defined]  # see above

        record_cls = SQLAlchemyDatastore.define_record_class(
            cls_name="StudyEvent", table_name="study_events", schema_name=None, base_cls=StoredEventRecord
        )
        table = record_cls.__table__
        # A log position is never given twice: PostgreSQL's sequence never does, and AUTOINCREMENT keeps SQLite
        # from handing the id of a deleted newest row to the next append (the ledger would then report the
        # deletion at the wrong event).
        table.dialect_kwargs["sqlite_autoincrement"] = True
        return table

    def construct_mapper(self) -> Mapper:
        return EnvelopeMapper()

    def save(self, *objs: Any, **kwargs: Any) -> Any:
        raise TypeError("use StudyRecord.record(aggregate, signer=...) or append(sealed events)")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
        super().close()

    # --- the client side, in the caller's process ---------------------------------------------------------
    def record(self, *aggregates: Any, signer: Signer, reason: str | None = None) -> list[SealedEvent]:
        """Seal the aggregates' pending events with `signer` and append them. Returns what was stored."""
        sealed: list[SealedEvent] = []
        heads: dict[UUID, str] = {}
        for aggregate in aggregates:
            study = getattr(aggregate, "study_id", None) or aggregate.id
            for event in aggregate.collect_events():
                stream = event.originator_id
                prev = heads.get(stream) or self.head_hash(stream, event.originator_version - 1)
                one = seal(envelope_for(event, study=study, prev=prev, reason=reason), signer)
                heads[stream] = one.hash
                sealed.append(one)
        self.append(sealed)
        return sealed

    def head_hash(self, stream: UUID, version: int) -> str:
        """Hash of the stored event `version` of `stream` (GENESIS for version 0)."""
        if version == 0:
            return GENESIS
        cached = self._heads.get(stream)
        if cached and cached[0] == version:
            return cached[1]
        stored = self.recorder.select_events(stream, gt=version - 1, lte=version)
        if not stored:
            raise ChainBroken(f"stream has no version {version}", stream=str(stream), version=version + 1)
        return hashlib.sha256(stored[0].state).hexdigest()

    # --- reading ---------------------------------------------------------------------------------------
    def stream(self, stream: UUID) -> list[SealedEvent]:
        return [open_sealed(s.state) for s in self.recorder.select_events(stream)]

    def get(self, stream: UUID, version: int | None = None) -> Any:
        return self.repository.get(stream, version=version)

    def study(self, study_id: UUID | str) -> Study:
        """The study as it stands now (trust root, keys, permissions, configuration).

        A copy of the registry the store checks appends against, so changing it changes nothing here: change a
        study through its verbs on an aggregate from `get` and `record` it. The copy is made again whenever
        the registry moves on or the copy was changed."""
        study_id = str(study_id)
        with self._lock:
            trusted = self._registry(study_id)
            copied = self._copies.get(study_id)
            if copied is None or not (copied[0] == copied[1].version == trusted.version):
                copied = self._copies[study_id] = (trusted.version, copy.deepcopy(trusted))
            return copied[1]

    def _registry(self, study_id: str) -> Study:
        """The study whose key registry and permissions appends are checked against (never handed out)."""
        with self._lock:
            study = self._studies.get(study_id)
            if study is None:
                position = self.recorder.max_notification_id() or 0
                if self._valid_through is None or not self._studies:
                    self._valid_through = position
                try:
                    study = self.repository.get(UUID(study_id))
                except Exception as e:
                    raise UnknownStudy(f"study {study_id} is not in this record") from e
                if not isinstance(study, Study):
                    raise UnknownStudy(f"{study_id} is not a study")
                self._studies[study_id] = study
            return study

    # --- appending -------------------------------------------------------------------------------------
    def append(self, events: Sequence[SealedEvent]) -> list[int]:
        """Verify and store a batch of sealed events atomically; return their log positions.

        Group commit: batches of clinical facts that threads of this process append at the same time share one
        transaction (one table lock, one commit), as one batch in the order they came. Should that shared batch
        be refused, each is appended alone and gets its own answer, so no caller sees another's refusal. Study,
        casebook and review acts always go alone."""
        if not events:
            return []
        me = _Waiting([self._as_signed(e) for e in events])
        with self._waiting_lock:
            self._waiting.append(me)
        with self._lock:
            if not me.done:
                group = self._take_group(me)
                if len(group) == 1:
                    return self._append_batch(me.events)
                self._append_group(group)
        if me.error is not None:
            raise me.error
        assert me.positions is not None
        return me.positions

    def _take_group(self, me: _Waiting) -> list[_Waiting]:
        """`me` and, if it may share a transaction, every waiting batch that may too (up to `GROUP_MAX_EVENTS`)."""
        with self._waiting_lock:
            group = [me]
            if _may_share(me.events):
                size = len(me.events)
                for w in self._waiting:
                    if w is not me and size + len(w.events) <= GROUP_MAX_EVENTS and _may_share(w.events):
                        group.append(w)
                        size += len(w.events)
            self._waiting = [w for w in self._waiting if w not in group]
        return group

    def _append_group(self, group: list[_Waiting]) -> None:
        try:
            try:
                positions = self._append_batch([e for w in group for e in w.events])
            except Exception:
                for w in group:  # each alone, for its own answer
                    try:
                        w.positions = self._append_batch(w.events)
                    except Exception as exc:
                        w.error = exc
                    w.done = True
                return
            at = 0
            for w in group:
                w.positions, at = positions[at : at + len(w.events)], at + len(w.events)
                w.done = True
        finally:
            # Interrupted (KeyboardInterrupt, a dying thread): the batches not answered wait for their own turn.
            with self._waiting_lock:
                self._waiting.extend(w for w in group if not w.done)

    def _append_batch(self, events: list[SealedEvent]) -> list[int]:
        for _attempt in range(3):
            with self._lock:
                try:
                    early = self._start_verifying(events)
                    studies, heads, keys = self._check(events)
                    return self._write(events, studies, heads, partial(self._finish_verifying, events, keys, early))
                except _RegistryMoved:
                    self._forget_studies()  # someone else changed a key registry: check again
                except (VersionConflict, ClockSkew):
                    # A client retrying a batch that was stored (its answer lost, perhaps long ago) gets the same
                    # answer again.
                    positions = self.stored_positions(events)
                    if positions is None:
                        raise
                    return positions
        raise VersionConflict("the key registry kept changing during the append; retry")

    def _as_signed(self, e: Any) -> SealedEvent:
        """The event as its signed bytes and signature make it: the bytes stored are built from what is verified,
        never taken from the caller. Size and nesting are bounded before anything recursive looks at it."""
        if not isinstance(e, SealedEvent):
            raise MalformedEvent(f"expected a SealedEvent, got {type(e).__name__}")
        env = e.envelope if isinstance(e.envelope, dict) else {}
        where = {"stream": env.get("stream"), "version": env.get("version")}
        if not isinstance(e.signed, bytes) or not isinstance(e.signature, bytes) or not isinstance(e.sealed, bytes):
            raise MalformedEvent("signed bytes, signature and sealed bytes must be bytes", **where)
        if len(e.signed) > self.max_event_bytes:
            raise MalformedEvent(
                f"the signed envelope has {len(e.signed):,} bytes; the limit is {self.max_event_bytes:,}", **where
            )
        # The brackets in the signed bytes bound the depth: only a bracket-heavy event is walked.
        brackets = e.signed.count(b"[") + e.signed.count(b"{")
        if brackets > self.max_nesting and (depth := nesting_depth(e.envelope)) > self.max_nesting:
            raise MalformedEvent(f"the envelope nests {depth} levels deep; the limit is {self.max_nesting}", **where)
        signed = SealedEvent.build(e.envelope, e.signed, e.signature)
        if signed.sealed != e.sealed:
            raise MalformedEvent("the sealed bytes are not the signed envelope and its signature", **where)
        return signed

    def stored_positions(self, events: Sequence[SealedEvent]) -> list[int] | None:
        """The log positions of exactly these sealed events, if every one is stored byte for byte (a batch is
        stored whole or not at all); None otherwise."""
        t = self.table
        positions = []
        with self.engine.connect() as conn:
            for e in events:
                row = conn.execute(
                    select(t.c.id, t.c.state).where(t.c.originator_id == e.stream, t.c.originator_version == e.version)
                ).first()
                if row is None or bytes(row.state) != e.sealed:
                    return None
                positions.append(row.id)
        return positions

    def _check(
        self, events: Sequence[SealedEvent]
    ) -> tuple[dict[str, Study], dict[UUID, tuple[int, str, str]], list[Any]]:
        """Everything but the signatures, which `_start_verifying` checks meanwhile on other cores."""
        now = self.clock()
        studies: dict[str, Study] = {}
        heads: dict[UUID, tuple[int, str, str]] = {}
        keys: list[Ed25519PublicKey] = []
        for e in events:
            env = e.envelope
            where = {"stream": env.get("stream"), "version": env.get("version")}
            try:
                check_envelope(env)
                if not matches_canonical(env, e.signed):
                    raise MalformedEnvelope("signed bytes are not the canonical form of the envelope")
            except (MalformedEnvelope, NotCanonicalisable) as exc:
                raise MalformedEvent(str(exc), **where) from exc
            self._check_clock(env, now, where)
            try:
                name = type_name(env["type"])
            except UnknownEventName as exc:
                raise UnknownEventType(str(exc), **where) from None
            try:
                check_payload(env)
            except PayloadSchemaError as exc:
                raise InvalidPayload(str(exc), **where) from None
            study_id = env["study"]
            study = studies.get(study_id)
            if study is None:
                study = self._study_for(e, study_id, where, events)
                studies[study_id] = study
            if name.startswith("Study.") != (env["stream"] == study_id):
                raise WrongStudy(
                    f"{name} cannot be recorded on stream {env['stream']} of study {study_id}: study "
                    "facts live on the study's own stream, and only they do",
                    **where,
                )
            if env["payload"].get("study_id", study_id) != study_id:
                raise WrongStudy(
                    f"the payload names study {env['payload']['study_id']}, the envelope {study_id}", **where
                )
            try:
                entry = study.authorise(env["key"], env["actor"], env["role"], name)
            except KeyProblem as exc:
                raise UntrustedKey(str(exc), **where) from exc
            keys.append(public_key(study.public_key(entry["key"])))
            if env["stream"] == study_id and env["version"] > 1:
                # Registry changes take effect for the rest of the batch.
                studies[study_id] = study = copy.deepcopy(study)
                domain_event_from(e).mutate(study)
            heads[e.stream] = self._check_chain(e, heads, where)
            if name.startswith("Casebook."):  # after the chain, as review acts: a resend is an idempotent retry
                self._check_casebook_act(e, name, where, entry)
            if is_review_act(name):  # after the chain: an exact resend is still a VersionConflict (an idempotent retry)
                check_review_act(self, e, name, events, where)  # SDV and queries: the verbs' rules, signed anywhere
        return studies, heads, keys

    def _start_verifying(self, events: Sequence[SealedEvent]) -> tuple[list[Any], list[Any]] | None:
        """Verify against the keys the cached registry names; `_finish_verifying` re-checks any other key."""
        n = len(events)
        if self._pool is None or n < PARALLEL_VERIFY_MIN:
            return None
        guesses: list[Any] = []
        for e in events:
            study = self._studies.get(cast(str, e.envelope.get("study")))  # no study (None) is a miss like any other
            entry = study.keys.get(cast(str, e.envelope.get("key"))) if study is not None else None
            guesses.append(public_key(study.public_key(entry["key"])) if entry and study is not None else None)

        def bad_in(lo: int, hi: int) -> list[int]:
            return [
                i
                for i in range(lo, hi)
                if guesses[i] is not None and not verify_signature(guesses[i], events[i].signature, events[i].signed)
            ]

        step = -(-n // self._threads)
        return guesses, [self._pool.submit(bad_in, lo, min(lo + step, n)) for lo in range(0, n, step)]

    def _finish_verifying(self, events: Sequence[SealedEvent], keys: list[Ed25519PublicKey], early: Any) -> None:
        if early is None:
            guesses, bad = [None] * len(events), []
        else:
            guesses, futures = early
            bad = [i for f in futures for i in f.result()]
        for i, key in enumerate(keys):
            if guesses[i] is not key and not verify_signature(key, events[i].signature, events[i].signed):
                bad.append(i)
        if bad:
            bad.sort()
            env = events[bad[0]].envelope
            raise BadSignature(
                f"signature does not verify with key {env['key']} of {env['actor']} ({len(bad)} bad in batch)",
                stream=env["stream"],
                version=env["version"],
            )

    def _check_clock(self, env: dict[str, Any], now: datetime, where: dict[str, Any]) -> None:
        recorded = parse_time("recorded_at", env["recorded_at"])
        if abs(recorded - now) > self.clock_skew:
            raise ClockSkew(
                f"recorded_at {env['recorded_at']} is more than {self.clock_skew} from the store's clock "
                f"{now.isoformat()}",
                **where,
            )
        occurred = parse_time("occurred_at", env["occurred_at"])
        if occurred > now + self.clock_skew:
            raise ClockSkew(f"occurred_at {env['occurred_at']} lies in the future", **where)

    def _study_for(self, e: SealedEvent, study_id: str, where: dict[str, Any], batch: Sequence[SealedEvent]) -> Study:
        env = e.envelope
        if type_name(env["type"]) == STUDY_CREATED and env["stream"] == env["study"] and env["version"] == 1:
            # The trust root vouches for itself: the study as created authorises its own creation, if it is the
            # database's first or an existing study's admin approved it.
            self._check_new_study(e, batch, where)
            try:
                return domain_event_from(e).mutate(None)
            except Exception as exc:
                raise MalformedEvent(f"study creation cannot be read: {exc}", **where) from exc
        try:
            return self._registry(study_id)
        except UnknownStudy as exc:
            raise UnknownStudy(str(exc), **where) from exc

    def _check_new_study(self, e: SealedEvent, batch: Sequence[SealedEvent], where: dict[str, Any]) -> None:
        """A database's first study needs no one's leave; a later one needs an unused `Study.NewStudyApproved`
        for its code and trust-root key, recorded by an existing study's admin (stored, or earlier in the batch)."""
        t = self.table
        wanted = stored_topics("Study.Created") + stored_topics("Study.NewStudyApproved")
        with self.engine.connect() as conn:
            stored = [
                open_stored(s).envelope
                for s in conn.execute(select(t.c.state).where(t.c.topic.in_(wanted)).order_by(t.c.id)).scalars()
            ]
        before = [x.envelope for x in batch[: next(i for i, x in enumerate(batch) if x is e)]]
        seen = [env for env in stored + before if type_name(env["type"]) in ("Study.Created", "Study.NewStudyApproved")]
        if not any(type_name(env["type"]) == STUDY_CREATED for env in seen):
            return
        payload = e.envelope["payload"]
        mine = (payload["code"], key_id(base64.b64decode(payload["admin_public_key"])))
        approvals = sum(
            1
            for env in seen
            if type_name(env["type"]) == "Study.NewStudyApproved"
            and (env["payload"]["code"], env["payload"]["admin_key"]) == mine
        )
        used = sum(
            1
            for env in seen
            if type_name(env["type"]) == STUDY_CREATED
            and (env["payload"]["code"], key_id(base64.b64decode(env["payload"]["admin_public_key"]))) == mine
        )
        if approvals <= used:
            raise StudyNotApproved(
                f"this database already holds a study: creating study {payload['code']!r} with trust-root key "
                f"{mine[1]} needs an existing study's admin to approve it first (sle study approve-new)",
                **where,
            )

    def _check_chain(
        self, e: SealedEvent, heads: dict[UUID, tuple[int, str, str]], where: dict[str, Any]
    ) -> tuple[int, str, str]:
        stream, version, prev, study = e.stream, e.version, e.envelope["prev"], e.envelope["study"]
        head = heads.get(stream) or self._heads.get(stream)
        if head is None or head[0] != version - 1:
            head = self._stored_head(stream, where)
        problem = link_problem(head[0], head[1], version, prev)
        if problem == TAKEN:
            raise VersionConflict(f"version {version} is already taken (head is v{head[0]})", **where)
        if problem == GAP:
            raise ChainBroken(f"version {version} does not follow the head v{head[0]}", **where)
        if problem == BROKEN:
            raise ChainBroken(f"prev {prev[:12]}… does not match the hash of v{head[0]} ({head[1][:12]}…)", **where)
        if version > 1 and study != head[2]:
            raise WrongStudy(
                f"stream {stream} belongs to study {head[2]}; an event of study {study} cannot join it", **where
            )
        return version, e.hash, study

    def _stored_head(self, stream: UUID, where: dict[str, Any]) -> tuple[int, str, str]:
        last = self.recorder.select_events(stream, desc=True, limit=1)
        if not last:
            return 0, GENESIS, ""
        try:
            study = open_stored(last[0].state).envelope["study"]
        except MalformedEnvelope as exc:
            raise ChainBroken(
                f"the stream's stored head v{last[0].originator_version} cannot be read: {exc}", **where
            ) from None
        return last[0].originator_version, hashlib.sha256(last[0].state).hexdigest(), study

    def _write(
        self,
        events: Sequence[SealedEvent],
        studies: dict[str, Study],
        heads: dict[UUID, tuple[int, str, str]],
        signatures_hold: Callable[[], None],
    ) -> list[int]:
        expected = {sid: self._registry_version(sid, s, events) for sid, s in studies.items()}
        locked = _casebook_streams(events)
        try:
            if self.engine.dialect.name == "postgresql":
                ids = self._write_postgresql(events, expected, locked, signatures_hold)
            else:
                ids = self._write_sqlite(events, expected, locked, signatures_hold)
        except (IntegrityError, sqlalchemy.exc.IntegrityError) as exc:
            for e in events:
                self._heads.pop(e.stream, None)
            first = events[0].envelope
            raise VersionConflict(
                "another writer stored one of these versions first; reload the stream and retry",
                stream=first["stream"],
                version=first["version"],
            ) from exc
        self._heads.update(heads)
        if not self._nobody_wrote_before(ids):
            # Only the studies just checked are known to be current.
            self._studies = {sid: s for sid, s in self._studies.items() if sid in expected}
        for sid, study in studies.items():
            self._studies[sid] = study
        if ids:
            self._valid_through = ids[-1]
        return ids

    def _write_sqlite(
        self,
        events: Sequence[SealedEvent],
        expected: dict[str, int],
        locked: set[UUID],
        signatures_hold: Callable[[], None],
    ) -> list[int]:
        """The transaction holds SQLite's one write lock from the insert on, so the checks that need the store
        as it is now follow the insert, inside it."""
        with self.recorder.transaction(commit=True) as session:
            ids = self._insert(session, events)
            if not self._nobody_wrote_before(ids):  # else the registry we trusted is the latest
                for sid, version in expected.items():
                    if session.execute(self.stream_version_query, {"b_stream": UUID(sid)}).scalar() != version:
                        raise _RegistryMoved()
            # Under the write lock, so no freeze or lock can slip in between this check and the commit.
            self._check_casebook_locks(events, lock_levels(session, self.table, locked, before=ids[0]))
            for e in events:
                if type_name(e.envelope["type"]) == "Casebook.Locked":
                    self._check_no_open_queries(e, session)
            signatures_hold()  # the rows are written but not committed: a bad signature rolls them back
        return ids

    def _write_postgresql(
        self,
        events: Sequence[SealedEvent],
        expected: dict[str, int],
        locked: set[UUID],
        signatures_hold: Callable[[], None],
    ) -> list[int]:
        """Everything is checked first, against the registries and casebook lock levels as last seen; then one
        round trip takes the table lock, and under it inserts the batch only if those are still what was seen.
        The lock is held by the server alone, never across a round trip to this process (where a thread may wait
        for the GIL), and every writer waits on it. Nothing inserted: someone moved them; check again.

        The statement is sent as one simple query, which PostgreSQL runs as one implicit transaction, committed
        when it ends: the round trip is the whole write. A lock (`Casebook.Locked`) also asks, inside the
        transaction and under the table lock, that no query is still open, so it takes an explicit one."""
        marks = self._lock_marks(locked)
        self._check_casebook_locks(events, {c: level for c, (level, _) in marks.items()})
        signatures_hold()
        registries = {sid: v - sum(e.envelope["stream"] == sid for e in events) for sid, v in expected.items()}
        statement, params = self._append_statement(events, registries, marks)
        acts = [e for e in events if type_name(e.envelope["type"]) == "Casebook.Locked"]
        if acts:
            with self.recorder.transaction(commit=True) as session:
                rows = run_on_psycopg(session.connection(), statement, params, several=True)
                if rows:
                    for e in acts:
                        self._check_no_open_queries(e, session)
        else:
            with self._autocommit.connect() as conn:
                rows = run_on_psycopg(conn, statement, params, several=True)
        if not rows:
            for stream in locked:
                self._casebooks.pop(stream, None)
            raise _RegistryMoved()
        at = {(UUID(str(stream)), version): position for position, stream, version in rows}
        return [at[(e.stream, e.version)] for e in events]

    def _lock_marks(self, casebooks: set[UUID]) -> dict[UUID, tuple[str | None, int]]:
        """Each casebook's lock level and last freeze/lock/unlock position (`lock_marks`): remembered for an
        open casebook (the insert checks that nothing came since), read now for the others."""
        marks = {c: self._casebooks[c] for c in casebooks if c in self._casebooks}
        unknown = [c for c in casebooks if c not in marks]
        if unknown:
            with self.engine.connect() as conn:
                read = lock_marks(conn, self.table, unknown)
            self._casebooks.update({c: mark for c, mark in read.items() if mark[0] is None})
            marks.update(read)
        return marks

    def _append_statement(
        self,
        events: Sequence[SealedEvent],
        registries: dict[str, int],
        casebooks: dict[UUID, tuple[str | None, int]],
    ) -> tuple[str, list[Any]]:
        """LOCK (so log positions are handed out in commit order: a follower that has read up to a position never
        misses a lower one committed later), NOTIFY (delivered at commit, to wake the projection followers) and
        the INSERT, which inserts only if each study's registry stream is at the version checked and no freeze,
        lock or unlock was stored on the casebooks since they were read (`_lock_marks`). Returns (statement,
        parameters) for a client-side binding cursor, which writes the parameters in as literals (one query,
        several statements)."""
        t = self.recorder.events_table_name
        params: list[Any] = []
        for e in events:
            params += [e.stream, e.version, e.topic, e.sealed]
        still = []
        for sid, version in registries.items():
            still.append(f"(SELECT coalesce(max(originator_version), 0) FROM {t} WHERE originator_id = %s) = %s")
            params += [UUID(sid), version]
        if casebooks:
            still.append(f"{last_lock_event_sql(t)} = %s")
            params += [sorted(casebooks), list(LOCK_TOPICS), max(position for _, position in casebooks.values())]
        values = ", ".join(["(%s::uuid, %s::bigint, %s::text, %s::bytea)"] * len(events))
        statement = (
            f"{self._lock_sql}; INSERT INTO {t} (originator_id, originator_version, topic, state) "
            f"SELECT * FROM (VALUES {values}) AS batch WHERE {' AND '.join(still) or 'true'} "
            "RETURNING id, originator_id, originator_version"
        )
        return statement, params

    def _nobody_wrote_before(self, ids: list[int]) -> bool:
        """Positions are handed out under the write lock in commit order: if ours follow straight on from the
        last position the cached registries reflect, nobody else wrote in between."""
        return self._valid_through is not None and bool(ids) and ids[0] == self._valid_through + 1

    def _insert(self, session: Any, events: Sequence[SealedEvent]) -> list[int]:
        """SQLite: what the library's `insert_events` does, as one Core `INSERT ... RETURNING` instead of an ORM
        flush (it runs under the write lock, where every fraction of a millisecond is the whole store's)."""
        rows = [
            {"originator_id": e.stream, "originator_version": e.version, "topic": e.topic, "state": e.sealed}
            for e in events
        ]
        return list(session.execute(self._insert_statement, rows).scalars())

    def _forget_studies(self) -> None:
        self._studies.clear()
        self._casebooks.clear()
        self._valid_through = None

    def _registry_version(self, sid: str, study: Study, events: Iterable[SealedEvent]) -> int:
        """The registry stream's version once this batch is stored."""
        in_batch = [e.version for e in events if e.envelope["stream"] == sid]
        return max(in_batch) if in_batch else study.version

    # --- sign-off and lock (sle_events/domain/casebook.py) ------------------------------------------------
    def _check_casebook_act(self, e: SealedEvent, name: str, where: dict[str, Any], key: dict[str, Any]) -> None:
        """A casebook fact lives on the casebook stream of the subject its payload names; a sign-off shows the
        printed name registered with its key, the SignatureDef of its meaning and the content hash of the stored
        data it names, of that subject; a lock waits for every query to be closed."""
        env, payload = e.envelope, e.envelope["payload"]
        subject = payload.get("subject_id")
        if env["stream"] != str(casebook_stream(env["study"], subject)):
            raise SignOffMismatch(
                f"{name} for subject {subject} belongs on stream {casebook_stream(env['study'], subject)}", **where
            )
        if name == "Casebook.SignedOff":
            manifest = (payload["printed_name"], payload["signature_def"], payload["hash_method"], payload["scope"])
            meaning = SIGNATURE_DEFS.get(payload["meaning"])
            expected = (
                key.get("printed_name"),
                meaning.oid if meaning else None,
                CONTENT_HASH_METHOD,
                "visit" if payload["visit"] else "casebook",
            )
            if manifest != expected:
                raise SignOffMismatch(
                    f"the sign-off's manifestation {manifest} is not what the record says of it {expected} (printed "
                    "name registered with the key, SignatureDef of the meaning, hash method, scope)",
                    **where,
                )
            covers = [CoveredStream.model_validate(c) for c in payload["covers"]]
            if any(c.stream != subject or any(v < 1 or v > c.through_version for v in c.covered()) for c in covers):
                raise SignOffMismatch("a sign-off covers versions of its own subject's stream only", **where)
            with self.engine.connect() as conn:
                digest, missing = recompute_content_hash(conn, self.table, covers)
            if digest != payload["content_hash"]:
                why = f"covered events not recorded: {', '.join(missing[:5])}" if missing else f"they hash to {digest}"
                raise SignOffMismatch(
                    f"the sign-off's content hash {payload['content_hash'][:16]}… is not that of the data it "
                    f"names ({why})",
                    **where,
                )
        elif name == "Casebook.Locked":
            self._check_no_open_queries(e)

    def _check_no_open_queries(self, e: SealedEvent, session: Any = None) -> None:
        """A lock waits for every query of its subject (or study) to be closed. Checked before the write and
        again inside it (`session`), under the write lock: a query raised in between cannot slip past."""
        env = e.envelope
        subject = env["payload"].get("subject_id")
        blocking = open_queries_blocking_lock(self, env["study"], subject, session)
        if blocking:
            what = "the study" if subject is None else f"subject {subject}"
            raise LockBlockedByOpenQueries(
                f"{what} cannot be locked while {len(blocking)} queries are not closed",
                stream=env["stream"],
                version=env["version"],
            )

    def _check_casebook_locks(self, events: Sequence[SealedEvent], levels: dict[UUID, str | None]) -> None:
        """Refuse a clinical fact on a frozen or locked subject or study (`levels`: committed before this batch;
        or earlier in it). Safety facts (`SAFETY_FACTS`) are taken: an SAE is reportable at any time."""
        clinical_ids = {id(e) for e in events if _is_clinical(e)}
        if not clinical_ids:
            return
        levels = dict(levels)
        for e in events:
            env = e.envelope
            name = type_name(env["type"])
            if name in ("Casebook.Frozen", "Casebook.Locked", "Casebook.Unlocked"):
                levels[e.stream] = lock_level([(name, env["payload"])])
            elif id(e) in clinical_ids:
                mine = levels.get(casebook_stream(env["study"], env["stream"]))
                study = levels.get(casebook_stream(env["study"], None))
                level = stricter(mine, study)
                if level is not None:
                    what = "the study is" if study == level else "this subject is"
                    raise CasebookLocked(
                        f"{name} refused: {what} {level}; clinical data cannot be added or changed until a data "
                        "manager unlocks it with a reason (an SAE can still be reported)",
                        stream=env["stream"],
                        version=env["version"],
                    )


def run_on_psycopg(
    conn: sqlalchemy.Connection, statement: str, params: Sequence[Any] | dict[str, Any], *, several: bool = False
) -> list[Any]:
    """The rows of `statement` (of its last statement if `several`), run on `conn`'s psycopg connection without
    SQLAlchemy's execution layer (a hot path's tenth of a millisecond). One statement is bound server-side and
    prepared on the connection; several go as one simple query, their parameters bound client-side (as
    literals). Errors are raised as SQLAlchemy raises them (a lost server is an OperationalError: 503)."""
    import psycopg

    driver = cast(psycopg.Connection[Any], conn.connection.driver_connection)
    cursor = psycopg.ClientCursor(driver) if several else driver.cursor()
    try:
        cursor.execute(statement, params, prepare=not several)
        while cursor.nextset():
            pass
        return cursor.fetchall()
    except psycopg.Error as exc:
        raise sqlalchemy.exc.DBAPIError.instance(statement[:200], None, exc, psycopg.Error) from exc
    finally:
        cursor.close()


def last_lock_event_sql(table: str) -> str:
    """The log position of the newest freeze, lock or unlock on some casebook streams (bind: the streams, the
    topics), 0 if none. OFFSET 0 keeps the inner select planned on its own, by the streams' index: bare,
    `max(id)` walks the id index backwards through the whole table until a row matches, which, for casebooks
    never locked, is every row (5 ms at 20,000 events, under the write lock; `tests/test_append.py`)."""
    return (
        f"(SELECT coalesce(max(id), 0) FROM (SELECT id FROM {table} WHERE originator_id = ANY(%s) "
        "AND topic = ANY(%s) OFFSET 0) AS lock_events)"
    )


class _RegistryMoved(Exception):
    pass


def _is_clinical(e: SealedEvent) -> bool:
    """A clinical fact: what a freeze or lock holds back (a safety fact never is)."""
    name = type_name(e.envelope["type"])
    return name.startswith("Subject.") and name not in SAFETY_FACTS


def _casebook_streams(events: Sequence[SealedEvent]) -> set[UUID]:
    """The casebooks (subject and study) whose lock level decides whether the batch's clinical facts may go in."""
    return {
        casebook_stream(e.envelope["study"], s) for e in events if _is_clinical(e) for s in (e.envelope["stream"], None)
    }
