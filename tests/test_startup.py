"""Start-up cost controls: the cyclic GC is paused while `python -m pyserve` starts and what
start-up built is frozen while serving (cli.startup_gc); both are undone when main() returns."""
from __future__ import annotations

import gc
import sys
import types

import pytest

from pyserve import cli


def _fake_stack(monkeypatch, seen: dict) -> None:
    from api_fakes import FakeEngine, FakeModel

    import pyserve.model.loader as loader

    model = FakeModel(name="tiny")
    model.format, model.file_bytes = "gguf Q4_1", 1
    model.config = types.SimpleNamespace(
        max_position_embeddings=2048, num_hidden_layers=2, num_key_value_heads=1, head_dim=8, vocab_size=259
    )
    monkeypatch.setattr(loader, "default_model_path", lambda: "/models/tiny.gguf")

    def load_model(path):
        seen["gc_during_load"] = gc.isenabled()
        return model

    monkeypatch.setattr(loader, "load_model", load_model)

    class AsyncEngine(FakeEngine):
        def __init__(self, m, config):
            super().__init__(model=m, max_model_len=config.max_single_sequence_length)

    fake = types.ModuleType("pyserve.engine.async_engine")
    fake.AsyncEngine = AsyncEngine
    monkeypatch.setitem(sys.modules, "pyserve.engine.async_engine", fake)

    import pyserve.http.server as server

    def run(app, config):
        seen["gc_while_serving"] = gc.isenabled()
        seen["frozen_while_serving"] = gc.get_freeze_count()

    monkeypatch.setattr(server, "run", run)


def test_gc_paused_during_startup_and_frozen_while_serving(monkeypatch):
    seen: dict = {}
    _fake_stack(monkeypatch, seen)
    assert gc.isenabled() and gc.get_freeze_count() == 0
    assert cli.main(["--port", "0"]) == 0
    assert seen["gc_during_load"] is False
    assert seen["gc_while_serving"] is True and seen["frozen_while_serving"] > 0
    assert gc.isenabled() and gc.get_freeze_count() == 0  # undone for a longer-lived caller


def test_gc_restored_when_the_build_fails(monkeypatch, capsys):
    pytest.importorskip("pyserve.model.loader")
    assert cli.main(["/nonexistent/model.gguf"]) == 1
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_startup_gc_keeps_a_disabled_gc_disabled():
    gc.disable()
    try:
        with cli.startup_gc():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.unfreeze()
        gc.enable()


def test_one_blas_thread_before_numpy_loads(monkeypatch):
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    monkeypatch.delitem(sys.modules, "numpy", raising=False)
    cli.one_blas_thread()
    import os

    assert os.environ["OPENBLAS_NUM_THREADS"] == "1"


def test_one_blas_thread_keeps_the_users_value_and_a_loaded_numpy(monkeypatch):
    import os

    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "4")
    monkeypatch.delitem(sys.modules, "numpy", raising=False)
    cli.one_blas_thread()
    assert os.environ["OPENBLAS_NUM_THREADS"] == "4"

    monkeypatch.delenv("OPENBLAS_NUM_THREADS")
    monkeypatch.setitem(sys.modules, "numpy", types.ModuleType("numpy"))  # already loaded: too late to matter
    cli.one_blas_thread()
    assert "OPENBLAS_NUM_THREADS" not in os.environ


def test_the_server_process_loads_numpy_with_one_blas_thread():
    """What `python -m pyserve` does before numpy loads, checked in a fresh interpreter."""
    import os
    import subprocess

    code = (
        "import os, sys\n"
        "from pyserve import cli\n"
        "assert 'numpy' not in sys.modules\n"
        "cli.one_blas_thread()\n"
        "import numpy\n"
        "tasks = '/proc/self/task'\n"
        "print(os.environ['OPENBLAS_NUM_THREADS'], len(os.listdir(tasks)) if os.path.isdir(tasks) else -1)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60, check=True)
    value, threads = out.stdout.split()
    assert value == "1"
    assert int(threads) in (1, -1)  # no BLAS worker threads started (-1: no /proc to count them)
