"""The ASGI 3 application: lifespan (runs the engine loop) + routing + error mapping.

    app = create_app(engine, served_model_name="smollm2")
    pyserve.http.server.run(app, ServerConfig(port=8000))

Every error leaves as exactly one JSON object `{"error": {...}}` with the right status; a client's
mistake is never a 500.
"""
from __future__ import annotations

import functools
import logging
from typing import Any

import anyio
from anyio.abc import TaskStatus

from pyserve.api import openai
from pyserve.api.asgi import (
    DEFAULT_MAX_BODY_BYTES,
    ClientDisconnected,
    Receive,
    Request,
    Scope,
    Send,
    send_error,
    send_json,
)
from pyserve.api.router import Router

log = logging.getLogger(__name__)


class App:
    """ASGI app over one AsyncEngine. Create it with `create_app`."""

    def __init__(
        self,
        engine: Any,
        *,
        served_model_name: str | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        self.engine = engine
        name = served_model_name or getattr(engine.model, "name", None) or "default"
        self.ctx = openai.ServingContext(engine, name, max_body_bytes)
        self.router = Router()
        ctx = self.ctx
        self.router.add("GET", "/health", self._health)
        self.router.add("GET", "/v1/models", functools.partial(openai.list_models, ctx))
        self.router.add("GET", "/v1/models/{model:path}", functools.partial(openai.get_model, ctx))
        self.router.add("POST", "/v1/completions", functools.partial(openai.completions, ctx))
        self.router.add("POST", "/v1/chat/completions", functools.partial(openai.chat_completions, ctx))

    @property
    def served_model_name(self) -> str:
        return self.ctx.model_name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "websocket":
            await send({"type": "websocket.close", "code": 1000})

    # --- HTTP -----------------------------------------------------------------------------------

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive, send)
        try:
            handler, request.path_params = self.router.match(scope["method"], scope["path"])
            await handler(request)
        except ClientDisconnected:
            log.debug("%s %s: client disconnected before the request was read", scope["method"], scope["path"])
        except Exception as exc:
            if request.response_started:
                # Streaming handlers report their own errors in-band; a failing send means the
                # client is gone. Nothing else can be said on this response.
                if not isinstance(exc, OSError):
                    log.error("error after the response started", exc_info=exc)
                return
            err = openai.as_protocol_error(exc)
            if err.status < 500:
                log.info("%s %s -> %d: %s", scope["method"], scope["path"], err.status, err.message)
            try:
                await send_error(request, err)
            except OSError:
                pass

    async def _health(self, request: Request) -> None:
        if self.ctx.engine_failed is not None:
            await send_json(request, 503, {"status": "error", "message": "engine stopped"})
        else:
            await send_json(request, 200, {"status": "ok"})

    # --- lifespan -------------------------------------------------------------------------------

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        message = await receive()
        if message["type"] != "lifespan.startup":
            return
        async with anyio.create_task_group() as tg:
            try:
                await tg.start(self._run_engine)
            except Exception as exc:
                log.error("engine failed to start", exc_info=exc)
                await send({"type": "lifespan.startup.failed", "message": f"engine failed to start: {exc}"})
                return
            await send({"type": "lifespan.startup.complete"})
            while (await receive())["type"] != "lifespan.shutdown":
                pass
            try:
                shutdown = getattr(self.engine, "shutdown", None)
                if shutdown is not None:
                    await shutdown()
            except Exception as exc:
                log.error("engine shutdown failed", exc_info=exc)
            finally:
                tg.cancel_scope.cancel()
        await send({"type": "lifespan.shutdown.complete"})

    async def _run_engine(self, *, task_status: TaskStatus[Any] = anyio.TASK_STATUS_IGNORED) -> None:
        run = getattr(self.engine, "run", None)
        if run is None:  # an engine without a loop of its own
            task_status.started()
            return
        status = _RecordingStatus(task_status)
        try:
            await run(task_status=status)
        except Exception as exc:
            if not status.was_started:
                raise  # tg.start() reports it: startup fails
            log.critical("engine loop crashed; /health now reports 503", exc_info=exc)
            self.ctx.engine_failed = exc


class _RecordingStatus:
    """Wraps a TaskStatus to know whether the engine reported itself started."""

    def __init__(self, inner: TaskStatus[Any]) -> None:
        self._inner = inner
        self.was_started = False

    def started(self, value: Any = None) -> None:
        self.was_started = True
        self._inner.started(value)


def create_app(
    engine: Any,
    *,
    served_model_name: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> App:
    """The ASGI app serving `engine` under `served_model_name` (default: the model's name)."""
    return App(engine, served_model_name=served_model_name, max_body_bytes=max_body_bytes)
