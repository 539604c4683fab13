#!/usr/bin/env bash
# Chapter 6 on a GPU machine: runs the paged-optimizer GPU tests and the optimizer
# benchmark from an existing CUDA build. Usage: scripts/gpu_optim.sh [BUILD_DIR]
# (default build/cuda, configured with -DQLORA_CUDA=ON and built). Logs and the
# benchmark JSON (optim.json, committed as docs/bench/optim-<device>.json) go to
# $OUT when it is set, else to BUILD_DIR/gpu_optim.
set -uo pipefail
cd "$(dirname "$0")/.."
build=${1:-build/cuda}
out=${OUT:-$build/gpu_optim}
if [[ ! -x "$build/qlora" || ! -x "$build/tests/test_ch06_gpu_optim" ]]; then
  echo "gpu_optim.sh: $build has no qlora or tests/test_ch06_gpu_optim; build it with -DQLORA_CUDA=ON first" >&2
  exit 2
fi
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv 2>&1 | tee "$out/nvidia-smi.txt"
# Whether cudaMalloc may evict managed pages (what paging relies on; chapter 6).
for p in uvm_global_oversubscription uvm_perf_pma_batch_nonpinned_order; do
  echo "nvidia_uvm $p=$(cat /sys/module/nvidia_uvm/parameters/$p 2>/dev/null || echo unreadable)"
done | tee -a "$out/nvidia-smi.txt"

status=0
ctest --test-dir "$build" -L gpu -R ch06 --output-on-failure 2>&1 | tee "$out/ctest-ch06-gpu.log" || status=1
# The detailed report (every INFO line, e.g. how many values were bit-identical), passing or not.
timeout 600 "$build/tests/test_ch06_gpu_optim" -s > "$out/test_ch06_gpu_optim-details.log" 2>&1 || true
"$build/qlora" bench optim --json "$out/optim.json" 2>&1 | tee "$out/bench-optim.log" || status=1
echo "gpu_optim.sh: logs and optim.json in $out (exit $status)"
exit $status
