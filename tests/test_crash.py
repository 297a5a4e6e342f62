"""A writer killed with SIGKILL mid-run loses nothing it acknowledged and leaves nothing half-written.

The child (tests/crash_writer.py) appends single events and multi-stream batches in a loop, printing
``ACK <stream> <version>`` only after each append returned. The parent kills it after ~150 acks, then checks
the database: every acked event is there, the whole record verifies, and a new writer can carry on.
"""

from __future__ import annotations

import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from uuid import UUID

import pytest
import sqlalchemy as sa

from sle_events.audit.verifier import verify_record
from sle_events.signing.keys import Signer
from sle_events.store.record import StudyRecord

from conftest import STUDY_CONFIG, count_rows

pytestmark = [pytest.mark.storage, pytest.mark.slow]
WRITER = Path(__file__).with_name("crash_writer.py")
ROOT = Path(__file__).resolve().parent.parent
MIN_ACKS = 150
ROUNDS = 3
DEADLINE = 15.0  # seconds to collect the acks


def run_until_killed(
    url: str, work: Path, acks_wanted: int, founder_keys: Path | None = None
) -> tuple[str, list[tuple[str, int]]]:
    """Start the writer, SIGKILL it once `acks_wanted` events are acknowledged; return (study, acks). A writer
    into a database that holds a study has its own study approved with the first one's admin key."""
    keys = work / "keys"
    keys.mkdir()
    errors = work / "writer.stderr"
    with errors.open("w") as stderr:
        founder = [str(founder_keys)] if founder_keys else []
        proc = subprocess.Popen(
            [sys.executable, str(WRITER), url, str(keys), *founder],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            cwd=ROOT,
        )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    study = ""
    acks: list[tuple[str, int]] = []

    def take(line: str) -> None:
        nonlocal study
        word, *rest = line.split()
        if word == "READY":
            study = rest[0]
        elif word == "ACK":
            acks.append((rest[0], int(rest[1])))

    problem = None
    try:
        deadline = time.monotonic() + DEADLINE
        while len(acks) < acks_wanted:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                problem = f"the writer acked only {len(acks)} events in {DEADLINE} s"
                break
            if line is None:
                problem = f"the writer ended by itself after {len(acks)} acks"
                break
            take(line)
        if problem is None and proc.poll() is not None:
            problem = "the writer was no longer running when it was to be killed"
        os.kill(proc.pid, signal.SIGKILL)  # mid-run: it is busy with its next append
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        reader.join(timeout=10)
    if problem:
        pytest.fail(f"{problem}; stderr:\n{errors.read_text()[-3000:]}")
    assert proc.returncode == -signal.SIGKILL
    # Acks the writer printed before the kill landed are just as binding.
    while (line := lines.get_nowait()) is not None:
        take(line)
    return study, acks


def stored_versions(url: str) -> set[tuple[str, int]]:
    record = StudyRecord(url, verify_threads=1)
    t = record.table
    try:
        with record.engine.connect() as conn:
            rows = conn.execute(sa.select(t.c.originator_id, t.c.originator_version))
            return {(str(stream), version) for stream, version in rows}
    finally:
        record.close()
        record.engine.dispose()


def check_after_crash(
    url: str, study: str, acks: list[tuple[str, int]], before: set[tuple[str, int]], workers: int
) -> set[tuple[str, int]]:
    assert study and len(acks) >= MIN_ACKS
    assert len(set(acks)) == len(acks), "each (stream, version) is acked once"
    streams = {s for s, _ in acks}
    assert len(streams) >= 5 and study in streams

    stored = stored_versions(url)
    lost = set(acks) - stored
    assert not lost, f"{len(lost)} acknowledged events are missing after the crash: {sorted(lost)[:5]}"
    assert len(stored) == count_rows(url)
    # Beyond the acks there can only be the one append that committed before its ack was printed: at most
    # one batch (4 subjects x 3 lab results), each event at the head of its stream.
    extra = stored - before - set(acks)
    assert len(extra) <= 12, sorted(extra)
    acked_head: dict[str, int] = {}
    for s, v in acks:
        acked_head[s] = max(v, acked_head.get(s, 0))
    assert all(v > acked_head.get(s, 0) for s, v in extra)

    report = verify_record(url, workers=workers)
    assert report.findings == [], report.findings[:5]
    assert report.events == len(stored)
    return stored


def test_sigkilled_writer_keeps_every_acked_event_and_the_record_verifies(db_url, tmp_path):
    stored: set[tuple[str, int]] = set()
    studies: set[str] = set()
    for round in range(ROUNDS):  # each writer has its own study; later ones write into a crashed database
        work = tmp_path / f"round{round}"
        work.mkdir()
        founder = tmp_path / "round0" / "keys" if round else None
        study, acks = run_until_killed(db_url, work, MIN_ACKS + random.randint(0, 60), founder)
        studies.add(study)
        stored = check_after_crash(db_url, study, acks, stored, workers=1 + round % 2)

    # A new writer continues the most recently written subject stream and another one from early on.
    keys = work / "keys"
    admin, investigator, lab = (
        Signer.from_file(keys / f"{name}.pem", actor, role)
        for name, actor, role in (
            ("admin", "admin@site", "admin"),
            ("investigator", "dr.wang", "investigator"),
            ("lab", "lab.service", "lab"),
        )
    )
    subject_streams = [s for s, _ in acks if s not in studies]
    record = StudyRecord(db_url)
    added = 0
    try:
        for stream in dict.fromkeys([subject_streams[-1], subject_streams[0]]):
            subject = record.get(UUID(stream))
            head = max(v for s, v in stored if s == stream)
            assert subject.version == head
            now = datetime.now(UTC)
            if subject.status == "SCREENED":
                subject.obtain_consent("ICF v1.0", now, config=STUDY_CONFIG, taken_by="dr.wang")
                signer = investigator
            else:
                subject.record_lab_result("C3", Decimal("92"), "mg/dL", now)
                signer = lab
            [event] = record.record(subject, signer=signer)
            assert event.version == head + 1
            added += 1
            assert record.stream(UUID(stream))[-1].sealed == event.sealed
        # The registry stream continues as well.
        registry = record.get(UUID(study))
        extra = Signer.generate("monitor.x", "monitor")
        registry.register_key(extra.actor, extra.role, extra.public_key_b64, datetime.now(UTC))
        added += len(record.record(registry, signer=admin))
    finally:
        record.close()
        record.engine.dispose()
    for workers in (1, 2):
        report = verify_record(db_url, workers=workers)
        assert report.ok, report.findings[:5]
        assert report.events == len(stored) + added == count_rows(db_url)
