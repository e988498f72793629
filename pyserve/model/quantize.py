"""`--quantization`: MLC-LLM's weight schemes applied to a checkpoint's matrices at load.

    q0f32 / q0f16 / q0bf16   matrices stored as float32 / float16 / bfloat16 (no quantization)
    q8f16_1                  groups of 32 along in-features, int8 codes, one f16 scale a group
    q4f16_1                  groups of 32, 4-bit codes, one f16 scale a group

MLC's group quantization (mlc_llm.quantization.GroupQuantize, symmetric): scale = max(max|w|, 1e-4)
/ max_int with max_int = 7 (4-bit) or 127 (8-bit), code = clip(round(w / scale) + max_int, 0,
2 max_int), w' = (code - max_int) * scale. The results are handed to the engine as GGUF blocks it
already runs natively: q8f16_1 is Q8_0 exactly (code - 127 as int8, scale as d), and q4f16_1 is
Q4_0 with each code raised by one (Q4_0 reads w = d (q - 8); code + 1 - 8 = code - 7). Only 2-D
matrices are touched (projections, embeddings, the LM head); norms keep their dtype.

Without the flag a checkpoint keeps its own dtype (bf16 stays bf16) and a GGUF file its own
blocks; a GGUF file is already quantized, and re-quantizing it is refused rather than done lossily.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from .errors import ModelLoadError
from .loader import LoadedModel
from .tensor import TensorRecord

log = logging.getLogger("pyserve.model")

SCHEMES = ("q0f32", "q0f16", "q0bf16", "q8f16_1", "q4f16_1")
GROUP = 32


def bf16_bits(w: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, rounded to nearest even (torch's rounding)."""
    bits = np.ascontiguousarray(w, dtype=np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def group_quantize(w: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """MLC's symmetric group quantization of w: [n, k] (k a multiple of 32): codes [n, k / 32, 32]
    in 0 .. 2 max_int (uint8) and f16 scales [n, k / 32]."""
    max_int = (1 << (bits - 1)) - 1
    n, k = w.shape
    g = np.asarray(w, dtype=np.float32).reshape(n, k // GROUP, GROUP)
    scale = (np.maximum(np.abs(g).max(axis=2), np.float32(1e-4)) / np.float32(max_int)).astype(np.float16)
    q = np.rint(g / scale.astype(np.float32)[..., None]) + max_int
    return np.clip(q, 0, 2 * max_int).astype(np.uint8), scale


def _blocks_q8_0(w: np.ndarray) -> np.ndarray:
    codes, scale = group_quantize(w, 8)
    n, nb, _ = codes.shape
    out = np.empty((n, nb, 34), np.uint8)
    out[..., :2] = scale[..., None].view(np.uint8)
    out[..., 2:] = (codes.astype(np.int16) - 127).astype(np.int8).view(np.uint8)
    return out.reshape(n, nb * 34)


def _blocks_q4_0(w: np.ndarray) -> np.ndarray:
    codes, scale = group_quantize(w, 4)
    codes = codes + 1  # Q4_0's offset is 8, MLC's 7
    n, nb, _ = codes.shape
    out = np.empty((n, nb, 18), np.uint8)
    out[..., :2] = scale[..., None].view(np.uint8)
    out[..., 2:] = codes[..., :16] | (codes[..., 16:] << 4)  # low nibbles weights 0..15
    return out.reshape(n, nb * 18)


def quantize_tensors(tensors: dict[str, TensorRecord], scheme: str, what: str = "the model") -> dict[str, TensorRecord]:
    """Every matrix of `tensors` in `scheme` (vectors as they are); ModelLoadError when a matrix
    cannot take it."""
    if scheme not in SCHEMES:
        raise ModelLoadError(f"unknown --quantization {scheme!r} (expected one of {', '.join(SCHEMES)})")
    out: dict[str, TensorRecord] = {}
    for name, rec in tensors.items():
        if len(rec.shape) != 2:
            out[name] = rec
            continue
        w = rec.to_float32()
        if scheme == "q0f32":
            out[name] = TensorRecord("f32", np.ascontiguousarray(w), rec.shape)
        elif scheme == "q0f16":
            out[name] = TensorRecord("f16", w.astype(np.float16), rec.shape)
        elif scheme == "q0bf16":
            out[name] = TensorRecord("bf16", bf16_bits(w), rec.shape)
        else:
            if rec.shape[1] % GROUP:
                raise ModelLoadError(f"--quantization {scheme}: {name} of {what} has {rec.shape[1]} input features, "
                                     f"not a multiple of the group size {GROUP}")
            if scheme == "q8f16_1":
                out[name] = TensorRecord("q8_0", _blocks_q8_0(w), rec.shape)
            else:
                out[name] = TensorRecord("q4_0", _blocks_q4_0(w), rec.shape)
    return out


def quantize_model(model: LoadedModel, scheme: str) -> None:
    """Applies `scheme` to model.tensors in place (ModelLoadError when it cannot)."""
    if scheme not in SCHEMES:
        raise ModelLoadError(f"unknown --quantization {scheme!r} (expected one of {', '.join(SCHEMES)})")
    if model.format.startswith("gguf"):
        raise ModelLoadError(f"--quantization {scheme} applies to HF checkpoints; {model.name} is a GGUF file, "
                             "already quantized, and runs as its blocks are")
    t0 = time.perf_counter()
    before = sum(r.nbytes for r in model.tensors.values())
    out = quantize_tensors(model.tensors, scheme, model.name)
    model.tensors = out
    after = sum(r.nbytes for r in out.values())
    log.info("quantization %s: %d matrices, %.0f MB -> %.0f MB in %.2f s", scheme,
             sum(len(r.shape) == 2 for r in out.values()), before / 1e6, after / 1e6, time.perf_counter() - t0)
