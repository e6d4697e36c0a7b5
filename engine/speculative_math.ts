/**
 * The sampling and speculative-decoding math, in plain TypeScript: the reference that the GPU
 * kernels `kernels/sample.ts` and `kernels/accept.ts` are tested against, and the place where the
 * semantics are defined.
 *
 * Distribution of one logits row `l[0..V)` (in this order, as Hugging Face's warpers):
 *  - temperature `T = 0`: one-hot at the argmax (ties: the lowest id).
 *  - temperature `T > 0`: `e_j = exp((l_j - max l) / T)`.
 *  - top-k (`0 < topK < V`): keep every token whose logit is >= the k-th largest logit (ties at
 *    the boundary are all kept, so the set can exceed k; as transformers' TopKLogitsWarper).
 *  - top-p (`topP < 1`): over the top-k survivors, keep every token whose logit is >= `s*`, where
 *    `s*` is the largest logit value such that `sum(e_j : l_j >= s*) >= topP * sum(kept e_j)`
 *    (the smallest head of the sorted distribution holding mass >= topP, extended to all ties).
 *  - `p_j = e_j / sum(kept e)` for kept tokens, 0 elsewhere.
 * Logits are compared through their f32 bit patterns ({@linkcode orderKey}), so GPU and CPU agree
 * exactly on which tokens are kept by top-k; -0 equals +0; -Infinity is allowed (mass 0), NaN
 * is not.
 *
 * Randomness: a counter-based hash ({@linkcode rngUniform}), the same u32 arithmetic in WGSL,
 * giving bit-identical uniforms on GPU and CPU. Probabilities themselves are f32 on the GPU and
 * f64 here, so a GPU decision can differ from this reference only when a uniform falls within
 * float rounding (~1e-6 relative) of a decision boundary.
 *
 * @module
 */

/** RNG domain of the sampler kernel (one draw per row and counter step, lane 0). */
export const SAMPLE_DOMAIN = 1;
/** RNG domain of the accept kernel (draws 0..k of one verify step). */
export const ACCEPT_DOMAIN = 2;

/** Sampling settings; `topK = 0` and `topP = 1` switch those truncations off. */
export interface SamplingParams {
  /** Softmax temperature; 0 means greedy (argmax, ties to the lowest id). */
  temperature: number;
  /** Keep the tokens with logits >= the k-th largest; 0 (or >= V) keeps all. */
  topK: number;
  /** Nucleus mass in (0, 1]; 1 keeps all. */
  topP: number;
}

/** PCG hash (O'Neill's permuted congruential step, as in Jarzynski & Olano 2020) of a u32. */
export function pcgHash(v: number): number {
  const s = (Math.imul(v >>> 0, 747796405) + 2891336453) >>> 0;
  const w = Math.imul((s >>> ((s >>> 28) + 4)) ^ s, 277803737) >>> 0;
  return ((w >>> 22) ^ w) >>> 0;
}

/**
 * The counter-based RNG shared with WGSL: a u32 hash of (seed, domain, row, counter, lane),
 * `pcg(pcg(pcg(pcg(seed ^ pcg(domain)) ^ row) ^ counter) ^ lane)`.
 */
export function rngU32(
  seed: number,
  domain: number,
  row: number,
  counter: number,
  lane: number,
): number {
  let h = pcgHash((seed ^ pcgHash(domain)) >>> 0);
  h = pcgHash((h ^ row) >>> 0);
  h = pcgHash((h ^ counter) >>> 0);
  return pcgHash((h ^ lane) >>> 0);
}

/**
 * A uniform in [0, 1) with 24 random bits, `(rngU32(...) >>> 8) * 2^-24`: exactly representable
 * in f32, so the WGSL twin yields the same value bit for bit.
 *
 * @example
 * ```ts
 * import { rngUniform, SAMPLE_DOMAIN } from "./speculative_math.ts";
 * const u = rngUniform(42, SAMPLE_DOMAIN, 0, 0, 0);
 * console.assert(u >= 0 && u < 1 && Math.fround(u) === u);
 * ```
 */
export function rngUniform(
  seed: number,
  domain: number,
  row: number,
  counter: number,
  lane: number,
): number {
  return (rngU32(seed, domain, row, counter, lane) >>> 8) / 16777216;
}

/** The uniform the sampler kernel draws for `row` when the row's counter holds `counter`. */
export function sampleUniform(seed: number, row: number, counter: number): number {
  return rngUniform(seed, SAMPLE_DOMAIN, row, counter, 0);
}

/**
 * The k + 1 uniforms the accept kernel draws for batch row `row` at `counter`: `u[i]` (i < k)
 * decides draft token i, `u[k]` samples the final token (the residual at the first rejection,
 * or the bonus token when all k are accepted). Pass them to {@linkcode acceptDraft}.
 */
export function acceptUniforms(seed: number, row: number, counter: number, k: number): number[] {
  const u: number[] = [];
  for (let i = 0; i <= k; i++) u.push(rngUniform(seed, ACCEPT_DOMAIN, row, counter, i));
  return u;
}

const keyView = new DataView(new ArrayBuffer(4));

/**
 * Order-preserving u32 key of an f32 (as WGSL's `orderKey`): `a < b` as floats iff
 * `key(a) < key(b)`; -0 maps to the key of +0.
 */
export function orderKey(x: number): number {
  keyView.setFloat32(0, x === 0 ? 0 : x);
  const b = keyView.getUint32(0);
  return (b & 0x80000000) !== 0 ? (~b) >>> 0 : (b | 0x80000000) >>> 0;
}

/** Index of the largest value (ties: the lowest index). */
export function argmax(values: ArrayLike<number>): number {
  let best = 0;
  let bestKey = -1;
  for (let j = 0; j < values.length; j++) {
    const k = orderKey(values[j]);
    if (k > bestKey) {
      bestKey = k;
      best = j;
    }
  }
  return best;
}

/**
 * The distribution a sampler draws from: temperature, then top-k, then top-p, renormalized
 * (exact semantics in the module doc). Returns `p` as f32; temperature 0 gives a one-hot argmax.
 *
 * @example
 * ```ts
 * import { processLogits } from "./speculative_math.ts";
 * const p = processLogits(new Float32Array([1, 3, 3, 2]), { temperature: 1, topK: 2, topP: 1 });
 * console.assert(p[0] === 0 && p[3] === 0 && p[1] === p[2]);
 * ```
 */
export function processLogits(logits: Float32Array, params: SamplingParams): Float32Array {
  const V = logits.length;
  const out = new Float32Array(V);
  if (V === 0) return out;
  const top = argmax(logits);
  if (!(params.temperature > 0)) {
    out[top] = 1;
    return out;
  }
  const keys = Uint32Array.from(logits, orderKey);
  const sorted = keys.slice().sort().reverse(); // descending keys
  // top-k: threshold = the k-th largest key; everything >= it survives (ties included).
  let thr = 0;
  if (params.topK > 0 && params.topK < V) thr = sorted[params.topK - 1];
  const m = logits[top];
  const e = new Float64Array(V);
  let zk = 0;
  for (let j = 0; j < V; j++) {
    if (keys[j] >= thr) {
      e[j] = Math.exp((logits[j] - m) / params.temperature);
      zk += e[j];
    }
  }
  // top-p: walk groups of equal keys from the top; stop at the first head with mass >= topP*zk.
  if (params.topP < 1) {
    const need = params.topP * zk;
    const eByKey = new Map<number, number>();
    for (let j = 0; j < V; j++) {
      if (keys[j] >= thr) eByKey.set(keys[j], (eByKey.get(keys[j]) ?? 0) + e[j]);
    }
    let mass = 0;
    for (let i = 0; i < sorted.length && sorted[i] >= thr; i++) {
      if (i > 0 && sorted[i] === sorted[i - 1]) continue;
      mass += eByKey.get(sorted[i])!;
      if (mass >= need) {
        thr = sorted[i];
        break;
      }
    }
  }
  let z = 0;
  for (let j = 0; j < V; j++) if (keys[j] >= thr) z += e[j];
  for (let j = 0; j < V; j++) out[j] = keys[j] >= thr ? e[j] / z : 0;
  return out;
}

/**
 * Inverse-CDF draw: the first id `i` with `probs[i] > 0` and `sum(probs[0..i]) > u * sum(probs)`
 * (probs need not be normalized); rounding past the end falls back to the last nonzero id.
 * Throws if every entry is 0.
 */
export function sampleFrom(probs: ArrayLike<number>, u: number): number {
  let total = 0;
  let last = -1;
  for (let j = 0; j < probs.length; j++) {
    if (probs[j] > 0) {
      total += probs[j];
      last = j;
    }
  }
  if (last < 0) throw new Error("sampleFrom: the distribution has no positive entry");
  const target = u * total;
  let acc = 0;
  for (let j = 0; j < probs.length; j++) {
    if (!(probs[j] > 0)) continue;
    acc += probs[j];
    if (acc > target) return j;
  }
  return last;
}

/** Inputs of {@linkcode acceptDraft}: k draft tokens, their q rows, and k + 1 target rows. */
export interface AcceptInput {
  /** `p_0..p_k`: the target's processed distributions at the k draft positions and the next. */
  targetProbs: Float32Array[];
  /** `q_0..q_{k-1}`: the draft's processed distributions the draft tokens were sampled from. */
  draftProbs: Float32Array[];
  /** `x_0..x_{k-1}`: the draft tokens. */
  draftTokens: number[];
  /** `u_0..u_k` in [0, 1), e.g. from {@linkcode acceptUniforms}. */
  uniforms: number[];
}

/** Result of {@linkcode acceptDraft}: `tokens` = accepted drafts + one correction/bonus token. */
export interface AcceptResult {
  /** Number of accepted draft tokens (0..k). */
  accepted: number;
  /** `accepted + 1` tokens to emit. */
  tokens: number[];
}

/**
 * Speculative sampling (Leviathan et al. 2023; Chen et al. 2023). For i = 0..k-1: accept x_i
 * with probability min(1, p_i(x_i) / q_i(x_i)), decided as `u_i * q_i(x_i) < p_i(x_i)` (so
 * q = 0 < p accepts and p = 0 rejects). At the first rejection, emit a draw with `u_k` from
 * norm(max(0, p_i - q_i)) (from p_i if that residual is all zero, which exact arithmetic never
 * gives) and stop. If all k are accepted, emit a bonus draw with `u_k` from p_k. Every emitted
 * token is then distributed exactly as the target alone would sample it. With one-hot (greedy)
 * p this reduces to: accept while x_i = argmax p_i, then emit argmax p_i (or argmax p_k).
 *
 * @example
 * ```ts
 * import { acceptDraft } from "./speculative_math.ts";
 * const oneHot = (i: number) => Float32Array.from({ length: 4 }, (_, j) => (j === i ? 1 : 0));
 * const r = acceptDraft({
 *   targetProbs: [oneHot(2), oneHot(1), oneHot(3)],
 *   draftProbs: [oneHot(2), oneHot(0)],
 *   draftTokens: [2, 0],
 *   uniforms: [0.5, 0.5, 0.5],
 * });
 * console.assert(r.accepted === 1 && r.tokens.join() === "2,1");
 * ```
 */
export function acceptDraft(input: AcceptInput): AcceptResult {
  const { targetProbs, draftProbs, draftTokens, uniforms } = input;
  const k = draftTokens.length;
  if (targetProbs.length !== k + 1 || draftProbs.length !== k || uniforms.length !== k + 1) {
    throw new Error(
      `acceptDraft: need k + 1 target rows, k draft rows and k + 1 uniforms for k = ${k}; got ` +
        `${targetProbs.length}, ${draftProbs.length} and ${uniforms.length}`,
    );
  }
  const tokens: number[] = [];
  for (let i = 0; i < k; i++) {
    const p = targetProbs[i], q = draftProbs[i], x = draftTokens[i];
    const px = x >= 0 && x < p.length ? p[x] : 0;
    const qx = x >= 0 && x < q.length ? q[x] : 0;
    if (Math.fround(uniforms[i] * qx) < px) {
      tokens.push(x);
      continue;
    }
    const r = new Float64Array(p.length);
    let mass = 0;
    for (let j = 0; j < p.length; j++) {
      r[j] = Math.max(0, p[j] - q[j]);
      mass += r[j];
    }
    tokens.push(sampleFrom(mass > 0 ? r : p, uniforms[k]));
    return { accepted: i, tokens };
  }
  tokens.push(sampleFrom(targetProbs[k], uniforms[k]));
  return { accepted: k, tokens };
}

/** ln Γ(x) for x > 0 (Lanczos approximation, g = 7, 9 terms; ~1e-15 relative). */
export function logGamma(x: number): number {
  const c = [
    0.99999999999980993,
    676.5203681218851,
    -1259.1392167224028,
    771.32342877765313,
    -176.61502916214059,
    12.507343278686905,
    -0.13857109526572012,
    9.9843695780195716e-6,
    1.5056327351493116e-7,
  ];
  if (x < 0.5) return Math.log(Math.PI / Math.sin(Math.PI * x)) - logGamma(1 - x);
  x -= 1;
  let a = c[0];
  const t = x + 7.5;
  for (let i = 1; i < 9; i++) a += c[i] / (x + i);
  return 0.5 * Math.log(2 * Math.PI) + (x + 0.5) * Math.log(t) - t + Math.log(a);
}

/**
 * Regularized upper incomplete gamma Q(a, x) = Γ(a, x) / Γ(a): the series for P = 1 - Q when
 * x < a + 1, else the Lentz continued fraction for Q.
 */
export function gammaQ(a: number, x: number): number {
  if (x <= 0) return 1;
  const lead = a * Math.log(x) - x - logGamma(a);
  if (x < a + 1) {
    // P(a, x) = e^-x x^a / Γ(a) * Σ x^n / (a (a+1) ... (a+n))
    let term = 1 / a, sum = term;
    for (let n = 1; n < 1000 && Math.abs(term) > Math.abs(sum) * 1e-16; n++) {
      term *= x / (a + n);
      sum += term;
    }
    return 1 - sum * Math.exp(lead);
  }
  // Q(a, x) = e^-x x^a / Γ(a) * 1 / (x + 1 - a - 1(1-a) / (x + 3 - a - 2(2-a) / ...))
  const tiny = 1e-300;
  let b = x + 1 - a, cc = 1 / tiny, d = 1 / b, h = d;
  for (let i = 1; i < 1000; i++) {
    const an = -i * (i - a);
    b += 2;
    d = an * d + b;
    if (Math.abs(d) < tiny) d = tiny;
    cc = b + an / cc;
    if (Math.abs(cc) < tiny) cc = tiny;
    d = 1 / d;
    const delta = d * cc;
    h *= delta;
    if (Math.abs(delta - 1) < 1e-16) break;
  }
  return Math.exp(lead) * h;
}

/**
 * Pearson chi-square goodness of fit of `counts` against probabilities `probs`: the statistic and
 * its p-value `Q(df / 2, stat / 2)` with df = (cells with probs > 0) - 1. A count in a cell of
 * probability 0 gives p-value 0. Used by the tests to check that samplers preserve distributions.
 */
export function chiSquareTest(
  counts: ArrayLike<number>,
  probs: ArrayLike<number>,
): { stat: number; df: number; pValue: number } {
  let n = 0, total = 0;
  for (let j = 0; j < counts.length; j++) n += counts[j];
  for (let j = 0; j < probs.length; j++) total += probs[j];
  let stat = 0, cells = 0;
  for (let j = 0; j < probs.length; j++) {
    const expect = (n * probs[j]) / total;
    if (expect > 0) {
      stat += (counts[j] - expect) ** 2 / expect;
      cells++;
    } else if (counts[j] > 0) return { stat: Infinity, df: cells, pValue: 0 };
  }
  const df = Math.max(1, cells - 1);
  return { stat, df, pValue: gammaQ(df / 2, stat / 2) };
}
