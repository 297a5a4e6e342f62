"""Signing in to the web view with a registered key, and the sessions that follow.

`SessionStore.sign_in(token)` accepts a token from `sle web link` (`signin.py`) only if: it is not expired
(nor issued in the future), the key is registered **and active** in the study it names, for a role that may
read the record here (`VIEW_ROLES`), its Ed25519 signature holds against that registered public key, and its
nonce was never used. It then opens a session (a random cookie value; its SHA-256 is stored) that expires
after `ttl`. `SessionStore.current(cookie)` re-checks the key against the registry as it stands on every
request, so a key revoked (or rotated out, or moved to another role) ends its sessions at the next request.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from sle_events.domain.event_types import stored_topics
from sle_events.domain.roles import ADMIN, AUDITOR, DATA_MANAGER, INVESTIGATOR, MONITOR, SPONSOR
from sle_events.signing.envelope import open_sealed
from sle_events.signing.keys import public_key_from_b64, verify_signature
from sle_events.store.record import StudyRecord
from sle_events.web.signin import MAX_LIFETIME, BadToken, read_token
from sle_events.web.tables import metadata, web_sessions, web_signin_nonces

# People who read the record; services (the lab interface) and coordinators enter data elsewhere.
VIEW_ROLES = frozenset({MONITOR, AUDITOR, SPONSOR, DATA_MANAGER, INVESTIGATOR, ADMIN})
DEFAULT_SESSION_TTL = timedelta(hours=1)
CLOCK_SLACK = timedelta(minutes=5)  # a CLI clock a little ahead of the server's


class NotSignedIn(PermissionError):
    """No session, or one that ended (the message says why, for the sign-in page)."""


@dataclass(frozen=True)
class Session:
    study: str
    study_code: str
    key: str
    actor: str
    role: str
    printed_name: str | None
    expires_at: datetime

    @property
    def who(self) -> str:
        return f"{self.printed_name} ({self.actor})" if self.printed_name else self.actor


class RegistryCache:
    """Studies' key registries as they stand now: each loaded again whenever its stream has moved on (a key
    registered, revoked or rotated, perhaps by another process), which one indexed query tells."""

    def __init__(self, record: StudyRecord) -> None:
        self.record = record
        self._lock = threading.Lock()
        self._studies: dict[str, tuple[int, Any]] = {}  # study id -> (registry stream version, Study)

    def get(self, study_id: str) -> Any:
        t = self.record.table
        with self.record.engine.connect() as conn:
            version = conn.execute(
                sa.select(sa.func.max(t.c.originator_version)).where(t.c.originator_id == UUID(study_id))
            ).scalar()
        with self._lock:
            cached = self._studies.get(study_id)
            if cached is not None and cached[0] == version:
                return cached[1]
        study: Any = self.record.repository.get(UUID(study_id))
        with self._lock:
            self._studies[study_id] = (study.version, study)
        return study


def _hash(cookie: str) -> str:
    return hashlib.sha256(cookie.encode()).hexdigest()


class SessionStore:
    def __init__(self, record: StudyRecord, *, ttl: timedelta = DEFAULT_SESSION_TTL) -> None:
        self.record = record
        self.engine = record.engine
        self.ttl = ttl
        self._registries = RegistryCache(record)
        metadata.create_all(self.engine, checkfirst=True)

    # ------------------------------------------------------------------------------------------ studies
    def studies(self) -> list[dict[str, str]]:
        """Every study's id and code, from its signed `Study.Created`."""
        t = self.record.table
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(t.c.state).where(t.c.topic.in_(stored_topics("Study.Created"))).order_by(t.c.id)
            ).scalars()
            found = []
            for state in rows:
                env = open_sealed(bytes(state)).envelope
                found.append({"study": env["study"], "code": str(env["payload"].get("code"))})
        return found

    def registry(self, study_id: str) -> Any:
        """The study's key registry as it stands now (see `RegistryCache`)."""
        return self._registries.get(study_id)

    def _resolve_study(self, given: str | None, key: str) -> dict[str, str]:
        studies = self.studies()
        if given is not None:
            for s in studies:
                if given in (s["study"], s["code"]):
                    return s
            raise BadToken(f"the link names study {given!r}, which is not in this record")
        holding = [s for s in studies if key in self.registry(s["study"]).keys]
        if len(holding) == 1:
            return holding[0]
        if not holding:
            raise BadToken(f"key {key} is not registered in any study of this record")
        raise BadToken(f"key {key} is registered in several studies: make the link with --study")

    def _entry(self, study_id: str, key: str) -> dict[str, Any]:
        """The key's registry entry if it may sign in now, else NotSignedIn/BadToken saying why."""
        study = self.registry(study_id)
        entry = study.keys.get(key)
        if entry is None:
            raise BadToken(f"key {key} is not registered in study {study.code}")
        if entry["status"] != "active":
            raise BadToken(f"key {key} of {entry['actor']} was {entry['status']}: it can no longer sign in")
        if entry["role"] not in VIEW_ROLES:
            raise BadToken(
                f"key {key} is registered for the role {entry['role']}, which may not use the web view "
                f"(roles that may: {', '.join(sorted(VIEW_ROLES))})"
            )
        return dict(entry)

    # ------------------------------------------------------------------------------------------ sign in/out
    def sign_in(self, token: str, *, now: datetime | None = None) -> tuple[str, Session]:
        """Check a sign-in token and open a session: (cookie value, session). BadToken says why not."""
        now = now or datetime.now(UTC)
        claims = read_token(token)
        if claims.expires_at <= now:
            raise BadToken(f"the sign-in link expired at {claims.expires_at.isoformat()}: make a new one")
        if claims.issued_at > now + CLOCK_SLACK:
            raise BadToken("the sign-in link was issued in the future: check the clock of the computer that made it")
        if claims.expires_at - claims.issued_at > MAX_LIFETIME:
            raise BadToken(f"the sign-in link lives longer than {int(MAX_LIFETIME.total_seconds() // 60)} min")
        study = self._resolve_study(claims.study, claims.key)
        entry = self._entry(study["study"], claims.key)
        if not verify_signature(public_key_from_b64(entry["public_key"]), claims.signature, claims.message):
            raise BadToken(f"the sign-in link's signature does not hold for key {claims.key}")
        cookie = secrets.token_urlsafe(32)
        expires = now + self.ttl
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    web_signin_nonces.insert().values(
                        nonce=claims.nonce, key=claims.key, expires_at=claims.expires_at.astimezone(UTC).isoformat()
                    )
                )
                conn.execute(
                    web_sessions.insert().values(
                        id_hash=_hash(cookie),
                        study=study["study"],
                        key=claims.key,
                        actor=entry["actor"],
                        role=entry["role"],
                        printed_name=entry.get("printed_name"),
                        opened_at=now.astimezone(UTC).isoformat(),
                        expires_at=expires.astimezone(UTC).isoformat(),
                    )
                )
        except IntegrityError:
            raise BadToken("this sign-in link was used already: make a new one") from None
        self._purge(now)
        session = Session(
            study["study"], study["code"], claims.key, entry["actor"], entry["role"], entry.get("printed_name"), expires
        )
        return cookie, session

    def sign_out(self, cookie: str | None) -> None:
        if cookie:
            with self.engine.begin() as conn:
                conn.execute(web_sessions.delete().where(web_sessions.c.id_hash == _hash(cookie)))

    def _purge(self, now: datetime) -> None:
        """Forget expired sessions and the nonces of dead tokens (a dead token is refused by its expiry)."""
        stamp = now.astimezone(UTC).isoformat()
        with self.engine.begin() as conn:
            conn.execute(web_sessions.delete().where(web_sessions.c.expires_at < stamp))
            conn.execute(web_signin_nonces.delete().where(web_signin_nonces.c.expires_at < stamp))

    # ------------------------------------------------------------------------------------------ each request
    def current(self, cookie: str | None, *, now: datetime | None = None) -> Session:
        """The session of a request's cookie, if it is open and its key may still sign in; else NotSignedIn."""
        if not cookie:
            raise NotSignedIn("sign in with the link `sle web link --key FILE` prints")
        now = now or datetime.now(UTC)
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(web_sessions).where(web_sessions.c.id_hash == _hash(cookie))).first()
        if row is None:
            raise NotSignedIn("your session has ended (signed out, or unknown here): sign in again")
        expires = datetime.fromisoformat(row.expires_at)
        if expires <= now:
            self.sign_out(cookie)
            raise NotSignedIn(f"your session expired at {row.expires_at}: sign in again")
        try:
            entry = self._entry(row.study, row.key)
        except BadToken as e:
            self.sign_out(cookie)
            raise NotSignedIn(f"your session was ended: {e}") from None
        if entry["actor"] != row.actor or entry["role"] != row.role:
            self.sign_out(cookie)
            raise NotSignedIn("your session was ended: your key's registration changed; sign in again")
        code = str(self.registry(row.study).code)
        return Session(row.study, code, row.key, row.actor, row.role, row.printed_name, expires)
