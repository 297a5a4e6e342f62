"""The client's own keep-alive connections (`sle_events.client.connections`): reuse, a connection the server
closed, failures raised as httpx raises them, threads sharing a client, proxies left to httpx. Against a small
HTTP server here, which counts what it received and misbehaves on demand; `sle demo --api` then runs against a
real `sle serve` on both engines."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
from collections.abc import Iterator

import httpx
import pytest
from live_server import SLE, free_port, start, stop

from sle_events.client import Client, signature_headers
from sle_events.signing.keys import Signer

ANSWER = b'{"events": []}'


class Stub:
    """An HTTP/1.1 server on a thread: answers every request 200 with `ANSWER`, keeps connections alive, and
    records (connection number, request line, headers) of each request. `close_after_answer`: close each
    connection right after answering (without saying so); `drop_next`: close the connection on the next N
    requests without answering; `delay`: wait this long before answering."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.seen: list[tuple[int, str, dict[str, str]]] = []
        self.connections = 0
        self.close_after_answer = False
        self.drop_next = 0
        self.delay = 0.0
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                number = self.connections
            threading.Thread(target=self._serve, args=(conn, number), daemon=True).start()

    def _serve(self, conn: socket.socket, number: int) -> None:
        reader = conn.makefile("rb")
        with conn, reader:
            while True:
                line = reader.readline()
                if not line:
                    return
                headers: dict[str, str] = {}
                while (h := reader.readline()) not in (b"\r\n", b""):
                    name, _, value = h.decode().partition(":")
                    name = name.strip().lower()  # a repeated field's values joined, as HTTP reads them
                    headers[name] = f"{headers[name]}, {value.strip()}" if name in headers else value.strip()
                reader.read(int(headers.get("content-length", 0)))
                with self._lock:
                    self.seen.append((number, line.decode().strip(), headers))
                    drop = self.drop_next > 0
                    self.drop_next -= drop
                if drop:
                    return
                if self.delay:
                    threading.Event().wait(self.delay)
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(ANSWER)}\r\n\r\n".encode()
                    + ANSWER
                )
                if self.close_after_answer:
                    conn.shutdown(socket.SHUT_RDWR)
                    return

    def close(self) -> None:
        self.listener.close()


@pytest.fixture(name="stub")
def stub_fixture() -> Iterator[Stub]:
    server = Stub()
    yield server
    server.close()


@pytest.fixture(name="signer")
def signer_fixture() -> Signer:
    return Signer.generate("lab.service", "lab")


def client_for(port: int, signer: Signer, path: str = "", **kw: object) -> Client:
    return Client(f"http://127.0.0.1:{port}{path}", signer, "00000000-0000-4000-8000-000000000001", **kw)  # type: ignore[arg-type]


def test_requests_share_one_kept_alive_connection_and_are_signed(stub, signer):
    with client_for(stub.port, signer) as client:
        assert client.http is None  # the standard library's connections, not httpx
        for i in range(3):
            response = client.request(
                "POST", "/v1/x", params={"n": i}, body=b'{"a": 1}', headers={"Idempotency-Key": "k"}
            )
            assert (response.status_code, response.json()) == (200, {"events": []})
        assert response.request.url == f"http://127.0.0.1:{stub.port}/v1/x?n=2"
    assert stub.connections == 1
    assert [line for _, line, _ in stub.seen] == [f"POST /v1/x?n={i} HTTP/1.1" for i in range(3)]
    headers = stub.seen[0][2]
    assert headers["content-type"] == "application/json" and headers["idempotency-key"] == "k"
    assert headers["content-digest"].startswith("sha-256=:")
    assert f'keyid="{signer.key_id}"' in headers["signature-input"] and headers["signature"].startswith("sle=:")
    nonces = {h["signature-input"].split('nonce="')[1] for _, _, h in stub.seen}
    assert len(nonces) == 3  # every request its own nonce


def test_a_content_type_given_in_any_case_is_sent_once_and_signed(stub, signer):
    with client_for(stub.port, signer) as client:
        client.request("POST", "/v1/x", body=b"x", headers={"content-type": "text/plain", "Idempotency-Key": "k"})
    [(_, _, headers)] = stub.seen
    assert headers["content-type"] == "text/plain"
    assert '"content-type"' in headers["signature-input"]


def test_a_path_prefix_in_the_base_url_is_kept(stub, signer):
    with client_for(stub.port, signer, "/trial/") as client:
        assert client.get("/keys") == {"events": []}
    assert stub.seen[0][1] == "GET /trial/v1/studies/00000000-0000-4000-8000-000000000001/keys HTTP/1.1"


def test_a_connection_the_server_closed_while_idle_is_not_used_again(stub, signer):
    stub.close_after_answer = True
    with client_for(stub.port, signer) as client:
        for _ in range(3):
            threading.Event().wait(0.05)  # the server's close has arrived
            assert client.request("GET", "/v1/x").status_code == 200
    assert stub.connections == 3
    assert len(stub.seen) == 3  # each request sent once


def test_a_request_the_server_drops_on_a_reused_connection_is_sent_once_more_signed_anew(stub, signer):
    with client_for(stub.port, signer) as client:
        assert client.request("GET", "/v1/x").status_code == 200
        stub.drop_next = 1  # as if the server closed the kept-alive connection as the request arrived
        response = client.request("POST", "/v1/y", body=b"{}", headers={"Idempotency-Key": "same"})
        assert response.status_code == 200
    assert [(n, line) for n, line, _ in stub.seen] == [
        (1, "GET /v1/x HTTP/1.1"),
        (1, "POST /v1/y HTTP/1.1"),
        (2, "POST /v1/y HTTP/1.1"),
    ]
    dropped, resent = stub.seen[1][2], stub.seen[2][2]
    assert dropped["idempotency-key"] == resent["idempotency-key"] == "same"  # answered from its key if stored
    assert dropped["signature-input"] != resent["signature-input"]  # a new nonce: never refused as a replay


def test_a_new_connection_dropped_is_an_error_not_a_second_send(stub, signer):
    stub.drop_next = 1
    with client_for(stub.port, signer) as client, pytest.raises(httpx.RemoteProtocolError, match="closed"):
        client.request("POST", "/v1/y", body=b"{}", headers={"Idempotency-Key": "k"})
    assert len(stub.seen) == 1


def test_failures_are_raised_as_httpx_raises_them(stub, signer):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    with client_for(closed_port, signer) as client, pytest.raises(httpx.ConnectError, match="refused"):
        client.get("/keys")
    stub.delay = 1.0
    with client_for(stub.port, signer, timeout=0.2) as client, pytest.raises(httpx.TimeoutException):
        client.get("/keys")
    with pytest.raises(httpx.UnsupportedProtocol, match="http:// or https://"):
        Client("ftp://127.0.0.1/", signer, "s")


def test_threads_share_one_client(stub, signer):
    errors: list[BaseException] = []
    with client_for(stub.port, signer) as client:

        def run() -> None:
            try:
                for _ in range(20):
                    assert client.request("GET", "/v1/x").status_code == 200
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=run) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []
    assert len(stub.seen) == 160
    assert stub.connections <= 8  # kept alive and reused, at most one per thread at a time


def test_a_proxy_in_the_environment_is_left_to_httpx(stub, signer, monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.invalid:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    with client_for(stub.port, signer) as client:
        assert isinstance(client.http, httpx.Client)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    with client_for(stub.port, signer) as client:
        assert client.http is None


def test_signature_headers_cover_what_the_server_requires(signer):
    url = "http://127.0.0.1:8000/v1/studies/s/events?x=1"
    write = signature_headers("POST", url, b"{}", signer)
    assert set(write) == {"Content-Type", "Content-Digest", "Signature-Input", "Signature"}
    assert write["Signature-Input"].startswith('sle=("@method" "@path" "@query" "content-type" "content-digest")')
    read = signature_headers("GET", url, None, signer)
    assert set(read) == {"Signature-Input", "Signature"}
    assert read["Signature-Input"].startswith('sle=("@method" "@path" "@query");')


@pytest.mark.storage
def test_sle_demo_over_http_through_a_running_server(db_url, tmp_path):
    """`sle demo --api URL` against `sle serve --demo-clock`: the client's own connections, end to end."""
    port = free_port()
    server = start(db_url, port, 1, "--demo-clock")
    try:
        done = subprocess.run(
            [
                SLE,
                "demo",
                "--subjects",
                "1",
                "--db",
                str(tmp_path / "copy.db"),
                "--keys",
                str(tmp_path / "keys"),
                "--api",
                f"http://127.0.0.1:{port}",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "COLUMNS": "80"},
        )
    finally:
        stop(server)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "verified" in (done.stdout + done.stderr).lower()


def test_an_idle_connection_is_checked_on_a_descriptor_select_cannot_take():
    """A busy service holds more than 1,024 descriptors; `select` refuses those, so the check polls."""
    import resource

    from sle_events.client.connections import _readable

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2100:
        pytest.skip(f"this machine allows {hard} open files")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2100), hard))
    ours, servers = socket.socketpair()
    try:
        high = socket.socket(fileno=os.dup2(ours.fileno(), 2050))
        assert not _readable(high)  # alive and quiet: reusable
        servers.close()
        assert _readable(high)  # the other end closed it
        high.close()
    finally:
        ours.close()
        servers.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_signing_an_httpx_request_with_a_body_needs_its_content_type(signer):
    from sle_events.client import sign_request

    with pytest.raises(ValueError, match="Content-Type"):
        sign_request(httpx.Request("POST", "http://127.0.0.1:8000/v1/x", content=b"{}"), signer)
    signed = sign_request(
        httpx.Request("POST", "http://127.0.0.1:8000/v1/x", content=b"{}", headers={"Content-Type": "a/b"}), signer
    )
    assert signed.headers.get_list("content-type") == ["a/b"]
    assert signed.headers["content-digest"].startswith("sha-256=:")
