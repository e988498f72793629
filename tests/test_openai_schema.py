"""Responses validate against OpenAI's published response schemas.

tests/data/openai_response_schemas.json is a trimmed JSON Schema copy of CreateChatCompletionResponse,
CreateChatCompletionStreamResponse and CreateCompletionResponse (and what they $ref) from
openai/openai-openapi (its header says which commit). Every response and every SSE chunk the app
sends (scripted engine; then the real one on the default model) is validated against it, across
n > 1, several prompts, logprobs, echo, stop strings, max_tokens and stream_options.include_usage.

Where OpenAI's own API sends what its schema forbids, we follow the API. Those places are listed
below as DEVIATIONS, each one narrow: a null at one exact path, in one kind of response. Any other
violation fails the test.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator, ValidationError

from api_fakes import FakeEngine, call  # tests/ is on sys.path
from pyserve.api import create_app

SCHEMA_DOC = json.loads((Path(__file__).parent / "data" / "openai_response_schemas.json").read_text("utf-8"))

CHAT, CHAT_CHUNK, COMPLETION = "CreateChatCompletionResponse", "CreateChatCompletionStreamResponse", "CreateCompletionResponse"


def validator(name: str) -> Draft202012Validator:
    return Draft202012Validator({"$ref": f"#/$defs/{name}", "$defs": SCHEMA_DOC["$defs"]})


VALIDATORS = {name: validator(name) for name in (CHAT, CHAT_CHUNK, COMPLETION)}

ANY_INDEX = object()  # a path pattern element matching any list index


@dataclass(frozen=True)
class Deviation:
    """A place where OpenAI's API (and we) send null although the schema says otherwise."""

    path: tuple[Any, ...]
    why: str

    def covers(self, error: ValidationError) -> bool:
        path = tuple(error.absolute_path)
        return (
            error.validator in ("type", "enum")
            and error.instance is None
            and len(path) == len(self.path)
            and all(p is ANY_INDEX and isinstance(q, int) or p == q for p, q in zip(self.path, path))
        )


USAGE_NULL = Deviation(
    ("usage",),
    "stream_options.include_usage: every chunk but the usage chunk has usage null. The schema's "
    "stream usage object is not nullable, yet the same document (ChatCompletionStreamOptions) says "
    "'All other chunks will also include a usage field, but with a null value', and OpenAI's later "
    "published spec marks it nullable.",
)
COMPLETION_CHUNK_FINISH_NULL = Deviation(
    ("choices", ANY_INDEX, "finish_reason"),
    "streamed text_completion chunks: finish_reason is null until a choice's last chunk, as OpenAI "
    "streams them; the schema shares one non-nullable shape between the object and its chunks.",
)
ECHO_FIRST_TOKEN_NULL = [
    Deviation(
        ("choices", ANY_INDEX, "logprobs", field, 0),
        "echo with logprobs: nothing predicts the first prompt token, so its logprob and its top "
        "logprobs are null (OpenAI's legacy completions and vLLM do the same); the schema's items are numbers/objects.",
    )
    for field in ("token_logprobs", "top_logprobs")
]


def violations(obj: Any, name: str, allow: Sequence[Deviation] = ()) -> list[str]:
    out = []
    for e in VALIDATORS[name].iter_errors(obj):
        if not any(d.covers(e) for d in allow):
            out.append(f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}")
    return sorted(out)


def assert_valid(obj: Any, name: str, allow: Sequence[Deviation] = ()) -> None:
    errors = violations(obj, name, allow)
    assert not errors, f"{name} violations:\n" + "\n".join(errors) + "\n" + json.dumps(obj)[:2000]


# --- validating one exchange ------------------------------------------------------------------------


def check_response(path: str, body: dict[str, Any], status: int, payload: bytes | Any) -> None:
    """Validates the answer to `body` sent to `path`: the JSON object, or every SSE chunk."""
    chat = path.endswith("/chat/completions")
    echo_logprobs = not chat and bool(body.get("echo")) and body.get("logprobs") is not None
    allow = list(ECHO_FIRST_TOKEN_NULL) if echo_logprobs else []
    assert status == 200, payload
    if not body.get("stream"):
        obj = payload if isinstance(payload, dict) else json.loads(payload)
        assert_valid(obj, CHAT if chat else COMPLETION, allow)
        assert obj["usage"] is not None
        return
    events = payload
    assert events[-1] == "[DONE]" and all(isinstance(e, dict) for e in events[:-1]), events
    chunks = events[:-1]
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    if include_usage:
        *chunks, usage_chunk = chunks
        assert usage_chunk["choices"] == [] and usage_chunk["usage"] is not None
        assert_valid(usage_chunk, CHAT_CHUNK if chat else COMPLETION)
        allow.append(USAGE_NULL)
        assert all(c["usage"] is None for c in chunks)
    else:
        assert all("usage" not in c for c in chunks)
    if not chat:
        allow.append(COMPLETION_CHUNK_FINISH_NULL)
    last_reason: dict[int, Any] = {}
    for c in chunks:
        assert_valid(c, CHAT_CHUNK if chat else COMPLETION, allow)
        assert c["choices"], c  # only the usage chunk has none
        for choice in c["choices"]:
            last_reason[choice["index"]] = choice["finish_reason"]
    # The allowance for null finish_reason stops short of a choice's end: its last chunk says why.
    assert last_reason and all(r in ("stop", "length") for r in last_reason.values()), last_reason


# --- the app on a scripted engine -------------------------------------------------------------------

CHAT_CASES = [
    {},
    {"max_tokens": 3},
    {"logprobs": True, "top_logprobs": 3},
    {"logprobs": True},  # top_logprobs defaults to 0: empty top lists
    {"n": 3, "logprobs": True, "top_logprobs": 2},
    {"stop": ["llo"], "logprobs": True, "top_logprobs": 1},
]
COMPLETION_CASES = [
    {},
    {"max_tokens": 3},
    {"logprobs": 2},
    {"logprobs": 0},
    {"echo": True},
    {"echo": True, "logprobs": 2},
    {"echo": True, "max_tokens": 0, "logprobs": 1},
    {"prompt": ["a", "bc"], "n": 2, "logprobs": 1},
    {"prompt": [[5, 6, 7], [8]], "echo": True, "logprobs": 3},
    {"stop": "llo", "logprobs": 1},
]
STREAM_MODES = [{}, {"stream": True}, {"stream": True, "stream_options": {"include_usage": True}}]
REPLY = "Héllo, wörld 😀!"  # multi-byte characters: tokens that are part of one, bytes lists


def fake_exchange(path: str, body: dict[str, Any], reply: str | list[str] = REPLY, chunk: int = 2) -> None:
    app = create_app(FakeEngine(reply, chunk=chunk))
    resp = call(app, "POST", path, body)
    check_response(path, body, resp.status, resp.events() if body.get("stream") else resp.json())


@pytest.mark.parametrize("mode", STREAM_MODES, ids=["json", "sse", "sse+usage"])
@pytest.mark.parametrize("case", CHAT_CASES, ids=json.dumps)
def test_chat_responses_match_schema(case, mode):
    fake_exchange("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], **case, **mode})


@pytest.mark.parametrize("mode", STREAM_MODES, ids=["json", "sse", "sse+usage"])
@pytest.mark.parametrize("case", COMPLETION_CASES, ids=json.dumps)
def test_completion_responses_match_schema(case, mode):
    fake_exchange("/v1/completions", {"prompt": "Say:", **case, **mode})


requests = st.fixed_dictionaries(
    {},
    optional={
        "max_tokens": st.integers(0, 8),
        "n": st.integers(1, 3),
        "logprobs": st.integers(0, 5),
        "echo": st.booleans(),
        "stop": st.sampled_from(["l", "ö", "😀", ["x", "wö"]]),
        "stream": st.booleans(),
        "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
        "prompt": st.sampled_from(["Say:", ["a", "b"], [1, 2, 3], [[7], [8, 9]]]),
    },
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=requests, chat=st.booleans(), chunk=st.integers(1, 4), replies=st.sampled_from([REPLY, ["ab", "😀😀", ""]]))
def test_random_requests_match_schema(body, chat, chunk, replies):
    if chat:
        body.pop("prompt", None)
        body.pop("echo", None)
        if "logprobs" in body:
            body["top_logprobs"] = body.pop("logprobs")
            body["logprobs"] = True
        body["messages"] = [{"role": "user", "content": "hi"}]
    else:
        body.setdefault("prompt", "Say:")
    if body.get("max_tokens") == 0 and not body.get("echo"):
        body["max_tokens"] = 1  # 0 is only valid with echo
    if not body.get("stream"):
        body.pop("stream_options", None)
    fake_exchange("/v1/chat/completions" if chat else "/v1/completions", body, replies, chunk)


# --- the checks can fail --------------------------------------------------------------------------


def real_chat() -> dict[str, Any]:
    resp = call(create_app(FakeEngine(REPLY)), "POST", "/v1/chat/completions",
                {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 2})
    return resp.json()


def test_message_without_refusal_is_rejected():
    obj = real_chat()
    assert not violations(obj, CHAT)
    del obj["choices"][0]["message"]["refusal"]
    assert violations(obj, CHAT) == ["choices/0/message: 'refusal' is a required property"]


def test_finish_reason_outside_the_enum_is_rejected():
    obj = real_chat()
    obj["choices"][0]["finish_reason"] = "abort"
    assert len(violations(obj, CHAT)) == 1


def test_a_null_logprob_is_rejected():
    obj = real_chat()
    obj["choices"][0]["logprobs"]["content"][1]["logprob"] = None
    assert violations(obj, CHAT) == ["choices/0/logprobs/content/1/logprob: None is not of type 'number'"]


def test_echo_allowance_covers_the_first_token_only():
    body = {"prompt": "Say:", "echo": True, "logprobs": 1}
    obj = call(create_app(FakeEngine(REPLY)), "POST", "/v1/completions", body).json()
    lp = obj["choices"][0]["logprobs"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert len(violations(obj, COMPLETION)) == 2  # without the allowance: both nulls reported
    assert not violations(obj, COMPLETION, ECHO_FIRST_TOKEN_NULL)
    lp["token_logprobs"][1] = None
    assert violations(obj, COMPLETION, ECHO_FIRST_TOKEN_NULL) == [
        "choices/0/logprobs/token_logprobs/1: None is not of type 'number'"
    ]


def test_usage_allowance_covers_null_only():
    chunk = {"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [], "usage": None}
    assert violations(chunk, CHAT_CHUNK) and not violations(chunk, CHAT_CHUNK, [USAGE_NULL])
    chunk["usage"] = {"prompt_tokens": 1}
    assert len(violations(chunk, CHAT_CHUNK, [USAGE_NULL])) == 2  # completion_tokens, total_tokens missing


# --- the app on the real engine (default model) -----------------------------------------------------


@pytest.fixture(scope="module")
def live():
    from live_server import make_app, pyserve_server

    with pyserve_server(make_app()) as srv:
        yield srv


LIVE_CASES = [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 5, "n": 2,
                              "logprobs": True, "top_logprobs": 2, "seed": 1}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 5, "n": 2,
                              "logprobs": True, "top_logprobs": 2, "seed": 1, "stream": True,
                              "stream_options": {"include_usage": True}}),
    ("/v1/completions", {"prompt": ["The capital of France is", "1, 2, 3,"], "max_tokens": 4, "n": 2,
                         "echo": True, "logprobs": 2, "seed": 2}),
    ("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 4, "echo": True, "logprobs": 2,
                         "seed": 3, "stream": True, "stream_options": {"include_usage": True}}),
]


@pytest.mark.parametrize("path,body", LIVE_CASES, ids=lambda v: v if isinstance(v, str) else "")
def test_live_responses_match_schema(live, path, body):
    from live_server import request, sse_events

    status, _, raw = request(live.url, "POST", path, body)
    check_response(path, body, status, sse_events(raw) if body.get("stream") else json.loads(raw))
