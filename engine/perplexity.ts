/**
 * Quality checks of a model on a text: perplexity, and with a reference model (the same weights
 * at higher precision) the mean KL divergence and the top-token agreement rate.
 *
 * The tokens are cut into non-overlapping windows of `ctx` tokens, each run from an empty cache
 * in chunks of rows with logits for every row: by default as many rows as the models allow
 * (prefill-sized products: the chunked or tiled matmul path), or with `rows` at most that many
 * per chunk, so that every product runs as in decode and speculative verify (8 rows: the
 * matrix-vector path of block formats, where `matvecTuning.int8x` applies). Row i of a window
 * predicts token i + 1, so only the first n - 1 tokens of an n-token window are forwarded; each
 * forwarded row is scored. The log-softmax, KL and argmax are computed on the CPU in f64 from the
 * logits read back per chunk.
 *
 * @module
 */
import type { Gpu } from "./gpu.ts";
import type { LlamaGpu } from "../models/llama.ts";

/**
 * The definition, printed by `perplexity --help`: tokens = [BOS] + encode(text); non-overlapping
 * windows of ctx tokens from the start, each from an empty cache; every token after the first of
 * each window is scored; PPL = exp(mean NLL).
 */
export const PERPLEXITY_DEFINITION: string =
  "Perplexity: tokens = [BOS] + encode(text), cut into non-overlapping windows of ctx tokens " +
  "from the start (the last window may be shorter; a 1-token remainder is dropped). Each window " +
  "is evaluated from an empty cache, and every token after the first of each window is scored " +
  "with its negative log-likelihood given the tokens before it in its window. " +
  "PPL = exp(mean NLL) over all scored tokens. With --kl, the same model at f16 is the " +
  "reference p_ref: KL = mean over scored tokens of KL(p_ref || p_model), and top1_agreement = " +
  "the fraction of scored tokens where both models' most likely next token is the same.";

/** What {@linkcode perplexity} measured. */
export interface PerplexityResult {
  /** exp(nll). */
  ppl: number;
  /** Mean negative log-likelihood (natural log) per scored token. */
  nll: number;
  /** Tokens scored: the sum over windows of (window length - 1). */
  tokens_scored: number;
  /** Windows evaluated. */
  windows: number;
  /** Window length in tokens. */
  ctx: number;
  /** Mean KL(p_ref || p_model) per scored token, in nats (only with a reference). */
  kl?: number;
  /** Fraction of scored tokens where both argmaxes agree (only with a reference). */
  top1_agreement?: number;
}

/** Options of {@linkcode perplexity}. */
export interface PerplexityOptions {
  /** Window length in tokens: at least 2, at most the model's (and reference's) maxSeq. */
  ctx: number;
  /**
   * The same model at higher precision (e.g. f16 when `model` is quantized): a separate
   * {@linkcode LlamaGpu} with the same vocabulary and maxSeq >= ctx.
   */
  reference?: LlamaGpu;
  /**
   * At most this many rows per forward (an integer >= 1; default: as many as both models'
   * `maxT` and `maxLogitRows` allow). It only chooses the matmul path each chunk's products
   * take, so the scores differ by that path's arithmetic alone (rounding, or int8 activations
   * with `matvecTuning.int8x`): e.g. 8 for the matrix-vector path of block formats that decode
   * and verify use.
   */
  rows?: number;
  /** Called after each chunk with the tokens scored so far and the total to score. */
  onProgress?: (scored: number, total: number) => void;
}

/**
 * The windows {@linkcode perplexity} evaluates: `tokens` cut into non-overlapping runs of `ctx`
 * tokens from the start. The last window may be shorter; a last window of one token would score
 * nothing and is dropped.
 *
 * @example
 * ```ts
 * import { perplexityTokens } from "./perplexity.ts";
 * console.log(perplexityTokens([1, 2, 3, 4, 5, 6, 7], 3)); // [[1, 2, 3], [4, 5, 6]]
 * console.log(perplexityTokens([1, 2, 3, 4, 5], 3)); // [[1, 2, 3], [4, 5]]
 * ```
 */
export function perplexityTokens(tokens: readonly number[], ctx: number): number[][] {
  if (!Number.isInteger(ctx) || ctx < 2) {
    throw new RangeError(`perplexity: ctx must be an integer >= 2, got ${ctx}`);
  }
  if (tokens.length < 2) {
    throw new RangeError(
      `perplexity: need at least 2 tokens to score one, got ${tokens.length} (is the text empty?)`,
    );
  }
  const windows: number[][] = [];
  for (let start = 0; start < tokens.length; start += ctx) {
    const w = tokens.slice(start, start + ctx);
    if (w.length >= 2) windows.push(w);
  }
  return windows;
}

/**
 * Perplexity of `model` on `tokens` (already `[BOS] + encode(text)`), as stated in
 * {@linkcode PERPLEXITY_DEFINITION}. With `opts.reference`, both models run on the same chunks
 * and the result also holds the mean KL(p_ref || p_model) and the top-1 agreement rate.
 * Each window resets the cache position of the model(s) to 0.
 *
 * @example
 * ```ts ignore
 * import { perplexity } from "./perplexity.ts";
 * const tokens = [tokenizer.bosId!, ...tokenizer.encode(text)];
 * const r = await perplexity(gpu, target, tokens, { ctx: 512, reference: targetF16 });
 * console.log(r.ppl, r.tokens_scored, r.kl, r.top1_agreement);
 * ```
 */
export async function perplexity(
  gpu: Gpu,
  model: LlamaGpu,
  tokens: readonly number[],
  opts: PerplexityOptions,
): Promise<PerplexityResult> {
  const { ctx, reference, rows, onProgress } = opts;
  const V = model.config.vocabSize;
  const windows = perplexityTokens(tokens, ctx);
  if (rows !== undefined && (!Number.isInteger(rows) || rows < 1)) {
    throw new RangeError(`perplexity: rows must be an integer >= 1, got ${rows}`);
  }
  if (ctx > model.maxSeq) {
    throw new RangeError(
      `perplexity: ctx ${ctx} exceeds the model's KV cache of ${model.maxSeq} rows ` +
        `(create it with maxSeq >= ctx, or pass a smaller ctx)`,
    );
  }
  for (let i = 0; i < tokens.length; i++) {
    const t = tokens[i];
    if (!Number.isInteger(t) || t < 0 || t >= V) {
      throw new RangeError(`perplexity: token ${i} is ${t}, outside the vocabulary [0, ${V})`);
    }
  }
  if (reference) {
    if (reference === model) {
      throw new Error(
        "perplexity: the reference must be a separate LlamaGpu (it runs beside the model on " +
          "the same chunks); create a second one from the same weights",
      );
    }
    if (reference.config.vocabSize !== V) {
      throw new RangeError(
        `perplexity: the reference's vocabulary has ${reference.config.vocabSize} tokens, ` +
          `the model's ${V}; KL needs the same vocabulary`,
      );
    }
    if (ctx > reference.maxSeq) {
      throw new RangeError(
        `perplexity: ctx ${ctx} exceeds the reference's KV cache of ${reference.maxSeq} rows`,
      );
    }
  }
  const models = reference ? [model, reference] : [model];
  // Rows per forward: every row needs its logits, so the chunk fits both models' limits (and
  // `rows`, where given).
  const chunk = Math.min(...models.flatMap((m) => [m.maxT, m.maxLogitRows]), rows ?? Infinity);
  const total = windows.reduce((a, w) => a + w.length - 1, 0);
  let scored = 0, nllSum = 0, klSum = 0, agree = 0;
  // ids: [chunk] u32, the input tokens of the current chunk (offset 0, so plans are reused).
  const ids = gpu.upload("perplexity.tokens", new Uint32Array(chunk));
  try {
    for (const [wi, w] of windows.entries()) {
      for (const m of models) m.setPosition(0);
      // Rows 0 .. n-2 predict tokens 1 .. n-1; the window's last token is only a target.
      for (let s = 0; s < w.length - 1; s += chunk) {
        const T = Math.min(chunk, w.length - 1 - s);
        gpu.write(ids, new Uint32Array(w.slice(s, s + T)));
        const source = { buffer: ids, offset: 0 };
        const plans = await Promise.all(models.map((m) => m.plan(T, source, "all")));
        // Submit without waiting: the readback below is queued after the forward and waits once.
        const enc = gpu.device.createCommandEncoder({ label: "perplexity.forward" });
        gpu.encode(enc, "perplexity.forward", plans.flat());
        gpu.device.queue.submit([enc.finish()]);
        const got = new Float32Array(await gpu.read(model.logits, 0, T * V * 4));
        const ref = reference
          ? new Float32Array(await gpu.read(reference.logits, 0, T * V * 4))
          : undefined;
        for (let r = 0; r < T; r++) {
          const where = `window ${wi}, position ${s + r}`;
          const x = got.subarray(r * V, (r + 1) * V);
          const lse = logSumExp(x, where);
          nllSum += lse - x[w[s + r + 1]];
          if (ref) {
            const y = ref.subarray(r * V, (r + 1) * V);
            klSum += klDivergence(y, logSumExp(y, `${where} (reference)`), x, lse);
            if (argmax(y) === argmax(x)) agree++;
          }
        }
        scored += T;
        onProgress?.(scored, total);
      }
    }
  } finally {
    ids.destroy();
  }
  const nll = nllSum / scored;
  const result: PerplexityResult = {
    ppl: Math.exp(nll),
    nll,
    tokens_scored: scored,
    windows: windows.length,
    ctx,
  };
  if (reference) {
    result.kl = klSum / scored;
    result.top1_agreement = agree / scored;
  }
  return result;
}

/** log(sum(exp(x))) in f64; throws if a logit is not finite. */
function logSumExp(x: Float32Array, where: string): number {
  let max = -Infinity;
  for (let i = 0; i < x.length; i++) {
    if (!Number.isFinite(x[i])) {
      throw new Error(`perplexity: logit ${i} is ${x[i]} at ${where}`);
    }
    if (x[i] > max) max = x[i];
  }
  let sum = 0;
  for (let i = 0; i < x.length; i++) sum += Math.exp(x[i] - max);
  return max + Math.log(sum);
}

/** KL(p || q) = sum p_i (log p_i - log q_i), from logits and their log-sum-exps, in f64. */
function klDivergence(pLogits: Float32Array, pLse: number, qLogits: Float32Array, qLse: number) {
  let kl = 0;
  for (let i = 0; i < pLogits.length; i++) {
    const logP = pLogits[i] - pLse;
    kl += Math.exp(logP) * (logP - (qLogits[i] - qLse));
  }
  // Rounding can leave a tiny negative sum where p == q; KL is never below 0.
  return Math.max(0, kl);
}

/** Index of the largest entry (the first on ties). */
function argmax(x: Float32Array): number {
  let best = 0;
  for (let i = 1; i < x.length; i++) if (x[i] > x[best]) best = i;
  return best;
}
