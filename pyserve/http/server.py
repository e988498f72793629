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
"""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc

from .config import ServerConfig
from .connection import Closed, Event, HTTPConnection, Rejected
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
    """A connection as the stopping logic sees it."""

    scope: anyio.CancelScope = field(default_factory=lambda: anyio.CancelScope(shield=True))
    idle: bool = True  # waiting for a request head: safe to close at once on stop


class _Server:
    def __init__(self, app: ASGIApp, config: ServerConfig, state: dict[str, Any]) -> None:
        self._app = app
        self._config = config
        self._state = state
        self._slots = anyio.Semaphore(config.max_connections)
        self._live: set[_Live] = set()
        self._all_closed = anyio.Event()
        self._stopping = False

    async def serve(self, task_status: anyio.abc.TaskStatus[int]) -> None:
        cfg = self._config
        listener = await anyio.create_tcp_listener(local_host=cfg.host, local_port=cfg.port,
                                                   backlog=cfg.backlog)
        # A host like "localhost" may give one listener per address family.
        listeners = getattr(listener, "listeners", [listener])
        port = listeners[0].extra(anyio.abc.SocketAttribute.local_port)
        async with anyio.create_task_group() as conn_tg:
            try:
                async with anyio.create_task_group() as accept_tg:
                    for one in listeners:
                        accept_tg.start_soon(self._accept_loop, one, conn_tg)
                    logger.info("Serving HTTP on http://%s:%d", cfg.host, port)
                    task_status.started(port)
            finally:
                with anyio.CancelScope(shield=True):
                    await listener.aclose()  # refuse new clients from here on
                    await self._drain()

    async def _accept_loop(self, listener: anyio.abc.Listener[Any],
                           conn_tg: anyio.abc.TaskGroup) -> None:
        while True:
            # Take a slot before accepting: over the limit, clients wait in the kernel backlog
            # instead of costing us a task and a file descriptor each.
            await self._slots.acquire()
            try:
                stream = await listener.accept()
            except OSError as exc:  # e.g. EMFILE: back off briefly instead of spinning
                self._slots.release()
                logger.warning("accept() failed: %s", exc)
                await anyio.sleep(0.1)
                continue
            except BaseException:
                self._slots.release()
                raise
            conn_tg.start_soon(self._handle, stream)

    async def _handle(self, stream: anyio.abc.ByteStream) -> None:
        live = _Live()
        self._live.add(live)
        transport = Transport(stream, self._config.write_timeout)
        try:
            with live.scope:
                await self._serve_connection(transport, live)
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
                              max_header_count=cfg.max_header_count)
        first = True
        while not self._stopping:
            live.idle = True
            event = await self._read_head(transport, core, first)
            live.idle = False
            first = False
            if event is None or isinstance(event, Closed):
                return
            if isinstance(event, Rejected):
                logger.info("%s: bad request: %d %s", transport.client, event.status,
                            event.message)
                await transport.write(core.error_response(event.status, event.message))
                await transport.linger()
                return
            cycle = RequestCycle(event, core, transport, cfg, self._state)  # type: ignore[arg-type]
            await cycle.run(self._app)
            if cycle.aborted:
                await transport.linger()
            if cycle.must_close or not core.start_next_cycle():
                return

    async def _read_head(self, transport: Transport, core: HTTPConnection,
                         first: bool) -> Event | None:
        """The next request head (or rejection/close); None when the client was too slow.

        A new connection gets header_timeout to deliver its head. A kept-alive one may idle for
        keep_alive_timeout, then gets header_timeout from its first byte.
        """
        cfg = self._config
        started = first or core.buffered_bytes > 0
        wait = cfg.header_timeout if started else cfg.keep_alive_timeout
        with anyio.move_on_after(wait) as timer:
            while True:
                event = core.next_event()
                if event is not None:
                    return event
                data = await transport.read()
                if data and not started:
                    started = True
                    timer.deadline = anyio.current_time() + cfg.header_timeout
                core.receive_data(data)
        logger.debug("%s: closing: %s", transport.client,
                     "request head timed out" if started else "keep-alive idle timeout")
        return None

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
