"""The PDF report, on both engines: pages rendered with poppler's pdftoppm show the lab-trend plots; the text
holds the verification result, the checkpoint, the key registry, each subject's timeline and audit trail; the
same data give the same bytes."""

from __future__ import annotations

import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from projections.read import StudyReader
from sle_events.exports.manifest import latest_checkpoint
from sle_events.exports.report import export_report

import export_fixtures

demo_ledger = export_fixtures.demo_ledger
pytestmark = [
    pytest.mark.storage,
    pytest.mark.skipif(shutil.which("pdftoppm") is None, reason="poppler-utils (pdftoppm) is not installed"),
]


@pytest.fixture(scope="module")
def reports(demo_ledger):
    cp = latest_checkpoint(demo_ledger.url)
    study = export_report(demo_ledger.url, demo_ledger.folder / "study.pdf", checkpoint=cp)
    from sle_events.exports.scope import ExportScope

    one = export_report(
        demo_ledger.url, demo_ledger.folder / "subject.pdf", scope=ExportScope(subject="NJ01-0002"), checkpoint=cp
    )
    return study, one


def _text(pdf: Path) -> str:
    return subprocess.run(["pdftotext", "-layout", str(pdf), "-"], capture_output=True, text=True, check=True).stdout


def _pages_with_plots(pdf: Path, folder: Path) -> list[int]:
    folder.mkdir(exist_ok=True)
    subprocess.run(["pdftoppm", "-r", "50", "-png", str(pdf), str(folder / "page")], check=True, timeout=300)
    found = []
    for page, png in enumerate(sorted(folder.glob("page-*.png")), start=1):
        colours: list[Any] = Image.open(png).convert("RGB").getcolors(1 << 20) or []
        # anti-aliasing blends thin lines with white: classify by hue, not by exact colour
        blue = sum(k for k, (r, g, b) in colours if b > r + 80 and b > g + 30)
        red = sum(k for k, (r, g, b) in colours if r > 150 and r - g > 60 and r - b > 60 and b >= 30)
        near = {name for name, k in (("blue", blue), ("red", red)) if k >= 10}
        if near == {"blue", "red"}:  # plotted results and the transplant marker
            found.append(page)
    return found


def _images(pdf: Path) -> int:
    listing = subprocess.run(["pdfimages", "-list", str(pdf)], capture_output=True, text=True, check=True).stdout
    return len([line for line in listing.splitlines()[2:] if line.split()[2:3] == ["image"]])  # not masks


def test_the_study_report_shows_each_subjects_plots(reports, demo_ledger, tmp_path):
    study, _ = reports
    with StudyReader(demo_ledger.url) as reader:
        patients = reader.patients()
    assert _images(study) == len(patients)  # one figure of five plots per subject
    transplanted = [p for p in patients if p["tx_date"]]
    assert len(_pages_with_plots(study, tmp_path / "study")) >= len(transplanted) >= 1


def test_the_study_report_text(reports, demo_ledger):
    text = _text(reports[0])
    for heading in (
        "Verification",
        "Ledger checkpoint",
        "Key registry",
        "Study summary",
        "Visit compliance",
        "Adverse events by CTCAE grade",
        "Renal response",
        "Timeline",
        "Audit trail",
    ):
        assert heading in text, heading
    assert "sle.local/" in text  # the checkpoint note's origin line
    assert "Dr. Wang Li" in text and "dr.wang" in text and "investigator" in text
    with StudyReader(demo_ledger.url) as reader:
        for p in reader.patients():
            assert f"Subject {p['screening_number']}" in text
        corrections = reader.audit_trail(change="corrected")
    assert corrections and corrections[0]["reason"] in text  # why
    assert "AlloMSC infusion" in text and "cyclophosphamide" in text


def test_the_report_shows_sign_off_lock_sdv_and_queries(reports, demo_ledger):
    """Issue 16: per subject the sign-offs (by whom, meaning, when; an invalidated one kept and marked as needing
    re-signing), the lock state, SDV progress and the open queries; the study summary counts them."""
    from projections.casebook import casebook_rows, signoff_rows

    text = " ".join(_text(reports[0]).split())
    assert "Sign-off, lock, SDV and queries" in text and "source facts verified" in text
    with StudyReader(demo_ledger.url) as reader, reader.engine.connect() as conn:
        signoffs = signoff_rows(conn)
        states = casebook_rows(conn)
    invalidated = [s for s in signoffs if s["status"] == "invalidated"]
    assert invalidated
    assert text.count("INVALIDATED by change - needs re-signing") == len(invalidated)
    for s in invalidated:
        assert "invalidated by change at ledger:" in text and s["invalidated_reason"] in text
    for s in signoffs:
        assert f"{s['meaning']} ({s['signature_def']})" in text
    levels = Counter(r["level"] or "open" for r in states)
    for level, n in levels.items():
        assert f"casebook {level} {n}" in text, level
    one = " ".join(_text(reports[1]).split())
    assert "Sign-off, lock, source data verification and queries" in one and "Casebook: " in one
    assert "SDV: " in one and " source facts verified (" in one


def test_the_subject_report_holds_its_whole_audit_trail(reports):
    text = _text(reports[1])
    assert "Subject NJ01-0002" in text and "Subject NJ01-0001" not in text
    assert "Study summary" not in text
    assert "LabResultRecorded" in text and "corrected:" in text and "verified at append" in text
    assert _images(reports[1]) == 1


def test_same_data_same_bytes(reports, demo_ledger, tmp_path):
    again = export_report(demo_ledger.url, tmp_path / "again.pdf", checkpoint=latest_checkpoint(demo_ledger.url))
    assert again.read_bytes() == reports[0].read_bytes()


def test_cli_report_with_its_manifest(demo_ledger, tmp_path):
    import os
    import sys

    sle = str(Path(sys.executable).with_name("sle"))
    out = tmp_path / "r.pdf"
    env = dict(os.environ, COLUMNS="200", NO_COLOR="1")
    key = str(demo_ledger.keys / "data_manager.pem")
    r = subprocess.run(
        [sle, "export", "report", "--db", demo_ledger.url, "--key", key, "--out", str(out), "--subject", "NJ01-0002"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    v = subprocess.run(
        [sle, "export", "verify", str(out), "--vkey", demo_ledger.vkey],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert v.returncode == 0, v.stdout + v.stderr
    bad = subprocess.run(
        [sle, "export", "report", "--db", demo_ledger.url, "--key", key, "--out", str(tmp_path / "r.txt")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert bad.returncode == 2 and ".pdf" in bad.stderr and not (tmp_path / "r.txt").exists()


def test_a_panel_empty_for_one_subject_draws_the_next_ones_results():
    """The figure is reused: a panel left empty (fixed limits) must scale to the next subject's data again."""
    import io

    from sle_events.exports.report import _Plotter

    plotter = _Plotter()
    try:
        plotter.png({}, [], "days")
        png = plotter.png({"TREGPCT": [(30.0, 4.0), (90.0, 7.0)]}, [(0.0, "TX")], "days")
    finally:
        plotter.close()
    image = Image.open(io.BytesIO(png)).convert("RGB")
    w, h = image.size
    treg_panel = image.crop((w * 4 // 5, 0, w, h))
    colours: list[Any] = treg_panel.getcolors(1 << 20) or []
    assert sum(k for k, (r, g, b) in colours if b > r + 80 and b > g + 30) >= 10


def test_each_plotted_series_runs_in_time_order(demo_ledger):
    """Results are plotted by day whatever order they were recorded in (a re-derived eGFR is recorded after later
    results): a line drawn in recording order would double back across the panel."""
    from sle_events.exports.report import _series
    from sle_events.exports.source import ExportSource

    out_of_order = 0
    with ExportSource(demo_ledger.url, workers=1) as source:
        for s in source.subjects():
            series, _, _ = _series(s)
            for points in series.values():
                days = [day for day, _ in points]
                assert days == sorted(days)
            recorded = [(i.record.code, i.occurred_at) for i in s.of("LabResultRecorded", "DerivedResultRecorded")]
            for code in {c for c, _ in recorded}:
                times = [t for c, t in recorded if c == code]
                out_of_order += times != sorted(times)
    assert out_of_order  # the demo does record some results after later ones: the sort is exercised
