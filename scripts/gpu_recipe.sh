#!/usr/bin/env bash
# Chapter 7 on a GPU machine: the reference recipe of the chapter (kjv15M fine-tuned
# on tinyshakespeare: seq_len 256, batch 32, 400 steps, LoRA r 16 / alpha 32 /
# dropout 0.05 on all seven projections, AdamW lr 1e-3, 20 warmup steps, clip 0.3,
# no weight decay, validation over every held-out 256-token window) once per base
# storage, plus the NF4+DQ run with the paged 8-bit optimizer. Each run writes
# log.jsonl and summary.json; tools/recipe_table.py turns them into the chapter's
# table. Usage: scripts/gpu_recipe.sh [BUILD_DIR] [STORAGE...]
# (default build/cuda; storages default to bf16 nf4 nf4-dq fp4 fp4-dq int4).
# Output goes to $OUT/recipe when OUT is set, else BUILD_DIR/gpu_recipe.
set -uo pipefail
cd "$(dirname "$0")/.."
build=${1:-build/cuda}
shift || true
storages=("$@")
[[ ${#storages[@]} -gt 0 ]] || storages=(bf16 nf4 nf4-dq fp4 fp4-dq int4)
out=${OUT:+$OUT/recipe}
out=${out:-$build/gpu_recipe}
if [[ ! -x "$build/qlora" ]]; then
  echo "gpu_recipe.sh: $build/qlora not found; build with -DQLORA_CUDA=ON first" >&2
  exit 2
fi
mkdir -p "$out"
recipe=(--device cuda --model kjv15M-hf --data tinyshakespeare.txt --seq-len 256 --batch 32 --steps 400
        --rank 16 --alpha 32 --dropout 0.05 --lr 1e-3 --warmup 20 --clip 0.3 --weight-decay 0
        --val-windows 0 --eval-every 50 --save-every 400)
status=0
for s in "${storages[@]}"; do
  echo "=== recipe: $s"
  "$build/qlora" finetune "${recipe[@]}" --storage "$s" --out "$out/$s" > "$out/$s.log" 2> "$out/$s.progress" || status=1
  grep -E "validation loss|tokens/s|training on" "$out/$s.log"
done
echo "=== recipe: nf4-dq with paged_adamw_8bit"
"$build/qlora" finetune "${recipe[@]}" --storage nf4-dq --optim paged_adamw_8bit --out "$out/nf4-dq-paged8" \
  > "$out/nf4-dq-paged8.log" 2> "$out/nf4-dq-paged8.progress" || status=1
grep -E "validation loss|tokens/s|training on" "$out/nf4-dq-paged8.log"
echo "gpu_recipe.sh: runs in $out (exit $status)"
exit $status
