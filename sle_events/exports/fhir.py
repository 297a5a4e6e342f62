"""FHIR R4 JSON: one Bundle (type `collection`) per subject in scope.

Each bundle holds the ResearchStudy, the subject's ResearchSubject and Patient (pseudonymous: the screening
number, sex and birth year; never a name), an Observation per lab and derived result and Treg panel (LOINC
where labs.csv has one, UCUM `valueQuantity`, reference range, interpretation, `effectiveDateTime` with the
site's offset), an AdverseEvent per AE, a MedicationAdministration for cyclophosphamide and the AlloMSC
infusion, and a Provenance per resource naming its signer (printed name, user id, role, key) and the signed
event it came from with that event's ledger leaf index. Every reference is a `urn:uuid:` `fullUrl` inside the
same bundle; ids are derived from the stream and version, so a re-export gives the same ids.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Callable
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from sle_events.domain import labs
from sle_events.exports.manifest import ExportCheckpoint
from sle_events.exports.scope import ExportScope
from sle_events.exports.source import ExportSource, Item, SubjectData, partial, progress_counter, publish

__all__ = ["build_bundle", "write_fhir", "export_fhir", "LOINC", "UCUM", "ANALYTE_SYSTEM"]

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
ANALYTE_SYSTEM = "urn:sle:analyte"  # labs.csv codes (TREGPCT has no LOINC term)
SCREENING_SYSTEM = "urn:sle:screening-number"
EVENT_SYSTEM = "urn:sle:event"  # `<stream>:<version>`
LEDGER_SYSTEM = "urn:sle:ledger-index"
KEY_SYSTEM = "urn:sle:key"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
AE_SYSTEM = "http://terminology.hl7.org/CodeSystem/adverse-event"
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
NAMESPACE = uuid.UUID("5a1e7e2c-4f0b-4c39-9d59-2b3c0c6f1a11")  # fixed: the same facts give the same ids

RESEARCH_SUBJECT_STATUS = {
    "SCREENED": "candidate",
    "CONSENTED": "candidate",
    "ELIGIBLE": "eligible",
    "SCREEN_FAILED": "ineligible",
    "ENROLLED": "on-study",
    "PRETREATED": "on-study-intervention",
    "TRANSPLANTED": "on-study-intervention",
    "IN_FOLLOW_UP": "follow-up",
    "COMPLETED": "off-study",
    "WITHDRAWN": "withdrawn",
    "LOST_TO_FOLLOW_UP": "off-study",
    "DIED": "off-study",
}
AE_OUTCOME = {
    "recovered": "resolved",
    "recovering": "recovering",
    "not_recovered": "ongoing",
    "recovered_with_sequelae": "resolvedWithSequelae",
    "fatal": "fatal",
    "unknown": "unknown",
}
AE_CAUSALITY_RELATED = {"possible", "probable", "definite"}


def _id(*parts: Any) -> str:
    return str(uuid.uuid5(NAMESPACE, ":".join(str(p) for p in parts)))


def _ref(uid: str) -> dict[str, str]:
    return {"reference": f"urn:uuid:{uid}"}


def _when(value: datetime) -> str:
    """FHIR dateTime with the offset the clinic signed (seconds included, as FHIR requires with a time)."""
    return value.isoformat(timespec="seconds")


def _number(value: Decimal | str | int) -> float | int:
    d = Decimal(str(value))
    return int(d) if d == d.to_integral_value() and abs(d) < 10**15 else float(d)


def _quantity(value: Any, ucum: str) -> dict[str, Any]:
    return {"value": _number(value), "unit": ucum, "system": UCUM, "code": ucum}


class _Bundle:
    def __init__(self, source: ExportSource, s: SubjectData):
        self.source, self.s = source, s
        self.entries: list[dict[str, Any]] = []

    def add(self, uid: str, resource: dict[str, Any]) -> str:
        resource["id"] = uid
        self.entries.append({"fullUrl": f"urn:uuid:{uid}", "resource": resource})
        return uid

    def provenance(self, target: str, item: Item) -> None:
        env = item.fact.envelope
        key = self.source.study.keys.get(env["key"]) or {}
        entity = [
            {"role": "source", "what": {"identifier": {"system": EVENT_SYSTEM, "value": item.fact.event_id}}},
        ]
        if item.ledger_index is not None:
            entity.append(
                {
                    "role": "source",
                    "what": {
                        "identifier": {"system": LEDGER_SYSTEM, "value": str(item.ledger_index)},
                        "display": f"ledger leaf {item.ledger_index}",
                    },
                }
            )
        self.add(
            _id(target, "Provenance"),  # one per target: a Treg panel gives two
            {
                "resourceType": "Provenance",
                "target": [_ref(target)],
                "occurredDateTime": _when(item.occurred_at),
                "recorded": _when(item.recorded_at),
                "reason": [{"text": env["reason"]}] if env.get("reason") else None,
                "agent": [
                    {
                        "type": {"text": "author"},
                        "role": [{"text": env["role"]}],
                        "who": {
                            "identifier": {"system": KEY_SYSTEM, "value": env["key"]},
                            "display": self.source.signer_name(env)
                            + (" (service)" if not key.get("printed_name") else ""),
                        },
                    }
                ],
                "entity": entity,
            },
        )


#: a sign-off's meaning as an ASTM E1762 signature type (the code system FHIR's Signature.type uses)
SIGNATURE_TYPES = {
    "review": ("1.2.840.10065.1.12.1.13", "Review Signature"),
    "approval": ("1.2.840.10065.1.12.1.5", "Verification Signature"),
    "responsibility": ("1.2.840.10065.1.12.1.1", "Author's Signature"),
}
ASTM_SIGNATURE = "urn:iso-astm:E1762-95:2013"


def _signoffs(b: _Bundle, target: str) -> None:
    """A Provenance per investigator sign-off of the subject the export covers: the signature with its meaning,
    signer and time; one invalidated by a later change says so (and is never left out)."""
    from sqlalchemy import select

    from projections.casebook import signoff_rows
    from sle_events.ledger.tables import events_table

    upto = b.source.upto_position
    ev = events_table()
    with b.source.reader.engine.connect() as conn:
        for row in signoff_rows(conn, subject=b.s.stream):
            if upto is not None and row["position"] > upto:
                continue
            invalidated = row["status"] == "invalidated"
            if invalidated and upto is not None:  # only if the change is itself in the export
                stream, _, version = row["invalidated_by"].rpartition(":")
                at = conn.execute(
                    select(ev.c.id).where(
                        ev.c.originator_id == uuid.UUID(stream), ev.c.originator_version == int(version)
                    )
                ).scalar()
                invalidated = at is not None and at <= upto
            code, display = SIGNATURE_TYPES.get(row["meaning"], ("1.2.840.10065.1.12.1.5", "Verification Signature"))
            what = "casebook" if row["scope"] == "casebook" else f"visit {row['visit']}"
            who = {
                "identifier": {"system": KEY_SYSTEM, "value": row["key"]},
                "display": f"{row['printed_name']} ({row['actor']})",
            }
            b.add(
                _id(row["signoff_id"], "Provenance"),
                {
                    "resourceType": "Provenance",
                    "target": [_ref(target)],
                    "recorded": row["recorded_at"],
                    "occurredDateTime": row["signed_at"],
                    "activity": {
                        "text": f"investigator sign-off of the {what}: {row['meaning']} ({row['signature_def']})"
                    },
                    "reason": [
                        {"text": f"invalidated by change at {row['invalidated_by']}: {row['invalidated_reason']}"}
                    ]
                    if invalidated
                    else None,
                    "agent": [{"type": {"text": "verifier"}, "role": [{"text": row["role"]}], "who": who}],
                    "entity": [
                        {
                            "role": "source",
                            "what": {"identifier": {"system": EVENT_SYSTEM, "value": row["signoff_id"]}},
                        },
                        *_leaf(conn, b.source.has_ledger, row["signoff_id"]),
                    ],
                    "signature": [
                        {
                            "type": [{"system": ASTM_SIGNATURE, "code": code, "display": display}],
                            "when": row["signed_at"],
                            "who": who,
                        }
                    ],
                },
            )


def _leaf(conn: Any, has_ledger: bool, event_id: str) -> list[dict[str, Any]]:
    """The ledger-index entity of an event (none in a record without a ledger)."""
    if not has_ledger:
        return []
    from sqlalchemy import select

    from sle_events.ledger.tables import ledger_leaves as lv

    stream, _, version = event_id.rpartition(":")
    idx = conn.execute(select(lv.c.idx).where(lv.c.stream == stream, lv.c.version == int(version))).scalar()
    if idx is None:
        return []
    return [
        {
            "role": "source",
            "what": {"identifier": {"system": LEDGER_SYSTEM, "value": str(idx)}, "display": f"ledger leaf {idx}"},
        }
    ]


def build_bundle(source: ExportSource, s: SubjectData) -> dict[str, Any]:
    """One subject's FHIR R4 Bundle (a JSON-ready dict)."""
    b = _Bundle(source, s)
    a = s.aggregate
    study = source.study
    study_uid = b.add(
        _id(source.scope.study_id, "ResearchStudy"),
        {
            "resourceType": "ResearchStudy",
            "identifier": [{"system": "urn:sle:study", "value": study.code}],
            "title": study.title,
            "status": "active",
        },
    )
    demo = a.demographics
    patient: dict[str, Any] = {
        "resourceType": "Patient",
        # pseudonymous: the screening number is the only identifier; no name, no full birth date
        "identifier": [{"system": SCREENING_SYSTEM, "value": s.screening_number}],
    }
    if demo is not None:
        patient["gender"] = {"F": "female", "M": "male"}.get(str(demo.sex.value), "unknown")
        patient["birthDate"] = str(demo.birth_date.year)
    if a.died_at is not None:
        patient["deceasedDateTime"] = _when(a.died_at)
    patient_uid = b.add(_id(s.stream, "Patient"), patient)
    subject_ref = {**_ref(patient_uid), "display": s.screening_number}
    rs: dict[str, Any] = {
        "resourceType": "ResearchSubject",
        "identifier": [{"system": SCREENING_SYSTEM, "value": s.screening_number}],
        "status": RESEARCH_SUBJECT_STATUS.get(str(a.status.value), "candidate"),
        "study": _ref(study_uid),
        "individual": _ref(patient_uid),
    }
    if a.consented_at is not None:
        rs["period"] = {"start": _when(a.consented_at)}
        if a.exited_at is not None:
            rs["period"]["end"] = _when(a.exited_at)
    if a.enrolled_at is not None:
        rs["assignedArm"] = "CYCMSC"
        if a.cyc is not None:
            rs["actualArm"] = "CYCMSC"
    b.add(_id(s.stream, "ResearchSubject"), rs)
    screened = s.first("Screened")
    if screened is not None:
        b.provenance(_id(s.stream, "ResearchSubject"), screened)
    _signoffs(b, _id(s.stream, "ResearchSubject"))

    medications: dict[str, str] = {}
    for i in s.of("CyclophosphamideGiven", "MSCInfused"):
        r = i.record
        cyc = i.type == "CyclophosphamideGiven"
        uid = b.add(
            _id(i.fact.event_id, "MedicationAdministration"),
            {
                "resourceType": "MedicationAdministration",
                "status": "completed",
                "medicationCodeableConcept": {
                    "text": "cyclophosphamide" if cyc else "allogeneic bone marrow mesenchymal stem cells",
                },
                "subject": subject_ref,
                "effectivePeriod": {"start": _when(r.occurred_at), "end": _when(r.stopped_at)},
                "note": [{"text": f"lot {r.lot if cyc else r.lot_id}"}],
                "dosage": {
                    "route": {"text": "intravenous"},
                    "dose": _quantity(r.administered_mg, "mg") if cyc else _quantity(r.viable_cells, "{cells}"),
                },
            },
        )
        medications["CYC" if cyc else "MSC"] = uid
        b.provenance(uid, i)

    for i in s.of("LabResultRecorded", "DerivedResultRecorded", "TregPanelRecorded"):
        for k, obs in enumerate(_observations(i)):
            obs.update(subject=subject_ref, effectiveDateTime=_when(i.occurred_at), issued=_when(i.recorded_at))
            obs["status"] = "corrected" if a.facts[i.version].corrections else "final"
            uid = b.add(_id(i.fact.event_id, "Observation", k), obs)
            b.provenance(uid, i)

    entries = {i.version: i for i in s.of("AdverseEventReported")}
    for ae in a.adverse_events.values():
        entry = entries.get(ae.entry_version)
        if ae.voided or entry is None:
            continue
        r = entry.record
        resource: dict[str, Any] = {
            "resourceType": "AdverseEvent",
            "identifier": {"system": "urn:sle:adverse-event", "value": f"{s.screening_number}/{ae.ae_id}"},
            "actuality": "actual",
            "event": {"text": r.term},
            "subject": subject_ref,
            "date": r.onset.isoformat(),
            "recordedDate": _when(entry.recorded_at),
            "study": [_ref(study_uid)],
        }
        if ae.grade is not None:
            serious = "serious" if ae.serious else "non-serious"
            resource["seriousness"] = {"coding": [{"system": f"{AE_SYSTEM}-seriousness", "code": serious}]}
            resource["severity"] = {"text": f"CTCAE grade {ae.grade}"}
        if ae.outcome is not None:
            code = AE_OUTCOME[str(ae.outcome.value)]
            resource["outcome"] = {"coding": [{"system": f"{AE_SYSTEM}-outcome", "code": code}]}
        suspects = []
        for product, rel in (("CYC", ae.relatedness_cyc), ("MSC", ae.relatedness_msc)):
            if rel is not None and product in medications:
                suspects.append(
                    {
                        "instance": _ref(medications[product]),
                        "causality": [{"assessment": {"text": str(rel.value).replace("_", " ")}}],
                    }
                )
        if suspects:
            resource["suspectEntity"] = suspects
        uid = b.add(_id(entry.fact.event_id, "AdverseEvent"), resource)
        b.provenance(uid, entry)

    return {
        "resourceType": "Bundle",
        "id": _id(s.stream, "Bundle"),
        "type": "collection",
        "entry": [_drop_none(e) for e in b.entries],
    }


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def _coding(code: str) -> dict[str, Any]:
    analyte = labs.get_analyte(code)
    coding = [{"system": ANALYTE_SYSTEM, "code": code, "display": analyte.name}]
    if analyte.loinc:
        coding.insert(0, {"system": LOINC, "code": analyte.loinc, "display": analyte.name})
    return {"coding": coding, "text": analyte.name}


def _observation(code: str, value: Any, ucum: str, low: Any = None, high: Any = None, flag: Any = None) -> dict:
    obs: dict[str, Any] = {
        "resourceType": "Observation",
        "category": [{"coding": [{"system": OBS_CATEGORY, "code": "laboratory"}]}],
        "code": _coding(code),
    }
    if code == "ANA":
        obs["valueString"] = f"1:{int(Decimal(value))}"
    else:
        obs["valueQuantity"] = _quantity(value, ucum)
    if low is not None or high is not None:
        rng: dict[str, Any] = {}
        if low is not None:
            rng["low"] = _quantity(low, ucum)
        if high is not None:
            rng["high"] = _quantity(high, ucum)
        obs["referenceRange"] = [rng]
    if flag:
        obs["interpretation"] = [{"coding": [{"system": INTERPRETATION, "code": flag}]}]
    return obs


def _observations(i: Item) -> list[dict[str, Any]]:
    r = i.record
    if i.type == "LabResultRecorded":
        # the canonical unit: the value the domain compares with its range and flags
        return [_observation(r.code, r.canonical_value, r.canonical_unit, r.range_low, r.range_high, r.flag)]
    if i.type == "DerivedResultRecorded":
        return [] if r.value is None else [_observation(r.code, r.value, r.unit)]
    out = [_observation("TREGPCT", r.treg_pct, "%", flag=r.treg_flag)]
    if r.cd4_per_ul is not None:
        out.append(_observation("CD4", r.cd4_per_ul, "{cells}/uL", *labs.reference_range("CD4"), r.cd4_flag))
    return out


def write_fhir(source: ExportSource, out: Path, progress: Callable[[int], None] | None = None) -> list[Path]:
    """A Bundle per subject in scope, `<out>/<screening number>.json`. Returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in source.map(bundle_text, progress):
        path = out / f"{name}.json"
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def bundle_text(source: ExportSource, s: SubjectData) -> tuple[str, str]:
    """(screening number, the bundle as JSON text), run in the export's worker processes."""
    # compact: json's C encoder runs only without indent (indenting was two thirds of the export's time)
    text = json.dumps(build_bundle(source, s), sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=_json)
    return s.screening_number, text + "\n"


def _json(value: Any) -> Any:
    if isinstance(value, Decimal):
        return _number(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    raise TypeError(f"not JSON: {type(value).__name__}")


def export_fhir(
    url: str,
    out: Path,
    *,
    scope: ExportScope | None = None,
    checkpoint: ExportCheckpoint | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> list[Path]:
    """The FHIR export of the record at `url` into folder `out` (new or empty), from the events `checkpoint`
    covers (all of them without one); nothing appears under `out` if it fails."""
    with ExportSource(url, scope, upto_position=checkpoint.position if checkpoint else None) as source:
        tmp = partial(out)
        try:
            files = write_fhir(source, tmp, progress_counter(source, on_progress))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    publish(tmp, out)
    return [out / f.name for f in files]
