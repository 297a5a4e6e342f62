"""SDTM datasets (DM, DS, SV, IE, EX, AE, CM, MH, LB, VS, QS, and SUPPEX, SUPPAE, SUPPMH) as SAS Transport v5
and CSV.

Per `../shared/protocol/sdtm-mapping.md`. `pyreadstat.write_xport` does not enforce the v5 limits (it cuts
labels silently and writes long or non-ASCII values), so every dataset is checked first (`check_dataset`)
and nothing is written unless all of them hold: names ≤ 8, labels ≤ 40, character values ≤ 200 bytes and
ASCII, ISO 8601 dates, --SEQ unique per subject, every subject in DM. Units and standardised results come
from the domain's UCUM conversion and one versioned UCUM → CDISC unit map (`ucum_cdisc_units.csv`); a unit
without a mapping is refused.

`--SEQ` is stable across re-exports: the fact's version in its stream × 100 + the row within that fact.
SLEDAI-2K goes to QS (`QSCAT` SLEDAI-2K), as the issue asks (the mapping's v3.2 target; RS is the v3.3+ home).

Supplemental qualifiers (SUPP--) are built per subject next to their parent rows, each pointing at its parent
by `IDVAR` --SEQ and `IDVARVAL` (that --SEQ as text), and only for values the record holds; a SUPP-- dataset
without rows is not written (an empty SUPP-- is not submitted). The check refuses a SUPP-- row whose parent
row does not exist, a `QNAM` that is not a variable name (≤ 8) and a `QLABEL` over 40 characters.
"""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import UUID

from sle_events.domain import labs
from sle_events.domain.formulas import study_day
from sle_events.domain.sledai2k import load_descriptors
from sle_events.exports.manifest import ExportCheckpoint
from sle_events.exports.scope import ExportScope
from sle_events.exports.source import (
    MAX_WORKERS,
    ExportSource,
    Item,
    SubjectData,
    partial,
    progress_counter,
    publish,
)

__all__ = [
    "Dataset",
    "QUALIFIERS",
    "SUPP_DATASETS",
    "SdtmProblem",
    "SdtmRefused",
    "UNIT_MAP_VERSION",
    "build_datasets",
    "check_datasets",
    "write_sdtm",
    "export_sdtm",
    "cdisc_unit",
]

UNIT_MAP_VERSION = "ucum-cdisc.v1"  # sle_events/domain/data/ucum_cdisc_units.csv
NAME = re.compile(r"^[A-Z][A-Z0-9_]{0,7}$")
ISO_DTC = re.compile(r"^\d{4}(-\d{2}(-\d{2}(T\d{2}:\d{2}(:\d{2})?)?)?)?$")
MAX_CHAR_BYTES = 200
SEQ_STEP = 100  # --SEQ = version × 100 + row within the fact


class SdtmProblem(ValueError):
    """A value SDTM cannot carry as it stands (e.g. a unit without a CDISC spelling)."""


@dataclass(frozen=True)
class Finding:
    dataset: str
    variable: str
    subject: str
    why: str

    def __str__(self) -> str:
        where = f"{self.dataset}.{self.variable}" if self.variable else self.dataset
        return f"{where}{f' ({self.subject})' if self.subject else ''}: {self.why}"


class SdtmRefused(ValueError):
    """The datasets break the XPT v5 / SDTM limits: nothing was written. `findings` says what, where, why."""

    def __init__(self, findings: list[Finding]):
        self.findings = findings
        shown = "\n  ".join(str(f) for f in findings[:20])
        more = f"\n  … {len(findings) - 20} more" if len(findings) > 20 else ""
        super().__init__(f"SDTM export refused, nothing written ({len(findings)} problems):\n  {shown}{more}")


@dataclass
class Dataset:
    name: str
    label: str
    variables: list[tuple[str, str, str]]  # (name, label, "C" | "N")
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [v[0] for v in self.variables]

    def columns(self) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {}
        for name, _, kind in self.variables:
            if kind == "N":
                out[name] = [None if r.get(name) is None else float(r[name]) for r in self.rows]
            else:
                out[name] = ["" if r.get(name) is None else str(r[name]) for r in self.rows]
        return out


# ------------------------------------------------------------------------------------------------ units
def _unit_map() -> dict[str, str]:
    text = labs.read_data_file("ucum_cdisc_units.csv").decode("utf-8")
    return {row["ucum"]: row["cdisc"] for row in csv.DictReader(io.StringIO(text))}


UNITS = _unit_map()


def cdisc_unit(ucum: str | None) -> str | None:
    """The CDISC UNIT spelling of a UCUM unit; a unit without one is refused (never guessed)."""
    if ucum is None or ucum == "":
        return None
    try:
        return UNITS[ucum]
    except KeyError:
        raise SdtmProblem(f"unit {ucum!r} has no CDISC spelling in the UCUM→CDISC map ({UNIT_MAP_VERSION})") from None


# ------------------------------------------------------------------------------------------------ visits and dates
VISIT_NAMES = {
    "SCR": ("SCREENING", 10),
    "BASE": ("BASELINE ADMISSION", 20),
    "CYC": ("CYCLOPHOSPHAMIDE", 30),
    "TX": ("MSC TRANSPLANT DAY 0", 40),
    "DIS": ("DISCHARGE", 50),
    "ET": ("EARLY TERMINATION", 900),
}


def visit_name(code: str, visitnum: Decimal | float | None = None) -> tuple[str, float | None]:
    """SDTM VISIT and VISITNUM of one of our visit codes (`M3` → MONTH 3, 103)."""
    if code in VISIT_NAMES:
        name, num = VISIT_NAMES[code]
        return name, float(num)
    if code.startswith("M") and code[1:].isdigit():
        return f"MONTH {int(code[1:])}", float(visitnum) if visitnum is not None else 100.0 + int(code[1:])
    return code.upper(), float(visitnum) if visitnum is not None else None


def dtc(when: datetime | date | None) -> str | None:
    """ISO 8601 site-local wall time without the offset (sdtm-mapping §5), seconds only when not zero."""
    if when is None:
        return None
    if isinstance(when, datetime):
        local = when.replace(tzinfo=None, microsecond=0)
        return local.isoformat(timespec="seconds" if local.second else "minutes")
    return when.isoformat()


def _date_of(value: Any) -> date | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    return date.fromisoformat(str(value)[:10])


class Timeline:
    """A subject's reference dates, epochs and visits, as SDTM needs them for every row."""

    def __init__(self, s: SubjectData, studyid: str):
        self.s = s
        a = s.aggregate
        self.usubjid = f"{studyid}-{s.screening_number}"
        cyc, msc = a.cyc, a.msc
        self.rfst: datetime | None = cyc.occurred_at if cyc else None
        self.rfxend: datetime | None = msc.stopped_at if msc else (cyc.stopped_at if cyc else None)
        self.stays = list(a.stays)
        self.main_done: datetime | None = a.main_study_completed_at
        self.enrolled: datetime | None = a.enrolled_at
        # attended visits (date → code), for assigning a result to the visit within two days
        self.visits: list[tuple[date, str, float]] = []
        for i in s.of("VisitRecorded"):
            name, num = visit_name(i.record.visit, i.record.visitnum)
            self.visits.append((i.occurred_at.date(), name, num or 0.0))
        for i in s.of("UnscheduledVisitRecorded"):
            num = float(Decimal(i.payload["visitnum"]))
            self.visits.append((i.occurred_at.date(), f"UNSCHEDULED {i.payload['visitnum']}", num))

    def dy(self, when: datetime | date | None) -> int | None:
        if when is None or self.rfst is None:
            return None
        return study_day(_date_of(when), self.rfst.date())  # type: ignore[arg-type]  # not None here

    def epoch(self, when: datetime | date | None) -> str | None:
        if when is None:
            return None
        day = _date_of(when)
        assert day is not None  # `when` is not None
        if not self.stays or day < self.stays[0].admitted_at.date():
            return "SCREENING"
        last = self.stays[-1].discharged_at
        if last is None or day <= last.date():
            return "TREATMENT"
        if self.main_done is None or day <= self.main_done.date():
            return "FOLLOW-UP"
        return "LONG-TERM FOLLOW-UP"

    def visit(self, when: datetime) -> tuple[str | None, float | None]:
        """The visit a result belongs to: a protocol visit within 2 days, else the treatment stay's stage."""
        day = when.date()
        near = sorted((abs((d - day).days), num, name) for d, name, num in self.visits if abs((d - day).days) <= 2)
        if near:
            return near[0][2], near[0][1]
        a = self.s.aggregate
        if self.enrolled is None or when < self.enrolled:
            return VISIT_NAMES["SCR"][0], 10.0
        if self.rfst is not None and when < self.rfst:
            return VISIT_NAMES["BASE"][0], 20.0
        if a.msc is not None and when < a.msc.occurred_at:
            return VISIT_NAMES["CYC"][0], 30.0
        if a.msc is not None and day == a.msc.occurred_at.date():
            return VISIT_NAMES["TX"][0], 40.0
        return None, None

    def common(self, domain: str, studyid: str, item: Item, k: int = 0) -> dict[str, Any]:
        return {
            "STUDYID": studyid,
            "DOMAIN": domain,
            "USUBJID": self.usubjid,
            f"{domain}SEQ": item.version * SEQ_STEP + k,
        }


def _num(value: Any) -> float | None:
    return None if value is None else float(Decimal(str(value)))


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return str(value)


def _upper(value: Any) -> str | None:
    return None if value is None else str(value).replace("_", " ").upper()


# ------------------------------------------------------------------------------------------------ the domains
C, N = "C", "N"
KEYS = [
    ("STUDYID", "Study Identifier", C),
    ("DOMAIN", "Domain Abbreviation", C),
    ("USUBJID", "Unique Subject Identifier", C),
]


def _seq(d: str, label: str) -> tuple[str, str, str]:
    return (f"{d}SEQ", "Sequence Number", N)


VISIT_VARS = [("VISITNUM", "Visit Number", N), ("VISIT", "Visit Name", C), ("EPOCH", "Epoch", C)]

COUNTRY_OF_TIMEZONE = {"Asia/Shanghai": "CHN", "Asia/Hong_Kong": "HKG", "Europe/Berlin": "DEU", "Europe/London": "GBR"}

DS_DECOD = {
    "withdrawal_by_subject": "WITHDRAWAL BY SUBJECT",
    "physician_decision": "PHYSICIAN DECISION",
    "adverse_event": "ADVERSE EVENT",
    "lack_of_efficacy": "LACK OF EFFICACY",
    "pregnancy": "PREGNANCY",
    "protocol_deviation": "PROTOCOL DEVIATION",
    "sponsor_decision": "STUDY TERMINATED BY SPONSOR",
    "other": "OTHER",
}

#: LB: our analyte code → (LBTESTCD, LBTEST, LBCAT, LBSPEC, LBMETHOD, standard UCUM unit)
LB_TESTS: dict[str, tuple[str, str, str, str, str | None, str | None]] = {
    "DSDNA": ("DSDNAAB", "Anti-dsDNA Antibody", "IMMUNOLOGY", "SERUM", None, "[IU]/mL"),
    "C3": ("C3", "Complement C3", "IMMUNOLOGY", "SERUM", None, "mg/dL"),
    "C4": ("C4", "Complement C4", "IMMUNOLOGY", "SERUM", None, "mg/dL"),
    "ANA": ("ANA", "Antinuclear Antibodies", "IMMUNOLOGY", "SERUM", None, None),
    "CREAT": ("CREAT", "Creatinine", "CHEMISTRY", "SERUM", None, "mg/dL"),
    "CREATSI": ("CREAT", "Creatinine", "CHEMISTRY", "SERUM", None, "mg/dL"),
    "EGFR": ("EGFR", "Glomerular Filtration Rate, Estimated", "CHEMISTRY", "SERUM", None, "mL/min/{1.73_m2}"),
    "BUN": ("BUN", "Blood Urea Nitrogen", "CHEMISTRY", "SERUM", None, "mg/dL"),
    "UREA": ("UREA", "Urea", "CHEMISTRY", "SERUM", None, "mmol/L"),
    "ALB": ("ALB", "Albumin", "CHEMISTRY", "SERUM", None, "g/dL"),
    "UPCR": ("PROTCRT", "Protein/Creatinine", "URINALYSIS", "URINE", None, "mg/mg"),
    "UPCR24": ("PROTCRT", "Protein/Creatinine", "URINALYSIS", "URINE", None, "mg/mg"),
    "UPROT24": ("PROT", "Protein", "URINALYSIS", "URINE", None, "g/(24.h)"),
    "UPROT": ("PROT", "Protein", "URINALYSIS", "URINE", None, "mg/dL"),
    "UCREAT": ("CREAT", "Creatinine", "URINALYSIS", "URINE", None, "mg/dL"),
    "URBC": ("RBC", "Erythrocytes", "URINALYSIS", "URINE", "MICROSCOPY", "/[HPF]"),
    "UWBC": ("WBC", "Leukocytes", "URINALYSIS", "URINE", "MICROSCOPY", "/[HPF]"),
    "UCASTS": ("CASTS", "Casts", "URINALYSIS", "URINE", "MICROSCOPY", "/[LPF]"),
    "URBCCAST": ("RBCCAST", "Erythrocyte Casts", "URINALYSIS", "URINE", "MICROSCOPY", "/[LPF]"),
    "UGRCAST": ("GRCAST", "Granular Casts", "URINALYSIS", "URINE", "MICROSCOPY", "/[LPF]"),
    "WBC": ("WBC", "Leukocytes", "HEMATOLOGY", "BLOOD", None, "10*9/L"),
    "NEUT": ("NEUT", "Neutrophils", "HEMATOLOGY", "BLOOD", None, "10*9/L"),
    "LYMPH": ("LYM", "Lymphocytes", "HEMATOLOGY", "BLOOD", None, "10*9/L"),
    "HGB": ("HGB", "Hemoglobin", "HEMATOLOGY", "BLOOD", None, "g/dL"),
    "PLAT": ("PLAT", "Platelets", "HEMATOLOGY", "BLOOD", None, "10*9/L"),
    "ESR": ("ESR", "Erythrocyte Sedimentation Rate", "HEMATOLOGY", "BLOOD", None, "mm/h"),
    "CRP": ("CRP", "C Reactive Protein", "CHEMISTRY", "SERUM", None, "mg/L"),
    "CD4": ("CD4", "CD4 Cells", "FLOW CYTOMETRY", "BLOOD", "FLOW CYTOMETRY", "/uL"),
    "TREGPCT": ("TREG", "Regulatory T Cells/CD4 Cells", "FLOW CYTOMETRY", "BLOOD", "FLOW CYTOMETRY", "%"),
}

DATASETS: dict[str, tuple[str, list[tuple[str, str, str]]]] = {
    "DM": (
        "Demographics",
        [
            ("STUDYID", "Study Identifier", C),
            ("DOMAIN", "Domain Abbreviation", C),
            ("USUBJID", "Unique Subject Identifier", C),
            ("SUBJID", "Subject Identifier for the Study", C),
            ("RFSTDTC", "Subject Reference Start Date/Time", C),
            ("RFENDTC", "Subject Reference End Date/Time", C),
            ("RFXSTDTC", "Date/Time of First Study Treatment", C),
            ("RFXENDTC", "Date/Time of Last Study Treatment", C),
            ("RFICDTC", "Date/Time of Informed Consent", C),
            ("RFPENDTC", "Date/Time of End of Participation", C),
            ("DTHDTC", "Date/Time of Death", C),
            ("DTHFL", "Subject Death Flag", C),
            ("SITEID", "Study Site Identifier", C),
            ("BRTHDTC", "Date/Time of Birth", C),
            ("AGE", "Age", N),
            ("AGEU", "Age Units", C),
            ("SEX", "Sex", C),
            ("ARMCD", "Planned Arm Code", C),
            ("ARM", "Description of Planned Arm", C),
            ("ACTARMCD", "Actual Arm Code", C),
            ("ACTARM", "Description of Actual Arm", C),
            ("ARMNRS", "Reason Arm and/or Actual Arm is Null", C),
            ("COUNTRY", "Country", C),
        ],
    ),
    "DS": (
        "Disposition",
        [
            *KEYS,
            _seq("DS", ""),
            ("DSTERM", "Reported Term for the Disposition Event", C),
            ("DSDECOD", "Standardized Disposition Term", C),
            ("DSCAT", "Category for Disposition Event", C),
            ("EPOCH", "Epoch", C),
            ("DSSTDTC", "Start Date/Time of Disposition Event", C),
            ("DSSTDY", "Study Day of Start of Disposition Event", N),
        ],
    ),
    "SV": (
        "Subject Visits",
        [
            *KEYS,
            ("VISITNUM", "Visit Number", N),
            ("VISIT", "Visit Name", C),
            ("SVPRESP", "Pre-specified", C),
            ("SVOCCUR", "Occurrence", C),
            ("SVREASOC", "Reason for Occur Value", C),
            ("EPOCH", "Epoch", C),
            ("SVSTDTC", "Start Date/Time of Observation", C),
            ("SVENDTC", "End Date/Time of Observation", C),
            ("SVSTDY", "Study Day of Start of Observation", N),
            ("SVUPDES", "Description of Unplanned Visit", C),
        ],
    ),
    "IE": (
        "Inclusion/Exclusion Criteria Not Met",
        [
            *KEYS,
            _seq("IE", ""),
            ("IETESTCD", "Inclusion/Exclusion Criterion Short Name", C),
            ("IETEST", "Inclusion/Exclusion Criterion", C),
            ("IECAT", "Inclusion/Exclusion Category", C),
            ("IEORRES", "I/E Criterion Original Result", C),
            ("IESTRESC", "I/E Criterion Result in Std Format", C),
            ("EPOCH", "Epoch", C),
            ("IEDTC", "Date/Time of Collection", C),
        ],
    ),
    "EX": (
        "Exposure",
        [
            *KEYS,
            _seq("EX", ""),
            ("EXTRT", "Name of Treatment", C),
            ("EXDOSE", "Dose", N),
            ("EXDOSU", "Dose Units", C),
            ("EXDOSFRM", "Dose Form", C),
            ("EXDOSFRQ", "Dosing Frequency per Interval", C),
            ("EXROUTE", "Route of Administration", C),
            ("EXLOT", "Lot Number", C),
            *VISIT_VARS,
            ("EXSTDTC", "Start Date/Time of Treatment", C),
            ("EXENDTC", "End Date/Time of Treatment", C),
            ("EXSTDY", "Study Day of Start of Treatment", N),
        ],
    ),
    "AE": (
        "Adverse Events",
        [
            *KEYS,
            _seq("AE", ""),
            ("AESPID", "Sponsor-Defined Identifier", C),
            ("AETERM", "Reported Term for the Adverse Event", C),
            ("AEDECOD", "Dictionary-Derived Term", C),
            ("AETOXGR", "Standard Toxicity Grade", C),
            ("AESER", "Serious Event", C),
            ("AESDTH", "Results in Death", C),
            ("AESLIFE", "Is Life Threatening", C),
            ("AESHOSP", "Requires or Prolongs Hospitalization", C),
            ("AESDISAB", "Persist or Signif Disability/Incapacity", C),
            ("AESCONG", "Congenital Anomaly or Birth Defect", C),
            ("AESMIE", "Other Medically Important Serious Event", C),
            ("AEREL", "Causality", C),
            ("AEACN", "Action Taken with Study Treatment", C),
            ("AEOUT", "Outcome of Adverse Event", C),
            ("EPOCH", "Epoch", C),
            ("AESTDTC", "Start Date/Time of Adverse Event", C),
            ("AEENDTC", "End Date/Time of Adverse Event", C),
            ("AESTDY", "Study Day of Start of Adverse Event", N),
        ],
    ),
    "CM": (
        "Concomitant/Concomitant Medications",
        [
            *KEYS,
            _seq("CM", ""),
            ("CMTRT", "Reported Name of Drug, Med, or Therapy", C),
            ("CMCAT", "Category for Medication", C),
            ("CMINDC", "Indication", C),
            ("CMDOSE", "Dose per Administration", N),
            ("CMDOSU", "Dose Units", C),
            ("CMDOSFRQ", "Dosing Frequency per Interval", C),
            ("CMROUTE", "Route of Administration", C),
            ("CMSTDTC", "Start Date/Time of Medication", C),
            ("CMENDTC", "End Date/Time of Medication", C),
        ],
    ),
    "MH": (
        "Medical History",
        [
            *KEYS,
            _seq("MH", ""),
            ("MHTERM", "Reported Term for the Medical History", C),
            ("MHCAT", "Category for Medical History", C),
            ("MHSTDTC", "Start Date/Time of Medical History Event", C),
            ("MHENRTPT", "End Relative to Reference Time Point", C),
            ("MHENTPT", "End Reference Time Point", C),
            ("MHDTC", "Date/Time of History Collection", C),
        ],
    ),
    "LB": (
        "Laboratory Test Results",
        [
            *KEYS,
            _seq("LB", ""),
            ("LBTESTCD", "Lab Test or Examination Short Name", C),
            ("LBTEST", "Lab Test or Examination Name", C),
            ("LBCAT", "Category for Lab Test", C),
            ("LBORRES", "Result or Finding in Original Units", C),
            ("LBORRESU", "Original Units", C),
            ("LBORNRLO", "Reference Range Lower Limit in Orig Unit", C),
            ("LBORNRHI", "Reference Range Upper Limit in Orig Unit", C),
            ("LBSTRESC", "Character Result/Finding in Std Format", C),
            ("LBSTRESN", "Numeric Result/Finding in Standard Units", N),
            ("LBSTRESU", "Standard Units", C),
            ("LBSTNRLO", "Reference Range Lower Limit-Std Units", N),
            ("LBSTNRHI", "Reference Range Upper Limit-Std Units", N),
            ("LBNRIND", "Reference Range Indicator", C),
            ("LBSPEC", "Specimen Type", C),
            ("LBMETHOD", "Method of Test or Examination", C),
            ("LBLOINC", "LOINC Code", C),
            ("LBDRVFL", "Derived Flag", C),
            ("LBREFID", "Specimen ID", C),
            *VISIT_VARS,
            ("LBDTC", "Date/Time of Specimen Collection", C),
            ("LBDY", "Study Day of Specimen Collection", N),
        ],
    ),
    "VS": (
        "Vital Signs",
        [
            *KEYS,
            _seq("VS", ""),
            ("VSTESTCD", "Vital Signs Test Short Name", C),
            ("VSTEST", "Vital Signs Test Name", C),
            ("VSORRES", "Result or Finding in Original Units", C),
            ("VSORRESU", "Original Units", C),
            ("VSSTRESC", "Character Result/Finding in Std Format", C),
            ("VSSTRESN", "Numeric Result/Finding in Standard Units", N),
            ("VSSTRESU", "Standard Units", C),
            ("VSDRVFL", "Derived Flag", C),
            ("VSTPT", "Planned Time Point Name", C),
            *VISIT_VARS,
            ("VSDTC", "Date/Time of Measurements", C),
            ("VSDY", "Study Day of Vital Signs", N),
        ],
    ),
    "QS": (
        "Questionnaires",
        [
            *KEYS,
            _seq("QS", ""),
            ("QSTESTCD", "Question Short Name", C),
            ("QSTEST", "Question Name", C),
            ("QSCAT", "Category of Question", C),
            ("QSORRES", "Finding in Original Units", C),
            ("QSSTRESC", "Character Result/Finding in Std Format", C),
            ("QSSTRESN", "Numeric Finding in Standard Units", N),
            ("QSDRVFL", "Derived Flag", C),
            ("QSEVAL", "Evaluator", C),
            *VISIT_VARS,
            ("QSDTC", "Date/Time of Finding", C),
            ("QSDY", "Study Day of Finding", N),
        ],
    ),
}

VS_TESTS = {  # record field → (VSTESTCD, VSTEST, UCUM unit)
    "height_cm": ("HEIGHT", "Height", "cm"),
    "weight_kg": ("WEIGHT", "Weight", "kg"),
    "temperature_c": ("TEMP", "Temperature", "Cel"),
    "systolic_bp": ("SYSBP", "Systolic Blood Pressure", "mm[Hg]"),
    "diastolic_bp": ("DIABP", "Diastolic Blood Pressure", "mm[Hg]"),
    "heart_rate": ("PULSE", "Pulse Rate", "/min"),
}

#: SUPP-- datasets: the standard structure, one per parent domain (mapping §2), all 10 variables in each
SUPP_VARS = [
    ("STUDYID", "Study Identifier", C),
    ("RDOMAIN", "Related Domain Abbreviation", C),
    ("USUBJID", "Unique Subject Identifier", C),
    ("IDVAR", "Identifying Variable", C),
    ("IDVARVAL", "Identifying Variable Value", C),
    ("QNAM", "Qualifier Variable Name", C),
    ("QLABEL", "Qualifier Variable Label", C),
    ("QVAL", "Data Value", C),
    ("QORIG", "Origin", C),
    ("QEVAL", "Evaluator", C),
]
SUPP_DATASETS: dict[str, tuple[str, list[tuple[str, str, str]]]] = {
    f"SUPP{d}": (f"Supplemental Qualifiers for {d}", SUPP_VARS) for d in ("EX", "AE", "MH")
}
#: per parent domain: QNAM → (QLABEL, QORIG, QEVAL), in the order a parent row's qualifiers are written.
#: Only values the record holds: the mapping's AEEXPECT is per product here (AEEXPCYC, AEEXPMSC), as the sponsor
#: judges it (ExpectednessAssessed); AESI is not exported (the record has no AE-of-special-interest flag).
QUALIFIERS: dict[str, dict[str, tuple[str, str, str | None]]] = {
    "EX": {
        "BSA": ("Body Surface Area (m2)", "DERIVED", None),
        "CYCCALC": ("Calculated Cyclophosphamide Dose (mg)", "DERIVED", None),
        "MSCDONOR": ("MSC Donor Identifier", "CRF", None),
        "MSCHLA": ("MSC Donor HLA Match", "CRF", None),
        "MSCVIAB": ("MSC Viability at Release (%)", "CRF", None),
        "MSCVCNT": ("MSC Viable Cells Infused", "DERIVED", None),
    },
    "AE": {
        "AERELCYC": ("Causality to Cyclophosphamide", "CRF", "INVESTIGATOR"),
        "AERELMSC": ("Causality to AlloMSC", "CRF", "INVESTIGATOR"),
        "AEEXPCYC": ("Expectedness for Cyclophosphamide", "ASSIGNED", "SPONSOR"),
        "AEEXPMSC": ("Expectedness for AlloMSC", "ASSIGNED", "SPONSOR"),
        "AEAWRDTC": ("Date/Time Investigator Aware of SAE", "CRF", None),
        "AERPTDTC": ("Date/Time SAE Reported to Sponsor", "CRF", None),
    },
    "MH": {
        "ISNRPS": ("ISN/RPS Lupus Nephritis Class", "CRF", None),
    },
}
BIOPSY_TERM = "Lupus nephritis (kidney biopsy)"

CYC_NAME = "CYCLOPHOSPHAMIDE"
MSC_NAME = "ALLOGENEIC BONE MARROW MESENCHYMAL STEM CELLS"
RELATEDNESS_ORDER = ["not_related", "unlikely", "possible", "probable", "definite"]
SERIOUSNESS_VARS = {
    "death": "AESDTH",
    "life_threatening": "AESLIFE",
    "hospitalisation": "AESHOSP",
    "disability": "AESDISAB",
    "congenital_anomaly": "AESCONG",
    "important_medical_event": "AESMIE",
}


def _visit_of(t: Timeline, when: datetime) -> dict[str, Any]:
    visit, num = t.visit(when)
    return {"VISIT": visit, "VISITNUM": num, "EPOCH": t.epoch(when)}


def _dm(s: SubjectData, t: Timeline, studyid: str, study: Any) -> dict[str, Any]:
    a = s.aggregate
    demo = a.demographics
    consent = s.first("ConsentObtained")
    screen_failed = s.first("ScreenFailed")
    end = a.exited_at or a.completed_at
    arm = {"ARMCD": "CYCMSC", "ARM": "Cyclophosphamide + AlloMSC"}
    row: dict[str, Any] = {
        "STUDYID": studyid,
        "DOMAIN": "DM",
        "USUBJID": t.usubjid,
        "SUBJID": s.screening_number.rsplit("-", 1)[-1],
        "RFSTDTC": dtc(t.rfst),
        "RFXSTDTC": dtc(t.rfst),
        "RFXENDTC": dtc(t.rfxend),
        "RFICDTC": dtc(consent.occurred_at) if consent else None,
        "RFENDTC": dtc(end),
        "RFPENDTC": dtc(end),
        "DTHDTC": dtc(a.died_at),
        "DTHFL": "Y" if a.died_at else None,
        "SITEID": s.site,
        "BRTHDTC": dtc(demo.birth_date) if demo else None,
        "AGE": demo.age_at_consent if demo else None,
        "AGEU": "YEARS" if demo else None,
        "SEX": str(demo.sex.value) if demo else "U",
        "COUNTRY": COUNTRY_OF_TIMEZONE.get(study.sites[s.site].timezone) if s.site in study.sites else None,
    }
    if screen_failed is not None or a.enrolled_at is None:
        row["ARMNRS"] = "SCREEN FAILURE" if screen_failed is not None else "NOT ASSIGNED"
    else:
        row.update(arm)
        if a.cyc is not None:
            row.update(ACTARMCD=arm["ARMCD"], ACTARM=arm["ARM"])
        else:
            row["ARMNRS"] = "NOT TREATED"
    return row


def _ds(s: SubjectData, t: Timeline, studyid: str) -> list[dict[str, Any]]:
    rows = []
    for i in s.items:
        p = i.payload
        term = decod = cat = None
        epoch = t.epoch(i.occurred_at)
        if i.type == "ConsentObtained":
            term, decod, cat = f"INFORMED CONSENT OBTAINED ({p['icf_version']})", "INFORMED CONSENT OBTAINED", "PM"
        elif i.type == "EligibilityConfirmed":
            term, decod, cat = "ELIGIBILITY CRITERIA MET", "ELIGIBILITY CRITERIA MET", "PM"
        elif i.type == "Enrolled":
            term, decod, cat = "ENROLLED", "ENROLLED", "PM"
        elif i.type == "ScreenFailed":
            term, decod, cat = p["reason"], "SCREEN FAILURE", "DE"
        elif i.type == "Withdrawn":
            term, decod, cat = p["reason"], DS_DECOD.get(p["reason_code"], "OTHER"), "DE"
        elif i.type == "LostToFollowUp":
            term, decod, cat = "LOST TO FOLLOW-UP", "LOST TO FOLLOW-UP", "DE"
        elif i.type == "DeathRecorded":
            term, decod, cat = p.get("cause") or "DEATH", "DEATH", "DE"
        elif i.type == "MainStudyCompleted":
            term, decod, cat, epoch = "COMPLETED MAIN STUDY", "COMPLETED", "DE", "FOLLOW-UP"
        elif i.type == "StudyCompleted":
            term, decod, cat, epoch = "COMPLETED", "COMPLETED", "DE", "LONG-TERM FOLLOW-UP"
        if term is None:
            continue
        rows.append(
            t.common("DS", studyid, i)
            | {
                "DSTERM": term,
                "DSDECOD": decod,
                "DSCAT": "PROTOCOL MILESTONE" if cat == "PM" else "DISPOSITION EVENT",
                "EPOCH": epoch,
                "DSSTDTC": dtc(i.occurred_at),
                "DSSTDY": t.dy(i.occurred_at),
            }
        )
    return rows


def _sv(s: SubjectData, t: Timeline, studyid: str) -> list[dict[str, Any]]:
    rows = []
    a = s.aggregate
    base = {"STUDYID": studyid, "DOMAIN": "SV", "USUBJID": t.usubjid}

    def visit(code: str, start: datetime, end: datetime | None = None, **more: Any) -> None:
        name, num = visit_name(code, more.pop("visitnum", None))
        rows.append(
            base
            | {
                "VISITNUM": num,
                "VISIT": name,
                "SVPRESP": "Y",
                "SVOCCUR": "Y",
                "EPOCH": t.epoch(start),
                "SVSTDTC": dtc(start),
                "SVENDTC": dtc(end or start),
                "SVSTDY": t.dy(start),
            }
            | more
        )

    screened = s.first("Screened")
    if screened is not None:
        visit("SCR", screened.occurred_at)
    if a.stays:
        visit("BASE", a.stays[0].admitted_at)
    if a.cyc is not None:
        visit("CYC", a.cyc.occurred_at, a.cyc.stopped_at)
    if a.msc is not None:
        visit("TX", a.msc.occurred_at, a.msc.stopped_at)
    if a.stays and a.stays[-1].discharged_at is not None:
        visit("DIS", a.stays[-1].discharged_at)
    for i in s.of("VisitRecorded", "VisitMissed", "UnscheduledVisitRecorded"):
        if i.type == "VisitRecorded":
            visit(i.record.visit, i.occurred_at, visitnum=i.record.visitnum)
        elif i.type == "VisitMissed":
            name, num = visit_name(i.payload["visit"], Decimal(i.payload["visitnum"]))
            rows.append(
                base
                | {
                    "VISITNUM": num,
                    "VISIT": name,
                    "SVPRESP": "Y",
                    "SVOCCUR": "N",
                    "SVREASOC": i.payload.get("reason"),
                    "EPOCH": t.epoch(i.occurred_at),
                }
            )
        else:
            num = float(Decimal(i.payload["visitnum"]))
            rows.append(
                base
                | {
                    "VISITNUM": num,
                    "VISIT": f"UNSCHEDULED {i.payload['visitnum']}",
                    "SVOCCUR": "Y",
                    "EPOCH": t.epoch(i.occurred_at),
                    "SVSTDTC": dtc(i.occurred_at),
                    "SVENDTC": dtc(i.occurred_at),
                    "SVSTDY": t.dy(i.occurred_at),
                    "SVUPDES": i.payload.get("purpose"),
                }
            )
    return rows


def _ie(s: SubjectData, t: Timeline, studyid: str) -> list[dict[str, Any]]:
    rows = []
    for i in s.of("ScreenFailed", "EligibilityConfirmed"):
        if i.type == "ScreenFailed":
            failed = list(i.payload.get("failed_criteria") or [])
        else:
            answers = i.payload["checklist"]["answers"]
            failed = [c for c, ans in sorted(answers.items()) if (c.startswith("I")) != bool(ans["met"])]
        for k, code in enumerate(failed):
            inclusion = code.startswith("I")
            rows.append(
                t.common("IE", studyid, i, k)
                | {
                    "IETESTCD": f"{'INCL' if inclusion else 'EXCL'}{int(code[1:]):02d}",
                    "IETEST": f"{'Inclusion' if inclusion else 'Exclusion'} criterion {code} (protocol section 4)",
                    "IECAT": "INCLUSION" if inclusion else "EXCLUSION",
                    "IEORRES": "N" if inclusion else "Y",
                    "IESTRESC": "N" if inclusion else "Y",
                    "EPOCH": "SCREENING",
                    "IEDTC": dtc(i.occurred_at),
                }
            )
    return rows


def _ex(s: SubjectData, t: Timeline, studyid: str) -> list[dict[str, Any]]:
    rows = []
    for i in s.of("CyclophosphamideGiven", "MSCInfused"):
        r = i.record
        row = t.common("EX", studyid, i) | {
            "EXSTDTC": dtc(r.occurred_at),
            "EXENDTC": dtc(r.stopped_at),
            "EXSTDY": t.dy(r.occurred_at),
            "EXROUTE": "INTRAVENOUS",
            "EXDOSFRQ": "ONCE",
            "EPOCH": "TREATMENT",
        }
        if i.type == "CyclophosphamideGiven":
            row |= {
                "EXTRT": CYC_NAME,
                "EXDOSE": _num(r.prescribed_mg_per_m2),
                "EXDOSU": "mg/m2",
                "EXDOSFRM": "INJECTION",
                "EXLOT": r.lot,
                "VISIT": VISIT_NAMES["CYC"][0],
                "VISITNUM": 30.0,
            }
        else:
            row |= {
                "EXTRT": MSC_NAME,
                "EXDOSE": _num(r.dose_1e6_per_kg),
                "EXDOSU": "10^6 cells/kg",
                "EXDOSFRM": "SUSPENSION",
                "EXLOT": r.lot_id,
                "VISIT": VISIT_NAMES["TX"][0],
                "VISITNUM": 40.0,
            }
        rows.append(row)
    return rows


def _ae(s: SubjectData, t: Timeline, studyid: str) -> list[dict[str, Any]]:
    rows = []
    entries = {i.version: i for i in s.of("AdverseEventReported")}
    for ae in s.aggregate.adverse_events.values():
        i = entries.get(ae.entry_version)
        if ae.voided or i is None:
            continue
        r = i.record
        rel = [x for x in (ae.relatedness_cyc, ae.relatedness_msc) if x is not None]
        strongest = max(rel, key=lambda x: RELATEDNESS_ORDER.index(str(x.value))) if rel else None
        criteria = {str(c.value) for c in ae.seriousness}
        row = t.common("AE", studyid, i) | {
            "AESPID": ae.ae_id,
            "AETERM": r.term,
            "AETOXGR": str(ae.grade) if ae.grade is not None else None,
            "AESER": ("Y" if ae.serious else "N") if ae.grade is not None else None,
            "AEREL": _upper(strongest.value) if strongest is not None else None,
            "AEACN": _upper(ae.action.value) if ae.action is not None else None,
            "AEOUT": _upper(ae.outcome.value) if ae.outcome is not None else None,
            "EPOCH": t.epoch(r.onset),
            "AESTDTC": dtc(r.onset),
            "AEENDTC": dtc(ae.resolved_on),
            "AESTDY": t.dy(r.onset),
        }
        if ae.serious:
            row |= {var: "Y" if c in criteria else "N" for c, var in SERIOUSNESS_VARS.items()}
        rows.append(row)
    return rows


def _cm(s: SubjectData, t: Timeline, studyid: str) -> list[dict[str, Any]]:
    return [
        t.common("CM", studyid, i)
        | {
            "CMTRT": i.record.name,
            "CMCAT": "CONCOMITANT",
            "CMINDC": i.record.indication,
            "CMDOSE": _num(i.record.dose),
            "CMDOSU": i.record.dose_unit,
            "CMDOSFRQ": i.record.frequency,
            "CMROUTE": {"IV": "INTRAVENOUS", "PO": "ORAL"}.get(i.record.route or "", _upper(i.record.route)),
            "CMSTDTC": dtc(i.record.start_date),
            "CMENDTC": dtc(i.record.end_date),
        }
        for i in s.of("ConcomitantMedicationRecorded")
    ]


def _mh(s: SubjectData, t: Timeline, studyid: str) -> list[dict[str, Any]]:
    rows = [
        t.common("MH", studyid, i)
        | {
            "MHTERM": i.record.term,
            "MHCAT": "SLE HISTORY" if i.record.category == "SLE" else _upper(i.record.category),
            "MHSTDTC": dtc(i.record.start_date),
            "MHENRTPT": "ONGOING" if i.record.ongoing else None,
            "MHENTPT": "CONSENT" if i.record.ongoing else None,
            "MHDTC": dtc(i.occurred_at),
        }
        for i in s.of("MedicalHistoryRecorded")
    ]
    biopsy = _biopsy(s)
    if biopsy is not None:  # the kidney biopsy behind I2 (mapping §2: an LN biopsy before the study is MH)
        rows.append(
            t.common("MH", studyid, biopsy)
            | {
                "MHTERM": BIOPSY_TERM,
                "MHCAT": "SLE HISTORY",
                "MHSTDTC": biopsy.payload["biopsy_date"],
                "MHDTC": dtc(biopsy.occurred_at),
            }
        )
    return rows


def _biopsy(s: SubjectData) -> Item | None:
    """The subject's kidney biopsy as the aggregate holds it: the latest `BiopsyRecorded` (a later one replaces
    an earlier), if it is in the export (not voided, recorded within the scope's window)."""
    versions = [v for v, f in s.aggregate.facts.items() if f.type == "BiopsyRecorded" and not f.voided]
    if not versions:
        return None
    latest = max(versions)
    return next((i for i in s.of("BiopsyRecorded") if i.version == latest), None)


def _lb_row(
    t: Timeline, studyid: str, i: Item, k: int, code: str, value: Any, unit: str, **more: Any
) -> dict[str, Any]:
    testcd, test, cat, spec, method, std_ucum = LB_TESTS[code]
    when = i.occurred_at
    if code == "ANA":
        stresc, stresn, stresu = f"1:{int(Decimal(value))}", _num(value), None
        orres = stresc
    else:
        std = labs.convert(code, value, unit, std_ucum) if std_ucum and unit != std_ucum else Decimal(value)
        stresn = float(std)
        stresc, stresu, orres = _plain(std), cdisc_unit(std_ucum), _plain(Decimal(value))
    return t.common("LB", studyid, i, k) | {
        "LBTESTCD": testcd,
        "LBTEST": test,
        "LBCAT": cat,
        "LBORRES": orres,
        "LBORRESU": cdisc_unit(unit) if code != "ANA" else None,
        "LBSTRESC": stresc,
        "LBSTRESN": stresn,
        "LBSTRESU": stresu,
        "LBSPEC": spec,
        "LBMETHOD": method,
        "LBDTC": dtc(when),
        "LBDY": t.dy(when),
        **_visit_of(t, when),
        **more,
    }


def _plain(value: Decimal) -> str:
    """A decimal as plain text (never `1E+2`)."""
    return format(value, "f")


def _lb(s: SubjectData, t: Timeline, studyid: str) -> list[dict[str, Any]]:
    rows = []
    nrind = {"L": "LOW", "H": "HIGH", "N": "NORMAL"}
    for i in s.of("LabResultRecorded", "DerivedResultRecorded", "TregPanelRecorded"):
        r = i.record
        if i.type == "LabResultRecorded":
            std_ucum = LB_TESTS[r.code][5]
            lo, hi = r.range_low, r.range_high  # canonical unit
            if std_ucum and lo is not None and r.canonical_unit != std_ucum:
                lo = labs.convert(r.code, lo, r.canonical_unit, std_ucum)
            if std_ucum and hi is not None and r.canonical_unit != std_ucum:
                hi = labs.convert(r.code, hi, r.canonical_unit, std_ucum)
            rows.append(
                _lb_row(
                    t,
                    studyid,
                    i,
                    0,
                    r.code,
                    r.value,
                    r.unit,
                    LBORNRLO=_plain(r.lab_low) if r.lab_low is not None else None,
                    LBORNRHI=_plain(r.lab_high) if r.lab_high is not None else None,
                    LBSTNRLO=_num(lo),
                    LBSTNRHI=_num(hi),
                    LBNRIND=nrind.get(r.flag or ""),
                    LBLOINC=r.loinc,
                    LBREFID=r.specimen_id,
                )
            )
        elif i.type == "DerivedResultRecorded":
            if r.value is None:
                continue  # not computed: the reason is in the audit trail
            rows.append(_lb_row(t, studyid, i, 0, r.code, r.value, r.unit, LBDRVFL="Y", LBLOINC=_loinc(r.code)))
        else:
            rows.append(_lb_row(t, studyid, i, 0, "TREGPCT", r.treg_pct, "%", LBNRIND=nrind.get(r.treg_flag or "")))
            if r.cd4_per_ul is not None:
                rows.append(
                    _lb_row(
                        t,
                        studyid,
                        i,
                        1,
                        "CD4",
                        r.cd4_per_ul,
                        "/uL",
                        LBNRIND=nrind.get(r.cd4_flag or ""),
                        LBLOINC=_loinc("CD4"),
                    )
                )
    return rows


def _loinc(code: str) -> str | None:
    return labs.get_analyte(code).loinc or None


def _vs(s: SubjectData, t: Timeline, studyid: str) -> list[dict[str, Any]]:
    rows = []
    for i in s.of("VitalSignsRecorded"):
        r = i.record
        k = 0
        for name, (testcd, test, ucum) in VS_TESTS.items():
            value = getattr(r, name)
            if value is None:
                continue
            rows.append(
                t.common("VS", studyid, i, k)
                | {
                    "VSTESTCD": testcd,
                    "VSTEST": test,
                    "VSORRES": _plain(value),
                    "VSORRESU": cdisc_unit(ucum),
                    "VSSTRESC": _plain(value),
                    "VSSTRESN": _num(value),
                    "VSSTRESU": cdisc_unit(ucum),
                    "VSTPT": _upper(r.timepoint),
                    "VSDTC": dtc(i.occurred_at),
                    "VSDY": t.dy(i.occurred_at),
                    **_visit_of(t, i.occurred_at),
                }
            )
            k += 1
    for i in s.of("CyclophosphamideGiven"):
        bsa = i.record.bsa_m2
        rows.append(
            t.common("VS", studyid, i, 50)
            | {
                "VSTESTCD": "BSA",
                "VSTEST": "Body Surface Area",
                "VSORRES": _plain(bsa),
                "VSORRESU": cdisc_unit("m2"),
                "VSSTRESC": _plain(bsa),
                "VSSTRESN": _num(bsa),
                "VSSTRESU": cdisc_unit("m2"),
                "VSDRVFL": "Y",
                "VSDTC": dtc(i.occurred_at),
                "VSDY": t.dy(i.occurred_at),
                **_visit_of(t, i.occurred_at),
            }
        )
    return rows


def _qs(s: SubjectData, t: Timeline, studyid: str) -> list[dict[str, Any]]:
    rows = []
    descriptors = load_descriptors()
    for i in s.of("SledaiAssessed"):
        r = i.record
        present = set(r.descriptors)
        visit = visit_name(r.visit)[0] if r.visit else None
        at = _visit_of(t, i.occurred_at)
        common = {
            "QSCAT": "SLEDAI-2K",
            "QSEVAL": "INVESTIGATOR",
            "QSDTC": dtc(i.occurred_at),
            "QSDY": t.dy(i.occurred_at),
            **at,
        }
        if visit:
            common["VISIT"] = visit
            common["VISITNUM"] = visit_name(r.visit)[1]
        for k, d in enumerate(sorted(descriptors.values(), key=lambda d: d.item)):
            yes = d.code in present
            score = d.weight if yes else 0
            rows.append(
                t.common("QS", studyid, i, k)
                | common
                | {
                    "QSTESTCD": d.code,
                    "QSTEST": d.descriptor[:40],
                    "QSORRES": "Y" if yes else "N",
                    "QSSTRESC": str(score),
                    "QSSTRESN": float(score),
                }
            )
        rows.append(
            t.common("QS", studyid, i, 99)
            | common
            | {
                "QSTESTCD": "SLED2KTS",
                "QSTEST": "SLEDAI-2K Total Score",
                "QSORRES": str(r.total),
                "QSSTRESC": str(r.total),
                "QSSTRESN": float(r.total),
                "QSDRVFL": "Y",
            }
        )
    return rows


# ------------------------------------------------------------------------------------------------ SUPP--
def _supp(parent: dict[str, Any], rdomain: str, qnam: str, qval: Any) -> dict[str, Any]:
    """One supplemental qualifier of `parent` (a row of `rdomain`), pointing at it by its --SEQ."""
    qlabel, qorig, qeval = QUALIFIERS[rdomain][qnam]
    return {
        "STUDYID": parent["STUDYID"],
        "RDOMAIN": rdomain,
        "USUBJID": parent["USUBJID"],
        "IDVAR": f"{rdomain}SEQ",
        "IDVARVAL": _seq_text(parent[f"{rdomain}SEQ"]),
        "QNAM": qnam,
        "QLABEL": qlabel,
        "QVAL": qval,
        "QORIG": qorig,
        "QEVAL": qeval,
    }


def _seq_text(seq: Any) -> str:
    """A --SEQ as IDVARVAL text (`4600`, never `4600.0`)."""
    return str(int(seq)) if isinstance(seq, int | float) and float(seq).is_integer() else str(seq)


def _qualified(parent: dict[str, Any], rdomain: str, values: dict[str, Any]) -> list[dict[str, Any]]:
    """`parent`'s qualifiers, in `QUALIFIERS` order; a value the record does not hold (None) gives no row."""
    return [_supp(parent, rdomain, q, values[q]) for q in QUALIFIERS[rdomain] if values.get(q) is not None]


def _item_of(s: SubjectData, row: dict[str, Any], domain: str) -> Item:
    """The fact a parent row was built from: its --SEQ is the fact's version × SEQ_STEP + the row within it."""
    version = int(row[f"{domain}SEQ"]) // SEQ_STEP
    return next(i for i in s.items if i.version == version)


def _suppex(source: ExportSource, s: SubjectData, ex: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for parent in ex:
        i = _item_of(s, parent, "EX")
        r = i.record
        if i.type == "CyclophosphamideGiven":
            values = {"BSA": _plain(r.bsa_m2), "CYCCALC": _plain(r.calculated_mg)}
        else:
            lot = _product_lot(source, s, r.lot_id)
            values = {"MSCVCNT": _plain(r.viable_cells)}
            if lot is not None:
                values |= {"MSCDONOR": lot.donor_id, "MSCHLA": lot.hla_match, "MSCVIAB": _plain(lot.viability_pct)}
        rows += _qualified(parent, "EX", values)
    return rows


def _product_lot(source: ExportSource, s: SubjectData, lot_id: str) -> Any:
    """The infused lot's release record (`ProductLot`, a stream of its own), read like the subject's
    (`ExportSource.stream_facts`: checked, cut at the export's checkpoint). None if it has no event there."""
    from projections.replay import fold
    from sle_events.domain.product import ProductLot

    facts, _ = source.stream_facts(str(ProductLot.id_for(UUID(str(source.scope.study_id)), lot_id)))
    if not facts:
        return None
    lot = fold(list(facts))
    if str(lot.subject_id) != s.stream:
        raise SdtmProblem(f"lot {lot_id} infused into {s.screening_number} was released for another subject")
    return lot


def _suppae(source: ExportSource, s: SubjectData, ae: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    states = s.aggregate.adverse_events
    for parent in ae:
        a = states[parent["AESPID"]]
        values = {
            "AERELCYC": _upper(a.relatedness_cyc.value) if a.relatedness_cyc is not None else None,
            "AERELMSC": _upper(a.relatedness_msc.value) if a.relatedness_msc is not None else None,
            "AEEXPCYC": _upper(a.expectedness_cyc.value) if a.expectedness_cyc is not None else None,
            "AEEXPMSC": _upper(a.expectedness_msc.value) if a.expectedness_msc is not None else None,
            "AEAWRDTC": dtc(a.aware_at),
            "AERPTDTC": dtc(a.reported_at),
        }
        rows += _qualified(parent, "AE", values)
    return rows


def _suppmh(source: ExportSource, s: SubjectData, mh: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for parent in mh:
        i = _item_of(s, parent, "MH")
        if i.type == "BiopsyRecorded":
            rows += _qualified(parent, "MH", {"ISNRPS": i.payload["biopsy_class"]})
    return rows


BUILDERS = {
    "DS": _ds,
    "SV": _sv,
    "IE": _ie,
    "EX": _ex,
    "AE": _ae,
    "CM": _cm,
    "MH": _mh,
    "LB": _lb,
    "VS": _vs,
    "QS": _qs,
}
#: SUPP-- dataset → (its builder, run on the parent domain's rows of the same subject)
SUPP_BUILDERS: dict[str, Callable[[ExportSource, SubjectData, list[dict[str, Any]]], list[dict[str, Any]]]] = {
    "SUPPEX": _suppex,
    "SUPPAE": _suppae,
    "SUPPMH": _suppmh,
}
SORT_KEYS = {
    "DM": ("USUBJID",),
    "SV": ("USUBJID", "VISITNUM"),
    "LB": ("USUBJID", "LBTESTCD", "LBSPEC", "VISITNUM", "LBDTC", "LBSEQ"),
}


def build_datasets(source: ExportSource, progress: Callable[[int], None] | None = None) -> dict[str, Dataset]:
    """Every domain's dataset for the subjects in scope, sorted by its keys."""
    every = DATASETS | SUPP_DATASETS
    out = {name: Dataset(name, label, list(variables)) for name, (label, variables) in every.items()}
    for rows in source.map(subject_rows, progress):
        for name, found in rows.items():
            out[name].rows.extend(found)
    for name, ds in out.items():
        if name in SUPP_DATASETS:  # by parent row (its --SEQ as a number), then QNAM in QUALIFIERS order
            order = {q: n for n, q in enumerate(QUALIFIERS[name[4:]])}
            ds.rows.sort(key=lambda r: (r["USUBJID"], int(r["IDVARVAL"]), order.get(r["QNAM"], len(order))))
            continue
        keys = SORT_KEYS.get(name, ("USUBJID", f"{name}SEQ"))
        ds.rows.sort(key=lambda r: tuple(_sortable(r.get(k)) for k in keys))
    return out


def subject_rows(source: ExportSource, s: SubjectData) -> dict[str, list[dict[str, Any]]]:
    """One subject's rows of every domain (run in the export's worker processes)."""
    studyid = source.study.code
    t = Timeline(s, studyid)
    out = {"DM": [_dm(s, t, studyid, source.study)]}
    for name, build in BUILDERS.items():
        out[name] = build(s, t, studyid)
    for name, supp in SUPP_BUILDERS.items():  # here, beside the parent rows: their --SEQ is at hand
        out[name] = supp(source, s, out[name[4:]])
    return out


def _sortable(value: Any) -> tuple[int, Any]:
    return (0, "") if value is None else (1, value)


# ------------------------------------------------------------------------------------------------ checks
def check_datasets(datasets: dict[str, Dataset]) -> list[Finding]:
    """Every way these datasets break the XPT v5 / SDTM limits (empty: they may be written)."""
    dm = _dm_subjects(datasets)
    return [f for name in datasets for f in _checked(datasets, name, dm)]


def _dm_subjects(datasets: dict[str, Dataset]) -> set[str]:
    return {r["USUBJID"] for r in datasets["DM"].rows} if "DM" in datasets else set()


def _checked(datasets: dict[str, Dataset], name: str, dm: set[str]) -> list[Finding]:
    ds = datasets[name]
    findings = check_dataset(ds, dm)
    if ds.name.startswith("SUPP"):
        findings.extend(check_supp(ds, datasets.get(ds.name[4:])))
    return findings


def check_supp(ds: Dataset, parent: Dataset | None) -> list[Finding]:
    """A SUPP-- dataset against its parent domain: every row points (same USUBJID, IDVAR = --SEQ, IDVARVAL = that
    --SEQ as text) at a parent row that exists; QNAM is a variable name (≤ 8), QLABEL ≤ 40 characters, QVAL is
    not empty (and ISO 8601 for a --DTC qualifier); one value per parent row and QNAM."""
    rdomain = ds.name[4:]
    if parent is None:
        return [Finding(ds.name, "RDOMAIN", "", f"parent domain {rdomain or '(none)'} is not among the datasets")]
    f: list[Finding] = []
    seq = f"{rdomain}SEQ"
    parents = {(str(r.get("USUBJID") or ""), _seq_text(r[seq])) for r in parent.rows if r.get(seq) is not None}
    seen: set[tuple[str, Any, Any, Any]] = set()
    for r in ds.rows:
        subject = str(r.get("USUBJID") or "")
        qnam, qlabel, qval = r.get("QNAM"), r.get("QLABEL"), r.get("QVAL")
        if r.get("RDOMAIN") != rdomain:
            f.append(Finding(ds.name, "RDOMAIN", subject, f"RDOMAIN {r.get('RDOMAIN')!r} is not {rdomain}"))
        if r.get("IDVAR") != seq:
            f.append(Finding(ds.name, "IDVAR", subject, f"IDVAR {r.get('IDVAR')!r} is not {seq}"))
        elif (subject, str(r.get("IDVARVAL"))) not in parents:
            f.append(
                Finding(
                    ds.name,
                    "IDVARVAL",
                    subject,
                    f"{qnam}: no {rdomain} row of this subject has {seq} {r.get('IDVARVAL')!r} (dangling parent)",
                )
            )
        if not isinstance(qnam, str) or not NAME.match(qnam):
            f.append(Finding(ds.name, "QNAM", subject, f"QNAM {qnam!r} is not 1-8 upper-case letters, digits or _"))
        if not isinstance(qlabel, str) or not qlabel or len(qlabel) > 40:
            f.append(Finding(ds.name, "QLABEL", subject, f"QLABEL {qlabel!r} is not 1-40 characters"))
        if qval is None or str(qval) == "":
            f.append(Finding(ds.name, "QVAL", subject, f"{qnam}: QVAL is empty (a value not held gives no row)"))
        elif isinstance(qnam, str) and qnam.endswith("DTC") and not ISO_DTC.match(str(qval)):
            f.append(Finding(ds.name, "QVAL", subject, f"{qnam}: {qval!r} is not an ISO 8601 date/time"))
        key = (subject, r.get("IDVAR"), r.get("IDVARVAL"), qnam)
        if key in seen:
            f.append(Finding(ds.name, "QNAM", subject, f"{qnam} given twice for {r.get('IDVAR')} {r.get('IDVARVAL')}"))
        seen.add(key)
    return f


def check_dataset(ds: Dataset, dm_subjects: set[str]) -> list[Finding]:
    f: list[Finding] = []
    if not NAME.match(ds.name):
        f.append(Finding(ds.name, "", "", "dataset name must be 1-8 upper-case letters, digits or _"))
    if len(ds.label) > 40 or not ds.label.isascii():
        f.append(Finding(ds.name, "", "", f"dataset label {ds.label!r} is over 40 ASCII characters"))
    for name, label, _ in ds.variables:
        if not NAME.match(name):
            f.append(Finding(ds.name, name, "", "variable name must be 1-8 upper-case letters, digits or _"))
        if len(label) > 40 or not label.isascii():
            f.append(Finding(ds.name, name, "", f"label {label!r} is over 40 ASCII characters ({len(label)})"))
    kinds = {n: k for n, _, k in ds.variables}
    seq = f"{ds.name}SEQ"
    seen: set[tuple[str, Any]] = set()
    for r in ds.rows:
        subject = str(r.get("USUBJID") or "")
        unknown = set(r) - set(kinds)
        if unknown:
            f.append(Finding(ds.name, ",".join(sorted(unknown)), subject, "not a variable of this dataset"))
        for name, kind in kinds.items():
            value = r.get(name)
            if value is None or kind == "N":
                continue
            text = str(value)
            if not text.isascii():
                bad = next(ch for ch in text if not ch.isascii())
                f.append(Finding(ds.name, name, subject, f"non-ASCII character {bad!r} in {text[:60]!r}"))
            elif len(text.encode("ascii")) > MAX_CHAR_BYTES:
                f.append(Finding(ds.name, name, subject, f"value of {len(text)} bytes (at most {MAX_CHAR_BYTES})"))
            if name.endswith("DTC") and text and not ISO_DTC.match(text):
                f.append(Finding(ds.name, name, subject, f"{text!r} is not an ISO 8601 date/time"))
        if seq in kinds:
            key = (subject, r.get(seq))
            if key in seen:
                f.append(Finding(ds.name, seq, subject, f"{seq} {r.get(seq)} is not unique for this subject"))
            seen.add(key)
        if ds.name != "DM" and subject not in dm_subjects:
            f.append(Finding(ds.name, "USUBJID", subject, "subject is not in DM"))
    return f


# ------------------------------------------------------------------------------------------------ writing
PARALLEL_WRITE_ROWS = 20_000  # below this many rows in all, checking and writing stay in this process


def write_datasets(datasets: dict[str, Dataset], out: Path) -> list[Path]:
    """Check every dataset, then write `<name>.xpt` (SAS Transport v5) and `<name>.csv` for each into `out`
    (a SUPP-- dataset only if it has rows). Raises `SdtmRefused` and writes nothing if any dataset breaks a
    limit. A large study's datasets are checked, then written, on worker processes, the largest first: after the
    subjects are read this is the export's serial tail (LB alone is ~40% of the rows)."""
    global _writing
    names = sorted(datasets, key=lambda n: len(datasets[n].rows) * len(datasets[n].variables), reverse=True)
    workers = min(os.cpu_count() or 1, MAX_WORKERS, len(names))
    _writing = (datasets, out)
    try:
        if workers <= 1 or sum(len(d.rows) for d in datasets.values()) < PARALLEL_WRITE_ROWS:
            findings = check_datasets(datasets)
            if findings:
                raise SdtmRefused(findings)
            out.mkdir(parents=True, exist_ok=True)
            written = [p for n in names for p in _write_one(n)]
        else:
            from concurrent.futures import ProcessPoolExecutor
            from multiprocessing import get_context

            # fork: the workers inherit the built datasets (`_writing`) instead of being sent them
            with ProcessPoolExecutor(workers, mp_context=get_context("fork")) as pool:
                found = dict(zip(names, pool.map(_check_one, names), strict=True))
                findings = [f for n in datasets for f in found[n]]  # in the datasets' order, as check_datasets
                if findings:
                    raise SdtmRefused(findings)
                out.mkdir(parents=True, exist_ok=True)
                written = [p for files in pool.map(_write_one, names) for p in files]
    finally:
        _writing = None
    order = {n: i for i, n in enumerate(datasets)}  # the files in the datasets' own order, as before
    return sorted(written, key=lambda p: (order[p.stem.upper()], p.suffix != ".xpt"))


_writing: tuple[dict[str, Dataset], Path] | None = None  # what `write_datasets` hands its workers (by fork)


def _check_one(name: str) -> list[Finding]:
    assert _writing is not None
    return _checked(_writing[0], name, _dm_subjects(_writing[0]))


def _write_one(name: str) -> list[Path]:
    import pandas as pd
    import pyreadstat

    assert _writing is not None
    ds, out = _writing[0][name], _writing[1]
    if name.startswith("SUPP") and not ds.rows:
        return []  # an empty SUPP-- dataset is not submitted (nor listed in define.xml)
    frame = pd.DataFrame(ds.columns(), columns=ds.names)
    xpt = out / f"{name.lower()}.xpt"
    pyreadstat.write_xport(
        frame,
        str(xpt),
        file_label=ds.label,
        column_labels=[label for _, label, _ in ds.variables],
        table_name=name,
        file_format_version=5,
    )
    csv_path = out / f"{name.lower()}.csv"
    with csv_path.open("w", encoding="ascii", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(ds.names)
        for row in ds.rows:
            w.writerow(["" if row.get(n) is None else _csv_value(row[n]) for n in ds.names])
    return [xpt, csv_path]


def _csv_value(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def write_sdtm(source: ExportSource, out: Path, progress: Callable[[int], None] | None = None) -> list[Path]:
    """The SDTM export of `source` into folder `out`: build, check, write. Returns the files written."""
    try:
        datasets = build_datasets(source, progress)
    except SdtmProblem as e:
        raise SdtmRefused([Finding("SDTM", "", "", str(e))]) from None
    return write_datasets(datasets, out)


def export_sdtm(
    url: str,
    out: Path,
    *,
    scope: ExportScope | None = None,
    checkpoint: ExportCheckpoint | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> list[Path]:
    """The SDTM export of the record at `url` into folder `out` (new or empty), from the events `checkpoint`
    covers (all of them without one). Nothing appears under `out` unless every dataset passed its checks:
    `SdtmRefused` (what, where, why) otherwise; a scope naming nothing is `ExportScopeError`."""
    with ExportSource(url, scope, upto_position=checkpoint.position if checkpoint else None) as source:
        tmp = partial(out)
        try:
            files = write_sdtm(source, tmp, progress_counter(source, on_progress))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    publish(tmp, out)
    return [out / f.name for f in files]
