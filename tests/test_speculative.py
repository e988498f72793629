"""Speculative decoding: prompt lookup (n-gram) drafts verified in one forward pass. The output is
the one decoding without drafts gives (greedy and seeded sampling alike, penalties and logprobs
included), pages written by rejected drafts come back, and the counters add up."""

from __future__ import annotations

import numpy as np
import pytest

import tiny_models
from engine_helpers import c_model
from pyserve import _C
from pyserve._C.testing import ngram_propose
from pyserve.engine.sampling import SamplingParams
from pyserve.model.loader import load_model
from test_engine_core import Choice, assert_clean, drain

PAGE = 4


# --- the proposer ----------------------------------------------------------------------------------


def test_ngram_proposes_what_followed_the_latest_match() -> None:
    #         0  1  2  3  4  5  6  7  8  9
    tokens = [5, 6, 7, 8, 5, 6, 9, 1, 5, 6]
    # suffix [5, 6]: latest earlier occurrence at 4 (not 0): what followed it is 9, 1, 5, 6
    assert ngram_propose(tokens, k=3) == [9, 1, 5]
    assert ngram_propose(tokens, k=10) == [9, 1, 5, 6]  # no further than the tokens go
    # the longest suffix that recurs wins: [8, 5, 6] occurred at 2, so 9 follows; not 7 (after [6])
    assert ngram_propose([8, 5, 6, 9, 3, 4, 8, 5, 6], k=2) == [9, 3]
    assert ngram_propose([1, 2, 3, 4], k=4) == []  # nothing recurs
    assert ngram_propose([1, 2, 3, 3], k=2, min_n=2) == []  # a 1-gram would do; not allowed here
    assert ngram_propose([1, 2, 3, 3], k=2) == [3]
    assert ngram_propose([7, 7, 7, 7], k=3) == [7]  # overlapping occurrence: the run goes on
    assert ngram_propose([4], k=3) == [] and ngram_propose([4, 4], k=0) == []


# --- the engine ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cm(tmp_path_factory):
    return c_model(load_model(tiny_models.make_llama(tmp_path_factory.mktemp("spec-llama"))))


def core(cm, **cfg):
    options = {"max_num_seqs": 16, "max_batch_tokens": 64, "page_size": PAGE, "kv_capacity_tokens": 1024,
               "max_model_len": 512, "eos_token_ids": []}
    options.update(cfg)
    return _C.EngineCore(cm, options)


def prompts(n: int, seed: int) -> list[list[int]]:
    """Prompts that repeat themselves (as a rewrite or a quote does), and plain random ones."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        base = [int(t) for t in rng.integers(5, 300, rng.integers(4, 20))]
        out.append(base * 3 + base[: rng.integers(1, len(base))] if i % 2 == 0 else base)
    return out


def run(cm, reqs: list[tuple[list[int], dict]], **cfg) -> tuple[dict, dict]:
    e = core(cm, **cfg)
    for i, (ids, params) in enumerate(reqs):
        e.add_request(i, ids, params)
    seen: dict[tuple[int, int], Choice] = {}
    drain(e, seen, max_steps=5000)
    assert_clean(e)
    return seen, e.stats()


def check_counters(stats: dict) -> None:
    assert 0 < stats["spec_accepted_tokens"] <= stats["spec_draft_tokens"]
    assert sum(stats["spec_accepted_by_position"]) == stats["spec_accepted_tokens"]
    by_pos = stats["spec_accepted_by_position"]
    assert all(a >= b for a, b in zip(by_pos, by_pos[1:]))  # a later draft stands only on an earlier one


@pytest.mark.parametrize("batch", [1, 4, 16])
def test_greedy_output_is_unchanged(cm, batch: int) -> None:
    reqs = [(ids, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True).to_engine())
            for ids in prompts(batch, seed=batch)]
    plain, _ = run(cm, reqs, max_num_seqs=batch)
    spec, stats = run(cm, reqs, max_num_seqs=batch, speculative_mode="ngram")
    assert {k: c.tokens for k, c in spec.items()} == {k: c.tokens for k, c in plain.items()}
    assert all(c.ends == [("length", None)] for c in spec.values())
    check_counters(stats)
    assert stats["steps"] < sum(len(c.tokens) for c in spec.values())  # drafts did save steps


@pytest.mark.parametrize("draft_length", [1, 3, 7])
def test_fixed_draft_lengths_with_prefix_hits_and_preemption(cm, draft_length: int) -> None:
    """A KV pool far too small for everyone (preemption, recompute from cached prefixes), shared
    prompts, chunked prompts: still the same tokens."""
    ps = prompts(8, seed=10 + draft_length)
    ps += [p + [9, 9] for p in ps[:4]]  # cache hits on whole pages
    reqs = [(ids, SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True).to_engine()) for ids in ps]
    small = dict(max_num_seqs=8, kv_capacity_tokens=160, max_batch_tokens=24)
    plain, plain_stats = run(cm, reqs, **small)
    spec, stats = run(cm, reqs, speculative_mode="ngram", spec_draft_length=draft_length, **small)
    assert stats["preemptions"] > 0
    assert {k: c.tokens for k, c in spec.items()} == {k: c.tokens for k, c in plain.items()}
    check_counters(stats)
    assert len(stats["spec_accepted_by_position"]) == draft_length


def test_seeded_sampling_penalties_and_logprobs_are_unchanged(cm) -> None:
    """Each verified row is drawn as a plain decode draws it (same penalties, same RNG draw): a
    seeded request gives the same tokens and logprobs with drafts as without."""
    params = SamplingParams(max_tokens=40, temperature=0.7, top_p=0.9, seed=3, frequency_penalty=0.2,
                            repetition_penalty=1.1, logprobs=2, ignore_eos=True).to_engine()
    greedyish = SamplingParams(max_tokens=40, temperature=0.2, seed=5, ignore_eos=True).to_engine()
    reqs = [(ids, params if i % 2 else greedyish) for i, ids in enumerate(prompts(6, seed=4))]

    def collect_lp(**cfg):
        e = core(cm, **cfg)
        for i, (ids, p) in enumerate(reqs):
            e.add_request(i, ids, p)
        toks: dict[int, list[int]] = {}
        lps: dict[int, list] = {}
        while not e.idle:
            e.step()
            for rid, _index, t, _fin, _reason, _n, lp, _plp, _err, _cached in e.take_outputs():
                toks.setdefault(rid, []).extend(t)
                lps.setdefault(rid, []).extend(lp or [])
        assert_clean(e)
        return toks, lps, e.stats()

    plain_toks, plain_lps, _ = collect_lp()
    spec_toks, spec_lps, stats = collect_lp(speculative_mode="ngram")
    assert spec_toks == plain_toks
    for rid in plain_lps:
        assert [t for t, _, _ in spec_lps[rid]] == [t for t, _, _ in plain_lps[rid]]
        np.testing.assert_allclose([lp for _, lp, _ in spec_lps[rid]], [lp for _, lp, _ in plain_lps[rid]], atol=1e-4)
    assert stats["spec_accepted_tokens"] > 0


def test_stops_inside_the_drafts(cm) -> None:
    """max_tokens, stop tokens and the context end cut the accepted tokens exactly where plain
    decoding stops."""
    ids = prompts(1, seed=7)[0]
    free = run(cm, [(ids, SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True).to_engine())])[0][(0, 0)].tokens
    stop_at = next(i for i in range(5, len(free)) if free[i] not in free[:i])  # a token seen first at i
    cases = [
        SamplingParams(max_tokens=13, temperature=0.0, ignore_eos=True).to_engine(),
        SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True, stop_token_ids=[free[stop_at]]).to_engine(),
    ]
    for params in cases:
        plain, _ = run(cm, [(ids, params)])
        spec, _ = run(cm, [(ids, params)], speculative_mode="ngram", spec_draft_length=6)
        assert spec[(0, 0)].tokens == plain[(0, 0)].tokens and spec[(0, 0)].ends == plain[(0, 0)].ends
    limit = len(ids) + 21
    plain, _ = run(cm, [(ids, cases[0] | {"max_tokens": 100})], max_model_len=limit)
    spec, _ = run(cm, [(ids, cases[0] | {"max_tokens": 100})], max_model_len=limit, speculative_mode="ngram",
                  spec_draft_length=6)
    assert spec[(0, 0)].tokens == plain[(0, 0)].tokens and len(ids) + len(spec[(0, 0)].tokens) == limit


def test_n_choices_and_aborts_leave_no_pages(cm) -> None:
    ids = prompts(1, seed=8)[0]
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, n=3).to_engine()
    plain, _ = run(cm, [(ids, params)])
    spec, _ = run(cm, [(ids, params)], speculative_mode="ngram")
    assert {k: c.tokens for k, c in spec.items()} == {k: c.tokens for k, c in plain.items()}
    e = core(cm, speculative_mode="ngram")
    for i, ids in enumerate(prompts(6, seed=9)):
        e.add_request(i, ids, SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True).to_engine())
    for _ in range(12):
        e.step()
    for i in range(6):
        e.abort(i)
    e.take_outputs()
    assert_clean(e)


# --- the automatic draft length --------------------------------------------------------------------


def test_draft_policy_weighs_each_drafts_chance_against_its_cost() -> None:
    from pyserve._C.testing import choose_draft_lengths as choose

    # Free tokens (a memory-bound step): every proposed draft is worth verifying.
    assert choose([(4, 0.1), (2, 0.5)], [0.5], 0.0) == [4, 2]
    # A costly token: only likely drafts, and fewer as the batch grows (every token is compute).
    assert choose([(4, 0.9)], [0.9], 0.2) == [4]
    assert choose([(4, 0.9)] * 16, [0.9], 0.2) == [1] * 16
    assert choose([(4, 0.3)], [0.5], 0.2) == [1]
    assert choose([(4, 0.1)] * 4, [0.9], 0.2) == [0] * 4
    # Likelier sequences get drafts first; a run's later drafts ride on its measured chain rates.
    assert choose([(4, 0.95), (4, 0.2)], [0.95, 0.9, 0.2], 0.2) == [3, 0]
    # Each extra draft must pay for itself: the expected tokens per unit of time never falls.
    def rate(ks, cands, later, cost):
        e = t = 0.0
        for (n, first), k in zip(cands, ks):
            p = first
            e += 1
            for j in range(k):
                if j:
                    p *= later[min(j - 1, len(later) - 1)]
                e += p
        return e / (1 + cost * (len(cands) + sum(ks) - 1))

    rng = np.random.default_rng(0)
    for _ in range(200):
        cands = [(int(rng.integers(0, 5)), float(rng.random())) for _ in range(int(rng.integers(1, 12)))]
        later, cost = [float(x) for x in rng.random(3)], float(rng.random() * 0.4)
        ks = choose(cands, later, cost)
        assert all(0 <= k <= n for k, (n, _) in zip(ks, cands))
        assert rate(ks, cands, later, cost) >= rate([0] * len(cands), cands, later, cost) - 1e-12


def test_automatic_length_keeps_the_output(cm) -> None:
    reqs = [(ids, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True).to_engine())
            for ids in prompts(8, seed=21)]
    plain, _ = run(cm, reqs, max_num_seqs=8)
    spec, stats = run(cm, reqs, max_num_seqs=8, speculative_mode="ngram", spec_token_cost=0.2)
    assert {k: c.tokens for k, c in spec.items()} == {k: c.tokens for k, c in plain.items()}
    assert stats["spec_accepted_tokens"] > 0


# --- small_draft: a draft model -------------------------------------------------------------------


@pytest.fixture(scope="module")
def other_cm(tmp_path_factory):
    """Another random tiny Llama with the same tokenizer: a draft that is nearly always wrong."""
    return c_model(load_model(tiny_models.make_llama(tmp_path_factory.mktemp("spec-llama-other"), seed=7)))


@pytest.mark.parametrize("batch", [1, 5, 16])
def test_a_draft_identical_to_the_target_is_always_kept(cm, batch: int) -> None:
    reqs = [(ids, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True).to_engine())
            for ids in prompts(batch, seed=30 + batch)]
    plain, _ = run(cm, reqs, max_num_seqs=batch)
    spec, stats = run(cm, reqs, max_num_seqs=batch, speculative_mode="small_draft", draft_model=cm,
                      spec_draft_length=4)
    assert {k: c.tokens for k, c in spec.items()} == {k: c.tokens for k, c in plain.items()}
    assert stats["spec_draft_tokens"] > 0 and stats["spec_accepted_tokens"] == stats["spec_draft_tokens"]
    check_counters(stats)
    assert stats["steps"] < sum(len(c.tokens) for c in spec.values()) / 3  # ~5 tokens a verifying step


def test_a_draft_that_is_always_wrong_still_gives_the_target_output(cm, other_cm) -> None:
    reqs = [(ids, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True).to_engine())
            for ids in prompts(6, seed=41)]
    plain, _ = run(cm, reqs, max_num_seqs=6)
    spec, stats = run(cm, reqs, max_num_seqs=6, speculative_mode="small_draft", draft_model=other_cm,
                      spec_draft_length=3)
    assert {k: c.tokens for k, c in spec.items()} == {k: c.tokens for k, c in plain.items()}
    assert stats["spec_draft_tokens"] > 0
    assert stats["spec_accepted_tokens"] < stats["spec_draft_tokens"] / 4


def crowded_workload(seed: int, kv_capacity_tokens: int = 160) -> tuple[list, dict]:
    """Requests and engine limits under which the KV pool is far too small for everyone (the
    target preempts and recomputes), prompts share cached pages, prompts come in chunks, and one
    request samples (seeded, with a penalty) n = 3 choices: (requests, limits)."""
    ps = prompts(8, seed=seed)
    ps += [p + [9, 9] for p in ps[:4]]
    reqs = [(ids, SamplingParams(max_tokens=36, temperature=0.0, ignore_eos=True).to_engine()) for ids in ps]
    reqs.append((ps[0], SamplingParams(max_tokens=30, temperature=0.8, seed=5, n=3, presence_penalty=0.5,
                                       ignore_eos=True).to_engine()))
    return reqs, dict(max_num_seqs=8, kv_capacity_tokens=kv_capacity_tokens, max_batch_tokens=24)


def test_small_draft_under_preemption_prefix_hits_sampling_and_forks(cm, other_cm) -> None:
    """A crowded workload (the draft's own pool runs short too) with a draft that is sometimes
    right: the tokens are the ones plain decoding gives, and nothing leaks."""
    reqs, small = crowded_workload(seed=50)
    plain, _ = run(cm, reqs, **small)
    for draft in (cm, other_cm):
        spec, stats = run(cm, reqs, speculative_mode="small_draft", draft_model=draft, spec_draft_length=3, **small)
        assert stats["preemptions"] > 0
        assert {k: c.tokens for k, c in spec.items()} == {k: c.tokens for k, c in plain.items()}
        assert stats["spec_draft_tokens"] > 0


def test_small_draft_needs_a_draft_of_the_same_vocabulary(cm) -> None:
    with pytest.raises(ValueError, match="draft model"):
        core(cm, speculative_mode="small_draft")


def assert_async_engine_keeps_output(mode: str, additional: str, seed: int, **engine_kw) -> None:
    """Through AsyncEngine on the tiny Llama (--speculative-mode MODE --additional-models
    ADDITIONAL, and engine_kw): greedy tokens equal plain decoding's; without --additional-models
    the mode is a ConfigError naming the flag."""
    import anyio

    from engine_helpers import engine_greedy
    from pyserve.config import ConfigError, EngineConfig
    from pyserve.engine.async_engine import AsyncEngine

    path = tiny_models.tiny_model_dir("llama")
    ps = prompts(4, seed=seed)
    plain = anyio.run(engine_greedy, path, ps, 24)
    spec = anyio.run(lambda: engine_greedy(path, ps, 24, speculative_mode=mode, additional_models=[additional],
                                           **engine_kw))
    assert spec == plain
    with pytest.raises(ConfigError, match="additional-models"):
        AsyncEngine(load_model(path), EngineConfig(num_threads=2, speculative_mode=mode))


def test_small_draft_through_the_async_engine(tmp_path) -> None:
    """--speculative-mode small_draft --additional-models PATH: the draft is loaded, checked for the
    target's vocabulary, and the greedy tokens are those of plain decoding."""
    from pyserve.config import EngineConfig
    from pyserve.engine.async_engine import AsyncEngine

    target = tiny_models.tiny_model_dir("llama")
    assert_async_engine_keeps_output("small_draft", target, seed=60)
    with pytest.raises(ValueError, match="vocabulary"):  # another tokenizer
        AsyncEngine(load_model(target), EngineConfig(num_threads=2, speculative_mode="small_draft",
                                                     additional_models=[tiny_models.tiny_model_dir("qwen2")]))


def _chi2_critical(df: int, z: float) -> float:
    """The chi-square quantile with df degrees of freedom at the standard normal quantile z
    (Wilson-Hilferty; within a few percent for df >= 3)."""
    h = 2.0 / (9.0 * df)
    return df * (1.0 - h + z * h**0.5) ** 3


def assert_sampling_unchanged(cm, **spec) -> None:
    """With drafts verified the way sampling draws them, the distribution of sampled tokens is the
    one plain decoding gives. Different seeds on each side (so this is not the same-seed equality
    tested above): a two-sample chi-square test on the fourth generated token over 3,000 draws each,
    rare tokens pooled; false-alarm rate 0.1% (z = 3.09). (It tells temperature 0.8 from 0.6 on this
    model; a verifier that kept drafts too often would shift far more.) `spec`: the engine's
    speculative options."""
    n = 3000
    prompt = prompts(2, seed=70)[0]  # repetitive: prompt lookup drafts often

    def fourth_tokens(first_seed: int, **cfg) -> tuple[list[int], dict]:
        reqs = [(prompt, SamplingParams(max_tokens=4, temperature=0.8, top_k=3, seed=first_seed + i,
                                        ignore_eos=True).to_engine()) for i in range(n)]
        seen, stats = run(cm, reqs, max_num_seqs=64, max_batch_tokens=256, kv_capacity_tokens=8192, **cfg)
        return [seen[(i, 0)].tokens[3] for i in range(n)], stats

    plain, _ = fourth_tokens(0)
    spec_tokens, stats = fourth_tokens(10_000, spec_draft_length=3, **spec)
    assert stats["spec_draft_tokens"] > 0 and 0 < stats["spec_accepted_tokens"]
    counts: dict[int, list[int]] = {}
    for side, toks in enumerate((plain, spec_tokens)):
        for t in toks:
            counts.setdefault(t, [0, 0])[side] += 1
    cells, rare = [], [0, 0]
    for a, b in counts.values():
        if a + b >= 10:
            cells.append((a, b))
        else:
            rare = [rare[0] + a, rare[1] + b]
    if sum(rare):
        cells.append(tuple(rare))
    assert len(cells) >= 4  # a distribution worth comparing
    stat = sum((a - b) ** 2 / (a + b) for a, b in cells)  # equal sample sizes
    assert stat < _chi2_critical(len(cells) - 1, 3.09), (stat, len(cells))


@pytest.mark.parametrize("mode", ["ngram", "small_draft"])
def test_sampled_tokens_follow_the_same_distribution(cm, mode: str) -> None:
    # small_draft: the target as its own draft: its greedy guess is kept whenever the draw agrees,
    # often but not always
    assert_sampling_unchanged(cm, speculative_mode=mode, **({"draft_model": cm} if mode == "small_draft" else {}))
