"""The HTTP protocol `sle serve` runs uvicorn with: uvicorn's httptools protocol (its C parser; httptools is a
dependency, as h11, uvicorn's default, parses in pure Python), with Nagle's algorithm off on every connection.

With more than one worker, uvicorn binds the listening socket itself as `socket.socket(family)`, whose `proto`
is 0, and asyncio only sets TCP_NODELAY on accepted sockets whose `proto` says TCP. Each small response, written
as a head and a body, then waited for the client's delayed ACK: 44 ms on every request (measured with
`bench/bench_api.py`: 17 requests/s from one client with 2 workers against 73 with 1)."""

from __future__ import annotations

import socket
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class NoDelayProtocol(HttpToolsProtocol):
    def connection_made(self, transport: Any) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)
