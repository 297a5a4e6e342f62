"""ODM 1.3.2 exports of the 30-subject demo, on both engines: valid against the official XSD, cross-references and
time stamps that the XSD cannot see, the round trip (every value-bearing fact in the transactional file with its
audit record; the snapshot gives the patient-state projection's values), scopes, the signed manifest and
`sle ledger prove` with an ODM SourceID."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
import sqlalchemy as sa
from lxml import etree  # type: ignore[import-untyped]  # lxml ships no type stubs

from projections.read import StudyReader
from sle_events.domain.event_types import type_name
from sle_events.exports.manifest import latest_checkpoint
from sle_events.exports.odm import (
    OdmExportError,
    OdmExtensions,
    Signature,
    check_odm,
    export_odm,
    parse_source_id,
    read_snapshot,
)
from sle_events.exports.scope import ExportScope
from sle_events.signing.envelope import open_sealed

import export_fixtures

pytestmark = pytest.mark.storage
SCHEMA_DIR = Path(__file__).parent / "fixtures" / "odm1-3-2"
SCHEMA_SHA256 = {
    "ODM1-3-2.xsd": "ebc22b9eceb41db5e2af500182e3a5dfa20c8ec4aea711ddf22c978a62643fc5",
    "ODM1-3-2-foundation.xsd": "1d457ea3dd421202a28d249da0e6741b109fcf1e5772842bcc728fecf6ac1a3f",
    "xml.xsd": "258ac9c0f078fc9692735140f2d21541e8bf16941bed42833c1a5f965b52c6dc",
    "xmldsig-core-schema.xsd": "111a972ccb9916cb95df9af4b6c1775307292463639de69d6fe63516bb2d850e",
}
ODM = "{http://www.cdisc.org/ns/odm/v1.3}"
SLE = str(Path(sys.executable).with_name("sle"))


def sle(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, COLUMNS="200", NO_COLOR="1")
    return subprocess.run([SLE, *args], capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def demo30(request, tmp_path_factory):
    yield from export_fixtures.make_demo_ledger(request.param, tmp_path_factory.mktemp("odm"), "odm", 30)


@pytest.fixture(scope="module")
def exported(demo30):
    """Both files of the whole study, written once per engine."""
    scope = ExportScope().resolve(demo30.url)
    cp = latest_checkpoint(demo30.url)
    files = {}
    for kind in ("transactional", "snapshot"):
        out = demo30.folder / f"{kind}.xml"
        files[kind] = (out, export_odm(demo30.url, out, file_type=kind, scope=scope, checkpoint=cp))
    return files


def schema() -> etree.XMLSchema:
    parser = etree.XMLParser(no_network=True)
    return etree.XMLSchema(etree.parse(str(SCHEMA_DIR / "ODM1-3-2.xsd"), parser))


def test_the_schema_files_are_the_cdisc_ones():
    for name, digest in SCHEMA_SHA256.items():
        assert hashlib.sha256((SCHEMA_DIR / name).read_bytes()).hexdigest() == digest, name
        assert digest in (SCHEMA_DIR / "README.md").read_text()


def test_both_files_are_valid_odm_1_3_2_with_every_reference_defined(exported):
    xsd = schema()
    for kind, (path, stats) in exported.items():
        doc = etree.parse(str(path))
        assert xsd.validate(doc), (kind, [str(e) for e in list(xsd.error_log)[:5]])
        assert check_odm(path) == [], kind
        root = doc.getroot()
        assert root.get("ODMVersion") == "1.3.2" and root.get("Granularity") == "All"
        assert root.get("FileType") == kind.capitalize()
        assert (root.get("Archival") == "Yes") == (kind == "transactional")
        assert stats.subjects >= 30 and stats.item_data > 0
    doc = etree.parse(str(exported["snapshot"][0]))
    mdv = doc.find(f"{ODM}Study/{ODM}MetaDataVersion")
    visits = [a.get("Name") for a in mdv.iterfind(f"{ODM}StudyEventDef/{ODM}Alias")]
    assert visits[:5] == ["SCR", "BASE", "CYC", "TX", "DIS"] and "M1" in visits and "M24" in visits
    creat = mdv.find(f"{ODM}ItemDef[@OID='I.LB.CREAT.STD']")
    assert creat.get("DataType") == "float" and creat.find(f"{ODM}Alias").attrib == {
        "Context": "LOINC",
        "Name": "2160-0",
    }
    assert creat.find(f"{ODM}MeasurementUnitRef") is not None
    grades = mdv.find(f"{ODM}CodeList[@OID='CL.CTCAEGRADE']")
    assert [i.get("CodedValue") for i in grades] == ["1", "2", "3", "4", "5"]
    admin = doc.find(f"{ODM}AdminData")
    users = {u.findtext(f"{ODM}LoginName"): u for u in admin.iterfind(f"{ODM}User")}
    assert users["dr.wang"].findtext(f"{ODM}FullName") == "Dr. Wang Li"
    assert users["dr.wang"].get("UserType") == "Investigator"
    assert "investigator" in users["dr.wang"].findtext(f"{ODM}DisplayName")
    assert [loc.get("OID") for loc in admin.iterfind(f"{ODM}Location")] == ["LOC.NJ01"]
    assert admin.find(f"{ODM}SignatureDef[@OID='SD.INVESTIGATOR-SIGNOFF']/{ODM}LegalReason") is not None


def _logged_facts(url: str, size: int) -> dict[tuple[str, int], tuple[int, dict]]:
    """(stream, version) -> (leaf index, envelope) of every subject and lot fact the checkpoint covers."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "select l.idx, e.state from study_events e join ledger_leaves l on l.position = e.id "
                    "where l.idx < :size order by l.idx"
                ),
                {"size": size},
            ).all()
    finally:
        engine.dispose()
    out = {}
    for idx, state in rows:
        env = open_sealed(bytes(state)).envelope
        # the regulated acts are Signatures and Annotations, not ItemData (test_the_regulated_acts_are_in_both_files)
        if not type_name(env["type"]).startswith(("Study.", "Casebook.", "SourceVerification.", "Query.")):
            out[(env["stream"], env["version"])] = (idx, env)
    return out


def test_every_value_bearing_fact_is_in_the_transactional_file_with_its_audit_record(demo30, exported):
    path, stats = exported["transactional"]
    cp = latest_checkpoint(demo30.url)
    facts = _logged_facts(demo30.url, cp.size)
    seen: dict[tuple[str, int], set[str]] = {}
    last_stamp: dict[str, datetime] = {}
    for _, el in etree.iterparse(str(path), tag=f"{ODM}ItemData"):
        audits = el.findall(f"{ODM}AuditRecord")
        assert len(audits) == 1, etree.tostring(el)[:300]
        audit = audits[0]
        index, stream, version = parse_source_id(audit.findtext(f"{ODM}SourceID"))
        assert version is not None
        idx, env = facts[(str(stream), version)]
        assert idx == index
        kind = el.get("TransactionType")
        seen.setdefault((str(stream), version), set()).add(kind)
        assert audit.find(f"{ODM}UserRef").get("UserOID") == f"U.{env['actor']}"
        assert audit.findtext(f"{ODM}DateTimeStamp") == env["recorded_at"]
        name = type_name(env["type"])
        if kind == "Insert":
            assert audit.find(f"{ODM}ReasonForChange") is None
        else:
            assert name == {"Update": "Subject.Corrected", "Remove": "Subject.Voided"}[kind]
            assert audit.findtext(f"{ODM}ReasonForChange") == env["payload"]["reason"]
        group = el.getparent()
        subject = group.getparent().getparent().getparent().get("SubjectKey")
        when = datetime.fromisoformat(env["recorded_at"])
        assert when >= last_stamp.get(subject, when)
        last_stamp[subject] = when
    assert set(seen) == set(facts), "every logged subject and lot fact appears"
    kinds = Counter(k for ks in seen.values() for k in ks)
    assert kinds["Update"] > 0 and kinds["Insert"] > 100
    assert stats.written_events == len(facts)


def _points(groups: dict, subject: str) -> dict:
    """The snapshot's values in the shape of the patient-state projection's columns."""
    by_form: dict[str, list[tuple[int, dict]]] = {}
    for (_, ig, rep), items in groups.items():
        if not rep.startswith("LOT"):
            by_form.setdefault(ig[3:], []).append((int(rep), items))
    for records in by_form.values():
        records.sort(key=lambda r: r[0])

    def latest(form: str, item: str):
        records = by_form.get(form, [])
        return records[-1][1].get(f"I.{form}.{item}") if records else None

    series: dict[str, list[tuple[datetime, str]]] = {}
    for _, items in by_form.get("LabResultRecorded", []):
        code = items["I.LabResultRecorded.code"]
        series.setdefault(code, []).append(
            (datetime.fromisoformat(items["I.LabResultRecorded.OCCURRED_AT"]), items[f"I.LB.{code}.STD"])
        )
    for _, items in by_form.get("DerivedResultRecorded", []):
        code = items["I.DerivedResultRecorded.code"]
        if f"I.LB.{code}" in items:
            series.setdefault(code, []).append(
                (datetime.fromisoformat(items["I.DerivedResultRecorded.OCCURRED_AT"]), items[f"I.LB.{code}"])
            )
    for _, items in by_form.get("TregPanelRecorded", []):
        series.setdefault("TREGPCT", []).append(
            (datetime.fromisoformat(items["I.TregPanelRecorded.OCCURRED_AT"]), items["I.TregPanelRecorded.treg_pct"])
        )
    labs = {code: sorted(points, key=lambda p: p[0])[-1][1] for code, points in series.items()}
    return {
        "sledai_total": latest("SledaiAssessed", "total"),
        "renal_response": latest("RenalResponseAssessed", "status"),
        "cyc_administered_mg": latest("CyclophosphamideGiven", "administered_mg"),
        "msc_lot": latest("MSCInfused", "lot_id"),
        "msc_dose_1e6_per_kg": latest("MSCInfused", "dose_1e6_per_kg"),
        "consent_version": latest("ConsentObtained", "icf_version"),
        "labs": labs,
    }


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    try:
        return Decimal(str(a)) == Decimal(str(b))
    except ArithmeticError:
        return str(a) == str(b)


def test_the_snapshot_reads_back_as_the_patient_state_projection(demo30, exported):
    snapshot = read_snapshot(exported["snapshot"][0])
    with StudyReader(demo30.url) as reader:
        patients = {p["screening_number"]: p for p in reader.patients()}
    assert set(snapshot) == set(patients)
    compared = 0
    for number, groups in snapshot.items():
        got, want = _points(groups, number), patients[number]
        for column in ("sledai_total", "renal_response", "cyc_administered_mg", "msc_lot", "msc_dose_1e6_per_kg"):
            assert _same(got[column], want[column]), (number, column, got[column], want[column])
        assert got["consent_version"] == want["consent_version"], number
        key_labs = want["key_labs"] if isinstance(want["key_labs"], dict) else json.loads(want["key_labs"])
        for code, lab in key_labs.items():
            assert _same(got["labs"].get(code), lab["value"]), (number, code)
            compared += 1
    assert compared > 100


def test_a_subject_scope_and_a_window(demo30, tmp_path):
    cp = latest_checkpoint(demo30.url)
    scope = ExportScope(subject="NJ01-0002").resolve(demo30.url)
    out = tmp_path / "one.xml"
    stats = export_odm(demo30.url, out, file_type="transactional", scope=scope, checkpoint=cp)
    doc = etree.parse(str(out))
    assert doc.getroot().get("Granularity") == "SingleSubject"
    assert [s.get("SubjectKey") for s in doc.iter(f"{ODM}SubjectData")] == ["NJ01-0002"]
    assert stats.subjects == 1 and schema().validate(doc)
    window = ExportScope(
        recorded_from=datetime(2008, 1, 1, tzinfo=UTC), recorded_to=datetime(2008, 7, 1, tzinfo=UTC)
    ).resolve(demo30.url)
    out = tmp_path / "window.xml"
    export_odm(demo30.url, out, file_type="transactional", scope=window, checkpoint=cp)
    stamps = [datetime.fromisoformat(d.text) for d in etree.parse(str(out)).iter(f"{ODM}DateTimeStamp")]
    lo, hi = datetime(2008, 1, 1, tzinfo=UTC), datetime(2008, 7, 1, tzinfo=UTC)
    assert stamps and all(lo <= s < hi for s in stamps)
    assert check_odm(out) == [] and schema().validate(etree.parse(str(out)))


class _SignOff(OdmExtensions):
    """A stand-in for the coming sign-off facts: the investigator signs every lab result."""

    def signature(self, record_version, change_version):
        return Signature("U.dr.wang", "LOC.NJ01", "SD.INVESTIGATOR-SIGNOFF", "2011-01-01T00:00:00+08:00")


class _BadSignOff(OdmExtensions):
    def signature(self, record_version, change_version):
        return Signature("U.dr.wang", "LOC.NJ01", "SD.UNDEFINED", "2011-01-01T00:00:00+08:00")


def test_signatures_from_an_extension_follow_the_audit_record(demo30, tmp_path):
    cp = latest_checkpoint(demo30.url)
    scope = ExportScope(subject="NJ01-0002").resolve(demo30.url)
    out = tmp_path / "signed.xml"
    export_odm(demo30.url, out, file_type="transactional", scope=scope, checkpoint=cp, extensions=_SignOff())
    doc = etree.parse(str(out))
    assert schema().validate(doc), list(schema().error_log)[:3]
    item = next(doc.iter(f"{ODM}ItemData"))
    assert [etree.QName(c).localname for c in item][:2] == ["AuditRecord", "Signature"]
    assert check_odm(out) == []
    export_odm(demo30.url, out, file_type="transactional", scope=scope, checkpoint=cp, extensions=_BadSignOff())
    assert [f.kind for f in check_odm(out)] == ["odm_undefined_reference"]


def test_cli_export_verify_and_prove_a_source_id(demo30, tmp_path):
    out = tmp_path / "cli.xml"
    key = str(demo30.keys / "data_manager.pem")
    done = sle("export", "odm", "--type", "transactional", "--db", demo30.url, "--key", key, "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert out.exists() and (tmp_path / "cli.xml.manifest.json").exists()
    ok = sle("export", "verify", str(out), "--vkey", demo30.vkey, "--db", demo30.url)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    source = next(etree.parse(str(out)).iter(f"{ODM}SourceID")).text
    proof = tmp_path / "value.proof"
    assert sle("ledger", "prove", source, "--db", demo30.url, "--out", str(proof)).returncode == 0
    checked = sle("ledger", "verify-proof", str(proof), "--vkey", demo30.vkey)
    assert checked.returncode == 0 and "OK: leaf" in checked.stdout
    index, stream, version = parse_source_id(source)
    wrong = f"ledger:{index + 1};event:{stream}:{version}"
    refused = sle("ledger", "prove", wrong, "--db", demo30.url, "--out", str(tmp_path / "x.proof"))
    assert refused.returncode == 1 and "not built from this log" in refused.stderr
    # refusals: nothing written
    for args, why in (
        (["--site", "XX99"], "unknown site"),
        (["--subject", "NJ01-9999"], "unknown subject"),
        (["--from", "2009-01-01T00:00:00+00:00", "--to", "2008-01-01T00:00:00+00:00"], "reversed"),
        (["--from", "2009-01-01"], "offset"),
    ):
        bad = tmp_path / "bad.xml"
        done = sle("export", "odm", "--type", "snapshot", "--db", demo30.url, "--key", key, "--out", str(bad), *args)
        assert done.returncode == 2 and why in done.stderr, done.stderr
        assert not bad.exists() and not (tmp_path / "bad.xml.manifest.json").exists()
    done = sle("export", "odm", "--type", "full", "--db", demo30.url, "--key", key, "--out", str(tmp_path / "b.xml"))
    assert done.returncode == 2 and "snapshot or transactional" in done.stderr


def _annotations(el, codelist: str) -> list:
    """The Annotations directly under `el` with a Flag of `codelist`: (comment, flag value)."""
    out = []
    for a in el.findall(f"{ODM}Annotation"):
        for v in a.iter(f"{ODM}FlagValue"):
            if v.get("CodeListOID") == codelist:
                out.append((a.findtext(f"{ODM}Comment"), v.text))
    return out


def test_the_regulated_acts_are_in_both_files(demo30, exported):
    """Issue 16: each sign-off a Signature (its SignatureDef, signer, site, time with offset), an invalidated one
    kept and flagged "invalidated by change at <SourceID>", SDV marks, queries and the lock as flagged
    Annotations whose code lists are defined; the files stay valid (the test above)."""
    from projections.casebook import casebook_rows, signoff_rows
    from projections.review import queries

    with StudyReader(demo30.url) as reader, reader.engine.connect() as conn:
        signoffs = signoff_rows(conn)
        states = {r["screening_number"]: r for r in casebook_rows(conn)}
        query_rows = queries(conn)
    assert signoffs and any(s["status"] == "invalidated" for s in signoffs), "the demo signs and invalidates"
    by_subject: dict[str, list] = {}
    for s in signoffs:
        by_subject.setdefault(s["screening_number"], []).append(s)

    snap = etree.parse(str(exported["snapshot"][0]))
    mdv = snap.find(f"{ODM}Study/{ODM}MetaDataVersion")
    for cl in ("CL.ACT.FLAGTYPE", "CL.ACT.SIGNOFF", "CL.ACT.SDV", "CL.ACT.QUERY", "CL.ACT.LOCK"):
        assert mdv.find(f"{ODM}CodeList[@OID='{cl}']") is not None, cl
    admin = snap.find(f"{ODM}AdminData")
    for oid in ("SD.INV.REVIEW", "SD.INV.APPROVE", "SD.INV.RESP"):
        assert admin.find(f"{ODM}SignatureDef[@OID='{oid}']") is not None, oid
    subjects = {s.get("SubjectKey"): s for s in snap.iter(f"{ODM}SubjectData")}
    for number, rows in by_subject.items():
        subject = subjects[number]
        casebook = [r for r in rows if r["scope"] == "casebook"]
        if casebook:
            shown = ([r for r in casebook if r["status"] == "valid"] or casebook)[-1]
            sig = subject.find(f"{ODM}Signature")
            assert sig is not None, number
            assert sig.find(f"{ODM}SignatureRef").get("SignatureOID") == shown["signature_def"]
            assert sig.find(f"{ODM}UserRef").get("UserOID") == f"U.{shown['actor']}"
            assert sig.find(f"{ODM}LocationRef").get("LocationOID") == f"LOC.{shown['site']}"
            assert sig.findtext(f"{ODM}DateTimeStamp") == shown["signed_at"]
            # never dropped: every invalidated casebook sign-off is an Annotation saying so
            flagged = [c for c, v in _annotations(subject, "CL.ACT.SIGNOFF") if v == "INVALIDATED"]
            assert len(flagged) == sum(1 for r in casebook if r["status"] == "invalidated"), number
            assert all("invalidated by change at ledger:" in c and "needs re-signing" in c for c in flagged)
        for r in rows:
            if r["scope"] == "visit":
                visit = next(
                    v for v in subject.iter(f"{ODM}StudyEventData") if v.get("StudyEventOID") == f"SE.{r['visit']}"
                )
                assert visit.find(f"{ODM}Signature/{ODM}SignatureRef").get("SignatureOID") == r["signature_def"]
        level = states[number]["level"]
        if level:
            assert [v for _, v in _annotations(subject, "CL.ACT.LOCK")] == [level.upper()]
    locked = [n for n, r in states.items() if r["level"] == "locked"]
    assert locked, "the demo locks a subject"
    flags = Counter(
        (v.get("CodeListOID"), v.text) for item in snap.iter(f"{ODM}ItemData") for v in item.iter(f"{ODM}FlagValue")
    )
    assert flags[("CL.ACT.SDV", "VERIFIED")] > 0
    statuses = {q["status"] for q in query_rows}
    assert statuses >= {"OPEN", "ANSWERED", "CLOSED"}
    for status in statuses:
        assert flags[("CL.ACT.QUERY", status)] > 0, status

    # transactional: the Signature follows the AuditRecord of each covered change; invalidations annotated
    trans = etree.parse(str(exported["transactional"][0]))
    signed = [i for i in trans.iter(f"{ODM}ItemData") if i.find(f"{ODM}Signature") is not None]
    assert signed
    for item in signed[:50]:
        assert [etree.QName(c).localname for c in item][:2] == ["AuditRecord", "Signature"]
    used = {i.find(f"{ODM}Signature/{ODM}SignatureRef").get("SignatureOID") for i in signed}
    assert used == {r["signature_def"] for r in signoffs}
    texts = [a.findtext(f"{ODM}Comment") or "" for a in trans.iter(f"{ODM}Annotation")]
    invalidated = [s for s in signoffs if s["status"] == "invalidated"]
    for s in invalidated:
        assert any(f"({s['actor']}), {s['meaning']} ({s['signature_def']}), {s['signed_at']}" in t for t in texts)
    cited = [t.split("invalidated by change at ", 1)[1].split(" ", 1)[0] for t in texts if "by change at" in t]
    assert cited and all(parse_source_id(c)[1] is not None for c in cited)  # `sle ledger prove` takes it
    at_change = [
        i
        for i in trans.iter(f"{ODM}ItemData")
        if any(
            f"invalidated by change at {i.findtext(f'{ODM}AuditRecord/{ODM}SourceID')} "
            in (n.findtext(f"{ODM}Comment") or "")
            for n in i.findall(f"{ODM}Annotation")
        )
    ]
    assert at_change  # the correction that invalidated a sign-off says so, on its own ItemData


def test_a_window_before_the_acts_shows_none_of_them(demo30, tmp_path):
    cp = latest_checkpoint(demo30.url)
    scope = ExportScope(recorded_to=datetime(2008, 7, 1, tzinfo=UTC)).resolve(demo30.url)
    out = tmp_path / "early.xml"
    export_odm(demo30.url, out, file_type="snapshot", scope=scope, checkpoint=cp)
    doc = etree.parse(str(out))
    assert doc.find(f".//{ODM}Signature") is None and doc.find(f".//{ODM}Annotation") is None
    assert schema().validate(doc) and check_odm(out) == []


def test_sle_audit_trail_shows_every_kind_of_regulated_act(demo30):
    """Issue 16: the acts are in the audit trail too (who, when, what), read with `sle audit-trail`."""
    done = sle("audit-trail", "--format", "json", "--db", demo30.url)
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    kinds = Counter(r["event_type"] for r in rows)
    for name in (
        "Casebook.SignedOff",
        "Casebook.Frozen",
        "Casebook.Locked",
        "Casebook.Unlocked",
        "SourceVerification.Verified",
        "Query.Raised",
        "Query.Answered",
        "Query.Closed",
        "Query.Reopened",
    ):
        assert kinds[name] > 0, name
    signed = next(r for r in rows if r["event_type"] == "Casebook.SignedOff")
    assert signed["subject"] and signed["actor"] and signed["recorded_at"]


def test_an_event_altered_after_it_was_logged_stops_the_export(demo30, tmp_path):
    """Last in this module: it alters the record."""
    cp = latest_checkpoint(demo30.url)
    scope = ExportScope().resolve(demo30.url)
    engine = sa.create_engine(demo30.url)
    with engine.begin() as conn:
        pos, state = conn.execute(
            sa.text("select id, state from study_events where topic = 'Subject.LabResultRecorded' order by id limit 1")
        ).one()
        altered = bytes(state).replace(b'"value":"', b'"value":"9', 1)
        conn.execute(sa.text("update study_events set state = :s where id = :i"), {"s": altered, "i": pos})
    engine.dispose()
    out = tmp_path / "altered.xml"
    with pytest.raises(OdmExportError, match=f"log position {pos}"):
        export_odm(demo30.url, out, file_type="snapshot", scope=scope, checkpoint=cp)
    assert not out.exists() and not list(tmp_path.iterdir())
