"""Child process for tests/test_crash.py: append to a study record until killed.

Usage: python tests/crash_writer.py URL KEY_DIR

Creates its own study and keys (private keys saved to KEY_DIR as admin.pem, coordinator.pem, investigator.pem,
lab.pem so the parent can continue after the crash), prints ``READY <study id>``, then appends forever: single
events and small batches over several streams. After each append *returns* it prints ``ACK <stream> <version>``
for every event of that append, and flushes. The parent SIGKILLs it mid-run.
"""

from __future__ import annotations

import os
import random
import sys
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from sqlalchemy import select

from sle_events.domain.study import Study
from sle_events.domain.subject import Subject
from sle_events.signing.keys import Signer
from sle_events.store.record import StudyRecord

from conftest import STUDY_CONFIG  # tests/ is on sys.path when this runs as a script

SIGNERS = {
    "admin": ("admin@site", "admin"),
    "coordinator": ("nurse.li", "coordinator"),
    "investigator": ("dr.wang", "investigator"),
    "lab": ("lab.service", "lab"),
}


def ack(stored) -> None:
    sys.stdout.write("".join(f"ACK {e.envelope['stream']} {e.version}\n" for e in stored))
    sys.stdout.flush()


def approve(record: StudyRecord, founder_keys: Path, admin: Signer, code: str) -> None:
    """A database's later studies need its first study's admin to approve them (issue 11)."""
    founder = Signer.from_file(founder_keys / "admin.pem", SIGNERS["admin"][0], "admin")
    t = record.table
    with record.engine.connect() as conn:
        first = conn.execute(select(t.c.originator_id).where(t.c.topic == "Study.Created").order_by(t.c.id)).scalar()
    assert first is not None
    study = record.get(first)
    study.approve_new_study(code, admin.actor, admin.public_key_b64, datetime.now(UTC))
    ack(record.record(study, signer=founder))


def main(url: str, key_dir: Path, founder_keys: Path | None = None) -> None:
    rng = random.Random(7)
    signers = {}
    for name, (actor, role) in SIGNERS.items():
        signer = Signer.generate(actor, role)
        signer.save(key_dir / f"{name}.pem")
        signers[name] = signer
    admin, coordinator, investigator, lab = (signers[n] for n in SIGNERS)
    record = StudyRecord(url)
    if founder_keys is not None:
        approve(record, founder_keys, admin, "CRASH")
    now = datetime.now(UTC)
    study = Study.create("CRASH", "crash test", admin.actor, admin.public_key_b64, now)
    for member in (coordinator, investigator, lab):
        study.register_key(member.actor, member.role, member.public_key_b64, now)
    ack(record.record(study, signer=admin))
    sys.stdout.write(f"READY {study.id}\n")
    sys.stdout.flush()

    subjects: list[Subject] = []
    n = 0
    # CRASH_WRITER_PAUSE (seconds between appends): a writer that a reader chasing it can catch up with
    pause = float(os.environ.get("CRASH_WRITER_PAUSE", "0"))
    while True:
        if pause:
            time.sleep(pause)
        now = datetime.now(UTC)
        step = rng.random()
        if step < 0.25 or len(subjects) < 3:
            n += 1
            subject = Subject(study.id, "NJ01", f"SCR-{n:05d}", now - timedelta(days=2))
            subjects.append(subject)
            ack(record.record(subject, signer=coordinator))  # a new stream, one event
            continue
        pending = [s for s in subjects if s.status == "SCREENED"]
        if step < 0.45 and pending:
            some = rng.sample(pending, min(len(pending), rng.randint(1, 3)))
            for s in some:
                s.obtain_consent("ICF v1.0", now - timedelta(days=1), config=STUDY_CONFIG, taken_by="dr.wang")
            ack(record.record(*some, signer=investigator))  # a batch over up to three streams
            continue
        consented = [s for s in subjects if s.consent_version is not None]
        if not consented:
            continue
        some = rng.sample(consented, min(len(consented), rng.randint(1, 4)))
        for s in some:
            for _ in range(rng.randint(1, 3)):
                s.record_lab_result("CREAT", Decimal(rng.randint(70, 180)) / 100, "mg/dL", now - timedelta(hours=1))
        ack(record.record(*some, signer=lab))  # a batch of several events on up to four streams


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]) if len(sys.argv) > 3 else None)
