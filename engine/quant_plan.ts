/**
 * The mixed-precision quantization plan: which storage format every tensor of a model gets, and
 * why. Pure host-side logic over shapes and source dtypes (no data is read), shared by
 * quantize-at-load (`--quant`) and the `quantize` command.
 *
 * Rules, in order:
 * 1. **1-D tensors** (norm weights, biases) are always `f32` (why: "norm", "bias" or "1-D").
 * 2. **No `quant`**: keep what was loaded. Every GGUF block type specdec reads (`q8_0`, `q4_0`,
 *    `q4_1`, `q5_0`, `q5_1`, `q2_k`, `q3_k`, `q4_k`, `q5_k`, `q6_k`: all of llama.cpp's Q*_K_M
 *    mixes) runs as it is, decoded inside the kernels; `f16` stays `f16`; `f32` and `bf16`
 *    become `f32`.
 * 3. **With `quant`**: every 2-D weight gets `quant`, except the kept groups, which get
 *    `keepFormat`. Groups (default `keep` = all four): `embed` = `token_embd.weight`; `output` =
 *    `output.weight`, or `token_embd.weight` when the embeddings are tied; `first` = every matrix
 *    of layer 0; `last` = every matrix of layer nLayers-1. Default `keepFormat`: `q8_0` when
 *    `quant` is a 4-bit format (`q4_0`, `q4_k`, `nf4`), `f16` when it is `q8_0` or `q6_k`, and
 *    `quant` itself when it is `f16` or `f32`.
 * 4. **Row-length fallback**: a block format needs the row length (the last dimension, `in` of a
 *    `[out, in]` weight) to be a multiple of its block. Otherwise: `q4_k` -> `q4_0` -> `f16`;
 *    `q6_k` -> `q8_0` -> `f16`; `nf4` -> `q4_0` -> `f16`; `q8_0`/`q4_0` -> `f16` (why:
 *    "fallback: 576 cols not a multiple of 256"). The pycode target (dim 576) needs this for q4_k.
 * 5. **No re-encoding upward**: a tensor loaded in a GGUF block format (they all run as they
 *    are) is never re-encoded into a different format with as many or more bits per weight
 *    (f32 32, f16 16, q8_0 8.5, q6_k 6.56, q5_1 6, q5_0/q5_k 5.5, q4_1 5, q4_0/q4_k/nf4 4.5,
 *    q3_k 3.44, q2_k 2.63): that would cost memory and
 *    add rounding error without recovering any precision. It stays as loaded (why: "source q4_0
 *    kept: ..."). Going down (a q8_0 tensor asked for q4_0) dequantizes and re-quantizes.
 * 6. **No shader-f16** (`f16: false`): every `f16` choice becomes `f32` (why: "... no shader-f16").
 *
 * @module
 */
import type { DType, HostTensor, ModelConfig } from "../models/types.ts";

import {
  formatBlock,
  isBlockFormat,
  isGgufFormat,
  WEIGHT_FORMATS,
  type WeightFormat,
} from "../kernels/qformats.ts";
export type { WeightFormat };

/** A format the user may ask every weight to be stored in (`--quant`). */
export type QuantRequest = "f32" | "f16" | "q8_0" | "q4_0" | "q4_k" | "q6_k" | "nf4";

/** A group of tensors kept at higher precision by default (see the module rules). */
export type KeepGroup = "embed" | "output" | "first" | "last";

/** Every {@linkcode QuantRequest}, in order of decreasing precision. */
export const QUANT_REQUESTS: readonly QuantRequest[] = [
  "f32",
  "f16",
  "q8_0",
  "q6_k",
  "q4_k",
  "q4_0",
  "nf4",
];

/** Every {@linkcode KeepGroup}; also the default `keep`. */
export const KEEP_GROUPS: readonly KeepGroup[] = ["embed", "output", "first", "last"];

/** Options of {@linkcode planQuant}. */
export interface QuantPlanOptions {
  /** Format for every 2-D weight; absent: keep what was loaded. */
  quant?: QuantRequest;
  /** Groups kept at `keepFormat` (default: all of {@linkcode KEEP_GROUPS}). */
  keep?: readonly KeepGroup[];
  /** Format of the kept groups (default from `quant`: see the module rules). */
  keepFormat?: WeightFormat;
  /** Whether the device has shader-f16 (default true); without it every f16 becomes f32. */
  f16?: boolean;
}

/** The format chosen for one tensor. */
export interface TensorChoice {
  /** Canonical tensor name. */
  name: string;
  /** Shape, outermost first. */
  shape: readonly number[];
  /** Storage type the tensor was loaded in. */
  source: DType;
  /** Storage format chosen. */
  format: WeightFormat;
  /** Why: "quant", "kept: first layer", "fallback: 576 cols not a multiple of 256", "norm"... */
  why: string;
}

/** Bits per weight, for rule 5 (the 4-bit formats count as one tier). */
const BITS: Readonly<Record<WeightFormat, number>> = {
  f32: 32,
  f16: 16,
  q8_0: 8.5,
  q6_k: 6.5625,
  q4_k: 4.5,
  q4_0: 4.5,
  nf4: 4.5,
  q4_1: 5,
  q5_0: 5.5,
  q5_1: 6,
  q2_k: 2.625,
  q3_k: 3.4375,
  q5_k: 5.5,
};

/** The next format to try when a row does not hold whole blocks (rule 4). */
const FALLBACK: Readonly<Partial<Record<WeightFormat, WeightFormat>>> = {
  q4_k: "q4_0",
  q6_k: "q8_0",
  nf4: "q4_0",
  q8_0: "f16",
  q4_0: "f16",
};

/** Source dtypes that run as they are (rule 2 and rule 5). */
const RUNNABLE_BLOCKS: ReadonlySet<DType> = new Set(
  WEIGHT_FORMATS.filter((f) => isBlockFormat(f) && isGgufFormat(f)) as DType[],
);

const KEEP_WHY: Readonly<Record<KeepGroup, string>> = {
  embed: "embeddings",
  output: "output",
  first: "first layer",
  last: "last layer",
};

/** The default format of the kept groups for `quant` (rule 3). */
export function defaultKeepFormat(quant: QuantRequest): WeightFormat {
  if (quant === "q4_0" || quant === "q4_k" || quant === "nf4") return "q8_0";
  if (quant === "q8_0" || quant === "q6_k") return "f16";
  return quant;
}

/** The keep groups tensor `name` belongs to (several when a model has one layer, or is tied). */
function groupsOf(name: string, config: ModelConfig): KeepGroup[] {
  if (name === "token_embd.weight") return config.tiedEmbeddings ? ["embed", "output"] : ["embed"];
  if (name === "output.weight") return ["output"];
  const m = /^blk\.(\d+)\./.exec(name);
  if (!m) return [];
  const l = Number(m[1]), out: KeepGroup[] = [];
  if (l === 0) out.push("first");
  if (l === config.nLayers - 1) out.push("last");
  return out;
}

/** Applies the row-length fallback (rule 4): the format and a note when it changed. */
function fitRows(format: WeightFormat, cols: number): [WeightFormat, string] {
  let f = format;
  const notes: string[] = [];
  while (cols % formatBlock(f) !== 0) {
    notes.push(`${cols} cols not a multiple of ${formatBlock(f)}`);
    f = FALLBACK[f] ?? "f16";
  }
  return [f, notes.length ? `fallback: ${notes.join(", ")} -> ${f}` : ""];
}

function checkMember<T extends string>(what: string, v: unknown, all: readonly T[]): T {
  if (typeof v !== "string" || !(all as readonly string[]).includes(v)) {
    throw new RangeError(`${what} ${JSON.stringify(v)} is not one of ${all.join(", ")}`);
  }
  return v as T;
}

/**
 * Chooses the storage format of every tensor (see the module rules). Reads only names, shapes
 * and source dtypes. Throws a `RangeError` for an unknown `quant`, `keepFormat` or keep group.
 *
 * @example
 * ```ts
 * import { planQuant } from "./quant_plan.ts";
 * import type { HostTensor, ModelConfig } from "../models/types.ts";
 * const config = { nLayers: 3, tiedEmbeddings: true } as ModelConfig;
 * const t = (name: string, shape: number[]): [string, HostTensor] =>
 *   [name, { name, dtype: "f16", shape, data: new Uint8Array(0) }];
 * const tensors = new Map([t("token_embd.weight", [100, 64]), t("blk.1.attn_q.weight", [64, 64])]);
 * const plan = planQuant(config, tensors, { quant: "q4_0" });
 * console.log(plan.get("token_embd.weight")?.format, plan.get("blk.1.attn_q.weight")?.format);
 * // q8_0 q4_0
 * ```
 */
export function planQuant(
  config: ModelConfig,
  tensors: ReadonlyMap<string, HostTensor>,
  opts: QuantPlanOptions,
): Map<string, TensorChoice> {
  const quant = opts.quant === undefined
    ? undefined
    : checkMember("quant", opts.quant, QUANT_REQUESTS);
  const keep = new Set(
    (opts.keep ?? KEEP_GROUPS).map((g) => checkMember("keep group", g, KEEP_GROUPS)),
  );
  const keepFormat = opts.keepFormat === undefined
    ? (quant && defaultKeepFormat(quant))
    : checkMember("keepFormat", opts.keepFormat, QUANT_REQUESTS);
  const hasF16 = opts.f16 ?? true;

  const plan = new Map<string, TensorChoice>();
  for (const [name, t] of tensors) {
    const source = t.dtype;
    const choose = (format: WeightFormat, why: string) => {
      if (format === "f16" && !hasF16) {
        format = "f32";
        why += "; no shader-f16 -> f32";
      }
      plan.set(name, { name, shape: t.shape, source, format, why });
    };
    if (t.shape.length < 2) {
      choose("f32", /norm/.test(name) ? "norm" : name.endsWith(".bias") ? "bias" : "1-D");
      continue;
    }
    if (quant === undefined) {
      if (source === "bf16") choose("f32", "bf16 -> f32");
      else choose(source, "as loaded"); // f32, f16 and every block type run as stored
      continue;
    }
    const kept = groupsOf(name, config).filter((g) => keep.has(g));
    let format: WeightFormat = quant;
    let why = "quant";
    if (kept.length > 0) {
      format = keepFormat!;
      why = `kept: ${kept.map((g) => KEEP_WHY[g]).join(", ")}`;
      if (kept.includes("output") && name === "token_embd.weight" && !kept.includes("embed")) {
        why += " (tied to token_embd)";
      }
    }
    const [fitted, note] = fitRows(format, t.shape[t.shape.length - 1]);
    if (note) why += `; ${note}`;
    if (
      RUNNABLE_BLOCKS.has(source) && fitted !== source &&
      BITS[fitted] >= BITS[source as WeightFormat]
    ) {
      choose(source as WeightFormat, `source ${source} kept: ${why} asks ${fitted}, not lower`);
      continue;
    }
    choose(fitted, why);
  }
  return plan;
}

/**
 * Parses a `--keep` value: a comma-separated list of {@linkcode KeepGroup} names
 * ("embed,output,first,last"), or "none" or "" for no group. Spaces are ignored and repeats
 * collapse. Throws a `RangeError` naming an unknown group and listing the valid ones.
 *
 * @example
 * ```ts
 * import { parseKeep } from "./quant_plan.ts";
 * console.log(parseKeep("embed, last"), parseKeep("none")); // [ "embed", "last" ] []
 * ```
 */
export function parseKeep(s: string): KeepGroup[] {
  const parts = s.split(",").map((p) => p.trim()).filter((p) => p !== "");
  if (parts.length === 1 && parts[0] === "none") return [];
  const out: KeepGroup[] = [];
  for (const p of parts) {
    if (!(KEEP_GROUPS as readonly string[]).includes(p)) {
      const hint = p === "none" ? ' ("none" cannot be combined with groups)' : "";
      throw new RangeError(
        `--keep: unknown group ${JSON.stringify(p)}${hint}; use a comma-separated list of ` +
          `${KEEP_GROUPS.join(", ")}, or "none"`,
      );
    }
    if (!out.includes(p as KeepGroup)) out.push(p as KeepGroup);
  }
  return out;
}

/** Per-format totals of a plan, from {@linkcode summarizePlan}. */
export interface PlanSummary {
  /** Tensor count and parameter count by chosen format. */
  byFormat: Record<string, { tensors: number; params: number }>;
}

/**
 * Counts a plan's tensors and parameters by chosen format (for printing).
 *
 * @example
 * ```ts
 * import { summarizePlan } from "./quant_plan.ts";
 * const w = { name: "w", shape: [4, 32], source: "f16", format: "q8_0", why: "quant" } as const;
 * const plan = new Map([["w", w]]);
 * console.log(summarizePlan(plan).byFormat); // { q8_0: { tensors: 1, params: 128 } }
 * ```
 */
export function summarizePlan(plan: ReadonlyMap<string, TensorChoice>): PlanSummary {
  const byFormat: Record<string, { tensors: number; params: number }> = {};
  for (const c of plan.values()) {
    const s = byFormat[c.format] ??= { tensors: 0, params: 0 };
    s.tensors++;
    s.params += c.shape.reduce((a, b) => a * b, 1);
  }
  return { byFormat };
}

/** {@linkcode planQuant}'s formats alone, by tensor name (what `LlamaGpuOptions.formats` takes). */
export function planFormats(
  config: ModelConfig,
  tensors: ReadonlyMap<string, HostTensor>,
  opts: QuantPlanOptions,
): Map<string, WeightFormat> {
  return new Map([...planQuant(config, tensors, opts)].map(([n, c]) => [n, c.format]));
}
