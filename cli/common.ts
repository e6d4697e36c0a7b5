/**
 * What every command shares: the usage error, the command shape, the model and quantization
 * flags, and the flag parsers (each names the flag in its error).
 *
 * @module
 */
import { loadModel } from "../models/load.ts";
import { loadTokenizerFile } from "../models/tokenizer.ts";
import type { Tokenizer } from "../models/types.ts";
import { type KeepGroup, parseKeep, type QuantRequest } from "../engine/quant_plan.ts";
import { parseBytes } from "../engine/vram.ts";
import type { KvDType } from "../kernels/kv_write.ts";
import type { WeightFormat } from "../kernels/qformats.ts";
import { parseTreeShape } from "../engine/token_tree.ts";

/** A user error: bad flags or an impossible request. Printed without a stack. */
export class UsageError extends Error {
  /** `message` says what was wrong and what to do. */
  constructor(message: string) {
    super(message);
    this.name = "UsageError";
  }
}

/** Flags of one command, as `parseArgs` takes them. */
export type FlagSpec = Record<string, { type: "string" | "boolean"; short?: string }>;

/** One command: its `--help` summary and text, its flags, and what it runs. */
export interface Command {
  /** One line for the command list. */
  summary: string;
  /** The `--help` text. */
  usage: string;
  /** Its flags. */
  flags: FlagSpec;
  /** Runs it with the parsed flags; resolves to the exit code. */
  run(values: Record<string, string | boolean | undefined>): Promise<number>;
}

/** The `--model` and `--tokenizer` lines of the usage texts. */
export const COMMON_MODEL =
  `  --model <dir|file>    Hugging Face folder, .gguf file or llama2.c .bin file
  --tokenizer <file>    tokenizer.model / tokenizer.bin / tokenizer.json for checkpoints without one`;

/** The quantization lines of the usage texts. */
export const QUANT_FLAGS =
  `  --quant <format>      quantize the weights at load: f16, q8_0, q4_0, q4_k, q6_k or nf4 (mixed:
                        --keep groups stay at --keep-format; rows whose length is not a multiple
                        of the block fall back: q4_k -> q4_0 -> f16; default: as loaded)
  --draft-quant <fmt>   the draft's format (default: --quant; q4_0 for --spec self)
  --keep <groups>       kept at higher precision: embed,output,first,last (default) or none
  --keep-format <fmt>   format of the kept groups (default q8_0 for 4-bit --quant, else f16)
  --kv <f16|q8|f32>     KV-cache precision (q8: int8 with one scale per head and row)`;

/** The quantization flags. */
export const QUANT_FLAG_SPECS: FlagSpec = {
  quant: { type: "string" },
  "draft-quant": { type: "string" },
  keep: { type: "string" },
  "keep-format": { type: "string" },
  kv: { type: "string" },
};

/** The string value of `--flag`; a {@linkcode UsageError} when it is missing or empty. */
export function requireString(values: Record<string, unknown>, flag: string): string {
  const v = values[flag];
  if (typeof v !== "string" || v === "") throw new UsageError(`--${flag} is required`);
  return v;
}

/** Parses a numeric flag within [min, max]; integer-only when `int`. */
export function numberFlag(
  values: Record<string, unknown>,
  flag: string,
  def: number,
  min: number,
  max: number,
  int = true,
): number {
  const raw = values[flag];
  if (raw === undefined) return def;
  const n = Number(raw);
  if (
    typeof raw !== "string" || raw.trim() === "" || !Number.isFinite(n) ||
    (int && !Number.isInteger(n))
  ) {
    throw new UsageError(`--${flag} must be ${int ? "an integer" : "a number"}, got "${raw}"`);
  }
  if (n < min || n > max) throw new UsageError(`--${flag} must be in [${min}, ${max}], got ${n}`);
  return n;
}

/** Parses `--prompt-tokens 1,2,3`. */
export function parseTokenList(raw: string, vocabSize?: number): number[] {
  const ids = raw.split(",").map((s) => s.trim());
  return ids.map((s) => {
    const n = Number(s);
    if (s === "" || !Number.isInteger(n) || n < 0) {
      throw new UsageError(`--prompt-tokens: "${s}" is not a token id (want e.g. 1,2,3)`);
    }
    if (vocabSize !== undefined && n >= vocabSize) {
      throw new UsageError(
        `--prompt-tokens: id ${n} is outside the vocabulary (size ${vocabSize})`,
      );
    }
    return n;
  });
}

/** `--draft-tree DxW`, normalized ("6x3"), or undefined. */
export function treeFlag(v: Record<string, unknown>): string | undefined {
  const s = v["draft-tree"];
  if (s === undefined) return undefined;
  if (s === "auto") return "auto";
  try {
    const shape = parseTreeShape(String(s));
    return `${shape.depth}x${shape.width}`;
  } catch (e) {
    throw new UsageError(`--draft-tree: ${(e as Error).message}`);
  }
}

/** `--spec`: model (also for self), ngram or none; default model with --draft. */
export function specFlag(v: Record<string, unknown>): "model" | "ngram" | "none" {
  const s = v.spec ?? (v.draft !== undefined ? "model" : "none");
  if (s === "self") return "model";
  if (s !== "model" && s !== "ngram" && s !== "none") {
    throw new UsageError(`--spec must be model, self, ngram or none, got "${s}"`);
  }
  return s;
}

/** The formats `--quant` accepts. */
export const QUANTS: readonly QuantRequest[] = [
  "f32",
  "f16",
  "q8_0",
  "q4_0",
  "q4_k",
  "q6_k",
  "nf4",
];

/** The value of a quantization flag, checked against {@linkcode QUANTS}. */
export function quantFlag(v: Record<string, unknown>, flag: string): QuantRequest | undefined {
  const q = v[flag];
  if (q === undefined) return undefined;
  if (!QUANTS.includes(q as QuantRequest)) {
    throw new UsageError(`--${flag} must be one of ${QUANTS.join(", ")}, got "${q}"`);
  }
  return q as QuantRequest;
}

/** The quantization flags shared by generate, plan, perplexity and quantize. */
export function quantOptions(v: Record<string, unknown>): {
  quant?: QuantRequest;
  draftQuant?: QuantRequest;
  keep?: KeepGroup[];
  keepFormat?: WeightFormat;
  kv?: KvDType;
} {
  let keep: KeepGroup[] | undefined;
  if (typeof v.keep === "string") {
    try {
      keep = parseKeep(v.keep);
    } catch (e) {
      const msg = (e as Error).message;
      throw new UsageError(msg.startsWith("--keep") ? msg : `--keep: ${msg}`);
    }
  }
  const kv = v.kv;
  if (kv !== undefined && kv !== "f16" && kv !== "q8" && kv !== "f32") {
    throw new UsageError(`--kv must be f16, q8 or f32, got "${kv}"`);
  }
  return {
    quant: quantFlag(v, "quant"),
    draftQuant: quantFlag(v, "draft-quant"),
    keep,
    keepFormat: quantFlag(v, "keep-format"),
    kv: kv as KvDType | undefined,
  };
}

/** A byte size flag (`6GB`, `512MiB`). */
export function bytesFlag(raw: unknown, flag: string): number {
  try {
    return parseBytes(String(raw));
  } catch (e) {
    throw new UsageError(`${flag}: ${(e as Error).message}`);
  }
}

/** A {@linkcode UsageError} unless `path` exists. */
export async function assertReadable(path: string, flag: string): Promise<void> {
  try {
    await Deno.stat(path);
  } catch {
    throw new UsageError(`${flag} ${path}: no such file or folder`);
  }
}

/** The tokenizer named by `--tokenizer`, else the one `--model` carries. */
export async function loadTokenizerFor(v: Record<string, unknown>): Promise<Tokenizer> {
  const model = requireString(v, "model");
  await assertReadable(model, "--model");
  if (typeof v.tokenizer === "string") {
    await assertReadable(v.tokenizer, "--tokenizer");
    return loadTokenizerFile(v.tokenizer);
  }
  const loaded = await loadModel(model);
  if (!loaded.tokenizer) {
    throw new UsageError(`${model} carries no tokenizer: pass --tokenizer <file>`);
  }
  return loaded.tokenizer;
}
