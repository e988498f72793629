"""Compiles every GPU source (csrc/backend/cuda/*.cu) with nvcc for sm_80 + sm_90 and with hipcc
for gfx90a, warnings as errors, without a GPU: the check CI runs on every commit
(tests/test_gpu_build.py), and what a developer runs after touching a kernel.

    python tools/gpu_compile.py                 # every .cu, both compilers
    python tools/gpu_compile.py --compiler nvcc csrc/backend/cuda/norm.cu

Each file is compiled once per compiler (both NVIDIA architectures in one nvcc call). Objects go
to a temporary directory and are thrown away: the installed extension is built by CMake
(PYSERVE_CUDA=1 / PYSERVE_HIP=1 pip install .).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GPU_DIR = ROOT / "csrc" / "backend" / "cuda"
NVCC_ARCHS = ("80", "90")
HIP_ARCH = "gfx90a"


def sources() -> list[Path]:
    return sorted(GPU_DIR.glob("*.cu"))


def _includes() -> list[str]:
    import pybind11

    return ["-I", str(ROOT / "csrc"), "-I", pybind11.get_include(), "-I", sysconfig.get_paths()["include"]]


def find(compiler: str) -> str | None:
    return shutil.which(compiler)


def command(compiler: str, source: Path, obj: Path) -> tuple[list[str], dict[str, str]]:
    env = dict(os.environ)
    if compiler == "nvcc":
        cmd = ["nvcc", "-std=c++17", "-O2", "--expt-relaxed-constexpr", "-Werror", "all-warnings",
               "-Xcompiler", "-Wall,-Wextra,-Wno-unused-parameter,-fPIC"]
        for arch in NVCC_ARCHS:
            cmd += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    elif compiler == "hipcc":
        env["HIP_PLATFORM"] = "amd"
        cmd = ["hipcc", "-std=c++17", "-O2", "-x", "hip", f"--offload-arch={HIP_ARCH}", "-fPIC",
               "-Wall", "-Wextra", "-Wno-unused-parameter", "-Werror"]
    else:
        raise ValueError(f"unknown compiler {compiler!r} (nvcc | hipcc)")
    return cmd + _includes() + ["-c", str(source), "-o", str(obj)], env


def compile_one(compiler: str, source: Path, workdir: Path) -> subprocess.CompletedProcess:
    cmd, env = command(compiler, source, workdir / (source.stem + f".{compiler}.o"))
    return subprocess.run(cmd, env=env, capture_output=True, text=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="*", type=Path, help="sources (default: every csrc/backend/cuda/*.cu)")
    p.add_argument("--compiler", choices=("nvcc", "hipcc", "both"), default="both")
    args = p.parse_args()
    files = [f.resolve() for f in args.files] or sources()
    compilers = ("nvcc", "hipcc") if args.compiler == "both" else (args.compiler,)
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for compiler in compilers:
            if not find(compiler):
                print(f"{compiler}: not found", file=sys.stderr)
                failed += 1
                continue
            for f in files:
                t0 = time.perf_counter()
                r = compile_one(compiler, f, Path(tmp))
                status = "ok" if r.returncode == 0 else "FAILED"
                print(f"{compiler:5s} {f.relative_to(ROOT)}: {status} ({time.perf_counter() - t0:.1f} s)")
                if r.returncode != 0:
                    failed += 1
                    print(r.stdout + r.stderr, file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
