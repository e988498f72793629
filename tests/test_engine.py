"""The engine end to end on a tiny model: sampling parameters, logprobs, n > 1 sharing the prompt's
pages, seeds under concurrency, aborts returning pages."""

from __future__ import annotations

import anyio
import numpy as np
import pytest

import tiny_models
from engine_helpers import c_model, our_logits
from pyserve.config import EngineConfig
from pyserve.engine.async_engine import AsyncEngine
from pyserve.engine.sampling import RequestOutput, SamplingParams
from pyserve.model.loader import load_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return tiny_models.make_llama(tmp_path_factory.mktemp("engine-llama"))


def make_engine(path: str, **cfg) -> AsyncEngine:
    return AsyncEngine(load_model(path), EngineConfig(num_threads=2, kv_cache_tokens=cfg.pop("kv", 2048), **cfg))


def run_requests(path: str, requests: list[tuple[list[int], SamplingParams]], **cfg) -> tuple[list[list[RequestOutput]], dict]:
    """Runs all requests concurrently on a fresh engine; returns each one's outputs and the
    engine's stats once everything finished."""

    async def main():
        engine = make_engine(path, **cfg)
        outs: dict[int, list[RequestOutput]] = {}
        async with anyio.create_task_group() as tg:
            await tg.start(engine.run)

            async def one(i, ids, params):
                outs[i] = [o async for o in engine.generate(ids, params)]

            async with anyio.create_task_group() as inner:
                for i, (ids, params) in enumerate(requests):
                    inner.start_soon(one, i, ids, params)
            stats = engine.stats()
            tg.cancel_scope.cancel()
        await engine.shutdown()
        return [outs[i] for i in range(len(requests))], stats

    return anyio.run(main)


def tokens(outs: list[RequestOutput], index: int = 0) -> list[int]:
    return [t for o in outs if o.index == index for t in o.new_token_ids]


def prompt(n: int, seed: int = 0) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(5, 300, n)]


def test_same_seed_same_output_alone_and_under_concurrent_load(model_dir) -> None:
    params = [SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, seed=s) for s in range(6)]
    prompts = [prompt(10 + 3 * i, seed=i) for i in range(6)]
    alone = [tokens(run_requests(model_dir, [(p, sp)])[0][0]) for p, sp in zip(prompts, params)]
    together, _ = run_requests(model_dir, list(zip(prompts, params)))
    assert [tokens(o) for o in together] == alone
    assert len({tuple(a) for a in alone}) == 6  # different seeds, different samples


def test_logit_bias_100_forces_the_token(model_dir) -> None:
    (outs,), _ = run_requests(model_dir, [(prompt(8), SamplingParams(max_tokens=10, temperature=1.0, logit_bias={42: 100.0}, seed=1))])
    assert tokens(outs) == [42] * 10


def test_min_tokens_masks_eos(model_dir) -> None:
    eos = load_model(model_dir).config.eos_token_ids[0]
    force_eos = {eos: 100.0}
    (a,), _ = run_requests(model_dir, [(prompt(8), SamplingParams(max_tokens=20, temperature=0, logit_bias=force_eos))])
    (b,), _ = run_requests(model_dir, [(prompt(8), SamplingParams(max_tokens=20, temperature=0, logit_bias=force_eos, min_tokens=5))])
    assert tokens(a) == [eos] and a[-1].finish_reason == "stop"
    assert len(tokens(b)) == 6 and tokens(b)[-1] == eos and eos not in tokens(b)[:5]


def test_stop_token_ids_and_ignore_eos(model_dir) -> None:
    model = load_model(model_dir)
    eos = model.config.eos_token_ids[0]
    (a,), _ = run_requests(model_dir, [(prompt(8), SamplingParams(max_tokens=6, temperature=0, logit_bias={eos: 100.0}, ignore_eos=True))])
    assert tokens(a) == [eos] * 6 and a[-1].finish_reason == "length"
    (b,), _ = run_requests(model_dir, [(prompt(8), SamplingParams(max_tokens=6, temperature=0, logit_bias={7: 100.0}, stop_token_ids=[7]))])
    assert tokens(b) == [7] and b[-1].finish_reason == "stop"


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def test_logprobs_are_log_softmax_of_the_logits(model_dir) -> None:
    ids = prompt(12, seed=3)
    params = SamplingParams(max_tokens=6, temperature=0, logprobs=4, prompt_logprobs=2)
    (outs,), _ = run_requests(model_dir, [(ids, params)])
    gen = tokens(outs)
    lps = [lp for o in outs for lp in (o.logprobs or [])]
    assert [lp.token_id for lp in lps] == gen
    ref = log_softmax(our_logits(c_model(load_model(model_dir)), ids, gen[:-1]))
    for j, lp in enumerate(lps):
        row = ref[len(ids) - 1 + j]
        assert lp.logprob == pytest.approx(row[lp.token_id], abs=1e-4)
        assert [t for t, _ in lp.top] == list(np.argsort(-row, kind="stable")[:4])
        assert lp.top[0][0] == lp.token_id  # greedy picks the most likely
    pl = outs[0].prompt_logprobs
    assert pl is not None and pl[0] is None and len(pl) == len(ids)
    for p in range(1, len(ids)):
        assert pl[p].token_id == ids[p]
        assert pl[p].logprob == pytest.approx(ref[p - 1][ids[p]], abs=1e-4)
        assert len(pl[p].top) == 2


def test_penalties_change_greedy_output(model_dir) -> None:
    ids = prompt(16, seed=4)
    (plain,), _ = run_requests(model_dir, [(ids, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))])
    (freq,), _ = run_requests(model_dir, [(ids, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, frequency_penalty=50.0))])
    (rep,), _ = run_requests(model_dir, [(ids, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, repetition_penalty=1e6))])
    assert len(set(tokens(plain))) < 30  # the tiny model repeats itself...
    assert len(set(tokens(freq))) == 30  # ...but not when every repeat costs 50
    assert not set(tokens(rep)) & set(ids)  # nor, with a huge repetition penalty, the prompt's tokens
    assert len(set(tokens(rep))) == 30


def test_n_choices_share_the_prompt_and_match_separate_requests(model_dir) -> None:
    ids = prompt(70, seed=5)  # 70 tokens: four full pages of 16 and a partial one
    n = 3
    (outs,), stats = run_requests(model_dir, [(ids, SamplingParams(max_tokens=12, temperature=0.8, seed=100, n=n, ignore_eos=True))])
    assert sorted({o.index for o in outs}) == list(range(n))
    assert all(o.finish_reason == "length" for o in outs if o.finished) and sum(o.finished for o in outs) == n
    separate = [tokens(run_requests(model_dir, [(ids, SamplingParams(max_tokens=12, temperature=0.8, seed=100 + i, ignore_eos=True))])[0][0]) for i in range(n)]
    assert [tokens(outs, i) for i in range(n)] == separate
    # The prompt was prefilled once; the other choices recomputed only the last page's 6 tokens.
    assert stats["prompt_tokens_computed"] == 70 + (n - 1) * (70 - 64)
    assert stats["kv_pages_used"] == 0


def test_abort_frees_pages_and_queued_requests(model_dir) -> None:
    """Leaving generate() aborts: with one sequence at a time, a new request can only run once the
    aborted running one gave its pages back, and the two queued ones never start."""

    async def main():
        engine = make_engine(model_dir, max_num_sequence=1)
        async with anyio.create_task_group() as tg:
            await tg.start(engine.run)
            gens = [engine.generate(prompt(40, seed=i), SamplingParams(max_tokens=500, temperature=0, ignore_eos=True)) for i in range(3)]
            first = await gens[0].__anext__()  # running
            assert first.new_token_ids
            for g in gens:
                await g.aclose()  # one running, two queued (one sequence at a time)
            outs = [o async for o in engine.generate(prompt(9, seed=5), SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))]
            assert outs[-1].finish_reason == "length"
            stats = engine.stats()  # taken before the last output was published
            tg.cancel_scope.cancel()
        await engine.shutdown()
        assert stats["kv_pages_used"] == 0 and stats["num_running"] == 0 and stats["num_waiting"] == 0
        assert stats["live_choices"] == 0

    anyio.run(main)


def test_bad_parameters_are_value_errors(model_dir) -> None:
    async def main():
        engine = make_engine(model_dir)
        vocab = engine.model.config.vocab_size
        for bad in [SamplingParams(top_p=0.0), SamplingParams(temperature=-1), SamplingParams(logit_bias={vocab: 1.0}),
                    SamplingParams(repetition_penalty=0.0), SamplingParams(n=0)]:
            with pytest.raises(ValueError):
                await engine.generate([1, 2, 3], bad).__anext__()
        with pytest.raises(ValueError, match="outside the vocabulary"):
            await engine.generate([vocab + 5], SamplingParams()).__anext__()
        await engine.shutdown()

    anyio.run(main)


def test_one_choice_can_be_aborted_while_the_others_go_on(model_dir) -> None:
    async def main():
        engine = make_engine(model_dir)
        async with anyio.create_task_group() as tg:
            await tg.start(engine.run)
            # Long enough (400 steps) that the abort lands long before choice 1 could finish.
            params = SamplingParams(max_tokens=400, temperature=0.8, seed=3, n=3, ignore_eos=True)
            counts = {0: 0, 1: 0, 2: 0}
            reasons = {}
            aborted = False
            async for out in engine.generate(prompt(20), params):
                counts[out.index] += len(out.new_token_ids)
                if out.index == 1 and counts[1] >= 2 and not aborted:
                    engine.abort_choice(out.request_id, 1)
                    aborted = True
                if out.finished:
                    reasons[out.index] = out.finish_reason
            assert reasons == {0: "length", 1: "abort", 2: "length"}
            assert counts[0] == counts[2] == 400 and 2 <= counts[1] < 400
            assert engine.stats()["kv_pages_used"] == 0
            tg.cancel_scope.cancel()
        await engine.shutdown()

    anyio.run(main)


def test_n_choices_larger_than_the_cache_all_finish(model_dir) -> None:
    # The local preset's shape: 4 sequences, a cache no larger than one context. Five choices that
    # each want the whole context cannot all fit, so some are preempted and recomputed alone; the
    # waiting ones must then give their share of the prompt's pages (40 tokens: 2 full pages) back
    # rather than pin them while a recomputed choice needs the whole cache (this used to spin).
    async def main():
        engine = AsyncEngine(load_model(model_dir), EngineConfig(num_threads=2, kv_cache_tokens=256, max_num_sequence=4,
                                                                 max_total_sequence_length=256))
        async with anyio.create_task_group() as tg:
            await tg.start(engine.run)
            reasons = {}
            with anyio.fail_after(60):
                async for out in engine.generate(prompt(40), SamplingParams(temperature=0.8, seed=1, n=5, ignore_eos=True)):
                    if out.finished:
                        reasons[out.index] = out.finish_reason
            assert reasons == {i: "length" for i in range(5)}
            stats = engine.stats()
            assert stats["kv_pages_used"] == 0 and stats["num_running"] == stats["num_waiting"] == 0
            tg.cancel_scope.cancel()
        await engine.shutdown()

    anyio.run(main)


def test_a_tiny_temperature_is_greedy(model_dir) -> None:
    ids = prompt(10, seed=9)
    (greedy,), _ = run_requests(model_dir, [(ids, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))])
    (tiny,), _ = run_requests(model_dir, [(ids, SamplingParams(max_tokens=12, temperature=1e-39, ignore_eos=True, logprobs=2, seed=0))])
    assert tokens(tiny) == tokens(greedy)
    assert all(np.isfinite(lp.logprob) for o in tiny for lp in o.logprobs)


def test_a_huge_top_k_means_no_top_k(model_dir) -> None:
    ids = prompt(10, seed=10)
    (a,), _ = run_requests(model_dir, [(ids, SamplingParams(max_tokens=8, temperature=0.7, seed=4, top_k=3_000_000_000))])
    (b,), _ = run_requests(model_dir, [(ids, SamplingParams(max_tokens=8, temperature=0.7, seed=4))])
    assert tokens(a) == tokens(b)


def test_aborting_choice_0_before_the_fork_reports_every_choice(model_dir) -> None:
    from pyserve import _C

    cm = c_model(load_model(model_dir))
    core = _C.EngineCore(cm, {"max_num_seqs": 4, "max_batch_tokens": 64, "kv_capacity_tokens": 1024, "max_model_len": 512})
    core.add_request(1, prompt(300, seed=11), {"n": 3, "max_tokens": 4, "ignore_eos": True, "seed": 0})
    core.step()  # part of the prompt is in: the request holds pages, and has not forked
    core.abort(1, 0)
    ends = {index: reason for _id, index, _toks, finished, reason, *_ in core.take_outputs() if finished}
    assert ends == {0: "abort", 1: "abort", 2: "abort"}
    assert core.idle and core.stats()["kv_pages_used"] == 0
