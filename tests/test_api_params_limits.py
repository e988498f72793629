"""The operator's bounds on generated tokens (--max-tokens-default, -n/--max-tokens-limit) through
the ASGI app with the scripted engine: what max_tokens reaches the engine, and what the client
sees when its request is capped (finish_reason "length", not an error)."""
from __future__ import annotations

import pytest

from api_fakes import FakeEngine, call  # tests/ is on sys.path
from pyserve.api import create_app
from pyserve.protocol.requests import OutputLimits

USER = [{"role": "user", "content": "hi"}]
REPLY = "Hello there, how are you today?"  # 31 byte tokens + EOS: longer than every cap below


def make(default: int | None = None, limit: int | None = None, *, max_model_len: int = 64):
    engine = FakeEngine(REPLY, max_model_len=max_model_len)
    app = create_app(engine, output_limits=OutputLimits(default_max_tokens=default, max_tokens_limit=limit))
    return app, engine


def chat(app, **fields):
    resp = call(app, "POST", "/v1/chat/completions", {"messages": USER, **fields})
    assert resp.status == 200, resp.body
    return resp.json()


def comp(app, **fields):
    resp = call(app, "POST", "/v1/completions", {"prompt": "Say:", **fields})
    assert resp.status == 200, resp.body
    return resp.json()


def room(engine: FakeEngine, i: int = -1) -> int:
    return engine.max_model_len - len(engine.calls[i].prompt_ids)


def test_no_operator_bounds_keeps_the_endpoint_defaults():
    app, engine = make()
    chat(app)
    assert engine.calls[-1].params.max_tokens == room(engine)  # chat: up to the context
    comp(app)
    assert engine.calls[-1].params.max_tokens == 16  # completions: OpenAI's default
    chat(app, max_tokens=7)
    assert engine.calls[-1].params.max_tokens == 7


def test_default_applies_only_when_the_request_gives_none():
    app, engine = make(default=5)
    body = chat(app)
    assert engine.calls[-1].params.max_tokens == 5
    assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 5
    comp(app)
    assert engine.calls[-1].params.max_tokens == 5  # the operator's default replaces the 16 too
    chat(app, max_tokens=20)  # no limit: the request's own value stands
    assert engine.calls[-1].params.max_tokens == 20
    comp(app, max_tokens=30)
    assert engine.calls[-1].params.max_tokens == 30


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_limit_caps_what_the_request_asks_with_finish_reason_length(field):
    app, engine = make(limit=6)
    body = chat(app, **{field: 25})
    assert engine.calls[-1].params.max_tokens == 6
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 6
    assert choice["message"]["content"] == REPLY[:6]
    chat(app, **{field: 4})  # below the cap: untouched
    assert engine.calls[-1].params.max_tokens == 4


def test_limit_alone_caps_the_endpoint_defaults():
    app, engine = make(limit=10)
    chat(app)  # "up to the context" becomes the cap
    assert engine.calls[-1].params.max_tokens == 10
    comp(app)  # 16 becomes 10
    assert engine.calls[-1].params.max_tokens == 10
    app, engine = make(limit=40)
    comp(app)  # a cap above the endpoint's default changes nothing
    assert engine.calls[-1].params.max_tokens == 16


def test_context_room_still_bounds_everything():
    app, engine = make(default=100, limit=200, max_model_len=40)
    chat(app)
    assert engine.calls[-1].params.max_tokens == room(engine) < 100
    chat(app, max_tokens=150)
    assert engine.calls[-1].params.max_tokens == room(engine)


def test_every_choice_and_prompt_is_capped():
    app, engine = make(limit=3)
    body = comp(app, prompt=["a", "b"], n=2, max_tokens=50)
    assert [c.params.max_tokens for c in engine.calls] == [3, 3]
    assert [c["finish_reason"] for c in body["choices"]] == ["length"] * 4
    assert body["usage"]["completion_tokens"] == 12


def test_streamed_capped_choice_ends_with_length():
    app, engine = make(limit=4)
    resp = call(app, "POST", "/v1/chat/completions",
                {"messages": USER, "max_tokens": 30, "stream": True, "stream_options": {"include_usage": True}})
    assert resp.status == 200, resp.body
    events = resp.events()
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0].get("finish_reason")]
    assert reasons == ["length"]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == REPLY[:4] and chunks[-1]["usage"]["completion_tokens"] == 4


def test_min_tokens_follows_the_cap():
    app, engine = make(limit=5)
    chat(app, min_tokens=5, max_tokens=9)  # valid as asked (5 <= 9); the cap brings both to 5
    p = engine.calls[-1].params
    assert (p.min_tokens, p.max_tokens) == (5, 5)
    chat(app, min_tokens=8)  # min_tokens beyond the cap is clamped, not an error
    p = engine.calls[-1].params
    assert (p.min_tokens, p.max_tokens) == (5, 5)


def test_echo_only_scoring_is_untouched():
    app, engine = make(default=5, limit=8)
    body = comp(app, echo=True, max_tokens=0, logprobs=1)
    assert engine.calls[-1].params.max_tokens == 1  # the one token the engine must generate, dropped
    assert body["choices"][0]["text"] == "Say:" and body["usage"]["completion_tokens"] == 0


def test_the_context_default_is_unbounded_operator_wise():
    app, engine = make()
    assert app.ctx.limits == OutputLimits()
    body = chat(app)
    assert body["choices"][0]["finish_reason"] == "stop"  # the whole reply, ended by EOS
    assert body["choices"][0]["message"]["content"] == REPLY
