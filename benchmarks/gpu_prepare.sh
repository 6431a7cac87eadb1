#!/usr/bin/env bash
# Run on the workstation (no GPU needed) just before a GPU session: fills .whl/ with what
# benchmarks/gpu_session.sh installs on the GPU machine, which has no network and too few lent minutes
# to spend them compiling:
#   - fusedce's wheel for the machine's Python (3.12) with CUDA code for sm_90 (H100, H200) only;
#   - Liger-Kernel's wheel, the comparison users ask for;
#   - COMMIT, the commit the wheel was built from (the machine gets the working tree, not .git).
# Without a Python 3.12 here the fusedce wheel is left out and gpu_session.sh builds on the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
py312=${PY312:-}
for candidate in python3.12 /root/.pyenv/versions/3.12*/bin/python3.12; do
  if [ -z "$py312" ] && "$candidate" -c "" 2>/dev/null; then py312=$candidate; fi
done
rm -rf .whl
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 -d .whl liger-kernel==0.8.5
if [ -n "$py312" ]; then
  "$py312" -m pip install -q setuptools wheel pybind11
  FUSEDCE_CUDA_ARCHS=${FUSEDCE_CUDA_ARCHS:-90} .ci/build_wheel "$py312" .whl >/dev/null
else
  echo "no Python 3.12 here (set PY312): gpu_session.sh will build fusedce on the GPU machine" >&2
fi
echo "$(git rev-parse HEAD)$(git diff --quiet HEAD -- . ':!benchmarks/results' || echo -dirty)" >.whl/COMMIT
ls -l .whl
