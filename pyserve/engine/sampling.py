"""What a request asks of the sampler, and what the engine hands back per step."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class SamplingParams:
    max_tokens: int | None = None  # None: until the context is full
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None  # choice i of a seeded request uses seed + i
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0  # EOS and stop_token_ids are masked until this many tokens
    presence_penalty: float = 0.0  # OpenAI semantics, over generated tokens
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # HF/vLLM semantics, over prompt and generated tokens
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None  # None: none; k >= 0: the sampled token's logprob and the top k
    prompt_logprobs: int | None = None  # for echo: every prompt token's logprob and the top k
    n: int = 1  # choices; they share the prompt's KV pages
    pin_prompt: bool = False  # keep the prompt's KV pages cached until the engine is reset (debug)
    grammar: Any = None  # structured output: a compiled grammar (pyserve/engine/grammar.py), or None

    def to_engine(self) -> dict[str, Any]:
        """The dict the C++ engine reads (csrc/bindings.cpp: sampling_from)."""
        return {
            "max_tokens": -1 if self.max_tokens is None else int(self.max_tokens),
            "temperature": float(self.temperature),
            "top_p": float(self.top_p),
            "top_k": min(max(int(self.top_k), 0), 2**31 - 1),  # beyond the vocabulary: off
            "min_p": float(self.min_p),
            # The engine's RNG takes 64 bits; OpenAI seeds may be negative.
            "seed": None if self.seed is None else int(self.seed) & 0x7FFF_FFFF_FFFF_FFFF,
            "stop_token_ids": [int(t) for t in self.stop_token_ids],
            "ignore_eos": bool(self.ignore_eos),
            "min_tokens": int(self.min_tokens),
            "presence_penalty": float(self.presence_penalty),
            "frequency_penalty": float(self.frequency_penalty),
            "repetition_penalty": float(self.repetition_penalty),
            "logit_bias": {int(k): float(v) for k, v in self.logit_bias.items()},
            "logprobs": -1 if self.logprobs is None else int(self.logprobs),
            "prompt_logprobs": -1 if self.prompt_logprobs is None else int(self.prompt_logprobs),
            "n": int(self.n),
            "pin_prompt": bool(self.pin_prompt),
            "grammar": self.grammar,
        }


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first


@dataclass
class RequestOutput:
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None  # "stop" (EOS / stop token) | "length" | "abort" | "error"
    num_prompt_tokens: int
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    index: int = 0  # which of the request's n choices
    logprobs: list[TokenLogprob] | None = None  # aligned with new_token_ids, when asked for
    prompt_logprobs: list[TokenLogprob | None] | None = None  # once, first output of choice 0; [0] is None
    request_id: int = 0  # the engine's id for the request (for AsyncEngine.abort_choice)
    error: str | None = None  # what went wrong, with finish_reason "error" (a fault of ours)

    def merge(self, later: "RequestOutput") -> None:
        """Appends a later output of the same choice (a slow reader gets one merged output)."""
        self.new_token_ids.extend(later.new_token_ids)
        if later.logprobs is not None:
            self.logprobs = (self.logprobs or []) + later.logprobs
        if later.prompt_logprobs is not None:
            self.prompt_logprobs = later.prompt_logprobs
        self.finished, self.finish_reason, self.error = later.finished, later.finish_reason, later.error
