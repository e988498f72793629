"""--speculative-mode eagle: one decoder layer over the target's hidden states and the tokens drafts
token by token. The draft reads the target's feature of the row that drew each token (checked by a
draft that repeats what those features say), and the output is the one decoding without drafts
gives (greedy, seeded sampling, preemption, prefix hits, forks), with nothing left behind."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import tiny_models
from engine_helpers import c_model
from pyserve.engine.native import eagle_draft, eagle_spec
from pyserve.engine.sampling import SamplingParams
from pyserve.model.loader import load_model
from test_medusa import expected_kept
from test_speculative import assert_async_engine_keeps_output, assert_sampling_unchanged, check_counters, crowded_workload, prompts, run


def write_eagle(d, cfg, *, kind: str = "random", seed: int = 0, draft_vocab: list[int] | None = None) -> str:
    """A directory as tools/train_eagle.py writes it. kind "random": random weights; "echo": the
    layer adds nothing (o_proj and down_proj zero) and fc passes the feature through, so the draft's
    output is the target's own feature, renormed: its draft is the token that feature drew."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    H, I = cfg.hidden_size, cfg.intermediate_size
    Q, KV = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim

    def w(*shape):
        return (0.3 * rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)

    p = "model.layers.0."
    t = {p + "input_layernorm.weight": np.ones(H, np.float32), p + "post_attention_layernorm.weight": np.ones(H, np.float32),
         p + "self_attn.q_proj.weight": w(Q, H), p + "self_attn.k_proj.weight": w(KV, H),
         p + "self_attn.v_proj.weight": w(KV, H), p + "self_attn.o_proj.weight": w(H, Q),
         p + "mlp.gate_proj.weight": w(I, H), p + "mlp.up_proj.weight": w(I, H), p + "mlp.down_proj.weight": w(H, I),
         "model.norm.weight": np.ones(H, np.float32), "fc.weight": w(H, 2 * H), "fc.bias": w(H)}
    if kind == "echo":
        t[p + "self_attn.o_proj.weight"][:] = 0
        t[p + "mlp.down_proj.weight"][:] = 0
        t["fc.weight"] = np.concatenate([np.eye(H, dtype=np.float32), np.zeros((H, H), np.float32)], axis=1)
        t["fc.bias"][:] = 0
    if draft_vocab is not None:
        t["draft_vocab"] = np.asarray(draft_vocab, dtype=np.int32)
    os.makedirs(d, exist_ok=True)
    save_file(t, os.path.join(d, "eagle.safetensors"))
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump({"architecture": "eagle", "hidden_size": H, "vocab_size": cfg.vocab_size}, f)
    return str(d)


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    model = load_model(tiny_models.make_llama(tmp_path_factory.mktemp("eagle-llama")))
    return model, c_model(model)


def draft_options(target, d, **kw) -> dict:
    model, cm = target
    spec = eagle_spec(model, write_eagle(d, model.config, **kw))
    draft, eagle = eagle_draft(cm, spec, 2)
    return {"speculative_mode": "eagle", "draft_model": draft, "eagle": eagle, "draft_vocab": spec.draft_vocab}


@pytest.mark.parametrize("k", [1, 3])
def test_the_draft_reads_the_feature_that_drew_each_token(target, tmp_path, k) -> None:
    """With the "echo" draft, a draft is the token the fed feature drew: the latest token, at
    every round, exactly when the engine handed over the right features (prompt rows, plain
    decodes, verifies that kept drafts) and the draft fed back its own. The drafts kept must then
    be exactly those a replay of the greedy output predicts."""
    _, cm = target
    reqs = [(ids, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True).to_engine())
            for ids in prompts(12, seed=120)]
    plain, _ = run(cm, reqs, max_num_seqs=12)
    spec, stats = run(cm, reqs, max_num_seqs=12, spec_draft_length=k, **draft_options(target, tmp_path, kind="echo"))
    assert {key: c.tokens for key, c in spec.items()} == {key: c.tokens for key, c in plain.items()}
    want = sum(expected_kept(c.tokens, k) for c in plain.values())
    assert want > 0
    assert stats["spec_accepted_tokens"] == want
    check_counters(stats)


@pytest.mark.parametrize("batch", [1, 4, 16])
def test_greedy_output_is_unchanged(target, tmp_path, batch) -> None:
    model, cm = target
    reqs = [(ids, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True).to_engine())
            for ids in prompts(batch, seed=130 + batch)]
    plain, _ = run(cm, reqs, max_num_seqs=batch)
    vocab = list(range(0, model.config.vocab_size, 3)) if batch == 4 else None  # a draft vocabulary too
    options = draft_options(target, tmp_path, seed=batch, draft_vocab=vocab)
    for length in (0, 4):
        spec, stats = run(cm, reqs, max_num_seqs=batch, spec_draft_length=length, spec_token_cost=0.2,
                          spec_draft_cost=0.05, **options)
        assert {k: c.tokens for k, c in spec.items()} == {k: c.tokens for k, c in plain.items()}
        assert stats["spec_draft_tokens"] > 0


def test_preemption_prefix_hits_sampling_and_forks(target, tmp_path) -> None:
    """A crowded workload (test_speculative.crowded_workload: the target preempts and recomputes,
    the draft's pool runs short too; prompts share cached pages, so the draft reads zeros for
    features the target never computed; sampling, n > 1): plain decoding's tokens."""
    _, cm = target
    reqs, small = crowded_workload(seed=140)
    plain, _ = run(cm, reqs, **small)
    spec, stats = run(cm, reqs, spec_draft_length=3, **small, **draft_options(target, tmp_path, kind="echo"))
    assert stats["preemptions"] > 0 and stats["spec_accepted_tokens"] > 0
    assert {k: c.tokens for k, c in spec.items()} == {k: c.tokens for k, c in plain.items()}


def test_sampled_tokens_follow_the_same_distribution(target, tmp_path) -> None:
    """As for the other modes (test_speculative.assert_sampling_unchanged): a two-sample
    chi-square test on the fourth sampled token, 3,000 draws a side, false-alarm rate 0.1%."""
    assert_sampling_unchanged(target[1], **draft_options(target, tmp_path, kind="echo"))


def test_eagle_through_the_async_engine(tmp_path) -> None:
    """--speculative-mode eagle --additional-models DIR: loaded, checked, greedy output kept."""
    model = load_model(tiny_models.tiny_model_dir("llama"))
    d = write_eagle(tmp_path / "eagle", model.config, draft_vocab=list(range(0, model.config.vocab_size, 2)))
    assert_async_engine_keeps_output("eagle", d, seed=150)
    with pytest.raises(ValueError, match="hidden size"):
        bad = write_eagle(tmp_path / "bad", model.config)
        with open(os.path.join(bad, "config.json"), "w") as f:
            json.dump({"architecture": "eagle", "hidden_size": 7, "vocab_size": model.config.vocab_size}, f)
        eagle_spec(model, bad)


def test_prompt_logprobs_with_long_prompts(target, tmp_path) -> None:
    """Prompt-logprob rows double as the draft's features (a prompt chunk asks for its rows once):
    prompts longer than a step's budget, with prompt logprobs, give plain decoding's tokens and
    prompt logprobs."""
    _, cm = target
    rng = np.random.default_rng(200)
    ps = [[int(t) for t in rng.integers(5, 300, 150)] for _ in range(3)]
    reqs = [(p, SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, prompt_logprobs=1).to_engine())
            for p in ps]
    plain, _ = run(cm, reqs, max_num_seqs=3)
    spec, stats = run(cm, reqs, max_num_seqs=3, spec_draft_length=2, **draft_options(target, tmp_path, kind="echo"))
    assert {k: c.tokens for k, c in spec.items()} == {k: c.tokens for k, c in plain.items()}
    assert {k: c.prompt_logprobs for k, c in spec.items()} == {k: c.prompt_logprobs for k, c in plain.items()}
    assert stats["spec_draft_tokens"] > 0
