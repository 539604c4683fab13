#!/usr/bin/env bash
# Chapter 5 on a GPU machine, in one command: the GPU tests, compute-sanitizer
# (memcheck and racecheck) on the test binary, then `qlora bench kernels`.
#   scripts/gpu_kernels.sh [BUILD_DIR]      (default build/cuda, already built with CUDA)
# Logs (and kernels.json) go to $OUT when it is set, else to BUILD_DIR/gpu_kernels.
# NCU=1 adds an Nsight Compute profile of the fast kernels on 8192x8192 (about a minute).
# Every step runs even if an earlier one fails; the exit status is nonzero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
build=${1:-build/cuda}
logs=${OUT:-$build/gpu_kernels}
mkdir -p "$logs"
test_bin=$build/tests/test_ch05_gpu_kernels
qlora_bin=$build/qlora
for f in "$test_bin" "$qlora_bin"; do
  [[ -x $f ]] || { echo "missing $f: build first (cmake --preset cuda && cmake --build build/cuda)"; exit 2; }
done
sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
failed=()

step() {  # step NAME TIMEOUT_S COMMAND... : runs, logs to $logs/NAME.log, records a failure
  local name=$1 limit=$2
  shift 2
  echo "=== $name: $*"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$logs/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$logs/$name.log"
  echo "=== $name: exit $rc after $((SECONDS - t0)) s (log: $logs/$name.log)"
  [[ $rc -eq 0 ]] || failed+=("$name (exit $rc)")
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1 | tee "$logs/device.txt"

# Time limits keep the whole script under 10 minutes (expected: about 3); the benchmark
# runs before the sanitizers so a slow sanitizer cannot cost us its numbers. The test
# binary also runs on its own: its log keeps the per-case lines it prints (max errors,
# first mismatch) even when everything passes.
step ctest 90 ctest --test-dir "$build" -L gpu -R ch05 --output-on-failure
step tests 90 "$test_bin" "[ch05]" --durations yes
step bench 210 "$qlora_bin" bench kernels --json "$logs/kernels.json"
# memcheck: every case (cuBLAS included). racecheck: the kernels that use shared
# memory (quantize, dequantize v2 and v3, fused GEMVs, the tensor-core matmul); cuBLAS'
# own kernels are not ours.
step memcheck 120 "$sanitizer" --tool memcheck --error-exitcode 1 "$test_bin" "[ch05]"
step racecheck 90 "$sanitizer" --tool racecheck --error-exitcode 1 "$test_bin" \
  "*GPU quantize is*,*GPU dequantize*,*GEMV*,*tensor-core*"

# Optional (NCU=1 in the environment): Nsight Compute on one shape, each of our dequantize
# kernels and fused GEMVs once (--profile times nothing, so every launch is a validation
# run). The store sectors per request tell coalesced from half-sector stores; dram bytes
# check the benchmark's byte accounting; issue and warp-state stats show what bounds the GEMV.
if [[ ${NCU:-0} == 1 ]]; then
  ncu_bin=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
  if [[ -x $ncu_bin ]]; then
    step ncu 150 "$ncu_bin" -k 'regex:dequant4_|gemv4_(fused|multirow)|gemm4_mma' \
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
      --section SchedulerStats --section WarpStateStats \
      --metrics l1tex__t_sectors_pipe_lsu_mem_global_op_st.sum,l1tex__t_requests_pipe_lsu_mem_global_op_st.sum,l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum,l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum,dram__bytes_read.sum,dram__bytes_write.sum,smsp__inst_executed.sum \
      "$qlora_bin" bench kernels --profile --shape 8192x8192
  else
    echo "=== ncu: not found (looked for ncu on PATH and $ncu_bin); skipped"
  fi
fi

# The machine code (this machine has cuobjdump): registers/spills of every chapter-5
# kernel, and the 16-byte loads and stores (LDG.E.128 / STG.E.128) of the fast versions.
objdump=$(command -v cuobjdump || echo /usr/local/cuda/bin/cuobjdump)
lib=$build/libqlora_cuda.a
if [[ -x $objdump && -f $lib ]]; then
  {
    "$objdump" --dump-resource-usage "$lib" | grep -A1 -E "quantize4_kernel|quantize_nested|dequant4_|gemv4_|gemm4_mma"
    "$objdump" -sass "$lib" | awk '/Function : /{name = ($3 ~ /dequant4_|gemv4_|gemm4_mma/) ? $3 : ""} name && /(LDG|STG|LDS|STS|LDL|STL)/{
        match($0, /(LDG|STG|LDS|STS|LDL|STL)[A-Z0-9._]*/); n[name" "substr($0, RSTART, RLENGTH)]++}
      END{for (k in n) print n[k], k}' | sort -k2
  } >"$logs/sass.log" 2>&1
  echo "=== sass: $(grep -c . "$logs/sass.log") lines in $logs/sass.log"
fi

if [[ ${#failed[@]} -gt 0 ]]; then
  echo "FAILED steps: ${failed[*]}"
  exit 1
fi
echo "all chapter 5 GPU steps passed; results in $logs"
