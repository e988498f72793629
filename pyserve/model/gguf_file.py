"""Loading a GGUF file (llama.cpp's format) through `gguf.GGUFReader` (memmapped).

Architectures `llama` and `qwen2`. Tensors are renamed to the canonical HF names; F32/F16/BF16
tensors stay as memmap views, every type `gguf.quants.dequantize` knows becomes float32. llama.cpp
permutes the q/k rows of arch `llama` (convert_hf_to_gguf.py, LlamaModel.permute) for its rope
layout; we undo it, as transformers' GGUF loader does, so the engine sees HF order. qwen2 is not
permuted. The tokenizer is rebuilt from the metadata (vocab_tokenizer.py).
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections import Counter
from typing import Any

import numpy as np
from tokenizers import AddedToken

from .config import ModelConfig, merge_ids
from .errors import ModelLoadError
from .parts import ModelParts
from .tensor import TensorRecord
from .tokenizer import Tokenizer
from .vocab_tokenizer import CONTROL, byte_level_bpe, sentencepiece_bpe
from .weights import check_tensors

log = logging.getLogger(__name__)

SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2")
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


def hf_tensor_name(gguf_name: str) -> str | None:
    """Canonical HF name for a GGUF tensor name, None when unknown."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}"
    return None


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


def _metadata(reader: Any) -> dict[str, Any]:
    """Field name -> Python value (arrays of strings/numbers as lists)."""
    out = {}
    for name, f in reader.fields.items():
        try:
            out[name] = f.contents()
        except Exception as e:  # a field type this gguf version cannot decode: skip it, say so
            log.debug("GGUF field %s unreadable: %s", name, e)
    return out


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
    eog = [i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == CONTROL and t in _EOG_TEXTS]
    eos_ids = merge_ids([int(eos)] if eos is not None else [], [int(x) for x in extra if x is not None], eog)
    bos = md.get("tokenizer.ggml.bos_token_id")
    window = get("attention.sliding_window")

    return ModelConfig(
        architecture=arch,
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length", required=True)),
        num_hidden_layers=int(get("block_count", required=True)),
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


def _tensor_record(t: Any, gguf: Any) -> TensorRecord:
    """Float formats stay memmap views; anything else is dequantized to float32."""
    Q = gguf.GGMLQuantizationType
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    if t.tensor_type == Q.F32:
        return TensorRecord("f32", np.asarray(t.data).reshape(shape), shape)
    if t.tensor_type == Q.F16:
        return TensorRecord("f16", np.asarray(t.data).reshape(shape), shape)
    if t.tensor_type == Q.BF16:
        return TensorRecord("bf16", np.asarray(t.data).view(np.uint16).reshape(shape), shape)
    try:
        data = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError as e:
        raise ModelLoadError(f"tensor {t.name}: GGML type {t.tensor_type.name} cannot be dequantized: {e}") from e
    return TensorRecord("f32", np.ascontiguousarray(data, dtype=np.float32).reshape(shape), shape)


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


_SAMPLING_KEYS = {
    "general.sampling.temp": "temperature",
    "general.sampling.top_p": "top_p",
    "general.sampling.top_k": "top_k",
    "general.sampling.min_p": "min_p",
    "general.sampling.penalty_repeat": "repetition_penalty",
}


def _format_name(reader: Any, md: dict, gguf: Any) -> str:
    ft = md.get("general.file_type")
    if ft is not None:
        try:
            return gguf.LlamaFileType(int(ft)).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            pass
    counts = Counter(t.tensor_type.name for t in reader.tensors if len(t.shape) > 1)
    return counts.most_common(1)[0][0] if counts else "F32"


def read_gguf(path: str, *, load_tensors: bool = True) -> ModelParts:
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - gguf is a dependency
        raise ModelLoadError("reading GGUF files needs the `gguf` package (pip install gguf)") from e
    try:
        reader = gguf.GGUFReader(path, "r")
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: not a readable GGUF file: {e}") from e
    md = _metadata(reader)
    arch = md.get("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ModelLoadError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)}"
        )
    by_name = {t.name: t for t in reader.tensors}
    rope_freqs = None
    if (rf := by_name.get("rope_freqs.weight")) is not None:
        rope_freqs = np.asarray(gguf.quants.dequantize(rf.data, rf.tensor_type), dtype=np.float32).reshape(-1)
    config = _build_config(md, arch, set(by_name), rope_freqs, path)

    tensors: dict[str, TensorRecord] = {}
    if load_tensors:
        for t in reader.tensors:
            if t.name == "rope_freqs.weight":
                continue  # folded into config.rope_scaling
            hf = hf_tensor_name(t.name)
            if hf is None:
                raise ModelLoadError(f"{path}: tensor {t.name!r} is not part of a {arch} model we support")
            rec = _tensor_record(t, gguf)
            if arch == "llama" and ".attn_q." in t.name:
                rec = _permuted(rec, config.num_attention_heads)
            elif arch == "llama" and ".attn_k." in t.name:
                rec = _permuted(rec, config.num_key_value_heads)
            tensors[hf] = rec
        check_tensors(tensors, config, path)

    tokenizer = build_tokenizer(md, path, config.eos_token_ids)
    config.eos_token_ids = merge_ids(tokenizer.eos_token_ids, config.eos_token_ids)
    gen = {ours: _f32(md[k]) if isinstance(md[k], float) else md[k] for k, ours in _SAMPLING_KEYS.items() if k in md}
    return ModelParts(
        config=config,
        tensors=tensors,
        tokenizer=tokenizer,
        chat_template=md.get("tokenizer.chat_template"),
        generation_defaults=gen,
        format=f"gguf {_format_name(reader, md, gguf)}",
        file_bytes=os.path.getsize(path),
    )
