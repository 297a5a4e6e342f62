"""The signed export manifest and the export scope, on both engines: a clean export verifies offline and against
the record; each tampering is its own finding; a scope naming nothing, or an unusable key, is refused before
anything is written."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import uuid
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from sle_events.exports.manifest import (
    Exporter,
    ExportError,
    latest_checkpoint,
    load_exporter,
    manifest_path,
    verify_export,
    write_manifest,
)
from sle_events.exports.scope import ExportScope, ExportScopeError
from sle_events.ledger.keyfile import create_log_key
from sle_events.ledger.log import Ledger
from sle_events.signing.keys import Signer

import export_fixtures

demo_ledger = export_fixtures.demo_ledger
pytestmark = pytest.mark.storage
SLE = str(Path(sys.executable).with_name("sle"))


def sle(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, COLUMNS="200", NO_COLOR="1")
    return subprocess.run([SLE, *args], capture_output=True, text=True, timeout=120, env=env)


def _export(demo, name: str, files: dict[str, bytes] | None = None, *, folder: bool = False, scope=None):
    """A small export (files with the given bytes) and its manifest, signed by the demo's data manager."""
    base = demo.folder / name
    if folder:
        base.mkdir()
        paths = []
        for fname, data in (files or {"a.xpt": b"A", "b.xpt": b"B"}).items():
            (base / fname).write_bytes(data)
            paths.append(base / fname)
    else:
        base.write_bytes(b"<ODM/>\n")
        paths = [base]
    scope = (scope or ExportScope()).resolve(demo.url)
    cp = latest_checkpoint(demo.url)
    exporter = load_exporter(demo.keys / "data_manager.pem", demo.url, study_id=scope.study_id, checkpoint=cp)
    return write_manifest(base, paths, kind="test", scope=scope, exporter=exporter, checkpoint=cp), exporter, cp


def kinds(findings) -> list[str]:
    return sorted(f.kind for f in findings)


def test_a_clean_export_verifies_offline_and_against_the_record(demo_ledger):
    manifest, exporter, cp = _export(demo_ledger, "clean.xml")
    assert manifest == demo_ledger.folder / "clean.xml.manifest.json"
    assert verify_export(manifest, vkey=demo_ledger.vkey) == []
    assert verify_export(demo_ledger.folder / "clean.xml", vkey=demo_ledger.vkey, db_url=demo_ledger.url) == []
    doc = json.loads(manifest.read_text())["manifest"]
    assert doc["files"] == [{"name": "clean.xml", "sha256": hashlib.sha256(b"<ODM/>\n").hexdigest(), "size": 7}]
    assert doc["checkpoint"] == cp.note and doc["position"] == cp.position
    assert doc["exporter"]["key"] == exporter.signer.key_id and doc["exporter"]["actor"] == "dm.zhao"
    assert doc["exporter"]["role"] == "data_manager" and doc["exporter"]["printed_name"] == "Zhao Min"
    assert doc["software"]["name"] == "sle-events" and doc["software"]["version"]
    assert doc["scope"]["study"] == "ALLOMSC-SLE" and doc["scope"]["subject"] is None


def test_a_folder_export_lists_every_file(demo_ledger):
    manifest, *_ = _export(demo_ledger, "sdtm", {"dm.xpt": b"DM", "lb.xpt": b"LB" * 100}, folder=True)
    assert manifest == demo_ledger.folder / "sdtm" / "export.manifest.json"
    assert verify_export(demo_ledger.folder / "sdtm", vkey=demo_ledger.vkey) == []
    (demo_ledger.folder / "sdtm" / "extra.xpt").write_bytes(b"X")
    (demo_ledger.folder / "sdtm" / "lb.xpt").unlink()
    found = verify_export(demo_ledger.folder / "sdtm", vkey=demo_ledger.vkey)
    assert kinds(found) == ["file_missing", "file_unlisted"]
    assert {f.stream for f in found} == {"lb.xpt", "extra.xpt"}


def test_a_changed_byte_is_file_altered(demo_ledger):
    manifest, *_ = _export(demo_ledger, "byte.xml")
    data = bytearray((demo_ledger.folder / "byte.xml").read_bytes())
    data[1] ^= 1
    (demo_ledger.folder / "byte.xml").write_bytes(bytes(data))
    found = verify_export(manifest, vkey=demo_ledger.vkey)
    assert kinds(found) == ["file_altered"] and "byte.xml" in found[0].detail


def test_a_removed_file_is_file_missing(demo_ledger):
    manifest, *_ = _export(demo_ledger, "gone.xml")
    (demo_ledger.folder / "gone.xml").unlink()
    assert kinds(verify_export(manifest, vkey=demo_ledger.vkey)) == ["file_missing"]


def test_an_added_file_beside_the_export_is_file_unlisted(demo_ledger):
    manifest, *_ = _export(demo_ledger, "added.xml")
    (demo_ledger.folder / "added.xml.2").write_bytes(b"<ODM/>")
    found = verify_export(manifest, vkey=demo_ledger.vkey)
    assert kinds(found) == ["file_unlisted"] and found[0].stream == "added.xml.2"


def test_an_edited_manifest_is_manifest_bad_signature(demo_ledger):
    manifest, *_ = _export(demo_ledger, "edited.xml")
    doc = json.loads(manifest.read_text())
    doc["manifest"]["scope"]["site"] = "SH01"  # claim a narrower scope than was exported
    manifest.write_text(json.dumps(doc))
    assert kinds(verify_export(manifest, vkey=demo_ledger.vkey)) == ["manifest_bad_signature"]
    manifest.write_text("{not json")
    assert kinds(verify_export(manifest, vkey=demo_ledger.vkey)) == ["manifest_malformed"]


def test_a_manifest_signed_by_an_unregistered_key(demo_ledger):
    intruder = Signer.generate("dm.zhao", "data_manager")
    path = demo_ledger.folder / "intruder.pem"
    intruder.save(path)
    scope = ExportScope().resolve(demo_ledger.url)
    cp = latest_checkpoint(demo_ledger.url)
    with pytest.raises(ExportError, match="not registered"):
        load_exporter(path, demo_ledger.url, study_id=scope.study_id, checkpoint=cp)
    # Forged by hand: the registered key's registration event carried along, the manifest signed by another key.
    real = load_exporter(demo_ledger.keys / "data_manager.pem", demo_ledger.url, study_id=scope.study_id, checkpoint=cp)
    out = demo_ledger.folder / "forged.xml"
    out.write_bytes(b"<ODM/>")
    forged = write_manifest(
        out, [out], kind="test", scope=scope, exporter=Exporter(intruder, "Zhao Min", real.registration), checkpoint=cp
    )
    assert kinds(verify_export(forged, vkey=demo_ledger.vkey)) == ["key_unregistered"]
    assert "key_unregistered" in kinds(verify_export(forged, vkey=demo_ledger.vkey, db_url=demo_ledger.url))


def test_a_checkpoint_of_another_log(demo_ledger, tmp_path):
    manifest, exporter, cp = _export(demo_ledger, "other-log.xml")
    other = create_log_key(tmp_path / "other.key", "sle.local/ALLOMSC-SLE")
    assert kinds(verify_export(manifest, vkey=other.vkey)) == ["checkpoint_bad_signature"]
    # A manifest re-signed around another log's checkpoint (same origin, same size and root, another key)
    from sle_events.ledger.checkpoint import Checkpoint, sign_checkpoint

    note = sign_checkpoint(Checkpoint(cp.origin, cp.size, cp.root), other)
    out = demo_ledger.folder / "other-log.xml"
    scope = ExportScope().resolve(demo_ledger.url)
    resigned = write_manifest(
        out, [out], kind="test", scope=scope, exporter=exporter, checkpoint=replace(cp, note=note)
    )
    assert kinds(verify_export(resigned, vkey=demo_ledger.vkey)) == ["checkpoint_bad_signature"]
    assert kinds(verify_export(resigned, vkey=other.vkey, db_url=demo_ledger.url)) == ["checkpoint_other_log"]
    with pytest.raises(Exception, match="vkey"):
        verify_export(resigned, vkey="not-a-vkey")


def test_scope_is_checked_against_the_record(demo_ledger):
    url = demo_ledger.url
    s = ExportScope(subject="NJ01-0002").resolve(url)
    assert s.screening_number == "NJ01-0002" and s.subject_id and s.study_code == "ALLOMSC-SLE"
    assert ExportScope(subject=s.subject_id).resolve(url).screening_number == "NJ01-0002"
    assert s.covers_subject("NJ01", s.subject_id) and not s.covers_subject("NJ01", "another")
    with pytest.raises(ExportScopeError, match="unknown subject 'NJ01-9999'"):
        ExportScope(subject="NJ01-9999").resolve(url)
    with pytest.raises(ExportScopeError, match=r"unknown site 'XX99'.*NJ01"):
        ExportScope(site="XX99").resolve(url)
    with pytest.raises(ExportScopeError, match="reversed"):
        ExportScope(recorded_from=datetime(2008, 1, 1, tzinfo=UTC), recorded_to=datetime(2007, 1, 1, tzinfo=UTC))
    with pytest.raises(ExportScopeError, match="offset"):
        ExportScope(recorded_from=datetime(2008, 1, 1))
    with pytest.raises(ExportScopeError, match="unknown study"):
        ExportScope(study="NOPE").resolve(url)
    window = ExportScope(recorded_from=datetime(2008, 1, 1, tzinfo=UTC), recorded_to=datetime(2008, 2, 1, tzinfo=UTC))
    assert window.covers_time("2008-01-01T08:00:00+08:00") and not window.covers_time("2008-02-01T00:00:00+00:00")
    assert ExportScope.from_dict(s.to_dict()).to_dict() == s.to_dict()


def test_cli_verify_and_refusals(demo_ledger):
    manifest, *_ = _export(demo_ledger, "cli.xml")
    ok = sle("export", "verify", str(manifest), "--vkey", demo_ledger.vkey, "--db", demo_ledger.url)
    assert ok.returncode == 0, ok.stderr
    assert "verified against the record" in ok.stdout
    (demo_ledger.folder / "cli.xml").write_bytes(b"<ODM>changed</ODM>")
    bad = sle("export", "verify", str(manifest), "--vkey", demo_ledger.vkey, "--json")
    assert bad.returncode == 1 and [f["kind"] for f in json.loads(bad.stdout)["findings"]] == ["file_altered"]
    assert sle("export", "verify", str(demo_ledger.folder / "nothing"), "--vkey", demo_ledger.vkey).returncode == 2
    assert sle("export", "verify", str(manifest), "--vkey", "garbage").returncode == 2


def test_a_revoked_key_is_refused_and_found(demo_ledger, tmp_path):
    """Last in this module: it changes the record (revokes the data manager's key)."""
    manifest, exporter, cp = _export(demo_ledger, "revoked.xml")
    from sle_events.store.record import StudyRecord

    admin = Signer.from_file(demo_ledger.keys / "admin.pem", "admin@drum-tower", "admin")
    record = StudyRecord(demo_ledger.url)
    try:
        study = record.get(uuid.UUID(demo_ledger.study_id))
        study.revoke_key(exporter.signer.key_id, "left the study", datetime.now(UTC))
        record.record(study, signer=admin)
    finally:
        record.close()
    with Ledger(demo_ledger.url) as ledger:
        ledger.integrate()
    assert verify_export(manifest, vkey=demo_ledger.vkey) == []  # offline cannot see a revocation
    assert kinds(verify_export(manifest, vkey=demo_ledger.vkey, db_url=demo_ledger.url)) == ["key_revoked"]
    scope = ExportScope().resolve(demo_ledger.url)
    with pytest.raises(ExportError, match="revoked"):
        load_exporter(demo_ledger.keys / "data_manager.pem", demo_ledger.url, study_id=scope.study_id, checkpoint=cp)
    assert manifest_path(demo_ledger.folder / "x.xml").name == "x.xml.manifest.json"
    shutil.rmtree(tmp_path, ignore_errors=True)
    # A log rewritten under the export: its tree no longer gives the checkpoint's root.
    engine = sa.create_engine(demo_ledger.url)
    with engine.begin() as conn:
        conn.execute(sa.text("update ledger_nodes set hash = :h"), {"h": bytes(32)})
    engine.dispose()
    found = verify_export(manifest, vkey=demo_ledger.vkey, db_url=demo_ledger.url)
    assert "log_does_not_extend_checkpoint" in kinds(found)


def test_sle_demo_sets_up_the_ledger_so_a_newcomer_can_export_and_prove(db_url, tmp_path):
    keys = tmp_path / "keys"
    done = sle("demo", "--db", db_url, "--keys", str(keys), "--subjects", "1")
    assert done.returncode == 0, done.stderr
    vkey = sle("ledger", "vkey", "--db", db_url).stdout.strip()
    assert vkey.startswith("sle.local/ALLOMSC-SLE+") and vkey in done.stdout.replace("\n", "")
    assert (keys / "log.key").stat().st_mode & 0o077 == 0
    out = tmp_path / "odm.xml"
    made = sle("export", "odm", "--type", "snapshot", "--db", db_url, "--key", str(keys / "data_manager.pem"),
               "--out", str(out))  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert sle("export", "verify", str(out), "--vkey", vkey, "--db", db_url).returncode == 0
