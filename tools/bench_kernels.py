#!/usr/bin/env python3
"""CPU kernel benchmark: the matmul of every weight format (packed float32; GGUF blocks as quant
panels) and every ISA this CPU has, at a model's shapes, printed against the machine's ceilings
measured in the same run.

Decode (m = 1) reads each weight once per token: it is memory-bound, so it is reported as GB/s of
the bytes the backend actually reads (`_C.kernels.packed_bytes`) against a streaming-read ceiling,
with the weights cold (the calls rotate through 256 MiB of copies, as a decode step walks through
the whole model). Prefill (m = 512) reuses each weight across tokens: it is compute-bound, reported
as GFLOP/s (2 m n k / s, whatever the arithmetic inside) against a nominal float32 FMA peak of 2
FMA units x vector lanes x 2 FLOP x clock (clock from /proc/cpuinfo). CPUs that split 512-bit
instructions into two 256-bit halves (AMD Zen 4) reach at most half the nominal AVX-512 peak; the
int16 quant-panel kernels do 2 multiply-adds per 32-bit lane, so they can pass 100%.

    python tools/bench_kernels.py [--shapes smollm2|tinyllama] [--threads N]
                                  [--formats f32,q4_1,q8_0,q4_0,q4_k,q6_k] [--isas avx512_vnni]
"""

from __future__ import annotations

import argparse
import os

from pyserve import _C

# (name, rows n, cols k): fused q|k|v, o, fused gate|up, down, LM head.
SHAPES = {
    "smollm2": [("qkv", 960, 576), ("o", 576, 576), ("gate_up", 3072, 576), ("down", 576, 1536),
                ("lm_head", 49152, 576)],
    "tinyllama": [("qkv", 2560, 2048), ("o", 2048, 2048), ("gate_up", 11264, 2048), ("down", 2048, 5632),
                  ("lm_head", 32000, 2048)],
}
LANES = {"scalar": 1, "avx2": 8, "avx512": 16, "avx512_vnni": 16}


def cpu_mhz() -> float:
    try:
        with open("/proc/cpuinfo") as f:
            return max(float(line.split(":")[1]) for line in f if line.startswith("cpu MHz"))
    except (OSError, ValueError):
        return float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", choices=sorted(SHAPES), default="smollm2")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--formats", default="f32,q4_1,q8_0,q4_0,q4_k,q6_k")
    ap.add_argument("--isas", default=None, help="comma-separated (default: every ISA this CPU has)")
    ap.add_argument("--prefill", type=int, default=512, help="m of the prefill-shaped call")
    args = ap.parse_args()
    t = args.threads
    feats = _C.cpu_features()
    isas = ["scalar"] + [i for i in ("avx2", "avx512", "avx512_vnni") if feats[i]]
    if args.isas:
        isas = [i for i in args.isas.split(",") if i in isas]
    formats = args.formats.split(",")
    ceiling = _C.kernels.read_bandwidth_gbps(1 << 30, t)  # remeasured at the end; the higher counts
    mhz = cpu_mhz()
    print(f"threads {t}; read ceiling {ceiling:.1f} GB/s; clock {mhz:.0f} MHz; cpu {feats}")
    print()
    rows = []
    for name, n, k in SHAPES[args.shapes]:
        for fmt in formats:
            nbytes = _C.kernels.packed_bytes(fmt, n, k)
            for isa in isas:
                dec = _C.kernels.bench_gemm(n, k, 1, isa, t, repeats=3, cold=True, format=fmt)
                m = args.prefill if isa != "scalar" else 16
                pre = _C.kernels.bench_gemm(n, k, m, isa, t, repeats=3, format=fmt)
                rows.append((name, n, k, fmt, isa, nbytes / (n * k), nbytes / dec / 1e9, 2 * m * n * k / pre / 1e9))
    ceiling = max(ceiling, _C.kernels.read_bandwidth_gbps(1 << 30, t))
    print(f"read ceiling (higher of before and after): {ceiling:.1f} GB/s")
    print("| matrix  | n x k        | format | bytes/w | ISA         | decode GB/s | % of ceiling | prefill GFLOP/s | % of FMA peak |")
    print("|---------|--------------|--------|--------:|-------------|------------:|-------------:|----------------:|--------------:|")
    for name, n, k, fmt, isa, bpw, gbps, gflops in rows:
        peak = 2 * LANES[isa] * 2 * mhz / 1e3 * t
        print(f"| {name:7s} | {n:5d} x {k:4d} | {fmt:6s} | {bpw:7.3f} | {isa:11s} | {gbps:11.1f} | "
              f"{100 * gbps / ceiling:11.0f}% | {gflops:15.1f} | {100 * gflops / peak:12.0f}% |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
