"""SDTM, FHIR and the study PDF on the demo trial: seconds against the goals (300 subjects: SDTM < 30 s,
FHIR < 30 s, study PDF < 60 s on 2 cores), and each as a ratio to the baseline every export pays in the same
run: reading every subject in scope through the verifying reader and folding it (`ExportSource.map` with a
function that does nothing else). Median of 3 alternating rounds, with the spread. Where a sealed verification
vouches for the signatures (as after `sle demo`), that read matches leaves instead of checking each Ed25519
signature; the same read checking every signature is timed beside it.

    python bench/bench_exports.py [SUBJECTS] [--db URL]     # default 300 subjects, a fresh SQLite demo

`--db` reuses a demo recorded earlier (`sle demo --subjects 300 --db ... --keys ...`, which also sets up the
ledger and seals its verification); otherwise the demo is recorded first (minutes at 300 subjects; not timed).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from bench.common import machine
from sle_events.exports.fhir import export_fhir
from sle_events.exports.manifest import latest_checkpoint
from sle_events.exports.report import export_report
from sle_events.exports.sdtm import export_sdtm
from sle_events.exports.source import ExportSource, SubjectData

GOALS = {"sdtm": 30.0, "fhir": 30.0, "report": 60.0}


def _events(source: ExportSource, s: SubjectData) -> int:
    return len(s.facts)


def baseline(url: str, upto: int, vouch: bool = True) -> int:
    """The read every export pays; `vouch` False: every signature checked again, as before a sealed
    verification could vouch for them (`audit.results.vouched_tree`)."""
    with ExportSource(url, upto_position=upto, vouch=vouch) as source:
        return sum(source.map(_events))


def seal_demo_verification(url: str, keys: Path) -> None:
    """What `sle demo` does after recording: the monitor verifies the record and seals the result."""
    from sle_events.demo import PEOPLE

    sle = str(Path(sys.executable).with_name("sle"))
    monitor = ["--sign-key", str(keys / "monitor.pem"), "--actor", PEOPLE["monitor"][0]]
    subprocess.run([sle, "verify", "--db", url, *monitor], check=True, stdout=subprocess.DEVNULL)


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("subjects", nargs="?", type=int, default=300)
    ap.add_argument("--db", default=None)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sle-bench-exports-"))
    url = args.db
    if url is None:
        from sle_events.demo import run_demo, setup_demo_ledger
        from sle_events.store.record import StudyRecord

        url = f"sqlite:///{work / 'demo.db'}"
        record = StudyRecord(url)
        try:
            run_demo(record, work / "keys", subjects=args.subjects)
        finally:
            record.close()
        setup_demo_ledger(url, work / "keys")
        seal_demo_verification(url, work / "keys")
    cp = latest_checkpoint(url)
    print(f"{machine()}; load average {os.getloadavg()[0]:.1f}; {url}; checkpoint of {cp.size} events")
    with ExportSource(url) as source:  # bring the read models up to date outside the timings
        vouched = source.vouch
    print(
        f"signatures: {vouched.describe()}"
        if vouched
        else "signatures: no sealed verification vouches for them, so every export checks each one "
        "(`sle verify --sign-key ... --actor ...` first to measure the usual case)"
    )

    runs: dict[str, list[float]] = {"baseline": [], "every_signature": [], "sdtm": [], "fhir": [], "report": []}
    events = 0
    for r in range(args.rounds):
        out = work / f"round{r}"
        out.mkdir()
        t = time.perf_counter()
        events = baseline(url, cp.position)
        runs["baseline"].append(time.perf_counter() - t)
        runs["every_signature"].append(timed(partial(baseline, url, cp.position, False)))
        runs["sdtm"].append(timed(partial(export_sdtm, url, out / "sdtm", checkpoint=cp)))
        runs["fhir"].append(timed(partial(export_fhir, url, out / "fhir", checkpoint=cp)))
        runs["report"].append(timed(partial(export_report, url, out / "study.pdf", checkpoint=cp)))
        size = (out / "study.pdf").stat().st_size
        print(
            f"round {r + 1}: baseline {runs['baseline'][-1]:.1f} s (every signature "
            f"{runs['every_signature'][-1]:.1f} s), SDTM {runs['sdtm'][-1]:.1f} s, "
            f"FHIR {runs['fhir'][-1]:.1f} s, study PDF {runs['report'][-1]:.1f} s ({size / 1e6:.1f} MB); "
            f"load {os.getloadavg()[0]:.1f}",
            flush=True,
        )
        shutil.rmtree(out)
    base = statistics.median(runs["baseline"])
    print(f"baseline (read, check, fold {events} events): median {base:.1f} s")
    every = runs["every_signature"]
    print(
        f"the same read checking every signature: median {statistics.median(every):.1f} s "
        f"({min(every):.1f}-{max(every):.1f})"
    )
    for name, goal in GOALS.items():
        times = runs[name]
        ratios = [t / b for t, b in zip(times, runs["baseline"], strict=True)]
        med = statistics.median(times)
        print(
            f"{name}: median {med:.1f} s ({min(times):.1f}-{max(times):.1f}), goal < {goal:.0f} s: "
            f"{'met' if med < goal else 'NOT met'}; {statistics.median(ratios):.2f}x the baseline "
            f"({min(ratios):.2f}-{max(ratios):.2f})"
        )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
