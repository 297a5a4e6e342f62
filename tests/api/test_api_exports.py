"""Exports through the HTTP API (issue 15): the server builds the export from its latest signed checkpoint and
hands over the bytes, the checkpoint and the caller's key registration; the caller's client writes the files and
signs the manifest with its own key. `sle export verify` accepts what it wrote. Both engines (a 2-subject demo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from sle_events.api import create_app
from sle_events.client import ApiProblem, Client
from sle_events.demo import demo_signers
from sle_events.exports.manifest import verify_export
from sle_events.exports.remote import download_export

import export_fixtures

demo_ledger = export_fixtures.demo_ledger
pytestmark = pytest.mark.storage
SLE = str(Path(sys.executable).with_name("sle"))


def sle(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, COLUMNS="200", NO_COLOR="1")
    return subprocess.run([SLE, *args], capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def served(demo_ledger) -> Iterator[tuple[object, dict[str, Client]]]:
    signers = demo_signers(demo_ledger.keys)
    app = create_app(demo_ledger.url)
    with TestClient(app) as http:
        yield (
            demo_ledger,
            {name: Client("http://testserver", s, demo_ledger.study_id, http=http) for name, s in signers.items()},
        )


@pytest.mark.parametrize("file_type", ["snapshot", "transactional"])
def test_an_odm_export_written_by_the_client_verifies_like_sle_exports(served, file_type):
    demo, clients = served
    out = demo.folder / f"api-{file_type}.xml"
    manifest = download_export(clients["data_manager"], f"odm-{file_type}", out)
    assert manifest == out.with_name(out.name + ".manifest.json")
    assert out.read_bytes().startswith(b"<?xml") and b"ODM" in out.read_bytes()[:2000]
    done = sle("export", "verify", str(out), "--vkey", demo.vkey)
    assert done.returncode == 0, done.stdout + done.stderr
    assert verify_export(out, vkey=demo.vkey, db_url=demo.url) == []
    # the same manifest as `sle export odm` writes, signed by the data manager's own key
    cli_out = demo.folder / f"cli-{file_type}.xml"
    made = sle("export", "odm", "--type", file_type, "--out", str(cli_out), "--db", demo.url,
               "--key", str(demo.keys / "data_manager.pem"))  # fmt: skip
    assert made.returncode == 0, made.stderr
    ours = json.loads(manifest.read_text())["manifest"]
    theirs = json.loads(cli_out.with_name(cli_out.name + ".manifest.json").read_text())["manifest"]
    assert set(ours) == set(theirs)
    for field in ("format", "kind", "scope", "checkpoint", "position", "exporter", "software"):
        assert ours[field] == theirs[field], field
    assert ours["exporter"]["key"] == clients["data_manager"].signer.key_id


def test_folder_and_report_exports_through_the_api_verify(served):
    demo, clients = served
    for kind, out in [("sdtm", demo.folder / "api-sdtm"), ("fhir", demo.folder / "api-fhir"),
                      ("report", demo.folder / "api-report.pdf")]:  # fmt: skip
        download_export(clients["sponsor"], kind, out)
        done = sle("export", "verify", str(out), "--vkey", demo.vkey)
        assert done.returncode == 0, (kind, done.stdout + done.stderr)
    assert (demo.folder / "api-sdtm" / "export.manifest.json").exists()
    assert any(p.suffix == ".xpt" for p in (demo.folder / "api-sdtm").iterdir())


def test_an_export_of_one_subject_carries_its_scope(served):
    demo, clients = served
    [first, *_] = clients["data_manager"].get("/patients")["items"]
    out = demo.folder / "api-one.xml"
    manifest = download_export(clients["data_manager"], "odm-snapshot", out, subject=first["screening_number"])
    scope = json.loads(manifest.read_text())["manifest"]["scope"]
    assert scope["subject"] == first["screening_number"] and scope["subject_id"] == first["subject"]
    assert sle("export", "verify", str(out), "--vkey", demo.vkey).returncode == 0


def test_export_refusals_are_problem_json_and_write_nothing(served):
    demo, clients = served
    for who, kind, params, status, problem in [
        ("lab", "odm-snapshot", {}, 403, "forbidden"),  # a lab service does not export the study
        ("monitor", "odm-snapshot", {}, 403, "forbidden"),
        ("data_manager", "odm-sideways", {}, 404, "not_found"),
        ("data_manager", "odm-snapshot", {"subject": "XX01-9999"}, 422, "validation"),
        ("data_manager", "odm-snapshot", {"recorded_from": "2026-01-01T00:00:00"}, 422, "validation"),  # no offset
    ]:
        out = demo.folder / f"refused-{who}-{status}.xml"
        with pytest.raises(ApiProblem) as e:
            download_export(clients[who], kind, out, **params) if kind != "odm-sideways" else clients[who].get(
                f"/exports/{kind}"
            )
        assert (e.value.status, e.value.kind) == (status, problem), (who, kind, params, e.value.problem)
        assert not out.exists() and not out.with_name(out.name + ".manifest.json").exists()
    assert not [p for p in demo.folder.iterdir() if p.name.startswith(".")]  # no staging folder left behind


class Tampering:
    """A server (or a path to it) that changes the answer: the real answer with one thing altered."""

    def __init__(self, client: Client, change) -> None:
        self.client, self.signer, self.change = client, client.signer, change

    def get(self, path: str, **params):
        doc = self.client.get(path, **params)
        self.change(doc)
        return doc


def test_the_client_signs_nothing_that_does_not_add_up(served):
    import base64

    from sle_events.exports.manifest import ExportError

    demo, clients = served

    def flip(doc):
        data = bytearray(base64.b64decode(doc["files"][0]["content"]))
        data[-2] ^= 1
        doc["files"][0]["content"] = base64.b64encode(bytes(data)).decode()

    def escape(doc):
        for f in doc["files"]:
            f["name"] = "../" + f["name"]

    def other_key(doc):
        doc["exporter"]["public_key"] = clients["sponsor"].signer.public_key_b64

    for kind, change, why in [
        ("odm-snapshot", flip, "does not match its SHA-256"),
        ("sdtm", escape, "not a plain relative path"),
        ("odm-snapshot", other_key, "another key"),
    ]:
        out = demo.folder / f"tampered-{change.__name__}"
        with pytest.raises(ExportError, match=why):
            download_export(Tampering(clients["data_manager"], change), kind, out)
        assert not out.exists()
