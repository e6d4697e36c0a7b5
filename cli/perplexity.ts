/**
 * `perplexity`: perplexity of a text file (and KL divergence against f16 with `--kl`).
 *
 * @module
 */
import { contextLimitReason, loadModel } from "../models/load.ts";
import { requestGpu } from "../engine/gpu.ts";
import { WeightStore } from "../engine/weights.ts";
import { LlamaGpu } from "../models/llama.ts";
import { planFormats, type QuantRequest } from "../engine/quant_plan.ts";
import { formatBytes } from "../engine/vram.ts";
import { perplexity, PERPLEXITY_DEFINITION } from "../engine/perplexity.ts";
import type { KvDType } from "../kernels/kv_write.ts";
import {
  assertReadable,
  type Command,
  COMMON_MODEL,
  numberFlag,
  QUANT_FLAG_SPECS,
  QUANT_FLAGS,
  quantOptions,
  requireString,
  UsageError,
} from "./common.ts";

/** The `perplexity` command (named so it does not shadow `perplexity()`). */
export const perplexityCommand: Command = {
  summary: "measure perplexity (and KL divergence against f16) on a text file",
  usage:
    `Usage: deno run -A mod.ts perplexity --model <dir|file> --file <text> [--ctx 512] [--quant q] [--kl] [--json]

${PERPLEXITY_DEFINITION}
With --kl the same model is also run unquantized (f16 where the device has shader-f16, else
f32) on the same windows, and the mean KL divergence KL(p_f16 || p_quant) per scored token and
the rate at which both pick the same top token are reported.
Prints a table (with --json one object: ppl, tokens_scored, and kl, top1_agreement with --kl).

${COMMON_MODEL}
  --file <path>         UTF-8 text to score
  --ctx <n>             window length in tokens (default 512)
${QUANT_FLAGS}
  --kl                  compare with the same model at f16
  --no-f16              run in f32 (weights as loaded and the reference in f32)
  --json                one JSON object on stdout
  --help                this text`,
  flags: {
    model: { type: "string" },
    tokenizer: { type: "string" },
    file: { type: "string" },
    ctx: { type: "string" },
    kl: { type: "boolean" },
    "no-f16": { type: "boolean" },
    json: { type: "boolean" },
    ...QUANT_FLAG_SPECS,
  },
  run: runPerplexity,
};

async function runPerplexity(v: Record<string, string | boolean | undefined>): Promise<number> {
  const model = requireString(v, "model");
  const file = requireString(v, "file");
  await assertReadable(model, "--model");
  await assertReadable(file, "--file");
  const ctx = numberFlag(v, "ctx", 512, 2, 1 << 20);
  const q = quantOptions(v);
  const json = v.json === true;
  const noF16 = v["no-f16"] === true;
  const log = (m: string) => json || console.error(m);
  const loaded = await loadModel(model, {
    tokenizer: typeof v.tokenizer === "string" ? v.tokenizer : undefined,
    onProgress: json ? undefined : log,
  });
  if (!loaded.tokenizer) throw new UsageError(`${model} carries no tokenizer: pass --tokenizer`);
  if (ctx > loaded.config.maxSeqLen) {
    throw new UsageError(
      `--ctx ${ctx} is longer than the model's ${loaded.config.maxSeqLen} ` +
        `(${contextLimitReason(loaded.config)})`,
    );
  }
  const text = await Deno.readTextFile(file);
  const tokens = loaded.tokenizer.encode(text, { bos: true });
  const gpu = await requestGpu({ disableF16: noF16 });
  const store = new WeightStore(gpu);
  const f16 = gpu.features.f16 && !noF16;
  const formats = (quant: QuantRequest | undefined) =>
    planFormats(loaded.config, loaded.tensors, {
      quant,
      keep: q.keep,
      keepFormat: q.keepFormat,
      f16,
    });
  const rows = Math.min(ctx, 128);
  const make = (label: string, quant: QuantRequest | undefined, kv?: KvDType) =>
    LlamaGpu.create(gpu, store, loaded, {
      label,
      maxSeq: ctx,
      maxT: rows,
      maxLogitRows: rows,
      noF16,
      formats: formats(quant),
      kv,
    });
  try {
    const m = await make("model", q.quant, q.kv);
    const reference = v.kl ? await make("reference", f16 ? "f16" : "f32") : undefined;
    let last = 0;
    const t0 = performance.now();
    const r = await perplexity(gpu, m, tokens, {
      ctx,
      reference,
      onProgress: (done, total) => {
        const now = performance.now();
        if (json || (now - last < 1000 && done < total)) return;
        last = now;
        const rate = done / ((now - t0) / 1000);
        console.error(`scored ${done}/${total} tokens (${rate.toFixed(0)} tok/s)`);
      },
    });
    const weights = q.quant ?? "as loaded";
    if (json) {
      console.log(JSON.stringify({ ...r, weights, kv: m.kvType, weight_bytes: m.weightBytes }));
    } else {
      const lines: [string, string][] = [
        ["weights", `${weights} (${formatBytes(m.weightBytes)})`],
        ["kv cache", m.kvType],
        ["tokens scored", `${r.tokens_scored} in ${r.windows} windows of ${ctx}`],
        ["perplexity", r.ppl.toFixed(4)],
        ["mean NLL", r.nll.toFixed(5)],
      ];
      if (r.kl !== undefined) lines.push(["KL vs " + (f16 ? "f16" : "f32"), r.kl.toFixed(5)]);
      if (r.top1_agreement !== undefined) {
        lines.push(["same top token", `${(100 * r.top1_agreement).toFixed(2)}%`]);
      }
      for (const [k, val] of lines) console.log(`${k.padEnd(16)} ${val}`);
    }
    return 0;
  } finally {
    store.destroy();
    gpu.destroy();
  }
}
