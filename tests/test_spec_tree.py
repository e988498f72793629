"""--spec-tree-width W > 1: each draft position also verifies the draft source's next W - 1
likeliest tokens as leaves, in the same forward pass (a leaf attends to its parent's path and to
itself). Greedy output equals the chain's and plain decoding's for every draft source, leaves are
kept (their K/V moved to their place, their row drawing the next token), and pages come back."""

from __future__ import annotations

import numpy as np
import pytest

import tiny_models
from engine_helpers import c_model
from pyserve import _C
from pyserve.engine.sampling import SamplingParams
from pyserve.model.loader import load_model
from test_eagle import draft_options as eagle_options
from test_medusa import heads_for
from test_speculative import assert_async_engine_keeps_output, check_counters, crowded_workload, prompts, run


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    model = load_model(tiny_models.make_llama(tmp_path_factory.mktemp("tree-llama")))
    return model, c_model(model)


@pytest.fixture(scope="module")
def near_draft(target, tmp_path_factory):
    """The target with noise in its layers' weights: its first choice is often the target's, and
    its second or third often when the first is not (what leaves are for)."""
    import shutil

    from safetensors.numpy import load_file, save_file

    model, _ = target
    d = tmp_path_factory.mktemp("tree-near") / "model"
    shutil.copytree(model.path, d)
    rng = np.random.default_rng(3)
    for f in d.glob("*.safetensors"):
        t = load_file(str(f))
        for name, w in t.items():
            if ".layers." in name and w.ndim == 2:
                t[name] = (w + 0.5 * w.std() * rng.standard_normal(w.shape)).astype(w.dtype)
        save_file(t, str(f), metadata={"format": "pt"})
    return c_model(load_model(str(d)))


def source_options(kind: str, target, near_draft, tmp_path) -> dict:
    if kind == "small_draft":
        return {"speculative_mode": "small_draft", "draft_model": near_draft}
    if kind == "medusa":
        return {"speculative_mode": "medusa", "medusa": heads_for(target, tmp_path, scale=0.0)}
    return eagle_options(target, tmp_path, kind="echo")


@pytest.mark.parametrize("kind", ["small_draft", "medusa", "eagle"])
@pytest.mark.parametrize("batch", [1, 6])
def test_tree_output_equals_the_chain_and_plain_decoding(target, near_draft, tmp_path, kind, batch) -> None:
    _, cm = target
    reqs = [(ids, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True).to_engine())
            for ids in prompts(batch, seed=160 + batch)]
    plain, _ = run(cm, reqs, max_num_seqs=batch)
    options = source_options(kind, target, near_draft, tmp_path)
    chain, chain_stats = run(cm, reqs, max_num_seqs=batch, spec_draft_length=3, **options)
    tree, stats = run(cm, reqs, max_num_seqs=batch, spec_draft_length=3, spec_tree_width=3, **options)
    assert {k: c.tokens for k, c in chain.items()} == {k: c.tokens for k, c in plain.items()}
    assert {k: c.tokens for k, c in tree.items()} == {k: c.tokens for k, c in plain.items()}
    check_counters(stats)
    # two leaves a draft were verified too
    assert stats["spec_draft_tokens"] / stats["spec_verifies"] > 2 * chain_stats["spec_draft_tokens"] / chain_stats["spec_verifies"]
    if kind == "small_draft":  # a near draft's runners-up are often right: leaves were kept
        assert stats["spec_accepted_leaves"] > 0


def test_leaves_under_preemption_prefix_hits_sampling_and_forks(target, near_draft) -> None:
    """A KV pool too small for everyone (leaves are the first to go when pages are short), shared
    prompts, seeded sampling with penalties, n > 1: plain decoding's tokens, nothing leaked."""
    _, cm = target
    reqs, small = crowded_workload(seed=170, kv_capacity_tokens=192)
    plain, _ = run(cm, reqs, **small)
    tree, stats = run(cm, reqs, speculative_mode="small_draft", draft_model=near_draft, spec_draft_length=3,
                      spec_tree_width=2, **small)
    assert stats["preemptions"] > 0 and stats["spec_accepted_leaves"] > 0
    assert {k: c.tokens for k, c in tree.items()} == {k: c.tokens for k, c in plain.items()}


def test_a_leaf_attends_to_its_path_and_itself(target) -> None:
    """One forward pass of [root, d0, d1, leaf in d1's place] gives the leaf the logits the chain
    [root, d0, leaf] gives its last token (and the chain's rows theirs), with the page boundary
    between the prompt and the tree (16 tokens a page: the prompt ends at 20)."""
    _, cm = target
    rng = np.random.default_rng(5)
    prompt = [int(t) for t in rng.integers(5, 300, 21)]
    d0, d1, leaf = (int(t) for t in rng.integers(5, 300, 3))
    t = _C.Session(cm, 64)
    t.forward(prompt[:-1], False)
    tree = t.forward_tree([prompt[-1], d0, d1], [(1, leaf)])  # rows: root, d0, d1, leaf (for d1)
    s = _C.Session(cm, 64)
    s.forward(prompt[:-1], False)
    chain = s.forward([prompt[-1], d0, leaf], True)  # rows: root, d0, leaf
    np.testing.assert_allclose(tree[3], chain[2], rtol=0, atol=1e-4 * np.abs(chain[2]).max())
    np.testing.assert_allclose(tree[:2], chain[:2], rtol=0, atol=1e-4 * np.abs(chain[:2]).max())
    with pytest.raises(ValueError, match="spec_tree_width"):
        _C.EngineCore(cm, {"spec_tree_width": 0, "eos_token_ids": []})


def test_tree_width_through_the_async_engine() -> None:
    """--spec-tree-width reaches the engine: greedy output kept with a draft tree."""
    path = tiny_models.tiny_model_dir("llama")
    assert_async_engine_keeps_output("small_draft", path, seed=180, spec_tree_width=3, spec_draft_length=2)


def test_stop_tokens_and_a_next_turn_from_the_prefix_cache(target, near_draft) -> None:
    """Trees with stop tokens (the ones plain decoding draws most often here, so many requests end
    on one), finished sequences kept in the prefix cache, and a second round whose prompts are the
    first round's prompts + outputs + a few tokens (the next turn of a chat), read from the cache:
    plain decoding's tokens. (A kept leaf whose token ends its request still has its K/V moved into
    place; this workload did not reproduce the case where it was not, so it guards the path
    around it rather than that case itself.)"""
    from collections import Counter

    from test_engine_core import drain

    _, cm = target
    ps = prompts(24, seed=190)
    free, _ = run(cm, [(p, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True).to_engine()) for p in ps],
                  max_num_seqs=24)
    stops = [t for t, _ in Counter(t for c in free.values() for t in c.tokens[2:]).most_common(6)]

    def two_rounds(**cfg):
        e = _C.EngineCore(cm, {"max_num_seqs": 24, "max_batch_tokens": 96, "page_size": 4, "max_model_len": 512,
                               "kv_capacity_tokens": 4096, "eos_token_ids": [], "prefix_cache_max_recycling": -1, **cfg})
        seen: dict = {}
        for i, p in enumerate(ps):
            e.add_request(i, p, SamplingParams(max_tokens=24, temperature=0.0, stop_token_ids=stops, min_tokens=2,
                                               ignore_eos=True).to_engine())
        drain(e, seen, max_steps=5000)
        for i, p in enumerate(ps):
            e.add_request(100 + i, p + seen[(i, 0)].tokens + [7, 8, 9],  # a next turn: the last token is read too
                          SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True).to_engine())
        drain(e, seen, max_steps=5000)
        return {k: c.tokens for k, c in seen.items()}, e.stats()

    plain, _ = two_rounds()
    assert sum(plain[(i, 0)][-1] in stops for i in range(len(ps))) >= len(ps) // 4  # many end on a stop
    tree, stats = two_rounds(speculative_mode="small_draft", draft_model=near_draft, spec_draft_length=3,
                             spec_tree_width=4)
    assert stats["spec_accepted_leaves"] > 0
    assert tree == plain


def test_trees_and_attention_sinks_are_refused_at_start(tmp_path) -> None:
    from pyserve.config import EngineConfig, with_attention_overrides

    model = load_model(tiny_models.tiny_model_dir("mistral"))
    model.config = with_attention_overrides(model.config, EngineConfig(attention_sink_size=4))
    with pytest.raises(ValueError, match="attention sink"):
        _C.EngineCore(c_model(model), {"spec_tree_width": 2, "speculative_mode": "ngram", "eos_token_ids": []})
