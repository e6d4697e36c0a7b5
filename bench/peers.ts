/**
 * specdec beside llama.cpp: the same GGUF, prompts and token counts through both engines in one
 * process, one table. llama.cpp is the prebuilt of node-llama-cpp 3.21.1 (tests/llama_cpp.ts:
 * libllama through Deno.dlopen; `--build vulkan` for its Vulkan build, the graphics API specdec
 * uses too). Measures and never asserts.
 *
 *   deno run -A bench/peers.ts --target T [--draft D] [--llama-quant Q4_K_M] [--tokens 64]
 *                              [--prompt-tokens 128] [--k 4] [--reps 1] [--build cpu|vulkan]
 *                              [--llama-lib DIR] [--threads 2] [--json] [--json-out FILE]
 *
 * `--target`/`--draft`: a GGUF, or any checkpoint specdec reads (written to an f16 GGUF first, so
 * both engines read the same file). `--llama-quant`: llama.cpp quantizes that GGUF into one of
 * its file types first (`llama_model_quantize`), and both engines run the result.
 *
 * Per engine, after a warm-up, over the same prompts (code, cut to `--prompt-tokens`; all of them
 * `--reps` times, the rates summed over every repetition): prefill tok/s (prompt
 * tokens / wall time of the prompt pass), decode tok/s (greedy new tokens after the first / wall
 * time), and with `--draft` the speculative tok/s of both (draft model, k = `--k`, counted the same
 * way). llama.cpp's speculative decoding is not in its C API: it runs through node-llama-cpp's
 * `DraftSequenceTokenPredictor` in a Node child process (bench/llama_spec.mjs), drafting exactly k
 * tokens (no confidence cut-off). It needs `node` on PATH and node-llama-cpp's JavaScript in
 * `$SPECDEC_LLAMA_PEER`; without them the speculative column of llama.cpp says "not run" and the
 * output gives the reason (`llama_spec_skipped` in the JSON). Memory: specdec's GPU bytes as
 * allocated (weights + KV cache + scratch); llama.cpp's model bytes (`llama_model_size`: in RAM for
 * the CPU build, on the GPU with Vulkan), and with Vulkan also the device memory its model and
 * context took (the drop of ggml's free-memory figure of the device across loading).
 *
 * `--llama-lib DIR`: the folder of llama.cpp's shared libraries (else `$SPECDEC_LLAMA_LIB_DIR`, else
 * the npm install in `$SPECDEC_LLAMA_PEER`; see tests/llama_cpp.ts). `--build` defaults to `vulkan`
 * when that folder holds `libggml-vulkan.so`, else `cpu`. The Vulkan build offloads every layer
 * (n_gpu_layers 999) and the table names the ggml device it ran on. `--json-out FILE` writes the
 * JSON object to FILE besides printing the table.
 */
import { parseArgs } from "@specdec/cli";
import { join } from "@specdec/path";
import { requestGpu } from "../engine/gpu.ts";
import { WeightStore } from "../engine/weights.ts";
import { Decoder } from "../engine/decode.ts";
import { quantizeToGguf } from "../engine/quantize.ts";
import { LlamaGpu } from "../models/llama.ts";
import { loadModel } from "../models/load.ts";
import {
  LLAMA_FTYPE,
  type LlamaBuild,
  type LlamaCpp,
  LlamaCppModel,
  type LlamaFtype,
  llamaLibDir,
  llamaPeerDir,
  llamaQuantize,
  openLlamaCpp,
} from "../tests/llama_cpp.ts";
import { PROMPTS } from "./gpu.ts";

const args = parseArgs({
  args: Deno.args,
  options: {
    target: { type: "string" },
    draft: { type: "string" },
    "llama-quant": { type: "string" },
    tokens: { type: "string", default: "64" },
    "prompt-tokens": { type: "string", default: "128" },
    k: { type: "string", default: "4" },
    reps: { type: "string", default: "1" },
    build: { type: "string" },
    "llama-lib": { type: "string" },
    threads: { type: "string", default: "2" },
    json: { type: "boolean", default: false },
    "json-out": { type: "string" },
  },
});
if (!args.values.target) {
  console.error(
    "usage: deno run -A bench/peers.ts --target T [--draft D] [--llama-quant Q4_K_M] " +
      "[--tokens 64] [--prompt-tokens 128] [--k 4] [--reps 1] [--build cpu|vulkan] [--llama-lib DIR] " +
      "[--threads 2] [--json] [--json-out FILE]",
  );
  Deno.exit(2);
}
const tokens = Number(args.values.tokens), promptTokens = Number(args.values["prompt-tokens"]);
const k = Number(args.values.k), threads = Number(args.values.threads);
const reps = Number(args.values.reps);
const libDir = args.values["llama-lib"] ?? Deno.env.get("SPECDEC_LLAMA_LIB_DIR");
const hasVulkanLib = (d: string) => {
  try {
    return [...Deno.readDirSync(d)].some((e) => /^libggml-vulkan.*\.so$/.test(e.name));
  } catch {
    return false;
  }
};
const build = (args.values.build ??
  (libDir && hasVulkanLib(libDir) ? "vulkan" : "cpu")) as LlamaBuild;
if (build !== "cpu" && build !== "vulkan") throw new Error(`--build ${build}: cpu or vulkan`);
const llamaQuant = args.values["llama-quant"] as LlamaFtype | undefined;
if (llamaQuant && !(llamaQuant in LLAMA_FTYPE)) {
  throw new Error(`--llama-quant ${llamaQuant}: one of ${Object.keys(LLAMA_FTYPE).join(", ")}`);
}

const dir = await Deno.makeTempDir({ prefix: "specdec-peers-" });
const gpuLayers = build === "cpu" ? 0 : 999;
// A llama.cpp that cannot be opened (no library, no Vulkan device) still lets specdec's side run
// (unless llama.cpp must quantize first); the output then says why llama.cpp's row is missing and
// the exit status is 1.
let cpp: LlamaCpp | undefined, cppError: string | undefined;
try {
  cpp = openLlamaCpp(build, libDir ?? llamaLibDir(build));
  console.error(
    `peers: llama.cpp ${build} from ${cpp.dir}; ggml devices: ${cpp.devices.join(", ")}` +
      (build === "cpu" ? "" : `; n_gpu_layers ${gpuLayers} onto ${cpp.gpuDevices.join(", ")}`),
  );
} catch (e) {
  if (llamaQuant) throw e;
  cppError = e instanceof Error ? e.message : String(e);
  console.error(`peers: llama.cpp not run: ${cppError}`);
}

/** The GGUF both engines run for `path` (converted and/or llama.cpp-quantized in `dir`). */
async function gguf(path: string, name: string): Promise<string> {
  let file = path;
  if (!path.endsWith(".gguf")) {
    file = join(dir, `${name}-f16.gguf`);
    await quantizeToGguf({ model: path, quant: "f16", keep: [], out: file });
  }
  if (llamaQuant) {
    const out = join(dir, `${name}-${llamaQuant}.gguf`);
    llamaQuantize(cpp!, file, out, llamaQuant, threads);
    file = out;
  }
  return file;
}

const targetFile = await gguf(args.values.target, "target");
const draftFile = args.values.draft ? await gguf(args.values.draft, "draft") : undefined;
const host = await loadModel(targetFile);
const tok = host.tokenizer!;
const prompts = PROMPTS.map((p) => tok.encode(p, { bos: true }).slice(0, promptTokens));
const maxSeq = Math.min(host.config.maxSeqLen, promptTokens + tokens + 2 * k + 8);

/** One engine's figures. */
interface Row {
  engine: string;
  prefill_tok_s: number;
  decode_tok_s: number;
  spec_tok_s: number | null;
  acceptance: number | null;
  memory_bytes: number;
  memory_what: string;
  outputs: number[][];
}

// ---- specdec -------------------------------------------------------------------------------
const gpu = await requestGpu();
const greedy = { temperature: 0, topK: 0, topP: 1, seed: 0 };
const quiet = { onTokens: () => {}, cancelled: () => false };
const store = new WeightStore(gpu);
const target = await LlamaGpu.create(gpu, store, host, { label: "target", maxSeq });
const draft = draftFile
  ? await LlamaGpu.create(gpu, store, await loadModel(draftFile), { label: "draft", maxSeq })
  : undefined;
const plain = new Decoder(gpu, target);
await plain.generate(prompts[0], 4, greedy, quiet); // warm-up: pipelines
let pTok = 0, pMs = 0, dTok = 0, dMs = 0;
const ours: number[][] = [];
for (let rep = 0; rep < reps; rep++) {
  for (const p of prompts) {
    const r = await plain.generate(p, tokens, greedy, quiet);
    pTok += p.length;
    pMs += r.prefillMs;
    dTok += r.tokens.length - 1;
    dMs += r.decodeMs;
    if (rep === 0) ours.push(r.tokens);
  }
}
let specRate: number | null = null, acceptance: number | null = null;
if (draft) {
  const spec = new Decoder(gpu, target, { kind: "model", draft });
  await spec.generate(prompts[0], 8, greedy, quiet, k);
  let n = 0, ms = 0, acc = 0, prop = 0;
  for (let rep = 0; rep < reps; rep++) {
    for (const p of prompts) {
      const r = await spec.generate(p, tokens, greedy, quiet, k);
      n += r.tokens.length - 1;
      ms += r.decodeMs;
      acc += r.accepted;
      prop += r.proposed;
    }
  }
  specRate = n / (ms / 1000);
  acceptance = prop ? acc / prop : 0;
  spec.destroy();
}
const rows: Row[] = [{
  engine: `specdec (${gpu.adapterName})`,
  prefill_tok_s: pTok / (pMs / 1000),
  decode_tok_s: dTok / (dMs / 1000),
  spec_tok_s: specRate,
  acceptance,
  memory_bytes: store.bytes + target.bytes.kv + target.bytes.scratch +
    (draft ? draft.bytes.kv + draft.bytes.scratch : 0),
  memory_what: "GPU bytes allocated",
  outputs: ours,
}];
// Printed now, so that a crash on the llama.cpp side below still leaves specdec's figures.
console.error(`peers: specdec ${JSON.stringify({ ...rows[0], outputs: undefined })}`);
plain.destroy();
target.destroy();
draft?.destroy();
store.destroy();

if (!cpp) {
  const f = (x: number | null) => x === null ? "–" : x.toFixed(1);
  const r = rows[0];
  if (args.values["json-out"]) {
    await Deno.writeTextFile(
      args.values["json-out"],
      JSON.stringify({ model: args.values.target, tokens, reps, rows, llama_error: cppError }) +
        "\n",
    );
  }
  console.log(
    `\n| engine | prefill tok/s | decode tok/s | speculative tok/s | memory |\n| --- | --- | --- | --- | --- |\n` +
      `| ${r.engine} | ${f(r.prefill_tok_s)} | ${f(r.decode_tok_s)} | ${f(r.spec_tok_s)} | ` +
      `${(r.memory_bytes / 2 ** 20).toFixed(1)} MiB |\n\nllama.cpp not run: ${cppError}`,
  );
  await Deno.remove(dir, { recursive: true });
  Deno.exit(1);
}

// ---- llama.cpp -----------------------------------------------------------------------------
const freeBefore = cpp.gpuMemory();
const peer = LlamaCppModel.load(cpp, targetFile, { nCtx: maxSeq, threads, gpuLayers });
peer.greedy(prompts[0], 4); // warm-up
const freeAfter = cpp.gpuMemory();
const peerDeviceBytes = freeBefore.reduce((a, m, i) => a + m.free - freeAfter[i].free, 0);
let lpMs = 0, ldMs = 0, ldTok = 0;
const theirs: number[][] = [];
for (let rep = 0; rep < reps; rep++) {
  for (const p of prompts) {
    peer.clear();
    let t0 = performance.now();
    const out = [peer.decodeArgmax(p, 0)];
    lpMs += performance.now() - t0;
    t0 = performance.now();
    for (let i = 1; i < tokens; i++) out.push(peer.decodeArgmax([out[i - 1]], p.length + i - 1));
    ldMs += performance.now() - t0;
    ldTok += tokens - 1;
    if (rep === 0) theirs.push(out);
  }
}
peer.close();
let peerSpec:
  | { spec_tok_s: number; validated: number; refuted: number; plain_tok_s: number }
  | null = null;
/** Why llama.cpp's speculative loop did not run (null when it ran or no draft was given). */
let specSkipped: string | null = null;
if (draftFile) {
  const nodeLlama = join(llamaPeerDir(), "node_modules/node-llama-cpp/dist/index.js");
  // A real Node: Deno runs itself when a subprocess named "node" is not on PATH.
  const node = await new Deno.Command("node", { args: ["--version"], stdout: "piped" }).output()
    .then((o) => o.success && /^v\d+\./.test(new TextDecoder().decode(o.stdout)), () => false);
  if (!node) {
    specSkipped = "no `node` on PATH (llama.cpp's speculative decoding is only reachable " +
      "through node-llama-cpp's JavaScript, bench/llama_spec.mjs)";
  } else if (!(await Deno.stat(nodeLlama).then(() => true, () => false))) {
    specSkipped = `node-llama-cpp's JavaScript is not installed (${nodeLlama})`;
  } else if (build === "vulkan" && libDir) {
    specSkipped = "node-llama-cpp loads its own Vulkan build from $SPECDEC_LLAMA_PEER, not " +
      `--llama-lib ${libDir}`;
  }
  if (specSkipped) console.error(`peers: llama.cpp speculative not run: ${specSkipped}`);
}
if (draftFile && !specSkipped) {
  // llama.cpp's own speculative loop, through node-llama-cpp in Node (see the module doc).
  const peerDir = llamaPeerDir();
  const input = {
    peer: peerDir,
    target: targetFile,
    draft: draftFile,
    prompts,
    tokens,
    k,
    threads,
    gpu: build === "cpu" ? false : "vulkan",
  };
  const out = await new Deno.Command("node", {
    args: [new URL("./llama_spec.mjs", import.meta.url).pathname, JSON.stringify(input)],
    stdout: "piped",
    stderr: "inherit",
  }).output();
  if (!out.success) throw new Error(`bench/llama_spec.mjs exited with ${out.code}`);
  peerSpec = JSON.parse(new TextDecoder().decode(out.stdout).trim().split("\n").at(-1)!);
}
rows.push({
  engine: `llama.cpp ${build} (node-llama-cpp 3.21.1; ${
    build === "cpu"
      ? cpp.devices.join(", ")
      : `n_gpu_layers ${gpuLayers} on ${cpp.gpuDevices.join(", ")}`
  }; ${threads} threads)`,
  prefill_tok_s: pTok / (lpMs / 1000),
  decode_tok_s: ldTok / (ldMs / 1000),
  spec_tok_s: peerSpec?.spec_tok_s ?? null,
  acceptance: peerSpec ? peerSpec.validated / (peerSpec.validated + peerSpec.refuted) : null,
  memory_bytes: peer.modelBytes,
  memory_what: build === "cpu"
    ? "model bytes (RAM)"
    : `model bytes; device memory taken: ${
      peerDeviceBytes > 0 ? `${(peerDeviceBytes / 2 ** 20).toFixed(1)} MiB` : "not reported"
    }`,
  outputs: theirs,
});
await Deno.remove(dir, { recursive: true });

const same = ours.filter((o, i) => o.every((t, j) => t === theirs[i][j])).length;
const what = `${args.values.target}${llamaQuant ? ` as llama.cpp ${llamaQuant}` : ""}`;
const report = {
  model: what,
  prompts: prompts.length,
  prompt_tokens: promptTokens,
  reps,
  tokens,
  k,
  draft: args.values.draft ?? null,
  llama: {
    build,
    dir: cpp.dir,
    devices: cpp.devices,
    gpu_devices: cpp.gpuDevices,
    n_gpu_layers: gpuLayers,
    device_memory_bytes: build === "cpu" ? null : peerDeviceBytes,
    system_info: cpp.systemInfo,
  },
  llama_spec_skipped: specSkipped,
  rows,
  same,
};
if (args.values["json-out"]) {
  await Deno.writeTextFile(args.values["json-out"], JSON.stringify(report, null, 1) + "\n");
}
if (args.values.json) {
  console.log(JSON.stringify(report));
} else {
  const mib = (b: number) => `${(b / 2 ** 20).toFixed(1)} MiB`;
  const f = (x: number | null) => x === null ? "–" : x.toFixed(1);
  console.log(
    `\n${what}: ${prompts.length} prompts of <= ${promptTokens} tokens, ${tokens} new tokens each` +
      ` (greedy)${draft ? `, draft ${args.values.draft} k = ${k}` : ""}\n`,
  );
  console.log("| engine | prefill tok/s | decode tok/s | speculative tok/s | memory |");
  console.log("| --- | --- | --- | --- | --- |");
  for (const r of rows) {
    const spec = r.spec_tok_s !== null
      ? `${f(r.spec_tok_s)} (${(100 * r.acceptance!).toFixed(0)}% accepted)`
      : r.engine.startsWith("llama.cpp") && specSkipped
      ? "not run (see below)"
      : "–";
    console.log(
      `| ${r.engine} | ${f(r.prefill_tok_s)} | ${f(r.decode_tok_s)} | ${spec} | ` +
        `${mib(r.memory_bytes)} (${r.memory_what}) |`,
    );
  }
  console.log(`\ngreedy outputs identical on ${same}/${prompts.length} prompts`);
  if (specSkipped) console.log(`llama.cpp speculative decoding not run: ${specSkipped}`);
  if (peerSpec) {
    console.log(
      `llama.cpp plain decode through node-llama-cpp's JS loop: ${
        peerSpec.plain_tok_s.toFixed(1)
      } ` +
        "tok/s (the table's plain column calls libllama directly)",
    );
  }
}
