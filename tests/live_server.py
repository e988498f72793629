"""Live servers for tests: the app on a real engine, served in a background thread by pyserve's
own HTTP server or by uvicorn, plus small blocking HTTP clients (raw sockets, SSE, /metrics).

    with pyserve_server(make_app()) as srv:       # or uvicorn_server(...)
        status, headers, body = request(srv.url, "POST", "/v1/completions", {...})
        wait_idle(srv.url)                        # engine back to idle, read through /metrics
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from anyio.from_thread import start_blocking_portal

from pyserve.config import EngineConfig
from pyserve.http import ServerConfig, serve


@dataclass
class Live:
    url: str
    host: str
    port: int
    app: Any


# --- the app on a real engine ------------------------------------------------------------------


def make_engine(model_path: str | None = None, **config: Any) -> Any:
    """An AsyncEngine on the default model (or `model_path`), 2 threads unless told otherwise."""
    from pyserve.engine.async_engine import AsyncEngine
    from pyserve.model.loader import default_model_path, load_model

    model = load_model(model_path or default_model_path())
    config.setdefault("num_threads", 2)
    return AsyncEngine(model, EngineConfig(**config))


def make_app(model_path: str | None = None, *, app_options: dict | None = None, **config: Any) -> Any:
    from pyserve.api import create_app

    return create_app(make_engine(model_path, **config), **(app_options or {}))


# --- servers in a thread -----------------------------------------------------------------------


@contextmanager
def pyserve_server(app: Any, **config: Any) -> Iterator[Live]:
    """pyserve.http.serve(app) on an ephemeral port in a background event loop; stopped
    gracefully (shutdown_timeout applies) when the block ends."""
    config.setdefault("shutdown_timeout", 5.0)
    with start_blocking_portal() as portal:
        future, port = portal.start_task(serve, app, ServerConfig(port=0, **config))
        try:
            yield Live(f"http://127.0.0.1:{port}", "127.0.0.1", port, app)
        finally:
            future.cancel()
            concurrent.futures.wait([future], timeout=60)


@contextmanager
def uvicorn_server(app: Any, startup_timeout: float = 60.0) -> Iterator[Live]:
    """uvicorn serving `app` (an ASGI app, or an import string with factory=True semantics when
    given as "module:factory()") on an ephemeral port in a background thread."""
    import uvicorn

    factory = isinstance(app, str) and app.endswith("()")
    target = app[:-2] if factory else app
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(target, factory=factory, lifespan="on", log_level="warning",
                                           timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:  # a real condition: uvicorn sets it once it listens
        if not thread.is_alive():
            raise RuntimeError("uvicorn exited before it started")
        if time.monotonic() > deadline:
            raise RuntimeError(f"uvicorn not started after {startup_timeout} s")
        time.sleep(0.05)
    try:
        yield Live(f"http://127.0.0.1:{port}", "127.0.0.1", port, getattr(server.config, "loaded_app", app))
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()


# --- blocking clients ---------------------------------------------------------------------------


def connect(url_or_port: str | int, timeout: float = 60) -> socket.socket:
    port = url_or_port if isinstance(url_or_port, int) else int(url_or_port.rsplit(":", 1)[1])
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def hang_up(sock: socket.socket) -> None:
    """Close the connection for real (a makefile() reader would otherwise keep the fd open)."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def _encode(body: Any) -> bytes | None:
    if body is None or isinstance(body, bytes):
        return body
    return json.dumps(body).encode()


def send_request(sock: socket.socket, method: str, path: str, body: Any = None,
                 headers: dict[str, str] | None = None) -> None:
    data = _encode(body)
    head = f"{method} {path} HTTP/1.1\r\nHost: test\r\n"
    for k, v in (headers or {}).items():
        head += f"{k}: {v}\r\n"
    if data is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
    sock.sendall(head.encode("latin-1") + b"\r\n" + (data or b""))


class Reader:
    """Reads one HTTP/1.1 response (Content-Length, chunked, or until close) from a socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.f = sock.makefile("rb")

    def head(self) -> tuple[int, dict[str, str]]:
        while True:
            line = self.f.readline()
            if not line:
                raise ConnectionError("connection closed before a response")
            status = int(line.split()[1])
            headers: dict[str, str] = {}
            while (line := self.f.readline()) not in (b"\r\n", b""):
                k, _, v = line.decode("latin-1").partition(":")
                headers[k.strip().lower()] = v.strip()
            if status != 100:
                return status, headers

    def chunks(self, headers: dict[str, str]) -> Iterator[bytes]:
        """The body in pieces as they arrive."""
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size_line = self.f.readline()
                if not size_line:
                    raise ConnectionError("connection closed inside a chunked body")
                size = int(size_line.split(b";")[0], 16)
                if size == 0:
                    while self.f.readline() not in (b"\r\n", b""):
                        pass
                    return
                data = self.f.read(size)
                self.f.readline()
                yield data
        elif "content-length" in headers:
            yield self.f.read(int(headers["content-length"]))
        else:
            while data := self.f.read1(65536):
                yield data

    def response(self) -> tuple[int, dict[str, str], bytes]:
        status, headers = self.head()
        return status, headers, b"".join(self.chunks(headers))


def request(url: str, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
            timeout: float = 120) -> tuple[int, dict[str, str], bytes]:
    with connect(url, timeout) as sock:
        send_request(sock, method, path, body, {"Connection": "close", **(headers or {})})
        return Reader(sock).response()


def sse_events(body: bytes) -> list[Any]:
    """`data:` payloads of an SSE body, JSON-decoded ("[DONE]" kept as the string)."""
    out = []
    for block in body.decode("utf-8").split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def stream_text(events: list[Any]) -> str:
    text = ""
    for ev in events:
        if isinstance(ev, dict):
            for choice in ev.get("choices", []):
                text += choice.get("text") or (choice.get("delta") or {}).get("content") or ""
    return text


# --- /metrics -------------------------------------------------------------------------------------

_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


def metrics(url: str) -> dict[str, float]:
    """Each series summed over its labels: {"pyserve:num_requests_running": 0.0, ...}."""
    status, headers, body = request(url, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain"), (status, body[:200])
    out: dict[str, float] = {}
    for line in body.decode().splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        assert m, line
        name, _, value = m.groups()
        out[name] = out.get(name, 0.0) + float(value)
    return out


def busy_pages(m: dict[str, float]) -> float:
    """KV pages held by requests (kv_pages_used leaves out what only the prefix cache holds)."""
    return m.get("pyserve:kv_pages_used", 0.0)


def is_idle(m: dict[str, float]) -> bool:
    return (m["pyserve:num_requests_running"] == 0 and m["pyserve:num_requests_waiting"] == 0
            and busy_pages(m) == 0 and m.get("pyserve:num_requests_pending", 0.0) == 0)


def wait_until(url: str, condition: Any, timeout: float = 30.0, what: str = "condition") -> dict[str, float]:
    """Polls /metrics until condition(metrics) holds; fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        if condition(m):
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s: {m}")
        time.sleep(0.02)  # polling a real condition


def wait_idle(url: str, timeout: float = 30.0) -> dict[str, float]:
    return wait_until(url, is_idle, timeout, "engine idle")


__all__ = ["Live", "make_engine", "make_app", "pyserve_server", "uvicorn_server", "connect", "hang_up", "send_request",
           "Reader", "request", "sse_events", "stream_text", "metrics", "busy_pages", "is_idle", "wait_until",
           "wait_idle"]
