"""Full projection rebuild events/s vs bare read-and-decode of the same events by `eventsourcing` (goal ≥ 0.5×)."""

from __future__ import annotations

import sys
import time
from typing import Any

from bench.bench_verify import fill
from bench.common import fresh, machine
from projections.runner import ProjectionRunner
from sle_events.store.record import StudyRecord


def bare_read_and_decode(url: str) -> tuple[int, float]:
    """The library's own path: notifications in pages, each mapped back to a domain event."""
    app = StudyRecord(url)
    t = time.perf_counter()
    n, start = 0, 1
    while True:
        page = app.recorder.select_notifications(start=start, limit=1000)
        if not page:
            break
        for notification in page:
            app.mapper.to_domain_event(notification)
        n += len(page)
        start = page[-1].id + 1
    took = time.perf_counter() - t
    app.close()
    return n, n / took


def rebuild_rate(url: str, only: str | None = None) -> tuple[int, float, list[str]]:
    runner = ProjectionRunner(url)
    if only:
        runner.projections = [p for p in runner.projections if p.name == only]
    names = [p.name for p in runner.projections]
    head = runner.head()
    t = time.perf_counter()
    runner.rebuild()
    took = time.perf_counter() - t
    runner.close()
    return head, head / took, names


def run(n: int = 20000) -> list[dict[str, Any]]:
    rows = []
    for engine in ("sqlite", "postgresql"):
        url = fresh(engine)
        fill(url, n)
        events, bare = bare_read_and_decode(url)
        _, rebuilt, names = rebuild_rate(url)
        alone = {name: rebuild_rate(url, name)[1] / bare for name in names}
        rows.append(
            {
                "engine": engine,
                "events": events,
                "bare": bare,
                "rebuild": rebuilt,
                "ratio": rebuilt / bare,
                "projections": names,
                "alone": alone,
            }
        )
    return rows


def main(n: int | None = None) -> None:
    n = n or (int(sys.argv[1]) if len(sys.argv) > 1 else 20000)
    print(f"# projection rebuild — {machine()}")
    for r in run(n):
        print(
            f"{r['engine']:10} {r['events']} events: rebuild of {', '.join(r['projections'])} "
            f"{r['rebuild']:8.0f}/s, bare read+decode {r['bare']:8.0f}/s, ratio {r['ratio']:.2f} (goal ≥ 0.50); "
            "each alone: " + ", ".join(f"{k} {v:.2f}" for k, v in r["alone"].items())
        )


if __name__ == "__main__":
    main()
