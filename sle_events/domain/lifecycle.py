"""The subject's state machine (PROTOCOL §3) and what may still be recorded after an exit (R8).

States and epochs are string enums, so ``subject.status == "SCREENED"`` reads naturally. The transition
guards live with the verbs in :mod:`sle_events.domain.subject`; this module holds the vocabulary they share.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "SubjectStatus",
    "Epoch",
    "AfterExit",
    "POST_CONSENT",
    "ON_TREATMENT",
    "EXITED",
    "TERMINAL",
    "WITHDRAWABLE",
]


class SubjectStatus(StrEnum):
    SCREENED = "SCREENED"
    CONSENTED = "CONSENTED"
    ELIGIBLE = "ELIGIBLE"
    SCREEN_FAILED = "SCREEN_FAILED"
    ENROLLED = "ENROLLED"
    PRETREATED = "PRETREATED"
    TRANSPLANTED = "TRANSPLANTED"
    IN_FOLLOW_UP = "IN_FOLLOW_UP"
    COMPLETED = "COMPLETED"
    WITHDRAWN = "WITHDRAWN"
    LOST_TO_FOLLOW_UP = "LOST_TO_FOLLOW_UP"
    DIED = "DIED"


class Epoch(StrEnum):
    """CDISC epochs (PROTOCOL §6). ``MainStudyCompleted`` moves FOLLOW_UP → LONG_TERM_FOLLOW_UP."""

    SCREENING = "SCREENING"
    TREATMENT = "TREATMENT"
    FOLLOW_UP = "FOLLOW-UP"
    LONG_TERM_FOLLOW_UP = "LONG-TERM FOLLOW-UP"


class AfterExit(StrEnum):
    """What an action may do once the subject is WITHDRAWN, LOST_TO_FOLLOW_UP or DIED (R8).

    The gate applies to facts that *occur* on or after the exit; a late entry of something that
    happened before the exit is judged as of its ``occurred_at``.
    """

    NEVER = "never"  # ordinary study procedures
    SAFETY = "safety"  # safety follow-up data: only after a withdrawal with the subject's agreement
    CONTACT = "contact"  # contact attempts: allowed while lost to follow-up (they lead to a return)
    ALWAYS = "always"  # AEs and SAE follow-up, death, corrections


S = SubjectStatus
#: states in which the subject has consented (T15 "any post-consent state")
POST_CONSENT = frozenset(
    {
        S.CONSENTED,
        S.ELIGIBLE,
        S.ENROLLED,
        S.PRETREATED,
        S.TRANSPLANTED,
        S.IN_FOLLOW_UP,
        S.WITHDRAWN,
        S.LOST_TO_FOLLOW_UP,
    }
)
#: enrolled and not (yet) out of the study
ON_TREATMENT = frozenset({S.ENROLLED, S.PRETREATED, S.TRANSPLANTED, S.IN_FOLLOW_UP})
#: T12 sources
WITHDRAWABLE = ON_TREATMENT
#: R8 exits
EXITED = frozenset({S.WITHDRAWN, S.LOST_TO_FOLLOW_UP, S.DIED})
#: no way out
TERMINAL = frozenset({S.SCREEN_FAILED, S.COMPLETED, S.DIED})
