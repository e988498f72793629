"""One API test module, two ASGI servers: every test runs against the app under pyserve's own HTTP
server and under uvicorn (`uvicorn --factory pyserve.asgi:create_app` with PYSERVE_ARGS), on the
default model. What the app promises must not depend on the server it runs in."""

from __future__ import annotations

import json
import os

import openai
import pytest
from openai import OpenAI

from live_server import (
    Reader,
    busy_pages,
    connect,
    hang_up,
    metrics,
    pyserve_server,
    request,
    send_request,
    sse_events,
    stream_text,
    uvicorn_server,
    wait_idle,
    wait_until,
)

pytest.importorskip("uvicorn")

KEY = "sk-parity-test"
FLAGS = f"--num-threads 2 --max-num-sequence 4 --api-key {KEY}"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module", params=["pyserve", "uvicorn"])
def server(request):
    from pyserve.asgi import create_app

    if request.param == "pyserve":
        # Built from keyword arguments (the Python caller's way).
        app = create_app(num_threads=2, max_num_sequence=4, api_key=KEY)
        with pyserve_server(app) as srv:
            yield srv
    else:
        # Built by uvicorn from the factory and PYSERVE_ARGS (the command line's way).
        old = os.environ.get("PYSERVE_ARGS")
        os.environ["PYSERVE_ARGS"] = FLAGS
        try:
            with uvicorn_server("pyserve.asgi:create_app()") as srv:
                yield srv
        finally:
            if old is None:
                os.environ.pop("PYSERVE_ARGS", None)
            else:
                os.environ["PYSERVE_ARGS"] = old


def client(url: str, key: str = KEY) -> OpenAI:
    return OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def model_id(url: str) -> str:
    return client(url).models.list().data[0].id


QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_models_and_greedy_chat(server) -> None:
    c = client(server.url)
    [card] = c.models.list().data
    assert card.id == "SmolLM2-135M-Instruct.Q4_1" and card.model_extra["max_model_len"] > 0
    chat = c.chat.completions.create(model=card.id, messages=QUESTION, max_tokens=16, temperature=0)
    assert "Paris" in chat.choices[0].message.content
    assert chat.usage.prompt_tokens > 5 and 1 <= chat.usage.completion_tokens <= 16


def test_streaming_chat_matches_non_streaming_and_reports_usage(server) -> None:
    c = client(server.url)
    full = c.chat.completions.create(messages=QUESTION, model=model_id(server.url), max_tokens=12, temperature=0)
    chunks = list(c.chat.completions.create(messages=QUESTION, model=model_id(server.url), max_tokens=12,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == full.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert len({ch.id for ch in chunks}) == 1


def test_completions_seeded_sampling_is_reproducible(server) -> None:
    c = client(server.url)
    kwargs = dict(model=model_id(server.url), prompt="Once upon a time", max_tokens=10, temperature=1.0, seed=7)
    assert c.completions.create(**kwargs).choices[0].text == c.completions.create(**kwargs).choices[0].text


def test_raw_sse_framing(server) -> None:
    status, headers, body = request(server.url, "POST", "/v1/completions",
                                    {"prompt": "Hello", "max_tokens": 4, "temperature": 0, "stream": True}, headers=AUTH)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    text = body.decode()
    assert text.endswith("data: [DONE]\n\n") and all(b.startswith("data: ") for b in text.split("\n\n") if b)
    assert stream_text(sse_events(body))


def test_api_key(server) -> None:
    with pytest.raises(openai.AuthenticationError):
        client(server.url, key="wrong").models.list()
    status, headers, body = request(server.url, "POST", "/v1/chat/completions",
                                    {"messages": QUESTION, "max_tokens": 2})
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
    assert headers["www-authenticate"] == "Bearer"
    assert request(server.url, "GET", "/health")[0] == 200


def test_client_errors(server) -> None:
    c = client(server.url)
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="gpt-17", messages=QUESTION, max_tokens=2)
    with pytest.raises(openai.BadRequestError) as info:
        c.chat.completions.create(model=model_id(server.url), messages=QUESTION, max_tokens=2, temperature=7)
    assert info.value.body["param"] == "temperature"
    status, _, body = request(server.url, "POST", "/v1/completions", b"{not json", headers=AUTH)
    assert status == 400 and json.loads(body)["error"]["message"]
    status, headers, body = request(server.url, "GET", "/v1/completions", headers=AUTH)
    assert status == 405 and headers["allow"] == "POST"


def test_cors(server) -> None:
    status, headers, _ = request(server.url, "OPTIONS", "/v1/chat/completions", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert status == 204 and headers["access-control-allow-origin"] == "*"
    assert "POST" in headers["access-control-allow-methods"]
    status, headers, _ = request(server.url, "GET", "/v1/models", headers={"Origin": "https://app.example", **AUTH})
    assert status == 200 and headers["access-control-allow-origin"] == "*"


def test_chunked_request_body(server) -> None:
    body = json.dumps({"prompt": "Hello there", "max_tokens": 2, "temperature": 0}).encode()
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 5]), body[i:i + 5]) for i in range(0, len(body), 5))
    with connect(server.url) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
                     + b"\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked + b"0\r\n\r\n")
        status, _, reply = Reader(sock).response()
    assert status == 200 and json.loads(reply)["choices"][0]["text"] is not None


def test_metrics(server) -> None:
    status, headers, body = request(server.url, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    text = body.decode()
    assert "# TYPE pyserve:time_to_first_token_seconds histogram" in text
    m = metrics(server.url)
    assert m["pyserve:kv_pages_total"] > 0 and m["pyserve:generation_tokens_total"] > 0


def test_disconnect_mid_stream_returns_the_engine_to_idle(server) -> None:
    wait_idle(server.url)
    gen0 = metrics(server.url)["pyserve:generation_tokens_total"]
    sock = connect(server.url)
    send_request(sock, "POST", "/v1/chat/completions", {"messages": QUESTION, "max_tokens": 2000, "ignore_eos": True, "temperature": 0,
                                                         "stream": True}, headers=AUTH)
    reader = Reader(sock)
    status, headers = reader.head()
    assert status == 200
    next(reader.chunks(headers))  # the stream is flowing
    wait_until(server.url, lambda m: busy_pages(m) > 0, what="decoding")
    hang_up(sock)
    m = wait_idle(server.url)
    assert m["pyserve:generation_tokens_total"] - gen0 < 2000
