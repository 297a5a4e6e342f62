"""The investigator's sign-off and the data manager's freeze, lock and unlock (21 CFR 11.50/11.70/11.200).

These regulated acts are recorded on a stream of their own, never on the subject's clinical stream, so a
sign-off does not change the data it covers. A ``Casebook`` stream exists per subject
(:meth:`Casebook.id_for`) and one for the whole study (:meth:`Casebook.study_id_for`, where a study-wide freeze
or lock is recorded).

A sign-off (``Casebook.SignedOff``) carries its manifestation (11.50): the signer's printed name, the meaning
of the signature (one of the study's SignatureDefs: review, approval, responsibility) and, in the envelope, the
date-time with its offset and the signer's id. It is bound (11.70) to :func:`content_hash` of exactly the
events it covers (the subject's stream up to a version, or the versions of one visit), so it cannot be moved to
other data: an auditor recomputes that hash from the stored rows alone.

Whether a sign-off still holds (not "invalidated by change"), and whether data are locked, are folds over the
events (:func:`lock_level`, :func:`visit_versions`); the read model is ``projections/casebook.py``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar
from uuid import UUID, uuid5

from eventsourcing.domain import event
from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr

from sle_events.domain import clock
from sle_events.domain.base import TrialAggregate
from sle_events.domain.errors import ProtocolViolation

__all__ = [
    "CONTENT_HASH_METHOD",
    "SAFETY_FACTS",
    "SIGNATURE_DEFS",
    "Casebook",
    "CoveredStream",
    "SignatureDef",
    "content_hash",
    "lock_level",
    "visit_versions",
]

#: how `content_hash` is computed; signed into every sign-off so a later method can never be confused with it
CONTENT_HASH_METHOD = "sle-signoff-content-v1"

#: facts that may still be recorded on frozen or locked data, and are flagged when they are: an SAE must be
#: reportable at any time (ICH E6(R3), EU CTR art. 41), and with it the AE it grows from and its follow-up.
SAFETY_FACTS = frozenset(
    {
        "Subject.AdverseEventReported",
        "Subject.AdverseEventAssessed",
        "Subject.SeriousAdverseEventReported",
        "Subject.AdverseEventFollowedUp",
        "Subject.ExpectednessAssessed",
        "Subject.DeathRecorded",
    }
)

#: facts that change earlier facts (their payload names the version they change)
CHANGE_FACTS = {"Subject.Corrected": "corrected_version", "Subject.Voided": "voided_version"}

#: a fact belongs to a visit when its payload names it, or it happened within this many days of the visit
VISIT_NEAR_DAYS = 2

FROZEN, LOCKED = "frozen", "locked"
_STRICTNESS = {None: 0, FROZEN: 1, LOCKED: 2}


@dataclass(frozen=True)
class SignatureDef:
    """One meaning an investigator's signature may carry (ODM ``AdminData/SignatureDef``)."""

    oid: str
    meaning: str
    legal_reason: str


#: the study's SignatureDefs: meaning -> definition (the ODM export writes them as AdminData/SignatureDef)
SIGNATURE_DEFS: dict[str, SignatureDef] = {
    "review": SignatureDef(
        "SD.INV.REVIEW",
        "I have reviewed the data of this casebook (or visit) as recorded.",
        "21 CFR 11.50(b): review",
    ),
    "approval": SignatureDef(
        "SD.INV.APPROVE",
        "I approve the data of this casebook (or visit) as accurate and complete.",
        "21 CFR 11.50(b): approval",
    ),
    "responsibility": SignatureDef(
        "SD.INV.RESP",
        "I take responsibility for the data of this casebook (or visit) as principal investigator.",
        "21 CFR 11.50(b): responsibility",
    ),
}


# --------------------------------------------------------------------------------------------------- errors
class CasebookError(ProtocolViolation):
    code: ClassVar[str] = "casebook"


class UnknownMeaning(CasebookError):
    code = "unknown_signature_meaning"

    def __init__(self, meaning: Any) -> None:
        super().__init__(
            f"signature meaning {meaning!r} is not one of the study's SignatureDefs: {', '.join(SIGNATURE_DEFS)}",
            meaning=str(meaning),
        )


class RoleMayNotSign(CasebookError):
    code = "role_may_not_sign"

    def __init__(self, role: str, allowed: Iterable[str]) -> None:
        allowed = sorted(allowed)
        super().__init__(
            f"role {role} may not sign off a casebook (may: {', '.join(allowed) or 'nobody'})",
            role=role,
            allowed=allowed,
        )


class SigningKeyNotUsable(CasebookError):
    """The signing key is revoked or rotated out, or not protected by a passphrase (11.200: two components)."""

    code = "signing_key_not_usable"

    def __init__(self, why: str) -> None:
        super().__init__(f"this key cannot sign off: {why}", why=why)


class NothingToSign(CasebookError):
    code = "nothing_to_sign"

    def __init__(self, what: str) -> None:
        super().__init__(f"nothing to sign: {what}", what=what)


class LockStateError(CasebookError):
    """Freezing what is frozen, unlocking what is not locked, an unlock without a reason..."""

    code = "lock_state"

    def __init__(self, message: str) -> None:
        super().__init__(message)


class OpenQueriesBlockLock(CasebookError):
    code = "open_queries_block_lock"

    def __init__(self, what: str, queries: Iterable[Any]) -> None:
        ids = [str(getattr(q, "id", q)) for q in queries]
        super().__init__(
            f"{what} cannot be locked: {len(ids)} queries are not closed ({', '.join(ids[:5])}"
            f"{' …' if len(ids) > 5 else ''}); close them first (or freeze instead)",
            queries=ids,
        )


# --------------------------------------------------------------------------------------------- content hash
class CoveredStream(BaseModel):
    """What a sign-off covers of one stream: its events 1..``through_version``, or only ``versions`` of them."""

    model_config = ConfigDict(extra="forbid", strict=True)

    stream: StrictStr
    through_version: StrictInt
    versions: list[StrictInt] | None = None

    def covered(self) -> list[int]:
        return list(self.versions) if self.versions is not None else list(range(1, self.through_version + 1))


def content_hash(covers: Iterable[CoveredStream], sealed: Mapping[tuple[str, int], bytes]) -> str:
    """SHA-256 (hex) of exactly the events a sign-off covers, from their stored bytes (the ``state`` column of
    ``study_events``: the sealed envelope, also the ledger's leaf). An auditor recomputes it with nothing else::

        h = sha256(b"sle-signoff-content-v1\\n")
        for each covered stream (in the order the sign-off lists them), each covered version ascending:
            h.update(f"{stream}:{version}:{sha256(state).hexdigest()}\\n".encode())

    ``sealed`` maps (stream, version) to those bytes; a covered event that is missing raises KeyError."""
    h = hashlib.sha256(CONTENT_HASH_METHOD.encode() + b"\n")
    for cover in covers:
        for version in sorted(cover.covered()):
            digest = hashlib.sha256(bytes(sealed[(cover.stream, version)])).hexdigest()
            h.update(f"{cover.stream}:{version}:{digest}\n".encode())
    return h.hexdigest()


def visit_versions(facts: Iterable[tuple[int, str, Mapping[str, Any], datetime]], visit: str) -> list[int]:
    """The versions of a subject's stream that belong to ``visit``: (version, type, payload, occurred_at) of
    each fact. A fact belongs to it when its payload names the visit, or when it happened within
    ``VISIT_NEAR_DAYS`` of the day the visit was recorded (a lab result, the vital signs); a correction or void
    belongs to the visit of the fact it changes."""
    facts = list(facts)
    days = [
        when.astimezone(UTC).date()
        for _, name, payload, when in facts
        if name == "Subject.VisitRecorded" and payload.get("visit") == visit
    ]
    near = timedelta(days=VISIT_NEAR_DAYS)
    found: set[int] = set()
    for version, name, payload, when in facts:
        if name in CHANGE_FACTS:
            if payload.get(CHANGE_FACTS[name]) in found:
                found.add(version)
            continue
        day = when.astimezone(UTC).date()
        if payload.get("visit") == visit or any(abs(day - d) <= near for d in days):
            found.add(version)
    return sorted(found)


def lock_level(events: Iterable[tuple[str, Mapping[str, Any]]]) -> str | None:
    """The lock level (None, "frozen", "locked") after a casebook stream's events: (type name, payload)."""
    level: str | None = None
    for name, _payload in events:
        if name == "Casebook.Frozen":
            level = FROZEN
        elif name == "Casebook.Locked":
            level = LOCKED
        elif name == "Casebook.Unlocked":
            level = None
    return level


def stricter(a: str | None, b: str | None) -> str | None:
    return a if _STRICTNESS[a] >= _STRICTNESS[b] else b


# ---------------------------------------------------------------------------------------------- aggregate
class Casebook(TrialAggregate):
    """One subject's casebook review (or, with ``subject_id`` None, the whole study's): sign-offs and locks."""

    @staticmethod
    def id_for(study_id: UUID, subject_id: UUID) -> UUID:
        """The subject's casebook stream: derived from the subject's stream id, so anyone can find it."""
        return uuid5(study_id, f"casebook/{subject_id}")

    @staticmethod
    def study_id_for(study_id: UUID) -> UUID:
        """The study-wide stream, where the whole study is frozen, locked or unlocked."""
        return uuid5(study_id, "casebook/study")

    @classmethod
    def open(
        cls, study_id: UUID, subject_id: UUID | None, occurred_at: datetime, screening_number: str | None = None
    ) -> Casebook:
        """The subject's casebook stream (its screening number is carried for the audit trail), or the study's."""
        stream = cls.study_id_for(study_id) if subject_id is None else cls.id_for(study_id, subject_id)
        return cls._create(
            cls.Opened,  # type: ignore[attr-defined]  # the event class @event("Opened") builds
            id=stream,
            study_id=study_id,
            subject_id=subject_id,
            screening_number=screening_number,
            occurred_at=occurred_at,
        )

    @event("Opened")
    def __init__(
        self, study_id: UUID, subject_id: UUID | None, screening_number: str | None, occurred_at: datetime
    ) -> None:
        self.study_id = study_id
        self.subject_id = subject_id
        self.screening_number = screening_number
        self.level: str | None = None
        self.signoffs: dict[int, dict[str, Any]] = {}  # version of the sign-off -> what it says
        self.lock_history: list[tuple[int, str, str | None]] = []  # (version, level or "unlocked", reason)

    # --- verbs ---------------------------------------------------------------------------------------------
    def sign_off(
        self,
        occurred_at: datetime,
        *,
        meaning: str,
        printed_name: str,
        covers: list[CoveredStream],
        content_hash: str,
        visit: str | None = None,
    ) -> int:
        """11.50/11.70: the investigator signs the data ``covers`` lists (whose hash is ``content_hash``) with a
        meaning of the study's SignatureDefs. Returns the sign-off's version."""
        if self.subject_id is None:
            raise NothingToSign("the study-wide stream holds locks only; sign a subject's casebook")
        if meaning not in SIGNATURE_DEFS:
            raise UnknownMeaning(meaning)
        if not isinstance(printed_name, str) or not printed_name.strip():
            raise CasebookError("a sign-off shows the signer's printed name (11.50): register the key with one")
        if not covers or not any(c.covered() for c in covers):
            raise NothingToSign("no recorded data" + (f" for visit {visit}" if visit else ""))
        self._time(occurred_at)
        self._signed_off(
            subject_id=self.subject_id,
            scope="visit" if visit else "casebook",
            visit=visit,
            meaning=meaning,
            signature_def=SIGNATURE_DEFS[meaning].oid,
            printed_name=" ".join(printed_name.split()),
            covers=list(covers),
            content_hash=content_hash,
            hash_method=CONTENT_HASH_METHOD,
            authentication=["user_id", "key_file_passphrase"],
            occurred_at=occurred_at,
        )
        return self.version

    def freeze(self, occurred_at: datetime, reason: str | None = None) -> None:
        if self.level == FROZEN:
            raise LockStateError(f"{self._what()} is already frozen")
        if self.level == LOCKED:
            raise LockStateError(f"{self._what()} is locked; unlock it (with a reason) before freezing it")
        self._time(occurred_at)
        self._frozen(subject_id=self.subject_id, reason=_optional_text(reason), occurred_at=occurred_at)

    def lock(self, occurred_at: datetime, reason: str | None = None) -> None:
        if self.level == LOCKED:
            raise LockStateError(f"{self._what()} is already locked")
        self._time(occurred_at)
        self._locked(subject_id=self.subject_id, reason=_optional_text(reason), occurred_at=occurred_at)

    def unlock(self, occurred_at: datetime, reason: str) -> None:
        """An audited unlock: the reason is mandatory. Sign-offs made before it no longer hold."""
        if self.level is None:
            raise LockStateError(f"{self._what()} is neither frozen nor locked")
        if not isinstance(reason, str) or not reason.strip():
            raise LockStateError("unlocking needs a reason (kept in the record and the audit trail)")
        self._time(occurred_at)
        self._unlocked(subject_id=self.subject_id, reason=reason.strip(), occurred_at=occurred_at)

    def _what(self) -> str:
        return "the study" if self.subject_id is None else f"subject {self.subject_id}"

    @staticmethod
    def _time(occurred_at: datetime) -> None:
        from sle_events.domain import formulas

        formulas.check_not_in_future("occurred_at", occurred_at, clock.now())

    # --- facts ---------------------------------------------------------------------------------------------
    class SignedOff(TrialAggregate.Event):
        subject_id: UUID
        scope: str
        visit: str | None
        meaning: str
        signature_def: str
        printed_name: str
        covers: list[CoveredStream]
        content_hash: str
        hash_method: str
        authentication: list[str]
        occurred_at: datetime

    @event(SignedOff)
    def _signed_off(
        self,
        subject_id: UUID,
        scope: str,
        visit: str | None,
        meaning: str,
        signature_def: str,
        printed_name: str,
        covers: list[CoveredStream],
        content_hash: str,
        hash_method: str,
        authentication: list[str],
        occurred_at: datetime,
    ) -> None:
        self.signoffs[self.version + 1] = {  # applied before the version moves on
            "scope": scope,
            "visit": visit,
            "meaning": meaning,
            "covers": covers,
        }

    @event("Frozen")
    def _frozen(self, subject_id: UUID | None, reason: str | None, occurred_at: datetime) -> None:
        self.level = FROZEN
        self.lock_history.append((self.version + 1, FROZEN, reason))

    @event("Locked")
    def _locked(self, subject_id: UUID | None, reason: str | None, occurred_at: datetime) -> None:
        self.level = LOCKED
        self.lock_history.append((self.version + 1, LOCKED, reason))

    @event("Unlocked")
    def _unlocked(self, subject_id: UUID | None, reason: str, occurred_at: datetime) -> None:
        self.level = None
        self.lock_history.append((self.version + 1, "unlocked", reason))


def _optional_text(text: str | None) -> str | None:
    if text is None:
        return None
    if not isinstance(text, str):
        raise LockStateError("a reason is text")
    return text.strip() or None
