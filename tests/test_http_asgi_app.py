"""A small third-party-style ASGI framework, written by hand (Starlette is not a dependency),
served by pyserve.http and exercised with the stdlib's http.client.

The framework copies the habits that matter to a server: a lifespan context that reports
startup failure, middleware that wraps send(), request bodies read in a loop, JSON responses with
Content-Length, and a streaming response that listens for http.disconnect concurrently (the way
Starlette does for ASGI spec < 2.4).
"""

from __future__ import annotations

import http.client
import json
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable
from urllib.parse import parse_qs

import anyio
import pytest

from pyserve.http import ServerConfig, serve

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# ---- the "framework" ---------------------------------------------------------------------------

class Request:
    def __init__(self, scope: dict, receive: Callable[[], Awaitable[dict]]) -> None:
        self.scope, self._receive = scope, receive
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.query = {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}
        self.headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        self.state: dict = scope.get("state", {})

    async def body(self) -> bytes:
        chunks = []
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                raise ConnectionError("client went away")
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def json(self) -> Any:
        return json.loads(await self.body())


class JSONResponse:
    def __init__(self, content: Any, status: int = 200) -> None:
        self.body = json.dumps(content).encode()
        self.status = status

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": self.status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(self.body)).encode())]})
        await send({"type": "http.response.body", "body": self.body})


class StreamingResponse:
    def __init__(self, chunks: AsyncIterator[bytes], media_type: str) -> None:
        self.chunks, self.media_type = chunks, media_type

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        async with anyio.create_task_group() as tg:
            async def listen_for_disconnect() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                tg.cancel_scope.cancel()

            tg.start_soon(listen_for_disconnect)
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", self.media_type.encode())]})
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            tg.cancel_scope.cancel()


Handler = Callable[[Request], Awaitable[Any]]


class App:
    def __init__(self, lifespan: Callable[["App"], Any]) -> None:
        self.routes: dict[tuple[str, str], Handler] = {}
        self.lifespan = lifespan
        self.middleware: list[Callable[[Any], Any]] = []

    def route(self, method: str, path: str) -> Callable[[Handler], Handler]:
        def register(fn: Handler) -> Handler:
            self.routes[(method, path)] = fn
            return fn
        return register

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        inner = self._dispatch
        for wrap in reversed(self.middleware):
            inner = wrap(inner)
        await inner(scope, receive, send)

    async def _dispatch(self, scope: dict, receive: Any, send: Any) -> None:
        request = Request(scope, receive)
        method = "GET" if request.method == "HEAD" else request.method
        handler = self.routes.get((method, request.path))
        if handler is None:
            allowed = any(p == request.path for _, p in self.routes)
            response: Any = JSONResponse({"detail": "Method Not Allowed" if allowed else
                                          "Not Found"}, 405 if allowed else 404)
        else:
            response = await handler(request)
        await response(scope, receive, send)

    async def _lifespan(self, scope: dict, receive: Any, send: Any) -> None:
        await receive()  # lifespan.startup
        context = self.lifespan(self)
        try:
            state = await context.__aenter__()
            scope["state"].update(state or {})
        except Exception as exc:
            await send({"type": "lifespan.startup.failed", "message": str(exc)})
            return
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        await context.__aexit__(None, None, None)
        await send({"type": "lifespan.shutdown.complete"})


def timing_header(app: Any) -> Any:
    """Middleware: adds a header to every response by wrapping send()."""
    async def wrapped(scope: dict, receive: Any, send: Any) -> None:
        async def send_with_header(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message["headers"], (b"x-middleware", b"1")]}
            await send(message)
        await app(scope, receive, send_with_header)
    return wrapped


# ---- an application built on it -----------------------------------------------------------------

events: list[str] = []


@asynccontextmanager
async def lifespan(app: App) -> AsyncIterator[dict]:
    events.append("startup")
    yield {"greeting": "hello"}
    events.append("shutdown")


def make_app() -> App:
    app = App(lifespan)
    app.middleware.append(timing_header)

    @app.route("GET", "/hello")
    async def hello(request: Request) -> JSONResponse:
        name = request.query.get("name", "world")
        return JSONResponse({"message": f"{request.state['greeting']}, {name}"})

    @app.route("POST", "/echo")
    async def echo(request: Request) -> JSONResponse:
        return JSONResponse({"received": await request.json(),
                             "content_type": request.headers.get("content-type")})

    @app.route("GET", "/stream")
    async def stream(request: Request) -> StreamingResponse:
        async def numbers() -> AsyncIterator[bytes]:
            for i in range(int(request.query.get("n", "3"))):
                yield f"data: {i}\n\n".encode()
        return StreamingResponse(numbers(), "text/event-stream")

    @app.route("GET", "/forever")
    async def forever(request: Request) -> StreamingResponse:
        async def ticks() -> AsyncIterator[bytes]:
            try:
                while True:
                    yield b"data: tick\n\n"
            finally:
                stream_stopped.set()
        return StreamingResponse(ticks(), "text/event-stream")

    return app


stream_stopped = anyio.Event()


def http_get_many(port: int, requests: list[tuple[str, str, bytes | None]]) -> list[tuple]:
    """Sends the requests on one keep-alive http.client connection (runs in a thread)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    results = []
    for method, path, body in requests:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        headers = {k.lower(): v for k, v in resp.getheaders()}
        results.append((resp.status, headers, resp.read()))
    conn.close()
    return results


async def test_framework_app_end_to_end() -> None:
    events.clear()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            port = await tg.start(serve, make_app(), ServerConfig(port=0))
            assert events == ["startup"]
            results = await anyio.to_thread.run_sync(http_get_many, port, [
                ("GET", "/hello?name=pyserve", None),
                ("POST", "/echo", json.dumps({"a": [1, 2]}).encode()),
                ("GET", "/stream?n=4", None),
                ("HEAD", "/hello", None),
                ("GET", "/missing", None),
                ("POST", "/hello", b"{}"),
            ])
            tg.cancel_scope.cancel()
    hello, echo, stream, head, missing, wrong_method = results
    assert hello[0] == 200 and json.loads(hello[2]) == {"message": "hello, pyserve"}
    assert hello[1]["x-middleware"] == "1"
    assert json.loads(echo[2]) == {"received": {"a": [1, 2]}, "content_type": "application/json"}
    assert stream[1]["transfer-encoding"] == "chunked"
    assert stream[2] == b"".join(f"data: {i}\n\n".encode() for i in range(4))
    assert head[0] == 200 and head[2] == b""  # HEAD: GET's headers, no body
    assert head[1]["content-length"] == str(len(json.dumps({"message": "hello, world"})))
    assert missing[0] == 404 and wrong_method[0] == 405
    assert events == ["startup", "shutdown"]


async def test_framework_startup_failure_surfaces() -> None:
    @asynccontextmanager
    async def broken(app: App) -> AsyncIterator[dict]:
        raise RuntimeError("weights not found")
        yield {}  # pragma: no cover

    from pyserve.http import LifespanError
    with anyio.fail_after(5):
        with pytest.raises(LifespanError, match="weights not found"):
            await serve(App(broken), ServerConfig(port=0))


async def test_framework_stream_stops_when_client_leaves() -> None:
    global stream_stopped
    stream_stopped = anyio.Event()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            port = await tg.start(serve, make_app(), ServerConfig(port=0))
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                await stream.send(b"GET /forever HTTP/1.1\r\nHost: x\r\n\r\n")
                assert b"data: tick" in await stream.receive()
            await stream_stopped.wait()  # the endless generator was closed
            results = await anyio.to_thread.run_sync(http_get_many, port,
                                                     [("GET", "/hello", None)])
            assert results[0][0] == 200
            tg.cancel_scope.cancel()
