"""Appends per second through `sle serve` on PostgreSQL (loopback) against `StudyRecord.append` in the same run.

1, 8 and 32 concurrent clients (threads, each a `sle_events.client.Client` with its own subjects, so no
conflicts), single-event and 100-event requests; every request signed (RFC 9421) with a fresh Idempotency-Key;
events sealed before timing, for the baseline as for HTTP; clients connected (one signed read each) before the
clock starts, after an unrecorded warm-up round at a quarter of the size (prepared statements, pools, thread
pools). Baseline: one in-process
`StudyRecord.append` caller. Median of 3 alternating rounds with spread; p50/p99 request latency.
Afterwards: zero errors, the exact event count, `sle verify` clean.

Goals (issue 13): ≥ 0.5× the Python API at 8 clients with single events, ≥ 0.8× with 100-event batches.
Usage: python -m bench.bench_api [--workers 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from statistics import median
from typing import Any

import httpx
import sqlalchemy as sa

from bench.common import SignedWorkload, fresh, machine
from sle_events.audit.verifier import verify_record
from sle_events.client import Client
from sle_events.signing.envelope import SealedEvent, seal
from sle_events.store.codec import envelope_for
from sle_events.store.record import StudyRecord

CLIENTS = (1, 8, 32)
SINGLE_EVENTS = 960  # per measurement (all clients together): 30 requests per client at 32 clients
BATCHES = 64  # 100-event requests per measurement: 2 per client at 32 clients


def sign(work: SignedWorkload, subjects: list[Any], n: int) -> list[SealedEvent]:
    """n lab results round-robin over `subjects`, chained and signed by the lab service."""
    out = []
    when = work.now - timedelta(days=1)
    for i in range(n):
        subject = subjects[i % len(subjects)]
        subject.record_lab_result("CREAT", Decimal(100 + i % 50) / 100, "mg/dL", when)
        [event] = subject.collect_events()
        sealed = seal(envelope_for(event, study=work.study.id, prev=work.heads[subject.id]), work.lab)
        work.heads[subject.id] = sealed.hash
        out.append(sealed)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


SERVER_LOG = Path(tempfile.gettempdir()) / "bench_api_server.log"


def start_server(url: str, workers: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    sle = str(Path(sys.executable).with_name("sle"))
    with SERVER_LOG.open("w") as log:  # the server's own errors, should any occur
        server = subprocess.Popen(
            [sle, "serve", "--db", url, "--port", str(port), "--workers", str(workers)],
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            httpx.get(f"{base}/v1/log/checkpoint", timeout=1)
            return server, base
        except httpx.HTTPError:
            time.sleep(0.3)
    os.killpg(server.pid, signal.SIGTERM)
    raise SystemExit("sle serve did not start")


def over_http(base: str, work: SignedWorkload, parts: list[list[SealedEvent]], size: int) -> tuple[float, list[float]]:
    """Send each client's events in requests of `size`, all clients at once; (events/s, request latencies).
    Steady state: every client has connected and made one signed request before the clock starts."""
    latencies: list[float] = []
    clients = [Client(base, work.lab, work.study.id) for _ in parts]
    for client in clients:
        client.get("/keys")
    start = threading.Barrier(len(parts) + 1)

    def client_run(client: Client, events: list[SealedEvent]) -> None:
        start.wait()
        for i in range(0, len(events), size):
            t = time.perf_counter()
            client.append(events[i : i + size])  # raises on any refusal: the run must have zero errors
            latencies.append(time.perf_counter() - t)

    try:
        with ThreadPoolExecutor(len(parts)) as pool:
            running = [pool.submit(client_run, c, p) for c, p in zip(clients, parts, strict=True)]
            start.wait()
            t0 = time.perf_counter()
            for r in running:
                r.result()
            elapsed = time.perf_counter() - t0
    finally:
        for client in clients:
            client.close()
    return sum(len(p) for p in parts) / elapsed, latencies


def in_process(record: StudyRecord, events: list[SealedEvent], size: int) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(events), size):
        record.append(events[i : i + size])
    return len(events) / (time.perf_counter() - t0)


def count(url: str) -> int:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        n = int(conn.execute(sa.text("select count(*) from study_events")).scalar() or 0)
    engine.dispose()
    return n


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    url = fresh("postgresql")
    record = StudyRecord(url)
    per_client = 2
    work = SignedWorkload(record, subjects=max(CLIENTS) * per_client + 4)
    baseline_subjects = work.subjects[-4:]
    server, base = start_server(url, args.workers)
    expected = count(url)
    results: dict[tuple[str, int | str], list[tuple[float, list[float]]]] = {}
    try:
        for measured in [False] + [True] * args.rounds:  # the first round warms up (not recorded)
            for size, n in (("single", SINGLE_EVENTS), ("batch", BATCHES * 100)):
                n = n if measured else n // 4
                step = 1 if size == "single" else 100
                events = sign(work, baseline_subjects, n)
                python = in_process(record, events, step)
                if measured:
                    results.setdefault((size, "python"), []).append((python, []))
                expected += n
                for clients in CLIENTS:
                    subjects = work.subjects[: clients * per_client]
                    parts = [
                        sign(work, subjects[c * per_client : (c + 1) * per_client], n // clients)
                        for c in range(clients)
                    ]
                    http = over_http(base, work, parts, step)
                    if measured:
                        results.setdefault((size, clients), []).append(http)
                    expected += sum(len(p) for p in parts)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    record.close()
    stored = count(url)
    report = verify_record(url, workers=2)
    print(f"# bench_api — {machine()}, sle serve --workers {args.workers} on PostgreSQL, loopback")
    print("| requests | clients | events/s (median, spread) | × Python API | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|")
    for size in ("single", "batch"):
        python = median(r for r, _ in results[size, "python"])
        print(f"| {size} | Python API | {python:,.0f} | 1.00 | | |")
        for clients in CLIENTS:
            rates = [r for r, _ in results[size, clients]]
            lat = [x for _, ls in results[size, clients] for x in ls]
            ratios = [r / p for r, (p, _) in zip(rates, results[size, "python"], strict=True)]
            print(
                f"| {size} | {clients} | {median(rates):,.0f} ({min(rates):,.0f}–{max(rates):,.0f}) | "
                f"**{median(ratios):.2f}** ({min(ratios):.2f}–{max(ratios):.2f}) | {pct(lat, 0.5):.1f} | "
                f"{pct(lat, 0.99):.1f} |"
            )
    print(f"after the run: {stored:,} events stored, {expected:,} expected; errors: 0 (any refusal aborts the run); "
          f"sle verify: {'clean' if report.ok else f'{len(report.findings)} findings'}")  # fmt: skip
    if stored != expected or not report.ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
