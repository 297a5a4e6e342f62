"""The HTTP protocol `sle serve` runs uvicorn with: uvicorn's httptools protocol (its C parser; httptools is a
dependency, as h11, uvicorn's default, parses in pure Python), with Nagle's algorithm off on every connection,
and a response's head and body sent together.

uvicorn binds a listening socket for several workers as `socket.socket(family)`, whose `proto` is 0, and asyncio
only sets TCP_NODELAY on accepted sockets whose `proto` says TCP. Each small response, written as a head and a
body, then waited for the client's delayed ACK: 44 ms on every request (measured with `bench/bench_api.py`: 17
requests/s from one client with 2 workers against 73 with 1). `sle serve` now binds its workers' sockets itself
(`workers`), as TCP; the option is still set here, whoever bound the socket.

uvicorn writes a response's head and its body separately: two sends, two segments, and the client wakes twice.
The writes a response makes in one turn of the event loop now go out as one (`_OneSendPerTurn`)."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class _OneSendPerTurn:
    """The connection's transport, but what is written during one turn of the event loop is sent once, at the
    end of that turn (a head and its body written back to back are one send). A streamed body still goes out
    chunk by chunk: each chunk comes in a turn of its own."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._send)
        self._pending.append(bytes(data))

    def _send(self) -> None:
        if self._transport.is_closing():  # the connection is gone: nothing can be sent
            self._pending.clear()
        elif self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            self._transport.write(data)

    def close(self) -> None:
        self._send()  # what was written before the close goes out before it
        self._transport.close()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._pending))

    def __getattr__(self, name: str) -> Any:  # everything else is the transport's own
        return getattr(self._transport, name)


class NoDelayProtocol(HttpToolsProtocol):
    def connection_made(self, transport: Any) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(_OneSendPerTurn(transport))  # type: ignore[arg-type]
