"""SDTM export, on both engines: every dataset read back with pyreadstat and pandas.read_sas matches the CSV
and the projections; the XPT v5 limits are checked before anything is written, each refusal named."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from collections import Counter
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import UUID

import pandas as pd
import pyreadstat
import pytest

from projections.read import StudyReader
from projections.replay import fold, read_stream, replay
from sle_events.domain.product import ProductLot
from sle_events.exports.manifest import latest_checkpoint
from sle_events.exports.scope import ExportScope, ExportScopeError
from sle_events.exports.sdtm import (
    DATASETS,
    QUALIFIERS,
    SUPP_DATASETS,
    SdtmProblem,
    SdtmRefused,
    build_datasets,
    cdisc_unit,
    check_datasets,
    export_sdtm,
    write_datasets,
)
from sle_events.exports.source import ExportSource

import export_fixtures

demo_ledger = export_fixtures.demo_ledger
pytestmark = pytest.mark.storage
SLE = str(Path(sys.executable).with_name("sle"))


def sle(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, COLUMNS="200", NO_COLOR="1")
    return subprocess.run([SLE, *args], capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def sdtm_out(demo_ledger):
    out = demo_ledger.folder / "sdtm"
    files = export_sdtm(demo_ledger.url, out, scope=ExportScope(), checkpoint=latest_checkpoint(demo_ledger.url))
    # the demo has an AE, both infusions and the biopsies: every SUPP-- dataset has rows, so all are written
    assert sorted(f.name for f in files) == sorted(
        f"{name.lower()}.{ext}" for name in DATASETS | SUPP_DATASETS for ext in ("xpt", "csv")
    )
    return out


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="ascii") as fh:
        return list(csv.DictReader(fh))


def test_every_dataset_reads_back_with_pyreadstat_and_pandas_as_the_csv(sdtm_out):
    for name, (label, variables) in (DATASETS | SUPP_DATASETS).items():
        xpt = sdtm_out / f"{name.lower()}.xpt"
        frame, meta = pyreadstat.read_xport(str(xpt))
        by_pandas = pd.read_sas(str(xpt), format="xport", encoding="ascii")
        rows = _csv(sdtm_out / f"{name.lower()}.csv")
        assert list(frame.columns) == [v[0] for v in variables] == list(by_pandas.columns)
        assert meta.column_labels == [v[1] for v in variables]  # never cut: each fits in 40
        assert meta.table_name == name and meta.file_label == label
        assert len(frame) == len(by_pandas) == len(rows), name
        for (_, xrow), crow in zip(frame.iterrows(), rows, strict=True):
            for var, _, kind in variables:
                if kind == "N":
                    expected = float(crow[var]) if crow[var] != "" else None
                    got = xrow[var]
                    assert (expected is None and pd.isna(got)) or got == pytest.approx(expected), (name, var)
                else:
                    assert xrow[var] == crow[var], (name, var)


def test_dm_holds_every_subject_and_every_domain_only_dm_subjects_with_unique_seq(sdtm_out, demo_ledger):
    with StudyReader(demo_ledger.url) as reader:
        patients = reader.patients()
        study = reader.record.study(patients[0]["study"])
    dm = _csv(sdtm_out / "dm.csv")
    assert sorted(r["USUBJID"] for r in dm) == sorted(f"{study.code}-{p['screening_number']}" for p in patients)
    failed = [r for r in dm if r["ARMNRS"] == "SCREEN FAILURE"]
    assert failed and all(r["ARMCD"] == "" for r in failed)
    treated = [r for r in dm if r["ACTARMCD"] == "CYCMSC"]
    assert treated and all(r["RFSTDTC"] and r["RFXENDTC"] for r in treated)
    subjects = {r["USUBJID"] for r in dm}
    for name in DATASETS:
        if name in ("DM", "SV"):
            continue
        rows = _csv(sdtm_out / f"{name.lower()}.csv")
        assert {r["USUBJID"] for r in rows} <= subjects
        seqs = Counter((r["USUBJID"], r[f"{name}SEQ"]) for r in rows)
        assert all(n == 1 for n in seqs.values()), name
    for name in SUPP_DATASETS:
        assert {r["USUBJID"] for r in _csv(sdtm_out / f"{name.lower()}.csv")} <= subjects, name


def test_lb_results_and_standard_units_match_patient_state(sdtm_out, demo_ledger):
    """The latest anti-dsDNA, C3, C4 and eGFR in LB are patient state's (key_labs), in CDISC unit spellings."""
    lb = _csv(sdtm_out / "lb.csv")
    testcd = {"DSDNA": "DSDNAAB", "C3": "C3", "C4": "C4", "EGFR": "EGFR", "TREGPCT": "TREG"}
    with StudyReader(demo_ledger.url) as reader:
        patients = [p for p in reader.patients() if p["key_labs"]]
        code = reader.record.study(patients[0]["study"]).code
    assert patients
    for p in patients:
        usubjid = f"{code}-{p['screening_number']}"
        for lab, latest in p["key_labs"].items():
            if lab not in testcd:
                continue
            rows = [r for r in lb if r["USUBJID"] == usubjid and r["LBTESTCD"] == testcd[lab]]
            # at the same time, the later-recorded result (a re-derived eGFR) has the higher --SEQ (its version)
            last = max(rows, key=lambda r: (r["LBDTC"], int(r["LBSEQ"])))
            assert float(last["LBSTRESN"]) == pytest.approx(float(Decimal(latest["value"])))
            assert last["LBSTRESU"] == cdisc_unit(latest["unit"])
            assert last["LBDTC"] == latest["at"][:16]  # site-local wall time, no offset
    units = {r["LBSTRESU"] for r in lb}
    assert "mL/min/1.73m2" in units and "IU/mL" in units and not any("{" in u or "[" in u for u in units)
    assert {r["LBDRVFL"] for r in lb if r["LBTESTCD"] in ("EGFR", "PROTCRT")} == {"Y"}
    treg = [r for r in lb if r["LBTESTCD"] == "TREG"]
    assert treg and all(r["LBSTRESU"] == "%" and r["LBMETHOD"] == "FLOW CYTOMETRY" for r in treg)


def test_ae_ex_qs_sv_follow_the_record(sdtm_out, demo_ledger):
    with StudyReader(demo_ledger.url) as reader:
        by_grade = reader.dashboard()["adverse_events_by_grade"]
    ae = _csv(sdtm_out / "ae.csv")
    assert len(ae) == sum(r["events"] for r in by_grade)
    assert sum(r["AESER"] == "Y" for r in ae) == sum(r["serious"] for r in by_grade)
    ex = _csv(sdtm_out / "ex.csv")
    treatments = Counter(r["EXTRT"] for r in ex)
    assert treatments["CYCLOPHOSPHAMIDE"] == treatments["ALLOGENEIC BONE MARROW MESENCHYMAL STEM CELLS"] >= 1
    assert {r["EXDOSU"] for r in ex} == {"mg/m2", "10^6 cells/kg"}
    qs = _csv(sdtm_out / "qs.csv")
    totals = [r for r in qs if r["QSTESTCD"] == "SLED2KTS"]
    assert totals and all(r["QSCAT"] == "SLEDAI-2K" for r in qs)
    for t in totals[:5]:  # the total is the sum of the descriptor scores of the same assessment
        seq = int(t["QSSEQ"]) // 100
        items = [r for r in qs if r["USUBJID"] == t["USUBJID"] and int(r["QSSEQ"]) // 100 == seq and r is not t]
        assert len(items) == 24 and sum(float(r["QSSTRESN"]) for r in items) == float(t["QSSTRESN"])
    sv = _csv(sdtm_out / "sv.csv")
    assert {"SCREENING", "MONTH 1"} <= {r["VISIT"] for r in sv}


def _supp(sdtm_out: Path, name: str) -> dict[tuple[str, str], dict[str, dict[str, str]]]:
    """A SUPP-- dataset read back from the XPT with pyreadstat (checked against pandas.read_sas): (USUBJID,
    IDVARVAL) → QNAM → row."""
    xpt = str(sdtm_out / f"{name.lower()}.xpt")
    frame, _ = pyreadstat.read_xport(xpt)
    assert frame.equals(pd.read_sas(xpt, format="xport", encoding="ascii").fillna(""))
    out: dict[tuple[str, str], dict[str, dict[str, str]]] = {}
    for _, r in frame.iterrows():
        row = {k: str(v) for k, v in r.items()}
        assert row["QNAM"] not in out.setdefault((row["USUBJID"], row["IDVARVAL"]), {}), row  # one value per QNAM
        out[(row["USUBJID"], row["IDVARVAL"])][row["QNAM"]] = row
    return out


def _wall(when: datetime | None) -> datetime | None:
    """Site-local wall time to the second, as SDTM --DTC hold it."""
    return None if when is None else when.replace(tzinfo=None, microsecond=0)


def test_every_supp_row_points_at_a_parent_row_of_its_subject(sdtm_out):
    for name, (label, _) in SUPP_DATASETS.items():
        rdomain = name[4:]
        assert label == f"Supplemental Qualifiers for {rdomain}"
        parents = {(r["USUBJID"], r[f"{rdomain}SEQ"]) for r in _csv(sdtm_out / f"{rdomain.lower()}.csv")}
        frame, _ = pyreadstat.read_xport(str(sdtm_out / f"{name.lower()}.xpt"))
        assert len(frame) > 0, name
        for _, r in frame.iterrows():
            assert r["RDOMAIN"] == rdomain and r["IDVAR"] == f"{rdomain}SEQ", name
            assert (r["USUBJID"], r["IDVARVAL"]) in parents, (name, r["USUBJID"], r["IDVARVAL"])
            assert r["QNAM"] in QUALIFIERS[rdomain] and len(r["QNAM"]) <= 8
            assert r["QLABEL"] == QUALIFIERS[rdomain][r["QNAM"]][0] and len(r["QLABEL"]) <= 40
            assert r["QVAL"] != "" and r["QORIG"] in ("CRF", "DERIVED", "ASSIGNED")


def test_suppae_holds_each_ae_s_per_product_assessments_from_the_folded_aggregate(sdtm_out, demo_ledger):
    ae = _csv(sdtm_out / "ae.csv")
    supp = _supp(sdtm_out, "SUPPAE")
    seen: Counter[str] = Counter()
    with StudyReader(demo_ledger.url) as reader:
        code = reader.record.study(reader.patients()[0]["study"]).code
        for p in reader.patients():
            usubjid = f"{code}-{p['screening_number']}"
            states = replay(reader.record, str(p["subject"])).adverse_events
            rows = [r for r in ae if r["USUBJID"] == usubjid]
            assert sorted(r["AESPID"] for r in rows) == sorted(k for k, a in states.items() if not a.voided)
            for row in rows:
                a = states[row["AESPID"]]
                q = supp.get((usubjid, row["AESEQ"]), {})
                expected = {
                    "AERELCYC": a.relatedness_cyc and a.relatedness_cyc.value.replace("_", " ").upper(),
                    "AERELMSC": a.relatedness_msc and a.relatedness_msc.value.replace("_", " ").upper(),
                    "AEEXPCYC": a.expectedness_cyc and a.expectedness_cyc.value.upper(),
                    "AEEXPMSC": a.expectedness_msc and a.expectedness_msc.value.upper(),
                }
                assert {k: v["QVAL"] for k, v in q.items() if k in expected} == {k: v for k, v in expected.items() if v}
                assert _wall(a.aware_at) == (datetime.fromisoformat(q["AEAWRDTC"]["QVAL"]) if a.aware_at else None)
                assert _wall(a.reported_at) == (
                    datetime.fromisoformat(q["AERPTDTC"]["QVAL"]) if a.reported_at else None
                )
                assert ("AEAWRDTC" in q) == (a.aware_at is not None) and ("AERPTDTC" in q) == (
                    a.reported_at is not None
                )
                for qnam, r in q.items():
                    assert r["QEVAL"] == {"AEREL": "INVESTIGATOR", "AEEXP": "SPONSOR"}.get(qnam[:5], ""), qnam
                seen.update(q.keys())
    # the demo has a non-serious AE and an SAE reported to the sponsor and assessed for expectedness
    assert seen["AERELCYC"] == seen["AERELMSC"] == len(ae) >= 2
    assert seen["AEEXPCYC"] == seen["AEEXPMSC"] == seen["AEAWRDTC"] == seen["AERPTDTC"] >= 1
    assert seen["AEAWRDTC"] == sum(r["AESER"] == "Y" for r in ae)
    assert "AESI" not in seen  # the record has no AE-of-special-interest flag: not exported


def test_suppex_holds_the_cyc_dosing_and_the_infused_lot_s_release(sdtm_out, demo_ledger):
    ex = _csv(sdtm_out / "ex.csv")
    supp = _supp(sdtm_out, "SUPPEX")
    checked = Counter[str]()
    with StudyReader(demo_ledger.url) as reader:
        code = reader.record.study(reader.patients()[0]["study"]).code
        for p in reader.patients():
            usubjid = f"{code}-{p['screening_number']}"
            subject = replay(reader.record, str(p["subject"]))
            for row in (r for r in ex if r["USUBJID"] == usubjid):
                q = {k: v["QVAL"] for k, v in supp[(usubjid, row["EXSEQ"])].items()}
                if row["EXTRT"] == "CYCLOPHOSPHAMIDE":
                    assert set(q) == {"BSA", "CYCCALC"}
                    assert Decimal(q["BSA"]) == subject.cyc.bsa_m2 and q["BSA"] == row_bsa(sdtm_out, usubjid)
                    assert Decimal(q["CYCCALC"]) == subject.cyc.calculated_mg
                else:
                    # the lot's own stream, read and folded by the projections (not by the export's reader)
                    lot_events: list[Any] = read_stream(
                        reader.record, ProductLot.id_for(UUID(str(p["study"])), row["EXLOT"])
                    )
                    lot = fold(lot_events)
                    assert lot.lot_id == subject.msc.lot_id == row["EXLOT"] and lot.subject_id == subject.id
                    assert q == {
                        "MSCDONOR": lot.donor_id,
                        "MSCHLA": lot.hla_match,
                        "MSCVIAB": str(lot.viability_pct),
                        "MSCVCNT": str(subject.msc.viable_cells),
                    }
                    assert Decimal(q["MSCVCNT"]) == lot.viable_cells  # what the lot held is what was infused
                checked[row["EXTRT"]] += 1
    assert checked["CYCLOPHOSPHAMIDE"] == checked["ALLOGENEIC BONE MARROW MESENCHYMAL STEM CELLS"] == len(ex) // 2 >= 1
    origins = {r["QNAM"]: r["QORIG"] for rows in supp.values() for r in rows.values()}
    assert origins == {
        "BSA": "DERIVED",
        "CYCCALC": "DERIVED",
        "MSCDONOR": "CRF",
        "MSCHLA": "CRF",
        "MSCVIAB": "CRF",
        "MSCVCNT": "DERIVED",
    }


def row_bsa(sdtm_out: Path, usubjid: str) -> str:
    """The derived BSA in VS (the same value SUPPEX gives the cyclophosphamide row)."""
    (bsa,) = [r for r in _csv(sdtm_out / "vs.csv") if r["USUBJID"] == usubjid and r["VSTESTCD"] == "BSA"]
    return bsa["VSORRES"]


def test_suppmh_holds_the_isn_rps_class_of_the_kidney_biopsy(sdtm_out, demo_ledger):
    mh = _csv(sdtm_out / "mh.csv")
    supp = _supp(sdtm_out, "SUPPMH")
    with StudyReader(demo_ledger.url) as reader:
        patients = reader.patients()
        code = reader.record.study(patients[0]["study"]).code
        for p in patients:
            usubjid = f"{code}-{p['screening_number']}"
            klass, done = replay(reader.record, str(p["subject"])).biopsy
            (row,) = [r for r in mh if r["USUBJID"] == usubjid and r["MHTERM"] == "Lupus nephritis (kidney biopsy)"]
            assert row["MHCAT"] == "SLE HISTORY" and date.fromisoformat(row["MHSTDTC"]) == done
            assert {k: v["QVAL"] for k, v in supp[(usubjid, row["MHSEQ"])].items()} == {"ISNRPS": klass.value}
    # the other MH rows (medical history items) carry no class: SUPPMH points at the biopsy rows only
    assert len(supp) == len(patients) < len(mh)


def test_a_supp_dataset_without_rows_is_not_written(sdtm_out, demo_ledger, tmp_path):
    """A screen failure has no AE and no exposure: SUPPAE and SUPPEX are not written, SUPPMH (its biopsy) is."""
    failed = next(r for r in _csv(sdtm_out / "dm.csv") if r["ARMNRS"] == "SCREEN FAILURE")
    number = failed["USUBJID"].removeprefix(f"{failed['STUDYID']}-")
    out = tmp_path / "failed"
    files = {f.name for f in export_sdtm(demo_ledger.url, out, scope=ExportScope(subject=number))}
    assert files == {f"{n.lower()}.{ext}" for n in [*DATASETS, "SUPPMH"] for ext in ("xpt", "csv")}
    assert not (out / "suppae.xpt").exists() and not (out / "suppex.csv").exists()
    assert _csv(out / "ae.csv") == [] and _csv(out / "ex.csv") == []  # the parents, written though empty
    assert [r["USUBJID"] for r in _csv(out / "suppmh.csv")] == [failed["USUBJID"]]


def test_a_subject_scope_holds_that_subject_only(demo_ledger, tmp_path):
    out = tmp_path / "one"
    export_sdtm(demo_ledger.url, out, scope=ExportScope(subject="NJ01-0002"))
    assert {r["USUBJID"].rsplit("-", 2)[-2:] == ["NJ01", "0002"] for r in _csv(out / "lb.csv")} == {True}
    assert len(_csv(out / "dm.csv")) == 1


def _datasets(url: str):
    with ExportSource(url) as source:
        return build_datasets(source)


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda d: d["AE"].rows[0].update(AETERM="fièvre"), "AE.AETERM"),
        (lambda d: d["CM"].rows[0].update(CMTRT="x" * 201), "CM.CMTRT"),
        (lambda d: d["LB"].variables.append(("LBTOOLONGNAME", "x", "C")), "LB.LBTOOLONGNAME"),
        (lambda d: d["LB"].variables.__setitem__(0, ("STUDYID", "S" * 41, "C")), "LB.STUDYID"),
        (lambda d: d["LB"].rows[1].update(LBSEQ=d["LB"].rows[0]["LBSEQ"], USUBJID=d["LB"].rows[0]["USUBJID"]), "LBSEQ"),
        (lambda d: d["VS"].rows[0].update(USUBJID="SOMEONE-ELSE"), "not in DM"),
        (lambda d: d["DS"].rows[0].update(DSSTDTC="13/01/2007"), "ISO 8601"),
        (lambda d: d["SUPPAE"].rows[0].update(IDVARVAL="999999"), "SUPPAE.IDVARVAL"),
        (lambda d: d["SUPPEX"].rows[0].update(IDVARVAL=str(int(d["EX"].rows[0]["EXSEQ"]) + 1)), "dangling parent"),
        (lambda d: d["SUPPAE"].rows[0].update(USUBJID=_without_ae(d)), "SUPPAE.IDVARVAL"),
        (lambda d: d["SUPPAE"].rows[0].update(IDVAR="AESPID"), "SUPPAE.IDVAR"),
        (lambda d: d["SUPPEX"].rows[0].update(QNAM="MSCDONORX"), "SUPPEX.QNAM"),
        (lambda d: d["SUPPAE"].rows[0].update(QNAM="aerelcyc"), "SUPPAE.QNAM"),
        (lambda d: d["SUPPMH"].rows[0].update(QLABEL="I" * 41), "SUPPMH.QLABEL"),
        (lambda d: d["SUPPAE"].rows[0].update(QVAL=None), "SUPPAE.QVAL"),
        (lambda d: d["SUPPAE"].rows.append(dict(d["SUPPAE"].rows[0])), "given twice"),
        (lambda d: d.pop("AE"), "parent domain AE"),
    ],
)
def test_what_xpt_v5_cannot_hold_is_refused_and_nothing_written(demo_ledger, tmp_path, breakage, message):
    datasets = _datasets(demo_ledger.url)
    breakage(datasets)
    out = tmp_path / "sdtm"
    with pytest.raises(SdtmRefused) as e:
        write_datasets(datasets, out)
    assert message in str(e.value) and "nothing written" in str(e.value)
    assert not out.exists()


def _without_ae(d):
    """A subject in DM with no AE row (the demo's screen failure): a SUPPAE row moved there has no parent."""
    with_ae = {r["USUBJID"] for r in d["AE"].rows}
    return next(r["USUBJID"] for r in d["DM"].rows if r["USUBJID"] not in with_ae)


def test_the_built_datasets_pass_the_checks_with_every_supp_dataset_filled(demo_ledger):
    """The control for the refusals above: unbroken, nothing is found."""
    datasets = _datasets(demo_ledger.url)
    assert check_datasets(datasets) == []
    assert all(datasets[name].rows for name in SUPP_DATASETS)


def test_a_unit_without_a_cdisc_spelling_is_refused():
    assert cdisc_unit("10*3/uL") == "10^9/L" and cdisc_unit("g/(24.h)") == "g/day"
    with pytest.raises(SdtmProblem, match="furlong"):
        cdisc_unit("mg/[furlong]")


def test_a_scope_naming_nothing_is_refused_before_anything_is_written(demo_ledger, tmp_path):
    with pytest.raises(ExportScopeError, match="unknown subject"):
        export_sdtm(demo_ledger.url, tmp_path / "x", scope=ExportScope(subject="NJ99-9999"))
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()


@pytest.mark.parametrize(
    ("command", "args"),
    [
        ("sdtm", ["--subject", "NJ99-9999"]),
        ("sdtm", ["--site", "XX99"]),
        ("sdtm", ["--from", "2010-01-01T00:00:00+00:00", "--to", "2009-01-01T00:00:00+00:00"]),
        ("fhir", ["--from", "2010-01-01"]),
        ("fhir", ["--subject", "NJ99-9999"]),
        ("report", ["--from", "2010-01-01T00:00:00+00:00", "--to", "2009-01-01T00:00:00+00:00"]),
        ("report", ["--subject", "NJ01-0002", "--audit-trail", "everything"]),
    ],
)
def test_cli_bad_scope_is_exit_2_and_nothing_written(demo_ledger, tmp_path, command, args):
    out = tmp_path / ("out.pdf" if command == "report" else "out")
    r = sle(
        "export",
        command,
        "--db",
        demo_ledger.url,
        "--key",
        str(demo_ledger.keys / "data_manager.pem"),
        "--out",
        str(out),
        *args,
    )
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.strip()
    assert list(tmp_path.iterdir()) == []


def test_cli_sdtm_writes_a_manifest_that_verifies(demo_ledger, tmp_path):
    out = tmp_path / "sdtm"
    r = sle(
        "export",
        "sdtm",
        "--db",
        demo_ledger.url,
        "--key",
        str(demo_ledger.keys / "data_manager.pem"),
        "--out",
        str(out),
        "--site",
        "NJ01",
    )
    assert r.returncode == 0, r.stderr
    assert (out / "export.manifest.json").exists() and (out / "lb.xpt").exists()
    v = sle("export", "verify", str(out), "--vkey", demo_ledger.vkey, "--db", demo_ledger.url)
    assert v.returncode == 0, v.stdout + v.stderr


def test_worker_processes_give_the_same_datasets(demo_ledger, monkeypatch):
    """A large scope is read on worker processes (`ExportSource.map`): the same rows, in the same order."""
    import sle_events.exports.source as source_module

    with ExportSource(demo_ledger.url, workers=1) as source:
        alone = build_datasets(source)
    monkeypatch.setattr(source_module, "PARALLEL_FROM", 1)
    monkeypatch.setattr(source_module, "CHUNK", 1)
    steps: list[int] = []
    with ExportSource(demo_ledger.url, workers=2) as source:
        pooled = build_datasets(source, steps.append)
        assert sum(steps) == len(source) and len(steps) == len(source)
    assert {k: d.rows for k, d in pooled.items()} == {k: d.rows for k, d in alone.items()}


def test_worker_processes_check_and_write_the_same_files(demo_ledger, monkeypatch, tmp_path):
    """A large study's datasets are checked and written on worker processes: the same files in the same order (the
    CSVs byte for byte), and a refusal there still writes nothing."""
    import sle_events.exports.sdtm as sdtm_module

    datasets = _datasets(demo_ledger.url)
    alone = write_datasets(datasets, tmp_path / "alone")
    monkeypatch.setattr(sdtm_module, "PARALLEL_WRITE_ROWS", 0)
    monkeypatch.setattr(sdtm_module.os, "cpu_count", lambda: 2)
    pooled = write_datasets(datasets, tmp_path / "pooled")
    assert [p.name for p in pooled] == [p.name for p in alone] and len(alone) >= 2 * len(datasets) - 2
    for a, b in zip(alone, pooled, strict=True):
        if a.suffix == ".csv":
            assert a.read_bytes() == b.read_bytes(), a.name
        else:  # an XPT header carries the time it was written: compare what it holds
            (frame_a, meta_a), (frame_b, meta_b) = pyreadstat.read_xport(str(a)), pyreadstat.read_xport(str(b))
            assert frame_a.equals(frame_b) and meta_a.column_names_to_labels == meta_b.column_names_to_labels
    datasets["LB"].rows[0]["LBORRESU"] = "µmol/L"
    with pytest.raises(SdtmRefused, match=r"LB\.LBORRESU"):
        write_datasets(datasets, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
