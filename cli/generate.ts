/**
 * `generate`: stream text from a prompt, then one stats line (or one JSON object).
 *
 * @module
 */
import { Engine } from "../engine/engine.ts";
import type { GenerateOptions, GenerateStats } from "../engine/protocol.ts";
import { formatBytes } from "../engine/vram.ts";
import {
  assertReadable,
  bytesFlag,
  type Command,
  COMMON_MODEL,
  numberFlag,
  parseTokenList,
  QUANT_FLAG_SPECS,
  QUANT_FLAGS,
  quantOptions,
  requireString,
  specFlag,
  treeFlag,
  UsageError,
} from "./common.ts";

/** The `generate` command. */
export const generate: Command = {
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
};

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
