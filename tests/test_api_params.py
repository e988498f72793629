"""Issue-3 request parameters through the ASGI app with the scripted engine: what reaches the
engine's SamplingParams, n choices as one engine request, logprobs (chat and completions, JSON and
SSE), echo, and the response fields clients rely on."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api_fakes import BOS, FakeEngine, FakeModel, call  # tests/ is on sys.path
from pyserve.api import create_app

USER = [{"role": "user", "content": "hi"}]


def chat(app, **fields):
    return call(app, "POST", "/v1/chat/completions", {"messages": USER, **fields})


def comp(app, prompt="Say:", **fields):
    return call(app, "POST", "/v1/completions", {"prompt": prompt, **fields})


def data_events(resp) -> list[dict]:
    assert resp.status == 200, resp.body
    events = resp.events()
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    return events[:-1]


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine("Hello there!")


@pytest.fixture
def app(engine):
    return create_app(engine)


def error(resp, status=400) -> dict:
    assert resp.status == status, resp.body
    return resp.json()["error"]


# --- what reaches the engine ---------------------------------------------------------------------


def test_every_sampling_field_reaches_the_engine(app, engine):
    resp = chat(
        app,
        temperature=0.7, top_p=0.9, top_k=40, min_p=0.05, seed=-3, presence_penalty=0.5, frequency_penalty=-0.5,
        repetition_penalty=1.3, logit_bias={"72": 5, "10": -100}, stop_token_ids=[33], ignore_eos=True,
        min_tokens=2, max_completion_tokens=9, n=2, logprobs=True, top_logprobs=3, user="u-1",
    )
    assert resp.status == 200, resp.body
    [c] = engine.calls
    p = c.params
    assert (p.temperature, p.top_p, p.top_k, p.min_p) == (0.7, 0.9, 40, 0.05)
    assert p.seed == 2**64 - 3  # the engine's RNG takes 64 bits; negative OpenAI seeds wrap
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.5, -0.5, 1.3)
    assert p.logit_bias == {72: 5.0, 10: -100.0}
    assert (p.stop_token_ids, p.ignore_eos, p.min_tokens, p.max_tokens) == ([33], True, 2, 9)
    assert (p.n, p.logprobs, p.prompt_logprobs) == (2, 3, None)


def test_neutral_defaults(app, engine):
    chat(app)
    p = engine.calls[0].params
    assert (p.n, p.logprobs, p.prompt_logprobs, p.min_tokens, p.logit_bias) == (1, None, None, 0, {})
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty, p.min_p) == (0.0, 0.0, 1.0, 0.0)


def test_model_defaults_fill_penalties_and_min_p(engine):
    engine.model = FakeModel(generation_defaults={"repetition_penalty": 1.1, "min_p": 0.05, "temperature": 0.6})
    app = create_app(engine)
    chat(app)
    p = engine.calls[0].params
    assert (p.repetition_penalty, p.min_p, p.temperature) == (1.1, 0.05, 0.6)
    chat(app, repetition_penalty=1.0, min_p=0, temperature=0)
    p = engine.calls[1].params
    assert (p.repetition_penalty, p.min_p, p.temperature) == (1.0, 0.0, 0.0)


def test_min_tokens_clamped_to_the_room_left(app, engine):
    chat(app, min_tokens=1000)  # no max_tokens: room in the context is the limit
    p = engine.calls[0].params
    assert p.min_tokens == p.max_tokens == 64 - len(engine.calls[0].prompt_ids)


def test_completions_logprobs_and_echo_reach_the_engine(app, engine):
    comp(app, logprobs=2, echo=True, max_tokens=4)
    p = engine.calls[0].params
    assert (p.logprobs, p.prompt_logprobs, p.max_tokens) == (2, 2, 4)
    comp(app, echo=True)  # echo without logprobs: no prompt logprobs to compute
    assert engine.calls[1].params.prompt_logprobs is None


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"logit_bias": {"259": 1}}, "logit_bias"),  # vocabulary is 259 tokens
        ({"stop_token_ids": [259]}, "stop_token_ids"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
    ],
)
def test_chat_param_errors_name_the_param(app, engine, fields, param):
    assert error(chat(app, **fields))["param"] == param
    assert engine.calls == []


@pytest.mark.parametrize(
    "fields, param",
    [({"logprobs": 6}, "logprobs"), ({"logprobs": True}, "logprobs"), ({"max_tokens": 0}, "max_tokens"), ({"echo": "yes"}, "echo")],
)
def test_completion_param_errors_name_the_param(app, engine, fields, param):
    assert error(comp(app, **fields))["param"] == param
    assert engine.calls == []


def test_unknown_fields_ignored_and_text_format_accepted(app):
    resp = chat(app, response_format={"type": "text"}, tool_choice="none", metadata={"a": 1}, store=False, x_y=[1])
    assert resp.status == 200, resp.body


# --- n choices: one engine request -------------------------------------------------------------------


def test_n_choices_stream_from_one_request(app, engine):
    engine.reply = ["abc", "de"]
    events = data_events(chat(app, n=2, stream=True))
    [c] = engine.calls
    assert c.params.n == 2 and not c.closed_early
    for i, want in enumerate(["abc", "de"]):
        mine = [e["choices"][0] for e in events if e["choices"][0]["index"] == i]
        assert mine[0]["delta"]["role"] == "assistant"
        assert "".join(ch["delta"].get("content", "") for ch in mine) == want
        assert mine[-1]["finish_reason"] == "stop" and [ch["finish_reason"] for ch in mine].count("stop") == 1


def test_stop_string_ends_one_choice_the_others_go_on(app, engine):
    engine.reply = ["one, two", "three four"]
    body = chat(app, n=2, stop=[","]).json()
    assert [(ch["message"]["content"], ch["finish_reason"]) for ch in body["choices"]] == [("one", "stop"), ("three four", "stop")]
    # choice 0's tokens after the stop string are not counted; choice 1 ran to EOS
    assert body["usage"]["completion_tokens"] == len("one,") + len("three four") + 1
    assert not engine.calls[0].closed_early
    assert engine.calls[0].aborted_choices == [0]  # choice 0 stopped early: the engine stops it too


def test_all_choices_stopped_aborts_the_request(app, engine):
    engine.reply = ["a.b c d e f", "x.y z z z z"]
    body = chat(app, n=2, stop=["."]).json()
    assert [ch["message"]["content"] for ch in body["choices"]] == ["a", "x"]
    assert engine.calls[0].closed_early  # nobody wanted the rest: the engine request was aborted


def test_choices_of_several_prompts_are_prompt_major(app, engine):
    engine.reply = ["A", "B"]
    body = comp(app, ["p", "q"], n=2).json()
    assert [(ch["index"], ch["text"]) for ch in body["choices"]] == [(0, "A"), (1, "B"), (2, "A"), (3, "B")]


def test_stream_that_ends_unfinished_reports_abort(app, engine):
    engine.reply = ["aaaa", "bbbb"]
    engine.end_early_after = 3  # the engine stops (shutdown) without finishing the choices
    events = data_events(chat(app, n=2, stream=True, stream_options={"include_usage": True}))
    finishes = {e["choices"][0]["index"]: e["choices"][0]["finish_reason"] for e in events if e["choices"] and e["choices"][0]["finish_reason"]}
    assert finishes == {0: "abort", 1: "abort"}
    assert events[-1]["usage"]["completion_tokens"] == 3


def test_cached_tokens_and_usage_with_n(app, engine):
    engine.cached_tokens = 5
    engine.reply = ["ab", "c"]
    body = chat(app, n=2).json()
    prompt = len(engine.calls[0].prompt_ids)
    assert body["usage"] == {
        "prompt_tokens": prompt,
        "completion_tokens": 3 + 2,
        "total_tokens": prompt + 5,
        "prompt_tokens_details": {"cached_tokens": 5},
    }


# --- chat logprobs ---------------------------------------------------------------------------------


def test_chat_logprobs(app, engine):
    engine.reply = "Hé"
    body = chat(app, logprobs=True, top_logprobs=2).json()
    [choice] = body["choices"]
    assert choice["message"]["content"] == "Hé"
    content = choice["logprobs"]["content"]
    # H, the two bytes of "é", EOS: one entry per generated token
    assert [c["bytes"] for c in content] == [[72], [0xC3], [0xA9], list(b"</s>")]
    assert [c["token"] for c in content] == ["H", "\ufffd", "\ufffd", "</s>"]
    assert [c["logprob"] for c in content] == pytest.approx([-0.1, -0.2, -0.3, -0.4])
    first = content[0]
    assert first["top_logprobs"] == [
        {"token": "H", "logprob": pytest.approx(-0.1), "bytes": [72]},
        {"token": "I", "logprob": pytest.approx(-1.1), "bytes": [73]},
    ]
    assert all(len(c["top_logprobs"]) == 2 for c in content)


def test_chat_logprobs_without_top(app, engine):
    body = chat(app, logprobs=True, max_tokens=3).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == ["H", "e", "l"] and all(c["top_logprobs"] == [] for c in content)
    assert chat(app, logprobs=False).json()["choices"][0]["logprobs"] is None


def test_chat_logprobs_stop_at_the_stop_string(app, engine):
    engine.reply = "ab|cd"
    body = chat(app, logprobs=True, stop=["|"]).json()
    assert body["choices"][0]["message"]["content"] == "ab"
    # the tokens up to the one that completed the stop string, as vLLM reports them
    assert [c["token"] for c in body["choices"][0]["logprobs"]["content"]] == ["a", "b", "|"]


@pytest.mark.parametrize("chunk", [1, 3])
def test_chat_stream_logprobs_match_the_full_response(engine, chunk):
    engine.reply = "naïve 日本"
    engine.chunk = chunk
    app = create_app(engine)
    full = chat(app, logprobs=True, top_logprobs=1).json()["choices"][0]["logprobs"]["content"]
    events = data_events(chat(app, logprobs=True, top_logprobs=1, stream=True))
    streamed = []
    for e in events:
        lp = e["choices"][0]["logprobs"]
        if lp is not None:
            # logprobs ride on the chunk of the output that brought their tokens, even when the
            # detokenizer still holds their text (half a character): content may be ""
            assert "content" in e["choices"][0]["delta"]
            streamed.extend(lp["content"])
    assert streamed == full
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == "naïve 日本"
    if chunk == 1:  # one token per output: the first byte of "ï" shows no text yet
        assert any(e["choices"][0]["delta"].get("content") == "" and e["choices"][0]["logprobs"] for e in events)


# --- completions logprobs and echo ---------------------------------------------------------------------


def test_completion_logprobs(app, engine):
    engine.reply = "ab c"
    body = comp(app, logprobs=1).json()
    [choice] = body["choices"]
    lp = choice["logprobs"]
    assert choice["text"] == "ab c"
    assert lp["tokens"] == ["a", "b", " ", "c", "</s>"]
    assert lp["token_logprobs"] == pytest.approx([-0.1, -0.2, -0.3, -0.4, -0.5])
    assert lp["text_offset"] == [0, 1, 2, 3, 4]
    assert lp["top_logprobs"][0] == {"a": pytest.approx(-0.1)}  # k=1: the top token is the chosen one
    assert len(lp["top_logprobs"]) == 5
    assert comp(app).json()["choices"][0]["logprobs"] is None


def test_completion_logprobs_zero_gives_the_chosen_token(app, engine):
    lp = comp(app, logprobs=0, max_tokens=2).json()["choices"][0]["logprobs"]
    assert lp["top_logprobs"] == [{"H": pytest.approx(-0.1)}, {"e": pytest.approx(-0.2)}]


def test_echo_prepends_the_prompt(app, engine):
    body = comp(app, "Say:", echo=True, max_tokens=5).json()
    assert body["choices"][0]["text"] == "Say:Hello"
    assert body["usage"]["completion_tokens"] == 5


def test_echo_token_prompt_is_decoded(app, engine):
    body = comp(app, [BOS, *b"Hi"], echo=True, max_tokens=1).json()
    assert body["choices"][0]["text"] == "<s>HiH"


def test_echo_with_logprobs(app, engine):
    engine.reply = "ok"
    body = comp(app, "Say:", echo=True, logprobs=1).json()
    lp = body["choices"][0]["logprobs"]
    text = body["choices"][0]["text"]
    assert text == "Say:ok"
    # the tokenizer's BOS, the prompt's bytes, then the generated tokens
    assert lp["tokens"] == ["<s>", "S", "a", "y", ":", "o", "k", "</s>"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # nothing predicts it
    assert lp["token_logprobs"][1:5] == pytest.approx([-0.1, -0.2, -0.3, -0.4])
    assert lp["text_offset"] == [0, 0, 1, 2, 3, 4, 5, 6]  # BOS is not in the text
    assert [text[o] for o in lp["text_offset"][1:7]] == list("Say:ok")


def test_echo_only_scores_the_prompt(app, engine):
    body = comp(app, "Say:", echo=True, max_tokens=0, logprobs=0).json()
    [choice] = body["choices"]
    assert choice["text"] == "Say:" and choice["finish_reason"] == "length"
    assert choice["logprobs"]["tokens"] == ["<s>", "S", "a", "y", ":"]
    assert body["usage"]["completion_tokens"] == 0
    assert engine.calls[0].params.max_tokens == 1  # the engine generates one token, dropped


@pytest.mark.parametrize("reverse", [False, True])
def test_echo_stream_with_n(engine, reverse):
    # reverse: choice 1's first output comes before the prompt logprobs (they ride on choice 0's).
    engine.reply = ["A", "BB"]
    engine.reverse_rounds = reverse
    app = create_app(engine)
    events = data_events(comp(app, "Q", echo=True, logprobs=0, n=2, stream=True))
    for i, want in enumerate(["QA", "QBB"]):
        mine = [e["choices"][0] for e in events if e["choices"][0]["index"] == i]
        assert mine[0]["text"] == "Q"  # the prompt first
        assert mine[0]["logprobs"]["tokens"] == ["<s>", "Q"] and mine[0]["logprobs"]["token_logprobs"][0] is None
        assert "".join(ch["text"] for ch in mine) == want
        offsets = [o for ch in mine if ch["logprobs"] for o in ch["logprobs"]["text_offset"]]
        assert offsets == [0, 0, *range(1, len(want) + 1)]  # <s>, Q, the reply, </s>
        assert mine[-1]["finish_reason"] == "stop"


def test_echo_stream_offsets_continue_after_the_prompt(app, engine):
    engine.reply = "xy"
    events = data_events(comp(app, "ab", echo=True, logprobs=0, stream=True))
    offsets = [o for e in events if e["choices"][0]["logprobs"] for o in e["choices"][0]["logprobs"]["text_offset"]]
    assert offsets == [0, 0, 1, 2, 3, 4]  # <s>, a, b | x, y, </s>


# --- response fields ---------------------------------------------------------------------------------


def test_stream_chunks_share_id_and_fingerprint(app):
    for resp in (chat(app, stream=True, n=2), comp(app, stream=True, n=2)):
        events = data_events(resp)
        assert len({e["id"] for e in events}) == 1
        assert all(e["system_fingerprint"] == "fp_pyserve" and isinstance(e["created"], int) for e in events)


def test_no_model_field_uses_the_served_one(engine):
    app = create_app(engine, served_model_name="served")
    assert chat(app).json()["model"] == "served"
    assert comp(app).json()["model"] == "served"
    assert chat(app, model="served").status == 200
    err = error(chat(app, model="fake-model"), 404)
    assert (err["code"], err["param"]) == ("model_not_found", "model")


# --- any valid combination works ------------------------------------------------------------------------

_COMMON = {
    "n": st.integers(1, 3),
    "max_tokens": st.integers(1, 20),
    "min_tokens": st.integers(0, 1),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1),
    "top_k": st.integers(-1, 50),
    "min_p": st.floats(0, 1),
    "seed": st.integers(-(2**63), 2**64 - 1),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.1, 3),
    "logit_bias": st.dictionaries(st.integers(0, 258).map(str), st.floats(-100, 100), max_size=3),
    "stop": st.one_of(st.text("lo !", min_size=1, max_size=3), st.lists(st.text("lo !", max_size=3), max_size=5)),
    "stop_token_ids": st.lists(st.integers(0, 258), max_size=2),
    "ignore_eos": st.booleans(),
    "skip_special_tokens": st.booleans(),
    "user": st.text(max_size=5),
    "stream": st.booleans(),
}


def _check_body(body: dict, stream: bool, n_choices: int) -> None:
    assert sorted(c["index"] for c in body["choices"]) == list(range(n_choices))
    assert all(c["finish_reason"] in ("stop", "length") for c in body["choices"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    fields=st.fixed_dictionaries({}, optional={**_COMMON, "top_logprobs": st.integers(0, 20)}),
    logprobs=st.booleans(),
    reply=st.sampled_from(["Hello there!", "naïve 日本 🎉", "l<|im_end|>o"]),
)
def test_any_valid_chat_request_works(fields, logprobs, reply):
    engine = FakeEngine(reply)
    app = create_app(engine)
    if "top_logprobs" in fields and not logprobs:
        del fields["top_logprobs"]
    if fields.get("min_tokens", 0) > fields.get("max_tokens", 1):
        fields["min_tokens"] = 0
    resp = chat(app, logprobs=logprobs, **fields)
    assert resp.status == 200, resp.body
    n = fields.get("n", 1)
    if not fields.get("stream"):
        body = resp.json()
        _check_body(body, False, n)
        for c in body["choices"]:
            assert (c["logprobs"] is not None) == logprobs
    else:
        events = data_events(resp)
        finished = [e["choices"][0]["index"] for e in events if e["choices"] and e["choices"][0]["finish_reason"]]
        assert sorted(finished) == list(range(n))


@settings(max_examples=60, deadline=None)
@given(
    fields=st.fixed_dictionaries({}, optional={**_COMMON, "logprobs": st.integers(0, 5), "echo": st.booleans()}),
    prompt=st.sampled_from(["Say:", ["a", "b"], [72, 105], [[72], [105, 33]]]),
)
def test_any_valid_completion_request_works(fields, prompt):
    engine = FakeEngine("ok 日本")
    app = create_app(engine)
    if fields.get("min_tokens", 0) > fields.get("max_tokens", 16):
        fields["min_tokens"] = 0
    resp = comp(app, prompt, **fields)
    assert resp.status == 200, resp.body
    n_prompts = 2 if isinstance(prompt, list) and not isinstance(prompt[0], int) else 1
    n = fields.get("n", 1) * n_prompts
    if not fields.get("stream"):
        body = resp.json()
        _check_body(body, False, n)
        for c in body["choices"]:
            lp = c["logprobs"]
            assert (lp is not None) == ("logprobs" in fields)
            if lp is not None:
                assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"])
                assert all(0 <= o <= len(c["text"]) for o in lp["text_offset"])
                assert lp["text_offset"] == sorted(lp["text_offset"])
    else:
        events = data_events(resp)
        finished = [e["choices"][0]["index"] for e in events if e["choices"] and e["choices"][0]["finish_reason"]]
        assert sorted(finished) == list(range(n))
