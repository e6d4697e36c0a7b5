/**
 * The GPU benchmark: one process measures everything side by side and prints tables (and JSON
 * with --json / --out). Meant for the H100 through ../shared/tools/gpu/README.md, runs anywhere.
 *
 *   deno run -A bench/gpu.ts [--model DIR]... [--tokens 256] [--reps 3] [--matmul] [--out F]
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
    const { benchMatmul, MATMUL_CASES } = await import("./matmul_bench.ts");
    const rows = await benchMatmul(gpu, MATMUL_CASES, 50);
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
  if (values.json) console.log(JSON.stringify(report));
  if (values.out) await Deno.writeTextFile(values.out, JSON.stringify(report, null, 2));
}
