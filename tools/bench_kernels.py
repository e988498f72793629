#!/usr/bin/env python3
"""CPU kernel benchmark: the matmul of every weight format (packed float32; GGUF Q4_0 / Q4_1 / Q8_0
blocks read in place) and every ISA this CPU has, at the default model's shapes, printed against the
machine's ceilings measured in the same run.

Decode (m = 1) reads each weight once per token: it is memory-bound, so it is reported as GB/s
against a streaming-read ceiling, with the weights cold (the calls rotate through 256 MiB of
copies, as a decode step walks through the whole model). Prefill (m = 512) reuses each weight
across tokens: it is compute-bound, reported as GFLOP/s against a nominal FMA peak of 2 FMA units x
vector lanes x 2 FLOP x clock (clock from /proc/cpuinfo). CPUs that split 512-bit FMAs into two
256-bit halves (AMD Zen 4) reach at most half the nominal AVX-512 peak.

    python tools/bench_kernels.py [--threads N] [--formats f32,q4_1,q8_0,q4_0] [--isas avx512]
"""

from __future__ import annotations

import argparse
import os

from pyserve import _C

# (name, rows n, cols k) of SmolLM2-135M's matrices: fused q|k|v, o, fused gate|up, down, LM head.
SHAPES = [("qkv", 960, 576), ("o", 576, 576), ("gate_up", 3072, 576), ("down", 576, 1536), ("lm_head", 49152, 576)]
LANES = {"scalar": 1, "avx2": 8, "avx512": 16}
# Bytes per weight of each format (blocks of 32: 18, 20 and 34 bytes).
BYTES_PER_WEIGHT = {"f32": 4.0, "q4_0": 18 / 32, "q4_1": 20 / 32, "q8_0": 34 / 32}


def cpu_mhz() -> float:
    try:
        with open("/proc/cpuinfo") as f:
            return max(float(line.split(":")[1]) for line in f if line.startswith("cpu MHz"))
    except (OSError, ValueError):
        return float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--formats", default="f32,q4_1,q8_0,q4_0")
    ap.add_argument("--isas", default=None, help="comma-separated (default: every ISA this CPU has)")
    args = ap.parse_args()
    t = args.threads
    isas = ["scalar"] + [i for i in ("avx2", "avx512") if _C.cpu_features()[i]]
    if args.isas:
        isas = [i for i in args.isas.split(",") if i in isas]
    formats = args.formats.split(",")
    ceiling = _C.kernels.read_bandwidth_gbps(1 << 30, t)  # remeasured at the end; the higher counts
    mhz = cpu_mhz()
    print(f"threads {t}; read ceiling {ceiling:.1f} GB/s; clock {mhz:.0f} MHz; cpu {_C.cpu_features()}")
    print()
    rows = []
    for name, n, k in SHAPES:
        for fmt in formats:
            for isa in isas:
                dec = _C.kernels.bench_gemm(n, k, 1, isa, t, repeats=3, cold=True, format=fmt)
                m = 512 if isa != "scalar" else 64
                pre = _C.kernels.bench_gemm(n, k, m, isa, t, repeats=3, format=fmt)
                rows.append((name, n, k, fmt, isa, n * k * BYTES_PER_WEIGHT[fmt] / dec / 1e9, 2 * m * n * k / pre / 1e9))
    ceiling = max(ceiling, _C.kernels.read_bandwidth_gbps(1 << 30, t))
    print(f"read ceiling (higher of before and after): {ceiling:.1f} GB/s")
    print("| matrix  | n x k        | format | ISA    | decode GB/s | % of ceiling | prefill GFLOP/s | % of FMA peak |")
    print("|---------|--------------|--------|--------|------------:|-------------:|----------------:|--------------:|")
    for name, n, k, fmt, isa, gbps, gflops in rows:
        peak = 2 * LANES[isa] * 2 * mhz / 1e3 * t
        print(f"| {name:7s} | {n:5d} x {k:4d} | {fmt:6s} | {isa:6s} | {gbps:11.1f} | {100 * gbps / ceiling:11.0f}% "
              f"| {gflops:15.1f} | {100 * gflops / peak:12.0f}% |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
