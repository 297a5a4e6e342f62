"""An API over a fresh study on each engine, with a registered key for every role (import the `world` fixture)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import pytest

with warnings.catch_warnings():  # starlette's note that it prefers httpx2 over httpx: not ours to fix
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from sle_events.api import create_app
from sle_events.client import Client
from sle_events.domain.study import Study
from sle_events.domain.subject import Subject
from sle_events.signing.envelope import GENESIS, SealedEvent, seal
from sle_events.signing.keys import Signer
from sle_events.store.codec import envelope_for
from sle_events.store.record import StudyRecord

NOW = datetime.now(UTC)
ROLES = ["admin", "coordinator", "investigator", "lab", "monitor", "auditor", "data_manager", "sponsor"]


@dataclass
class ApiWorld:
    url: str
    record: StudyRecord
    study: Study
    signers: dict[str, Signer]
    http: TestClient
    clients: dict[str, Client] = field(default_factory=dict)

    def client(self, role: str) -> Client:
        if role not in self.clients:
            self.clients[role] = Client("http://testserver", self.signers[role], self.study.id, http=self.http)
        return self.clients[role]

    def head(self, stream: UUID) -> tuple[int, str]:
        events = self.record.stream(stream)
        return (events[-1].version, events[-1].hash) if events else (0, GENESIS)

    def sealed(self, aggregate: Any, role: str, *, prev: str | None = None, **changes: Any) -> list[SealedEvent]:
        """The aggregate's pending events sealed by `role`'s key, chained on the stored head (not appended)."""
        out: list[SealedEvent] = []
        for event in aggregate.collect_events():
            link = prev or (out[-1].hash if out else self.head(event.originator_id)[1])
            env = envelope_for(event, study=self.study.id, prev=link)
            env.update(changes)
            out.append(seal(env, self.signers[role]))
        return out

    def new_subject(self, number: str = "NJ01-0001") -> Subject:
        return Subject(self.study.id, "NJ01", number, NOW - timedelta(days=1))


@pytest.fixture(name="world")
def world_fixture(db_url: str) -> Iterator[ApiWorld]:
    record = StudyRecord(db_url)
    signers = {role: Signer.generate(f"{role}.user", role) for role in ROLES}
    study = Study.create("ALLOMSC-SLE", "AlloMSC", signers["admin"].actor, signers["admin"].public_key_b64, NOW)
    for role in ROLES[1:]:
        study.register_key(signers[role].actor, role, signers[role].public_key_b64, NOW)
    record.record(study, signer=signers["admin"])
    app = create_app(record=record)
    with TestClient(app) as http:
        yield ApiWorld(db_url, record, study, signers, http)
    record.engine.dispose()
