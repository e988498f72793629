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
