"""Who is calling: RFC 9421 HTTP Message Signatures (Ed25519) by a key the study registered, and what that key's
role may do.

A request is signed over `@method`, `@path`, `@query` (and, with a body, `content-type` and `content-digest`,
RFC 9530) with the parameters `created`, `keyid` (the registered key id), `alg="ed25519"` and a `nonce`; it is
accepted for `MAX_AGE` after `created`, and a (key, nonce) pair only once (kept in the database, so every worker
refuses a replay). The verification itself is `http-message-signatures`'."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
import sqlalchemy.exc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from http_message_signatures import HTTPMessageVerifier, HTTPSignatureKeyResolver, InvalidSignature, algorithms
from http_message_signatures.exceptions import HTTPMessageSignaturesException

from sle_events.api.problems import Problem
from sle_events.domain.roles import (
    ADMIN,
    AUDITOR,
    COORDINATOR,
    DATA_MANAGER,
    INVESTIGATOR,
    LAB,
    MONITOR,
    SPONSOR,
)
from sle_events.domain.study import Study
from sle_events.schema import api_nonces
from sle_events.signing.requests import READ_COMPONENTS, WRITE_COMPONENTS

MAX_AGE = timedelta(minutes=5)
CLOCK_SKEW = timedelta(seconds=30)

# Reads: endpoint -> roles that may call it (writes follow the study's signed permission table instead).
EVERYONE = frozenset({ADMIN, INVESTIGATOR, COORDINATOR, LAB, MONITOR, AUDITOR, DATA_MANAGER, SPONSOR})
CLINICAL_READERS = frozenset({ADMIN, INVESTIGATOR, COORDINATOR, MONITOR, AUDITOR, DATA_MANAGER, SPONSOR})
READ_ROLES: dict[str, frozenset[str]] = {
    "stream": EVERYONE,  # a writer needs its stream's head (version, hash)
    "keys": EVERYONE,
    "ledger": EVERYONE,
    "patients": frozenset(CLINICAL_READERS | {LAB}),  # a lab service finds its subject by screening number
    "dashboard": CLINICAL_READERS,
    "replay": CLINICAL_READERS,
    "audit_trail": frozenset({ADMIN, INVESTIGATOR, COORDINATOR, MONITOR, AUDITOR, DATA_MANAGER}),
    "verification": frozenset({ADMIN, MONITOR, AUDITOR, DATA_MANAGER, SPONSOR}),
    # the regulated acts' state: who signs, locks, verifies and answers needs it; a lab service does not
    "casebook": CLINICAL_READERS,
    "sdv": CLINICAL_READERS,
    "queries": CLINICAL_READERS,
    # whole-study data sets (ODM, SDTM, FHIR, the PDF report): those who hand data on, and those who inspect
    "export": frozenset({ADMIN, DATA_MANAGER, SPONSOR, AUDITOR}),
}


@dataclass(frozen=True)
class Caller:
    key_id: str
    actor: str
    role: str
    study: str


class _Message:
    """What `http-message-signatures` reads of a request."""

    def __init__(self, method: str, url: str, headers: Any) -> None:
        self.method = method
        self.url = url
        self.headers = headers


class _StudyKeys(HTTPSignatureKeyResolver):
    """Resolves a `keyid` in the registries of the studies given, first match; remembers why a key is unusable."""

    def __init__(self, study: Study, others: Callable[[], list[Study]]) -> None:
        self.study = study
        self.others = others  # looked at only for a key the study does not hold
        self.found: tuple[Study, dict[str, Any]] | None = None
        self.problem: Problem | None = None

    def resolve_public_key(self, key_id: str) -> Ed25519PublicKey | None:
        for study in [self.study] if key_id in self.study.keys else [self.study, *self.others()]:
            entry = study.keys.get(key_id)
            if entry is None:
                continue
            if entry["status"] == "revoked":
                self.problem = Problem("key_revoked", f"key {key_id} was revoked")
                return None
            if entry["status"] == "rotated":
                self.problem = Problem("key_rotated", f"key {key_id} was rotated out; sign with its successor")
                return None
            self.found = (study, entry)
            return Ed25519PublicKey.from_public_bytes(study.public_key(key_id))
        self.problem = Problem("key_unknown", f"key {key_id} is not registered in this study")
        return None

    def resolve_private_key(self, key_id: str) -> Any:  # pragma: no cover - the server never signs
        raise NotImplementedError


class _Verifier(HTTPMessageVerifier):
    max_clock_skew = CLOCK_SKEW


@dataclass(frozen=True)
class Signed:
    """A request whose signature verified: by which key (`caller`), found in which study's registry (`home`)."""

    caller: Caller
    home: Study
    nonce: str
    created: int


def verify_request(
    *, method: str, url: str, headers: Any, body: bytes, study: Study, others: Callable[[], list[Study]]
) -> Signed:
    """The registered key that signed this request (no database: the replay check is the caller's), or a 401
    `Problem`."""
    if "signature-input" not in headers or "signature" not in headers:
        raise Problem("signature_missing", "sign the request (RFC 9421, Ed25519, keyid = your registered key id)")
    keys = _StudyKeys(study, others)
    verifier = _Verifier(signature_algorithm=algorithms.ED25519, key_resolver=keys)
    try:
        results = verifier.verify(_Message(method, url, headers), max_age=MAX_AGE, body=body or None)
    except (InvalidSignature, HTTPMessageSignaturesException, ValueError) as exc:
        if keys.problem is not None:
            raise keys.problem from None
        raise Problem("signature_invalid", f"request signature does not verify: {exc}") from None
    # The coverage the library returns, checked here: its `require_components` parses every component id of
    # both lists again on each request (an eighth of a request's verification).
    uncovered = [
        c for c in (WRITE_COMPONENTS if body else READ_COMPONENTS) if f'"{c}"' not in results[0].covered_components
    ]
    if uncovered:
        raise Problem("signature_invalid", f"the request signature must cover {', '.join(uncovered)}")
    params = results[0].parameters
    nonce = params.get("nonce")
    if not isinstance(nonce, str) or not 8 <= len(nonce) <= 128:
        raise Problem("signature_invalid", "the signature needs a nonce parameter (8 to 128 characters)")
    assert keys.found is not None  # verified, so the resolver found the key
    home, entry = keys.found
    key_id = str(params["keyid"])
    caller = Caller(key_id=key_id, actor=entry["actor"], role=entry["role"], study=str(study.id))
    return Signed(caller=caller, home=home, nonce=nonce, created=int(params["created"]))


def admitted(signed: Signed, study: Study) -> Caller:
    """The caller, once its nonce is recorded: nobody reads or writes a study with another study's key."""
    if signed.home is not study:
        key_id = signed.caller.key_id
        raise Problem("other_study", f"key {key_id} belongs to another study; nobody reads or writes another study")
    return signed.caller


def admit_reader(conn: sa.Connection, signed: Signed, study: Study, now: datetime | None = None) -> Caller:
    """A read's caller, once its nonce is kept (`conn` autocommits, `idempotency.bookkeeping_engine`: a nonce,
    once used, is used for every worker); a write's bookkeeping is `idempotency.admit`."""
    _refuse_replay(conn, signed.caller.key_id, signed.nonce, signed.created, now or datetime.now(UTC))
    return admitted(signed, study)


def replay_problem(key_id: str, nonce: str) -> Problem:
    return Problem("replay", f"nonce {nonce!r} of key {key_id} was already used: a replayed request")


_NONCE = api_nonces.insert()  # built once (compiled and cache-keyed once)
_EXPIRED = api_nonces.delete().where(api_nonces.c.created < sa.bindparam("b_horizon"))


def _refuse_replay(conn: sa.Connection, key_id: str, nonce: str, created: int, now: datetime) -> None:
    if not record_nonce(conn, key_id, nonce, created):
        raise replay_problem(key_id, nonce)
    forget_expired_nonces(conn, created, now)


def record_nonce(conn: sa.Connection, key_id: str, nonce: str, created: int) -> bool:
    """Keep a signature's nonce; False if this key used it before (a replay)."""
    try:
        conn.execute(_NONCE, {"key_id": key_id, "nonce": nonce, "created": created})
    except sqlalchemy.exc.IntegrityError:
        return False
    return True


def housekeeping_turn(created: int) -> bool:
    """Whether the request signed at `created` forgets what has expired (nonces, Idempotency-Keys): one request
    in 16, so no request pays it every time."""
    return created % 16 == 0


def forget_expired_nonces(conn: sa.Connection, created: int, now: datetime) -> None:
    """Nonces older than any acceptable signature can go: such a request is refused by its age anyway. Done on
    a `housekeeping_turn`."""
    if housekeeping_turn(created):
        conn.execute(_EXPIRED, {"b_horizon": int((now - MAX_AGE - CLOCK_SKEW).timestamp())})


def require_role(caller: Caller, endpoint: str) -> None:
    if caller.role not in READ_ROLES[endpoint]:
        raise Problem("forbidden", f"role {caller.role} may not read {endpoint.replace('_', ' ')}")


def require_write(caller: Caller, study: Study, events: list[tuple[str, str]]) -> None:
    """A caller relaying events another key signed (e.g. an EDC front end) may send only types its own role may
    record, by the study's signed permission table. Events it signed itself are left to `append`, which refuses
    a type its role may not record as `UntrustedKey` (also 403), exactly as in process."""
    for name, key in events:
        if key != caller.key_id and caller.role not in study.permissions.get(name, []):
            raise Problem("forbidden", f"role {caller.role} may not send {name} in this study (signed by key {key})")
