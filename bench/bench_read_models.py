"""Read models at scale (PostgreSQL): patient-state lookup p99 (goal < 10 ms) and as-of replay of one subject
with 1,000 events (goal < 100 ms), with N events in the store (default 1,000,000).

How the store is produced: one study; N/1000 subjects, each screened, consented and then given ~998 lab
results (creatinine, C3, C4, anti-dsDNA in turn, one a day), each a domain verb on the real `Subject` aggregate,
sealed by the lab service's key and appended through `StudyRecord.append` in batches of 500 (so every event is
verified like any other). Then the `patient_state` projection is built from event 1.
"""

from __future__ import annotations

import gc
import random
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from bench.common import fresh, machine
from projections.patient_state import PatientState
from projections.replay import replay
from projections.runner import ProjectionRunner
from projections.schema import patient_state
from sle_events.domain import clock
from sle_events.domain.study import Study
from sle_events.domain.study_config import IcfVersion, Site, StudyConfig
from sle_events.domain.subject import Subject
from sle_events.signing.envelope import GENESIS, seal
from sle_events.signing.keys import Signer
from sle_events.store.codec import envelope_for
from sle_events.store.record import StudyRecord

ANALYTES = (
    ("CREAT", "mg/dL", 60, 250, 100),
    ("C3", "mg/dL", 40, 150, 1),
    ("C4", "mg/dL", 5, 40, 1),
    ("DSDNA", "[IU]/mL", 10, 400, 1),
)


def fill(url: str, events: int, per_subject: int = 1000) -> tuple[int, float, list[str]]:
    """Append `events` signed events; return (count, seconds, subject ids)."""
    start = datetime(2020, 1, 1, tzinfo=UTC)
    sim = clock.SimulatedClock(start)
    with clock.use_clock(sim):
        return _fill(url, events, per_subject, sim, start)


def _fill(
    url: str, events: int, per_subject: int, sim: clock.SimulatedClock, start: datetime
) -> tuple[int, float, list[str]]:
    record = StudyRecord(url, clock=sim)
    admin, coordinator, investigator, lab = (
        Signer.generate(a, r)
        for a, r in (("admin", "admin"), ("nurse", "coordinator"), ("dr", "investigator"), ("lab", "lab"))
    )
    study = Study.create("BENCH", "1M events", "admin", admin.public_key_b64, start)
    for s in (coordinator, investigator, lab):
        study.register_key(s.actor, s.role, s.public_key_b64, start)
    record.record(study, signer=admin)
    config = StudyConfig.build(
        sites=[Site(site_id="NJ01", name="Drum Tower", timezone="Asia/Shanghai")],
        icf_versions=[IcfVersion(version="ICF v1.0", effective_from=start - timedelta(days=1))],
    )
    t = time.perf_counter()
    done = 1
    subjects: list[Any] = []
    rng = random.Random(1)
    while done < events:
        day0 = sim() + timedelta(days=1)  # subjects follow one another in time
        sim.set(day0 + timedelta(hours=2))
        subject = Subject.screen(study.id, "NJ01", f"S{len(subjects):06d}", day0, config=config)
        subject.obtain_consent("ICF v1.0", day0 + timedelta(hours=1), config=config, taken_by="dr")
        prev = GENESIS
        batch = []
        for e in subject.collect_events():
            one = seal(
                envelope_for(e, study=study.id, prev=prev), coordinator if e.originator_version == 1 else investigator
            )
            prev = one.hash
            batch.append(one)
        record.append(batch[:1])
        record.append(batch[1:])
        labs = min(per_subject, events - done) - 2
        for first in range(0, labs, 500):
            days = [
                (i, day0 + timedelta(days=1 + i // len(ANALYTES), hours=2))
                for i in range(first, min(first + 500, labs))
            ]
            sim.set(days[-1][1] + timedelta(hours=1))  # the batch is entered once its last result is in
            batch = []
            for i, when in days:
                code, unit, lo, hi, scale = ANALYTES[i % len(ANALYTES)]
                subject.record_lab_result(code, Decimal(rng.randint(lo, hi)) / scale, unit, when, config=config)
                [e] = subject.collect_events()
                one = seal(envelope_for(e, study=study.id, prev=prev), lab)
                prev = one.hash
                batch.append(one)
            record.append(batch)
        done += labs + 2
        subjects.append(str(subject.id))
        if len(subjects) % 50 == 0:
            print(f"  {done:,} events, {done / (time.perf_counter() - t):,.0f}/s", file=sys.stderr)
    record.close()
    return done, time.perf_counter() - t, subjects


def main(events: int | None = None) -> None:
    events = events or (int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000)
    url = fresh("postgresql")
    print(f"# read models at scale — {machine()} — PostgreSQL, {events:,} events")
    n, took, subjects = fill(url, events)
    print(f"store produced: {n:,} events ({len(subjects)} subjects × ~1000) in {took:,.0f} s ({n / took:,.0f}/s)")
    runner = ProjectionRunner(url, [PatientState()], batch=2000)
    t = time.perf_counter()
    runner.catch_up()
    took = time.perf_counter() - t
    print(
        f"patient_state built from event 1: {runner.head():,} events in {took:,.0f} s ({runner.head() / took:,.0f}/s)"
    )
    rng = random.Random(2)
    timings = []
    from sqlalchemy import select

    with runner.engine.connect() as conn:
        for _ in range(5000):
            subject = rng.choice(subjects)
            t = time.perf_counter()
            conn.execute(select(patient_state).where(patient_state.c.subject == subject)).one()
            timings.append(time.perf_counter() - t)
    timings.sort()
    print(
        f"patient-state lookup by subject: p50 {1e3 * timings[len(timings) // 2]:.2f} ms, "
        f"p99 {1e3 * timings[int(len(timings) * 0.99)]:.2f} ms (goal < 10 ms)"
    )
    runner.close()
    record = StudyRecord(url)
    replays = []
    replay(record, subjects[0])  # warm-up: imports, caches, the connection pool
    # This process still holds what filling the store made; a `sle replay` process would not, so keep the
    # garbage collector from walking it during the timings (its full passes showed up as 70-120 ms maxima).
    gc.collect()
    gc.freeze()
    for subject in rng.sample(subjects, min(20, len(subjects))):
        stream = record.recorder.select_events(__import__("uuid").UUID(subject), desc=True, limit=1)
        t = time.perf_counter()
        replay(record, subject, as_of=datetime(9999, 1, 1, tzinfo=UTC))
        replays.append(time.perf_counter() - t)
    replays.sort()
    print(
        f"as-of replay of one subject ({stream[0].originator_version} events): median "
        f"{1e3 * statistics.median(replays):.0f} ms, max {1e3 * replays[-1]:.0f} ms (goal < 100 ms)"
    )
    record.close()
    audit_trail_at_scale(url, subjects, rng)


def audit_trail_at_scale(url: str, subjects: list[str], rng: random.Random) -> None:
    """Build the audit trail from event 1, then read one subject's whole trail and a day of the study's."""
    from projections.audit_trail import AuditTrail, query

    runner = ProjectionRunner(url, [AuditTrail()])
    t = time.perf_counter()
    runner.rebuild()
    took = time.perf_counter() - t
    print(
        f"audit_trail rebuilt from event 1: {runner.head():,} events in {took:,.0f} s ({runner.head() / took:,.0f}/s)"
    )
    by_subject, by_day, rows = [], [], 0
    with runner.engine.connect() as conn:
        query(conn, stream=subjects[0])  # warm-up
        for subject in rng.sample(subjects, min(20, len(subjects))):
            t = time.perf_counter()
            rows = len(query(conn, stream=subject))
            by_subject.append(time.perf_counter() - t)
            day = query(conn, stream=subject)[rows // 2]["recorded_at"][:10]
            t = time.perf_counter()
            day_rows = len(query(conn, since=f"{day}T00:00:00+00:00", until=f"{day}T23:59:59.999999+00:00"))
            by_day.append(time.perf_counter() - t)
    runner.close()
    print(
        f"audit trail of one subject ({rows:,} field rows): median {1e3 * statistics.median(by_subject):.0f} ms, "
        f"max {1e3 * max(by_subject):.0f} ms; one recorded day across the study ({day_rows:,} rows): median "
        f"{1e3 * statistics.median(by_day):.0f} ms, max {1e3 * max(by_day):.0f} ms"
    )


if __name__ == "__main__":
    main()
