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

# Event type (its stable name, sle_events.domain.event_types) -> roles that may record it (PROTOCOL §2).
I, C, L, DM, SP = INVESTIGATOR, COORDINATOR, LAB, DATA_MANAGER, SPONSOR  # noqa: E741 - short names keep the table one line per event
DEFAULT_PERMISSIONS: dict[str, list[str]] = {
    # trust root and key registry
    "Study.Created": [ADMIN],
    "Study.KeyRegistered": [ADMIN],
    "Study.KeyRotated": [ADMIN],
    "Study.KeyRevoked": [ADMIN],
    "Study.PermissionsChanged": [ADMIN],
    "Study.NewStudyApproved": [ADMIN],
    # study configuration: versioned configuration events by the data manager
    "Study.SiteAdded": [DM],
    "Study.SiteClosed": [DM],
    "Study.IcfVersionApproved": [DM],
    "Study.VisitScheduleDefined": [DM],
    "Study.SettingsAdopted": [DM],
    # screening, consent, eligibility, enrollment
    "Subject.Screened": [C, I],
    "Subject.Rescreened": [C, I],
    "Subject.ConsentObtained": [I, C],
    "Subject.ScreenFailed": [C, I],
    "Subject.DemographicsRecorded": [C, I],
    "Subject.MedicalHistoryRecorded": [C, I],
    "Subject.ClassificationRecorded": [I],
    "Subject.BiopsyRecorded": [C, I],
    "Subject.EligibilityConfirmed": [I],
    "Subject.Enrolled": [I, C],
    # in-patient stay and treatment
    "Subject.Admitted": [C, I],
    "Subject.Discharged": [C, I],
    "Subject.VitalSignsRecorded": [C, I],
    "Subject.PregnancyTestRecorded": [C, I, L],
    "Subject.CyclophosphamideGiven": [I, C],
    "Subject.MSCInfused": [I],
    "Subject.TransplantNotPerformed": [I],
    "ProductLot.ReleaseTested": [L],
    "ProductLot.Infused": [I],
    # results and assessments
    "Subject.LabResultRecorded": [L],
    "Subject.DerivedResultRecorded": [L],
    "Subject.TregPanelRecorded": [L],
    "Subject.SledaiAssessed": [I],
    "Subject.RenalResponseAssessed": [I, L],
    "Subject.TeamEvaluationRecorded": [I],
    # visits
    "Subject.VisitRecorded": [C, I],
    "Subject.VisitMissed": [C, I],
    "Subject.UnscheduledVisitRecorded": [C, I],
    "Subject.MainStudyCompleted": [C, I],
    "Subject.ContactAttempted": [C, I],
    # safety
    "Subject.AdverseEventReported": [C, I],
    "Subject.AdverseEventAssessed": [I],
    "Subject.ExpectednessAssessed": [SP],
    "Subject.SeriousAdverseEventReported": [I],
    "Subject.AdverseEventFollowedUp": [I, C],
    "Subject.ConcomitantMedicationRecorded": [C, I],
    "Subject.DeviationRecorded": [I],
    # corrections (the application also checks the role may record the corrected event's type)
    "Subject.Corrected": [I, C, L],
    "Subject.Voided": [I, C, L],
    # disposition
    "Subject.Withdrawn": [I],
    "Subject.LostToFollowUp": [I],
    "Subject.Returned": [I],
    "Subject.DeathRecorded": [I],
    "Subject.StudyCompleted": [I],
    # casebook sign-off (investigator, 21 CFR 11.50) and freeze / lock / unlock (data manager)
    "Casebook.Opened": [I, DM],
    "Casebook.SignedOff": [I],
    "Casebook.Frozen": [DM],
    "Casebook.Locked": [DM],
    "Casebook.Unlocked": [DM],
    # source data verification and queries (monitor, data manager; site staff answer)
    "SourceVerification.Opened": [MONITOR],
    "SourceVerification.Verified": [MONITOR],
    "Query.Raised": [MONITOR, DM],
    "Query.Answered": [C, I],
    "Query.Closed": [MONITOR, DM],
    "Query.Reopened": [MONITOR, DM],
}
del I, C, L, DM, SP
