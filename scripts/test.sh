#!/usr/bin/env bash
# Sets up (Debian packages), builds (CUDA code too when nvcc exists) and runs every test.
# GPU tests are reported as skipped, with the reason, on machines without a CUDA device.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
build=${QLORA_BUILD_DIR:-build/test}
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release
cmake --build "$build" -j "$(nproc)"
status=0
ctest --test-dir "$build" --output-on-failure -j "$(nproc)" "$@" || status=$?
# CTest lists skipped tests only as "(Skipped)": print the reason the GPU tests give.
for t in "$build"/tests/test_*_gpu_*; do
  [[ -x $t ]] || continue
  rc=0
  msg=$("$t" 2>&1) || rc=$?
  [[ $rc == 77 ]] && echo "gpu tests: ${msg%%$'\n'*}"
  break
done
exit $status
