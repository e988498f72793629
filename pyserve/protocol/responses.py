"""Builders for OpenAI response objects (plain dicts, ready for json.dumps).

Shapes follow the OpenAI API reference: chat.completion, chat.completion.chunk, text_completion,
the model list, and usage with prompt_tokens_details.cached_tokens (prefix-cache hits).
tests/test_openai_schema.py validates what the app sends against OpenAI's published OpenAPI
schemas (a trimmed copy in tests/data/). Where OpenAI's own API departs from its schema, we follow
the API, and that test lists each such place: `usage: null` on stream chunks before the usage
chunk, `finish_reason: null` on streamed text_completion chunks before a choice's last, and null
for the first echoed prompt token's logprob (nothing predicts it).
"""
from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

SYSTEM_FINGERPRINT = "fp_pyserve"

# JSON has no -inf: a token the sampler ruled out (masked, or biased to -100) reports this instead,
# as OpenAI and vLLM do.
MIN_LOGPROB = -9999.0


def new_id(prefix: str) -> str:
    """"chatcmpl-…" / "cmpl-…": random, unique per response, shared by every chunk of a stream."""
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def dumps(obj: Any) -> bytes:
    """The single JSON encoding used for every body and SSE event (compact, UTF-8, no NaN)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


# --- logprobs -----------------------------------------------------------------------------------


@dataclass
class TokenInfo:
    """One token as logprobs show it: its text, raw bytes (a token may hold part of a UTF-8
    character) and log probability."""

    text: str
    bytes: bytes
    logprob: float


@dataclass
class LogprobEntry:
    """One position of a text: the token there, its alternatives, where its text starts.

    `token.logprob` is None for the first prompt token (nothing predicts it) and then `top` is
    None too."""

    token: TokenInfo
    top: list[TokenInfo] | None = field(default_factory=list)
    text_offset: int = 0


def clamp_logprob(value: float | None) -> float | None:
    if value is None:
        return None
    value = float(value)
    if math.isnan(value) or value < MIN_LOGPROB:
        return MIN_LOGPROB
    return min(value, 0.0)


def _chat_token(t: TokenInfo) -> dict[str, Any]:
    return {"token": t.text, "logprob": clamp_logprob(t.logprob), "bytes": list(t.bytes)}


def chat_logprobs(entries: list[LogprobEntry]) -> dict[str, Any]:
    """A chat choice's `logprobs`: {"content": [{token, logprob, bytes, top_logprobs}], "refusal": null}."""
    content = []
    for e in entries:
        item = _chat_token(e.token)
        item["top_logprobs"] = [_chat_token(t) for t in e.top or ()]
        content.append(item)
    return {"content": content, "refusal": None}


def completion_logprobs(entries: list[LogprobEntry]) -> dict[str, Any]:
    """A completion choice's `logprobs`: parallel lists tokens / token_logprobs / top_logprobs /
    text_offset. top_logprobs[i] maps token text -> logprob for the most likely tokens and the
    chosen one (so up to k + 1 entries, as OpenAI documents); null where nothing predicts the
    token (the first prompt token under echo)."""
    out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in entries:
        out["tokens"].append(e.token.text)
        out["token_logprobs"].append(clamp_logprob(e.token.logprob))
        if e.top is None:
            out["top_logprobs"].append(None)
        else:
            top = {t.text: clamp_logprob(t.logprob) for t in reversed(e.top)}  # the likelier wins a name clash
            top.setdefault(e.token.text, clamp_logprob(e.token.logprob))
            out["top_logprobs"].append(dict(sorted(top.items(), key=lambda kv: -kv[1])))
        out["text_offset"].append(e.text_offset)
    return out


# --- chat ---------------------------------------------------------------------------------------


def chat_choice(
    index: int, content: str | None, finish_reason: str | None, logprobs: dict[str, Any] | None = None,
    tool_calls: list[dict[str, Any]] | None = None, function_call: dict[str, Any] | None = None,
) -> dict[str, Any]:
    # OpenAI's schema requires `refusal` on every message (null: the model did not refuse); typed
    # clients generated from that schema reject a message without it.
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    if function_call:
        message["function_call"] = function_call  # the legacy `functions` API
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}


def _generation_object(
    object_type: str, id: str, created: int, model: str, choices: list[dict[str, Any]], usage: dict[str, Any] | None
) -> dict[str, Any]:
    """The envelope every completion object shares; `usage` is left out when None (stream chunks)."""
    obj: dict[str, Any] = {
        "id": id,
        "object": object_type,
        "created": created,
        "model": model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": choices,
    }
    if usage is not None:
        obj["usage"] = usage
    return obj


def chat_completion(
    id: str, created: int, model: str, choices: list[dict[str, Any]], usage: dict[str, Any]
) -> dict[str, Any]:
    return _generation_object("chat.completion", id, created, model, choices, usage)


def chat_chunk_choice(
    index: int,
    *,
    content: str | None = None,
    role: str | None = None,
    finish_reason: str | None = None,
    logprobs: dict[str, Any] | None = None,
    tool_calls: list[dict[str, Any]] | None = None,
    function_call: dict[str, Any] | None = None,
) -> dict[str, Any]:
    delta: dict[str, Any] = {}
    if role is not None:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    if tool_calls:
        delta["tool_calls"] = tool_calls
    if function_call:
        delta["function_call"] = function_call
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_chunk(
    id: str,
    created: int,
    model: str,
    choices: list[dict[str, Any]],
    usage: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return _generation_object("chat.completion.chunk", id, created, model, choices, usage)


# --- completions --------------------------------------------------------------------------------


def completion_choice(
    index: int, text: str, finish_reason: str | None, logprobs: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def completion(
    id: str,
    created: int,
    model: str,
    choices: list[dict[str, Any]],
    usage: dict[str, Any] | None,
) -> dict[str, Any]:
    """A text_completion object; streamed chunks use the same shape (usage only on the last)."""
    return _generation_object("text_completion", id, created, model, choices, usage)


# --- models -------------------------------------------------------------------------------------


def model_card(id: str, created: int, max_model_len: int, root: str | None = None) -> dict[str, Any]:
    card = {"id": id, "object": "model", "created": created, "owned_by": "pyserve", "max_model_len": max_model_len}
    if root is not None:
        card["root"] = root
    return card


def model_list(cards: list[dict[str, Any]]) -> dict[str, Any]:
    return {"object": "list", "data": cards}
