"""Reading over HTTP: streams, read models, registry, verification and ledger proofs, with cursors by log position."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from api_world import NOW, world_fixture  # noqa: F401 - the `world` fixture

from sle_events.client import ApiProblem
from sle_events.ledger.keyfile import create_log_key
from sle_events.ledger.log import Ledger
from sle_events.ledger.merkle import leaf_hash, verify_inclusion
from sle_events.signing.envelope import open_sealed

from conftest import STUDY_CONFIG

pytestmark = pytest.mark.storage


def record_subject(world, number: str = "NJ01-0001", results: int = 3):
    subject = world.new_subject(number)
    world.client("coordinator").append(world.sealed(subject, "coordinator"))
    subject.obtain_consent("ICF v1.0", NOW - timedelta(hours=20), config=STUDY_CONFIG, taken_by="dr.wang")
    world.client("investigator").append(world.sealed(subject, "investigator"))
    for i in range(results):
        subject.record_lab_result("CREAT", Decimal(f"1.{i}0"), "mg/dL", NOW - timedelta(hours=10 - i))
        world.client("lab").append(world.sealed(subject, "lab"))
    return subject


def test_a_stream_page_by_page(world):
    subject = record_subject(world)
    stored = world.record.stream(subject.id)
    client = world.client("lab")
    seen, after, pages = [], 0, 0
    while after is not None:
        page = client.get(f"/streams/{subject.id}", after=after, limit=2)
        assert (page["version"], page["hash"]) == (stored[-1].version, stored[-1].hash)
        seen += page["items"]
        after, pages = page["next"], pages + 1
    assert pages == -(-len(stored) // 2)
    positions = [e["position"] for e in seen]
    assert positions == sorted(positions)
    # what comes back is the sealed event, byte for byte once canonicalised
    assert [open_sealed(_sealed(e)).sealed for e in seen] == [e.sealed for e in stored]
    assert client.stream(subject.id) == seen
    assert client.head(subject.id) == (stored[-1].version, stored[-1].hash)


def _sealed(item: dict) -> bytes:
    from sle_events.signing.canonical import canonical_json

    return canonical_json({"envelope": item["envelope"], "signature": item["signature"]})


def test_an_unknown_stream_or_study_is_404(world):
    client = world.client("auditor")
    with pytest.raises(ApiProblem) as caught:
        client.get("/streams/00000000-0000-4000-8000-000000000000")
    assert (caught.value.status, caught.value.kind) == (404, "not_found")
    with pytest.raises(ApiProblem) as caught:
        client.get("/streams/not-a-uuid")
    assert caught.value.status == 404
    response = client.request("GET", "/v1/studies/00000000-0000-4000-8000-000000000000/keys")
    assert response.status_code == 404


@pytest.mark.parametrize(
    "path, params",
    [
        ("/sdv", {"subject": "\x00NJ01"}),  # found by schemathesis: PostgreSQL refused the NUL with a 500
        ("/audit-trail", {"user": "dr\x00wang"}),
        ("/patients/NJ01%00-0001", {}),  # percent-encoded: the path the server decodes holds the NUL
        ("/queries", {"subject\x00": "x"}),
    ],
)
def test_a_nul_in_a_path_or_filter_is_refused_on_both_engines(world, path, params):
    record_subject(world, results=0)
    with pytest.raises(ApiProblem) as caught:
        world.client("auditor").get(path, **params)
    assert (caught.value.status, caught.value.kind) == (422, "validation")


def test_patient_state_dashboard_and_as_of(world):
    subject = record_subject(world)
    client = world.client("monitor")
    [row] = client.get("/patients")["items"]
    assert row["screening_number"] == "NJ01-0001"
    assert client.get(f"/patients/{subject.id}")["screening_number"] == "NJ01-0001"
    assert "enrollment" in client.get("/dashboard")
    then = client.get("/patients/NJ01-0001/as-of", occurred=(NOW - timedelta(hours=21)).isoformat())
    now = client.get("/patients/NJ01-0001/as-of", recorded=datetime.now(UTC).isoformat())
    assert (then["status"], now["status"]) == ("SCREENED", "CONSENTED")
    with pytest.raises(ApiProblem) as caught:  # recorded before anything of it was
        client.get("/patients/NJ01-0001/as-of", recorded=(NOW - timedelta(days=3)).isoformat())
    assert caught.value.status == 404
    with pytest.raises(ApiProblem) as caught:
        client.get("/patients/NJ01-9999")
    assert (caught.value.status, caught.value.kind) == (422, "unknown_filter")
    with pytest.raises(ApiProblem) as caught:
        client.get("/patients/NJ01-0001/as-of", recorded="yesterday")
    assert caught.value.status == 422


def test_the_audit_trail_with_the_clis_filters_and_a_cursor(world):
    record_subject(world, "NJ01-0001")
    record_subject(world, "NJ01-0002", results=1)
    client = world.client("auditor")
    everything = client.get("/audit-trail", limit=1000)["items"]
    mine = client.get("/audit-trail", subject="NJ01-0002", limit=1000)["items"]
    assert mine and {r["subject"] for r in mine} == {"NJ01-0002"}
    assert {r["actor"] for r in client.get("/audit-trail", user="lab.user")["items"]} == {"lab.user"}
    labs = client.get("/audit-trail", event_type="Subject.LabResultRecorded", limit=1000)["items"]
    assert {r["event_type"] for r in labs} == {"Subject.LabResultRecorded"}
    paged, after = [], 0
    while after is not None:
        page = client.get("/audit-trail", after=after, limit=3)
        assert len({r["position"] for r in page["items"]}) <= 3  # whole events per page
        paged += page["items"]
        after = page["next"]
    assert paged == everything
    with pytest.raises(ApiProblem) as caught:
        client.get("/audit-trail", event_type="LabResultRecorded")
    assert caught.value.kind == "unknown_filter" and "Subject.LabResultRecorded" in caught.value.problem["detail"]


def test_keys_and_the_last_verification(world):
    keys = world.client("lab").get("/keys")
    assert {k["role"] for k in keys["items"]} >= {"admin", "lab", "auditor"}
    assert all("private" not in str(k).lower() for k in keys["items"])
    assert world.client("auditor").get("/verification")["run_at"] is None  # nothing verified yet


def test_ledger_checkpoint_inclusion_and_consistency(world, tmp_path):
    subject = record_subject(world, results=1)
    log_key = create_log_key(tmp_path / "log.key", "sle.local/test")
    ledger = Ledger(world.url)
    ledger.integrate()
    first = ledger.checkpoint(log_key)
    record_subject(world, "NJ01-0002", results=2)
    ledger.integrate()
    ledger.checkpoint(log_key)
    client = world.client("auditor")
    checkpoint = client.get("/ledger/checkpoint")
    assert checkpoint["size"] == ledger.size and checkpoint["note"].startswith("sle.local/test\n")
    stored = world.record.stream(subject.id)[-1]
    proof = client.get("/ledger/inclusion", stream=str(subject.id), version=stored.version)
    leaf = base64.b64decode(proof["leaf"])
    assert leaf == stored.sealed
    root = base64.b64decode(checkpoint["root"])
    hashes = [base64.b64decode(h) for h in proof["hashes"]]
    verify_inclusion(leaf_hash(leaf), proof["index"], proof["size"], hashes, root)
    assert client.get("/ledger/inclusion", position=proof["position"])["index"] == proof["index"]
    consistency = client.get("/ledger/consistency", old_size=first.size)
    assert consistency["new_size"] == checkpoint["size"] and consistency["hashes"]
    with pytest.raises(ApiProblem) as caught:
        client.get("/ledger/consistency", old_size=checkpoint["size"] + 5)
    assert (caught.value.status, caught.value.kind) == (409, "ledger")
    with pytest.raises(ApiProblem) as caught:
        client.get("/ledger/inclusion")
    assert caught.value.status == 422
    ledger.close()


def test_the_log_as_tlog_tiles(world, tmp_path):
    """Checkpoint and hash tiles are open (hashes only); an entry bundle holds the events and needs a signature."""
    record_subject(world, results=2)
    http = world.http
    assert http.get("/v1/log/checkpoint").status_code == 404  # no checkpoint yet
    log_key = create_log_key(tmp_path / "log.key", "sle.local/test")
    ledger = Ledger(world.url)
    ledger.integrate()
    checkpoint = ledger.checkpoint(log_key)
    response = http.get("/v1/log/checkpoint")
    assert response.status_code == 200 and response.text == checkpoint.note
    assert response.headers["content-type"].startswith("text/plain")
    size = checkpoint.size
    tile = http.get(f"/v1/log/tile/0/000.p/{size}")
    assert tile.status_code == 200 and tile.headers["content-type"] == "application/octet-stream"
    events = [bytes(e.sealed) for s in _streams(world) for e in world.record.stream(s)]
    hashes = {tile.content[i : i + 32] for i in range(0, len(tile.content), 32)}
    assert hashes == {leaf_hash(e) for e in events}
    assert http.get(f"/v1/log/tile/0/000.p/{size + 1}").status_code == 404  # not covered by the checkpoint
    assert http.get("/v1/log/tile/0/0000").status_code == 404  # not the shortest path
    path = f"/v1/log/tile/entries/000.p/{size}"
    unsigned = http.get(path)
    assert unsigned.status_code == 401
    lab = world.client("lab").request("GET", path)
    assert lab.status_code == 200
    data, entries, i = lab.content, [], 0
    while i < len(data):
        n = int.from_bytes(data[i : i + 2], "big")
        entries.append(data[i + 2 : i + 2 + n])
        i += 2 + n
    assert sorted(entries) == sorted(events)
    ledger.close()


def _streams(world):
    import sqlalchemy as sa

    t = world.record.table
    with world.record.engine.connect() as conn:
        return list(conn.execute(sa.select(t.c.originator_id).distinct()).scalars())
