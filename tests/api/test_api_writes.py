"""Appending over HTTP: what `StudyRecord.append` accepts is accepted, what it refuses is the matching
problem+json, and a refusal stores nothing."""

from __future__ import annotations

import json
from datetime import timedelta
from decimal import Decimal

import pytest
import sqlalchemy as sa
from api_world import NOW, world_fixture  # noqa: F401 - the `world` fixture

from sle_events.api.problems import PROBLEM_BASE
from sle_events.client import ApiProblem
from sle_events.schema import api_idempotency
from sle_events.signing.envelope import seal
from sle_events.store.codec import envelope_for

from conftest import STUDY_CONFIG, count_rows

pytestmark = pytest.mark.storage


def post(world, role, body: bytes, *, key: str | None = "k-1", content_type: str = "application/json"):
    headers = {"Content-Type": content_type}
    if key is not None:
        headers["Idempotency-Key"] = key
    return world.client(role).request("POST", f"/v1/studies/{world.study.id}/events", body=body, headers=headers)


def body_of(*events) -> bytes:
    if len(events) == 1:
        return events[0].sealed
    return json.dumps({"events": [json.loads(e.sealed) for e in events]}).encode()


def problem(response, status: int, kind: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    doc = response.json()
    assert doc["type"] == PROBLEM_BASE + kind, doc
    assert doc["status"] == status and doc["title"] and doc["detail"]
    return doc


def test_one_event_is_stored_at_its_log_position(world):
    subject = world.new_subject()
    [event] = world.sealed(subject, "coordinator")
    before = count_rows(world.url)
    stored = world.client("coordinator").append([event])
    assert count_rows(world.url) == before + 1
    assert stored == [{"stream": str(subject.id), "version": 1, "position": stored[0]["position"], "hash": event.hash}]
    assert world.record.stream(subject.id)[0].sealed == event.sealed  # the very bytes the coordinator signed


def test_a_batch_is_all_or_nothing(world):
    subject = world.new_subject()
    [screened] = world.sealed(subject, "coordinator")
    subject.obtain_consent("ICF v1.0", NOW - timedelta(hours=20), config=STUDY_CONFIG, taken_by="dr.wang")
    [consent] = world.sealed(subject, "investigator", prev=screened.hash)
    subject.record_lab_result("CREAT", Decimal("1.23"), "mg/dL", NOW - timedelta(hours=10))
    lab_events = world.sealed(subject, "lab", prev=consent.hash)
    forged = type(consent).build(consent.envelope, consent.signed, bytes(64))  # a signature that does not verify
    before = count_rows(world.url)
    doc = problem(post(world, "investigator", body_of(screened, forged), key="b1"), 422, "bad_signature")
    assert doc["version"] == 2
    assert count_rows(world.url) == before
    # a lab service may not send a screening (even signed by others): refused as a whole, before append
    problem(post(world, "lab", body_of(screened, consent), key="b2"), 403, "forbidden")
    assert count_rows(world.url) == before
    response = post(world, "investigator", body_of(screened, consent), key="b3")
    assert response.status_code == 201, response.text
    assert [e["version"] for e in response.json()["events"]] == [1, 2]
    assert world.client("lab").append(lab_events)[0]["version"] == 3


def rivals(world):
    """A subject screened, and its consent (version 2) sealed twice: by the investigator (`first`, stored) and by
    the coordinator (`rival`, the same version signed by another hand)."""
    subject = world.new_subject()
    [screened] = world.sealed(subject, "coordinator")
    world.client("coordinator").append([screened])
    subject.obtain_consent("ICF v1.0", NOW - timedelta(hours=20), config=STUDY_CONFIG, taken_by="dr.wang")
    [consent] = subject.collect_events()
    env = envelope_for(consent, study=world.study.id, prev=screened.hash)
    first, rival = seal(env, world.signers["investigator"]), seal(env, world.signers["coordinator"])
    world.client("investigator").append([first])
    return subject, first, rival


def test_a_conflict_is_409_with_the_streams_current_version_and_hash(world):
    _, first, rival = rivals(world)
    before = count_rows(world.url)
    doc = problem(post(world, "coordinator", body_of(rival), key="r1"), 409, "version_conflict")
    assert (doc["current_version"], doc["current_hash"]) == (2, first.hash)
    assert count_rows(world.url) == before
    with pytest.raises(ApiProblem) as caught:
        world.client("coordinator").append([rival])
    assert caught.value.kind == "version_conflict" and caught.value.status == 409


def test_an_exact_retry_of_a_stored_event_gets_its_position_again(world):
    subject = world.new_subject()
    [event] = world.sealed(subject, "coordinator")
    first = world.client("coordinator").append([event])
    before = count_rows(world.url)
    assert world.client("coordinator").append([event]) == first  # a new Idempotency-Key: append's own retry rule
    assert count_rows(world.url) == before


@pytest.mark.parametrize(
    ("mutate", "status", "kind"),
    [
        (lambda env: env.update(type="Subject.Teleported"), 422, "unknown_event_type"),
        (lambda env: env.update(recorded_at=(NOW - timedelta(hours=2)).isoformat()), 422, "clock_skew"),
        (lambda env: env["payload"].update(site_id=7), 422, "invalid_payload"),
        (lambda env: env.update(study="00000000-0000-4000-8000-000000000000"), 422, "wrong_study"),
        (lambda env: env.update(prev="1" * 64), 422, "malformed"),  # version 1 must have the genesis prev
    ],
)
def test_each_rejection_has_its_own_problem_type(world, mutate, status, kind):
    subject = world.new_subject()
    [event] = world.sealed(subject, "coordinator")
    env = json.loads(event.signed)
    mutate(env)
    try:
        bad = seal(env, world.signers["coordinator"])
        body = bad.sealed
    except ValueError:
        body = json.dumps({"envelope": env, "signature": "AAAA"}).encode()
    before = count_rows(world.url)
    problem(post(world, "coordinator", body), status, kind)
    assert count_rows(world.url) == before


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        (b"{not json", "malformed"),
        (b'{"envelope": {"version": 1.5}, "signature": "x"}', "malformed"),  # floats are never signed
        (b"[]", "validation"),
        (b'{"events": []}', "validation"),
        (b'{"events": [1, 2]}', "malformed"),
    ],
)
def test_a_body_that_is_no_sealed_event_is_422_naming_why(world, body, kind):
    before = count_rows(world.url)
    problem(post(world, "coordinator", body), 422, kind)
    assert count_rows(world.url) == before


def test_body_limit_and_content_type(world):
    subject = world.new_subject()
    [event] = world.sealed(subject, "coordinator")
    problem(post(world, "coordinator", event.sealed, content_type="text/plain"), 415, "unsupported_media_type")
    problem(post(world, "coordinator", b" " * (17 << 20)), 413, "payload_too_large")
    assert world.record.stream(subject.id) == []


def test_idempotency_key(world):
    subject = world.new_subject()
    [event] = world.sealed(subject, "coordinator")
    problem(post(world, "coordinator", event.sealed, key=None), 400, "idempotency_key_missing")
    first = post(world, "coordinator", event.sealed, key="idem-1")
    assert first.status_code == 201
    before = count_rows(world.url)
    again = post(world, "coordinator", event.sealed, key="idem-1")
    assert (again.status_code, again.content) == (201, first.content)
    assert count_rows(world.url) == before
    other = world.new_subject("NJ01-0002")
    [other_event] = world.sealed(other, "coordinator")
    problem(post(world, "coordinator", other_event.sealed, key="idem-1"), 422, "idempotency_key_reused")
    # the same key by another caller is another key: scoped to the caller's key id
    assert post(world, "investigator", other_event.sealed, key="idem-1").status_code == 201
    assert count_rows(world.url) == before + 1


def claims(world, key: str) -> list[tuple]:
    """The `api_idempotency` rows of an Idempotency-Key, as SQL reads them: (state, status, response)."""
    engine = sa.create_engine(world.url)
    with engine.connect() as conn:
        t = api_idempotency
        rows = conn.execute(sa.select(t.c.state, t.c.status, t.c.response).where(t.c.idempotency_key == key)).all()
    engine.dispose()
    return [tuple(r) for r in rows]


def claim_for(world, role: str, key: str, body: bytes) -> None:
    """`key` claimed for `role`'s POST of `body`, as a request does before its append: one still running, or one
    whose server died."""
    from sle_events.api import idempotency as idem

    digest = idem.request_hash("POST", f"/v1/studies/{world.study.id}/events", "", body)
    bookkeeping = idem.bookkeeping_engine(world.record.engine)
    with bookkeeping.connect() as conn:
        assert idem.claim(conn, world.signers[role].key_id, key, digest, lambda: None) is None
    if bookkeeping is not world.record.engine:
        bookkeeping.dispose()


def make_stale(world, key: str, age: timedelta | None = None) -> None:
    """The claim of `key` made `age` ago (by default just over `STALE_CLAIM`), through the table's own types as
    the server writes it."""
    from sle_events.api import idempotency as idem

    engine = sa.create_engine(world.url)
    with engine.begin() as conn:
        t = api_idempotency
        old = NOW - (age or idem.STALE_CLAIM + timedelta(seconds=5))
        conn.execute(t.update().where(t.c.idempotency_key == key).values(created_at=old))
    engine.dispose()


def test_a_stored_batch_is_answered_by_the_record_not_by_a_stored_response(world):
    """Nothing is written after an append's commit: the key keeps no response, and the same request is answered
    from the record, byte for byte. So a server that died right after the commit leaves nothing to wait for:
    the retry gets the first answer at once (no `STALE_CLAIM`), and nothing is stored twice."""
    subject = world.new_subject()
    [screened] = world.sealed(subject, "coordinator")
    subject.obtain_consent("ICF v1.0", NOW - timedelta(hours=20), config=STUDY_CONFIG, taken_by="dr.wang")
    [consent] = world.sealed(subject, "investigator", prev=screened.hash)
    first = post(world, "investigator", body_of(screened, consent), key="kept-by-the-record")
    assert first.status_code == 201, first.text
    assert claims(world, "kept-by-the-record") == [("in_flight", None, None)]
    before = count_rows(world.url)
    again = post(world, "investigator", body_of(screened, consent), key="kept-by-the-record")
    assert (again.status_code, again.content) == (201, first.content)
    assert count_rows(world.url) == before


def test_a_refusal_is_stored_with_its_key_and_answered_as_first_given(world):
    """A refusal is not in the record, so it is kept with the key: the same request gets the first problem back
    even when the stream has moved on since (here its `current_version`), and nothing is stored."""
    subject, first, rival = rivals(world)
    refused = post(world, "coordinator", body_of(rival), key="refused-once")
    assert problem(refused, 409, "version_conflict")["current_version"] == 2
    [(state, status, response)] = claims(world, "refused-once")
    assert (state, status, bytes(response)) == ("done", 409, refused.content)
    subject.record_lab_result("CREAT", Decimal("1.23"), "mg/dL", NOW - timedelta(hours=10))
    world.client("lab").append(world.sealed(subject, "lab", prev=first.hash))  # the stream is at version 3 now
    before = count_rows(world.url)
    again = post(world, "coordinator", body_of(rival), key="refused-once")
    assert (again.status_code, again.content) == (409, refused.content)
    assert count_rows(world.url) == before


def test_a_claim_left_by_a_request_dead_before_its_commit_is_taken_over(world):
    """The server died after claiming the key and before the append committed: nothing is stored, and the claim
    says `in_flight` (409) until `STALE_CLAIM` has passed; then the same request takes it over and is stored,
    once."""
    subject = world.new_subject()
    [event] = world.sealed(subject, "coordinator")
    claim_for(world, "coordinator", "dies", event.sealed)
    problem(post(world, "coordinator", event.sealed, key="dies"), 409, "idempotency_in_flight")
    assert world.record.stream(subject.id) == []
    make_stale(world, "dies")
    before = count_rows(world.url)
    taken_over = post(world, "coordinator", event.sealed, key="dies")
    assert taken_over.status_code == 201, taken_over.text
    assert count_rows(world.url) == before + 1
    assert post(world, "coordinator", event.sealed, key="dies").content == taken_over.content
    assert count_rows(world.url) == before + 1


def test_a_stored_batch_answers_a_claim_only_for_a_caller_who_may_send_it(world):
    """A lab service's request died after claiming its key; meanwhile the coordinator stored the very batch the
    lab had tried to relay, which a lab may not send. The record does not answer the lab's key with a 201: the
    claim is in flight (409) until it is stale, and then the request is refused as it would have been (403)."""
    subject = world.new_subject()
    [screened] = world.sealed(subject, "coordinator")
    claim_for(world, "lab", "relay", screened.sealed)
    world.client("coordinator").append([screened])
    problem(post(world, "lab", screened.sealed, key="relay"), 409, "idempotency_in_flight")
    make_stale(world, "relay")
    problem(post(world, "lab", screened.sealed, key="relay"), 403, "forbidden")


def test_a_key_in_flight_is_409(world):
    subject = world.new_subject()
    [event] = world.sealed(subject, "coordinator")
    claim_for(world, "coordinator", "busy", event.sealed)
    problem(post(world, "coordinator", event.sealed, key="busy"), 409, "idempotency_in_flight")
    assert world.record.stream(subject.id) == []


def test_a_key_is_kept_a_day_and_a_request_sent_again_after_that_is_stored_once(world):
    """Keys older than `KEPT` are forgotten (by one write in 16, here called directly with such a write's
    `created`). The same request sent again afterwards is handled as new, and append's own rule answers it: the
    same events at the same positions, nothing stored twice."""
    from sle_events.api import idempotency as idem

    subject = world.new_subject()
    [screened] = world.sealed(subject, "coordinator")
    first = post(world, "coordinator", screened.sealed, key="a-day-ago")
    other = world.new_subject("NJ01-0002")
    [fresh_event] = world.sealed(other, "coordinator")
    assert post(world, "coordinator", fresh_event.sealed, key="just-now").status_code == 201
    make_stale(world, "a-day-ago", age=idem.KEPT + timedelta(minutes=1))
    bookkeeping = idem.bookkeeping_engine(world.record.engine)
    with bookkeeping.connect() as conn:
        idem.forget_expired_keys(conn, 17, NOW)  # not this write's turn
        assert len(claims(world, "a-day-ago")) == 1
        idem.forget_expired_keys(conn, 16 * 7, NOW)
    if bookkeeping is not world.record.engine:
        bookkeeping.dispose()
    assert claims(world, "a-day-ago") == [] and len(claims(world, "just-now")) == 1
    before = count_rows(world.url)
    again = post(world, "coordinator", screened.sealed, key="a-day-ago")
    assert (again.status_code, again.content) == (201, first.content)
    assert count_rows(world.url) == before
