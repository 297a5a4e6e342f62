"""`sle verify` throughput vs the raw Ed25519 verify rate of `cryptography` × cores used (goal ≥ 0.7)."""

from __future__ import annotations

import sys

from bench.common import CORES, SignedWorkload, ed25519_verify_rate, fresh, machine
from sle_events.audit.verifier import verify_record
from sle_events.store.record import StudyRecord


def fill(url: str, n: int) -> None:
    record = StudyRecord(url)
    work = SignedWorkload(record, subjects=200)
    for start in range(0, n, 1000):
        batch = work.sign(min(1000, n - start))
        for i in range(0, len(batch), 100):
            record.append(batch[i : i + 100])
    record.close()


def run(n: int = 60000) -> list[dict[str, float | str]]:
    v = ed25519_verify_rate()
    rows = []
    for engine in ("sqlite", "postgresql"):
        url = fresh(engine)
        fill(url, n)
        report = verify_record(url, workers=CORES)
        assert report.ok, report.findings[:3]
        got = report.events / report.seconds
        rows.append(
            {
                "engine": engine,
                "events": report.events,
                "verify_rate": got,
                "raw": v * CORES,
                "ratio": got / (v * CORES),
            }
        )
    return rows


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 60000
    print(f"# verify benchmark — {machine()}")
    for r in run(n):
        print(
            f"{r['engine']:10} {r['events']} events: sle verify {r['verify_rate']:8.0f}/s, raw Ed25519 × {CORES} cores "
            f"{r['raw']:8.0f}/s, ratio {r['ratio']:.2f} (goal ≥ 0.70)"
        )


if __name__ == "__main__":
    main()
