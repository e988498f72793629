"""The ASGI lifespan protocol: startup before the first connection, shutdown after the last.

The app's lifespan call runs for the whole life of the server in its own task, shielded from the
outer cancellation: on Ctrl-C the app (and whatever it started in startup, e.g. an engine) must
keep running while in-flight requests drain, and stop only when we send lifespan.shutdown.

Apps that do not speak lifespan are tolerated, as the ASGI spec asks: an app that raises or
returns before answering lifespan.startup is served without lifespan events. Only an explicit
lifespan.startup.failed makes startup fail.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio
import anyio.abc

from .cycle import ASGIApp, Message

logger = logging.getLogger("pyserve.http")


class LifespanError(RuntimeError):
    """The app reported lifespan.startup.failed."""


class Lifespan:
    def __init__(self, app: ASGIApp, shutdown_timeout: float) -> None:
        self._app = app
        self._shutdown_timeout = shutdown_timeout
        self.state: dict[str, Any] = {}  # the app's lifespan state, copied into each request
        self._to_app, self._app_inbox = anyio.create_memory_object_stream[Message](2)
        self._cancel = anyio.CancelScope(shield=True)
        self._startup_answered = anyio.Event()
        self._shutdown_answered = anyio.Event()
        self._received_startup = False
        self._startup_failed: str | None = None
        self._running = False  # the app's lifespan call has not returned
        self._supported = True

    async def startup(self, tg: anyio.abc.TaskGroup) -> None:
        """Run the app's startup; raises LifespanError if the app reports failure."""
        self._running = True
        tg.start_soon(self._main)
        try:
            try:
                await self._to_app.send({"type": "lifespan.startup"})
            except anyio.BrokenResourceError:  # the app returned without reading it
                pass
            await self._startup_answered.wait()
        except BaseException:  # cancelled while starting: do not leave the shielded task behind
            self._cancel.cancel()
            self._to_app.close()
            raise
        if self._startup_failed is not None:
            self._cancel.cancel()
            self._to_app.close()
            raise LifespanError(f"Application startup failed: {self._startup_failed}")

    async def shutdown(self) -> None:
        """Send lifespan.shutdown, wait up to shutdown_timeout for the answer, then stop the app."""
        if self._supported and self._running:
            with anyio.move_on_after(self._shutdown_timeout) as timer:
                try:
                    await self._to_app.send({"type": "lifespan.shutdown"})
                except anyio.BrokenResourceError:  # the app's lifespan call just ended
                    pass
                await self._shutdown_answered.wait()
            if timer.cancelled_caught:
                logger.error("Application shutdown did not finish in %.1fs", self._shutdown_timeout)
        self._cancel.cancel()
        self._to_app.close()

    async def _main(self) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"},
                 "state": self.state}
        with self._cancel:
            try:
                await self._app(scope, self._receive, self._send)
            except Exception as exc:
                if not self._startup_answered.is_set():
                    self._supported = False
                    if self._received_startup:  # it read startup, so show why it broke
                        logger.warning("ASGI lifespan startup raised; serving without lifespan",
                                       exc_info=exc)
                    else:
                        logger.info("ASGI 'lifespan' protocol appears unsupported by the app")
                else:
                    logger.error("Exception in ASGI lifespan task", exc_info=exc)
            else:
                if not self._startup_answered.is_set():
                    self._supported = False
                    logger.info("ASGI app returned from lifespan without answering startup")
            finally:
                self._app_inbox.close()
                self._running = False
                self._startup_answered.set()
                self._shutdown_answered.set()

    async def _receive(self) -> Message:
        message = await self._app_inbox.receive()
        if message["type"] == "lifespan.startup":
            self._received_startup = True
        return message

    async def _send(self, message: Message) -> None:
        kind = message.get("type")
        if kind == "lifespan.startup.complete":
            self._startup_answered.set()
        elif kind == "lifespan.startup.failed":
            self._startup_failed = str(message.get("message", "")) or "(no message)"
            self._startup_answered.set()
        elif kind == "lifespan.shutdown.complete":
            self._shutdown_answered.set()
        elif kind == "lifespan.shutdown.failed":
            logger.error("Application shutdown failed: %s", message.get("message", ""))
            self._shutdown_answered.set()
        else:
            raise RuntimeError(f"unexpected ASGI lifespan message type {kind!r}")
