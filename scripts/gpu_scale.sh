#!/usr/bin/env bash
# Chapter 7, "Loading a big model" and "Scaling up", on the GPU machine: a random LLaMA-7B (or $SCALE_SHAPE)
# shape written as a sharded BF16 folder by our bench, streamed onto the GPU in NF4+DQ and
# trained (`qlora bench train`: load time, host peak RSS, tokens/s, device memory), then
# transformers + PEFT + bitsandbytes on the same folder and tokens in the same call
# (tools/hf_train_bench.py), and our 7B with attention version 1 for comparison.
# Needs bitsandbytes built (scripts/build_bnb.sh). Usage: scripts/gpu_scale.sh BUILD_DIR OUT_DIR [65b|plan]
# (65b: instead, the 65B shape under a cudaMalloc ballast: $SCALE65_RUNS, GiB values with an
# optional -offload (checkpointed layer inputs in host memory); default 48 (the paper's card),
# 42 and 42-offload. plan: the 13B, 33B and 65B shapes on the whole card, each step's measured
# peak beside qlora plan's, and the footprint of one cudaMalloc by size.)
set -uo pipefail
cd "$(dirname "$0")/.."
build=$1
out=$2
mkdir -p "$out"
q=$build/qlora
export PYTHONPATH=/tmp/site:/tmp/bnb${PYTHONPATH:+:$PYTHONPATH}
if [[ ${3:-} == 65b ]]; then
  for run in ${SCALE65_RUNS:-48 42 42-offload}; do
    gib=${run%%-*}
    flags=()
    [[ $run == *offload ]] && flags=(--offload-checkpoints)
    echo "--- ours, 65B shape in a $gib GiB card (ballast) ${flags[*]} $(date -u +%T)"
    "$q" bench train --shape 65b --storage nf4-dq --optim paged_adamw_32bit --batch 1 --seq-len 512 --rank 64 \
      --warmup 1 --steps 2 --memory-limit-gib $gib "${flags[@]}" --json "$out/ours_65b_${run}gib.json" \
      > "$out/ours_65b_${run}gib.log" 2>&1
    echo "rc $?"; grep -v "^loading" "$out/ours_65b_${run}gib.log" | tail -8
  done
  exit 0
fi
if [[ ${3:-} == plan ]]; then
  python3 tools/cuda_alloc_footprint.py --json "$out/alloc_footprint.json"
  for shape in 13b 33b 65b; do
    batch=4; [[ $shape == 65b ]] && batch=1
    echo "--- ours, $shape shape, batch $batch × seq 512 $(date -u +%T)"
    "$q" bench train --shape $shape --storage nf4-dq --optim paged_adamw_32bit --batch $batch --seq-len 512 --rank 64 \
      --warmup 1 --steps 2 --json "$out/ours_${shape}.json" > "$out/ours_${shape}.log" 2>&1
    echo "rc $?"; grep -v "^loading" "$out/ours_${shape}.log" | tail -5
  done
  exit 0
fi
# SCALE_SHAPE picks another shape than 7b for the same comparison (13b fits the disk too).
shape=${SCALE_SHAPE:-7b}
dir=/tmp/m$shape
settings=(--batch 4 --seq-len 512 --rank 64 --alpha 16 --dropout 0.05 --warmup 2)
echo "--- write the $shape folder $(date -u +%T)"
"$q" bench train --shape $shape --write-hf $dir --json "$out/write_$shape.json" 2>&1 | tail -3
du -sh $dir
echo "--- ours: stream $dir in NF4+DQ and train $(date -u +%T)"
"$q" bench train --model $dir --storage nf4-dq --optim paged_adamw_32bit "${settings[@]}" --steps ${SCALE_STEPS:-6} \
  --tokens-out "$out/tokens_$shape.json" --json "$out/ours_$shape.json" > "$out/ours_$shape.log" 2>&1
echo "rc $?"; grep -E "^step|bench train|load|memory|plan" "$out/ours_$shape.log" | tail -14
echo "--- ours with the float32 products in fp32 (PEFT's arithmetic) $(date -u +%T)"
"$q" bench train --model $dir --storage nf4-dq --optim paged_adamw_32bit "${settings[@]}" --steps ${SCALE_STEPS:-6} \
  --float-math fp32 --json "$out/ours_${shape}_fp32.json" > "$out/ours_${shape}_fp32.log" 2>&1
echo "rc $?"; grep -E "^step|bench train|load|memory|plan" "$out/ours_${shape}_fp32.log" | tail -8
echo "--- transformers + PEFT + bitsandbytes on the same folder and tokens $(date -u +%T)"
timeout 420 python3 tools/hf_train_bench.py --model $dir --tokens "$out/tokens_$shape.json" --batch 4 \
  --json "$out/hf_$shape.json" > "$out/hf_$shape.log" 2>&1
echo "rc $?"; tail -22 "$out/hf_$shape.log"
