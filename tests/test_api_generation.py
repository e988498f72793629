"""Chat and completions through the ASGI app with a scripted engine: JSON and SSE responses,
stop strings, sampling params handed to the engine, disconnects and in-stream errors."""
from __future__ import annotations

import anyio
import pytest

from api_fakes import BOS, FakeEngine, FakeModel, call  # tests/ is on sys.path
from pyserve.api import create_app

USER = [{"role": "user", "content": "hi"}]


def chat(app, disconnect_after=None, **fields):
    return call(app, "POST", "/v1/chat/completions", {"messages": USER, **fields}, disconnect_after=disconnect_after)


def comp(app, prompt="Say:", **fields):
    return call(app, "POST", "/v1/completions", {"prompt": prompt, **fields})


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine("Hello there!")


@pytest.fixture
def app(engine):
    return create_app(engine)


def data_events(resp) -> list[dict]:
    events = resp.events()
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    return events[:-1]


# --- non-streaming -----------------------------------------------------------------------------


def test_chat_completion(app, engine):
    resp = chat(app, model="fake-model")
    assert resp.status == 200 and resp.headers["content-type"] == "application/json"
    body = resp.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == "fake-model" and body["system_fingerprint"]
    [choice] = body["choices"]
    assert choice == {"index": 0, "message": {"role": "assistant", "content": "Hello there!", "refusal": None}, "logprobs": None, "finish_reason": "stop"}
    [c] = engine.calls
    # The template wrote BOS; the server must not add another.
    assert c.prompt_ids[0] == BOS and c.prompt_ids[1] != BOS and c.prompt_ids.count(BOS) == 1
    assert body["usage"] == {
        "prompt_tokens": len(c.prompt_ids),
        "completion_tokens": len("Hello there!") + 1,  # + EOS
        "total_tokens": len(c.prompt_ids) + len("Hello there!") + 1,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


def test_completion(app, engine):
    body = comp(app, "Say:").json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"] == [{"index": 0, "text": "Hello there!"[:16], "logprobs": None, "finish_reason": "stop"}]
    assert engine.calls[0].prompt_ids == [BOS, *b"Say:"]  # plain completions get the tokenizer's BOS


def test_completion_token_prompt_used_verbatim(app, engine):
    comp(app, [5, 6, 7])
    assert engine.calls[0].prompt_ids == [5, 6, 7]


def test_completion_defaults_to_16_tokens(engine):
    engine.reply = "a" * 40
    body = comp(create_app(engine)).json()
    assert body["choices"][0]["text"] == "a" * 16 and body["choices"][0]["finish_reason"] == "length"
    assert engine.calls[0].params.max_tokens == 16


def test_max_tokens_gives_length(app, engine):
    body = chat(app, max_tokens=5).json()
    assert body["choices"][0]["message"]["content"] == "Hello" and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 5


def test_max_tokens_clamped_to_context(app, engine):
    chat(app, max_tokens=1000)
    c = engine.calls[0]
    assert c.params.max_tokens == 64 - len(c.prompt_ids)
    chat(app)  # no max_tokens: up to the context
    assert engine.calls[1].params.max_tokens == 64 - len(engine.calls[1].prompt_ids)


def test_sampling_params_passed(app, engine):
    chat(app, temperature=0, top_p=0.9, top_k=-1, seed=3, stop_token_ids=[10], ignore_eos=True, max_tokens=7)
    p = engine.calls[0].params
    assert (p.temperature, p.top_p, p.top_k, p.seed, p.stop_token_ids, p.ignore_eos, p.max_tokens) == (0.0, 0.9, 0, 3, [10], True, 7)


def test_generation_defaults_fill_unset_fields(engine):
    engine.model = FakeModel(generation_defaults={"temperature": 0.6, "top_p": 0.95, "top_k": 20})
    app = create_app(engine)
    chat(app)
    p = engine.calls[0].params
    assert (p.temperature, p.top_p, p.top_k) == (0.6, 0.95, 20)
    chat(app, temperature=1.0, top_p=1, top_k=0)
    p = engine.calls[1].params
    assert (p.temperature, p.top_p, p.top_k) == (1.0, 1.0, 0)


def test_stop_string_cuts_and_aborts(engine):
    engine.reply = "Hello there! How are you?"
    app = create_app(engine)
    body = chat(app, stop=["!", "zzz"]).json()
    assert body["choices"][0]["message"]["content"] == "Hello there"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert engine.calls[0].closed_early  # we stopped consuming: the engine request was aborted
    # Usage counts the tokens the engine generated (including the stop string's).
    assert body["usage"]["completion_tokens"] == len("Hello there!")


def test_stop_token_ids_finish(app, engine):
    body = chat(app, stop_token_ids=[ord("!")]).json()
    assert body["choices"][0]["finish_reason"] == "stop"
    # The stopping token counts but its text is not part of the answer (as vLLM does).
    assert body["choices"][0]["message"]["content"] == "Hello there"
    assert body["usage"]["completion_tokens"] == len("Hello there!")


def test_ignore_eos_keeps_eos_text(app, engine):
    engine.reply = "a</s>b"
    body = chat(app, ignore_eos=True, skip_special_tokens=False).json()
    # EOS did not stop anything, so it is text like any other token (the fake's reply then runs
    # out: "length")
    assert body["choices"][0]["message"]["content"] == "a</s>b</s>"
    assert body["choices"][0]["finish_reason"] == "length"
    body = chat(app, skip_special_tokens=False).json()
    assert body["choices"][0]["message"]["content"] == "a"  # the EOS that stopped it is not shown


def test_skip_special_tokens(app, engine):
    engine.reply = "a<|im_end|>b"
    assert chat(app, skip_special_tokens=False).json()["choices"][0]["message"]["content"] == "a<|im_end|>b"
    assert chat(app).json()["choices"][0]["message"]["content"] == "ab"


def test_multibyte_reply_byte_by_byte(engine):
    engine.reply = "café 東京 🎉!"
    body = chat(create_app(engine)).json()
    assert body["choices"][0]["message"]["content"] == "café 東京 🎉!"


def test_n_choices_are_one_engine_request(app, engine):
    engine.reply = ["Hello there!", "Bye!", "Hm"]
    body = chat(app, n=3, seed=10).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert [c["message"]["content"] for c in body["choices"]] == ["Hello there!", "Bye!", "Hm"]
    # One request: the engine prefills the prompt once; choice i uses seed + i inside the engine.
    [c] = engine.calls
    assert c.params.n == 3 and c.params.seed == 10
    assert body["usage"]["prompt_tokens"] == len(c.prompt_ids)  # the prompt counts once
    assert body["usage"]["completion_tokens"] == 13 + 5 + 3


def test_batched_prompts(app, engine):
    body = comp(app, ["a", "bb"], n=2).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert sorted(len(c.prompt_ids) for c in engine.calls) == [2, 3]  # one request per prompt
    assert all(c.params.n == 2 for c in engine.calls)
    assert body["usage"]["prompt_tokens"] == 2 + 3


def test_cached_tokens_reported(app, engine):
    engine.cached_tokens = 4
    assert chat(app).json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 4


def test_client_disconnect_while_waiting_aborts(app, engine):
    engine.gate = anyio.Event()  # never set: generation stalls after the first output
    resp = chat(app, disconnect_after=0)
    assert resp.status == 0  # no response: nobody is listening
    assert engine.calls[0].closed_early


# --- streaming ---------------------------------------------------------------------------------


def test_chat_stream(app, engine):
    resp = chat(app, stream=True)
    assert resp.status == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = data_events(resp)
    assert len({e["id"] for e in events}) == 1 and events[0]["id"].startswith("chatcmpl-")
    assert all(e["object"] == "chat.completion.chunk" and e["model"] == "fake-model" for e in events)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in e["choices"][0]["delta"] for e in events[1:])
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert text == "Hello there!"
    assert events[-1]["choices"][0]["finish_reason"] == "stop" and events[-1]["choices"][0]["delta"] == {}
    assert all(e["choices"][0]["finish_reason"] is None for e in events[:-1])
    assert all("usage" not in e for e in events)
    assert not engine.calls[0].closed_early


def test_chat_stream_include_usage(app, engine):
    events = data_events(chat(app, stream=True, stream_options={"include_usage": True}))
    *chunks, last = events
    assert last["choices"] == []
    assert last["usage"]["completion_tokens"] == 13 and last["usage"]["prompt_tokens"] == len(engine.calls[0].prompt_ids)
    assert all(c["usage"] is None for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_completion_stream(app, engine):
    events = data_events(comp(app, stream=True, stream_options={"include_usage": True}, max_tokens=5))
    *chunks, usage = events
    assert all(e["object"] == "text_completion" for e in events)
    assert "".join(c["choices"][0]["text"] for c in chunks) == "Hello"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 5


def test_stream_stop_string_never_leaks(engine):
    engine.reply = "one two STOP three"
    events = data_events(chat(create_app(engine), stream=True, stop="STOP"))
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert text == "one two "
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    assert engine.calls[0].closed_early


@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_stream_multibyte_never_broken(engine, chunk):
    engine.reply = "naïve 日本語 👍🏽 ok"
    engine.chunk = chunk
    events = data_events(chat(create_app(engine), stream=True))
    deltas = [e["choices"][0]["delta"].get("content", "") for e in events]
    assert "".join(deltas) == "naïve 日本語 👍🏽 ok"
    assert not any("\ufffd" in d for d in deltas)


def test_stream_n_choices(app):
    events = data_events(chat(app, stream=True, n=2))
    roles = [e["choices"][0]["index"] for e in events if "role" in e["choices"][0]["delta"]]
    assert sorted(roles) == [0, 1]
    for i in (0, 1):
        mine = [e["choices"][0] for e in events if e["choices"][0]["index"] == i]
        assert "".join(c["delta"].get("content", "") for c in mine) == "Hello there!"
        assert mine[-1]["finish_reason"] == "stop"


def test_stream_disconnect_aborts(app, engine):
    engine.gate = anyio.Event()  # stall after the first output
    resp = chat(app, stream=True, disconnect_after=2)
    assert resp.status == 200
    assert b"[DONE]" not in resp.body
    assert engine.calls[0].closed_early


def test_error_after_stream_start_is_sent_in_band(app, engine):
    engine.error_after = 3
    events = data_events(chat(app, stream=True))
    err = events[-1]
    assert set(err) == {"error"} and set(err["error"]) == {"message", "type", "param", "code"}
    assert err["error"]["type"] == "server_error"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert text == "Hel"


def test_stream_error_before_output_is_plain_http_error(app, engine):
    engine.error = ValueError("bad seed")
    resp = chat(app, stream=True)
    assert resp.status == 400 and resp.headers["content-type"] == "application/json"
    assert resp.json()["error"]["message"] == "bad seed"


def test_validation_errors_on_stream_requests_are_plain_json(app):
    resp = chat(app, stream=True, temperature=9)
    assert resp.status == 400 and resp.json()["error"]["param"] == "temperature"


def test_stream_send_failure_aborts(app, engine):
    # No stall: the engine keeps producing, and the next send() raises (ASGI 2.4 behaviour).
    engine.reply = "a long answer " * 3
    resp = chat(app, stream=True, disconnect_after=2)
    assert b"[DONE]" not in resp.body
    assert engine.calls[0].closed_early


def test_model_defaults_for_optional_fields_do_not_break_requests(engine):
    engine.model = FakeModel(generation_defaults={"repetition_penalty": 1.1, "min_p": 0.05})
    assert chat(create_app(engine)).status == 200
