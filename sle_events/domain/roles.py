"""Who may record what (PROTOCOL.md §2). This is only the default: each study carries its own table,
signed into its `Study.Created` event and changed by `Study.PermissionsChanged` events."""

from __future__ import annotations

ADMIN = "admin"
INVESTIGATOR = "investigator"
COORDINATOR = "coordinator"
LAB = "lab"
MONITOR = "monitor"
AUDITOR = "auditor"
DATA_MANAGER = "data_manager"
SPONSOR = "sponsor"

ROLES = frozenset({ADMIN, INVESTIGATOR, COORDINATOR, LAB, MONITOR, AUDITOR, DATA_MANAGER, SPONSOR})

# Event type (the event class's qualified name) -> roles that may record it.
DEFAULT_PERMISSIONS: dict[str, list[str]] = {
    "Study.Created": [ADMIN],
    "Study.KeyRegistered": [ADMIN],
    "Study.KeyRotated": [ADMIN],
    "Study.KeyRevoked": [ADMIN],
    "Study.PermissionsChanged": [ADMIN],
    "Subject.Screened": [COORDINATOR, INVESTIGATOR],
    "Subject.ConsentObtained": [INVESTIGATOR, COORDINATOR],
    "Subject.EligibilityConfirmed": [INVESTIGATOR],
    "Subject.Enrolled": [INVESTIGATOR, COORDINATOR],
    "Subject.LabResultRecorded": [LAB],
    "Subject.Corrected": [INVESTIGATOR, COORDINATOR, LAB],
}


def event_type_name(topic: str) -> str:
    """`sle_events.domain.subject:Subject.Screened` -> `Subject.Screened`."""
    return topic.rsplit(":", 1)[-1]
