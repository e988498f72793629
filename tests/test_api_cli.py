"""CLI flags, --overrides, mode presets, and main()'s wiring — all without a model."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
import types

import pytest

from pyserve import cli
from pyserve.config import (
    ConfigError,
    EngineConfig,
    apply_overrides,
    kv_bytes_per_token,
    parse_overrides,
    resolve_engine_config,
    resolve_for_model,
)
from pyserve.protocol.requests import OutputLimits

GiB = 1 << 30


def resolve(cfg: EngineConfig, context=32768, bytes_per_token=1000, available=None, **kw) -> EngineConfig:
    return resolve_engine_config(cfg, context_length=context, kv_bytes_per_token=bytes_per_token, available_bytes=available, **kw)


# --- arguments -------------------------------------------------------------------------------------


def test_defaults():
    args = cli.parse_args([])
    assert args.model is None and args.host == "127.0.0.1" and args.port == 8000
    assert args.device == "cpu" and args.mode == "local" and args.log_level == "info"
    assert args.served_model_name is None
    assert args.engine_config == EngineConfig()


def test_all_flags():
    args = cli.parse_args(
        [
            "model.gguf",
            "--host", "0.0.0.0",
            "--port", "9000",
            "--mode", "server",
            "--max-num-sequence", "8",
            "--max-total-sequence-length", "4096",
            "--prefill-chunk-size", "256",
            "--num-threads", "2",
            "--served-model-name", "smol",
            "--log-level", "debug",
            "--prefix-cache-mode", "disable",
            "--prefix-cache-max-num-recycling-seqs", "-1",
            "--prefill-mode", "chunked",
            "--enable-debug",
            "--enable-tracing",
            "-n", "64",
            "--max-tokens-default", "32",
        ]
    )
    assert (args.model, args.host, args.port, args.served_model_name, args.log_level) == ("model.gguf", "0.0.0.0", 9000, "smol", "debug")
    cfg = args.engine_config
    assert (cfg.mode, cfg.max_num_sequence, cfg.max_total_sequence_length, cfg.prefill_chunk_size, cfg.num_threads) == ("server", 8, 4096, 256, 2)
    assert (cfg.prefix_cache_mode, cfg.prefill_mode) == ("disable", "chunked")
    assert cfg.prefix_cache_max_num_recycling_seqs == -1
    assert cfg.enable_tracing and cli.app_options_from_args(args)["enable_debug"]
    assert cli.output_limits_from_args(args) == OutputLimits(default_max_tokens=32, max_tokens_limit=64)


def test_max_tokens_flags():
    assert cli.output_limits_from_args(cli.parse_args([])) == OutputLimits()  # no bounds by default
    for flag in ("-n", "--n-predict", "--max-tokens-limit"):
        assert cli.parse_args([flag, "100"]).max_tokens_limit == 100
    args = cli.parse_args(["-n", "-1", "--max-tokens-default", "-1"])  # llama.cpp's "no limit"
    assert (args.max_tokens_limit, args.max_tokens_default) == (None, None)
    assert cli.output_limits_from_args(cli.parse_args(["--max-tokens-default", "500"])) == OutputLimits(500, None)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--mode", "turbo"], "--mode"),
        (["--port", "70000"], "port"),
        (["--port", "http"], "port"),
        (["--max-num-sequence", "0"], ">= 1"),
        (["--device", "tpu"], "--device"),
        (["--device", "cuda:x"], "--device"),
        (["--device", "cpu:1"], "--device"),
        (["--gpu-memory-utilization", "1.5"], "(0, 1]"),
        (["--gpu-memory-utilization", "0.9", "--overrides", "gpu_memory_utilization=0.5"], "both"),
        (["--overrides", "bogus_key=1"], "unknown key 'bogus_key'"),
        (["--overrides", "max_num_sequence=lots"], "integer"),
        (["--overrides", "max_num_sequence"], "key=value"),
        (["--overrides", "max_num_sequence=0"], ">= 1"),
        (["--max-num-sequence", "4", "--overrides", "max_num_sequence=8"], "both"),
        (["-n", "0"], ">= 1"),
        (["--max-tokens-limit", "-2"], ">= 1"),
        (["--max-tokens-default", "many"], "integer"),
        (["-n", "8", "--max-tokens-default", "9"], "--max-tokens-default (9) exceeds"),
    ],
)
def test_bad_arguments_exit_2_with_a_clear_message(capsys, argv, needle):
    with pytest.raises(SystemExit) as info:
        cli.parse_args(argv)
    assert info.value.code == 2
    assert needle in capsys.readouterr().err


def test_server_and_api_flags(monkeypatch):
    monkeypatch.delenv("PYSERVE_API_KEY", raising=False)
    args = cli.parse_args([])
    assert args.api_key is None and args.allow_origins == ["*"] and args.allow_credentials is False
    server = cli.server_config_from_args(args)
    from pyserve.http import ServerConfig

    assert server == ServerConfig(host="127.0.0.1", port=8000)  # the flags' defaults are the server's
    args = cli.parse_args(
        [
            "--api-key", "sk-1",
            "--allow-origins", '["https://a.example", "https://b.example"]',
            "--allow-methods", "GET, POST",
            "--allow-headers", "authorization",
            "--allow-credentials",
            "--max-body-size", "1MiB",
            "--max-header-size", "8KiB",
            "--max-header-count", "20",
            "--header-timeout", "2.5",
            "--keep-alive-timeout", "1",
            "--body-timeout", "3",
            "--write-timeout", "4",
            "--max-connections", "50",
            "--max-waiting-requests", "0",
            "--shutdown-timeout", "7",
        ]
    )
    server = cli.server_config_from_args(args)
    assert (server.max_body_bytes, server.max_header_bytes, server.max_header_count) == (1 << 20, 8192, 20)
    assert (server.header_timeout, server.keep_alive_timeout, server.body_timeout, server.write_timeout) == (2.5, 1, 3, 4)
    assert (server.max_connections, server.shutdown_timeout) == (50, 7)
    opts = cli.app_options_from_args(args)
    assert opts["api_key"] == "sk-1" and opts["max_body_bytes"] == 1 << 20 and opts["max_waiting_requests"] == 0
    cors = opts["cors"]
    assert cors.allow_origins == ["https://a.example", "https://b.example"]
    assert (cors.allow_methods, cors.allow_headers, cors.allow_credentials) == (["GET", "POST"], ["authorization"], True)
    assert cli.parse_args(["--allow-origins", "[]"]).allow_origins == []  # CORS off


def test_api_key_from_the_environment(monkeypatch):
    monkeypatch.setenv("PYSERVE_API_KEY", "sk-env")
    assert cli.parse_args([]).api_key == "sk-env"
    assert cli.parse_args(["--api-key", "sk-flag"]).api_key == "sk-flag"


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--max-body-size", "lots"], "size in bytes"),
        (["--max-body-size", "0"], ">= 1 byte"),
        (["--header-timeout", "0"], "> 0"),
        (["--header-timeout", "inf"], "> 0"),
        (["--header-timeout", "soon"], "seconds"),
        (["--max-waiting-requests", "-1"], ">= 0"),
        (["--max-connections", "0"], ">= 1"),
        (["--allow-origins", "[1, 2]"], "list of strings"),
        (["--allow-origins", "[oops"], "invalid JSON"),
    ],
)
def test_bad_limit_flags_exit_2(capsys, argv, needle):
    with pytest.raises(SystemExit) as info:
        cli.parse_args(argv)
    assert info.value.code == 2
    assert needle in capsys.readouterr().err


def test_parse_args_can_raise_instead_of_exiting():
    with pytest.raises(cli.ArgumentError, match="--mode"):
        cli.parse_args(["--mode", "turbo"], exit_on_error=False)
    with pytest.raises(cli.ArgumentError, match="both"):
        cli.parse_args(["--max-num-sequence", "4", "--overrides", "max_num_sequence=8"], exit_on_error=False)


def test_overrides_parsing():
    assert parse_overrides("") == {}
    assert parse_overrides(" max_num_sequence = 8 ; max_total_seq_length=4096;; prefill_chunk_size=128 ;") == {
        "max_num_sequence": 8,
        "max_total_sequence_length": 4096,  # MLC's spelling maps onto ours
        "prefill_chunk_size": 128,
    }
    assert parse_overrides("gpu_memory_utilization=0.5;context_window_size=2048") == {
        "memory_utilization": 0.5,
        "max_single_sequence_length": 2048,
    }
    with pytest.raises(ConfigError, match="twice"):
        parse_overrides("page_size=16;page_size=32")
    with pytest.raises(ConfigError, match="valid keys: .*max_num_sequence"):
        parse_overrides("max_batch_size=3")


def test_sliding_window_overrides():
    """MLC's sliding_window_size / attention_sink_size (which MLC accepts and ignores) are ours."""
    assert parse_overrides("sliding_window_size=4096;attention_sink_size=4") == {
        "sliding_window_size": 4096,
        "attention_sink_size": 4,
    }
    cfg = cli.parse_args(["--overrides", "sliding_window_size=-1"]).engine_config
    assert cfg.sliding_window_size == -1  # -1: no sliding window (MLC's spelling)
    for bad, match in [("sliding_window_size=0", "sliding_window_size must be >= 1, or -1"),
                       ("attention_sink_size=-2", "attention_sink_size must be >= 0")]:
        with pytest.raises(ConfigError, match=match):
            resolve(apply_overrides(EngineConfig(), parse_overrides(bad)))


def test_a_model_that_slides_everywhere_may_outgrow_the_cache():
    cfg = resolve(EngineConfig(mode="interactive", kv_cache_tokens=3000), context=4096, available=64 * GiB)
    assert cfg.max_single_sequence_length == 3000
    cfg = resolve(EngineConfig(mode="interactive", kv_cache_tokens=3000), context=4096, available=64 * GiB,
                  slides_everywhere=True)
    assert cfg.max_single_sequence_length == 4096 and cfg.max_total_sequence_length == 3000


def test_overrides_reach_the_engine_config():
    cfg = cli.parse_args(["--overrides", "max_num_sequence=6;page_size=32;kv_cache_tokens=1000"]).engine_config
    assert (cfg.max_num_sequence, cfg.page_size, cfg.kv_cache_tokens) == (6, 32, 1000)


def test_help_is_instant_and_imports_nothing_heavy():
    code = (
        "import sys\n"
        "from pyserve import cli\n"
        "try:\n    cli.parse_args(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in sys.modules if m.startswith(('pyserve.model', 'pyserve.http', 'pyserve._C',"
        " 'pyserve.engine.async_engine', 'tokenizers', 'sentencepiece', 'numpy', 'gguf', 'torch'))]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert "usage: python -m pyserve" in out and "HEAVY []" in out
    # The help tells the truth about the MLC flags that do nothing yet.
    flat = " ".join(out.split())
    assert "NOT IMPLEMENTED" not in flat.split("--prefix-cache-mode")[1].split("--prefill-mode")[0]
    assert "--prefix-cache-max-num-recycling-seqs N" in flat
    assert "'chunked' makes each step all prefill or all decode" in flat


# --- the build: engine extension and device, checked before any model loads ------------------------


def _no_model_load(monkeypatch):
    import pyserve.model.loader as loader

    def refuse(*a, **k):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(loader, "load_model", refuse)
    monkeypatch.setattr(loader, "default_model_path", refuse)


def test_unavailable_device_is_one_line_and_exit_2(monkeypatch, capsys):
    _no_model_load(monkeypatch)
    assert cli.main(["--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err == "error: --device cuda is not available in this build of pyserve (it serves: cpu)\n"


def test_unavailable_device_from_the_command_line():
    proc = subprocess.run([sys.executable, "-m", "pyserve", "--device", "cuda"], capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == ["error: --device cuda is not available in this build of pyserve (it serves: cpu)"]


def test_devices_come_from_what_the_extension_reports():
    assert cli.available_devices(types.SimpleNamespace()) == ("cpu",)  # reports nothing: CPU only
    assert cli.available_devices(types.SimpleNamespace(devices=lambda: ["cpu", "cuda"])) == ("cpu", "cuda")
    assert cli.available_devices(types.SimpleNamespace(devices=("cpu",))) == ("cpu",)


def test_device_flags():
    args = cli.parse_args(["--device", "cuda:1", "--gpu-memory-utilization", "0.7"])
    assert args.device == "cuda:1" and args.engine_config.device == "cuda:1"
    assert args.engine_config.memory_utilization == 0.7


def test_auto_device_is_the_gpu_where_there_is_one(monkeypatch):
    import pyserve

    monkeypatch.setattr(pyserve, "_C", types.SimpleNamespace(devices=lambda: ["cpu"]), raising=False)
    assert cli.check_build("auto") == "cpu"
    monkeypatch.setattr(pyserve, "_C", types.SimpleNamespace(devices=lambda: ["cpu", "rocm"]), raising=False)
    assert cli.check_build("auto") == "rocm"
    assert cli.check_build("rocm:1") == "rocm:1"
    with pytest.raises(cli.BuildError) as info:
        cli.check_build("cuda:0")
    assert info.value.exit_code == 2 and "it serves: cpu, rocm" in str(info.value)


def test_gpu_build_without_a_device_says_so(monkeypatch):
    import pyserve

    gpu = types.SimpleNamespace(kind="cuda")
    monkeypatch.setattr(pyserve, "_C", types.SimpleNamespace(devices=lambda: ["cpu"], gpu=gpu), raising=False)
    with pytest.raises(cli.BuildError) as info:
        cli.check_build("cuda:0")
    assert info.value.exit_code == 2 and "has the cuda backend, but no device is visible" in str(info.value)
    assert cli.check_build("auto") == "cpu"


def test_cuda_build_accepts_cuda(monkeypatch):
    import pyserve

    monkeypatch.setattr(pyserve, "_C", types.SimpleNamespace(devices=lambda: ["cpu", "cuda"]), raising=False)
    cli.check_build("cuda")  # no error
    with pytest.raises(cli.BuildError) as info:
        cli.check_build("rocm")
    assert info.value.exit_code == 2 and "it serves: cpu, cuda" in str(info.value)


def test_missing_extension_is_one_line_before_the_model_loads(monkeypatch, capsys):
    import pyserve

    _no_model_load(monkeypatch)
    monkeypatch.delattr(pyserve, "_C", raising=False)
    monkeypatch.setitem(sys.modules, "pyserve._C", None)  # makes `from pyserve import _C` fail
    assert cli.main([]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: cannot import pyserve's C++ engine (pyserve._C)")
    assert "pip install -e ." in err


def test_source_tree_without_the_extension(tmp_path):
    """The newcomer's case: `python -m pyserve` at the root of a checkout whose pyserve/ has no
    built _C (e.g. after `pip install .`): Python imports the checkout, not the installed copy."""
    import shutil
    from pathlib import Path

    import pyserve

    src = Path(pyserve.__file__).resolve().parent
    shutil.copytree(src, tmp_path / "pyserve", ignore=shutil.ignore_patterns("_C.*", "__pycache__"))
    (tmp_path / "setup.py").write_text("# the checkout's setup.py\n")
    # As `python -m pyserve`, with any editable-install finder of this machine's pyserve removed (it
    # would map pyserve._C to that checkout's build): the situation of a plain `pip install .`.
    code = ("import runpy, sys\n"
            "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
            "sys.argv[0] = 'pyserve'\n"
            "runpy.run_module('pyserve', run_name='__main__', alter_sys=True)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 1 and proc.stdout == "", proc.stderr
    [line] = proc.stderr.splitlines()
    assert line.startswith("error: pyserve's C++ engine (pyserve._C) is not built in the source tree ")
    assert f"run `pip install -e .` in {tmp_path.resolve()}" in line


# --- logging: one setup -----------------------------------------------------------------------------


def test_logging_is_set_up_in_one_place():
    from pathlib import Path

    import pyserve

    root = Path(pyserve.__file__).resolve().parent
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py") if p.name != "cli.py"
                 and any(needle in p.read_text() for needle in ("basicConfig(", "addHandler(", "dictConfig("))]
    assert offenders == []


def test_setup_logging_leaves_a_configured_host_alone(monkeypatch):
    import logging

    root = logging.getLogger()
    handler = logging.NullHandler()
    monkeypatch.setattr(root, "handlers", [handler])
    monkeypatch.setattr(root, "level", logging.WARNING)
    cli.setup_logging("debug")
    assert root.handlers == [handler] and root.level == logging.WARNING
    monkeypatch.setattr(root, "handlers", [])
    cli.setup_logging("debug")
    assert len(root.handlers) == 1 and root.level == logging.DEBUG
    assert root.handlers[0].formatter._fmt == cli.LOG_FORMAT


# --- presets ---------------------------------------------------------------------------------------


def test_local_preset():
    cfg = resolve(EngineConfig(mode="local"), available=64 * GiB)
    assert cfg.max_num_sequence == 4
    assert cfg.max_total_sequence_length == 8192  # min(KV capacity, context, 8192)
    assert cfg.max_single_sequence_length == 8192
    assert cfg.kv_cache_tokens == 8192 and cfg.kv_cache_tokens % cfg.page_size == 0
    assert cfg.prefill_chunk_size == 512 and cfg.num_threads >= 1
    assert cfg.resolved()


def test_local_preset_small_context_and_small_memory():
    assert resolve(EngineConfig(), context=2048, available=64 * GiB).max_total_sequence_length == 2048
    # 1 MB at 50% and 1000 B/token -> 524 tokens of KV.
    cfg = resolve(EngineConfig(), available=1 << 20)
    assert cfg.max_total_sequence_length == 524
    assert cfg.max_single_sequence_length == 524  # one sequence cannot outgrow the cache
    assert cfg.kv_cache_tokens == 528  # whole pages


def test_interactive_preset():
    cfg = resolve(EngineConfig(mode="interactive"), context=32768, available=64 * GiB)
    assert cfg.max_num_sequence == 1 and cfg.max_total_sequence_length == 32768


def test_server_preset_sizes_kv_from_memory():
    cfg = resolve(EngineConfig(mode="server"), context=4096, bytes_per_token=1000, available=100_000_000)
    assert cfg.max_num_sequence == 80
    assert cfg.max_total_sequence_length == 50_000  # 50% of 100 MB / 1000 B
    assert cfg.max_single_sequence_length == 4096
    # Never more than every sequence at full context.
    big = resolve(EngineConfig(mode="server", max_batch=2), context=4096, available=1000 * GiB)
    assert big.max_num_sequence == 2 and big.max_total_sequence_length == 8192
    # Unknown free memory (e.g. CUDA before the engine looks): a fixed fallback budget.
    assert resolve(EngineConfig(mode="server"), available=None).max_total_sequence_length == (2 << 30) // 1000


def test_user_values_win_over_presets():
    cfg = resolve(
        EngineConfig(mode="server", max_num_sequence=3, max_total_sequence_length=1000, prefill_chunk_size=64, num_threads=7),
        available=64 * GiB,
    )
    assert (cfg.max_num_sequence, cfg.max_total_sequence_length, cfg.prefill_chunk_size, cfg.num_threads) == (3, 1000, 64, 7)
    assert cfg.kv_cache_tokens == 1008


def test_kv_cache_tokens_and_context_window_caps():
    cfg = resolve(EngineConfig(mode="interactive", kv_cache_tokens=3000), available=64 * GiB)
    assert cfg.max_total_sequence_length == 3000
    cfg = resolve(EngineConfig(mode="interactive", max_single_sequence_length=1024), available=64 * GiB)
    assert cfg.max_single_sequence_length == 1024 and cfg.max_total_sequence_length == 1024


def test_memory_utilization_override():
    cfg = resolve(EngineConfig(mode="server", memory_utilization=0.25), context=1 << 20, available=4_000_000)
    assert cfg.max_total_sequence_length == 1000


def test_resolve_rejects_bad_values():
    with pytest.raises(ConfigError, match="page_size"):
        resolve(EngineConfig(page_size=12))
    with pytest.raises(ConfigError, match="memory_utilization"):
        resolve(EngineConfig(memory_utilization=1.5))
    with pytest.raises(ConfigError, match="mode"):
        resolve(EngineConfig(mode="turbo"))


def test_kv_bytes_per_token():
    # SmolLM2-135M: 30 layers, 3 KV heads of 64, f32.
    assert kv_bytes_per_token(30, 3, 64, 4) == 46080


SMOLLM2 = types.SimpleNamespace(max_position_embeddings=8192, num_hidden_layers=30, num_key_value_heads=3, head_dim=64)


def test_resolve_for_model_is_the_one_sizing(monkeypatch):
    import pyserve.config as config

    seen: list = []
    monkeypatch.setattr(config, "available_memory_bytes", lambda device: seen.append(device) or 46080 * 2000)
    cfg = resolve_for_model(EngineConfig(mode="server"), SMOLLM2)
    # 50% of the CPU's free memory at 46080 f32 KV bytes per token: 1000 tokens.
    assert seen == ["cpu"] and cfg.resolved() and cfg.max_total_sequence_length == 1000
    assert cfg == resolve(EngineConfig(mode="server"), context=8192, bytes_per_token=46080, available=46080 * 2000)
    # CUDA sizes with f32 KV (what its backend stores today) and 85% of the memory free after the
    # weights.
    cuda = resolve_for_model(EngineConfig(mode="server", device="cuda"), SMOLLM2, weight_bytes=46080 * 100)
    assert seen[-1] == "cuda" and cuda.max_total_sequence_length == int(46080 * 1900 * 0.85) // 46080
    # The context caps the local preset; a resolved config comes back as it is.
    local = resolve_for_model(EngineConfig(), types.SimpleNamespace(**{**vars(SMOLLM2), "max_position_embeddings": 512}))
    assert local.max_single_sequence_length == 512
    assert resolve_for_model(local, SMOLLM2) is local


def test_resolve_for_model_rejects_bad_values():
    with pytest.raises(ConfigError, match="page_size"):
        resolve_for_model(EngineConfig(page_size=12), SMOLLM2)


# --- main() wiring with fakes ----------------------------------------------------------------------


def test_main_wires_model_engine_app_and_server(monkeypatch, caplog):
    from api_fakes import FakeEngine, FakeModel

    import pyserve.model.loader as loader

    model = FakeModel(name="tiny")
    model.format, model.file_bytes = "gguf Q4_1", 123456
    model.config = types.SimpleNamespace(
        max_position_embeddings=2048, num_hidden_layers=2, num_key_value_heads=1, head_dim=8, vocab_size=259
    )
    monkeypatch.setattr(loader, "default_model_path", lambda: "/models/tiny.gguf")
    loaded: list = []
    monkeypatch.setattr(loader, "load_model", lambda path: loaded.append(path) or model)

    built: dict = {}

    class AsyncEngine(FakeEngine):
        def __init__(self, m, config):
            super().__init__(model=m, max_model_len=config.max_single_sequence_length)
            built["engine"], built["config"] = self, config

    fake_async_engine = types.ModuleType("pyserve.engine.async_engine")
    fake_async_engine.AsyncEngine = AsyncEngine
    monkeypatch.setitem(sys.modules, "pyserve.engine.async_engine", fake_async_engine)

    import pyserve.http.server as server

    served: dict = {}
    monkeypatch.setattr(server, "run", lambda app, config: served.update(app=app, config=config))

    caplog.set_level("INFO")
    assert cli.main(["--port", "0", "--served-model-name", "smol", "--mode", "interactive", "--api-key", "k",
                     "--shutdown-timeout", "3", "--max-body-size", "1000", "--allow-origins", "[]"]) == 0
    assert loaded == ["/models/tiny.gguf"]
    cfg = built["config"]
    assert dataclasses.is_dataclass(cfg) and cfg.resolved() and cfg.mode == "interactive"
    assert cfg.max_num_sequence == 1 and cfg.max_single_sequence_length == 2048
    assert served["app"].served_model_name == "smol" and served["app"].engine is built["engine"]
    assert (served["config"].host, served["config"].port) == ("127.0.0.1", 0)
    assert served["config"].shutdown_timeout == 3 and served["config"].max_body_bytes == 1000
    app = served["app"]
    assert app.auth is not None and app.cors is None and app.ctx.max_body_bytes == 1000
    assert "KV cache 1024 tokens" in caplog.text and "gguf Q4_1" in caplog.text
    # What the MLC flags do today, said at startup.
    assert "prefix cache: radix (finished sequences kept: 1, -1: any)" in caplog.text  # max_num_sequence
    assert "prefill: hybrid" in caplog.text and "max_tokens default chat: up to the context" in caplog.text
    assert app.ctx.limits == OutputLimits()


def test_main_passes_the_max_tokens_bounds_to_the_app(monkeypatch, caplog):
    served = _run_main_with_fakes(monkeypatch, ["-n", "300", "--max-tokens-default", "200", "--prefix-cache-mode", "disable",
                                                "--prefill-mode", "chunked"], caplog)
    assert served["app"].ctx.limits == OutputLimits(default_max_tokens=200, max_tokens_limit=300)
    assert "max_tokens default 200, limit 300" in caplog.text
    assert "prefix cache: disabled" in caplog.text
    assert "prefill: chunked (prefill steps and decode steps alternate)" in caplog.text


def _run_main_with_fakes(monkeypatch, argv, caplog) -> dict:
    from api_fakes import FakeEngine, FakeModel

    import pyserve.model.loader as loader

    model = FakeModel(name="tiny")
    model.format, model.file_bytes = "gguf Q4_1", 123456
    model.config = SMOLLM2
    monkeypatch.setattr(loader, "default_model_path", lambda: "/models/tiny.gguf")
    monkeypatch.setattr(loader, "load_model", lambda path: model)

    class AsyncEngine(FakeEngine):
        def __init__(self, m, config):
            super().__init__(model=m, max_model_len=config.max_single_sequence_length)

    fake_async_engine = types.ModuleType("pyserve.engine.async_engine")
    fake_async_engine.AsyncEngine = AsyncEngine
    monkeypatch.setitem(sys.modules, "pyserve.engine.async_engine", fake_async_engine)

    import pyserve.http.server as server

    served: dict = {}
    monkeypatch.setattr(server, "run", lambda app, config: served.update(app=app, config=config))
    caplog.set_level("INFO")
    assert cli.main(["--port", "0", *argv]) == 0
    return served


def test_main_reports_a_missing_model(capsys):
    pytest.importorskip("pyserve.model.loader")
    assert cli.main(["/nonexistent/model.gguf"]) == 1
    assert "error:" in capsys.readouterr().err
