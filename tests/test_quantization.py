"""`--quantization` (MLC's schemes applied to a HF checkpoint at load): the group quantizer against
MLC's formula, the blocks it hands the engine, and the engine's logits against transformers
running the very weights each scheme leaves (so the only differences are arithmetic: none for the
float schemes, the int16 activation step for the integer ones)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny_models
from engine_helpers import QUANTIZED_REL, assert_logits_close, c_model, our_logits
from pyserve import cli
from pyserve.model.errors import ModelLoadError
from pyserve.model.loader import default_model_path, load_model
from pyserve.model.quantize import SCHEMES, group_quantize, quantize_model


def mlc_reference(w: np.ndarray, bits: int) -> np.ndarray:
    """MLC's GroupQuantize round trip, written out in float64 from its definition."""
    max_int = 2 ** (bits - 1) - 1
    g = w.astype(np.float64).reshape(w.shape[0], -1, 32)
    scale = (np.maximum(np.abs(g).max(axis=2), 1e-4) / max_int).astype(np.float16).astype(np.float64)
    q = np.clip(np.rint(g / scale[..., None]) + max_int, 0, 2 * max_int)
    return ((q - max_int) * scale[..., None]).reshape(w.shape)


@pytest.mark.parametrize("bits", [4, 8])
def test_group_quantize_is_mlcs_scheme(bits: int) -> None:
    rng = np.random.default_rng(bits)
    w = rng.standard_normal((7, 96)).astype(np.float32)
    w[0, :32] = 0.0  # an all-zero group: the 1e-4 floor keeps the scale finite
    codes, scale = group_quantize(w, bits)
    max_int = 2 ** (bits - 1) - 1
    assert codes.min() >= 0 and codes.max() <= 2 * max_int and scale.dtype == np.float16
    ours = ((codes.astype(np.float64) - max_int) * scale.astype(np.float64)[..., None]).reshape(w.shape)
    # float32 division may round a value sitting on a .5 boundary the other way: at most one code.
    ref = mlc_reference(w, bits)
    step = np.repeat(scale.astype(np.float64), 32, axis=1)
    assert np.all(np.abs(ours - ref) <= step * 1.0001)
    assert np.mean(ours == ref) > 0.999
    assert np.all(np.abs(ours - w) <= step / 2 * 1.0001)  # within half a step of the weights


@pytest.fixture(scope="module")
def llama_dir() -> str:
    return tiny_models.tiny_model_dir("llama")


def hf_with_weights(path: str, model) -> torch.nn.Module:
    """transformers in float32 with every matrix replaced by what the scheme left in `model`."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    params = dict(hf.named_parameters())
    for name, rec in model.tensors.items():
        if len(rec.shape) == 2 and name in params:
            params[name].data = torch.from_numpy(rec.to_float32().reshape(rec.shape).copy())
    return hf


@pytest.mark.parametrize("scheme", SCHEMES)
def test_engine_runs_each_scheme_like_transformers_on_the_same_weights(llama_dir: str, scheme: str) -> None:
    model = load_model(llama_dir)
    original = {n: r.to_float32() for n, r in model.tensors.items() if len(r.shape) == 2}
    quantize_model(model, scheme)
    fmt = {"q0f32": "f32", "q0f16": "f16", "q0bf16": "bf16", "q8f16_1": "q8_0", "q4f16_1": "q4_0"}[scheme]
    assert {r.format for r in model.tensors.values() if len(r.shape) == 2} == {fmt}
    changed = max(float(np.abs(model.tensors[n].to_float32() - w).max()) for n, w in original.items())
    assert (changed == 0.0) == (scheme == "q0f32")  # every other scheme really rounds the weights
    hf = hf_with_weights(llama_dir, model)
    prompt = [int(t) for t in np.random.default_rng(3).integers(3, model.config.vocab_size, 40)]
    cont = prompt[:6]
    with torch.no_grad():
        ref = hf(torch.tensor([prompt + cont])).logits[0].numpy()
    ours = our_logits(c_model(model), prompt, cont)
    assert_logits_close(ours, ref, rel=QUANTIZED_REL if scheme.startswith(("q4", "q8")) else 1e-4)


def test_quantized_matrices_are_smaller(llama_dir: str) -> None:
    sizes = {}
    for scheme in ("q0f32", "q0bf16", "q8f16_1", "q4f16_1"):
        model = load_model(llama_dir)
        quantize_model(model, scheme)
        sizes[scheme] = sum(r.nbytes for r in model.tensors.values() if len(r.shape) == 2)
    assert sizes["q0bf16"] * 2 == sizes["q0f32"]
    assert sizes["q8f16_1"] == sizes["q0f32"] * 34 // (32 * 4)
    assert sizes["q4f16_1"] == sizes["q0f32"] * 18 // (32 * 4)


def test_gguf_files_and_unknown_schemes_are_refused() -> None:
    gguf = load_model(default_model_path(), load_tensors=False)
    with pytest.raises(ModelLoadError, match="applies to HF checkpoints"):
        quantize_model(gguf, "q4f16_1")
    with pytest.raises(ModelLoadError, match="unknown --quantization 'q3f16_0'"):
        quantize_model(gguf, "q3f16_0")


def test_cli_offers_exactly_the_schemes() -> None:
    assert cli.QUANTIZATION_SCHEMES == SCHEMES
    args = cli.build_parser().parse_args(["m", "--quantization", "q4f16_1"])
    assert args.quantization == "q4f16_1"
