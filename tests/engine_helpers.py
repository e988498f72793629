"""Shared helpers for tests that run the C++ engine on a loaded model."""

from __future__ import annotations

from typing import Any

import anyio
import numpy as np

from pyserve import _C
from pyserve.config import EngineConfig
from pyserve.engine.async_engine import AsyncEngine
from pyserve.engine.native import native_model
from pyserve.engine.sampling import SamplingParams
from pyserve.model.loader import LoadedModel, load_model


def c_model(model: LoadedModel, threads: int = 2, isa: str = "auto") -> "_C.Model":
    return native_model(model, threads, isa)


def our_logits(cm: "_C.Model", prompt: list[int], continuation: list[int], max_tokens: int = 512) -> np.ndarray:
    """Prefill `prompt` in one step, then feed `continuation` one token per decode step.
    Returns logits for every position: [len(prompt) + len(continuation), vocab]."""
    s = _C.Session(cm, max_tokens)
    rows = [s.forward(prompt, True)]
    for t in continuation:
        rows.append(s.forward([t], True))
    return np.concatenate(rows)


# Quantized files: the engine computes on the file's integer codes with activations rounded to
# int16 per 32 values (csrc/backend/cpu/kernels.h), where transformers dequantizes to float32.
# Measured: 2.7e-4 on SmolLM2 Q4_1, 1.3e-4 on Gemma 3 Q4_K_M; an 8-bit activation path (llama.cpp's)
# is ~1e-2, so this bound still tells the two apart.
QUANTIZED_REL = 1e-3


def assert_logits_close(ours: np.ndarray, ref: np.ndarray, rel: float = 1e-4) -> None:
    """max |ours - ref| <= rel * max |ref| (the parity bound of the project)."""
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    err = float(np.abs(ours - ref).max())
    scale = float(np.abs(ref).max())
    assert err <= rel * scale, f"max |ours - ref| = {err:.3g} > {rel} x max |ref| = {rel * scale:.3g}"


async def engine_greedy(path: str, prompts: list[list[int]], max_tokens: int, **engine_kw: Any) -> list[list[int]]:
    """Greedy tokens of every prompt, all batched together through an AsyncEngine on `path`."""
    engine = AsyncEngine(load_model(path), EngineConfig(num_threads=2, **engine_kw))
    results: dict[int, list[int]] = {}
    async with anyio.create_task_group() as tg:
        await tg.start(engine.run)

        async def one(i: int, ids: list[int]) -> None:
            out: list[int] = []
            async for o in engine.generate(ids, SamplingParams(max_tokens=max_tokens, temperature=0.0)):
                out += o.new_token_ids
            results[i] = out

        async with anyio.create_task_group() as inner:
            for i, ids in enumerate(prompts):
                inner.start_soon(one, i, ids)
        tg.cancel_scope.cancel()
    await engine.shutdown()
    return [results[i] for i in range(len(prompts))]
