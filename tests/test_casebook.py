"""Investigator sign-off, freeze, lock and unlock (21 CFR 11.50/11.70/11.200), on SQLite and PostgreSQL.

Every act is a signed event on the subject's casebook stream (never on the clinical stream); every refusal is
specific and stores nothing; the content hash is recomputed from raw rows as an auditor would; a covered event
altered by SQL after sign-off is reported by `sle verify`."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import sqlalchemy as sa

from projections.casebook import casebook_rows, lock_rows, pending_signoffs, signoff_rows
from projections.read import StudyReader
from projections.runner import ProjectionRunner
from sle_events.audit.verifier import verify_record
from sle_events.domain.casebook import (
    Casebook,
    LockStateError,
    OpenQueriesBlockLock,
    RoleMayNotSign,
    SigningKeyNotUsable,
    UnknownMeaning,
)
from sle_events.signing.envelope import seal
from sle_events.signing.keys import PassphraseRequired, Signer, WrongPassphrase
from sle_events.store.codec import envelope_for
from sle_events.store.errors import CasebookLocked, LockBlockedByOpenQueries, SignOffMismatch, UntrustedKey
from sle_events.store.record import StudyRecord
from sle_events.trial import Trial

from conftest import count_rows, execute_sql, position_of

pytestmark = pytest.mark.storage
PASSPHRASE = "correct horse battery"
SLE = str(Path(sys.executable).with_name("sle"))


@dataclass
class Book:
    url: str
    folder: Path
    trial: Trial
    people: dict[str, Signer]
    investigator: Signer  # opened from its encrypted key file with the passphrase
    subject: UUID
    now: datetime

    def rows(self) -> int:
        return count_rows(self.url)

    def __getattr__(self, name: str) -> Signer:
        try:
            return self.__dict__["people"][name]
        except KeyError:
            raise AttributeError(name) from None

    def read(self, fn: Any, **kw: Any) -> Any:
        with StudyReader(self.url) as reader, reader.engine.connect() as conn:
            return fn(conn, **kw)


@pytest.fixture
def book(db_url: str, tmp_path: Path) -> Any:
    now = datetime.now(UTC)
    people = {
        name: Signer.generate(actor, role)
        for name, actor, role in [
            ("admin", "admin@drum-tower", "admin"),
            ("dm", "dm.zhao", "data_manager"),
            ("coordinator", "nurse.li", "coordinator"),
            ("inv_plain", "dr.wang", "investigator"),
            ("lab", "lab.drum-tower", "lab"),
        ]
    }
    people["inv_plain"].save(tmp_path / "dr.wang.pem", passphrase=PASSPHRASE)
    investigator = Signer.from_file(tmp_path / "dr.wang.pem", "dr.wang", "investigator", passphrase=PASSPHRASE)
    record = StudyRecord(db_url)
    trial = Trial.create(
        record,
        code="ALLOMSC-SLE",
        title="AlloMSC",
        admin=people["admin"],
        people=[
            (people["dm"], "Zhao Min"),
            (people["coordinator"], "Li Na"),
            (people["inv_plain"], "Dr. Wang Li"),
            people["lab"],
        ],
        occurred_at=now - timedelta(days=2),
    )
    dm = people["dm"]
    trial.add_site("NJ01", "Drum Tower", "Asia/Shanghai", signer=dm, occurred_at=now - timedelta(days=2))
    trial.approve_icf_version("ICF v1.1", now - timedelta(days=30), signer=dm, occurred_at=now - timedelta(days=2))
    sid = trial.screen("NJ01", "NJ01-0007", now - timedelta(hours=5), signer=people["coordinator"])
    trial.obtain_consent(sid, "ICF v1.1", now - timedelta(hours=4), signer=investigator, taken_by="dr.wang")
    trial.record_lab_result(
        sid, "CREAT", "1.10", "mg/dL", now - timedelta(hours=3), signer=people["lab"]
    )  # v3, eGFR v4
    yield Book(db_url, tmp_path, trial, people, investigator, sid, now)
    record.close()
    record.engine.dispose()


# ----------------------------------------------------------------------------------------------- sign-off
def test_a_sign_off_is_on_the_casebook_stream_with_its_manifestation(book):
    before = len(book.trial.stream(book.subject))
    version = book.trial.sign_off(book.subject, signer=book.investigator, meaning="approval")
    assert len(book.trial.stream(book.subject)) == before  # the clinical stream is not touched
    stream = book.trial.record.stream(Casebook.id_for(book.trial.study_id, book.subject))
    assert [e.topic for e in stream] == ["Casebook.Opened", "Casebook.SignedOff"] and version == 2
    env = stream[-1].envelope
    p = env["payload"]
    assert (p["printed_name"], p["meaning"], p["signature_def"], env["actor"]) == (
        "Dr. Wang Li",
        "approval",
        "SD.INV.APPROVE",
        "dr.wang",
    )
    assert datetime.fromisoformat(env["occurred_at"]).utcoffset() is not None
    assert p["covers"] == [{"stream": str(book.subject), "through_version": before, "versions": None}]
    [row] = book.read(signoff_rows)
    assert (row["status"], row["printed_name"], row["screening_number"]) == ("valid", "Dr. Wang Li", "NJ01-0007")
    assert book.read(casebook_rows)[0]["signoff_status"] == "signed"
    with StudyReader(book.url) as reader:  # the audit trail shows the act under the subject's screening number
        trail = reader.audit_trail(subject="NJ01-0007", event_type="Casebook.SignedOff")
    assert {r["field"] for r in trail} >= {"content_hash", "meaning", "printed_name"}
    assert {r["printed_name"] for r in trail} == {"Dr. Wang Li"}


def test_an_auditor_recomputes_the_content_hash_from_raw_rows(book):
    book.trial.sign_off(book.subject, signer=book.investigator)
    engine = sa.create_engine(book.url)
    with engine.connect() as conn:  # nothing of sle_events: SQL, JSON and SHA-256 as documented
        signed = json.loads(
            bytes(
                conn.execute(sa.text("select state from study_events where topic = 'Casebook.SignedOff'")).scalar_one()
            )
        )["envelope"]["payload"]
        [cover] = signed["covers"]
        t = StudyRecord.events_table()  # the raw rows (the stream id column is a UUID type on either engine)
        rows = conn.execute(
            sa.select(t.c.originator_version, t.c.state)
            .where(t.c.originator_id == UUID(cover["stream"]), t.c.originator_version <= cover["through_version"])
            .order_by(t.c.originator_version)
        ).all()
    engine.dispose()
    h = hashlib.sha256(b"sle-signoff-content-v1\n")
    for version, state in rows:
        h.update(f"{cover['stream']}:{version}:{hashlib.sha256(bytes(state)).hexdigest()}\n".encode())
    assert h.hexdigest() == signed["content_hash"] and signed["hash_method"] == "sle-signoff-content-v1"


def test_a_correction_invalidates_the_sign_off_and_re_signing_clears_it(book):
    book.trial.sign_off(book.subject, signer=book.investigator)
    book.trial.correct(book.subject, 3, {"value": "1.01"}, "transcription error", signer=book.lab)
    [row] = book.read(signoff_rows)
    assert row["status"] == "invalidated" and "Subject.Corrected" in row["invalidated_reason"]
    assert "transcription error" in row["invalidated_reason"]
    assert book.read(casebook_rows)[0]["signoff_status"] == "needs re-signing"
    assert [r["screening_number"] for r in book.read(pending_signoffs)] == ["NJ01-0007"]
    book.trial.sign_off(book.subject, signer=book.investigator)
    assert [r["status"] for r in book.read(signoff_rows)] == ["invalidated", "valid"]  # never deleted
    assert book.read(casebook_rows)[0]["signoff_status"] == "signed"
    assert book.read(pending_signoffs) == []
    book.trial.record_lab_result(book.subject, "C3", "80", "mg/dL", book.now - timedelta(hours=1), signer=book.lab)
    assert book.read(casebook_rows)[0]["signoff_status"] == "new data since sign-off"


def test_the_read_model_rebuilt_equals_the_incremental_one(book):
    book.trial.sign_off(book.subject, signer=book.investigator)
    book.trial.correct(book.subject, 3, {"value": "1.01"}, "transcription error", signer=book.lab)
    book.trial.lock(book.subject, signer=book.dm, reason="ready")
    incremental = (book.read(signoff_rows), book.read(casebook_rows), book.read(lock_rows))
    runner = ProjectionRunner(book.url)
    try:
        runner.rebuild(["casebook"])
    finally:
        runner.close()
    assert (book.read(signoff_rows), book.read(casebook_rows), book.read(lock_rows)) == incremental


@pytest.mark.parametrize("why", ["wrong passphrase", "no passphrase", "plain key file"])
def test_signing_needs_the_key_files_passphrase(book, why):
    path = book.folder / "dr.wang.pem"
    if why == "wrong passphrase":
        with pytest.raises(WrongPassphrase):
            Signer.from_file(path, "dr.wang", "investigator", passphrase="not the passphrase")
    elif why == "no passphrase":
        with pytest.raises(PassphraseRequired):
            Signer.from_file(path, "dr.wang", "investigator")
    else:
        rows = book.rows()
        with pytest.raises(SigningKeyNotUsable, match="passphrase"):
            book.trial.sign_off(book.subject, signer=book.inv_plain)  # the same key, not opened with a passphrase
        assert book.rows() == rows


def test_refusals_store_nothing(book):
    rows = book.rows()
    with pytest.raises(RoleMayNotSign):
        book.trial.sign_off(book.subject, signer=book.coordinator)
    with pytest.raises(UnknownMeaning):
        book.trial.sign_off(book.subject, signer=book.investigator, meaning="because")
    book.trial._on_study(
        book.admin, lambda s: s.revoke_key(book.investigator.key_id, "left the site", book.now)
    )  # a revoked key
    rows = book.rows()
    with pytest.raises(SigningKeyNotUsable, match="revoked"):
        book.trial.sign_off(book.subject, signer=book.investigator)
    assert book.rows() == rows


def _client_signed_sign_off(book, signer: Signer, **change: Any) -> Any:
    """A sign-off sealed by a client (another process, the HTTP API) and handed to `append`."""
    from sle_events.domain.casebook import CoveredStream, content_hash

    stream = book.trial.record.stream(book.subject)
    cover = CoveredStream(stream=str(book.subject), through_version=len(stream))
    digest = content_hash([cover], {(str(book.subject), e.version): e.sealed for e in stream})
    cb = Casebook.open(book.trial.study_id, book.subject, book.now)
    cb.sign_off(book.now, meaning="review", printed_name="Dr. Wang Li", covers=[cover], content_hash=digest)
    sealed, prev = [], "0" * 64
    for event in cb.collect_events():
        env = envelope_for(event, study=book.trial.study_id, prev=prev)
        env["payload"].update(change if env["type"] == "Casebook.SignedOff" else {})
        sealed.append(seal(env, signer))
        prev = sealed[-1].hash
    return sealed


def test_append_refuses_a_sign_off_whose_hash_is_not_its_datas_or_by_a_role_that_may_not_sign(book):
    rows = book.rows()
    with pytest.raises(SignOffMismatch, match="content hash"):
        book.trial.record.append(_client_signed_sign_off(book, book.investigator, content_hash="0" * 64))
    with pytest.raises(UntrustedKey, match="may not record Casebook"):
        book.trial.record.append(_client_signed_sign_off(book, book.coordinator))
    with pytest.raises(SignOffMismatch, match="manifestation"):  # a printed name the key was not registered with
        book.trial.record.append(_client_signed_sign_off(book, book.investigator, printed_name="Dr. Somebody Else"))
    with pytest.raises(SignOffMismatch, match="manifestation"):  # a SignatureDef that is not its meaning's
        book.trial.record.append(_client_signed_sign_off(book, book.investigator, signature_def="SD.INV.APPROVE"))
    assert book.rows() == rows
    book.trial.record.append(_client_signed_sign_off(book, book.investigator))
    assert book.rows() == rows + 2


def test_sle_verify_reports_signed_over_data_altered_by_sql(book):
    book.trial.sign_off(book.subject, signer=book.investigator)
    assert verify_record(book.url, workers=1).ok
    stored = book.trial.record.stream(book.subject)[2]  # v3, the creatinine the investigator signed off
    altered = stored.sealed.replace(b'"1.10"', b'"0.90"')
    assert altered != stored.sealed
    execute_sql(
        book.url,
        "update study_events set state = :s where id = :id",
        s=altered,
        id=position_of(book.trial, book.subject, 3),
    )
    report = verify_record(book.url, workers=1)
    found = [f for f in report.findings if f.kind == "signed_content_changed"]
    assert (
        len(found) == 1
        and "Dr. Wang Li (dr.wang)" in found[0].detail
        and "altered after the sign-off" in found[0].detail
    )
    assert found[0].stream == str(Casebook.id_for(book.trial.study_id, book.subject))
    assert any(f.kind == "bad_signature" and f.version == 3 for f in report.findings)


# ----------------------------------------------------------------------------------------------- lock
def test_a_locked_subject_refuses_clinical_facts_through_trial_and_raw_append(book):
    book.trial.lock(book.subject, signer=book.dm, reason="ready for analysis")
    rows = book.rows()
    with pytest.raises(CasebookLocked, match="locked"):
        book.trial.record_lab_result(book.subject, "C3", "80", "mg/dL", book.now - timedelta(hours=1), signer=book.lab)
    # a client-signed fact from another process: the same refusal at append
    subject = book.trial.record.get(book.subject)
    subject.record_lab_result("C3", "80", "mg/dL", book.now - timedelta(hours=1), config=book.trial.config)
    [event] = subject.collect_events()
    env = envelope_for(event, study=book.trial.study_id, prev=book.trial.record.stream(book.subject)[-1].hash)
    with pytest.raises(CasebookLocked):
        book.trial.record.append([seal(env, book.lab)])
    with pytest.raises(CasebookLocked):
        book.trial.correct(book.subject, 3, {"value": "1.01"}, "transcription error", signer=book.lab)
    assert book.rows() == rows
    [state] = book.read(casebook_rows)
    assert (state["lock_level"], state["level"]) == ("locked", "locked")


def test_an_sae_is_still_reported_on_locked_data_and_flagged(book):
    book.trial.freeze(book.subject, signer=book.dm)
    onset = book.now - timedelta(hours=2)
    ae = book.trial.report_adverse_event(book.subject, "pneumonia", onset.date(), onset, signer=book.investigator)
    assert ae
    [state] = book.read(casebook_rows)
    assert state["lock_level"] == "frozen"
    assert state["flags"] == [f"AdverseEventReported v{len(book.trial.stream(book.subject))} recorded while frozen"]


def test_unlock_needs_a_reason_and_invalidates_earlier_sign_offs(book):
    book.trial.sign_off(book.subject, signer=book.investigator)
    book.trial.lock(book.subject, signer=book.dm)
    rows = book.rows()
    with pytest.raises(LockStateError, match="reason"):
        book.trial.unlock(book.subject, signer=book.dm, reason=" ")
    with pytest.raises(UntrustedKey):
        book.trial.unlock(book.subject, signer=book.investigator, reason="late result")
    assert book.rows() == rows
    book.trial.unlock(book.subject, signer=book.dm, reason="late creatinine from the central lab")
    [row] = book.read(signoff_rows)
    assert row["status"] == "invalidated" and "late creatinine" in row["invalidated_reason"]
    assert book.read(casebook_rows)[0]["signoff_status"] == "needs re-signing"
    assert [r["action"] for r in book.read(lock_rows)] == ["locked", "unlocked"]
    with StudyReader(book.url) as reader:  # patient state and the dashboard show it too
        assert reader.patient("NJ01-0007")["casebook"]["signoff_status"] == "needs re-signing"
        [site] = reader.dashboard()["signoff_and_lock_by_site"]
        assert (site["site"], site["needs re-signing"], site["locked"]) == ("NJ01", 1, 0)
    book.trial.record_lab_result(book.subject, "C3", "80", "mg/dL", book.now - timedelta(hours=1), signer=book.lab)


def test_a_locked_study_refuses_screening_and_lock_state_errors(book):
    book.trial.lock(signer=book.dm, reason="database lock")
    rows = book.rows()
    with pytest.raises(CasebookLocked, match="the study is locked"):
        book.trial.screen("NJ01", "NJ01-0008", book.now - timedelta(hours=1), signer=book.coordinator)
    with pytest.raises(LockStateError, match="already locked"):
        book.trial.lock(signer=book.dm)
    with pytest.raises(LockStateError, match="not locked"):
        book.trial.unlock(book.subject, signer=book.dm, reason="x")
    assert book.rows() == rows
    assert book.read(casebook_rows)[0]["level"] == "locked"
    book.trial.unlock(signer=book.dm, reason="reopened for a protocol amendment")
    book.trial.screen("NJ01", "NJ01-0008", book.now - timedelta(hours=1), signer=book.coordinator)


def test_locking_with_open_queries_is_refused(book):
    query = book.trial.raise_query(book.subject, 3, "Creatinine differs from the source?", signer=book.dm)
    rows = book.rows()
    with pytest.raises(OpenQueriesBlockLock, match=str(query)):
        book.trial.lock(book.subject, signer=book.dm)
    with pytest.raises(OpenQueriesBlockLock):
        book.trial.lock(signer=book.dm)  # the study: any query of it
    sealed = _lock_signed_elsewhere(book)
    with pytest.raises(LockBlockedByOpenQueries):  # a lock signed elsewhere: the same rule at append
        book.trial.record.append(sealed)
    assert book.rows() == rows
    book.trial.freeze(book.subject, signer=book.dm)  # a freeze does not wait for queries
    book.trial.answer_query(query, "Re-read: 1.10 is right.", signer=book.coordinator)
    with pytest.raises(OpenQueriesBlockLock):  # answered is not closed
        book.trial.lock(book.subject, signer=book.dm)
    book.trial.close_query(query, "Confirmed.", signer=book.dm)
    book.trial.lock(book.subject, signer=book.dm, reason="queries closed")
    assert book.read(casebook_rows)[0]["lock_level"] == "locked"


def _lock_signed_elsewhere(book) -> list:
    """The subject's casebook opened and locked, sealed by the data manager's key outside `Trial` (as a client
    of the API would), so append's own checks are what refuses it."""
    cb = Casebook.open(book.trial.study_id, book.subject, book.now)
    cb.lock(book.now)
    sealed, prev = [], "0" * 64
    for event in cb.collect_events():
        sealed.append(seal(envelope_for(event, study=book.trial.study_id, prev=prev), book.dm))
        prev = sealed[-1].hash
    return sealed


def test_a_query_raised_between_the_lock_check_and_the_write_still_blocks_the_lock(book, monkeypatch):
    """The open-queries rule is checked again inside the append's transaction, under the write lock: a query that
    lands after the first check (made here to look so: the check before the write sees none) still refuses it."""
    import sle_events.store.record as record_module

    query = book.trial.raise_query(book.subject, 3, "Creatinine differs from the source?", signer=book.dm)
    real = record_module.open_queries_blocking_lock
    seen: list[bool] = []

    def before_the_write_sees_none(record, study, subject, conn=None):
        seen.append(conn is not None)
        return real(record, study, subject, conn) if conn is not None else []

    monkeypatch.setattr(record_module, "open_queries_blocking_lock", before_the_write_sees_none)
    sealed = _lock_signed_elsewhere(book)
    rows = book.rows()
    with pytest.raises(LockBlockedByOpenQueries, match="1 queries are not closed"):
        book.trial.record.append(sealed)
    assert seen == [False, True] and book.rows() == rows  # both checks ran; nothing stored
    book.trial.close_query(query, "Confirmed.", signer=book.dm)
    assert book.trial.record.append(sealed)  # the same lock, once the query is closed


# ----------------------------------------------------------------------------------------------- the CLI
def sle(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, COLUMNS="200", NO_COLOR="1")
    env.pop("SLE_DATABASE_URL", None)
    return subprocess.run([SLE, *args], capture_output=True, text=True, timeout=120, env=env, input=stdin)


def test_sle_keys_generate_with_a_passphrase_writes_an_encrypted_key_file(tmp_path):
    out = tmp_path / "dr.li.pem"
    done = sle(
        "keys", "generate", "--out", str(out), "--actor", "dr.li", "--role", "investigator", "--passphrase",
        "--passphrase-stdin", stdin=PASSPHRASE + "\n",
    )  # fmt: skip  # one option per pair reads better than one per line
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["passphrase_protected"] is True
    assert out.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert Signer.from_file(out, "dr.li", "investigator", passphrase=PASSPHRASE).passphrase_protected
    short = sle(
        "keys", "generate", "--out", str(tmp_path / "x.pem"), "--actor", "x", "--role", "investigator",
        "--passphrase", "--passphrase-stdin", stdin="short\n",
    )  # fmt: skip  # as above
    assert short.returncode == 2 and "at least 8" in short.stderr and not (tmp_path / "x.pem").exists()


def test_sle_sign_lock_and_unlock(book):
    book.trial.record.close()  # the commands run in their own processes
    dm_key = book.folder / "dm.pem"
    book.dm.save(dm_key)
    lab_key = book.folder / "lab.pem"
    book.lab.save(lab_key)
    inv = ["--key-file", str(book.folder / "dr.wang.pem"), "--actor", "dr.wang", "--db", book.url]
    dm = ["--key-file", str(dm_key), "--actor", "dm.zhao", "--db", book.url]
    rows = book.rows()
    wrong = sle("sign", "--subject", "NJ01-0007", *inv, "--passphrase-stdin", stdin="not it\n")
    assert wrong.returncode == 1 and "WrongPassphrase" in wrong.stderr and book.rows() == rows
    typo = sle("sign", "--subject", "NJ01-0007", "--meaning", "agree", *inv, "--passphrase-stdin", stdin=PASSPHRASE)
    assert typo.returncode == 2 and "review, approval, responsibility" in typo.stderr
    signed = sle(
        "sign", "--subject", "NJ01-0007", "--meaning", "approval", *inv, "--passphrase-stdin", "--json",
        stdin=PASSPHRASE + "\n",
    )  # fmt: skip  # as above
    assert signed.returncode == 0, signed.stderr
    doc = json.loads(signed.stdout)
    assert (doc["printed_name"], doc["signature_def"], doc["scope"]) == ("Dr. Wang Li", "SD.INV.APPROVE", "casebook")
    pending = sle("sign", "--pending", "--json", "--db", book.url)
    assert pending.returncode == 0 and json.loads(pending.stdout) == []

    locked = sle("lock", "--subject", "NJ01-0007", "--reason", "ready for analysis", *dm, "--json")
    assert locked.returncode == 0, locked.stderr
    refused = sle(
        "correct", "--subject", "NJ01-0007", "--version", "3", "--set", "value=1.01", "--reason", "typo",
        "--key-file", str(lab_key), "--actor", "lab.drum-tower", "--role", "lab", "--db", book.url,
    )  # fmt: skip  # as above
    assert refused.returncode == 1 and "CasebookLocked" in refused.stderr
    status = json.loads(sle("lock", "--status", "--json", "--db", book.url).stdout)
    assert status["subjects"][0]["level"] == "locked" and status["history"][0]["reason"] == "ready for analysis"
    no_reason = sle("unlock", "--subject", "NJ01-0007", *dm)
    assert no_reason.returncode == 2  # --reason is required
    unlocked = sle("unlock", "--subject", "NJ01-0007", "--reason", "late creatinine", *dm)
    assert unlocked.returncode == 0, unlocked.stderr
    pending = json.loads(sle("sign", "--pending", "--json", "--db", book.url).stdout)
    assert [(r["screening_number"], r["signoff_status"]) for r in pending] == [("NJ01-0007", "needs re-signing")]
    table_out = sle("sign", "--pending", "--db", book.url)
    assert "needs re-signing" in table_out.stdout and max(len(line) for line in table_out.stdout.splitlines()) <= 200


def test_a_lock_stored_by_another_writer_refuses_the_next_clinical_fact_at_once(book):
    """This record has just stored a fact for the subject (and so knows its casebook open); another process (an
    API worker) then locks it. The next fact is refused, and nothing is stored: the write only goes in if no lock
    came since the level was read."""
    trial = book.trial

    def lab_result(value: str) -> Any:
        subject = trial.record.get(book.subject)
        subject.record_lab_result("C3", value, "mg/dL", book.now - timedelta(hours=1), config=trial.config)
        [event] = subject.collect_events()
        env = envelope_for(event, study=trial.study_id, prev=trial.record.stream(book.subject)[-1].hash)
        return seal(env, book.lab)

    trial.record.append([lab_result("81")])  # seen open
    elsewhere = StudyRecord(book.url)
    try:
        elsewhere.append(_lock_signed_elsewhere(book))
    finally:
        elsewhere.close()
        elsewhere.engine.dispose()
    rows = book.rows()
    with pytest.raises(CasebookLocked, match="this subject is locked"):
        trial.record.append([lab_result("80")])
    assert book.rows() == rows
