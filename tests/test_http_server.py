"""Real-socket tests: serve() on an ephemeral port, raw clients, hostile ones included."""

from __future__ import annotations

import json
import logging
from contextlib import asynccontextmanager, contextmanager
from typing import Any, AsyncIterator, Iterator

import anyio
import h11
import pytest

from pyserve.http import ClientDisconnected, LifespanError, ServerConfig, serve

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# ---- helpers ---------------------------------------------------------------------------------

@asynccontextmanager
async def running(app: Any, **config: Any) -> AsyncIterator[int]:
    """Serve app on an ephemeral port for the duration of the block; stop gracefully after."""
    with anyio.fail_after(10):  # a hung test fails instead of blocking the suite
        async with anyio.create_task_group() as tg:
            port = await tg.start(serve, app, ServerConfig(port=0, **config))
            yield port
            tg.cancel_scope.cancel()


class Client:
    """A raw TCP client that parses responses with an h11 client state machine."""

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)

    @classmethod
    @asynccontextmanager
    async def connect(cls, port: int) -> AsyncIterator["Client"]:
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            yield cls(stream)

    async def request(self, method: str = "GET", path: str = "/", body: bytes = b"",
                      headers: list[tuple[str, str]] | None = None) -> None:
        hdrs = [("Host", "test"), *(headers or [])]
        if body and not any(k.lower() == "content-length" for k, _ in hdrs):
            hdrs.append(("Content-Length", str(len(body))))
        data = self.h11.send(h11.Request(method=method, target=path, headers=hdrs))
        if body:
            data += self.h11.send(h11.Data(data=body))
        data += self.h11.send(h11.EndOfMessage())
        await self.stream.send(data)

    async def _event(self) -> Any:
        while (event := self.h11.next_event()) is h11.NEED_DATA:
            try:
                self.h11.receive_data(await self.stream.receive())
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                self.h11.receive_data(b"")
        return event

    async def response(self) -> tuple[int, dict[bytes, bytes], bytes]:
        event = await self._event()
        while isinstance(event, h11.InformationalResponse):
            event = await self._event()
        assert isinstance(event, h11.Response), event
        body = b""
        while not isinstance(part := await self._event(), h11.EndOfMessage):
            body += part.data
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
        return event.status_code, dict(event.headers), body

    async def get(self, path: str = "/") -> tuple[int, dict[bytes, bytes], bytes]:
        await self.request("GET", path)
        return await self.response()

    async def read_all(self) -> bytes:
        """Everything until the server closes the connection."""
        data = b""
        while True:
            try:
                data += await self.stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return data


async def raw_exchange(port: int, data: bytes, *, eof: bool = False) -> bytes:
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(data)
        if eof:
            await stream.send_eof()
        return await Client(stream).read_all()


def parse_error(raw: bytes, status: int) -> str:
    """The server's own error response (plain text by default); its message."""
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode()), head
    assert b"connection: close" in head.lower()
    assert b"content-type: text/plain; charset=utf-8" in head.lower()
    return body.decode()


async def echo_app(scope: dict, receive: Any, send: Any) -> None:
    """Answers with the method, path, query and body it saw, as JSON."""
    if scope["type"] == "lifespan":
        await lifespan_loop(receive, send)
        return
    body = b""
    while True:
        message = await receive()
        assert message["type"] == "http.request"
        body += message["body"]
        if not message.get("more_body"):
            break
    payload = json.dumps({"method": scope["method"], "path": scope["path"],
                          "query": scope["query_string"].decode(), "body": body.decode(),
                          "client": list(scope["client"]),
                          "state": sorted(scope.get("state", {}))}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": payload})


async def lifespan_loop(receive: Any, send: Any, log: list | None = None) -> None:
    while True:
        message = await receive()
        if log is not None:
            log.append(message["type"])
        await send({"type": message["type"] + ".complete"})
        if message["type"] == "lifespan.shutdown":
            return


@contextmanager
def on_log(substring: str, logger: str = "pyserve.http") -> Iterator[anyio.Event]:
    """An event set when the server logs a line containing substring: a sync point that does
    not depend on scheduling luck."""
    seen = anyio.Event()

    class Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if substring in record.getMessage():
                seen.set()

    handler, log = Handler(), logging.getLogger(logger)
    log.addHandler(handler)
    old_level = log.level
    log.setLevel(logging.DEBUG)
    try:
        yield seen
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)


async def still_serves(port: int) -> None:
    async with Client.connect(port) as client:
        status, _, body = await client.get("/after")
        assert status == 200 and json.loads(body)["path"] == "/after"


# ---- normal traffic ----------------------------------------------------------------------------

async def test_scope_and_keep_alive() -> None:
    seen: list[dict] = []

    async def app(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            seen.append(scope)
        await echo_app(scope, receive, send)

    async with running(app) as port:
        async with Client.connect(port) as client:
            status, headers, body = await client.get("/a%2Fb%20c?q=1")
            assert status == 200 and headers[b"content-type"] == b"application/json"
            assert json.loads(body)["path"] == "/a/b c"
            await client.request("POST", "/echo", b"hello")
            status, _, body = await client.response()
            assert json.loads(body)["body"] == "hello"
    first, second = seen
    assert first["client"] == second["client"]  # same connection
    assert first["asgi"] == {"version": "3.0", "spec_version": "2.3"}
    assert first["raw_path"] == b"/a%2Fb%20c" and first["query_string"] == b"q=1"
    assert first["http_version"] == "1.1" and first["scheme"] == "http"
    assert first["root_path"] == "" and first["server"] == ("127.0.0.1", port)
    assert (b"host", b"test") in first["headers"]


async def test_streaming_response_is_chunked_over_the_wire() -> None:
    async def app(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        for i in range(3):
            await send({"type": "http.response.body", "body": b"data: %d\n\n" % i,
                        "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

    async with running(app) as port:
        async with Client.connect(port) as client:
            status, headers, body = await client.get()
    assert headers[b"transfer-encoding"] == b"chunked"
    assert body == b"data: 0\n\ndata: 1\n\ndata: 2\n\ndata: [DONE]\n\n"


async def test_expect_100_continue_over_sockets() -> None:
    async with running(echo_app) as port:
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                              b"Expect: 100-continue\r\n\r\n")
            interim = await stream.receive()
            assert interim.startswith(b"HTTP/1.1 100 ")
            await stream.send(b"hi")
            client = Client(stream)
            client.h11.send(h11.Request(method="POST", target="/", headers=[("Host", "x")]))
            status, _, body = await client.response()
            assert status == 200 and json.loads(body)["body"] == "hi"


async def test_access_log_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pyserve.access")
    async with running(echo_app) as port:
        async with Client.connect(port) as client:
            await client.get("/logged?x=1")
    (record,) = [r for r in caplog.records if r.name == "pyserve.access"]
    assert '"GET /logged?x=1 HTTP/1.1" 200 ' in record.getMessage()
    assert record.getMessage().endswith("ms")


async def test_access_log_carries_the_apps_extra_fields(caplog: pytest.LogCaptureFixture) -> None:
    async def app(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        scope["extensions"]["pyserve.access_log"]["tokens"] = 42
        scope["extensions"]["pyserve.access_log"]["note"] = 'two words\n"x"'
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    caplog.set_level(logging.INFO, logger="pyserve.access")
    async with running(app) as port:
        async with Client.connect(port) as client:
            await client.get("/x")
    (record,) = [r for r in caplog.records if r.name == "pyserve.access"]
    assert '"GET /x HTTP/1.1" 201 ' in record.getMessage()
    assert record.getMessage().endswith('ms tokens=42 note="two words\\n\\"x\\""')


async def test_access_log_record_is_the_one_logging_would_make(caplog: pytest.LogCaptureFixture) -> None:
    """The access line's record is built from a template (cheaper than logger.info); whatever a
    formatter may read from it must be what logging itself would have put there."""
    import os
    import threading

    caplog.set_level(logging.INFO, logger="pyserve.access")
    async with running(echo_app) as port:
        async with Client.connect(port) as client:
            await client.get("/one")
            await client.get("/two")
    one, two = [r for r in caplog.records if r.name == "pyserve.access"]
    reference = logging.getLogger("pyserve.access").makeRecord("pyserve.access", logging.INFO, "x", 0,
                                                               "m", (), None)
    for record in (one, two):
        assert record.levelno == logging.INFO and record.levelname == "INFO"
        assert record.thread == threading.get_ident() and record.threadName == reference.threadName
        assert record.process == os.getpid() and record.processName == reference.processName
        assert 0 <= reference.created - record.created < 10
        assert record.msecs == int((record.created - int(record.created)) * 1000)
        assert record.exc_info is None and record.stack_info is None
    assert one.created <= two.created and one.relativeCreated <= two.relativeCreated
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s %(thread)d %(process)d: %(message)s")
    assert '"GET /two HTTP/1.1" 200 ' in formatter.format(two)


async def test_keep_alive_when_the_app_never_reads_the_body() -> None:
    """An app may answer without calling receive() (a GET, a 404 for a POST): the body that is
    already here is skipped and the connection carries the next request."""
    async def app(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": scope["path"].encode()})

    async with running(app) as port:
        async with Client.connect(port) as client:
            assert (await client.get("/a"))[2] == b"/a"
            await client.request("POST", "/b", b"ignored body")
            assert (await client.response())[2] == b"/b"
            data = client.h11.send(h11.Request(method="POST", target="/c", headers=[
                ("Host", "x"), ("Transfer-Encoding", "chunked")]))
            data += client.h11.send(h11.Data(data=b"chunked body")) + client.h11.send(h11.EndOfMessage())
            await client.stream.send(data)
            assert (await client.response())[2] == b"/c"
            assert (await client.get("/d"))[2] == b"/d"


async def test_stream_stops_at_the_first_send_after_the_client_left() -> None:
    """No reader runs beside a streaming app that never calls receive(): send() looks at the
    socket itself. A client that half-closes (so writes would still succeed) is noticed at once."""
    left = anyio.Event()
    outcome: dict[str, Any] = {}
    done = anyio.Event()

    async def app(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first", "more_body": True})
        await left.wait()
        try:
            await send({"type": "http.response.body", "body": b"second", "more_body": True})
            outcome["sent"] = True
        except ClientDisconnected:
            outcome["sent"] = False
        done.set()

    async with running(app) as port:
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert b"first" in await stream.receive()
            await stream.send_eof()  # half-close: the server's writes would still go through
            left.set()
            await done.wait()
    assert outcome == {"sent": False}


async def test_request_pipelined_during_a_stream_is_served_after_it() -> None:
    """Bytes that arrive while a response streams (the send-side look at the socket reads them)
    are kept for the next request."""
    go = anyio.Event()

    async def app(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        if scope["path"] == "/stream":
            await send({"type": "http.response.body", "body": b"a", "more_body": True})
            await go.wait()
            await send({"type": "http.response.body", "body": b"b", "more_body": True})
        await send({"type": "http.response.body", "body": scope["path"].encode()})

    async with running(app) as port:
        async with Client.connect(port) as client:
            await client.request("GET", "/stream")
            event = await client._event()
            assert isinstance(event, h11.Response)
            assert (await client._event()).data == b"a"
            await client.stream.send(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
            go.set()
            rest = b""
            while not isinstance(part := await client._event(), h11.EndOfMessage):
                rest += part.data
            assert rest == b"b/stream"
            client.h11.start_next_cycle()
            client.h11.send(h11.Request(method="GET", target="/next", headers=[("Host", "x")]))
            client.h11.send(h11.EndOfMessage())
            assert (await client.response())[2] == b"/next"


# ---- hostile and broken clients ------------------------------------------------------------------

@pytest.mark.parametrize("raw", [
    b"\x00\x01\x02garbage\xff\r\n\r\n",
    b"GET /\r\n\r\n",  # request line without HTTP version
    b"GET / HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n",  # invalid header name
    b"GET / HTTP/1.1\r\nHost: x\r\n:x\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
])
async def test_malformed_requests_get_400_and_server_survives(raw: bytes) -> None:
    async with running(echo_app) as port:
        reply = await raw_exchange(port, raw)
        assert parse_error(reply, 400).startswith("Invalid HTTP request")
        await still_serves(port)


async def test_oversized_headers_get_431() -> None:
    async with running(echo_app, max_header_bytes=1024) as port:
        reply = await raw_exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 4096)
        parse_error(reply, 431)
        await still_serves(port)


async def test_too_many_headers_get_431() -> None:
    async with running(echo_app, max_header_count=10) as port:
        head = b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(20))
        parse_error(await raw_exchange(port, head + b"\r\n"), 431)
        await still_serves(port)


async def test_client_that_stops_reading_blocks_the_app_and_is_dropped_at_write_timeout() -> None:
    """Backpressure: send() waits while the client does not read; nothing piles up in the server
    beyond the socket buffers, and the client is dropped once a write stalls for write_timeout."""
    sent = 0
    failed = anyio.Event()
    chunk = b"x" * 16384

    async def app(scope: dict, receive: Any, send: Any) -> None:
        nonlocal sent
        if scope["type"] != "http" or scope["path"] == "/after":
            await echo_app(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        try:
            while True:  # an endless stream
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                sent += len(chunk)
        except ClientDisconnected:
            failed.set()

    async with running(app, write_timeout=0.5) as port:
        import socket

        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        try:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # ... and never read
            with anyio.fail_after(8):
                await failed.wait()
        finally:
            sock.close()
        # Bounded by kernel and transport buffers (a few MB at most), not by how long it ran.
        assert 0 < sent < 16 * 1024 * 1024
        await still_serves(port)


async def test_oversized_body_gets_413() -> None:
    async with running(echo_app, max_body_bytes=100) as port:
        reply = await raw_exchange(
            port, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"a" * 1000)
        assert "100 bytes" in parse_error(reply, 413)
        chunked = (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                   + (b"40\r\n" + b"a" * 64 + b"\r\n") * 3 + b"0\r\n\r\n")
        parse_error(await raw_exchange(port, chunked), 413)
        await still_serves(port)


async def test_body_shorter_than_content_length_then_close() -> None:
    outcome: list[dict] = []
    done = anyio.Event()

    async def app(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await echo_app(scope, receive, send)
            return
        if scope["path"] == "/after":
            await echo_app(scope, receive, send)
            return
        while (message := await receive())["type"] == "http.request":
            outcome.append(message)
        outcome.append(message)
        done.set()

    async with running(app) as port:
        reply = await raw_exchange(
            port, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nshort", eof=True)
        await done.wait()
        assert outcome[0] == {"type": "http.request", "body": b"short", "more_body": True}
        assert outcome[-1] == {"type": "http.disconnect"}
        assert reply.startswith(b"HTTP/1.1 400 ")  # the half-closed client can still read it
        await still_serves(port)


async def test_silent_client_is_dropped_at_header_timeout() -> None:
    async with running(echo_app, header_timeout=0.3) as port:
        with anyio.fail_after(5):
            # A request line, then nothing: the server closes on its own, without answering.
            assert await raw_exchange(port, b"GET / HTTP/1.1\r\n") == b""
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:  # no bytes at all
                assert await Client(stream).read_all() == b""
        await still_serves(port)


async def test_idle_keep_alive_connection_is_closed() -> None:
    async with running(echo_app, keep_alive_timeout=0.3) as port:
        async with Client.connect(port) as client:
            assert (await client.get())[0] == 200
            with anyio.fail_after(5):
                assert await client.read_all() == b""


async def test_slow_body_is_dropped_at_body_timeout() -> None:
    async with running(echo_app, body_timeout=0.3) as port:
        head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n\r\n"
        reply = await raw_exchange(port, head + b"ab")  # 7 bytes short, and then silence
        assert reply.startswith(b"HTTP/1.1 408 ")
        await still_serves(port)


@pytest.mark.parametrize("head", [
    b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 5\r\n\r\n",
    b"POST / HTTP/1.0\r\nContent-Length: 5\r\n\r\n",
])
async def test_slow_app_after_a_complete_body_is_not_a_body_timeout(head: bytes) -> None:
    """Regression (the 408 stall): with `Connection: close` (urllib, HTTP/1.0 clients) the body
    deadline stayed armed after the whole body had arrived, so any request whose app took longer
    than body_timeout was answered 408 (or, once streaming, cut off as a disconnect)."""
    body_timeout = 0.05

    async def app(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await echo_app(scope, receive, send)
            return
        assert await receive() == {"type": "http.request", "body": b"hello", "more_body": False}
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"a", "more_body": True})
        # The engine is slow: far beyond body_timeout, with the body long since read. (The
        # wait is the subject of the test, not a synchronisation.)
        await anyio.sleep(body_timeout * 10)
        await send({"type": "http.response.body", "body": b"b"})

    async with running(app, body_timeout=body_timeout) as port:
        reply = await raw_exchange(port, head + b"hello")
    assert reply.split(b"\r\n", 1)[0].split(b" ")[1] == b"200", reply
    assert reply.endswith(b"ab") or reply.endswith(b"1\r\nb\r\n0\r\n\r\n"), reply


async def test_pipelined_requests_are_answered_in_order() -> None:
    async with running(echo_app) as port:
        reply = await raw_exchange(port, b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n"
                                         b"GET /2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert reply.index(b'"path": "/1"') < reply.index(b'"path": "/2"')
    assert reply.count(b"HTTP/1.1 200 OK") == 2


async def test_a_pipelining_client_does_not_starve_the_others() -> None:
    """Requests that need no wait (already buffered) still yield between each other: a client
    with hundreds of pipelined requests cannot hold the event loop while another one waits."""
    order: list[str] = []

    async def app(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        order.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    flood = b"".join(b"GET /a%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(300))
    async with running(app) as port:
        async with await anyio.connect_tcp("127.0.0.1", port) as a:
            await a.send(flood)
            async with Client.connect(port) as b:
                assert (await b.get("/b"))[0] == 200
            received = b""
            while received.count(b"HTTP/1.1 200 ") < 300:
                received += await a.receive()
    assert order.index("/b") < order.index("/a299")


# ---- disconnects and app errors ------------------------------------------------------------------

async def test_app_sees_disconnect_while_streaming() -> None:
    result: dict[str, Any] = {}
    done = anyio.Event()

    async def app(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] == "/after":
            await echo_app(scope, receive, send)
            return
        assert (await receive())["more_body"] is False
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first", "more_body": True})
        result["receive"] = await receive()  # blocks until the client goes away
        try:
            await send({"type": "http.response.body", "body": b"more", "more_body": True})
        except OSError as exc:
            result["send"] = exc
        done.set()

    async with running(app) as port:
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert b"first" in await stream.receive()
        await done.wait()  # closing the socket is what releases the app
        assert result["receive"] == {"type": "http.disconnect"}
        assert isinstance(result["send"], ClientDisconnected)
        await still_serves(port)


async def test_receive_after_response_complete_is_disconnect() -> None:
    messages: list[dict] = []

    async def app(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        messages.append(await receive())
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        messages.append(await receive())

    async with running(app) as port:
        async with Client.connect(port) as client:
            assert (await client.get())[0] == 204
            assert (await client.get())[0] == 204  # and keep-alive still works
    assert messages[1] == {"type": "http.disconnect"}


@pytest.mark.parametrize("hook", ["default", "config", "app"])
async def test_app_exception_before_start_is_500(hook: str, caplog: pytest.LogCaptureFixture) -> None:
    """The server's own error bodies: plain text unless ServerConfig.error_body or the app's
    `http_error_body` says otherwise (that is how pyserve's app gets OpenAI-style errors)."""
    def json_body(status: int, message: str) -> tuple[bytes, bytes]:
        return b"application/json", json.dumps({"error": {"message": message, "status": status}}).encode()

    async def app(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/after":
            await echo_app(scope, receive, send)
            return
        raise ValueError("boom")

    config: dict[str, Any] = {}
    if hook == "config":
        config["error_body"] = json_body
    elif hook == "app":
        app.http_error_body = json_body  # type: ignore[attr-defined]
    async with running(app, **config) as port:
        reply = await raw_exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        if hook == "default":
            assert parse_error(reply, 500) == "Internal Server Error"
        else:
            head, _, body = reply.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 500 ") and b"content-type: application/json" in head
            assert json.loads(body) == {"error": {"message": "Internal Server Error", "status": 500}}
        await still_serves(port)
    assert any("boom" in r.getMessage() or (r.exc_info and "boom" in str(r.exc_info[1]))
               for r in caplog.records if r.name == "pyserve.http")


async def test_app_exception_after_start_closes_the_connection() -> None:
    async def app(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"partial", "more_body": True})
        raise ValueError("boom")

    async with running(app) as port:
        reply = await raw_exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200 ") and b"partial" in reply
    assert not reply.endswith(b"0\r\n\r\n")  # no terminating chunk: the client sees truncation


async def test_app_that_returns_once_the_client_left_is_not_an_error(caplog: pytest.LogCaptureFixture) -> None:
    done = anyio.Event()

    async def app(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] == "/after":
            await echo_app(scope, receive, send)
            return
        while (await receive())["type"] != "http.disconnect":
            pass
        done.set()  # and return without a response: nobody is there to read one

    caplog.set_level(logging.DEBUG, logger="pyserve.http")
    async with running(app) as port:
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await done.wait()
        await still_serves(port)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_app_returning_without_response_is_500() -> None:
    async def app(scope: dict, receive: Any, send: Any) -> None:
        return None

    async with running(app) as port:
        reply = await raw_exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 500 ")


# ---- lifespan --------------------------------------------------------------------------------

async def test_lifespan_startup_and_shutdown_and_state() -> None:
    log: list[str] = []

    async def app(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            scope["state"]["engine"] = "ready"
            await lifespan_loop(receive, send, log)
            return
        log.append(f"request state={scope['state'].get('engine')}")
        await echo_app(scope, receive, send)

    async with running(app) as port:
        assert log == ["lifespan.startup"]  # startup finished before the port was reported
        async with Client.connect(port) as client:
            assert (await client.get())[0] == 200
    assert log == ["lifespan.startup", "request state=ready", "lifespan.shutdown"]


async def test_port_in_use_raises_oserror() -> None:
    async with running(echo_app) as port:
        with anyio.fail_after(5), pytest.raises(OSError):
            await serve(echo_app, ServerConfig(port=port))


def test_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="max_body_bytes"):
        ServerConfig(max_body_bytes=0)
    with pytest.raises(ValueError, match="port"):
        ServerConfig(port=70000)


async def test_lifespan_startup_failure_raises() -> None:
    async def app(scope: dict, receive: Any, send: Any) -> None:
        assert scope["type"] == "lifespan"
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "no model"})

    with anyio.fail_after(5):
        with pytest.raises(LifespanError, match="no model"):
            await serve(app, ServerConfig(port=0))


async def test_app_without_lifespan_support_is_served() -> None:
    async def app(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            raise ValueError(f"unsupported scope {scope['type']}")  # what plain apps do
        await echo_app(scope, receive, send)

    async with running(app) as port:
        await still_serves(port)


# ---- stopping and capacity --------------------------------------------------------------------

async def test_graceful_stop_finishes_in_flight_and_closes_idle() -> None:
    arrived, release = anyio.Event(), anyio.Event()
    log: list[str] = []

    async def app(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await lifespan_loop(receive, send, log)
            return
        arrived.set()
        await release.wait()
        log.append("request done")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"finished"})

    with anyio.fail_after(5):  # far below shutdown_timeout: idle connections must not hold us
        async with anyio.create_task_group() as tg:
            server = anyio.CancelScope()

            async def run_server(*, task_status: Any) -> None:
                with server:
                    await serve(app, ServerConfig(port=0, shutdown_timeout=30),
                                task_status=task_status)

            port = await tg.start(run_server)
            idle = await anyio.connect_tcp("127.0.0.1", port)  # never sends a request
            async with Client.connect(port) as client:
                await client.request()
                await arrived.wait()
                with on_log("Waiting up to") as draining:
                    server.cancel()  # stop while the request is in flight
                    await draining.wait()  # logged once the listener is closed
                with pytest.raises(OSError):  # not accepting any more
                    await anyio.connect_tcp("127.0.0.1", port)
                assert log == ["lifespan.startup"]  # shutdown waits for the request
                release.set()
                status, _, body = await client.response()
                assert (status, body) == (200, b"finished")
            assert await Client(idle).read_all() == b""
            await idle.aclose()
    assert log == ["lifespan.startup", "request done", "lifespan.shutdown"]


async def test_stop_cancels_requests_that_outlive_shutdown_timeout() -> None:
    arrived, cancelled = anyio.Event(), anyio.Event()

    async def app(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        arrived.set()
        try:
            await anyio.sleep_forever()
        finally:
            cancelled.set()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            port = await tg.start(serve, app, ServerConfig(port=0, shutdown_timeout=0.2))
            async with Client.connect(port) as client:
                await client.request()
                await arrived.wait()
                tg.cancel_scope.cancel()
        assert cancelled.is_set()


async def test_max_connections_makes_extra_clients_wait() -> None:
    async with running(echo_app, max_connections=1) as port:
        async with Client.connect(port) as first:
            assert (await first.get())[0] == 200
            async with Client.connect(port) as second:  # TCP-connected, but not yet accepted
                await second.request()
                with anyio.move_on_after(0.2) as waited:
                    await second.response()
                assert waited.cancelled_caught
                await first.stream.aclose()  # frees the slot
                assert (await second.response())[0] == 200
