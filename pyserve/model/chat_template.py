"""Chat templates: Jinja rendered the way transformers' apply_chat_template renders them.

Same environment as transformers (utils/chat_template_utils.py): ImmutableSandboxedEnvironment with
trim_blocks, lstrip_blocks and loopcontrols; `raise_exception` and `strftime_now` globals; a `tojson`
filter that does not HTML-escape. Templates see `messages`, `add_generation_prompt`, `tools` and
`documents` (None unless given), the special tokens (`bos_token`, `eos_token`, ...) and any extra
keyword passed to render().

A model without a template gets FALLBACK_TEMPLATE, a plain transcript a base model can continue:

    System: You are terse.

    User: Hi

    Assistant:

(one "Role: content" paragraph per message; with add_generation_prompt, a final "Assistant:").
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}\n\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


class ChatTemplateError(ValueError):
    """A chat template could not be compiled or rendered (the message says why)."""


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes (<, >, &, '); templates expect plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Namespace(jinja2.utils.Namespace):
    """namespace() that refuses underscore attributes (no poking at CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # same signature trick as Jinja's Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    return env


def _plain(value: Any) -> Any:
    """Plain JSON-like data only (no objects with methods the sandbox might not know about)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, int):  # subclasses (enums, numpy ints) lose their extra methods
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    return f"<{type(value).__name__}>"


class ChatTemplate:
    def __init__(
        self,
        source: str | None,
        bos_token: str | None,
        eos_token: str | None,
        *,
        special_tokens: dict[str, str | None] | None = None,
    ) -> None:
        """source None -> FALLBACK_TEMPLATE. special_tokens: more names the template may read
        (unk_token, pad_token, ...). Raises ChatTemplateError when the template does not compile."""
        self.is_fallback = source is None
        self.source = FALLBACK_TEMPLATE if source is None else source
        self.bos_token, self.eos_token = bos_token, eos_token
        self.variables: dict[str, str] = {}
        for name, value in {**(special_tokens or {}), "bos_token": bos_token, "eos_token": eos_token}.items():
            if value is not None:
                self.variables[name] = value
        try:
            self._template = _environment().from_string(self.source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"chat template has a syntax error at line {e.lineno}: {e.message}") from e

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **extra: Any) -> str:
        """The prompt text for `messages` (OpenAI-style dicts). Keys whose value is None are dropped
        first (content=None on tool-call messages), as transformers does."""
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ChatTemplateError("messages must be a list of objects")
        msgs = [{k: v for k, v in _plain(m).items() if v is not None} for m in messages]
        context = {**self.variables, "tools": None, "documents": None, **_plain(extra)}
        context["messages"] = msgs
        context["add_generation_prompt"] = add_generation_prompt
        try:
            return self._template.render(**context)
        except jinja2.exceptions.TemplateError as e:  # raise_exception, undefined names, sandbox
            message = getattr(e, "message", None) or str(e)
            raise ChatTemplateError(f"chat template error: {message}") from e
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError) as e:
            raise ChatTemplateError(f"chat template failed on these messages: {type(e).__name__}: {e}") from e
