"""ModelConfig: the architecture facts the engine needs, parsed from HF config.json (GGUF fills
the same dataclass from its metadata in gguf_file.py)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

from .errors import ModelLoadError

log = logging.getLogger(__name__)

# HF `architectures[0]` -> our architecture name
SUPPORTED_HF_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Gemma3ForCausalLM": "gemma3",
}


@dataclass
class ModelConfig:
    architecture: str  # "llama" | "mistral" | "qwen2" | "gemma3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    # None, {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"} or {"rope_type": "linear", "factor"}
    rope_scaling: dict | None
    max_position_embeddings: int  # the context length
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v projections have biases (qwen2)
    sliding_window: int | None
    bos_token_id: int | None
    eos_token_ids: list[int] = field(default_factory=list)
    # Gemma 3: per layer "sliding_attention" | "full_attention" (None: every layer alike), the rope
    # base of the sliding layers (None: rope_theta), and the attention score scale's
    # query_pre_attn_scalar (scores * query_pre_attn_scalar ** -0.5; None: head_dim).
    layer_types: list[str] | None = None
    rope_local_theta: float | None = None
    query_pre_attn_scalar: float | None = None
    # StreamingLLM's attention sink: sliding layers also attend to the first attention_sink tokens
    # (set with --overrides attention_sink_size=N; 0: none).
    attention_sink: int = 0

    def slides_everywhere(self) -> bool:
        """Every layer attends only within the sliding window (and the sink): a sequence holds
        only that much KV, so it may outgrow the cache."""
        return bool(self.sliding_window) and (
            self.layer_types is None or all(t == "sliding_attention" for t in self.layer_types)
        )


def as_id_list(value: Any) -> list[int]:
    """eos_token_id fields are an int, a list of ints, or null."""
    if value is None:
        return []
    if isinstance(value, bool):
        raise ModelLoadError(f"token id must be an integer, got {value!r}")
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        out: list[int] = []
        for v in value:
            out.extend(as_id_list(v))
        return out
    raise ModelLoadError(f"token id must be an integer or a list of integers, got {value!r}")


def merge_ids(*lists: list[int]) -> list[int]:
    """Concatenate id lists keeping first occurrences in order."""
    out: list[int] = []
    for ids in lists:
        for i in ids:
            if i not in out:
                out.append(i)
    return out


_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def normalize_rope_scaling(raw: dict | None, where: str = "config.json") -> dict | None:
    """HF writes the rope type under "type" (old) or "rope_type" (new); v5 configs fold rope_theta
    into `rope_parameters` too. Return None or one of the two shapes ModelConfig documents."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{where}: rope_scaling must be an object, got {raw!r}")
    rope_type = raw.get("rope_type", raw.get("type"))
    if rope_type in (None, "default", "none"):
        return None
    if rope_type == "llama3":
        missing = [k for k in _LLAMA3_KEYS if k not in raw]
        if missing:
            raise ModelLoadError(f"{where}: llama3 rope_scaling lacks {', '.join(missing)}")
        return {
            "rope_type": "llama3",
            "factor": float(raw["factor"]),
            "low_freq_factor": float(raw["low_freq_factor"]),
            "high_freq_factor": float(raw["high_freq_factor"]),
            "original_max_position_embeddings": int(raw["original_max_position_embeddings"]),
        }
    if rope_type == "linear":
        if "factor" not in raw:
            raise ModelLoadError(f"{where}: linear rope_scaling lacks factor")
        factor = float(raw["factor"])
        return None if factor == 1.0 else {"rope_type": "linear", "factor": factor}
    raise ModelLoadError(
        f"{where}: rope scaling type {rope_type!r} is not supported; supported: llama3, linear (or none)"
    )


def _req(cfg: dict, key: str, where: str) -> Any:
    if cfg.get(key) is None:
        raise ModelLoadError(f"{where}: required field {key!r} is missing")
    return cfg[key]


def _sliding_window(cfg: dict, arch: str, n_layers: int, where: str) -> int | None:
    window = cfg.get("sliding_window")
    if arch == "llama" or window is None:
        return None
    if arch == "qwen2":
        if not cfg.get("use_sliding_window", False):
            return None
        # Qwen2 slides only in layers >= max_window_layers; one window for all layers is all we model.
        max_window_layers = int(cfg.get("max_window_layers", 0) or 0)
        if max_window_layers >= n_layers:
            return None
        if max_window_layers > 0:
            raise ModelLoadError(
                f"{where}: sliding window in only some layers (max_window_layers={max_window_layers} of "
                f"{n_layers}) is not supported"
            )
    return int(window)


def parse_hf_config(cfg: dict, generation_config: dict | None = None, where: str = "config.json") -> ModelConfig:
    """ModelConfig from a config.json dict (+ generation_config.json for extra eos ids)."""
    archs = cfg.get("architectures") or []
    hf_arch = archs[0] if archs else None
    if hf_arch not in SUPPORTED_HF_ARCHITECTURES:
        shown = hf_arch if hf_arch else f"none (model_type {cfg.get('model_type')!r})"
        raise ModelLoadError(
            f"{where}: architecture {shown} is not supported; supported: "
            f"{', '.join(SUPPORTED_HF_ARCHITECTURES)}"
        )
    arch = SUPPORTED_HF_ARCHITECTURES[hf_arch]

    if arch == "gemma3":
        from .gemma3 import gemma3_hf_fields

        gemma = gemma3_hf_fields(cfg, where)  # checks its activation; fields that override ours
    else:
        gemma = {}
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ModelLoadError(f"{where}: hidden_act {act!r} is not supported (only silu)")
    if cfg.get("mlp_bias"):
        raise ModelLoadError(f"{where}: mlp_bias=true is not supported")

    hidden = int(_req(cfg, "hidden_size", where))
    heads = int(_req(cfg, "num_attention_heads", where))
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    n_layers = int(_req(cfg, "num_hidden_layers", where))
    if heads % kv_heads:
        raise ModelLoadError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")

    # rope: classic `rope_theta` + `rope_scaling`, or transformers v5 `rope_parameters` (theta inside).
    rope_params = cfg.get("rope_parameters")
    if isinstance(rope_params, dict) and "rope_scaling" not in cfg:
        rope_scaling = normalize_rope_scaling(rope_params, where)
        rope_theta = rope_params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    else:
        rope_scaling = normalize_rope_scaling(cfg.get("rope_scaling"), where)
        rope_theta = cfg.get("rope_theta", 10000.0)

    if arch == "qwen2":
        attention_bias = True  # Qwen2 always has q/k/v biases
    else:
        attention_bias = bool(cfg.get("attention_bias", False))
        if attention_bias:
            # Llama's attention_bias also adds an o_proj bias, which the engine does not implement.
            raise ModelLoadError(f"{where}: attention_bias=true is not supported for {hf_arch}")

    gen = generation_config or {}
    bos = cfg.get("bos_token_id", gen.get("bos_token_id"))
    if isinstance(bos, list):
        bos = bos[0] if bos else None
    eos = merge_ids(as_id_list(gen.get("eos_token_id")), as_id_list(cfg.get("eos_token_id")))

    tie_default = arch == "gemma3"  # Llama/Mistral/Qwen2 configs default to untied, Gemma 3 to tied
    config = ModelConfig(
        architecture=arch,
        vocab_size=int(_req(cfg, "vocab_size", where)),
        hidden_size=hidden,
        intermediate_size=int(_req(cfg, "intermediate_size", where)),
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta),
        rope_scaling=rope_scaling,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", tie_default)),
        attention_bias=attention_bias,
        sliding_window=_sliding_window(cfg, arch, n_layers, where),
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=eos,
    )
    return dataclasses.replace(config, **gemma) if gemma else config
