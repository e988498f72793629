"""Letting a chat template that knows nothing of tools render a tool conversation: the tools as a
system prompt asking for Hermes-style calls, and assistant `tool_calls` / `tool` results rewritten
into plain user and assistant turns."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pyserve.protocol.tool_calls.formats import HERMES_CLOSE, HERMES_OPEN
from pyserve.protocol.tool_calls.parse import INVALID, decode_whole, dumps


def function_of(tool: Mapping[str, Any]) -> Mapping[str, Any]:
    """The function object of an OpenAI tool ({"type": "function", "function": {...}})."""
    function = tool.get("function")
    return function if isinstance(function, Mapping) else tool


def parameters_of(function: Mapping[str, Any]) -> Any:
    parameters = function.get("parameters")
    return {"type": "object"} if parameters is None else parameters


def tools_system_prompt(tools: Iterable[Mapping[str, Any]]) -> str:
    """A system-message text offering `tools` to the model, asking for Hermes-style calls."""
    signatures = []
    for tool in tools:
        function = function_of(tool)
        signature: dict[str, Any] = {"name": function.get("name")}
        if function.get("description"):
            signature["description"] = function["description"]
        signature["parameters"] = parameters_of(function)
        signatures.append(dumps({"type": "function", "function": signature}))
    listing = "\n".join(signatures)
    return (
        "# Tools\n\n"
        "You may call one or more functions to assist with the user query.\n\n"
        "The functions you may call are listed within <tools></tools> XML tags, "
        "with a JSON schema for the arguments of each:\n"
        f"<tools>\n{listing}\n</tools>\n\n"
        "To call a function, write a JSON object with its name and arguments within "
        "<tool_call></tool_call> XML tags, one block per call:\n"
        f'{HERMES_OPEN}\n{{"name": <function-name>, "arguments": <args-json-object>}}\n{HERMES_CLOSE}\n\n'
        "If no function is needed, answer in plain text."
    )


def add_tools_system_prompt(messages: list[dict[str, Any]], tools: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """`messages` with `tools_system_prompt` ahead of the first system message's text (or as one)."""
    prompt = tools_system_prompt(tools)
    messages = list(messages)
    if messages and messages[0].get("role") in ("system", "developer"):
        first = dict(messages[0])
        content = first.get("content")
        if isinstance(content, list):
            first["content"] = [{"type": "text", "text": prompt + "\n\n"}, *content]
        else:
            first["content"] = f"{prompt}\n\n{content}" if content else prompt
        messages[0] = first
    else:
        messages.insert(0, {"role": "system", "content": prompt})
    return messages


def _text_of(content: Any) -> str:
    """A message's content as text (a string, or the text parts of a list)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part["text"] for part in content if isinstance(part, Mapping) and isinstance(part.get("text"), str))
    return str(content)


def _hermes_block(tool_call: Mapping[str, Any]) -> str:
    function = tool_call.get("function") or {}
    arguments = function.get("arguments")
    if isinstance(arguments, str):  # OpenAI messages carry the arguments as a JSON text
        decoded = decode_whole(arguments)
        arguments = arguments if decoded is INVALID else decoded
    call: dict[str, Any] = {"name": function.get("name"), "arguments": {} if arguments is None else arguments}
    return f"{HERMES_OPEN}\n{dumps(call)}\n{HERMES_CLOSE}"


def _tool_response(message: Mapping[str, Any]) -> str:
    header = ""
    if message.get("tool_call_id"):
        header += f"tool_call_id: {message['tool_call_id']}\n"
    if isinstance(message.get("name"), str):
        header += f"name: {message['name']}\n"
    return f"<tool_response>\n{header}{_text_of(message.get('content'))}\n</tool_response>"


def render_tool_messages_fallback(messages: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rewrites a tool conversation into plain user/assistant messages any template renders.

    An assistant message's `tool_calls` become <tool_call> blocks in its content; each run of
    `tool` (or legacy `function`) messages becomes one user message of <tool_response> blocks, so
    templates that insist on user/assistant alternation still accept the conversation.
    """
    out: list[dict[str, Any]] = []
    responses: list[str] = []
    for message in messages:
        role = message.get("role")
        if role in ("tool", "function"):
            responses.append(_tool_response(message))
            continue
        if responses:
            out.append({"role": "user", "content": "\n".join(responses)})
            responses = []
        if role == "assistant" and message.get("tool_calls"):
            text = _text_of(message.get("content"))
            blocks = [_hermes_block(call) for call in message["tool_calls"]]
            rewritten = {key: value for key, value in message.items() if key not in ("tool_calls", "content")}
            rewritten["content"] = "\n".join([text, *blocks] if text else blocks)
            out.append(rewritten)
        else:
            out.append(dict(message))
    if responses:
        out.append({"role": "user", "content": "\n".join(responses)})
    return out
