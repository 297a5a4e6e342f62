"""Ledger benchmarks (issue 6), each against a baseline measured in the same run.

1. Append rate with the ledger integrating (and checkpointing) concurrently, in a separate process every
   0.5 s, vs the ledger off. Goal: >= 0.8x, on SQLite and PostgreSQL, single and batched appends.
2. Inclusion-proof generation at 1M leaves: p50/p99 of `Ledger.inclusion_proof(index=i)`. Goal: p99 < 5 ms.
   The 1M-leaf tree is written straight into the ledger tables (see `build_million`): synthetic leaf hashes
   SHA-256(0x00 || i as 8 bytes), their perfect subtrees from `CompactRange`, the state row and one signed
   checkpoint (bulk INSERT on SQLite, COPY on PostgreSQL). No events stand behind those leaves, so the
   proofs are generated without fetching the leaf bytes (`with_leaf=False`); with them it is one more
   primary-key read of `study_events`.
3. Full-tree recomputation per leaf vs raw `hashlib.sha256` per leaf on this machine, on leaves the size of
   real sealed events. Goal: >= 0.5x. The tree needs ~2 SHA-256 per leaf (the leaf hash and, amortised, one
   interior node), raw is 1. Also reported: `Ledger.recompute()` end to end, reading the events table.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import random
import sys
import time
import uuid
from statistics import median
from typing import Any

import sqlalchemy as sa

from bench.common import SignedWorkload, fresh, machine, rate
from sle_events.ledger import CompactRange, leaf_hash, root_of_leaves, verify_inclusion
from sle_events.ledger.log import Ledger, events_table, ledger_state
from sle_events.ledger.note import Signer as LogSigner
from sle_events.store.record import StudyRecord

INTERVAL = 0.5
SIZES = {"sqlite": (3000, 20000), "postgresql": (2000, 10000)}  # (single appends, batched events)
ROUNDS = 5


# --------------------------------------------------------------------------- 1. append with the ledger on/off


def _integrator(url: str, interval: float, ready: Any, stop: Any, results: Any) -> None:
    """Child process: integrate and checkpoint every `interval` seconds, like `sle ledger run`."""
    ledger = Ledger(url)
    signer = LogSigner.generate("bench.local/ledger")
    ledger.integrate()  # warm up (first-use imports and statement caches) on the workload's setup events,
    ledger.checkpoint(signer)  # as a long-running `sle ledger run` is
    ready.set()
    cycles = checkpoints = 0
    busy = 0.0
    while not stop.is_set():
        t = time.perf_counter()
        if ledger.integrate():
            ledger.checkpoint(signer)
            checkpoints += 1
        busy += time.perf_counter() - t
        cycles += 1
        stop.wait(interval)
    ledger.integrate()
    results.put({"cycles": cycles, "checkpoints": checkpoints, "busy": busy, "size": ledger.size})
    ledger.close()


def _appends(engine: str, with_ledger: bool) -> tuple[float, float, dict[str, Any] | None]:
    single_n, batch_n = SIZES[engine]
    url = fresh(engine)
    record = StudyRecord(url)
    work = SignedWorkload(record)
    singles = work.sign(single_n)
    batches = work.sign(batch_n)
    ctx = multiprocessing.get_context("spawn")
    proc = None
    if with_ledger:
        ready, stop, results = ctx.Event(), ctx.Event(), ctx.Queue()
        proc = ctx.Process(target=_integrator, args=(url, INTERVAL, ready, stop, results))
        proc.start()
        if not ready.wait(60):
            raise RuntimeError("the integrator did not start")
    s = rate(single_n, lambda: [record.append([e]) for e in singles])
    b = rate(batch_n, lambda: [record.append(batches[i : i + 100]) for i in range(0, batch_n, 100)])
    stats = None
    if proc is not None:
        stop.set()
        stats = results.get(timeout=120)
        proc.join(60)
        with record.engine.connect() as conn:
            events = conn.execute(sa.select(sa.func.count()).select_from(record.table)).scalar_one()
        assert stats["size"] == events, (stats, events)  # the ledger kept up and covers every event
    record.close()
    return s, b, stats


def append_rates(rounds: int = ROUNDS) -> list[dict[str, Any]]:
    rows = []
    for engine in ("sqlite", "postgresql"):
        off, on, stats = [], [], []
        for _ in range(rounds):  # alternate, fresh databases, medians compared
            s, b, _ = _appends(engine, False)
            off.append((s, b))
            s, b, st = _appends(engine, True)
            on.append((s, b))
            stats.append(st)
        off_s, off_b = (median(r[i] for r in off) for i in range(2))
        on_s, on_b = (median(r[i] for r in on) for i in range(2))
        rows.append(
            {
                "engine": engine,
                "off_single": off_s,
                "on_single": on_s,
                "off_batched": off_b,
                "on_batched": on_b,
                "stats": stats[-1],
            }
        )
    return rows


# --------------------------------------------------------------------------- 2. proofs at 1M leaves


def build_million(engine: str, n: int) -> tuple[str, float]:
    """A ledger of n synthetic leaves written straight into the tables; returns (url, seconds)."""
    started = time.perf_counter()
    url = fresh(engine)
    StudyRecord(url).close()  # the (empty) events table the ledger sits next to
    Ledger(url).close()  # the ledger tables
    cr = CompactRange()
    leaves: list[tuple[int, int, bytes]] = []
    nodes: list[tuple[int, int, bytes]] = []
    for i in range(n):
        created = cr.append(leaf_hash(i.to_bytes(8, "big")))
        leaves.append((i, i + 1, created[0][2]))
        nodes.extend(created[1:])
    db = sa.create_engine(url)
    if engine == "postgresql":
        with db.begin() as conn:
            cur = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]  # open: never None
            with cur.copy("COPY ledger_leaves (idx, position, leaf_hash) FROM STDIN") as copy:
                for row in leaves:
                    copy.write_row(row)
            with cur.copy("COPY ledger_nodes (level, idx, hash) FROM STDIN") as copy:
                for row in nodes:
                    copy.write_row(row)
    else:
        with db.begin() as conn:
            conn.exec_driver_sql("INSERT INTO ledger_leaves (idx, position, leaf_hash) VALUES (?, ?, ?)", leaves)
            conn.exec_driver_sql("INSERT INTO ledger_nodes (level, idx, hash) VALUES (?, ?, ?)", nodes)
    state = cr.to_state()
    with db.begin() as conn:
        conn.execute(ledger_state.update().values(size=n, position=n, frontier=b"".join(state.hashes), root=cr.root()))
        if engine == "postgresql":
            conn.execute(sa.text("analyze ledger_leaves; analyze ledger_nodes"))
    db.dispose()
    return url, time.perf_counter() - started


def proof_latency(engine: str, n: int = 1_000_000, samples: int = 2000) -> dict[str, Any]:
    url, build_s = build_million(engine, n)
    ledger = Ledger(url)
    signer = LogSigner.generate("bench.local/ledger")
    cp = ledger.checkpoint(signer)  # re-checks the frontier and signs the 1M-leaf root
    rng = random.Random(6)
    for _ in range(50):  # warm the connection pool and caches
        ledger.inclusion_proof(index=rng.randrange(n), with_leaf=False)
    times = []
    checked = 0
    for k in range(samples):
        i = rng.randrange(n)
        t = time.perf_counter()
        proof = ledger.inclusion_proof(index=i, with_leaf=False)
        times.append(time.perf_counter() - t)
        if k % 100 == 0:  # the proofs are real: check some against the signed root
            verify_inclusion(leaf_hash(i.to_bytes(8, "big")), i, n, proof.hashes, cp.root)
            checked += 1
    ledger.close()
    times.sort()
    return {
        "engine": engine,
        "leaves": n,
        "build_s": build_s,
        "p50_ms": times[len(times) // 2] * 1e3,
        "p99_ms": times[int(len(times) * 0.99) - 1] * 1e3,
        "max_ms": times[-1] * 1e3,
        "samples": samples,
        "checked": checked,
    }


# --------------------------------------------------------------------------- 3. recomputation


def recompute_rates(n: int = 400_000) -> dict[str, Any]:
    url = fresh("sqlite")
    record = StudyRecord(url)
    real = [e.sealed for e in SignedWorkload(record).sign(2000)]
    record.close()
    leaves = [real[i % len(real)] for i in range(n)]
    size = sum(len(x) for x in leaves) / n
    sha = hashlib.sha256

    def raw() -> None:
        for x in leaves:
            sha(x).digest()

    raw_rate = max(rate(n, raw) for _ in range(3))
    tree_rate = max(rate(n, lambda: root_of_leaves(leaves)) for _ in range(3))
    db_rates = {}
    for engine in ("sqlite", "postgresql"):
        url = fresh(engine)
        StudyRecord(url).close()
        db = sa.create_engine(url)
        t = events_table()
        with db.begin() as conn:
            for k in range(0, n, 50_000):
                conn.execute(
                    t.insert(),
                    [
                        {"originator_id": uuid.uuid4(), "originator_version": 1, "topic": "bench", "state": leaves[i]}
                        for i in range(k, min(n, k + 50_000))
                    ],
                )
        db.dispose()
        ledger = Ledger(url)
        best = 0.0
        for _ in range(2):
            t0 = time.perf_counter()
            result = ledger.recompute()
            best = max(best, result.size / (time.perf_counter() - t0))
        assert result.root == root_of_leaves(leaves)
        ledger.close()
        db_rates[engine] = best
    return {"leaves": n, "leaf_bytes": size, "raw": raw_rate, "tree": tree_rate, "db": db_rates}


# --------------------------------------------------------------------------- report


def main() -> None:
    million = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    print(f"# ledger benchmark — {machine()}")
    for r in append_rates():
        st = r["stats"]
        print(
            f"{r['engine']:10} single:  ledger off {r['off_single']:8.0f}/s, integrating every {INTERVAL} s "
            f"{r['on_single']:8.0f}/s, ratio {r['on_single'] / r['off_single']:.2f} (goal ≥ 0.80)\n"
            f"{'':10} batched: ledger off {r['off_batched']:8.0f}/s, integrating every {INTERVAL} s "
            f"{r['on_batched']:8.0f}/s, ratio {r['on_batched'] / r['off_batched']:.2f} (goal ≥ 0.80)\n"
            f"{'':10} (integrator process, last round: {st['cycles']} cycles, {st['checkpoints']} checkpoints, "
            f"busy {st['busy']:.2f} s, ledger size {st['size']} = every event)"
        )
    for engine in ("sqlite", "postgresql"):
        p = proof_latency(engine, million)
        print(
            f"{engine:10} inclusion proof at {p['leaves']:,} leaves: p50 {p['p50_ms']:.2f} ms, "
            f"p99 {p['p99_ms']:.2f} ms (goal < 5 ms), max {p['max_ms']:.2f} ms over {p['samples']} random leaves "
            f"({p['checked']} re-verified)\n"
            f"{'':10} tree built directly in ledger_leaves/ledger_nodes/ledger_state from synthetic leaf hashes "
            f"SHA-256(0x00||i) ({'COPY' if engine == 'postgresql' else 'bulk INSERT'}, {p['build_s']:.0f} s) + one "
            "signed checkpoint; proofs without fetching leaf bytes (no events behind synthetic leaves)"
        )
    r = recompute_rates()
    print(
        f"recompute  {r['leaves']:,} leaves of {r['leaf_bytes']:.0f} B (real sealed events): raw hashlib.sha256 "
        f"{r['raw']:,.0f} leaves/s (1 hash per leaf); root_of_leaves {r['tree']:,.0f} leaves/s "
        f"(leaf + interior hashes), ratio {r['tree'] / r['raw']:.2f} (goal ≥ 0.50), per leaf\n"
        f"{'':10} Ledger.recompute() reading the events table: "
        + ", ".join(f"{e} {v:,.0f} leaves/s ({v / r['raw']:.2f}× raw)" for e, v in r["db"].items())
    )


if __name__ == "__main__":
    main()
