#!/usr/bin/env bash
# Downloads the public checkpoints and data the project uses into ./models and ./data
# (the last entries of the model/data search path, src/search_path.hpp), for machines
# with internet. Files already present are skipped; sha256 sums are checked where the
# published files are pinned (the same sums as ../shared/README.md).
#
#   bash scripts/fetch_models.sh            # stories260K, tokenizer.model/.bin, tinyshakespeare
#   bash scripts/fetch_models.sh --all      # also llama2.c's stories15M, stories42M, stories110M
#
# kjv15M.bin and kjv15M-hf/ were trained for this project (see ../shared/README.md) and
# are not downloadable: point QLORA_MODELS_DIR at a folder that holds them, or keep the
# project beside a ../shared/models folder.
set -euo pipefail
cd "$(dirname "$0")/.."

all=0
case "${1:-}" in
  --all) all=1 ;;
  "") ;;
  -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
  *) echo "fetch_models.sh: unknown argument '$1' (use --all or nothing)" >&2; exit 2 ;;
esac

if command -v curl >/dev/null; then
  download() { curl -fL --retry 3 -o "$2" "$1"; }
elif command -v wget >/dev/null; then
  download() { wget -q -O "$2" "$1"; }
else
  echo "fetch_models.sh: needs curl or wget" >&2; exit 1
fi

# fetch URL DEST SHA256 (empty SHA256: not pinned, the computed sum is printed)
fetch() {
  local url=$1 dest=$2 want=$3
  mkdir -p "$(dirname "$dest")"
  if [ -e "$dest" ]; then
    echo "present: $dest"
  else
    echo "downloading $url"
    download "$url" "$dest.part"
    mv "$dest.part" "$dest"
  fi
  local got
  got=$(sha256sum "$dest" | cut -d' ' -f1)
  if [ -z "$want" ]; then
    echo "  sha256 $got (no published sum to check against)"
  elif [ "$got" != "$want" ]; then
    echo "fetch_models.sh: sha256 mismatch for $dest: got $got, expected $want (delete it and retry)" >&2
    exit 1
  else
    echo "  sha256 ok"
  fi
}

tinyllamas=https://huggingface.co/karpathy/tinyllamas/resolve/main
llama2c=https://raw.githubusercontent.com/karpathy/llama2.c/master

fetch "$tinyllamas/stories260K/stories260K.bin" models/stories260K.bin \
  9414d5a285453a7eab631713d171753232c978f6f97654211469aff8be93c8d6
fetch "$llama2c/tokenizer.model" models/tokenizer.model \
  9e556afd44213b6bd1be2b850ebbbd98f5481437a8021afaf58ee7fb1818d347
fetch "$llama2c/tokenizer.bin" models/tokenizer.bin \
  50a52ef822ee9e83de5ce9d0be0a025a773d019437f58b5ff9dcafb063ece361
fetch https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt \
  data/tinyshakespeare.txt 86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed

if [ "$all" = 1 ]; then
  for m in stories15M stories42M stories110M; do
    fetch "$tinyllamas/$m.bin" "models/$m.bin" ""
  done
fi

echo "done. kjv15M (made for this project) is not downloadable: set QLORA_MODELS_DIR to a folder holding it."
