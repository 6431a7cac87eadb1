#!/usr/bin/env bash
# What a session with a lent GPU runs, one step per device-tool call (each call is limited to 10 minutes,
# and a warm machine keeps the in-place build between calls):
#   benchmarks/gpu_session.sh build        the package, with the CUDA module for this GPU's arch only
#   benchmarks/gpu_session.sh tests        the test suite without the CUDA kernels
#   benchmarks/gpu_session.sh tests-cuda   the CUDA kernels' tests, in a process of their own (a fault
#                                          poisons the CUDA context of its whole process)
#   benchmarks/gpu_session.sh accept       the acceptance shapes of the Triton and CUDA issues
#   benchmarks/gpu_session.sh sweep        the rest of the cross-entropy suite
#   benchmarks/gpu_session.sh linear       the fused linear + cross-entropy suite
#   benchmarks/gpu_session.sh quickcheck   the independent timing check
# Results land in ${OUT:-benchmarks/out}/<step>/; commit the JSON and plots under
# benchmarks/results/<gpu>-<date>/. Liger-Kernel is not on the GPU machine: bring its wheel in .whl/
# (see the device tool's README) and each step installs it first.
set -euo pipefail
cd "$(dirname "$0")/.."
step=${1:?usage: benchmarks/gpu_session.sh build|tests|tests-cuda|accept|sweep|linear|quickcheck}
out=${OUT:-benchmarks/out}/$step
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
# every provider but the CUDA kernels, for a second try when they fail
without_cuda=fusedce-triton,fusedce-torch,unfused,torch,torch-compile,liger

bench() {  # bench DIR ARGS...: the suite with every provider, then without the CUDA kernels if that failed
  local dir=$1
  shift
  mkdir -p "$dir"
  python3 -m benchmarks --device cuda --out "$dir" "$@" 2>&1 | tee -a "$dir/log.txt" ||
    python3 -m benchmarks --device cuda --out "$dir" --providers "$without_cuda" "$@" 2>&1 | tee -a "$dir/log.txt"
}

case $step in
  build)
    nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv | tee "$out/gpu.txt"
    arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d .)
    FUSEDCE_BUILD_CUDA=1 FUSEDCE_CUDA_ARCHS=$arch python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 |
      tail -n 3 ;;
  tests) python3 -m pytest tests -q -k "not cuda" 2>&1 | tee "$out/log.txt" | tail -n 15 ;;
  tests-cuda) python3 -m pytest tests -q -k cuda 2>&1 | tee "$out/log.txt" | tail -n 25 ;;
  accept)
    bench "$out/bf16" --shapes 8192x128256,1024x262144 --dtypes bfloat16
    bench "$out/fp32" --shapes 16384x32000 --dtypes float32 ;;
  sweep) bench "$out" --shapes 4096x32000,4096x128256,4096x256000,16384x128256,32768x32000 ;;
  linear) python3 -m benchmarks --suite linear --device cuda --out "$out" 2>&1 | tee "$out/log.txt" ;;
  quickcheck)
    for shape_dtype in 8192x128256:bfloat16 16384x32000:float32; do
      python3 -m benchmarks.quickcheck --device cuda --shape "${shape_dtype%%:*}" --dtype "${shape_dtype##*:}" |
        tee -a "$out/quickcheck.txt"
    done ;;
  *) echo "unknown step $step" >&2; exit 2 ;;
esac
