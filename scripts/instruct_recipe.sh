#!/usr/bin/env bash
# Chapter 8's recipe in miniature: kjv15M in NF4+DQ instruction-tuned on WordNet
# definitions (tools/make_instruct_data.py, llama2 template, length-grouped batches),
# LoRA r 16 / alpha 32 / dropout 0.05 on all seven projections, clip 0.3, seq_len 128;
# once with the loss on the responses only and once with --train-on-inputs. Each run
# writes log.jsonl, summary.json (val_loss_*: the loss on the held-out responses) and,
# in RUN.log, the greedy replies to three held-out prompts before and after.
#   cpu: 3000 training / 300 held-out records, batch 8, 150 steps, lr 2e-3, 10 warmup
#        steps, validation on the first 64 held-out records (minutes on two cores)
#   gpu: 12000 / 1000 records, chapter 7's recipe: batch 32, 400 steps, lr 1e-3, 20 warmup
# Usage: scripts/instruct_recipe.sh cpu|gpu [BUILD_DIR] [DATA_DIR]
# (default build/cpu or build/cuda; DATA_DIR default out/instruct-data-SIZE, made from
# WordNet when it has no train.jsonl; scripts/gpu_pack.sh carries the gpu size's).
# Output goes to $OUT/instruct when OUT is set, else out/instruct-SIZE.
set -uo pipefail
cd "$(dirname "$0")/.."
size=${1:-}
case $size in
  cpu) build=${2:-build/cpu}; records=(--train 3000 --held-out 300)
       recipe=(--device cpu --model kjv15M.bin --batch 8 --steps 150 --lr 2e-3 --warmup 10 --eval-every 0
               --val-windows 64) ;;
  gpu) build=${2:-build/cuda}; records=(--train 12000 --held-out 1000)
       recipe=(--device cuda --model kjv15M-hf --batch 32 --steps 400 --lr 1e-3 --warmup 20 --eval-every 50) ;;
  *) echo "usage: scripts/instruct_recipe.sh cpu|gpu [BUILD_DIR] [DATA_DIR]" >&2; exit 2 ;;
esac
data=${3:-out/instruct-data-$size}
out=${OUT:+$OUT/instruct}
out=${out:-out/instruct-$size}
if [[ ! -x "$build/qlora" ]]; then
  echo "instruct_recipe.sh: $build/qlora not found; build it first" >&2
  exit 2
fi
if [[ ! -f "$data/train.jsonl" ]]; then
  python3 tools/make_instruct_data.py --out "$data" "${records[@]}" || {
    echo "instruct_recipe.sh: no $data/train.jsonl and no WordNet to make it" >&2
    exit 2
  }
fi
mkdir -p "$out"
recipe+=(--storage nf4-dq --data "$data/train.jsonl" --val-data "$data/held-out.jsonl" --seq-len 128
         --rank 16 --alpha 32 --dropout 0.05 --clip 0.3 --weight-decay 0 --save-every 0 --sample-tokens 32)
status=0
for run in responses inputs; do
  flags=()
  [[ $run == inputs ]] && flags=(--train-on-inputs)
  echo "=== instruct ($size): loss on $run"
  echo "$build/qlora finetune ${recipe[*]} ${flags[*]} --out $out/$run" > "$out/$run.cmd"
  "$build/qlora" finetune "${recipe[@]}" "${flags[@]}" --out "$out/$run" > "$out/$run.log" 2> "$out/$run.progress" || status=1
  grep -E "validation loss|tokens/s|training on|examples" "$out/$run.log"
  sed -n '/after greedy replies/,$p' "$out/$run.log" | head -11
done
echo "instruct_recipe.sh: runs in $out (exit $status)"
exit $status
