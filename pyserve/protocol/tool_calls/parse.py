"""A finished output → content and tool calls, and the JSON helpers the streaming parser and the
fallback prompt share. Malformed calls stay content: nothing here raises on model output."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pyserve.protocol.tool_calls.formats import (
    HERMES_CLOSE,
    HERMES_OPEN,
    MISTRAL_MARKER,
    PYTHON_TAG,
    IdFactory,
    ToolCallFormat,
    default_id_factory,
)


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON text (an object), as OpenAI sends it

    def to_openai(self) -> dict[str, Any]:
        """The `message.tool_calls[i]` object of a chat.completion."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ParsedOutput:
    content: str | None  # the text outside the calls, stripped; None when nothing is left
    tool_calls: list[ToolCall]


NameAndArguments = tuple[str, str]

# Llama 3.x writes "parameters"; other families (and some Llama fine-tunes) write "arguments".
ARGUMENT_KEYS = ("arguments", "parameters")
JSON_WS = " \t\n\r"


# ---------------------------------------------------------------------------------------------
# JSON helpers shared by the whole-text and the streaming parsers


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # NaN/Infinity could not be re-serialised as JSON


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
INVALID = object()


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in JSON_WS:
        pos += 1
    return pos


def decode_at(text: str, pos: int) -> tuple[Any, int] | None:
    """The JSON value starting exactly at `pos` and the index after it, or None."""
    try:
        return _DECODER.raw_decode(text, pos)
    except (ValueError, RecursionError):
        return None


def decode_whole(text: str) -> Any:
    """`text` (whitespace around allowed) as one JSON value, or INVALID."""
    decoded = decode_at(text, skip_ws(text, 0))
    if decoded is None or skip_ws(text, decoded[1]) != len(text):
        return INVALID
    return decoded[0]


def name_and_arguments(obj: Any) -> NameAndArguments | None:
    """`{"name": str, "arguments"|"parameters": object}` → (name, arguments JSON), else None."""
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return None
    arguments = next((obj[key] for key in ARGUMENT_KEYS if key in obj), None)
    if isinstance(arguments, str):  # some models write the arguments object as a JSON string
        arguments = decode_whole(arguments)
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        return None
    return name, dumps(arguments)


def hermes_block_call(body: str) -> NameAndArguments | None:
    """What lies between <tool_call> and </tool_call>: exactly one call object."""
    return name_and_arguments(decode_whole(body))


def mistral_calls(payload: Any) -> list[NameAndArguments] | None:
    """The JSON after [TOOL_CALLS]: an array of call objects (a lone object is accepted too)."""
    calls = []
    for item in payload if isinstance(payload, list) else [payload]:
        call = name_and_arguments(item)
        if call is None:
            return None
        calls.append(call)
    return calls or None


def llama_calls(body: str) -> list[NameAndArguments] | None:
    """`body` as one or more call objects separated by ";" — all of it, or None."""
    calls: list[NameAndArguments] = []
    pos = skip_ws(body, 0)
    while True:
        decoded = decode_at(body, pos)
        call = name_and_arguments(decoded[0]) if decoded else None
        if decoded is None or call is None:
            return None
        calls.append(call)
        pos = skip_ws(body, decoded[1])
        if pos < len(body) and body[pos] == ";":
            pos = skip_ws(body, pos + 1)
        elif pos < len(body):
            return None
        if pos == len(body):
            return calls


def llama_body(stripped_output: str) -> str:
    return stripped_output[len(PYTHON_TAG):] if stripped_output.startswith(PYTHON_TAG) else stripped_output


# ---------------------------------------------------------------------------------------------
# Parsing a finished output


def parse_tool_calls(text: str, fmt: ToolCallFormat | str, *, new_id: IdFactory | None = None) -> ParsedOutput:
    """Splits a finished output into content and tool calls. Never raises on model output.

    Ids come from `new_id`, by default the format's own (`default_id_factory`).
    """
    fmt = ToolCallFormat(fmt)
    new_id = new_id or default_id_factory(fmt)
    if fmt is ToolCallFormat.LLAMA3_JSON:
        stripped = text.strip()
        found = llama_calls(llama_body(stripped))
        if found is None:
            return ParsedOutput(stripped or None, [])
        return ParsedOutput(None, [ToolCall(new_id(), *call) for call in found])

    content: list[str] = []
    calls: list[NameAndArguments] = []
    pos = 0
    if fmt is ToolCallFormat.HERMES:
        while (start := text.find(HERMES_OPEN, pos)) >= 0:
            content.append(text[pos:start])
            body_start = start + len(HERMES_OPEN)
            close = text.find(HERMES_CLOSE, body_start)
            # An unterminated last block still counts if its body parses (the model may stop there).
            body_end, pos = (close, close + len(HERMES_CLOSE)) if close >= 0 else (len(text), len(text))
            call = hermes_block_call(text[body_start:body_end])
            if call is None:
                content.append(text[start:pos])
            else:
                calls.append(call)
    else:
        while (start := text.find(MISTRAL_MARKER, pos)) >= 0:
            content.append(text[pos:start])
            pos = start + len(MISTRAL_MARKER)
            decoded = decode_at(text, skip_ws(text, pos))
            found = mistral_calls(decoded[0]) if decoded else None
            if decoded is None or found is None:
                content.append(MISTRAL_MARKER)  # and look for a later marker right after this one
            else:
                calls.extend(found)
                pos = decoded[1]
    content.append(text[pos:])
    return ParsedOutput("".join(content).strip() or None, [ToolCall(new_id(), *call) for call in calls])
