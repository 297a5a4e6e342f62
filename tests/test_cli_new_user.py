"""Issue 18: the CLI and the Python API as a new data manager or auditor meets them. One test per defect."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import typer

from sle_events.domain.errors import UnknownSubject
from sle_events.domain.study import RegistryError
from sle_events.domain.subject import Subject
from sle_events.signing.keys import Signer
from sle_events.trial import Trial as UseCases

from conftest import STUDY_CONFIG

SLE = str(Path(sys.executable).with_name("sle"))
NOW = datetime.now(UTC)


def sle(*args: str, cwd: Path | None = None, columns: int = 200) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, COLUMNS=str(columns), NO_COLOR="1")
    env.pop("SLE_DATABASE_URL", None)
    return subprocess.run([SLE, *args], capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


def clean_exit(done: subprocess.CompletedProcess[str], code: int) -> None:
    assert done.returncode == code, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout, done.stderr


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[str, Path]:
    """A small demo in an SQLite file (read-only for the tests below)."""
    folder = tmp_path_factory.mktemp("demo")
    url = f"sqlite:///{folder / 'demo.db'}"
    done = sle("demo", "--db", url, "--subjects", "2", "--keys", str(folder / "keys"), cwd=folder)
    assert done.returncode == 0, done.stderr
    return url, folder


# --- a repeated demo ------------------------------------------------------------------------------------------
def test_a_second_demo_into_the_same_database_says_so_and_exits_2(demo):
    url, folder = demo
    done = sle("demo", "--db", url, "--subjects", "2", "--keys", str(folder / "keys"), cwd=folder)
    clean_exit(done, 2)
    assert "already holds a study record" in done.stderr and "another --db" in done.stderr


# --- audit-trail times ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["yesterday", "2008-13-45", "2008-03-01T00:00:00"])
def test_audit_trail_refuses_times_that_are_not_instants(demo, bad):
    done = sle("audit-trail", "--db", demo[0], "--since", bad)
    clean_exit(done, 2)
    assert "--since" in done.stderr and "offset" in done.stderr


def test_audit_trail_compares_instants_not_text(demo):
    utc = json.loads(
        sle("audit-trail", "--db", demo[0], "--since", "2008-01-01T00:00:00+00:00", "--format", "json").stdout
    )
    shanghai = json.loads(
        sle("audit-trail", "--db", demo[0], "--since", "2008-01-01T08:00:00+08:00", "--format", "json").stdout
    )
    assert utc and len(utc) == len(shanghai)
    assert all(datetime.fromisoformat(r["recorded_at"]) >= datetime(2008, 1, 1, tzinfo=UTC) for r in utc)
    until = json.loads(
        sle("audit-trail", "--db", demo[0], "--until", "2008-01-01T08:00:00+08:00", "--format", "json").stdout
    )
    assert until and all(datetime.fromisoformat(r["recorded_at"]) <= datetime(2008, 1, 1, tzinfo=UTC) for r in until)


# --- unusable input: exit 2, a clear message, never a traceback ------------------------------------------------
@pytest.mark.parametrize(
    ("db", "says"),
    [
        ("not a url", "neither a database URL nor an SQLite file"),
        ("postgres://postgres@127.0.0.1:5432/x", "postgresql+psycopg://postgres@127.0.0.1:5432/x"),
        ("mysql://u@localhost/x", "not installed"),
        ("nosuchdb://x/y", "unknown database kind"),
    ],
)
def test_a_db_that_is_not_a_usable_url_exits_2_saying_how_to_write_it(tmp_path, db, says):
    for command in (["verify"], ["patients"], ["study", "keys"]):
        done = sle(*command, "--db", db, cwd=tmp_path)
        clean_exit(done, 2)
        assert says in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_plain_path_is_taken_as_an_sqlite_file(demo, tmp_path):
    path = demo[0].removeprefix("sqlite:///")
    done = sle("verify", "--db", path)
    clean_exit(done, 0)
    rel = sle("patients", "--db", os.path.relpath(path, tmp_path), cwd=tmp_path)
    clean_exit(rel, 0)
    assert "NJ01-0001" in rel.stdout


def test_study_keys_refuses_an_unknown_study_and_a_missing_database(demo, tmp_path):
    for study in ("nope", "00000000-0000-0000-0000-000000000001"):
        done = sle("study", "keys", "--db", demo[0], "--study", study)
        clean_exit(done, 2)
        assert "no study" in done.stderr and "ALLOMSC-SLE" in done.stderr
    typo = tmp_path / "typo.db"
    for command in (["study", "keys", "--study", "x"], ["study", "list"]):
        done = sle(*command, "--db", f"sqlite:///{typo}")
        clean_exit(done, 2)
        assert "no database file" in done.stderr
    assert not typo.exists()
    assert json.loads(sle("study", "keys", "--db", demo[0], "--json").stdout)  # the only study: --study optional


def test_keys_generate_into_a_missing_folder_and_a_missing_admin_key_exit_2(tmp_path):
    done = sle("keys", "generate", "--out", str(tmp_path / "missing-dir" / "x.pem"), "--actor", "a", "--role", "lab")
    clean_exit(done, 2)
    assert "create its folder first" in done.stderr
    done = sle(
        "study",
        "create",
        "--code",
        "X",
        "--title",
        "T",
        "--admin-key",
        str(tmp_path / "missing.pem"),
        "--admin",
        "a",
        "--db",
        f"sqlite:///{tmp_path / 'x.db'}",
    )
    clean_exit(done, 2)
    assert "cannot use admin key" in done.stderr


# --- a screening number where a subject id is taken -------------------------------------------------------------
@pytest.mark.storage
def test_use_cases_take_a_subject_id_or_a_screening_number(trial):
    subject = Subject.screen(trial.study.id, "NJ01", "SCR-001", NOW - timedelta(days=3), config=STUDY_CONFIG)
    trial.record.record(subject, signer=trial.coordinator)
    subject.obtain_consent("ICF v1.0", NOW - timedelta(days=2), config=STUDY_CONFIG, taken_by="dr.wang")
    trial.record.record(subject, signer=trial.investigator)
    # Any: the use cases' hints say UUID, and this is the test that they take a screening number too
    use_cases: Any = UseCases(trial.record, trial.study.id)
    assert use_cases.subject("SCR-001").id == subject.id == use_cases.subject(str(subject.id)).id
    with pytest.raises(UnknownSubject):
        use_cases.record_lab_result("NJ01-9999", "C3", Decimal("85"), "mg/dL", NOW, signer=trial.lab)
    with pytest.raises(UnknownSubject):
        use_cases.subject("")


# --- the last admin key -----------------------------------------------------------------------------------------
def test_the_last_active_admin_key_cannot_be_revoked(tmp_path):
    db = f"sqlite:///{tmp_path / 's.db'}"
    admin = json.loads(
        sle("keys", "generate", "--out", str(tmp_path / "a.pem"), "--actor", "root", "--role", "admin").stdout
    )
    other = json.loads(
        sle("keys", "generate", "--out", str(tmp_path / "b.pem"), "--actor", "root2", "--role", "admin").stdout
    )
    admin_args = ("--admin-key", str(tmp_path / "a.pem"), "--admin", "root", "--db", db)
    clean_exit(sle("study", "create", "--code", "S", "--title", "T", *admin_args), 0)
    refused = sle("study", "revoke-key", "--key", admin["key"], "--reason", "oops", *admin_args)
    clean_exit(refused, 1)
    assert "last active admin key" in refused.stderr
    clean_exit(
        sle(
            "study",
            "register-key",
            "--actor",
            "root2",
            "--role",
            "admin",
            "--public-key",
            other["public_key"],
            "--printed-name",
            "Sun Qi",
            *admin_args,
        ),
        0,
    )
    clean_exit(sle("study", "revoke-key", "--key", admin["key"], "--reason", "handed over", *admin_args), 0)


def test_revoking_the_last_admin_key_is_refused_by_the_domain():
    from sle_events.domain.study import Study

    admin = Signer.generate("root", "admin")
    study = Study.create("S", "T", "root", admin.public_key_b64, NOW)
    with pytest.raises(RegistryError, match="last active admin key"):
        study.revoke_key(admin.key_id, "oops", NOW)


# --- csv header, empty verify, wrong filters, duplicate codes --------------------------------------------------
def test_csv_with_no_rows_still_prints_its_header(demo):
    done = sle("audit-trail", "--db", demo[0], "--since", "2099-01-01T00:00:00+00:00", "--format", "csv")
    clean_exit(done, 0)
    header = done.stdout.splitlines()
    assert len(header) == 1 and header[0].startswith("position,event_id,") and "new_value" in header[0]


def test_verify_on_a_database_without_events_is_not_a_pass(tmp_path):
    from sle_events import schema

    url = f"sqlite:///{tmp_path / 'empty.db'}"
    schema.upgrade(url, "head")
    done = sle("verify", "--db", url)
    clean_exit(done, 2)
    assert "nothing to verify" in done.stderr and "verified" not in done.stdout
    as_json = sle("verify", "--db", url, "--json")
    clean_exit(as_json, 2)
    doc = json.loads(as_json.stdout)
    assert doc["ok"] is False and doc["events"] == 0 and "nothing to verify" in doc["error"]


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["audit-trail", "--subject", "NJ01-9999"], "NJ01-0001"),
        (["audit-trail", "--type", "LabResultRecorded"], "did you mean Subject.LabResultRecorded"),
        (["audit-trail", "--user", "nobody"], "lab.drum-tower"),
        (["patients", "--status", "dead"], "IN_FOLLOW_UP"),
        (["replay", "--subject", "NJ01-9999"], "NJ01-9999"),
    ],
)
def test_filters_that_name_nothing_exit_2_naming_the_valid_values(demo, args, names):
    done = sle(*args, "--db", demo[0])
    clean_exit(done, 2)
    assert names in done.stderr


def test_a_second_study_with_the_same_code_is_refused_and_studies_are_listed(tmp_path):
    db = f"sqlite:///{tmp_path / 's.db'}"
    sle("keys", "generate", "--out", str(tmp_path / "a.pem"), "--actor", "root", "--role", "admin")
    args = ("--title", "T", "--admin-key", str(tmp_path / "a.pem"), "--admin", "root", "--db", db)
    first = sle("study", "create", "--code", "S", *args)
    clean_exit(first, 0)
    again = sle("study", "create", "--code", "S", *args)
    clean_exit(again, 2)
    assert "already holds study S" in again.stderr
    listed = json.loads(sle("study", "list", "--db", db, "--json").stdout)
    assert [(s["study"], s["code"]) for s in listed] == [(json.loads(first.stdout)["study"], "S")]


# --- what a monitor reads ---------------------------------------------------------------------------------------
def test_the_audit_trail_names_the_corrected_item_and_a_lab_results_visit(demo):
    rows = json.loads(sle("audit-trail", "--db", demo[0], "--change", "corrected", "--format", "json").stdout)
    labs = [r for r in rows if r["form"] == "Subject.LabResultRecorded"]
    assert labs and all(
        r["item"].split(" ")[0] in {"C3", "C4", "CREAT", "UPROT", "UCREAT", "DSDNA"} or r["item"] for r in labs
    )
    assert all("(" in r["item"] for r in labs)  # the unit
    assert any(r["visit"] for r in labs)
    table = sle("audit-trail", "--db", demo[0], "--change", "corrected", columns=80)
    clean_exit(table, 0)
    assert "change" in table.stdout and "…" not in table.stdout
    assert max(len(line) for line in table.stdout.splitlines()) <= 80


def test_dashboard_visits_in_protocol_order_and_empty_sections_say_none(demo):
    data = json.loads(sle("dashboard", "--db", demo[0], "--json").stdout)
    monthly = [r["visit"] for r in data["visit_compliance"] if r["visit"].startswith("M")]
    numbers = [int(v[1:]) for v in monthly]
    assert numbers == sorted(numbers) and "M2" in monthly and "M10" in monthly
    printed = sle("dashboard", "--db", demo[0], columns=80).stdout
    assert any(line.endswith(": none") for line in printed.splitlines())


def test_the_demo_leaves_a_stale_derived_result_and_registers_printed_names(demo):
    patients = json.loads(sle("patients", "--db", demo[0], "--json").stdout)
    stale = [(p["screening_number"], s) for p in patients for s in p["stale_results"]]
    # a corrected creatinine leaves results derived from it stale (the monitoring visit re-derives one eGFR to close
    # its automatic query; what was derived from the old value and not derived again stays stale)
    assert stale and all(s["changed_inputs"] for _, s in stale), stale
    dashboard = json.loads(sle("dashboard", "--db", demo[0], "--json").stdout)
    assert sum(r["results"] for r in dashboard["stale_results"]) == len(stale)
    number, item = stale[0]
    assert f"v{item['version']}" in sle("patients", "--db", demo[0], columns=200).stdout
    corrected = json.loads(
        sle("audit-trail", "--db", demo[0], "--subject", number, "--change", "corrected", "--format", "json").stdout
    )
    assert any(r["item"].startswith("CREAT") and r["reason"] == "transcription error" for r in corrected)
    trail = json.loads(sle("audit-trail", "--db", demo[0], "--format", "json").stdout)
    names = {(r["actor"], r["printed_name"]) for r in trail}
    assert ("dr.wang", "Dr. Wang Li") in names and ("nurse.li", "Li Na") in names
    assert ("admin@drum-tower", "Zhou Min") in names  # the founding admin, named in Study.Created (schema 2)
    assert ("lab.drum-tower", "lab.drum-tower") in names  # the lab's interface is a service: no printed name


def test_replay_flags_name_their_visit(demo):
    state = json.loads(sle("replay", "--db", demo[0], "--subject", "NJ01-0002", "--json").stdout)
    assert state["flags"] and all("(" in f for f in state["flags"])
    assert any(f.startswith("VISIT_OUT_OF_WINDOW (M") for f in state["flags"])


def test_verify_findings_wrap_at_80_columns(demo, tmp_path):
    import shutil

    from conftest import execute_sql

    copy = tmp_path / "tampered.db"
    shutil.copy(demo[0].removeprefix("sqlite:///"), copy)
    url = f"sqlite:///{copy}"
    execute_sql(
        url,
        'update study_events set state = cast(replace(cast(state as text), \'"value":"\', '
        '\'"value":"9\') as blob) where id = (select max(id) from study_events '
        "where topic = 'Subject.LabResultRecorded')",
    )
    done = sle("verify", "--db", url, "--workers", "1", columns=80)
    clean_exit(done, 1)
    lines = done.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "bad_signature" in done.stdout and "position" in done.stdout


# --- help, bad numbers, closed pipes ----------------------------------------------------------------------------
def _commands(group: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    # typer keeps its own copy of click: its groups are not `click.Group`s, so ask for sub-commands instead
    commands = getattr(group, "commands", None)
    if commands is not None:
        yield path, group
        for name, command in commands.items():
            yield from _commands(command, (*path, name))
    else:
        yield path, group


# what typer shows when it falls back to Python's names: <bool>, <str>, <path>, <list[Path]>, <float range>...
PYTHON_TYPE = re.compile(r"<(bool|str|int|float|path|uuid|datetime|text)( range)?>|<(list|tuple)\[", re.IGNORECASE)


def test_every_option_has_help_and_help_shows_no_python_types():
    from sle_events.cli.main import app

    root = typer.main.get_command(app)
    commands = dict(_commands(root))
    assert {
        ("ledger", "prove"),
        ("ledger", "verify-proof"),
        ("study", "register-key"),
        ("db", "upgrade"),
        ("projections", "rebuild"),
        ("verify",),
    } <= commands.keys()  # every group, the ledger's included
    missing = []
    for path, command in commands.items():
        for p in command.params:
            if p.param_type_name == "option" and not p.help:
                missing.append(f"sle {' '.join(path)} {p.opts[0]}")
        text = sle(*path, "--help", columns=80).stdout
        assert text.startswith("Usage: sle") and not PYTHON_TYPE.search(text), (path, text)
    assert not missing, missing


def test_bad_numbers_are_refused_and_a_closed_pipe_ends_quietly(demo):
    clean_exit(sle("verify", "--db", demo[0], "--workers", "0"), 2)
    pipe = subprocess.run(
        f"{SLE} audit-trail --db {demo[0]} --format csv | head -1",
        shell=True,
        capture_output=True,
        text=True,
        executable="/bin/bash",
        env=dict(os.environ, NO_COLOR="1"),
    )
    assert pipe.stdout.startswith("position,") and pipe.stderr == "", pipe.stderr
    status = subprocess.run(
        f"{SLE} audit-trail --db {demo[0]} | head -1; echo ${{PIPESTATUS[0]}}",
        shell=True,
        capture_output=True,
        text=True,
        executable="/bin/bash",
    )
    assert status.stdout.splitlines()[-1] == "0" and "Error" not in status.stderr, status.stderr


def test_the_ledger_commands_share_the_cli_conventions(demo, tmp_path):
    """`sle ledger` as every other group: --db takes an SQLite file's path, a database that is not there is exit 2
    and is not created, bad numbers are refused, and output piped into `head` ends quietly."""
    import shutil

    copy = tmp_path / "ledger.db"
    shutil.copy(demo[0].removeprefix("sqlite:///"), copy)
    typo = tmp_path / "typo.db"
    for args in (("integrate",), ("vkey",), ("prove", "--index", "0", "--out", str(tmp_path / "p"))):
        done = sle("ledger", *args, "--db", str(typo))
        clean_exit(done, 2)
        assert "no database file" in done.stderr, done.stderr
    assert not typo.exists() and not (tmp_path / "p").exists()
    clean_exit(sle("ledger", "integrate", "--db", str(copy), "--batch", "0"), 2)
    key = demo[1] / "keys" / "log.key"  # the demo leaves its ledger set up, with this log key
    status = subprocess.run(
        f"{SLE} ledger checkpoint --db {copy} --log-key {key} | head -1; echo ${{PIPESTATUS[0]}}",
        shell=True,
        capture_output=True,
        text=True,
        executable="/bin/bash",
    )
    lines = status.stdout.splitlines()
    assert lines[0].startswith("sle.local/") and lines[-1] == "0", (status.stdout, status.stderr)
    assert "Traceback" not in status.stderr and "Error" not in status.stderr
    clean_exit(sle("ledger", "prove", "--index", "0", "--out", str(tmp_path / "p"), "--db", str(copy)), 0)
    clean_exit(sle("ledger", "verify-proof", str(tmp_path / "p"), "--vkey", str(key.with_suffix(".nope"))), 2)


# --- data managers' configuration and corrections from the CLI -------------------------------------------------
@pytest.mark.storage
def test_data_managers_configure_the_study_and_correct_from_the_cli(db_url, tmp_path):
    def key(name: str, actor: str, role: str) -> dict[str, str]:
        return json.loads(
            sle("keys", "generate", "--out", str(tmp_path / name), "--actor", actor, "--role", role).stdout
        )

    key("admin.pem", "root", "admin")
    admin = ("--admin-key", str(tmp_path / "admin.pem"), "--admin", "root", "--db", db_url)
    study = json.loads(sle("study", "create", "--code", "S", "--title", "T", *admin).stdout)["study"]
    for name, actor, role in (
        ("dm.pem", "dm.zhao", "data_manager"),
        ("coord.pem", "nurse.li", "coordinator"),
        ("lab.pem", "lab.one", "lab"),
        ("inv.pem", "dr.wang", "investigator"),
    ):
        public = key(name, actor, role)["public_key"]
        register = ("study", "register-key", "--actor", actor, "--role", role, "--public-key", public, *admin)
        if role == "lab":
            clean_exit(sle(*register, "--service"), 0)
            continue
        nameless = sle(*register)  # a person's key needs their printed name
        clean_exit(nameless, 2)
        assert "--printed-name is needed" in nameless.stderr
        clean_exit(sle(*register, "--printed-name", "Dr. Wang Li" if actor == "dr.wang" else actor.title()), 0)
    registry = json.loads(sle("study", "keys", "--db", db_url, "--json").stdout)
    assert {k["actor"]: k["printed_name"] for k in registry} == {
        "root": None,
        "dm.zhao": "Dm.Zhao",
        "nurse.li": "Nurse.Li",
        "lab.one": None,
        "dr.wang": "Dr. Wang Li",
    }
    dm = ("--key-file", str(tmp_path / "dm.pem"), "--actor", "dm.zhao", "--db", db_url, "--json")
    added = sle("study", "add-site", "--site", "NJ01", "--name", "Drum Tower", "--timezone", "Asia/Shanghai", *dm)
    clean_exit(added, 0)
    assert json.loads(added.stdout) == {"site": "NJ01", "name": "Drum Tower", "timezone": "Asia/Shanghai"}
    clean_exit(
        sle("study", "approve-icf", "--version", "ICF v1.0", "--effective-from", "2000-01-01T00:00:00+00:00", *dm), 0
    )
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"version": "site-v2"}))
    clean_exit(sle("study", "adopt-settings", "--file", str(settings), *dm), 0)
    refused = sle("study", "close-site", "--site", "XX01", "--reason", "r", *dm)
    clean_exit(refused, 1)
    assert "UnknownSite" in refused.stderr
    wrong_role = sle(
        "study",
        "add-site",
        "--site",
        "SH01",
        "--name",
        "Renji",
        "--timezone",
        "Asia/Shanghai",
        "--key-file",
        str(tmp_path / "coord.pem"),
        "--actor",
        "nurse.li",
        "--role",
        "coordinator",
        "--db",
        db_url,
    )
    clean_exit(wrong_role, 1)

    from uuid import UUID

    from sle_events.store.record import StudyRecord

    record = StudyRecord(db_url)
    try:
        assert "NJ01" in record.study(study).config.sites
        coordinator = Signer.from_file(tmp_path / "coord.pem", "nurse.li", "coordinator")
        lab = Signer.from_file(tmp_path / "lab.pem", "lab.one", "lab")
        use_cases = UseCases(record, UUID(study))
        sid = use_cases.screen("NJ01", "NJ01-0001", NOW - timedelta(hours=3), signer=coordinator)
        investigator = Signer.from_file(tmp_path / "inv.pem", "dr.wang", "investigator")
        use_cases.obtain_consent(sid, "ICF v1.0", NOW - timedelta(hours=2), signer=investigator, taken_by="dr.wang")
        use_cases.record_lab_result(sid, "C3", "85", "mg/dL", NOW - timedelta(hours=1), signer=lab)
        version = use_cases.subject(sid).version
    finally:
        record.close()
    labkey = ("--key-file", str(tmp_path / "lab.pem"), "--actor", "lab.one", "--role", "lab", "--db", db_url, "--json")
    not_lab = sle(
        "correct", "--subject", "NJ01-0001", "--version", str(version), "--set", "value=58", "--reason", "typo", *dm
    )
    clean_exit(not_lab, 1)
    assert "RoleMayNotCorrect" in not_lab.stderr
    fixed = sle(
        "correct",
        "--subject",
        "NJ01-0001",
        "--version",
        str(version),
        "--set",
        "value=58",
        "--reason",
        "transcription error",
        *labkey,
    )
    clean_exit(fixed, 0)
    assert json.loads(fixed.stdout)["corrected_version"] == version
    no_reason = sle("void", "--subject", "NJ01-0001", "--version", str(version), *labkey)
    clean_exit(no_reason, 2)  # --reason is required
    voided = sle("void", "--subject", str(sid), "--version", str(version), "--reason", "wrong patient", *labkey)
    clean_exit(voided, 0)
    unknown = sle("void", "--subject", "NJ01-0099", "--version", "1", "--reason", "r", *labkey)
    clean_exit(unknown, 2)
    assert "UnknownSubject" in unknown.stderr
    trail = json.loads(sle("audit-trail", "--db", db_url, "--subject", "NJ01-0001", "--format", "json").stdout)
    assert {r["change"] for r in trail} == {"recorded", "corrected", "voided"}
    assert {(r["actor"], r["printed_name"]) for r in trail} == {
        ("nurse.li", "Nurse.Li"),
        ("dr.wang", "Dr. Wang Li"),
        ("lab.one", "lab.one"),
    }  # a service: its id
    table = sle("audit-trail", "--db", db_url, "--subject", "NJ01-0001", "--user", "dr.wang", columns=200).stdout
    assert "Dr. Wang Li (dr.wang), investigator" in table


# --- printed names (21 CFR 11.50) in the key registry and the audit trail --------------------------------------
@pytest.mark.storage
def test_the_audit_trail_shows_the_printed_name_registered_with_the_signing_key(db_url):
    """Also after a restart (a fresh reader that never saw the registry's events), in a rebuild split across
    workers (whose subject ranges hold no registry event), and for a key registered before printed names."""
    from projections.read import StudyReader
    from projections.runner import ProjectionRunner
    from sle_events.audit.verifier import verify_record
    from sle_events.signing.envelope import seal
    from sle_events.store.codec import envelope_for
    from sle_events.store.record import StudyRecord

    admin, dm = Signer.generate("root", "admin"), Signer.generate("dm.zhao", "data_manager")
    nurse, lab = Signer.generate("nurse.li", "coordinator"), Signer.generate("lab.one", "lab")
    doctor, old_doctor = Signer.generate("dr.wang", "investigator"), Signer.generate("dr.old", "investigator")
    record = StudyRecord(db_url)
    try:
        trial = UseCases.create(
            record, code="S", title="T", admin=admin, people=[(dm, "Zhao Min"), (nurse, "Li Na"), lab]
        )
        trial.add_site("NJ01", "Drum Tower", "Asia/Shanghai", signer=dm)
        trial.approve_icf_version("ICF v1.0", NOW - timedelta(days=30), signer=dm)
        sid = trial.screen("NJ01", "NJ01-0001", NOW - timedelta(hours=5), signer=nurse)
        # A key registered by software from before printed names: schema 1, no printed_name in what was signed.
        study = record.get(trial.study_id)
        study.register_key(old_doctor.actor, old_doctor.role, old_doctor.public_key_b64, NOW)
        [event] = study.collect_events()
        v1 = envelope_for(event, study=trial.study_id, prev=record.stream(trial.study_id)[-1].hash)
        assert v1["schema"] == 2 and v1["payload"].pop("printed_name") is None
        v1["schema"] = 1
        record.append([seal(v1, admin)])
        assert trial.study.keys[old_doctor.key_id]["printed_name"] is None  # upcast on reading
        trial.register_key(doctor, admin=admin, printed_name="Dr.  Wang   Li")
        with StudyReader(db_url) as reader:  # projects the registrations; the doctor has signed nothing yet
            first = reader.audit_trail(subject="NJ01-0001")
        trial.obtain_consent(sid, "ICF v1.0", NOW - timedelta(hours=4), signer=doctor, taken_by="dr.wang")
        trial.record_lab_result(sid, "C3", "85", "mg/dL", NOW - timedelta(hours=3), signer=lab)
        trial.record_vital_signs(sid, NOW - timedelta(hours=2), signer=old_doctor, weight_kg="55.0")
    finally:
        record.close()
    assert {(r["actor"], r["printed_name"]) for r in first} == {("nurse.li", "Li Na")}
    with StudyReader(db_url) as reader:  # a new process's projection: the registry's events are behind it
        after_restart = {(r["actor"], r["printed_name"]) for r in reader.audit_trail(subject="NJ01-0001")}
    # a person's printed name; a service's id; the id of a person registered before printed names were kept
    assert after_restart == {
        ("nurse.li", "Li Na"),
        ("dr.wang", "Dr. Wang Li"),
        ("lab.one", "lab.one"),
        ("dr.old", "dr.old"),
    }
    runner = ProjectionRunner(db_url)
    try:
        runner.rebuild(workers=2)
    finally:
        runner.close()
    with StudyReader(db_url) as reader:
        rebuilt = {(r["actor"], r["printed_name"]) for r in reader.audit_trail(subject="NJ01-0001")}
        registry = reader.audit_trail(event_type="Study.KeyRegistered")
    assert rebuilt == after_restart
    assert {r["new_value"] for r in registry if r["field"] == "printed_name"} == {"Zhao Min", "Li Na", "Dr. Wang Li"}
    assert verify_record(db_url, workers=1).ok  # the schema-1 registration verifies as it was signed


@pytest.mark.parametrize("typo", ["localhost:8000", "htp://127.0.0.1:8000", "http:/127.0.0.1:8000"])
def test_demo_api_that_is_no_url_is_said_before_anything_is_made(typo, tmp_path):
    done = sle("demo", "--api", typo, "--db", str(tmp_path / "copy.db"), "--keys", str(tmp_path / "keys"), columns=80)
    clean_exit(done, 2)
    said = " ".join(done.stderr.split())
    assert f"--api wants the server's URL, such as http://127.0.0.1:8000, not '{typo}'" in said
    assert not (tmp_path / "copy.db").exists() and not (tmp_path / "keys").exists()


def test_demo_api_where_no_server_listens_is_said_with_the_reason(tmp_path):
    done = sle("demo", "--api", "http://127.0.0.1:1", "--db", str(tmp_path / "copy.db"), "--keys", str(tmp_path / "k"))
    clean_exit(done, 2)
    said = " ".join(done.stderr.split())
    assert "cannot reach the API at http://127.0.0.1:1:" in said and "Connection refused" in said
