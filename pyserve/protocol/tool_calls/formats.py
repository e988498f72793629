"""The text conventions model families write tool calls in, read off the chat template, and the
call ids each convention accepts back.

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
"""
from __future__ import annotations

import functools
import random
import re
import string
import uuid
from collections.abc import Callable
from enum import Enum


class ToolCallFormat(str, Enum):
    HERMES = "hermes"
    LLAMA3_JSON = "llama3_json"
    MISTRAL = "mistral"


HERMES_OPEN = "<tool_call>"
HERMES_CLOSE = "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
MISTRAL_MARKER = "[TOOL_CALLS]"


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


# A server has one or a few templates, and each tool request asks twice (prompt and format), each
# time scanning a template of several kB: a small cache answers all but the first.
@functools.lru_cache(maxsize=8)
def template_supports_tools(chat_template: str | None) -> bool:
    """Whether the template renders the `tools` variable (in a Jinja expression or statement)."""
    return any(_TOOLS_VARIABLE.search(code.group()) for code in _JINJA_CODE.finditer(chat_template or ""))


# ---------------------------------------------------------------------------------------------
# Call ids

IdFactory = Callable[[], str]

_ALPHANUMERIC = string.ascii_letters + string.digits
# Not the module-level generator: a `random.seed()` elsewhere must not make ids repeat.
_ID_RANDOM = random.SystemRandom()


def new_tool_call_id() -> str:
    """OpenAI's shape: "call_" and 24 hex digits."""
    return "call_" + uuid.uuid4().hex[:24]


def new_mistral_tool_call_id() -> str:
    """9 alphanumeric characters: Mistral's chat templates raise on any other id a client sends
    back ("Tool call IDs should be alphanumeric strings with length 9!"). vLLM does the same."""
    return "".join(_ID_RANDOM.choices(_ALPHANUMERIC, k=9))


def default_id_factory(fmt: ToolCallFormat | str) -> IdFactory:
    """The ids a model of this format can be shown again in the next turn's prompt."""
    return new_mistral_tool_call_id if ToolCallFormat(fmt) is ToolCallFormat.MISTRAL else new_tool_call_id
