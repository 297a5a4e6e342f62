"""The regulated acts (investigator sign-off, freeze/lock/unlock, SDV, queries) as the exports show them.

Read as of the export's ledger checkpoint: the acts' signed events (``Casebook.*``, ``SourceVerification.*``,
``Query.*``, each checked against its ledger leaf) are folded here per subject; whether a sign-off still holds
is the casebook read model's (`projections/casebook.py`), counted only when the event that invalidated it is
itself covered by the checkpoint. A sign-off is never dropped: an invalidated one is shown as such.

``ActsOdm`` is the ODM writer's `OdmExtensions`: each sign-off a ``Signature`` (its SignatureDef, the signer,
the subject's site, the signing time with its offset), SDV marks, queries, invalidations and the lock state as
``Annotation``s with ``Flag``s whose code lists (``ACT_CODELISTS``) are in the MetaDataVersion.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from sle_events.domain.casebook import SIGNATURE_DEFS as SIGNOFF_MEANINGS
from sle_events.exports.manifest import ExportCheckpoint
from sle_events.exports.odm import Annotation, OdmExportError, OdmExtensions, Signature, source_id
from sle_events.exports.odm_metadata import CodeList, SignatureDef

__all__ = ["ACT_CODELISTS", "ActsOdm", "SignOff", "SubjectActs", "read_acts"]

FLAG_TYPE = "CL.ACT.FLAGTYPE"
SIGNOFF_STATUS = "CL.ACT.SIGNOFF"
SDV_STATUS = "CL.ACT.SDV"
QUERY_STATUS = "CL.ACT.QUERY"
LOCK_STATE = "CL.ACT.LOCK"
#: the Flag code lists the acts' Annotations use (FlagValue / FlagType), written into the MetaDataVersion
ACT_CODELISTS = (
    CodeList(FLAG_TYPE, "Regulated act", "text", ("SIGNOFF", "SDV", "QUERY", "LOCK")),
    CodeList(SIGNOFF_STATUS, "Sign-off status", "text", ("VALID", "INVALIDATED", "SUPERSEDED")),
    CodeList(SDV_STATUS, "Source data verification", "text", ("VERIFIED", "CHANGED_SINCE_VERIFIED")),
    CodeList(QUERY_STATUS, "Query status", "text", ("OPEN", "ANSWERED", "CLOSED")),
    CodeList(LOCK_STATE, "Casebook lock state", "text", ("FROZEN", "LOCKED")),
)
_ACT_PREFIXES = ("Casebook.", "SourceVerification.", "Query.")


@dataclass
class SignOff:
    event_id: str  # casebook stream:version
    source: str  # the ODM SourceID of the sign-off event
    position: int
    scope: str  # casebook | visit
    visit: str | None
    meaning: str
    signature_def: str
    actor: str
    printed_name: str
    signed_at: str  # with its offset, as signed
    covered: set[int]  # versions of the subject's stream
    invalidated_by: str | None = None  # ODM SourceID of the change or unlock, as of the checkpoint
    invalidated_reason: str | None = None


@dataclass
class SubjectActs:
    """One subject's acts as of the checkpoint."""

    signoffs: list[SignOff] = field(default_factory=list)
    level: str | None = None  # the stricter of the subject's and the study's: frozen | locked
    sdv: dict[int, list[tuple[str | None, int, str, str]]] = field(default_factory=dict)  # version -> marks
    queries: dict[str, dict[str, Any]] = field(default_factory=dict)  # query stream -> its state


@dataclass
class _Act:
    index: int
    position: int
    name: str
    env: dict[str, Any]


def read_acts(
    url: str, study_id: str, cp: ExportCheckpoint | None, recorded_to: datetime | None = None
) -> dict[str, SubjectActs]:
    """subject stream -> its acts, from the events the checkpoint covers (each checked against its leaf; all
    events without one) and, for an export as of ``recorded_to``, recorded before it."""
    from projections.casebook import signoff_rows
    from projections.read import StudyReader
    from sle_events.domain.event_types import EVENT_TYPES, stored_topics
    from sle_events.ledger.merkle import leaf_hash
    from sle_events.ledger.tables import events_table, ledger_leaves

    topics = [t for n in EVENT_TYPES if n.startswith(_ACT_PREFIXES) for t in stored_topics(n)]
    ev, lv = events_table(), ledger_leaves
    engine = sa.create_engine(url)
    acts: list[_Act] = []
    size = cp.size if cp is not None else None
    try:
        with engine.connect() as conn:
            ledger = sa.inspect(conn).has_table(lv.name)
            if ledger:
                q = sa.select(lv.c.idx, ev.c.id, ev.c.state, lv.c.leaf_hash).select_from(
                    ev.join(lv, lv.c.position == ev.c.id)
                )
                if size is not None:
                    q = q.where(lv.c.idx < size)
            else:  # a record without a ledger (a demo): no leaves to check against, no indexes to name
                q = sa.select(sa.literal(-1), ev.c.id, ev.c.state, sa.null())
            rows = conn.execute(q.where(ev.c.topic.in_(topics)).order_by(ev.c.id))
            from sle_events.domain.event_types import type_name

            for idx, pos, state, leaf in rows:
                data = bytes(state)
                if leaf is not None and leaf_hash(data) != bytes(leaf):
                    raise OdmExportError(
                        f"the event at log position {pos} (leaf {idx}) no longer matches its ledger leaf; run "
                        "`sle verify` (nothing was exported)"
                    )
                env = json.loads(data)["envelope"]
                if env.get("study") == study_id and _before(env["recorded_at"], recorded_to):
                    acts.append(_Act(int(idx), int(pos), type_name(env["type"]), env))
            with StudyReader(url) as reader, reader.engine.connect() as read_models:
                status = {r["signoff_id"]: r for r in signoff_rows(read_models)}
            # where each event that invalidated a sign-off lies: covered by the checkpoint or not (only those
            # events' leaves are looked up: a dict of every leaf was 200 MB at a million events)
            leaf_of: dict[str, int] = {}
            if ledger:
                signed = {f"{a.env['stream']}:{a.env['version']}" for a in acts if a.name == "Casebook.SignedOff"}
                wanted = sorted(
                    {
                        (stream, int(version))
                        for sid in signed
                        if (row := status.get(sid)) is not None and row["invalidated_by"]
                        for stream, _, version in [str(row["invalidated_by"]).rpartition(":")]
                    }
                )
                for i in range(0, len(wanted), 500):
                    lq = sa.select(lv.c.stream, lv.c.version, lv.c.idx).where(
                        sa.tuple_(lv.c.stream, lv.c.version).in_(wanted[i : i + 500])
                    )
                    if size is not None:
                        lq = lq.where(lv.c.idx < size)
                    leaf_of.update({f"{s}:{v}": int(x) for s, v, x in conn.execute(lq)})
    finally:
        engine.dispose()
    out: dict[str, SubjectActs] = {}
    study_level: str | None = None
    own: dict[str, str | None] = {}
    queries: dict[str, str] = {}  # query stream -> subject
    for a in acts:
        p, env = a.env["payload"], a.env
        if a.name == "Casebook.SignedOff":
            subject = str(p["subject_id"])
            covered: set[int] = set()
            for c in p["covers"]:
                if c.get("stream") == subject:
                    versions = c.get("versions")
                    covered |= set(versions) if versions is not None else set(range(1, c["through_version"] + 1))
            sid = f"{env['stream']}:{env['version']}"
            so = SignOff(
                sid,
                source_id(a.index, env["stream"], int(env["version"])) if a.index >= 0 else f"event:{sid}",
                a.position,
                p["scope"],
                p.get("visit"),
                p["meaning"],
                p["signature_def"],
                env["actor"],
                p["printed_name"],
                env["occurred_at"],
                covered,
            )
            row = status.get(sid)
            by = row["invalidated_by"] if row is not None else None
            # invalidated by an event the checkpoint (and the window) covers
            if (
                by is not None
                and (by in leaf_of or size is None)
                and row is not None
                and _before(row["invalidated_at"], recorded_to)
            ):
                stream, _, version = by.rpartition(":")
                so.invalidated_by = source_id(leaf_of[by], stream, int(version)) if by in leaf_of else by
                so.invalidated_reason = row["invalidated_reason"] if row is not None else None
            out.setdefault(subject, SubjectActs()).signoffs.append(so)
        elif a.name in ("Casebook.Frozen", "Casebook.Locked", "Casebook.Unlocked"):
            level = {"Casebook.Frozen": "frozen", "Casebook.Locked": "locked"}.get(a.name)
            if p.get("subject_id") is None:
                study_level = level
            else:
                own[str(p["subject_id"])] = level
        elif a.name == "SourceVerification.Verified":
            marks = out.setdefault(str(p["subject_id"]), SubjectActs()).sdv
            for item in p["items"]:
                marks.setdefault(int(item["version"]), []).append(
                    (item.get("field"), int(p["subject_version"]), p["by"], env["occurred_at"])
                )
        elif a.name.startswith("Query."):
            stream = env["stream"]
            if a.name == "Query.Raised":
                queries[stream] = str(p["subject_id"])
                out.setdefault(queries[stream], SubjectActs()).queries[stream] = {
                    "version": int(p["version"]),
                    "field": p.get("field"),
                    "text": p["text"],
                    "raised_by": p["by"],
                    "raised_at": env["occurred_at"],
                    "status": "OPEN",
                    "last": None,
                }
            elif stream in queries:
                query = out[queries[stream]].queries[stream]
                act = a.name.split(".", 1)[1].lower()
                query["status"] = {"answered": "ANSWERED", "closed": "CLOSED", "reopened": "OPEN"}[act]
                query["last"] = (act, p["by"], p["text"], env["occurred_at"])
    from sle_events.domain.casebook import stricter

    for subject in set(out) | set(own):
        out.setdefault(subject, SubjectActs()).level = stricter(own.get(subject), study_level)
    return out


def _before(recorded_at: str, limit: datetime | None) -> bool:
    return limit is None or datetime.fromisoformat(recorded_at) < limit


def _sd(oid: str, meaning: str, reason: str) -> SignatureDef:
    return SignatureDef(oid, meaning, reason)


class ActsOdm(OdmExtensions):
    """Feeds the ODM writer the acts of each subject (module docstring)."""

    signature_defs = tuple(_sd(d.oid, d.meaning, d.legal_reason) for d in SIGNOFF_MEANINGS.values())
    codelists = ACT_CODELISTS

    def __init__(self, acts: dict[str, SubjectActs]) -> None:
        self.acts = acts
        self.current = SubjectActs()
        self.site = ""
        self.subject = ""
        self.last_change: dict[int, int] = {}  # record version -> version of its last change in the file

    @classmethod
    def read(cls, url: str, study_id: str, cp: ExportCheckpoint, recorded_to: datetime | None = None) -> ActsOdm:
        return cls(read_acts(url, study_id, cp, recorded_to))

    def begin_subject(self, subject_id: str, envelopes: list[dict[str, Any]], site: str = "") -> None:
        self.current = self.acts.get(subject_id) or SubjectActs()
        self.subject = subject_id
        self.site = site
        self.last_change = {}
        for env in envelopes:
            if env.get("stream") != subject_id:
                continue
            p, v = env["payload"], int(env["version"])
            target = p.get("corrected_version", p.get("voided_version"))
            self.last_change[target if isinstance(target, int) else v] = v

    # --- signatures -------------------------------------------------------------------------------------------
    def _signature(self, so: SignOff) -> Signature:
        return Signature(f"U.{so.actor}", f"LOC.{self.site}", so.signature_def, so.signed_at)

    def _signoff_note(self, so: SignOff, seq: int, shown: bool) -> Annotation | None:
        who = f"{so.printed_name} ({so.actor}), {so.meaning} ({so.signature_def}), {so.signed_at}, {so.source}"
        what = "casebook" if so.scope == "casebook" else f"visit {so.visit}"
        if so.invalidated_by:
            why = f" ({so.invalidated_reason})" if so.invalidated_reason else ""
            return Annotation(
                seq,
                f"Sign-off of the {what} by {who} invalidated by change at {so.invalidated_by}{why}; needs re-signing",
                (("INVALIDATED", SIGNOFF_STATUS, "SIGNOFF", FLAG_TYPE),),
            )
        if not shown:  # a valid sign-off the one Signature slot does not show
            return Annotation(
                seq, f"Also signed ({what}) by {who}", (("SUPERSEDED", SIGNOFF_STATUS, "SIGNOFF", FLAG_TYPE),)
            )
        return None

    def _covering(self, version: int) -> list[SignOff]:
        return [s for s in self.current.signoffs if version in s.covered]

    @staticmethod
    def _shown(signoffs: list[SignOff]) -> SignOff | None:
        """The latest valid sign-off, else the latest (invalidated, and annotated so)."""
        valid = [s for s in signoffs if not s.invalidated_by]
        return (valid or signoffs)[-1] if signoffs else None

    def _signoff_notes(self, signoffs: list[SignOff], shown: SignOff | None, seq: int) -> list[Annotation]:
        notes: list[Annotation] = []
        for so in signoffs:
            note = self._signoff_note(so, seq + len(notes), so is shown)
            if note is not None:
                notes.append(note)
        return notes

    def signature(self, record_version: int, change_version: int) -> Signature | None:
        shown = self._shown(self._covering(change_version))
        return self._signature(shown) if shown else None

    def annotations(self, record_version: int, change_version: int) -> list[Annotation]:
        covering = self._covering(change_version)
        shown = self._shown(covering)
        # the shown Signature's own state, and the valid sign-offs it hides; every invalidated sign-off is also on
        # SubjectData and on the change that invalidated it (not repeated on each item it covered)
        notes = self._signoff_notes([s for s in covering if s is shown or not s.invalidated_by], shown, 1)
        here = f";event:{self.subject}:{change_version}"
        caused = [s for s in self.current.signoffs if s is not shown and (s.invalidated_by or "").endswith(here)]
        notes += self._signoff_notes(caused, None, len(notes) + 1)
        if self.last_change.get(record_version, change_version) == change_version:
            notes += self._record_notes(record_version, len(notes) + 1)
        return notes

    def _record_notes(self, version: int, seq: int) -> list[Annotation]:
        """SDV marks and queries of a record: on its last change in the file (or its snapshot items)."""
        notes: list[Annotation] = []
        changed = self.last_change.get(version, version)
        for fname, at_version, by, when in self.current.sdv.get(version, []):
            status = "CHANGED_SINCE_VERIFIED" if changed > at_version else "VERIFIED"
            what = f"field {fname}" if fname else "the whole record"
            notes.append(
                Annotation(
                    seq + len(notes),
                    f"Source data verified ({what}) by {by} at {when}"
                    + (" ; changed since" if status != "VERIFIED" else ""),
                    ((status, SDV_STATUS, "SDV", FLAG_TYPE),),
                )
            )
        for qid, q in self.current.queries.items():
            if q["version"] != version:
                continue
            text_ = f"Query {qid}" + (f" on {q['field']}" if q["field"] else "")
            text_ += f", raised by {q['raised_by']} at {q['raised_at']}: {q['text']}"
            if q["last"]:
                act, by, said, when = q["last"]
                text_ += f"; {act} by {by} at {when}: {said}"
            notes.append(Annotation(seq + len(notes), text_, ((q["status"], QUERY_STATUS, "QUERY", FLAG_TYPE),)))
        return notes

    # --- snapshot: the subject and its visits ---------------------------------------------------------------
    def subject_signature(self, transactional: bool = False) -> tuple[Signature | None, list[Annotation]]:
        """The casebook sign-off(s) on SubjectData, and the lock state; in the transactional file every
        invalidated sign-off (a visit's too: that file has no StudyEventData of its own per visit)."""
        signoffs = [s for s in self.current.signoffs if s.scope == "casebook"]
        shown = self._shown(signoffs)
        notes = self._signoff_notes(signoffs, shown, 1)
        if transactional:
            visits = [s for s in self.current.signoffs if s.scope != "casebook" and s.invalidated_by]
            notes += self._signoff_notes(visits, None, len(notes) + 1)
        if self.current.level:
            notes.append(
                Annotation(
                    len(notes) + 1,
                    f"Casebook {self.current.level}",
                    ((self.current.level.upper(), LOCK_STATE, "LOCK", FLAG_TYPE),),
                )
            )
        return (self._signature(shown) if shown else None), notes

    def visit_signature(self, visit_code: str) -> tuple[Signature | None, list[Annotation]]:
        signoffs = [s for s in self.current.signoffs if s.scope == "visit" and s.visit == visit_code]
        shown = self._shown(signoffs)
        return (self._signature(shown) if shown else None), self._signoff_notes(signoffs, shown, 1)

    def snapshot_annotations(self, record_version: int) -> list[Annotation]:
        return self._record_notes(record_version, 1)
