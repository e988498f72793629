"""pyserve's HTTP server serving a real third-party ASGI app: Starlette (a test-only dependency),
lifespan and lifespan state included, exercised with the stdlib's http.client."""

from __future__ import annotations

import http.client
import json
from contextlib import asynccontextmanager
from typing import AsyncIterator

import anyio
import pytest

from pyserve.http import LifespanError, ServerConfig, serve

starlette = pytest.importorskip("starlette")

from starlette.applications import Starlette  # noqa: E402
from starlette.background import BackgroundTask  # noqa: E402
from starlette.exceptions import HTTPException  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def make_app(events: list[str], fail_startup: bool = False) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict]:
        events.append("startup")
        if fail_startup:
            raise RuntimeError("no database")
        yield {"greeting": "hello from lifespan"}
        events.append("shutdown")

    async def index(request: Request) -> JSONResponse:
        return JSONResponse({"greeting": request.state.greeting, "query": dict(request.query_params),
                             "path": request.url.path})

    async def echo(request: Request) -> JSONResponse:
        body = await request.body()
        task = BackgroundTask(events.append, f"background {len(body)}")
        return JSONResponse({"length": len(body), "json": await request.json()}, background=task)

    async def stream(request: Request) -> StreamingResponse:
        async def numbers() -> AsyncIterator[str]:
            for i in range(5):
                yield f"data: {i}\n\n"
                await anyio.sleep(0)

        return StreamingResponse(numbers(), media_type="text/event-stream")

    async def missing(request: Request) -> None:
        raise HTTPException(status_code=404, detail="nothing here")

    async def crash(request: Request) -> None:
        raise ValueError("bug in the app")

    async def item(request: Request) -> PlainTextResponse:
        return PlainTextResponse(f"item {request.path_params['item_id']}")

    return Starlette(
        routes=[
            Route("/", index),
            Route("/echo", echo, methods=["POST"]),
            Route("/stream", stream),
            Route("/missing", missing),
            Route("/crash", crash),
            Route("/items/{item_id:int}", item),
        ],
        lifespan=lifespan,
    )


def fetch(port: int, requests: list[tuple[str, str, bytes | None]]) -> list[tuple[int, dict, bytes]]:
    """Runs requests on one keep-alive connection (blocking; call it in a worker thread)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    out = []
    try:
        for method, path, body in requests:
            conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
            resp = conn.getresponse()
            out.append((resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()))
    finally:
        conn.close()
    return out


async def test_starlette_app_with_lifespan_state_streaming_and_errors() -> None:
    events: list[str] = []
    app = make_app(events)
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            port = await tg.start(serve, app, ServerConfig(port=0))
            assert events == ["startup"]
            replies = await anyio.to_thread.run_sync(fetch, port, [
                ("GET", "/?a=1", None),
                ("POST", "/echo", json.dumps({"x": [1, 2]}).encode()),
                ("GET", "/stream", None),
                ("GET", "/missing", None),
                ("GET", "/items/42", None),
                ("GET", "/items/abc", None),
                ("DELETE", "/echo", None),
            ])
            crashed = await anyio.to_thread.run_sync(fetch, port, [("GET", "/crash", None)])
            after = await anyio.to_thread.run_sync(fetch, port, [("GET", "/", None)])
            tg.cancel_scope.cancel()
    index, echo, stream, missing, item, bad_item, wrong_method = replies
    assert index[0] == 200 and json.loads(index[2]) == {"greeting": "hello from lifespan", "query": {"a": "1"},
                                                        "path": "/"}
    assert echo[0] == 200 and json.loads(echo[2]) == {"length": 13, "json": {"x": [1, 2]}}
    assert stream[0] == 200 and stream[1]["transfer-encoding"] == "chunked"
    assert stream[2] == b"".join(b"data: %d\n\n" % i for i in range(5))
    assert (missing[0], missing[2]) == (404, b"nothing here")
    assert item == (200, item[1], b"item 42") and bad_item[0] == 404
    assert wrong_method[0] == 405
    assert crashed[0][0] == 500  # the app's bug: a 500, and the server lives on
    assert after[0][0] == 200
    assert "background 13" in events
    assert events[0] == "startup" and events[-1] == "shutdown"


async def test_starlette_startup_failure_stops_the_server() -> None:
    events: list[str] = []
    with anyio.fail_after(10):
        with pytest.raises(LifespanError, match="no database"):
            await serve(make_app(events, fail_startup=True), ServerConfig(port=0))
    assert events == ["startup"]


async def test_starlette_stream_stops_when_the_client_leaves() -> None:
    produced: list[int] = []
    finished = anyio.Event()

    async def endless(request: Request) -> StreamingResponse:
        async def gen() -> AsyncIterator[bytes]:
            try:
                i = 0
                while True:
                    produced.append(i)
                    yield b"x" * 1024
                    i += 1
                    await anyio.sleep(0.001)
            finally:
                finished.set()

        return StreamingResponse(gen())

    app = Starlette(routes=[Route("/", endless)])
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            port = await tg.start(serve, app, ServerConfig(port=0))
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                await stream.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                assert (await stream.receive()).startswith(b"HTTP/1.1 200 ")
            await finished.wait()  # the generator was closed once the client left
            tg.cancel_scope.cancel()
    assert produced
