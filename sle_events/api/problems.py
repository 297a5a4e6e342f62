"""RFC 9457 problem details: one stable `type` URI per reason a request is refused.

Every refusal stores nothing. `AppendRejected` subclasses map one to one onto problem types (their `kind`), so a
client can branch on `type` and show `detail` (which names the stream, version and, for payloads, the field).
"""

from __future__ import annotations

from typing import Any

from sle_events.picklable import Picklable
from sle_events.store.errors import (
    ActRefused,
    AppendRejected,
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

PROBLEM_BASE = "urn:sle-events:problem:"
PROBLEM_JSON = "application/problem+json"

# kind -> (HTTP status, title). The kinds of `AppendRejected` come first, then the API's own.
PROBLEMS: dict[str, tuple[int, str]] = {
    MalformedEvent.kind: (422, "Malformed event"),
    InvalidPayload.kind: (422, "Invalid payload"),
    UnknownEventType.kind: (422, "Unknown event type"),
    UnknownStudy.kind: (404, "Unknown study"),
    UntrustedKey.kind: (403, "Untrusted key"),
    BadSignature.kind: (422, "Bad signature"),
    ChainBroken.kind: (409, "Chain broken"),
    VersionConflict.kind: (409, "Version conflict"),
    ClockSkew.kind: (422, "Clock skew"),
    WrongStudy.kind: (422, "Wrong study"),
    StudyNotApproved.kind: (403, "Study not approved"),
    # the regulated acts (docs/regulated-acts.md): the record's state refuses the fact, or the act is not one
    CasebookLocked.kind: (409, "Casebook frozen or locked"),
    LockBlockedByOpenQueries.kind: (409, "Open queries block the lock"),
    SignOffMismatch.kind: (422, "Sign-off does not match the data"),
    ActRefused.kind: (422, "SDV or query act refused"),
    # the HTTP layer's own
    "signature_missing": (401, "Request signature missing"),
    "signature_invalid": (401, "Request signature invalid"),
    "key_unknown": (401, "Unknown key"),
    "key_revoked": (401, "Revoked key"),
    "key_rotated": (401, "Rotated-out key"),
    "replay": (401, "Replayed request"),
    "forbidden": (403, "Forbidden for this role"),
    "other_study": (403, "Key of another study"),
    "idempotency_key_missing": (400, "Idempotency-Key missing"),
    "idempotency_key_reused": (422, "Idempotency-Key reused with another request"),
    "idempotency_in_flight": (409, "Request with this Idempotency-Key in progress"),
    "payload_too_large": (413, "Request body too large"),
    "unsupported_media_type": (415, "Unsupported content type"),
    "validation": (422, "Invalid request"),
    "not_found": (404, "Not found"),
    "unknown_filter": (422, "Unknown filter value"),
    "ledger": (409, "Ledger cannot answer"),
    "export_refused": (409, "Export cannot be made"),
    "ledger_damaged": (500, "Ledger tables cannot produce this resource"),
    "internal": (500, "Internal error"),
    "unavailable": (503, "Database busy or unreachable"),
}


class Problem(Picklable, Exception):
    """A refusal, rendered as application/problem+json."""

    def __init__(self, kind: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.kind = kind
        self.status, self.title = PROBLEMS[kind]
        self.detail = detail
        self.extra = extra

    def body(self, instance: str | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "type": PROBLEM_BASE + self.kind,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if instance:
            out["instance"] = instance
        out.update({k: v for k, v in self.extra.items() if v is not None})
        return out


def from_rejection(exc: AppendRejected, **extra: Any) -> Problem:
    # Every subclass has its own kind here (tests/api/test_api_acts.py enumerates them); the fallback is a guard.
    kind = exc.kind if exc.kind in PROBLEMS else MalformedEvent.kind
    if isinstance(exc, ActRefused):
        extra.setdefault("code", exc.code)  # which refusal of the verb (e.g. query_state_conflict)
    return Problem(kind, str(exc), stream=exc.stream, version=exc.version, **extra)
