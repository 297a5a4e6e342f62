"""`sle verify --since CHECKPOINT` with N new events on top of a large record vs a full `sle verify`, same run.

The auditor verified the record up to a checkpoint they saved; later they check the consistency from it to
now, the new events in full (signatures, keys, roles, chains) and re-hash every earlier event against its ledger
leaf. The full verify re-checks every signature. Both run alternately on the same database (median of `rounds`
rounds, with the spread); goal ≥ 5× faster.

    python -m bench.bench_verify_since [BASE_EVENTS] [NEW_EVENTS] [ROUNDS] [ENGINE]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from statistics import median

from bench.common import CORES, SignedWorkload, fresh, machine
from sle_events.audit.verifier import verify_record
from sle_events.ledger.log import Ledger, create_log_key
from sle_events.store.record import StudyRecord


def fill(work: SignedWorkload, record: StudyRecord, n: int) -> None:
    for start in range(0, n, 1000):
        batch = work.sign(min(1000, n - start))
        for i in range(0, len(batch), 100):
            record.append(batch[i : i + 100])


def run(base: int, new: int, rounds: int, engine: str) -> dict[str, float]:
    url = fresh(engine)
    record = StudyRecord(url)
    work = SignedWorkload(record, subjects=200)
    t = time.perf_counter()
    fill(work, record, base)
    key = create_log_key(Path(tempfile.mkdtemp(prefix="sle-bench-")) / "log.key", "sle.local/BENCH")
    ledger = Ledger(url)
    ledger.integrate()
    saved = ledger.checkpoint(key).note  # what the auditor keeps
    fill(work, record, new)
    ledger.integrate()
    ledger.checkpoint(key)
    ledger.close()
    record.close()
    built = time.perf_counter() - t
    full_s, since_s = [], []
    for _ in range(rounds):  # alternate, same database
        t = time.perf_counter()
        full = verify_record(url, workers=CORES, vkey=key.vkey)
        full_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        since = verify_record(url, workers=CORES, vkey=key.vkey, since=saved)
        since_s.append(time.perf_counter() - t)
        assert full.ok and since.ok, (full.findings[:3], since.findings[:3])
    ratios = sorted(f / s for f, s in zip(full_s, since_s, strict=True))
    return {
        "events": full.events,
        "new": since.events,
        "built_s": built,
        "full_s": median(full_s),
        "since_s": median(since_s),
        "ratio": median(ratios),
        "lo": ratios[0],
        "hi": ratios[-1],
    }


def main() -> None:
    base = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    new = int(sys.argv[2]) if len(sys.argv) > 2 else 10_000
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    engines = [sys.argv[4]] if len(sys.argv) > 4 else ["postgresql"]
    print(f"# verify --since benchmark — {machine()}")
    for engine in engines:
        r = run(base, new, rounds, engine)
        print(
            f"{engine:10} {r['events']:.0f} events ({new} after the saved checkpoint; built in {r['built_s']:.0f} s): "
            f"full verify {r['full_s']:.2f} s, --since {r['since_s']:.2f} s ({r['new']:.0f} events in full): "
            f"{r['ratio']:.1f}× faster (median of {rounds}, spread {r['lo']:.1f}–{r['hi']:.1f}; goal ≥ 5×)"
        )


if __name__ == "__main__":
    main()
