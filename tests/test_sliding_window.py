"""Sliding windows and attention sinks (MLC's sliding_window_size / attention_sink_size
overrides): the model against transformers given the same attention mask, and the engine, which
releases a sequence's pages once its window has passed them, generating far past its KV cache.

The reference is transformers in float32 with an explicit 4D mask: a token at q attends to k when
k <= q and (k > q - window or k < sink)."""

from __future__ import annotations

import anyio
import numpy as np
import pytest
import torch

import tiny_models
from engine_helpers import assert_logits_close, c_model, engine_greedy, our_logits
from pyserve.config import ConfigError, EngineConfig, with_attention_overrides
from pyserve.model.loader import load_model


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    return tiny_models.make_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory) -> str:
    return tiny_models.make_mistral(tmp_path_factory.mktemp("mistral"))  # its own window: 16


def hf_model(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def window_mask(n: int, window: int, sink: int) -> torch.Tensor:
    q, k = torch.arange(n)[:, None], torch.arange(n)[None, :]
    ok = (k <= q) & ((k > q - window) | (k < sink))
    mask = torch.zeros(n, n)
    mask[~ok] = float("-inf")
    return mask[None, None]


def hf_logits(hf, ids: list[int], window: int, sink: int) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.tensor([ids]), attention_mask=window_mask(len(ids), window, sink)).logits[0].numpy()


def hf_greedy(hf, ids: list[int], n: int, window: int, sink: int) -> list[int]:
    seq = list(ids)
    for _ in range(n):
        seq.append(int(hf_logits(hf, seq, window, sink)[-1].argmax()))
    return seq[len(ids):]


def random_prompt(vocab: int, n: int, seed: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(3, vocab, n)]


def windowed(path: str, window: int | None, sink: int | None):
    model = load_model(path)
    model.config = with_attention_overrides(model.config, EngineConfig(sliding_window_size=window, attention_sink_size=sink))
    return model


@pytest.mark.parametrize("sink", [1, 4, 19])
def test_mistral_with_an_attention_sink_matches_transformers(mistral_dir, sink: int) -> None:
    model = windowed(mistral_dir, None, sink)
    assert (model.config.sliding_window, model.config.attention_sink) == (16, sink)
    hf = hf_model(mistral_dir)
    prompt = random_prompt(model.config.vocab_size, 50, seed=sink)
    seq = prompt + hf_greedy(hf, prompt, 12, 16, sink)
    ref = hf_logits(hf, seq, 16, sink)
    assert_logits_close(our_logits(c_model(model), prompt, seq[len(prompt):]), ref)
    # The sink really changes the answer past the window (so the parity is not vacuous).
    plain = hf_logits(hf, seq, 16, 0)
    assert np.abs(plain[16:] - ref[16:]).max() > 1e-2 * np.abs(ref).max()


def test_a_window_and_sink_set_on_a_model_without_one(llama_dir) -> None:
    """sliding_window_size on a Llama (no window of its own) makes every layer slide."""
    model = windowed(llama_dir, 24, 3)
    assert model.config.slides_everywhere()
    hf = hf_model(llama_dir)
    prompt = random_prompt(model.config.vocab_size, 60, seed=3)
    seq = prompt + hf_greedy(hf, prompt, 8, 24, 3)
    ours = our_logits(c_model(model), prompt, seq[len(prompt):])
    assert_logits_close(ours, hf_logits(hf, seq, 24, 3))
    assert_logits_close(our_logits(c_model(model, isa="scalar"), prompt, seq[len(prompt):]), ours, rel=1e-5)


def test_overrides_are_checked(llama_dir) -> None:
    model = load_model(llama_dir)
    with pytest.raises(ConfigError, match="needs a sliding window"):
        with_attention_overrides(model.config, EngineConfig(attention_sink_size=4))
    cfg = with_attention_overrides(model.config, EngineConfig(sliding_window_size=32))
    assert with_attention_overrides(cfg, EngineConfig(sliding_window_size=-1)).sliding_window is None


def test_the_engine_generates_far_past_its_cache(llama_dir) -> None:
    """Window 32 + sink 4 on a 128-token KV cache: three sequences batched together each reach
    230 tokens (more than the whole cache) with transformers' greedy tokens under the same mask,
    because pages wholly before the window are released as the sequences advance. The prefix
    cache on or off gives the same tokens."""
    window, sink, new = 32, 4, 200
    hf = hf_model(llama_dir)
    vocab = hf.config.vocab_size
    prompts = [random_prompt(vocab, n, seed=n) for n in (30, 9, 21)]
    prompts[2][:16] = prompts[0][:16]  # a shared page for the prefix cache
    kw = dict(kv_cache_tokens=128, max_num_sequence=3, sliding_window_size=window, attention_sink_size=sink,
              max_single_sequence_length=1024)
    got = anyio.run(lambda: engine_greedy(llama_dir, prompts, new, **kw))
    assert got == anyio.run(lambda: engine_greedy(llama_dir, prompts, new, prefix_cache_mode="disable", **kw))
    for ids, tokens in zip(prompts, got):
        assert len(ids) + len(tokens) > 128
        assert tokens == hf_greedy(hf, ids, new, window, sink)
