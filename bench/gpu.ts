/**
 * The GPU benchmark: one process measures everything side by side and prints tables (and JSON
 * with --json / --out). Meant for the H100 through ../shared/tools/gpu/README.md, runs anywhere.
 *
 *   deno run -A bench/gpu.ts [--model DIR]... [--target DIR --draft DIR] [--tokens 256]
 *                            [--reps 3] [--rounds 3] [--matmul] [--verify] [--shapes] [--dummy NAME]...
 *                            [--quant F]... [--peak-gbs N] [--out F] [--json] [--ks 2,3,4,6,8]
 *                            [--trees 4x2,6x3] [--no-ngram] [--timeline] [--sweep] [--unroll 1,2]
 *                            [--filter A,B] [--attn-splits 32,8] [--block-rows 8,17]
 *                            [--int8x 0,1,auto]
 *
 * Per model: prefill tok/s (128-token prompt), plain greedy decode tok/s, the weight bytes read
 * per token against the device's bandwidth, GPU busy (kernel time / wall time), and a
 * GPU-timestamp profile of one decode forward.
 * `--dummy llama-3.2-1b|llama-3.1-8b|qwen2.5-7b|pycode-target|pycode-draft` builds a model with that configuration's exact shapes and random weights on the GPU (no file)
 * in each `--quant` format, and reports decode tok/s against the weight-bytes limit and the cost
 * of a verify forward at T = 2..17 relative to T = 1. `--verify` times the matrix-vector product
 * at T = 1..17 per format, `--shapes` per row/lane split, `--sweep` per rows per invocation
 * (norm folded in, factored block decoding or not), each timed `--rounds` times (default 3)
 * interleaved over all cases, the fastest kept, its dispatches rotating over weight copies past
 * the L2 (`benchMatmul`); `--filter A,B` keeps the cases of those
 * three whose "name dtype" contains A or B. `--attn-splits 32,8` once per cap on attention's key chunks
 * (`attentionTuning`), `--block-rows 8,17` once per widest one-dispatch block-format product. `--unroll 1,2` runs each dummy model once per
 * value of the matrix-vector units in flight per lane (`matvecTuning`), side by side;
 * `--widen-small-k K` lets products of K >= K widen their lanes at T <= 2.
 * `--int8x 0,1,auto` runs the dummy models and the `--verify` / `--shapes` / `--sweep` products
 * once per value of `matvecTuning.int8x` (0: none, 1: q8_0 and q4_0 matrix-vector products on
 * int8 x with packed integer dot products, the quantize pass timed with them; auto, the default:
 * q4_0 only, as the engine runs), side by side.
 * With `--target` and `--draft`: plain, chain drafts of each `--ks` length and auto, token trees of each `--trees` shape or `auto`
 * (greedy) and n-gram, side by side (tok/s, acceptance, tokens per target pass, same output as
 * plain), then the GPU time of one cycle per op (plain, the first `--ks`, the first fixed tree).
 * `--timeline` records each generation's GPU timeline (every cycle's timestamps) and prints where
 * its wall time went: inside cycles, in gaps within and between submissions, outside the span.
 * `--target dummy:NAME --draft dummy:NAME` runs that with random weights at a `--dummy`
 * configuration's shapes (per-op costs without staging weights; acceptance is meaningless).
 */
import { type Int8xSetting, MATVEC_BLOCK_MAX_T, matvecTuning } from "../kernels/matmul.ts";
import { attentionTuning, ATTN_MAX_SPLITS } from "../kernels/attention.ts";
import { parseArgs } from "@specdec/cli";
import { type Gpu, requestGpu } from "../engine/gpu.ts";
import { WeightStore } from "../engine/weights.ts";
import { Decoder } from "../engine/decode.ts";
import { LlamaGpu } from "../models/llama.ts";
import { loadModel } from "../models/load.ts";
import { profileDispatches, type ProfileRow, timePass } from "./profile.ts";
import {
  benchMatmul,
  formatMatmulRows,
  int8xName,
  LARGE_CASES,
  parseInt8x,
  PYCODE_CASES,
  QUANT_CASES,
  SHAPE_CASES,
  SWEEP_CASES,
  VERIFY_CASES,
  VERIFY_TS,
} from "./matmul_cases.ts";
import { readHfConfig } from "../models/hf.ts";
import type { WeightFormat } from "../kernels/qformats.ts";
import { type DraftLength, type Speculation, targetLogitRows } from "../engine/decode.ts";
import { parseTreeShape, type TreeShape } from "../engine/token_tree.ts";
import {
  addIdle,
  type ChunkRow,
  chunkTimeline,
  type IdleBreakdown,
  idleBreakdown,
} from "../engine/timeline.ts";

const CODE = `import os
import sys


def read_config(path):
    """Read a key=value config file into a dict."""
    result = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            key, _, value = line.partition("=")
            result[key.strip()] = value.strip()
    return result


class Cache:
    def __init__(self, capacity=128):
        self.capacity = capacity
        self.data = {}

    def get(self, key, default=None):
`;

/** One model's figures. */
export interface ModelBench {
  model: string;
  params_bytes: number;
  prefill_tokens: number;
  prefill_tok_s: number;
  decode_tokens: number;
  decode_tok_s: number[];
  decode_tok_s_median: number;
  weight_gb_s: number;
  dispatches_per_token: number;
  kernel_us_per_token: number;
  gpu_busy: number | null;
  profile: ProfileRow[];
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)];
}

async function benchModel(
  gpu: Gpu,
  path: string,
  tokens: number,
  reps: number,
): Promise<ModelBench> {
  const host = await loadModel(path);
  if (!host.tokenizer) throw new Error(`${path}: no tokenizer for the benchmark prompt`);
  const store = new WeightStore(gpu);
  const maxSeq = Math.min(host.config.maxSeqLen, 1024);
  const m = await LlamaGpu.create(gpu, store, host, { label: "bench", maxSeq });
  const dec = new Decoder(gpu, m);
  const prompt = host.tokenizer.encode(CODE, { bos: true }).slice(0, 128);
  const greedy = { temperature: 0, topK: 0, topP: 1, seed: 0 };
  const quiet = { onTokens: () => {}, cancelled: () => false };
  await dec.generate(prompt, 8, greedy, quiet); // warm-up: pipelines, first submissions
  const rates: number[] = [];
  let prefill = 0, busy: number | null = null;
  for (let r = 0; r < reps; r++) {
    const res = await dec.generate(prompt, tokens, greedy, quiet);
    rates.push((res.tokens.length - 1) / (res.decodeMs / 1000));
    prefill = Math.max(prefill, prompt.length / (res.prefillMs / 1000));
    if (res.gpuMs) busy = (res.gpuMs.draft + res.gpuMs.verify) / res.decodeMs;
  }
  const dummy = gpu.upload("bench.token", new Uint32Array([1]));
  m.setPosition(prompt.length);
  const step = await m.plan(1, { buffer: dummy, offset: 0 }, "last");
  const profile = gpu.features.timestamp ? await profileDispatches(gpu, step, 5) : [];
  const perTok = median(rates);
  const result: ModelBench = {
    model: path,
    params_bytes: store.bytes,
    prefill_tokens: prompt.length,
    prefill_tok_s: prefill,
    decode_tokens: tokens,
    decode_tok_s: rates,
    decode_tok_s_median: perTok,
    weight_gb_s: store.bytes * perTok / 1e9,
    dispatches_per_token: step.length + 2,
    kernel_us_per_token: profile.reduce((a, p) => a + p.us, 0),
    gpu_busy: busy,
    profile,
  };
  dec.destroy();
  m.destroy();
  store.destroy();
  dummy.destroy();
  return result;
}

/** A config.json of the pycode pair's family (Llama 2 vocabulary, head size 64, tied embeddings). */
function pycodeConfig(
  dim: number,
  ffn: number,
  layers: number,
  heads: number,
  kvHeads: number,
): Record<string, unknown> {
  return {
    model_type: "llama",
    hidden_size: dim,
    intermediate_size: ffn,
    num_hidden_layers: layers,
    num_attention_heads: heads,
    num_key_value_heads: kvHeads,
    head_dim: 64,
    max_position_embeddings: 1024,
    vocab_size: 32000,
    rms_norm_eps: 1e-5,
    rope_theta: 10000,
    tie_word_embeddings: true,
    bos_token_id: 1,
    eos_token_id: 2,
  };
}

/**
 * The configurations `--dummy` builds, as their Hugging Face config.json files give them (the
 * fields this engine reads); weights are random, so EOS never stops a run.
 */
export const DUMMY_CONFIGS: Record<string, Record<string, unknown>> = {
  // The pycode pair's shapes (../shared/models/pycode-pair/*/config.json): plain decode speed of
  // the fixtures' shapes without staging their weights.
  "pycode-target": pycodeConfig(576, 1536, 12, 9, 3),
  "pycode-draft": pycodeConfig(256, 704, 3, 4, 4),
  "llama-3.2-1b": {
    model_type: "llama",
    hidden_size: 2048,
    intermediate_size: 8192,
    num_hidden_layers: 16,
    num_attention_heads: 32,
    num_key_value_heads: 8,
    head_dim: 64,
    max_position_embeddings: 131072,
    vocab_size: 128256,
    rms_norm_eps: 1e-5,
    rope_theta: 500000,
    rope_scaling: {
      rope_type: "llama3",
      factor: 32,
      low_freq_factor: 1,
      high_freq_factor: 4,
      original_max_position_embeddings: 8192,
    },
    tie_word_embeddings: true,
    bos_token_id: 128000,
    eos_token_id: 128001,
  },
  "llama-3.1-8b": {
    model_type: "llama",
    hidden_size: 4096,
    intermediate_size: 14336,
    num_hidden_layers: 32,
    num_attention_heads: 32,
    num_key_value_heads: 8,
    max_position_embeddings: 131072,
    vocab_size: 128256,
    rms_norm_eps: 1e-5,
    rope_theta: 500000,
    rope_scaling: {
      rope_type: "llama3",
      factor: 8,
      low_freq_factor: 1,
      high_freq_factor: 4,
      original_max_position_embeddings: 8192,
    },
    tie_word_embeddings: false,
    bos_token_id: 128000,
    eos_token_id: 128001,
  },
  "qwen2.5-7b": {
    model_type: "qwen2",
    hidden_size: 3584,
    intermediate_size: 18944,
    num_hidden_layers: 28,
    num_attention_heads: 28,
    num_key_value_heads: 4,
    max_position_embeddings: 131072,
    vocab_size: 152064,
    rms_norm_eps: 1e-6,
    rope_theta: 1000000,
    tie_word_embeddings: false,
    bos_token_id: 151643,
    eos_token_id: 151643,
  },
};

/** One dummy model's figures. */
export interface DummyBench {
  model: string;
  quant: string;
  weight_bytes: number;
  decode_tok_s: number;
  limit_tok_s: number | null;
  weight_gb_s: number;
  gpu_busy: number | null;
  dispatches_per_token: number;
  forward_us: number | null;
  verify_cost: { T: number; us: number; ratio: number }[];
  /** GPU time of one decode forward by op (timestamps, one pass per dispatch, mean of 5). */
  profile: ProfileRow[];
  /** Matrix-vector units in flight per lane (`matvecTuning.unroll`) this row ran with. */
  unroll?: number;
  /** The split-K cap (`attentionTuning.maxSplits`) this row ran with. */
  attn_splits?: number;
  /** The widest one-dispatch block-format product (`matvecTuning.blockMaxT`) it ran with. */
  block_rows?: number;
  /** Which products ran on int8 x (`matvecTuning.int8x`: false none, true q8_0 and q4_0, auto q4_0). */
  int8x?: Int8xSetting;
}

/** Decode and verify cost of a random-weight model of `name`'s shapes in `quant`. */
async function benchDummy(
  gpu: Gpu,
  name: string,
  quant: Exclude<WeightFormat, "f32">,
  tokens: number,
  reps: number,
  peakGbs: number | null,
): Promise<DummyBench> {
  const json = DUMMY_CONFIGS[name];
  if (!json) {
    throw new Error(`--dummy ${name}: unknown (known: ${Object.keys(DUMMY_CONFIGS).join(", ")})`);
  }
  const config = { ...readHfConfig(json, `${name} (dummy)`), eosIds: [] };
  const store = new WeightStore(gpu);
  const maxSeq = 1024;
  const t0 = performance.now();
  const m = await LlamaGpu.createRandom(gpu, store, config, quant, { label: "dummy", maxSeq });
  const dec = new Decoder(gpu, m);
  const since = () => `${((performance.now() - t0) / 1000).toFixed(1)} s`;
  console.log(`  built ${(store.bytes / 2 ** 30).toFixed(2)} GiB of random weights (${since()})`);
  const prompt = Array.from({ length: 32 }, (_, i) => 1000 + i * 37);
  const greedy = { temperature: 0, topK: 0, topP: 1, seed: 0 };
  const quiet = { onTokens: () => {}, cancelled: () => false };
  await dec.generate(prompt, 8, greedy, quiet);
  console.log(`  warm-up done (${since()})`);
  const rates: number[] = [];
  let busy: number | null = null;
  for (let r = 0; r < reps; r++) {
    const res = await dec.generate(prompt, tokens, greedy, quiet);
    rates.push((res.tokens.length - 1) / (res.decodeMs / 1000));
    if (res.gpuMs) busy = (res.gpuMs.draft + res.gpuMs.verify) / res.decodeMs;
    console.log(
      `  rep ${r}: ${rates[r].toFixed(1)} tok/s, ${res.tokens.length} tokens (${since()})`,
    );
  }
  const ids = gpu.upload("dummy.tokens", new Uint32Array(17).fill(1000));
  const verify: { T: number; us: number; ratio: number }[] = [];
  let dispatches = 0;
  let profile: ProfileRow[] = [];
  if (gpu.features.timestamp) {
    m.setPosition(prompt.length);
    profile = await profileDispatches(gpu, await m.plan(1, { buffer: ids, offset: 0 }, "last"), 5);
    for (const T of VERIFY_TS) {
      const plan = await m.plan(T, { buffer: ids, offset: 0 }, T === 1 ? "last" : "all");
      if (T === 1) dispatches = plan.length;
      // One untimed pass first: a model's first passes at a new T ran up to 2x slow (H200).
      m.setPosition(prompt.length);
      await timePass(gpu, plan, 1);
      m.setPosition(prompt.length);
      const us = await timePass(gpu, plan, 7);
      verify.push({ T, us, ratio: us / (verify[0]?.us ?? us) });
    }
  }
  const rate = median(rates), bytes = store.bytes;
  dec.destroy();
  m.destroy();
  store.destroy();
  ids.destroy();
  return {
    model: name,
    quant,
    weight_bytes: bytes,
    decode_tok_s: rate,
    limit_tok_s: peakGbs ? peakGbs * 1e9 / bytes : null,
    weight_gb_s: bytes * rate / 1e9,
    gpu_busy: busy,
    dispatches_per_token: dispatches,
    forward_us: verify[0]?.us ?? null,
    verify_cost: verify,
    profile,
  };
}

/** Memory bandwidth of known adapters (vendor figures, GB/s), for "% of the limit". */
function peakBandwidth(adapter: string): number | null {
  if (/H200/.test(adapter)) return 4800;
  if (/H100.*HBM3/.test(adapter)) return 3350;
  return null;
}

/** One decoding configuration's figures, summed over the prompts. */
export interface SpecRow {
  config: string;
  tok_s: number;
  acceptance: number;
  tokens_per_pass: number;
  speedup: number;
  draft_share: number | null;
  gpu_busy: number | null;
  identical: boolean;
  /** With `--timeline`: where the decode's wall time went, summed over the prompts. */
  idle?: IdleBreakdown;
  /** With `--timeline`: the first prompt's submissions on the host's clock. */
  chunks?: ChunkRow[];
  /** Auto trees: cycles issued per shape ("DxW"), summed over the prompts. */
  tree_cycles?: Record<string, number>;
}

/** Code prompts the decoding benchmarks share. */
export const PROMPTS = [
  CODE,
  "import numpy as np\n\n\ndef softmax(x, axis=-1):\n",
  'class Stack:\n    """A last-in first-out stack."""\n\n    def __init__(self):\n',
  "def parse_args(argv=None):\n    import argparse\n\n    parser = argparse.ArgumentParser(",
];

/** Plain vs speculative greedy decoding of the same prompts, side by side in one process. */
async function benchSpeculative(
  gpu: Gpu,
  targetPath: string,
  draftPath: string,
  tokens: number,
  tokenizer: string | undefined,
  ks: number[],
  trees: (TreeShape | "auto")[],
  ngram: boolean,
  timeline = false,
): Promise<{ rows: SpecRow[]; profiles: CycleProfile[] }> {
  const store = new WeightStore(gpu);
  let t: LlamaGpu, d: LlamaGpu, prompts: number[][];
  if (targetPath.startsWith("dummy:") || draftPath.startsWith("dummy:")) {
    // Random f16 weights at a configuration's shapes: per-op costs and losslessness, not
    // acceptance (a random draft rarely agrees with a random target).
    const dummy = (path: string, label: string, maxLogitRows?: number) => {
      const name = path.replace(/^dummy:/, "");
      const json = DUMMY_CONFIGS[name];
      if (!json) throw new Error(`${path}: unknown dummy (known: ${Object.keys(DUMMY_CONFIGS)})`);
      const config = { ...readHfConfig(json, `${name} (dummy)`), eosIds: [] };
      return LlamaGpu.createRandom(gpu, store, config, "f16", {
        label,
        maxSeq: 1024,
        maxLogitRows,
      });
    };
    t = await dummy(targetPath, "target", targetLogitRows(true));
    d = await dummy(draftPath, "draft");
    prompts = PROMPTS.map((_, i) => Array.from({ length: 48 }, (_, j) => 1000 + 37 * j + 5 * i));
  } else {
    const th = await loadModel(targetPath, { tokenizer }),
      dh = await loadModel(draftPath, { tokenizer });
    const tok = th.tokenizer!;
    const maxSeq = Math.min(th.config.maxSeqLen, dh.config.maxSeqLen, 1024);
    t = await LlamaGpu.create(gpu, store, th, {
      label: "target",
      maxSeq,
      maxLogitRows: targetLogitRows(true),
    });
    d = await LlamaGpu.create(gpu, store, dh, { label: "draft", maxSeq });
    prompts = PROMPTS.map((p) => tok.encode(p, { bos: true }).slice(0, 64));
  }
  const greedy = { temperature: 0, topK: 0, topP: 1, seed: 0 };
  const quiet = { onTokens: () => {}, cancelled: () => false };
  const configs: [string, Speculation, DraftLength, (TreeShape | "auto")?][] = [
    ["plain", { kind: "none" }, 1],
    ...ks.map((k): [string, Speculation, DraftLength] => [
      `draft model k=${k}`,
      { kind: "model", draft: d },
      k,
    ]),
    ["draft model k=auto", { kind: "model", draft: d }, "auto"],
    ...trees.map((s): [string, Speculation, DraftLength, TreeShape | "auto"] => [
      s === "auto" ? "draft tree auto" : `draft tree ${s.depth}x${s.width}`,
      { kind: "model", draft: d },
      s === "auto" ? 4 : s.depth,
      s,
    ]),
  ];
  if (ngram) {
    configs.push(
      ["n-gram k=4", { kind: "ngram", maxN: 3 }, 4],
      ["n-gram k=auto", { kind: "ngram", maxN: 3 }, "auto"],
    );
  }
  const decoders = new Map<string, Decoder>();
  const rows: SpecRow[] = [];
  let plainOut: number[][] = [];
  let plainRate = 0;
  for (const [name, spec, k, tree] of configs) {
    let dec = decoders.get(spec.kind);
    if (!dec) decoders.set(spec.kind, dec = new Decoder(gpu, t, spec));
    dec.timeline = timeline;
    await dec.generate(prompts[0], 16, greedy, quiet, k, tree); // warm-up
    let n = 0, ms = 0, acc = 0, prop = 0, passes = 0, draftMs = 0, gpuMs = 0;
    let idle: IdleBreakdown | undefined;
    let chunks: ChunkRow[] | undefined;
    let treeCycles: Record<string, number> | undefined;
    const outs: number[][] = [];
    for (const p of prompts) {
      const r = await dec.generate(p, tokens, greedy, quiet, k, tree);
      if (r.timeline) {
        const b = idleBreakdown(r.timeline.cycles, r.decodeMs);
        idle = idle ? addIdle(idle, b) : b;
        chunks ??= chunkTimeline(r.timeline);
      }
      for (const [shape, n] of Object.entries(r.treeCycles ?? {})) {
        treeCycles ??= {};
        treeCycles[shape] = (treeCycles[shape] ?? 0) + n;
      }
      outs.push(r.tokens);
      n += r.tokens.length - 1;
      ms += r.decodeMs;
      acc += r.accepted;
      prop += r.proposed;
      passes += r.targetPasses;
      draftMs += r.gpuMs?.draft ?? 0;
      gpuMs += r.gpuMs ? r.gpuMs.draft + r.gpuMs.verify : 0;
    }
    const rate = n / (ms / 1000);
    if (name === "plain") {
      plainOut = outs;
      plainRate = rate;
    }
    rows.push({
      config: name,
      tok_s: rate,
      acceptance: prop ? acc / prop : 0,
      tokens_per_pass: n / passes,
      speedup: rate / plainRate,
      draft_share: gpuMs ? draftMs / gpuMs : null,
      gpu_busy: gpuMs ? gpuMs / ms : null,
      identical: outs.every((o, i) =>
        o.length === plainOut[i].length && o.every((x, j) => x === plainOut[i][j])
      ),
      idle,
      chunks,
      tree_cycles: treeCycles,
    });
    if (treeCycles) {
      const used = Object.entries(treeCycles).map(([shape, n]) => `${shape} ${n}`).join(", ");
      console.log(`    cycles per tree shape: ${used}`);
    }
    console.log(`  ${name}: ${rate.toFixed(1)} tok/s`);
  }
  // Where a cycle's GPU time goes: each dispatch of one cycle timed on its own (plain step, the
  // first chain length, the first fixed tree), after the timed runs (they move the positions).
  const profiles: CycleProfile[] = [];
  if (gpu.features.timestamp) {
    const shape = trees.find((x): x is TreeShape => x !== "auto");
    type Case = [string, Decoder | undefined, number, TreeShape?];
    const cases: Case[] = [["plain", decoders.get("none"), 0]];
    if (ks.length) cases.push([`draft model k=${ks[0]}`, decoders.get("model"), ks[0]]);
    if (shape) {
      cases.push([`draft tree ${shape.depth}x${shape.width}`, decoders.get("model"), 0, shape]);
    }
    for (const [config, dec, k, tree] of cases) {
      if (!dec) continue;
      await dec.generate(prompts[0], 8, greedy, quiet, k || 1, tree); // positions at a real context
      const c = await dec.cycleDispatches(greedy, k, tree);
      const draft = await profileDispatches(gpu, c.draft, 5);
      const verify = await profileDispatches(gpu, c.verify, 5);
      profiles.push({
        config,
        draft_dispatches: c.draft.length,
        verify_dispatches: c.verify.length,
        ops: [
          ...draft.map((r) => ({ ...r, op: `draft: ${r.op}` })),
          ...verify.map((r) => ({ ...r, op: `verify: ${r.op}` })),
        ],
      });
    }
  }
  for (const dec of decoders.values()) dec.destroy();
  t.destroy();
  d.destroy();
  store.destroy();
  return { rows, profiles };
}

/** GPU time per op of one decoding cycle (each dispatch timed alone, µs). */
export interface CycleProfile {
  config: string;
  draft_dispatches: number;
  verify_dispatches: number;
  ops: ProfileRow[];
}

function table(rows: (string | number)[][]): string {
  const cells = rows.map((r) => r.map((c) => typeof c === "number" ? c.toFixed(1) : c));
  const w = cells[0].map((_, i) => Math.max(...cells.map((r) => r[i].length)));
  return cells.map((r) => r.map((c, i) => i ? c.padStart(w[i]) : c.padEnd(w[i])).join("  ")).join(
    "\n",
  );
}

if (import.meta.main) {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      model: { type: "string", multiple: true },
      target: { type: "string" },
      draft: { type: "string" },
      tokenizer: { type: "string" },
      ks: { type: "string", default: "2,3,4,6,8" },
      trees: { type: "string", default: "4x2,6x3" },
      "no-ngram": { type: "boolean" },
      timeline: { type: "boolean" },
      tokens: { type: "string", default: "256" },
      reps: { type: "string", default: "3" },
      rounds: { type: "string", default: "3" },
      matmul: { type: "boolean" },
      verify: { type: "boolean" },
      shapes: { type: "boolean" },
      sweep: { type: "boolean" },
      unroll: { type: "string", default: "1" },
      "attn-splits": { type: "string" },
      "block-rows": { type: "string" },
      "widen-small-k": { type: "string" },
      int8x: { type: "string", default: "auto" },
      dummy: { type: "string", multiple: true },
      quant: { type: "string", multiple: true },
      "peak-gbs": { type: "string" },
      filter: { type: "string" },
      out: { type: "string" },
      json: { type: "boolean" },
    },
  });
  const gpu = await requestGpu();
  console.log(
    `device: ${gpu.adapterName} (f16 ${gpu.features.f16}, timestamps ${gpu.features.timestamp})`,
  );
  console.log(
    `features: subgroups ${gpu.features.subgroups}; WGSL language features: ${
      [
        ...((navigator.gpu as unknown as { wgslLanguageFeatures?: Set<string> })
          .wgslLanguageFeatures ?? []),
      ].join(", ") || "-"
    }`,
  );
  const report: Record<string, unknown> = { device: gpu.adapterName };
  const int8xs = parseInt8x(String(values.int8x));
  if (values.matmul) {
    const rows = await benchMatmul(
      gpu,
      [...PYCODE_CASES, ...LARGE_CASES, ...QUANT_CASES],
      50,
      500,
      Number(values.rounds),
    );
    console.log(`\nmatmul weight bandwidth (GPU timestamps):\n${formatMatmulRows(rows)}`);
    report.matmul = rows;
  }
  if (values.verify || values.shapes || values.sweep) {
    const list = [
      ...(values.verify ? VERIFY_CASES : []),
      ...(values.shapes ? SHAPE_CASES : []),
      ...(values.sweep ? SWEEP_CASES : []),
    ];
    const only = values.filter?.split(",") as string[] | undefined;
    const picked = only
      ? list.filter((c) => only.some((o: string) => `${c.name} ${c.dtype}`.includes(o)))
      : list;
    const rows = [];
    for (const int8x of int8xs) {
      matvecTuning.int8x = int8x;
      const got = await benchMatmul(
        gpu,
        picked,
        50,
        values.sweep ? 300 : 500,
        Number(values.rounds),
      );
      const tag = int8xs.length > 1 ? ` int8x ${int8xName(int8x)}` : "";
      rows.push(...got.map((r) => ({ ...r, name: r.name + tag })));
    }
    matvecTuning.int8x = "auto";
    console.log(`\nmatvec at the verify widths (GPU timestamps):\n${formatMatmulRows(rows)}`);
    report.verify = rows;
  }
  const peak = values["peak-gbs"] ? Number(values["peak-gbs"]) : peakBandwidth(gpu.adapterName);
  const dummies: DummyBench[] = [];
  const unrolls = String(values.unroll).split(",").map(Number);
  const blockRows: number[] = values["block-rows"]?.split(",").map(Number) ?? [MATVEC_BLOCK_MAX_T];
  const splits: number[] = values["attn-splits"]?.split(",").map(Number) ?? [
    attentionTuning.maxSplits,
  ];
  if (values["widen-small-k"]) matvecTuning.widenSmallK = Number(values["widen-small-k"]);
  for (const name of values.dummy ?? []) {
    for (const q of values.quant ?? ["f16"]) {
      const combos = unrolls.flatMap((u) =>
        splits.flatMap((m: number) =>
          blockRows.flatMap((b: number) => int8xs.map((i) => [u, m, b, i] as const))
        )
      );
      for (const [unroll, maxSplits, blockMaxT, int8x] of combos) {
        matvecTuning.unroll = unroll;
        matvecTuning.blockMaxT = blockMaxT;
        matvecTuning.int8x = int8x;
        attentionTuning.maxSplits = maxSplits;
        console.log(
          `dummy ${name} ${q} (matvec unroll ${unroll}, attention splits <= ${maxSplits}, ` +
            `block-format dispatches <= ${blockMaxT} rows, int8x ${int8xName(int8x)}) ...`,
        );
        try {
          dummies.push({
            ...(await benchDummy(
              gpu,
              name,
              q as Exclude<WeightFormat, "f32">,
              Number(values.tokens),
              Number(values.reps),
              peak,
            )),
            unroll,
            attn_splits: maxSplits,
            block_rows: blockMaxT,
            int8x,
          });
        } catch (e) {
          // A format whose block does not divide the model's widths (q4_k at 576): say so, go on.
          if (!(e instanceof RangeError)) throw e;
          console.log(`  skipped: ${e.message}`);
        }
      }
    }
  }
  matvecTuning.unroll = 1;
  matvecTuning.blockMaxT = MATVEC_BLOCK_MAX_T;
  matvecTuning.int8x = "auto";
  attentionTuning.maxSplits = ATTN_MAX_SPLITS;
  report.dummy = dummies;
  if (dummies.length) {
    console.log(
      `\ndummy weights at real shapes, plain greedy decode (median of reps; limit = ${
        peak ?? "?"
      } GB/s / weight bytes)`,
    );
    console.log(table([
      [
        "model",
        "quant",
        "unroll",
        "attn splits",
        "block rows",
        "int8x",
        "weights GiB",
        "tok/s",
        "limit tok/s",
        "% of limit",
        "weight GB/s",
        "GPU busy %",
        "disp/fwd",
        "fwd µs",
        ...VERIFY_TS.slice(1).map((T) => `T=${T}/T=1`),
      ],
      ...dummies.map((d) => [
        d.model,
        d.quant,
        String(d.unroll ?? 1),
        String(d.attn_splits ?? ATTN_MAX_SPLITS),
        String(d.block_rows ?? MATVEC_BLOCK_MAX_T),
        int8xName(d.int8x ?? "auto"),
        (d.weight_bytes / 2 ** 30).toFixed(2),
        d.decode_tok_s,
        d.limit_tok_s ?? "-",
        d.limit_tok_s ? (100 * d.decode_tok_s / d.limit_tok_s).toFixed(0) : "-",
        d.weight_gb_s,
        d.gpu_busy === null ? "-" : (100 * d.gpu_busy).toFixed(0),
        String(d.dispatches_per_token),
        d.forward_us ?? "-",
        ...d.verify_cost.slice(1).map((v) => v.ratio.toFixed(2)),
      ]),
    ]));
    for (const d of dummies.filter((d) => d.profile.length)) {
      console.log(
        `\nGPU time of one decode forward, ${d.model} ${d.quant} unroll ${d.unroll ?? 1} ` +
          `attention splits <= ${d.attn_splits ?? ATTN_MAX_SPLITS} int8x ${
            int8xName(d.int8x ?? "auto")
          } ` +
          "(timestamps, mean of 5)",
      );
      console.log(table([
        ["op", "dispatches", "µs", "share %"],
        ...d.profile.map((p) => [
          p.op,
          String(p.dispatches),
          p.us,
          (100 * p.us / d.profile.reduce((a, q) => a + q.us, 0)).toFixed(1),
        ]),
      ]));
    }
  }
  const models: ModelBench[] = [];
  for (const path of values.model ?? []) {
    console.log(`benchmarking ${path} ...`);
    models.push(await benchModel(gpu, path, Number(values.tokens), Number(values.reps)));
  }
  report.models = models;
  if (models.length) {
    console.log("\nplain greedy decoding (one process, median of reps)");
    console.log(table([
      [
        "model",
        "weights MiB",
        "prefill tok/s",
        "decode tok/s",
        "weight GB/s",
        "disp/tok",
        "kernel µs/tok",
        "GPU busy %",
      ],
      ...models.map((m) => [
        m.model,
        m.params_bytes / 2 ** 20,
        m.prefill_tok_s,
        m.decode_tok_s_median,
        m.weight_gb_s,
        String(m.dispatches_per_token),
        m.kernel_us_per_token,
        m.gpu_busy === null ? "-" : (100 * m.gpu_busy).toFixed(0),
      ]),
    ]));
    for (const m of models.filter((m) => m.profile.length)) {
      console.log(`\nGPU time of one decode forward, ${m.model} (timestamps, mean of 5)`);
      console.log(
        table([
          ["op", "dispatches", "µs"],
          ...m.profile.map((p) => [p.op, String(p.dispatches), p.us]),
        ]),
      );
    }
  }
  if (values.target && values.draft) {
    console.log(`speculative vs plain: ${values.target} with draft ${values.draft}`);
    const { rows, profiles } = await benchSpeculative(
      gpu,
      values.target,
      values.draft,
      Number(values.tokens),
      values.tokenizer,
      String(values.ks).split(",").filter((x: string) => x !== "").map(Number),
      String(values.trees).split(",").filter((x: string) => x !== "").map((x: string) =>
        x === "auto" ? "auto" as const : parseTreeShape(x)
      ),
      values["no-ngram"] !== true,
      values.timeline === true,
    );
    report.speculative = rows;
    report.cycle_profiles = profiles;
    console.log(
      `\ngreedy decoding, ${PROMPTS.length} prompts x ${values.tokens} tokens, one process`,
    );
    console.log(table([
      [
        "config",
        "tok/s",
        "acceptance %",
        "tok/target pass",
        "speedup",
        "draft GPU %",
        "GPU busy %",
        "same output",
      ],
      ...rows.map((r) => [
        r.config,
        r.tok_s,
        100 * r.acceptance,
        r.tokens_per_pass.toFixed(2),
        r.speedup.toFixed(2) + "x",
        r.draft_share === null ? "-" : (100 * r.draft_share).toFixed(0),
        r.gpu_busy === null ? "-" : (100 * r.gpu_busy).toFixed(0),
        r.identical ? "yes" : "NO",
      ]),
    ]));
    const timed = rows.filter((r) => r.idle);
    if (timed.length) {
      console.log(
        "\nwhere the decode's wall time went (ms, summed over the prompts; GPU timestamps):",
      );
      console.log(table([
        [
          "config",
          "wall",
          "in cycles",
          "gaps in chunks",
          "gaps between chunks",
          "chunk gaps",
          "longest",
          "outside span",
          "cycles",
        ],
        ...timed.map((r) => {
          const b = r.idle!;
          return [
            r.config,
            b.wallMs,
            b.cyclesMs,
            b.inChunkMs.toFixed(2),
            b.betweenChunksMs.toFixed(2),
            String(b.chunkGaps),
            b.maxChunkGapMs.toFixed(2),
            b.outsideMs.toFixed(2),
            String(b.cycles),
          ];
        }),
      ]));
    }
    for (const r of timed) {
      console.log(`\n${r.config}, first prompt: submissions on the host's clock (ms)`);
      const f = (v?: number) => v === undefined ? "-" : v.toFixed(2);
      console.log(table([
        ["chunk", "cycles", "encode", "submit", "GPU begin", "GPU end", "GPU busy", "gap before"],
        ...r.chunks!.map((c) => [
          String(c.chunk),
          String(c.cycles),
          f(c.encodeMs),
          f(c.submitMs),
          f(c.beginMs),
          f(c.endMs),
          f(c.busyMs),
          f(c.gapMs),
        ]),
      ]));
    }
    for (const p of profiles) {
      const total = p.ops.reduce((a, o) => a + o.us, 0);
      console.log(
        `\nGPU time of one cycle, ${p.config} (${p.draft_dispatches} draft + ` +
          `${p.verify_dispatches} verify dispatches, each timed alone): ${total.toFixed(1)} µs`,
      );
      console.log(table([
        ["op", "dispatches", "µs", "%"],
        ...p.ops.map((o) => [o.op, String(o.dispatches), o.us, (100 * o.us / total).toFixed(1)]),
      ]));
    }
  }
  if (values.json) console.log(JSON.stringify(report));
  if (values.out) await Deno.writeTextFile(values.out, JSON.stringify(report, null, 2));
}
