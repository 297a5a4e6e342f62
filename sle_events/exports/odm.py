"""CDISC ODM 1.3.2 exports of the study record: a snapshot (current values) or a transactional archive (every
change with its audit record), built from exactly the events a signed ledger checkpoint covers.

``export_odm(url, out, *, file_type, scope, checkpoint, extensions=None, on_progress=None) -> OdmStats`` writes
the file (to ``out``; a temporary file renamed at the end, so never half-written) subject by subject: each
subject's events are read (joined with their ledger leaves, each checked against its leaf hash), turned into
ItemData and written before the next subject is read, so memory stays flat as the study grows.

Where each fact goes: ``SubjectData`` (screening number, ``SiteRef``) → ``StudyEventData`` (the visit in effect
when the fact was recorded: screening, the in-patient stay BASE/CYC/TX/DIS, a follow-up visit once it is
recorded, an unscheduled visit with its repeat key; a fact naming its visit goes there; AEs, medications,
deviations and disposition go to the Common event ``SE.LOG``) → ``FormData`` (the fact type) →
``ItemGroupData`` (``ItemGroupRepeatKey`` = the fact's stream version, so a correction lands on the record it
corrects) → ``ItemData`` (one per payload field, and ``OCCURRED_AT``).

Transactional (``Archival="Yes"``): each fact is an ``Insert`` of its items; a ``Subject.Corrected`` an
``Update`` of the items it changes; a ``Subject.Voided`` a ``Remove`` of every item of the record; every
ItemData carries one ``AuditRecord``: ``UserRef`` (the signer), ``LocationRef`` (the subject's site),
``DateTimeStamp`` (recorded_at, UTC with its offset), ``ReasonForChange`` (updates and removals) and
``SourceID`` = ``ledger:<leaf index>;event:<stream>:<version>`` (``sle ledger prove`` takes it). Within a subject
the changes are in the order they were recorded.

Extensions (the regulated acts: sign-off, SDV, queries): an ``OdmExtensions`` adds SignatureDefs to AdminData,
a ``Signature`` after the AuditRecord of the ItemData a sign-off covers, ``Annotation``s (flags, comments), and
may keep fact types out of the clinical data. Without one, ``exports/acts.py`` (``ActsOdm``) writes the
regulated acts as of the checkpoint (docs/exports.md).

``check_odm(path, vkey_checkpoint=None) -> list[Finding]``: what the XSD cannot see (every UserRef, LocationRef,
ItemOID, SignatureOID... defined; every time stamp with an offset, in order within a subject, and not after
CreationDateTime). ``read_snapshot(path)``: the values of a snapshot file, by subject, item group and item.
``parse_source_id(text)``: (leaf index, stream, version).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Literal
from uuid import UUID

import sqlalchemy as sa

from sle_events.audit.findings import Finding
from sle_events.domain.labs import ANALYTES
from sle_events.exports.manifest import ExportCheckpoint, software_version
from sle_events.exports.odm_metadata import (
    CHANGE_TYPES,
    LOG,
    LOT_TYPES,
    ODM_NS,
    UNSCHEDULED,
    CodeList,
    Form,
    Location,
    OdmMetadata,
    SignatureDef,
    User,
    Visit,
    attr,
    text,
    value_text,
)
from sle_events.exports.scope import ExportScope, study_subjects

__all__ = [
    "FileType",
    "OdmStats",
    "OdmExtensions",
    "Signature",
    "Annotation",
    "export_odm",
    "check_odm",
    "read_snapshot",
    "parse_source_id",
    "source_id",
    "OdmExportError",
]

FileType = Literal["snapshot", "transactional"]

# Facts that belong to the subject as a whole rather than to a visit.
LOG_FACTS = frozenset(
    f"Subject.{n}"
    for n in (
        "AdverseEventReported",
        "AdverseEventAssessed",
        "AdverseEventFollowedUp",
        "SeriousAdverseEventReported",
        "ExpectednessAssessed",
        "ConcomitantMedicationRecorded",
        "DeviationRecorded",
        "ContactAttempted",
        "Withdrawn",
        "LostToFollowUp",
        "Returned",
        "DeathRecorded",
        "StudyCompleted",
    )
)
# Facts that open a visit of the in-patient stay.
STAY_VISITS = {
    "Subject.Admitted": "BASE",
    "Subject.CyclophosphamideGiven": "CYC",
    "Subject.MSCInfused": "TX",
    "Subject.TransplantNotPerformed": "TX",
    "Subject.Discharged": "DIS",
    "ProductLot.ReleaseTested": "TX",
    "ProductLot.Infused": "TX",
}
_LAB_FORMS = frozenset({"Subject.LabResultRecorded", "Subject.DerivedResultRecorded"})
_SOURCE_ID = re.compile(r"ledger:(\d+)(?:;event:([0-9a-fA-F-]{36}):(\d+))?")


class OdmExportError(RuntimeError):
    """The export cannot be made from this record (an event altered since it was logged...): nothing written."""


def source_id(index: int, stream: str, version: int) -> str:
    return f"ledger:{index};event:{stream}:{version}"


def parse_source_id(text_: str) -> tuple[int, UUID | None, int | None]:
    """(leaf index, stream, version) of an ODM SourceID; ValueError if it is not one of ours."""
    m = _SOURCE_ID.fullmatch(text_.strip())
    if not m:
        raise ValueError(f"{text_!r} is not an ODM SourceID of this record (ledger:<index>;event:<stream>:<version>)")
    return int(m.group(1)), (UUID(m.group(2)) if m.group(2) else None), (int(m.group(3)) if m.group(3) else None)


@dataclass(frozen=True)
class Signature:
    user_oid: str
    location_oid: str
    signature_oid: str
    date_time: str  # ISO 8601 with offset

    def xml(self) -> str:
        return (
            f"<Signature><UserRef UserOID={attr(self.user_oid)}/><LocationRef LocationOID={attr(self.location_oid)}/>"
            f"<SignatureRef SignatureOID={attr(self.signature_oid)}/><DateTimeStamp>{text(self.date_time)}"
            "</DateTimeStamp></Signature>"
        )


@dataclass(frozen=True)
class Annotation:
    seq: int
    comment: str | None = None
    # (value, its code list OID) or (value, code list, flag type, the type's code list)
    flags: tuple[tuple[str, ...], ...] = ()

    def xml(self) -> str:
        comment = f"<Comment>{text(self.comment)}</Comment>" if self.comment else ""
        flags = []
        for flag in self.flags:
            kind = f"<FlagType CodeListOID={attr(flag[3])}>{text(flag[2])}</FlagType>" if len(flag) == 4 else ""
            flags.append(f"<Flag><FlagValue CodeListOID={attr(flag[1])}>{text(flag[0])}</FlagValue>{kind}</Flag>")
        return f'<Annotation SeqNum="{self.seq}">{comment}{"".join(flags)}</Annotation>'


class OdmExtensions:
    """Hooks for facts beyond the data (sign-off, SDV, queries, lock). The default adds nothing."""

    signature_defs: tuple[SignatureDef, ...] = ()
    codelists: tuple[CodeList, ...] = ()  # the code lists of the Flags its Annotations carry

    def skip(self, envelope: dict[str, Any]) -> bool:
        """Keep this fact out of ClinicalData (e.g. a sign-off, shown as Signatures instead)."""
        return False

    def begin_subject(self, subject_id: str, envelopes: list[dict[str, Any]], site: str = "") -> None:
        """Called with all of a subject's envelopes (in order) before its data are written."""

    def subject_signature(self, transactional: bool = False) -> tuple[Signature | None, list[Annotation]]:
        """The Signature and Annotations of SubjectData (a casebook sign-off, the lock state)."""
        return None, []

    def visit_signature(self, visit_code: str) -> tuple[Signature | None, list[Annotation]]:
        """The Signature and Annotations of a visit's StudyEventData in the snapshot (a visit sign-off)."""
        return None, []

    def snapshot_annotations(self, record_version: int) -> list[Annotation]:
        """The Annotations of a record's ItemData in the snapshot (SDV, queries)."""
        return []

    def signature(self, record_version: int, change_version: int) -> Signature | None:
        """The Signature for the ItemData of `record_version` written by `change_version`, if a sign-off covers it."""
        return None

    def annotations(self, record_version: int, change_version: int) -> list[Annotation]:
        return []


@dataclass
class OdmStats:
    file_type: str
    subjects: int = 0
    events: int = 0  # subject facts (and lot facts) read
    written_events: int = 0  # facts and changes in the file
    item_data: int = 0
    audit_records: int = 0
    bytes: int = 0
    seconds: float = 0.0
    reading_seconds: float = 0.0  # fetching, hash-checking and decoding events
    writing_seconds: float = 0.0  # building and writing XML
    cpu_seconds: float = 0.0  # CPU time of this process (a database server's is not counted)
    skipped_fields: int = 0  # payload fields the metadata has no item for (none expected)


@dataclass
class _Record:
    form: Form
    visit: tuple[str, str | None]  # StudyEventOID, repeat key
    repeat: str
    values: dict[str, tuple[str, str | None]] = field(default_factory=dict)  # item OID -> (value, unit symbol)
    touched: bool = False
    voided: bool = False
    payload: dict[str, Any] = field(default_factory=dict)
    version: int | None = None  # its version on the subject's stream (None: a lot's fact)


@dataclass
class _Event:
    index: int
    position: int
    env: dict[str, Any]


# ------------------------------------------------------------------------------------------ reading the record
def _study_context(url: str, scope: ExportScope, cp: ExportCheckpoint, ext: OdmExtensions) -> OdmMetadata:
    from sle_events.store.record import StudyRecord

    study_id = str(scope.study_id)
    record = StudyRecord(url)
    try:
        ev = record.events_table()
        with record.engine.connect() as conn:
            version = conn.execute(
                sa.select(sa.func.max(ev.c.originator_version)).where(
                    ev.c.originator_id == UUID(study_id), ev.c.id <= cp.position
                )
            ).scalar()
            added = {}
            from sle_events.domain.event_types import stored_topics

            rows = conn.execute(
                sa.select(ev.c.state).where(
                    ev.c.topic.in_(stored_topics("Study.SiteAdded")),
                    ev.c.originator_id == UUID(study_id),
                    ev.c.id <= cp.position,
                )
            ).scalars()
            for state in rows:
                env = json.loads(bytes(state))["envelope"]
                added[env["payload"]["site_id"]] = datetime.fromisoformat(env["occurred_at"]).date()
        if version is None:
            raise OdmExportError("the checkpoint does not cover the study's creation")
        study = record.get(UUID(study_id), version=int(version))
    finally:
        record.close()
    users: dict[str, User] = {}
    for entry in study.keys.values():
        u = users.setdefault(entry["actor"], User(f"U.{entry['actor']}", entry["actor"], entry.get("printed_name")))
        u.printed_name = u.printed_name or entry.get("printed_name")
        if entry["role"] not in u.roles:
            u.roles.append(entry["role"])
    locations = {
        s.site_id: Location(f"LOC.{s.site_id}", s.site_id, s.name, added.get(s.site_id, date(2000, 1, 1)))
        for s in study.sites.values()
    }
    visits = []
    for v in study.config.visits.visits:
        kind = "Unscheduled" if v.kind == "early_termination" else "Scheduled"
        visits.append(Visit(f"SE.{v.code}", v.code, _visit_name(v), kind))
    visits.append(Visit(UNSCHEDULED, "UNS", "Unscheduled visit", "Unscheduled", repeating=True))
    visits.append(Visit(LOG, "LOG", "Subject logs (adverse events, medications, deviations, disposition)", "Common"))
    return OdmMetadata(
        study_oid=f"ST.{study.code}",
        study_code=study.code,
        study_title=study.title,
        visits=visits,
        users=users,
        locations=locations,
        extra_signature_defs=ext.signature_defs,
        extra_codelists=ext.codelists,
    )


def _visit_name(v: Any) -> str:
    names = {"SCR": "Screening", "BASE": "Admission (baseline)", "CYC": "Cyclophosphamide", "TX": "AlloMSC infusion"}
    names |= {"DIS": "Discharge", "ET": "Early termination"}
    if v.code in names:
        return names[v.code]
    if v.month is not None:
        return f"Month {v.month}" + (" (long-term follow-up)" if v.epoch == "LONG-TERM FOLLOW-UP" else "")
    return str(v.code)


class _Reader:
    """Reads one subject's logged events at a time, each checked against its ledger leaf."""

    def __init__(self, conn: sa.Connection, cp: ExportCheckpoint) -> None:
        from sle_events.ledger.tables import events_table, ledger_leaves

        self.conn = conn
        self.cp = cp
        ev, lv = events_table(), ledger_leaves
        self.query = (
            sa.select(lv.c.idx, ev.c.id, ev.c.state, lv.c.leaf_hash)
            .select_from(ev.join(lv, lv.c.position == ev.c.id))
            .where(ev.c.originator_id == sa.bindparam("stream"), lv.c.idx < cp.size)
            .order_by(ev.c.originator_version)
        )
        self.lots_query = (
            sa.select(lv.c.idx, ev.c.id, ev.c.state, lv.c.leaf_hash)
            .select_from(ev.join(lv, lv.c.position == ev.c.id))
            .where(ev.c.topic.in_(_lot_topics()), lv.c.idx < cp.size)
            .order_by(ev.c.id)
        )
        self.seconds = 0.0

    def _decode(self, rows: Any) -> list[_Event]:
        out = []
        for idx, pos, state, leaf in rows:
            data = bytes(state)
            if hashlib.sha256(b"\x00" + data).digest() != bytes(leaf):
                raise OdmExportError(
                    f"the event at log position {pos} (leaf {idx}) no longer matches its ledger leaf: it was altered "
                    "after it was logged; run `sle verify` (nothing was exported)"
                )
            out.append(_Event(int(idx), int(pos), json.loads(data)["envelope"]))
        return out

    def subject(self, stream: str) -> list[_Event]:
        started = time.perf_counter()
        events = self._decode(self.conn.execute(self.query, {"stream": UUID(stream)}))
        self.seconds += time.perf_counter() - started
        return events

    def lots(self) -> dict[str, list[_Event]]:
        started = time.perf_counter()
        by_subject: dict[str, list[_Event]] = {}
        for e in self._decode(self.conn.execute(self.lots_query)):
            by_subject.setdefault(str(e.env["payload"].get("subject_id")), []).append(e)
        self.seconds += time.perf_counter() - started
        return by_subject


def _lot_topics() -> list[str]:
    from sle_events.domain.event_types import stored_topics

    return [t for n in LOT_TYPES for t in stored_topics(n)]


def _type_name(env: dict[str, Any]) -> str:
    from sle_events.domain.event_types import type_name

    return type_name(env["type"])


# ------------------------------------------------------------------------------------------------- writing
def export_odm(
    url: str,
    out: Path,
    *,
    file_type: FileType,
    scope: ExportScope,
    checkpoint: ExportCheckpoint,
    extensions: OdmExtensions | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    created_at: datetime | None = None,
) -> OdmStats:
    """Write the ODM file (module docstring). ``scope`` must be resolved (`ExportScope.resolve`)."""
    if not scope.resolved:
        raise ValueError("resolve the export scope against the record first (ExportScope.resolve)")
    if file_type not in ("snapshot", "transactional"):
        raise ValueError(f"file type {file_type!r}: snapshot or transactional")
    started, cpu = time.perf_counter(), time.process_time()
    if extensions is None:  # the regulated acts (sign-offs, locks, SDV, queries) as of the checkpoint
        from sle_events.exports.acts import ActsOdm

        extensions = ActsOdm.read(url, str(scope.study_id), checkpoint, scope.recorded_to)
    ext = extensions
    meta = _study_context(url, scope, checkpoint, ext)
    created = (created_at or datetime.now(UTC)).astimezone(UTC)
    stats = OdmStats(file_type)
    tmp = out.with_name(out.name + ".partial")
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn, open(tmp, "w", encoding="utf-8", buffering=1 << 20) as f:
            subjects = sorted(
                (s for s in study_subjects(conn, str(scope.study_id)).values() if scope.covers_subject(s.site, s.id)),
                key=lambda s: (s.site, s.screening_number),
            )
            reader = _Reader(conn, checkpoint)
            lots = reader.lots()
            f.write(_header(meta, scope, checkpoint, file_type, created))
            f.write("".join(meta.study_xml()))
            f.write("".join(meta.admin_xml()))
            f.write(f'<ClinicalData StudyOID={attr(meta.study_oid)} MetaDataVersionOID="{meta.mdv_oid}">\n')
            writer = _SubjectWriter(meta, scope, ext, file_type, stats)
            for n, subject in enumerate(subjects, 1):
                events = reader.subject(subject.id)
                lot_events = lots.get(subject.id, [])
                if lot_events:
                    events = sorted([*events, *lot_events], key=lambda e: e.position)
                stats.events += len(events)
                if events:
                    f.write(writer.subject(subject, events))
                if on_progress:
                    on_progress(n, len(subjects))
            f.write("</ClinicalData>\n</ODM>\n")
            stats.reading_seconds = reader.seconds
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        engine.dispose()
    stats.bytes = out.stat().st_size
    stats.seconds = time.perf_counter() - started
    stats.cpu_seconds = time.process_time() - cpu
    stats.writing_seconds = max(0.0, stats.seconds - stats.reading_seconds)
    return stats


def _header(meta: OdmMetadata, scope: ExportScope, cp: ExportCheckpoint, file_type: str, created: datetime) -> str:
    granularity = (
        "SingleSubject"
        if scope.subject
        else "SingleSite"
        if scope.site
        else None
        if scope.recorded_from or scope.recorded_to
        else "All"
    )
    attrs = [
        f'xmlns="{ODM_NS}"',
        'xmlns:ds="http://www.w3.org/2000/09/xmldsig#"',
        'ODMVersion="1.3.2"',
        f'FileType="{"Transactional" if file_type == "transactional" else "Snapshot"}"',
    ]
    if granularity:
        attrs.append(f'Granularity="{granularity}"')
    if file_type == "transactional":
        attrs.append('Archival="Yes"')
    stamp = created.strftime("%Y%m%dT%H%M%SZ")
    attrs += [
        f"FileOID={attr(f'ODM.{meta.study_code}.{file_type}.{cp.size}.{stamp}')}",
        f'CreationDateTime="{created.isoformat()}"',
    ]
    if scope.recorded_to is not None:
        attrs.append(f'AsOfDateTime="{scope.recorded_to.isoformat()}"')
    description = (
        f"{meta.study_code}: {scope.describe()}; built from the ledger checkpoint of {cp.size} events "
        f"({cp.origin}); its signed manifest ties this file to that checkpoint"
    )
    attrs += [
        f"Description={attr(description)}",
        'Originator="sle-events"',
        'SourceSystem="sle-events"',
        f"SourceSystemVersion={attr(software_version())}",
    ]
    return '<?xml version="1.0" encoding="UTF-8"?>\n<ODM ' + "\n     ".join(attrs) + ">\n"


class _SubjectWriter:
    def __init__(self, meta: OdmMetadata, scope: ExportScope, ext: OdmExtensions, file_type: str, stats: OdmStats):
        self.meta = meta
        self.scope = scope
        self.ext = ext
        self.transactional = file_type == "transactional"
        self.stats = stats
        self.visit_codes = {v.code: v.oid for v in meta.visits}
        self.visit_order = {v.oid: i for i, v in enumerate(meta.visits)}
        self.visit_of_oid = {v.oid: v.code for v in meta.visits}
        self.heads: dict[tuple[str, str | None], str] = {}
        self.fields: dict[str, dict[str, tuple[str, str | None]]] = {}
        self.names: dict[str, str] = {}
        self.unit_refs: dict[str | None, str] = {}

    def subject(self, subject: Any, events: list[_Event]) -> str:
        ext = self.ext
        ext.begin_subject(subject.id, [e.env for e in events], subject.site)
        site_oid = f"LOC.{subject.site}"
        records: dict[int, _Record] = {}
        signature, notes = ext.subject_signature(self.transactional)
        out: list[str] = [
            f"<SubjectData SubjectKey={attr(subject.screening_number)}>{signature.xml() if signature else ''}"
            f"<SiteRef LocationOID={attr(site_oid)}/>{''.join(a.xml() for a in notes)}\n"
        ]
        open_visit: tuple[str, str | None] | None = None
        open_form: str | None = None
        context: tuple[str, str | None] = (self.visit_codes.get("SCR", LOG), None)
        unscheduled = 0
        to = self.scope.recorded_to
        for e in events:
            env = e.env
            if to is not None and datetime.fromisoformat(env["recorded_at"]) >= to:
                break  # later facts are outside the window, and so is everything after them
            name = self.names.get(env["type"]) or self.names.setdefault(env["type"], _type_name(env))
            if ext.skip(env):
                continue
            payload = env["payload"]
            in_window = self.scope.covers_time(env["recorded_at"])
            # the visit in effect
            if name == "Subject.Screened":
                context = (self.visit_codes.get("SCR", LOG), None)
            elif name in ("Subject.VisitRecorded", "Subject.VisitMissed") and payload.get("visit") in self.visit_codes:
                context = (self.visit_codes[payload["visit"]], None)
            elif name == "Subject.UnscheduledVisitRecorded":
                unscheduled += 1
                context = (UNSCHEDULED, str(unscheduled))
            elif name in STAY_VISITS and STAY_VISITS[name] in self.visit_codes:
                context = (self.visit_codes[STAY_VISITS[name]], None)
            change: list[tuple[str, str | None, str | None]]  # (item OID, value or None for null/removal, unit)
            if name in CHANGE_TYPES:
                target = payload.get("corrected_version", payload.get("voided_version"))
                rec = records.get(target) if isinstance(target, int) else None
                if rec is None:
                    continue  # a change to a record outside the export (never expected: the same stream)
                kind = "Update" if name == "Subject.Corrected" else "Remove"
                if kind == "Update":
                    change = []
                    for fname, value in (payload.get("new_values") or {}).items():
                        oid = self._item_oid(rec.form, fname, rec.payload)
                        if oid is None:
                            continue
                        shown = None if value is None else value_text(value)
                        unit = rec.values.get(oid, ("", None))[1]
                        change.append((oid, shown, unit))
                        if shown is None:
                            rec.values.pop(oid, None)
                        else:
                            rec.values[oid] = (shown, unit)
                    rec.payload = {**rec.payload, **(payload.get("new_values") or {})}
                else:
                    change = [(oid, None, None) for oid in rec.values]
                    rec.values = {}
                    rec.voided = True
                reason = payload.get("reason") or env.get("reason")
                record_version = target
            else:
                form = self.meta.forms.get(name)
                if form is None:
                    continue  # a study event, or a fact type the metadata does not know
                if name in LOG_FACTS:
                    visit: tuple[str, str | None] = (LOG, None)
                elif payload.get("visit") in self.visit_codes:
                    visit = (self.visit_codes[payload["visit"]], None)
                else:
                    visit = context
                version = int(env["version"])
                rec = _Record(form, visit, str(version) if name not in LOT_TYPES else f"LOT{version}", payload=payload)
                rec.version = version if name not in LOT_TYPES else None
                fields = self.fields.get(name)
                if fields is None:  # each form's field -> (item, unit), once
                    fields = self.fields[name] = {f: (i.oid, i.unit) for f, i in form.items.items()}
                rec.values[fields["OCCURRED_AT"][0]] = (env["occurred_at"], None)
                lab = name in _LAB_FORMS and payload.get("code") in ANALYTES
                for fname, value in payload.items():
                    if value is None:
                        continue
                    entry = fields.get(fname)
                    if entry is None or (lab and fname in ("value", "canonical_value")):
                        if fname.startswith("originator_"):
                            continue
                        oid = self._item_oid(form, fname, payload)
                        if oid is None:
                            continue
                        entry = (oid, self._unit(form, fname, payload))
                    rec.values[entry[0]] = (value if type(value) is str else value_text(value), entry[1])
                key = version if name not in LOT_TYPES else -e.index - 1  # lot versions are another stream's
                records[key] = rec
                change = [(oid, v, u) for oid, (v, u) in rec.values.items()]
                kind, reason, record_version = "Insert", None, key
            if not in_window:
                continue
            rec.touched = True
            if not self.transactional or not change:
                continue
            # transactional: the change, in the subject's order of recording
            if open_visit != rec.visit:
                if open_form is not None:
                    out.append("</FormData>")
                if open_visit is not None:
                    out.append("</StudyEventData>\n")
                rep = f" StudyEventRepeatKey={attr(rec.visit[1])}" if rec.visit[1] else ""
                out.append(f"<StudyEventData StudyEventOID={attr(rec.visit[0])}{rep}>")
                open_visit, open_form = rec.visit, None
            if open_form != rec.form.oid:
                if open_form is not None:
                    out.append("</FormData>")
                out.append(f"<FormData FormOID={attr(rec.form.oid)}>")
                open_form = rec.form.oid
            audit = self._audit(env, site_oid, e, reason if kind != "Insert" else None)
            out.append(
                f"<ItemGroupData ItemGroupOID={attr(rec.form.group_oid)} ItemGroupRepeatKey={attr(rec.repeat)} "
                f'TransactionType="{kind}">'
            )
            signature = ext.signature(record_version, int(env["version"]))
            marks = "".join(a.xml() for a in ext.annotations(record_version, int(env["version"])))
            sig = signature.xml() if signature else ""
            for oid, value, unit in change:
                out.append(self._item_data(oid, value, unit, kind, audit + sig, marks))
            out.append("</ItemGroupData>\n")
            self.stats.written_events += 1
            self.stats.audit_records += len(change)
        if self.transactional:
            if open_form is not None:
                out.append("</FormData>")
            if open_visit is not None:
                out.append("</StudyEventData>\n")
        else:
            out.extend(self._snapshot(records))
        out.append("</SubjectData>\n")
        self.stats.subjects += 1
        return "".join(out)

    def _item_oid(self, form: Form, fname: str, payload: dict[str, Any]) -> str | None:
        if fname == "occurred_at":
            return "I." + form.oid[2:] + ".OCCURRED_AT"
        if fname not in form.items:
            self.stats.skipped_fields += 1
            return None
        return form.item_oid(fname, payload)

    def _unit(self, form: Form, fname: str, payload: dict[str, Any]) -> str | None:
        if form.type_name == "Subject.LabResultRecorded" and fname in ("value", "canonical_value"):
            return payload.get("unit") if fname == "value" else payload.get("canonical_unit")
        if form.type_name == "Subject.DerivedResultRecorded" and fname == "value":
            return payload.get("unit")
        return form.items[fname].unit if fname in form.items else None

    def _audit(self, env: dict[str, Any], site_oid: str, e: _Event, reason: str | None) -> str:
        why = f"<ReasonForChange>{text(reason)}</ReasonForChange>" if reason else ""
        return (
            f"<AuditRecord><UserRef UserOID={attr('U.' + env['actor'])}/><LocationRef LocationOID={attr(site_oid)}/>"
            f"<DateTimeStamp>{text(env['recorded_at'])}</DateTimeStamp>{why}"
            f"<SourceID>{source_id(e.index, env['stream'], int(env['version']))}</SourceID></AuditRecord>"
        )

    def _item_data(
        self, oid: str, value: str | None, unit: str | None, kind: str | None, audit: str, notes: str
    ) -> str:
        self.stats.item_data += 1
        if value is None:
            tt = f' TransactionType="{kind}"' if kind else ""
            null = ' IsNull="Yes"' if kind == "Update" else ""
            return f"<ItemData ItemOID={attr(oid)}{tt}{null}>{audit}{notes}</ItemData>"
        # The tag's start and the unit reference are the same for many items: made once each.
        head = self.heads.get((oid, kind))
        if head is None:
            tt = f' TransactionType="{kind}"' if kind else ""
            head = self.heads[(oid, kind)] = f"<ItemData ItemOID={attr(oid)}{tt} Value="
        mu = self.unit_refs.get(unit)
        if mu is None:
            unit_oid = self.meta.unit_oid(unit)
            mu = self.unit_refs[unit] = f'<MeasurementUnitRef MeasurementUnitOID="{unit_oid}"/>' if unit_oid else ""
        return f"{head}{attr(value)}>{audit}{mu}{notes}</ItemData>"

    def _snapshot(self, records: dict[int, _Record]) -> Iterator[str]:
        current = [r for r in records.values() if r.touched and not r.voided and r.values]
        current.sort(key=lambda r: (self.visit_order.get(r.visit[0], 0), int(r.visit[1] or 0), r.form.oid))
        visit: tuple[str, str | None] | None = None
        form: str | None = None
        for rec in current:
            if rec.visit != visit:
                if form is not None:
                    yield "</FormData>"
                if visit is not None:
                    yield "</StudyEventData>\n"
                rep = f" StudyEventRepeatKey={attr(rec.visit[1])}" if rec.visit[1] else ""
                signature, notes = self.ext.visit_signature(self.visit_of_oid.get(rec.visit[0], ""))
                acts = (signature.xml() if signature else "") + "".join(a.xml() for a in notes)
                yield f"<StudyEventData StudyEventOID={attr(rec.visit[0])}{rep}>{acts}"
                visit, form = rec.visit, None
            if rec.form.oid != form:
                if form is not None:
                    yield "</FormData>"
                yield f"<FormData FormOID={attr(rec.form.oid)}>"
                form = rec.form.oid
            marks = "".join(a.xml() for a in self.ext.snapshot_annotations(rec.version)) if rec.version else ""
            items = "".join(self._item_data(oid, v, u, None, "", marks) for oid, (v, u) in rec.values.items())
            yield (
                f"<ItemGroupData ItemGroupOID={attr(rec.form.group_oid)} ItemGroupRepeatKey={attr(rec.repeat)}>"
                f"{items}</ItemGroupData>\n"
            )
            self.stats.written_events += 1
        if form is not None:
            yield "</FormData>"
        if visit is not None:
            yield "</StudyEventData>\n"


# ------------------------------------------------------------------------------------------- reading back
_REF_ATTRS = {
    "UserRef": "UserOID",
    "LocationRef": "LocationOID",
    "SiteRef": "LocationOID",
    "SignatureRef": "SignatureOID",
    "MeasurementUnitRef": "MeasurementUnitOID",
    "CodeListRef": "CodeListOID",
    "FormRef": "FormOID",
    "ItemGroupRef": "ItemGroupOID",
    "ItemRef": "ItemOID",
    "StudyEventRef": "StudyEventOID",
    "StudyEventData": "StudyEventOID",
    "FormData": "FormOID",
    "ItemGroupData": "ItemGroupOID",
    "ItemData": "ItemOID",
}
_DEFINES = {
    "User": "UserOID",
    "Location": "LocationOID",
    "SignatureDef": "SignatureOID",
    "MeasurementUnit": "MeasurementUnitOID",
    "CodeList": "CodeListOID",
    "FormDef": "FormOID",
    "ItemGroupDef": "ItemGroupOID",
    "ItemDef": "ItemOID",
    "StudyEventDef": "StudyEventOID",
}
_OFFSET = re.compile(r".*T.*(Z|[+-]\d\d:\d\d)$")


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def check_odm(path: Path) -> list[Finding]:
    """Cross-references and time stamps of an ODM file (module docstring), read as a stream."""
    from lxml import etree  # type: ignore[import-untyped]  # lxml ships no type stubs

    defined: dict[str, set[str]] = {kind: set() for kind in _DEFINES.values()}
    used: list[tuple[str, str, str]] = []  # (kind, oid, where)
    findings: list[Finding] = []
    created: datetime | None = None
    subject, last, last_text = None, None, None
    for event, el in etree.iterparse(str(path), events=("start", "end")):
        tag = _local(el.tag)
        if event == "start":
            if tag == "ODM":
                created = _instant(el.get("CreationDateTime"), findings, "CreationDateTime")
            elif tag == "SubjectData":
                subject, last, last_text = el.get("SubjectKey"), None, None
            continue
        if tag in _DEFINES:
            defined[_DEFINES[tag]].add(el.get("OID") or "")
        if tag in _REF_ATTRS:
            used.append((_REF_ATTRS[tag], el.get(_REF_ATTRS[tag]) or "", subject or "metadata"))
        if tag in ("FlagValue", "FlagType"):
            used.append(("CodeListOID", el.get("CodeListOID") or "", subject or "metadata"))
        if tag == "DateTimeStamp" and el.getparent() is not None and _local(el.getparent().tag) == "Signature":
            signed = _instant(el.text, findings, f"subject {subject} (signature)")
            if signed is not None and created is not None and signed > created:
                findings.append(
                    Finding(subject, None, "odm_time_after_creation", f"signed at {el.text}, after CreationDateTime")
                )
        if tag == "DateTimeStamp" and el.getparent() is not None and _local(el.getparent().tag) == "AuditRecord":
            when = _instant(el.text, findings, f"subject {subject}")
            if when is not None:
                if last is not None and when < last:
                    findings.append(
                        Finding(subject, None, "odm_time_order", f"{el.text} comes after {last_text} in the file")
                    )
                if created is not None and when > created:
                    findings.append(
                        Finding(subject, None, "odm_time_after_creation", f"{el.text} is after CreationDateTime")
                    )
                last, last_text = when, el.text
        if tag in ("ItemData", "ItemGroupData", "FormData", "StudyEventData", "SubjectData", "MetaDataVersion"):
            el.clear(keep_tail=True)  # flat memory on large files
            while el.getprevious() is not None and tag != "MetaDataVersion":
                del el.getparent()[0]
    seen: set[tuple[str, str]] = set()
    for kind, oid, where in used:
        if oid not in defined[kind] and (kind, oid) not in seen:
            seen.add((kind, oid))
            findings.append(Finding(where, None, "odm_undefined_reference", f"{kind} {oid!r} is not defined"))
    return findings


def _instant(value: str | None, findings: list[Finding], where: str) -> datetime | None:
    if not value or not _OFFSET.match(value):
        findings.append(Finding(where, None, "odm_time_without_offset", f"{value!r} has no UTC offset"))
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def read_snapshot(path: Path) -> dict[str, dict[tuple[str, str, str], dict[str, str]]]:
    """subject key -> (study event OID, item group OID, repeat key) -> item OID -> value."""
    from lxml import etree

    out: dict[str, dict[tuple[str, str, str], dict[str, str]]] = {}
    subject: dict[tuple[str, str, str], dict[str, str]] = {}
    visit = ""
    for event, el in etree.iterparse(str(path), events=("start", "end")):
        tag = _local(el.tag)
        if event == "start":
            if tag == "SubjectData":
                subject = out.setdefault(el.get("SubjectKey"), {})
            elif tag == "StudyEventData":
                visit = el.get("StudyEventOID")
            continue
        if tag == "ItemGroupData":
            key = (visit, el.get("ItemGroupOID"), el.get("ItemGroupRepeatKey"))
            group = subject.setdefault(key, {})
            for item in el:
                if _local(item.tag) == "ItemData" and item.get("Value") is not None:
                    group[item.get("ItemOID")] = item.get("Value")
            el.clear(keep_tail=True)
    return out
