"""Structured output and tool calls through clients nobody here wrote, against `python -m pyserve`
on the default model: the OpenAI SDK's parse() with a pydantic model, forced tool calls (whole and
streamed), LangChain's with_structured_output(method="json_schema") and bind_tools, and the 400s
a bad schema or tool_choice gets."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from openai import OpenAI
from pydantic import BaseModel, Field

from pyserve.model.loader import default_model_path
from server_process import running_server

MODEL_ID = "SmolLM2-135M-Instruct.Q4_1"

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}
TOOLS = [WEATHER, ADD]
ASK_WEATHER = [{"role": "user", "content": "What is the weather like in Paris today?"}]


class City(BaseModel):
    name: str
    country: str
    population: int = Field(ge=0)


@pytest.fixture(scope="module")
def server():
    with running_server(default_model_path()) as url:
        yield url


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=120)


def schema_of(tool: dict) -> dict:
    return tool["function"]["parameters"]


def test_sdk_parse_fills_a_pydantic_model(client) -> None:
    done = client.beta.chat.completions.parse(
        model=MODEL_ID, messages=[{"role": "user", "content": "Tell me about Paris as JSON."}],
        response_format=City, max_tokens=200, temperature=0)
    city = done.choices[0].message.parsed
    assert isinstance(city, City) and city.population >= 0
    assert done.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_required_and_named_tool_choice_always_give_valid_calls(client, stream, temperature) -> None:
    choices = ["required", {"type": "function", "function": {"name": "add"}},
               {"type": "function", "function": {"name": "get_weather"}}]
    for k, choice in enumerate(choices):
        kw = dict(model=MODEL_ID, messages=ASK_WEATHER, tools=TOOLS, tool_choice=choice, max_tokens=200,
                  temperature=temperature, seed=k, parallel_tool_calls=False)
        if not stream:
            r = client.chat.completions.create(**kw)
            calls = [(t.id, t.function.name, t.function.arguments) for t in r.choices[0].message.tool_calls]
            reason = r.choices[0].finish_reason
        else:
            acc: dict[int, list] = {}
            reason = None
            for chunk in client.chat.completions.create(stream=True, **kw):
                for c in chunk.choices:
                    for d in c.delta.tool_calls or []:
                        slot = acc.setdefault(d.index, [None, None, ""])
                        if d.id:
                            assert slot[0] is None, "a call's id comes once"
                            slot[0] = d.id
                        if d.function and d.function.name:
                            slot[1] = d.function.name
                        slot[2] += (d.function.arguments or "") if d.function else ""
                    reason = c.finish_reason or reason
            calls = [tuple(acc[i]) for i in sorted(acc)]
        assert reason == "tool_calls" and len(calls) == 1, (choice, calls)
        call_id, name, arguments = calls[0]
        assert call_id and call_id.startswith("call_")
        if isinstance(choice, dict):
            assert name == choice["function"]["name"]
        tool = {t["function"]["name"]: t for t in TOOLS}[name]
        jsonschema.validate(json.loads(arguments), schema_of(tool))


def test_parallel_required_calls_are_each_valid(client) -> None:
    r = client.chat.completions.create(model=MODEL_ID, messages=ASK_WEATHER, tools=TOOLS, tool_choice="required",
                                       max_tokens=120, temperature=0)
    calls = r.choices[0].message.tool_calls
    assert calls
    for t in calls:
        jsonschema.validate(json.loads(t.function.arguments), schema_of({x["function"]["name"]: x for x in TOOLS}[t.function.name]))
    assert len({t.id for t in calls}) == len(calls)


def test_a_tool_conversation_renders_and_answers(client) -> None:
    messages = ASK_WEATHER + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                             "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"},
    ]
    r = client.chat.completions.create(model=MODEL_ID, messages=messages, tools=TOOLS, max_tokens=40, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    r = client.chat.completions.create(model=MODEL_ID, messages=messages, tools=TOOLS, tool_choice="none",
                                       max_tokens=20, temperature=0)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content


def test_bad_schemas_and_tool_choices_are_400s(client) -> None:
    def bad(param: str, **kw) -> None:
        kw.setdefault("messages", ASK_WEATHER)
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=MODEL_ID, max_tokens=5, **kw)
        assert info.value.status_code == 400
        assert info.value.body["param"] == param, info.value.body

    bad("response_format", response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 7}}})
    bad("guided_regex", extra_body={"guided_regex": "(unclosed"})
    bad("tool_choice", tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})
    bad("tool_choice", tool_choice="required")
    bad("tools[0].function.name", tools=[{"type": "function", "function": {"name": "bad name!"}}])
    bad("tool_choice", tools=TOOLS, tool_choice="required", response_format={"type": "json_object"})
    for calls in ([{"function": "oops"}], ["x"], [{"type": "function", "function": {"name": "f", "arguments": 3}}]):
        bad("messages[1].tool_calls[0]" if calls != [{"type": "function", "function": {"name": "f", "arguments": 3}}]
            else "messages[1].tool_calls[0].function.arguments",
            messages=ASK_WEATHER + [{"role": "assistant", "content": None, "tool_calls": calls}], tools=TOOLS)
    # the server still serves
    assert client.chat.completions.create(model=MODEL_ID, messages=ASK_WEATHER, max_tokens=3).choices


@pytest.mark.parametrize("stream", [False, True])
def test_legacy_functions_get_a_function_call(client, stream) -> None:
    kw = dict(model=MODEL_ID, messages=ASK_WEATHER, functions=[ADD["function"]], function_call={"name": "add"},
              max_tokens=100, temperature=0)
    if not stream:
        r = client.chat.completions.create(**kw)
        fc, reason = r.choices[0].message.function_call, r.choices[0].finish_reason
        name, arguments = fc.name, fc.arguments
        assert r.choices[0].message.tool_calls is None
    else:
        name, arguments, reason = None, "", None
        for chunk in client.chat.completions.create(stream=True, **kw):
            for c in chunk.choices:
                assert not c.delta.tool_calls
                if c.delta.function_call:
                    name = c.delta.function_call.name or name
                    arguments += c.delta.function_call.arguments or ""
                reason = c.finish_reason or reason
    assert (name, reason) == ("add", "function_call")
    jsonschema.validate(json.loads(arguments), schema_of(ADD))


def test_completions_take_a_json_schema_too(client) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"],
              "additionalProperties": False}
    r = client.completions.create(model=MODEL_ID, prompt="2 + 2 = ? Reply in JSON: ", max_tokens=50, temperature=0,
                                  extra_body={"response_format": {"type": "json_schema",
                                                                  "json_schema": {"name": "a", "schema": schema}}})
    jsonschema.validate(json.loads(r.choices[0].text), schema)


# --- LangChain ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_model(server):
    langchain_openai = pytest.importorskip("langchain_openai")
    return langchain_openai.ChatOpenAI(base_url=server + "/v1", api_key="none", model=MODEL_ID, temperature=0,
                                       max_tokens=200, max_retries=0, timeout=120)


def test_langchain_with_structured_output_json_schema(chat_model) -> None:
    structured = chat_model.with_structured_output(City, method="json_schema")
    city = structured.invoke("Tell me about Rome.")
    assert isinstance(city, City)


def test_langchain_bind_tools(chat_model) -> None:
    from langchain_core.tools import tool

    @tool
    def multiply(a: int, b: int) -> int:
        """Multiply two integers."""
        return a * b

    msg = chat_model.bind_tools([multiply], tool_choice="multiply").invoke("What is 6 times 7?")
    assert len(msg.tool_calls) == 1
    call = msg.tool_calls[0]
    assert call["name"] == "multiply" and set(call["args"]) == {"a", "b"}
    assert all(isinstance(v, int) for v in call["args"].values())
    assert multiply.invoke(call["args"]) == call["args"]["a"] * call["args"]["b"]
