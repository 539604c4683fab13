#!/usr/bin/env bash
# Chapter 7, "Where the time goes": Nsight Compute's duration of every kernel of one QLoRA
# training step at the LLaMA-7B width (dim 4096, hidden 11008, 32 heads, vocab 32000) with
# LAYERS layers instead of 32 (a config.json for `qlora bench train --shape`), batch 4 × seq
# 512, r 64 on all seven projections, checkpointing, paged AdamW; one warm-up step, one
# profiled step. ncu replays kernels one at a time with the clocks left alone
# (--clock-control none), so the table gives each kernel's share of the step, not the
# step's wall time; tools/profile_table.py groups it by what the kernel does.
# Usage: scripts/gpu_profile.sh BUILD_DIR OUT_DIR [LAYERS (default 2)] [extra bench train flags]
set -uo pipefail
cd "$(dirname "$0")/.."
build=$1
out=$2
layers=${3:-2}
shift 3 2>/dev/null || shift $#
mkdir -p "$out"
cfg=$out/config_7b_${layers}layers.json
cat > "$cfg" <<JSON
{"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": $layers,
 "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096,
 "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "tie_word_embeddings": false}
JSON
ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
[[ -n $ncu ]] || { echo "gpu_profile.sh: ncu not found" >&2; exit 2; }
"$ncu" --clock-control none --nvtx --metrics gpu__time_duration.sum --csv --page raw --log-file "$out/ncu.csv" \
  "$build/qlora" bench train --shape "$cfg" --storage nf4-dq --optim paged_adamw_32bit --batch 4 --seq-len 512 \
  --rank 64 --warmup 1 --steps 1 "$@" > "$out/bench.log" 2>&1
echo "ncu rc $?"
tail -4 "$out/bench.log"
python3 tools/profile_table.py "$out/ncu.csv" --json "$out/profile.json"
