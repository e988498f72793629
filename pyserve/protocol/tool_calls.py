"""Tool calls in model output: the text conventions, parsing, streaming, prompts and grammars.

OpenAI's Chat Completions API returns tool calls as structured objects, but a model only writes
text, in the convention its family was fine-tuned on (the chat template tells which):

- ``hermes`` (Hermes, Qwen2.5, SmolLM2's tool-calling template, and our fallback prompt for a
  template that shows no convention): one block per call, possibly several, possibly after text::

      <tool_call>
      {"name": "get_weather", "arguments": {"city": "Paris"}}
      </tool_call>

- ``llama3_json`` (Llama 3.1+ JSON tool calling): the whole message is the call, optionally after
  ``<|python_tag|>``, several calls separated by ``;``. ``"arguments"`` is accepted for
  ``"parameters"``. There is no start marker, so text counts as calls only if *all* of it parses::

      {"name": "get_weather", "parameters": {"city": "Paris"}}

- ``mistral``: a marker then a JSON array, after optional text::

      [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]

What this module offers, all pure logic (no I/O, no engine):

- `detect_tool_call_format` / `template_supports_tools`: read the chat template.
- `tools_system_prompt` / `add_tools_system_prompt` / `render_tool_messages_fallback`: let a
  template that knows nothing of tools render a tool conversation (Hermes convention).
- `parse_tool_calls`: a finished output → content + calls. Malformed calls stay content; it never
  raises on model output.
- `ToolCallStreamParser`: the same split over a stream of text deltas, as the chunks' ``delta``
  needs it (content deltas, OpenAI tool-call deltas).
- `tool_call_grammar`: a Lark grammar (for llguidance) forcing calls, for tool_choice "required"
  or a named function.
"""
from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal

from pyserve.protocol.errors import ProtocolError


class ToolCallFormat(str, Enum):
    HERMES = "hermes"
    LLAMA3_JSON = "llama3_json"
    MISTRAL = "mistral"


HERMES_OPEN = "<tool_call>"
HERMES_CLOSE = "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
MISTRAL_MARKER = "[TOOL_CALLS]"

# Llama 3.x writes "parameters"; other families (and some Llama fine-tunes) write "arguments".
_ARGUMENT_KEYS = ("arguments", "parameters")
_JSON_WS = " \t\n\r"


# ---------------------------------------------------------------------------------------------
# Reading the chat template


def detect_tool_call_format(chat_template: str | None) -> ToolCallFormat:
    """The convention the template's model family writes calls in; hermes when it shows none."""
    template = chat_template or ""
    if MISTRAL_MARKER in template:
        return ToolCallFormat.MISTRAL
    if PYTHON_TAG in template or ('"parameters"' in template and "ipython" in template):
        return ToolCallFormat.LLAMA3_JSON
    # "<tool_call>" means hermes, and so does anything else: it is what our fallback prompt asks for.
    return ToolCallFormat.HERMES


_JINJA_CODE = re.compile(r"\{\{.*?\}\}|\{%.*?%\}", re.DOTALL)
_TOOLS_VARIABLE = re.compile(r"\btools\b")


def template_supports_tools(chat_template: str | None) -> bool:
    """Whether the template renders the `tools` variable (in a Jinja expression or statement)."""
    return any(_TOOLS_VARIABLE.search(code.group()) for code in _JINJA_CODE.finditer(chat_template or ""))


# ---------------------------------------------------------------------------------------------
# Results


def new_tool_call_id() -> str:
    """OpenAI's shape: "call_" and 24 hex digits."""
    return "call_" + uuid.uuid4().hex[:24]


IdFactory = Callable[[], str]


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


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class ToolCallDelta:
    """One piece of a streamed call. The first piece of a call carries id and name."""

    index: int
    id: str | None
    name: str | None
    arguments: str

    def to_openai(self) -> dict[str, Any]:
        """The `delta.tool_calls[i]` object of a chat.completion.chunk."""
        function: dict[str, Any] = {"arguments": self.arguments}
        delta: dict[str, Any] = {"index": self.index}
        if self.id is not None:
            delta["id"] = self.id
            delta["type"] = "function"
        if self.name is not None:
            function = {"name": self.name, **function}
        delta["function"] = function
        return delta


StreamEvent = ContentDelta | ToolCallDelta

_NameAndArguments = tuple[str, str]


# ---------------------------------------------------------------------------------------------
# JSON helpers shared by the whole-text and the streaming parsers


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # NaN/Infinity could not be re-serialised as JSON


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
_INVALID = object()


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _JSON_WS:
        pos += 1
    return pos


def _decode_at(text: str, pos: int) -> tuple[Any, int] | None:
    """The JSON value starting exactly at `pos` and the index after it, or None."""
    try:
        return _DECODER.raw_decode(text, pos)
    except (ValueError, RecursionError):
        return None


def _decode_whole(text: str) -> Any:
    """`text` (whitespace around allowed) as one JSON value, or _INVALID."""
    decoded = _decode_at(text, _skip_ws(text, 0))
    if decoded is None or _skip_ws(text, decoded[1]) != len(text):
        return _INVALID
    return decoded[0]


def _name_and_arguments(obj: Any) -> _NameAndArguments | None:
    """`{"name": str, "arguments"|"parameters": object}` → (name, arguments JSON), else None."""
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return None
    arguments = next((obj[key] for key in _ARGUMENT_KEYS if key in obj), None)
    if isinstance(arguments, str):  # some models write the arguments object as a JSON string
        arguments = _decode_whole(arguments)
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        return None
    return name, _dumps(arguments)


def _hermes_block_call(body: str) -> _NameAndArguments | None:
    """What lies between <tool_call> and </tool_call>: exactly one call object."""
    return _name_and_arguments(_decode_whole(body))


def _mistral_calls(payload: Any) -> list[_NameAndArguments] | None:
    """The JSON after [TOOL_CALLS]: an array of call objects (a lone object is accepted too)."""
    calls = []
    for item in payload if isinstance(payload, list) else [payload]:
        call = _name_and_arguments(item)
        if call is None:
            return None
        calls.append(call)
    return calls or None


def _llama_calls(body: str) -> list[_NameAndArguments] | None:
    """`body` as one or more call objects separated by ";" — all of it, or None."""
    calls: list[_NameAndArguments] = []
    pos = _skip_ws(body, 0)
    while True:
        decoded = _decode_at(body, pos)
        call = _name_and_arguments(decoded[0]) if decoded else None
        if decoded is None or call is None:
            return None
        calls.append(call)
        pos = _skip_ws(body, decoded[1])
        if pos < len(body) and body[pos] == ";":
            pos = _skip_ws(body, pos + 1)
        elif pos < len(body):
            return None
        if pos == len(body):
            return calls


def _llama_body(stripped_output: str) -> str:
    return stripped_output[len(PYTHON_TAG):] if stripped_output.startswith(PYTHON_TAG) else stripped_output


# ---------------------------------------------------------------------------------------------
# Parsing a finished output


def parse_tool_calls(text: str, fmt: ToolCallFormat | str, *, new_id: IdFactory = new_tool_call_id) -> ParsedOutput:
    """Splits a finished output into content and tool calls. Never raises on model output."""
    fmt = ToolCallFormat(fmt)
    if fmt is ToolCallFormat.LLAMA3_JSON:
        stripped = text.strip()
        found = _llama_calls(_llama_body(stripped))
        if found is None:
            return ParsedOutput(stripped or None, [])
        return ParsedOutput(None, [ToolCall(new_id(), *call) for call in found])

    content: list[str] = []
    calls: list[_NameAndArguments] = []
    pos = 0
    if fmt is ToolCallFormat.HERMES:
        while (start := text.find(HERMES_OPEN, pos)) >= 0:
            content.append(text[pos:start])
            body_start = start + len(HERMES_OPEN)
            close = text.find(HERMES_CLOSE, body_start)
            # An unterminated last block still counts if its body parses (the model may stop there).
            body_end, pos = (close, close + len(HERMES_CLOSE)) if close >= 0 else (len(text), len(text))
            call = _hermes_block_call(text[body_start:body_end])
            if call is None:
                content.append(text[start:pos])
            else:
                calls.append(call)
    else:
        while (start := text.find(MISTRAL_MARKER, pos)) >= 0:
            content.append(text[pos:start])
            pos = start + len(MISTRAL_MARKER)
            decoded = _decode_at(text, _skip_ws(text, pos))
            found = _mistral_calls(decoded[0]) if decoded else None
            if decoded is None or found is None:
                content.append(MISTRAL_MARKER)  # and look for a later marker right after this one
            else:
                calls.extend(found)
                pos = decoded[1]
    content.append(text[pos:])
    return ParsedOutput("".join(content).strip() or None, [ToolCall(new_id(), *call) for call in calls])


# ---------------------------------------------------------------------------------------------
# Streaming


def _partial_marker_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that could be the start of `marker`: held back."""
    for length in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-length:]):
            return length
    return 0


class _StrippedContent:
    """Passes content through so that the concatenation of what it lets out is the stripped text.

    Leading whitespace is dropped, trailing whitespace held until more text follows it — so a
    stream never carries the "\\n" a model writes between its calls as content.
    """

    def __init__(self) -> None:
        self._started = False
        self._pending = ""

    def push(self, text: str) -> str:
        if not self._started:
            text = text.lstrip()
            if not text:
                return ""
            self._started = True
        text = self._pending + text
        out = text.rstrip()
        self._pending = text[len(out):]
        return out


class _JsonEndScanner:
    """Finds where a JSON object or array ends, a piece at a time (nesting and strings only)."""

    def __init__(self) -> None:
        self._depth = 0
        self._in_string = False
        self._escaped = False

    def feed(self, text: str) -> int | None:
        """Consumes `text`; returns the index just past the value's end if it ends in `text`."""
        for i, ch in enumerate(text):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif ch == "\\":
                    self._escaped = True
                elif ch == '"':
                    self._in_string = False
            elif ch == '"':
                self._in_string = True
            elif ch in "[{":
                self._depth += 1
            elif ch in "]}":
                self._depth -= 1
                if self._depth == 0:
                    return i + 1
        return None


@dataclass(frozen=True)
class _CallHeader:
    name: str
    value_pos: int  # where the arguments value starts


_STRING_RE = re.compile(r'"(?:[^"\\\x00-\x1f]|\\.)*"')
_PARTIAL_STRING_RE = re.compile(r'"(?:[^"\\\x00-\x1f]|\\.)*\\?\Z')
# `{"name": "<name>", "arguments": ` token by token; None stands for a JSON string (the name).
_HEADER_TOKENS: tuple[tuple[str, ...] | None, ...] = (
    ("{",), ('"name"',), (":",), None, (",",), ('"arguments"', '"parameters"'), (":",),
)


def _match_call_header(text: str, pos: int) -> _CallHeader | Literal["more", "no"]:
    """Matches a call object's opening `{"name": "X", "arguments": ` at `pos`.

    "more" while `text` ends inside a possible header, "no" once it cannot be one (other key order,
    other keys first): such a call is then sent whole when its region closes.
    """
    name = ""
    for token in _HEADER_TOKENS:
        pos = _skip_ws(text, pos)
        if pos == len(text):
            return "more"
        if token is None:
            match = _STRING_RE.match(text, pos)
            if match is None:
                return "more" if _PARTIAL_STRING_RE.match(text, pos) else "no"
            name = _decode_whole(match.group())
            pos = match.end()
            continue
        literal = next((lit for lit in token if text.startswith(lit, pos)), None)
        if literal is None:
            return "more" if any(lit.startswith(text[pos:]) for lit in token) else "no"
        pos += len(literal)
    pos = _skip_ws(text, pos)
    if pos == len(text):
        return "more"
    if not isinstance(name, str) or not name:
        return "no"
    return _CallHeader(name, pos)


# Tool names are at most 64 characters: a longer unfinished header is not one worth waiting for
# (and re-matching it on every delta would cost quadratic time).
_MAX_HEADER_CHARS = 512


class _ArgumentPeeker:
    """Streams the calls of a region that is still open: name first, then the arguments' raw text.

    Fed the region's body as it grows (always a longer version of the same text). It goes call by
    call: skips whitespace and the format's separators, matches a header, then forwards the
    arguments object's characters until the object ends. Anything off that path (another key order,
    arguments written as a string) stops it; the region's remaining calls then go out whole when it
    closes. A call it started cannot be taken back if the region later proves malformed.
    """

    def __init__(self, separators: str) -> None:
        self._separators = separators
        self._pos = 0
        self._mode: Literal["between", "header", "arguments", "after", "off"] = "between"
        self._object_start = 0
        self._scanner = _JsonEndScanner()
        self.started = 0  # calls started so far

    def advance(self, body: str) -> list[tuple[Literal["start", "arguments"], str]]:
        out: list[tuple[Literal["start", "arguments"], str]] = []
        while self._pos < len(body) and self._mode != "off":
            if self._mode == "between":
                ch = body[self._pos]
                if ch in _JSON_WS or ch in self._separators:
                    self._pos += 1
                elif ch == "{":
                    self._mode, self._object_start = "header", self._pos
                else:
                    self._mode = "off"
            elif self._mode == "header":
                header = _match_call_header(body, self._object_start)
                if isinstance(header, _CallHeader) and body[header.value_pos] == "{":
                    out.append(("start", header.name))
                    self.started += 1
                    self._mode, self._pos, self._scanner = "arguments", header.value_pos, _JsonEndScanner()
                elif header == "more" and len(body) - self._object_start <= _MAX_HEADER_CHARS:
                    break
                else:
                    self._mode = "off"
            elif self._mode == "arguments":
                end = self._scanner.feed(body[self._pos:])
                stop = len(body) if end is None else self._pos + end
                out.append(("arguments", body[self._pos:stop]))
                self._pos = stop
                if end is not None:
                    self._mode = "after"
            else:  # after the arguments: the call object's closing brace
                self._pos = _skip_ws(body, self._pos)
                if self._pos < len(body):
                    if body[self._pos] == "}":
                        self._mode = "between"
                        self._pos += 1
                    else:
                        self._mode = "off"
        return out


_PEEKER_SEPARATORS = {
    ToolCallFormat.HERMES: "",
    ToolCallFormat.LLAMA3_JSON: ";",
    ToolCallFormat.MISTRAL: "[,]",
}


class ToolCallStreamParser:
    """`parse_tool_calls` over a stream: text deltas in, content and tool-call deltas out.

    Text that may be the start of a marker (a trailing "<tool" or "[TOOL_") is held back until the
    next delta settles it; content before a call streams as content.

    With `stream_arguments=False` (the default) a call goes out in one delta once its region
    (hermes block, mistral array, llama message) is complete and parses, so the stream always
    agrees with `parse_tool_calls` on the whole text — a malformed call becomes content, never a
    half-sent call. With `stream_arguments=True` the name goes out as soon as its call's header
    is read and the arguments' raw JSON text follows as it arrives; use it where a grammar
    guarantees well-formed calls (tool_choice "required" or named): a call that breaks after it
    started (cut by max_tokens, say) keeps what was sent, and the rest of its region is content.
    """

    def __init__(
        self,
        fmt: ToolCallFormat | str,
        *,
        stream_arguments: bool = False,
        new_id: IdFactory = new_tool_call_id,
    ) -> None:
        self._fmt = ToolCallFormat(fmt)
        self._stream_arguments = stream_arguments
        self._new_id = new_id
        self._step = {
            ToolCallFormat.HERMES: self._step_hermes,
            ToolCallFormat.LLAMA3_JSON: self._step_llama,
            ToolCallFormat.MISTRAL: self._step_mistral,
        }[self._fmt]
        self._buffer = ""  # text received but not yet settled
        self._in_region = False  # inside a (possible) call region rather than in content
        self._llama_decided = False
        self._mistral_scanner: _JsonEndScanner | None = None
        self._mistral_start = 0  # where the payload starts in the buffer
        self._mistral_scanned = 0  # how far the scanner has read
        self._content = _StrippedContent()
        self._peeker: _ArgumentPeeker | None = None
        self._events: list[StreamEvent] = []
        self._finished = False
        self.tool_call_count = 0  # calls started so far (finish_reason "tool_calls" when > 0)

    def feed(self, delta: str) -> list[StreamEvent]:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        self._buffer += delta
        while self._step(final=False):
            pass
        return self._take_events()

    def finish(self) -> list[StreamEvent]:
        """The output ended: settles everything held back."""
        if not self._finished:
            self._finished = True
            while self._step(final=True):
                pass
        return self._take_events()

    # -- per format: each step consumes from the buffer and says whether to step again --

    def _step_hermes(self, final: bool) -> bool:
        if not self._in_region:
            return self._seek_marker(HERMES_OPEN, final)
        close = self._buffer.find(HERMES_CLOSE)
        if close < 0 and not final:
            self._region_body(self._buffer[: len(self._buffer) - _partial_marker_suffix(self._buffer, HERMES_CLOSE)])
            return False
        body, end = (self._buffer[:close], close + len(HERMES_CLOSE)) if close >= 0 else (self._buffer, len(self._buffer))
        self._region_body(body)
        call = _hermes_block_call(body)
        self._close_region(None if call is None else [call])
        if call is None:
            self._text(HERMES_OPEN + self._buffer[:end])
        self._buffer = self._buffer[end:]
        return True

    def _step_mistral(self, final: bool) -> bool:
        if not self._in_region:
            if not self._seek_marker(MISTRAL_MARKER, final):
                return False
            self._mistral_scanner = None
            return True
        if self._mistral_scanner is None:
            start = _skip_ws(self._buffer, 0)
            if start == len(self._buffer) and not final:
                return False
            if start == len(self._buffer) or self._buffer[start] not in "[{":
                return self._mistral_failed()
            self._mistral_scanner, self._mistral_start, self._mistral_scanned = _JsonEndScanner(), start, start
        end = self._mistral_scanner.feed(self._buffer[self._mistral_scanned:])
        if end is None:
            self._mistral_scanned = len(self._buffer)
            if final:
                return self._mistral_failed()
            self._region_body(self._buffer)
            return False
        end += self._mistral_scanned
        self._region_body(self._buffer[:end])
        payload = _decode_whole(self._buffer[self._mistral_start:end])
        calls = None if payload is _INVALID else _mistral_calls(payload)
        if calls is None:
            return self._mistral_failed()
        self._close_region(calls)
        self._buffer = self._buffer[end:]
        return True

    def _mistral_failed(self) -> bool:
        # As in parse_tool_calls: the marker is content and the search resumes right after it.
        self._close_region(None)
        self._text(MISTRAL_MARKER)
        return True

    def _step_llama(self, final: bool) -> bool:
        if not self._llama_decided:
            # The whole output is either calls or content: its first characters decide.
            head = self._buffer.lstrip()
            after_tag = head[len(PYTHON_TAG):].lstrip() if head.startswith(PYTHON_TAG) else None
            undecided = not head or (after_tag == "") or (after_tag is None and PYTHON_TAG.startswith(head))
            if undecided and not final:
                return False
            self._llama_decided = True
            if (head if after_tag is None else after_tag).startswith("{"):
                self._open_region()
            return True
        if not self._in_region:
            self._text(self._buffer)
            self._buffer = ""
            return False
        self._region_body(_llama_body(self._buffer.lstrip()))
        if not final:
            return False
        stripped = self._buffer.strip()
        calls = _llama_calls(_llama_body(stripped))
        self._close_region(calls)
        if calls is None:
            self._text(stripped)
        self._buffer = ""
        return False

    # -- shared --

    def _seek_marker(self, marker: str, final: bool) -> bool:
        """Content up to `marker` goes out; on finding it, a region opens. True if it did."""
        start = self._buffer.find(marker)
        if start < 0:
            keep = 0 if final else _partial_marker_suffix(self._buffer, marker)
            self._text(self._buffer[: len(self._buffer) - keep])
            self._buffer = self._buffer[len(self._buffer) - keep :]
            return False
        self._text(self._buffer[:start])
        self._buffer = self._buffer[start + len(marker) :]
        self._open_region()
        return True

    def _text(self, text: str) -> None:
        out = self._content.push(text)
        if out:
            self._events.append(ContentDelta(out))

    def _open_region(self) -> None:
        self._in_region = True
        self._peeker = _ArgumentPeeker(_PEEKER_SEPARATORS[self._fmt]) if self._stream_arguments else None

    def _region_body(self, body: str) -> None:
        if self._peeker is None:
            return
        for kind, value in self._peeker.advance(body):
            if kind == "start":
                self._events.append(ToolCallDelta(self.tool_call_count, self._new_id(), value, ""))
                self.tool_call_count += 1
            elif value:
                self._events.append(ToolCallDelta(self.tool_call_count - 1, None, None, value))

    def _close_region(self, calls: list[_NameAndArguments] | None) -> None:
        """The region ended: its calls (None if malformed) go out, less those already streamed."""
        already_sent = self._peeker.started if self._peeker else 0
        for name, arguments in (calls or [])[already_sent:]:
            self._events.append(ToolCallDelta(self.tool_call_count, self._new_id(), name, arguments))
            self.tool_call_count += 1
        self._in_region = False
        self._peeker = None

    def _take_events(self) -> list[StreamEvent]:
        events, self._events = self._events, []
        return events


# ---------------------------------------------------------------------------------------------
# Templates without tool support: the Hermes convention in plain messages


def _function_of(tool: Mapping[str, Any]) -> Mapping[str, Any]:
    """The function object of an OpenAI tool ({"type": "function", "function": {...}})."""
    function = tool.get("function")
    return function if isinstance(function, Mapping) else tool


def _parameters_of(function: Mapping[str, Any]) -> Any:
    parameters = function.get("parameters")
    return {"type": "object"} if parameters is None else parameters


def tools_system_prompt(tools: Iterable[Mapping[str, Any]]) -> str:
    """A system-message text offering `tools` to the model, asking for Hermes-style calls."""
    signatures = []
    for tool in tools:
        function = _function_of(tool)
        signature: dict[str, Any] = {"name": function.get("name")}
        if function.get("description"):
            signature["description"] = function["description"]
        signature["parameters"] = _parameters_of(function)
        signatures.append(_dumps({"type": "function", "function": signature}))
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
        decoded = _decode_whole(arguments)
        arguments = arguments if decoded is _INVALID else decoded
    call: dict[str, Any] = {"name": function.get("name"), "arguments": {} if arguments is None else arguments}
    return f"{HERMES_OPEN}\n{_dumps(call)}\n{HERMES_CLOSE}"


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


# ---------------------------------------------------------------------------------------------
# Forcing calls with a grammar (llguidance's Lark dialect)


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
    Raises ProtocolError (param "tool_choice") for a choice that forces nothing or names no tool.
    """
    fmt = ToolCallFormat(fmt)
    functions = [_function_of(tool) for tool in tools]
    named = tool_choice_named(choice)
    if named is not None:
        functions = [function for function in functions if function.get("name") == named][:1]
        if not functions:
            raise ProtocolError(f"tool_choice names the function {named!r}, which is not in tools.", param="tool_choice")
        parallel = False
    elif choice != "required":
        raise ProtocolError(f"tool_choice {choice!r} forces no tool call.", param="tool_choice")
    elif not functions:
        raise ProtocolError('tool_choice "required" needs at least one tool.', param="tool_choice")

    def marker(text: str) -> str:
        if special_tokens and text in special_tokens:
            return f"<[{int(special_tokens[text])}]>"
        return _lark_string(text)

    key = "parameters" if fmt is ToolCallFormat.LLAMA3_JSON else "arguments"
    space = '" "?'  # one optional space after ":" and ",": compact and json.dumps-style writers both fit
    rules = [f"call: {' | '.join(f'fn_{i}' for i in range(len(functions)))}"]
    for i, function in enumerate(functions):
        name = _dumps(function.get("name"))
        literals = [_lark_string('{"name":'), space, _lark_string(name + ","), space, _lark_string(f'"{key}":'), space]
        rules.append(" ".join([f"fn_{i}:", *literals, f"args_{i}", _lark_string("}")]))
        rules.append(f"args_{i}: %json {json.dumps(_parameters_of(function))}")

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
