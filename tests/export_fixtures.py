"""A recorded demo trial with its ledger (integrated, a signed checkpoint), shared by a test module: one per
engine. On PostgreSQL it lives in a database of its own (not the session's, which other fixtures reset)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa

from sle_events.demo import run_demo, setup_demo_ledger
from sle_events.store.record import StudyRecord

from conftest import BASE_PG_URL, REQUIRE_PG, _admin_engine, _pg_problem


@dataclass
class DemoLedger:
    url: str
    keys: Path  # the demo's keys folder (data_manager.pem, ..., log.key)
    vkey: str
    study_id: str
    subjects: int
    folder: Path  # a scratch folder for exports


def _pg_database(name: str) -> Iterator[str]:
    problem = _pg_problem()
    if problem:
        if REQUIRE_PG:
            pytest.fail(f"PostgreSQL is required (SLE_REQUIRE_POSTGRES=1) but unreachable at {BASE_PG_URL}: {problem}")
        pytest.skip(f"PostgreSQL unreachable at {BASE_PG_URL}: {problem}")
    db = f"sle_test_{os.getpid()}_{name}"
    _admin(f'drop database if exists "{db}" with (force)', f'create database "{db}"')
    try:
        yield str(sa.engine.make_url(BASE_PG_URL).set(database=db))
    finally:
        _admin(f'drop database if exists "{db}" with (force)')


def _admin(*statements: str) -> None:
    """On a connection of its own, retried: a benchmark's reset of the server's `test` database ends every
    session connected to it, this one's included."""
    for attempt in range(3):
        engine = _admin_engine()
        try:
            with engine.connect() as conn:
                for statement in statements:
                    conn.execute(sa.text(statement))
            return
        except sa.exc.OperationalError:
            if attempt == 2:
                raise
        finally:
            engine.dispose()


def make_demo_ledger(engine: str, folder: Path, name: str, subjects: int) -> Iterator[DemoLedger]:
    def build(url: str) -> DemoLedger:
        record = StudyRecord(url)
        try:
            result = run_demo(record, folder / "keys", subjects=subjects)
        finally:
            record.close()
        vkey = setup_demo_ledger(url, folder / "keys")
        (folder / "out").mkdir()
        return DemoLedger(url, folder / "keys", vkey, result.study_id, subjects, folder / "out")

    if engine == "sqlite":
        yield build(f"sqlite:///{folder / 'study.db'}")
    else:
        for url in _pg_database(name):
            yield build(url)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def demo_ledger(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoLedger]:
    """A 2-subject demo with its ledger, for one test module and engine."""
    module = request.module.__name__.rsplit(".", 1)[-1]
    yield from make_demo_ledger(request.param, tmp_path_factory.mktemp(module), module, 2)
