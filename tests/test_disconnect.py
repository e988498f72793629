"""A client that goes away aborts its request wherever it is (queued, prefilling, decoding; streaming
or not), and the engine returns to idle: no running or waiting requests, no KV pages held by
requests. Everything is observed from outside, through /metrics, on the default model served by
pyserve's HTTP server.

A client that stops reading a stream is the same case in slow motion: the server's writes stall,
the stream is dropped at write_timeout, and the request is aborted.
"""

from __future__ import annotations

import socket
import time

import pytest

from live_server import (
    Reader,
    busy_pages,
    connect,
    hang_up,
    make_app,
    metrics,
    pyserve_server,
    send_request,
    wait_idle,
    wait_until,
)

MAX_SEQS = 4
WRITE_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def server():
    app = make_app(max_num_sequence=MAX_SEQS, max_total_sequence_length=8192)
    with pyserve_server(app, write_timeout=WRITE_TIMEOUT) as srv:
        yield srv


def long_chat(stream: bool, max_tokens: int = 2000) -> dict:
    return {
        "messages": [{"role": "user", "content": "Write a very long story about a lighthouse."}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": stream,
    }


def first_events(sock: socket.socket, n: int) -> None:
    """Reads the response head and the first n SSE events."""
    reader = Reader(sock)
    status, headers = reader.head()
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    seen = b""
    for chunk in reader.chunks(headers):
        seen += chunk
        if seen.count(b"\n\n") >= n:
            return
    raise AssertionError("stream ended early")


def counters(url: str) -> tuple[float, float]:
    m = metrics(url)
    return m["pyserve:prompt_tokens_total"], m["pyserve:generation_tokens_total"]


def test_close_mid_stream_aborts_and_frees_pages(server) -> None:
    wait_idle(server.url)
    _, gen0 = counters(server.url)
    sock = connect(server.url)
    send_request(sock, "POST", "/v1/chat/completions", long_chat(stream=True))
    first_events(sock, 5)
    assert busy_pages(metrics(server.url)) > 0  # decoding: it holds pages
    hang_up(sock)
    wait_idle(server.url)
    _, gen1 = counters(server.url)
    assert gen1 - gen0 < 2000  # stopped, not run to max_tokens


def test_close_non_streaming_mid_generation(server) -> None:
    wait_idle(server.url)
    _, gen0 = counters(server.url)
    sock = connect(server.url)
    send_request(sock, "POST", "/v1/chat/completions", long_chat(stream=False))
    wait_until(server.url, lambda m: m["pyserve:generation_tokens_total"] > gen0 + 3, what="decoding")
    hang_up(sock)
    wait_idle(server.url)
    _, gen1 = counters(server.url)
    assert gen1 - gen0 < 2000


def test_close_mid_prefill(server) -> None:
    wait_idle(server.url)
    prompt0, gen0 = counters(server.url)
    prompt = [(7 * i) % 5000 + 100 for i in range(3000)]  # ~6 prefill chunks of 512 tokens
    sock = connect(server.url)
    send_request(sock, "POST", "/v1/completions", {"prompt": prompt, "max_tokens": 50, "temperature": 0, "stream": True})
    # Prefill under way: pages are being filled, no token generated yet.
    started = wait_until(server.url, lambda m: busy_pages(m) > 0, what="prefill started")
    hang_up(sock)
    m = wait_idle(server.url)
    assert m["pyserve:prompt_tokens_total"] - prompt0 < len(prompt)  # prefill was cut short
    assert m["pyserve:generation_tokens_total"] == gen0
    # Pages back within one engine step of the hang-up: the step under way, plus at most the one
    # that may have begun between our /metrics read and the hang-up (each is a 512-token chunk,
    # about a second here, so the event loop has ample time to pass the abort on).
    assert m["pyserve:engine_steps_total"] - started["pyserve:engine_steps_total"] <= 2


def test_close_while_queued(server) -> None:
    wait_idle(server.url)
    holders = []
    try:
        for _ in range(MAX_SEQS):  # fill every batch slot
            sock = connect(server.url)
            send_request(sock, "POST", "/v1/chat/completions", long_chat(stream=True))
            holders.append(sock)
        for sock in holders:
            first_events(sock, 2)
        queued = connect(server.url)
        send_request(queued, "POST", "/v1/chat/completions", long_chat(stream=False))
        wait_until(server.url, lambda m: m["pyserve:num_requests_waiting"] == 1, what="one request queued")
        hang_up(queued)
        m = wait_until(server.url, lambda m: m["pyserve:num_requests_waiting"] == 0, what="queue emptied")
        assert m["pyserve:num_requests_running"] == MAX_SEQS  # the others carry on
    finally:
        for sock in holders:
            hang_up(sock)
    wait_idle(server.url)


def test_client_that_stops_reading_is_dropped_and_its_request_aborted(server) -> None:
    """Backpressure end to end: big events (8 choices with 20 top logprobs each) fill the socket
    buffers quickly; the server's writes then stall and after write_timeout the stream is dropped
    and the request aborted, long before max_tokens."""
    wait_idle(server.url)
    _, gen0 = counters(server.url)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    body = {**long_chat(stream=True, max_tokens=1500), "n": 8, "logprobs": True, "top_logprobs": 20,
            "temperature": 1.0, "seed": 1}
    try:
        send_request(sock, "POST", "/v1/chat/completions", body)  # ... and never read
        started = time.monotonic()
        wait_until(server.url, lambda m: m["pyserve:num_requests_running"] > 0, what="request running")
        m = wait_idle(server.url, timeout=60)
        elapsed = time.monotonic() - started
    finally:
        hang_up(sock)
    generated = m["pyserve:generation_tokens_total"] - gen0
    assert generated < 8 * 1500, (generated, elapsed)  # aborted, not run to the end
