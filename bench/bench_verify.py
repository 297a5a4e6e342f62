"""`sle verify` throughput vs the raw Ed25519 verify rate of `cryptography` × cores used (goal ≥ 0.7)."""

from __future__ import annotations

import sys
from statistics import median

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


def run(n: int = 60000, rounds: int = 3) -> list[dict[str, float | str]]:
    """Per engine: the raw Ed25519 rate and `sle verify` measured alternately `rounds` times on one filled
    database; the ratio of each round, and their median and spread."""
    rows: list[dict[str, float | str]] = []
    for engine in ("sqlite", "postgresql"):
        url = fresh(engine)
        fill(url, n)
        ratios, rates, raws = [], [], []
        for _ in range(rounds):
            raw = ed25519_verify_rate() * CORES
            report = verify_record(url, workers=CORES)
            assert report.ok, report.findings[:3]
            rates.append(report.events / report.seconds)
            raws.append(raw)
            ratios.append(rates[-1] / raw)
        rows.append(
            {
                "engine": engine,
                "events": report.events,
                "verify_rate": median(rates),
                "raw": median(raws),
                "ratio": median(ratios),
                "spread": f"{min(ratios):.2f}–{max(ratios):.2f}",
            }
        )
    return rows


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 60000
    print(f"# verify benchmark — {machine()}")
    for r in run(n):
        print(
            f"{r['engine']:10} {r['events']} events: sle verify {r['verify_rate']:8.0f}/s, raw Ed25519 × {CORES} cores "
            f"{r['raw']:8.0f}/s, ratio {r['ratio']:.2f} (median of 3, spread {r['spread']}; goal ≥ 0.70)"
        )


if __name__ == "__main__":
    main()
