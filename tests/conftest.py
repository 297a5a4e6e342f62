"""Shared fixtures. Every storage test runs on SQLite and on PostgreSQL.

PostgreSQL: the server of $SLE_TEST_POSTGRES_URL (default the local `test` database); each session works in a
database of its own (`sle_test_<pid>`), dropped at exit. If the server is unreachable the
PostgreSQL cases are skipped, unless SLE_REQUIRE_POSTGRES=1 (CI), where they fail.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from sle_events.domain.study import Study
from sle_events.domain.subject import Subject
from sle_events.signing.envelope import seal
from sle_events.signing.keys import Signer
from sle_events.store.codec import envelope_for
from sle_events.store.record import StudyRecord

BASE_PG_URL = os.environ.get("SLE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REQUIRE_PG = os.environ.get("SLE_REQUIRE_POSTGRES") == "1"
# Each test session works in a database of its own, made from the configured one's server, so that two
# runs at once (two developers, a developer and CI) never reset each other's tables.
PG_URL = str(sa.engine.make_url(BASE_PG_URL).set(database=f"sle_test_{os.getpid()}"))
_pg_state: dict[str, str | None] = {}


def _admin_engine() -> sa.Engine:
    return sa.create_engine(BASE_PG_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})


def _pg_problem() -> str | None:
    if "problem" not in _pg_state:
        try:
            engine = _admin_engine()
            with engine.connect() as conn:
                name = sa.engine.make_url(PG_URL).database
                conn.execute(sa.text(f'drop database if exists "{name}" with (force)'))
                conn.execute(sa.text(f'create database "{name}"'))
            engine.dispose()
            atexit.register(_drop_session_database)
            _pg_state["problem"] = None
        except Exception as e:
            _pg_state["problem"] = f"{type(e).__name__}: {e}"
    return _pg_state["problem"]


def _drop_session_database() -> None:
    try:
        engine = _admin_engine()
        with engine.connect() as conn:
            conn.execute(sa.text(f'drop database if exists "{sa.engine.make_url(PG_URL).database}" with (force)'))
        engine.dispose()
    except Exception:
        pass


def reset_postgres(url: str = PG_URL) -> None:
    """Empty the session's database: end other sessions, drop and recreate the public schema."""
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(
            sa.text(
                "select pg_terminate_backend(pid) from pg_stat_activity "
                "where datname = current_database() and pid <> pg_backend_pid()"
            )
        )
        conn.execute(sa.text("drop schema if exists public cascade"))
        conn.execute(sa.text("create schema public"))
    engine.dispose()


def clean_postgres_url() -> str:
    """The session's PostgreSQL database, emptied; skips the test if the server is unreachable, or fails it
    when SLE_REQUIRE_POSTGRES=1."""
    problem = _pg_problem()
    if problem:
        if REQUIRE_PG:
            pytest.fail(f"PostgreSQL is required (SLE_REQUIRE_POSTGRES=1) but unreachable at {BASE_PG_URL}: {problem}")
        pytest.skip(f"PostgreSQL unreachable at {BASE_PG_URL}: {problem}")
    reset_postgres()
    return PG_URL


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'study.db'}"
    return clean_postgres_url()


def position_of(trial: Any, stream: Any, version: int) -> int:
    """The log position of a stream's version in the trial's record."""
    t = trial.record.table
    with trial.record.engine.connect() as conn:
        return conn.execute(
            sa.select(t.c.id).where(t.c.originator_id == stream, t.c.originator_version == version)
        ).scalar_one()


def count_rows(url: str, table: str = "study_events") -> int:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text(f"select count(*) from {table}")).scalar_one()
    finally:
        engine.dispose()


def execute_sql(url: str, sql: str, **params: object) -> None:
    """Tamper with the real table, as a DBA with SQL access could."""
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(sql), params)
    finally:
        engine.dispose()


@dataclass
class Trial:
    url: str
    record: StudyRecord
    study: Study
    admin: Signer
    coordinator: Signer
    investigator: Signer
    lab: Signer

    def rows(self) -> int:
        return count_rows(self.url)


@pytest.fixture
def trial(db_url: str) -> Iterator[Trial]:
    """A study with an admin (trust root), a coordinator, an investigator and a lab service key."""
    record = StudyRecord(db_url)
    now = datetime.now(UTC)
    admin = Signer.generate("admin@site", "admin")
    coordinator = Signer.generate("nurse.li", "coordinator")
    investigator = Signer.generate("dr.wang", "investigator")
    lab = Signer.generate("lab.service", "lab")
    study = Study.create("ALLOMSC-SLE", "AlloMSC", admin.actor, admin.public_key_b64, now)
    for s in (coordinator, investigator, lab):
        study.register_key(s.actor, s.role, s.public_key_b64, now)
    record.record(study, signer=admin)
    yield Trial(db_url, record, study, admin, coordinator, investigator, lab)
    record.close()
    record.engine.dispose()


# A study configuration for tests that call Subject verbs directly (without sle_events.trial.Trial): site NJ01
# and ICF "ICF v1.0" approved long ago. Consent verbs need a study's ICF versions (T2).
from sle_events.domain.study_config import IcfVersion, Site, StudyConfig  # noqa: E402  # imported next to the configuration it builds

STUDY_CONFIG = StudyConfig.build(
    sites=[Site(site_id="NJ01", name="Nanjing Drum Tower", timezone="Asia/Shanghai")],
    icf_versions=[IcfVersion(version="ICF v1.0", effective_from=datetime(2000, 1, 1, tzinfo=UTC))],
)


def rival_consents(trial: Trial) -> tuple[Any, list[Any]]:
    """A screened subject (stored) and two consents for it sealed at the same version 2, taken by different
    investigators: whoever stores first wins, the other is a version conflict."""
    subject = Subject(trial.study.id, "NJ01", "SCR-900", datetime.now(UTC) - timedelta(days=1))
    trial.record.record(subject, signer=trial.coordinator)
    head = trial.record.stream(subject.id)[-1]
    rivals = []
    for taken_by in ("dr.wang", "dr.li"):
        twin = trial.record.get(subject.id)
        twin.obtain_consent("ICF v1.0", datetime.now(UTC), config=STUDY_CONFIG, taken_by=taken_by)
        [event] = twin.collect_events()
        rivals.append(seal(envelope_for(event, study=trial.study.id, prev=head.hash, reason=None), trial.investigator))
    return subject, rivals
