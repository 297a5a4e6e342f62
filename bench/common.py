"""What every benchmark shares: engines, a clean database, a clock, the raw Ed25519 rate."""

from __future__ import annotations

import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from sle_events.domain.study import Study
from sle_events.domain.study_config import IcfVersion, StudyConfig
from sle_events.domain.subject import Subject
from sle_events.signing.envelope import SealedEvent, seal
from sle_events.signing.keys import Signer
from sle_events.store.codec import envelope_for

PG_URL = os.environ.get("SLE_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
CORES = os.cpu_count() or 1
#: the study configuration the workload's subjects consent under (ICF v1.0, approved long ago)
STUDY_CONFIG = StudyConfig.build(
    icf_versions=[IcfVersion(version="ICF v1.0", effective_from=datetime(2000, 1, 1, tzinfo=UTC))]
)


def engines() -> Iterator[tuple[str, str]]:
    """(name, fresh url) for SQLite and PostgreSQL."""
    yield "sqlite", fresh("sqlite")
    yield "postgresql", fresh("postgresql")


def fresh(engine: str) -> str:
    if engine == "sqlite":
        path = Path(tempfile.mkdtemp(prefix="sle-bench-")) / "bench.db"
        return f"sqlite:///{path}"
    import sqlalchemy as sa

    e = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with e.connect() as conn:
        conn.execute(
            sa.text(
                "select pg_terminate_backend(pid) from pg_stat_activity "
                "where datname = current_database() and pid <> pg_backend_pid()"
            )
        )
        conn.execute(sa.text("drop schema if exists public cascade"))
        conn.execute(sa.text("create schema public"))
    e.dispose()
    return PG_URL


def rate(n: int, fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t)


def ed25519_verify_rate(n: int = 5000) -> float:
    """Raw `cryptography` Ed25519 verifications per second on one core, on envelope-sized messages."""
    signer = Signer.generate("bench", "lab")
    pub = signer._private_key.public_key()
    msgs = [os.urandom(420) for _ in range(n)]
    sigs = [signer.sign(m) for m in msgs]

    def run() -> None:
        for m, s in zip(msgs, sigs, strict=True):
            pub.verify(s, m)

    return max(rate(n, run) for _ in range(3))


def machine() -> str:
    return f"{platform.machine()}, {CORES} cores, Python {platform.python_version()}, {platform.system()}"


class SignedWorkload:
    """A study plus lab events across subjects, sealed client-side as a lab service would send them."""

    def __init__(self, record, subjects: int = 20) -> None:
        now = datetime.now(UTC)
        self.now = now
        self.admin = Signer.generate("admin", "admin")
        self.coordinator = Signer.generate("nurse", "coordinator")
        self.investigator = Signer.generate("dr", "investigator")
        self.lab = Signer.generate("lab", "lab")
        self.study = Study.create("BENCH", "bench", "admin", self.admin.public_key_b64, now)
        for s in (self.coordinator, self.investigator, self.lab):
            self.study.register_key(s.actor, s.role, s.public_key_b64, now)
        record.record(self.study, signer=self.admin)
        self.subjects = []
        for i in range(subjects):
            subject = Subject(self.study.id, "NJ01", f"S{i:04d}", now - timedelta(days=30))
            record.record(subject, signer=self.coordinator)
            subject.obtain_consent("ICF v1.0", now - timedelta(days=29), config=STUDY_CONFIG, taken_by="dr.wang")
            record.record(subject, signer=self.investigator)
            self.subjects.append(subject)
        self.heads = {s.id: record.stream(s.id)[-1].hash for s in self.subjects}

    def sign(self, n: int) -> list[SealedEvent]:
        """n lab results, round-robin over subjects, chained and signed by the lab service."""
        out = []
        when = self.now - timedelta(days=1)
        for i in range(n):
            subject = self.subjects[i % len(self.subjects)]
            subject.record_lab_result("CREAT", Decimal(100 + i % 50) / 100, "mg/dL", when)
            [event] = subject.collect_events()
            sealed = seal(envelope_for(event, study=self.study.id, prev=self.heads[subject.id], reason=None), self.lab)
            self.heads[subject.id] = sealed.hash
            out.append(sealed)
        return out


def free_port_url() -> tuple[str, int]:
    """A loopback URL on a free port, for a server a benchmark starts (web view)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    return f"http://127.0.0.1:{port}", port
