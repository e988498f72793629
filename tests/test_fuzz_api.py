"""Property-based: random JSON values and random field types thrown at both POST endpoints of the
real server (default model). Every answer is a 200 (a complete response, or a stream that ends
with [DONE] and carries no error) or a 4xx with the OpenAI error body; never a 5xx, never a hang
(each request has a socket timeout), and the server stays alive and idle afterwards.

Generation is kept short: any max_tokens-like number the fuzzer picks is capped at 3, and n at 2.
"""

from __future__ import annotations

import json
import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from live_server import make_app, pyserve_server, request, sse_events, wait_idle

REQUEST_TIMEOUT = 60  # a hang fails the example instead of blocking the suite

FIELDS = [
    "model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
    "min_p", "n", "seed", "stop", "stop_token_ids", "ignore_eos", "min_tokens", "presence_penalty",
    "frequency_penalty", "repetition_penalty", "logit_bias", "logprobs", "top_logprobs", "echo", "stream",
    "stream_options", "user", "response_format", "tools", "tool_choice", "suffix", "best_of",
    "skip_special_tokens", "parallel_tool_calls", "service_tier", "metadata",
]
CAPS = {"max_tokens": 3, "max_completion_tokens": 3, "n": 2, "best_of": 2, "min_tokens": 3}

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.integers(min_value=-3, max_value=60)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.floats(min_value=-3, max_value=3)
    | st.text(max_size=12)
    | st.sampled_from(["", "user", "assistant", "system", "tool", "text", "json_object", "auto", "none", "\x00",
                       "SmolLM2-135M-Instruct.Q4_1", "<|im_end|>", "é😀"])
)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "system", "tool", "bogus"]) | json_values},
        optional={"content": st.text(max_size=30) | json_values, "name": json_values},
    ),
    max_size=3,
)
token_ids = st.lists(st.integers(min_value=-5, max_value=60000), max_size=8)
# Values of the right type, mostly in range: they get requests past validation into the engine.
valid = {
    "model": st.sampled_from(["SmolLM2-135M-Instruct.Q4_1", "other-model"]),
    "messages": messages,
    "prompt": st.text(max_size=30) | st.lists(st.text(max_size=10), max_size=3) | token_ids | st.lists(token_ids, max_size=3),
    "max_tokens": st.integers(min_value=0, max_value=3),
    "max_completion_tokens": st.integers(min_value=0, max_value=3),
    "temperature": st.floats(min_value=0, max_value=2.5),
    "top_p": st.floats(min_value=0, max_value=1),
    "top_k": st.integers(min_value=-2, max_value=50),
    "min_p": st.floats(min_value=0, max_value=1),
    "n": st.integers(min_value=0, max_value=2),
    "best_of": st.integers(min_value=0, max_value=2),
    "seed": st.integers(min_value=-(2**64), max_value=2**64),
    "stop": st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=5),
    "stop_token_ids": st.lists(st.integers(min_value=-1, max_value=50000), max_size=3),
    "ignore_eos": st.booleans(),
    "min_tokens": st.integers(min_value=0, max_value=4),
    "presence_penalty": st.floats(min_value=-2.5, max_value=2.5),
    "frequency_penalty": st.floats(min_value=-2.5, max_value=2.5),
    "repetition_penalty": st.floats(min_value=0, max_value=3),
    "logit_bias": st.dictionaries(st.from_regex(r"-?[0-9]{1,6}", fullmatch=True) | st.text(max_size=4),
                                  st.floats(min_value=-150, max_value=150) | json_values, max_size=3),
    "logprobs": st.booleans() | st.integers(min_value=-1, max_value=6),
    "top_logprobs": st.integers(min_value=-1, max_value=21),
    "echo": st.booleans(),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans() | json_values}),
    "user": st.text(max_size=10),
    "response_format": st.fixed_dictionaries({}, optional={"type": st.sampled_from(["text", "json_object"]) | json_values}),
    "skip_special_tokens": st.booleans(),
}


@st.composite
def bodies(draw: st.DrawFn, chat: bool) -> bytes:
    kind = draw(st.integers(min_value=0, max_value=9))
    if kind == 0:  # any JSON value at all
        return json.dumps(draw(json_values), allow_nan=True).encode()
    if kind == 1:  # not JSON
        return draw(st.binary(max_size=40))
    body: dict = {"max_tokens": 3}
    if chat:
        body["messages"] = [{"role": "user", "content": "Hi"}]
    else:
        body["prompt"] = "Hello"
    names = draw(st.lists(st.sampled_from(FIELDS), max_size=6, unique=True))
    if kind < 6:  # well-typed values, at most one field of a random type
        wild = draw(st.sampled_from(names)) if names and draw(st.booleans()) else None
        for name in names:
            body[name] = draw(json_values) if name == wild or name not in valid else draw(valid[name])
    else:  # anything goes
        for name in names:
            body[name] = draw(valid.get(name, json_values) | json_values)
    for name, cap in CAPS.items():  # keep whatever is accepted short
        value = body.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > cap:
            body[name] = cap
    if body.get("max_tokens") is None:
        body["max_tokens"] = 3  # null would mean "up to the context"
    if "max_completion_tokens" in body and body["max_completion_tokens"] is None:
        del body["max_completion_tokens"]
    body.setdefault("seed", 0)  # unseeded sampling draws from random_device: a failure would not replay
    return json.dumps(body, allow_nan=True).encode()


@pytest.fixture(scope="module")
def server():
    app = make_app(max_num_sequence=4, max_total_sequence_length=4096)
    with pyserve_server(app) as srv:
        yield srv
        # Afterwards: alive, and nothing left running.
        status, _, _ = request(srv.url, "GET", "/health")
        assert status == 200
        wait_idle(srv.url)


def check(url: str, path: str, body: bytes) -> None:
    try:
        status, headers, raw = request(url, "POST", path, body, timeout=REQUEST_TIMEOUT)
    except socket.timeout:
        raise AssertionError(f"no answer within {REQUEST_TIMEOUT} s to {body[:300]!r}") from None
    assert status < 500, (status, body[:300], raw[:500])
    if status == 200:
        if headers["content-type"].startswith("text/event-stream"):
            events = sse_events(raw)
            assert events and events[-1] == "[DONE]", raw[-300:]
            errors = [e for e in events if isinstance(e, dict) and "error" in e]
            assert not errors, (body[:300], errors)
        else:
            obj = json.loads(raw)
            assert obj["choices"] and "usage" in obj, raw[:300]
        return
    assert 400 <= status < 500 and headers["content-type"] == "application/json", (status, raw[:300])
    err = json.loads(raw)
    assert set(err) == {"error"} and set(err["error"]) == {"message", "type", "param", "code"}, raw[:300]
    assert isinstance(err["error"]["message"], str) and err["error"]["message"]


FUZZ = settings(max_examples=200, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@FUZZ
@given(body=bodies(chat=True))
def test_chat_completions_never_5xx(server, body: bytes) -> None:
    check(server.url, "/v1/chat/completions", body)


@FUZZ
@given(body=bodies(chat=False))
def test_completions_never_5xx(server, body: bytes) -> None:
    check(server.url, "/v1/completions", body)
