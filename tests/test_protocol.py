"""Request parsing/validation and response builders (pure data, no I/O)."""
from __future__ import annotations

import json

import pytest

from pyserve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ProtocolError,
    error_body,
    parse_json_object,
)
from pyserve.protocol import responses as R

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
        ("stop", ["s"] * 17),
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
        ("response_format", {"type": "json_object"}),
        ("tools", [{"type": "function", "function": {"name": "f"}}]),
        ("logprobs", True),
        ("best_of", 2),
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
    assert comp().max_tokens == 16
    assert comp(max_tokens=3).max_tokens == 3


@pytest.mark.parametrize("field, value", [("echo", True), ("logprobs", 2), ("suffix", "x"), ("max_tokens", 0)])
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
    assert obj["choices"][0]["message"] == {"role": "assistant", "content": "hi"}
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
