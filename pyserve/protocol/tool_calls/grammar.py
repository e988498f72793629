"""Forcing tool calls with a grammar (llguidance's Lark dialect): for tool_choice "required" or a
named function, decoding can only write calls, in the model's format, whose arguments follow each
function's parameter schema — so the reply always parses as calls."""
from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pyserve.protocol.tool_calls.formats import HERMES_CLOSE, HERMES_OPEN, MISTRAL_MARKER, ToolCallFormat
from pyserve.protocol.tool_calls.parse import dumps
from pyserve.protocol.tool_calls.prompt import function_of, parameters_of


def tool_choice_named(choice: Any) -> str | None:
    """The function name of a tool_choice like {"type": "function", "function": {"name": X}}."""
    if isinstance(choice, Mapping) and choice.get("type") == "function":
        function = choice.get("function")
        name = function.get("name") if isinstance(function, Mapping) else None
        if isinstance(name, str):
            return name
    return None


def _lark_string(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid Lark string literal


def _arguments_schema(function: Mapping[str, Any]) -> Any:
    """The function's parameter schema, an object at its root: a schema with no "type" (only
    "properties", say) lets any JSON value through, and a non-object would not parse as a call."""
    parameters = parameters_of(function)
    if isinstance(parameters, Mapping) and "type" not in parameters:
        return {"type": "object", **parameters}
    return parameters


def tool_call_grammar(
    tools: list[Mapping[str, Any]],
    choice: str | Mapping[str, Any],
    fmt: ToolCallFormat | str,
    parallel: bool,
    *,
    special_tokens: Mapping[str, int] | None = None,
) -> str:
    """A Lark grammar whose sentences are the tool call(s) `choice` demands, written in `fmt`.

    "required": calls to any of `tools` (one or more when `parallel`, else exactly one); a named
    function: exactly one call to it. Arguments follow each function's `parameters` schema.
    `special_tokens` maps a marker ("[TOOL_CALLS]", "<tool_call>", ...) that is a single special
    token in the model's vocabulary to its id: a special token never matches its spelling as text.

    The request was validated before (pyserve/protocol/requests.py answers a bad tool_choice with
    a 400): a choice that forces nothing or names no tool here is a caller's bug, a ValueError.
    """
    fmt = ToolCallFormat(fmt)
    functions = [function_of(tool) for tool in tools]
    named = tool_choice_named(choice)
    if named is not None:
        functions = [function for function in functions if function.get("name") == named][:1]
        if not functions:
            raise ValueError(f"tool_choice names {named!r}, which is not in tools")
        parallel = False
    elif choice != "required":
        raise ValueError(f"tool_choice {choice!r} forces no tool call")
    elif not functions:
        raise ValueError('tool_choice "required" with no tools')

    def marker(text: str) -> str:
        if special_tokens and text in special_tokens:
            return f"<[{int(special_tokens[text])}]>"
        return _lark_string(text)

    key = "parameters" if fmt is ToolCallFormat.LLAMA3_JSON else "arguments"
    space = '" "?'  # one optional space after ":" and ",": compact and json.dumps-style writers both fit
    rules = [f"call: {' | '.join(f'fn_{i}' for i in range(len(functions)))}"]
    for i, function in enumerate(functions):
        name = dumps(function.get("name"))
        literals = [_lark_string('{"name":'), space, _lark_string(name + ","), space, _lark_string(f'"{key}":'), space]
        rules.append(" ".join([f"fn_{i}:", *literals, f"args_{i}", _lark_string("}")]))
        rules.append(f"args_{i}: %json {json.dumps(_arguments_schema(function))}")

    if fmt is ToolCallFormat.HERMES:
        # Parallel blocks are separated by one newline, as Qwen's and Hermes' templates write them.
        head = [
            'start: block ("\\n" block)*' if parallel else "start: block",
            f'block: {marker(HERMES_OPEN)} "\\n" call "\\n" {marker(HERMES_CLOSE)}',
        ]
    elif fmt is ToolCallFormat.LLAMA3_JSON:
        head = ['start: call (";" " "? call)*' if parallel else "start: call"]
    else:
        repeat = ' ("," " "? call)*' if parallel else ""
        head = [f'start: {marker(MISTRAL_MARKER)} "[" call{repeat} "]"']
    return "\n".join([*head, *rules]) + "\n"
