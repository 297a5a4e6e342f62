"""The verifiable ledger on a real database (SQLite and PostgreSQL): integrate, checkpoint, prove, audit.

Every tamper test changes the real tables by SQL, as a DBA could, and checks that `sle verify` (the chain
verifier plus `verify_ledger`) finds and locates the change -- including the ones the hash chains cannot see.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from sle_events.audit.ledger_check import verify_ledger
from sle_events.audit.verifier import verify_record
from sle_events.cli.main import app
from sle_events.ledger import (
    Checkpoint,
    CompactRange,
    CosignatureVerifier,
    ProofError,
    Signer,
    Verifier,
    leaf_hash,
    open_checkpoint,
    open_note,
    parse_consistency_proof,
    root_of_leaves,
    verify_consistency,
    verify_proof_file,
)
from sle_events.ledger.log import Ledger, LedgerError, create_log_key, events_table, load_log_key
from sle_events.signing.envelope import GENESIS, SealedEvent, seal

from conftest import count_rows, execute_sql, position_of

pytestmark = pytest.mark.storage
NOW = datetime.now(UTC)
T0 = NOW - timedelta(days=10)
ORIGIN = "sle.local/ALLOMSC-SLE"
LEDGER_KINDS = {
    "ledger_leaf_missing_event",
    "ledger_leaf_mismatch",
    "ledger_order",
    "ledger_node_mismatch",
    "ledger_state_mismatch",
    "event_not_in_ledger",
    "checkpoint_root_mismatch",
    "checkpoint_bad_signature",
    "checkpoint_malformed",
    "inconsistent_with_saved_checkpoint",
}
ROOT = Path(__file__).resolve().parent.parent
SLE = str(Path(sys.executable).with_name("sle"))


# --- building a record -----------------------------------------------------------------------------------------
# Subject streams are sealed here at the signing layer, exactly as a client sends envelopes to `append()`: the
# ledger logs bytes and the tests depend on the envelope format only, not on the domain's verbs.
SUBJECT = "Subject."
# Every field each type's schema requires (append refuses a payload missing one), filled in by `sealed`.
FULL_PAYLOAD: dict[str, dict[str, object]] = {
    "Screened": {"rescreen_number": 0, "rescreen_of": None},
    "ConsentObtained": {"reconsent": False, "signed_by": "subject", "taken_by": "dr.wang"},
    "LabResultRecorded": {
        "canonical_unit": "mg/dL",
        "flag": None,
        "lab_high": None,
        "lab_low": None,
        "loinc": "2160-0",
        "range_high": "1.2",
        "range_low": "0.6",
        "range_source": "default",
        "reported_at": None,
        "specimen_id": None,
    },
}


@dataclass
class Stream:
    id: uuid.UUID
    version: int = 0
    head: str = GENESIS


def sealed(trial, stream: Stream, event_type: str, signer, payload: dict, occurred_at: datetime) -> SealedEvent:
    payload = {**FULL_PAYLOAD.get(event_type, {}), **payload}
    if event_type == "Screened":
        payload.setdefault("study_id", str(trial.study.id))
    if event_type == "LabResultRecorded":
        payload.setdefault("canonical_value", payload["value"])
    envelope = {
        "study": str(trial.study.id),
        "stream": str(stream.id),
        "version": stream.version + 1,
        "type": SUBJECT + event_type,
        "schema": 1,
        "payload": payload,
        "occurred_at": occurred_at.isoformat(),
        "recorded_at": datetime.now(UTC).isoformat(),
        "actor": "-",
        "role": "-",
        "key": "-",
        "reason": None,
        "prev": stream.head,
    }
    event = seal(envelope, signer)
    stream.version, stream.head = event.version, event.hash
    return event


def add_subject(trial, n: int, labs: int = 2) -> Stream:
    """Screened, consented, `labs` lab results: 2 + labs events in one stream, in three appends."""
    s = Stream(uuid.uuid4())
    when = T0 + timedelta(hours=n)
    trial.record.append(
        [sealed(trial, s, "Screened", trial.coordinator, {"site": "NJ01", "screening_number": f"SCR-{n:03d}"}, when)]
    )
    trial.record.append(
        [sealed(trial, s, "ConsentObtained", trial.investigator, {"icf_version": "ICF v1.0"}, when + timedelta(days=1))]
    )
    trial.record.append(
        [
            sealed(
                trial,
                s,
                "LabResultRecorded",
                trial.lab,
                {"code": "CREAT", "value": str(Decimal("1.23") + i), "unit": "mg/dL"},
                when + timedelta(days=2 + i),
            )
            for i in range(labs)
        ]
    )
    return s


def build(trial, subjects: int = 3) -> list[Stream]:
    out = [add_subject(trial, i + 1) for i in range(subjects)]
    assert trial.rows() == 4 + 4 * subjects
    return out


def event_ids(url: str) -> list[int]:
    t = events_table()
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(sa.select(t.c.id).order_by(t.c.id)).scalars())
    finally:
        engine.dispose()


def leaf_rows(url: str) -> list[tuple[int, int, bytes]]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return [
                (i, p, bytes(h))
                for i, p, h in conn.execute(sa.text("select idx, position, leaf_hash from ledger_leaves order by idx"))
            ]
    finally:
        engine.dispose()


def logged(trial, tmp_path: Path, sizes: tuple[int, ...] = ()) -> tuple[Ledger, Signer, list[str]]:
    """Integrate the whole record, issuing a checkpoint at each of `sizes` and at the end; return the notes."""
    signer = create_log_key(tmp_path / "log.key", ORIGIN)
    ledger = Ledger(trial.url)
    notes = []
    for size in sizes:
        ledger.integrate(size - ledger.size, batch=3)
        notes.append(ledger.checkpoint(signer).note)
    ledger.integrate(batch=5)
    notes.append(ledger.checkpoint(signer).note)
    assert verify_ledger(trial.url) == []
    return ledger, signer, notes


def located(findings) -> set[tuple[str | None, int | None, str]]:
    return {(f.stream, f.version, f.kind) for f in findings}


def chain_findings(report) -> list:
    return [f for f in report.findings if f.kind not in LEDGER_KINDS]


def cli(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(
        app,
        list(args),
        env={"SLE_DATABASE_URL": None, "SLE_LOG_KEY": None, "SLE_LOG_ORIGIN": None, "COLUMNS": "200", **(env or {})},
    )


def one_line(text: str) -> str:
    lines = text.splitlines()
    assert len(lines) == 1, text
    return lines[0]


# --- CLI round trip ---------------------------------------------------------------------------------------------
def test_cli_integrate_checkpoint_prove_and_verify_offline_with_only_the_vkey(trial, tmp_path):
    subjects = build(trial)
    url, key = trial.url, tmp_path / "log.key"
    init = cli("ledger", "init", "--log-key", str(key), "--db", url)
    assert init.exit_code == 0, init.output
    vkey = one_line(init.stdout)
    assert vkey.startswith(ORIGIN + "+")  # default origin from the study's code
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    secret = key.read_text().strip()
    assert secret.startswith("PRIVATE+KEY+") and secret not in init.output

    done = cli("ledger", "integrate", "--db", url)
    assert done.exit_code == 0 and "integrated 16 events; tree size 16" in done.stdout
    cp1 = tmp_path / "cp1"
    done = cli("ledger", "checkpoint", "--db", url, "--log-key", str(key), "--out", str(cp1))
    assert done.exit_code == 0, done.output
    assert done.stdout == cp1.read_text() and secret not in done.output
    assert one_line(cli("ledger", "vkey", "--log-key", str(key)).stdout) == vkey
    assert one_line(cli("ledger", "vkey", "--db", url).stdout) == vkey  # recorded with the first checkpoint

    # Prove an event named by stream:version; the proof and the leaf check out with nothing but the vkey.
    a = subjects[0]
    pos = position_of(trial, a.id, 3)
    proof = tmp_path / "a3.proof"
    done = cli("ledger", "prove", f"{a.id}:3", "--out", str(proof), "--db", url)
    assert done.exit_code == 0, done.output
    leaf = proof.with_name("a3.proof.leaf").read_bytes()
    assert leaf == trial.record.stream(a.id)[2].sealed  # the exact stored bytes
    result = verify_proof_file(proof.read_text(), leaf, vkey)
    assert result.checkpoint.size == 16 and result.index == event_ids(url).index(pos)
    # The same event by its log position and by its leaf index gives the same proof.
    for args in ([str(pos)], ["--index", str(result.index)]):
        other = tmp_path / "other.proof"
        assert cli("ledger", "prove", *args, "--out", str(other), "--db", url).exit_code == 0
        assert other.read_text() == proof.read_text()

    ok = cli("ledger", "verify-proof", str(proof), "--vkey", vkey)
    assert ok.exit_code == 0, ok.output
    assert f"OK: leaf {result.index} ({a.id} v3 Subject.LabResultRecorded) is in the tree of 16" in ok.stdout
    vkey_file = tmp_path / "log.vkey"
    vkey_file.write_text(vkey + "\n")
    assert cli("ledger", "verify-proof", str(proof), "--vkey", str(vkey_file)).exit_code == 0

    # Altered leaf bytes, another log's key, a forged proof hash: exit 1 with the reason.
    bad_leaf = tmp_path / "bad.leaf"
    bad_leaf.write_bytes(leaf.replace(b'"value":"1.23"', b'"value":"1.32"'))
    done = cli("ledger", "verify-proof", str(proof), "--vkey", vkey, "--leaf", str(bad_leaf))
    assert done.exit_code == 1 and "FAILED" in done.stderr and "not in the checkpoint's tree" in done.stderr
    stranger = create_log_key(tmp_path / "other.key", ORIGIN)
    done = cli("ledger", "verify-proof", str(proof), "--vkey", stranger.vkey)
    assert done.exit_code == 1 and "not signed by" in done.stderr
    lines = proof.read_text().split("\n")
    lines[2] = base64.b64encode(bytes(32)).decode()
    forged = tmp_path / "forged.proof"
    forged.write_text("\n".join(lines))
    forged.with_name("forged.proof.leaf").write_bytes(leaf)
    done = cli("ledger", "verify-proof", str(forged), "--vkey", vkey)
    assert done.exit_code == 1 and "FAILED" in done.stderr

    # Growth: a consistency proof from the saved checkpoint to the new one, checked offline.
    add_subject(trial, 9, labs=3)
    cp2 = tmp_path / "cp2"
    done = cli(
        "ledger",
        "checkpoint",
        "--out",
        str(cp2),
        env={"SLE_DATABASE_URL": url, "SLE_LOG_KEY": str(key), "SLE_LOG_ORIGIN": ORIGIN},
    )
    assert done.exit_code == 0, done.output
    assert Checkpoint.parse(open_note(cp2.read_text(), Verifier.from_vkey(vkey))[0]).size == 21
    cons = tmp_path / "cons"
    done = cli("ledger", "consistency", "--old", str(cp1), "--out", str(cons), "--db", url)
    assert done.exit_code == 0, done.output
    assert cons.with_name("cons.checkpoint").read_text() == cp2.read_text()
    done = cli(
        "ledger", "verify-proof", str(cp2), "--vkey", vkey, "--old-checkpoint", str(cp1), "--consistency", str(cons)
    )
    assert done.exit_code == 0, done.output
    assert "the tree of 21 extends the old checkpoint of 16" in done.stdout
    printed = cli("ledger", "consistency", "--old", str(cp1), "--db", url)
    assert printed.stdout == cons.read_text() and len(parse_consistency_proof(printed.stdout)) > 0
    # A proof against the checkpoint the auditor holds still works after the log grew.
    old_proof = tmp_path / "old.proof"
    assert (
        cli("ledger", "prove", f"{a.id}:3", "--checkpoint", str(cp1), "--out", str(old_proof), "--db", url).exit_code
        == 0
    )
    assert old_proof.read_text() == proof.read_text()
    # The newer inclusion proof also carries a checkpoint a consistency proof can be checked against.
    new_proof = tmp_path / "new.proof"
    assert cli("ledger", "prove", f"{a.id}:3", "--out", str(new_proof), "--db", url).exit_code == 0
    done = cli(
        "ledger",
        "verify-proof",
        str(new_proof),
        "--vkey",
        vkey,
        "--old-checkpoint",
        str(cp1),
        "--consistency",
        str(cons),
    )
    assert done.exit_code == 0 and done.stdout.count("OK:") == 2

    # `sle verify` with the saved checkpoint: everything holds.
    done = cli("verify", "--db", url, "--json", "--workers", "1", "--checkpoint", str(cp1), "--vkey", vkey)
    assert done.exit_code == 0, done.output
    doc = json.loads(done.stdout)
    assert doc["ok"] and doc["ledger"]["leaves"] == 21 and doc["ledger"]["checkpoints"] == 2
    assert doc["ledger"]["saved_checkpoints"] == [{"checkpoint": str(cp1), "size": 16, "consistent": True}]


def test_cli_rotate_key_then_verify_with_the_old_vkey(trial, tmp_path):
    build(trial)
    url, key, nxt = trial.url, tmp_path / "log.key", tmp_path / "next.key"
    old_vkey = one_line(cli("ledger", "init", "--log-key", str(key), "--db", url).stdout)
    before = tmp_path / "before.cp"
    assert cli("ledger", "checkpoint", "--db", url, "--log-key", str(key), "--out", str(before)).exit_code == 0
    witness = (
        "ledger",
        "witness",
        "--witness-key",
        str(tmp_path / "w.key"),
        "--state",
        str(tmp_path / "w.json"),
        "--db",
        url,
    )
    assert cli(*witness, "--vkey", old_vkey).exit_code == 0  # the witness is told the log's key once
    new_vkey = one_line(cli("ledger", "init", "--log-key", str(nxt), "--db", url).stdout)
    done = cli("ledger", "rotate-key", "--db", url, "--log-key", str(key), "--new-key", str(nxt))
    assert done.exit_code == 0, done.output
    assert f"sle-log-key-rotation {old_vkey} {new_vkey}" in done.stdout and new_vkey in done.stderr
    assert cli(*witness).exit_code == 0  # cosigns the rotation with the key it knew, and follows it
    assert json.loads((tmp_path / "w.json").read_text())["log_vkey"] == new_vkey
    add_subject(trial, 9)
    refused = cli("ledger", "checkpoint", "--db", url, "--log-key", str(key))
    assert refused.exit_code == 2 and "signed by" in refused.output
    after = tmp_path / "after.cp"
    assert cli("ledger", "checkpoint", "--db", url, "--log-key", str(nxt), "--out", str(after)).exit_code == 0
    done = cli(*witness)
    assert done.exit_code == 0, done.output
    assert one_line(cli("ledger", "vkey", "--db", url).stdout) == new_vkey
    done = cli(
        "verify",
        "--db",
        url,
        "--workers",
        "1",
        "--checkpoint",
        str(before),
        "--checkpoint",
        str(after),
        "--vkey",
        old_vkey,
    )
    assert done.exit_code == 0, done.output


def test_verify_proof_needs_no_database(trial, tmp_path):
    """The offline verifier in a fresh process, with an unreachable database configured: it never connects."""
    build(trial, subjects=1)
    ledger, signer, _ = logged(trial, tmp_path)
    proof = ledger.inclusion_proof(index=5)
    (tmp_path / "p").write_text(proof.text)
    (tmp_path / "p.leaf").write_bytes(proof.leaf_bytes)
    env = dict(os.environ, SLE_DATABASE_URL="postgresql+psycopg://nobody@127.0.0.1:1/none", NO_COLOR="1")
    done = subprocess.run(
        [SLE, "ledger", "verify-proof", "p", "--vkey", signer.vkey],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("OK: leaf 5 ")
    usage = subprocess.run(
        [SLE, "ledger", "verify-proof", "p"], cwd=tmp_path, capture_output=True, text=True, timeout=60, env=env
    )
    assert usage.returncode == 2 and "--vkey" in usage.stderr
    ledger.close()


def test_checkpoint_format_and_every_checkpoint_is_kept(trial, tmp_path):
    build(trial)
    ledger, signer, notes = logged(trial, tmp_path, sizes=(5,))
    assert [c.size for c in ledger.checkpoints()] == [5, 16]
    note = notes[-1]
    body, sig = note.split("\n\n")
    origin, size, root, *ext = body.split("\n")
    assert (origin, size, ext) == (ORIGIN, "16", [])
    raw_root = base64.b64decode(root, validate=True)
    assert len(raw_root) == 32 and base64.b64encode(raw_root).decode() == root
    assert raw_root == ledger.recompute().root == ledger.root()
    t = events_table()
    with ledger.engine.connect() as conn:
        leaves = [bytes(s) for s in conn.execute(sa.select(t.c.state).order_by(t.c.id)).scalars()]
    assert raw_root == root_of_leaves(leaves)
    # One signature line: em dash, space, key name, space, base64(key id || 64-byte Ed25519 signature).
    assert sig.endswith("\n") and sig.count("\n") == 1
    assert sig.startswith("\u2014 " + ORIGIN + " ")
    blob = base64.b64decode(sig.split(" ")[2].strip(), validate=True)
    name, key_id_hex, _ = signer.vkey.split("+", 2)
    assert name == ORIGIN and len(blob) == 4 + 64 and blob[:4].hex() == key_id_hex
    cp = open_checkpoint(note, Verifier.from_vkey(signer.vkey), ORIGIN)
    assert (cp.size, cp.root_hash) == (16, raw_root)
    # The first checkpoint is kept, still verifies and is a prefix of the second.
    first = open_checkpoint(notes[0], Verifier.from_vkey(signer.vkey), ORIGIN)
    assert first.size == 5 and first.root_hash == root_of_leaves(leaves[:5]) == ledger.root_at(5)
    verify_consistency(5, 16, ledger.consistency_proof(5, 16), first.root_hash, cp.root_hash)
    assert count_rows(trial.url, "ledger_checkpoints") == 2
    ledger.close()


def test_bad_input_is_refused_with_a_clear_error_and_nothing_is_stored(trial, tmp_path):
    subjects = build(trial, subjects=2)
    url, key = trial.url, tmp_path / "log.key"
    # Origins that cannot name a key; an existing key file is never overwritten.
    done = cli("ledger", "init", "--log-key", str(key), "--origin", "has space")
    assert done.exit_code == 2 and "cannot name a key" in done.stderr and not key.exists()
    assert cli("ledger", "init", "--log-key", str(key), "--db", url).exit_code == 0
    before = key.read_bytes()
    done = cli("ledger", "init", "--log-key", str(key), "--db", url)
    assert done.exit_code == 2 and "refusing to overwrite" in done.stderr and key.read_bytes() == before
    # A key others can read is refused before anything happens.
    loose = tmp_path / "loose.key"
    loose.write_bytes(before)
    loose.chmod(0o644)
    done = cli("ledger", "checkpoint", "--db", url, "--log-key", str(loose))
    assert done.exit_code == 2 and "chmod 600" in done.stderr and before.decode().strip() not in done.output
    assert "ledger_leaves" not in sa.inspect(sa.create_engine(url)).get_table_names()
    garbage = tmp_path / "garbage.key"
    garbage.write_text("PRIVATE+KEY+nope\n")
    garbage.chmod(0o600)
    done = cli("ledger", "checkpoint", "--db", url, "--log-key", str(garbage))
    assert done.exit_code == 2 and "not a log signing key" in done.stderr
    done = cli("ledger", "checkpoint", "--db", url)
    assert done.exit_code == 2 and "--log-key" in done.stderr
    done = cli("ledger", "checkpoint", "--db", url, "--log-key", str(key), "--origin", "sle.local/other")
    assert done.exit_code == 2 and "differs from the log key's origin" in done.stderr

    assert cli("ledger", "checkpoint", "--db", url, "--log-key", str(key)).exit_code == 0
    leaves = count_rows(url, "ledger_leaves")
    # Another key for the same ledger: refused before integrating the new events.
    add_subject(trial, 7)
    other = tmp_path / "other.key"
    assert cli("ledger", "init", "--log-key", str(other), "--db", url).exit_code == 0
    done = cli("ledger", "checkpoint", "--db", url, "--log-key", str(other))
    assert done.exit_code == 2 and "this ledger is signed by" in done.stderr
    assert count_rows(url, "ledger_checkpoints") == 1 and count_rows(url, "ledger_leaves") == leaves
    with pytest.raises(LedgerError, match="this ledger is signed by"):
        Ledger(url).checkpoint(load_log_key(other))
    assert count_rows(url, "ledger_checkpoints") == 1

    # prove: malformed ids (2), unknown or not yet integrated events (1); no file written.
    out = tmp_path / "p"
    s = subjects[0].id
    for args, code, message in [
        (["nonsense"], 2, "neither"),
        ([f"{s}:0"], 2, "not a version"),
        (["not-a-uuid:2"], 2, "not a stream UUID"),
        ([f"{s}:3", "--index", "1"], 2, "exactly one"),
        ([], 2, "exactly one"),
        ([f"{s}:99"], 1, "no event"),
        (["100000"], 1, "no event at log position 100000"),
        ([str(event_ids(url)[-1])], 1, "not integrated yet"),
        (["--index", "99"], 1, "does not exist"),
    ]:
        done = cli("ledger", "prove", *args, "--out", str(out), "--db", url)
        assert done.exit_code == code and message in done.stderr, (args, done.output)
        assert not out.exists() and not out.with_name("p.leaf").exists()

    # verify-proof: garbage proof (1), unusable vkey (2), a half consistency request (2).
    junk = tmp_path / "junk"
    junk.write_text("c2sp.org/tlog-proof@v1\nindex 01\n\nx\n")
    junk.with_name("junk.leaf").write_bytes(b"x")
    vkey = Ledger(url).state().vkey
    assert vkey is not None
    done = cli("ledger", "verify-proof", str(junk), "--vkey", vkey)
    assert done.exit_code == 1 and "not a canonical uint64" in done.stderr
    assert cli("ledger", "verify-proof", str(junk), "--vkey", "nope").exit_code == 2
    assert cli("ledger", "verify-proof", str(junk), "--vkey", vkey, "--consistency", str(junk)).exit_code == 2
    # sle verify: a saved checkpoint without a vkey, or one signed by another key, is unusable input.
    cp = tmp_path / "cp"
    latest = Ledger(url).latest_checkpoint()
    assert latest is not None
    cp.write_text(latest.note)
    done = cli("verify", "--db", url, "--workers", "1", "--checkpoint", str(cp))
    assert done.exit_code == 2 and "--vkey" in done.stderr
    done = cli("verify", "--db", url, "--workers", "1", "--checkpoint", str(cp), "--vkey", load_log_key(other).vkey)
    assert done.exit_code == 2 and "does not verify" in done.stderr
    # No database at all: refused, and no empty database file is left behind.
    missing = tmp_path / "missing.db"
    done = cli("ledger", "integrate", "--db", f"sqlite:///{missing}")
    assert done.exit_code == 2 and "no database" in done.stderr and not missing.exists()


def test_a_rotated_log_key_is_followed_from_either_vkey(trial, tmp_path):
    """The rotation checkpoint names both vkeys and carries both signatures; an auditor holding the old vkey
    or the new one verifies every checkpoint, and saved checkpoints from both sides of the rotation."""
    from sle_events.audit.trust import check_auditor_input
    from sle_events.ledger.checkpoint import key_rotation

    build(trial)
    ledger, old, notes = logged(trial, tmp_path, sizes=(8,))
    new = create_log_key(tmp_path / "next.key", ORIGIN)
    add_subject(trial, 7)
    ledger.integrate()
    rotation = ledger.rotate_key(old, new)
    assert key_rotation(Checkpoint.parse(open_note(rotation.note, Verifier.from_vkey(new.vkey))[0])) == (
        old.vkey,
        new.vkey,
    )
    open_note(rotation.note, Verifier.from_vkey(old.vkey))  # signed by both
    assert ledger.state().vkey == new.vkey
    with pytest.raises(LedgerError, match="signed by"):
        ledger.checkpoint(old)  # the old key signs no more
    with pytest.raises(LedgerError, match="another key"):
        ledger.rotate_key(new, new)
    add_subject(trial, 8)
    ledger.integrate()
    after = ledger.checkpoint(new)
    # The log still proves inclusion against a checkpoint an auditor saved before the rotation.
    assert ledger.inclusion_proof(index=2, checkpoint=notes[0]).size == 8
    ledger.close()

    saved = [notes[0], after.note]
    check_auditor_input(saved, old.vkey)  # the post-rotation one is left to verify_ledger
    for vkey in (old.vkey, new.vkey, None):
        findings = verify_ledger(trial.url, checkpoints_from=saved if vkey else None, vkey=vkey)
        assert list(findings) == [], (vkey, findings)
        assert findings.info["log_keys"] == [old.vkey, new.vkey]
    report = verify_record(trial.url, workers=1, checkpoint=saved, vkey=old.vkey)
    assert report.ok, report.findings
    other = create_log_key(tmp_path / "other.key", ORIGIN)  # same origin, not this log's key
    assert {f.kind for f in verify_ledger(trial.url, vkey=other.vkey)} == {
        "checkpoint_bad_signature",
        "ledger_state_mismatch",
    }


def test_a_rotation_forged_without_the_old_key_is_not_followed(trial, tmp_path):
    """Someone with SQL access but not the log key writes a 'rotation' to their own key, signed by that key
    alone, and signs later checkpoints with it: an auditor with the real vkey sees exactly that."""
    from sle_events.ledger import sign_checkpoint
    from sle_events.ledger.checkpoint import KEY_ROTATION

    build(trial)
    ledger, old, _ = logged(trial, tmp_path)
    size, root = ledger.state().size, ledger.state().root
    ledger.close()
    evil = create_log_key(tmp_path / "evil.key", ORIGIN)
    forged = sign_checkpoint(Checkpoint(ORIGIN, size, root, (f"{KEY_ROTATION} {old.vkey} {evil.vkey}",)), evil)
    later = sign_checkpoint(Checkpoint(ORIGIN, size, root), evil)
    for note in (forged, later):
        execute_sql(
            trial.url,
            "insert into ledger_checkpoints (size, root, note, issued_at) values (:size, :root, :note, :at)",
            size=size,
            root=root,
            note=note,
            at=datetime.now(UTC),
        )
    execute_sql(trial.url, "update ledger_state set vkey = :vkey", vkey=evil.vkey)

    findings = verify_ledger(trial.url, vkey=old.vkey)
    details = [f.detail for f in findings if f.kind == "checkpoint_bad_signature"]
    assert any("rotation to" in d and "not signed by both keys" in d for d in details), details
    assert any("does not verify with" in d for d in details), details  # the forged rotation lacks the old key's
    assert any("no rotation signed by both keys links to" in d for d in details), details  # the later one
    assert {f.kind for f in findings} == {"checkpoint_bad_signature", "ledger_state_mismatch"}


# --- tampering by SQL -----------------------------------------------------------------------------------------
def test_deleted_last_event_of_a_stream_is_found_by_the_ledger_only(trial, tmp_path):
    subjects = build(trial)
    ledger, _signer, _ = logged(trial, tmp_path, sizes=(8, 12))
    b = subjects[1]
    pos = position_of(trial, b.id, 4)
    index = event_ids(trial.url).index(pos)
    execute_sql(trial.url, "delete from study_events where id = :id", id=pos)

    report = verify_record(trial.url, workers=1)
    assert chain_findings(report) == []  # nothing after it points back: the chains cannot tell
    assert located(report.findings) == {
        (str(b.id), 4, "ledger_leaf_missing_event"),
        (None, None, "checkpoint_root_mismatch"),
    }
    [gone] = [f for f in report.findings if f.kind == "ledger_leaf_missing_event"]
    assert gone.position == pos and f"leaf {index} logged {b.id} v4" in gone.detail
    assert index == 11
    twelve, sixteen = sorted(
        (f for f in report.findings if f.kind == "checkpoint_root_mismatch"), key=lambda f: f.detail
    )
    assert "size 12" in twelve.detail and "among leaves 8–11" in twelve.detail  # the checkpoint of size 8 still holds
    assert "size 16" in sixteen.detail and "covers 16 events but the record holds only 15" in sixteen.detail
    with pytest.raises(LedgerError, match="gone from the record"):
        ledger.inclusion_proof(pos)  # the log refuses to vouch for it
    ledger.close()


def test_the_position_of_a_deleted_newest_event_is_never_given_again(trial, tmp_path):
    """The next append after the log's newest event was deleted takes a new position (AUTOINCREMENT on SQLite,
    the sequence on PostgreSQL), so the ledger names the deleted event rather than its successor."""
    build(trial)
    ledger, _signer, _ = logged(trial, tmp_path)
    before = event_ids(trial.url)
    newest = before[-1]
    execute_sql(trial.url, "delete from study_events where id = :id", id=newest)
    add_subject(trial, 9)
    appended = sorted(set(event_ids(trial.url)) - set(before))
    assert appended and appended[0] > newest
    ledger.integrate()
    ledger.close()
    report = verify_record(trial.url, workers=1)
    assert [(f.kind, f.position) for f in report.findings if f.kind.startswith("ledger_leaf")] == [
        ("ledger_leaf_missing_event", newest)
    ]


def test_deleted_subject_is_located_event_by_event(trial, tmp_path):
    subjects = build(trial)
    ledger, _signer, _ = logged(trial, tmp_path, sizes=(6,))
    c = subjects[2]
    positions = {v: position_of(trial, c.id, v) for v in range(1, 5)}
    execute_sql(
        trial.url,
        "delete from study_events where originator_id = (select originator_id from study_events where id = :id)",
        id=positions[1],
    )
    assert trial.rows() == 12

    report = verify_record(trial.url, workers=1)
    assert chain_findings(report) == []
    assert located(report.findings) == {(str(c.id), v, "ledger_leaf_missing_event") for v in positions} | {
        (None, None, "checkpoint_root_mismatch")
    }
    for f in report.findings:
        if f.kind == "ledger_leaf_missing_event":
            assert f.version is not None
            assert f.position == positions[f.version] and "gone from the record" in f.detail
    # The checkpoint of size 6 predates the subject: it still matches, only the final one does not.
    [cp] = [f for f in report.findings if f.kind == "checkpoint_root_mismatch"]
    assert "size 16" in cp.detail
    ledger.close()


def swap_event_positions(url: str, p1: int, p2: int) -> None:
    for a, b in ((p1, -1), (p2, p1), (-1, p2)):
        execute_sql(url, "update study_events set id = :b where id = :a", a=a, b=b)


def test_swapped_event_positions_are_caught_at_both_places(trial, tmp_path):
    subjects = build(trial)
    ledger, _signer, _ = logged(trial, tmp_path)
    a, b = subjects[0], subjects[1]
    pa, pb = position_of(trial, a.id, 2), position_of(trial, b.id, 3)
    swap_event_positions(trial.url, pa, pb)
    assert position_of(trial, a.id, 2) == pb

    report = verify_record(trial.url, workers=1)
    assert chain_findings(report) == []  # each stream is still in version order with valid signatures
    assert located(report.findings) == {
        (str(b.id), 3, "ledger_leaf_mismatch"),
        (str(a.id), 2, "ledger_leaf_mismatch"),
        (None, None, "checkpoint_root_mismatch"),
    }
    by_position = {f.position: f for f in report.findings if f.kind == "ledger_leaf_mismatch"}
    assert by_position[pa].stream == str(b.id) and f"the ledger logged {a.id} v2 there" in by_position[pa].detail
    assert by_position[pb].stream == str(a.id) and f"the ledger logged {b.id} v3 there" in by_position[pb].detail
    ledger.close()


def test_swapped_ledger_leaf_rows_break_the_order_and_the_subtrees_above_them(trial, tmp_path):
    build(trial)
    ledger, _signer, _ = logged(trial, tmp_path)
    rows = leaf_rows(trial.url)
    i, j = 2, 9  # not siblings
    for x, y in ((i, -1), (j, i), (-1, j)):
        execute_sql(trial.url, "update ledger_leaves set idx = :y where idx = :x", x=x, y=y)

    findings = verify_ledger(trial.url)
    assert sorted(f.kind for f in findings) == ["ledger_node_mismatch"] * 2 + ["ledger_order"] * 2
    order = {f.position: f.detail for f in findings if f.kind == "ledger_order"}
    assert order.keys() == {rows[i][1], rows[j][1]}  # each leaf now sits at the other's place
    assert f"leaf {i} holds log position {rows[j][1]}" in order[rows[j][1]]
    assert f"leaf {j} holds log position {rows[i][1]}" in order[rows[i][1]]
    nodes = sorted(f.detail for f in findings if f.kind == "ledger_node_mismatch")  # only their level-1 parents
    assert "(level 1, index 1) over leaves 2–3" in nodes[0] and "(level 1, index 4) over leaves 8–9" in nodes[1]
    # The events and the checkpoint are intact, but the log no longer proves against its own checkpoint.
    with pytest.raises(LedgerError, match="altered"):
        ledger.inclusion_proof(index=i)
    assert chain_findings(verify_record(trial.url, workers=1)) == []
    ledger.close()


def test_edited_ledger_tables_are_found_and_no_proof_goes_through_them(trial, tmp_path):
    subjects = build(trial)
    ledger, signer, notes = logged(trial, tmp_path, sizes=(10,))
    rows = leaf_rows(trial.url)
    # A leaf row deleted, an inner node overwritten, a stored checkpoint's signed root swapped.
    execute_sql(trial.url, "delete from ledger_leaves where idx = 5")
    execute_sql(trial.url, "update ledger_nodes set hash = :h where level = 2 and idx = 2", h=bytes(32))
    body, sig = notes[0].split("\n\n")
    origin, size, _root = body.split("\n")[:3]
    forged = f"{origin}\n{size}\n{base64.b64encode(bytes(32)).decode()}\n\n{sig}"
    execute_sql(trial.url, "update ledger_checkpoints set note = :n where size = 10", n=forged)

    findings = verify_ledger(trial.url, vkey=signer.vkey)
    assert sorted((f.kind, f.position) for f in findings) == sorted(
        [
            ("ledger_order", rows[6][1]),  # leaf 5 is missing before leaf 6
            ("event_not_in_ledger", rows[5][1]),  # and its event is now held by no leaf
            ("ledger_node_mismatch", rows[4][1]),  # the subtree over leaves 4-5 (its leaf 5 is a hole)
            ("ledger_node_mismatch", rows[8][1]),  # the overwritten node over leaves 8-11 ...
            ("ledger_node_mismatch", rows[8][1]),  # ... and its parent over leaves 8-15, which no longer hashes from it
            ("ledger_state_mismatch", None),
            ("checkpoint_bad_signature", None),
        ]
    )
    gone = next(f for f in findings if f.kind == "event_not_in_ledger")
    assert (gone.stream, gone.version) == (str(subjects[0].id), 2)  # leaf 5: after the study's 4 events, v1
    assert "ledger_leaves has no leaf 5" in next(f.detail for f in findings if f.kind == "ledger_order")
    assert "checkpoint #1" in next(f.detail for f in findings if f.kind == "checkpoint_bad_signature")
    # The log hands out no proof through the damage, and still signs only the true root (its frontier).
    with pytest.raises(LedgerError, match="altered"):
        ledger.inclusion_proof(index=12)  # its proof needs the overwritten node
    with pytest.raises(LedgerError, match="leaf index 5 does not exist"):
        ledger.inclusion_proof(index=5)
    assert ledger.checkpoint(signer).root == ledger.recompute().root
    ledger.close()


def rebuild_ledger_tree(url: str) -> None:
    """What a DBA covering their tracks does: recompute ledger_nodes and ledger_state from ledger_leaves."""
    rows = leaf_rows(url)
    cr = CompactRange()
    nodes = []
    for _, _, h in rows:
        nodes += [{"level": lvl, "idx": i, "hash": x} for lvl, i, x in cr.append(h)[1:]]
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("delete from ledger_nodes"))
            conn.execute(sa.text("insert into ledger_nodes (level, idx, hash) values (:level, :idx, :hash)"), nodes)
            state = cr.to_state()
            conn.execute(
                sa.text("update ledger_state set frontier = :f, root = :r"),
                {"f": b"".join(state.hashes), "r": cr.root()},
            )
    finally:
        engine.dispose()


def test_resigned_leaf_with_a_valid_chain_is_caught_only_by_the_checkpoints(trial, tmp_path):
    subjects = build(trial)
    ledger, signer, notes = logged(trial, tmp_path, sizes=(4, 8, 12))
    a = subjects[0]
    pos = position_of(trial, a.id, 4)  # the stream's last event: nothing chains to it
    index = event_ids(trial.url).index(pos)
    original = trial.record.stream(a.id)[-1]
    envelope = dict(original.envelope, payload=dict(original.envelope["payload"], value="0.99"))
    forged = seal(envelope, trial.lab)  # a valid signature by the same registered key
    assert forged.envelope["prev"] == original.envelope["prev"] and forged.sealed != original.sealed
    execute_sql(trial.url, "update study_events set state = :s where id = :id", s=forged.sealed, id=pos)

    report = verify_record(trial.url, workers=1)
    assert chain_findings(report) == []  # chain, signature, key and role all hold
    assert located(report.findings) == {
        (str(a.id), 4, "ledger_leaf_mismatch"),
        (None, None, "checkpoint_root_mismatch"),
    }
    [leaf] = [f for f in report.findings if f.kind == "ledger_leaf_mismatch"]
    assert leaf.position == pos and f"leaf {index}" in leaf.detail

    # The DBA also rewrites the leaf hash and recomputes every ledger node: the ledger is self-consistent
    # again, and only the checkpoints signed before the change still tell.
    execute_sql(
        trial.url, "update ledger_leaves set leaf_hash = :h where position = :p", h=leaf_hash(forged.sealed), p=pos
    )
    rebuild_ledger_tree(trial.url)
    findings = verify_ledger(trial.url)
    assert located(findings) == {(None, None, "checkpoint_root_mismatch")}
    assert index == 7
    # Checkpoints of sizes 8, 12 and 16 no longer match; the one of size 4 still does, so the change is
    # located between leaves 4 and 7.
    details = sorted(f.detail for f in findings)
    assert [d.split(",")[0] for d in details] == [
        "checkpoint #2 (size 8",
        "checkpoint #3 (size 12",
        "checkpoint #4 (size 16",
    ]
    assert "among leaves 4–7" in details[0] and "up to size 4 still match" in details[0]
    saved = tmp_path / "auditor.cp"
    saved.write_text(notes[-1])
    with_saved = verify_ledger(trial.url, checkpoints_from=saved, vkey=signer.vkey)
    assert {f.kind for f in with_saved} == {"checkpoint_root_mismatch", "inconsistent_with_saved_checkpoint"}
    ledger.close()


def test_rewritten_log_is_inconsistent_with_an_older_saved_checkpoint(trial, tmp_path):
    subjects = build(trial)
    ledger, signer, notes = logged(trial, tmp_path)
    saved = tmp_path / "saved.cp"
    saved.write_text(notes[-1])  # the auditor keeps this one (size 16)
    vkey = signer.vkey

    # The operator deletes a subject, drops the ledger, re-integrates everything and signs with the right key.
    b = subjects[1]
    execute_sql(
        trial.url,
        "delete from study_events where originator_id = (select originator_id from study_events where id = :id)",
        id=position_of(trial, b.id, 1),
    )
    for table in ("ledger_checkpoints", "ledger_nodes", "ledger_leaves", "ledger_state"):
        execute_sql(trial.url, f"delete from {table}")
    add_subject(trial, 8, labs=3)  # and the log grows past the saved size again
    rewritten = Ledger(trial.url)
    assert rewritten.integrate() == 17
    new_note = rewritten.checkpoint(load_log_key(tmp_path / "log.key")).note

    report = verify_record(trial.url, workers=1)
    assert report.ok, report.findings  # on its own the rewritten log is perfectly consistent
    report = verify_record(trial.url, workers=1, checkpoint=saved, vkey=vkey)
    assert located(report.findings) == {(None, None, "inconsistent_with_saved_checkpoint")}
    assert "history before log position" in report.findings[0].detail
    assert report.ledger is not None
    assert report.ledger["saved_checkpoints"] == [{"checkpoint": str(saved), "size": 16, "consistent": False}]

    done = cli("verify", "--db", trial.url, "--workers", "1", "--checkpoint", str(saved), "--vkey", vkey)
    assert done.exit_code == 1 and "inconsistent_with_saved_checkpoint" in done.stdout and "INCONSISTENT" in done.stdout
    done = cli("ledger", "consistency", "--old", str(saved), "--db", trial.url)
    assert done.exit_code == 1 and "not consistent" in done.stderr
    # A proof the rewritten log hands out anyway fails offline against the auditor's checkpoint.
    cons, new_cp = tmp_path / "cons", tmp_path / "new.cp"
    cons.write_text("".join(base64.b64encode(h).decode() + "\n" for h in rewritten.consistency_proof(16, 17)))
    new_cp.write_text(new_note)
    done = cli(
        "ledger",
        "verify-proof",
        str(new_cp),
        "--vkey",
        vkey,
        "--old-checkpoint",
        str(saved),
        "--consistency",
        str(cons),
    )
    assert done.exit_code == 1 and "NOT an extension of the old checkpoint" in done.stderr
    rewritten.close()
    ledger.close()


# --- the sequencer ----------------------------------------------------------------------------------------------
def test_concurrent_integrators_and_writers_never_double_assign(trial, tmp_path):
    build(trial, subjects=2)
    errors: list[BaseException] = []
    go = threading.Event()

    def integrator() -> None:
        try:
            ledger = Ledger(trial.url)
            go.wait()
            for _ in range(30):
                ledger.integrate(batch=2)
            ledger.close()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=integrator) for _ in range(3)]
    for t in threads:
        t.start()
    go.set()
    for n in range(4):  # writers keep appending meanwhile
        add_subject(trial, 20 + n)
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    ledger = Ledger(trial.url)
    ledger.integrate()
    rows = leaf_rows(trial.url)
    assert [i for i, _, _ in rows] == list(range(trial.rows()))
    assert [p for _, p, _ in rows] == event_ids(trial.url)
    assert ledger.recompute() == type(ledger.recompute())(ledger.size, ledger.root())
    assert verify_ledger(trial.url) == []
    ledger.close()


CRASH_CHILD = """
import sys
from sle_events.ledger.log import Ledger
ledger = Ledger(sys.argv[1])
ledger.integrate(batch=int(sys.argv[2]), on_progress=lambda done, total: print(done, total, flush=True))
print("DONE", flush=True)
"""


def add_backlog(url: str, n: int) -> None:
    """n synthetic events behind the ledger: the sequencer treats the stored bytes as opaque leaves."""
    t = events_table()
    rows = [
        {
            "originator_id": uuid.uuid4(),
            "originator_version": 1,
            "topic": "synthetic",
            "state": b'{"synthetic":' + str(i).encode() + b"}" + os.urandom(64),
        }
        for i in range(n)
    ]
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(t.insert(), rows)
    finally:
        engine.dispose()


def integrate_until_killed(url: str, after_lines: int) -> int:
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASH_CHILD, url, "100"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    seen = 0
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            assert not line.startswith("DONE"), "the integrator finished before it could be killed"
            seen += 1
            if seen == after_lines:
                os.kill(proc.pid, signal.SIGKILL)  # mid-run: busy with its next batch
                break
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read() if proc.stderr else ""
    return seen


@pytest.mark.slow
def test_sigkilled_integrator_loses_nothing_and_duplicates_nothing(trial, tmp_path):
    build(trial, subjects=1)
    Ledger(trial.url).close()  # tables exist; nothing integrated
    add_backlog(trial.url, 30000)
    total = trial.rows()
    sizes = []
    for after in (3, 5):
        integrate_until_killed(trial.url, after)
        sizes.append(count_rows(trial.url, "ledger_leaves"))
    assert 0 < sizes[0] < sizes[1] < total, sizes  # killed twice in the middle of the backlog
    ledger = Ledger(trial.url)
    assert ledger.size == sizes[1]  # the state row moved with the leaves, in the same transactions
    assert ledger.integrate() == total - sizes[1]
    rows = leaf_rows(trial.url)
    assert [i for i, _, _ in rows] == list(range(total))  # no index missing or repeated
    assert [p for _, p, _ in rows] == event_ids(trial.url)  # every event exactly once, in log order
    again = ledger.recompute()
    assert (again.size, again.root) == (ledger.size, ledger.root())
    assert verify_ledger(trial.url) == []
    ledger.close()


# --- proofs, property-based ---------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_inclusion_and_consistency_proofs_of_random_events_verify(proved, data):
    ledger, vkey, notes, leaves = proved
    k = data.draw(st.integers(0, len(notes) - 1), label="checkpoint")
    size = Checkpoint.parse(notes[k].split("\n\n")[0] + "\n").size
    index = data.draw(st.integers(0, size - 1), label="leaf")
    proof = ledger.inclusion_proof(index=index, checkpoint=notes[k] if k < len(notes) - 1 else None)
    assert proof.leaf_bytes == leaves[index] and proof.size == size
    verified = verify_proof_file(proof.text, proof.leaf_bytes, vkey)
    assert (verified.index, verified.checkpoint.size) == (index, size)
    other = data.draw(st.integers(0, len(leaves) - 1).filter(lambda i: leaves[i] != leaves[index]), label="other")
    with pytest.raises(ValueError):
        verify_proof_file(proof.text, leaves[other], vkey)  # another event's bytes do not fit
    k2 = data.draw(st.integers(k, len(notes) - 1), label="newer")
    old = Checkpoint.parse(notes[k].split("\n\n")[0] + "\n")
    new = Checkpoint.parse(notes[k2].split("\n\n")[0] + "\n")
    verify_consistency(old.size, new.size, ledger.consistency_proof(old.size, new.size), old.root_hash, new.root_hash)
    if old.size < new.size:
        with pytest.raises(ProofError):
            verify_consistency(
                old.size, new.size, ledger.consistency_proof(old.size, new.size), new.root_hash, old.root_hash
            )


@pytest.fixture
def proved(trial, tmp_path):
    build(trial, subjects=4)
    signer = create_log_key(tmp_path / "log.key", ORIGIN)
    ledger = Ledger(trial.url)
    notes = []
    for step in (1, 1, 1, 2, 3, 5, 7, 100):  # checkpoints at sizes 1, 2, 3, 5, 8, 13, 20, 20
        ledger.integrate(step, batch=4)
        notes.append(ledger.checkpoint(signer).note)
    t = events_table()
    with ledger.engine.connect() as conn:
        leaves = [bytes(s) for s in conn.execute(sa.select(t.c.state).order_by(t.c.id)).scalars()]
    yield ledger, signer.vkey, notes, leaves
    ledger.close()


# --- periodic mode and witness ---------------------------------------------------------------------------------
def test_run_integrates_and_checkpoints_periodically_until_stopped(trial, tmp_path):
    build(trial, subjects=1)
    signer = create_log_key(tmp_path / "log.key", ORIGIN)
    ledger = Ledger.for_record(trial.record)  # on the record's own engine
    stop = threading.Event()
    cycles: list[tuple[int, object]] = []
    runner = threading.Thread(
        target=ledger.run, args=(signer, 0.05), kwargs={"stop": stop, "on_cycle": lambda a, c: cycles.append((a, c))}
    )
    runner.start()
    add_subject(trial, 2)
    deadline = time.monotonic() + 20
    while (latest := ledger.latest_checkpoint()) is None or latest.size < 12:
        assert time.monotonic() < deadline, "no checkpoint covered the new events"
        time.sleep(0.02)
    idle_from = len(cycles) + 1
    while len(cycles) < idle_from + 3:  # a few cycles with nothing new
        assert time.monotonic() < deadline
        time.sleep(0.02)
    stop.set()
    runner.join(timeout=10)
    assert not runner.is_alive()
    sizes = [c.size for c in ledger.checkpoints()]
    assert sizes == sorted(set(sizes)) and sizes[-1] == 12  # one checkpoint per growth, none for idle cycles
    assert all(issued is None for _, issued in cycles[idle_from:])

    # The command: SIGTERM stops it cleanly.
    add_subject(trial, 3)
    proc = subprocess.Popen(
        [SLE, "ledger", "run", "--db", trial.url, "--log-key", str(tmp_path / "log.key"), "--interval", "0.1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while ledger.latest_checkpoint().size < 16:
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and "stopped" in stderr
    ledger.close()


def test_witness_cosigns_only_consistent_growth(trial, tmp_path):
    subjects = build(trial, subjects=2)
    url, key = trial.url, tmp_path / "log.key"
    assert cli("ledger", "init", "--log-key", str(key), "--db", url).exit_code == 0
    assert cli("ledger", "checkpoint", "--db", url, "--log-key", str(key)).exit_code == 0
    wkey, wstate = tmp_path / "witness.key", tmp_path / "witness.json"
    args = [
        "ledger",
        "witness",
        "--witness-key",
        str(wkey),
        "--name",
        "witness.example",
        "--state",
        str(wstate),
        "--db",
        url,
    ]
    first = cli(*args)
    assert first.exit_code == 0, first.output
    assert stat.S_IMODE(wkey.stat().st_mode) == 0o600 and json.loads(wstate.read_text())["size"] == 12
    add_subject(trial, 5)
    assert cli("ledger", "checkpoint", "--db", url, "--log-key", str(key)).exit_code == 0
    second = cli(*args)
    assert second.exit_code == 0, second.output
    assert json.loads(wstate.read_text())["size"] == 16
    seed_signer = load_log_key(wkey)
    cosigner = CosignatureVerifier(seed_signer.name, seed_signer.public_key)
    vkey = Ledger(url).state().vkey
    assert vkey is not None
    _text, sigs = open_note(second.stdout, [Verifier.from_vkey(vkey), cosigner])
    assert {s.name for s in sigs} == {ORIGIN, "witness.example"}

    # The log is rewritten (a subject deleted, ledger rebuilt, re-signed): the witness refuses.
    execute_sql(
        url,
        "delete from study_events where originator_id = (select originator_id from study_events where id = :id)",
        id=position_of(trial, subjects[0].id, 1),
    )
    for table in ("ledger_checkpoints", "ledger_nodes", "ledger_leaves", "ledger_state"):
        execute_sql(url, f"delete from {table}")
    add_subject(trial, 6, labs=4)
    assert cli("ledger", "checkpoint", "--db", url, "--log-key", str(key)).exit_code == 0
    state_before = wstate.read_text()
    refused = cli(*args)
    assert refused.exit_code == 1 and "REFUSED" in refused.stderr and "not proven consistent" in refused.stderr
    assert wstate.read_text() == state_before
