#!/usr/bin/env bash
# Builds the kit for the GPU peer comparison (bench/peers_h200.sh) in KIT (default .h13; it must
# be git-ignored, e.g. listed in .git/info/exclude): llama-vulkan.tar.xz (node-llama-cpp 3.21.1's
# prebuilt llama.cpp Vulkan build: libllama, libggml, libggml-base, libggml-vulkan and every
# libggml-cpu-* variant, ggml picks the one the CPU runs; fallback/ holds this machine's libstdc++
# and libgcc_s for a machine without them), its sha256, and peers.sh (a copy of
# bench/peers_h200.sh). Run from the project's root:
#   bash bench/peers_kit.sh [KIT]
# The Vulkan build comes from $SPECDEC_LLAMA_VULKAN_LIB (the folder of its .so files) or is
# installed with npm into ~/.cache/specdec/node-llama-cpp-vulkan-3.21.1 when missing (~80 MB).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
kit=${1:-.h13}
git check-ignore -q "$kit/x" || { echo "$kit is not git-ignored: add /$kit/ to .git/info/exclude" >&2; exit 1; }
version=3.21.1
peer=$HOME/.cache/specdec/node-llama-cpp-vulkan-$version
lib=${SPECDEC_LLAMA_VULKAN_LIB:-$peer/node_modules/@node-llama-cpp/linux-x64-vulkan/bins/linux-x64-vulkan}
if ! ls "$lib"/libggml-vulkan.so >/dev/null 2>&1; then
  echo "installing @node-llama-cpp/linux-x64-vulkan@$version into $peer"
  mkdir -p "$peer"
  (cd "$peer" && { [[ -f package.json ]] || echo '{"private":true}' >package.json; } &&
    npm install -E --ignore-scripts --no-audit --no-fund "@node-llama-cpp/linux-x64-vulkan@$version" >/dev/null)
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cp "$lib"/libllama.*.so "$lib"/libggml.*.so "$lib"/libggml-base.so "$lib"/libggml-vulkan.so \
  "$lib"/libggml-cpu-*.so "$lib"/_nlcBuildMetadata.json "$tmp"/
mkdir -p "$tmp/fallback"
for so in libstdc++.so.6 libgcc_s.so.1; do
  cp "$(ldd "$lib/libggml-vulkan.so" | sed -n "s|^\s*$so => \(\S*\).*|\1|p")" "$tmp/fallback/$so"
done
mkdir -p "$kit"
echo "compressing $(ls "$tmp" | wc -l) files ($(du -sh "$tmp" | cut -f1)) ..."
(cd "$tmp" && tar -c --owner=0 --group=0 --sort=name -- * | xz -9e -T2) >"$kit/llama-vulkan.tar.xz"
(cd "$kit" && sha256sum llama-vulkan.tar.xz >llama-vulkan.tar.xz.sha256)
cp bench/peers_h200.sh "$kit/peers.sh"
ls -la "$kit"
du -sh "$kit"
echo "device run: bash .gpu/enter.sh bash $kit/peers.sh   (carry [\"$kit\"], plus \".gpu\" on a fresh machine)"
