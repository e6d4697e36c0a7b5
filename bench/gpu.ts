/**
 * The GPU benchmark: one process measures everything side by side and prints tables (and JSON
 * with --json / --out). Meant for the H100 through ../shared/tools/gpu/README.md, runs anywhere.
 *
 *   deno run -A bench/gpu.ts [--model DIR]... [--target DIR --draft DIR] [--tokens 256]
 *                            [--reps 3] [--matmul] [--out F] [--json]
 *
 * Per model: prefill tok/s (128-token prompt), plain greedy decode tok/s, the weight bytes read
 * per token against the device's bandwidth, and a GPU-timestamp profile of one decode forward.
 */
import { parseArgs } from "@specdec/cli";
import { type Gpu, requestGpu } from "../engine/gpu.ts";
import { WeightStore } from "../engine/weights.ts";
import { Decoder } from "../engine/decode.ts";
import { LlamaGpu } from "../models/llama.ts";
import { loadModel } from "../models/load.ts";
import { profileDispatches, type ProfileRow } from "./profile.ts";
import {
  benchMatmul,
  formatMatmulRows,
  LARGE_CASES,
  PYCODE_CASES,
  QUANT_CASES,
} from "./matmul_cases.ts";
import type { DraftLength, Speculation } from "../engine/decode.ts";

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
  let prefill = 0;
  for (let r = 0; r < reps; r++) {
    const res = await dec.generate(prompt, tokens, greedy, quiet);
    rates.push((res.tokens.length - 1) / (res.decodeMs / 1000));
    prefill = Math.max(prefill, prompt.length / (res.prefillMs / 1000));
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
    profile,
  };
  dec.destroy();
  m.destroy();
  store.destroy();
  dummy.destroy();
  return result;
}

/** One decoding configuration's figures, summed over the prompts. */
export interface SpecRow {
  config: string;
  tok_s: number;
  acceptance: number;
  tokens_per_pass: number;
  speedup: number;
  draft_share: number | null;
  identical: boolean;
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
  tokenizer?: string,
): Promise<SpecRow[]> {
  const th = await loadModel(targetPath, { tokenizer }),
    dh = await loadModel(draftPath, { tokenizer });
  const tok = th.tokenizer!;
  const store = new WeightStore(gpu);
  const maxSeq = Math.min(th.config.maxSeqLen, dh.config.maxSeqLen, 1024);
  const t = await LlamaGpu.create(gpu, store, th, { label: "target", maxSeq });
  const d = await LlamaGpu.create(gpu, store, dh, { label: "draft", maxSeq });
  const prompts = PROMPTS.map((p) => tok.encode(p, { bos: true }).slice(0, 64));
  const greedy = { temperature: 0, topK: 0, topP: 1, seed: 0 };
  const quiet = { onTokens: () => {}, cancelled: () => false };
  const configs: [string, Speculation, DraftLength][] = [
    ["plain", { kind: "none" }, 1],
    ...[2, 3, 4, 6, 8].map((k): [string, Speculation, DraftLength] => [
      `draft model k=${k}`,
      { kind: "model", draft: d },
      k,
    ]),
    ["draft model k=auto", { kind: "model", draft: d }, "auto"],
    ["n-gram k=4", { kind: "ngram", maxN: 3 }, 4],
    ["n-gram k=auto", { kind: "ngram", maxN: 3 }, "auto"],
  ];
  const decoders = new Map<string, Decoder>();
  const rows: SpecRow[] = [];
  let plainOut: number[][] = [];
  let plainRate = 0;
  for (const [name, spec, k] of configs) {
    let dec = decoders.get(spec.kind);
    if (!dec) decoders.set(spec.kind, dec = new Decoder(gpu, t, spec));
    await dec.generate(prompts[0], 16, greedy, quiet, k); // warm-up
    let n = 0, ms = 0, acc = 0, prop = 0, passes = 0, draftMs = 0, gpuMs = 0;
    const outs: number[][] = [];
    for (const p of prompts) {
      const r = await dec.generate(p, tokens, greedy, quiet, k);
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
      identical: outs.every((o, i) =>
        o.length === plainOut[i].length && o.every((x, j) => x === plainOut[i][j])
      ),
    });
    console.log(`  ${name}: ${rate.toFixed(1)} tok/s`);
  }
  for (const dec of decoders.values()) dec.destroy();
  t.destroy();
  d.destroy();
  store.destroy();
  return rows;
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
      tokens: { type: "string", default: "256" },
      reps: { type: "string", default: "3" },
      matmul: { type: "boolean" },
      out: { type: "string" },
      json: { type: "boolean" },
    },
  });
  const gpu = await requestGpu();
  console.log(
    `device: ${gpu.adapterName} (f16 ${gpu.features.f16}, timestamps ${gpu.features.timestamp})`,
  );
  const report: Record<string, unknown> = { device: gpu.adapterName };
  if (values.matmul) {
    const rows = await benchMatmul(gpu, [...PYCODE_CASES, ...LARGE_CASES, ...QUANT_CASES], 50, 500);
    console.log(`\nmatmul weight bandwidth (GPU timestamps):\n${formatMatmulRows(rows)}`);
    report.matmul = rows;
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
      ],
      ...models.map((m) => [
        m.model,
        m.params_bytes / 2 ** 20,
        m.prefill_tok_s,
        m.decode_tok_s_median,
        m.weight_gb_s,
        String(m.dispatches_per_token),
        m.kernel_us_per_token,
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
    const rows = await benchSpeculative(
      gpu,
      values.target,
      values.draft,
      Number(values.tokens),
      values.tokenizer,
    );
    report.speculative = rows;
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
        "same output",
      ],
      ...rows.map((r) => [
        r.config,
        r.tok_s,
        100 * r.acceptance,
        r.tokens_per_pass.toFixed(2),
        r.speedup.toFixed(2) + "x",
        r.draft_share === null ? "-" : (100 * r.draft_share).toFixed(0),
        r.identical ? "yes" : "NO",
      ]),
    ]));
  }
  if (values.json) console.log(JSON.stringify(report));
  if (values.out) await Deno.writeTextFile(values.out, JSON.stringify(report, null, 2));
}
