"""Store throughput for envelopes already signed, vs bare `eventsourcing_sqlalchemy` on the same engine.

Goals (issue 3): single ≥ 0.85× bare single; batched ≥ 0.7 × L, with L = 1 / (1/B + 1/(c·V)): the rate if
each batch were verified across all c cores and then written (B = bare batched rate, V = raw Ed25519 verify
rate per core). Also reports the client-side signing rate per core.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from statistics import median
from typing import Any

from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event

from bench.common import CORES, SignedWorkload, ed25519_verify_rate, fresh, machine, rate
from sle_events.store.record import StudyRecord


class Reading(Aggregate):
    """Bare baseline: an aggregate whose events carry the same fields as the signed lab results."""

    @event("Started")
    def __init__(self, site: str) -> None:
        self.site = site

    @event("LabResultRecorded")
    def record_lab_result(self, fields: dict, occurred_at: datetime, actor: str) -> None:
        pass


class Bare(Application):
    name = "Bare"


def lab_result_fields() -> dict:
    """The payload of a real signed lab result, to give the bare baseline the same content to store."""
    record = StudyRecord(fresh("sqlite"))
    fields = SignedWorkload(record, subjects=1).sign(1)[0].envelope["payload"]
    record.close()
    return fields


def bare_rates(url: str, single_n: int, batch_n: int) -> tuple[float, float]:
    app = Bare(env={"PERSISTENCE_MODULE": "eventsourcing_sqlalchemy", "SQLALCHEMY_URL": url})
    now = datetime.now(UTC)
    fields = lab_result_fields()
    aggs = [Reading("NJ01") for _ in range(20)]
    app.save(*aggs)

    def single() -> None:
        for i in range(single_n):
            a = aggs[i % len(aggs)]
            a.record_lab_result(fields, now, "lab")
            app.save(a)

    def batched() -> None:
        for b in range(batch_n // 100):
            a = aggs[b % len(aggs)]
            for _ in range(100):
                a.record_lab_result(fields, now, "lab")
            app.save(a)

    s = rate(single_n, single)
    bb = rate(batch_n, batched)
    app.close()
    return s, bb


def signed_rates(url: str, single_n: int, batch_n: int) -> tuple[float, float, float]:
    record = StudyRecord(url)
    work = SignedWorkload(record)
    t = time.perf_counter()
    singles = work.sign(single_n)
    sign_rate = single_n / (time.perf_counter() - t)
    s = rate(single_n, lambda: [record.append([e]) for e in singles])
    batches = work.sign(batch_n)
    b = rate(batch_n, lambda: [record.append(batches[i : i + 100]) for i in range(0, batch_n, 100)])
    record.close()
    return s, b, sign_rate


def run(sizes: dict[str, tuple[int, int]] | None = None, rounds: int = 3) -> list[dict[str, Any]]:
    """Bare and signed runs alternate `rounds` times on fresh databases; medians are compared."""
    sizes = sizes or {"sqlite": (2000, 20000), "postgresql": (1000, 10000)}
    v = ed25519_verify_rate()
    rows = []
    for engine in ("sqlite", "postgresql"):
        single_n, batch_n = sizes[engine]
        bare, signed = [], []
        for _ in range(rounds):
            bare.append(bare_rates(fresh(engine), single_n, batch_n))
            signed.append(signed_rates(fresh(engine), single_n, batch_n))
        bare_s, bare_b = (median(r[i] for r in bare) for i in range(2))
        sig_s, sig_b, sign_rate = (median(r[i] for r in signed) for i in range(3))
        limit = 1 / (1 / bare_b + 1 / (CORES * v))
        rows.append(
            {
                "engine": engine,
                "bare_single": bare_s,
                "signed_single": sig_s,
                "single_ratio": sig_s / bare_s,
                "bare_batched": bare_b,
                "signed_batched": sig_b,
                "L": limit,
                "batched_ratio_to_L": sig_b / limit,
                "verify_per_core": v,
                "sign_per_core": sign_rate,
            }
        )
    return rows


def main() -> None:
    print(f"# append benchmark — {machine()}")
    for r in run():
        print(
            f"{r['engine']:10} single: bare {r['bare_single']:8.0f}/s signed {r['signed_single']:8.0f}/s "
            f"ratio {r['single_ratio']:.2f} (goal ≥ 0.85)\n"
            f"{'':10} batched: bare {r['bare_batched']:8.0f}/s signed {r['signed_batched']:8.0f}/s "
            f"L {r['L']:8.0f}/s ratio to L {r['batched_ratio_to_L']:.2f} (goal ≥ 0.70)\n"
            f"{'':10} raw Ed25519 verify {r['verify_per_core']:.0f}/s/core; client signing "
            f"{r['sign_per_core']:.0f} events/s/core"
        )


if __name__ == "__main__":
    main()
