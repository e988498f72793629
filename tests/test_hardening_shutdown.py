"""Graceful shutdown of `python -m pyserve` on SIGTERM and SIGINT: it stops accepting at once, lets
in-flight requests finish within --shutdown-timeout, aborts the ones that would outlast it, and
exits with status 0."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time

import pytest

from live_server import Reader, send_request
from pyserve.model.loader import default_model_path
from server_process import free_port, wait_until_healthy

SHUTDOWN_TIMEOUT = 4.0


def start_server(tmp_path, *flags: str) -> tuple[subprocess.Popen, str, object]:
    port = free_port()
    log = open(tmp_path / "server.log", "w+b")
    proc = subprocess.Popen([sys.executable, "-m", "pyserve", default_model_path(), "--port", str(port),
                             "--num-threads", "2", *flags], stdout=log, stderr=subprocess.STDOUT)
    try:
        url = wait_until_healthy(proc, port, 120)
    except RuntimeError as e:
        raise AssertionError(f"{e}:\n{(tmp_path / 'server.log').read_text()}") from None
    return proc, url, log


def open_stream(url: str, max_tokens: int) -> tuple[socket.socket, Reader, dict]:
    sock = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=60)
    send_request(sock, "POST", "/v1/completions", {"prompt": "Once upon a time", "max_tokens": max_tokens,
                                                   "ignore_eos": True, "temperature": 0, "stream": True})
    reader = Reader(sock)
    status, headers = reader.head()
    assert status == 200
    return sock, reader, headers


def read_rest(reader: Reader, headers: dict) -> tuple[bytes, bool]:
    """(body so far, whether the chunked stream ended properly)."""
    body = b""
    try:
        for chunk in reader.chunks(headers):
            body += chunk
        return body, True
    except (ConnectionError, OSError, ValueError):
        return body, False


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_graceful_shutdown_finishes_short_requests_aborts_long_ones_exits_0(tmp_path, signum) -> None:
    proc, url, log = start_server(tmp_path, "--shutdown-timeout", str(SHUTDOWN_TIMEOUT))
    try:
        short_sock, short, short_headers = open_stream(url, 16)
        long_sock, long, long_headers = open_stream(url, 4000)  # ~a minute of decoding
        next(long.chunks(long_headers))  # both are generating
        proc.send_signal(signum)
        stopped_at = time.monotonic()
        # The server logs this once its listener is closed and it is draining the long request.
        deadline = time.monotonic() + 10
        while "Waiting up to" not in (tmp_path / "server.log").read_text():
            assert time.monotonic() < deadline, "no drain started"
            time.sleep(0.02)  # polling a real condition
        with pytest.raises(OSError):  # not accepting any more, while in-flight requests go on
            socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=5).close()
        short_body, short_complete = read_rest(short, short_headers)
        long_body, long_complete = read_rest(long, long_headers)
        cut_after = time.monotonic() - stopped_at
        proc.wait(timeout=60)
        exited_after = time.monotonic() - stopped_at
        short_sock.close()
        long_sock.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    output = (tmp_path / "server.log").read_text()
    assert proc.returncode == 0, output
    assert "shutting down gracefully" in output
    # The short request finished normally inside the grace period.
    assert short_complete and short_body.endswith(b"data: [DONE]\n\n")
    events = [json.loads(b[6:]) for b in short_body.split(b"\n\n") if b.startswith(b"data: {")]
    assert [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]] == ["length"]
    # The long one was cut at the timeout: no [DONE], and no waiting for its 4000 tokens.
    assert not long_body.endswith(b"data: [DONE]\n\n")
    assert SHUTDOWN_TIMEOUT * 0.9 <= cut_after < 30, cut_after
    assert exited_after < 30, exited_after
