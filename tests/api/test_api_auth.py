"""Signed requests (RFC 9421) and the role × endpoint matrix."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from api_world import NOW, ROLES, world_fixture  # noqa: F401 - the `world` fixture
from http_message_signatures import HTTPMessageSigner, algorithms

from sle_events.api.auth import READ_ROLES
from sle_events.api.problems import PROBLEM_BASE
from sle_events.client import Client, sign_request
from sle_events.domain.study import Study
from sle_events.schema import api_idempotency
from sle_events.signing.envelope import seal
from sle_events.signing.keys import Signer
from sle_events.store.record import StudyRecord

from conftest import count_rows

pytestmark = pytest.mark.storage


def kind_of(response) -> str:
    assert response.headers["content-type"] == "application/problem+json", response.text
    return response.json()["type"].removeprefix(PROBLEM_BASE)


def keys_path(world) -> str:
    return f"/v1/studies/{world.study.id}/keys"


def test_an_unsigned_request_is_401(world):
    response = world.http.get(keys_path(world))
    assert (response.status_code, kind_of(response)) == (401, "signature_missing")


def test_a_key_the_study_never_registered_is_401(world):
    stranger = Signer.generate("mallory", "investigator")
    response = Client("http://testserver", stranger, world.study.id, http=world.http).request("GET", keys_path(world))
    assert (response.status_code, kind_of(response)) == (401, "key_unknown")


@pytest.mark.parametrize("change", ["revoked", "rotated"])
def test_a_revoked_or_rotated_out_key_is_401(world, change):
    study = world.record.get(world.study.id)
    monitor = world.signers["monitor"]
    if change == "revoked":
        study.revoke_key(monitor.key_id, "left the study", NOW)
    else:
        study.rotate_key(monitor.key_id, Signer.generate("monitor.user", "monitor").public_key_b64, NOW)
    world.record.record(study, signer=world.signers["admin"])
    response = world.client("monitor").request("GET", keys_path(world))
    assert (response.status_code, kind_of(response)) == (401, f"key_{change}")


def test_what_is_signed_cannot_be_changed(world):
    client = world.client("coordinator")
    path, headers = f"/v1/studies/{world.study.id}/events", {"Content-Type": "application/json", "Idempotency-Key": "x"}
    signed = sign_request(
        world.http.build_request("POST", path, content=b'{"events": []}', headers=headers), client.signer
    )
    # another body under the same signature and Content-Digest
    response = world.http.post(
        path, content=b'{"events": [{}]}', headers=dict(signed.headers.items()) | {"Content-Length": "16"}
    )
    assert (response.status_code, kind_of(response)) == (401, "signature_invalid")
    request = world.http.build_request("GET", keys_path(world), params={"a": "1"})
    sign_request(request, client.signer)
    request.url = request.url.copy_with(query=b"a=2")
    response = world.http.send(request)
    assert (response.status_code, kind_of(response)) == (401, "signature_invalid")


def test_an_old_signature_and_a_replay_are_401(world):
    signer = world.signers["auditor"]
    old = sign_request(world.http.build_request("GET", keys_path(world)), signer,
                       created=datetime.now(UTC) - timedelta(minutes=10))  # fmt: skip
    response = world.http.send(old)
    assert (response.status_code, kind_of(response)) == (401, "signature_invalid")
    fresh = sign_request(world.http.build_request("GET", keys_path(world)), signer)
    assert world.http.send(fresh).status_code == 200
    replayed = world.http.send(fresh)
    assert (replayed.status_code, kind_of(replayed)) == (401, "replay")


def test_a_signature_without_nonce_or_over_too_little_is_401(world):
    signer = world.signers["auditor"]
    hms = HTTPMessageSigner(signature_algorithm=algorithms.ED25519)
    for covered, nonce in [(("@method", "@path", "@query"), None), (("@method",), "n" * 16)]:
        request = world.http.build_request("GET", keys_path(world))
        prepared = hms.prepare(request, key_id=signer.key_id, created=datetime.now(UTC), nonce=nonce,
                               covered_component_ids=covered)  # fmt: skip
        hms.apply(request, prepared, signer.sign(prepared.signature_base))
        response = world.http.send(request)
        assert (response.status_code, kind_of(response)) == (401, "signature_invalid")


def test_a_write_whose_signature_leaves_out_its_content_type_is_401_naming_it(world):
    signer = world.signers["coordinator"]
    hms = HTTPMessageSigner(signature_algorithm=algorithms.ED25519)
    path, body = f"/v1/studies/{world.study.id}/events", b'{"events": []}'
    headers = {"Content-Type": "application/json", "Idempotency-Key": "uncovered"}
    request = world.http.build_request("POST", path, content=body, headers=headers)
    prepared = hms.prepare(request, key_id=signer.key_id, created=datetime.now(UTC), nonce="n" * 16, body=body,
                           covered_component_ids=("@method", "@path", "@query", "content-digest"))  # fmt: skip
    hms.apply(request, prepared, signer.sign(prepared.signature_base))
    response = world.http.send(request)
    assert (response.status_code, kind_of(response)) == (401, "signature_invalid")
    assert response.json()["detail"] == "the request signature must cover content-type"


# --- the role × endpoint matrix ---------------------------------------------------------------------------
def read_paths(world, subject) -> dict[str, str]:
    s = f"/v1/studies/{world.study.id}"
    return {
        "stream": f"{s}/streams/{subject.id}",
        "keys": f"{s}/keys",
        "ledger": f"{s}/ledger/checkpoint",
        "patients": f"{s}/patients",
        "dashboard": f"{s}/dashboard",
        "replay": f"{s}/patients/{subject.screening_number}/as-of",
        "audit_trail": f"{s}/audit-trail",
        "verification": f"{s}/verification",
        "casebook": f"{s}/casebook",
        "sdv": f"{s}/sdv/progress",
        "queries": f"{s}/queries?open=true",
        "export": f"{s}/exports/odm-snapshot",
    }


def test_every_role_reads_exactly_what_the_matrix_allows(world):
    subject = world.new_subject()
    world.client("coordinator").append(world.sealed(subject, "coordinator"))
    seen = {}
    for endpoint, path in read_paths(world, subject).items():
        for role in ROLES:
            response = world.client(role).request("GET", path)
            allowed = role in READ_ROLES[endpoint]
            seen[endpoint, role] = response.status_code
            if allowed:  # the ledger (and an export) answers 409 until it has a checkpoint: allowed, nothing yet
                assert response.status_code in (200, 409), (endpoint, role, response.text)
                assert response.status_code == 200 or kind_of(response) in ("ledger", "export_refused")
            else:
                assert (response.status_code, kind_of(response)) == (403, "forbidden"), (endpoint, role)
    # the rules the issue names
    assert seen["audit_trail", "lab"] == 403
    assert seen["audit_trail", "auditor"] == seen["audit_trail", "monitor"] == 200
    assert all(seen[e, "auditor"] in (200, 409) for e in READ_ROLES)


@pytest.mark.parametrize("role", ROLES)
def test_writes_follow_the_studys_signed_permission_table(world, role):
    """Screening (coordinator, investigator) and enrolling (investigator, coordinator): a lab service, a monitor,
    an auditor, a sponsor, a data manager and an admin may do neither."""
    subject = world.new_subject(f"NJ01-{ROLES.index(role):04d}")
    screened = world.sealed(subject, role)
    before = count_rows(world.url)
    body = screened[0].sealed
    response = world.client(role).request(
        "POST", f"/v1/studies/{world.study.id}/events", body=body, headers={"Idempotency-Key": "w"}
    )
    if role in ("coordinator", "investigator"):
        assert response.status_code == 201, response.text
        assert count_rows(world.url) == before + 1
    else:  # append's own refusal: the key's role may not record this type
        assert (response.status_code, kind_of(response)) == (403, "untrusted_key"), response.text
        assert count_rows(world.url) == before


def test_a_lab_service_cannot_enroll_even_with_an_investigators_signature(world):
    """The envelope is the investigator's, but the lab service sends it: its role may not record an enrolment."""
    subject = world.new_subject()
    world.client("coordinator").append(world.sealed(subject, "coordinator"))
    head = world.record.stream(subject.id)[-1]
    enrolled = seal(
        dict(head.envelope, type="Subject.Enrolled", version=2, prev=head.hash), world.signers["investigator"]
    )
    response = world.client("lab").request(
        "POST", f"/v1/studies/{world.study.id}/events", body=enrolled.sealed, headers={"Idempotency-Key": "e"}
    )
    assert (response.status_code, kind_of(response)) == (403, "forbidden")
    assert "Subject.Enrolled" in response.json()["detail"]


def test_nobody_reads_or_writes_another_study(world):
    admin2 = Signer.generate("admin@elsewhere", "admin")
    lab2 = Signer.generate("lab.user", "lab")
    study = world.record.get(world.study.id)
    study.approve_new_study("OTHER", admin2.actor, admin2.public_key_b64, NOW)
    world.record.record(study, signer=world.signers["admin"])
    other = Study.create("OTHER", "another study", admin2.actor, admin2.public_key_b64, NOW)
    other.register_key(lab2.actor, "lab", lab2.public_key_b64, NOW)
    world.record.record(other, signer=admin2)
    for signer in (admin2, lab2):
        intruder = Client("http://testserver", signer, world.study.id, http=world.http)
        response = intruder.request("GET", keys_path(world))
        assert (response.status_code, kind_of(response)) == (403, "other_study")
    # and its own study answers it
    assert Client("http://testserver", admin2, other.id, http=world.http).get("/keys")["study"] == str(other.id)


def test_a_key_revoked_by_another_process_is_refused_from_the_next_request(world):
    """The server's registry is not a stale copy: `sle study revoke-key` (another process) takes effect at once."""
    assert world.client("lab").request("GET", keys_path(world)).status_code == 200
    elsewhere = StudyRecord(world.url)  # another writer on the same database
    try:
        study = elsewhere.get(world.study.id)
        study.revoke_key(world.signers["lab"].key_id, "interface retired", NOW)
        elsewhere.record(study, signer=world.signers["admin"])
    finally:
        elsewhere.close()
        elsewhere.engine.dispose()
    response = world.client("lab").request("GET", keys_path(world))
    assert (response.status_code, kind_of(response)) == (401, "key_revoked")


# --- a write's bookkeeping: nonce, Idempotency-Key claim and the study's version in one go ---------------------
def claims(world) -> list[str]:
    t = api_idempotency
    with world.record.engine.connect() as conn:
        return [str(k) for k in conn.execute(sa.select(t.c.idempotency_key)).scalars()]


def screening_post(world, number: str, key: str) -> Any:
    [event] = world.sealed(world.new_subject(number), "coordinator")
    return world.http.build_request(
        "POST", f"/v1/studies/{world.study.id}/events", content=event.sealed,
        headers={"Content-Type": "application/json", "Idempotency-Key": key},
    )  # fmt: skip


def test_a_write_by_a_key_revoked_by_another_process_is_refused_and_claims_nothing(world):
    """The server checks a write's signature against the registry it saw last; the study's version, read in the
    same statement as the claim, shows it moved, and the caller is judged again by the registry as it is now."""
    coordinator = world.signers["coordinator"]
    first = world.http.send(sign_request(screening_post(world, "NJ01-0001", "k-1"), coordinator))
    assert first.status_code == 201, first.text  # the server now knows this registry
    elsewhere = StudyRecord(world.url)
    try:
        study = elsewhere.get(world.study.id)
        study.revoke_key(coordinator.key_id, "left the site", NOW)
        elsewhere.record(study, signer=world.signers["admin"])
    finally:
        elsewhere.close()
        elsewhere.engine.dispose()
    rows = count_rows(world.url)
    response = world.http.send(sign_request(screening_post(world, "NJ01-0002", "k-2"), coordinator))
    assert (response.status_code, kind_of(response)) == (401, "key_revoked")
    assert count_rows(world.url) == rows
    assert claims(world) == ["k-1"], "a refused write leaves its Idempotency-Key free"


def test_a_replayed_write_is_401_and_stores_nothing(world):
    request = sign_request(screening_post(world, "NJ01-0001", "k-1"), world.signers["coordinator"])
    assert world.http.send(request).status_code == 201
    rows = count_rows(world.url)
    replayed = world.http.send(request)
    assert (replayed.status_code, kind_of(replayed)) == (401, "replay")
    assert count_rows(world.url) == rows


def test_a_write_with_another_studys_key_is_403_and_claims_nothing(world):
    admin2 = Signer.generate("admin@elsewhere", "admin")
    study = world.record.get(world.study.id)
    study.approve_new_study("OTHER", admin2.actor, admin2.public_key_b64, NOW)
    world.record.record(study, signer=world.signers["admin"])
    world.record.record(Study.create("OTHER", "another study", admin2.actor, admin2.public_key_b64, NOW), signer=admin2)
    rows = count_rows(world.url)
    response = world.http.send(sign_request(screening_post(world, "NJ01-0001", "k-1"), admin2))
    assert (response.status_code, kind_of(response)) == (403, "other_study")
    assert count_rows(world.url) == rows and claims(world) == []
