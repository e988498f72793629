"""OpenAI's Responses API (`POST /v1/responses`): the request, read as the chat request it amounts to,
and the objects the answer is made of.

A Responses request carries the same things as a chat completion under other names: `input` (a
string, or items: messages with input_text / output_text parts, `function_call` and
`function_call_output` items) and `instructions` are the messages; `max_output_tokens` is
max_tokens; `text.format` is response_format (flattened: {"type": "json_schema", "name", "schema",
"strict"}); function tools are flat ({"type": "function", "name", "parameters"}). We translate it
into a ChatCompletionRequest so that both endpoints validate, render, constrain and sample alike;
errors name the Responses field.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from pyserve.protocol.errors import ProtocolError
from pyserve.protocol.requests import ChatCompletionRequest

_PASSED = ("model", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "user", "parallel_tool_calls",
           "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "stream", "ignore_eos",
           "min_tokens", "skip_special_tokens", "stop_token_ids")
# Chat field -> the Responses field an error should name.
_PARAM_NAMES = {"messages": "input", "max_tokens": "max_output_tokens", "max_completion_tokens": "max_output_tokens",
                "response_format": "text.format", "top_logprobs": "top_logprobs"}


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(24)}"


def _text_parts(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ProtocolError(f"'{where}' must be a string or an array of content parts.", param=where)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text") and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            texts.append(part["refusal"])
        else:
            raise ProtocolError(f"'{where}[{j}]': content part type {kind!r} is not supported (text only).",
                                param=f"{where}[{j}]")
    return "".join(texts)


def input_messages(value: Any) -> list[dict[str, Any]]:
    """`input` as chat messages (assistant tool calls and tool results included)."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise ProtocolError("'input' must be a string or an array of input items.", param="input")
    out: list[dict[str, Any]] = []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise ProtocolError(f"'{where}' must be an object.", param=where)
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise ProtocolError(f"'{where}.role' must be user, assistant, system or developer, got {role!r}.",
                                    param=f"{where}.role")
            out.append({"role": role, "content": _text_parts(item.get("content"), f"{where}.content")})
        elif kind == "function_call":
            name, call_id, arguments = item.get("name"), item.get("call_id"), item.get("arguments", "{}")
            if not isinstance(name, str) or not isinstance(call_id, str) or not isinstance(arguments, str):
                raise ProtocolError(f"'{where}' needs string 'name', 'call_id' and 'arguments'.", param=where)
            call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
            if out and out[-1]["role"] == "assistant" and "tool_calls" in out[-1]:
                out[-1]["tool_calls"].append(call)  # parallel calls: one assistant turn
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            call_id, output = item.get("call_id"), item.get("output")
            if not isinstance(call_id, str):
                raise ProtocolError(f"'{where}.call_id' must be a string.", param=f"{where}.call_id")
            text = output if isinstance(output, str) else _text_parts(output, f"{where}.output")
            out.append({"role": "tool", "tool_call_id": call_id, "content": text})
        elif kind in ("reasoning", "item_reference"):
            continue  # nothing of ours to replay
        else:
            raise ProtocolError(f"'{where}.type' {kind!r} is not supported (message, function_call, "
                                f"function_call_output).", param=f"{where}.type")
    return out


def _tools(value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ProtocolError("'tools' must be an array.", param="tools")
    out = []
    for i, tool in enumerate(value):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise ProtocolError(f"'tools[{i}]': tool type {kind!r} is not supported (function tools only).",
                                param=f"tools[{i}]")
        out.append({"type": "function", "function": {k: tool[k] for k in ("name", "description", "parameters", "strict")
                                                       if k in tool and tool[k] is not None}})
    return out


def _tool_choice(value: Any) -> Any:
    if isinstance(value, dict) and value.get("type") == "function" and "function" not in value:
        return {"type": "function", "function": {"name": value.get("name")}}
    return value


def _text_format(text: Any) -> dict[str, Any] | None:
    if text is None:
        return None
    if not isinstance(text, dict):
        raise ProtocolError("'text' must be an object.", param="text")
    fmt = text.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise ProtocolError("'text.format' must be an object.", param="text.format")
    if fmt.get("type") == "json_schema":
        spec = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        return {"type": "json_schema", "json_schema": spec}
    return fmt


@dataclass
class ResponsesRequest:
    chat: ChatCompletionRequest  # what the request amounts to (messages = previous turns excluded)
    input_messages: list[dict[str, Any]]
    instructions: str | None = None
    previous_response_id: str | None = None
    store: bool = True
    metadata: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)  # echoed back in the response object

    @classmethod
    def from_json(cls, data: dict[str, Any], previous: list[dict[str, Any]] | None = None) -> "ResponsesRequest":
        """`previous`: the stored conversation `previous_response_id` continues (None: none)."""
        if "input" not in data:
            raise ProtocolError("'input' is a required property.", param="input")
        instructions = data.get("instructions")
        if instructions is not None and not isinstance(instructions, str):
            raise ProtocolError("'instructions' must be a string.", param="instructions")
        store = data.get("store", True)
        if not isinstance(store, bool):
            raise ProtocolError("'store' must be a boolean.", param="store")
        metadata = _metadata(data.get("metadata"))
        prev_id = data.get("previous_response_id")
        if prev_id is not None and not isinstance(prev_id, str):
            raise ProtocolError("'previous_response_id' must be a string.", param="previous_response_id")
        new = input_messages(data["input"])
        # Instructions apply to this response only (OpenAI: not carried over by previous_response_id).
        messages = ([{"role": "system", "content": instructions}] if instructions else []) + list(previous or []) + new
        if not messages:
            raise ProtocolError("'input' must contain at least one item.", param="input")
        chat = {k: data[k] for k in _PASSED if k in data}
        chat["messages"] = messages
        if data.get("max_output_tokens") is not None:
            chat["max_tokens"] = data["max_output_tokens"]
        if data.get("top_logprobs"):
            raise ProtocolError("'top_logprobs' is not supported yet on /v1/responses.", param="top_logprobs")
        fmt = _text_format(data.get("text"))
        if fmt is not None:
            chat["response_format"] = fmt
        tools = _tools(data.get("tools"))
        if tools:
            chat["tools"] = tools
        if data.get("tool_choice") is not None:
            chat["tool_choice"] = _tool_choice(data["tool_choice"])
        try:
            req = ChatCompletionRequest.from_json(chat)
        except ProtocolError as e:
            e.param = _responses_param(e.param)
            raise
        # This input as the chat parser normalised it (what the store keeps for the next turn).
        new = req.messages[len(messages) - len(new):]
        return cls(req, new, instructions, prev_id, store, metadata, data)


def _metadata(value: Any) -> dict[str, str]:
    """OpenAI's bounds: at most 16 pairs, keys up to 64 characters, string values up to 512
    (the store keeps it: an unbounded one would be memory for anyone to fill)."""
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > 16:
        raise ProtocolError("'metadata' must be an object of at most 16 pairs.", param="metadata")
    for k, v in value.items():
        if len(k) > 64 or not isinstance(v, str) or len(v) > 512:
            raise ProtocolError("'metadata' keys must be at most 64 characters and values strings of at most 512.",
                                param="metadata")
    return dict(value)


def _responses_param(param: str | None) -> str | None:
    if param is None:
        return None
    head, dot, rest = param.partition(".")
    base = head.split("[")[0]
    if base in _PARAM_NAMES:
        return _PARAM_NAMES[base] + head[len(base):] + dot + rest
    return param


# --- the answer --------------------------------------------------------------------------------


def output_message(text: str, item_id: str, status: str = "completed") -> dict[str, Any]:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def output_function_call(call_id: str, name: str, arguments: str, item_id: str,
                         status: str = "completed") -> dict[str, Any]:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}


def response_object(req: ResponsesRequest, *, id: str, created_at: int, model: str, status: str,
                    output: list[dict[str, Any]], usage: dict[str, Any] | None,
                    incomplete_reason: str | None = None, error: dict[str, Any] | None = None) -> dict[str, Any]:
    raw = req.raw
    chat = req.chat
    fmt = (raw.get("text") or {}).get("format") if isinstance(raw.get("text"), dict) else None
    return {
        "id": id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "error": error,
        "incomplete_details": {"reason": incomplete_reason} if incomplete_reason else None,
        "instructions": req.instructions,
        "max_output_tokens": raw.get("max_output_tokens"),
        "model": model,
        "output": output,
        "parallel_tool_calls": chat.parallel_tool_calls,
        "previous_response_id": req.previous_response_id,
        "reasoning": None,
        "store": req.store,
        "temperature": chat.temperature if chat.temperature is not None else 1.0,
        "text": {"format": fmt or {"type": "text"}},
        "tool_choice": raw.get("tool_choice", "auto" if chat.tools else "none"),
        "tools": raw.get("tools") or [],
        "top_p": chat.top_p if chat.top_p is not None else 1.0,
        "truncation": "disabled",
        "usage": usage,
        "user": chat.user,
        "metadata": req.metadata,
    }


def response_usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": cached_tokens},
            "output_tokens": completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt_tokens + completion_tokens}


def now() -> int:
    return int(time.time())


def assistant_message(content: str | None, tool_calls: list[dict[str, Any]]) -> dict[str, Any]:
    """The reply as a chat message, for the stored conversation."""
    msg: dict[str, Any] = {"role": "assistant", "content": content or ""}
    if tool_calls:
        msg["tool_calls"] = [{"id": c["id"], "type": "function",
                              "function": {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}}
                             for c in tool_calls]
    return msg

