#!/usr/bin/env bash
# Sets up, builds and runs the main job: the end-to-end demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
build=${QLORA_BUILD_DIR:-build/demo}
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release
cmake --build "$build" -j "$(nproc)" --target qlora
exec "$build/qlora" demo "$@"
