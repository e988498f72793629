"""Loading a GGUF file (llama.cpp's format): the container is parsed by gguf_reader.py (one mmap).

Architectures `llama`, `qwen2` and `gemma3`. Tensors are renamed to the canonical HF names; F32/F16/BF16
tensors stay as views into the mmap; block types named in `keep_blocks` are handed on as their raw
blocks (views too), every other type `gguf.quants.dequantize` knows becomes float32. llama.cpp
permutes the q/k rows of arch `llama` (convert_hf_to_gguf.py, LlamaModel.permute) for its rope
layout; we undo it, as transformers' GGUF loader does, so the engine sees HF order. qwen2 is not
permuted. llama.cpp stores Gemma's norm weights as (1 + w); we subtract the 1 again, as
transformers does, so every loader hands on HF's values. The tokenizer is rebuilt from the metadata
(vocab_tokenizer.py).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import time
from collections import Counter
from collections.abc import Collection
from typing import Any

import numpy as np
from tokenizers import AddedToken

from .config import ModelConfig, merge_ids
from .errors import ModelLoadError
from .gemma3 import GGUF_BLOCK_NAMES as GEMMA3_BLOCK_NAMES
from .gemma3 import gemma3_gguf_fields
from .gguf_reader import ELEMENT_DTYPES, GGUFFile, TensorInfo, read_gguf_file
from .parts import ModelParts
from .tensor import TensorRecord
from .tokenizer import Tokenizer
from .vocab_tokenizer import CONTROL, byte_level_bpe, gemma_bpe, sentencepiece_bpe
from .weights import check_tensors

log = logging.getLogger(__name__)

SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2", "gemma3")
SUPPORTED_GGUF_TOKENIZERS = ("gpt2", "llama")

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(.+)")

# Control tokens llama.cpp also treats as end-of-generation (llama-vocab.cpp's EOG heuristic).
_EOG_TEXTS = {"<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<EOT>", "<|end_of_text|>"}


def hf_tensor_name(gguf_name: str, arch: str = "llama") -> str | None:
    """Canonical HF name for a GGUF tensor name of architecture `arch`, None when unknown."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m is None:
        return None
    names = _BLOCK_NAMES
    if arch == "gemma3":  # its ffn_norm is the MLP's pre-norm, and it has four more norms
        names = {**_BLOCK_NAMES, **GEMMA3_BLOCK_NAMES}
    return f"model.layers.{m.group(1)}.{names[m.group(2)]}" if m.group(2) in names else None


def reverse_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (rows of each head interleaved pairwise for its rope):
    llama.cpp: w.reshape(n_head, 2, d/2, ...).swapaxes(1, 2); inverse: (n_head, d/2, 2) -> swap."""
    dim = w.shape[0] // n_head // 2
    return np.ascontiguousarray(w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape))


def llama3_rope_factors(head_dim: int, theta: float, factor: float, low: float, high: float, orig_ctx: int) -> np.ndarray:
    """The per-frequency divisors llama.cpp bakes into `rope_freqs.weight` for llama3 rope scaling."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    low_wavelen, high_wavelen = orig_ctx / low, orig_ctx / high
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (orig_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def infer_llama3_rope_scaling(
    rope_freqs: np.ndarray, head_dim: int, theta: float, original_context: int | None = None
) -> dict | None:
    """llama.cpp stores Llama 3.1/3.2 rope scaling only as `rope_freqs.weight` (per-frequency
    divisors). Recover llama3 parameters that reproduce them: factor is the largest divisor; with
    Meta's low_freq_factor 1 and high_freq_factor 4, each divisor strictly between 1 and factor
    pins original_max_position_embeddings. The answer is checked by recomputing the divisors."""
    r = np.asarray(rope_freqs, dtype=np.float64).reshape(-1)
    if r.shape[0] != head_dim // 2:
        raise ModelLoadError(f"GGUF rope_freqs.weight has {r.shape[0]} values, expected head_dim/2 = {head_dim // 2}")
    if np.allclose(r, 1.0):
        return None
    factor = float(r.max())
    low, high = 1.0, 4.0
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    wavelen = 2 * math.pi / freqs
    mid = (r > 1.0 + 1e-4) & (r < factor - 1e-4 * factor)
    if mid.any():
        smooth = (1.0 / r[mid] - 1.0 / factor) / (1.0 - 1.0 / factor)
        orig = float(np.median(wavelen[mid] * (smooth * (high - low) + low)))
        orig_candidates = [int(round(orig))]
    else:
        orig_candidates = [c for c in (original_context, 8192, 4096, 16384, 2048, 1024) if c]
    for orig_ctx in orig_candidates:
        params = {
            "rope_type": "llama3",
            "factor": factor,
            "low_freq_factor": low,
            "high_freq_factor": high,
            "original_max_position_embeddings": int(orig_ctx),
        }
        cand = llama3_rope_factors(head_dim, theta, factor, low, high, int(orig_ctx))
        if np.allclose(cand, r, rtol=1e-3, atol=1e-4):
            return params
    raise ModelLoadError(
        "GGUF rope_freqs.weight does not match llama3 rope scaling (low_freq_factor 1, high_freq_factor 4); "
        "other per-frequency rope factors are not supported"
    )


def _f32(value: Any) -> float:
    """GGUF stores floats as float32; give back the shortest decimal that rounds to it (1e-05, not
    9.999999747378752e-06), which is what the model's config.json said."""
    return float(str(np.float32(value)))


def _build_config(md: dict, arch: str, tensors_present: set[str], rope_freqs: np.ndarray | None, path: str) -> ModelConfig:
    def get(key: str, default: Any = None, required: bool = False) -> Any:
        full = f"{arch}.{key}"
        if full in md:
            return md[full]
        if required:
            raise ModelLoadError(f"{path}: metadata {full} is missing")
        return default

    hidden = int(get("embedding_length", required=True))
    heads = int(get("attention.head_count", required=True))
    kv_heads = get("attention.head_count_kv", heads)
    if isinstance(kv_heads, list):  # per-layer counts (hybrid models)
        if len(set(kv_heads)) != 1:
            raise ModelLoadError(f"{path}: per-layer kv head counts are not supported")
        kv_heads = kv_heads[0]
    head_dim = int(get("attention.key_length", hidden // heads))
    theta = _f32(get("rope.freq_base", 10000.0))
    tokens = md.get("tokenizer.ggml.tokens") or []
    vocab_size = int(get("vocab_size", len(tokens)))
    if vocab_size <= 0:
        raise ModelLoadError(f"{path}: cannot tell the vocabulary size")

    rope_scaling = None
    scaling_type = get("rope.scaling.type")
    if rope_freqs is not None:
        orig = get("rope.scaling.original_context_length")
        rope_scaling = infer_llama3_rope_scaling(rope_freqs, head_dim, theta, int(orig) if orig else None)
    elif scaling_type not in (None, "none"):
        if scaling_type != "linear":
            raise ModelLoadError(f"{path}: rope scaling type {scaling_type!r} is not supported; supported: linear, llama3")
        factor = _f32(get("rope.scaling.factor", 1.0))
        rope_scaling = None if factor == 1.0 else {"rope_type": "linear", "factor": factor}
    elif get("rope.scale_linear") is not None:  # older files
        factor = float(get("rope.scale_linear"))
        rope_scaling = None if factor == 1.0 else {"rope_type": "linear", "factor": factor}

    eos = md.get("tokenizer.ggml.eos_token_id")
    extra = [md.get("tokenizer.ggml.eot_token_id"), md.get("tokenizer.ggml.eom_token_id")]
    types = md.get("tokenizer.ggml.token_type") or []
    eog = [i for i in _ids_of_type(types, CONTROL) if i < len(tokens) and tokens[i] in _EOG_TEXTS]
    eos_ids = merge_ids([int(eos)] if eos is not None else [], [int(x) for x in extra if x is not None], eog)
    bos = md.get("tokenizer.ggml.bos_token_id")
    window = get("attention.sliding_window")
    n_layers = int(get("block_count", required=True))

    config = ModelConfig(
        architecture=arch,
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length", required=True)),
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        num_key_value_heads=int(kv_heads),
        head_dim=head_dim,
        rms_norm_eps=_f32(get("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=int(get("context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensors_present,
        attention_bias=arch == "qwen2" or "blk.0.attn_q.bias" in tensors_present,
        sliding_window=int(window) if window else None,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=eos_ids,
    )
    if arch == "gemma3":
        config = dataclasses.replace(config, **gemma3_gguf_fields(md, n_layers, hidden, heads, head_dim, path))
    return config


def _ids_of_type(types: list[int], wanted: int) -> list[int]:
    """Indices of `types` equal to `wanted` (one numpy pass, not a Python loop over 49k tokens)."""
    return np.flatnonzero(np.asarray(types) == wanted).tolist() if types else []


# GGML types whose bytes are already one of TensorRecord's float formats.
_FLOAT_FORMATS = {"F32": "f32", "F16": "f16", "BF16": "bf16"}


def _tensor_record(g: GGUFFile, t: TensorInfo, keep_blocks: Collection[str]) -> TensorRecord:
    """F32/F16/BF16 and the block types in keep_blocks stay views into the mmap (blocks as
    uint8 rows, shape[:-1] + (row_bytes,), format the lower-case type name, e.g. "q4_1"); anything
    else is dequantized to float32."""
    fmt = _FLOAT_FORMATS.get(t.type.name)
    if fmt is not None:
        return TensorRecord(fmt, g.array(t), t.shape)
    if t.type.name.lower() in keep_blocks:
        return TensorRecord(t.type.name.lower(), g.blocks(t), t.shape)
    return TensorRecord("f32", _dequantize(g, t), t.shape)


def _dequantize(g: GGUFFile, t: TensorInfo) -> np.ndarray:
    """float32 copy of any tensor `gguf.quants` can decode (imported only when one needs it)."""
    if t.type.name == "BF16":  # bits in uint16: widen into the high half of a float32
        return (g.array(t).astype(np.uint32) << 16).view(np.float32)
    if t.type.name in ELEMENT_DTYPES:  # F32, F16, F64, I8..I64
        return g.array(t).astype(np.float32)
    import gguf

    try:
        qtype = gguf.GGMLQuantizationType(t.type.id)
        data = gguf.quants.dequantize(g.blocks(t), qtype)
    except (NotImplementedError, ValueError) as e:
        raise ModelLoadError(f"{g.path}: tensor {t.name}: GGML type {t.type.name} cannot be dequantized: {e}") from e
    return np.ascontiguousarray(data, dtype=np.float32).reshape(t.shape)


def _gemma_norm(rec: TensorRecord) -> TensorRecord:
    """llama.cpp's converter stores a Gemma norm weight w as (1 + w); HF's w is the file's minus 1
    (in float32, as transformers' Gemma2TensorProcessor computes it). A small copy, never a view."""
    return TensorRecord("f32", np.ascontiguousarray(rec.to_float32() - np.float32(1.0)), rec.shape)


def _permuted(rec: TensorRecord, n_head: int) -> TensorRecord:
    return TensorRecord(rec.format, reverse_permute(rec.data, n_head), rec.shape)


def build_tokenizer(md: dict, path: str, extra_eos_ids: list[int] = ()) -> Tokenizer:
    """The tokenizer the metadata describes: `gpt2` (byte-level BPE) or `llama` (sentencepiece)."""
    model = md.get("tokenizer.ggml.model")
    tokens = md.get("tokenizer.ggml.tokens")
    if model not in SUPPORTED_GGUF_TOKENIZERS or not tokens:
        raise ModelLoadError(
            f"{path}: tokenizer model {model!r} is not supported; supported: {', '.join(SUPPORTED_GGUF_TOKENIZERS)}"
        )
    types = md.get("tokenizer.ggml.token_type")
    bos_id = md.get("tokenizer.ggml.bos_token_id")
    eos_id = md.get("tokenizer.ggml.eos_token_id")
    unk_id = md.get("tokenizer.ggml.unknown_token_id")
    pad_id = md.get("tokenizer.ggml.padding_token_id")

    def tok(i: Any) -> str | None:
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    if model == "gpt2":
        merges = md.get("tokenizer.ggml.merges")
        if merges is None:
            raise ModelLoadError(f"{path}: gpt2 tokenizer without tokenizer.ggml.merges")
        backend = byte_level_bpe(tokens, merges, types, md.get("tokenizer.ggml.pre"))
        add_bos_default = False
    elif md.get("general.architecture") in _GEMMA_ARCHITECTURES:
        backend = gemma_bpe(tokens, types, unk_id=None if unk_id is None else int(unk_id))
        add_bos_default = True
    else:
        scores = md.get("tokenizer.ggml.scores")
        if scores is None:
            raise ModelLoadError(f"{path}: llama tokenizer without tokenizer.ggml.scores")
        backend = sentencepiece_bpe(
            tokens,
            types,
            scores=scores,
            unk_id=None if unk_id is None else int(unk_id),
            add_prefix_space=bool(md.get("tokenizer.ggml.add_space_prefix", True)),
        )
        add_bos_default = True  # llama.cpp adds BOS to sentencepiece vocabularies unless told not to
    # The named special tokens are matched whole in text even when not typed CONTROL.
    known = {t.content for t in backend.get_added_tokens_decoder().values()}
    for i in (bos_id, eos_id, unk_id, pad_id):
        t = tok(i)
        if t is not None and t not in known:
            backend.add_special_tokens([AddedToken(t, special=True, normalized=False)])
            known.add(t)
    return Tokenizer(
        backend,
        bos_token=tok(bos_id),
        eos_token=tok(eos_id),
        unk_token=tok(unk_id),
        pad_token=tok(pad_id),
        add_bos_token=bool(md.get("tokenizer.ggml.add_bos_token", add_bos_default)),
        add_eos_token=bool(md.get("tokenizer.ggml.add_eos_token", False)),
        extra_eos_ids=extra_eos_ids,
    )


# Architectures whose `llama` vocabulary is Gemma's sentencepiece (see vocab_tokenizer.gemma_bpe).
_GEMMA_ARCHITECTURES = ("gemma", "gemma2", "gemma3")

_SAMPLING_KEYS = {
    "general.sampling.temp": "temperature",
    "general.sampling.top_p": "top_p",
    "general.sampling.top_k": "top_k",
    "general.sampling.min_p": "min_p",
    "general.sampling.penalty_repeat": "repetition_penalty",
}


# llama_ftype (llama.h) -> name, for the types a llama-family file is usually written in; others are
# looked up in the `gguf` package.
_FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
    12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 32: "BF16",
}


def _file_type_name(ft: int) -> str | None:
    if ft in _FILE_TYPES:
        return _FILE_TYPES[ft]
    try:
        import gguf

        return gguf.LlamaFileType(ft).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except (ImportError, ValueError):
        return None


def _format_name(g: GGUFFile) -> str:
    ft = g.metadata.get("general.file_type")
    if isinstance(ft, int) and (name := _file_type_name(ft)) is not None:
        return name
    counts = Counter(t.type.name for t in g.tensors.values() if len(t.dims) > 1)
    return counts.most_common(1)[0][0] if counts else "F32"


def read_gguf(path: str, *, load_tensors: bool = True, keep_blocks: Collection[str] = ()) -> ModelParts:
    """A GGUF file -> ModelParts. keep_blocks: lower-case GGML type names (e.g. {"q4_1", "q8_0"})
    whose tensors are handed on as raw blocks instead of being dequantized (see _tensor_record)."""
    t0 = time.perf_counter()
    g = read_gguf_file(path)
    md = g.metadata
    t_meta = time.perf_counter()
    arch = md.get("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ModelLoadError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)}"
        )
    rope_freqs = None
    if (rf := g.tensors.get("rope_freqs.weight")) is not None:
        rope_freqs = _dequantize(g, rf).reshape(-1)
    config = _build_config(md, arch, set(g.tensors), rope_freqs, path)

    tensors: dict[str, TensorRecord] = {}
    if load_tensors:
        keep = {k.lower() for k in keep_blocks}
        widened: Counter[str] = Counter()  # quantized types the engine has no kernel for: tensors each
        for t in g.tensors.values():
            if t.name == "rope_freqs.weight":
                continue  # folded into config.rope_scaling
            hf = hf_tensor_name(t.name, arch)
            if hf is None:
                raise ModelLoadError(f"{path}: tensor {t.name!r} is not part of a {arch} model we support")
            rec = _tensor_record(g, t, keep)
            if rec.format == "f32" and t.type.name not in ELEMENT_DTYPES:  # a block type, dequantized
                widened[t.type.name] += 1
            if arch == "llama" and ".attn_q." in t.name:
                rec = _permuted(rec, config.num_attention_heads)
            elif arch == "llama" and ".attn_k." in t.name:
                rec = _permuted(rec, config.num_key_value_heads)
            elif arch == "gemma3" and t.name.endswith("norm.weight"):
                rec = _gemma_norm(rec)
            tensors[hf] = rec
        check_tensors(tensors, config, path)
        if widened:  # an explicit fallback: correct, but these tensors cost float32's bytes
            log.warning(
                "%s: no native kernel for %s; those tensors were dequantized to float32 at load "
                "(natively run: F32, F16, BF16, %s)", path,
                ", ".join(f"{name} ({n} tensors)" for name, n in sorted(widened.items())),
                ", ".join(sorted(k.upper() for k in keep)))
    t_tensors = time.perf_counter()

    tokenizer = build_tokenizer(md, path, config.eos_token_ids)
    config.eos_token_ids = merge_ids(tokenizer.eos_token_ids, config.eos_token_ids)
    t_tok = time.perf_counter()
    log.debug(
        "%s: metadata %.3f s, tensors %.3f s, tokenizer %.3f s", path, t_meta - t0, t_tensors - t_meta, t_tok - t_tensors
    )
    gen = {ours: _f32(md[k]) if isinstance(md[k], float) else md[k] for k, ours in _SAMPLING_KEYS.items() if k in md}
    return ModelParts(
        config=config,
        tensors=tensors,
        tokenizer=tokenizer,
        chat_template=md.get("tokenizer.chat_template"),
        generation_defaults=gen,
        format=f"gguf {_format_name(g)}",
        file_bytes=g.file_size,
    )
