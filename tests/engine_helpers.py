"""Shared helpers for tests that run the C++ engine on a loaded model."""

from __future__ import annotations

import numpy as np

from pyserve import _C
from pyserve.engine.native import native_model
from pyserve.model.loader import LoadedModel


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


def assert_logits_close(ours: np.ndarray, ref: np.ndarray, rel: float = 1e-4) -> None:
    """max |ours - ref| <= rel * max |ref| (the parity bound of the project)."""
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    err = float(np.abs(ours - ref).max())
    scale = float(np.abs(ref).max())
    assert err <= rel * scale, f"max |ours - ref| = {err:.3g} > {rel} x max |ref| = {rel * scale:.3g}"
