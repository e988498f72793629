"""Sans-IO tests: the server core joined to an h11 client through an in-memory link (no sockets)."""

from __future__ import annotations

import json
from typing import Any

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyserve.http.connection import Body, Closed, HTTPConnection, Rejected, RequestStarted


class Link:
    """A server core and an h11 client; bytes pass between them by method call."""

    def __init__(self, **limits: Any) -> None:
        self.server = HTTPConnection(**limits)
        self.client = h11.Connection(h11.CLIENT)

    def client_send(self, *events: h11.Event) -> None:
        for event in events:
            data = self.client.send(event)
            if data:
                self.server.receive_data(data)

    def raw(self, data: bytes) -> None:
        self.server.receive_data(data)

    def server_events(self) -> list:
        events = []
        while (event := self.server.next_event()) is not None:
            events.append(event)
            if isinstance(event, (Rejected, Closed)):
                break
        return events

    def respond(self, *messages: dict) -> bytes:
        out = b"".join(self.server.send(m) for m in messages)
        self.client.receive_data(out)
        return out

    def client_events(self) -> list:
        events = []
        while True:
            event = self.client.next_event()
            if event in (h11.NEED_DATA, h11.PAUSED):
                return events
            events.append(event)
            if isinstance(event, h11.ConnectionClosed):
                return events


def get(target: str = "/", method: str = "GET", headers: list | None = None) -> h11.Request:
    return h11.Request(method=method, target=target, headers=[("Host", "x"), *(headers or [])])


def start(status: int = 200, headers: list | None = None) -> dict:
    return {"type": "http.response.start", "status": status, "headers": headers or []}


def body(data: bytes = b"", more: bool = False) -> dict:
    return {"type": "http.response.body", "body": data, "more_body": more}


def response_of(events: list) -> tuple[h11.Response, bytes]:
    resp = next(e for e in events if isinstance(e, h11.Response))
    return resp, b"".join(bytes(e.data) for e in events if isinstance(e, h11.Data))


def test_simple_get_scope_pieces_and_response() -> None:
    link = Link()
    link.client_send(get("/a%20b/c?x=1&y=%20", headers=[("X-Thing", "Yes")]), h11.EndOfMessage())
    req, end = link.server_events()
    assert req == RequestStarted(method="GET", path="/a b/c", raw_path=b"/a%20b/c",
                                 query_string=b"x=1&y=%20",
                                 headers=[(b"host", b"x"), (b"x-thing", b"Yes")],
                                 http_version="1.1")
    assert end == Body(b"", more_body=False)
    link.respond(start(200, [(b"Content-Type", b"text/plain")]), body(b"hello"))
    resp, data = response_of(events := link.client_events())
    assert resp.status_code == 200 and resp.reason == b"OK"
    assert (b"content-length", b"5") in resp.headers  # one body message: length, not chunked
    assert (b"content-type", b"text/plain") in resp.headers
    assert data == b"hello" and isinstance(events[-1], h11.EndOfMessage)
    assert link.server.response_complete and link.server.status == 200


def test_post_body_arrives_as_one_message_when_buffered() -> None:
    link = Link()
    link.client_send(get("/p", "POST", [("Content-Length", "5")]), h11.Data(data=b"hello"),
                     h11.EndOfMessage())
    events = link.server_events()
    assert events[1:] == [Body(b"hello", more_body=False)]


def test_body_split_across_reads() -> None:
    link = Link()
    link.client_send(get("/p", "POST", [("Content-Length", "5")]), h11.Data(data=b"he"))
    assert link.server_events()[1:] == [Body(b"he", more_body=True)]
    link.client_send(h11.Data(data=b"llo"), h11.EndOfMessage())
    assert link.server_events() == [Body(b"llo", more_body=False)]


def test_chunked_request_body() -> None:
    link = Link()
    link.client_send(get("/p", "POST", [("Transfer-Encoding", "chunked")]),
                     h11.Data(data=b"ab"), h11.Data(data=b"cd"))
    assert link.server_events()[1:] == [Body(b"abcd", more_body=True)]
    link.client_send(h11.Data(data=b"ef"), h11.EndOfMessage())
    assert link.server_events() == [Body(b"ef", more_body=False)]


def test_keep_alive_two_requests() -> None:
    link = Link()
    for path in ("/one", "/two"):
        link.client_send(get(path), h11.EndOfMessage())
        events = link.server_events()
        assert events[0].path == path
        link.respond(start(), body(path.encode()))
        assert response_of(link.client_events())[1] == path.encode()
        assert link.server.start_next_cycle()
        link.client.start_next_cycle()
    assert link.server.status is None  # per-cycle state reset


def test_pipelined_requests_wait_for_their_turn() -> None:
    link = Link()
    link.raw(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\n")
    first = link.server_events()
    assert [type(e) for e in first] == [RequestStarted, Body] and first[0].path == "/1"
    assert link.server.buffered_bytes > 0  # /2 is parked until /1 is answered
    link.respond(start(), body(b"1"))
    assert link.server.start_next_cycle()
    second = link.server_events()
    assert second[0].path == "/2" and second[1] == Body(b"", more_body=False)


def test_streaming_response_uses_chunked_encoding() -> None:
    link = Link()
    link.client_send(get(), h11.EndOfMessage())
    link.server_events()
    wire = link.respond(start(200, [(b"content-type", b"text/event-stream")]),
                        body(b"data: 1\n\n", more=True), body(b"data: 2\n\n", more=True), body())
    resp, data = response_of(link.client_events())
    assert (b"transfer-encoding", b"chunked") in resp.headers
    assert not any(k == b"content-length" for k, _ in resp.headers)
    assert data == b"data: 1\n\ndata: 2\n\n"
    assert wire.endswith(b"0\r\n\r\n")
    assert link.server.start_next_cycle()  # chunked framing keeps the connection reusable


def test_http10_streaming_response_is_close_delimited() -> None:
    link = Link()
    link.raw(b"GET / HTTP/1.0\r\n\r\n")
    assert link.server_events()[0].http_version == "1.0"
    wire = link.server.send(start()) + link.server.send(body(b"a", more=True))
    wire += link.server.send(body(b"b"))
    head = wire.split(b"\r\n\r\n")[0].lower()
    assert b"connection: close" in head and b"chunked" not in head
    assert wire.endswith(b"\r\n\r\nab")
    assert not link.server.start_next_cycle()


def test_expect_100_continue() -> None:
    link = Link()
    link.client_send(get("/p", "POST", [("Content-Length", "3"), ("Expect", "100-continue")]))
    assert [type(e) for e in link.server_events()] == [RequestStarted]
    link.client.receive_data(link.server.send_continue())
    (info,) = link.client_events()
    assert isinstance(info, h11.InformationalResponse) and info.status_code == 100
    assert link.server.send_continue() == b""  # only once
    link.client_send(h11.Data(data=b"abc"), h11.EndOfMessage())
    assert link.server_events() == [Body(b"abc", more_body=False)]


def test_no_100_continue_without_expect_or_after_response() -> None:
    link = Link()
    link.client_send(get(), h11.EndOfMessage())
    link.server_events()
    assert link.server.send_continue() == b""
    link2 = Link()
    link2.client_send(get("/p", "POST", [("Content-Length", "3"), ("Expect", "100-continue")]))
    link2.server_events()
    link2.respond(start(417), body(b"no"))  # answered without reading the body
    assert link2.server.send_continue() == b""
    assert not link2.server.start_next_cycle()  # unread body: the connection cannot be reused


@pytest.mark.parametrize("more", [False, True])
def test_head_response_has_headers_but_no_body(more: bool) -> None:
    link = Link()
    link.client_send(get("/", "HEAD"), h11.EndOfMessage())
    assert link.server_events()[0].method == "HEAD"
    messages = [start(), body(b"hello", more=True), body()] if more else [start(), body(b"hello")]
    wire = link.respond(*messages)
    assert wire.endswith(b"\r\n\r\n")  # nothing after the head
    resp, data = response_of(link.client_events())
    assert data == b""
    if not more:
        assert (b"content-length", b"5") in resp.headers  # what GET would have said
    assert link.server.start_next_cycle()


def test_no_content_length_added_to_204() -> None:
    link = Link()
    link.client_send(get(), h11.EndOfMessage())
    link.server_events()
    wire = link.respond(start(204), body())
    assert b"content-length" not in wire.lower()


def assert_error(wire: bytes, status: int) -> str:
    """A complete error response that closes the connection; its (plain text) message."""
    client = h11.Connection(h11.CLIENT)
    client.send(get())  # the client state machine needs to have sent something
    client.receive_data(wire)
    resp = client.next_event()
    assert isinstance(resp, h11.Response) and resp.status_code == status
    headers = dict(resp.headers)
    assert headers[b"content-type"] == b"text/plain; charset=utf-8"  # the neutral default
    assert headers[b"connection"] == b"close"
    data = b""
    while isinstance(event := client.next_event(), h11.Data):
        data += event.data
    assert isinstance(event, h11.EndOfMessage)
    return data.decode()


def test_error_body_comes_from_the_hook() -> None:
    """The core knows no error format: whoever builds it (the app, through the server) does."""
    seen = []

    def error_body(status: int, message: str) -> tuple[bytes, bytes]:
        seen.append((status, message))
        return b"application/json", json.dumps({"error": {"message": message}}).encode()

    link = Link(error_body=error_body)
    link.raw(b"GET /\r\n\r\n")
    (event,) = link.server_events()
    wire = link.server.error_response(event.status, event.message)
    head, _, body = wire.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"content-type: application/json" in head and b"content-length: %d" % len(body) in head
    assert json.loads(body) == {"error": {"message": event.message}}
    assert seen == [(400, event.message)]


@pytest.mark.parametrize("raw", [
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n",  # a TLS hello
    b"GET /\r\n\r\n",  # no HTTP version
    b"GET / HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n",  # space in a header name
    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
])
def test_malformed_request_is_400(raw: bytes) -> None:
    link = Link()
    link.raw(raw)
    (event,) = link.server_events()
    assert isinstance(event, Rejected) and event.status == 400
    message = assert_error(link.server.error_response(event.status, event.message), 400)
    assert message.startswith("Invalid HTTP request")
    assert link.server.next_event() == event  # sticky
    assert not link.server.start_next_cycle()


def test_unsupported_transfer_encoding_is_501() -> None:
    link = Link()
    link.raw(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n")
    (event,) = link.server_events()
    assert event.status == 501


def test_oversized_headers_are_431() -> None:
    link = Link(max_header_bytes=1024)
    link.raw(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 2000)  # head still incomplete
    (event,) = link.server_events()
    assert event == Rejected(431, "Request header fields too large")
    assert_error(link.server.error_response(event.status, event.message), 431)


def test_oversized_head_that_arrives_whole_is_431() -> None:
    link = Link(max_header_bytes=1024)
    link.raw(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 2000 + b"\r\n\r\n")  # complete at once
    (event,) = link.server_events()
    assert event == Rejected(431, "Request header fields too large")
    link = Link(max_header_bytes=1024)
    link.raw(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 900 + b"\r\n\r\n")
    assert isinstance(link.server_events()[0], RequestStarted)


def test_too_many_header_fields_are_431() -> None:
    link = Link(max_header_count=5)
    link.client_send(get(headers=[(f"X-{i}", "v") for i in range(4)]), h11.EndOfMessage())  # 5 with Host
    assert isinstance(link.server_events()[0], RequestStarted)
    link = Link(max_header_count=5)
    link.client_send(get(headers=[(f"X-{i}", "v") for i in range(5)]))
    (event,) = link.server_events()
    assert event == Rejected(431, "Too many request header fields: the limit is 5")
    assert_error(link.server.error_response(event.status, event.message), 431)


def test_oversized_body_by_content_length_is_413_before_the_app_sees_it() -> None:
    link = Link(max_body_bytes=10)
    link.client_send(get("/p", "POST", [("Content-Length", "11")]))
    (event,) = link.server_events()
    assert isinstance(event, Rejected) and event.status == 413 and "10 bytes" in event.message
    assert_error(link.server.error_response(event.status, event.message), 413)


def test_oversized_chunked_body_is_413_once_the_limit_is_crossed() -> None:
    link = Link(max_body_bytes=10)
    link.client_send(get("/p", "POST", [("Transfer-Encoding", "chunked")]), h11.Data(data=b"x" * 6))
    assert link.server_events()[1:] == [Body(b"x" * 6, more_body=True)]
    link.client_send(h11.Data(data=b"x" * 6))
    (event,) = link.server_events()
    assert isinstance(event, Rejected) and event.status == 413


def test_eof_mid_body_delivers_data_then_400() -> None:
    link = Link()
    link.client_send(get("/p", "POST", [("Content-Length", "10")]), h11.Data(data=b"abc"))
    link.raw(b"")  # EOF
    events = link.server_events()
    assert events[1] == Body(b"abc", more_body=True)
    assert isinstance(events[2], Rejected) and events[2].status == 400


def test_eof_between_requests_is_closed() -> None:
    link = Link()
    link.raw(b"")
    assert link.server_events() == [Closed()]
    link2 = Link()
    link2.client_send(get(), h11.EndOfMessage())
    link2.server_events()
    link2.raw(b"")  # client left while we were responding
    assert link2.server_events() == [Closed()]


def test_client_connection_close_ends_keep_alive() -> None:
    link = Link()
    link.client_send(get(headers=[("Connection", "close")]), h11.EndOfMessage())
    link.server_events()
    wire = link.respond(start(), body(b"x"))
    assert b"connection: close" in wire.lower()
    assert not link.server.start_next_cycle()


def test_app_errors_in_send_sequence() -> None:
    link = Link()
    link.client_send(get(), h11.EndOfMessage())
    link.server_events()
    with pytest.raises(RuntimeError):
        link.server.send(body(b"x"))  # body before start
    with pytest.raises(ValueError):
        link.server.send(start(200, [(b"bad header", b"x")]))  # rejected before anything is out
    with pytest.raises(ValueError):
        link.server.send(start(200, [(b"x-split", b"a\r\nx-injected: 1")]))
    with pytest.raises(ValueError):
        link.server.send(start(99))
    assert not link.server.response_started
    assert assert_error(link.server.error_response(500, "Internal Server Error"), 500) == (
        "Internal Server Error")
    with pytest.raises(RuntimeError):
        link.server.send(start())  # a response was already sent
    with pytest.raises(RuntimeError):
        link.server.send({"type": "websocket.accept"})


def test_error_response_is_empty_once_the_app_response_is_under_way() -> None:
    link = Link()
    link.client_send(get(), h11.EndOfMessage())
    link.server_events()
    link.server.send(start())
    link.server.send(body(b"partial", more=True))
    assert link.server.error_response(500, "Internal Server Error") == b""


# ---- fuzzing ---------------------------------------------------------------------------------

@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=1, max_value=50))
def test_fuzz_arbitrary_bytes_never_crash(data: bytes, step: int) -> None:
    core = HTTPConnection(max_body_bytes=64, max_header_bytes=256)
    for i in range(0, len(data), step):
        core.receive_data(data[i:i + step])
        while (event := core.next_event()) is not None:
            assert isinstance(event, (RequestStarted, Body, Rejected, Closed))
            if isinstance(event, Closed):
                return
            if isinstance(event, Rejected):
                assert event.status in (400, 413, 431, 501)
                assert core.error_response(event.status, event.message)
                return


_REQUEST = (b"POST /x?y=1 HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(_REQUEST)), max_size=8))
def test_fuzz_any_split_gives_the_same_request(cuts: list[int]) -> None:
    core = HTTPConnection()
    bounds = [0, *sorted(cuts), len(_REQUEST)]
    events = []
    for a, b in zip(bounds, bounds[1:]):
        if a == b:
            continue  # b"" would mean EOF
        core.receive_data(_REQUEST[a:b])
        while (event := core.next_event()) is not None:
            events.append(event)
    assert isinstance(events[0], RequestStarted) and events[0].query_string == b"y=1"
    assert b"".join(e.data for e in events[1:]) == b"abcde"
    assert [e.more_body for e in events[1:]][-1] is False
    assert all(e.more_body for e in events[1:-1])


@pytest.mark.parametrize("head", [
    b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 2\r\n\r\n",
    b"POST / HTTP/1.0\r\nContent-Length: 2\r\n\r\n",
])
def test_request_is_complete_after_its_body_even_when_the_client_asked_to_close(head: bytes) -> None:
    """Regression (408 stall): h11 moves a client that sent `Connection: close` (or HTTP/1.0)
    from DONE to MUST_CLOSE at the end of its request. The body is complete all the same: the
    server must not keep waiting for body bytes (and time out with 408) while the app works."""
    link = Link()
    link.raw(head + b"hi")
    events = link.server_events()
    assert events[-1] == Body(b"hi", more_body=False)
    assert link.server.request_complete


# The fast path (whole plain requests parsed without h11) must agree with h11 on everything:
# the same bytes fed whole (fast path eligible) or with their first byte alone (h11 from the
# start) give the same events, rejections included.
_METHODS = st.sampled_from([b"GET", b"POST", b"HEAD", b"PUT", b"get", b"G@T", b"CONNECT"])
_TARGETS = st.sampled_from([b"/", b"/v1/models", b"/a%2Fb%20c?q=1&r", b"http://h/x?y", b"*",
                            b"/sp ace", b"/\xff", b""])
_VERSIONS = st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1 ", b"http/1.1"])
_HEADERS = st.sampled_from([
    b"Host: h", b"Host: h", b"host:h", b"Host: other", b"X-A: 1", b"X-A:   padded  ", b"X-Empty:",
    b"Content-Length: 3", b"Content-Length: 0", b"Content-Length: 5", b"content-length:3",
    b"Content-Length: 3, 3", b"Content-Length: +3", b"Content-Length: 99999999999999999999999",
    b"Transfer-Encoding: chunked", b"Transfer-Encoding: gzip", b"Connection: close",
    b"Connection: keep-alive, Close", b"Expect: 100-continue", b"Bad Header: 1", b" folded",
    b"\tfolded", b"X-Bin: \xc3\xa9t\xe9", b"X-Ctl: a\x01b", b"X-Nul: a\x00b", b":empty",
    b"X-Tab:\tv\t", b"NoColon", b"X-Bare-LF: a\nb", b"Upgrade: websocket",
])
_BODIES = st.sampled_from([b"", b"abc", b"ab", b"abcdef", b"3\r\nabc\r\n0\r\n\r\n"])


@settings(max_examples=400, deadline=None)
@given(_METHODS, _TARGETS, _VERSIONS, st.lists(_HEADERS, max_size=6), _BODIES, st.booleans())
def test_fuzz_fast_path_agrees_with_h11(method: bytes, target: bytes, version: bytes,
                                        headers: list[bytes], body: bytes, eof: bool) -> None:
    raw = method + b" " + target + b" " + version + b"\r\n" + b"".join(
        h + b"\r\n" for h in headers) + b"\r\n" + body

    def events(pieces: list[bytes]) -> list:
        core = HTTPConnection(max_body_bytes=4, max_header_bytes=200, max_header_count=5)
        out: list = []
        for piece in [*pieces, *([b""] if eof else [])]:
            core.receive_data(piece)
            while (event := core.next_event()) is not None:
                out.append(event)
                if isinstance(event, (Rejected, Closed)):
                    return out
        return out

    whole, split = events([raw]), events([raw[:1], raw[1:]])
    # h11 hands a body that arrived with its head as it comes; the fast path as one piece.
    def merged(evs: list) -> list:
        out: list = []
        for e in evs:
            if out and isinstance(e, Body) and isinstance(out[-1], Body) and out[-1].more_body:
                out[-1] = Body(out[-1].data + e.data, e.more_body)
            else:
                out.append(e)
        return out
    assert merged(whole) == merged(split)


def test_fast_path_takes_plain_requests_and_h11_the_rest() -> None:
    core = HTTPConnection()
    core.receive_data(b"POST /p?q HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nhi"
                      b"GET /2 HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    started = core.next_event()
    assert isinstance(started, RequestStarted) and core._h11 is None  # the fast path read it
    assert started.headers == [(b"host", b"h"), (b"content-length", b"2")]
    assert core.next_event() == Body(b"hi", False) and core.request_complete
    assert core.next_event() is None  # the next request waits for its turn
    core.send(start())
    core.send(body(b"ok"))
    assert core.start_next_cycle()
    assert isinstance(core.next_event(), RequestStarted) and core._h11 is not None  # chunked: h11
    assert core.next_event() == Body(b"", False)
