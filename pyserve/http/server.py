"""The anyio side: listen, one task per connection, graceful stop, and the CLI entry point.

Protocol decisions live in connection.py (sans-IO) and the ASGI exchange in cycle.py; this file
only moves bytes, applies the time limits, and decides when connections end.

Stopping (cancel the task running serve(), or SIGINT/SIGTERM under run()):
  1. stop accepting and close the listening socket;
  2. close idle keep-alive connections at once; in-flight requests get shutdown_timeout to finish
     (their connections close afterwards), then they are cancelled;
  3. lifespan.shutdown.
Connection tasks run in shielded cancel scopes so the outer cancellation does not kill in-flight
requests; only step 2 cancels them.

Time limits, by what they cost: waiting for a request head (header_timeout, keep_alive_timeout)
happens once per request, so it is a float on the connection that one watcher task checks a few
times per limit; body_timeout and write_timeout apply only to reads and writes that actually
have to wait for the client, and use a cancel scope there.
"""

from __future__ import annotations

import logging
import math
import signal
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel

from .config import ServerConfig
from .connection import ErrorBody, Event, HTTPConnection, Rejected, RequestStarted, plain_error_body
from .cycle import ASGIApp, RequestCycle
from .lifespan import Lifespan, LifespanError
from .transport import Transport

__all__ = ["ServerConfig", "serve", "run", "LifespanError"]

logger = logging.getLogger("pyserve.http")


async def serve(app: ASGIApp, config: ServerConfig | None = None, *,
                task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
    """Serve `app` until cancelled. Reports the bound port through task_status once listening.

    Raises LifespanError if the app's startup fails, OSError if the address cannot be bound.
    """
    config = config or ServerConfig()
    failure: Exception | None = None
    async with anyio.create_task_group() as tg:
        lifespan = Lifespan(app, config.shutdown_timeout)
        try:
            await lifespan.startup(tg)
            try:
                await _Server(app, config, lifespan.state).serve(task_status)
            finally:
                with anyio.CancelScope(shield=True):
                    await lifespan.shutdown()
        except Exception as exc:  # re-raised below, bare rather than inside an ExceptionGroup
            failure = exc
    if failure is not None:
        raise failure


def run(app: ASGIApp, config: ServerConfig | None = None) -> None:
    """Blocking entry point for the CLI: serve until SIGINT/SIGTERM, stop gracefully, return.

    A second signal during the graceful stop gets Python's default handling (KeyboardInterrupt
    for SIGINT, termination for SIGTERM): the way to force a stuck shutdown.
    """
    anyio.run(_run_until_signal, app, config or ServerConfig())


async def _run_until_signal(app: ASGIApp, config: ServerConfig) -> None:
    failure: list[Exception] = []
    async with anyio.create_task_group() as tg:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            serve_scope = anyio.CancelScope()

            async def serve_until_stopped() -> None:
                try:
                    with serve_scope:
                        await serve(app, config)
                except Exception as exc:  # surfaced below, not wrapped in an ExceptionGroup
                    failure.append(exc)
                tg.cancel_scope.cancel()  # serve ended (stopped or failed): stop watching signals

            tg.start_soon(serve_until_stopped)
            async for signum in signals:
                logger.info("Received %s, shutting down gracefully", signal.Signals(signum).name)
                serve_scope.cancel()
                break
        # Leaving the receiver restores the default handlers while the stop is in progress.
    if failure:
        raise failure[0]


@dataclass(eq=False)
class _Live:
    """A connection as the stopping logic and the deadline watcher see it."""

    scope: anyio.CancelScope = field(default_factory=lambda: anyio.CancelScope(shield=True))
    idle: bool = True  # waiting for a request head: safe to close at once on stop
    # While waiting for a request head: when to give up (time.monotonic()), and why. Setting
    # it is a float store; _watch_deadlines cancels the scope of a connection past it.
    deadline: float = math.inf
    waiting_for: str = ""


class _Server:
    def __init__(self, app: ASGIApp, config: ServerConfig, state: dict[str, Any]) -> None:
        self._app = app
        self._config = config
        self._state = state
        self._error_body: ErrorBody = (config.error_body or getattr(app, "http_error_body", None)
                                       or plain_error_body)
        self._slots = anyio.Semaphore(config.max_connections)
        self._live: set[_Live] = set()
        self._all_closed = anyio.Event()
        self._stopping = False

    async def serve(self, task_status: anyio.abc.TaskStatus[int]) -> None:
        cfg = self._config
        listener = await anyio.create_tcp_listener(local_host=cfg.host, local_port=cfg.port,
                                                   backlog=cfg.backlog)
        # A host like "localhost" may give one listener per address family. anyio binds them;
        # we accept on the sockets ourselves (see transport.py for why raw sockets).
        listeners = getattr(listener, "listeners", [listener])
        port = listeners[0].extra(anyio.abc.SocketAttribute.local_port)
        async with anyio.create_task_group() as conn_tg:
            try:
                async with anyio.create_task_group() as accept_tg:
                    accept_tg.start_soon(self._watch_deadlines)
                    for one in listeners:
                        sock = one.extra(anyio.abc.SocketAttribute.raw_socket)
                        accept_tg.start_soon(self._accept_loop, sock, conn_tg)
                    logger.info("Serving HTTP on http://%s:%d", cfg.host, port)
                    task_status.started(port)
            finally:
                with anyio.CancelScope(shield=True):
                    await listener.aclose()  # refuse new clients from here on
                    await self._drain()

    async def _watch_deadlines(self) -> None:
        """Close connections that waited too long for a request head. One watcher for all
        connections, checking every `tick`, instead of a timer per request: a connection may be
        dropped up to a tick after its deadline, never before."""
        cfg = self._config
        tick = min(max(min(cfg.header_timeout, cfg.keep_alive_timeout) / 4, 0.005), 1.0)
        while True:
            await anyio.sleep(tick)
            now = time.monotonic()
            for live in self._live:
                if live.deadline <= now:
                    live.scope.cancel()

    async def _accept_loop(self, listening: socket.socket, conn_tg: anyio.abc.TaskGroup) -> None:
        listening.setblocking(False)
        while True:
            # Take a slot before accepting: over the limit, clients wait in the kernel backlog
            # instead of costing us a task and a file descriptor each.
            await self._slots.acquire()
            try:
                while True:
                    try:
                        sock, _ = listening.accept()
                        break
                    except (BlockingIOError, InterruptedError):
                        await anyio.wait_readable(listening)
            except OSError as exc:  # e.g. EMFILE: back off briefly instead of spinning
                self._slots.release()
                logger.warning("accept() failed: %s", exc)
                await anyio.sleep(0.1)
                continue
            except BaseException:
                self._slots.release()
                raise
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # not TCP (or already reset): harmless
                pass
            conn_tg.start_soon(self._handle, sock)

    async def _handle(self, sock: socket.socket) -> None:
        live = _Live()
        self._live.add(live)
        transport = Transport(sock, self._config.write_timeout)
        try:
            with live.scope:
                await self._serve_connection(transport, live)
            if live.scope.cancelled_caught and not self._stopping:
                logger.debug("%s: closing: %s", transport.client, live.waiting_for)
        except Exception:  # a bug of ours: log it, lose only this connection
            logger.exception("Unhandled error on connection from %s", transport.client)
        finally:
            await transport.aclose()
            self._slots.release()
            self._live.discard(live)
            if self._stopping and not self._live:
                self._all_closed.set()

    async def _serve_connection(self, transport: Transport, live: _Live) -> None:
        cfg = self._config
        core = HTTPConnection(max_body_bytes=cfg.max_body_bytes,
                              max_header_bytes=cfg.max_header_bytes,
                              max_header_count=cfg.max_header_count,
                              error_body=self._error_body)
        first = True
        while not self._stopping:
            waits = transport.waits
            event = core.next_event()
            if event is None:
                event = await self._read_head(transport, core, live, first)
            first = False
            if type(event) is not RequestStarted:
                if type(event) is Rejected:
                    logger.info("%s: bad request: %d %s", transport.client, event.status,  # type: ignore[union-attr]
                                event.message)  # type: ignore[union-attr]
                    await transport.write(core.error_response(event.status, event.message))  # type: ignore[union-attr]
                    await transport.linger()
                return  # Closed
            cycle = RequestCycle(event, core, transport, cfg, self._state)  # type: ignore[arg-type]
            await cycle.run(self._app)
            if cycle.aborted:
                await transport.linger()
                return
            if not core.request_complete and not cycle.must_close:
                core.skip_body()
            if cycle.must_close or not core.start_next_cycle():
                if not core.request_complete and not transport.closed:
                    # The app answered without reading the whole body: closing with unread
                    # input would reset the connection, maybe before the client read the answer.
                    await transport.linger()
                return
            if transport.waits == waits:
                # Served without waiting for the client (its next request was already here):
                # let the other connections run before this one goes on.
                await anyio.lowlevel.checkpoint()

    async def _read_head(self, transport: Transport, core: HTTPConnection, live: _Live,
                         first: bool) -> Event:
        """The next request head (or rejection/close). The deadline watcher cancels the
        connection's scope (which ends the connection) when the client is too slow.

        A new connection gets header_timeout to deliver its head. A kept-alive one may idle for
        keep_alive_timeout, then gets header_timeout from its first byte.
        """
        cfg = self._config
        started = first or core.buffered_bytes > 0
        if started:
            live.deadline = time.monotonic() + cfg.header_timeout
            live.waiting_for = "request head timed out"
        else:
            live.deadline = time.monotonic() + cfg.keep_alive_timeout
            live.waiting_for = "keep-alive idle timeout"
        live.idle = True
        try:
            while True:
                data = await transport.read()
                if data and not started:
                    started = True
                    live.deadline = time.monotonic() + cfg.header_timeout
                    live.waiting_for = "request head timed out"
                core.receive_data(data)
                event = core.next_event()
                if event is not None:
                    if live.scope.cancel_called:  # the stop (or the deadline) came first
                        await anyio.lowlevel.checkpoint()
                    return event
        finally:
            live.idle = False
            live.deadline = math.inf

    async def _drain(self) -> None:
        self._stopping = True
        for live in list(self._live):
            if live.idle:
                live.scope.cancel()
        if self._live:
            logger.info("Waiting up to %.1fs for %d connection(s) to finish",
                        self._config.shutdown_timeout, len(self._live))
            with anyio.move_on_after(self._config.shutdown_timeout):
                await self._all_closed.wait()
        for live in list(self._live):  # out of time: cancel the stragglers
            live.scope.cancel()
