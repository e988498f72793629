"""Over real sockets with a scripted engine (tests/api_fakes.py): an engine error after a stream
started arrives in-band as `data: {"error": {...}}` followed by `data: [DONE]`; the access log
carries token counts; a client that leaves is not logged as an application error."""

from __future__ import annotations

import json
import logging
import time

import pytest

from api_fakes import FakeEngine
from live_server import Reader, connect, hang_up, pyserve_server, request, send_request, sse_events
from pyserve.api import create_app


def test_engine_error_mid_stream_is_reported_in_band_then_done() -> None:
    engine = FakeEngine(reply="Hello there, how are you?")
    engine.error_after = 3
    with pyserve_server(create_app(engine)) as srv:
        for path, body in [("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                           ("/v1/completions", {"prompt": "hi"})]:
            status, headers, raw = request(srv.url, "POST", path, {**body, "stream": True})
            assert status == 200 and headers["content-type"].startswith("text/event-stream")
            events = sse_events(raw)
            assert events[-1] == "[DONE]" and raw.endswith(b"data: [DONE]\n\n")
            error = events[-2]
            assert set(error) == {"error"} and set(error["error"]) == {"message", "type", "param", "code"}
            assert error["error"]["type"] == "server_error"
            assert all("choices" in e for e in events[:-2])  # the text that came before the error
        # Before any output the same failure is a plain HTTP 500 with the error body.
        engine.error_after = None
        engine.error = RuntimeError("engine exploded")
        status, _, raw = request(srv.url, "POST", "/v1/completions", {"prompt": "hi", "stream": True})
        assert status == 500 and json.loads(raw)["error"]["type"] == "server_error"


def test_access_log_line_has_status_duration_and_tokens(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pyserve.access")
    with pyserve_server(create_app(FakeEngine(reply="abcdef"))) as srv:
        assert request(srv.url, "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 4})[0] == 200
        assert request(srv.url, "GET", "/v1/models")[0] == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "pyserve.access"]
    [gen] = [line for line in lines if "/v1/completions" in line]
    assert '"POST /v1/completions HTTP/1.1" 200 ' in gen
    assert gen.endswith(" prompt_tokens=3 completion_tokens=4")  # BOS + "hi"; max_tokens
    assert "ms" in gen
    [models] = [line for line in lines if "/v1/models" in line]
    assert models.endswith("ms")  # no token fields where there are no tokens


def test_client_leaving_mid_stream_is_not_an_app_error(caplog: pytest.LogCaptureFixture) -> None:
    import anyio

    engine = FakeEngine(reply="x" * 50)
    engine.gate = anyio.Event()  # hold the stream after its first output
    caplog.set_level(logging.DEBUG)
    with pyserve_server(create_app(engine)) as srv:
        sock = connect(srv.url)
        send_request(sock, "POST", "/v1/completions", {"prompt": "hi", "stream": True})
        reader = Reader(sock)
        status, headers = reader.head()
        assert status == 200 and next(reader.chunks(headers))
        hang_up(sock)
        deadline = time.monotonic() + 10
        while not engine.calls[0].closed_early and time.monotonic() < deadline:
            time.sleep(0.01)  # polling a real condition
        assert engine.calls[0].closed_early  # the engine request was aborted
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
