"""Small ASGI helpers: the request view handlers see, body reading, JSON and SSE responses.

Nothing here knows about sockets: it speaks ASGI 3 messages only.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, TypeVar

import anyio

from pyserve.protocol.errors import ProtocolError
from pyserve.protocol.responses import dumps

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
T = TypeVar("T")

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024  # the same default as pyserve.http's ServerConfig


class ClientDisconnected(Exception):
    """The client went away before we finished reading the request."""


@dataclass
class Request:
    scope: Scope
    receive: Receive
    _send: Send
    path_params: dict[str, str] = field(default_factory=dict)
    response_started: bool = False

    @property
    def method(self) -> str:
        return self.scope["method"]

    @property
    def path(self) -> str:
        return self.scope["path"]

    def header(self, name: str) -> str | None:
        key = name.lower().encode("latin-1")
        for k, v in self.scope.get("headers", ()):
            if k.lower() == key:
                return v.decode("latin-1")
        return None

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.response_started = True
        await self._send(message)

    async def body(self, limit: int = DEFAULT_MAX_BODY_BYTES) -> bytes:
        """Reads the whole body; 413 past `limit` bytes; ClientDisconnected if the client leaves."""
        declared = self.header("content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            raise _too_large(limit)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnected()
            if message["type"] != "http.request":
                continue
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _too_large(limit: int) -> ProtocolError:
    return ProtocolError(f"Request body too large: the limit is {limit} bytes.", status=413)


async def send_json(
    request: Request, status: int, obj: Any, headers: list[tuple[str, str]] | None = None
) -> None:
    body = dumps(obj)
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers or ()]
    await request.send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await request.send({"type": "http.response.body", "body": body, "more_body": False})


async def send_error(request: Request, err: ProtocolError) -> None:
    await send_json(request, err.status, err.body(), err.headers)


class EventStream:
    """A Server-Sent Events response: `data: {json}\\n\\n` per event, `data: [DONE]\\n\\n` last.

    Headers go out with the first event, so an error raised before any output can still become a
    plain HTTP error. Concurrent writers (one per choice) are serialized by a lock.
    """

    def __init__(self, request: Request, on_start: Callable[[], list[Any]] | None = None, *,
                 done_marker: bool = True, named: bool = False) -> None:
        self._request = request
        self._on_start = on_start  # events to send right after the headers (e.g. role chunks)
        self._done_marker = done_marker  # Chat / Completions end with [DONE]; the Responses API does not
        self._named = named  # an `event: <obj["type"]>` line before each data line (the Responses API)
        self._lock = anyio.Lock(fast_acquire=True)  # no trip through the event loop when free
        self.started = False
        self.closed = False

    async def send(self, obj: Any) -> None:
        async with self._lock:
            await self._ensure_started()
            await self._write(self._event(obj))

    def _event(self, obj: Any) -> bytes:
        data = b"data: " + dumps(obj) + b"\n\n"
        if self._named and isinstance(obj, dict) and isinstance(obj.get("type"), str):
            return b"event: " + obj["type"].encode() + b"\n" + data
        return data

    async def start(self) -> None:
        """Sends the headers (and the on_start events) now rather than with the first event."""
        async with self._lock:
            await self._ensure_started()

    async def close(self) -> None:
        async with self._lock:
            if self.closed:
                return
            await self._ensure_started()
            if self._done_marker:
                await self._write(b"data: [DONE]\n\n")
            await self._request.send({"type": "http.response.body", "body": b"", "more_body": False})
            self.closed = True

    async def _ensure_started(self) -> None:
        if self.started:
            return
        self.started = True
        await self._request.send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-cache"),
                    (b"x-accel-buffering", b"no"),
                ],
            }
        )
        for obj in self._on_start() if self._on_start else ():
            await self._write(self._event(obj))

    async def _write(self, data: bytes) -> None:
        await self._request.send({"type": "http.response.body", "body": data, "more_body": True})


async def run_until_disconnect(receive: Receive, fn: Callable[[], Awaitable[T]]) -> tuple[bool, T | None]:
    """Runs `fn()` while watching `receive()` for http.disconnect; on disconnect, cancels `fn`.

    Returns (disconnected, result). Cancelling `fn` unwinds the `async with aclosing(...)` around
    the engine's generator, which aborts the request in the engine.
    """
    disconnected = False
    result: T | None = None

    async def watch(scope: anyio.CancelScope) -> None:
        nonlocal disconnected
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                disconnected = True
                scope.cancel()
                return
            # ASGI servers block in receive() once the body is read; one that returns at once
            # must not turn this loop into a busy spin.
            await anyio.sleep(0.01)

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch, tg.cancel_scope)
            result = await fn()
            tg.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise first_exception(group) from None
    return disconnected, result


def first_exception(group: BaseExceptionGroup) -> BaseException:
    """The first leaf exception of a (possibly nested) group, preferring non-cancellation ones."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for sub in exc.exceptions:
                walk(sub)
        else:
            leaves.append(exc)

    walk(group)
    cancelled = anyio.get_cancelled_exc_class()
    for exc in leaves:
        if not isinstance(exc, cancelled):
            return exc
    return leaves[0]
