"""The `sle` command as installed (.venv/bin/sle), run in a subprocess: exit codes, JSON output, key files."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization

from sle_events.audit.verifier import verify_record
from sle_events.demo import DEMO_PASSPHRASE
from sle_events.domain.subject import Subject
from sle_events.signing.keys import Signer

from conftest import STUDY_CONFIG, execute_sql, position_of

SLE = str(Path(sys.executable).with_name("sle"))
NOW = datetime.now(UTC)
FINDING_KEYS = {"stream", "version", "kind", "detail"}


def sle(*args: str, cwd: Path | None = None, umask: int | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, COLUMNS="200", NO_COLOR="1")
    env.pop("SLE_DATABASE_URL", None)
    preexec = (lambda: os.umask(umask)) if umask is not None else None
    return subprocess.run(
        [SLE, *args], capture_output=True, text=True, timeout=120, cwd=cwd, env=env, preexec_fn=preexec
    )


def subject_with_labs(trial) -> Subject:
    subject = Subject(trial.study.id, "NJ01", "SCR-001", NOW - timedelta(days=3))
    trial.record.record(subject, signer=trial.coordinator)
    subject.obtain_consent("ICF v1.0", NOW - timedelta(days=2), config=STUDY_CONFIG, taken_by="dr.wang")
    trial.record.record(subject, signer=trial.investigator)
    subject.record_lab_result("CREAT", Decimal("1.23"), "mg/dL", NOW - timedelta(days=1))
    subject.record_lab_result("C3", Decimal("85.50"), "mg/dL", NOW - timedelta(days=1))
    trial.record.record(subject, signer=trial.lab)
    return subject


# --- verify ---------------------------------------------------------------------------------------------------
@pytest.mark.storage
def test_verify_json_on_an_intact_record_is_ok_and_exits_0(trial):
    subject_with_labs(trial)
    for workers in ("1", "2"):
        done = sle("verify", "--db", trial.url, "--json", "--workers", workers)
        assert done.returncode == 0, done.stderr
        doc = json.loads(done.stdout)  # one JSON document and nothing else
        assert doc["ok"] is True and doc["findings"] == []
        assert doc["events"] == trial.rows() == 8 and doc["studies"] == 1 and doc["streams"] == 2


@pytest.mark.storage
def test_verify_json_after_tampering_lists_the_finding_and_exits_1(trial):
    subject = subject_with_labs(trial)
    pos = position_of(trial, subject.id, 3)
    if trial.url.startswith("sqlite"):
        sql = "update study_events set state = cast(replace(cast(state as text), :old, :new) as blob) where id = :id"
    else:
        sql = (
            "update study_events set state = convert_to(replace(convert_from(state, 'UTF8'), :old, :new), "
            "'UTF8') where id = :id"
        )
    execute_sql(trial.url, sql, old='"value":"1.23"', new='"value":"1.32"', id=pos)

    done = sle("verify", "--db", trial.url, "--json")
    assert done.returncode == 1, done.stderr
    doc = json.loads(done.stdout)
    assert doc["ok"] is False and doc["events"] == 8
    assert doc["findings"] and all(set(f) >= FINDING_KEYS for f in doc["findings"])
    located = {(f["stream"], f["version"], f["kind"]) for f in doc["findings"]}
    assert located == {(str(subject.id), 3, "bad_signature"), (str(subject.id), 4, "chain_broken")}
    [bad] = [f for f in doc["findings"] if f["kind"] == "bad_signature"]
    assert bad["position"] == pos and trial.lab.key_id in bad["detail"]

    human = sle("verify", "--db", trial.url, "--workers", "1")
    assert human.returncode == 1
    assert "2 findings" in human.stdout and "bad_signature" in human.stdout and "chain_broken" in human.stdout


@pytest.mark.parametrize("args", [["verify", "--no-such-option"], ["verify", "--workers", "many"], ["frobnicate"]])
def test_usage_errors_exit_2(args, tmp_path):
    done = sle(*args, "--db", f"sqlite:///{tmp_path / 'never.db'}", cwd=tmp_path)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Usage: sle" in done.stderr
    assert not (tmp_path / "never.db").exists() and not (tmp_path / "sle-study.db").exists()


# --- demo -----------------------------------------------------------------------------------------------------
def _private_material(key_dir: Path) -> list[bytes]:
    """Every form in which a key file's private key could leak: PEM, its base64 body, raw bytes as-is/b64/hex."""
    forms: list[bytes] = []
    for pem_file in sorted(key_dir.glob("*.pem")):
        pem = pem_file.read_bytes()
        encrypted = (
            b"ENCRYPTED" in pem
        )  # the investigator's key: a sign-off's second component (docs/regulated-acts.md)
        key = serialization.load_pem_private_key(pem, password=DEMO_PASSPHRASE.encode() if encrypted else None)
        raw = key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        body = b"".join(line for line in pem.splitlines() if line and not line.startswith(b"-----"))
        forms += [pem, body, raw, base64.b64encode(raw), base64.urlsafe_b64encode(raw).rstrip(b"="), raw.hex().encode()]
    return forms


def _database_bytes(url: str) -> bytes:
    """All that the database holds: the SQLite file(s), or every value of every PostgreSQL table."""
    if url.startswith("sqlite"):
        path = Path(url.removeprefix("sqlite:///"))
        files = [path, *path.parent.glob(path.name + "-*")]  # -wal, -journal
        return b"".join(f.read_bytes() for f in files if f.exists())
    engine = sa.create_engine(url)
    chunks: list[bytes] = []
    try:
        with engine.connect() as conn:
            tables = (
                conn.execute(sa.text("select table_name from information_schema.tables where table_schema = 'public'"))
                .scalars()
                .all()
            )
            assert "study_events" in tables
            for table in tables:
                for row in conn.execute(sa.text(f'select * from "{table}"')):
                    for v in row:
                        chunks.append(bytes(v) if isinstance(v, (bytes, memoryview)) else str(v).encode())
    finally:
        engine.dispose()
    return b"\n".join(chunks)


@pytest.mark.storage
def test_demo_records_a_trial_that_verifies_and_no_private_key_leaves_the_key_files(db_url, tmp_path):
    keys = tmp_path / "keys"
    done = sle("demo", "--db", db_url, "--keys", str(keys), "--subjects", "3", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "verified" in done.stdout

    pems = sorted(p.name for p in keys.glob("*.pem"))
    assert pems == [
        "admin.pem",
        "checks.pem",  # the study's checking service (automatic queries)
        "coordinator.pem",
        "data_manager.pem",
        "investigator.pem",
        "lab.pem",
        "monitor.pem",
        "sponsor.pem",
    ]
    for p in keys.glob("*.pem"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p

    report = verify_record(db_url, workers=2)
    assert report.ok, report.findings
    assert f"{report.events} signed events" in done.stdout
    said = " ".join(done.stdout.split())  # rich wraps at the terminal's width
    assert "3 enrolled" in said and "deliberately invalid commands refused:" in said and "OutsideWindow 1," in said
    again = sle("verify", "--db", db_url, "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["events"] == report.events
    # The read models are left built, at the head of the log: SQL on the audit trail works straight away.
    engine = sa.create_engine(db_url)
    with engine.connect() as conn:
        positions = set(conn.execute(sa.text("select position from projection_tracking")).scalars())
        corrected = conn.execute(sa.text("select count(*) from audit_trail where change = 'corrected'")).scalar_one()
        subjects = conn.execute(sa.text("select count(*) from patient_state")).scalar_one()
    engine.dispose()
    assert positions == {report.events} and subjects >= 3 and corrected > 0

    stored = _database_bytes(db_url)
    assert b"Subject.LabResultRecorded" in stored  # the dump really holds the events
    printed = (done.stdout + done.stderr + again.stdout + again.stderr).encode()
    for secret in _private_material(keys):
        assert secret not in stored
        assert secret not in printed


# --- keys generate --------------------------------------------------------------------------------------------
def test_keys_generate_writes_a_0600_pem_prints_only_the_public_key_and_never_overwrites(tmp_path):
    out = tmp_path / "nurse.pem"
    done = sle("keys", "generate", "--out", str(out), "--actor", "nurse.li", "--role", "coordinator", umask=0)
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600  # even with a umask of 0
    printed = json.loads(done.stdout)
    signer = Signer.from_file(out, "nurse.li", "coordinator")
    assert printed == {
        "actor": "nurse.li",
        "role": "coordinator",
        "key": signer.key_id,
        "public_key": signer.public_key_b64,
    }
    for secret in _private_material(tmp_path):
        assert secret not in (done.stdout + done.stderr).encode()

    pem = out.read_bytes()
    refused = sle("keys", "generate", "--out", str(out), "--actor", "nurse.li", "--role", "coordinator")
    assert refused.returncode == 2
    assert "refusing to overwrite" in refused.stderr and refused.stdout == ""
    assert out.read_bytes() == pem

    other = tmp_path / "notes.txt"
    other.write_text("not a key")
    assert sle("keys", "generate", "--out", str(other), "--actor", "x", "--role", "lab").returncode == 2
    assert other.read_text() == "not a key"


def test_keys_generate_refuses_unknown_role_and_dangling_links(tmp_path):
    import subprocess

    sle = str(Path(sys.executable).parent / "sle")
    bad_role = subprocess.run(
        [sle, "keys", "generate", "--out", str(tmp_path / "k.pem"), "--actor", "x", "--role", "notarole"],
        capture_output=True,
        text=True,
    )
    assert bad_role.returncode == 2 and "unknown role" in bad_role.stderr
    assert not (tmp_path / "k.pem").exists()
    target = tmp_path / "elsewhere.pem"
    (tmp_path / "link.pem").symlink_to(target)
    linked = subprocess.run(
        [sle, "keys", "generate", "--out", str(tmp_path / "link.pem"), "--actor", "x", "--role", "lab"],
        capture_output=True,
        text=True,
    )
    assert linked.returncode == 2 and not target.exists()


def test_study_commands_manage_the_key_registry(tmp_path, db_url):
    import subprocess

    sle = str(Path(sys.executable).parent / "sle")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sle, *args, "--db", db_url], capture_output=True, text=True, cwd=tmp_path)

    def keygen(name: str, actor: str, role: str) -> dict:
        done = subprocess.run(
            [sle, "keys", "generate", "--out", str(tmp_path / name), "--actor", actor, "--role", role],
            capture_output=True,
            text=True,
            check=True,
        )
        return json.loads(done.stdout)

    keygen("admin.pem", "admin", "admin")
    lab = keygen("lab.pem", "lab1", "lab")
    created = run(
        "study", "create", "--code", "X", "--title", "T", "--admin-key", str(tmp_path / "admin.pem"), "--admin", "admin"
    )
    assert created.returncode == 0, created.stderr
    study = json.loads(created.stdout)["study"]
    admin_args = ("--admin-key", str(tmp_path / "admin.pem"), "--admin", "admin")
    assert (
        run(
            "study",
            "register-key",
            "--study",
            study,
            "--actor",
            "lab1",
            "--role",
            "lab",
            "--service",
            "--public-key",
            lab["public_key"],
            *admin_args,
        ).returncode
        == 0
    )
    assert (
        run("study", "revoke-key", "--study", study, "--key", lab["key"], "--reason", "left", *admin_args).returncode
        == 0
    )
    again = run("study", "revoke-key", "--study", study, "--key", lab["key"], "--reason", "x", *admin_args)
    assert again.returncode == 1 and "already revoked" in again.stderr
    keys = json.loads(run("study", "keys", "--study", study, "--json").stdout)
    assert {k["actor"]: k["status"] for k in keys} == {"admin": "active", "lab1": "revoked"}
    newcomer = keygen("new.pem", "x", "lab")
    impostor = run(
        "study",
        "register-key",
        "--study",
        study,
        "--actor",
        "x",
        "--role",
        "lab",
        "--service",
        "--public-key",
        newcomer["public_key"],
        "--admin-key",
        str(tmp_path / "lab.pem"),
        "--admin",
        "lab1",
    )
    assert impostor.returncode == 1 and "UntrustedKey" in impostor.stderr
    assert verify_record(db_url, workers=1).ok


def test_verify_refuses_a_database_that_is_not_there(tmp_path):
    """An auditor's typo must not create and 'verify' an empty database."""
    import subprocess

    sle = str(Path(sys.executable).parent / "sle")
    missing = tmp_path / "typo.db"
    done = subprocess.run([sle, "verify", "--db", f"sqlite:///{missing}"], capture_output=True, text=True)
    assert done.returncode == 2 and "no database file" in done.stderr
    assert not missing.exists()


@pytest.mark.parametrize(
    "command", [["patients"], ["dashboard"], ["audit-trail"], ["replay", "--subject", "X"], ["projections", "status"]]
)
def test_read_commands_refuse_a_database_that_is_not_there(tmp_path, command):
    import subprocess

    sle = str(Path(sys.executable).parent / "sle")
    missing = tmp_path / "typo.db"
    done = subprocess.run([sle, *command, "--db", f"sqlite:///{missing}"], capture_output=True, text=True)
    assert done.returncode == 2 and "no database file" in done.stderr
    assert not missing.exists()


@pytest.mark.parametrize("command", [["patients"], ["audit-trail"], ["projections", "status"]])
def test_read_commands_ask_for_an_upgrade_on_an_older_schema(tmp_path, command):
    """A database still at revision 0004 holds the audit trail as a row-per-field table."""
    import subprocess

    from sle_events import schema

    url = f"sqlite:///{tmp_path / 'old.db'}"
    schema.upgrade(url, "0004")
    sle = str(Path(sys.executable).parent / "sle")
    done = subprocess.run([sle, *command, "--db", url], capture_output=True, text=True)
    assert done.returncode == 2 and "sle db upgrade" in done.stderr, done.stderr
    done = subprocess.run([sle, "db", "upgrade", "--db", url], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    done = subprocess.run([sle, *command, "--db", url], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
