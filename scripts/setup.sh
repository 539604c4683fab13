#!/usr/bin/env bash
# Installs everything qlora.cpp needs from Debian packages. Idempotent: packages
# already present are skipped, and apt-get update runs at most once per call.
set -euo pipefail

packages=(
  build-essential cmake ninja-build pkg-config
  catch2 doxygen graphviz
  nlohmann-json3-dev libcli11-dev libboost-math-dev
  libsentencepiece-dev libpcre2-dev libopenblas-dev
  libopenmpi-dev openmpi-bin
  wordnet-base
  python3-numpy python3-matplotlib jupyter-nbconvert python3-nbclient python3-ipykernel
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if ((${#missing[@]} == 0)); then
  echo "setup: all ${#packages[@]} packages already installed"
  exit 0
fi

sudo_cmd=()
if [[ $(id -u) -ne 0 ]]; then sudo_cmd=(sudo); fi
echo "setup: installing ${missing[*]}"
"${sudo_cmd[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
