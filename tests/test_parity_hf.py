"""Our engine against transformers on tiny random-initialised checkpoints (Llama with llama3 rope
scaling and tied embeddings, Mistral with a sliding window shorter than the prompt, Qwen2 with
q/k/v biases), stored as float32, float16 and bfloat16. The reference is transformers in float32
on the same stored weights."""

from __future__ import annotations

import zlib

import anyio
import numpy as np
import pytest
import torch

import tiny_models
from engine_helpers import assert_logits_close, c_model, engine_greedy, our_logits
from pyserve.model.loader import load_model

MAKERS = {"llama": tiny_models.make_llama, "mistral": tiny_models.make_mistral, "qwen2": tiny_models.make_qwen2}
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    cache: dict[tuple[str, str], str] = {}

    def get(arch: str, dtype: str) -> str:
        if (arch, dtype) not in cache:
            d = tmp_path_factory.mktemp(f"{arch}-{dtype}")
            cache[(arch, dtype)] = MAKERS[arch](d, dtype=DTYPES[dtype])
        return cache[(arch, dtype)]

    return get


def hf_reference(path: str):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    return m.eval()


def hf_logits(hf, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float().numpy()


def random_prompt(vocab: int, n: int, seed: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(3, vocab, n)]


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_prefill_and_decode_logits_match_transformers(model_dirs, arch: str, dtype: str) -> None:
    path = model_dirs(arch, dtype)
    model = load_model(path)
    hf = hf_reference(path)
    prompt = random_prompt(model.config.vocab_size, 64, seed=zlib.crc32(f"{arch}/{dtype}".encode()) % 1000)  # hash() changes with PYTHONHASHSEED
    # Continue with HF's own greedy choices so both sides see the same sequence.
    seq = list(prompt)
    for _ in range(16):
        seq.append(int(hf_logits(hf, seq)[-1].argmax()))
    ref = hf_logits(hf, seq)
    ours = our_logits(c_model(model), prompt, seq[len(prompt):])
    assert_logits_close(ours, ref)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_scalar_kernels_give_the_same_logits(model_dirs, arch: str) -> None:
    model = load_model(model_dirs(arch, "f32"))
    prompt = random_prompt(model.config.vocab_size, 40, seed=7)
    fast = our_logits(c_model(model), prompt, prompt[:4])
    ref = our_logits(c_model(model, isa="scalar"), prompt, prompt[:4])
    assert_logits_close(fast, ref, rel=1e-5)




@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_greedy_generation_matches_transformers_generate(model_dirs, arch: str) -> None:
    path = model_dirs(arch, "f32")
    model = load_model(path)
    hf = hf_reference(path)
    prompts = [random_prompt(model.config.vocab_size, n, seed=n) for n in (5, 23, 40)]
    ours = anyio.run(lambda: engine_greedy(path, prompts, 32, kv_cache_tokens=2048, max_num_sequence=4))
    eos = set(model.config.eos_token_ids)
    for ids, got in zip(prompts, ours):
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=sorted(eos) or None,
                              pad_token_id=0)
        want = out[0, len(ids):].tolist()
        assert got == want
