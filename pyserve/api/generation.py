"""From a validated request to text: sampling params, prompt checks, and one choice's generation
loop (engine outputs -> incremental detokenizer -> stop strings).

Leaving a choice early (stop string hit, client gone, error) closes the engine's async generator,
which aborts the request in the engine and frees its KV pages.
"""
from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence

from pyserve.engine.detokenizer import IncrementalDetokenizer
from pyserve.engine.stop import StopStringMatcher
from pyserve.protocol.errors import ProtocolError
from pyserve.protocol.requests import GenerationRequest

OnText = Callable[[str], Awaitable[None]]


def _sampling_params_cls() -> type:
    # Imported lazily: the engine package is the lead's, and keeping this import out of module
    # scope lets the API layer load (and be tested) without it.
    from pyserve.engine.sampling import SamplingParams

    return SamplingParams


def _param_names(cls: type) -> set[str]:
    if dataclasses.is_dataclass(cls):
        return {f.name for f in dataclasses.fields(cls)}
    return set(inspect.signature(cls).parameters)


# Request fields SamplingParams may or may not have yet, with their neutral values. A non-neutral
# value the engine cannot honour is refused (400) rather than silently ignored; a model default the
# engine cannot honour is dropped.
_OPTIONAL_FIELDS: dict[str, Any] = {
    "min_p": 0.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
    "logit_bias": {},
}


def check_prompt_length(num_prompt_tokens: int, max_model_len: int, param: str) -> None:
    if num_prompt_tokens == 0:
        raise ProtocolError("The prompt is empty (0 tokens).", param=param)
    if num_prompt_tokens >= max_model_len:
        raise ProtocolError(
            f"This model's maximum context length is {max_model_len} tokens. However, your prompt has "
            f"{num_prompt_tokens} tokens, which leaves no room for output. Please shorten the prompt.",
            param=param,
            code="context_length_exceeded",
        )


def check_token_ids(ids: Sequence[int], vocab_size: int | None, param: str) -> None:
    if vocab_size is None:
        return
    for tok in ids:
        if tok >= vocab_size:
            raise ProtocolError(f"Token id {tok} in '{param}' is out of range (vocabulary size {vocab_size}).", param=param)


def build_sampling_params(
    req: GenerationRequest,
    *,
    num_prompt_tokens: int,
    max_model_len: int,
    defaults: dict[str, Any] | None = None,
    choice_index: int = 0,
) -> Any:
    """SamplingParams for one choice. max_tokens is clamped to the room left in the context
    (like vLLM); temperature/top_p/top_k fall back to the model's generation defaults."""
    cls = _sampling_params_cls()
    names = _param_names(cls)
    defaults = defaults or {}
    room = max_model_len - num_prompt_tokens
    max_tokens = room if req.max_tokens is None else min(req.max_tokens, room)
    top_k = req.top_k if req.top_k is not None else int(defaults.get("top_k", 0) or 0)
    kwargs: dict[str, Any] = {
        "max_tokens": max_tokens,
        "temperature": req.temperature if req.temperature is not None else float(defaults.get("temperature", 1.0)),
        "top_p": req.top_p if req.top_p is not None else float(defaults.get("top_p", 1.0)),
        "top_k": max(top_k, 0),  # -1 and 0 both mean "off"
        # Distinct seeds per choice: n identical samples would be pointless. Kept in uint64 range.
        "seed": None if req.seed is None else (req.seed + choice_index) % 2**64,
        "stop_token_ids": list(req.stop_token_ids),
        "ignore_eos": req.ignore_eos,
    }
    for name, neutral in _OPTIONAL_FIELDS.items():
        asked = getattr(req, name)
        if name not in names:
            if asked is not None and asked != neutral:
                raise ProtocolError(f"'{name}' is not supported yet.", param=name)
            continue
        value = asked if asked is not None else defaults.get(name)
        if value is not None:
            kwargs[name] = value
    return cls(**kwargs)


@dataclass
class ChoiceResult:
    text: str  # the whole text when generated without a callback, else ""
    finish_reason: str  # "stop" | "length" | "abort" (| "tool_calls" later)
    completion_tokens: int
    cached_tokens: int


class _aclosing:
    """contextlib.aclosing that tolerates iterators without aclose()."""

    def __init__(self, it: AsyncIterator[Any]) -> None:
        self.it = it

    async def __aenter__(self) -> AsyncIterator[Any]:
        return self.it

    async def __aexit__(self, *exc: object) -> None:
        aclose = getattr(self.it, "aclose", None)
        if aclose is not None:
            await aclose()


async def run_choice(
    engine: Any,
    prompt_ids: list[int],
    params: Any,
    *,
    stops: Sequence[str],
    skip_special_tokens: bool,
    on_text: OnText | None = None,
) -> ChoiceResult:
    """Generates one choice. With `on_text`, each newly final piece of text is handed over as soon
    as it is safe (complete characters, no part of a stop string); without, text is accumulated."""
    detok = IncrementalDetokenizer(engine.model.tokenizer, prompt_ids, skip_special_tokens=skip_special_tokens)
    matcher = StopStringMatcher(stops)
    pieces: list[str] = []
    completion_tokens = 0
    cached_tokens = 0
    finish_reason = "abort"  # if the engine ends the stream without saying why (shutdown)

    async def emit(text: str) -> None:
        if not text:
            return
        if on_text is None:
            pieces.append(text)
        else:
            await on_text(text)

    async with _aclosing(engine.generate(prompt_ids, params)) as outputs:
        async for out in outputs:
            completion_tokens += len(out.new_token_ids)
            cached_tokens = max(cached_tokens, int(getattr(out, "num_cached_tokens", 0) or 0))
            text = detok.add(out.new_token_ids)
            if out.finished:
                text += detok.flush()
            safe, stopped = matcher.feed(text)
            await emit(safe)
            if stopped:
                # Leaving the loop closes the generator: the engine aborts the request.
                finish_reason = "stop"
                break
            if out.finished:
                await emit(matcher.flush())
                finish_reason = out.finish_reason or "stop"
                break
        else:
            safe, stopped = matcher.feed(detok.flush())
            await emit(safe)
            if stopped:
                finish_reason = "stop"
            else:
                await emit(matcher.flush())
    return ChoiceResult("".join(pieces), finish_reason, completion_tokens, cached_tokens)
