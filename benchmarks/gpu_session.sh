#!/usr/bin/env bash
# What a session with a lent GPU runs, in one command (device time is scarce): build in place, the
# whole test suite on the GPU, then both benchmark suites and the independent check. Results land in
# ${OUT:-benchmarks/out}; commit the JSON and plots under benchmarks/results/<gpu>-<date>/.
# Liger-Kernel is not on the GPU machine: bring its wheel in .whl/ (see the device tool's README) and
# this script installs it first.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/out}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
# the CUDA module for this GPU only: every architecture would cost minutes of device time
arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d .)
FUSEDCE_BUILD_CUDA=1 FUSEDCE_CUDA_ARCHS=$arch python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -n 2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
# the CUDA kernels apart from the rest: a fault in one poisons the CUDA context of its whole process
python3 -m pytest tests -q -k "not cuda" 2>&1 | tee "$out/tests.log" | tail -n 5 || true
python3 -m pytest tests -q -k cuda 2>&1 | tee "$out/tests-cuda.log" | tail -n 5 || true
without_cuda=fusedce-triton,fusedce-torch,unfused,torch,torch-compile,liger
python3 -m benchmarks --device cuda --out "$out" 2>/dev/null | tee "$out/ce.txt" ||
  python3 -m benchmarks --device cuda --providers "$without_cuda" --out "$out" 2>/dev/null | tee "$out/ce.txt"
python3 -m benchmarks --suite linear --device cuda --out "$out" 2>/dev/null | tee "$out/linear.txt" || true
python3 -m benchmarks.quickcheck --device cuda --shape 8192x128256 --dtype bfloat16 | tee "$out/quickcheck.txt" || true
