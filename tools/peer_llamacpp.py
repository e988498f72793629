#!/usr/bin/env python3
"""llama.cpp as a measured peer: fetch its sources (vendored in llama-cpp-python's sdist on PyPI),
build llama-bench / llama-server / llama-quantize once outside the repo, and run them.

    python tools/peer_llamacpp.py build [--peer-dir /work/peer] [--jobs 2]
    python tools/peer_llamacpp.py where [--peer-dir /work/peer]

The peer lives in --peer-dir (default $PYSERVE_PEER_DIR or /work/peer), never in the checkout:
  src/       the sdist and its unpacked tree (vendor/llama.cpp)
  build/     the cmake build (bin/llama-bench, bin/llama-server, bin/llama-quantize)
  models/    GGUF files the benchmarks make (tools/make_bench_models.py)
Every step is idempotent: a built peer is reused as it is.

The build is llama.cpp's own best CPU configuration (GGML_NATIVE=ON: it is the peer's code, not
ours), minus AMX, whose code dies on the Intel VMs this project runs on.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

log = logging.getLogger("peer_llamacpp")

TARGETS = ("llama-bench", "llama-server", "llama-quantize")
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


def default_peer_dir() -> str:
    return os.environ.get("PYSERVE_PEER_DIR", "/work/peer")


def add_peer_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--peer-dir", default=default_peer_dir(),
                    help="where llama.cpp is fetched, built and its models cached (default: %(default)s)")
    ap.add_argument("--jobs", type=int, default=2, help="parallel build jobs for a first build")


def source_dir(peer_dir: str) -> str | None:
    """The unpacked vendor/llama.cpp tree, or None before ensure_source."""
    hits = sorted(glob.glob(os.path.join(peer_dir, "src", "llama_cpp_python-*", "vendor", "llama.cpp")))
    return hits[-1] if hits else None


def ensure_source(peer_dir: str) -> str:
    """Download llama-cpp-python's sdist with pip (the registry's ordinary client) and unpack it."""
    found = source_dir(peer_dir)
    if found and os.path.exists(os.path.join(found, "CMakeLists.txt")):
        return found
    src = os.path.join(peer_dir, "src")
    os.makedirs(src, exist_ok=True)
    sdists = sorted(glob.glob(os.path.join(src, "llama_cpp_python-*.tar.gz")))
    if not sdists:
        # --no-build-isolation: pip only reads the sdist's metadata, with the installed scikit-build-core.
        log.info("downloading llama-cpp-python's sdist into %s", src)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        "--no-build-isolation", "llama-cpp-python", "-d", src], check=True)
        sdists = sorted(glob.glob(os.path.join(src, "llama_cpp_python-*.tar.gz")))
    log.info("unpacking %s", sdists[-1])
    with tarfile.open(sdists[-1]) as tf:
        tf.extractall(src, filter="data")
    found = source_dir(peer_dir)
    if not found:
        raise RuntimeError(f"{sdists[-1]} has no vendor/llama.cpp")
    return found


def bin_dir(peer_dir: str) -> str:
    return os.path.join(peer_dir, "build", "bin")


def binary(name: str, peer_dir: str) -> str:
    path = os.path.join(bin_dir(peer_dir), name)
    if not os.access(path, os.X_OK):
        raise FileNotFoundError(f"{path} is not built: run python tools/peer_llamacpp.py build --peer-dir {peer_dir}")
    return path


def is_built(peer_dir: str) -> bool:
    return all(os.access(os.path.join(bin_dir(peer_dir), t), os.X_OK) for t in TARGETS)


def ensure_built(peer_dir: str, jobs: int = 2) -> str:
    """Configure and build the three targets once; returns the bin directory."""
    if is_built(peer_dir):
        return bin_dir(peer_dir)
    src = ensure_source(peer_dir)
    build = os.path.join(peer_dir, "build")
    if not os.path.exists(os.path.join(build, "CMakeCache.txt")):
        gen = ["-G", "Ninja"] if shutil.which("ninja") else []
        subprocess.run(["cmake", "-S", src, "-B", build, *gen,
                        "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF",
                        "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                        f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}"], check=True)
    log.info("building %s with %d jobs (about five minutes on 2 cores)", ", ".join(TARGETS), jobs)
    subprocess.run(["cmake", "--build", build, "--config", "Release", "-j", str(jobs),
                    "--target", *TARGETS], check=True)
    return bin_dir(peer_dir)


def convert_script(peer_dir: str) -> str:
    """llama.cpp's convert_hf_to_gguf.py (needs the sdist's gguf-py on sys.path to match its version)."""
    return os.path.join(ensure_source(peer_dir), "convert_hf_to_gguf.py")


def quantize(src: str, dst: str, qtype: str, peer_dir: str, threads: int = 2, pure: bool = False) -> str:
    """llama-quantize SRC DST TYPE, skipped when DST exists; written to a temp name then renamed.
    pure: every matrix in qtype (by default llama-quantize keeps output.weight at Q6_K for Q4_0)."""
    if os.path.exists(dst):
        return dst
    tmp = dst + ".part"
    subprocess.run([binary("llama-quantize", peer_dir), *(["--pure"] if pure else []), src, tmp, qtype, str(threads)],
                   check=True, stdout=subprocess.DEVNULL)
    os.replace(tmp, dst)
    return dst


def version(peer_dir: str) -> str:
    """The llama-cpp-python release whose vendored llama.cpp we built."""
    src = source_dir(peer_dir) or ""
    return os.path.basename(os.path.dirname(os.path.dirname(src))) or "unknown"


@dataclass
class BenchResult:
    prefill: float      # tok/s, median over repetitions (llama-bench's avg_ts is a mean; we take its samples)
    decode: float
    raw: list[dict]


def llama_bench(model: str, threads: int, n_prompt: int, n_gen: int, repeats: int, peer_dir: str,
                timeout: float = 1800) -> BenchResult:
    """llama-bench -p N -n M -t T -r R -o json: medians of its per-repetition samples."""
    out = subprocess.run([binary("llama-bench", peer_dir), "-m", model, "-p", str(n_prompt), "-n", str(n_gen),
                          "-t", str(threads), "-r", str(repeats), "-o", "json"],
                         check=True, capture_output=True, text=True, timeout=timeout)
    rows = json.loads(out.stdout)
    prefill = decode = float("nan")
    for row in rows:
        samples = sorted(row.get("samples_ts") or [row["avg_ts"]])
        med = samples[len(samples) // 2] if len(samples) % 2 else sum(samples[len(samples) // 2 - 1:len(samples) // 2 + 1]) / 2
        if row.get("n_prompt", 0) > 0 and row.get("n_gen", 0) == 0:
            prefill = med
        elif row.get("n_gen", 0) > 0 and row.get("n_prompt", 0) == 0:
            decode = med
    return BenchResult(prefill, decode, rows)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    proc: subprocess.Popen

    def post(self, route: str, body: dict, timeout: float = 120) -> dict:
        req = urllib.request.Request(self.url + route, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())


@contextlib.contextmanager
def llama_server(model: str, peer_dir: str, threads: int = 2, ctx: int = 2048,
                 extra: tuple[str, ...] = (), start_timeout: float = 120, slots: int = 1) -> Iterator[Server]:
    """A llama-server on 127.0.0.1 (a free port), `slots` parallel sequences sharing a context of
    `ctx` tokens (-np, -c), stopped on exit."""
    port = _free_port()
    cmd = [binary("llama-server", peer_dir), "-m", model, "--host", "127.0.0.1", "--port", str(port),
           "-t", str(threads), "-c", str(ctx), "-np", str(slots), *extra]
    # Its log goes to a file: a pipe nobody drains fills up and blocks the server mid-request.
    os.makedirs(os.path.join(peer_dir, "logs"), exist_ok=True)
    log_path = os.path.join(peer_dir, "logs", f"llama-server-{port}.log")
    log_file = open(log_path, "w")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            if proc.poll() is not None:
                with open(log_path) as f:
                    raise RuntimeError(f"llama-server exited {proc.returncode}: {f.read()[-2000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"llama-server not healthy after {start_timeout}s")
            time.sleep(0.2)   # polling a child process's readiness, not standing in for a sync
        yield Server(url, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log_file.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["build", "where"])
    add_peer_args(ap)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "build":
        ensure_built(args.peer_dir, args.jobs)
    for t in TARGETS:
        path = os.path.join(bin_dir(args.peer_dir), t)
        print(f"{t}: {path if os.access(path, os.X_OK) else '(not built)'}")
    print(f"source: {source_dir(args.peer_dir) or '(not fetched)'}  ({version(args.peer_dir)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
