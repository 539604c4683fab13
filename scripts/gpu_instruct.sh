#!/usr/bin/env bash
# Chapter 8 on a GPU machine: the recipe in miniature at GPU size. kjv15M-hf in NF4+DQ
# instruction-tuned on WordNet definitions (tools/make_instruct_data.py: 12000 training
# and 1000 held-out records, llama2 template), chapter 7's recipe otherwise (batch 32,
# 400 steps, LoRA r 16 / alpha 32 / dropout 0.05 on all seven projections, AdamW lr 1e-3,
# 20 warmup steps, clip 0.3), seq_len 128, length-grouped batches; once with the loss on
# the responses only and once with --train-on-inputs. Each run writes log.jsonl,
# summary.json (val_loss_*: the held-out response loss) and its greedy replies before and
# after in RUN.log. Usage: scripts/gpu_instruct.sh [BUILD_DIR] [DATA_DIR]
# (default build/cuda and $QLORA_DATA_DIR/instruct-gpu, which scripts/gpu_pack.sh writes;
# made here when WordNet is installed and it is missing).
# Output goes to $OUT/instruct when OUT is set, else BUILD_DIR/gpu_instruct.
set -uo pipefail
cd "$(dirname "$0")/.."
build=${1:-build/cuda}
data=${2:-${QLORA_DATA_DIR:-../shared/data}/instruct-gpu}
out=${OUT:+$OUT/instruct}
out=${out:-$build/gpu_instruct}
if [[ ! -x "$build/qlora" ]]; then
  echo "gpu_instruct.sh: $build/qlora not found; build with -DQLORA_CUDA=ON first" >&2
  exit 2
fi
if [[ ! -f "$data/train.jsonl" ]]; then
  python3 tools/make_instruct_data.py --out "$data" --train 12000 --held-out 1000 || {
    echo "gpu_instruct.sh: no $data/train.jsonl and no WordNet to make it (scripts/gpu_pack.sh carries it)" >&2
    exit 2
  }
fi
mkdir -p "$out"
recipe=(--device cuda --model kjv15M-hf --storage nf4-dq --data "$data/train.jsonl" --val-data "$data/held-out.jsonl"
        --seq-len 128 --batch 32 --steps 400 --rank 16 --alpha 32 --dropout 0.05 --lr 1e-3 --warmup 20
        --clip 0.3 --weight-decay 0 --eval-every 50 --save-every 400 --sample-tokens 32)
status=0
for run in responses inputs; do
  flags=()
  [[ $run == inputs ]] && flags=(--train-on-inputs)
  echo "=== instruct: loss on $run"
  "$build/qlora" finetune "${recipe[@]}" "${flags[@]}" --out "$out/$run" > "$out/$run.log" 2> "$out/$run.progress" || status=1
  grep -E "validation loss|tokens/s|training on|examples" "$out/$run.log"
  sed -n '/after greedy replies/,$p' "$out/$run.log" | head -12
done
echo "gpu_instruct.sh: runs in $out (exit $status)"
exit $status
