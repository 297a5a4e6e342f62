"""ODM 1.3.2 export: time on the N-subject demo (default 300) and peak memory as the study grows.

    python -m bench.bench_odm demo [N] [--reuse FILE.db KEYS_DIR]
    python -m bench.bench_odm rss SIZE [SIZE...]        (events, PostgreSQL)

`demo`: the demo is recorded once on SQLite (or an existing one is reused: recording 300 subjects takes
minutes) and copied row for row to PostgreSQL, then each engine's ledger is integrated and checkpointed. On each
engine, 3 alternating rounds of: the bare read-and-decode of every event the checkpoint covers (the baseline: a
SELECT in log order and `json.loads`), the transactional export, the snapshot export. Reported: median seconds
and spread, the ratio to the baseline, and the share of the export spent reading events (fetch, leaf-hash check,
decode) against building and writing XML.

`rss`: PostgreSQL stores of SIZE events made cheaply: subjects of 1,000 events (screened, consented, lab
results), each a domain verb sealed by its signer's key, written straight through the recorder in batches (no
append checks: this measures the export, not the store), the ledger integrated and checkpointed. Each export
runs in a child process that reports its own peak RSS (`ru_maxrss`).
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import UUID, uuid5

import sqlalchemy as sa

from bench.common import fresh, machine

ROUNDS = int(os.environ.get("SLE_BENCH_ROUNDS", "3"))
ANALYTES = (("CREAT", "mg/dL", 60, 250, 100), ("C3", "mg/dL", 40, 150, 1), ("C4", "mg/dL", 5, 40, 1))


# ------------------------------------------------------------------------------------------ building stores
def record_demo(subjects: int) -> tuple[str, Path]:
    from sle_events.demo import run_demo
    from sle_events.store.record import StudyRecord

    folder = Path(tempfile.mkdtemp(prefix="sle-bench-odm-"))
    url = f"sqlite:///{folder / 'demo.db'}"
    record = StudyRecord(url)
    t = time.perf_counter()
    result = run_demo(record, folder / "keys", subjects=subjects)
    record.close()
    print(
        f"  demo of {subjects} subjects: {result.events:,} events in {time.perf_counter() - t:.0f} s", file=sys.stderr
    )
    return url, folder / "keys"


def copy_to(source: str, target: str) -> int:
    """Every event of `source`, in log order, into the empty record at `target` (same bytes, same order)."""
    from eventsourcing.persistence import StoredEvent

    from sle_events.store.record import StudyRecord

    src = sa.create_engine(source)
    dst = StudyRecord(target)
    ev = StudyRecord.events_table()
    n = 0
    try:
        with src.connect() as conn:
            rows = conn.execute(
                sa.select(ev.c.originator_id, ev.c.originator_version, ev.c.topic, ev.c.state).order_by(ev.c.id)
            )
            batch: list[Any] = []
            for stream, version, topic, state in rows:
                batch.append(StoredEvent(UUID(str(stream)), version, topic, bytes(state)))
                if len(batch) == 5000:
                    dst.recorder.insert_events(batch)
                    n += len(batch)
                    batch = []
            if batch:
                dst.recorder.insert_events(batch)
                n += len(batch)
    finally:
        src.dispose()
        dst.close()
    return n


def grow_demo(source: str, keys: Path, copies: int, target: str) -> int:
    """Every event of the demo at `source` into the empty record at `target`, then `copies` more copies of its
    subjects (and their product lots) under new stream ids and screening numbers (`NJ01-0002.1`...), each copy's
    events re-chained and re-signed by the same keys: a larger study of the demo's exact shape, made in minutes
    where recording it through the verbs takes an hour on a loaded machine. Returns the events written."""
    from eventsourcing.persistence import StoredEvent

    from sle_events.demo import PEOPLE
    from sle_events.signing.envelope import GENESIS, open_sealed, seal
    from sle_events.signing.keys import Signer
    from sle_events.store.record import StudyRecord

    n = copy_to(source, target)
    signers = {(a, r): Signer.from_file(keys / f"{name}.pem", a, r) for name, (a, r) in PEOPLE.items()}
    src = sa.create_engine(source)
    ev = StudyRecord.events_table()
    with src.connect() as conn:
        rows = [
            (str(stream), bytes(state))
            for stream, state in conn.execute(sa.select(ev.c.originator_id, ev.c.state).order_by(ev.c.id))
        ]
    src.dispose()
    envelopes = [(stream, open_sealed(state).envelope) for stream, state in rows]
    study = next(env["stream"] for _, env in envelopes if env["type"] == "Study.Created")
    copied_streams = {stream for stream, env in envelopes if env["stream"] != study}
    dst = StudyRecord(target)
    try:
        for j in range(1, copies + 1):
            rename = {old: str(uuid5(UUID(old), f"copy-{j}")) for old in copied_streams}
            heads: dict[str, str] = {}
            batch: list[Any] = []
            for stream, env in envelopes:
                if stream not in copied_streams:
                    continue
                text = json.dumps(env["payload"])
                for old, new in rename.items():
                    if old in text:
                        text = text.replace(old, new)
                payload = json.loads(text)
                if "screening_number" in payload:
                    payload["screening_number"] = f"{payload['screening_number']}.{j}"
                new_stream = rename[stream]
                one = seal(
                    dict(env, stream=new_stream, payload=payload, prev=heads.get(new_stream, GENESIS)),
                    signers[(env["actor"], env["role"])],
                )
                heads[new_stream] = one.hash
                batch.append(StoredEvent(UUID(new_stream), one.version, env["type"], one.sealed))
                if len(batch) == 5000:
                    dst.recorder.insert_events(batch)
                    n, batch = n + len(batch), []
            if batch:
                dst.recorder.insert_events(batch)
                n += len(batch)
            print(f"  copy {j}: {n:,} events", file=sys.stderr)
    finally:
        dst.close()
    return n


def ledger_up(url: str, keys: Path) -> None:
    from sle_events.demo import setup_demo_ledger

    setup_demo_ledger(url, keys)


def cheap_store(url: str, events: int, per_subject: int = 1000) -> Path:
    """`events` signed events (see the module docstring); returns the keys folder (the exporter's key in it)."""
    from eventsourcing.persistence import StoredEvent

    from sle_events.domain import clock
    from sle_events.domain.event_types import name_of
    from sle_events.domain.study_config import IcfVersion, Site, StudyConfig
    from sle_events.domain.subject import Subject
    from sle_events.signing.envelope import GENESIS, seal
    from sle_events.signing.keys import Signer
    from sle_events.store.codec import envelope_for
    from sle_events.store.record import StudyRecord
    from sle_events.trial import Trial

    keys = Path(tempfile.mkdtemp(prefix="sle-bench-odm-keys-"))
    start = datetime(2020, 1, 1, tzinfo=UTC)
    sim = clock.SimulatedClock(start)
    people = {
        n: Signer.generate(a, r)
        for n, a, r in (("admin", "admin", "admin"), ("coordinator", "nurse", "coordinator"), ("lab", "lab", "lab"),
                        ("investigator", "dr", "investigator"), ("data_manager", "dm", "data_manager"))
    }  # fmt: skip
    for n, s in people.items():
        s.save(keys / f"{n}.pem")
    with clock.use_clock(sim):
        record = StudyRecord(url, clock=sim)
        trial = Trial.create(record, code="BENCH", title="ODM memory", admin=people["admin"],
                             people=[people[n] for n in people if n != "admin"], occurred_at=start)  # fmt: skip
        trial.add_site("NJ01", "Drum Tower", "Asia/Shanghai", signer=people["data_manager"], occurred_at=start)
        config = StudyConfig.build(
            sites=[Site(site_id="NJ01", name="Drum Tower", timezone="Asia/Shanghai")],
            icf_versions=[IcfVersion(version="ICF v1.0", effective_from=start - timedelta(days=1))],
        )
        rng, study = random.Random(1), trial.study_id
        # One subject through the domain verbs (its template), the others its copies under their own stream and
        # screening number, each re-signed: making a million events costs signing, not the domain's checks.
        day0 = sim() + timedelta(days=1)
        sim.set(day0 + timedelta(days=2 + per_subject // len(ANALYTES)))
        subject = Subject.screen(study, "NJ01", "NJ01-000000", day0, config=config)
        subject.obtain_consent("ICF v1.0", day0 + timedelta(hours=1), config=config, taken_by="dr")
        for i in range(per_subject - 2):
            code, unit, lo, hi, scale = ANALYTES[i % len(ANALYTES)]
            when = day0 + timedelta(days=1 + i // len(ANALYTES), hours=2)
            subject.record_lab_result(code, Decimal(rng.randint(lo, hi)) / scale, unit, when, config=config)
        template = [(envelope_for(e, study=study, prev=GENESIS), name_of(e)) for e in subject.collect_events()]
        signers = {1: people["coordinator"], 2: people["investigator"]}
        done, n_subject, t = 10, 0, time.perf_counter()
        while done < events:
            number = f"NJ01-{n_subject:06d}"
            stream = str(uuid5(study, number))
            prev, batch = GENESIS, []
            for env, topic in template[: min(per_subject, events - done)]:
                env = dict(env, stream=stream, prev=prev)
                if env["version"] == 1:
                    env["payload"] = dict(env["payload"], screening_number=number)
                one = seal(env, signers.get(env["version"], people["lab"]))
                prev = one.hash
                batch.append(StoredEvent(UUID(stream), one.version, topic, one.sealed))
            for k in range(0, len(batch), 5000):
                record.recorder.insert_events(batch[k : k + 5000])
            done += len(batch)
            n_subject += 1
            if n_subject % 100 == 0:
                print(f"  {done:,} events, {done / (time.perf_counter() - t):,.0f}/s", file=sys.stderr)
        record.close()
    return keys


# ---------------------------------------------------------------------------------------------- measuring
def bare_read(url: str, position: int) -> float:
    from sle_events.store.record import StudyRecord

    ev = StudyRecord.events_table()
    engine = sa.create_engine(url)
    t = time.perf_counter()
    with engine.connect() as conn:
        for (state,) in conn.execution_options(stream_results=True, yield_per=5000).execute(
            sa.select(ev.c.state).where(ev.c.id <= position).order_by(ev.c.id)
        ):
            json.loads(bytes(state))
    took = time.perf_counter() - t
    engine.dispose()
    return took


def export_once(url: str, kind: str) -> Any:
    from sle_events.exports.manifest import latest_checkpoint
    from sle_events.exports.odm import export_odm
    from sle_events.exports.scope import ExportScope

    out = Path(tempfile.mkdtemp(prefix="sle-bench-odm-out-")) / f"{kind}.xml"
    stats = export_odm(url, out, file_type=kind, scope=ExportScope().resolve(url), checkpoint=latest_checkpoint(url))  # type: ignore[arg-type]  # a FileType literal
    out.unlink()
    return stats


def _subjects(url: str) -> int:
    """Enrolled subjects of the record."""
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        n = conn.execute(sa.text("select count(*) from study_events where topic = 'Subject.Enrolled'")).scalar()
    engine.dispose()
    return int(n or 0)


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} s ({min(values):.1f}–{max(values):.1f})"


def demo(subjects: int, reuse: tuple[str, Path] | None) -> None:
    print(f"# ODM export, {subjects}-subject demo — {machine()}")
    sqlite_url, keys = reuse or record_demo(subjects)
    recorded = _subjects(sqlite_url)
    if recorded < subjects:  # a smaller demo, grown to the size asked for (see grow_demo)
        grown = fresh("sqlite")
        t = time.perf_counter()
        n = grow_demo(sqlite_url, keys, round(subjects / recorded) - 1, grown)
        print(f"  grew the {recorded}-subject demo to {_subjects(grown)} subjects ({n:,} events) in "
              f"{time.perf_counter() - t:.0f} s", file=sys.stderr)  # fmt: skip
        sqlite_url = grown
    targets = [("sqlite", sqlite_url)]
    pg = fresh("postgresql")
    t = time.perf_counter()
    copied = copy_to(sqlite_url, pg)
    print(f"  copied {copied:,} events to PostgreSQL in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    targets.append(("postgresql", pg))
    for engine, url in targets:
        ledger_up(url, keys)
        from sle_events.exports.manifest import latest_checkpoint

        position = latest_checkpoint(url).position
        rounds: dict[str, list[float]] = {"baseline": [], "transactional": [], "snapshot": []}
        cpu: dict[str, list[float]] = {"transactional": [], "snapshot": []}
        shares: dict[str, list[float]] = {"transactional": [], "snapshot": []}
        last: dict[str, Any] = {}
        for _ in range(ROUNDS):
            rounds["baseline"].append(bare_read(url, position))
            for kind in ("transactional", "snapshot"):
                stats = export_once(url, kind)
                rounds[kind].append(stats.seconds)
                cpu[kind].append(stats.cpu_seconds)
                shares[kind].append(stats.reading_seconds / stats.seconds)
                last[kind] = stats
        base = statistics.median(rounds["baseline"])
        print(f"{engine:10} bare read+decode of {position:,} events: {spread(rounds['baseline'])}")
        for kind in ("transactional", "snapshot"):
            s = last[kind]
            print(
                f"{engine:10} {kind:13} {spread(rounds[kind])} (CPU {spread(cpu[kind])}), ratio to bare read "
                f"{statistics.median(rounds[kind]) / base:.1f}×; reading events "
                f"{statistics.median(shares[kind]):.0%} / XML {1 - statistics.median(shares[kind]):.0%}; "
                f"{s.subjects} subjects, {s.item_data:,} ItemData, {s.bytes / 1e6:.0f} MB"
            )


_CHILD = """
import json, resource, sys, time
from pathlib import Path
from sle_events.exports.manifest import latest_checkpoint
from sle_events.exports.odm import export_odm
from sle_events.exports.scope import ExportScope
url, kind, out = sys.argv[1:4]
stats = export_odm(url, Path(out), file_type=kind, scope=ExportScope().resolve(url), checkpoint=latest_checkpoint(url))
print(json.dumps({"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "seconds": stats.seconds,
                  "cpu": stats.cpu_seconds,
                  "reading": stats.reading_seconds, "events": stats.events, "bytes": stats.bytes}))
"""


def rss(sizes: list[int]) -> None:
    print(f"# ODM export peak RSS on PostgreSQL — {machine()}")
    for size in sizes:
        url = fresh("postgresql")
        t = time.perf_counter()
        keys = cheap_store(url, size)
        made = time.perf_counter() - t
        t = time.perf_counter()
        ledger_up(url, keys)
        print(f"  {size:,} events made in {made:.0f} s, ledger in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        # the read models brought up to date first, as a running system keeps them: the export reads the
        # sign-offs' status from them, and would otherwise project the whole record itself before exporting
        # in a child: ru_maxrss survives fork and exec, so a large parent would show as every export's peak
        t = time.perf_counter()
        project = "import sys; from projections.read import StudyReader; StudyReader(sys.argv[1]).close()"
        subprocess.run([sys.executable, "-c", project, url], check=True)
        print(f"  read models projected in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        for kind in ("transactional", "snapshot"):
            out = Path(tempfile.mkdtemp(prefix="sle-bench-odm-rss-")) / "odm.xml"
            done = subprocess.run(
                [sys.executable, "-c", _CHILD, url, kind, str(out)], capture_output=True, text=True, check=True
            )
            r = json.loads(done.stdout.strip().splitlines()[-1])
            out.unlink()
            print(
                f"{size:>9,} events {kind:13} peak RSS {r['rss_mb']:.0f} MB, {r['seconds']:.0f} s "
                f"(CPU {r['cpu']:.0f} s; {r['events'] / r['seconds']:,.0f} events/s, reading "
                f"{r['reading'] / r['seconds']:.0%}), "
                f"{r['bytes'] / 1e6:.0f} MB written"
            )


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] == "demo":
        rest = args[1:]
        reuse = None
        if "--reuse" in rest:
            i = rest.index("--reuse")
            reuse = (f"sqlite:///{Path(rest[i + 1]).resolve()}", Path(rest[i + 2]))
            del rest[i : i + 3]
        demo(int(rest[0]) if rest else 300, reuse)
    elif args[0] == "rss":
        rss([int(a) for a in args[1:]] or [50_000, 200_000])
    else:
        sys.exit("usage: python -m bench.bench_odm demo [N] [--reuse FILE.db KEYS] | rss SIZE...")


if __name__ == "__main__":
    main()
