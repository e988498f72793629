"""The engine on a GPU (`--device cuda` / `rocm`): the device backend's forward pass against the
CPU backend's on the same weights (float32 HF checkpoints, GGUF F16 / BF16 / Q8_0 / Q4_0 / Q4_1,
the default model, a tiny Gemma 3, and the real Gemma 3 270M Q4_K_M file whose q|k|v mix
formats), greedy output through the batching engine equal to the CPU's, and the real server on
the device through the OpenAI SDK."""
from __future__ import annotations

import anyio
import numpy as np
import pytest

from engine_helpers import QUANTIZED_REL, assert_logits_close, engine_greedy, our_logits
from pyserve import _C
from pyserve.engine.native import native_model
from pyserve.model.loader import ModelLoadError, load_model
from pyserve.model.loader import default_model_path as _default_model_path
from tiny_models import tiny_gguf, tiny_model_dir

GPU = next((d for d in _C.devices() if d != "cpu"), "cuda")


def default_model_path() -> str:
    """The default model, or a skip where it is not installed (the device machines cannot fetch
    it, and it is too large to carry there)."""
    try:
        return _default_model_path()
    except ModelLoadError as e:
        pytest.skip(str(e))


def _models() -> list:
    return [
        pytest.param(lambda: tiny_model_dir("llama"), 1e-4, id="hf-llama-f32"),
        pytest.param(lambda: tiny_model_dir("qwen2"), 1e-4, id="hf-qwen2-f32-bias"),
        pytest.param(lambda: tiny_gguf("llama", "F16"), 1e-4, id="gguf-f16"),
        pytest.param(lambda: tiny_gguf("llama", "BF16"), 1e-4, id="gguf-bf16"),
        pytest.param(lambda: tiny_gguf("llama", "Q8_0"), QUANTIZED_REL, id="gguf-q8_0"),
        pytest.param(lambda: tiny_gguf("llama", "Q4_0"), QUANTIZED_REL, id="gguf-q4_0"),
        pytest.param(default_model_path, QUANTIZED_REL, id="default-q4_1"),
    ]


def _logits(path: str, device: str, prompt: list[int], cont: list[int]) -> np.ndarray:
    model = load_model(path)
    return our_logits(native_model(model, 2, device=device), prompt, cont)


@pytest.mark.parametrize("path, rel", _models())
def test_forward_matches_the_cpu_backend(path, rel, rng) -> None:
    # A 37-token prefill (crosses pages of 16) and 12 decode steps.
    p = path()
    vocab = load_model(p).config.vocab_size
    prompt = rng.integers(3, vocab, 37).tolist()
    cont = rng.integers(3, vocab, 12).tolist()
    ours = _logits(p, GPU, prompt, cont)
    ref = _logits(p, "cpu", prompt, cont)
    # Quantized weights: the CPU rounds activations to int16 per 32 values, the device kernels may
    # not; both stay within the parity bound against float32 (tests/test_parity_gguf.py).
    assert_logits_close(ours, ref, rel=rel)


def test_tiny_gemma3_forward_matches_the_cpu_backend(rng, tmp_path) -> None:
    from test_gemma3 import make_gemma3  # sliding-window layers, q/k norms, GeGLU, scaled embeddings

    p = make_gemma3(tmp_path / "gemma3")
    vocab = load_model(p).config.vocab_size
    prompt = rng.integers(3, vocab, 70).tolist()
    cont = rng.integers(3, vocab, 8).tolist()
    assert_logits_close(_logits(p, GPU, prompt, cont), _logits(p, "cpu", prompt, cont), rel=1e-4)


def test_gemma3_270m_q4_k_m_matches_the_cpu_backend(rng) -> None:
    """Q4_K, Q6_K, Q5_0, Q8_0 and F32 in one file; q|k|v of mixed formats (StackedWeights);
    head_dim 256 with one KV head; a 600-token prompt crosses the 512-token window."""
    from test_gemma3 import GEMMA_INSTALL, GEMMA_PACKAGE

    pkg = pytest.importorskip(GEMMA_PACKAGE, reason=f"Gemma 3 270M is not installed ({GEMMA_INSTALL})")
    p = str(pkg.assemble())
    vocab = load_model(p).config.vocab_size
    prompt = rng.integers(3, vocab, 600).tolist()
    cont = rng.integers(3, vocab, 6).tolist()
    assert_logits_close(_logits(p, GPU, prompt, cont), _logits(p, "cpu", prompt, cont), rel=QUANTIZED_REL)


def test_greedy_output_equals_the_cpu_backend_batched() -> None:
    """Twelve prompts batched together (decode batches, hybrid prefill, prefix-cache hits: the
    prompts share a prefix) on the default model: the device's greedy tokens are the CPU's."""
    path = default_model_path()
    tok = load_model(path).tokenizer
    prefix = tok.encode("You are a helpful assistant. Answer briefly.\n", add_special_tokens=False)
    prompts = [prefix + tok.encode(f"Question {i}: what is {i} times {i + 3}?", add_special_tokens=False)
               for i in range(12)]
    gpu = anyio.run(lambda: engine_greedy(path, prompts, 32, device=GPU, kv_cache_tokens=8192))
    cpu = anyio.run(lambda: engine_greedy(path, prompts, 32, device="cpu", kv_cache_tokens=8192))
    assert gpu == cpu


def test_greedy_output_equals_the_cpu_backend_on_a_tiny_model() -> None:
    """The same on a tiny Q8_0 file (runs where the default model is not installed)."""
    path = tiny_gguf("llama", "Q8_0")
    prompts = [[1, 5, 9, 13] * 4 + [20 + i, 30 + i] for i in range(12)]
    gpu = anyio.run(lambda: engine_greedy(path, prompts, 24, device=GPU, kv_cache_tokens=2048))
    cpu = anyio.run(lambda: engine_greedy(path, prompts, 24, device="cpu", kv_cache_tokens=2048))
    assert gpu == cpu


def test_preemption_on_the_device_keeps_output() -> None:
    """A cache too small for everyone: sequences are preempted and recomputed on the device, and
    the output is what a roomy cache gives."""
    path = tiny_gguf("llama", "Q8_0")
    prompts = [[5 + i, 9, 12 + i, 7] * 6 for i in range(8)]
    small = anyio.run(lambda: engine_greedy(path, prompts, 40, device=GPU, kv_cache_tokens=160,
                                            max_num_sequence=8))
    roomy = anyio.run(lambda: engine_greedy(path, prompts, 40, device=GPU, kv_cache_tokens=4096))
    assert small == roomy


def test_server_on_the_device_through_the_openai_sdk() -> None:
    from openai import OpenAI

    from server_process import running_server

    with running_server(default_model_path(), "--device", GPU) as url:
        client = OpenAI(base_url=url + "/v1", api_key="none")
        r = client.chat.completions.create(model="default", max_tokens=16, temperature=0,
                                           messages=[{"role": "user", "content": "Say hello."}])
        assert r.choices[0].message.content.strip() and r.usage.completion_tokens >= 1
        stream = client.chat.completions.create(model="default", max_tokens=16, temperature=0, stream=True,
                                                messages=[{"role": "user", "content": "Say hello."}])
        streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert streamed == r.choices[0].message.content


def test_ngram_speculation_on_the_device_keeps_greedy_output() -> None:
    """Prompt lookup verifies drafts in the device's forward pass (tree-free chains, rollback of
    rejected slots): the output is plain decoding's."""
    path = tiny_gguf("llama", "Q8_0")
    prompts = [[1, 5, 9, 13, 17, 21] * 5 + [40 + i] for i in range(6)]
    spec = anyio.run(lambda: engine_greedy(path, prompts, 32, device=GPU, kv_cache_tokens=2048,
                                           speculative_mode="ngram"))
    plain = anyio.run(lambda: engine_greedy(path, prompts, 32, device=GPU, kv_cache_tokens=2048))
    assert spec == plain


def test_eagle_and_medusa_are_refused_on_the_device(tmp_path) -> None:
    from pyserve.config import EngineConfig
    from pyserve.engine.async_engine import AsyncEngine

    for mode in ("eagle", "medusa"):
        with pytest.raises(ValueError, match="runs on the CPU only"):
            AsyncEngine(load_model(tiny_gguf("llama", "Q8_0")),
                        EngineConfig(device=GPU, speculative_mode=mode, additional_models=[str(tmp_path)]))
