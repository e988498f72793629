"""The prefix cache in the engine, on a tiny random Llama: greedy outputs are identical with the
cache on and off over shared and unshared prompts at several concurrencies and under a KV budget far
smaller than the working set; cached_tokens is the shared prefix (whole pages shared, part of a page
copied); every page comes back."""

from __future__ import annotations

import numpy as np
import pytest

import tiny_models
from engine_helpers import c_model
from pyserve import _C
from pyserve.engine.sampling import SamplingParams
from pyserve.model.loader import load_model

PAGE = 4


@pytest.fixture(scope="module")
def cm(tmp_path_factory):
    return c_model(load_model(tiny_models.make_llama(tmp_path_factory.mktemp("prefix-llama"))))


def core(cm, cache: bool, **cfg) -> "_C.EngineCore":
    options = {"max_num_seqs": 4, "max_batch_tokens": 32, "page_size": PAGE, "kv_capacity_tokens": 512,
               "max_model_len": 256, "eos_token_ids": [], "prefix_cache": cache, "prefix_cache_max_recycling": -1}
    options.update(cfg)
    return _C.EngineCore(cm, options)


def greedy(max_tokens: int, **kw) -> dict:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw).to_engine()


def workload(seed: int, n: int) -> list[list[int]]:
    """Prompts behind three system prompts (token ids 5..99) with distinct questions (100..299),
    and some prompts that share nothing."""
    rng = np.random.default_rng(seed)
    systems = [[int(t) for t in rng.integers(5, 100, length)] for length in (20, 37, 9)]
    prompts = []
    for i in range(n):
        question = [int(t) for t in rng.integers(100, 300, int(rng.integers(3, 12)))]
        prompts.append(question if i % 5 == 4 else systems[i % 3] + question)
    return prompts


def run(engine, prompts: list[list[int]], concurrency: int, max_tokens: int = 6) -> dict[int, tuple[list[int], int]]:
    """Keeps `concurrency` requests in flight until all are done; returns id -> (tokens, cached)."""
    out: dict[int, tuple[list[int], int]] = {i: ([], 0) for i in range(len(prompts))}
    pending = list(range(len(prompts)))
    live: set[int] = set()
    for _ in range(10_000):
        while pending and len(live) < concurrency:
            rid = pending.pop(0)
            engine.add_request(rid, prompts[rid], greedy(max_tokens))
            live.add(rid)
        if not live:
            return out
        engine.step()
        for rid, _index, toks, finished, reason, _n, _lp, _plp, error, cached in engine.take_outputs():
            assert error is None, error
            tokens, _ = out[rid]
            out[rid] = (tokens + list(toks), cached)
            if finished:
                live.discard(rid)
    raise AssertionError("the engine did not finish")


def assert_no_leak(engine) -> None:
    s = engine.stats()
    assert s["kv_pages_used"] == 0 and s["live_choices"] == 0 and s["num_running"] == s["num_waiting"] == 0
    assert s["kv_pages_used"] + s["kv_pages_cached"] + s["kv_pages_free"] == s["kv_pages_total"]
    # What is left is the cache's alone: emptying it frees every page (callers check this last).
    engine.reset_cache()
    after = engine.stats()
    assert after["kv_pages_cached"] == 0 and after["kv_pages_free"] == after["kv_pages_total"]


@pytest.mark.parametrize("concurrency", [1, 3, 8])
def test_greedy_outputs_are_the_same_with_the_cache_on_and_off(cm, concurrency: int) -> None:
    prompts = workload(concurrency, 20)
    off = run(core(cm, cache=False), prompts, concurrency)
    on_engine = core(cm, cache=True)
    on = run(on_engine, prompts, concurrency)
    assert {k: v[0] for k, v in on.items()} == {k: v[0] for k, v in off.items()}
    assert all(cached == 0 for _tokens, cached in off.values())
    assert sum(cached for _tokens, cached in on.values()) > 0
    assert on_engine.stats()["kv_pages_cached"] > 0
    assert_no_leak(on_engine)


def test_cached_tokens_are_the_shared_prefix(cm) -> None:
    prompts = workload(7, 8)  # requests 0..2 each open one system prompt; 3, 5 and 7 reuse them
    e = core(cm, cache=True)
    res = run(e, prompts, concurrency=1)
    assert [res[i][1] for i in range(3)] == [0, 0, 0]
    assert res[3][1] == 20  # system prompt 0: 20 tokens, five whole pages
    assert res[7][1] == 37  # system prompt 1: nine whole pages shared, 1 token copied from the tenth
    assert res[5][1] == 9   # system prompt 2: two whole pages, 1 token copied
    assert res[4][1] == 0   # shares nothing
    assert_no_leak(e)


def test_a_kv_budget_far_below_the_working_set_still_serves_everyone(cm) -> None:
    prompts = workload(11, 30)
    reference = run(core(cm, cache=False), prompts, 4)
    small = core(cm, cache=True, kv_capacity_tokens=96, max_model_len=96)  # 24 pages for 4 sequences
    got = run(small, prompts, 4)
    assert {k: v[0] for k, v in got.items()} == {k: v[0] for k, v in reference.items()}
    assert_no_leak(small)


def test_a_repeated_prompt_is_served_from_the_cache_and_prompt_logprobs_still_compute_everything(cm) -> None:
    e = core(cm, cache=True)
    p = workload(3, 1)[0]
    first = run(e, [p], 1)[0]
    again = run(e, [p], 1)[0]
    assert again[0] == first[0] and again[1] == len(p) - 1  # all but the last token, which samples
    # Prompt logprobs need every prompt position's logits: such a request reuses nothing.
    e.add_request(9, p, greedy(2, prompt_logprobs=1))
    rows = []
    cached = []
    while not e.idle:
        e.step()
        for _rid, _i, _toks, _fin, _reason, _n, _lp, plp, _err, c in e.take_outputs():
            cached.append(c)
            if plp is not None:
                rows = plp
    assert set(cached) == {0} and len(rows) == len(p) - 1
    assert_no_leak(e)


def test_n_choices_share_the_prompt_through_the_cache(cm) -> None:
    p = workload(5, 1)[0]
    outs = {}
    for cache in (False, True):
        e = core(cm, cache=cache)
        e.add_request(1, p, SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, n=3).to_engine())
        tokens: dict[int, list[int]] = {}
        while not e.idle:
            e.step()
            for _rid, index, toks, _fin, _reason, _n, _lp, _plp, err, _c in e.take_outputs():
                assert err is None
                tokens.setdefault(index, []).extend(toks)
        outs[cache] = tokens
        assert_no_leak(e)
    assert outs[True] == outs[False] and outs[True][0] == outs[True][1] == outs[True][2]


@pytest.mark.parametrize("concurrency", [2, 6])
def test_chunked_prefill_gives_the_same_greedy_outputs_as_hybrid(cm, concurrency: int) -> None:
    prompts = workload(20 + concurrency, 12)
    hybrid = run(core(cm, cache=False, max_batch_tokens=16), prompts, concurrency)
    chunked_engine = core(cm, cache=True, max_batch_tokens=16, chunked_prefill=True)
    chunked = run(chunked_engine, prompts, concurrency)
    assert {k: v[0] for k, v in chunked.items()} == {k: v[0] for k, v in hybrid.items()}
    assert_no_leak(chunked_engine)


def test_an_aborted_fork_leaves_no_tail_after_the_wrong_prefix(cm) -> None:
    """n > 1 on a prompt of whole pages: a choice holds one page less than its parent's cached
    path. Aborted halfway, what it computed must not be cached as following the whole prompt."""
    rng = np.random.default_rng(9)
    p = [int(t) for t in rng.integers(5, 300, 8 * PAGE)]
    e = core(cm, cache=True, max_batch_tokens=6)
    e.add_request(1, p, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, n=3).to_engine())
    for _ in range(4):
        e.step()
    e.abort(1)
    e.take_outputs()
    follow = p + p[4 * PAGE: 4 * PAGE + 3]  # continues with the tokens a choice recomputed at 16..
    got = run(e, [follow], 1)[0][0]
    assert got == run(core(cm, cache=False), [follow], 1)[0][0]
    assert_no_leak(e)


def test_short_prompts_behind_a_pinned_prompt_never_starve_the_pool(cm) -> None:
    """Requests shorter than a page leave their partly filled page as a tail at the root, which
    every running or pinned path locks: tails must stay evictable, or the pool runs dry."""
    e = core(cm, cache=True, kv_capacity_tokens=48, max_model_len=48)  # 12 pages
    pinned = workload(4, 1)[0][:2 * PAGE]
    e.add_request(100, pinned, greedy(1, pin_prompt=True))
    while not e.idle:
        e.step()
    e.take_outputs()
    assert e.stats()["kv_pages_cached"] >= 2  # the pinned prompt's pages
    shorts = [[200 + i, 201 + i] for i in range(40)]  # distinct 2-token prompts
    res = run(e, shorts, 2, max_tokens=1)
    assert all(len(tokens) == 1 for tokens, _cached in res.values())
    assert run(e, [pinned + [7]], 1)[0][1] == 2 * PAGE  # still pinned
    s = e.stats()
    assert s["kv_pages_used"] == 0 and s["live_choices"] == 0
