"""Why an append was refused. Every refusal stores nothing."""

from __future__ import annotations

from typing import Any

from sle_events.picklable import Picklable


class AppendRejected(Picklable, ValueError):
    """Base class: the batch was refused and nothing was stored."""

    kind = "rejected"

    def __init__(self, message: str, *, stream: str | None = None, version: int | None = None):
        self.stream = stream
        self.version = version
        where = f" (stream {stream} v{version})" if stream else ""
        super().__init__(message + where)


class MalformedEvent(AppendRejected):
    kind = "malformed"


class UnknownEventType(AppendRejected):
    kind = "unknown_event_type"


class UnknownStudy(AppendRejected):
    kind = "unknown_study"


class UntrustedKey(AppendRejected):
    """Unknown, revoked or rotated key, or a role that may not record this event type."""

    kind = "untrusted_key"


class BadSignature(AppendRejected):
    kind = "bad_signature"


class ChainBroken(AppendRejected):
    kind = "chain_broken"


class VersionConflict(AppendRejected):
    """Someone else appended this version of the stream first: reload and retry."""

    kind = "version_conflict"


class ClockSkew(AppendRejected):
    """recorded_at is not the store's now, or occurred_at lies in the future."""

    kind = "clock_skew"


class WrongStudy(AppendRejected):
    """The event speaks for another study than the stream it is appended to belongs to (a stream belongs to one
    study from its first event on), or a study fact outside the study's own stream."""

    kind = "wrong_study"


class StudyNotApproved(AppendRejected):
    """A second trust root in a database that already holds a study, without an existing admin's approval."""

    kind = "study_not_approved"


class InvalidPayload(MalformedEvent):
    """The payload does not match its event type's schema, or is not written as the domain writes it."""

    kind = "invalid_payload"


# --- casebook sign-off and lock (sle_events/domain/casebook.py) ---------------------------------------------
class CasebookLocked(AppendRejected):
    """A clinical fact on a subject (or in a study) that is frozen or locked: refused until an audited unlock.
    Safety facts (an SAE and the AE it grows from) are still taken, and flagged."""

    kind = "casebook_locked"


class LockBlockedByOpenQueries(AppendRejected):
    """A lock while queries on the subject (or the study) are not closed."""

    kind = "open_queries_block_lock"


class SignOffMismatch(AppendRejected):
    """A sign-off whose content hash is not that of the data it names, or that names data of another subject,
    or a casebook fact on a stream that is not the casebook of the subject its payload names."""

    kind = "signoff_mismatch"


class ActRefused(AppendRejected):
    """An SDV mark or a query act that its verb would have refused (data that does not exist, a closed query
    answered, a close by someone other than the raiser, an unknown query): ``violation`` is the domain's
    specific `ProtocolViolation` (its ``code`` says which)."""

    kind = "act_refused"

    def __init__(self, message: str, *, violation: Any = None, stream: str | None = None, version: int | None = None):
        self.violation = violation
        self.code = getattr(violation, "code", "act_refused")
        super().__init__(message, stream=stream, version=version)
