"""Tool calling for /v1/chat/completions: how a request's tools reach the model, and how its reply
comes back as `tool_calls`.

- **Prompt**: a chat template that renders `tools` gets them as transformers passes them
  (`tools=` to the template); one that does not (SmolLM2's, for instance) gets a system prompt
  listing the functions in the Hermes convention, and a tool conversation (assistant `tool_calls`,
  `tool` results) rewritten into turns it can render (pyserve/protocol/tool_calls/).
- **Format**: the output is parsed in the format the template teaches — Hermes / Qwen
  `<tool_call>`, Llama 3.1 JSON, Mistral `[TOOL_CALLS]` — or Hermes with the fallback prompt.
- **Forcing**: tool_choice "required" or a named function constrains decoding to a call whose
  arguments follow the function's parameter schema, so it always parses.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

from pyserve.engine.grammar import JSON_WHITESPACE
from pyserve.protocol.requests import ChatCompletionRequest
from pyserve.protocol.structured import Constraint, closed_objects
from pyserve.protocol.tool_calls import (
    HERMES_CLOSE,
    HERMES_OPEN,
    MISTRAL_MARKER,
    PYTHON_TAG,
    ContentDelta,
    ParsedOutput,
    ToolCallDelta,
    ToolCallFormat,
    ToolCallStreamParser,
    add_tools_system_prompt,
    detect_tool_call_format,
    parse_tool_calls,
    render_tool_messages_fallback,
    template_supports_tools,
    tool_call_grammar,
)

_MARKERS = (HERMES_OPEN, HERMES_CLOSE, MISTRAL_MARKER, PYTHON_TAG)


@dataclass
class ToolPlan:
    """What one chat request does with tools."""

    fmt: ToolCallFormat
    forced: bool  # tool_choice "required" or a named function: decoding is constrained to calls
    constraint: Constraint | None  # the grammar of the forced call(s)
    keep_special: bool  # a marker is a special token: the detokenizer must not drop it
    legacy: bool = False  # asked with `functions`: the reply is one `function_call`, not `tool_calls`


@functools.lru_cache(maxsize=4)
def _special_markers(tokenizer: Any) -> dict[str, int]:
    """Markers that are one special token in this vocabulary (a grammar must name them by id).
    Known once the tokenizer is: cached per tokenizer, not worked out per request."""
    out: dict[str, int] = {}
    special = getattr(tokenizer, "all_special_ids", ()) or ()
    for marker in _MARKERS:
        tid = tokenizer.token_to_id(marker) if hasattr(tokenizer, "token_to_id") else None
        if tid is not None and tid in special:
            out[marker] = int(tid)
    return out


def _forced_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tools as the grammar sees them: arguments closed to the named parameters (a model inventing
    keys could run past max_tokens, and a function has no use for them) and whitespace bounded."""
    out = []
    for tool in tools:
        fn = dict(tool["function"])
        params = closed_objects(fn.get("parameters") or {"type": "object", "properties": {}})
        guidance = dict(params.get("x-guidance") or {})
        guidance.setdefault("whitespace_pattern", JSON_WHITESPACE)
        fn["parameters"] = {**params, "x-guidance": guidance}
        out.append({"type": "function", "function": fn})
    return out


def _renders_tools(chat_template: Any) -> bool:
    """The model's own template renders `tools` (else the fallback prompt and Hermes format)."""
    return template_supports_tools(getattr(chat_template, "source", None)) and not getattr(
        chat_template, "is_fallback", False)


def plan_tools(req: ChatCompletionRequest, chat_template: Any, tokenizer: Any) -> ToolPlan | None:
    """None when the request offers no tools or tool_choice is "none" (a plain text reply)."""
    if not req.tools or req.tool_choice == "none":
        return None
    fmt = detect_tool_call_format(chat_template.source if _renders_tools(chat_template) else None)
    markers = _special_markers(tokenizer)
    forced = req.tool_choice != "auto"
    constraint = None
    if forced:
        grammar = tool_call_grammar(_forced_tools(req.tools), req.tool_choice, fmt, req.parallel_tool_calls,
                                    special_tokens=markers)
        constraint = Constraint("lark", grammar, "tool_choice")
    return ToolPlan(fmt, forced, constraint, keep_special=bool(markers), legacy=req.legacy_functions)


def chat_messages(req: ChatCompletionRequest, chat_template: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(messages, extra template variables) for rendering the prompt."""
    messages = req.messages
    offered = req.tools if req.tool_choice != "none" else []
    if _renders_tools(chat_template):
        return _arguments_as_objects(messages), ({"tools": offered} if offered else {})
    if any(m.get("tool_calls") or m.get("role") in ("tool", "function") for m in messages):
        messages = render_tool_messages_fallback(messages)
    if offered:
        messages = add_tools_system_prompt(messages, offered)
    return messages, {}


def _arguments_as_objects(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Earlier calls' arguments as objects: OpenAI sends them as JSON text, and templates write
    `arguments | tojson`, which would encode that text a second time (vLLM and transformers pass
    objects too)."""
    if not any(m.get("tool_calls") for m in messages):
        return messages
    out = []
    for m in messages:
        calls = m.get("tool_calls")
        if calls:
            m = {**m, "tool_calls": [_decoded(c) for c in calls]}
        out.append(m)
    return out


def _decoded(call: dict[str, Any]) -> dict[str, Any]:
    fn = call.get("function") or {}
    arguments = fn.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return call  # not JSON: the template gets it as sent
    return {**call, "function": {**fn, "arguments": arguments}}


def tool_message(text: str, plan: ToolPlan) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, tool_calls) of a whole reply."""
    parsed: ParsedOutput = parse_tool_calls(text, plan.fmt)
    return parsed.content, [call.to_openai() for call in parsed.tool_calls]


class ToolStream:
    """One streamed choice's text deltas -> (content delta, tool-call deltas) for chat chunks."""

    def __init__(self, plan: ToolPlan) -> None:
        # Forced calls are well-formed by construction: their arguments may stream in pieces.
        self._parser = ToolCallStreamParser(plan.fmt, stream_arguments=plan.forced)

    @property
    def called(self) -> bool:
        return self._parser.tool_call_count > 0

    def feed(self, text: str, final: bool = False) -> tuple[str, list[dict[str, Any]]]:
        events = self._parser.feed(text) if text else []
        if final:
            events += self._parser.finish()
        content = "".join(e.text for e in events if isinstance(e, ContentDelta))
        calls = [e.to_openai() for e in events if isinstance(e, ToolCallDelta)]
        return content, calls
