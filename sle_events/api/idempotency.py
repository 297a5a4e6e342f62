"""Idempotency-Key (IETF httpapi draft), kept in the database so every worker and engine agrees.

Scoped to the caller's key id. The first request with a key claims it (`in_flight`) in its own transaction;
its response is then stored with it. Same key and same request: the stored response again, nothing new stored.
Same key, another request: 422. Same key while the first is still running: 409."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
import sqlalchemy.exc

from sle_events.api.problems import Problem
from sle_events.schema import api_idempotency

MAX_KEY = 255
# A claim whose request died with its process (no response stored) may be taken over after this.
STALE_CLAIM = timedelta(minutes=2)


def relaxed(conn: sa.Connection) -> None:
    """The API's bookkeeping (nonces, idempotency records) need not wait for the disk on PostgreSQL: a crash may
    forget the last fraction of a second of them, and then a retry or replay of an append is answered by append's
    own rule (the same batch gets its positions back; anything else at a taken version is a conflict)."""
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SET LOCAL synchronous_commit TO OFF"))


def request_hash(method: str, path: str, query: str, body: bytes) -> str:
    h = hashlib.sha256()
    for part in (method.encode(), path.encode(), query.encode()):
        h.update(len(part).to_bytes(8, "big") + part)
    h.update(body)
    return h.hexdigest()


def claim(engine: sa.Engine, key_id: str, key: str, digest: str) -> tuple[int, bytes] | None:
    """Claim `key` for this request: None if claimed now, else the stored (status, body) of the first response."""
    if not key or len(key) > MAX_KEY or not key.isprintable():
        raise Problem("idempotency_key_missing", f"a write needs an Idempotency-Key header (1 to {MAX_KEY} characters)")
    t = api_idempotency
    now = datetime.now(UTC)
    try:
        with engine.begin() as conn:
            relaxed(conn)
            conn.execute(
                t.insert().values(
                    key_id=key_id, idempotency_key=key, request_hash=digest, state="in_flight", created_at=now
                )
            )
        return None
    except sqlalchemy.exc.IntegrityError:
        pass
    with engine.begin() as conn:
        row = conn.execute(sa.select(t).where(t.c.key_id == key_id, t.c.idempotency_key == key)).first()
        if row is None:  # released meanwhile: try once more
            return claim(engine, key_id, key, digest)
        if row.request_hash != digest:
            raise Problem(
                "idempotency_key_reused", f"Idempotency-Key {key!r} was used for another request; use a new key"
            )
        if row.state == "done":
            return int(row.status), bytes(row.response)
        created = row.created_at if row.created_at.tzinfo else row.created_at.replace(tzinfo=UTC)
        if now - created > STALE_CLAIM:
            conn.execute(
                t.update()
                .where(t.c.key_id == key_id, t.c.idempotency_key == key, t.c.state == "in_flight")
                .values(created_at=now)
            )
            return None
    raise Problem("idempotency_in_flight", f"a request with Idempotency-Key {key!r} is still being processed")


def finish(engine: sa.Engine, key_id: str, key: str, status: int, body: bytes) -> None:
    t = api_idempotency
    with engine.begin() as conn:
        relaxed(conn)
        conn.execute(
            t.update()
            .where(t.c.key_id == key_id, t.c.idempotency_key == key)
            .values(state="done", status=status, response=body)
        )


def release(engine: sa.Engine, key_id: str, key: str) -> None:
    """Forget a claim whose request failed unexpectedly, so a retry may run it."""
    t = api_idempotency
    with engine.begin() as conn:
        conn.execute(t.delete().where(t.c.key_id == key_id, t.c.idempotency_key == key, t.c.state == "in_flight"))
