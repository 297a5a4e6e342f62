"""`sle serve --workers N`: every worker process listens on a socket of its own.

uvicorn hands all its workers one shared listening socket, and whichever worker is awake first accepts. A
service keeps its connection open, so a handful of services connecting one after another often all land on the
same worker while the others idle: with 8 keep-alive clients, `ss` showed 8/0, 7/1 and 5/3 over three tries, and
one busy worker (one interpreter lock) capped the whole server. Here each worker gets its own socket bound with
SO_REUSEPORT to the same address, and the kernel spreads new connections over the sockets by their address hash.
"""

from __future__ import annotations

import errno
import socket
import sys

from uvicorn import Config
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors.multiprocess import Multiprocess, Process


def listening_sockets(host: str, port: int, count: int) -> list[socket.socket]:
    """`count` sockets bound to (host, port) with SO_REUSEPORT. The address is first bound once without it, so
    a server already listening there (even another `sle serve`, whose sockets allow reuse) is an error instead
    of a silent share of its connections."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise OSError(exc.errno, f"{host}:{port} is in use by another server") from None
            raise
    # Only Linux spreads connections over sockets sharing a port; elsewhere (BSD, macOS) the last one bound would
    # take them all, so every worker shares one socket, as uvicorn does.
    spread = sys.platform == "linux"
    sockets = []
    for _ in range(count if spread else 1):
        # proto TCP, so asyncio sets TCP_NODELAY on the connections it accepts (sle_events.api.nodelay)
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if spread:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.set_inheritable(True)
        sockets.append(sock)
    return sockets if spread else sockets * count


class OwnSocketEach(Multiprocess):
    """uvicorn's supervisor (health checks, restarts, signals), with worker i always on socket i: a worker that
    dies is replaced on its own socket, so no socket is left without a worker to accept on it."""

    def _worker(self, idx: int) -> Process:
        process = Process(self.config, [self.sockets[idx]])
        process.start()
        return process

    def init_processes(self) -> None:
        self.processes = [self._worker(idx) for idx in range(self.processes_num)]

    def restart_all(self) -> None:
        """As uvicorn's: each replacement serves before the worker it replaces is retired."""
        for idx, old in enumerate(self.processes):
            if self.should_exit.is_set():
                return
            new = self._worker(idx)
            if not new.wait_until_ready(self.config.timeout_worker_healthcheck, self.should_exit):
                new.kill()
                new.join()
                return
            old.terminate()
            old.join()
            self.processes[idx] = new

    def keep_subprocess_alive(self) -> None:
        """As uvicorn's: a hung or dead worker is replaced, unless it never started (then the server stops)."""
        for idx, process in enumerate(self.processes):
            if self.should_exit.is_set():
                return
            if process.is_alive(timeout=self.config.timeout_worker_healthcheck):
                continue
            process.kill()
            process.join()
            if process.exitcode == STARTUP_FAILURE:
                self.should_exit.set()
                return
            self.processes[idx] = self._worker(idx)


def run_workers(config: Config, sockets: list[socket.socket]) -> None:
    """Serve `config.app` (an import string) with one worker process on each of `sockets`
    (`listening_sockets`)."""
    OwnSocketEach(config, sockets).run()
