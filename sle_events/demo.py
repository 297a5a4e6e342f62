"""A small demo trial: a study, its key holders, and a few subjects' worth of signed events.

Keys are written to a folder next to the database with 0600 permissions; private keys never enter the store.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Callable

from sle_events.domain.study import Study
from sle_events.domain.subject import Subject
from sle_events.signing.keys import Signer
from sle_events.store.record import StudyRecord

SITE_TZ = timezone(timedelta(hours=8))  # Nanjing


@dataclass
class DemoResult:
    study_id: str
    subjects: int
    events: int
    events_by_type: dict[str, int] = field(default_factory=dict)


def demo_signers(key_dir: Path) -> dict[str, Signer]:
    key_dir.mkdir(parents=True, exist_ok=True)
    people = {
        "admin": ("admin@drum-tower", "admin"),
        "coordinator": ("nurse.li", "coordinator"),
        "investigator": ("dr.wang", "investigator"),
        "lab": ("lab.drum-tower", "lab"),
    }
    signers = {}
    for name, (actor, role) in people.items():
        path = key_dir / f"{name}.pem"
        if not path.exists():
            Signer.generate(actor, role).save(path)
        signers[name] = Signer.from_file(path, actor, role)
    return signers


def run_demo(
    record: StudyRecord,
    key_dir: Path,
    *,
    subjects: int = 5,
    seed: int = 1,
    on_progress: Callable[[int, int], None] | None = None,
) -> DemoResult:
    rng = random.Random(seed)
    signers = demo_signers(key_dir)
    now = datetime.now(SITE_TZ)
    study = Study.create("ALLOMSC-SLE", "AlloMSC for refractory SLE with lupus nephritis (NCT00698191)",
                         signers["admin"].actor, signers["admin"].public_key_b64, now)  # fmt: skip
    for name in ("coordinator", "investigator", "lab"):
        s = signers[name]
        study.register_key(s.actor, s.role, s.public_key_b64, now)
    stored = record.record(study, signer=signers["admin"])
    result = DemoResult(str(study.id), subjects, len(stored))
    for i in range(subjects):
        t = now - timedelta(days=rng.randint(120, 200))
        subject = Subject(study.id, "NJ01", f"SCR-{i + 1:03d}", t)
        batches = [record.record(subject, signer=signers["coordinator"])]
        subject.obtain_consent("ICF v1.0", t + timedelta(hours=1))
        subject.confirm_eligibility(t + timedelta(days=7))
        subject.enroll(t + timedelta(days=8))
        batches.append(record.record(subject, signer=signers["investigator"]))
        for month in range(3):
            when = t + timedelta(days=9 + 30 * month)
            creatinine = Decimal(rng.randint(70, 180)) / 100
            subject.record_lab_result("CREAT", creatinine, "mg/dL", when)
            subject.record_lab_result("C3", Decimal(rng.randint(40, 110)), "mg/dL", when)
        batches.append(record.record(subject, signer=signers["lab"]))
        for batch in batches:
            for e in batch:
                name = e.topic.rsplit(":", 1)[-1]
                result.events_by_type[name] = result.events_by_type.get(name, 0) + 1
            result.events += len(batch)
        if on_progress:
            on_progress(i + 1, subjects)
    return result
