"""Event types are named by the trial (`Subject.LabResultRecorded`), never by Python path, and every name ever
signed stays readable: old databases (types stored as `sle_events.domain.subject:Subject.Screened`) still
verify, load and project."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import UUID

import pytest
import sqlalchemy as sa

from projections.runner import ProjectionRunner
from projections.schema import patient_state
from sle_events.audit.verifier import verify_record
from sle_events.domain.event_types import EVENT_TYPES, LEGACY_TOPICS, UnknownEventName, event_class, name_of
from sle_events.domain.product import ProductLot
from sle_events.domain.review import Query, SourceVerification
from sle_events.domain.study import Study
from sle_events.domain.subject import Subject
from sle_events.signing.canonical import canonical_json
from sle_events.signing.envelope import GENESIS, SealedEvent, seal
from sle_events.store.codec import envelope_for
from sle_events.store.errors import UnknownEventType
from sle_events.store.record import StudyRecord
from tests.conftest import STUDY_CONFIG, count_rows

FIXTURES = Path(__file__).parent / "fixtures"
NOW = datetime.now(UTC)
TRIAL_RECORDS = ("Study", "Subject", "ProductLot", "SourceVerification", "Query", "Casebook")


def signed_names() -> list[str]:
    lines = (FIXTURES / "signed-event-names.txt").read_text().splitlines()
    return [line for line in lines if line and not line.startswith("#")]


def test_every_name_ever_signed_still_resolves():
    for name in signed_names():
        cls = event_class(name)
        assert name_of(cls) == name.rsplit(":", 1)[-1]


def test_every_registered_name_is_in_the_list_of_signed_names():
    # A name added to the registry is added to the list too, and from then on must always resolve.
    # (Other tests register names of their own aggregates: only the trial's records count here.)
    trial_names = {n for n in EVENT_TYPES if n.split(".")[0] in TRIAL_RECORDS}
    assert trial_names <= set(signed_names())


def test_every_fact_of_the_aggregates_has_a_name():
    # Facts the verbs can produce: nested event classes other than the library's unused defaults.
    for aggregate in (Study, Subject, ProductLot, SourceVerification, Query):
        for attr, value in vars(aggregate).items():
            if isinstance(value, type) and issubclass(value, aggregate.Event) and attr not in ("Event", "Created"):
                assert name_of(value) == f"{aggregate.__name__}.{attr}"
    assert name_of(Study.Created) == "Study.Created"


def test_names_are_trial_vocabulary_not_python_paths():
    for name in EVENT_TYPES:
        if name.startswith("Specimen."):
            continue  # a test's own aggregate (test_upcasting)
        record, fact = name.split(".")
        assert ":" not in name and record in TRIAL_RECORDS and fact[0].isupper()


def test_moving_an_event_class_changes_no_signed_byte():
    subject = Subject.screen(UUID(int=7), "NJ01", "NJ01-0001", NOW - timedelta(hours=1), config=STUDY_CONFIG)
    [screened] = subject.collect_events()
    before = canonical_json(envelope_for(screened, study=UUID(int=7), prev=GENESIS))
    cls = type(screened)
    where = cls.__module__, cls.__qualname__
    cls.__module__, cls.__qualname__ = "sle_events.somewhere_else.subjects", "Participant.Registered"
    try:
        after = canonical_json(envelope_for(screened, study=UUID(int=7), prev=GENESIS))
    finally:
        cls.__module__, cls.__qualname__ = where
    assert after == before and b'"type":"Subject.Screened"' in after


def test_an_unknown_name_is_refused_with_the_name():
    with pytest.raises(UnknownEventName, match=r"'Subject\.LabResultsRecorded'"):
        event_class("Subject.LabResultsRecorded")


@pytest.mark.storage
@pytest.mark.parametrize("sent", ["Subject.LabResultsRecorded", "this:s", "os:system", "LabResultRecorded"])
def test_append_refuses_an_unknown_type_naming_it_and_imports_nothing(trial, sent):
    subject = Subject.screen(trial.study.id, "NJ01", "NJ01-0009", NOW - timedelta(hours=1), config=STUDY_CONFIG)
    [screened] = subject.collect_events()
    env = dict(envelope_for(screened, study=trial.study.id, prev=GENESIS), type=sent)
    good = seal(env, trial.coordinator)
    # An all-zero signature: the type must be refused as unknown before any signature or import is attempted.
    forged = SealedEvent.build(good.envelope, good.signed, bytes(64))
    rows = trial.rows()
    with pytest.raises(UnknownEventType, match=repr(sent).replace("(", r"\(")):
        trial.record.append([forged])
    assert trial.rows() == rows


def test_resolving_a_name_imports_nothing():
    code = (
        "import sys; from sle_events.domain.event_types import event_class, UnknownEventName\n"
        "try:\n    event_class('this:s')\nexcept UnknownEventName as e:\n    print('refused', e)\n"
        "print('this' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1] == "False" and "The Zen of Python" not in out


@pytest.mark.storage
def test_new_events_store_their_name_in_the_topic_column(trial):
    with sa.create_engine(trial.url).connect() as conn:
        topics = set(conn.execute(sa.text("select topic from study_events")).scalars())
    assert topics == {"Study.Created", "Study.KeyRegistered"}


def load_legacy_rows(url: str) -> int:
    """A database written before stable names (`sle demo --subjects 1` at commit 8a68617), inserted row by row."""
    record = StudyRecord(url)  # creates the table
    table = record.table
    with gzip.open(FIXTURES / "pre-stable-names.jsonl.gz", "rt") as f:
        rows = [json.loads(line) for line in f]
    with record.engine.begin() as conn:
        conn.execute(
            table.insert(),
            [
                {
                    "id": r["id"],
                    "originator_id": UUID(r["stream"]),
                    "originator_version": r["version"],
                    "topic": r["topic"],
                    "state": r["state"].encode(),
                }
                for r in rows
            ],
        )
        if url.startswith("postgresql"):
            conn.execute(
                sa.text("select setval(pg_get_serial_sequence('study_events', 'id'), max(id)) from study_events")
            )
    record.close()
    return len(rows)


@pytest.mark.storage
def test_a_database_from_before_stable_names_verifies_loads_and_projects(db_url):
    n = load_legacy_rows(db_url)
    assert all(":" in t for t in LEGACY_TOPICS)

    report = verify_record(db_url, workers=1)
    assert report.ok, report.findings
    assert report.events == n == count_rows(db_url)

    record = StudyRecord(db_url)
    with record.engine.connect() as conn:
        streams = conn.execute(sa.text("select distinct topic from study_events")).scalars().all()
        assert {t.split(":")[0] for t in streams} <= {
            "sle_events.domain.study",
            "sle_events.domain.subject",
            "sle_events.domain.product",
        }
    subjects = []
    with record.engine.connect() as conn:
        ids = conn.execute(sa.select(record.table.c.originator_id).distinct()).scalars().all()
    for stream in ids:
        aggregate = record.get(stream)
        if isinstance(aggregate, Subject):
            subjects.append(aggregate)
    assert {s.screening_number for s in subjects} == {"NJ01-0001", "NJ01-0002"}
    record.close()

    runner = ProjectionRunner(db_url)
    runner.catch_up()
    with runner.engine.connect() as conn:
        statuses = dict(conn.execute(sa.select(patient_state.c.screening_number, patient_state.c.status)).all())
    runner.close()
    assert set(statuses) == {"NJ01-0001", "NJ01-0002"}
    assert statuses["NJ01-0002"] != "SCREENED"  # the enrolled subject's later facts were folded in
