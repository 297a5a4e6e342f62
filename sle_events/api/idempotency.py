"""Idempotency-Key (IETF httpapi draft), kept in the database so every worker and engine agrees.

Scoped to the caller's key id. The first request with a key claims it (`in_flight`). A refusal is then stored
with the key (`done`); a stored batch is not: the record holds it, and its 201 is rebuilt from the record, byte for
byte (the same events at the same positions), which also answers a retry whose first request died after its
commit. Same key and same request: the first response again, nothing new stored. Same key, another request: 422.
Same key while the first is still running: 409."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from uuid import UUID

import sqlalchemy as sa
import sqlalchemy.exc

from sle_events.api.auth import housekeeping_turn, record_nonce
from sle_events.api.problems import Problem
from sle_events.schema import api_idempotency, api_nonces
from sle_events.store.record import run_on_psycopg

MAX_KEY = 255
# How long a key is kept. A request sent again after that is handled as new: a batch already stored gets its
# positions back (append's own rule), so nothing is stored twice; a refusal is judged again.
KEPT = timedelta(hours=24)
# A claim whose request died with its process (no refusal stored with it, no batch in the record) may be taken
# over after this.
STALE_CLAIM = timedelta(minutes=2)


def bookkeeping_engine(engine: sa.Engine) -> sa.Engine:
    """Where the API keeps its bookkeeping (nonces, idempotency claims) and asks a study's version: autocommit,
    so each statement is one round trip with no BEGIN and COMMIT around it. On PostgreSQL its own pool, whose
    sessions do not wait for the disk at commit: a crash may forget the last fraction of a second of nonces and
    claims, and then a retry or replay of an append is answered by append's own rule (the same batch gets its
    positions back; anything else at a taken version is a conflict). The events themselves are committed by the
    record's engine, durably."""
    if engine.dialect.name == "postgresql":
        # SQLAlchemy's default pool (5 + 10): a request holds one only for its few bookkeeping statements.
        return sa.create_engine(
            engine.url, isolation_level="AUTOCOMMIT", connect_args={"options": "-c synchronous_commit=off"}
        )
    return engine.execution_options(isolation_level="AUTOCOMMIT")


# Built once: a statement object reused is compiled and cache-keyed once (SQLAlchemy), not on every request.
_t = api_idempotency
_mine = (_t.c.key_id == sa.bindparam("b_key_id"), _t.c.idempotency_key == sa.bindparam("b_key"))
_CLAIM = _t.insert()
_FIND = sa.select(_t).where(*_mine)
_FINISH = (
    _t.update().where(*_mine).values(state="done", status=sa.bindparam("b_status"), response=sa.bindparam("b_body"))
)
_RELEASE = _t.delete().where(*_mine, _t.c.state == "in_flight")
_EXPIRED = _t.delete().where(_t.c.created_at < sa.bindparam("b_before"))
# Only a claim still stale is taken over: of two workers taking one over at once, the second finds it fresh.
_TAKE_OVER = (
    _t.update()
    .where(*_mine, _t.c.state == "in_flight", _t.c.created_at < sa.bindparam("b_stale_before"))
    .values(created_at=sa.bindparam("b_now"))
)


def request_hash(method: str, path: str, query: str, body: bytes) -> str:
    h = hashlib.sha256()
    for part in (method.encode(), path.encode(), query.encode()):
        h.update(len(part).to_bytes(8, "big") + part)
    h.update(body)
    return h.hexdigest()


def check_key(key: str | None) -> str:
    if not key or len(key) > MAX_KEY or not key.isprintable():
        raise Problem("idempotency_key_missing", f"a write needs an Idempotency-Key header (1 to {MAX_KEY} characters)")
    return key


def _claimed(key_id: str, key: str, digest: str, now: datetime) -> dict[str, object]:
    return {"key_id": key_id, "idempotency_key": key, "request_hash": digest, "state": "in_flight", "created_at": now}


@dataclass(frozen=True)
class Admission:
    fresh_nonce: bool  # False: the (key, nonce) pair was used before, a replay; nothing else was done
    claimed: bool  # the Idempotency-Key is this request's now (False: `claim` says whose it is)
    study_version: int | None  # the study stream's version as of this statement


@lru_cache(maxsize=8)
def _admit_statement(events: str) -> str:
    """PostgreSQL: nonce, claim (only with a fresh nonce) and the study's version in one statement, prepared on
    each connection (`run_on_psycopg`)."""
    return f"""WITH fresh_nonce AS (
            INSERT INTO {api_nonces.name} (key_id, nonce, created) VALUES (%(key_id)s, %(nonce)s, %(created)s)
            ON CONFLICT DO NOTHING RETURNING 1
        ), new_claim AS (
            INSERT INTO {_t.name} (key_id, idempotency_key, request_hash, state, created_at)
            SELECT %(key_id)s, %(key)s, %(digest)s, 'in_flight', %(now)s WHERE EXISTS (SELECT FROM fresh_nonce)
            ON CONFLICT DO NOTHING RETURNING 1
        )
        SELECT EXISTS (SELECT FROM fresh_nonce), EXISTS (SELECT FROM new_claim),
            (SELECT max(originator_version) FROM {events} WHERE originator_id = %(study)s)"""


def admit(
    conn: sa.Connection,
    events: sa.Table,
    version_query: sa.Select,
    *,
    key_id: str,
    nonce: str,
    created: int,
    key: str,
    digest: str,
    study: UUID,
    now: datetime,
) -> Admission:
    """A write's bookkeeping before its append: the signature's nonce, the Idempotency-Key claim (only if the
    nonce is fresh) and the study stream's version now (`version_query`, bind `b_stream`). One statement and
    one round trip on PostgreSQL (a write made three); in turn elsewhere."""
    if conn.dialect.name == "postgresql":
        params = {"key_id": key_id, "nonce": nonce, "created": created, "key": key, "digest": digest}
        [(fresh, claimed, version)] = run_on_psycopg(
            conn, _admit_statement(events.name), {**params, "now": now, "study": study}
        )
        return Admission(fresh, claimed, version)
    if not record_nonce(conn, key_id, nonce, created):
        return Admission(False, False, None)
    try:
        conn.execute(_CLAIM, _claimed(key_id, key, digest, now))
        claimed = True
    except sqlalchemy.exc.IntegrityError:
        claimed = False
    return Admission(True, claimed, conn.execute(version_query, {"b_stream": study}).scalar())


def claim(
    conn: sa.Connection, key_id: str, key: str, digest: str, in_record: Callable[[], tuple[int, bytes] | None]
) -> tuple[int, bytes] | None:
    """Claim `key` for this request: None if claimed now, else the (status, body) of the first response: stored
    with the key (a refusal), or `in_record()`, the 201 of the request's batch if the record holds it. `conn`
    autocommits (`bookkeeping_engine`): the claim is visible to every worker at once."""
    check_key(key)
    now = datetime.now(UTC)
    mine = {"b_key_id": key_id, "b_key": key}
    try:
        conn.execute(_CLAIM, _claimed(key_id, key, digest, now))
        return None
    except sqlalchemy.exc.IntegrityError:
        pass
    row = conn.execute(_FIND, mine).first()
    if row is None:  # released meanwhile: try once more
        return claim(conn, key_id, key, digest, in_record)
    if row.request_hash != digest:
        raise Problem("idempotency_key_reused", f"Idempotency-Key {key!r} was used for another request; use a new key")
    if row.state == "done":
        return int(row.status), bytes(row.response)
    if (stored := in_record()) is not None:
        return stored
    created = row.created_at if row.created_at.tzinfo else row.created_at.replace(tzinfo=UTC)
    if now - created > STALE_CLAIM:
        taken = conn.execute(_TAKE_OVER, {**mine, "b_stale_before": now - STALE_CLAIM, "b_now": now})
        if taken.rowcount == 1:
            return None
    raise Problem("idempotency_in_flight", f"a request with Idempotency-Key {key!r} is still being processed")


def finish(conn: sa.Connection, key_id: str, key: str, status: int, body: bytes) -> None:
    """Store the response of a claimed key (a refusal: a stored batch is answered by the record)."""
    conn.execute(_FINISH, {"b_key_id": key_id, "b_key": key, "b_status": status, "b_body": body})


def release(conn: sa.Connection, key_id: str, key: str) -> None:
    """Forget a claim whose request failed unexpectedly, so a retry may run it."""
    conn.execute(_RELEASE, {"b_key_id": key_id, "b_key": key})


def forget_expired_keys(conn: sa.Connection, created: int, now: datetime) -> None:
    """Keys older than `KEPT` go (the index on `created_at`, revision 0018, finds them). Done on a write's
    `housekeeping_turn`, as nonces are forgotten."""
    if housekeeping_turn(created):
        conn.execute(_EXPIRED, {"b_before": now - KEPT})
