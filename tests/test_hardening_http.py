"""Hostile and broken HTTP clients against the full app on the default model, over raw sockets.

After each one a normal generation request on a new connection must still succeed, and no engine
resources may be left behind (checked through /metrics). Limits are set small here so the tests
are quick: 1 s header timeout, 1 s keep-alive, 64 KiB bodies, 8 KiB heads, 30 header fields.
"""

from __future__ import annotations

import json
import select
import socket
import time

import pytest

from live_server import Reader, connect, make_app, metrics, pyserve_server, request, send_request, wait_idle

HEADER_TIMEOUT = 1.0
KEEP_ALIVE_TIMEOUT = 1.0
MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def server():
    app = make_app(app_options={"max_body_bytes": MAX_BODY})
    with pyserve_server(app, header_timeout=HEADER_TIMEOUT, keep_alive_timeout=KEEP_ALIVE_TIMEOUT,
                        body_timeout=2.0, max_body_bytes=MAX_BODY, max_header_bytes=8192,
                        max_header_count=30) as srv:
        yield srv


COMPLETION = json.dumps({"prompt": "The capital of France is", "max_tokens": 3, "temperature": 0}).encode()


def assert_still_serves(url: str) -> None:
    status, _, body = request(url, "POST", "/v1/completions", COMPLETION)
    assert status == 200, body
    assert json.loads(body)["usage"]["completion_tokens"] >= 1
    wait_idle(url)


def exchange(url: str, data: bytes, *, half_close: bool = False) -> bytes:
    """Sends raw bytes; returns everything the server sends until it closes."""
    with connect(url, timeout=10) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        out = b""
        try:
            while chunk := sock.recv(65536):
                out += chunk
        except ConnectionResetError:
            pass
        return out


def json_error(reply: bytes, status: int) -> dict:
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode()), reply[:200]
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"\x00\x01\x02garbage\xff\r\n\r\n", id="garbage"),
        pytest.param(b"GET /v1/models\r\n\r\n", id="no-http-version"),
        pytest.param(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n", id="space-in-header-name"),
        pytest.param(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n:x\r\n\r\n", id="empty-header-name"),
        pytest.param(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX\x01Y: 1\r\n\r\n", id="control-char-in-name"),
        pytest.param(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
                     id="duplicate-content-length"),
        pytest.param(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", id="content-length-and-chunked"),
        pytest.param(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", id="negative-length"),
        pytest.param(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                     id="bad-chunk-size"),
        pytest.param(b"GET /v1/models HTTP/1.1\r\n\r\n", id="no-host"),
    ],
)
def test_malformed_requests_get_400_and_the_server_keeps_serving(server, raw: bytes) -> None:
    reply = exchange(server.url, raw)
    json_error(reply, 400)
    assert b"connection: close" in reply.lower()
    assert_still_serves(server.url)


def test_chunked_request_body(server) -> None:
    body = COMPLETION
    pieces = [body[i:i + 7] for i in range(0, len(body), 7)]
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    with connect(server.url) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        for i in range(0, len(chunked), 16):  # in separate packets, too
            sock.sendall(chunked[i:i + 16])
        status, _, reply = Reader(sock).response()
    assert status == 200 and json.loads(reply)["object"] == "text_completion"
    assert_still_serves(server.url)


def test_pipelined_requests_are_answered_in_order(server) -> None:
    one = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"Content-Length: %d\r\n\r\n%s" % (len(COMPLETION), COMPLETION))
    two = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
    three = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    with connect(server.url) as sock:
        sock.sendall(one + two + three)
        reader = Reader(sock)
        replies = [reader.response() for _ in range(3)]
    assert [r[0] for r in replies] == [200, 200, 200]
    assert json.loads(replies[0][2])["object"] == "text_completion"
    assert json.loads(replies[1][2])["object"] == "list"
    assert json.loads(replies[2][2]) == {"status": "ok"}
    assert_still_serves(server.url)


def test_body_shorter_than_content_length_then_close(server) -> None:
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n"
    reply = exchange(server.url, head + COMPLETION[:20], half_close=True)
    assert reply == b"" or reply.startswith(b"HTTP/1.1 400 ")  # nothing to answer, or a clean 400
    m = wait_idle(server.url)
    assert m["pyserve:num_requests_pending"] == 0
    assert_still_serves(server.url)


def test_expect_100_continue(server) -> None:
    with connect(server.url) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(COMPLETION))
        f = sock.makefile("rb")
        assert f.readline().startswith(b"HTTP/1.1 100 ")
        assert f.readline() == b"\r\n"
        sock.sendall(COMPLETION)
        status, headers = _head(f)
        assert status == 200
        assert json.loads(f.read(int(headers["content-length"])))["object"] == "text_completion"
    assert_still_serves(server.url)


def _head(f) -> tuple[int, dict]:
    status = int(f.readline().split()[1])
    headers = {}
    while (line := f.readline()) not in (b"\r\n", b""):
        k, _, v = line.decode().partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers


def test_expect_100_continue_refused_without_reading_the_body(server) -> None:
    """An oversized body announced with Expect: 100-continue is refused before it is sent."""
    reply = exchange(server.url, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                                 b"Content-Length: %d\r\n\r\n" % (MAX_BODY + 1))
    assert b"100 Continue" not in reply
    json_error(reply, 413)
    assert_still_serves(server.url)


def closed_by_server(sock: socket.socket, wait: float) -> bool:
    """True if the server closed the connection within `wait` seconds (EOF or reset)."""
    readable, _, _ = select.select([sock], [], [], wait)
    if not readable:
        return False
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True


def test_header_dribbled_one_byte_per_interval_is_dropped_at_the_header_timeout(server) -> None:
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 10\r\n\r\n"
    interval = HEADER_TIMEOUT / 5
    with connect(server.url) as sock:
        started = time.monotonic()
        sent = 0
        dropped = False
        while sent < len(head):
            try:
                sock.sendall(head[sent:sent + 1])
            except (BrokenPipeError, ConnectionResetError):
                dropped = True
                break
            sent += 1
            if closed_by_server(sock, interval):  # doubles as the pause between bytes
                dropped = True
                break
        elapsed = time.monotonic() - started
    assert dropped, "the server waited for the whole dribbled head"
    assert sent < len(head)
    assert elapsed >= HEADER_TIMEOUT * 0.9  # not before the timeout
    assert metrics(server.url)["pyserve:num_requests_pending"] == 0
    assert_still_serves(server.url)


def test_silent_and_slow_connections_do_not_block_others(server) -> None:
    idle = [connect(server.url) for _ in range(3)]  # connect and say nothing
    partial = connect(server.url)
    partial.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # half a head
    try:
        assert_still_serves(server.url)  # served meanwhile
        for sock in [*idle, partial]:
            assert closed_by_server(sock, HEADER_TIMEOUT + 5)
    finally:
        for sock in [*idle, partial]:
            sock.close()


def test_idle_keep_alive_connection_is_closed(server) -> None:
    with connect(server.url) as sock:
        send_request(sock, "GET", "/v1/models")
        assert Reader(sock).response()[0] == 200
        assert closed_by_server(sock, KEEP_ALIVE_TIMEOUT + 5)


def test_oversized_head_and_too_many_headers_get_431(server) -> None:
    reply = exchange(server.url, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 10000 + b"\r\n\r\n")
    json_error(reply, 431)
    many = b"".join(b"X-%d: v\r\n" % i for i in range(40))
    reply = exchange(server.url, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
    json_error(reply, 431)
    assert_still_serves(server.url)


def test_oversized_body_gets_413(server) -> None:
    big = json.dumps({"prompt": "x" * (MAX_BODY + 10), "max_tokens": 1}).encode()
    status, _, body = request(server.url, "POST", "/v1/completions", big)
    assert status == 413 and json.loads(body)["error"]["message"]
    chunked = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
               + (b"4000\r\n" + b"a" * 0x4000 + b"\r\n") * 5 + b"0\r\n\r\n")
    json_error(exchange(server.url, chunked), 413)
    assert_still_serves(server.url)


def test_head_request_gets_the_head_only(server) -> None:
    with connect(server.url) as sock:
        send_request(sock, "HEAD", "/health")
        send_request(sock, "GET", "/health", headers={"Connection": "close"})  # framing intact after it
        f = sock.makefile("rb")
        status, headers = _head(f)
        assert status == 200 and int(headers["content-length"]) > 0
        status, headers = _head(f)  # the next response starts right away: HEAD sent no body
        assert status == 200
        assert json.loads(f.read(int(headers["content-length"]))) == {"status": "ok"}


def test_many_connections_opened_and_dropped_leave_nothing_behind(server) -> None:
    for i in range(20):
        with connect(server.url) as sock:
            send_request(sock, "POST", "/v1/chat/completions",
                         {"messages": [{"role": "user", "content": f"hi {i}"}], "max_tokens": 50, "stream": i % 2 == 0})
    wait_idle(server.url)
    assert_still_serves(server.url)
