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
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def to_engine(self) -> dict[str, Any]:
        """The dict the C++ engine reads (csrc/bindings.cpp: sampling_from)."""
        return {
            "max_tokens": -1 if self.max_tokens is None else int(self.max_tokens),
            "temperature": float(self.temperature),
            "top_p": float(self.top_p),
            "top_k": max(int(self.top_k), 0),
            "min_p": float(self.min_p),
            # The engine's RNG takes 64 bits; OpenAI seeds may be negative.
            "seed": None if self.seed is None else int(self.seed) & 0x7FFF_FFFF_FFFF_FFFF,
            "stop_token_ids": [int(t) for t in self.stop_token_ids],
            "ignore_eos": bool(self.ignore_eos),
        }


@dataclass
class RequestOutput:
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None  # "stop" (EOS / stop token) | "length" | "abort"
    num_prompt_tokens: int
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
