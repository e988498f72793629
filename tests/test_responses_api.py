"""OpenAI's Responses API: requests read as the chat request they amount to, and the SDK's
responses.create / stream / parse / retrieve / delete against `python -m pyserve` on the default
model, with previous_response_id continuing a stored conversation through the prefix cache."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from openai import OpenAI
from pydantic import BaseModel

from pyserve.api.response_store import ResponseStore
from pyserve.model.loader import default_model_path
from pyserve.protocol.errors import ProtocolError
from pyserve.protocol.responses_api import ResponsesRequest
from server_process import running_server

MODEL_ID = "SmolLM2-135M-Instruct.Q4_1"
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


# --- reading requests ----------------------------------------------------------------------------


def test_input_items_become_chat_messages() -> None:
    rr = ResponsesRequest.from_json({
        "instructions": "Be brief.",
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "Weather in Oslo"}, {"type": "input_text", "text": "?"}]},
            {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
            {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": '{"city": "Bergen"}'},
            {"type": "function_call_output", "call_id": "c1", "output": "-3 C"},
            {"type": "reasoning", "summary": []},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Cold."}]},
        ],
        "max_output_tokens": 7, "tools": [WEATHER], "tool_choice": {"type": "function", "name": "get_weather"},
    }, previous=[{"role": "user", "content": "earlier"}, {"role": "assistant", "content": "reply"}])
    msgs = rr.chat.messages
    assert msgs[0] == {"role": "system", "content": "Be brief."}  # instructions first, this response only
    assert [m["content"] for m in msgs[1:3]] == ["earlier", "reply"]  # the stored conversation
    assert msgs[3] == {"role": "user", "content": "Weather in Oslo?"}
    assert [c["id"] for c in msgs[4]["tool_calls"]] == ["c1", "c2"]  # parallel calls: one assistant turn
    assert msgs[5] == {"role": "tool", "tool_call_id": "c1", "content": "-3 C"}
    assert msgs[6]["content"] == "Cold."
    assert rr.chat.max_tokens == 7
    assert rr.chat.tools[0]["function"]["name"] == "get_weather"
    assert rr.chat.tool_choice == {"type": "function", "function": {"name": "get_weather"}}
    assert rr.input_messages == msgs[3:]


def test_text_format_is_response_format() -> None:
    rr = ResponsesRequest.from_json({"input": "x", "text": {"format": {"type": "json_schema", "name": "x",
                                                                       "schema": {"type": "object"}, "strict": True}}})
    assert rr.chat.constraint.kind == "json_schema"
    assert json.loads(rr.chat.constraint.data) == {"type": "object", "additionalProperties": False}


def test_response_format_and_tool_choice_together_are_refused() -> None:
    with pytest.raises(ProtocolError):
        ResponsesRequest.from_json({"input": "x", "tools": [WEATHER], "tool_choice": "required",
                                    "text": {"format": {"type": "json_object"}}})


@pytest.mark.parametrize("data, param", [
    ({}, "input"),
    ({"input": 3}, "input"),
    ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content[0]"),
    ({"input": [{"type": "computer_call"}]}, "input[0].type"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0]"),
    ({"input": "x", "text": {"format": {"type": "xml"}}}, "text.format.type"),
    ({"input": "x", "temperature": 9}, "temperature"),
    ({"input": "x", "store": "yes"}, "store"),
    ({"input": "x", "metadata": {"k": "v" * 513}}, "metadata"),
    ({"input": "x", "metadata": {str(i): "v" for i in range(17)}}, "metadata"),
    ({"input": "x", "top_logprobs": 3}, "top_logprobs"),
])
def test_bad_requests_name_the_responses_field(data, param) -> None:
    with pytest.raises(ProtocolError) as info:
        ResponsesRequest.from_json(data)
    assert info.value.param == param


def test_store_is_bounded_and_hands_out_copies() -> None:
    store = ResponseStore(max_responses=2)
    for i in range(3):
        store.put(f"r{i}", {"id": f"r{i}"}, [{"role": "user", "content": str(i)}])
    assert store.get("r0") is None and len(store) == 2
    small = ResponseStore(max_bytes=1000)
    for i in range(5):
        small.put(f"r{i}", {"id": f"r{i}"}, [{"role": "user", "content": "x" * 300}])
    assert len(small) == 2 and small.get("r4") is not None and small.get("r2") is None  # bytes bound it
    got = store.get("r2")
    got.conversation.append({"role": "user", "content": "changed"})
    assert len(store.get("r2").conversation) == 1
    assert store.delete("r1") and not store.delete("r1")


# --- through the SDK ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client():
    with running_server(default_model_path()) as url:
        yield OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)


def test_create_retrieve_continue_delete(client) -> None:
    first = client.responses.create(model=MODEL_ID, input="Say hello in French.", max_output_tokens=300, temperature=0)
    assert first.status == "completed" and first.output_text
    assert first.output[0].type == "message" and first.usage.output_tokens > 0
    again = client.responses.retrieve(first.id)
    assert again.id == first.id and again.output_text == first.output_text
    second = client.responses.create(model=MODEL_ID, input="Now in Spanish.", previous_response_id=first.id,
                                     max_output_tokens=300, temperature=0)
    # the earlier turns were resent from the store, and the prefix cache served them
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens - 16
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError) as info:
        client.responses.create(model=MODEL_ID, input="x", previous_response_id=first.id)
    assert info.value.body["param"] == "previous_response_id"
    cut = client.responses.create(model=MODEL_ID, input="Tell me a long story.", max_output_tokens=5, store=False)
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(cut.id)


def test_stream_sends_the_responses_event_sequence(client) -> None:
    events = list(client.responses.create(model=MODEL_ID, input="Count to five.", max_output_tokens=300,
                                          temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert events[2].item.content == []  # the part arrives with content_part.added
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text and events[-1].response.output_text == text
    with client.responses.stream(model=MODEL_ID, input="Count to five.", max_output_tokens=300, temperature=0) as s:
        for _ in s:
            pass
        assert s.get_final_response().output_text == text


class City(BaseModel):
    name: str
    country: str


def test_text_format_json_schema_and_parse(client) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
              "required": ["city", "country"], "additionalProperties": False}
    r = client.responses.create(model=MODEL_ID, input="Name a city.", max_output_tokens=200, temperature=0,
                                text={"format": {"type": "json_schema", "name": "c", "schema": schema, "strict": True}})
    jsonschema.validate(json.loads(r.output_text), schema)
    parsed = client.responses.parse(model=MODEL_ID, input="Name a city.", text_format=City, max_output_tokens=200,
                                    temperature=0)
    assert isinstance(parsed.output_parsed, City)


@pytest.mark.parametrize("stream", [False, True])
def test_forced_function_call_and_its_result(client, stream) -> None:
    kw = dict(model=MODEL_ID, input="What is the weather in Paris?", tools=[WEATHER], tool_choice="required",
              parallel_tool_calls=False, max_output_tokens=100, temperature=0)
    if stream:
        events = list(client.responses.create(stream=True, **kw))
        assert events[-1].type == "response.completed"
        final = events[-1].response
        deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
        assert deltas == final.output[0].arguments
    else:
        final = client.responses.create(**kw)
    call = final.output[0]
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    follow = client.responses.create(model=MODEL_ID, previous_response_id=final.id, tools=[WEATHER],
                                     input=[{"type": "function_call_output", "call_id": call.call_id,
                                             "output": "18 C and sunny"}], max_output_tokens=40, temperature=0)
    assert follow.status in ("completed", "incomplete") and follow.output


def test_an_engine_error_mid_stream_ends_with_error_and_response_failed() -> None:
    """Headers are out when the engine fails: an `error` event, then `response.failed` (what the
    SDK's stream helper waits for), and no `[DONE]`, which the Responses API does not send."""
    from api_fakes import FakeEngine
    from live_server import pyserve_server, request

    from pyserve.api import create_app

    engine = FakeEngine(reply="Hello there, how are you?")
    engine.error_after = 3
    with pyserve_server(create_app(engine)) as srv:
        status, _, raw = request(srv.url, "POST", "/v1/responses", {"input": "hi", "stream": True})
    assert status == 200
    blocks = [b for b in raw.decode().split("\n\n") if b]
    names = [b.split("\n")[0].removeprefix("event: ") for b in blocks]
    events = [json.loads(b.split("\n")[1].removeprefix("data: ")) for b in blocks]
    assert names == [e["type"] for e in events]  # each data line under its event line
    assert names[:2] == ["response.created", "response.in_progress"] and "response.output_text.delta" in names
    assert names[-2:] == ["error", "response.failed"]
    assert events[-1]["response"]["status"] == "failed" and events[-1]["response"]["error"]["code"] == "server_error"
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert b"[DONE]" not in raw
