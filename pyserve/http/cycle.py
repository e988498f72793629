"""One request/response exchange: the ASGI scope, receive() and send(), and the access log.

Nothing runs beside the app: the socket is read only when the app needs something from it.
  - receive() hands out body bytes already parsed; when the body is not all here yet, it reads
    the socket itself (and sends `100 Continue` first, if the client waits for one), each read
    bounded by body_timeout (then 408).
  - Once the body is done, receive() waits for the client to go away: it reads the socket until
    EOF (a pipelined next request is kept for later, up to max_header_bytes), and returns
    {"type": "http.disconnect"} at EOF, or as soon as the response is complete.
  - send() of a streamed body first takes a non-blocking look at the socket: an EOF there means
    the client left, and the stream stops.
So a request whose body came with its head (the common case) costs no task, no queue and no
timer; the work of watching for a disconnect is done only while an app waits in receive() or
streams.

Disconnect contract (for apps):
- receive() returns {"type": "http.disconnect"} once the client is gone, and also once the
  response is complete (as the ASGI spec asks).
- EOF counts as a disconnect even if it is only a half-close (as in uvicorn): real HTTP clients do
  not half-close while waiting for a response, and prompt disconnects matter more here (an LLM
  request should stop generating as soon as nobody listens).
- send() after the client is gone raises ClientDisconnected (an OSError), the ASGI 2.4 behaviour:
  a streaming handler stops at its next send instead of generating into the void.
- send() returns once the bytes are handed to the kernel (waiting at most write_timeout): a client
  that stops reading stops the app at its next send (backpressure), and is dropped at the timeout.

Access log: one line per request on the "pyserve.access" logger (built only when that logger is
enabled for INFO). An app may add fields to it by filling the dict in
scope["extensions"]["pyserve.access_log"] (key -> value, logged as key=value): the server stays
ignorant of what they mean.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from typing import Any, Awaitable, Callable

import anyio
import anyio.lowlevel

from .config import ServerConfig
from .connection import Body, HTTPConnection, Rejected, RequestStarted
from .transport import Transport

logger = logging.getLogger("pyserve.http")
access_logger = logging.getLogger("pyserve.access")

Message = dict[str, Any]
ASGIApp = Callable[[dict[str, Any], Callable[[], Awaitable[Message]],
                    Callable[[Message], Awaitable[None]]], Awaitable[None]]

ACCESS_LOG_EXTENSION = "pyserve.access_log"
_ASGI = {"version": "3.0", "spec_version": "2.3"}
_YIELD_EVERY = 16  # sends that complete at once; every so many, let other connections run
_INFO = logging.INFO


class ClientDisconnected(OSError):
    """send() was called after the client closed the connection."""


def build_scope(request: RequestStarted, transport: Transport, state: dict[str, Any]) -> dict:
    return {
        "type": "http",
        "asgi": dict(_ASGI),
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
        "state": state.copy(),  # a shallow copy per request, as the lifespan "state" spec says
        "extensions": {ACCESS_LOG_EXTENSION: {}},  # the app's extra access-log fields
    }


class RequestCycle:
    def __init__(self, request: RequestStarted, core: HTTPConnection, transport: Transport,
                 config: ServerConfig, state: dict[str, Any]) -> None:
        self.scope = build_scope(request, transport, state)
        self._core = core
        self._transport = transport
        self._config = config
        self._body_done = False
        self._reading: anyio.Event | None = None  # set while some task reads the socket
        self._watchers: list[anyio.CancelScope] = []  # receive() calls waiting for the end
        self._sends = 0
        self.client_gone = False
        self.must_close = False  # the connection cannot carry another request
        self.aborted = False  # we answered an error mid-request; the server should linger

    async def run(self, app: ASGIApp) -> None:
        started = time.perf_counter()
        try:
            await app(self.scope, self.receive, self.send)
        except Exception as exc:
            await self._app_failed(exc)
        else:
            core = self._core
            if core.response_complete:
                pass
            elif self.client_gone:
                # Nobody to answer: an app may stop as soon as it sees the disconnect.
                logger.debug("ASGI app returned after the client disconnected")
                self.must_close = True
            elif not core.response_started:
                logger.error("ASGI app returned without starting a response")
                await self._send_error(500, "Internal Server Error")
            else:
                logger.error("ASGI app returned without completing the response")
                self.must_close = True
        finally:
            self._wake_watchers()
            if access_logger.isEnabledFor(_INFO):
                self._log_access(started)

    # ---- ASGI callables ----------------------------------------------------------------------

    async def receive(self) -> Message:
        if not self._body_done:
            return await self._receive_body()
        if not (self.client_gone or self._core.response_complete):
            await self._wait_for_disconnect()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        if self.client_gone:
            raise ClientDisconnected("client disconnected")
        core = self._core
        data = core.send(message)
        if data:
            if not core.response_complete and core.request_complete:
                self._poll_disconnect()  # a stream: is anybody still listening?
                if self.client_gone:
                    raise ClientDisconnected("client disconnected")
            if not await self._transport.write(data):
                self._gone()
                raise ClientDisconnected("client disconnected")
            self._sends += 1
            if self._sends % _YIELD_EVERY == 0:
                await anyio.lowlevel.checkpoint()
        if core.response_complete:
            self._wake_watchers()

    # ---- reading, only when asked --------------------------------------------------------------

    async def _receive_body(self) -> Message:
        core = self._core
        while not self.client_gone:
            event = core.next_event()
            kind = type(event)
            if kind is Body:
                self._body_done = not event.more_body  # type: ignore[union-attr]
                return {"type": "http.request", "body": event.data,  # type: ignore[union-attr]
                        "more_body": event.more_body}  # type: ignore[union-attr]
            if event is None:
                # The body is not all here: now is the time to tell an `Expect: 100-continue`
                # client to send it (not earlier: the app may answer without reading it).
                data = core.send_continue()
                if data and not await self._transport.write(data):
                    self._gone()
                    break
                if not await self._read(self._config.body_timeout):
                    await self._abort(Rejected(408, "Timed out reading the request body"))
                    break
            elif kind is Rejected:
                await self._abort(event)  # type: ignore[arg-type]
                break
            else:  # Closed (a RequestStarted cannot come before the body ends)
                self._gone()
                break
        return {"type": "http.disconnect"}

    async def _wait_for_disconnect(self) -> None:
        """Read until the client goes away; return early once the response is complete."""
        with anyio.CancelScope() as scope:
            self._watchers.append(scope)
            try:
                while not (self.client_gone or self._core.response_complete):
                    if self._core.buffered_bytes > self._config.max_header_bytes:
                        # A pipelined request is piling up: it waits for its turn, and so do we.
                        await anyio.sleep_forever()
                    await self._read(None)
                    await self._after_body()
            finally:
                self._watchers.remove(scope)

    async def _read(self, timeout: float | None) -> bool:
        """Read once from the socket into the core. False when `timeout` passed first. If another
        task is already reading, wait for that read instead (one reader at a time)."""
        if self._reading is not None:
            await self._reading.wait()
            return True
        self._reading = done = anyio.Event()
        try:
            data: bytes | None = None
            if timeout is None:
                data = await self._transport.read()
            else:
                with anyio.move_on_after(timeout):
                    data = await self._transport.read()
            if data is None:
                return False
            self._core.receive_data(data)
            return True
        finally:
            self._reading = None
            done.set()

    async def _after_body(self) -> None:
        """Make sense of bytes that came after the request: EOF, a pipelined request, junk."""
        event = self._core.next_event()
        if event is None:  # the next request, waiting for its turn (PAUSED) ...
            if self._core.eof_received:  # ... with an EOF behind it
                self._gone()
        elif type(event) is Rejected:
            await self._abort(event)  # type: ignore[arg-type]
        else:  # Closed
            self._gone()

    def _poll_disconnect(self) -> None:
        """Non-blocking: take in what the client sent since its request; EOF means it left."""
        core = self._core
        if core.eof_received:
            self._gone()
            return
        if self._reading is not None or core.buffered_bytes > self._config.max_header_bytes:
            return  # a receive() is reading already, or a pipelined request waits its turn
        data = self._transport.read_nowait()
        if data is None:
            return
        core.receive_data(data)  # a pipelined request keeps, in the core, for its turn
        if core.eof_received:
            self._gone()

    # ---- endings -----------------------------------------------------------------------------

    def _wake_watchers(self) -> None:
        for scope in self._watchers:
            scope.cancel()

    def _gone(self) -> None:
        self.client_gone = True
        self.must_close = True
        self._wake_watchers()

    async def _abort(self, rejected: Rejected) -> None:
        """A broken or oversized body: answer with the error if no response started, close."""
        logger.info("%s: request aborted: %d %s", self.scope["client"], rejected.status,
                    rejected.message)
        data = self._core.error_response(rejected.status, rejected.message)
        if data:
            await self._transport.write(data)
            self.aborted = True
        self._gone()

    async def _app_failed(self, exc: Exception) -> None:
        self.must_close = True
        if self.client_gone:  # an app that trips over the disconnect is not an app bug
            logger.debug("ASGI app raised after the client disconnected: %r", exc)
            return
        logger.error("Exception in ASGI application", exc_info=exc)
        if not self._core.response_started:
            await self._send_error(500, "Internal Server Error")
        # else: the head is out; closing the connection is the only signal left

    async def _send_error(self, status: int, message: str) -> None:
        data = self._core.error_response(status, message)
        if data:
            await self._transport.write(data)
        self.must_close = True

    def _log_access(self, started: float) -> None:
        scope = self.scope
        path = scope["raw_path"].decode("latin-1")
        if scope["query_string"]:
            path += "?" + scope["query_string"].decode("latin-1")
        status = self._core.status if self._core.response_complete else "-"
        client = scope["client"]
        extra = (scope.get("extensions") or {}).get(ACCESS_LOG_EXTENSION)
        fields = "".join(f" {k}={_field(v)}" for k, v in extra.items()) if extra and isinstance(extra, dict) else ""
        _access_record('%s "%s %s HTTP/%s" %s %.1fms%s', (
            f"{client[0]}:{client[1]}" if client else "-", scope["method"], path,
            scope["http_version"], status, (time.perf_counter() - started) * 1000, fields))


class _RecordTemplate:
    """The fields of an access-log record that are the same for every request served by this
    thread (logger, level, thread, process, no caller), made once by logging itself."""

    thread: int | None = None
    fields: dict[str, Any] = {}


def _access_record(msg: str, args: tuple) -> None:
    """Log one access line: the record logger.info() would make, built from a template instead
    of from scratch (no caller lookup, thread and process names looked up once). With a custom
    record factory or logger class, logging makes it the usual way."""
    if logging.getLogRecordFactory() is not logging.LogRecord or type(access_logger) is not logging.Logger:
        access_logger.handle(access_logger.makeRecord(access_logger.name, _INFO, __file__, 0, msg, args, None))
        return
    template = _RecordTemplate
    ident = threading.get_ident()
    if template.thread != ident:
        template.fields = logging.LogRecord(access_logger.name, _INFO, __file__, 0, "", (), None).__dict__.copy()
        template.thread = ident
    record = _new_record(logging.LogRecord)
    fields = template.fields
    record.__dict__.update(fields)
    now = time.time()
    record.created = now
    record.msecs = int((now - int(now)) * 1000) + 0.0
    record.relativeCreated = fields["relativeCreated"] + (now - fields["created"]) * 1000
    record.msg = msg
    record.args = args
    if "taskName" in fields:  # Python >= 3.12 records the asyncio task, as LogRecord does
        record.taskName = _task_name()
    access_logger.handle(record)


_new_record = object.__new__


def _task_name() -> str | None:
    asyncio = sys.modules.get("asyncio")
    if not getattr(logging, "logAsyncioTasks", False) or asyncio is None:
        return None
    try:
        task = asyncio.current_task()
    except Exception:
        return None
    return task.get_name() if task is not None else None

def _field(value: Any) -> str:
    """An access-log value on one line: quoted (JSON style) when it has spaces or quotes."""
    text = str(value)
    if not text or any(c.isspace() or c == '"' for c in text) or not text.isprintable():
        return json.dumps(text)
    return text
