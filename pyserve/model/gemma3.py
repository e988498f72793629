"""Gemma 3 (architecture `gemma3`): what its HF config.json and its GGUF metadata say beyond the
Llama family's fields, and the tensors it adds.

Gemma 3 is the Llama decoder plus: embeddings scaled by sqrt(hidden_size), RMSNorms that multiply by
(1 + w), per-head q/k RMSNorms, norms on the attention and MLP outputs before the residual add
(four norms a layer), a GeGLU MLP (tanh GELU), and sliding-window layers (local rope base)
interleaved with global ones (global rope base, rope scaling) -- transformers' Gemma3TextModel.
The C++ model derives the fixed parts from the architecture name; the fields here are the ones a
checkpoint chooses.
"""

from __future__ import annotations

from typing import Any

from .errors import ModelLoadError

SLIDING, FULL = "sliding_attention", "full_attention"
# Gemma3TextConfig's defaults, which transformers also applies to a GGUF file (whose metadata holds
# none of these); llama.cpp hard-codes the same pattern and local base for gemma3.
DEFAULT_SLIDING_WINDOW_PATTERN = 6
DEFAULT_GLOBAL_ROPE_THETA = 1_000_000.0
DEFAULT_LOCAL_ROPE_THETA = 10_000.0
DEFAULT_SLIDING_WINDOW = 4096
DEFAULT_HEAD_DIM = 256
DEFAULT_QUERY_PRE_ATTN_SCALAR = 256.0
SUPPORTED_ACTIVATIONS = ("gelu_pytorch_tanh",)

# GGUF block tensor names -> HF names, where gemma3 differs from (or adds to) the Llama family.
GGUF_BLOCK_NAMES = {
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}


def layer_types_from_pattern(n_layers: int, pattern: int) -> list[str]:
    """Gemma3TextConfig's rule: every `pattern`-th layer (counting from 1) is global."""
    if pattern < 1:
        raise ModelLoadError(f"sliding_window_pattern must be >= 1, got {pattern}")
    return [SLIDING if (i + 1) % pattern else FULL for i in range(n_layers)]


def _check_layer_types(types: Any, n_layers: int, where: str) -> list[str]:
    if not isinstance(types, list) or len(types) != n_layers or any(t not in (SLIDING, FULL) for t in types):
        raise ModelLoadError(
            f"{where}: layer_types must list {n_layers} entries, each {SLIDING!r} or {FULL!r}; got {types!r}"
        )
    return list(types)


def gemma3_hf_fields(cfg: dict, where: str) -> dict[str, Any]:
    """The ModelConfig fields a Gemma3ForCausalLM config.json sets beyond (or unlike) a Llama one.
    Raises ModelLoadError for variants the engine does not compute (soft-capping, bidirectional
    attention, another activation)."""
    from .config import normalize_rope_scaling

    act = cfg.get("hidden_activation") or "gelu_pytorch_tanh"
    if act not in SUPPORTED_ACTIVATIONS:
        raise ModelLoadError(f"{where}: gemma3 hidden_activation {act!r} is not supported (only gelu_pytorch_tanh)")
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if cfg.get(key) is not None:
            raise ModelLoadError(f"{where}: {key}={cfg[key]!r} is not supported (Gemma 3 has none)")
    if cfg.get("use_bidirectional_attention"):
        raise ModelLoadError(f"{where}: use_bidirectional_attention=true is not supported")

    n_layers = int(cfg["num_hidden_layers"])
    types = cfg.get("layer_types")
    if types is None:
        types = layer_types_from_pattern(n_layers, int(cfg.get("sliding_window_pattern", DEFAULT_SLIDING_WINDOW_PATTERN)))

    # transformers v5: rope_parameters per layer type; older files: rope_theta, rope_local_base_freq
    # and rope_scaling (which applies to the global layers only).
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and (FULL in params or SLIDING in params):
        full, local = params.get(FULL) or {}, params.get(SLIDING) or {}
        rope_theta = full.get("rope_theta", cfg.get("rope_theta", DEFAULT_GLOBAL_ROPE_THETA))
        rope_scaling = normalize_rope_scaling(full, where)
        local_theta = local.get("rope_theta", cfg.get("rope_local_base_freq", DEFAULT_LOCAL_ROPE_THETA))
        if normalize_rope_scaling(local, where) is not None:
            raise ModelLoadError(f"{where}: rope scaling on the sliding-window layers is not supported")
    else:
        rope_theta = cfg.get("rope_theta", DEFAULT_GLOBAL_ROPE_THETA)
        rope_scaling = normalize_rope_scaling(cfg.get("rope_scaling"), where)
        local_theta = cfg.get("rope_local_base_freq", DEFAULT_LOCAL_ROPE_THETA)

    window = cfg.get("sliding_window", DEFAULT_SLIDING_WINDOW)
    return {
        "head_dim": int(cfg.get("head_dim") or DEFAULT_HEAD_DIM),
        "rope_theta": float(rope_theta),
        "rope_scaling": rope_scaling,
        "rope_local_theta": float(local_theta),
        "sliding_window": int(window) if window else None,
        "layer_types": _check_layer_types(types, n_layers, where),
        "query_pre_attn_scalar": float(cfg.get("query_pre_attn_scalar", DEFAULT_QUERY_PRE_ATTN_SCALAR)),
    }


def gemma3_gguf_fields(md: dict, n_layers: int, hidden: int, heads: int, head_dim: int, path: str) -> dict[str, Any]:
    """The fields a gemma3 GGUF file implies. The metadata has the window and the global rope base;
    the pattern, local base and score scalar are llama.cpp's (and transformers') fixed choices
    unless the file names them."""
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if md.get(f"gemma3.{key}") is not None:
            raise ModelLoadError(f"{path}: gemma3.{key} is not supported (Gemma 3 has none)")
    pattern = md.get("gemma3.attention.sliding_window_pattern", DEFAULT_SLIDING_WINDOW_PATTERN)
    if isinstance(pattern, list):  # per layer: true where the layer slides
        types = _check_layer_types([SLIDING if p else FULL for p in pattern], n_layers, path)
    else:
        types = layer_types_from_pattern(n_layers, int(pattern))
    # llama.cpp (llama-model.cpp, LLM_ARCH_GEMMA3): the 27B model (62 layers) scales scores by
    # (hidden / heads) ** -0.5, every other size by head_dim ** -0.5.
    scalar = hidden / heads if n_layers == 62 else head_dim
    return {
        "layer_types": types,
        "rope_local_theta": float(md.get("gemma3.rope.freq_base_swa", DEFAULT_LOCAL_ROPE_THETA)),
        "query_pre_attn_scalar": float(scalar),
    }
