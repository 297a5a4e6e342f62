"""`sle serve` as a real server: several worker processes on PostgreSQL serialise appends in the database (two
clients racing on one subject: exactly one 201 and one 409); SQLite runs one writer and says so."""

from __future__ import annotations

import os
import socket
import subprocess
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from live_server import SLE, free_port, start, stop

from sle_events.client import ApiProblem, Client
from sle_events.domain.study import Study
from sle_events.domain.subject import Subject
from sle_events.signing.envelope import seal
from sle_events.signing.keys import Signer
from sle_events.store.codec import envelope_for
from sle_events.store.record import StudyRecord

from conftest import STUDY_CONFIG, clean_postgres_url, count_rows

pytestmark = pytest.mark.storage


def test_two_clients_racing_on_one_subject_over_several_workers(tmp_path):
    url = clean_postgres_url()
    now = datetime.now(UTC)
    admin = Signer.generate("admin", "admin")
    coordinator = Signer.generate("nurse.li", "coordinator")
    investigator = Signer.generate("dr.wang", "investigator")
    record = StudyRecord(url)
    study = Study.create("ALLOMSC-SLE", "AlloMSC", admin.actor, admin.public_key_b64, now)
    for s in (coordinator, investigator):
        study.register_key(s.actor, s.role, s.public_key_b64, now)
    record.record(study, signer=admin)
    subjects = []
    for i in range(8):
        subject = Subject(study.id, "NJ01", f"NJ01-{i:04d}", now - timedelta(days=1))
        record.record(subject, signer=coordinator)
        subjects.append(subject)
    record.close()
    record.engine.dispose()
    port = free_port()
    server = start(url, port, workers=3)
    try:
        base = f"http://127.0.0.1:{port}"
        with Client(base, coordinator, study.id) as nurse, Client(base, investigator, study.id) as doctor:
            outcomes = []
            for subject in subjects:
                head = nurse.head(subject.id)
                subject.obtain_consent("ICF v1.0", now - timedelta(hours=20), config=STUDY_CONFIG, taken_by="dr.wang")
                [consent] = subject.collect_events()
                env = envelope_for(consent, study=study.id, prev=head[1])
                rivals = [(nurse, seal(env, coordinator)), (doctor, seal(env, investigator))]  # both at version 2

                def send(pair):
                    client, event = pair
                    try:
                        client.append([event])
                        return 201
                    except ApiProblem as exc:
                        assert exc.kind == "version_conflict", exc.problem
                        assert exc.problem["current_version"] == 2
                        return exc.status

                with ThreadPoolExecutor(2) as pool:
                    outcomes.append(sorted(pool.map(send, rivals)))
        assert outcomes == [[201, 409]] * len(subjects)
        assert count_rows(url) == 3 + 2 * len(subjects)  # the study's events, one screening and one consent each
    finally:
        stop(server)


def test_sqlite_serves_one_writer_and_says_so(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    port = free_port()
    server = start(url, port, workers=4)
    err = stop(server)
    assert "SQLite has a single writer: serving with 1 worker process, not 4" in " ".join(err.split())


def serve_in_vain(url: str, port: int) -> subprocess.CompletedProcess:
    """`sle serve --workers 2` on a port it cannot have: it should stop at once, saying why."""
    return subprocess.run(
        [SLE, "serve", "--db", url, "--port", str(port), "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )


def _connections_by_worker(server: subprocess.Popen, port: int) -> Counter[int]:
    """The established connections to `port`, by the worker process holding them (Linux's /proc)."""
    inodes: dict[str, int] = {}
    for pid in [int(p) for p in os.listdir("/proc") if p.isdigit()]:
        try:
            if os.getpgid(pid) != server.pid or pid == server.pid:
                continue
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes[link[8:-1]] = pid
        except (ProcessLookupError, FileNotFoundError, PermissionError):
            continue
    held: Counter[int] = Counter()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port, state, inode = int(fields[1].split(":")[1], 16), fields[3], fields[9]
        if local_port == port and state == "01" and inode in inodes:  # 01: ESTABLISHED
            held[inodes[inode]] += 1
    return held


def test_several_workers_share_the_connections_and_the_port_is_theirs_alone():
    """Each worker listens on a socket of its own (SO_REUSEPORT): services that keep their connection open are
    spread over the workers (with one shared socket, 8 such clients were often all on one worker). A second
    server on the same port is refused, not let in to take a share of the connections."""
    url = clean_postgres_url()
    StudyRecord(url).close()
    port = free_port()
    server = start(url, port, workers=2)
    clients = [httpx.Client(base_url=f"http://127.0.0.1:{port}") for _ in range(16)]
    try:
        for client in clients:
            assert client.get("/v1/log/checkpoint").status_code in (200, 404)
        held = _connections_by_worker(server, port)
        assert sum(held.values()) == 16 and len(held) == 2, held  # all 16 on one of 2 workers: odds 1 in 32,768
        second = serve_in_vain(url, port)
        assert second.returncode != 0
        assert f"cannot serve on 127.0.0.1:{port}" in " ".join(second.stderr.split()), second.stderr
    finally:
        for client in clients:
            client.close()
        stop(server)


def test_a_port_taken_by_another_program_is_refused_with_the_reason():
    url = clean_postgres_url()
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        taken = serve_in_vain(url, port)
    assert taken.returncode == 2
    assert "serving" not in taken.stderr  # refused before anything is announced
    assert f"cannot serve on 127.0.0.1:{port}: 127.0.0.1:{port} is in use by another server" in " ".join(
        taken.stderr.split()
    ), taken.stderr


@pytest.mark.parametrize("platform", ["linux", "darwin"])
def test_each_worker_gets_its_own_socket_only_where_the_kernel_spreads_connections(platform, monkeypatch):
    """Linux balances connections over sockets sharing a port; BSD and macOS give them all to the last bound, so
    there the workers share one socket, as uvicorn's do."""
    import sle_events.api.workers as workers

    monkeypatch.setattr(workers.sys, "platform", platform)
    sockets = workers.listening_sockets("127.0.0.1", free_port(), 3)
    try:
        assert len(sockets) == 3
        distinct = {id(s) for s in sockets}
        reuse = {s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) for s in sockets}
        assert (len(distinct), reuse) == ((3, {1}) if platform == "linux" else (1, {0}))
    finally:
        for s in {id(s): s for s in sockets}.values():
            s.close()
