/**
 * Messages between the main thread (`Engine`) and the GPU worker, and the public option/result
 * types they carry.
 *
 * @module
 */
import type { KeepGroup, QuantRequest } from "./quant_plan.ts";
import type { KvDType } from "../kernels/kv_write.ts";
import type { WeightFormat } from "../kernels/qformats.ts";
import type { VramBytes } from "./vram.ts";

/** Options for loading a model pair. */
export interface LoadOptions {
  /** Target model: a Hugging Face folder, a `.gguf` file or a llama2.c `.bin` file. */
  model: string;
  /** Tokenizer file, for checkpoints that do not carry one (llama2.c `.bin`). */
  tokenizer?: string;
  /** Draft model for speculative decoding (same vocabulary as the target). */
  draft?: string;
  /** Tokenizer file of the draft, when it carries none (compared with the target's). */
  draftTokenizer?: string;
  /** KV-cache rows to allocate (defaults to the model's context length). */
  maxSeq?: number;
  /** Use f32 weights and KV cache even where `shader-f16` exists. */
  noF16?: boolean;
  /** Quantize the target's weights at load (mixed plan, see `keep`); default: as loaded. */
  quant?: QuantRequest;
  /** Quantize the draft's weights at load; default: `quant` (q4_0 for a self-draft). */
  draftQuant?: QuantRequest;
  /** Groups kept at higher precision when quantizing; default embed, output, first, last. */
  keep?: KeepGroup[];
  /** Format of the kept groups; default q8_0 for 4-bit quantization, f16 otherwise. */
  keepFormat?: WeightFormat;
  /** Draft with a quantized copy of the target itself (`--spec self`). */
  selfDraft?: boolean;
  /** KV-cache precision; default f16 (f32 without shader-f16). */
  kv?: KvDType;
  /**
   * VRAM budget in bytes: pick the most precise configuration that fits (formats and KV not
   * given explicitly are chosen), or refuse before allocating with the table of options.
   */
  vram?: number;
  /**
   * Sequences decoded together (continuous batching over a paged KV pool, engine/batch.ts);
   * default 1: one generation at a time. Above 1, plain generations and greedy ones speculating
   * with the loaded draft run batched and concurrently ({@linkcode batchMode}); the others still
   * take turns on the serial path.
   */
  parallel?: number;
  /** Draft tokens per cycle of batched speculation (`parallel` > 1 with a draft); default 4. */
  batchDraftTokens?: number;
}

/** Sampling and stopping options for one generation. */
export interface GenerateOptions {
  /** Prompt text, tokenized with BOS. */
  prompt?: string;
  /** Prompt token ids, used as given (nothing added). */
  promptTokens?: number[];
  /** Most tokens to generate. */
  maxTokens: number;
  /** Softmax temperature; 0 means greedy. */
  temperature: number;
  /** Keep the k most likely tokens (0: off). */
  topK: number;
  /** Keep the smallest set whose probability reaches p (1: off). */
  topP: number;
  /** RNG seed for sampling. */
  seed: number;
  /** Proposal source: "model" (the loaded draft), "ngram" (prompt lookup) or "none". Default:
   * "model" when a draft is loaded, else "none". */
  spec?: "model" | "ngram" | "none";
  /** Draft tokens per cycle, 1..16, or "auto" (follows the running acceptance). Default 4. */
  draftTokens?: number | "auto";
  /**
   * Draft a token tree instead of a chain (a draft model): "DEPTHxWIDTH" such as
   * "6x3" (depth levels of width nodes, 1 + depth * width <= 64), or "auto" (the shape is chosen
   * per chunk from forward costs measured once per load and the running acceptance; the stats'
   * `tree_shape` is then the shape most cycles used). Overrides `draftTokens`.
   */
  draftTree?: string;
}

/** Why generation stopped. */
export type StopReason = "eos" | "max-tokens" | "context" | "cancelled";

/** Measured figures of one generation. */
export interface GenerateStats {
  /** Prompt length in tokens. */
  prompt_tokens: number;
  /** Tokens generated. */
  generated_tokens: number;
  /** Prompt tokens per second during prefill. */
  prefill_tok_s: number;
  /** Generated tokens per second after the first. */
  decode_tok_s: number;
  /** Milliseconds from request to the first generated token on the host. */
  ttft_ms: number;
  /** Why it stopped. */
  stop_reason: StopReason;
  /** GPU bytes allocated (the sum of `vram`). */
  vram_bytes: number;
  /** GPU bytes by category, from the buffers actually created. */
  vram: VramBytes;
  /** Proposal source used. */
  spec: "model" | "ngram" | "none";
  /** Accepted draft tokens / proposed draft tokens (0 without speculation). */
  acceptance_rate: number;
  /** Draft tokens proposed. */
  proposed_tokens: number;
  /** Draft tokens accepted. */
  accepted_tokens: number;
  /** Target forward passes after prefill. */
  target_passes: number;
  /** Tokens emitted per target forward pass after prefill (1 for plain decoding). */
  tokens_per_pass: number;
  /** The draft tree's shape ("6x3") when tree speculation ran, else null. */
  tree_shape: string | null;
  /** Share of decode GPU time spent drafting (null where timestamps are unavailable). */
  draft_time_share: number | null;
  /** Share of decode GPU time spent verifying, accepting and committing. */
  verify_time_share: number | null;
  /**
   * GPU busy during decode: kernel time (timestamps) over wall time, 1 = the GPU never waited for
   * the CPU (null where timestamps are unavailable).
   */
  gpu_busy: number | null;
}

/** A piece of streamed output. */
export interface GenerateChunk {
  /** Text completed by these tokens (may be empty mid UTF-8 sequence). */
  text: string;
  /** The token ids. */
  tokens: number[];
}

/** What the worker reports after loading. */
export interface ModelInfo {
  /** Adapter description. */
  adapter: string;
  /** Whether the KV cache is f16. */
  f16: boolean;
  /** KV-cache element type. */
  kv: KvDType;
  /** Stored tensors per weight format, per model. */
  formats: {
    target: Partial<Record<WeightFormat, number>>;
    draft?: Partial<Record<WeightFormat, number>>;
  };
  /** Model context length. */
  maxSeqLen: number;
  /** Allocated KV rows. */
  kvRows: number;
  /** Vocabulary size. */
  vocabSize: number;
  /** Whether a draft model is loaded. */
  draft: boolean;
  /** Sequences decoded together (1: one at a time). */
  parallel: number;
  /** GPU bytes allocated by category. */
  vram: VramBytes;
}

/** The batched decoder's load (engine/batch.ts `BatchLoad`), or null when not batching. */
export interface BatchFigures {
  /** Sequences decoding now. */
  active: number;
  /** Requests waiting for a slot or KV blocks. */
  waiting: number;
  /** Paged KV blocks held by sequences. */
  blocksInUse: number;
  /** Blocks in the pool. */
  blocks: number;
  /** Chunks (submissions with a readback) run since load. */
  chunks: number;
  /** Of them, chunks that continued from the GPU's state behind one in flight. */
  continued: number;
  /** Host ms the GPU had nothing to run while sequences decoded (readbacks with nothing behind). */
  waitedMs: number;
}

/**
 * How a generation runs when `parallel` > 1 (engine/batch.ts): "plain" (batched without
 * speculation: `spec` "none", any sampling), "speculative" (batched with the loaded draft: `spec`
 * "model", the default with a draft, greedy only, no draft tree) or "serial" (one at a time, the
 * path of `parallel` 1: n-gram or tree speculation, sampled speculation). The session, the engine
 * and the server decide with this one rule.
 */
export function batchMode(
  parallel: number,
  draftLoaded: boolean,
  o: Pick<Partial<GenerateOptions>, "spec" | "draftTree" | "temperature">,
): "plain" | "speculative" | "serial" {
  const spec = o.spec ?? (draftLoaded ? "model" : "none");
  if (parallel <= 1 || o.draftTree !== undefined) return "serial";
  if (spec === "none") return "plain";
  if (spec === "model" && draftLoaded && o.temperature === 0) return "speculative";
  return "serial";
}

/**
 * Whether a server configured with `spec` and `draftTree` can run requests batched (its queue
 * then admits `parallel` at once): plain decoding, or speculation with a loaded draft.
 */
export function serverBatches(
  parallel: number,
  draftLoaded: boolean,
  spec: GenerateOptions["spec"],
  draftTree?: string,
): boolean {
  return batchMode(parallel, draftLoaded, { spec, draftTree, temperature: 0 }) !== "serial";
}

/** Main thread → worker. */
export type Request =
  | { id: number; type: "load"; options: LoadOptions }
  | { id: number; type: "tokenize"; text: string; bos: boolean; specials?: string[] }
  | { id: number; type: "generate"; options: GenerateOptions }
  | { id: number; type: "cancel"; target: number }
  | { id: number; type: "batchLoad" }
  | { id: number; type: "dispose" };

/** Worker → main thread. */
export type Response =
  | { id: number; type: "progress"; message: string }
  | { id: number; type: "loaded"; info: ModelInfo }
  | { id: number; type: "result"; value: unknown }
  | { id: number; type: "chunk"; chunk: GenerateChunk }
  | { id: number; type: "done"; stats: GenerateStats }
  | { id: number; type: "error"; name: string; message: string; stack: string };
