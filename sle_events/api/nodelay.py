"""The HTTP protocol `sle serve` runs uvicorn with: uvicorn's httptools protocol (its C parser; the pure-Python
h11 one where httptools is not installed), with Nagle's algorithm off on every connection.

With more than one worker, uvicorn binds the listening socket itself as `socket.socket(family)`, whose `proto`
is 0, and asyncio only sets TCP_NODELAY on accepted sockets whose `proto` says TCP. Each small response, written
as a head and a body, then waited for the client's delayed ACK: 44 ms on every request (measured with
`bench/bench_api.py`: 17 requests/s from one client with 2 workers against 73 with 1)."""

from __future__ import annotations

import socket
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol


def _no_delay(transport: Any) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class NoDelayH11Protocol(H11Protocol):
    def connection_made(self, transport: Any) -> None:
        _no_delay(transport)
        super().connection_made(transport)


try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools missing: h11
    NoDelayProtocol: type = NoDelayH11Protocol
else:

    class NoDelayHttpToolsProtocol(HttpToolsProtocol):
        def connection_made(self, transport: Any) -> None:
            _no_delay(transport)
            super().connection_made(transport)

    NoDelayProtocol = NoDelayHttpToolsProtocol
