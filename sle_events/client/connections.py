"""Keep-alive HTTP/1.1 connections to the one server a `Client` talks to, on the standard library's `http.client`.

A signed append through httpx cost its caller about 0.38 ms of CPU in httpx, httpcore and h11 alone; through
`http.client` it costs about 0.09 ms (bench/RESULTS.md, seventh session). A service recording a trial spends its
time in that path, so the client sends this way unless it is given an httpx client, or a proxy applies (httpx
knows proxies; this does not).

Connections are shared by threads (one per request at a time, idle ones kept for the next). One the server has
closed while idle (uvicorn closes after 5 s) is noticed before use and dropped; a request that fails on a reused
connection anyway is sent once more on a new one, signed anew (a fresh nonce, the same Idempotency-Key): a write
the server did receive is then answered from its key, never stored twice. Failures are raised as httpx's
exceptions, as when the client sent through httpx."""

from __future__ import annotations

import http.client
import select
import socket
import ssl
import threading
import urllib.request
from collections.abc import Callable
from urllib.parse import urlsplit

import httpx

__all__ = ["Connections", "check_server_url", "proxied"]

# What a reused connection may fail with when the server had closed it: the request is sent once more.
_CLOSED_MEANWHILE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


def _readable(sock: socket.socket) -> bool:
    """Something to read on an idle connection: the server closed it (or sent what nobody asked for). poll where
    there is one: select refuses a descriptor above 1023, which a busy service may well hold."""
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))
    return bool(select.select([sock], [], [], 0)[0])


def check_server_url(base_url: str) -> None:
    """Refuse a server URL that is not http:// or https:// with a host, as httpx says it
    (`httpx.UnsupportedProtocol`), so callers see one kind of failure whichever way a client sends."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise httpx.UnsupportedProtocol(f"the server's URL must be http:// or https:// with a host: {base_url!r}")


def proxied(base_url: str) -> bool:
    """True if the environment routes `base_url` through a proxy (HTTP_PROXY and the like, NO_PROXY honoured)."""
    parts = urlsplit(base_url)
    proxies = urllib.request.getproxies()
    return (parts.scheme in proxies or "all" in proxies) and not urllib.request.proxy_bypass(parts.hostname or "")


class Connections:
    """Idle keep-alive connections to `base_url`'s origin; `send` takes one (or opens one) per request."""

    def __init__(self, base_url: str, timeout: float) -> None:
        check_server_url(base_url)
        parts = urlsplit(base_url)
        self.base_url = base_url.rstrip("/")
        self._prefix = parts.path.rstrip("/")  # a server mounted under a path
        self._host, self._port, self._https = str(parts.hostname), parts.port, parts.scheme == "https"
        self._timeout = timeout
        self._tls = ssl.create_default_context() if self._https else None
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._closed = False

    def url(self, target: str) -> str:
        """The full URL of a request target (path and query), as the server will see it and the signature covers."""
        return self.base_url + target

    def send(
        self, method: str, target: str, body: bytes | None, headers: Callable[[], dict[str, str]]
    ) -> httpx.Response:
        """One exchange; `headers()` gives the request's headers, signed (called again for a second attempt)."""
        conn, reused = self._take()
        try:
            return self._exchange(conn, method, target, body, headers())
        except _CLOSED_MEANWHILE:
            conn.close()
            if not reused:
                raise self._failed(method, target, "the server closed the connection") from None
        except BaseException:
            conn.close()
            raise
        conn = self._open()  # the server had closed an idle connection: once more, on a new one
        try:
            return self._exchange(conn, method, target, body, headers())
        except BaseException:
            conn.close()
            raise

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def _exchange(
        self, conn: http.client.HTTPConnection, method: str, target: str, body: bytes | None, headers: dict[str, str]
    ) -> httpx.Response:
        request = httpx.Request(method, self.url(target))
        try:
            conn.request(method, self._prefix + target, body=body, headers=headers)
            answer = conn.getresponse()
            content = answer.read()
        except TimeoutError as exc:
            raise httpx.ReadTimeout(f"{self.base_url}: no answer within {self._timeout} s", request=request) from exc
        except http.client.HTTPException as exc:
            if isinstance(exc, _CLOSED_MEANWHILE):
                raise
            raise httpx.RemoteProtocolError(f"{type(exc).__name__}: {exc}", request=request) from exc
        except OSError as exc:
            if isinstance(exc, _CLOSED_MEANWHILE):
                raise
            raise httpx.ConnectError(str(exc), request=request) from exc
        response = httpx.Response(answer.status, headers=answer.getheaders(), content=content, request=request)
        if answer.will_close:
            conn.close()
        else:
            self._give_back(conn)
        return response

    def _take(self) -> tuple[http.client.HTTPConnection, bool]:
        """An idle connection the server has not closed (its socket has nothing to read), or a new one."""
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                return self._open(), False
            if conn.sock is not None and not _readable(conn.sock):
                return conn, True
            conn.close()  # closed by the server while idle (or it sent what nobody asked for)

    def _open(self) -> http.client.HTTPConnection:
        if self._https:
            return http.client.HTTPSConnection(self._host, self._port, timeout=self._timeout, context=self._tls)
        return http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)

    def _give_back(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if not self._closed:
                self._idle.append(conn)
                return
        conn.close()

    def _failed(self, method: str, target: str, why: str) -> httpx.HTTPError:
        return httpx.RemoteProtocolError(f"{why} ({method} {target})", request=httpx.Request(method, self.url(target)))
