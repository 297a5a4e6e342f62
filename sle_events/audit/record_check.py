"""The record check: re-derive trust in every stored event from the bytes alone.

Like an fsck, it trusts nothing the store computed: it re-reads every row, re-canonicalises each envelope,
re-hashes the chains and re-checks every signature against the key registry *as it stood at that event's
position in the log*. It answers with findings (stream, version, kind, detail), never a bare boolean, and any
stored byte pattern gives findings, never a crash.

Phase 1 replays each study's registry stream (a stream whose signed first event is its own `Study.Created`)
in log order into a timeline of registry states. Phase 2 splits all other streams into contiguous ranges of
stream ids, one per core, and checks them in parallel processes. Which streams are registries is decided by
the signed envelopes, not by the topic column, so an edited topic is a `topic_mismatch` where it was edited.
"""

from __future__ import annotations

import base64
import bisect
import copy
import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from uuid import UUID

from sqlalchemy import Connection, func, select

from sle_events.audit.findings import Finding
from sle_events.domain.event_types import UnknownEventName, type_name
from sle_events.domain.study import KeyProblem, KeyRevoked, KeyRotatedOut, RoleNotAllowed, Study, UnknownKey
from sle_events.signing.chain import BROKEN, GENESIS, link_problem
from sle_events.signing.envelope import MalformedEnvelope, SealedEvent, open_sealed, open_stored
from sle_events.signing.keys import key_id, verify_signature
from sle_events.store.codec import PayloadSchemaError, check_payload, domain_event_from
from sle_events.store.record import public_key
from sle_events.store.streams import registry_topic

BATCH = 5000
STUDY_CREATED = "Study.Created"
Timelines = dict[str, tuple[list[int], list[Study]]]

_KEY_KINDS = {
    UnknownKey: "key_unknown",
    KeyRevoked: "key_revoked",
    KeyRotatedOut: "key_rotated",
    RoleNotAllowed: "role_not_allowed",
}


def _type_name(topic: str) -> str:
    try:
        return type_name(topic)
    except UnknownEventName:
        return ""


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

    def problem(
        self, e: SealedEvent, position: int, registry: Study | None = None, *, vouched: bool = False
    ) -> tuple[str, str] | None:
        """(finding kind, detail) if the signature does not hold, else None. `vouched`: these exact bytes are
        ones a sealed verification already checked the Ed25519 signature of (`audit.results.vouched_tree`), so
        only the key's authorisation is looked at again."""
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
        key = self._keys.get((id(registry), entry["key"]))
        if key is None:
            key = self._keys[(id(registry), entry["key"])] = public_key(registry.public_key(entry["key"]))
        if not vouched and not verify_signature(key, e.signature, e.signed):
            return "bad_signature", (
                f"signature by {env['actor']} (key {env['key']}) does not verify: the signed "
                "envelope (payload, type, times, ids or prev) was altered after signing"
            )
        return None


class StreamChecker:
    """Checks one event after another, stream by stream, in version order."""

    def __init__(self, timelines: Timelines, heads: dict[str, tuple[int, str]] | None = None):
        self.signatures = SignatureCheck(timelines)
        self.heads = heads or {}  # incremental verification: each stream's head at the saved checkpoint
        self.findings: list[Finding] = []
        self.stream: str | None = None
        self.study: str | None = None  # the stream's study, from its first event
        self.version = 0
        self.hash = GENESIS
        self.events = 0

    def found(self, stream: str, version: int | None, kind: str, detail: str, position: int) -> None:
        self.findings.append(Finding(stream, version, kind, detail, position))

    def check(
        self, position: int, stream_id: UUID, version: int, topic: str, state: bytes, registry: Study | None = None
    ) -> SealedEvent | None:
        """Check one event; whatever its bytes hold, the answer is findings (a failing check is one too)."""
        stream = str(stream_id)
        self.events += 1
        if stream != self.stream:
            self.stream, self.study = stream, None
            self.version, self.hash = self.heads.get(stream, (0, GENESIS))
        try:
            return self._check(position, stream, version, topic, state, registry)
        except Exception as exc:
            self.found(
                stream,
                version,
                "malformed",
                f"the stored event cannot be checked: {type(exc).__name__}: {str(exc)[:200]}",
                position,
            )
            self.version, self.hash = version, hashlib.sha256(state).hexdigest()
            return None

    def _check(
        self, position: int, stream: str, version: int, topic: str, state: bytes, registry: Study | None
    ) -> SealedEvent | None:
        found = self.found
        try:
            e = open_stored(state)
        except MalformedEnvelope as exc:
            found(stream, version, "malformed", f"stored bytes are not a valid sealed envelope: {exc}", position)
            self.version, self.hash = version, hashlib.sha256(state).hexdigest()
            return None
        env = e.envelope
        if env["stream"] != stream or env["version"] != version:
            found(
                stream,
                version,
                "row_mismatch",
                f"row says stream {stream} v{version}, the signed envelope says {env['stream']} v{env['version']}",
                position,
            )
        if env["type"] != topic:
            found(
                stream,
                version,
                "topic_mismatch",
                f"topic column {topic!r} differs from the signed event type {env['type']!r}",
                position,
            )
        problem = link_problem(self.version, self.hash, version, env["prev"])
        if problem == BROKEN:
            found(
                stream,
                version,
                "chain_broken",
                f"prev {env['prev'][:16]}… does not match the hash of v{self.version} ({self.hash[:16]}…): "
                "the previous event was altered, replaced or reordered",
                position,
            )
        elif problem is not None:
            missing = f"v{self.version + 1}" + (f"–v{version - 1}" if version - 1 > self.version + 1 else "")
            found(
                stream,
                version,
                "missing_event",
                f"{missing} missing: the stream jumps from v{self.version} to v{version}",
                position,
            )
        self.version, self.hash = version, e.hash
        if self.study is None:
            self.study = env["study"]
        elif env["study"] != self.study:
            found(
                stream,
                version,
                "study_mismatch",
                f"the event speaks for study {env['study']}, but the stream belongs to study {self.study} (its "
                "first event's)",
                position,
            )
        signature_problem = self.signatures.problem(e, position, registry)
        if signature_problem is None or signature_problem[0] not in ("unknown_study", "unknown_event_type"):
            name = type_name(env["type"])
            if name.startswith("Study.") != (stream == env["study"]):
                found(
                    stream,
                    version,
                    "study_mismatch",
                    f"{name} on stream {stream} of study {env['study']}: study facts live on the study's own "
                    "stream, and only they do",
                    position,
                )
        if signature_problem is not None:
            kind, detail = signature_problem
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


def registry_streams(engine: Any, table: Any) -> list[UUID]:
    """The streams whose signed first event is their own study's `Study.Created` (topics only nominate)."""
    with _connected(engine) as conn:
        candidates = list(
            conn.execute(select(table.c.originator_id).where(registry_topic(table.c.topic)).distinct()).scalars()
        )
        out = []
        for stream in candidates:
            state = conn.execute(
                select(table.c.state).where(table.c.originator_id == stream, table.c.originator_version == 1)
            ).scalar()
            try:
                env = open_stored(bytes(state)).envelope if state is not None else None
            except Exception:
                env = None
            if (
                env is not None
                and _type_name(env["type"]) == STUDY_CREATED
                and env["stream"] == env["study"] == str(stream)
            ):
                out.append(stream)
    return sorted(out)


def build_registry_timelines(
    engine: Any,
    table: Any,
    findings: list[Finding],
    *,
    registries: list[UUID] | None = None,
    admin_keys: frozenset[str] = frozenset(),
) -> tuple[Timelines, int]:
    """Replay every study's registry stream in version order; keep the registry state after each valid event.

    With `admin_keys`, a study whose creation names another admin key has no trust root (`untrusted_root`).
    `engine` may also be an open connection (a reader inside its transaction)."""
    if registries is None:
        registries = registry_streams(engine, table)
    timelines: Timelines = {}
    checker = StreamChecker(timelines)
    rows: list[Any] = []
    with _connected(engine) as conn:
        for k in range(0, len(registries), 500):
            rows += conn.execute(
                select(table.c.id, table.c.originator_id, table.c.originator_version, table.c.topic, table.c.state)
                .where(table.c.originator_id.in_(registries[k : k + 500]))
                .order_by(table.c.originator_id, table.c.originator_version)
            ).all()
    current: dict[str, Study] = {}
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
                if not isinstance(registry, Study):
                    raise MalformedEnvelope("its first event does not create a study")
                if admin_keys and first.envelope["payload"].get("admin_public_key") not in admin_keys:
                    checker.found(
                        study_id,
                        version,
                        "untrusted_root",
                        "the study's creation names an admin key that is not in the auditor's trust root (--admin-key)",
                        position,
                    )
                    registry = None
            except Exception as exc:
                checker.found(study_id, version, "malformed", f"study creation cannot be read: {exc}", position)
                registry = None
        if registry is not None:
            e = checker.check(position, stream_id, version, topic, bytes(state), registry=registry)
        else:
            checker.events += 1
            checker.stream, checker.version, checker.hash = study_id, version, hashlib.sha256(bytes(state)).hexdigest()
            if len(checker.findings) == before:
                checker.found(
                    study_id, version, "unknown_study", "registry event before the study's creation", position
                )
        ok = len(checker.findings) == before or all(
            f.kind in ("missing_event", "chain_broken", "topic_mismatch") for f in checker.findings[before:]
        )
        if e is not None and ok and registry is not None:  # e is only set where registry is
            state_after = copy.deepcopy(registry)
            try:
                event = domain_event_from(e)
                if version == 1:
                    state_after = event.mutate(None)
                else:
                    state_after.version = version - 1  # tolerate a gap: it is already a finding
                    event.mutate(state_after)
            except Exception as exc:
                checker.found(study_id, version, "malformed", f"registry event cannot be applied: {exc}", position)
                continue
            current[study_id] = state_after
            positions, states = timelines.setdefault(study_id, ([], []))
            positions.append(position)
            states.append(state_after)
    findings.extend(checker.findings)
    findings.extend(_unapproved_studies(rows))
    return timelines, len(rows)


def _unapproved_studies(rows: list[Any]) -> list[Finding]:
    """Every study created after the database's first without an existing admin's unused approval, in log
    order (the append-time rule, `StudyRecord._check_new_study`)."""
    findings, approvals, created = [], [], 0
    for position, stream_id, version, _topic, state in sorted(rows, key=lambda r: r[0]):
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
                findings.append(
                    Finding(
                        str(stream_id),
                        1,
                        "study_not_approved",
                        f"study {mine[0]!r} (trust-root key {mine[1]}) was created in a database that "
                        "already held a study, without an existing admin's approval",
                        position,
                    )
                )
            elif created:
                approvals.remove(mine)
            created += 1
    return findings


@contextmanager
def _connected(engine: Any) -> Iterator[Any]:
    if isinstance(engine, Connection):
        yield engine
    else:
        with engine.connect() as conn:
            yield conn


def heads_at(conn: Any, table: Any, streams: list[Any], after: int) -> dict[str, tuple[int, str]]:
    """Each stream's newest event at or below log position `after`: (version, hash), where its chain resumes."""
    heads: dict[str, tuple[int, str]] = {}
    for k in range(0, len(streams), 500):
        newest = (
            select(table.c.originator_id, func.max(table.c.originator_version))
            .where(table.c.id <= after, table.c.originator_id.in_(streams[k : k + 500]))
            .group_by(table.c.originator_id)
        )
        for stream, version in list(conn.execute(newest)):
            state = conn.execute(
                select(table.c.state).where(table.c.originator_id == stream, table.c.originator_version == version)
            ).scalar()
            heads[str(stream)] = (version, hashlib.sha256(bytes(state)).hexdigest())
    return heads
