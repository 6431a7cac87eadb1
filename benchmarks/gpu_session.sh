#!/usr/bin/env bash
# A whole GPU session in one call of the device tool, which lends 15 minutes of device time (the
# machine's start included) and runs one command for 10 minutes at most. The steps run most important
# first, each stopped at its own time limit with SIGINT (pytest and the benchmarks then report and keep
# what they did), all within GPU_SESSION_SECONDS (default 540: call with timeout_s 590).
#
#   here, just before: benchmarks/gpu_prepare.sh     (wheels into .whl/, so nothing compiles there)
#   the device call:   bash benchmarks/gpu_session.sh                  with carry [".whl"]
#   a second call, with the minutes left on the warm machine (setup is needed each call, 5-10 s):
#                      GPU_SESSION_SECONDS=200 bash benchmarks/gpu_session.sh setup sweep linear
#
# Steps (default: setup tests accept quickcheck):
#   setup       installs .whl/; builds fusedce for this GPU instead when the carried wheel does not
#               import or lacks this GPU's architecture
#   tests       the suite on the GPU backends only (FUSEDCE_TEST_BACKENDS; CI runs the CPU ones): Triton and
#               pure torch, then the CUDA kernels in processes of their own (a fault poisons a process)
#   accept      the acceptance shapes of the Triton and CUDA issues, every provider, in one run
#   quickcheck  the independent timing check of the harness at two acceptance shapes
#   sweep       the rest of the cross-entropy suite's shapes, in bf16
#   linear      the fused linear + cross-entropy suite
# Results: $OUT/summary.txt (each step's tail, also printed) and $OUT/session.tar.gz (every log, JSON and
# plot; the device tool brings back 8 files at most). Commit the JSON and plots under
# benchmarks/results/<gpu>-<date>/.
set -uo pipefail  # no -e: a failed step must not cost the steps after it
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
start=$SECONDS
budget=${GPU_SESSION_SECONDS:-540}
out=${OUT:-benchmarks/out/gpu-session}
work=$(mktemp -d)
mkdir -p "$out"
exclude=""  # providers the benchmarks leave out: fusedce-cuda when its tests faulted or hung

report() {  # report LINE...: to the terminal and to summary.txt
  printf '%s\n' "$@" | tee -a "$out/summary.txt"
}

limited() {  # limited SECONDS LOG CMD...: CMD with SIGINT at SECONDS (or at the session's end, 20 s kept to pack)
  local seconds=$1 log=$2 t0=$SECONDS
  shift 2
  local left=$((budget - (SECONDS - start) - 20))
  ((seconds > left)) && seconds=$left
  if ((seconds < 10)); then
    report "skipped (no time left): $*"
    return 1
  fi
  timeout -s INT -k 20 "$seconds" "$@" >>"$log" 2>&1
  local rc=$?
  report "--- $* (rc $rc, $((SECONDS - t0)) s of $seconds)" "$(tail -n 12 "$log")"
  return $rc
}

bench() {  # bench NAME SECONDS ARGS...: the suite; when a provider's CUDA error ends the run (exit 3),
  local name=$1 seconds=$2 t0=$SECONDS lost  # the rest without that provider, in the time left
  shift 2
  mkdir -p "$work/$name"
  limited "$seconds" "$work/$name/log.txt" python3 -m benchmarks --device cuda --out "$work/$name" \
    ${exclude:+--exclude "$exclude"} "$@"
  if (($? == 3)); then
    lost=$(sed -n 's/.*CUDA context lost in provider \([^:]*\):.*/\1/p' "$work/$name/log.txt" | tail -n 1)
    [ -n "$lost" ] && limited $((seconds - (SECONDS - t0))) "$work/$name/log.txt" python3 -m benchmarks --device cuda \
      --out "$work/$name/without-$lost" --exclude "${exclude:+$exclude,}$lost" "$@"
  fi
}

setup() {
  nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap,clocks.max.sm,clocks.max.mem --format=csv \
    >"$work/gpu.txt" 2>&1
  report "$(cat "$work/gpu.txt")"
  local arch
  arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d .)
  if [ -f .whl/COMMIT ]; then export FUSEDCE_COMMIT; FUSEDCE_COMMIT=$(cat .whl/COMMIT); fi
  local wheel  # one at a time: a fusedce wheel this Python rejects must not keep Liger out
  for wheel in .whl/*.whl; do
    [ -f "$wheel" ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site "$wheel" 2>&1 | grep -v WARNING
  done
  export PYTHONPATH=/tmp/site
  if ! python3 -c "import sys, fusedce._cuda as c; sys.exit('sm_$arch' not in c.archs.split())" 2>/dev/null; then
    report "no carried fusedce for sm_$arch: building it here"
    mkdir -p /tmp/site-carried
    mv /tmp/site/fusedce* /tmp/site-carried/ 2>/dev/null  # kept for Triton if the build fails
    if ! FUSEDCE_BUILD_CUDA=1 FUSEDCE_CUDA_ARCHS=$arch timeout 240 python3 -m pip install -q --no-build-isolation \
      --no-deps -e . >"$work/build.log" 2>&1; then
      report "build failed: using the carried fusedce" "$(tail -n 20 "$work/build.log")"
      mv /tmp/site-carried/* /tmp/site/ 2>/dev/null
    fi
  fi
  report "$(python3 -c "import torch, triton, fusedce, fusedce._cuda as c
print('torch', torch.__version__, 'triton', triton.__version__, 'fusedce from', fusedce.__file__, 'cuda', c.archs)" 2>&1)"
}

run_tests() {  # run_tests BACKENDS SECONDS ARGS...: pytest on those backends, then every test that failed
  local backends=$1 seconds=$2 log=$work/tests-${1%%,*}.log
  shift 2
  # -n 12: the Triton tests compile some 400 kernel specialisations, spread over the workers test by test.
  # The carried wheel has sm_90 code only: CI checks the architectures of the wheel it builds.
  limited "$seconds" "$log" env FUSEDCE_TEST_BACKENDS="$backends" python3 -m pytest tests -q -p no:cacheprovider \
    --disable-warnings -n 12 --deselect tests/test_cuda.py::test_module_is_built_for_the_promised_architectures "$@"
  local rc=$?
  report "$(grep -E '^(FAILED|ERROR) ' "$log" | head -n 60)"
  return $rc
}

tests() {
  run_tests triton,torch 120 -k "not cuda" --ignore tests/test_triton_compile.py --ignore tests/test_cpu_isa.py
  run_tests cuda 90 -k cuda
  # a hang, or a fault that poisons a process, would cost every benchmark run that includes the CUDA kernels
  if (($? == 124)) || grep -qE "illegal memory access|unspecified launch failure|misaligned address|CUDA error: " \
    "$work/tests-cuda.log"; then
    exclude=fusedce-cuda
    report "the CUDA kernels faulted or hung in their tests: the benchmarks leave out fusedce-cuda"
  fi
  # the test processes' kernels must not overlap the first timings
  for _ in $(seq 30); do
    [ -z "$(nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null)" ] && break
    sleep 1
  done
}

quickcheck() {
  local shape
  for shape in 8192x128256:bfloat16 16384x32000:float32; do
    limited 60 "$work/quickcheck-${shape%%:*}.txt" python3 -m benchmarks.quickcheck --device cuda --shape "${shape%%:*}" \
      --dtype "${shape##*:}"
  done
}

steps=("$@")
((${#steps[@]})) || steps=(setup tests accept quickcheck)
for step in "${steps[@]}"; do
  report "=== $step ($((SECONDS - start)) s into the session)"
  case $step in
    setup) setup ;;
    tests) tests ;;
    accept) bench accept 200 --shapes 8192x128256:bfloat16,16384x32000:float32,1024x262144:bfloat16 ;;
    quickcheck) quickcheck ;;
    sweep) bench sweep 240 --shapes 4096x32000,4096x128256,4096x256000,16384x128256,32768x32000 --dtypes bfloat16 ;;
    linear) bench linear 180 --suite linear ;;
    *) report "unknown step $step" ;;
  esac
  cp "$out/summary.txt" "$work/"
  tar czf "$out/session.tar.gz" -C "$work" .
done
report "=== done in $((SECONDS - start)) s; results in $out/session.tar.gz"
