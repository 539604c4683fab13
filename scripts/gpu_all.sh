#!/usr/bin/env bash
# One batched run on a lent GPU machine (see docs/benchmarks.md): reference
# fixtures from PyTorch/transformers, every `gpu` test, the chapter-5 and
# chapter-6 scripts. Expects a CUDA build carried as .carry/build-cuda (built
# here at /work/main/build/cuda), our shared libraries in .carry/libs.tar.xz and
# the models in .carry/shared. Everything lands in $OUT/results.tgz.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
res=/tmp/results
mkdir -p "$res"
# The CTest files name absolute paths of the build machine: recreate them.
[[ -e /work/main ]] || { mkdir -p /work && ln -s "$root" /work/main; }
mkdir -p build && [[ -e build/cuda ]] || ln -s "$root/.carry/build-cuda" build/cuda
tar xJf .carry/libs.tar.xz -C /tmp && export LD_LIBRARY_PATH=/tmp/libs:${LD_LIBRARY_PATH:-}
export QLORA_MODELS_DIR=$root/.carry/shared/models QLORA_DATA_DIR=$root/.carry/shared/data
{ date -u; nvidia-smi; python3 -c 'import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)';
  python3 -c 'import bitsandbytes' 2>&1 | tail -1; } > "$res/device.txt" 2>&1
cat "$res/device.txt" | head -20
timeout 120 python3 tools/make_quant_fixtures.py --out "$res/quant" > "$res/fixtures_quant.log" 2>&1; echo "quant fixtures: $?"
timeout 180 python3 tools/make_llama_fixtures.py --kjv15m-hf .carry/shared/models/kjv15M-hf \
  --stories260k .carry/shared/models/stories260K.bin --out "$res/llama" > "$res/fixtures_llama.log" 2>&1; echo "llama fixtures: $?"
timeout 200 ctest --test-dir /work/main/build/cuda -L gpu --output-on-failure > "$res/ctest_gpu.log" 2>&1; echo "ctest gpu: $?"
tail -15 "$res/ctest_gpu.log"
OUT=$res/ch05 timeout 330 bash scripts/gpu_kernels.sh build/cuda > "$res/gpu_kernels.log" 2>&1; echo "gpu_kernels: $?"
OUT=$res/ch06 timeout 90 bash scripts/gpu_optim.sh build/cuda > "$res/gpu_optim.log" 2>&1; echo "gpu_optim: $?"
grep -A40 "^=== bench" "$res/gpu_kernels.log" | tail -45
tail -25 "$res/gpu_optim.log"
tar czf "$OUT/results.tgz" -C /tmp results
