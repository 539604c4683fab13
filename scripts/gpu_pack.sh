#!/usr/bin/env bash
# Packs what scripts/gpu_all.sh needs on a lent GPU machine into .carry/ (ignored by git):
#   .carry/build-cuda.tar.xz  the `cuda`-preset build: the GPU test binaries, qlora and the CTest
#                       files; objects and CPU-only tests left out, and the CUDA library too unless
#                       PACK_CUDA_LIB=1 (the kernels phase's cuobjdump reads it; 12 MB)
#   .carry/libs.tar.xz  our Debian shared libraries (SentencePiece, OpenBLAS, Open MPI and what
#                       they load), which the GPU machine's image lacks; not NCCL (218 MB, past
#                       the carry limit): scripts/gpu_all.sh finds the one PyTorch brings there
#   .carry/shared.tar.xz  the models and data the GPU phases read (kjv15M-hf, stories260K,
#                       the tokenizers, tinyshakespeare), copied from the model search path, and
#                       the instruct phase's WordNet records (tools/make_instruct_data.py)
#   .carry/anchors      bitsandbytes' source tarball (../shared/anchors), built there
# Usage: scripts/gpu_pack.sh [BUILD_DIR]  (default build/cuda, built with `cmake --preset cuda`)
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build/cuda}
[[ -x $build/qlora ]] || { echo "gpu_pack.sh: $build/qlora not found: cmake --preset cuda && cmake --build build/cuda" >&2; exit 2; }
models=${QLORA_MODELS_DIR:-../shared/models}
data=${QLORA_DATA_DIR:-../shared/data}
rm -rf .carry/build-cuda .carry/build-cuda.tar.xz .carry/libs .carry/libs.tar.xz .carry/shared .carry/shared.tar.xz
keep_lib=$([[ ${PACK_CUDA_LIB:-0} == 1 ]] && echo libqlora_cuda.a || echo none)
mkdir -p .carry/build-cuda .carry/libs .carry/shared/models .carry/shared/data
# CTest needs the test binaries, the generated test lists and the CTestTestfile.cmake tree.
(cd "$build" && find . \( -name CMakeFiles -o -name html -o -name Testing -o -name notebooks \) -prune -o -name '*.o' -prune -o \( -name 'test_*' -executable ! -name '*gpu*' \) -prune \
   -o -name '*.a' ! -name "$keep_lib" -prune -o -type f -print | tar cf - -T -) | tar xf - -C .carry/build-cuda
mapfile -t bins < <(find "$build/tests" -maxdepth 1 -type f -executable -name 'test_*')
bins+=("$build/qlora")
find .carry/build-cuda -maxdepth 2 -type f -executable \( -name qlora -o -name 'test_*' \) -exec strip --strip-unneeded {} +
# Every non-system, non-CUDA library the binaries load, by its soname.
ldd "${bins[@]}" | awk '/=> \/(usr\/)?lib\/x86_64/ {print $1, $3}' | sort -u |
  grep -v -E '^(libc|libm|libgcc_s|libstdc\+\+|libpthread|libdl|librt)\.so' |
  while read -r soname path; do cp -L "$path" ".carry/libs/$soname"; done
tar cJf .carry/libs.tar.xz -C .carry libs && rm -rf .carry/libs
tar cJf .carry/build-cuda.tar.xz -C .carry build-cuda && rm -rf .carry/build-cuda
cp -r "$models/kjv15M-hf" "$models/stories260K.bin" "$models/tokenizer.model" "$models/tokenizer.bin" .carry/shared/models/
cp "$data/tinyshakespeare.txt" .carry/shared/data/
python3 tools/make_instruct_data.py --out .carry/shared/data/instruct-gpu --train 12000 --held-out 1000
# The reference library's source, built on the GPU machine by scripts/build_bnb.sh.
anchors=${QLORA_ANCHORS_DIR:-../shared/anchors}
mkdir -p .carry/anchors && cp "$anchors"/bitsandbytes-*.tar.gz .carry/anchors/
# Compressed for the trip (the carry limit is 64 MiB with the working tree); gpu_all.sh unpacks it.
chmod -R u+w .carry/shared && tar cJf .carry/shared.tar.xz -C .carry shared && rm -rf .carry/shared
du -sh .carry/build-cuda.tar.xz .carry/libs.tar.xz .carry/shared.tar.xz
