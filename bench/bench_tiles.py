"""tlog-tiles serving (`sle_events.ledger.tiles`) against the ledger's own per-event proof, on both engines.

1. Latency of one request: a full level-0 hash tile, a full entry bundle (256 events of ~1 KiB) and a full
   level-1 tile, each against the baseline `Ledger.inclusion_proof(index=i)` (one event's proof with its bytes,
   what a client asks for today). Median over 3 alternating rounds of `SAMPLES` random requests, with spread.
2. `write_tiles(entries=True)` (the static export, with its consistency check) in leaves per second, against
   `Ledger.recompute()` (read every event and hash the tree) in the same run.
"""

from __future__ import annotations

import os
import random
import sys
import time
import uuid
from collections.abc import Callable
from statistics import median
from tempfile import TemporaryDirectory

import sqlalchemy as sa

from bench.common import fresh, machine
from sle_events.ledger import Signer
from sle_events.ledger.log import Ledger, events_table
from sle_events.ledger.tiles import serve_tile, tile_path, write_tiles
from sle_events.store.record import StudyRecord

SAMPLES = 200
ROUNDS = 3


def fill(url: str, n: int, entry_bytes: int = 1000) -> Ledger:
    record = StudyRecord(url)
    record.close()
    record.engine.dispose()
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        for start in range(0, n, 10000):
            conn.execute(
                events_table().insert(),
                [
                    {
                        "originator_id": uuid.uuid4(),
                        "originator_version": 1,
                        "topic": "synthetic",
                        "state": os.urandom(entry_bytes),
                    }
                    for _ in range(min(10000, n - start))
                ],
            )
    engine.dispose()
    ledger = Ledger(url)
    ledger.integrate()
    ledger.checkpoint(Signer.generate("sle.local/bench"))
    return ledger


def per_request_ms(fn: Callable[[int], object], pick: Callable[[], int]) -> float:
    args = [pick() for _ in range(SAMPLES)]
    t = time.perf_counter()
    for a in args:
        fn(a)
    return (time.perf_counter() - t) / SAMPLES * 1000


def run(n: int = 50_000) -> list[dict[str, object]]:
    rng = random.Random(7)
    return [measure(engine, n, rng) for engine in ("sqlite", "postgresql")]


def measure(engine: str, n: int, rng: random.Random) -> dict[str, object]:
    url = fresh(engine)
    ledger = fill(url, n)
    full0, full1 = n // 256, n // 65536
    cases: dict[str, Callable[[int], object]] = {
        "proof": lambda i: ledger.inclusion_proof(index=i),
        "tile0": lambda t: serve_tile(ledger, tile_path(0, t)),
        "bundle": lambda t: serve_tile(ledger, tile_path("entries", t)),
    }
    picks = {
        "proof": lambda: rng.randrange(n),
        "tile0": lambda: rng.randrange(full0),
        "bundle": lambda: rng.randrange(full0),
    }
    if full1:
        cases["tile1"] = lambda t: serve_tile(ledger, tile_path(1, t))
        picks["tile1"] = lambda: rng.randrange(full1)
    ms: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(ROUNDS):
        for k, fn in cases.items():
            ms[k].append(per_request_ms(fn, picks[k]))
    export, recompute = [], []
    for _ in range(ROUNDS):
        with TemporaryDirectory() as out:
            t = time.perf_counter()
            write_tiles(ledger, out, entries=True)
            export.append(n / (time.perf_counter() - t))
        t = time.perf_counter()
        ledger.recompute()
        recompute.append(n / (time.perf_counter() - t))
    ledger.close()
    row: dict[str, object] = {"engine": engine, "leaves": n}
    for k in cases:
        row[f"{k}_ms"] = median(ms[k])
        if k != "proof":
            ratios = [a / b for a, b in zip(ms[k], ms["proof"], strict=True)]
            row[f"{k}_ratio"] = median(ratios)
            row[f"{k}_spread"] = f"{min(ratios):.2f}–{max(ratios):.2f}"
    ratios = [a / b for a, b in zip(export, recompute, strict=True)]
    row.update(
        export=median(export),
        recompute=median(recompute),
        export_ratio=median(ratios),
        export_spread=f"{min(ratios):.2f}–{max(ratios):.2f}",
    )
    return row


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 50_000
    print(f"# tiles benchmark — {machine()} — {n:,} events of 1,000 bytes")
    for r in run(n):
        print(f"{r['engine']}: one inclusion proof with its event {r['proof_ms']:.2f} ms (baseline)")
        for k, what in (("tile0", "level-0 hash tile"), ("bundle", "entry bundle"), ("tile1", "level-1 hash tile")):
            if f"{k}_ms" in r:
                print(
                    f"  {what:18} {r[f'{k}_ms']:.2f} ms, {r[f'{k}_ratio']:.2f}× the proof "
                    f"(median of {ROUNDS}, spread {r[f'{k}_spread']})"
                )
        print(
            f"  write_tiles --entries {r['export']:,.0f} leaves/s vs recompute {r['recompute']:,.0f}/s: "
            f"{r['export_ratio']:.2f} (spread {r['export_spread']})"
        )


if __name__ == "__main__":
    main()
