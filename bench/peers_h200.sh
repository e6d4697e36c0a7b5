#!/usr/bin/env bash
# The GPU peer comparison in one command: specdec beside llama.cpp's Vulkan build (node-llama-cpp
# 3.21.1's prebuilt, opened by bench/peers.ts through Deno.dlopen) on the pycode pair.
# bench/peers_kit.sh copies this file to KIT/peers.sh next to KIT/llama-vulkan.tar.xz. On the GPU
# machine, from the project's root, with the pair staged at /tmp/models/pycode/{target,draft}:
#   bash .gpu/enter.sh bash KIT/peers.sh          (carry: KIT, plus .gpu on a fresh machine)
# Steps, each printed and time-boxed (the whole under $PEERS_BUDGET_S, default 540 s):
#   1. unpack the Vulkan libraries to /tmp/llama-vk and check what they link (ldd)
#   2. f16 GGUFs of target and draft (specdec's quantizer, the code of `mod.ts quantize --quant
#      f16`; called directly because mod.ts also imports an npm package the machine cannot fetch)
#   3. bench/peers.ts: target f16 with the f16 draft (plain and speculative on specdec; llama.cpp
#      plain; llama.cpp's speculative loop needs node, which the machine lacks: the table says so)
#   4. bench/peers.ts: target as llama.cpp's Q4_K_M (llama_model_quantize), plain
# Writes to $OUT: summary.md (step results and both tables), peers.log (all output), and per bench
# NAME.json (bench/peers.ts --json-out) and NAME.log (its stderr, with llama.cpp's own log).
# Settings: PEERS_TOKENS (128), PEERS_PROMPT_TOKENS (128), PEERS_REPS (2), PEERS_K (4),
# PEERS_THREADS (4), PEERS_MODELS (/tmp/models/pycode), PEERS_Q4_DRAFT=1 (Q4_K_M run with the
# draft too), PEERS_BUDGET_S (540). Exit status: 0 when every step passed, else 1.
set -euo pipefail
kit=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$kit/.." && pwd)
cd "$root"
: "${OUT:?OUT must name the output folder}"
mkdir -p "$OUT"
models=${PEERS_MODELS:-/tmp/models/pycode}
tokens=${PEERS_TOKENS:-128} prompt_tokens=${PEERS_PROMPT_TOKENS:-128} reps=${PEERS_REPS:-2}
k=${PEERS_K:-4} threads=${PEERS_THREADS:-4} budget=${PEERS_BUDGET_S:-540}
lib=/tmp/llama-vk work=/tmp/peers13
summary=$OUT/summary.md
exec > >(tee -a "$OUT/peers.log") 2>&1
start=$SECONDS
results=()
note() { echo "peers.sh: $*"; }
# step NAME CAP_S CMD...: runs CMD (a command or a function of this file) under a time box
# (CAP_S, or what is left of the budget); its status is the step's.
step() {
  local name=$1 cap=$2 left t s rc=0
  shift 2
  left=$((budget - (SECONDS - start)))
  t=$((cap < left ? cap : left))
  if ((t < 10)); then
    note "[$name] skipped: ${left}s of the ${budget}s budget left"
    results+=("| $name | skipped (budget spent) |")
    return 1
  fi
  note "[$name] (time box ${t}s): $*"
  s=$SECONDS
  if declare -F "$1" >/dev/null; then
    timeout -k 10 "$t" bash -c "set -euo pipefail; $(declare -f "$1"); \"\$@\"" step "$@" || rc=$?
  else
    timeout -k 10 "$t" "$@" || rc=$?
  fi
  if ((rc == 0)); then
    results+=("| $name | ok, $((SECONDS - s)) s |")
  elif ((rc == 124 || rc == 137)); then
    note "[$name] TIMED OUT after ${t}s"
    results+=("| $name | timed out after ${t} s |")
  else
    note "[$name] FAILED (exit $rc)"
    results+=("| $name | failed, exit $rc |")
  fi
  return $rc
}
write_summary() {
  {
    echo "# specdec beside llama.cpp Vulkan ($(date -u +%FT%TZ))"
    echo
    echo "$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi')"
    echo "tokens $tokens, prompt tokens <= $prompt_tokens, reps $reps, k $k, llama.cpp threads $threads"
    echo
    echo "| step | result |"
    echo "| --- | --- |"
    printf '%s\n' "${results[@]}"
    for n in f16_pair q4km; do
      [[ -f $work/$n.md ]] || continue
      echo
      echo "## $n"
      cat "$work/$n.md"
      if [[ ! -s $work/$n.md ]]; then
        echo "no table; last lines of $n.log:"
        echo '```'
        tail -8 "$OUT/$n.log" 2>/dev/null || true
        echo '```'
      fi
      echo
      echo "llama.cpp's log: devices and offload"
      echo '```'
      grep -E "ggml_vulkan: [0-9]+ =|using device|offloaded|Vulkan0 (model|KV|compute) buffer|load_backend" \
        "$OUT/$n.log" 2>/dev/null | sort -u | head -12 || true
      echo '```'
    done
  } >"$summary"
  note "summary in $summary"
}
trap write_summary EXIT

note "root $root, kit $kit, OUT $OUT, budget ${budget}s"
note "deno: $(deno --version 2>/dev/null | head -1 || echo MISSING)"
note "VK_DRIVER_FILES=${VK_DRIVER_FILES:-unset} GGML_VK_VISIBLE_DEVICES=${GGML_VK_VISIBLE_DEVICES:-unset}"
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv 2>/dev/null ||
  note "nvidia-smi not found"
command -v deno >/dev/null || { note "deno is not on PATH: run this as bash .gpu/enter.sh bash $0"; exit 1; }
for m in target draft; do
  if [[ ! -f $models/$m/model.safetensors || ! -f $models/$m/config.json ]]; then
    note "missing $models/$m (model.safetensors, config.json): stage the pycode pair first"
    note "(bash ../shared/tools/gpu/stage.sh next, one run per part); staged so far:"
    ls -laR /tmp/models /tmp/stage 2>/dev/null | head -30 || true
    results+=("| models | missing $models/$m |")
    exit 1
  fi
done
ls -la "$models"/target "$models"/draft

# 1. The Vulkan build (libraries that ldd cannot resolve: libvulkan.so.1 must come from .gpu's
# loader; libstdc++/libgcc_s, if the machine lacks them, from the kit's fallback/ folder).
unpack() {
  (cd "$1" && sha256sum -c llama-vulkan.tar.xz.sha256)
  rm -rf "$2" && mkdir -p "$2" && xz -dc "$1/llama-vulkan.tar.xz" | tar -x -C "$2"
  ls -la "$2" "$2/fallback"
}
unresolved() {
  for f in "$lib"/*.so; do ldd "$f" | sed -n 's|^\s*\(\S*\) => not found|\1|p'; done | sort -u | xargs
}
step unpack 60 unpack "$kit" "$lib" || exit 1
missing=$(unresolved)
if [[ -n $missing ]]; then
  note "not found by the dynamic linker: $missing"
  if [[ $missing == *libvulkan* ]]; then
    note "libvulkan.so.1 is missing: run under bash .gpu/enter.sh (it installs the Vulkan loader)"
    results+=("| ldd | libvulkan.so.1 not found |")
    exit 1
  fi
  note "using the kit's fallback libraries in $lib/fallback"
  export LD_LIBRARY_PATH=$lib/fallback${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  missing=$(unresolved)
  if [[ -n $missing ]]; then
    note "still not found: $missing"
    results+=("| ldd | not found: $missing |")
    exit 1
  fi
  results+=("| ldd | ok with fallback/ (LD_LIBRARY_PATH) |")
else
  results+=("| ldd | ok |")
fi
ldd "$lib"/libggml-vulkan.so | grep -E "vulkan|stdc"
export SPECDEC_LLAMA_LIB_DIR=$lib SPECDEC_LLAMA_LOG=1 NO_COLOR=1

# 2. f16 GGUFs.
mkdir -p "$work"
f16() {
  M=$1 F=$2 deno eval --cached-only '
    import { quantizeToGguf } from "./engine/quantize.ts";
    await quantizeToGguf({ model: Deno.env.get("M")!, quant: "f16", keep: [], out: Deno.env.get("F")! });'
  ls -la "$2"
}
ok=1
[[ -f $work/draft-f16.gguf ]] || step gguf_draft 90 f16 "$models/draft" "$work/draft-f16.gguf" || ok=0
[[ -f $work/target-f16.gguf ]] || step gguf_target 150 f16 "$models/target" "$work/target-f16.gguf" || ok=0

# 3./4. The benches: bench/peers.ts's table to WORK/NAME.md, its stderr to OUT/NAME.log.
peers() {
  local md=$1 log=$2
  shift 2
  deno run -A --cached-only bench/peers.ts "$@" >"$md" 2>"$log"
}
bench() {
  local name=$1 cap=$2 rc=0
  shift 2
  step "$name" "$cap" peers "$work/$name.md" "$OUT/$name.log" --llama-lib "$lib" --build vulkan \
    --tokens "$tokens" --prompt-tokens "$prompt_tokens" --reps "$reps" --k "$k" \
    --threads "$threads" --json-out "$OUT/$name.json" "$@" || rc=$?
  cat "$work/$name.md"
  grep -E "^peers:|ggml_vulkan: [0-9]+ =|offloaded|[Ee]rror|panic|failed" "$OUT/$name.log" | head -20 || true
  if ((rc != 0)); then
    note "[$name] last lines of $OUT/$name.log:"
    tail -25 "$OUT/$name.log"
  fi
  return $rc
}
if [[ -f $work/target-f16.gguf && -f $work/draft-f16.gguf ]]; then
  bench f16_pair 240 --target "$work/target-f16.gguf" --draft "$work/draft-f16.gguf" || ok=0
else
  results+=("| f16_pair | not run: no f16 GGUFs |")
  ok=0
fi
if [[ -f $work/target-f16.gguf ]]; then
  q4draft=()
  [[ ${PEERS_Q4_DRAFT:-0} == 1 && -f $work/draft-f16.gguf ]] && q4draft=(--draft "$work/draft-f16.gguf")
  bench q4km 200 --target "$work/target-f16.gguf" --llama-quant Q4_K_M "${q4draft[@]}" || ok=0
else
  results+=("| q4km | not run: no f16 target GGUF |")
  ok=0
fi
note "done in $((SECONDS - start)) s"
((ok == 1))
