"""The threaded engine under faults: an exception in any phase ends the requests it concerns with a
5xx-worthy error while the engine serves everyone else; a failure the engine cannot contain ends
every live request and turns /health to 503; shutdown ends everything, once, in order. No test
waits on a clock: a fail_after is only a guard against a hang (the bug these tests look for)."""

from __future__ import annotations

import gc
import json
import threading

import anyio
import numpy as np
import pytest

import live_server as ls
import tiny_models
from pyserve.config import EngineConfig
from pyserve.engine.async_engine import AsyncEngine
from pyserve.engine.errors import EngineError, EngineFailed
from pyserve.engine.sampling import SamplingParams
from pyserve.model.loader import load_model

HANG_GUARD = 120  # seconds; a correct engine ends every request long before


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return tiny_models.make_llama(tmp_path_factory.mktemp("faults-llama"))


def make_engine(path: str, **cfg) -> AsyncEngine:
    cfg.setdefault("kv_cache_tokens", 1024)
    return AsyncEngine(load_model(path), EngineConfig(num_threads=2, **cfg))


def prompt(n: int, seed: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(5, 300, n)]


def params(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


async def outcome(engine: AsyncEngine, ids: list[int], p: SamplingParams) -> tuple[str, list[int]]:
    """("ok" | "EngineError" | "EngineFailed", tokens of choice 0)."""
    toks: list[int] = []
    try:
        async for out in engine.generate(ids, p):
            if out.index == 0:
                toks += out.new_token_ids
    except (EngineError, EngineFailed) as e:
        return type(e).__name__, toks
    return "ok", toks


def run_with(path: str, body) -> object:
    async def main():
        engine = make_engine(path)
        result = None
        with anyio.fail_after(HANG_GUARD):
            async with anyio.create_task_group() as tg:
                run_failed: list[BaseException] = []

                async def run():
                    try:
                        await engine.run()
                    except EngineFailed as e:
                        run_failed.append(e)

                tg.start_soon(run)
                result = await body(engine, run_failed)
                await engine.shutdown()
        return result, engine

    return anyio.run(main)


@pytest.mark.parametrize("phase", ["build", "run", "accept", "commit", "publish"])
def test_a_contained_fault_fails_its_requests_and_the_engine_goes_on(model_dir, phase: str) -> None:
    async def body(engine, run_failed):
        engine.inject_fault(phase, at_step=engine.stats()["step_index"] + 3)
        results = [None, None]

        async def one(i):
            results[i] = await outcome(engine, prompt(10 + i, i), params(8))

        async with anyio.create_task_group() as tg:
            for i in range(2):
                tg.start_soon(one, i)
        after = await outcome(engine, prompt(6, 9), params(4))
        return results, after, engine.stats(), run_failed

    (results, after, stats, run_failed), engine = run_with(model_dir, body)
    assert "EngineError" in [r[0] for r in results]  # the step's requests saw the fault
    assert after[0] == "ok" and len(after[1]) == 4  # and the engine still serves
    assert not run_failed and engine.failure is None
    assert stats["kv_pages_used"] == 0 and stats["live_choices"] == 0


def test_a_fault_aimed_at_one_request_spares_the_other(model_dir) -> None:
    async def body(engine, run_failed):
        # AsyncEngine numbers requests 1, 2, ...: aim at the second one.
        engine.inject_fault("accept", at_step=engine.stats()["step_index"] + 2, request_id=2)
        results = {}

        async def one(i):
            results[i] = await outcome(engine, prompt(10, i), params(6))

        async with anyio.create_task_group() as tg:
            tg.start_soon(one, 1)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(one, 2)
        return results

    results, _ = run_with(model_dir, body)
    assert results[1][0] == "ok" and len(results[1][1]) == 6
    assert results[2][0] == "EngineError"


def test_an_engine_that_cannot_publish_fails_every_request_and_says_why(model_dir) -> None:
    async def body(engine, run_failed):
        engine.inject_fault("publish", at_step=engine.stats()["step_index"] + 2, times=-1, alloc=True)
        results = []

        async def one(i, n):
            results.append(await outcome(engine, prompt(12, i), params(50, n=n)))

        async with anyio.create_task_group() as tg:
            for i, n in enumerate([1, 3, 2]):
                tg.start_soon(one, i, n)
        late = await outcome(engine, prompt(5, 7), params(3))
        return results, late, run_failed

    (results, late, run_failed), engine = run_with(model_dir, body)
    # Nobody hangs: requests in flight end with an error; ones that came after the failure are refused.
    assert len(results) == 3 and {r[0] for r in results} <= {"EngineError", "EngineFailed"}
    assert late[0] == "EngineFailed"
    assert run_failed and "publishing" in str(run_failed[0])
    assert engine.failure is not None and "bad_alloc" in engine.failure


def test_shutdown_ends_running_queued_and_unforked_requests(model_dir) -> None:
    async def body(engine, run_failed):
        ends: dict[int, list[str]] = {}

        async def one(i):
            async for out in engine.generate(prompt(40, i), params(10_000, n=1 + i % 3)):
                if out.finished:
                    ends.setdefault(i, []).append(out.finish_reason)

        async with anyio.create_task_group() as tg:
            for i in range(12):  # more than max_num_sequence: some wait, some sit in the inbox
                tg.start_soon(one, i)
            await anyio.wait_all_tasks_blocked()
            await engine.shutdown()
        return ends

    ends, engine = run_with(model_dir, body)
    # Every choice ends exactly once. The tiny model is fast: under load a choice may reach the end
    # of its context ("length") before shutdown comes; the rest are aborted.
    assert {i: len(e) for i, e in ends.items()} == {i: 1 + i % 3 for i in range(12)}
    reasons = [r for e in ends.values() for r in e]
    assert set(reasons) <= {"abort", "length"} and reasons.count("abort") >= len(reasons) // 2
    assert engine.stats()["live_choices"] == 0 and engine.stats()["kv_pages_used"] == 0


def test_shutdown_is_idempotent_from_many_threads_and_on_collection(model_dir) -> None:
    from pyserve import _C
    from pyserve.engine.native import engine_options, native_model

    model = load_model(model_dir)
    cm = native_model(model, 2)
    cfg = make_engine(model_dir).config
    engine = _C.Engine(cm, engine_options(model, cfg, 256))
    engine.add_request(1, prompt(8, 1), params(10_000).to_engine())
    threads = [threading.Thread(target=engine.shutdown) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(HANG_GUARD)
    assert not any(t.is_alive() for t in threads)
    outs = engine.fetch()
    ends = [(o[0], o[4]) for o in outs if o[3]]
    # Exactly one end: "abort" from the shutdown, or "length" if it had filled its context first.
    assert len(ends) == 1 and ends[0][0] == 1 and ends[0][1] in ("abort", "length")
    with pytest.raises(RuntimeError, match="shut down"):
        engine.add_request(2, prompt(8, 2), params(3).to_engine())
    engine.abort(1)  # after shutdown: a no-op, and nothing grows
    # An engine dropped without shutdown() stops its thread on collection (without the GIL held).
    other = _C.Engine(cm, engine_options(model, cfg, 256))
    other.add_request(1, prompt(8, 1), params(10_000).to_engine())
    del other
    gc.collect()


# --- through HTTP ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(model_dir):
    app = ls.make_app(model_dir, kv_cache_tokens=1024)
    with ls.pyserve_server(app) as srv:
        yield srv


def _inject(srv, phase: str, steps_ahead: int, **kw) -> None:
    engine = srv.app.engine
    engine.inject_fault(phase, at_step=engine.stats()["step_index"] + steps_ahead, **kw)


def test_http_a_fault_is_a_500_with_an_openai_error_and_the_next_request_works(server) -> None:
    body = {"prompt": "hello there", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    _inject(server, "run", 1)
    status, _, data = ls.request(server.url, "POST", "/v1/completions", body)
    assert status == 500
    err = json.loads(data)["error"]
    assert err["type"] == "server_error" and "injected fault in run" in err["message"]
    assert set(err) == {"message", "type", "param", "code"}
    status, _, data = ls.request(server.url, "POST", "/v1/completions", body)
    assert status == 200 and json.loads(data)["choices"][0]["finish_reason"] == "length"
    status, _, _ = ls.request(server.url, "GET", "/health")
    assert status == 200
    ls.wait_idle(server.url)


def test_http_a_fault_mid_stream_is_an_error_event_then_done(server) -> None:
    body = {"prompt": "hello there", "max_tokens": 20, "temperature": 0, "ignore_eos": True, "stream": True}
    _inject(server, "accept", 6)
    status, _, data = ls.request(server.url, "POST", "/v1/completions", body)
    assert status == 200
    events = ls.sse_events(data)
    assert events[-1] == "[DONE]"
    assert "error" in events[-2] and "injected fault in accept" in events[-2]["error"]["message"]
    assert any("choices" in e for e in events[:-2])  # tokens came before the fault
    ls.wait_idle(server.url)


def test_http_an_engine_failure_turns_health_to_503_with_the_reason(model_dir) -> None:
    app = ls.make_app(model_dir, kv_cache_tokens=1024)
    with ls.pyserve_server(app) as srv:
        body = {"prompt": "hello there", "max_tokens": 30, "temperature": 0, "ignore_eos": True}
        _inject(srv, "publish", 2, times=-1)
        status, _, data = ls.request(srv.url, "POST", "/v1/completions", body)
        assert status in (500, 503) and json.loads(data)["error"]["type"] == "server_error"
        status, _, data = ls.request(srv.url, "GET", "/health")
        assert status == 503 and "publishing" in json.loads(data)["message"]
        status, _, data = ls.request(srv.url, "POST", "/v1/completions", body)
        assert status == 503 and json.loads(data)["error"]["type"] == "server_error"
        status, _, _ = ls.request(srv.url, "GET", "/v1/models")
        assert status == 200  # the HTTP side still answers
