"""The ASGI 3 application: lifespan (runs the engine loop) + CORS + API key + admission + routing.

    app = create_app(engine, served_model_name="smollm2", api_key="sk-...")
    pyserve.http.server.run(app, ServerConfig(port=8000))     # or any ASGI server

What happens to an HTTP request, in order:
  1. CORS preflight (OPTIONS + Origin + Access-Control-Request-Method): answered here (cors.py).
  2. API key on /v1/* (auth.py): 401 without the right `Authorization: Bearer`.
  3. Routing on the path below scope["root_path"] (so the app can be mounted under a prefix).
  4. Generation routes only: admission. Beyond `max_waiting_requests` requests waiting for a
     batch slot, 503 with Retry-After; the request never reaches the engine.
  5. The handler (openai.py). Every error leaves as exactly one JSON object `{"error": {...}}`
     with the right status; a client's mistake is never a 500. CORS headers go on every response.

Tokens a request cost go to the server's access log (the `pyserve.access_log` scope extension,
when the server offers it) and to /metrics (metrics.py, instrument.py).

The engine loop starts with the ASGI lifespan. A host app that mounts this one can run it from
its own lifespan (`lifespan=app.lifespan` in Starlette); if no lifespan ever ran, the loop is
started on the first request instead, so a mounted app never hangs.
"""
from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, AsyncIterator

import anyio
from anyio.abc import TaskStatus

from pyserve.api import openai, responses_api
from pyserve.api.asgi import (
    DEFAULT_MAX_BODY_BYTES,
    ClientDisconnected,
    Receive,
    Request,
    Scope,
    Send,
    first_exception,
    send_error,
    send_json,
)
from pyserve.api.auth import APIKeyAuth
from pyserve.api.cors import CORS, CORSConfig
from pyserve.api.debug import DebugRoutes
from pyserve.api.instrument import InstrumentedEngine, RequestAccount, current_account
from pyserve.api.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from pyserve.api.metrics import ServingMetrics
from pyserve.api.response_store import ResponseStore
from pyserve.api.router import Router
from pyserve.protocol.errors import INVALID_REQUEST, SERVER_ERROR, ProtocolError
from pyserve.protocol.requests import OutputLimits
from pyserve.protocol.responses import dumps

log = logging.getLogger(__name__)

ACCESS_LOG_EXTENSION = "pyserve.access_log"  # offered by pyserve.http (see pyserve/http/cycle.py)
DEFAULT_MAX_WAITING_REQUESTS = 256
RETRY_AFTER_SECONDS = 1
OVERLOADED = "overloaded_error"


class App:
    """ASGI app over one AsyncEngine. Create it with `create_app` (or `pyserve.asgi.create_app`
    to load a model from command-line style options)."""

    def __init__(
        self,
        engine: Any,
        *,
        served_model_name: str | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        api_key: str | None = None,
        cors: CORSConfig | None = None,
        max_waiting_requests: int | None = DEFAULT_MAX_WAITING_REQUESTS,
        output_limits: OutputLimits | None = None,
        enable_debug: bool = False,
    ) -> None:
        self.engine = engine
        name = served_model_name or getattr(engine.model, "name", None) or "default"
        self._pending = 0  # generation requests admitted and not yet answered
        self.metrics = ServingMetrics(
            name, self._engine_stats, max_model_len=int(getattr(engine, "max_model_len", 8192) or 8192),
            pending=lambda: self._pending,
        )
        self.ctx = openai.ServingContext(InstrumentedEngine(engine, self.metrics), name, max_body_bytes,
                                         limits=output_limits or OutputLimits(), enable_debug=enable_debug)
        self.auth = APIKeyAuth(api_key) if api_key else None
        cors = CORSConfig() if cors is None else cors
        self.cors = CORS(cors) if cors.enabled else None
        if max_waiting_requests is not None and max_waiting_requests < 0:
            raise ValueError(f"max_waiting_requests must be >= 0, got {max_waiting_requests}")
        self.max_waiting_requests = max_waiting_requests
        self._engine_started = False
        self._engine_task: Any = None  # the loop started without lifespan (kept referenced)

        self.router = Router()
        ctx = self.ctx
        self.router.add("GET", "/health", self._health)
        self.router.add("GET", "/metrics", self._metrics)
        self.router.add("GET", "/v1/models", functools.partial(openai.list_models, ctx))
        self.router.add("GET", "/v1/models/{model:path}", functools.partial(openai.get_model, ctx))
        self.router.add("POST", "/v1/completions", self._generation(functools.partial(openai.completions, ctx)))
        self.router.add(
            "POST", "/v1/chat/completions", self._generation(functools.partial(openai.chat_completions, ctx))
        )
        # OpenAI's Responses API; its store lives as long as the app (bounded, in memory).
        self.responses = ResponseStore()
        self.router.add("POST", "/v1/responses",
                        self._generation(functools.partial(responses_api.create_response, ctx, self.responses)))
        self.router.add("GET", "/v1/responses/{response_id}", functools.partial(responses_api.get_response, self.responses))
        self.router.add("DELETE", "/v1/responses/{response_id}",
                        functools.partial(responses_api.delete_response, self.responses))
        if enable_debug:
            DebugRoutes(engine, self.metrics).mount(self.router)

    @property
    def served_model_name(self) -> str:
        return self.ctx.model_name

    @property
    def pending_requests(self) -> int:
        return self._pending

    def http_error_body(self, status: int, message: str) -> tuple[bytes, bytes]:
        """The body of pyserve.http's own error responses (malformed request 400, body timeout
        408, 413, 431, a crashed handler's 500): OpenAI's error object, so a client sees one
        error shape whichever layer refused it. pyserve.http looks this hook up on the app."""
        err = ProtocolError(message, status=status, type=SERVER_ERROR if status >= 500 else INVALID_REQUEST)
        return b"application/json", dumps(err.body())

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
        headers = scope.get("headers") or []
        if self.cors is not None:
            if CORS.is_preflight(scope["method"], headers):
                await self._preflight(scope, send)
                return
            extra = self.cors.response_headers(headers)
            if extra:
                send = _with_headers(send, extra)
        request = Request(scope, receive, send)
        path = route_path(scope)
        try:
            if self.auth is not None and self.auth.protects(path):
                # Before routing: without the key, /v1 reveals nothing, not even its routes.
                self.auth.check(request.header("authorization"))
            handler, request.path_params = self.router.match(scope["method"], path)
            await handler(request)
        except ClientDisconnected:
            log.debug("%s %s: client disconnected before the request was read", scope["method"], path)
        except Exception as exc:
            if request.response_started:
                # Streaming handlers report their own errors in-band; a failing send means the
                # client is gone. Nothing else can be said on this response.
                if not isinstance(exc, OSError):
                    log.error("error after the response started", exc_info=exc)
                return
            err = openai.as_protocol_error(exc)
            if err.status < 500:
                log.info("%s %s -> %d: %s", scope["method"], path, err.status, err.message)
            try:
                await send_error(request, err)
            except OSError:
                pass

    async def _preflight(self, scope: Scope, send: Send) -> None:
        assert self.cors is not None
        status, headers, refusal = self.cors.preflight(scope.get("headers") or [])
        body = b""
        if refusal is not None:
            body = refusal.encode()
            headers = headers + [(b"content-type", b"text/plain; charset=utf-8")]
        headers = headers + [(b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    def _generation(self, handler: Any) -> Any:
        """Admission control and token accounting around a generation endpoint."""

        async def generation(request: Request) -> None:
            self._admit()
            account = RequestAccount()
            token = current_account.set(account)
            self._pending += 1
            try:
                await self._ensure_engine_running()
                await handler(request)
            finally:
                self._pending -= 1
                current_account.reset(token)
                extra = (request.scope.get("extensions") or {}).get(ACCESS_LOG_EXTENSION)
                if isinstance(extra, dict) and account.engine_requests:
                    extra["prompt_tokens"] = account.prompt_tokens
                    extra["completion_tokens"] = account.completion_tokens
                    if account.cached_tokens:
                        extra["cached_tokens"] = account.cached_tokens

        return generation

    def _admit(self) -> None:
        if self.max_waiting_requests is None:
            return
        config = getattr(self.engine, "config", None)
        batch_slots = int(getattr(config, "max_num_sequence", 0) or 0)
        if self._pending >= batch_slots + self.max_waiting_requests:
            self.metrics.request_rejected.inc()
            raise ProtocolError(
                f"The server is overloaded: {self._pending} requests are in progress or waiting "
                f"(limit {batch_slots + self.max_waiting_requests}). Retry shortly.",
                status=503,
                type=OVERLOADED,
                code="server_overloaded",
                headers=[("retry-after", str(RETRY_AFTER_SECONDS))],
            )

    def _engine_stats(self) -> dict[str, Any]:
        stats = getattr(self.engine, "stats", None)
        return dict(stats()) if stats is not None else {}

    async def _health(self, request: Request) -> None:
        if self.ctx.engine_failed is not None:
            reason = str(self.ctx.engine_failed) or type(self.ctx.engine_failed).__name__
            await send_json(request, 503, {"status": "error", "message": f"engine stopped: {reason}"})
        else:
            await send_json(request, 200, {"status": "ok"})

    async def _metrics(self, request: Request) -> None:
        body = self.metrics.render()
        await request.send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", METRICS_CONTENT_TYPE.encode()),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await request.send({"type": "http.response.body", "body": body, "more_body": False})

    # --- lifespan -------------------------------------------------------------------------------

    @asynccontextmanager
    async def lifespan(self, _host_app: Any = None) -> AsyncIterator[None]:
        """Runs the engine loop for the duration of the block, then shuts the engine down.

        The ASGI lifespan uses it; so can a host app that mounts this one
        (`Starlette(routes=[Mount("/llm", app)], lifespan=app.lifespan)`)."""
        starting = True
        try:
            async with anyio.create_task_group() as tg:
                self._engine_started = True
                await tg.start(self._run_engine)
                starting = False
                try:
                    yield
                finally:
                    with anyio.CancelScope(shield=True):
                        try:
                            shutdown = getattr(self.engine, "shutdown", None)
                            if shutdown is not None:
                                await shutdown()
                        except Exception as exc:
                            log.error("engine shutdown failed", exc_info=exc)
                    tg.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            if not starting:
                raise
            self._engine_started = False
            raise first_exception(group) from None  # the engine's own error, for startup.failed

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        message = await receive()
        if message["type"] != "lifespan.startup":
            return
        async with AsyncExitStack() as stack:
            try:
                await stack.enter_async_context(self.lifespan())
            except Exception as exc:
                log.error("engine failed to start", exc_info=exc)
                await send({"type": "lifespan.startup.failed", "message": f"engine failed to start: {exc}"})
                return
            await send({"type": "lifespan.startup.complete"})
            while (await receive())["type"] != "lifespan.shutdown":
                pass
        await send({"type": "lifespan.shutdown.complete"})

    async def _ensure_engine_running(self) -> None:
        """Starts the engine loop if no lifespan did (the app is mounted without one)."""
        if self._engine_started or getattr(self.engine, "run", None) is None:
            return
        self._engine_started = True
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not asyncio: there is no portable way to start a detached task
            self._engine_started = False
            raise ProtocolError(
                "The engine loop is not running: run the app's ASGI lifespan (or app.lifespan).",
                status=503,
                type=OVERLOADED,
            ) from None
        log.info("no ASGI lifespan ran: starting the engine loop on the first request")
        started = anyio.Event()

        class Status:
            def started(self, value: Any = None) -> None:
                started.set()

        async def run_detached() -> None:
            try:
                await self._run_engine(task_status=Status())
            except Exception as exc:
                log.critical("engine loop failed to start", exc_info=exc)
                self.ctx.engine_failed = exc
            finally:
                started.set()

        # A fresh context: the loop must not inherit this request's context variables.
        self._engine_task = contextvars.Context().run(loop.create_task, run_detached())
        await started.wait()
        self.ctx.check_ready()

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


def route_path(scope: Scope) -> str:
    """The path below the mount point: ASGI puts the mount prefix in root_path and (per the
    current spec) also at the start of path."""
    path = scope["path"]
    root = scope.get("root_path") or ""
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        return path[len(root) :] or "/"
    return path


def _with_headers(send: Send, extra: list[tuple[bytes, bytes]]) -> Send:
    async def wrapped(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            names = {k.lower() for k, _ in message.get("headers", ())}
            added = [(k, v) for k, v in extra if k not in names or k == b"vary"]
            message = {**message, "headers": [*message.get("headers", ()), *added]}
        await send(message)

    return wrapped


class _RecordingStatus:
    """Wraps a TaskStatus to know whether the engine reported itself started."""

    def __init__(self, inner: TaskStatus[Any]) -> None:
        self._inner = inner
        self.was_started = False

    def started(self, value: Any = None) -> None:
        self.was_started = True
        self._inner.started(value)


def create_app(engine: Any, **options: Any) -> App:
    """The ASGI app serving `engine`; `options` are App's keyword arguments:
    served_model_name (default: the model's name); max_body_bytes; api_key (required as
    `Authorization: Bearer` on /v1/*, None: open); cors (None: MLC-LLM's permissive defaults,
    `CORSConfig(allow_origins=[])`: off); max_waiting_requests (generation requests allowed to wait
    beyond the engine's batch slots, None: unbounded); output_limits (the operator's default and cap
    for max_tokens, pyserve.protocol.requests.OutputLimits; None: no cap); enable_debug (MLC's
    /debug routes, and requests' debug_config)."""
    return App(engine, **options)


__all__ = ["App", "create_app", "route_path", "CORSConfig"]
