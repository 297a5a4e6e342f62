"""Demo throughput: a synthetic trial of N subjects (default 300) recorded through the domain verbs, the
signers and the store, in events/s, against the store's own rate for single pre-signed appends in the same run
(the demo appends one use case at a time, mostly one to a few events each)."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.bench_append import signed_rates
from bench.common import fresh, machine
from sle_events.demo import run_demo
from sle_events.store.record import StudyRecord


def run(subjects: int = 300, engines: tuple[str, ...] = ("sqlite", "postgresql")) -> list[dict[str, Any]]:
    rows = []
    for engine in engines:
        url = fresh(engine)
        record = StudyRecord(url)
        t = time.perf_counter()
        result = run_demo(record, Path(tempfile.mkdtemp(prefix="sle-demo-keys-")), subjects=subjects, seed=1)
        took = time.perf_counter() - t
        record.close()
        store_single, _, _ = signed_rates(fresh(engine), 1000, 1000)
        rows.append(
            {
                "engine": engine,
                "subjects": subjects,
                "events": result.events,
                "seconds": took,
                "rate": result.events / took,
                "store_single": store_single,
            }
        )
    return rows


def main(subjects: int | None = None) -> None:
    subjects = subjects or (int(sys.argv[1]) if len(sys.argv) > 1 else 300)
    print(f"# demo throughput — {machine()}")
    for r in run(subjects):
        print(
            f"{r['engine']:10} {r['subjects']} subjects: {r['events']:,} events in {r['seconds']:.0f} s = "
            f"{r['rate']:,.0f} events/s; the store's single signed append {r['store_single']:,.0f}/s; "
            f"ratio {r['rate'] / r['store_single']:.2f}"
        )


if __name__ == "__main__":
    main()
