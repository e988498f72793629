"""Tool calls in model output: the text conventions, parsing, streaming, prompts and grammars.

OpenAI's Chat Completions API returns tool calls as structured objects, but a model only writes
text, in the convention its family was fine-tuned on (hermes ``<tool_call>`` blocks, Llama 3.1
JSON, Mistral ``[TOOL_CALLS]``; the chat template tells which). All pure logic (no I/O, no
engine), one concept a file:

- `formats`: the conventions and their markers; `detect_tool_call_format` /
  `template_supports_tools` read the chat template; call ids each format accepts back.
- `parse`: `parse_tool_calls`, a finished output → content + calls. Malformed calls stay content;
  it never raises on model output.
- `stream`: `ToolCallStreamParser`, the same split over a stream of text deltas, as the chunks'
  ``delta`` needs it (content deltas, OpenAI tool-call deltas).
- `prompt`: `tools_system_prompt` / `add_tools_system_prompt` / `render_tool_messages_fallback`
  let a template that knows nothing of tools render a tool conversation (Hermes convention).
- `grammar`: `tool_call_grammar`, a Lark grammar (for llguidance) forcing calls, for tool_choice
  "required" or a named function.
"""
from pyserve.protocol.tool_calls.formats import (
    HERMES_CLOSE,
    HERMES_OPEN,
    MISTRAL_MARKER,
    PYTHON_TAG,
    IdFactory,
    ToolCallFormat,
    default_id_factory,
    detect_tool_call_format,
    new_mistral_tool_call_id,
    new_tool_call_id,
    template_supports_tools,
)
from pyserve.protocol.tool_calls.grammar import tool_call_grammar, tool_choice_named
from pyserve.protocol.tool_calls.parse import ParsedOutput, ToolCall, parse_tool_calls
from pyserve.protocol.tool_calls.prompt import (
    add_tools_system_prompt,
    render_tool_messages_fallback,
    tools_system_prompt,
)
from pyserve.protocol.tool_calls.stream import ContentDelta, StreamEvent, ToolCallDelta, ToolCallStreamParser

__all__ = [
    "HERMES_CLOSE",
    "HERMES_OPEN",
    "MISTRAL_MARKER",
    "PYTHON_TAG",
    "ContentDelta",
    "IdFactory",
    "ParsedOutput",
    "StreamEvent",
    "ToolCall",
    "ToolCallDelta",
    "ToolCallFormat",
    "ToolCallStreamParser",
    "add_tools_system_prompt",
    "default_id_factory",
    "detect_tool_call_format",
    "new_mistral_tool_call_id",
    "new_tool_call_id",
    "parse_tool_calls",
    "render_tool_messages_fallback",
    "template_supports_tools",
    "tool_call_grammar",
    "tool_choice_named",
    "tools_system_prompt",
]
