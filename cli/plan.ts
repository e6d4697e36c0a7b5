/**
 * `plan`: which weight formats and KV precisions fit a VRAM budget (nothing is allocated).
 *
 * @module
 */
import { contextLimitReason, loadModel } from "../models/load.ts";
import { requestGpu } from "../engine/gpu.ts";
import { formatPlanTable, planConfigurations, type PlanRequest } from "../engine/planner.ts";
import { adapterFacts } from "../engine/vram.ts";
import {
  assertReadable,
  bytesFlag,
  type Command,
  COMMON_MODEL,
  numberFlag,
  QUANT_FLAG_SPECS,
  QUANT_FLAGS,
  quantOptions,
  requireString,
  UsageError,
} from "./common.ts";

/** The `plan` command. */
export const plan: Command = {
  summary: "show which weight formats and KV precisions fit a VRAM budget",
  usage:
    `Usage: deno run -A mod.ts plan --model <dir|file> [--draft <dir|file> | --spec self] --ctx <n> [--vram <size>] [flags]

Prints a table of configurations (weight format per model, KV precision) with their exact GPU
bytes at --ctx rows, the longest context each allows within --vram, and whether each fits the
budget and this adapter's limits. "*" marks the one generate --vram would pick: the most precise
setup that fits (largest weights first, then the KV cache with more bits). Nothing is allocated.
Sizes: bytes, or KB/MB/GB (powers of 1000) or KiB/MiB/GiB (powers of 1024).

${COMMON_MODEL}
  --draft <dir|file>    draft model (counted with its own weights, caches and scratch)
  --draft-tokenizer <f> tokenizer of the draft when it carries none
  --spec <kind>         self: plan a self-draft (quantized copy of the target)
  --ctx <n>             context (KV rows) to plan for (default: the model's context length)
  --vram <size>         budget (default: no budget; only the adapter's limits apply)
  --parallel <n>        plan serve --parallel n: a paged KV pool of n contexts (default 1)
${QUANT_FLAGS}
  --no-f16              plan without shader-f16
  --json                one JSON object instead of the table
  --help                this text`,
  flags: {
    model: { type: "string" },
    tokenizer: { type: "string" },
    draft: { type: "string" },
    "draft-tokenizer": { type: "string" },
    spec: { type: "string" },
    ctx: { type: "string" },
    vram: { type: "string" },
    parallel: { type: "string" },
    "no-f16": { type: "boolean" },
    json: { type: "boolean" },
    ...QUANT_FLAG_SPECS,
  },
  run: runPlan,
};

async function runPlan(v: Record<string, string | boolean | undefined>): Promise<number> {
  const model = requireString(v, "model");
  await assertReadable(model, "--model");
  const self = v.spec === "self";
  if (v.spec !== undefined && !self) throw new UsageError(`--spec: plan knows only "self"`);
  const draftPath = typeof v.draft === "string" ? v.draft : undefined;
  if (self && draftPath) throw new UsageError("--spec self drafts with the target: drop --draft");
  if (draftPath) await assertReadable(draftPath, "--draft");
  const q = quantOptions(v);
  const budget = v.vram === undefined ? undefined : bytesFlag(v.vram, "--vram");
  const ctxFlag = v.ctx === undefined ? undefined : numberFlag(v, "ctx", 0, 2, 1 << 24);
  const parallel = numberFlag(v, "parallel", 1, 1, 64);
  const json = v.json === true;
  const progress = json ? undefined : (m: string) => console.error(m);
  const tokenizer = typeof v.tokenizer === "string" ? v.tokenizer : undefined;
  const target = await loadModel(model, { tokenizer, onProgress: progress });
  const draft = draftPath
    ? await loadModel(draftPath, {
      tokenizer: (v["draft-tokenizer"] as string | undefined) ?? tokenizer,
      onProgress: progress,
    })
    : undefined;
  const modelMax = Math.min(target.config.maxSeqLen, draft?.config.maxSeqLen ?? Infinity);
  const ctx = ctxFlag ?? modelMax;
  if (ctx > modelMax) {
    throw new UsageError(
      `--ctx ${ctx} is longer than the model's context length ${modelMax} ` +
        `(${contextLimitReason(target.config, ...(draft ? [draft.config] : []))})`,
    );
  }
  const gpu = await requestGpu({ disableF16: v["no-f16"] === true });
  try {
    const req: PlanRequest = {
      target,
      draft,
      self,
      ...q,
      ctx,
      budget,
      speculative: self || draft !== undefined,
      parallel,
      adapter: adapterFacts(gpu),
      f16: gpu.features.f16,
    };
    const rows = await planConfigurations(req);
    if (json) {
      console.log(JSON.stringify({
        adapter: gpu.adapterName,
        ctx,
        parallel,
        budget: budget ?? null,
        configurations: rows.map((r) => ({
          weights: r.quant ?? "as loaded",
          draft_weights: r.draftFormats ? r.draftQuant ?? "as loaded" : null,
          kv: r.kv,
          bytes: r.bytes,
          total: r.total,
          longest_context: r.longest,
          fits: r.fits,
          chosen: r.chosen,
          problems: r.problems,
        })),
      }));
    } else {
      console.log(
        `${gpu.adapterName}, context ${ctx}` +
          (parallel > 1 ? `, ${parallel} sequences batched (paged KV pool)` : ""),
      );
      console.log(formatPlanTable(rows, req));
    }
    return rows.some((r) => r.chosen) ? 0 : 1;
  } finally {
    gpu.destroy();
  }
}
