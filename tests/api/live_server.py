"""A real `sle serve` in a subprocess, for tests that need the server as users run it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

SLE = str(Path(sys.executable).with_name("sle"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(url: str, port: int, workers: int, *options: str) -> subprocess.Popen:
    """`sle serve` on `url`, once it answers (its stderr kept for `stop`)."""
    server = subprocess.Popen(
        [SLE, "serve", "--db", url, "--port", str(port), "--workers", str(workers), *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/v1/log/checkpoint", timeout=1)
            return server
        except httpx.HTTPError:
            if server.poll() is not None:
                raise AssertionError(server.stderr.read() if server.stderr else "server exited") from None
            time.sleep(0.3)
    stop(server)
    raise AssertionError("sle serve did not answer within 60 s")


def stop(server: subprocess.Popen) -> str:
    os.killpg(server.pid, signal.SIGTERM)  # the server and its worker processes, which it started
    _, err = server.communicate(timeout=30)
    return err
