/**
 * The command line: `deno run -A mod.ts <command> [flags]`. Each command validates its flags
 * before any model or GPU work and has its own `--help`.
 *
 * @module
 */
import { parseArgs } from "@specdec/cli";
import { Engine } from "./engine.ts";
import type { GenerateOptions, GenerateStats } from "./protocol.ts";
import { contextLimitReason, loadModel } from "../models/load.ts";
import { loadTokenizerFile } from "../models/tokenizer.ts";
import { formatInspect, inspectModel } from "../models/inspect.ts";
import type { Tokenizer } from "../models/types.ts";
import { requestGpu } from "./gpu.ts";
import { WeightStore } from "./weights.ts";
import { LlamaGpu } from "../models/llama.ts";
import { type KeepGroup, parseKeep, planFormats, type QuantRequest } from "./quant_plan.ts";
import { formatPlanTable, planConfigurations, type PlanRequest } from "./planner.ts";
import { adapterFacts, formatBytes, parseBytes } from "./vram.ts";
import { perplexity, PERPLEXITY_DEFINITION } from "./perplexity.ts";
import { quantizeToGguf } from "./quantize.ts";
import type { KvDType } from "../kernels/kv_write.ts";
import type { WeightFormat } from "../kernels/qformats.ts";
import { parseTreeShape } from "./token_tree.ts";

/** A user error: bad flags or an impossible request. Printed without a stack. */
export class UsageError extends Error {
  /** `message` says what was wrong and what to do. */
  constructor(message: string) {
    super(message);
    this.name = "UsageError";
  }
}

type FlagSpec = Record<string, { type: "string" | "boolean"; short?: string }>;

interface Command {
  summary: string;
  usage: string;
  flags: FlagSpec;
  run(values: Record<string, string | boolean | undefined>): Promise<number>;
}

const COMMON_MODEL = `  --model <dir|file>    Hugging Face folder, .gguf file or llama2.c .bin file
  --tokenizer <file>    tokenizer.model / tokenizer.bin / tokenizer.json for checkpoints without one`;

const QUANT_FLAGS =
  `  --quant <format>      quantize the weights at load: f16, q8_0, q4_0, q4_k, q6_k or nf4 (mixed:
                        --keep groups stay at --keep-format; rows whose length is not a multiple
                        of the block fall back: q4_k -> q4_0 -> f16; default: as loaded)
  --draft-quant <fmt>   the draft's format (default: --quant; q4_0 for --spec self)
  --keep <groups>       kept at higher precision: embed,output,first,last (default) or none
  --keep-format <fmt>   format of the kept groups (default q8_0 for 4-bit --quant, else f16)
  --kv <f16|q8|f32>     KV-cache precision (q8: int8 with one scale per head and row)`;

const QUANT_FLAG_SPECS: FlagSpec = {
  quant: { type: "string" },
  "draft-quant": { type: "string" },
  keep: { type: "string" },
  "keep-format": { type: "string" },
  kv: { type: "string" },
};

const COMMANDS: Record<string, Command> = {
  generate: {
    summary: "generate text from a prompt on the GPU",
    usage:
      `Usage: deno run -A mod.ts generate --model <dir|file> (--prompt "..." | --prompt-tokens 1,2,3) [flags]

Streams the generated text, then prints one stats line (prompt tokens, prefill tok/s, decode tok/s,
time to first token) on stderr. With --json prints exactly one JSON object on stdout:
{"tokens":[...generated ids...],"text":"...","stats":{...}}.
Stops at EOS, --max-tokens, or the model's context length (and says which).
Speculative decoding is lossless: at --temperature 0 it emits exactly the target's greedy tokens,
and when sampling, exactly the target's distribution (Leviathan et al. 2023; Chen et al. 2023).

${COMMON_MODEL}
  --draft <dir|file>    draft model for speculative decoding (same vocabulary as --model)
  --draft-tokenizer <f> tokenizer of the draft when it carries none (default: --tokenizer)
  --spec <kind>         proposals: model (default with --draft), self (a quantized copy of the
                        target drafts, --draft-quant, default q4_0), ngram (prompt lookup, no
                        draft weights) or none (plain decoding)
  --draft-tokens <k>    draft tokens per cycle, 1..16, or auto (follows the acceptance; default 4)
  --draft-tree <DxW>    draft a token tree instead: D levels of W nodes (e.g. 6x3; W <= 8,
                        1 + D*W <= 64), verified in one target pass (lossless when sampling too);
                        auto: the shape is chosen per chunk from forward costs measured at load
                        and the running acceptance (stats tree_shape: the shape most cycles used)
  --compare             also decode plainly on the same prompt and print the measured speedup
  --prompt <text>       prompt, tokenized with BOS
  --prompt-tokens <ids> comma-separated token ids, used as given (nothing added)
  --max-tokens <n>      most tokens to generate (default 256)
  --temperature <t>     0 = greedy (default 0.8)
  --top-k <k>           keep the k most likely tokens, 0 = off (default 40)
  --top-p <p>           nucleus sampling threshold in (0, 1], 1 = off (default 0.95)
  --seed <n>            sampling seed (default 0)
  --ctx <n>             KV-cache rows to allocate (default: the model's context length)
${QUANT_FLAGS}
  --vram <size>         VRAM budget (e.g. 6GB, 512MiB): picks the most precise weights/KV setup
                        that fits (see the plan command), or refuses before allocating anything
  --no-f16              use f32 weights and KV cache even where shader-f16 exists
  --json                one JSON object on stdout instead of streamed text
  --help                this text`,
    flags: {
      model: { type: "string" },
      tokenizer: { type: "string" },
      prompt: { type: "string" },
      "prompt-tokens": { type: "string" },
      "max-tokens": { type: "string" },
      temperature: { type: "string" },
      "top-k": { type: "string" },
      "top-p": { type: "string" },
      seed: { type: "string" },
      ctx: { type: "string" },
      "no-f16": { type: "boolean" },
      draft: { type: "string" },
      "draft-tokenizer": { type: "string" },
      spec: { type: "string" },
      "draft-tokens": { type: "string" },
      "draft-tree": { type: "string" },
      compare: { type: "boolean" },
      json: { type: "boolean" },
      ...QUANT_FLAG_SPECS,
      vram: { type: "string" },
    },
    run: runGenerate,
  },
  plan: {
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
      "no-f16": { type: "boolean" },
      json: { type: "boolean" },
      ...QUANT_FLAG_SPECS,
    },
    run: runPlan,
  },
  perplexity: {
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
  },
  quantize: {
    summary: "quantize a checkpoint and write a standard GGUF (llama.cpp names and types)",
    usage:
      `Usage: deno run -A mod.ts quantize --model <dir|file> --quant <q8_0|q4_0|q4_k|q6_k|f16> --out <file.gguf> [flags]

Quantizes every weight matrix with the mixed plan (--keep groups at --keep-format) and writes a
GGUF v3 that llama.cpp and specdec load (specdec loads it back to identical tensors). nf4 has no
GGUF type: use it at load time (generate --quant nf4). The file is written to a temporary name
and renamed, so --out is never left half-written. Prints a table of formats (with --json one
object).

${COMMON_MODEL}
  --out <file.gguf>     output file
  --quant <format>      q8_0, q4_0, q4_k, q6_k or f16 for every matrix but the kept groups (rows
                        whose length is not a multiple of the block fall back: q4_k -> q4_0 -> f16)
  --keep <groups>       kept at higher precision: embed,output,first,last (default) or none
  --keep-format <fmt>   format of the kept groups (default q8_0 for 4-bit --quant, else f16)
  --json                one JSON object on stdout
  --help                this text`,
    flags: {
      model: { type: "string" },
      tokenizer: { type: "string" },
      out: { type: "string" },
      json: { type: "boolean" },
      quant: { type: "string" },
      keep: { type: "string" },
      "keep-format": { type: "string" },
    },
    run: runQuantize,
  },
  tokenize: {
    summary: "print the token ids of a text",
    usage: `Usage: deno run -A mod.ts tokenize --model <dir|file> --text "..." [--bos] [--json]

Prints the token ids of --text, space-separated (with --json: {"ids":[...]}).
Without --bos no BOS token is added.

${COMMON_MODEL}
  --text <text>         the text to tokenize
  --bos                 add the BOS token first
  --json                print one JSON object {"ids":[...]}
  --help                this text`,
    flags: {
      model: { type: "string" },
      tokenizer: { type: "string" },
      text: { type: "string" },
      bos: { type: "boolean" },
      json: { type: "boolean" },
    },
    run: runTokenize,
  },
  inspect: {
    summary: "print a checkpoint's resolved config and tensor table",
    usage: `Usage: deno run -A mod.ts inspect --model <dir|file> [--json]

Prints the resolved model config and a table of tensors (name, shape, dtype, bytes) with totals.

${COMMON_MODEL}
  --json                print one JSON object instead of tables
  --help                this text`,
    flags: {
      model: { type: "string" },
      tokenizer: { type: "string" },
      json: { type: "boolean" },
    },
    run: runInspect,
  },
};

function mainUsage(): string {
  const lines = Object.entries(COMMANDS).map(([n, c]) => `  ${n.padEnd(10)} ${c.summary}`);
  return `specdec: speculative-decoding LLM inference on WebGPU

Usage: deno run -A mod.ts <command> [flags]   (each command has --help)

Commands:
${lines.join("\n")}`;
}

/** Runs the CLI with `args`; returns the process exit code. */
export async function main(args: string[]): Promise<number> {
  const [name, ...rest] = args;
  if (!name || name === "--help" || name === "-h" || name === "help") {
    console.log(mainUsage());
    return name ? 0 : 2;
  }
  const cmd = COMMANDS[name];
  if (!cmd) {
    console.error(`error: unknown command "${name}"\n\n${mainUsage()}`);
    return 2;
  }
  let values: Record<string, string | boolean | undefined>;
  try {
    values = parseArgs({
      args: rest,
      options: { ...cmd.flags, help: { type: "boolean", short: "h" } },
      strict: true,
      allowPositionals: false,
    }).values as Record<string, string | boolean | undefined>;
  } catch (e) {
    console.error(`error: ${(e as Error).message}\n\n${cmd.usage}`);
    return 2;
  }
  if (values.help) {
    console.log(cmd.usage);
    return 0;
  }
  try {
    return await cmd.run(values);
  } catch (e) {
    if (e instanceof UsageError) {
      console.error(`error: ${e.message}\n(see: deno run -A mod.ts ${name} --help)`);
      return 2;
    }
    const err = e as Error;
    console.error(`error: ${err.message}`);
    if (Deno.env.get("SPECDEC_DEBUG")) console.error(err.stack);
    return 1;
  }
}

function requireString(values: Record<string, unknown>, flag: string): string {
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

async function runGenerate(v: Record<string, string | boolean | undefined>): Promise<number> {
  const model = requireString(v, "model");
  if ((v.prompt === undefined) === (v["prompt-tokens"] === undefined)) {
    throw new UsageError("give exactly one of --prompt or --prompt-tokens");
  }
  const opts: GenerateOptions = {
    prompt: v.prompt as string | undefined,
    promptTokens: v["prompt-tokens"] !== undefined
      ? parseTokenList(v["prompt-tokens"] as string)
      : undefined,
    maxTokens: numberFlag(v, "max-tokens", 256, 1, 1 << 20),
    temperature: numberFlag(v, "temperature", 0.8, 0, 100, false),
    topK: numberFlag(v, "top-k", 40, 0, 1 << 20),
    topP: numberFlag(v, "top-p", 0.95, Number.MIN_VALUE, 1, false),
    seed: numberFlag(v, "seed", 0, 0, 2 ** 32 - 1),
    spec: specFlag(v),
    draftTokens: v["draft-tokens"] === "auto" ? "auto" : numberFlag(v, "draft-tokens", 4, 1, 16),
    draftTree: treeFlag(v),
  };
  if (opts.draftTree !== undefined) {
    if (opts.spec !== "model") {
      throw new UsageError(
        `--draft-tree drafts with a model: pass --draft <dir|file> or --spec self`,
      );
    }
    if (v["draft-tokens"] !== undefined) {
      throw new UsageError("give one of --draft-tokens (a chain) or --draft-tree (a tree)");
    }
  }
  const draft = typeof v.draft === "string" ? v.draft : undefined;
  const selfDraft = v.spec === "self";
  if (selfDraft && draft) throw new UsageError("--spec self drafts with the target: drop --draft");
  if (opts.spec === "model" && !draft && !selfDraft) {
    throw new UsageError("--spec model needs a draft model: pass --draft <dir|file>");
  }
  const quant = quantOptions(v);
  const vram = v.vram === undefined ? undefined : bytesFlag(v.vram, "--vram");
  if (draft) await assertReadable(draft, "--draft");
  if (opts.promptTokens?.length === 0) throw new UsageError("--prompt-tokens is empty");
  const ctx = v.ctx === undefined ? undefined : numberFlag(v, "ctx", 0, 1, 1 << 20);
  await assertReadable(model, "--model");
  if (typeof v.tokenizer === "string") await assertReadable(v.tokenizer, "--tokenizer");
  const json = v.json === true;
  const progress = json ? undefined : (m: string) => console.error(m);
  const engine = await Engine.load(
    {
      model,
      tokenizer: v.tokenizer as string | undefined,
      draft,
      draftTokenizer: v["draft-tokenizer"] as string | undefined,
      maxSeq: ctx,
      noF16: v["no-f16"] === true,
      ...quant,
      selfDraft,
      vram,
    },
    progress,
  );
  const abort = new AbortController();
  const onSigint = () => abort.abort();
  Deno.addSignalListener("SIGINT", onSigint);
  const tokens: number[] = [];
  let text = "";
  const enc = new TextEncoder();
  try {
    const gen = engine.generate(opts, abort.signal);
    let r = await gen.next();
    while (!r.done) {
      tokens.push(...r.value.tokens);
      text += r.value.text;
      if (!json) await Deno.stdout.write(enc.encode(r.value.text));
      r = await gen.next();
    }
    const stats = r.value;
    let compare: Record<string, number> | undefined;
    if (v.compare && stats.stop_reason !== "cancelled") {
      const plain = await drain(
        engine.generate({ ...opts, spec: "none", draftTree: undefined }, abort.signal),
      );
      compare = {
        plain_decode_tok_s: plain.decode_tok_s,
        speedup: stats.decode_tok_s / plain.decode_tok_s,
      };
    }
    if (json) console.log(JSON.stringify({ tokens, text, stats, ...(compare && { compare }) }));
    else {
      console.error(`\n${formatStats(stats)}`);
      if (compare) {
        console.error(
          `[plain decoding of the same prompt: ${compare.plain_decode_tok_s.toFixed(1)} tok/s; ` +
            `speculative speedup ${compare.speedup.toFixed(2)}x]`,
        );
      }
    }
    return stats.stop_reason === "cancelled" ? 130 : 0;
  } finally {
    Deno.removeSignalListener("SIGINT", onSigint);
    await engine.dispose();
  }
}

async function drain(gen: AsyncGenerator<unknown, GenerateStats>): Promise<GenerateStats> {
  let r = await gen.next();
  while (!r.done) r = await gen.next();
  return r.value;
}

function treeFlag(v: Record<string, unknown>): string | undefined {
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

function specFlag(v: Record<string, unknown>): "model" | "ngram" | "none" {
  const s = v.spec ?? (v.draft !== undefined ? "model" : "none");
  if (s === "self") return "model";
  if (s !== "model" && s !== "ngram" && s !== "none") {
    throw new UsageError(`--spec must be model, self, ngram or none, got "${s}"`);
  }
  return s;
}

const QUANTS: readonly QuantRequest[] = ["f32", "f16", "q8_0", "q4_0", "q4_k", "q6_k", "nf4"];

function quantFlag(v: Record<string, unknown>, flag: string): QuantRequest | undefined {
  const q = v[flag];
  if (q === undefined) return undefined;
  if (!QUANTS.includes(q as QuantRequest)) {
    throw new UsageError(`--${flag} must be one of ${QUANTS.join(", ")}, got "${q}"`);
  }
  return q as QuantRequest;
}

/** The quantization flags shared by generate, plan, perplexity and quantize. */
function quantOptions(v: Record<string, unknown>): {
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

function bytesFlag(raw: unknown, flag: string): number {
  try {
    return parseBytes(String(raw));
  } catch (e) {
    throw new UsageError(`${flag}: ${(e as Error).message}`);
  }
}

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
      adapter: adapterFacts(gpu),
      f16: gpu.features.f16,
    };
    const rows = await planConfigurations(req);
    if (json) {
      console.log(JSON.stringify({
        adapter: gpu.adapterName,
        ctx,
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
      console.log(`${gpu.adapterName}, context ${ctx}`);
      console.log(formatPlanTable(rows, req));
    }
    return rows.some((r) => r.chosen) ? 0 : 1;
  } finally {
    gpu.destroy();
  }
}

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

async function runQuantize(v: Record<string, string | boolean | undefined>): Promise<number> {
  const model = requireString(v, "model");
  const out = requireString(v, "out");
  await assertReadable(model, "--model");
  const q = quantOptions(v);
  if (!q.quant) throw new UsageError("--quant is required (q8_0, q4_0, q4_k, q6_k or f16)");
  if (q.quant === "nf4") {
    throw new UsageError("nf4 has no GGUF type; use it at load time: generate --quant nf4");
  }
  const json = v.json === true;
  const r = await quantizeToGguf({
    model,
    tokenizer: typeof v.tokenizer === "string" ? v.tokenizer : undefined,
    quant: q.quant,
    keep: q.keep,
    keepFormat: q.keepFormat,
    out,
    onProgress: json ? undefined : (m) => console.error(m),
  });
  const counts = new Map<string, { tensors: number; bytes: number }>();
  for (const c of r.plan.values()) {
    const e = counts.get(c.format) ?? { tensors: 0, bytes: 0 };
    e.tensors++;
    counts.set(c.format, e);
  }
  if (json) {
    console.log(JSON.stringify({
      out,
      tensors: r.tensors,
      bytes_in: r.bytesIn,
      bytes_out: r.bytesOut,
      formats: Object.fromEntries([...counts].map(([f, e]) => [f, e.tensors])),
    }));
  } else {
    for (const [f, e] of counts) {
      console.log(`${f.padEnd(6)} ${String(e.tensors).padStart(5)} tensors`);
    }
    console.log(
      `wrote ${out}: ${r.tensors} tensors, ${formatBytes(r.bytesIn)} -> ${formatBytes(r.bytesOut)}`,
    );
  }
  return 0;
}

/** One human-readable stats line. */
export function formatStats(s: GenerateStats): string {
  const reason = {
    "eos": "end of sequence",
    "max-tokens": "reached --max-tokens",
    "context": "reached the context length",
    "cancelled": "cancelled",
  }[s.stop_reason];
  return `[prompt ${s.prompt_tokens} tok, prefill ${s.prefill_tok_s.toFixed(1)} tok/s | ` +
    `generated ${s.generated_tokens} tok, decode ${s.decode_tok_s.toFixed(1)} tok/s | ` +
    `first token ${s.ttft_ms.toFixed(0)} ms | VRAM ${formatBytes(s.vram_bytes)} ` +
    `(weights ${formatBytes(s.vram.target_weights + s.vram.draft_weights)}, ` +
    `KV ${formatBytes(s.vram.kv_cache)}) | ` +
    (s.gpu_busy === null ? "" : `GPU busy ${(100 * s.gpu_busy).toFixed(0)}% | `) +
    (s.spec === "none"
      ? ""
      : `spec ${s.spec}: acceptance ${(100 * s.acceptance_rate).toFixed(1)}%, ` +
        `${s.tokens_per_pass.toFixed(2)} tok/target pass` +
        (s.tree_shape ? `, tree ${s.tree_shape}` : "") +
        (s.draft_time_share === null
          ? ""
          : `, draft ${(100 * s.draft_time_share).toFixed(0)}% of GPU time`) +
        " | ") +
    `stopped: ${reason}]`;
}

async function assertReadable(path: string, flag: string): Promise<void> {
  try {
    await Deno.stat(path);
  } catch {
    throw new UsageError(`${flag} ${path}: no such file or folder`);
  }
}

async function loadTokenizerFor(v: Record<string, unknown>): Promise<Tokenizer> {
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

async function runTokenize(v: Record<string, string | boolean | undefined>): Promise<number> {
  const text = v.text;
  if (typeof text !== "string") throw new UsageError("--text is required");
  const tok = await loadTokenizerFor(v);
  const ids = tok.encode(text, { bos: v.bos === true });
  console.log(v.json ? JSON.stringify({ ids }) : ids.join(" "));
  return 0;
}

async function runInspect(v: Record<string, string | boolean | undefined>): Promise<number> {
  const model = requireString(v, "model");
  await assertReadable(model, "--model");
  const loaded = await loadModel(model, {
    tokenizer: typeof v.tokenizer === "string" ? v.tokenizer : undefined,
  });
  const result = inspectModel(loaded);
  console.log(v.json ? JSON.stringify(result) : formatInspect(result));
  return 0;
}
