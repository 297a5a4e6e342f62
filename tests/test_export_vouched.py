"""Exports verify signatures once per checkpoint, on both engines: after a clean verification sealed by a key the
study registered, an export checks each event's bytes against the leaf of the tree that run sealed instead of its
Ed25519 signature. Tampering with an event, a leaf or the seal by SQL withdraws the shortcut where it matters and
the export falls back to checking (and refusing) the event itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from test_tamper import replace_in_state

import sle_events.audit.record_check as record_check
from projections.base import ProjectionHalted
from sle_events.audit.results import result_document, run_tree, seal_result, vouched_tree
from sle_events.demo import PEOPLE
from sle_events.exports.manifest import latest_checkpoint
from sle_events.exports.source import ExportSource
from sle_events.signing.keys import Signer

from conftest import execute_sql
from export_fixtures import demo_ledger  # noqa: F401  (the module-scoped demo, one per engine)

SLE = str(Path(sys.executable).with_name("sle"))
MONITOR = PEOPLE["monitor"][0]


def sle_verify(url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, COLUMNS="200", NO_COLOR="1")
    return subprocess.run(
        [SLE, "verify", "--db", url, "--workers", "1", *extra], capture_output=True, text=True, timeout=300, env=env
    )


def sealed_verify(demo) -> None:
    done = sle_verify(demo.url, "--sign-key", str(demo.keys / "monitor.pem"), "--actor", MONITOR)
    assert done.returncode == 0, done.stdout + done.stderr


def fetch(url: str, sql: str) -> list:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(sa.text(sql)).all())
    finally:
        engine.dispose()


def vouch(url: str):
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return vouched_tree(conn)
    finally:
        engine.dispose()


def read_all(url: str, monkeypatch: pytest.MonkeyPatch, **kw) -> tuple[list, int, object]:
    """Every subject read in this process, and how many Ed25519 checks the reading made."""
    calls = [0]
    real = record_check.verify_signature

    def counting(*args):
        calls[0] += 1
        return real(*args)

    monkeypatch.setattr(record_check, "verify_signature", counting)
    cp = latest_checkpoint(url)
    with ExportSource(url, upto_position=cp.position, workers=1, **kw) as source:
        calls[0] = 0  # opening the source checks the seal itself
        subjects = list(source.subjects())
        return subjects, calls[0], source.vouch


def snapshot(subjects) -> list:
    return [
        (s.screening_number, [(f.position, f.version, f.sealed.hash) for f in s.facts], [i.type for i in s.items])
        for s in subjects
    ]


def test_without_a_sealed_run_every_signature_is_checked(demo_ledger, monkeypatch):  # noqa: F811
    assert vouch(demo_ledger.url) is None  # the fixture's demo never verified
    subjects, checks, used = read_all(demo_ledger.url, monkeypatch)
    assert used is None and checks > sum(len(s.facts) for s in subjects) > 0  # and the key registry's events


def test_after_a_sealed_clean_run_the_export_matches_leaves_instead(demo_ledger, monkeypatch):  # noqa: F811
    before, checks_before, _ = read_all(demo_ledger.url, monkeypatch)
    sealed_verify(demo_ledger)
    found = vouch(demo_ledger.url)
    assert found is not None and found.actor == MONITOR
    assert found.size == latest_checkpoint(demo_ledger.url).size  # every event the demo integrated
    subjects, checks, used = read_all(demo_ledger.url, monkeypatch)
    # what is left are the key registry's own events (the trust chain is always checked), none of a subject's
    assert used == found and checks == checks_before - sum(len(s.facts) for s in before) < 50
    assert snapshot(subjects) == snapshot(before)  # the same facts, folded the same way
    # an unsealed run after it vouches for nothing, and does not hide the sealed one
    assert sle_verify(demo_ledger.url).returncode == 0
    assert vouch(demo_ledger.url) == found


def test_a_run_sealed_by_a_key_the_study_never_registered_vouches_for_nothing(demo_ledger):  # noqa: F811
    if vouch(demo_ledger.url) is None:
        sealed_verify(demo_ledger)
    engine = sa.create_engine(demo_ledger.url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("delete from verification_seals"))
        assert vouch(demo_ledger.url) is None
        forger = Signer.generate(MONITOR, "monitor")
        with engine.begin() as conn:
            for run in conn.execute(sa.text("select id, run_at, ok, events from verification_runs")).all():
                document = result_document(run.run_at, bool(run.ok), run.events, [], run_tree(conn, run.id))
                seal_result(conn, run.id, document, forger)
        assert vouch(demo_ledger.url) is None
        with engine.begin() as conn:
            conn.execute(sa.text("delete from verification_seals"))
    finally:
        engine.dispose()
    sealed_verify(demo_ledger)
    assert vouch(demo_ledger.url) is not None


def test_a_rewritten_leaf_withdraws_the_vouch_and_every_signature_is_checked(demo_ledger, monkeypatch):  # noqa: F811
    if vouch(demo_ledger.url) is None:
        sealed_verify(demo_ledger)
    [(old,)] = fetch(demo_ledger.url, "select leaf_hash from ledger_leaves where idx = 3")
    execute_sql(demo_ledger.url, "update ledger_leaves set leaf_hash = :h where idx = 3", h=bytes(32))
    assert vouch(demo_ledger.url) is None  # the leaves no longer rebuild the sealed root
    subjects, checks, used = read_all(demo_ledger.url, monkeypatch)
    assert used is None and checks > sum(len(s.facts) for s in subjects) > 0
    execute_sql(demo_ledger.url, "update ledger_leaves set leaf_hash = :h where idx = 3", h=bytes(old))
    assert vouch(demo_ledger.url) is not None


def test_an_event_altered_after_the_sealed_run_is_refused_by_its_signature(demo_ledger, monkeypatch):  # noqa: F811
    """Last in the module: it leaves the record tampered."""
    if vouch(demo_ledger.url) is None:
        sealed_verify(demo_ledger)
    rows = fetch(demo_ledger.url, "select id, state from study_events order by id")
    # the first lab result: its value changed by SQL, a valid decimal still (only the signature can tell)
    position, payload = next(
        (p, e["payload"])
        for p, e in ((p, json.loads(bytes(s))["envelope"]) for p, s in rows)
        if "loinc" in e["payload"]
    )
    value = f'"value":"{payload["value"]}"'
    replace_in_state(demo_ledger.url, position, value, value[:-1] + '1"')
    assert vouch(demo_ledger.url) is not None  # the leaves are untouched: the run still vouches for the rest...
    with pytest.raises(ProjectionHalted) as refused:
        read_all(demo_ledger.url, monkeypatch)
    # ...but not for these bytes: their own signature is checked, and fails, naming the event
    assert refused.value.position == position and "bad_signature" in str(refused.value)
