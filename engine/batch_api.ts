/**
 * What a server needs from a batching engine: submit a sequence, get its tokens as they come,
 * cancel it, see how full the engine is. `engine/batch.ts` implements it over one GPU (continuous
 * batching over a paged KV cache); the HTTP layer (`cli/serve.ts`) depends only on this module.
 *
 * @module
 */
import type { SamplingSettings } from "./decode.ts";
import type { LoadOptions, StopReason } from "./protocol.ts";
import type { Tokenizer } from "../models/types.ts";

/** What `BatchEngine.load` takes: a model pair as for `generate`, plus the batching limits. */
export interface BatchLoadOptions extends LoadOptions {
  /** Most sequences decoding at once (1..64). */
  parallel: number;
  /** Most sequences waiting for a slot (>= 0); past it, {@linkcode QueueFullError}. */
  maxQueue: number;
  /**
   * Per-sequence context (prompt + generated). The KV pool holds `parallel * ctx` rows per
   * model unless `poolRows` says otherwise. Defaults to the model's context length.
   */
  ctx?: number;
  /** KV rows in each model's pool; default `parallel * ctx` (rounded up to whole blocks). */
  poolRows?: number;
  /** Rows per KV block; default 16. */
  blockSize?: number;
  /** Draft tokens per cycle with a draft model, 1..16; default 4. */
  draftTokens?: number;
  /** Decode cycles per GPU submission (tokens are read back once per chunk); default 8. */
  chunkCycles?: number;
}

/** One sequence to generate. */
export interface SequenceRequest {
  /** Prompt token ids, used as given (the caller adds BOS). */
  prompt: number[];
  /** Most tokens to generate (>= 1). */
  maxTokens: number;
  /** Sampling settings of this sequence (temperature 0: greedy). */
  sampling: SamplingSettings;
}

/** Progress of one sequence. */
export interface SequenceEvents {
  /** New token ids, in order, as the engine reads them back (one or more per call). */
  onTokens(ids: number[]): void;
}

/** Outcome of one sequence. */
export interface SequenceResult {
  /** Every generated id. */
  tokens: number[];
  /**
   * Why it stopped: an EOS id ("eos", included in `tokens`), `maxTokens` ("max-tokens"), the
   * context ("context": prompt + generated reached the per-sequence context) or the caller's
   * signal ("cancelled").
   */
  stop: StopReason;
  /** Prompt length in tokens. */
  promptTokens: number;
  /** Milliseconds from `run` to the first token read back. */
  ttftMs: number;
  /** Milliseconds the sequence waited in the queue before it got a slot. */
  queueMs: number;
  /** Target forward passes this sequence took part in after its prefill. */
  targetPasses: number;
  /** Draft tokens proposed for this sequence (0 without speculation). */
  proposed: number;
  /** Draft tokens accepted. */
  accepted: number;
}

/** How full the engine is. */
export interface BatchUsage {
  /** Sequences decoding now. */
  active: number;
  /** Sequences waiting for a slot or for KV blocks. */
  queued: number;
  /** Most sequences decoding at once. */
  parallel: number;
  /** Most sequences allowed to wait. */
  maxQueue: number;
  /** KV blocks held by sequences (both models share one block table per sequence). */
  blocksUsed: number;
  /** KV blocks in the pool. */
  blocksTotal: number;
  /** Rows per KV block. */
  blockSize: number;
}

/** The queue is full: the request was not admitted (HTTP 503 with `Retry-After`). */
export class QueueFullError extends Error {
  /** A suggested wait before retrying, in seconds. */
  readonly retryAfterS: number;
  /** `message` says how full the queue is. */
  constructor(message: string, retryAfterS: number) {
    super(message);
    this.name = "QueueFullError";
    this.retryAfterS = retryAfterS;
  }
}

/** The prompt (plus at least one generated token) does not fit the per-sequence context. */
export class ContextLengthError extends RangeError {
  /** The per-sequence context in tokens. */
  readonly ctx: number;
  /** The prompt's length in tokens. */
  readonly promptTokens: number;
  /** `message` names both lengths. */
  constructor(message: string, ctx: number, promptTokens: number) {
    super(message);
    this.name = "ContextLengthError";
    this.ctx = ctx;
    this.promptTokens = promptTokens;
  }
}

/** The engine is closing or closed: no new sequences. */
export class EngineClosedError extends Error {
  /** `message` says why. */
  constructor(message: string) {
    super(message);
    this.name = "EngineClosedError";
  }
}

/** A batching engine, as a server sees it. */
export interface Batcher {
  /** Most sequences decoding at once. */
  readonly parallel: number;
  /** Per-sequence context: prompt + generated tokens at most. */
  readonly ctx: number;
  /** Vocabulary size of the model(s). */
  readonly vocabSize: number;
  /** Whether a draft model speculates for every sequence. */
  readonly speculative: boolean;
  /** The target's tokenizer, if it has one. */
  readonly tokenizer: Tokenizer | undefined;
  /** The target's EOS ids. */
  readonly eosIds: readonly number[];
  /**
   * Generates one sequence; resolves when it ends. Rejects at once with
   * {@linkcode ContextLengthError}, {@linkcode QueueFullError} or {@linkcode EngineClosedError};
   * a RangeError for bad ids or settings. Aborting `signal` cancels the sequence (waiting or
   * decoding) and frees its KV blocks; the promise then resolves with stop "cancelled".
   */
  run(
    req: SequenceRequest,
    events: SequenceEvents,
    signal?: AbortSignal,
  ): Promise<SequenceResult>;
  /** Current occupancy. */
  usage(): BatchUsage;
  /**
   * Stops admitting sequences, lets the active and queued ones finish, then frees the GPU.
   * Sequences still running after `graceMs` are cancelled.
   */
  close(graceMs?: number): Promise<void>;
}
