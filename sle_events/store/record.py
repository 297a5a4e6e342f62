"""The study record: an `eventsourcing` application whose events are signed envelopes.

Writes go through `append()`, which takes envelopes already signed by the caller (the store never sees a
private key), checks form, clock, key registry, role, hash chain and signatures, then stores the whole batch in
one transaction or nothing. Reads go through the library's repository, decoding the envelopes back into the
domain's events.
"""

from __future__ import annotations

import copy
import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence
from uuid import UUID

import sqlalchemy.exc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from eventsourcing.application import Application
from eventsourcing.persistence import IntegrityError, Mapper, StoredEvent, Transcoder
from eventsourcing.utils import resolve_topic
from sqlalchemy import func, select

from sle_events.domain.study import KeyProblem, Study
from sle_events.signing.canonical import NotCanonicalisable, canonical_json
from sle_events.signing.envelope import (
    GENESIS,
    MalformedEnvelope,
    SealedEvent,
    check_envelope,
    open_sealed,
    parse_time,
    seal,
    utc_now,
)
from sle_events.signing.keys import Signer, verify_signature
from sle_events.signing.payload import domain_event_from, envelope_for
from sle_events.store.errors import (
    BadSignature,
    ChainBroken,
    ClockSkew,
    MalformedEvent,
    UnknownEventType,
    UnknownStudy,
    UntrustedKey,
    VersionConflict,
)

STUDY_CREATED = "Study.Created"
DEFAULT_DB_FILE = "sle-study.db"
# Below this batch size threads cost more than they save.
PARALLEL_VERIFY_MIN = 16


def database_url(url: str | None = None) -> str:
    """`--db`, else SLE_DATABASE_URL, else an SQLite file in the working directory."""
    url = url or os.environ.get("SLE_DATABASE_URL")
    if url:
        return url
    return f"sqlite:///{Path.cwd() / DEFAULT_DB_FILE}"


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


@lru_cache(maxsize=4096)
def _resolvable(topic: str) -> bool:
    try:
        resolve_topic(topic)
        return True
    except Exception:
        return False


@lru_cache(maxsize=4096)
def _public_key(raw: bytes) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(raw)


def _type_name(topic: str) -> str:
    return topic.rsplit(":", 1)[-1]


class StudyRecord(Application[UUID]):
    """Signed, hash-chained study events persisted with `eventsourcing` + `eventsourcing-sqlalchemy`."""

    name = "Study"  # tables: study_events

    def __init__(
        self,
        url: str | None = None,
        *,
        clock: Callable[[], datetime] = utc_now,
        clock_skew: timedelta = timedelta(minutes=5),
        verify_threads: int | None = None,
    ) -> None:
        self.url = database_url(url)
        super().__init__(
            env={
                "PERSISTENCE_MODULE": "eventsourcing_sqlalchemy",
                "SQLALCHEMY_URL": self.url,
                "CREATE_TABLE": "y",
            }
        )
        self.clock = clock
        self.clock_skew = clock_skew
        self.table = self.recorder.events_record_cls.__table__
        self._heads: dict[UUID, tuple[int, str]] = {}
        self._studies: dict[UUID, Study] = {}
        self._lock = threading.RLock()
        threads = verify_threads or os.cpu_count() or 1
        self._pool = ThreadPoolExecutor(threads) if threads > 1 else None
        self._threads = threads

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

    def study(self, study_id: UUID) -> Study:
        """The study as it stands now (trust root, keys, permissions)."""
        with self._lock:
            study = self._studies.get(study_id)
            if study is None:
                try:
                    study = self.repository.get(study_id)
                except Exception as e:
                    raise UnknownStudy(f"study {study_id} is not in this record") from e
                if not isinstance(study, Study):
                    raise UnknownStudy(f"{study_id} is not a study")
                self._studies[study_id] = study
            return study

    # --- appending -------------------------------------------------------------------------------------
    def append(self, events: Sequence[SealedEvent]) -> list[int]:
        """Verify and store a batch of sealed events atomically; return their log positions."""
        if not events:
            return []
        for attempt in range(3):
            with self._lock:
                studies, heads = self._check(events)
                try:
                    return self._write(events, studies, heads)
                except _RegistryMoved:
                    self._studies.clear()  # someone else changed a key registry: check again
        raise VersionConflict("the key registry kept changing during the append; retry")

    def _check(self, events: Sequence[SealedEvent]) -> tuple[dict[UUID, Study], dict[UUID, tuple[int, str]]]:
        now = self.clock()
        studies: dict[UUID, Study] = {}
        heads: dict[UUID, tuple[int, str]] = {}
        keys: list[Ed25519PublicKey] = []
        for e in events:
            env = e.envelope
            where = {"stream": env.get("stream"), "version": env.get("version")}
            try:
                check_envelope(env)
                if canonical_json(env) != e.signed:
                    raise MalformedEnvelope("signed bytes are not the canonical form of the envelope")
            except (MalformedEnvelope, NotCanonicalisable) as exc:
                raise MalformedEvent(str(exc), **where) from exc
            self._check_clock(env, now, where)
            if not _resolvable(env["type"]):
                raise UnknownEventType(f"unknown event type {env['type']!r}", **where)
            study_id = UUID(env["study"])
            study = studies.get(study_id)
            if study is None:
                study = self._study_for(e, study_id, where)
                studies[study_id] = study
            try:
                entry = study.authorise(env["key"], env["actor"], env["role"], env["type"])
            except KeyProblem as exc:
                raise UntrustedKey(str(exc), **where) from exc
            keys.append(_public_key(study.public_key(entry["key"])))
            if _type_name(env["type"]).startswith("Study.") and env["stream"] == env["study"]:
                if env["version"] > 1:
                    # Registry changes take effect for the rest of the batch.
                    studies[study_id] = study = copy.deepcopy(study)
                    domain_event_from(e).mutate(study)
            heads[e.stream] = self._check_chain(e, heads, where)
        self._verify_signatures(events, keys)
        return studies, heads

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

    def _study_for(self, e: SealedEvent, study_id: UUID, where: dict[str, Any]) -> Study:
        env = e.envelope
        if _type_name(env["type"]) == STUDY_CREATED and env["stream"] == env["study"] and env["version"] == 1:
            # The trust root vouches for itself: the study as created authorises its own creation.
            try:
                return domain_event_from(e).mutate(None)
            except Exception as exc:
                raise MalformedEvent(f"study creation cannot be read: {exc}", **where) from exc
        try:
            return self.study(study_id)
        except UnknownStudy as exc:
            raise UnknownStudy(str(exc), **where) from exc

    def _check_chain(self, e: SealedEvent, heads: dict[UUID, tuple[int, str]], where: dict[str, Any]) -> tuple[int, str]:
        stream, version, prev = e.stream, e.version, e.envelope["prev"]
        head = heads.get(stream) or self._heads.get(stream)
        if head is None or head[0] != version - 1:
            head = self._stored_head(stream)
        if version <= head[0]:
            raise VersionConflict(f"version {version} is already taken (head is v{head[0]})", **where)
        if version != head[0] + 1:
            raise ChainBroken(f"version {version} does not follow the head v{head[0]}", **where)
        if prev != head[1]:
            raise ChainBroken(f"prev {prev[:12]}… does not match the hash of v{head[0]} ({head[1][:12]}…)", **where)
        return version, e.hash

    def _stored_head(self, stream: UUID) -> tuple[int, str]:
        last = self.recorder.select_events(stream, desc=True, limit=1)
        if not last:
            return 0, GENESIS
        return last[0].originator_version, hashlib.sha256(last[0].state).hexdigest()

    def _verify_signatures(self, events: Sequence[SealedEvent], keys: list[Ed25519PublicKey]) -> None:
        def bad_in(lo: int, hi: int) -> list[int]:
            return [i for i in range(lo, hi) if not verify_signature(keys[i], events[i].signature, events[i].signed)]

        n = len(events)
        if self._pool is None or n < PARALLEL_VERIFY_MIN:
            bad = bad_in(0, n)
        else:
            step = -(-n // self._threads)
            futures = [self._pool.submit(bad_in, lo, min(lo + step, n)) for lo in range(0, n, step)]
            bad = [i for f in futures for i in f.result()]
        if bad:
            env = events[bad[0]].envelope
            raise BadSignature(
                f"signature does not verify with key {env['key']} of {env['actor']} "
                f"({len(bad)} bad in batch)",
                stream=env["stream"],
                version=env["version"],
            )

    def _write(self, events: Sequence[SealedEvent], studies: dict[UUID, Study], heads: dict[UUID, tuple[int, str]]) -> list[int]:
        stored = [StoredEvent(e.stream, e.version, e.topic, e.sealed) for e in events]
        expected = {sid: self._registry_version(sid, s, events) for sid, s in studies.items()}
        try:
            with self.recorder.transaction(commit=True) as session:
                ids = self.recorder.insert_events(stored, session=session)
                # Authoritative re-check under the write lock: the registry we trusted is still the latest.
                for sid, version in expected.items():
                    current = session.execute(
                        select(func.max(self.table.c.originator_version)).where(self.table.c.originator_id == sid)
                    ).scalar()
                    if current != version:
                        raise _RegistryMoved()
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
        for sid, study in studies.items():
            if sid in self._studies or any(e.envelope["stream"] == str(sid) for e in events):
                self._studies[sid] = study
        return list(ids or [])

    def _registry_version(self, study_id: UUID, study: Study, events: Iterable[SealedEvent]) -> int:
        """The registry stream's version once this batch is stored."""
        sid = str(study_id)
        in_batch = [e.version for e in events if e.envelope["stream"] == sid]
        return max(in_batch) if in_batch else study.version


class _RegistryMoved(Exception):
    pass
