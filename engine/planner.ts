/**
 * The VRAM planner: the configurations a model (pair) can run in — weight format per model and KV
 * precision — with their exact bytes at the requested context, the longest context each allows
 * within a budget, and the one `generate --vram` picks: the most precise one that fits (largest
 * weights first, then the KV cache with more bits). Nothing is allocated to find this out.
 *
 * @module
 */
import type { LoadedModel } from "../models/types.ts";
import type { KvDType } from "../kernels/kv_write.ts";
import type { WeightFormat } from "../kernels/qformats.ts";
import { type KeepGroup, planFormats, planQuant, type QuantRequest } from "./quant_plan.ts";
import {
  type AdapterFacts,
  formatBytes,
  longestContext,
  planBuffers,
  planWeights,
  VRAM_CATEGORIES,
  type VramBytes,
  type VramSetup,
} from "./vram.ts";

/** What to plan for. */
export interface PlanRequest {
  /** The target. */
  readonly target: LoadedModel;
  /** A separate draft model. */
  readonly draft?: LoadedModel;
  /** Draft with a quantized copy of the target (`--spec self`). */
  readonly self?: boolean;
  /** Fixed target quantization (`--quant`); otherwise every candidate is listed. */
  readonly quant?: QuantRequest;
  /** Fixed draft quantization (`--draft-quant`); default: the target's (q4_0 for a self-draft). */
  readonly draftQuant?: QuantRequest;
  /** Groups kept at higher precision (default embed, output, first, last). */
  readonly keep?: readonly KeepGroup[];
  /** Format of the kept groups. */
  readonly keepFormat?: WeightFormat;
  /** Fixed KV precision (`--kv`); otherwise f16 (or f32) and q8 are listed. */
  readonly kv?: KvDType;
  /** Requested context (KV rows). */
  readonly ctx: number;
  /** Budget in bytes (none: only the adapter's limits apply). */
  readonly budget?: number;
  /** Whether generation speculates (a draft, self-draft or n-gram). */
  readonly speculative: boolean;
  /** Sequences decoded together (`serve --parallel`; the paged pool is planned above 1). */
  readonly parallel?: number;
  /** Draft tokens per cycle of batched speculation (default 4). */
  readonly batchDraftTokens?: number;
  /** The adapter's limits and features. */
  readonly adapter: AdapterFacts;
  /** Whether the device has shader-f16. */
  readonly f16: boolean;
}

/** One configuration. */
export interface PlanRow {
  /** Target weights: a quantization request, or undefined for the formats as loaded. */
  readonly quant: QuantRequest | undefined;
  /** Draft weights (when there is a draft). */
  readonly draftQuant: QuantRequest | undefined;
  /** KV precision. */
  readonly kv: KvDType;
  /** Formats per target tensor. */
  readonly targetFormats: ReadonlyMap<string, WeightFormat>;
  /** Formats per draft tensor. */
  readonly draftFormats?: ReadonlyMap<string, WeightFormat>;
  /** Exact bytes at the requested context. */
  readonly bytes: VramBytes;
  /** Their sum. */
  readonly total: number;
  /** The longest context that fits the budget (and the adapter); 0 if none does. */
  readonly longest: number;
  /** Whether the requested context fits. */
  readonly fits: boolean;
  /** Adapter-limit problems at the requested context. */
  readonly problems: readonly string[];
  /** Whether `generate --vram` would pick this row. */
  chosen: boolean;
}

const CANDIDATES: (QuantRequest | undefined)[] = [undefined, "f16", "q8_0", "q4_0", "q4_k", "nf4"];

function formatsOf(
  model: LoadedModel,
  quant: QuantRequest | undefined,
  req: PlanRequest,
): Map<string, WeightFormat> {
  return planFormats(model.config, model.tensors, {
    quant,
    keep: req.keep,
    keepFormat: req.keepFormat,
    f16: req.f16,
  });
}

/**
 * Formats of a self-draft: `quant` for the draft's own tensors; every tensor the plan keeps (and
 * every vector) takes the target's format instead, so the store holds it once for both.
 */
export function selfDraftFormats(
  model: LoadedModel,
  targetFormats: ReadonlyMap<string, WeightFormat>,
  quant: QuantRequest,
  req: Pick<PlanRequest, "keep" | "keepFormat" | "f16">,
): Map<string, WeightFormat> {
  const plan = planQuant(model.config, model.tensors, {
    quant,
    keep: req.keep,
    keepFormat: req.keepFormat,
    f16: req.f16,
  });
  const out = new Map<string, WeightFormat>();
  for (const [name, c] of plan) {
    const shared = !c.why.startsWith("quant"); // kept groups, vectors, as-loaded sources
    out.set(name, shared ? targetFormats.get(name) ?? c.format : c.format);
  }
  return out;
}

function sameFormats(a: ReadonlyMap<string, WeightFormat>, b: ReadonlyMap<string, WeightFormat>) {
  if (a.size !== b.size) return false;
  for (const [k, v] of a) if (b.get(k) !== v) return false;
  return true;
}

/** Every configuration of `req`, most precise first, with the one to pick marked. */
export async function planConfigurations(req: PlanRequest): Promise<PlanRow[]> {
  const kvs: KvDType[] = req.kv ? [req.kv] : [req.f16 ? "f16" : "f32", "q8"];
  const quants = req.quant !== undefined ? [req.quant] : CANDIDATES;
  const seen: Map<string, WeightFormat>[] = [];
  const rows: PlanRow[] = [];
  for (const quant of quants) {
    if (quant === "f16" && !req.f16) continue;
    const targetFormats = formatsOf(req.target, quant, req);
    if (seen.some((s) => sameFormats(s, targetFormats))) continue;
    seen.push(targetFormats);
    let draftQuant: QuantRequest | undefined;
    let draftFormats: Map<string, WeightFormat> | undefined;
    if (req.self) {
      draftQuant = req.draftQuant ?? "q4_0";
      draftFormats = selfDraftFormats(req.target, targetFormats, draftQuant, req);
    } else if (req.draft) {
      draftQuant = req.draftQuant ?? quant;
      draftFormats = formatsOf(req.draft, draftQuant, req);
    }
    const draftModel = req.self ? req.target : req.draft;
    for (const kv of kvs) {
      const setup: VramSetup = {
        target: { model: req.target, formats: targetFormats },
        draft: draftModel && draftFormats
          ? { model: draftModel, formats: draftFormats }
          : undefined,
        kv,
        speculative: req.speculative,
        parallel: req.parallel,
        batchDraftTokens: req.batchDraftTokens,
        adapter: req.adapter,
      };
      const weights = await planWeights(setup);
      const buffers = planBuffers(setup, req.ctx);
      const bytes: VramBytes = {
        target_weights: weights.target,
        draft_weights: weights.draft,
        kv_cache: buffers.kv_cache,
        scratch: buffers.scratch,
        staging: buffers.staging,
      };
      const total = VRAM_CATEGORIES.reduce((a, c) => a + bytes[c], 0);
      const problems = [...weights.problems, ...buffers.problems];
      const modelMax = Math.min(
        req.target.config.maxSeqLen,
        req.draft?.config.maxSeqLen ?? Infinity,
      );
      const budget = req.budget ?? Infinity;
      rows.push({
        quant,
        draftQuant,
        kv,
        targetFormats,
        draftFormats,
        bytes,
        total,
        longest: longestContext(setup, weights, budget, modelMax),
        fits: problems.length === 0 && total <= budget,
        problems,
        chosen: false,
      });
    }
  }
  const kvRank = (k: KvDType) => ({ f32: 0, f16: 1, q8: 2 })[k];
  rows.sort((a, b) =>
    (b.bytes.target_weights + b.bytes.draft_weights) -
      (a.bytes.target_weights + a.bytes.draft_weights) || kvRank(a.kv) - kvRank(b.kv)
  );
  const pick = rows.find((r) => r.fits);
  if (pick) pick.chosen = true;
  return rows;
}

/** A row's weight description: "q4_0", or "as loaded (f16)" for no request. */
export function describeWeights(
  quant: QuantRequest | undefined,
  formats: ReadonlyMap<string, WeightFormat>,
): string {
  const counts = new Map<WeightFormat, number>();
  for (const f of formats.values()) counts.set(f, (counts.get(f) ?? 0) + 1);
  const mix = [...counts].sort((a, b) => b[1] - a[1]).map(([f, n]) => `${n} ${f}`).join(", ");
  return `${quant ?? "as loaded"} [${mix}]`;
}

/** The plan as a table a person can read, the picked row marked with "*". */
export function formatPlanTable(rows: readonly PlanRow[], req: PlanRequest): string {
  const hasDraft = rows.some((r) => r.draftFormats);
  const head = ["", "weights", ...(hasDraft ? ["draft"] : []), "kv", "weights", "kv cache"];
  head.push("scratch+staging", `total @${req.ctx}`, "longest ctx", "fits");
  const body = rows.map((r) => [
    r.chosen ? "*" : "",
    r.quant ?? "as loaded",
    ...(hasDraft ? [r.draftQuant ?? "as loaded"] : []),
    r.kv,
    formatBytes(r.bytes.target_weights + r.bytes.draft_weights),
    formatBytes(r.bytes.kv_cache),
    formatBytes(r.bytes.scratch + r.bytes.staging),
    formatBytes(r.total),
    r.longest ? String(r.longest) : "-",
    r.fits ? "yes" : r.problems.length ? "no (adapter limit)" : "no",
  ]);
  const widths = head.map((h, i) => Math.max(h.length, ...body.map((b) => b[i].length)));
  const line = (cells: string[]) =>
    cells.map((c, i) => i === 1 || i === 2 ? c.padEnd(widths[i]) : c.padStart(widths[i]))
      .join("  ").trimEnd();
  const lines = [line(head), ...body.map(line)];
  const budget = req.budget === undefined ? "no budget" : `budget ${formatBytes(req.budget)}`;
  lines.push(`(${budget}; "*" marks what generate picks: the most precise setup that fits)`);
  const problems = new Set(rows.flatMap((r) => r.problems));
  for (const p of problems) lines.push(`adapter limit: ${p}`);
  return lines.join("\n");
}
