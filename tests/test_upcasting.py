"""A changed event schema: events stored under the old schema still verify, load and project (upcasters)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from eventsourcing.domain import Aggregate, event

from projections.audit_trail import AuditTrail, query
from projections.runner import ProjectionRunner
from sle_events.audit.verifier import verify_record
from sle_events.domain.event_types import register_event_type
from sle_events.signing.envelope import GENESIS, seal
from sle_events.store.codec import envelope_for

pytestmark = pytest.mark.storage
NOW = datetime.now(UTC)


class Specimen(Aggregate):
    """A test aggregate whose event gained a field: schema 2 adds `container`, defaulting old events to "tube"."""

    class Collected(Aggregate.Created):
        class_version = 2
        specimen_id: str
        occurred_at: datetime
        container: str

        @staticmethod
        def upcast_v1_v2(state: dict) -> None:
            state["container"] = "tube"

    @event(Collected)
    def __init__(self, specimen_id: str, occurred_at: datetime, container: str = "tube") -> None:
        self.specimen_id = specimen_id
        self.container = container


register_event_type("Specimen.Collected", Specimen.Collected)


def test_old_schema_events_verify_load_and_project(trial):
    trial.study.change_permissions("Specimen.Collected", ["lab"], NOW)
    trial.record.record(trial.study, signer=trial.admin)

    fresh = Specimen("SP-2", NOW - timedelta(hours=1), container="cryovial")
    [new_event] = fresh.collect_events()
    v2 = envelope_for(new_event, study=trial.study.id, prev=GENESIS)
    assert v2["schema"] == 2 and v2["payload"]["container"] == "cryovial"

    # An event written before the schema changed: schema 1, no `container` in what was signed.
    old = Specimen("SP-1", NOW - timedelta(days=400))
    [old_event] = old.collect_events()
    v1 = envelope_for(old_event, study=trial.study.id, prev=GENESIS)
    del v1["payload"]["container"]
    v1["schema"] = 1
    trial.record.append([seal(v1, trial.lab), seal(v2, trial.lab)])

    assert verify_record(trial.url, workers=1).ok  # the v1 bytes are verified as they were signed
    loaded = trial.record.get(old.id)
    assert loaded.container == "tube" and loaded.specimen_id == "SP-1"
    assert trial.record.get(fresh.id).container == "cryovial"

    runner = ProjectionRunner(trial.url, [AuditTrail()])
    runner.catch_up()
    with runner.engine.connect() as conn:
        rows = query(conn, event_type="Specimen.Collected")
    runner.close()
    assert {(r["stream"], r["field"]) for r in rows} >= {(str(old.id), "specimen_id"), (str(fresh.id), "container")}
