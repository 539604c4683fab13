#!/usr/bin/env bash
# Builds bitsandbytes, the reference library, from the source tarball on the GPU machine
# (../shared/anchors/README.md; scripts/gpu_pack.sh carries it to .carry/anchors) into
# /tmp/bnb, and gives it the package metadata torch looks for. Then:
#   export PYTHONPATH=/tmp/site:/tmp/bnb
# Never part of our build: it is what we measure against.
set -euo pipefail
cd "$(dirname "$0")/.."
tarball=${1:-$(ls .carry/anchors/bitsandbytes-*.tar.gz | head -1)}
[[ -d /tmp/bnb/build ]] && exit 0
tar xzf "$tarball" -C /tmp
(cd /tmp/bnb && cmake -B build -G Ninja -DCOMPUTE_BACKEND=cuda -DCOMPUTE_CAPABILITY=90 -S . > /tmp/bnb_build.log 2>&1 &&
  cmake --build build -j16 >> /tmp/bnb_build.log 2>&1) || { tail -20 /tmp/bnb_build.log; exit 1; }
mkdir -p /tmp/site/bitsandbytes-0.50.2.dev0.dist-info
printf 'Metadata-Version: 2.1\nName: bitsandbytes\nVersion: 0.50.2.dev0\n' \
  > /tmp/site/bitsandbytes-0.50.2.dev0.dist-info/METADATA
PYTHONPATH=/tmp/site:/tmp/bnb python3 -c "import bitsandbytes as b; print('bitsandbytes', b.__version__)"
