"""--speculative-mode medusa: heads on the target's own hidden state propose the next tokens. The
heads match a float64 reference; the engine feeds them the hidden state of the row that drew each
sequence's latest token; and the output is the one decoding without drafts gives (greedy, seeded
sampling, penalties, preemption, prefix hits, forks), with nothing left behind."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import tiny_models
from engine_helpers import c_model
from pyserve import _C
from pyserve.engine.native import medusa_heads, medusa_spec
from pyserve.engine.sampling import SamplingParams
from pyserve.model.loader import load_model
from test_speculative import assert_async_engine_keeps_output, assert_sampling_unchanged, check_counters, crowded_workload, prompts, run


def write_heads(d, hidden: int, vocab: int, heads: int, *, seed: int = 0, scale: float = 0.5,
                draft_vocab: list[int] | None = None) -> str:
    """A heads directory as tools/train_medusa.py writes it, with random weights (scale 0: zero,
    so each head's input goes straight to the LM head)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    os.makedirs(d, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    for k in range(heads):
        tensors[f"medusa.{k}.weight"] = (scale * rng.standard_normal((hidden, hidden)) / np.sqrt(hidden)).astype(np.float32)
        tensors[f"medusa.{k}.bias"] = (scale * rng.standard_normal(hidden)).astype(np.float32)
    if draft_vocab is not None:
        tensors["draft_vocab"] = np.asarray(draft_vocab, dtype=np.int32)
    save_file(tensors, os.path.join(d, "medusa.safetensors"))
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump({"architecture": "medusa", "num_heads": heads, "hidden_size": hidden, "vocab_size": vocab,
                   "draft_vocab_size": len(draft_vocab) if draft_vocab else vocab}, f)
    return str(d)


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    model = load_model(tiny_models.make_llama(tmp_path_factory.mktemp("medusa-llama")))
    return model, c_model(model)


def heads_for(target, d, heads: int = 4, **kw):
    model, cm = target
    path = write_heads(d, model.config.hidden_size, model.config.vocab_size, heads, **kw)
    return medusa_heads(cm, medusa_spec(model, path))


def lm_head_f64(model) -> np.ndarray:
    rec = model.tensors.get("lm_head.weight") or model.tensors["model.embed_tokens.weight"]
    return rec.to_float32().astype(np.float64)


@pytest.mark.parametrize("draft_vocab", [None, "subset"])
def test_heads_match_a_float64_reference(target, tmp_path, draft_vocab) -> None:
    """h_k = h + SiLU(W_k h + b_k); draft_k = the best row of the (draft-vocabulary) LM head.
    Checked on fresh random inputs: each draft's float64 logit is the float64 maximum (within
    float32 rounding: a near-tie may go either way)."""
    model, _ = target
    V, H = model.config.vocab_size, model.config.hidden_size
    rng = np.random.default_rng(1)
    vocab = sorted(rng.choice(V, V // 3, replace=False).tolist()) if draft_vocab else None
    heads = heads_for(target, tmp_path, heads=3, seed=2, draft_vocab=vocab)
    assert heads.num_heads == 3 and heads.draft_vocab_size == (len(vocab) if vocab else V)
    from safetensors.numpy import load_file

    t = load_file(os.path.join(tmp_path, "medusa.safetensors"))
    E = lm_head_f64(model)
    rows = np.asarray(vocab) if vocab else np.arange(V)
    x = rng.standard_normal((5, H)).astype(np.float32)
    got = heads.propose(x, 3)
    assert heads.propose(x, 2) == [g[:2] for g in got]  # fewer heads: the same first drafts
    for i in range(5):
        for k in range(3):
            lin = t[f"medusa.{k}.weight"].astype(np.float64) @ x[i].astype(np.float64) + t[f"medusa.{k}.bias"]
            h = x[i] + lin / (1 + np.exp(-lin))
            logits = E[rows] @ h
            assert got[i][k] in set(rows.tolist())
            best = logits.max()
            mine = logits[rows.tolist().index(got[i][k])]
            assert best - mine <= 1e-4 * np.abs(logits).max(), (i, k, best, mine)


def test_heads_are_checked_against_the_target(target, tmp_path) -> None:
    model, _ = target
    H, V = model.config.hidden_size, model.config.vocab_size
    with pytest.raises(ValueError, match="hidden size"):
        medusa_spec(model, write_heads(tmp_path / "a", H + 4, V, 2))
    with pytest.raises(ValueError, match="outside"):
        medusa_spec(model, write_heads(tmp_path / "b", H, V, 2, draft_vocab=[1, V]))
    with pytest.raises(ValueError, match="not a medusa directory"):
        medusa_spec(model, str(tmp_path))
    with pytest.raises(ValueError, match="needs Medusa heads"):
        _C.EngineCore(target[1], {"speculative_mode": "medusa", "eos_token_ids": []})


def expected_kept(generated: list[int], k: int) -> int:
    """Drafts kept when every draft is the sequence's latest token (zero heads), k per step (fewer
    where max_tokens leaves less room), replaying greedy decoding: the drafts stand while the target
    repeats that token."""
    kept, n, total = 0, 1, len(generated)  # the first token comes from the prompt's step
    while n < total:
        room = min(k, total - n - 1)
        run_ = 0
        while run_ < room and generated[n + run_] == generated[n - 1]:
            run_ += 1
        kept += run_
        n += run_ + 1
    return kept


@pytest.mark.parametrize("k", [1, 3])
def test_the_heads_read_the_row_that_drew_the_latest_token(target, tmp_path, k) -> None:
    """With zero weights a head's input goes straight to the LM head: its draft is then the token
    the stored hidden state drew, the sequence's latest, exactly when the engine stored the right
    row (after a prompt step, a plain step, and a verify that kept some drafts). The drafts kept
    must then be exactly those a replay of the greedy output predicts."""
    _, cm = target
    heads = heads_for(target, tmp_path, heads=4, scale=0.0)
    # prompts whose greedy continuations repeat tokens (a random model falls into loops)
    reqs = [(ids, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True).to_engine())
            for ids in prompts(12, seed=80)]
    plain, _ = run(cm, reqs, max_num_seqs=12)
    spec, stats = run(cm, reqs, max_num_seqs=12, speculative_mode="medusa", medusa=heads, spec_draft_length=k)
    assert {key: c.tokens for key, c in spec.items()} == {key: c.tokens for key, c in plain.items()}
    want = sum(expected_kept(c.tokens, k) for c in plain.values())
    assert want > 0  # the test would prove nothing on outputs without repeats
    assert stats["spec_accepted_tokens"] == want
    check_counters(stats)


@pytest.mark.parametrize("batch", [1, 4, 16])
def test_greedy_output_is_unchanged(target, tmp_path, batch) -> None:
    _, cm = target
    heads = heads_for(target, tmp_path, seed=batch)
    reqs = [(ids, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True).to_engine())
            for ids in prompts(batch, seed=90 + batch)]
    plain, _ = run(cm, reqs, max_num_seqs=batch)
    for length in (0, 4):  # automatic, and every head every step
        spec, stats = run(cm, reqs, max_num_seqs=batch, speculative_mode="medusa", medusa=heads,
                          spec_draft_length=length, spec_token_cost=0.2, spec_draft_cost=0.01)
        assert {k: c.tokens for k, c in spec.items()} == {k: c.tokens for k, c in plain.items()}
        assert stats["spec_draft_tokens"] > 0


def test_preemption_prefix_hits_sampling_and_forks(target, tmp_path) -> None:
    """A crowded workload (test_speculative.crowded_workload: preemption and recompute, shared
    prompts, seeded sampling, n > 1): the tokens are those of plain decoding, and every page comes
    back (run() checks)."""
    _, cm = target
    heads = heads_for(target, tmp_path, scale=0.0)  # drafts kept now and then
    reqs, small = crowded_workload(seed=100)
    plain, _ = run(cm, reqs, **small)
    spec, stats = run(cm, reqs, speculative_mode="medusa", medusa=heads, spec_draft_length=3, **small)
    assert stats["preemptions"] > 0 and stats["spec_accepted_tokens"] > 0
    assert {k: c.tokens for k, c in spec.items()} == {k: c.tokens for k, c in plain.items()}


def test_sampled_tokens_follow_the_same_distribution(target, tmp_path) -> None:
    """As for the other modes (test_speculative.assert_sampling_unchanged): a two-sample
    chi-square test on the fourth sampled token, 3,000 draws a side, false-alarm rate 0.1%."""
    assert_sampling_unchanged(target[1], speculative_mode="medusa", medusa=heads_for(target, tmp_path, scale=0.0))


def test_medusa_through_the_async_engine(tmp_path) -> None:
    """--speculative-mode medusa --additional-models DIR: loaded, checked, and greedy output kept."""
    model = load_model(tiny_models.tiny_model_dir("llama"))
    heads = write_heads(tmp_path / "heads", model.config.hidden_size, model.config.vocab_size, 3, scale=0.0,
                        draft_vocab=list(range(0, model.config.vocab_size, 2)))
    assert_async_engine_keeps_output("medusa", heads, seed=110)
