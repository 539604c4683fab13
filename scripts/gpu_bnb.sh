#!/usr/bin/env bash
# Chapter 3's comparison with the real bitsandbytes, on a GPU machine: builds bitsandbytes
# from the anchor tarball (../shared/anchors/README.md; about 40 s on 16 cores), then
# tools/bnb_compare.py measures rcp.approx.ftz.f32, writes the fixtures into
# tests/fixtures/bnb/ and the measured table into src/fast_math_reciprocal_table.cpp.
#   scripts/gpu_bnb.sh [TARBALL]     (default .carry/anchors/bitsandbytes-95f9af3.tar.gz)
# Logs go to $OUT (default /tmp/gpu_bnb); $OUT/bnb_fixtures.tgz holds the fixtures and the
# table with their repository paths: `tar xzf bnb_fixtures.tgz` in the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."
tarball=${1:-.carry/anchors/bitsandbytes-95f9af3.tar.gz}
out=${OUT:-/tmp/gpu_bnb}
mkdir -p "$out"
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv; nvcc --version | tail -1
  python3 -c 'import torch, numpy, safetensors, cupy; print("torch", torch.__version__, "cupy", cupy.__version__)'
} > "$out/device.txt" 2>&1
cat "$out/device.txt"
# The time limit keeps the phase under 3 minutes: the build is most of it.
status=0
timeout 170 python3 tools/bnb_compare.py --tarball "$tarball" --out tests/fixtures/bnb \
  --table-out src/fast_math_reciprocal_table.cpp > "$out/bnb_compare.log" 2>&1 || status=$?
tail -n 30 "$out/bnb_compare.log"
[[ -d tests/fixtures/bnb ]] && tar czf "$out/bnb_fixtures.tgz" tests/fixtures/bnb src/fast_math_reciprocal_table.cpp
echo "gpu_bnb.sh: bnb_compare.py exit $status; fixtures in $out/bnb_fixtures.tgz ($(du -sh tests/fixtures/bnb | cut -f1))"
exit "$status"
