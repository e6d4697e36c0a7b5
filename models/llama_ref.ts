/**
 * A plain-TypeScript Llama forward pass with a KV cache, in f32: the oracle that GPU logits are
 * tested against. Written for clarity (llama2.c's run.c is the model), not speed.
 *
 * @module
 */
import type { ModelConfig } from "./types.ts";
import { ropeInvFreq } from "../kernels/rope.ts";

/** Named f32 weights (canonical names, `[out, in]` row-major). */
export type RefWeights = (name: string) => Float32Array;

/** A CPU Llama with its own KV cache; `forward()` appends tokens and returns their logits. */
export class LlamaRef {
  /** Tokens already in the cache. */
  pos = 0;
  readonly #c: ModelConfig;
  readonly #w: RefWeights;
  readonly #k: Float32Array[]; // per layer: [maxSeq, nKvHeads * headDim]
  readonly #v: Float32Array[];
  readonly #invFreq: Float32Array;
  readonly #maxSeq: number;

  /** `maxSeq`: cache rows to allocate (defaults to the model's context). */
  constructor(config: ModelConfig, weights: RefWeights, maxSeq = config.maxSeqLen) {
    this.#c = config;
    this.#w = weights;
    this.#maxSeq = maxSeq;
    const kvDim = config.nKvHeads * config.headDim;
    this.#k = Array.from({ length: config.nLayers }, () => new Float32Array(maxSeq * kvDim));
    this.#v = Array.from({ length: config.nLayers }, () => new Float32Array(maxSeq * kvDim));
    this.#invFreq = ropeInvFreq(config.headDim, config.ropeTheta, config.ropeScaling);
  }

  /** Moves the cache position back to `pos` (rows past it are ignored from then on). */
  rollback(pos: number): void {
    if (pos > this.pos) throw new Error(`cannot roll forward from ${this.pos} to ${pos}`);
    this.pos = pos;
  }

  /** Runs `tokens` at positions pos..pos+T-1 and returns logits `[T, vocab]`. */
  forward(tokens: readonly number[]): Float32Array[] {
    const c = this.#c, w = this.#w;
    if (this.pos + tokens.length > this.#maxSeq) {
      throw new Error(`context overflow: ${this.pos} + ${tokens.length} > ${this.#maxSeq}`);
    }
    const out: Float32Array[] = [];
    const emb = w("token_embd.weight");
    const classifier = c.tiedEmbeddings ? emb : w("output.weight");
    for (const token of tokens) {
      const pos = this.pos++;
      // x: [dim] the residual stream, starting from the token's embedding row.
      const x = emb.slice(token * c.dim, (token + 1) * c.dim);
      for (let l = 0; l < c.nLayers; l++) {
        const p = `blk.${l}.`;
        // Attention: norm, project to q/k/v, rotate q/k, append k/v to the cache, attend.
        const xb = rmsnorm(x, w(p + "attn_norm.weight"), c.normEps);
        const q = matvec(w(p + "attn_q.weight"), xb, c.qkvBias ? w(p + "attn_q.bias") : undefined);
        const k = matvec(w(p + "attn_k.weight"), xb, c.qkvBias ? w(p + "attn_k.bias") : undefined);
        const v = matvec(w(p + "attn_v.weight"), xb, c.qkvBias ? w(p + "attn_v.bias") : undefined);
        rope(q, c.nHeads, c.headDim, pos, this.#invFreq, c.ropeLayout);
        rope(k, c.nKvHeads, c.headDim, pos, this.#invFreq, c.ropeLayout);
        const kvDim = c.nKvHeads * c.headDim;
        this.#k[l].set(k, pos * kvDim);
        this.#v[l].set(v, pos * kvDim);
        const att = this.#attend(l, q, pos);
        add(x, matvec(w(p + "attn_output.weight"), att));
        // Feed-forward: norm, SwiGLU (silu(gate) * up), down projection, residual.
        const xf = rmsnorm(x, w(p + "ffn_norm.weight"), c.normEps);
        const g = matvec(w(p + "ffn_gate.weight"), xf);
        const u = matvec(w(p + "ffn_up.weight"), xf);
        for (let i = 0; i < g.length; i++) g[i] = (g[i] / (1 + Math.exp(-g[i]))) * u[i];
        add(x, matvec(w(p + "ffn_down.weight"), g));
      }
      out.push(matvec(classifier, rmsnorm(x, w("output_norm.weight"), c.normEps)));
    }
    return out;
  }

  /** Causal GQA attention of one query row at `pos` over cache rows 0..pos. */
  #attend(layer: number, q: Float32Array, pos: number): Float32Array {
    const c = this.#c, hd = c.headDim, kvDim = c.nKvHeads * hd;
    const group = c.nHeads / c.nKvHeads, scale = 1 / Math.sqrt(hd);
    const out = new Float32Array(c.nHeads * hd);
    const scores = new Float32Array(pos + 1);
    for (let h = 0; h < c.nHeads; h++) {
      const kvh = Math.floor(h / group);
      let max = -Infinity;
      for (let s = 0; s <= pos; s++) {
        let dot = 0;
        for (let i = 0; i < hd; i++) {
          dot += q[h * hd + i] * this.#k[layer][s * kvDim + kvh * hd + i];
        }
        scores[s] = dot * scale;
        if (scores[s] > max) max = scores[s];
      }
      let sum = 0;
      for (let s = 0; s <= pos; s++) sum += scores[s] = Math.exp(scores[s] - max);
      for (let s = 0; s <= pos; s++) {
        const a = scores[s] / sum;
        for (let i = 0; i < hd; i++) {
          out[h * hd + i] += a * this.#v[layer][s * kvDim + kvh * hd + i];
        }
      }
    }
    return out;
  }
}

function rmsnorm(x: Float32Array, w: Float32Array, eps: number): Float32Array {
  let ss = 0;
  for (const v of x) ss += v * v;
  const s = 1 / Math.sqrt(ss / x.length + eps);
  return x.map((v, i) => v * s * w[i]);
}

/** `W[N, K] · x[K] (+ b)`. */
function matvec(w: Float32Array, x: Float32Array, b?: Float32Array): Float32Array {
  const k = x.length, n = w.length / k;
  const out = new Float32Array(n);
  for (let r = 0; r < n; r++) {
    let s = 0;
    for (let i = 0; i < k; i++) s += w[r * k + i] * x[i];
    out[r] = s + (b ? b[r] : 0);
  }
  return out;
}

function add(x: Float32Array, y: Float32Array): void {
  for (let i = 0; i < x.length; i++) x[i] += y[i];
}

/** Rotates each head of `x` in place; pairs per `layout` (see models/types.ts RopeLayout). */
function rope(
  x: Float32Array,
  heads: number,
  hd: number,
  pos: number,
  invFreq: Float32Array,
  layout: ModelConfig["ropeLayout"],
): void {
  for (let h = 0; h < heads; h++) {
    for (let i = 0; i < hd / 2; i++) {
      const a = layout === "interleaved" ? h * hd + 2 * i : h * hd + i;
      const b = layout === "interleaved" ? a + 1 : a + hd / 2;
      const angle = pos * invFreq[i];
      const cos = Math.cos(angle), sin = Math.sin(angle);
      const x0 = x[a], x1 = x[b];
      x[a] = x0 * cos - x1 * sin;
      x[b] = x0 * sin + x1 * cos;
    }
  }
}
