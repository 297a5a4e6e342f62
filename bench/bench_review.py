"""What SDV and queries cost (issue 16).

1. Rebuild: all projections vs the three there were before (audit trail, patient state, dashboard) on the same
   filled database, alternating, median of the rounds with the spread: the ratio is what `review_acts` and
   `sdv_facts` add to a rebuild.
2. Append-time check: a query raised on a subject with many facts (the store folds the subject to check the fact
   exists) vs a lab result appended to the same subject, signed the same way, alternating.
"""

from __future__ import annotations

import sys
import time
from decimal import Decimal
from statistics import median
from typing import Any

from bench.bench_verify import fill
from bench.common import STUDY_CONFIG, fresh, machine
from projections.runner import ProjectionRunner
from sle_events.domain.review import Query
from sle_events.domain.study import Study
from sle_events.domain.subject import Subject
from sle_events.signing.keys import Signer
from sle_events.store.record import StudyRecord

BEFORE = ("audit_trail", "patient_state", "study_dashboard")


def rebuild_seconds(url: str, names: tuple[str, ...] | None) -> float:
    runner = ProjectionRunner(url)
    try:
        if names is not None:
            runner.projections = [p for p in runner.projections if p.name in names]
        t = time.perf_counter()
        runner.rebuild(workers=1)
        return time.perf_counter() - t
    finally:
        runner.close()


def rebuild_ratio(url: str, rounds: int) -> dict[str, Any]:
    ratios = []
    for _ in range(rounds):
        before = rebuild_seconds(url, BEFORE)
        now = rebuild_seconds(url, None)
        ratios.append(now / before)
    return {"ratio": median(ratios), "spread": f"{min(ratios):.2f}–{max(ratios):.2f}"}


def append_latency(url: str, facts: int, rounds: int) -> dict[str, Any]:
    """Median ms per append: a Query.Raised vs a Subject.LabResultRecorded, on a subject with `facts` results."""
    from datetime import UTC, datetime, timedelta

    now = datetime.now(UTC)
    record = StudyRecord(url)
    admin, lab = Signer.generate("admin", "admin"), Signer.generate("lab.service", "lab")
    coordinator, monitor = Signer.generate("nurse.li", "coordinator"), Signer.generate("cra.huang", "monitor")
    investigator = Signer.generate("dr.wang", "investigator")
    study = Study.create("BENCH-REVIEW", "bench", admin.actor, admin.public_key_b64, now)
    for s in (lab, coordinator, monitor, investigator):
        study.register_key(s.actor, s.role, s.public_key_b64, now)
    record.record(study, signer=admin)
    subject = Subject(study.id, "NJ01", "SCR-001", now - timedelta(days=3))
    record.record(subject, signer=coordinator)
    subject.obtain_consent("ICF v1.0", now - timedelta(days=2), config=STUDY_CONFIG, taken_by="dr.wang")
    record.record(subject, signer=investigator)
    for i in range(facts):
        subject.record_lab_result("C3", Decimal("85") + i % 7, "mg/dL", now - timedelta(days=1))
        if i % 100 == 99:
            record.record(subject, signer=lab)
    record.record(subject, signer=lab)
    query_ms, lab_ms = [], []
    for _ in range(rounds):
        q = Query.raise_on(study.id, subject, 3, "Source?", by=monitor.actor, occurred_at=now, config=STUDY_CONFIG)
        t = time.perf_counter()
        record.record(q, signer=monitor)
        query_ms.append(1000 * (time.perf_counter() - t))
        subject.record_lab_result("C3", "90", "mg/dL", now - timedelta(hours=1))
        t = time.perf_counter()
        record.record(subject, signer=lab)
        lab_ms.append(1000 * (time.perf_counter() - t))
    record.close()
    return {
        "facts": subject.version,
        "query_ms": median(query_ms),
        "lab_ms": median(lab_ms),
        "spread": f"{min(query_ms):.1f}–{max(query_ms):.1f}",
    }


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    rounds = 3
    print(f"# SDV and queries — {machine()}")
    for engine in ("sqlite", "postgresql"):
        url = fresh(engine)
        fill(url, n)
        r = rebuild_ratio(url, rounds)
        a = append_latency(fresh(engine), 600, 5)
        print(
            f"{engine:10} rebuild of {n} events, all projections / the three before: {r['ratio']:.2f} "
            f"(spread {r['spread']}, {rounds} rounds); raising a query on a subject of {a['facts']} events "
            f"{a['query_ms']:.1f} ms (spread {a['spread']}) vs a lab result {a['lab_ms']:.1f} ms"
        )


if __name__ == "__main__":
    main()
