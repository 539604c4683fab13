#!/usr/bin/env bash
# Chapter 7 on a GPU machine: the reference recipe of the chapter (kjv15M fine-tuned
# on tinyshakespeare: seq_len 256, batch 32, 400 steps, LoRA r 16 / alpha 32 /
# dropout 0.05 on all seven projections, AdamW lr 1e-3, 20 warmup steps, clip 0.3,
# no weight decay, validation over every held-out 256-token window) once per base
# storage and seed, plus NF4+DQ with the paged 8-bit optimizer (run "nf4-dq-paged8").
# Each run writes log.jsonl and summary.json into RUN or RUN-seedS (seeds other than
# 1337, the default); tools/recipe_table.py turns them into the chapter's table.
# Usage: scripts/gpu_recipe.sh [BUILD_DIR] [RUN...]
# (default build/cuda; runs default to bf16 nf4 nf4-dq fp4 fp4-dq int4 nf4-dq-paged8).
# RECIPE_SEEDS (default 1337) lists the seeds; RECIPE_JOBS (default 1) runs that many at
# once on the one GPU: their validation losses do not depend on it, their tokens/s do, so
# speed is quoted only from runs made one at a time.
# Output goes to $RECIPE_OUT, else $OUT/recipe when OUT is set, else BUILD_DIR/gpu_recipe.
set -uo pipefail
cd "$(dirname "$0")/.."
build=${1:-build/cuda}
shift || true
runs=("$@")
[[ ${#runs[@]} -gt 0 ]] || runs=(bf16 nf4 nf4-dq fp4 fp4-dq int4 nf4-dq-paged8)
out=${RECIPE_OUT:-${OUT:+$OUT/recipe}}
out=${out:-$build/gpu_recipe}
if [[ ! -x "$build/qlora" ]]; then
  echo "gpu_recipe.sh: $build/qlora not found; build with -DQLORA_CUDA=ON first" >&2
  exit 2
fi
mkdir -p "$out"
export build out
# One run: "RUN SEED". The recipe's flags live here only.
recipe_run() {
  local run=$1 seed=$2 name=$1 storage=$1 optim=()
  [[ $seed == 1337 ]] || name=$run-seed$seed
  if [[ $run == nf4-dq-paged8 ]]; then storage=nf4-dq optim=(--optim paged_adamw_8bit); fi
  "$build/qlora" finetune --device cuda --model kjv15M-hf --data tinyshakespeare.txt --seq-len 256 --batch 32 \
    --steps 400 --rank 16 --alpha 32 --dropout 0.05 --lr 1e-3 --warmup 20 --clip 0.3 --weight-decay 0 \
    --val-windows 0 --eval-every 50 --save-every 400 --seed "$seed" --storage "$storage" "${optim[@]}" \
    --out "$out/$name" > "$out/$name.log" 2> "$out/$name.progress"
  local rc=$?
  echo "=== recipe: $name (exit $rc)"; grep -E "validation loss|tokens/s|training on" "$out/$name.log"
  return $rc
}
export -f recipe_run
for seed in ${RECIPE_SEEDS:-1337}; do
  for run in "${runs[@]}"; do echo "$run $seed"; done
done | xargs -P "${RECIPE_JOBS:-1}" -L 1 bash -c 'recipe_run $0 $1'
status=$?
echo "gpu_recipe.sh: runs in $out (exit $status)"
exit $status
