/**
 * VRAM accounting and planning. The planner computes, before anything is allocated, the exact
 * bytes each GPU buffer of a setup will take, with the same functions the allocating code uses
 * (`storedBytes` and `tensorKey` for the store, `llamaBufferSizes` for caches and scratch,
 * `decoderBytes` for the decoder), so its figures equal what the session then reports.
 *
 * Categories:
 * - `target_weights`: the target's tensors in the store;
 * - `draft_weights`: what the draft adds to the store (tensors it shares with the target, such as
 *   a self-draft's kept embedding, are counted once, under the target);
 * - `kv_cache`: K and V caches of both models, and the paged pool of batched decoding
 *   (`--parallel` > 1, models/llama_batch.ts `llamaBatchSizes`);
 * - `scratch`: activations, logits, attention partials, position state and RoPE tables;
 * - `staging`: the decoder's token rings, draft distributions, run state and readback buffers.
 *
 * Small uniform (params) buffers, a few KiB per compiled plan, are not part of the figures.
 *
 * @module
 */
import type { LoadedModel } from "../models/types.ts";
import type { Gpu } from "./gpu.ts";
import { llamaBufferSizes, plannedInt8xK, uploadList } from "../models/llama.ts";
import { storedBytes, tensorKey } from "./weights.ts";
import { decoderBytes, targetLogitRows } from "./decode.ts";
import { llamaBatchSizes, resolveBatchShape } from "../models/llama_batch.ts";
import { batchDecoderBytes, sessionBatchShapes, specStateBytes } from "./batch.ts";
import type { KvDType } from "../kernels/kv_write.ts";
import type { WeightFormat } from "../kernels/qformats.ts";

/** The reported categories, in order. */
export const VRAM_CATEGORIES = [
  "target_weights",
  "draft_weights",
  "kv_cache",
  "scratch",
  "staging",
] as const;

/** One category of GPU memory. */
export type VramCategory = typeof VRAM_CATEGORIES[number];

/** Bytes per category. */
export type VramBytes = Record<VramCategory, number>;

/** Sum of all categories. */
export function vramTotal(b: VramBytes): number {
  return VRAM_CATEGORIES.reduce((a, c) => a + b[c], 0);
}

/** A model and the stored format of each of its tensors (by plan name). */
export interface PlannedModel {
  /** The host model. */
  readonly model: LoadedModel;
  /** Format per tensor name, as `LlamaGpuOptions.formats` takes it. */
  readonly formats: ReadonlyMap<string, WeightFormat>;
}

/** The adapter facts the plan depends on. */
export interface AdapterFacts {
  /** Largest buffer. */
  readonly maxBufferSize: number;
  /** Largest buffer bound at once (every tensor and cache is bound whole). */
  readonly maxStorageBufferBindingSize: number;
  /** Workgroup memory (fixes the attention plans). */
  readonly maxComputeWorkgroupStorageSize: number;
  /** Whether timestamp queries exist (the speculative decoder then allocates query buffers). */
  readonly timestamps: boolean;
}

/** The facts of `gpu` the planner needs. */
export function adapterFacts(gpu: Gpu): AdapterFacts {
  return {
    maxBufferSize: gpu.limits.maxBufferSize,
    maxStorageBufferBindingSize: gpu.limits.maxStorageBufferBindingSize,
    maxComputeWorkgroupStorageSize: gpu.limits.maxComputeWorkgroupStorageSize,
    timestamps: gpu.features.timestamp,
  };
}

/** Everything that fixes a session's GPU memory. */
export interface VramSetup {
  /** The target and its formats. */
  readonly target: PlannedModel;
  /** The draft and its formats (the same `model` object for a self-draft). */
  readonly draft?: PlannedModel;
  /** KV element type of both models. */
  readonly kv: KvDType;
  /** Whether generation speculates (model draft or n-gram). */
  readonly speculative: boolean;
  /** The adapter. */
  readonly adapter: AdapterFacts;
  /** Rows per forward; default 128 as the session uses. */
  readonly maxT?: number;
  /** Logit rows per forward; default 17 as the session uses. */
  readonly maxLogitRows?: number;
  /**
   * Sequences decoded together (`serve --parallel`); above 1 the target also gets a paged KV
   * pool holding that many full contexts, with its batch activations and scheduler buffers.
   */
  readonly parallel?: number;
  /** Draft tokens per cycle of batched speculation (with a draft and `parallel` > 1); default 4. */
  readonly batchDraftTokens?: number;
}

/** Weight bytes of a setup, and tensors too large for the adapter. */
export interface WeightPlan {
  /** Target bytes. */
  readonly target: number;
  /** Bytes the draft adds. */
  readonly draft: number;
  /** Problems with the adapter's limits ("tensor X needs N bytes > maxStorageBufferBindingSize"). */
  readonly problems: string[];
}

/** The store's bytes for target (and draft), deduplicated exactly like `WeightStore.add`. */
export async function planWeights(setup: Pick<VramSetup, "target" | "draft" | "adapter">) {
  const seen = new Set<string>();
  const problems: string[] = [];
  const limit = setup.adapter.maxStorageBufferBindingSize;
  const add = async (m: PlannedModel) => {
    let bytes = 0;
    for (const { planName, tensor } of uploadList(m.model, m.formats)) {
      const format = m.formats.get(planName);
      if (!format) throw new Error(`${m.model.source}: no stored format planned for ${planName}`);
      const key = await tensorKey(tensor, format);
      if (seen.has(key)) continue;
      seen.add(key);
      const n = storedBytes(tensor.shape, format);
      if (n > limit) {
        problems.push(`${tensor.name} needs ${n} bytes as ${format} > binding limit ${limit}`);
      }
      bytes += n;
    }
    return bytes;
  };
  const target = await add(setup.target);
  const draft = setup.draft ? await add(setup.draft) : 0;
  return { target, draft, problems } satisfies WeightPlan;
}

/**
 * The non-weight bytes at `maxSeq` rows (caches, scratch, staging), and the buffers that would
 * exceed the adapter's limits.
 */
export function planBuffers(
  setup: VramSetup,
  maxSeq: number,
): { kv_cache: number; scratch: number; staging: number; problems: string[] } {
  const a = setup.adapter, problems: string[] = [];
  const shape = {
    maxSeq,
    maxT: setup.maxT ?? 128,
    maxLogitRows: setup.maxLogitRows ?? 17,
    kvType: setup.kv,
    maxWorkgroupStorage: a.maxComputeWorkgroupStorageSize,
  };
  let kv = 0, scratch = 0;
  for (const m of [setup.target, setup.draft]) {
    if (!m) continue;
    // With a draft model the target holds logits for a whole token tree (as the session does).
    const rows = m === setup.target && setup.maxLogitRows === undefined
      ? targetLogitRows(setup.draft !== undefined)
      : shape.maxLogitRows;
    const int8xK = plannedInt8xK(m.model, m.formats);
    const s = llamaBufferSizes(m.model.config, { ...shape, maxLogitRows: rows, int8xK });
    const limit = Math.min(a.maxBufferSize, a.maxStorageBufferBindingSize);
    if (s.kvCache > limit) {
      problems.push(`a ${setup.kv} KV cache of ${maxSeq} rows needs ${s.kvCache} bytes > ${limit}`);
    }
    if (s.act.logits > limit) problems.push(`logits need ${s.act.logits} bytes > ${limit}`);
    kv += 2 * s.kvCache;
    scratch += s.scratch;
  }
  let staging = decoderBytes(
    maxSeq,
    setup.target.model.config.vocabSize,
    setup.speculative,
    a.timestamps,
  );
  if ((setup.parallel ?? 1) > 1) {
    // The batched path: a paged pool and batch activations per model (the draft's when one is
    // loaded, for batched speculation), and the scheduler's buffers.
    const k = setup.draft ? setup.batchDraftTokens ?? 4 : undefined;
    const shapes = sessionBatchShapes(setup.parallel!, maxSeq, k);
    const limit = Math.min(a.maxBufferSize, a.maxStorageBufferBindingSize);
    const models = [[setup.target, shapes.target], [setup.draft, shapes.draft]] as const;
    for (const [m, shape] of models) {
      if (!m || !shape) continue;
      const layout = resolveBatchShape(shape, setup.kv);
      const s = llamaBatchSizes(
        m.model.config,
        layout,
        a.maxComputeWorkgroupStorageSize,
        plannedInt8xK(m.model, m.formats),
      );
      if (s.kv / 2 > limit) {
        problems.push(
          `a ${setup.kv} paged KV pool for ${setup.parallel} sequences of ${maxSeq} rows needs ` +
            `${s.kv / 2} bytes per buffer > ${limit}`,
        );
      }
      if (s.act.logits > limit) problems.push(`batch logits need ${s.act.logits} bytes > ${limit}`);
      kv += s.kv;
      scratch += s.scratch;
      if (m === setup.target) staging += batchDecoderBytes(layout, m.model.config.vocabSize);
    }
    if (k !== undefined) {
      staging += specStateBytes(setup.parallel!, k, setup.target.model.config.vocabSize);
    }
  }
  return { kv_cache: kv, scratch, staging, problems };
}

/** The exact bytes per category of `setup` at `maxSeq` rows, and adapter-limit problems. */
export async function estimateVram(
  setup: VramSetup,
  maxSeq: number,
): Promise<{ bytes: VramBytes; problems: string[] }> {
  const w = await planWeights(setup);
  const b = planBuffers(setup, maxSeq);
  return {
    bytes: {
      target_weights: w.target,
      draft_weights: w.draft,
      kv_cache: b.kv_cache,
      scratch: b.scratch,
      staging: b.staging,
    },
    problems: [...w.problems, ...b.problems],
  };
}

/**
 * The longest context (KV rows, at most `modelMax`) whose total fits `budget` bytes and the
 * adapter's limits, given the weight bytes; 0 when not even 2 rows fit. Memory grows with the
 * context, so this is a binary search over the exact figures.
 */
export function longestContext(
  setup: VramSetup,
  weights: WeightPlan,
  budget: number,
  modelMax: number,
): number {
  if (weights.problems.length > 0) return 0;
  const fits = (rows: number) => {
    const b = planBuffers(setup, rows);
    return b.problems.length === 0 &&
      weights.target + weights.draft + b.kv_cache + b.scratch + b.staging <= budget;
  };
  if (!fits(2)) return 0;
  let lo = 2, hi = modelMax;
  if (fits(hi)) return hi;
  while (hi - lo > 1) {
    const mid = Math.floor((lo + hi) / 2);
    if (fits(mid)) lo = mid;
    else hi = mid;
  }
  return lo;
}

/**
 * Parses a memory budget: a number of bytes, or a number with a unit: KB, MB, GB, TB (powers of
 * 1000) or KiB, MiB, GiB, TiB (powers of 1024), case-insensitive ("6GB", "512MiB", "1.5 GiB").
 */
export function parseBytes(text: string): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*$/i.exec(text);
  if (!m) {
    throw new RangeError(
      `cannot read "${text}" as a memory size: use bytes or a unit, e.g. 6GB, 512MiB, 1.5GiB`,
    );
  }
  const unit = (m[2] ?? "b").toLowerCase();
  const pow = { b: 0, k: 1, m: 2, g: 3, t: 4 }[unit[0] as "b" | "k" | "m" | "g" | "t"];
  const base = unit.includes("i") ? 1024 : 1000;
  const bytes = Math.floor(Number(m[1]) * base ** pow);
  if (!Number.isSafeInteger(bytes) || bytes <= 0) {
    throw new RangeError(`memory size "${text}" must be positive`);
  }
  return bytes;
}

/** `n` bytes for people: "1.23 GiB", "45.6 MiB", "789 KiB", "12 B". */
export function formatBytes(n: number): string {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0, v = n;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return i === 0 ? `${n} B` : `${v.toFixed(v >= 100 ? 0 : v >= 10 ? 1 : 2)} ${units[i]}`;
}
