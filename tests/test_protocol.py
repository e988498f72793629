"""Request parsing/validation and response builders (pure data, no I/O)."""
from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyserve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ProtocolError,
    error_body,
    parse_json_object,
)
from pyserve.protocol import responses as R
from pyserve.protocol.requests import OutputLimits

MSGS = [{"role": "user", "content": "hi"}]


def chat(**fields):
    return ChatCompletionRequest.from_json({"messages": MSGS, **fields})


def comp(**fields):
    return CompletionRequest.from_json({"prompt": "hi", **fields})


def error_of(fn, *args, **kwargs) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        fn(*args, **kwargs)
    err = info.value
    assert err.status == 400 and err.type == "invalid_request_error" and err.code in (None, "context_length_exceeded")
    return err


# --- JSON body -----------------------------------------------------------------------------------


@pytest.mark.parametrize("body", [b"", b"   ", b"{", b"{'a': 1}", b"[1, 2]", b'"text"', b"42", b"null", b"\xff\xfe"])
def test_bad_bodies_are_400(body):
    err = error_of(parse_json_object, body)
    assert err.param is None


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_json_constants_are_refused(constant):
    error_of(parse_json_object, b'{"temperature": ' + constant + b"}")


def test_json_object_parsed():
    assert parse_json_object('{"a": "é"}'.encode()) == {"a": "é"}


# --- chat ----------------------------------------------------------------------------------------


def test_chat_defaults():
    req = chat()
    assert req.messages == [{"role": "user", "content": "hi"}]
    assert req.model is None and req.max_tokens is None and req.temperature is None
    assert req.n == 1 and req.stream is False and req.include_usage is False
    assert req.stop == [] and req.stop_token_ids == [] and req.ignore_eos is False
    assert req.skip_special_tokens is True


def test_chat_full():
    req = chat(
        model="m",
        max_tokens=5,
        temperature=0,
        top_p=0.5,
        top_k=40,
        seed=7,
        stop="\n",
        stop_token_ids=[2, 3],
        ignore_eos=True,
        n=1,
        stream=True,
        stream_options={"include_usage": True},
        user="u",
        some_future_field={"x": 1},  # unknown: ignored
    )
    assert (req.model, req.max_tokens, req.temperature, req.top_p, req.top_k, req.seed) == ("m", 5, 0.0, 0.5, 40, 7)
    assert req.stop == ["\n"] and req.stop_token_ids == [2, 3] and req.ignore_eos
    assert req.stream and req.include_usage and req.user == "u"


def test_max_completion_tokens_wins():
    assert chat(max_tokens=10, max_completion_tokens=3).max_tokens == 3
    assert chat(max_tokens=10).max_tokens == 10
    assert chat(max_tokens=10.0).max_tokens == 10  # integral floats are fine


def test_content_parts_are_joined():
    req = ChatCompletionRequest.from_json(
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}
    )
    assert req.messages[0]["content"] == "a\nb"


def test_assistant_may_have_null_content_and_extra_keys_survive():
    req = ChatCompletionRequest.from_json(
        {
            "messages": [
                {"role": "system", "content": "s", "name": "sys"},
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": None, "tool_calls": []},
            ]
        }
    )
    assert req.messages[0] == {"role": "system", "content": "s", "name": "sys"}
    assert req.messages[2] == {"role": "assistant", "content": "", "tool_calls": []}


@pytest.mark.parametrize(
    "data, param",
    [
        ({}, "messages"),
        ({"messages": None}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": ["hi"]}, "messages[0]"),
        ({"messages": [{"content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": 1, "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": ["x"]}]}, "messages[0].content[0]"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages[0].content[0].type"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]}, "messages[0].content[0].text"),
    ],
)
def test_bad_messages_name_the_param(data, param):
    err = error_of(ChatCompletionRequest.from_json, data)
    assert err.param == param
    assert param.split("[")[0] in err.message


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -0.1),
        ("temperature", 2.01),
        ("temperature", "0.5"),
        ("temperature", True),
        ("top_p", 0),
        ("top_p", 1.5),
        ("top_k", -2),
        ("top_k", 1.5),
        ("max_tokens", 0),
        ("max_tokens", -1),
        ("max_tokens", "10"),
        ("max_tokens", 2.5),
        ("max_completion_tokens", 0),
        ("n", 0),
        ("n", 1000),
        ("n", "2"),
        ("seed", "1"),
        ("seed", 2**70),
        ("stop", 5),
        ("stop", ["a", 1]),
        ("stop", ["s"] * 65),
        ("stop", ["x" * 1025]),
        ("stop_token_ids", [1, -1]),
        ("stop_token_ids", "1"),
        ("ignore_eos", "yes"),
        ("stream", 1),
        ("stream_options", {"include_usage": True}),  # without stream
        ("model", 3),
        ("user", 3),
        ("presence_penalty", 3),
        ("frequency_penalty", -2.5),
        ("repetition_penalty", 0),
        ("min_p", 1.5),
        ("logit_bias", {"abc": 1}),
        ("logit_bias", {"5": 101}),
        ("logit_bias", []),
        ("response_format", {"type": "json_schema"}),
        ("response_format", {"type": "xml"}),
        ("tools", [{"type": "function", "function": {"name": "f g"}}]),
        ("tools", {"type": "function"}),
        ("tools", [{"type": "retrieval"}]),
        ("logprobs", 1),
        ("logprobs", "yes"),
        ("top_logprobs", 2),  # without logprobs=true
        ("best_of", 2),
        ("tool_choice", "required"),
        ("tool_choice", {"type": "function", "function": {"name": "f"}}),
        ("tool_choice", 3),
        ("function_call", {"name": "f"}),  # no such function
        ("tool_choice", "sometimes"),
        ("response_format", {"type": 3}),
        ("response_format", "text"),
        ("min_tokens", -1),
        ("min_tokens", "3"),
        ("repetition_penalty", -1),
    ],
)
def test_bad_fields_are_400_naming_the_param(field, value):
    err = error_of(chat, **{field: value})
    assert err.param is not None and err.param.startswith(field), (err.param, err.message)


def test_stream_options_type_checked():
    err = error_of(chat, stream=True, stream_options={"include_usage": "yes"})
    assert err.param == "stream_options.include_usage"
    err = error_of(chat, stream=True, stream_options=[])
    assert err.param == "stream_options"


def test_edges_accepted():
    req = chat(temperature=2, top_p=1, top_k=-1, n=128, seed=-5, stop=[], presence_penalty=-2, logit_bias={"3": -100})
    assert req.temperature == 2.0 and req.top_p == 1.0 and req.top_k == -1 and req.logit_bias == {3: -100.0}
    assert chat(stop=["", "x"]).stop == ["x"]
    assert chat(stream=False, stream_options=None).include_usage is False


def test_null_means_default():
    req = chat(temperature=None, max_tokens=None, stop=None, n=None, stream=None)
    assert req.temperature is None and req.max_tokens is None and req.stop == [] and req.n == 1 and not req.stream


# --- completions ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("hello", ["hello"]),
        (["a", "b"], ["a", "b"]),
        ([1, 2, 3], [[1, 2, 3]]),
        ([[1, 2], [3]], [[1, 2], [3]]),
        ("", [""]),
    ],
)
def test_prompt_forms(prompt, expected):
    assert CompletionRequest.from_json({"prompt": prompt}).prompt == expected


@pytest.mark.parametrize("prompt", [None, 5, [], ["a", 1], [[1], "a"], [[]], [1, -2], [[1, 2.5]], {"a": 1}, [True]])
def test_bad_prompts(prompt):
    data = {} if prompt is None else {"prompt": prompt}
    err = error_of(CompletionRequest.from_json, data)
    assert err.param is not None and err.param.startswith("prompt")


def test_completion_defaults_to_16_tokens():
    # The request keeps what it said (None: not given); the 16 applies when sampling params are
    # built, unless the operator set a default (OutputLimits).
    assert comp().max_tokens is None and CompletionRequest.DEFAULT_MAX_TOKENS == 16
    assert OutputLimits().max_tokens(comp(), room=100) == 16
    assert comp(max_tokens=3).max_tokens == 3
    assert chat().max_tokens is None and ChatCompletionRequest.DEFAULT_MAX_TOKENS is None


# --- the operator's bounds on max_tokens ------------------------------------------------------------


@pytest.mark.parametrize(
    "default, limit, fields, room, expected",
    [
        (None, None, {}, 100, 100),  # chat: up to the context
        (None, None, {"max_tokens": 7}, 100, 7),
        (None, None, {"max_tokens": 700}, 100, 100),  # the context bounds every request
        (5, None, {}, 100, 5),
        (5, None, {"max_tokens": 50}, 100, 50),  # a default is no cap
        (None, 8, {}, 100, 8),
        (None, 8, {"max_tokens": 50}, 100, 8),
        (None, 8, {"max_completion_tokens": 50, "max_tokens": 2}, 100, 8),
        (None, 8, {"max_tokens": 3}, 100, 3),
        (5, 8, {}, 100, 5),
        (5, 8, {}, 4, 4),
        (None, 8, {}, 6, 6),
    ],
)
def test_output_limits_for_chat(default, limit, fields, room, expected):
    assert OutputLimits(default, limit).max_tokens(chat(**fields), room) == expected


@pytest.mark.parametrize(
    "default, limit, fields, expected",
    [((None, None, {}, 16)), (5, None, {}, 5), (40, None, {}, 40), (None, 8, {}, 8), (None, 40, {}, 16),
     (None, 8, {"max_tokens": 30}, 8), (None, None, {"max_tokens": 30}, 30)],
)
def test_output_limits_for_completions(default, limit, fields, expected):
    assert OutputLimits(default, limit).max_tokens(comp(**fields), room=100) == expected


@given(default=st.none() | st.integers(1, 300), limit=st.none() | st.integers(1, 300),
       asked=st.none() | st.integers(1, 300), room=st.integers(1, 300), completions=st.booleans())
def test_output_limits_properties(default, limit, asked, room, completions):
    if default is not None and limit is not None and default > limit:
        with pytest.raises(ValueError, match="exceeds"):
            OutputLimits(default, limit)
        return
    fields = {} if asked is None else {"max_tokens": asked}
    req = comp(**fields) if completions else chat(**fields)
    got = OutputLimits(default, limit).max_tokens(req, room)
    assert 1 <= got <= room
    if limit is not None:
        assert got <= limit
    if asked is not None:  # the request's own value, unless the cap or the context cut it
        assert got == min(asked, room, limit or asked)


@pytest.mark.parametrize("kwargs", [{"default_max_tokens": 0}, {"max_tokens_limit": -1}, {"max_tokens_limit": 2.5},
                                    {"max_tokens_limit": True}, {"default_max_tokens": 9, "max_tokens_limit": 8}])
def test_output_limits_refuse_bad_values(kwargs):
    with pytest.raises(ValueError):
        OutputLimits(**kwargs)


@pytest.mark.parametrize(
    "field, value",
    [
        ("echo", 1),
        ("logprobs", 6),
        ("logprobs", -1),
        ("logprobs", True),  # chat's boolean form is the wrong type here
        ("suffix", "x"),
        ("suffix", 3),
        ("max_tokens", 0),  # 0 only with echo
        ("max_tokens", -1),
    ],
)
def test_completion_unsupported_or_bad(field, value):
    assert error_of(comp, **{field: value}).param == field


def test_too_many_completions():
    err = error_of(CompletionRequest.from_json, {"prompt": ["a"] * 10, "n": 30})
    assert err.param == "prompt"


# --- errors and responses ------------------------------------------------------------------------


def test_error_body_shape():
    assert error_body("boom", param="x") == {
        "error": {"message": "boom", "type": "invalid_request_error", "param": "x", "code": None}
    }
    err = ProtocolError("nope", status=404, code="model_not_found", param="model")
    assert err.body()["error"] == {"message": "nope", "type": "invalid_request_error", "param": "model", "code": "model_not_found"}


def test_response_builders():
    u = R.usage(10, 5, cached_tokens=4)
    assert u == {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15, "prompt_tokens_details": {"cached_tokens": 4}}
    obj = R.chat_completion("chatcmpl-1", 1, "m", [R.chat_choice(0, "hi", "stop")], u)
    assert obj["object"] == "chat.completion" and obj["system_fingerprint"]
    assert obj["choices"][0]["message"] == {"role": "assistant", "content": "hi", "refusal": None}
    chunk = R.chat_chunk("chatcmpl-1", 1, "m", [R.chat_chunk_choice(0, role="assistant", content="")])
    assert chunk["object"] == "chat.completion.chunk" and chunk["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "usage" not in chunk
    assert R.chat_chunk_choice(0, finish_reason="length")["delta"] == {}
    comp_obj = R.completion("cmpl-1", 1, "m", [R.completion_choice(0, "x", None)], None)
    assert comp_obj["object"] == "text_completion" and "usage" not in comp_obj
    models = R.model_list([R.model_card("m", 1, 2048)])
    assert models == {"object": "list", "data": [{"id": "m", "object": "model", "created": 1, "owned_by": "pyserve", "max_model_len": 2048}]}
    assert json.loads(R.dumps({"t": "é\n"})) == {"t": "é\n"}
    assert b"\n" not in R.dumps({"t": "a\nb"})  # safe inside one SSE data line
    assert R.new_id("chatcmpl") != R.new_id("chatcmpl")


def test_lone_surrogates_refused_pairs_accepted():
    assert parse_json_object(b'{"a": "\\ud83c\\udf89"}') == {"a": "\U0001f389"}
    error_of(parse_json_object, b'{"messages": [{"role": "user", "content": "\\ud800"}]}')
    error_of(parse_json_object, b'{"\\udfff": 1}')


# --- issue 3: parameters ---------------------------------------------------------------------------


def test_chat_logprobs_fields():
    assert chat().logprobs is None
    assert chat(logprobs=False).logprobs is None
    assert chat(logprobs=True).logprobs == 0
    assert chat(logprobs=True, top_logprobs=20).logprobs == 20
    assert chat(logprobs=True, top_logprobs=None).logprobs == 0
    assert chat(logprobs=False, top_logprobs=None).logprobs is None
    assert error_of(chat, logprobs=True, top_logprobs=21).param == "top_logprobs"
    assert error_of(chat, logprobs=True, top_logprobs=-1).param == "top_logprobs"
    assert error_of(chat, logprobs=False, top_logprobs=0).param == "top_logprobs"


def test_completion_logprobs_and_echo_fields():
    req = comp(logprobs=0)
    assert req.logprobs == 0 and req.echo is False
    req = comp(logprobs=5, echo=True, max_tokens=0)
    assert (req.logprobs, req.echo, req.max_tokens) == (5, True, 0)
    assert comp(logprobs=None).logprobs is None


def test_min_tokens():
    assert chat(min_tokens=3, max_tokens=3).min_tokens == 3
    assert chat(min_tokens=100).min_tokens == 100  # no max_tokens: checked against the context later
    assert error_of(chat, min_tokens=4, max_completion_tokens=3).param == "min_tokens"
    assert error_of(comp, min_tokens=17, max_tokens=16).param == "min_tokens"
    # No max_tokens: the budget (16, or the operator's default) is not the request's; min_tokens is
    # clamped to it when the sampling params are built, as chat's is to the context.
    assert comp(min_tokens=17).min_tokens == 17


@pytest.mark.parametrize("key", ["a", "1.5", " 1", "1_0", "１", "", "99999999999999999999999"])
def test_logit_bias_keys_must_be_plain_token_ids(key):
    assert error_of(chat, logit_bias={key: 1}).param == "logit_bias"


def test_logit_bias_accepted():
    assert chat(logit_bias={"0": 100, "12": -100, "7": 0.5}).logit_bias == {0: 100.0, 12: -100.0, 7: 0.5}
    assert error_of(chat, logit_bias={"-1": 1}).param == "logit_bias"
    assert error_of(chat, logit_bias={"1": "5"}).param == "logit_bias"
    assert error_of(chat, logit_bias={"1": True}).param == "logit_bias"


def test_accepted_values_that_need_no_feature():
    # None of these ask for something we cannot do.
    req = chat(
        best_of=3, n=3, tool_choice="none", function_call="auto", response_format={"type": "text"},
        tools=[], repetition_penalty=5.0, stop=["s"] * 64, user="someone",
    )
    assert req.n == 3 and req.repetition_penalty == 5.0 and len(req.stop) == 64 and req.user == "someone"
    assert comp(best_of=1).n == 1
    assert comp(suffix="").echo is False


def test_penalty_ranges():
    req = chat(presence_penalty=2, frequency_penalty=-2, repetition_penalty=0.01)
    assert (req.presence_penalty, req.frequency_penalty, req.repetition_penalty) == (2.0, -2.0, 0.01)
    for name, bad in [("presence_penalty", 2.5), ("frequency_penalty", 2.01), ("repetition_penalty", 0)]:
        assert error_of(chat, **{name: bad}).param == name


def test_chat_ignores_completions_only_fields():
    # Unknown to chat: ignored like any other extra field.
    req = chat(echo=True, suffix="x", prompt="p")
    assert req.echo is False


# --- issue 3: logprob shapes --------------------------------------------------------------------------


def _entry(text, lp, top=(), offset=0, raw=None):
    tok = R.TokenInfo(text, raw if raw is not None else text.encode(), lp)
    return R.LogprobEntry(tok, None if top is None else [R.TokenInfo(t, t.encode(), l) for t, l in top], offset)


def test_chat_logprobs_shape():
    entries = [_entry("Hi", -0.5, [("Hi", -0.5), ("Hello", -1.5)]), _entry(" \ufffd", -0.25, [], raw=b" \xe6")]
    assert R.chat_logprobs(entries) == {
        "content": [
            {
                "token": "Hi",
                "logprob": -0.5,
                "bytes": [72, 105],
                "top_logprobs": [
                    {"token": "Hi", "logprob": -0.5, "bytes": [72, 105]},
                    {"token": "Hello", "logprob": -1.5, "bytes": list(b"Hello")},
                ],
            },
            {"token": " \ufffd", "logprob": -0.25, "bytes": [32, 0xE6], "top_logprobs": []},
        ],
        "refusal": None,
    }


def test_completion_logprobs_shape():
    entries = [
        _entry("<s>", None, None, 0),  # first echoed prompt token: nothing predicts it
        _entry("a", -1.0, [("b", -0.5), ("c", -2.0)], 0),
        _entry("b", float("-inf"), [("b", -0.1)], 1),
        _entry("c", -0.2, [], 2),
    ]
    out = R.completion_logprobs(entries)
    assert out == {
        "tokens": ["<s>", "a", "b", "c"],
        "token_logprobs": [None, -1.0, R.MIN_LOGPROB, -0.2],
        # top k plus the chosen token (k + 1 entries at most), most likely first
        "top_logprobs": [None, {"b": -0.5, "a": -1.0, "c": -2.0}, {"b": -0.1}, {"c": -0.2}],
        "text_offset": [0, 0, 1, 2],
    }
    assert list(out["top_logprobs"][1]) == ["b", "a", "c"]
    json.loads(R.dumps(out))  # -inf became a finite number: valid JSON


def test_logprobs_clamped():
    assert R.clamp_logprob(float("-inf")) == R.MIN_LOGPROB
    assert R.clamp_logprob(float("nan")) == R.MIN_LOGPROB
    assert R.clamp_logprob(1e-9) == 0.0 and R.clamp_logprob(-3.5) == -3.5 and R.clamp_logprob(None) is None


def test_deeply_nested_json_is_a_400_not_a_recursion_error() -> None:
    from pyserve.protocol.errors import ProtocolError
    from pyserve.protocol.requests import parse_json_object

    body = b'{"messages": [{"role": "user", "content": "hi", "tool_calls": ' + b"[" * 500 + b"]" * 500 + b"}]}"
    with pytest.raises(ProtocolError) as e:
        parse_json_object(body)
    assert e.value.status == 400 and "deeper" in str(e.value)
    parse_json_object(b'{"a": ' + b"[" * 30 + b"]" * 30 + b"}")  # ordinary nesting is fine
