"""Source data verification and queries (issue 16): the acts a monitor, a data manager and site staff perform on
the record. Each refusal is specific, stores nothing, and holds for events signed elsewhere (`StudyRecord.append`)
as for the verbs; every case runs on SQLite and PostgreSQL."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from uuid import UUID, uuid4

import pytest

from sle_events.domain.errors import (
    ActorMismatch,
    MissingValue,
    NotTheRaiser,
    QueryStateConflict,
    UnknownFact,
    UnknownQuery,
    UnknownSubject,
)
from sle_events.domain.review import Query, QueryStatus, SdvItem, SdvStatus, SourceVerification, sdv_progress
from sle_events.signing.envelope import GENESIS, SealedEvent, seal
from sle_events.signing.keys import Signer
from sle_events.store.errors import ActRefused, UntrustedKey
from sle_events.store.record import StudyRecord
from sle_events.store.review import open_queries
from sle_events.trial import Trial

from conftest import count_rows

pytestmark = pytest.mark.storage
NOW = datetime.now(UTC)


@dataclass
class Site:
    url: str
    trial: Trial
    people: dict[str, Signer]
    subject: UUID
    creat: int  # the creatinine's version
    egfr: int  # the eGFR derived from it

    def __getattr__(self, name: str) -> Signer:
        return self.people[name]

    def rows(self) -> int:
        return count_rows(self.url)


@pytest.fixture
def site(db_url: str) -> Iterator[Site]:
    """A study with a monitor, a second monitor, the study's checking service, and one subject with a creatinine
    (and the eGFR derived from it)."""
    people = {
        name: Signer.generate(actor, role)
        for name, actor, role in [
            ("admin", "admin@drum-tower", "admin"),
            ("dm", "dm.zhao", "data_manager"),
            ("coordinator", "nurse.li", "coordinator"),
            ("investigator", "dr.wang", "investigator"),
            ("lab", "lab.drum-tower", "lab"),
            ("monitor", "cra.huang", "monitor"),
            ("monitor2", "cra.zhou", "monitor"),
            ("checks", "edc.checks", "data_manager"),
        ]
    }
    record = StudyRecord(db_url)
    trial = Trial.create(
        record,
        code="ALLOMSC-SLE",
        title="AlloMSC",
        admin=people["admin"],
        people=[
            (people["dm"], "Zhao Min"),
            (people["coordinator"], "Li Na"),
            (people["investigator"], "Dr. Wang Li"),
            people["lab"],
            (people["monitor"], "Huang Wei"),
            (people["monitor2"], "Zhou Yan"),
            people["checks"],
        ],
    )
    trial.add_site("NJ01", "Drum Tower Hospital, Nanjing", "Asia/Shanghai", signer=people["dm"])
    trial.approve_icf_version("ICF v1.1", NOW - timedelta(days=30), signer=people["dm"])
    sid = trial.screen("NJ01", "NJ01-0007", NOW - timedelta(hours=3), signer=people["coordinator"])
    trial.obtain_consent(sid, "ICF v1.1", NOW - timedelta(hours=2), signer=people["investigator"], taken_by="dr.wang")
    trial.record_demographics(
        sid, "F", date(1990, 5, 1), NOW - timedelta(hours=2), signer=people["coordinator"], childbearing_potential=True
    )
    creat = trial.record_lab_result(sid, "CREAT", "1.10", "mg/dL", NOW - timedelta(hours=1), signer=people["lab"])
    egfr = trial.subject(sid).version
    assert trial.subject(sid).facts[egfr].type == "DerivedResultRecorded"
    yield Site(db_url, trial, people, sid, creat, egfr)
    record.close()
    record.engine.dispose()


def status_of(site: Site, version: int) -> tuple[SdvStatus, tuple[str, ...]]:
    [fact] = [f for f in site.trial.sdv_status(site.subject) if f.version == version]
    return fact.status, fact.changed_fields


def resealed(event: SealedEvent, signer: Signer, **changes: object) -> SealedEvent:
    """The same envelope with fields changed, signed again (a client of the HTTP API signing its own)."""
    env = copy.deepcopy(event.envelope)
    for k in ("actor", "role", "key"):
        env.pop(k, None)
    env.update(changes)
    return seal(env, signer)


def sealed_by(site: Site, aggregate: object, signer: Signer) -> list[SealedEvent]:
    """Seal an aggregate's pending events as a client would, without appending them."""
    from sle_events.store.codec import envelope_for

    out: list[SealedEvent] = []
    for ev in aggregate.collect_events():  # type: ignore[attr-defined]
        prev = out[-1].hash if out else site.trial.record.head_hash(ev.originator_id, ev.originator_version - 1)
        out.append(seal(envelope_for(ev, study=site.trial.study_id, prev=prev), signer))
    return out


# ======================================================================= source data verification
def test_a_fact_verified_then_corrected_is_changed_since_verified_until_verified_again(site: Site):
    t = site.trial
    assert status_of(site, site.creat) == (SdvStatus.PENDING, ())
    [mark] = t.verify_source(site.subject, [site.creat], signer=site.monitor)
    assert (mark.version, mark.type, mark.field) == (site.creat, "LabResultRecorded", None)
    assert mark.hash == t.record.stream(site.subject)[site.creat - 1].hash  # bound to the signed bytes verified
    assert status_of(site, site.creat) == (SdvStatus.VERIFIED, ())
    t.correct(site.subject, site.creat, {"value": "1.01"}, "transcription error", signer=site.lab)
    assert status_of(site, site.creat) == (SdvStatus.CHANGED, ("canonical_value", "value"))
    t.verify_source(site.subject, [site.creat], field="value", signer=site.monitor)  # one changed field again
    assert status_of(site, site.creat) == (SdvStatus.CHANGED, ("canonical_value",))
    t.verify_source(site.subject, [site.creat], signer=site.monitor)  # the whole fact again
    assert status_of(site, site.creat) == (SdvStatus.VERIFIED, ())
    # the SDV stream is the subject's own, derived from its id, and the clinical stream holds no SDV fact
    sdv = t.source_verification(site.subject)
    assert sdv is not None and sdv.id == SourceVerification.id_for(t.study_id, site.subject)
    assert not any(e.topic.startswith("SourceVerification") for e in t.record.stream(site.subject))


def test_sdv_progress_counts_facts_by_status_and_a_field_mark_is_partial(site: Site):
    t = site.trial
    t.verify_source(site.subject, [1, 2], signer=site.monitor)
    t.verify_source(site.subject, [site.creat], field="value", signer=site.monitor)
    progress = sdv_progress(t.sdv_status(site.subject))
    derived_and_changes = 1  # the eGFR is computed, not source data
    assert progress["total"] == t.subject(site.subject).version - derived_and_changes
    assert (progress["VERIFIED"], progress["PARTIAL"]) == (2, 1)
    assert progress["PENDING"] == progress["total"] - 3


@pytest.mark.parametrize(
    ("versions", "field", "why"),
    [
        ([99], None, "versions 1–"),
        ([3], "no_such_field", "has no field 'no_such_field'"),
        (["egfr"], None, "not source data"),
        ([], None, None),
    ],
)
def test_sdv_of_data_that_does_not_exist_is_refused_and_nothing_is_stored(site: Site, versions, field, why):
    versions = [site.egfr if v == "egfr" else v for v in versions]
    before = site.rows()
    with pytest.raises(UnknownFact if why else MissingValue) as e:
        site.trial.verify_source(site.subject, versions, field=field, signer=site.monitor)
    if why:
        assert why in str(e.value)
    assert site.rows() == before


def test_sdv_of_a_visit_without_facts_and_by_a_role_that_may_not_are_refused(site: Site):
    before = site.rows()
    with pytest.raises(UnknownFact, match="visit 'M3'"):
        site.trial.verify_source(site.subject, visit="M3", signer=site.monitor)
    with pytest.raises(UntrustedKey, match="may not record SourceVerification"):
        site.trial.verify_source(site.subject, [site.creat], signer=site.coordinator)
    assert site.rows() == before


def test_append_refuses_an_sdv_mark_signed_elsewhere_for_data_that_does_not_exist(site: Site):
    t = site.trial
    t.verify_source(site.subject, [site.creat], signer=site.monitor)
    sdv = t.source_verification(site.subject)
    assert sdv is not None
    stream = t.record.stream(sdv.id)
    before = site.rows()
    bad_items = [
        [{"version": 99, "type": "LabResultRecorded", "field": None, "hash": "0" * 64}],  # no such fact
        [{"version": site.creat, "type": "LabResultRecorded", "field": None, "hash": "0" * 64}],  # other bytes
        [{"version": site.creat, "type": "VitalSignsRecorded", "field": None, "hash": stream[0].hash}],  # type
        [{"version": site.egfr, "type": "DerivedResultRecorded", "field": None, "hash": "0" * 64}],  # not source
    ]
    for items in bad_items:
        items_ = [SdvItem(**i) for i in items]
        sdv._verified(subject_id=site.subject, subject_version=site.egfr, items=items_, visit=None, by="cra.huang",
                      occurred_at=NOW)  # fmt: skip
        with pytest.raises(ActRefused) as e:
            t.record.record(sdv, signer=site.monitor)
        assert isinstance(e.value.violation, UnknownFact) and e.value.code == "unknown_fact"
        sdv = t.source_verification(site.subject)
        assert sdv is not None
    # a second SDV stream for the subject (any other id) is refused too
    rogue = SourceVerification.open(t.study_id, t.subject(site.subject), NOW)
    events = sealed_by(site, rogue, site.monitor)
    other = resealed(events[0], site.monitor, stream=str(uuid4()))
    with pytest.raises(ActRefused, match="derived from its id"):
        t.record.append([other])
    assert site.rows() == before


# ======================================================================= queries
def test_a_query_raised_answered_closed_and_reopened(site: Site):
    t = site.trial
    qid = t.raise_query(site.subject, site.creat, "Source says 1.01?", field="value", signer=site.monitor)
    q = t.query(qid)
    assert (q.status, q.raised_by, q.target_version, q.field, q.fact) == (
        QueryStatus.OPEN,
        "cra.huang",
        site.creat,
        "value",
        "LabResultRecorded",
    )
    assert [x.id for x in open_queries(t.record, t.study_id, site.subject)] == [qid]
    t.answer_query(qid, "Transcription error; corrected.", signer=site.lab if False else site.coordinator)
    assert t.query(qid).status == QueryStatus.ANSWERED
    assert [x.id for x in open_queries(t.record, t.study_id)] == [qid]  # answered is not closed: it blocks a lock
    t.close_query(qid, "Resolved.", signer=site.monitor)
    assert t.query(qid).status == QueryStatus.CLOSED
    assert open_queries(t.record, t.study_id) == []
    t.reopen_query(qid, "The correction is still missing.", signer=site.monitor)
    assert t.query(qid).status == QueryStatus.OPEN
    assert [a for a, *_ in t.query(qid).thread] == ["raised", "answered", "closed", "reopened"]
    assert not any(e.topic.startswith("Query") for e in t.record.stream(site.subject))


def test_query_refusals_are_specific_and_store_nothing(site: Site):
    t = site.trial
    qid = t.raise_query(site.subject, site.creat, "Please confirm.", signer=site.monitor)
    t.close_query(qid, "Confirmed by phone.", signer=site.monitor)
    before = site.rows()
    with pytest.raises(QueryStateConflict, match="cannot be answered"):
        t.answer_query(qid, "late answer", signer=site.coordinator)
    with pytest.raises(QueryStateConflict, match="cannot be closed again"):
        t.close_query(qid, "again", signer=site.monitor)
    with pytest.raises(NotTheRaiser, match=r"only its raiser cra\.huang"):
        t.reopen_query(qid, "not mine", signer=site.monitor2)
    with pytest.raises(UnknownQuery):
        t.answer_query(uuid4(), "to nothing", signer=site.coordinator)
    with pytest.raises(UnknownQuery):
        t.answer_query("not-a-uuid", "to nothing", signer=site.coordinator)
    with pytest.raises(UnknownFact):
        t.raise_query(site.subject, 99, "on nothing", signer=site.monitor)
    with pytest.raises(MissingValue):
        t.raise_query(site.subject, site.creat, "  ", signer=site.monitor)
    with pytest.raises(UntrustedKey, match=r"may not record Query\.Raised"):
        t.raise_query(site.subject, site.creat, "a coordinator's query", signer=site.coordinator)
    t.reopen_query(qid, "reopened", signer=site.monitor)
    with pytest.raises(NotTheRaiser, match="may not close"):
        t.close_query(qid, "someone else's", signer=site.monitor2)
    with pytest.raises(NotTheRaiser):  # a data manager closes only automatic queries
        t.close_query(qid, "a data manager's", signer=site.dm)
    assert site.rows() == before + 1  # only the re-opening


def test_append_refuses_query_acts_signed_elsewhere(site: Site):
    t = site.trial
    qid = t.raise_query(site.subject, site.creat, "Please confirm.", signer=site.monitor)
    t.close_query(qid, "Confirmed.", signer=site.monitor)
    before = site.rows()
    refusals: list[tuple[list[SealedEvent], type[Exception]]] = []
    # answering a closed query: the verb would refuse, so the event is built below it
    q = t.query(qid)
    q._answered(text="late", by="nurse.li", occurred_at=NOW)
    refusals.append((sealed_by(site, q, site.coordinator), QueryStateConflict))
    # closing by someone other than the raiser
    q = t.query(qid)
    q._reopened(text="not mine", by="cra.zhou", occurred_at=NOW)
    refusals.append((sealed_by(site, q, site.monitor2), NotTheRaiser))
    # an answer naming someone other than its signer
    q = t.query(qid)
    q._reopened(text="again", by="cra.huang", occurred_at=NOW)
    refusals.append((sealed_by(site, q, site.coordinator), UntrustedKey))  # the role check comes first
    # an unknown query id: an answer as the first event of a stream
    q = t.query(qid)
    q._answered(text="to nothing", by="nurse.li", occurred_at=NOW)
    [answer] = sealed_by(site, q, site.coordinator)
    refusals.append(([resealed(answer, site.coordinator, stream=str(uuid4()), version=1, prev=GENESIS)], UnknownQuery))
    # a query on a fact the subject does not have
    fresh = Query.raise_on(t.study_id, t.subject(site.subject), site.creat, "on v99", by="cra.huang", occurred_at=NOW)
    [raised] = sealed_by(site, fresh, site.monitor)
    payload = {**raised.envelope["payload"], "version": 99}
    refusals.append(([resealed(raised, site.monitor, payload=payload)], UnknownFact))
    # a query naming another subject's screening number (read models trust it: it must be the subject's)
    wrong = {**raised.envelope["payload"], "screening_number": "NJ01-9999"}
    refusals.append(([resealed(raised, site.monitor, payload=wrong)], UnknownSubject))
    # an "automatic" query under an id of the raiser's choosing (a data manager could then close it)
    fake = Query.raise_on(t.study_id, t.subject(site.subject), site.creat, "auto?", by="dm.zhao", occurred_at=NOW,
                          cause="stale/v5")  # fmt: skip
    refusals.append((sealed_by(site, fake, site.dm), UnknownQuery))
    # a query signed by one monitor in another's name
    refusals.append(([resealed(raised, site.monitor2)], ActorMismatch))
    for events, kind in refusals:
        with pytest.raises((ActRefused, UntrustedKey)) as e:
            t.record.append(events)
        if kind is UntrustedKey:
            assert isinstance(e.value, UntrustedKey)
        else:
            assert isinstance(e.value, ActRefused) and isinstance(e.value.violation, kind), (kind, e.value)
    assert site.rows() == before
    # the same acts, signed properly, are accepted through append as well
    q = t.query(qid)
    q.reopen("reopened", by="cra.huang", role="monitor", occurred_at=NOW)
    t.record.append(sealed_by(site, q, site.monitor))
    assert t.query(qid).status == QueryStatus.OPEN


def test_an_exact_resend_of_a_stored_query_act_is_an_idempotent_retry(site: Site):
    t = site.trial
    qid = t.raise_query(site.subject, site.creat, "Please confirm.", signer=site.monitor)
    q = t.query(qid)
    q.close("Confirmed.", by="cra.huang", role="monitor", occurred_at=NOW)
    events = sealed_by(site, q, site.monitor)
    first = t.record.append(events)
    assert t.record.append(events) == first


# ======================================================================= automatic queries
def test_automatic_queries_are_raised_once_and_closed_when_the_cause_is_gone(site: Site):
    t = site.trial
    t.correct(site.subject, site.creat, {"value": "1.01"}, "transcription error", signer=site.lab, derive=False)
    done = t.run_automatic_queries(signer=site.checks)
    assert len(done["raised"]) == 1 and not done["closed"]
    [q] = t.open_queries(site.subject)
    assert (q.cause, q.target_version, q.raised_by) == (f"stale/v{site.egfr}", site.egfr, "edc.checks")
    assert q.id == Query.automatic_id(t.study_id, site.subject, f"stale/v{site.egfr}")
    before = site.rows()
    assert t.run_automatic_queries(signer=site.checks) == {"raised": [], "closed": [], "reopened": []}
    assert site.rows() == before  # idempotent
    # the eGFR is derived again: the cause is gone and the query closes itself, saying why
    t._subject_verb(site.subject, site.lab, lambda s, c: s.derive_egfr(site.creat, config=c))
    done = t.run_automatic_queries(signer=site.checks)
    assert done["closed"] == [q.id]
    closed = t.query(q.id)
    assert closed.status == QueryStatus.CLOSED and "no longer in the record" in closed.thread[-1][2]
    assert t.run_automatic_queries(signer=site.checks) == {"raised": [], "closed": [], "reopened": []}


def test_a_data_manager_may_close_an_automatic_query_but_not_a_monitor(site: Site):
    t = site.trial
    t.correct(site.subject, site.creat, {"value": "1.01"}, "transcription error", signer=site.lab, derive=False)
    [qid] = t.run_automatic_queries(signer=site.checks)["raised"]
    t.answer_query(qid, "The eGFR will be re-derived at the next visit.", signer=site.investigator)
    with pytest.raises(NotTheRaiser):
        t.close_query(qid, "not mine", signer=site.monitor)
    t.close_query(qid, "Accepted as is.", signer=site.dm)
    # closed by a person: the checks do not re-open it while its cause remains
    assert t.run_automatic_queries(signer=site.checks) == {"raised": [], "closed": [], "reopened": []}


# ======================================================================= read models
def _review_tables(url: str) -> dict[str, list[tuple[object, ...]]]:
    import sqlalchemy as sa

    from projections.schema import review_queries, sdv_facts, sdv_marks

    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return {
                t.name: sorted(tuple(str(v) for v in r) for r in conn.execute(sa.select(t)))
                for t in (review_queries, sdv_marks, sdv_facts)
            }
    finally:
        engine.dispose()


def test_read_models_show_query_state_and_sdv_progress_and_a_rebuild_gives_the_same_rows(site: Site):
    from projections.read import StudyReader, UnknownFilter
    from projections.runner import ProjectionRunner

    t = site.trial
    t.verify_source(site.subject, [1, 2, site.creat], signer=site.monitor)
    t.correct(site.subject, site.creat, {"value": "1.01"}, "transcription error", signer=site.lab, derive=False)
    answered = t.raise_query(site.subject, site.creat, "Source says 1.01?", field="value", signer=site.monitor)
    t.answer_query(answered, "Corrected.", signer=site.coordinator)
    closed = t.raise_query(site.subject, 1, "Screening date?", signer=site.dm)
    t.close_query(closed, "Seen in the source.", signer=site.dm)
    [automatic] = t.run_automatic_queries(signer=site.checks)["raised"]
    with StudyReader(site.url) as reader:
        rows = {r["query_id"]: r for r in reader.queries()}
        assert {rows[str(q)]["status"] for q in (answered, closed, automatic)} == {"ANSWERED", "CLOSED", "OPEN"}
        a = rows[str(answered)]
        assert (a["screening_number"], a["site"], a["version"], a["field"], a["raised_by"], a["last_by"]) == (
            "NJ01-0007",
            "NJ01",
            site.creat,
            "value",
            "cra.huang",
            "nurse.li",
        )
        assert rows[str(automatic)]["cause"] == f"stale/v{site.egfr}"
        assert {r["query_id"] for r in reader.queries(open_only=True)} == {str(answered), str(automatic)}
        assert [r["query_id"] for r in reader.queries(subject="NJ01-0007", status="CLOSED")] == [str(closed)]
        with pytest.raises(UnknownFilter, match=r"unknown query status .open.; query statuses: OPEN, ANSWERED, CLOSED"):
            reader.queries(status="open")
        with pytest.raises(UnknownFilter, match="NJ01-0007"):
            reader.queries(subject="NJ01-9999")
        patient = reader.patient("NJ01-0007")
        assert patient["queries"] == {"OPEN": 1, "ANSWERED": 1, "CLOSED": 1}
        assert patient["sdv"]["VERIFIED"] == 2 and patient["sdv"]["CHANGED_SINCE_VERIFIED"] == 1
        [changed] = [r for r in reader.sdv(pending=True) if r["status"] == "CHANGED_SINCE_VERIFIED"]
        assert (changed["version"], changed["changed_fields"], changed["verified_by"]) == (
            site.creat,
            ["canonical_value", "value"],
            "cra.huang",
        )
        assert all(r["status"] != "VERIFIED" for r in reader.sdv(pending=True))
        [by_site] = reader.sdv_progress("site")
        assert by_site["site"] == "NJ01" and by_site["VERIFIED"] == 2
        dash = reader.dashboard()
        assert dash["queries_by_site"] == [{"site": "NJ01", "OPEN": 1, "ANSWERED": 1, "CLOSED": 1, "automatic_open": 1}]
        assert dash["sdv_by_site"] == [by_site]
        trail = reader.audit_trail(subject="NJ01-0007", event_type="Query.Answered")
        assert {r["actor"] for r in trail} == {"nurse.li"} and any(r["new_value"] == "Corrected." for r in trail)
        assert reader.audit_trail(subject="NJ01-0007", event_type="SourceVerification.Verified")
    incremental = _review_tables(site.url)
    runner = ProjectionRunner(site.url)
    try:
        runner.rebuild(workers=2)
    finally:
        runner.close()
    assert _review_tables(site.url) == incremental


# ======================================================================= the CLI
def _sle(*args: str) -> tuple[int, str, str]:
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, COLUMNS="80", NO_COLOR="1")
    env.pop("SLE_DATABASE_URL", None)
    done = subprocess.run(
        [str(Path(sys.executable).with_name("sle")), *args], capture_output=True, text=True, timeout=120, env=env
    )
    return done.returncode, done.stdout, done.stderr


def test_the_cli_marks_sdv_raises_answers_closes_reopens_and_lists_with_json(site: Site, tmp_path):
    import json

    keys = {}
    for name in ("monitor", "coordinator", "dm", "checks", "lab"):
        keys[name] = tmp_path / f"{name}.pem"
        site.people[name].save(keys[name])
    db = ["--db", site.url]

    def as_(name: str) -> list[str]:
        signer = site.people[name]
        return ["--key-file", str(keys[name]), "--actor", signer.actor, "--role", signer.role]

    code, out, err = _sle("sdv", "--subject", "NJ01-0007", "--version", str(site.creat), *as_("monitor"), *db, "--json")
    assert code == 0, err
    assert json.loads(out)["verified"][0]["version"] == site.creat
    code, out, err = _sle("sdv", "--subject", "NJ01-0007", "--version", "99", *as_("monitor"), *db)
    assert code == 1 and "UnknownFact" in err and "versions 1–" in err
    code, out, err = _sle("sdv", "--subject", "NJ01-0007", *as_("monitor"), *db)
    assert code == 2 and "--version" in err  # nothing to mark: usage
    code, out, err = _sle("sdv", "--pending", *db, "--json")
    assert code == 0 and site.creat not in {r["version"] for r in json.loads(out)}
    code, out, err = _sle("sdv", "--by", "site", *db)
    assert code == 0 and "NJ01" in out and max(len(line) for line in out.splitlines()) <= 80

    code, out, err = _sle(
        "query", "raise", "--subject", "NJ01-0007", "--version", str(site.creat), "--field", "value",
        "--text", "Source says 1.01?", *as_("monitor"), *db, "--json",
    )  # fmt: skip
    assert code == 0, err
    qid = json.loads(out)["query"]
    code, out, err = _sle("query", "answer", "--id", qid, "--text", "Checked.", *as_("coordinator"), *db)
    assert code == 0, err
    code, out, err = _sle("query", "close", "--id", qid, "--text", "Not mine.", *as_("dm"), *db)
    assert code == 1 and "NotTheRaiser" in err
    code, out, err = _sle("query", "close", "--id", qid, "--text", "Resolved.", *as_("monitor"), *db, "--json")
    assert code == 0 and json.loads(out) == {"query": qid, "status": "CLOSED"}
    code, out, err = _sle("query", "answer", "--id", qid, "--text", "Late.", *as_("coordinator"), *db)
    assert code == 1 and "QueryStateConflict" in err
    code, out, err = _sle("query", "answer", "--id", str(uuid4()), "--text", "?", *as_("coordinator"), *db)
    assert code == 1 and "UnknownQuery" in err
    code, out, err = _sle("query", "reopen", "--id", qid, "--text", "Still wrong.", *as_("monitor"), *db)
    assert code == 0, err
    site.trial.correct(
        site.subject, site.creat, {"value": "1.01"}, "transcription error", signer=site.lab, derive=False
    )
    code, out, err = _sle("query", "auto", *as_("checks"), *db, "--json")
    assert code == 0 and len(json.loads(out)["raised"]) == 1, err
    code, out, err = _sle("query", "auto", *as_("checks"), *db, "--json")
    assert json.loads(out) == {"raised": [], "closed": [], "reopened": []}
    code, out, err = _sle("queries", "--open", *db, "--json")
    assert code == 0 and {r["status"] for r in json.loads(out)} == {"OPEN"} and len(json.loads(out)) == 2
    code, out, err = _sle("queries", *db)
    assert code == 0 and qid[:8] in out and "reopened by cra.huang" in out
    assert max(len(line) for line in out.splitlines()) <= 80
    code, out, err = _sle("queries", "--status", "open", *db)
    assert code == 2 and "OPEN, ANSWERED, CLOSED" in err
    code, out, err = _sle("sdv", "--pending", *db)
    assert code == 0 and "CHANGED" in out and "(canonical_value," in out and "PENDING" in out


def test_sdv_facts_followed_in_small_batches_equal_a_rebuild(site: Site):
    from projections.runner import ProjectionRunner

    t = site.trial
    runner = ProjectionRunner(site.url, batch=2)
    try:
        runner.catch_up()
        t.verify_source(site.subject, [1, site.creat], signer=site.monitor)
        runner.catch_up()
        t.correct(site.subject, site.creat, {"value": "1.01"}, "transcription error", signer=site.lab)
        creat2 = t.record_lab_result(
            site.subject, "CREAT", "0.90", "mg/dL", NOW - timedelta(minutes=30), signer=site.lab
        )
        runner.catch_up()
        t.void(site.subject, creat2, "wrong subject", signer=site.lab)
        t.raise_query(site.subject, site.creat, "Source?", signer=site.monitor)
        runner.catch_up()
        incremental = _review_tables(site.url)
        assert any(row[1] == str(site.creat) for row in incremental["sdv_facts"])
        assert not any(row[1] == str(creat2) for row in incremental["sdv_facts"])  # voided: not to verify
        runner.rebuild()
    finally:
        runner.close()
    assert _review_tables(site.url) == incremental
