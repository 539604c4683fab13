#!/usr/bin/env bash
# Chapter 7 on the GPU machine (where torch, transformers and peft are installed):
# an adapter written by `qlora finetune` loads in Hugging Face PEFT on top of the
# kjv15M Hugging Face folder and gives our logits; `qlora merge`'s BF16 export gives
# them too (tools/peft_check.py states the tolerances).
# Usage: scripts/gpu_peft_check.sh BUILD_DIR ADAPTER_DIR
set -euo pipefail
cd "$(dirname "$0")/.."
build=$1
adapter=$2
work=$(mktemp -d)
base=$("$build/qlora" finetune --help >/dev/null && python3 - <<'PY'
import os, pathlib
for d in [os.environ.get("QLORA_MODELS_DIR", ""), "../shared/models", "models"]:
    p = pathlib.Path(d) / "kjv15M-hf"
    if d and p.is_dir():
        print(p); break
PY
)
[[ -n "$base" ]] || { echo "gpu_peft_check.sh: kjv15M-hf not found in the model path" >&2; exit 2; }
"$build/qlora" eval --model kjv15M-hf --storage f32 --adapter "$adapter" --held-out --windows 1 --seq-len 256 \
  --dump-logits "$work/logits.safetensors"
"$build/qlora" merge --model kjv15M-hf --adapter "$adapter" --out "$work/merged"
python3 tools/peft_check.py --base "$base" --adapter "$adapter" --logits "$work/logits.safetensors" --merged "$work/merged"
