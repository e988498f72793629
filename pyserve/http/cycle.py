"""One request/response exchange: the ASGI scope, receive() and send(), and a background reader.

The reader keeps reading the socket while the app runs, for two reasons: the request body flows
into receive() (with backpressure: a small queue), and once the body is done an EOF tells us the
client went away, so an app streaming a long response (or waiting in receive()) learns of it.
EOF counts as a disconnect even if it is only a half-close (as in uvicorn): real HTTP clients do
not half-close while waiting for a response, and prompt disconnects matter more here (an LLM
request should stop generating as soon as nobody listens).

Disconnect contract (for apps):
- receive() returns {"type": "http.disconnect"} once the client is gone, and also once the
  response is complete (as the ASGI spec asks).
- send() after the client is gone raises ClientDisconnected (an OSError), the ASGI 2.4 behaviour:
  a streaming handler stops at its next send instead of generating into the void.
- send() waits until the bytes are handed to the kernel (at most write_timeout): a client that
  stops reading stops the app at its next send (backpressure), and is dropped at the timeout.

Access log: one line per request on the "pyserve.access" logger. An app may add fields to it by
filling the dict in scope["extensions"]["pyserve.access_log"] (key -> value, logged as key=value):
the server stays ignorant of what they mean.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Awaitable, Callable

import anyio

from .config import ServerConfig
from .connection import Body, Closed, HTTPConnection, Rejected, RequestStarted
from .transport import Transport

logger = logging.getLogger("pyserve.http")
access_logger = logging.getLogger("pyserve.access")

Message = dict[str, Any]
ASGIApp = Callable[[dict[str, Any], Callable[[], Awaitable[Message]],
                    Callable[[Message], Awaitable[None]]], Awaitable[None]]

_DISCONNECT: Message = {"type": "http.disconnect"}
ACCESS_LOG_EXTENSION = "pyserve.access_log"
_BODY_QUEUE = 4  # request body chunks buffered ahead of the app; the reader waits beyond that


class ClientDisconnected(OSError):
    """send() was called after the client closed the connection."""


def build_scope(request: RequestStarted, transport: Transport, state: dict[str, Any]) -> dict:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": request.http_version,
        "method": request.method,
        "scheme": "http",
        "path": request.path,
        "raw_path": request.raw_path,
        "query_string": request.query_string,
        "root_path": "",
        "headers": request.headers,
        "client": transport.client,
        "server": transport.server,
        "state": dict(state),  # a shallow copy per request, as the lifespan "state" spec says
        "extensions": {ACCESS_LOG_EXTENSION: {}},  # the app's extra access-log fields
    }


class RequestCycle:
    def __init__(self, request: RequestStarted, core: HTTPConnection, transport: Transport,
                 config: ServerConfig, state: dict[str, Any]) -> None:
        self.scope = build_scope(request, transport, state)
        self._core = core
        self._transport = transport
        self._config = config
        self._body_in, self._body_out = anyio.create_memory_object_stream[Body](_BODY_QUEUE)
        self._body_done = False
        self._continue_checked = False
        self._write_lock = anyio.Lock()  # core state and socket writes change together
        self._finished = anyio.Event()  # receive() reports http.disconnect from here on
        self.client_gone = False
        self.must_close = False  # the connection cannot carry another request
        self.aborted = False  # we answered an error mid-request; the server should linger

    async def run(self, app: ASGIApp) -> None:
        started = time.perf_counter()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._read_request)
                try:
                    await app(self.scope, self.receive, self.send)
                except Exception as exc:
                    await self._app_failed(exc)
                else:
                    if self.client_gone and not self._core.response_complete:
                        # Nobody to answer: an app may stop as soon as it sees the disconnect.
                        logger.debug("ASGI app returned after the client disconnected")
                        self.must_close = True
                    elif not self._core.response_started:
                        logger.error("ASGI app returned without starting a response")
                        await self._send_error(500, "Internal Server Error", "internal_error")
                    elif not self._core.response_complete:
                        logger.error("ASGI app returned without completing the response")
                        self.must_close = True
                finally:
                    tg.cancel_scope.cancel()  # stop the reader; the server reads what follows
        finally:
            self._body_out.close()
            self._log_access(started)

    # ---- ASGI callables ----------------------------------------------------------------------

    async def receive(self) -> Message:
        if not self._body_done:
            if not self._continue_checked:
                # The app wants the body: now is the time to tell an `Expect: 100-continue`
                # client to send it (not earlier: the app may answer without reading it).
                self._continue_checked = True
                async with self._write_lock:
                    data = self._core.send_continue()
                    if data and not await self._transport.write(data):
                        self._gone()
            try:
                body = await self._body_out.receive()
            except anyio.EndOfStream:  # the reader stopped: client gone or request rejected
                return _DISCONNECT
            self._body_done = not body.more_body
            return {"type": "http.request", "body": body.data, "more_body": body.more_body}
        await self._finished.wait()
        return _DISCONNECT

    async def send(self, message: Message) -> None:
        async with self._write_lock:
            if self.client_gone:
                raise ClientDisconnected("client disconnected")
            data = self._core.send(message)
            if data and not await self._transport.write(data):
                self._gone()
                raise ClientDisconnected("client disconnected")
            if self._core.response_complete:
                self._finished.set()

    # ---- background reader -------------------------------------------------------------------

    async def _read_request(self) -> None:
        try:
            while True:
                event = self._core.next_event()
                if event is None:
                    if self._core.eof_received:  # EOF behind a pipelined request
                        self._gone()
                        return
                    if self._core.request_complete and (
                            self._core.buffered_bytes > self._config.max_header_bytes):
                        return  # a pipelined request is piling up: it waits for its turn
                    data = await self._read_with_timeout()
                    if data is None:
                        await self._abort(Rejected(408, "Timed out reading the request body"))
                        return
                    self._core.receive_data(data)
                elif isinstance(event, Body):
                    await self._body_in.send(event)  # waits while the app is not reading
                elif isinstance(event, Closed):
                    self._gone()
                    return
                elif isinstance(event, Rejected):
                    await self._abort(event)
                    return
                else:  # RequestStarted: impossible, h11 pauses after the end of a request
                    raise AssertionError(f"unexpected event {event!r}")
        finally:
            self._body_in.close()

    async def _read_with_timeout(self) -> bytes | None:
        if self._core.request_complete:  # just watching for EOF: no deadline
            return await self._transport.read()
        with anyio.move_on_after(self._config.body_timeout):
            return await self._transport.read()
        return None

    async def _abort(self, rejected: Rejected) -> None:
        """A broken or oversized body: answer with the error if no response started, close."""
        logger.info("%s: request aborted: %d %s", self.scope["client"], rejected.status,
                    rejected.message)
        async with self._write_lock:
            data = self._core.error_response(rejected.status, rejected.message)
            if data:
                await self._transport.write(data)
                self.aborted = True
        self._gone()

    # ---- endings -----------------------------------------------------------------------------

    def _gone(self) -> None:
        self.client_gone = True
        self.must_close = True
        self._finished.set()

    async def _app_failed(self, exc: Exception) -> None:
        self.must_close = True
        if self.client_gone:  # an app that trips over the disconnect is not an app bug
            logger.debug("ASGI app raised after the client disconnected: %r", exc)
            return
        logger.error("Exception in ASGI application", exc_info=exc)
        if not self._core.response_started:
            await self._send_error(500, "Internal Server Error", "internal_error")
        # else: the head is out; closing the connection is the only signal left

    async def _send_error(self, status: int, message: str, type_: str) -> None:
        async with self._write_lock:
            data = self._core.error_response(status, message, type_)
            if data:
                await self._transport.write(data)
        self.must_close = True

    def _log_access(self, started: float) -> None:
        path = self.scope["raw_path"].decode("latin-1")
        if self.scope["query_string"]:
            path += "?" + self.scope["query_string"].decode("latin-1")
        status = self._core.status if self._core.response_complete else "-"
        client = self.scope["client"]
        extra = (self.scope.get("extensions") or {}).get(ACCESS_LOG_EXTENSION)
        fields = "".join(f" {k}={_field(v)}" for k, v in extra.items()) if isinstance(extra, dict) else ""
        access_logger.info('%s "%s %s HTTP/%s" %s %.1fms%s',
                           f"{client[0]}:{client[1]}" if client else "-", self.scope["method"],
                           path, self.scope["http_version"], status,
                           (time.perf_counter() - started) * 1000, fields)


def _field(value: Any) -> str:
    """An access-log value on one line: quoted (JSON style) when it has spaces or quotes."""
    text = str(value)
    if not text or any(c.isspace() or c == '"' for c in text) or not text.isprintable():
        return json.dumps(text)
    return text
