#!/usr/bin/env bash
# Sets up, builds and runs the main job: the end-to-end demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
build=${QLORA_BUILD_DIR:-build/demo}
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release
cmake --build "$build" -j "$(nproc)" --target qlora
# Chapter 3: quantize a real checkpoint and print the error and bits/parameter table.
"$build/qlora" demo
# Chapter 7: QLoRA fine-tune of kjv15M on tinyshakespeare (CPU recipe, a few minutes on 2 cores):
# validation perplexity and a greedy "ROMEO:" sample before and after, adapter + JSONL log in out/.
"$build/qlora" finetune --out out/demo "$@"
# The loss curve of that run (matplotlib from Debian's python3-matplotlib, see setup.sh).
py=/usr/bin/python3
[ -x "$py" ] || py=python3
"$py" tools/plot_loss.py out/demo/log.jsonl out/demo/loss.png --title "qlora finetune (scripts/demo.sh)"
