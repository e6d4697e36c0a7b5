/**
 * The command line: `deno run -A mod.ts <command> [flags]`. Each command validates its flags
 * before any model or GPU work and has its own `--help`.
 *
 * @module
 */
import { parseArgs } from "@specdec/cli";
import { Engine } from "./engine.ts";
import type { GenerateOptions, GenerateStats } from "./protocol.ts";
import { loadModel } from "../models/load.ts";
import { loadTokenizerFile } from "../models/tokenizer.ts";
import { formatInspect, inspectModel } from "../models/inspect.ts";
import type { Tokenizer } from "../models/types.ts";

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
  --spec <kind>         proposals: model (default with --draft), ngram (prompt lookup, no draft
                        weights) or none (plain decoding)
  --draft-tokens <k>    draft tokens per cycle, 1..16, or auto (follows the acceptance; default 4)
  --compare             also decode plainly on the same prompt and print the measured speedup
  --prompt <text>       prompt, tokenized with BOS
  --prompt-tokens <ids> comma-separated token ids, used as given (nothing added)
  --max-tokens <n>      most tokens to generate (default 256)
  --temperature <t>     0 = greedy (default 0.8)
  --top-k <k>           keep the k most likely tokens, 0 = off (default 40)
  --top-p <p>           nucleus sampling threshold in (0, 1], 1 = off (default 0.95)
  --seed <n>            sampling seed (default 0)
  --ctx <n>             KV-cache rows to allocate (default: the model's context length)
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
      compare: { type: "boolean" },
      json: { type: "boolean" },
    },
    run: runGenerate,
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
  };
  const draft = typeof v.draft === "string" ? v.draft : undefined;
  if (opts.spec === "model" && !draft) {
    throw new UsageError("--spec model needs a draft model: pass --draft <dir|file>");
  }
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
      const plain = await drain(engine.generate({ ...opts, spec: "none" }, abort.signal));
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

function specFlag(v: Record<string, unknown>): "model" | "ngram" | "none" {
  const s = v.spec ?? (v.draft !== undefined ? "model" : "none");
  if (s !== "model" && s !== "ngram" && s !== "none") {
    throw new UsageError(`--spec must be model, ngram or none, got "${s}"`);
  }
  return s;
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
    `first token ${s.ttft_ms.toFixed(0)} ms | VRAM ${(s.vram_bytes / 2 ** 20).toFixed(1)} MiB | ` +
    (s.spec === "none"
      ? ""
      : `spec ${s.spec}: acceptance ${(100 * s.acceptance_rate).toFixed(1)}%, ` +
        `${s.tokens_per_pass.toFixed(2)} tok/target pass` +
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
