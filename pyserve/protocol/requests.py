"""Request types for the OpenAI endpoints, parsed from a decoded JSON object.

Validation follows OpenAI's documented ranges; every violation is a `ProtocolError` (HTTP 400) that
names the offending parameter. Unknown fields are ignored, as OpenAI and vLLM do. Fields we know but
cannot serve yet (suffix, best_of > n) are
refused with "not supported yet" rather than silently ignored, so a client never gets output that
quietly disregards what it asked for.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pyserve.protocol.errors import ProtocolError
from pyserve.protocol.structured import Constraint, constraint_from_request

_MISSING: Any = object()

MAX_N = 128
MAX_STOP_STRINGS = 64  # OpenAI allows 4; vLLM has no limit. Matching costs O(1) per char per stop.
MAX_STOP_LENGTH = 1024  # characters in one stop string (64 x 1024 builds its matcher in ~7 ms)
MAX_CHAT_TOP_LOGPROBS = 20  # OpenAI's chat limit
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's legacy completions limit
MAX_PROMPTS = 256  # prompts per completions request (a batch)
CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


# ---------------------------------------------------------------------------------------------
# JSON body


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json_object(body: bytes) -> dict[str, Any]:
    """Decodes a request body that must be a JSON object (NaN/Infinity are not JSON: refused)."""
    if not body.strip():
        raise ProtocolError("The request body is empty; expected a JSON object.")
    try:
        text = body.decode("utf-8")
        data = json.loads(text, parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise ProtocolError("The request body is not valid UTF-8.") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise ProtocolError(f"The request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ProtocolError(f"The request body must be a JSON object, not {_json_type(data)}.")
    if _nesting_depth(data) > MAX_JSON_DEPTH:
        raise ProtocolError(f"The request body nests JSON deeper than {MAX_JSON_DEPTH} levels.")
    if _SURROGATE_ESCAPE.search(text):
        _reject_lone_surrogates(data)
    return data


# Deeper structures serve no API field, and later recursive walks (surrogate check, chat template)
# must not hit Python's recursion limit on a client's input.
MAX_JSON_DEPTH = 64


def _nesting_depth(value: Any) -> int:
    """Depth of nested lists/objects, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, dict):
            v = list(v.values())
        if isinstance(v, list):
            deepest = max(deepest, depth)
            if depth <= MAX_JSON_DEPTH:
                stack.extend((item, depth + 1) for item in v)
    return deepest


# JSON may spell a lone UTF-16 surrogate ("\\ud800"): not a character, it cannot be tokenized or
# echoed back as UTF-8. Only bodies containing such an escape pay for the walk.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _reject_lone_surrogates(value: Any) -> None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ProtocolError("The request contains an unpaired UTF-16 surrogate (\\ud800-\\udfff).") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _reject_lone_surrogates(k)
            _reject_lone_surrogates(v)
    elif isinstance(value, list):
        for v in value:
            _reject_lone_surrogates(v)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


# ---------------------------------------------------------------------------------------------
# Field readers: each returns the value (or default when absent/null) or raises ProtocolError.


def _type_error(param: str, expected: str, value: Any) -> ProtocolError:
    return ProtocolError(f"'{param}' must be {expected}, got {_json_type(value)}.", param=param)


def _is_int(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


def _opt_int(data: dict, name: str, default: Any = None, *, lo: int | None = None, hi: int | None = None) -> Any:
    value = data.get(name)
    if value is None:
        return default
    if not _is_int(value):
        raise _type_error(name, "an integer", value)
    value = int(value)
    if lo is not None and value < lo:
        raise ProtocolError(f"'{name}' must be >= {lo}, got {value}.", param=name)
    if hi is not None and value > hi:
        raise ProtocolError(f"'{name}' must be <= {hi}, got {value}.", param=name)
    return value


def _opt_float(
    data: dict,
    name: str,
    default: Any = None,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
) -> Any:
    value = data.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _type_error(name, "a number", value)
    value = float(value)
    if not math.isfinite(value):
        raise ProtocolError(f"'{name}' must be a finite number.", param=name)
    if lo is not None and (value <= lo if lo_open else value < lo):
        bound = f"> {lo:g}" if lo_open else f">= {lo:g}"
        raise ProtocolError(f"'{name}' must be {bound}, got {value:g}.", param=name)
    if hi is not None and value > hi:
        raise ProtocolError(f"'{name}' must be <= {hi:g}, got {value:g}.", param=name)
    return value


def _opt_bool(data: dict, name: str, default: Any = None) -> Any:
    value = data.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _type_error(name, "a boolean", value)
    return value


def _opt_str(data: dict, name: str, default: Any = None) -> Any:
    value = data.get(name)
    if value is None:
        return default
    if not isinstance(value, str):
        raise _type_error(name, "a string", value)
    return value


def _token_id_list(value: Any, param: str) -> list[int]:
    if not isinstance(value, list):
        raise _type_error(param, "an array of token ids", value)
    out = []
    for i, tok in enumerate(value):
        if not _is_int(tok) or tok < 0:
            raise ProtocolError(f"'{param}[{i}]' must be a non-negative integer token id.", param=param)
        out.append(int(tok))
    return out


def _stop_list(data: dict) -> list[str]:
    value = data.get("stop")
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise _type_error("stop", "a string or an array of strings", value)
    if len(value) > MAX_STOP_STRINGS:
        raise ProtocolError(f"'stop' may hold at most {MAX_STOP_STRINGS} strings, got {len(value)}.", param="stop")
    for i, s in enumerate(value):
        if not isinstance(s, str):
            raise _type_error(f"stop[{i}]", "a string", s)
        if len(s) > MAX_STOP_LENGTH:
            raise ProtocolError(
                f"'stop[{i}]' is {len(s)} characters long; the limit is {MAX_STOP_LENGTH}.", param=f"stop[{i}]"
            )
    return [s for s in value if s]


def _not_supported(param: str, what: str | None = None) -> ProtocolError:
    return ProtocolError(f"{what or repr(param)} is not supported yet.", param=param)


# ---------------------------------------------------------------------------------------------
# Requests


@dataclass(frozen=True)
class OutputLimits:
    """The operator's bounds on generated tokens per choice (`--max-tokens-default`, and
    `-n/--max-tokens-limit` as llama.cpp's `-n` caps llama-server's requests).

    A request that gives no max_tokens gets `default_max_tokens`, else its endpoint's default
    (chat: up to the context; completions: 16, OpenAI's). Whatever the request asks, it gets at
    most `max_tokens_limit` and at most the room left in the context; a choice cut there ends with
    finish_reason "length" (as llama-server and vLLM cap, rather than refuse)."""

    default_max_tokens: int | None = None
    max_tokens_limit: int | None = None

    def __post_init__(self) -> None:
        for name in ("default_max_tokens", "max_tokens_limit"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1 or None, got {value!r}")
        if (self.default_max_tokens is not None and self.max_tokens_limit is not None
                and self.default_max_tokens > self.max_tokens_limit):
            raise ValueError(f"default_max_tokens ({self.default_max_tokens}) exceeds max_tokens_limit ({self.max_tokens_limit})")

    def max_tokens(self, req: "GenerationRequest", room: int) -> int:
        """Tokens one choice of `req` may generate when `room` tokens are left in the context."""
        want = req.max_tokens
        if want is None:
            want = self.default_max_tokens if self.default_max_tokens is not None else req.DEFAULT_MAX_TOKENS
        if want is None:
            want = room
        if self.max_tokens_limit is not None:
            want = min(want, self.max_tokens_limit)
        return min(want, room)


@dataclass(frozen=True)
class DebugConfig:
    """MLC's debug_config: ignore_eos, and pinned_system_prompt (the prompt's pages stay cached
    until /debug/reset_engine)."""

    ignore_eos: bool = False
    pinned_system_prompt: bool = False


def parse_debug_config(value: Any) -> DebugConfig:
    """A request's debug_config, checked: only where the server honours it (--enable-debug; MLC
    ignores it otherwise, malformed or not)."""
    if not isinstance(value, dict):
        raise _type_error("debug_config", "an object", value)
    fields = {}
    for key in ("ignore_eos", "pinned_system_prompt"):
        v = value.get(key)
        if v is not None and not isinstance(v, bool):
            raise _type_error(f"debug_config.{key}", "a boolean", v)
        fields[key] = bool(v)
    return DebugConfig(**fields)


@dataclass
class GenerationRequest:
    """Fields shared by /v1/completions and /v1/chat/completions."""

    # max_tokens when the request gives none and the operator set no default; None: up to the context.
    DEFAULT_MAX_TOKENS: ClassVar[int | None] = None

    model: str | None = None
    max_tokens: int | None = None  # as the request gave it (None: not given; see OutputLimits)
    min_tokens: int = 0  # EOS and stop_token_ids are masked until this many tokens (vLLM)
    temperature: float | None = None  # None: the model's generation defaults, else 1.0
    top_p: float | None = None
    top_k: int | None = None  # 0 or -1 disables
    min_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True  # vLLM extension
    # None: not given (the model's generation defaults, else neutral).
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    # Log probabilities: None = none; k >= 0 = the chosen token's logprob plus the k most likely.
    # (chat: logprobs=true + top_logprobs=k; completions: logprobs=k.)
    logprobs: int | None = None
    echo: bool = False  # completions: the prompt comes back in front of the text (and its logprobs)
    n: int = 1
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage
    user: str | None = None
    # MLC's debug_config (honoured only when the server runs with --enable-debug): kept as given,
    # checked by parse_debug_config where it is applied.
    debug_config: Any = None
    # Structured output (response_format, vLLM's structured_outputs / guided_*): what the text must match.
    constraint: Constraint | None = None

    def _parse_common(self, data: dict) -> None:
        self.model = _opt_str(data, "model")
        self.temperature = _opt_float(data, "temperature", lo=0.0, hi=2.0)
        self.top_p = _opt_float(data, "top_p", lo=0.0, hi=1.0, lo_open=True)
        self.top_k = _opt_int(data, "top_k", lo=-1)
        self.min_p = _opt_float(data, "min_p", lo=0.0, hi=1.0)
        self.seed = _opt_int(data, "seed", lo=-(2**63), hi=2**64 - 1)
        self.stop = _stop_list(data)
        if data.get("stop_token_ids") is not None:
            self.stop_token_ids = _token_id_list(data["stop_token_ids"], "stop_token_ids")
        self.ignore_eos = _opt_bool(data, "ignore_eos", False)
        self.min_tokens = _opt_int(data, "min_tokens", 0, lo=0)
        self.skip_special_tokens = _opt_bool(data, "skip_special_tokens", True)
        self.presence_penalty = _opt_float(data, "presence_penalty", lo=-2.0, hi=2.0)
        self.frequency_penalty = _opt_float(data, "frequency_penalty", lo=-2.0, hi=2.0)
        # HF/vLLM semantics: 1 is neutral, any positive factor is allowed.
        self.repetition_penalty = _opt_float(data, "repetition_penalty", lo=0.0, lo_open=True)
        self.logit_bias = _logit_bias(data)
        self.n = _opt_int(data, "n", 1, lo=1, hi=MAX_N)
        self.stream = _opt_bool(data, "stream", False)
        self.include_usage = _stream_options(data, self.stream)
        self.user = _opt_str(data, "user")
        self.debug_config = data.get("debug_config")
        best_of = _opt_int(data, "best_of", lo=1)
        if best_of is not None and best_of != self.n:
            raise _not_supported("best_of", "'best_of' other than n")
        self.constraint = constraint_from_request(data)

    def _check_min_tokens(self) -> None:
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ProtocolError(
                f"'min_tokens' ({self.min_tokens}) must not exceed the maximum number of tokens ({self.max_tokens}).",
                param="min_tokens",
            )


_TOKEN_KEY = re.compile(r"-?[0-9]+")


def _logit_bias(data: dict) -> dict[int, float]:
    value = data.get("logit_bias")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _type_error("logit_bias", "an object mapping token ids to numbers", value)
    out: dict[int, float] = {}
    for key, bias in value.items():
        if not _TOKEN_KEY.fullmatch(key) or len(key) > 19:
            raise ProtocolError(f"'logit_bias' keys must be token ids, got {key!r}.", param="logit_bias")
        tok = int(key)
        if tok < 0:
            raise ProtocolError(f"'logit_bias' keys must be non-negative token ids, got {key!r}.", param="logit_bias")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
            raise ProtocolError(
                f"'logit_bias' values must be numbers in [-100, 100], got {bias!r} for {key!r}.", param="logit_bias"
            )
        out[tok] = float(bias)
    return out


def _stream_options(data: dict, stream: bool) -> bool:
    opts = data.get("stream_options")
    if opts is None:
        return False
    if not isinstance(opts, dict):
        raise _type_error("stream_options", "an object", opts)
    if not stream:
        raise ProtocolError("'stream_options' is only allowed when 'stream' is true.", param="stream_options")
    include = opts.get("include_usage")
    if include is not None and not isinstance(include, bool):
        raise _type_error("stream_options.include_usage", "a boolean", include)
    return bool(include)


@dataclass
class ChatCompletionRequest(GenerationRequest):
    # Normalized for the chat template: {"role": str, "content": str, ...name/tool_calls kept}.
    messages: list[dict[str, Any]] = field(default_factory=list)
    max_completion_tokens: int | None = None
    # Tool calling: OpenAI's function tools ({"type": "function", "function": {...}}), the choice
    # ("none" | "auto" | "required" | {"type": "function", "function": {"name"}}) and whether a
    # reply may call several. Legacy `functions` / `function_call` arrive here as tools too.
    tools: list[dict[str, Any]] = field(default_factory=list)
    tool_choice: str | dict[str, Any] = "none"
    parallel_tool_calls: bool = True
    legacy_functions: bool = False  # asked with `functions`: the reply is a `function_call`

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ChatCompletionRequest":
        req = cls()
        req.messages = _messages(data)
        req._parse_common(data)
        req.max_completion_tokens = _opt_int(data, "max_completion_tokens", lo=1)
        legacy = _opt_int(data, "max_tokens", lo=1)
        # max_completion_tokens supersedes the deprecated max_tokens.
        req.max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else legacy
        req._check_min_tokens()
        want = _opt_bool(data, "logprobs", False)
        top = _opt_int(data, "top_logprobs", lo=0, hi=MAX_CHAT_TOP_LOGPROBS)
        if top is not None and not want:
            raise ProtocolError("'top_logprobs' requires 'logprobs' to be true.", param="top_logprobs")
        req.logprobs = (top or 0) if want else None
        req.tools, req.tool_choice = _tools(data)
        req.legacy_functions = data.get("tools") is None and data.get("functions") is not None
        # A legacy function_call is one call.
        req.parallel_tool_calls = _opt_bool(data, "parallel_tool_calls", not req.legacy_functions)
        if req.constraint is not None and req.tool_choice not in ("none", "auto"):
            raise ProtocolError(f"'{req.constraint.param}' cannot be combined with a tool_choice that forces a call.",
                                param="tool_choice")
        return req


_FUNCTION_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


def _function(fn: Any, where: str) -> dict[str, Any]:
    if not isinstance(fn, dict):
        raise _type_error(where, "a function object", fn)
    name = fn.get("name")
    if not isinstance(name, str) or not _FUNCTION_NAME.fullmatch(name):
        raise ProtocolError(f"'{where}.name' must be 1-64 letters, digits, '_', '.' or '-', got {name!r}.",
                            param=f"{where}.name")
    if fn.get("description") is not None and not isinstance(fn["description"], str):
        raise _type_error(f"{where}.description", "a string", fn["description"])
    params = fn.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise _type_error(f"{where}.parameters", "a JSON schema object", params)
    if fn.get("strict") is not None and not isinstance(fn["strict"], bool):
        raise _type_error(f"{where}.strict", "a boolean", fn["strict"])
    return {k: fn[k] for k in ("name", "description", "parameters", "strict") if fn.get(k) is not None}


def _tools(data: dict) -> tuple[list[dict[str, Any]], str | dict[str, Any]]:
    """(tools, tool_choice) from `tools` / `tool_choice`, or the legacy `functions` /
    `function_call`. tool_choice defaults to "auto" with tools and "none" without (OpenAI)."""
    tools: list[dict[str, Any]] = []
    if data.get("tools") is not None:
        raw = data["tools"]
        if not isinstance(raw, list):
            raise _type_error("tools", "an array of tools", raw)
        for i, tool in enumerate(raw):
            if not isinstance(tool, dict) or tool.get("type", "function") != "function":
                raise ProtocolError(f"'tools[{i}]' must be a function tool ({{\"type\": \"function\", ...}}).",
                                    param=f"tools[{i}]")
            tools.append({"type": "function", "function": _function(tool.get("function"), f"tools[{i}].function")})
    elif data.get("functions") is not None:
        raw = data["functions"]
        if not isinstance(raw, list):
            raise _type_error("functions", "an array of functions", raw)
        tools = [{"type": "function", "function": _function(f, f"functions[{i}]")} for i, f in enumerate(raw)]
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) != len(names):
        raise ProtocolError("Function names in 'tools' must be unique.", param="tools")
    param, choice = "tool_choice", data.get("tool_choice")
    if choice is None and data.get("function_call") is not None:
        param, choice = "function_call", data["function_call"]
        if isinstance(choice, dict):
            choice = {"type": "function", "function": {"name": choice.get("name")}}
    if choice is None:
        return tools, ("auto" if tools else "none")
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise ProtocolError(f"'{param}' must be 'none', 'auto', 'required' or a named function, got {choice!r}.",
                                param=param)
        if choice == "required" and not tools:
            raise ProtocolError(f"'{param}' is 'required' but no tools were given.", param=param)
        return tools, choice
    if not isinstance(choice, dict):
        raise _type_error(param, "a string or an object", choice)
    fn = choice.get("function")
    name = fn.get("name") if isinstance(fn, dict) else None
    if choice.get("type") != "function" or not isinstance(name, str):
        raise ProtocolError(f"'{param}' must name a function: {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}.",
                            param=param)
    if name not in names:
        raise ProtocolError(f"'{param}' names the function {name!r}, which is not in 'tools'.", param=param)
    return tools, {"type": "function", "function": {"name": name}}


def _messages(data: dict) -> list[dict[str, Any]]:
    value = data.get("messages", _MISSING)
    if value is _MISSING or value is None:
        raise ProtocolError("'messages' is a required property.", param="messages")
    if not isinstance(value, list):
        raise _type_error("messages", "an array of message objects", value)
    if not value:
        raise ProtocolError("'messages' must contain at least one message.", param="messages")
    return [_message(m, f"messages[{i}]") for i, m in enumerate(value)]


def _message(msg: Any, where: str) -> dict[str, Any]:
    if not isinstance(msg, dict):
        raise _type_error(where, "a message object", msg)
    role = msg.get("role")
    if role is None:
        raise ProtocolError(f"'{where}.role' is a required property.", param=f"{where}.role")
    if not isinstance(role, str):
        raise _type_error(f"{where}.role", "a string", role)
    if role not in CHAT_ROLES:
        raise ProtocolError(
            f"'{where}.role' must be one of {sorted(CHAT_ROLES)}, got {role!r}.", param=f"{where}.role"
        )
    content = msg.get("content")
    if content is None:
        # An assistant turn may carry only tool calls; everyone else must say something.
        if role != "assistant":
            raise ProtocolError(f"'{where}.content' is a required property.", param=f"{where}.content")
        text = ""
    elif isinstance(content, str):
        text = content
    elif isinstance(content, list):
        text = "\n".join(_text_part(p, f"{where}.content[{j}]") for j, p in enumerate(content))
    else:
        raise _type_error(f"{where}.content", "a string or an array of content parts", content)
    out: dict[str, Any] = {"role": role, "content": text}
    # Keep the few extra keys chat templates look at.
    if isinstance(msg.get("name"), str):
        out["name"] = msg["name"]
    if isinstance(msg.get("tool_call_id"), str):
        out["tool_call_id"] = msg["tool_call_id"]
    if msg.get("tool_calls") is not None:
        out["tool_calls"] = _tool_calls(msg["tool_calls"], f"{where}.tool_calls")
    return out


def _tool_calls(value: Any, where: str) -> list[dict[str, Any]]:
    """An assistant turn's earlier calls: [{id, type: "function", function: {name, arguments}}]."""
    if not isinstance(value, list):
        raise _type_error(where, "an array of tool calls", value)
    out = []
    for j, call in enumerate(value):
        at = f"{where}[{j}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ProtocolError(f"'{at}' must be {{\"type\": \"function\", \"function\": {{\"name\", \"arguments\"}}}}.",
                                param=at)
        if call.get("type", "function") != "function":
            raise ProtocolError(f"'{at}.type' must be 'function'.", param=f"{at}.type")
        if call.get("id") is not None and not isinstance(call["id"], str):
            raise _type_error(f"{at}.id", "a string", call["id"])
        arguments = fn.get("arguments", "{}")
        if not isinstance(arguments, (str, dict)):
            raise _type_error(f"{at}.function.arguments", "a JSON string", arguments)
        out.append({**({"id": call["id"]} if call.get("id") is not None else {}), "type": "function",
                    "function": {"name": fn["name"], "arguments": arguments}})
    return out


def _text_part(part: Any, where: str) -> str:
    if not isinstance(part, dict):
        raise _type_error(where, "a content part object", part)
    kind = part.get("type")
    if kind != "text":
        if not isinstance(kind, str):
            raise ProtocolError(f"'{where}.type' is a required string.", param=f"{where}.type")
        raise ProtocolError(
            f"'{where}.type': content part type {kind!r} is not supported (text only).", param=f"{where}.type"
        )
    text = part.get("text")
    if not isinstance(text, str):
        raise _type_error(f"{where}.text", "a string", text)
    return text


@dataclass
class CompletionRequest(GenerationRequest):
    # OpenAI's legacy completions default to 16 tokens (so does vLLM).
    DEFAULT_MAX_TOKENS: ClassVar[int | None] = 16

    # One entry per prompt: text to tokenize, or token ids as given.
    prompt: list[str | list[int]] = field(default_factory=list)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "CompletionRequest":
        req = cls()
        req.prompt = _prompts(data)
        req._parse_common(data)
        req.echo = _opt_bool(data, "echo", False)
        # 0 with echo scores the prompt without generating (as OpenAI and vLLM allow). Not given:
        # None here, DEFAULT_MAX_TOKENS (or the operator's default) when sampling params are built.
        req.max_tokens = _opt_int(data, "max_tokens", lo=0)
        if req.max_tokens == 0 and not req.echo:
            raise ProtocolError("'max_tokens' must be >= 1 (0 is only allowed with 'echo').", param="max_tokens")
        req._check_min_tokens()
        req.logprobs = _opt_int(data, "logprobs", lo=0, hi=MAX_COMPLETION_LOGPROBS)
        if _opt_str(data, "suffix"):
            raise _not_supported("suffix")
        if len(req.prompt) * req.n > MAX_PROMPTS:
            raise ProtocolError(
                f"Too many completions in one request: {len(req.prompt)} prompts x n={req.n} > {MAX_PROMPTS}.",
                param="prompt",
            )
        return req


def _prompts(data: dict) -> list[str | list[int]]:
    value = data.get("prompt", _MISSING)
    if value is _MISSING or value is None:
        raise ProtocolError("'prompt' is a required property.", param="prompt")
    if isinstance(value, str):
        return [value]
    expected = "a string, an array of strings, an array of token ids, or an array of token-id arrays"
    if not isinstance(value, list):
        raise _type_error("prompt", expected, value)
    if not value:
        raise ProtocolError("'prompt' must not be an empty array.", param="prompt")
    if all(isinstance(p, str) for p in value):
        return list(value)
    if all(_is_int(p) for p in value):
        return [_token_id_list(value, "prompt")]
    if all(isinstance(p, list) for p in value):
        out: list[str | list[int]] = []
        for i, p in enumerate(value):
            if not p:
                raise ProtocolError(f"'prompt[{i}]' must not be an empty array.", param="prompt")
            out.append(_token_id_list(p, f"prompt[{i}]"))
        return out
    raise ProtocolError(f"'prompt' must be {expected} (not a mix).", param="prompt")
