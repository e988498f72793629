"""Start `python -m pyserve` as a real subprocess on a free port, for end-to-end tests and tools.

Environment: PYSERVE_TEST_THREADS (kernel threads, default 2), PYSERVE_TEST_QUIET=1 (discard the
server's log)."""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(proc: subprocess.Popen, port: int, timeout: float, what: str = "server") -> str:
    """Polls GET /health on a server subprocess until it answers 200; returns its base URL.
    Raises if the process exits first or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before it was ready")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            try:
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return f"http://127.0.0.1:{port}"
            finally:
                conn.close()
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready after {timeout} s")
        time.sleep(0.2)  # polling a real readiness condition, not standing in for one


@contextmanager
def running_server(*args: str, startup_timeout: float = 180.0) -> Iterator[str]:
    """Yields the base URL once /health answers 200; stops the server (SIGINT) afterwards and
    checks that it exited cleanly."""
    port = free_port()
    cmd = [sys.executable, "-m", "pyserve", *args, "--port", str(port), "--num-threads", os.environ.get("PYSERVE_TEST_THREADS", "2")]
    log = open(os.devnull, "wb") if os.environ.get("PYSERVE_TEST_QUIET") else None
    proc = subprocess.Popen(cmd, stdout=log, stderr=log)
    try:
        yield wait_until_healthy(proc, port, startup_timeout, what=" ".join(cmd))
    finally:
        stop_gracefully(proc)


def stop_gracefully(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGINT (the Ctrl-C path), then the server must exit 0 within `timeout` (else it is killed
    and the test fails)."""
    if proc.poll() is None:
        proc.send_signal(2)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"server did not stop on SIGINT within {timeout:.0f} s") from None
    assert proc.returncode == 0, f"server exited with {proc.returncode}"
