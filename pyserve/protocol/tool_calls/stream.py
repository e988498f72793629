"""Tool calls over a stream: text deltas in, content deltas and OpenAI tool-call deltas out, as a
chat.completion.chunk's `delta` needs them. The same split as `parse_tool_calls`, a piece at a
time; pure logic (no I/O)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from pyserve.protocol.tool_calls.formats import (
    HERMES_CLOSE,
    HERMES_OPEN,
    MISTRAL_MARKER,
    PYTHON_TAG,
    IdFactory,
    ToolCallFormat,
    default_id_factory,
)
from pyserve.protocol.tool_calls.parse import (
    INVALID,
    JSON_WS,
    NameAndArguments,
    decode_whole,
    hermes_block_call,
    llama_body,
    llama_calls,
    mistral_calls,
    skip_ws,
)


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
        pos = skip_ws(text, pos)
        if pos == len(text):
            return "more"
        if token is None:
            match = _STRING_RE.match(text, pos)
            if match is None:
                return "more" if _PARTIAL_STRING_RE.match(text, pos) else "no"
            name = decode_whole(match.group())
            pos = match.end()
            continue
        literal = next((lit for lit in token if text.startswith(lit, pos)), None)
        if literal is None:
            return "more" if any(lit.startswith(text[pos:]) for lit in token) else "no"
        pos += len(literal)
    pos = skip_ws(text, pos)
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

    @property
    def consumed(self) -> int:
        """How much of the body it has read: calls' headers, arguments and what lay between them."""
        return self._pos

    def advance(self, body: str) -> list[tuple[Literal["start", "arguments"], str]]:
        out: list[tuple[Literal["start", "arguments"], str]] = []
        while self._pos < len(body) and self._mode != "off":
            if self._mode == "between":
                ch = body[self._pos]
                if ch in JSON_WS or ch in self._separators:
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
                self._pos = skip_ws(body, self._pos)
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
    started (cut by max_tokens, say) keeps what was sent, and only the region's text after what was
    sent becomes content (for a call cut off mid-arguments, nothing): no text goes out twice.

    Ids come from `new_id`, by default the format's own (`default_id_factory`).
    """

    def __init__(
        self,
        fmt: ToolCallFormat | str,
        *,
        stream_arguments: bool = False,
        new_id: IdFactory | None = None,
    ) -> None:
        self._fmt = ToolCallFormat(fmt)
        self._stream_arguments = stream_arguments
        self._new_id = new_id or default_id_factory(self._fmt)
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
        call = hermes_block_call(body)
        streamed = self._close_region(None if call is None else [call])
        if call is None:
            # Nothing streamed: the block is content, as parse_tool_calls has it. Else only what
            # follows the streamed call is, less its closing tag (whole, or cut off at the end).
            rest = body[streamed:]
            if streamed and close < 0 and HERMES_CLOSE.startswith(rest.strip()):
                rest = ""
            self._text(rest if streamed else HERMES_OPEN + self._buffer[:end])
        self._buffer = self._buffer[end:]
        return True

    def _step_mistral(self, final: bool) -> bool:
        if not self._in_region:
            if not self._seek_marker(MISTRAL_MARKER, final):
                return False
            self._mistral_scanner = None
            return True
        if self._mistral_scanner is None:
            start = skip_ws(self._buffer, 0)
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
        payload = decode_whole(self._buffer[self._mistral_start:end])
        calls = None if payload is INVALID else mistral_calls(payload)
        if calls is None:
            return self._mistral_failed()
        self._close_region(calls)
        self._buffer = self._buffer[end:]
        return True

    def _mistral_failed(self) -> bool:
        streamed = self._close_region(None)  # the peeker's body starts where the buffer does
        if streamed:
            # Calls of this payload went out already: the search resumes after them.
            self._buffer = self._buffer[streamed:]
        else:
            # As in parse_tool_calls: the marker is content and the search resumes right after it.
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
        self._region_body(llama_body(self._buffer.lstrip()))
        if not final:
            return False
        stripped = self._buffer.strip()
        calls = llama_calls(llama_body(stripped))
        streamed = self._close_region(calls)
        if calls is None:
            self._text(llama_body(self._buffer.lstrip())[streamed:] if streamed else stripped)
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

    def _close_region(self, calls: list[NameAndArguments] | None) -> int:
        """The region ended: its calls (None if malformed) go out, less those already streamed.

        Returns how much of the region's body went out as streamed calls (0 when none did): the
        caller sends only the text after it as content, so a cut-off call is not sent twice.
        """
        already_sent = self._peeker.started if self._peeker else 0
        for name, arguments in (calls or [])[already_sent:]:
            self._events.append(ToolCallDelta(self.tool_call_count, self._new_id(), name, arguments))
            self.tool_call_count += 1
        streamed = self._peeker.consumed if self._peeker and already_sent else 0
        self._in_region = False
        self._peeker = None
        return streamed

    def _take_events(self) -> list[StreamEvent]:
        events, self._events = self._events, []
        return events
