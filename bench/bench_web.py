"""Web view page times (goal: p95 < 200 ms for the dashboard, a subject page and a filtered audit-trail page on
the 300-subject demo in PostgreSQL).

    python -m bench.bench_web --db postgresql+psycopg://postgres@127.0.0.1:5432/web_bench --keys bench-keys

The record is an existing `sle demo --subjects 300` database (making one takes ~15 min here: `sle demo
--subjects 300 --db URL --keys DIR`, then `sle ledger init/integrate/checkpoint` for the checkpoint card). The
view runs in its own process (uvicorn, one worker, loopback); the client signs in with the demo's data manager
key (a role that may read) and asks each page REPEAT times per round. Baseline in the same run: the same reads
through the Python read API (`StudyReader.dashboard()`, `.patient()`, `.audit_trail(...)`) in this process, so
the ratio says what the page adds (HTTP, session check, rendering, the plots and the SAE clock). Three rounds
alternate pages and baseline; the median p95 of the rounds is reported with its spread. Subject pages are
measured warm (each subject's fold cached by its version) and their first, cold visit is reported apart.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench.common import free_port_url, machine

REPEAT = 20
ROUNDS = 3


def p95(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def timed(fn: Callable[[], object], times: int) -> list[float]:
    out = []
    for _ in range(times):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


def main() -> None:
    import httpx
    import sqlalchemy as sa

    from projections.read import StudyReader
    from sle_events.signing.keys import Signer
    from sle_events.web.signin import make_token

    ap = argparse.ArgumentParser()
    ap.add_argument("--db", required=True, help="an `sle demo` database (PostgreSQL for the goal)")
    ap.add_argument("--keys", required=True, type=Path, help="the demo's key folder (data_manager.pem)")
    args = ap.parse_args()

    engine = sa.create_engine(args.db)
    with engine.connect() as conn:
        subjects = [
            s
            for (s,) in conn.execute(
                sa.text("select screening_number from patient_state where tx_date is not null order by 1")
            )
        ]
        events = conn.execute(sa.text("select count(*) from study_events")).scalar_one()
        corrected = [
            s
            for (s,) in conn.execute(
                sa.text("select distinct subject from audit_events where change = 'corrected' order by 1")
            )
        ]
    engine.dispose()
    sample = subjects[:: max(1, len(subjects) // 20)][:20]
    with_corrections = [s for s in corrected if s in subjects][:20] or sample

    url, port = free_port_url()
    env = dict(os.environ, SLE_DATABASE_URL=args.db)
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "sle_events.web.app:app_from_env",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        env=env,
    )
    try:
        client = httpx.Client(base_url=url, timeout=120)
        for _ in range(200):
            try:
                client.get("/signin")
                break
            except httpx.TransportError:
                time.sleep(0.1)
        signer = Signer.from_file(args.keys / "data_manager.pem", "dm.zhao", "data_manager")
        signed = client.post("/signin", data={"token": make_token(signer, None)})
        assert signed.status_code == 303, signed.text[:300]

        def page(path: str) -> Callable[[], object]:
            def get() -> None:
                r = client.get(path)
                assert r.status_code == 200, (path, r.status_code, r.text[:300])

            return get

        # First visits: the dashboard's SAE folds are made in the background, each subject page folds its subject.
        cold_dashboard = timed(page("/"), 1)[0]
        cold_subjects = [timed(page(f"/subjects/{s}"), 1)[0] for s in sample]
        for _ in range(600):  # wait for the background folds (the dashboard says how many are left)
            if "Checking" not in client.get("/").text:
                break
            time.sleep(1)

        reader = StudyReader(args.db, catch_up=False)
        rotate = {"i": 0}

        def nxt(items: list[str]) -> str:
            rotate["i"] += 1
            return items[rotate["i"] % len(items)]

        pages: dict[str, Callable[[], object]] = {
            "dashboard": page("/"),
            "subject page": lambda: page(f"/subjects/{nxt(sample)}")(),
            "audit: subject + corrected": lambda: page(f"/audit?subject={nxt(with_corrections)}&change=corrected")(),
            "audit: subject + item CREAT": lambda: page(f"/audit?subject={nxt(sample)}&item=CREAT")(),
            "audit: user nurse.li": page("/audit?user=nurse.li"),
            "audit: item CREAT, whole study": page("/audit?item=CREAT"),
        }
        baseline: dict[str, Callable[[], object]] = {
            "dashboard": reader.dashboard,
            "subject page": lambda: reader.patient(nxt(sample)),
            "audit: subject + corrected": lambda: reader.audit_trail(subject=nxt(with_corrections), change="corrected"),
            "audit: subject + item CREAT": lambda: reader.audit_trail(subject=nxt(sample)),
            "audit: user nurse.li": lambda: reader.audit_trail(user="nurse.li"),
            "audit: item CREAT, whole study": None,  # type: ignore[dict-item]  # the read API has no item filter
        }
        results: dict[str, list[tuple[float, float | None]]] = {name: [] for name in pages}
        for _round in range(ROUNDS):
            for name, fn in pages.items():
                web = p95(timed(fn, REPEAT))
                base_fn = baseline[name]
                base = p95(timed(base_fn, max(3, REPEAT // 4))) if base_fn is not None else None
                results[name].append((web, base))
        reader.close()
    finally:
        server.terminate()
        server.wait(10)

    print(f"{machine()}; {events:,} events, {len(subjects)} transplanted subjects; other work was running")
    print(f"cold: dashboard {cold_dashboard:.0f} ms; first visit of a subject page median "
          f"{statistics.median(cold_subjects):.0f} ms (max {max(cold_subjects):.0f})")  # fmt: skip
    print(f"{'page':34} {'p95 ms (median of 3)':>22} {'spread':>14} {'read API p95':>13} {'ratio':>6}")
    for name, rows in results.items():
        webs = [w for w, _ in rows]
        bases = [b for _, b in rows if b is not None]
        med = statistics.median(webs)
        read_api = statistics.median(bases) if bases else None
        ratio = f"{med / read_api:5.1f}x" if read_api else "   —"
        shown = "—" if read_api is None else f"{read_api:.0f}"
        spread = f"{min(webs):.0f}–{max(webs):.0f}"
        print(f"{name:34} {med:22.0f} {spread:>14} {shown:>13} {ratio:>6}")


if __name__ == "__main__":
    main()
