"""Builders for OpenAI response objects (plain dicts, ready for json.dumps).

Shapes follow the OpenAI API reference: chat.completion, chat.completion.chunk, text_completion,
the model list, and usage with prompt_tokens_details.cached_tokens (prefix-cache hits).
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any

SYSTEM_FINGERPRINT = "fp_pyserve"


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


# --- chat ---------------------------------------------------------------------------------------


def chat_choice(index: int, content: str, finish_reason: str | None) -> dict[str, Any]:
    return {
        "index": index,
        "message": {"role": "assistant", "content": content},
        "logprobs": None,
        "finish_reason": finish_reason,
    }


def chat_completion(
    id: str, created: int, model: str, choices: list[dict[str, Any]], usage: dict[str, Any]
) -> dict[str, Any]:
    return {
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": choices,
        "usage": usage,
    }


def chat_chunk_choice(
    index: int,
    *,
    content: str | None = None,
    role: str | None = None,
    finish_reason: str | None = None,
) -> dict[str, Any]:
    delta: dict[str, Any] = {}
    if role is not None:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


def chat_chunk(
    id: str,
    created: int,
    model: str,
    choices: list[dict[str, Any]],
    usage: dict[str, Any] | None = None,
) -> dict[str, Any]:
    chunk = {
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": choices,
    }
    if usage is not None:
        chunk["usage"] = usage
    return chunk


# --- completions --------------------------------------------------------------------------------


def completion_choice(index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}


def completion(
    id: str,
    created: int,
    model: str,
    choices: list[dict[str, Any]],
    usage: dict[str, Any] | None,
) -> dict[str, Any]:
    """A text_completion object; streamed chunks use the same shape (usage only on the last)."""
    obj = {
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": choices,
    }
    if usage is not None:
        obj["usage"] = usage
    return obj


# --- models -------------------------------------------------------------------------------------


def model_card(id: str, created: int, max_model_len: int, root: str | None = None) -> dict[str, Any]:
    card = {"id": id, "object": "model", "created": created, "owned_by": "pyserve", "max_model_len": max_model_len}
    if root is not None:
        card["root"] = root
    return card


def model_list(cards: list[dict[str, Any]]) -> dict[str, Any]:
    return {"object": "list", "data": cards}
