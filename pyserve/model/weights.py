"""The canonical (HF) tensor names and shapes a ModelConfig implies, and a completeness check.

Both loaders (HF directory, GGUF file) produce exactly this set, so the engine can rely on it.
"""

from __future__ import annotations

from .config import ModelConfig
from .errors import ModelLoadError
from .tensor import TensorRecord


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    h, hd, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q_out, kv_out = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "self_attn.q_proj.weight"] = (q_out, h)
        shapes[p + "self_attn.k_proj.weight"] = (kv_out, h)
        shapes[p + "self_attn.v_proj.weight"] = (kv_out, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, q_out)
        if cfg.attention_bias:
            shapes[p + "self_attn.q_proj.bias"] = (q_out,)
            shapes[p + "self_attn.k_proj.bias"] = (kv_out,)
            shapes[p + "self_attn.v_proj.bias"] = (kv_out,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "mlp.gate_proj.weight"] = (inter, h)
        shapes[p + "mlp.up_proj.weight"] = (inter, h)
        shapes[p + "mlp.down_proj.weight"] = (h, inter)
        if cfg.architecture == "gemma3":  # per-head q/k norms, and norms around the MLP
            shapes[p + "self_attn.q_norm.weight"] = (hd,)
            shapes[p + "self_attn.k_norm.weight"] = (hd,)
            shapes[p + "pre_feedforward_layernorm.weight"] = (h,)
            shapes[p + "post_feedforward_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes


def check_tensors(tensors: dict[str, TensorRecord], cfg: ModelConfig, where: str) -> None:
    """Raise ModelLoadError unless `tensors` is exactly the canonical set with the right shapes."""
    expected = expected_shapes(cfg)
    missing = [n for n in expected if n not in tensors]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ModelLoadError(f"{where}: missing tensors {missing[:5]}{more}")
    extra = [n for n in tensors if n not in expected]
    if extra:
        raise ModelLoadError(f"{where}: unexpected tensors {extra[:5]} (an unsupported model variant?)")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ModelLoadError(
                f"{where}: tensor {name} has shape {list(tensors[name].shape)}, the config implies {list(shape)}"
            )
