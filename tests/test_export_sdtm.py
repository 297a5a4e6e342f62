"""SDTM export, on both engines: every dataset read back with pyreadstat and pandas.read_sas matches the CSV
and the projections; the XPT v5 limits are checked before anything is written, each refusal named."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from collections import Counter
from decimal import Decimal
from pathlib import Path

import pandas as pd
import pyreadstat
import pytest

from projections.read import StudyReader
from sle_events.exports.manifest import latest_checkpoint
from sle_events.exports.scope import ExportScope, ExportScopeError
from sle_events.exports.sdtm import (
    DATASETS,
    SdtmProblem,
    SdtmRefused,
    build_datasets,
    cdisc_unit,
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
    assert sorted(f.name for f in files) == sorted(
        f"{name.lower()}.{ext}" for name in DATASETS for ext in ("xpt", "csv")
    )
    return out


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="ascii") as fh:
        return list(csv.DictReader(fh))


def test_every_dataset_reads_back_with_pyreadstat_and_pandas_as_the_csv(sdtm_out):
    for name, (label, variables) in DATASETS.items():
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
