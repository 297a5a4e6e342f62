"""The regulated acts over HTTP (docs/regulated-acts.md): a monitor's SDV mark and query, the site's answer, an
investigator's sign-off and a data manager's lock, each sealed by its signer and sent by that signer's own client;
their refusals as problem+json with a stable type; their state read back, role-checked. Both engines."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from sle_events.api import create_app
from sle_events.api.problems import PROBLEM_BASE, PROBLEMS, from_rejection
from sle_events.client import ApiProblem, Client
from sle_events.domain.casebook import Casebook, CoveredStream, content_hash
from sle_events.signing.envelope import SealedEvent, seal
from sle_events.signing.keys import Signer
from sle_events.store import errors
from sle_events.store.codec import envelope_for
from sle_events.store.errors import AppendRejected
from sle_events.store.record import StudyRecord
from sle_events.trial import Trial

from conftest import count_rows

pytestmark = pytest.mark.storage
PASSPHRASE = "correct horse battery"


class ApiRecord:
    """The study record as a client sees it: reads straight from the database (as the stream endpoint would give
    them), every write sealed by its signer and sent through that signer's own API client. A `Trial` over it makes
    the same events its verbs make in process, but the server takes them."""

    def __init__(self, record: StudyRecord, clients: dict[str, Client]) -> None:
        self._record = record
        self._clients = clients  # key id -> the client signing as that key

    def __getattr__(self, name: str) -> Any:
        return getattr(self._record, name)

    def record(self, *aggregates: Any, signer: Signer, reason: str | None = None) -> list[SealedEvent]:
        sealed: list[SealedEvent] = []
        heads: dict[UUID, str] = {}
        for aggregate in aggregates:
            study = getattr(aggregate, "study_id", None) or aggregate.id
            for event in aggregate.collect_events():
                stream = event.originator_id
                prev = heads.get(stream) or self._record.head_hash(stream, event.originator_version - 1)
                one = seal(envelope_for(event, study=study, prev=prev, reason=reason), signer)
                heads[stream] = one.hash
                sealed.append(one)
        self.append(sealed)
        return sealed

    def append(self, events: list[SealedEvent]) -> list[int]:
        stored = self._clients[events[0].envelope["key"]].append(events)
        return [s["position"] for s in stored]


@dataclass
class Site:
    url: str
    record: StudyRecord
    trial: Trial  # in process: the setup
    api: Trial  # over the API: the acts
    people: dict[str, Signer]
    clients: dict[str, Client]
    subject: UUID
    creat: int  # the creatinine result's version on the subject's stream

    def rows(self) -> int:
        return count_rows(self.url)

    def client(self, who: str) -> Client:
        return self.clients[self.people[who].key_id]

    def refused(self, who: str, events: list[SealedEvent], status: int, kind: str) -> dict[str, Any]:
        before = self.rows()
        with pytest.raises(ApiProblem) as e:
            self.client(who).append(events)
        assert (e.value.status, e.value.type) == (status, PROBLEM_BASE + kind), e.value.problem
        assert e.value.problem["detail"] and e.value.problem["title"] == PROBLEMS[kind][1]
        assert self.rows() == before  # a refusal stores nothing
        return e.value.problem


@pytest.fixture
def site(db_url: str, tmp_path: Path) -> Iterator[Site]:
    now = datetime.now(UTC)
    people = {
        name: Signer.generate(actor, role)
        for name, actor, role in [
            ("admin", "admin@drum-tower", "admin"),
            ("dm", "dm.zhao", "data_manager"),
            ("coordinator", "nurse.li", "coordinator"),
            ("investigator", "dr.wang", "investigator"),
            ("lab", "lab.drum-tower", "lab"),
            ("monitor", "cra.huang", "monitor"),
        ]
    }
    # 11.200: a sign-off is made with the investigator's passphrase-encrypted key, opened at the signing
    people["investigator"].save(tmp_path / "dr.wang.pem", passphrase=PASSPHRASE)
    people["investigator"] = Signer.from_file(
        tmp_path / "dr.wang.pem", "dr.wang", "investigator", passphrase=PASSPHRASE
    )
    p = people
    record = StudyRecord(db_url)
    trial = Trial.create(
        record,
        code="ALLOMSC-SLE",
        title="AlloMSC",
        admin=p["admin"],
        people=[
            (p["dm"], "Zhao Min"),
            (p["coordinator"], "Li Na"),
            (p["investigator"], "Dr. Wang Li"),
            p["lab"],
            (p["monitor"], "Huang Wei"),
        ],
        occurred_at=now - timedelta(days=2),
    )
    trial.add_site("NJ01", "Drum Tower", "Asia/Shanghai", signer=p["dm"], occurred_at=now - timedelta(days=2))
    trial.approve_icf_version("ICF v1.1", now - timedelta(days=30), signer=p["dm"], occurred_at=now - timedelta(days=2))
    sid = trial.screen("NJ01", "NJ01-0007", now - timedelta(hours=5), signer=p["coordinator"])
    trial.obtain_consent(sid, "ICF v1.1", now - timedelta(hours=4), signer=p["investigator"], taken_by="dr.wang")
    trial.record_lab_result(sid, "CREAT", "1.10", "mg/dL", now - timedelta(hours=3), signer=p["lab"])
    creat = next(e.version for e in record.stream(sid) if e.envelope["type"].endswith("LabResultRecorded"))
    with TestClient(create_app(record=record)) as http:
        clients = {s.key_id: Client("http://testserver", s, trial.study_id, http=http) for s in people.values()}
        api = Trial(ApiRecord(record, clients), trial.study_id)  # type: ignore[arg-type]  # a record over HTTP
        yield Site(db_url, record, trial, api, people, clients, sid, creat)
    record.close()
    record.engine.dispose()


def test_the_acts_recorded_through_the_api_are_taken_and_read_back(site: Site):
    p, api, sid = site.people, site.api, site.subject
    s = f"/casebook/{'NJ01-0007'}"
    # the monitor verifies the creatinine against the source and raises a query on it
    before = site.rows()
    api.verify_source(sid, [site.creat], signer=p["monitor"])
    qid = api.raise_query(sid, site.creat, "Source shows 1.01?", signer=p["monitor"], field="value")
    assert site.rows() == before + 3  # SDV opened + verified, query raised
    facts = site.client("monitor").get("/sdv", subject="NJ01-0007")["items"]
    assert {f["version"]: f["status"] for f in facts}[site.creat] == "VERIFIED"
    progress = site.client("dm").get("/sdv/progress", by="site")["items"]
    assert progress[0]["site"] == "NJ01" and progress[0]["VERIFIED"] == 1
    pending = site.client("monitor").get("/sdv", pending=True)["items"]
    assert site.creat not in [f["version"] for f in pending]
    [raised] = site.client("coordinator").get("/queries", subject="NJ01-0007", open=True)["items"]
    assert (raised["query_id"], raised["status"]) == (str(qid), "OPEN")
    # the site answers it, the monitor closes it
    api.answer_query(qid, "Source says 1.10: as recorded", signer=p["coordinator"])
    api.close_query(qid, "Agreed", signer=p["monitor"])
    assert site.client("monitor").get("/queries", open=True)["items"] == []
    [closed] = site.client("dm").get("/queries", status="CLOSED")["items"]
    assert closed["query_id"] == str(qid)
    # the investigator signs off, the data manager locks
    version = api.sign_off(sid, signer=p["investigator"], meaning="approval")
    api.lock(sid, signer=p["dm"], reason="ready for analysis")
    book = site.record.stream(Casebook.id_for(site.trial.study_id, sid))
    assert [e.envelope["type"] for e in book][-2:] == ["Casebook.SignedOff", "Casebook.Locked"] and version == 2
    assert book[-2].envelope["key"] == p["investigator"].key_id  # the investigator's own signature, not the server's
    state = site.client("investigator").get(s)
    assert state["state"]["level"] == "locked" and state["state"]["signoff_status"] == "signed"
    assert [x["meaning"] for x in state["signoffs"]] == ["approval"] and state["signoffs"][0]["status"] == "valid"
    assert [(x["action"], x["reason"]) for x in state["locks"]] == [("locked", "ready for analysis")]
    listing = site.client("monitor").get("/casebook")
    [row] = listing["items"]
    assert (row["screening_number"], row["level"]) == ("NJ01-0007", "locked") and listing["study_locks"] == []
    # role-checked like every read: a lab service reads none of it; an unknown subject is 404, a bad filter 422
    for path in ("/casebook", s, "/sdv", "/sdv/progress", "/queries"):
        with pytest.raises(ApiProblem) as e:
            site.client("lab").get(path)
        assert (e.value.status, e.value.kind) == (403, "forbidden"), path
    for path, params, status, kind in [
        ("/casebook/NJ01-9999", {}, 404, "not_found"),
        ("/sdv", {"subject": "NJ01-9999"}, 404, "not_found"),
        ("/queries", {"status": "LOST"}, 422, "unknown_filter"),
        ("/sdv/progress", {"by": "planet"}, 422, "unknown_filter"),
    ]:
        with pytest.raises(ApiProblem) as e:
            site.client("monitor").get(path, **params)
        assert (e.value.status, e.value.kind) == (status, kind), path


def test_the_acts_refusals_are_problem_json_with_their_stable_type(site: Site):
    p, api, sid, now = site.people, site.api, site.subject, datetime.now(UTC)
    qid = api.raise_query(sid, site.creat, "Source?", signer=p["monitor"])
    api.answer_query(qid, "as recorded", signer=p["coordinator"])
    api.close_query(qid, "ok", signer=p["monitor"])
    api.lock(sid, signer=p["dm"], reason="ready for analysis")
    # a clinical fact on the locked subject, sealed by the lab service elsewhere
    subject = site.record.get(sid)
    subject.record_lab_result("C3", "80", "mg/dL", now - timedelta(hours=1), config=site.trial.config)
    [fact] = subject.collect_events()
    env = envelope_for(fact, study=site.trial.study_id, prev=site.record.stream(sid)[-1].hash)
    site.refused("lab", [seal(env, p["lab"])], 409, "casebook_locked")
    # answering a closed query (the domain verb would refuse it; a client that skips the verb meets append's check)
    q = site.record.get(qid)
    q._answered(text="one more thing", by="nurse.li", occurred_at=now)
    problem = site.refused("coordinator", site_sealed(site, q, p["coordinator"]), 422, "act_refused")
    assert problem["code"] == "query_state_conflict" and problem["stream"] == str(qid)
    # a lab service signing off the casebook: its role may not record Casebook.SignedOff
    book = site.record.get(Casebook.id_for(site.trial.study_id, sid))
    stream = site.record.stream(sid)
    cover = CoveredStream(stream=str(sid), through_version=len(stream))
    digest = content_hash([cover], {(str(sid), e.version): e.sealed for e in stream})
    book.sign_off(now, meaning="review", printed_name="Drum Tower lab", covers=[cover], content_hash=digest)
    problem = site.refused("lab", site_sealed(site, book, p["lab"]), 403, "untrusted_key")
    assert "Casebook.SignedOff" in problem["detail"]


def site_sealed(site: Site, aggregate: Any, signer: Signer) -> list[SealedEvent]:
    out: list[SealedEvent] = []
    for event in aggregate.collect_events():
        prev = out[-1].hash if out else site.record.head_hash(event.originator_id, event.originator_version - 1)
        out.append(seal(envelope_for(event, study=site.trial.study_id, prev=prev), signer))
    return out


def _subclasses(cls: type[AppendRejected]) -> list[type[AppendRejected]]:
    return [c for sub in cls.__subclasses__() for c in (sub, *_subclasses(sub))]


def test_every_append_refusal_has_its_own_problem_type():
    refusals = _subclasses(AppendRejected)
    defined = {v for v in vars(errors).values() if isinstance(v, type) and issubclass(v, AppendRejected)}
    assert defined - {AppendRejected} <= set(refusals) and len(refusals) >= 15
    kinds = [c.kind for c in refusals]
    assert len(set(kinds)) == len(kinds), "two refusals share a kind: a client could not tell them apart"
    for cls in refusals:
        assert cls.kind in PROBLEMS, f"{cls.__name__} ({cls.kind}) has no problem type in sle_events/api/problems.py"
        problem = from_rejection(cls("refused", stream="s", version=1))
        assert problem.kind == cls.kind and problem.body()["type"] == PROBLEM_BASE + cls.kind
        assert problem.status in (403, 404, 409, 422)
