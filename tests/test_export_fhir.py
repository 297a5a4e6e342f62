"""FHIR R4 export, on both engines: every bundle validates with fhir.resources' R4B models (which accept R4
shapes), plus what they cannot check: LOINC codes from the lab table, UCUM units, references that resolve
inside the bundle, a pseudonymous Patient, a Provenance per resource naming its signer and ledger index."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import sqlalchemy as sa
from fhir.resources.R4B.bundle import Bundle

from projections.read import StudyReader
from sle_events.domain import labs
from sle_events.exports.fhir import ANALYTE_SYSTEM, LEDGER_SYSTEM, LOINC, UCUM, export_fhir
from sle_events.exports.manifest import latest_checkpoint
from sle_events.exports.scope import ExportScope
from sle_events.ledger.tables import ledger_leaves

import export_fixtures

demo_ledger = export_fixtures.demo_ledger
pytestmark = pytest.mark.storage
DERIVED_UNITS = {"EGFR": "mL/min/{1.73_m2}", "UPCR": "mg/mg"}


@pytest.fixture(scope="module")
def bundles(demo_ledger):
    out = demo_ledger.folder / "fhir"
    files = export_fhir(demo_ledger.url, out, scope=ExportScope(), checkpoint=latest_checkpoint(demo_ledger.url))
    return {f.stem: json.loads(f.read_text(encoding="utf-8")) for f in files}


def _resources(bundle, kind=None):
    return [e["resource"] for e in bundle["entry"] if kind is None or e["resource"]["resourceType"] == kind]


def test_a_bundle_per_subject_validates_as_fhir_r4(bundles, demo_ledger):
    with StudyReader(demo_ledger.url) as reader:
        assert sorted(bundles) == sorted(p["screening_number"] for p in reader.patients())
    for bundle in bundles.values():
        Bundle.model_validate(bundle)  # raises on any shape R4 does not allow
        kinds = Counter(r["resourceType"] for r in _resources(bundle))
        assert kinds["ResearchStudy"] == kinds["ResearchSubject"] == kinds["Patient"] == 1
    treated = [b for b in bundles.values() if _resources(b, "MedicationAdministration")]
    assert treated and all(len(_resources(b, "MedicationAdministration")) == 2 for b in treated)
    assert any(_resources(b, "AdverseEvent") for b in bundles.values())


def test_references_resolve_inside_the_bundle(bundles):
    def refs(value):
        if isinstance(value, dict):
            for k, v in value.items():
                if k == "reference":
                    yield v
                else:
                    yield from refs(v)
        elif isinstance(value, list):
            for v in value:
                yield from refs(v)

    for bundle in bundles.values():
        full = {e["fullUrl"] for e in bundle["entry"]}
        assert len(full) == len(bundle["entry"])  # no two resources share an id
        found = list(refs(bundle["entry"]))
        assert found and set(found) <= full


def test_observations_carry_the_lab_tables_loinc_and_ucum(bundles):
    seen = set()
    for bundle in bundles.values():
        for obs in _resources(bundle, "Observation"):
            codings = obs["code"]["coding"]
            ours = next(c["code"] for c in codings if c["system"] == ANALYTE_SYSTEM)
            analyte = labs.get_analyte(ours)
            loinc = [c["code"] for c in codings if c["system"] == LOINC]
            assert loinc == ([analyte.loinc] if analyte.loinc else []), ours
            assert obs["effectiveDateTime"][-6] in "+-"  # the site's offset
            if "valueQuantity" in obs:
                q = obs["valueQuantity"]
                assert q["system"] == UCUM and q["code"] == q["unit"]
                assert q["code"] in (*labs.accepted_units(ours), DERIVED_UNITS.get(ours)), (ours, q)
                for bound in obs.get("referenceRange", [{}])[0].values():
                    assert bound["code"] == q["code"]
            if "interpretation" in obs:
                assert obs["interpretation"][0]["coding"][0]["code"] in ("L", "H", "N")
            seen.add(ours)
    assert {"CREAT", "EGFR", "UPCR", "DSDNA", "C3", "C4", "TREGPCT"} <= seen


def test_patient_is_pseudonymous(bundles):
    for name, bundle in bundles.items():
        (patient,) = _resources(bundle, "Patient")
        assert "name" not in patient and "address" not in patient and "telecom" not in patient
        assert patient["identifier"] == [{"system": "urn:sle:screening-number", "value": name}]
        assert len(patient.get("birthDate", "1970")) == 4  # the year only


def test_provenance_names_the_signer_and_the_ledger_index(bundles, demo_ledger):
    engine = sa.create_engine(demo_ledger.url)
    with engine.connect() as conn:
        leaves = {
            (s, int(v)): int(i)
            for s, v, i in conn.execute(sa.select(ledger_leaves.c.stream, ledger_leaves.c.version, ledger_leaves.c.idx))
        }
    engine.dispose()
    checked = 0
    for bundle in bundles.values():
        targets: Counter[str] = Counter()
        for prov in _resources(bundle, "Provenance"):
            if not prov.get("signature"):  # one authorship Provenance per target; sign-offs come on top
                targets.update(t["reference"] for t in prov["target"])
            agent = prov["agent"][0]
            assert agent["who"]["display"] and agent["role"][0]["text"]
            event = next(e["what"]["identifier"]["value"] for e in prov["entity"] if "urn:sle:event" in str(e))
            stream, version = event.rsplit(":", 1)
            index = [
                e["what"]["identifier"]["value"]
                for e in prov["entity"]
                if e["what"]["identifier"]["system"] == LEDGER_SYSTEM
            ]
            assert index == [str(leaves[(stream, int(version))])]
            checked += 1
        described = {
            f"urn:uuid:{r['id']}"
            for r in _resources(bundle)
            if r["resourceType"] in ("Observation", "AdverseEvent", "MedicationAdministration")
        }
        assert described <= set(targets) and all(n == 1 for n in targets.values())
    assert checked
    doctors = {p["agent"][0]["who"]["display"] for b in bundles.values() for p in _resources(b, "Provenance")}
    assert "Dr. Wang Li (dr.wang)" in doctors


def test_each_sign_off_is_a_provenance_with_its_signature(bundles, demo_ledger):
    """Issue 16 (FHIR): a sign-off is a Provenance on the ResearchSubject whose `signature` carries its meaning
    (ASTM E1762 type), signer and time; an invalidated one is kept and says why."""
    from projections.casebook import signoff_rows

    with StudyReader(demo_ledger.url) as reader, reader.engine.connect() as conn:
        signoffs = signoff_rows(conn)
    assert signoffs
    for row in signoffs:
        found = [
            r
            for r in _resources(bundles[row["screening_number"]], "Provenance")
            if r.get("signature") and r["entity"][0]["what"]["identifier"]["value"] == row["signoff_id"]
        ]
        assert len(found) == 1, row["signoff_id"]
        sig = found[0]["signature"][0]
        assert sig["when"] == row["signed_at"] and sig["who"]["display"] == f"{row['printed_name']} ({row['actor']})"
        assert sig["type"][0]["system"] == "urn:iso-astm:E1762-95:2013"
        assert row["signature_def"] in found[0]["activity"]["text"]
        reason = found[0].get("reason")
        if row["status"] == "invalidated":
            assert reason and reason[0]["text"].startswith(f"invalidated by change at {row['invalidated_by']}")
        else:
            assert reason is None


def test_same_record_same_bundles(bundles, demo_ledger, tmp_path):
    again = export_fhir(demo_ledger.url, tmp_path / "again", checkpoint=latest_checkpoint(demo_ledger.url))
    assert {f.stem: json.loads(f.read_text(encoding="utf-8")) for f in again} == bundles
