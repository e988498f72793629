"""Engine configuration: the knobs of `mlc_llm serve`, its mode presets, and `--overrides`.

Two steps, so every choice stays visible and testable without a model:

1. What the user said: `EngineConfig` with `None` for "not given" (flags, then `--overrides`).
2. `resolve_for_model(config, model_config)`: fills every `None` from the mode preset, the model's
   context length and the memory available for the KV cache, then checks the result. It is the one
   place that knows the model-dependent sizing (KV bytes per token on each device);
   `resolve_engine_config` below is its pure core, with every input explicit.

Mode presets (as MLC-LLM defines them):
    local        max_num_sequence = min(4, max_batch); max_total_sequence_length =
                 min(KV capacity, context, 8192)
    interactive  max_num_sequence = 1; max_total_sequence_length = min(KV capacity, context)
    server       max_num_sequence = max_batch; max_total_sequence_length = KV capacity from memory
Like MLC, max_total_sequence_length is the KV cache size: the tokens of all running sequences
together. kv_cache_tokens is that rounded up to whole pages.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

MODES = ("local", "interactive", "server")
# --device: cpu, a GPU of the build's vendor (cuda / rocm, device 0, or cuda:N / rocm:N), or auto
# (the GPU where the build and the machine have one, else the CPU).
DEVICES = ("cpu", "cuda", "rocm", "auto")
PREFIX_CACHE_MODES = ("radix", "disable")
PREFILL_MODES = ("hybrid", "chunked")
# MLC's --speculative-mode values, plus vLLM's prompt lookup ("ngram"):
SPECULATIVE_MODES = ("disable", "ngram", "small_draft", "eagle", "medusa")

DEFAULT_MAX_BATCH = 80  # MLC-LLM's default max_batch_size
LOCAL_MAX_TOTAL_SEQUENCE_LENGTH = 8192
DEFAULT_PREFILL_CHUNK = {"cpu": 512, "cuda": 2048, "rocm": 2048}
# Share of free memory the KV cache may take (a GPU's: after the weights; MLC's default 0.85).
DEFAULT_MEMORY_UTILIZATION = {"cpu": 0.5, "cuda": 0.85, "rocm": 0.85}
FALLBACK_KV_BUDGET_BYTES = 2 << 30  # when free memory is unknown
# Bytes per KV element when sizing the cache from memory: f32 on every backend today (the GPU
# kernels can read an f16 cache; the engine does not store one yet).
KV_DTYPE_BYTES = {"cpu": 4, "cuda": 4, "rocm": 4}


def device_kind(device: str) -> str:
    """cpu, cuda, rocm or auto: the device's kind without its index ("cuda:1" -> "cuda")."""
    return device.split(":", 1)[0]


def device_index(device: str) -> int:
    """The N of cuda:N / rocm:N (0 when not given)."""
    return int(device.split(":", 1)[1]) if ":" in device else 0


def valid_device(device: str) -> bool:
    kind, sep, index = device.partition(":")
    if kind not in DEVICES:
        return False
    return not sep or (kind in ("cuda", "rocm") and index.isdigit() and len(index) <= 4)


def resolve_device(device: str, available: tuple[str, ...]) -> str:
    """auto -> the build's GPU where `available` (what pyserve._C.devices() reports) has one, else
    cpu; any other device as it is."""
    if device != "auto":
        return device
    return next((d for d in available if d != "cpu"), "cpu")


class ConfigError(ValueError):
    """A bad flag or override; the message says which and what is allowed."""


@dataclass
class EngineConfig:
    device: str = "cpu"
    mode: str = "local"
    max_batch: int = DEFAULT_MAX_BATCH  # upper bound for max_num_sequence (the "server" preset)
    max_num_sequence: int | None = None  # sequences decoded together
    max_total_sequence_length: int | None = None  # KV cache capacity in tokens, all sequences
    max_single_sequence_length: int | None = None  # one sequence's limit (prompt + output); the
    #                                                 served max_model_len. None: model context.
    prefill_chunk_size: int | None = None  # prompt tokens per forward step
    page_size: int = 16  # tokens per KV page
    num_threads: int | None = None  # CPU threads; None: the CPUs this process may use
    kv_cache_tokens: int | None = None  # KV pool size; given: caps the memory-derived capacity
    memory_utilization: float | None = None  # share of free memory for the KV cache
    prefix_cache_mode: str = "radix"
    # Finished sequences whose KV pages stay in the prefix cache (MLC's meaning): 0 none, -1
    # unlimited; None: max_num_sequence.
    prefix_cache_max_num_recycling_seqs: int | None = None
    prefill_mode: str = "hybrid"
    enable_tracing: bool = False  # the engine keeps an event trace (/debug/dump_event_trace)
    # MLC's model overrides, which MLC itself never reads. sliding_window_size: the sliding window
    # of every sliding layer (a model without one slides in every layer; -1 turns it off);
    # attention_sink_size: tokens at the start every sliding layer keeps attending to.
    sliding_window_size: int | None = None
    attention_sink_size: int | None = None
    # Speculative decoding: MLC's --speculative-mode (plus "ngram", prompt lookup), the drafts per
    # sequence and step (0: automatic, MLC's rule: 4 below 10 running sequences, 3 below 20, 2
    # below 30, else none) and the draft tree's width (1: a chain).
    speculative_mode: str = "disable"
    spec_draft_length: int = 0
    spec_tree_width: int = 1
    # MLC's --additional-models: model paths for small_draft (the first is the draft model) and the
    # Medusa heads' directory for medusa.
    additional_models: list[str] = field(default_factory=list)

    def resolved(self) -> bool:
        return None not in (
            self.max_num_sequence,
            self.max_total_sequence_length,
            self.max_single_sequence_length,
            self.prefill_chunk_size,
            self.num_threads,
            self.kv_cache_tokens,
        )


# --- --overrides ---------------------------------------------------------------------------------

# Keys accepted by --overrides: our field names plus MLC-LLM's spellings.
_OVERRIDE_ALIASES = {
    "max_total_seq_length": "max_total_sequence_length",
    "context_window_size": "max_single_sequence_length",
    "gpu_memory_utilization": "memory_utilization",
}
OVERRIDABLE = (
    "max_num_sequence",
    "max_total_sequence_length",
    "max_single_sequence_length",
    "prefill_chunk_size",
    "page_size",
    "num_threads",
    "kv_cache_tokens",
    "memory_utilization",
    "max_batch",
    "sliding_window_size",
    "attention_sink_size",
    "spec_draft_length",
    "spec_tree_width",
)


def _field_type(name: str) -> type:
    return float if name == "memory_utilization" else int


def parse_overrides(text: str | None) -> dict[str, Any]:
    """Parses "k=v;k=v" into {field name: typed value}. Unknown keys and bad values -> ConfigError."""
    out: dict[str, Any] = {}
    for item in (text or "").split(";"):
        item = item.strip()
        if not item:
            continue
        key, sep, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or not key or not raw:
            raise ConfigError(f"--overrides: expected key=value, got {item!r}")
        name = _OVERRIDE_ALIASES.get(key, key)
        if name not in OVERRIDABLE:
            valid = sorted(set(OVERRIDABLE) | set(_OVERRIDE_ALIASES))
            raise ConfigError(f"--overrides: unknown key {key!r}; valid keys: {', '.join(valid)}")
        typ = _field_type(name)
        try:
            value = typ(raw)
        except ValueError:
            raise ConfigError(f"--overrides: {key} must be {'a number' if typ is float else 'an integer'}, got {raw!r}") from None
        if name in out:
            raise ConfigError(f"--overrides: {key} is given twice")
        out[name] = value
    return out


def apply_overrides(config: EngineConfig, overrides: dict[str, Any]) -> EngineConfig:
    return dataclasses.replace(config, **overrides)


def with_attention_overrides(model_config: Any, config: EngineConfig) -> Any:
    """`model_config` (pyserve.model's ModelConfig) with the engine config's sliding window and
    attention sink applied; unchanged when neither is given. Applying it twice changes nothing."""
    changes: dict[str, Any] = {}
    if config.sliding_window_size is not None:
        changes["sliding_window"] = None if config.sliding_window_size == -1 else config.sliding_window_size
    if config.attention_sink_size is not None:
        changes["attention_sink"] = config.attention_sink_size
    if not changes:
        return model_config
    out = dataclasses.replace(model_config, **changes)
    if out.attention_sink and not out.sliding_window:
        raise ConfigError(
            f"attention_sink_size={out.attention_sink} needs a sliding window: the model has none, so set "
            "sliding_window_size too"
        )
    return out


# --- presets --------------------------------------------------------------------------------------


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """K and V for every layer: 2 * layers * kv_heads * head_dim * bytes."""
    return 2 * num_layers * num_kv_heads * head_dim * dtype_bytes


def available_memory_bytes(device: str) -> int | None:
    """Free memory the KV cache may draw on: MemAvailable for the CPU; None where unknown (the
    engine knows the GPU's free memory better than we do here)."""
    if device_kind(device) in ("cuda", "rocm"):
        return gpu_free_bytes(device)
    if device != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def gpu_free_bytes(device: str) -> int | None:
    """Free memory on the GPU `device` (cuda[:N] / rocm[:N]) as the driver reports it; None without
    a GPU build or a device."""
    try:
        from pyserve import _C

        return int(_C.gpu.device_info(device_index(device))["free_bytes"])
    except (ImportError, AttributeError, RuntimeError):
        return None


def default_num_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def resolve_engine_config(
    config: EngineConfig,
    *,
    context_length: int,
    kv_bytes_per_token: int,
    available_bytes: int | None = None,
    slides_everywhere: bool = False,
) -> EngineConfig:
    """Fills every unset field from the mode preset. `context_length` is the model's; the KV
    capacity is `available_bytes * memory_utilization / kv_bytes_per_token` unless
    `kv_cache_tokens` is given. Values the user set always win. A model that `slides_everywhere`
    holds only its window of each sequence, so one sequence may be longer than the cache."""
    validate(config)
    cfg = dataclasses.replace(config)
    context = min(context_length, cfg.max_single_sequence_length or context_length)

    if cfg.kv_cache_tokens is not None:
        kv_capacity = cfg.kv_cache_tokens
    else:
        util = cfg.memory_utilization or DEFAULT_MEMORY_UTILIZATION.get(device_kind(cfg.device), 0.5)
        budget = FALLBACK_KV_BUDGET_BYTES if available_bytes is None else int(available_bytes * util)
        kv_capacity = budget // max(kv_bytes_per_token, 1)
        # More than every sequence at full context is never needed.
        kv_capacity = min(kv_capacity, cfg.max_batch * context)
    kv_capacity = max(kv_capacity, cfg.page_size)

    if cfg.mode == "local":
        preset_seqs, preset_total = min(4, cfg.max_batch), min(kv_capacity, context, LOCAL_MAX_TOTAL_SEQUENCE_LENGTH)
    elif cfg.mode == "interactive":
        preset_seqs, preset_total = 1, min(kv_capacity, context)
    else:  # server
        preset_seqs, preset_total = cfg.max_batch, kv_capacity

    if cfg.max_num_sequence is None:
        cfg.max_num_sequence = preset_seqs
    if cfg.prefix_cache_max_num_recycling_seqs is None:
        cfg.prefix_cache_max_num_recycling_seqs = cfg.max_num_sequence
    if cfg.max_total_sequence_length is None:
        cfg.max_total_sequence_length = preset_total
    # A single sequence cannot outgrow the whole cache (unless the window keeps it small).
    cfg.max_single_sequence_length = context if slides_everywhere else min(context, cfg.max_total_sequence_length)
    if cfg.prefill_chunk_size is None:
        cfg.prefill_chunk_size = min(DEFAULT_PREFILL_CHUNK.get(device_kind(cfg.device), 512), cfg.max_total_sequence_length)
    if cfg.num_threads is None:
        cfg.num_threads = default_num_threads()
    # The pool holds max_total_sequence_length tokens in whole pages, and at least one page per
    # sequence so every admitted sequence can start.
    cfg.kv_cache_tokens = max(
        _round_up(cfg.max_total_sequence_length, cfg.page_size), cfg.max_num_sequence * cfg.page_size
    )
    validate(cfg)
    return cfg


def resolve_for_model(config: EngineConfig, model_config: Any, weight_bytes: int = 0) -> EngineConfig:
    """`config` with every unset field filled for this model: its context length, its KV bytes per
    token on `config.device`, and the memory free there (on a GPU, less the `weight_bytes` the
    model's weights will take once uploaded). A config that is already resolved is returned
    unchanged. `model_config` needs max_position_embeddings, num_hidden_layers,
    num_key_value_heads and head_dim (pyserve.model's ModelConfig has them)."""
    if config.resolved():
        validate(config)
        return config
    mc = model_config
    available = available_memory_bytes(config.device)
    if available is not None and device_kind(config.device) in ("cuda", "rocm"):
        available = max(0, available - weight_bytes)
    return resolve_engine_config(
        config,
        context_length=int(mc.max_position_embeddings),
        kv_bytes_per_token=kv_bytes_per_token(
            int(mc.num_hidden_layers), int(mc.num_key_value_heads), int(mc.head_dim),
            KV_DTYPE_BYTES.get(device_kind(config.device), 4),
        ),
        available_bytes=available,
        slides_everywhere=bool(getattr(mc, "slides_everywhere", lambda: False)()),
    )


def validate(cfg: EngineConfig) -> None:
    if cfg.mode not in MODES:
        raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {cfg.mode!r}")
    if not valid_device(cfg.device):
        raise ConfigError(f"device must be one of {', '.join(DEVICES)} (cuda:N / rocm:N for device N), got {cfg.device!r}")
    if cfg.prefix_cache_mode not in PREFIX_CACHE_MODES:
        raise ConfigError(f"prefix_cache_mode must be one of {', '.join(PREFIX_CACHE_MODES)}, got {cfg.prefix_cache_mode!r}")
    recycling = cfg.prefix_cache_max_num_recycling_seqs
    if recycling is not None and recycling < -1:
        raise ConfigError(f"prefix_cache_max_num_recycling_seqs must be >= -1 (-1: unlimited), got {recycling}")
    if cfg.prefill_mode not in PREFILL_MODES:
        raise ConfigError(f"prefill_mode must be one of {', '.join(PREFILL_MODES)}, got {cfg.prefill_mode!r}")
    if cfg.speculative_mode not in SPECULATIVE_MODES:
        raise ConfigError(f"speculative_mode must be one of {', '.join(SPECULATIVE_MODES)}, got {cfg.speculative_mode!r}")
    if cfg.speculative_mode == "small_draft" and not cfg.additional_models:
        raise ConfigError("speculative_mode small_draft needs the draft model: --additional-models PATH")
    if cfg.speculative_mode in ("medusa", "eagle") and not cfg.additional_models:
        raise ConfigError(f"speculative_mode {cfg.speculative_mode} needs its trained weights "
                          f"(tools/train_{cfg.speculative_mode}.py makes them): --additional-models DIR")
    if not 1 <= cfg.spec_tree_width <= 16:
        raise ConfigError(f"spec_tree_width must be in [1, 16], got {cfg.spec_tree_width}")
    for name in OVERRIDABLE:
        value = getattr(cfg, name)
        if value is None:
            continue
        if name == "memory_utilization":
            if not 0.0 < value <= 1.0:
                raise ConfigError(f"memory_utilization must be in (0, 1], got {value}")
        elif name == "sliding_window_size":
            if value < 1 and value != -1:
                raise ConfigError(f"sliding_window_size must be >= 1, or -1 for no sliding window, got {value}")
        elif name in ("attention_sink_size", "spec_draft_length"):
            if value < 0:
                raise ConfigError(f"{name} must be >= 0, got {value}")
        elif value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    if cfg.page_size & (cfg.page_size - 1):
        raise ConfigError(f"page_size must be a power of two, got {cfg.page_size}")
