"""`sle serve` turns Nagle's algorithm off on every connection. With several workers uvicorn binds its listening
socket with protocol 0, asyncio then leaves TCP_NODELAY off on accepted connections, and each small response
(head and body written apart) waited 40 ms for the client's delayed ACK. A response's head and body now go out
in one send."""

from __future__ import annotations

import socket
from typing import Any

from uvicorn.config import Config
from uvicorn.server import ServerState

from sle_events.api.nodelay import NoDelayProtocol


class _Transport:
    """What `connection_made` reads of asyncio's transport: the accepted socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.sock if name == "socket" else default


def test_a_connection_accepted_from_a_protocol_0_listener_gets_tcp_nodelay():
    listener = socket.socket(socket.AF_INET)  # as uvicorn binds it for more than one worker
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    client = socket.create_connection(listener.getsockname())
    conn, _ = listener.accept()
    try:
        assert conn.proto == 0 and not conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)  # asyncio's skip
        config = Config(app=lambda scope, receive, send: None)
        protocol = NoDelayProtocol(config=config, server_state=ServerState(), app_state={})
        protocol.connection_made(_Transport(conn))  # the socket is all it reads
        assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert protocol.client == client.getsockname()  # uvicorn's own set-up still ran
    finally:
        for s in (client, conn, listener):
            s.close()


def test_sle_serve_runs_uvicorn_with_that_protocol(db_url, monkeypatch):
    """httptools' parser under uvloop (both pinned in the lock); one worker in-process (SQLite has one writer),
    or several from uvicorn's factory, each on its own socket (PostgreSQL, `sle_events.api.workers`)."""
    import uvicorn
    from typer.testing import CliRunner

    import sle_events.api.workers
    from sle_events.cli.main import app

    ran: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: ran.update(kwargs))
    monkeypatch.setattr(sle_events.api.workers, "run_workers", lambda config, sockets: ran.update(vars(config)))
    done = CliRunner().invoke(app, ["serve", "--db", db_url, "--workers", "2"])
    assert done.exit_code == 0, done.output
    assert ran["http"] is NoDelayProtocol
    assert ran["loop"] == "auto"  # uvloop, installed with the project
    assert ran.get("workers", 1) == (1 if db_url.startswith("sqlite") else 2)
    if not db_url.startswith("sqlite"):
        assert ran["factory"] and ran["app"] == "sle_events.cli.serve_cmd:app_from_env"  # each worker its own app


class _Recording:
    """A transport that records each send."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.sent.append(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return 0


def test_a_response_written_as_head_and_body_in_one_turn_goes_out_in_one_send():
    import asyncio

    from sle_events.api.nodelay import _OneSendPerTurn

    async def respond() -> list[bytes]:
        wire = _Recording()
        transport = _OneSendPerTurn(wire)  # type: ignore[arg-type]
        transport.write(b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\n")
        transport.write(b"{}")
        assert wire.sent == [] and transport.get_write_buffer_size() == 45  # held until the turn ends
        await asyncio.sleep(0)
        transport.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")  # a streamed response:
        await asyncio.sleep(0)
        transport.write(b"5\r\nchunk\r\n")  # each chunk in a turn of its own goes out on its own
        await asyncio.sleep(0)
        transport.write(b"0\r\n\r\n")
        transport.close()  # what was written before the close still goes out, before it
        assert wire.closed
        transport.write(b"too late")
        await asyncio.sleep(0)
        return wire.sent

    sent = asyncio.run(respond())
    assert sent == [
        b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
        b"5\r\nchunk\r\n",
        b"0\r\n\r\n",
    ]


def test_the_served_protocol_is_httptools_not_h11():
    """h11 parses in pure Python: httptools is a dependency, so `sle serve` never falls back to it."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    assert issubclass(NoDelayProtocol, HttpToolsProtocol)
