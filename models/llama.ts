/**
 * The Llama forward pass on the GPU: weights in the shared store, a preallocated KV cache,
 * activations sized for `maxT` rows, and per-T plans (flat lists of dispatches) built once and
 * encoded as often as needed. One plan shape serves prefill (T = prompt chunk), decode (T = 1)
 * and verification (T = k + 1). Positions live in the GPU `state` buffer, never on the CPU.
 *
 * @module
 */
import type { Dispatch, Gpu } from "../engine/gpu.ts";
import type { StoredTensor, WeightStore } from "../engine/weights.ts";
import type { HostTensor, LoadedModel, ModelConfig } from "./types.ts";
import { createEmbedding } from "../kernels/embedding.ts";
import { createRmsnorm } from "../kernels/rmsnorm.ts";
import { createMatmul } from "../kernels/matmul.ts";
import { createRope, ropeInvFreq } from "../kernels/rope.ts";
import { createKvWrite, kvCacheBytes, type KvDType, kvDType } from "../kernels/kv_write.ts";
import { attentionPlan, type AttentionScratch, createAttention } from "../kernels/attention.ts";
import type { WeightFormat } from "../kernels/qformats.ts";
import { planQuant } from "../engine/quant_plan.ts";
import { createSwiglu } from "../kernels/swiglu.ts";
import { createAdvance } from "../kernels/advance.ts";

/** Options for {@linkcode LlamaGpu.create}. */
export interface LlamaGpuOptions {
  /** Label prefix of every GPU object ("target", "draft"). */
  label: string;
  /** KV-cache rows (context to allocate); at most the model's context length. */
  maxSeq: number;
  /** Most rows one forward processes (prefill chunk size); default 128. */
  maxT?: number;
  /** Most rows whose logits one forward produces (verify width); default 17. */
  maxLogitRows?: number;
  /** Store weights and KV cache in f32 even where `shader-f16` exists. */
  noF16?: boolean;
  /**
   * Stored format of each tensor, by canonical name (fused gate/up follows `ffn_gate`); default:
   * the plan {@linkcode planQuant} makes without a quantization request (formats as loaded).
   */
  formats?: ReadonlyMap<string, WeightFormat>;
  /** KV-cache element type; default f16 where `shader-f16` exists (and not `noF16`), else f32. */
  kv?: KvDType;
}

/** Sizes that fix a model's non-weight GPU buffers. */
export interface LlamaBufferShape {
  /** KV-cache rows. */
  maxSeq: number;
  /** Most rows per forward. */
  maxT: number;
  /** Most logit rows per forward. */
  maxLogitRows: number;
  /** KV element type. */
  kvType: KvDType;
  /** The device's workgroup memory (picks the attention plans, hence the split-K scratch). */
  maxWorkgroupStorage: number;
}

/** One tensor as the forward pass uploads it: its plan name and the host tensor. */
export interface UploadTensor {
  /** Name in the quantization plan (gate/up fused under `blk.N.ffn_gate.weight`). */
  readonly planName: string;
  /** The tensor to upload (gate and up rows concatenated for the fused product). */
  readonly tensor: HostTensor;
}

/** Per-layer weights in the store. Shapes as `[out, in]`. */
interface LayerWeights {
  attnNorm: StoredTensor; // [dim] f32
  q: StoredTensor; // [nHeads*headDim, dim]
  k: StoredTensor; // [nKvHeads*headDim, dim]
  v: StoredTensor; // [nKvHeads*headDim, dim]
  qBias?: StoredTensor;
  kBias?: StoredTensor;
  vBias?: StoredTensor;
  o: StoredTensor; // [dim, nHeads*headDim]
  ffnNorm: StoredTensor; // [dim] f32
  gateUp: StoredTensor; // [2*ffnDim, dim]: gate rows, then up rows
  down: StoredTensor; // [dim, ffnDim]
}

/** Which rows of a forward produce logits. */
export type LogitRows = "last" | "all" | "none";

/** Where a forward reads its token ids from. */
export interface TokenSource {
  /** u32 buffer of ids. */
  buffer: GPUBuffer;
  /** Element offset of the first id. */
  offset: number;
}

/** A model's GPU state: weights, KV cache, activations and cached plans. */
export class LlamaGpu {
  /** Resolved hyperparameters. */
  readonly config: ModelConfig;
  /** state: array<u32>; state[0] = pos, the number of tokens in the KV cache. */
  readonly state: GPUBuffer;
  /** logits: [maxLogitRows, vocab] f32. */
  readonly logits: GPUBuffer;
  /** KV-cache rows. */
  readonly maxSeq: number;
  /** Most rows per forward. */
  readonly maxT: number;
  /** Most logit rows per forward. */
  readonly maxLogitRows: number;
  /** KV element type. */
  readonly kvType: KvDType;
  /** Bytes of the store's tensors this model uses (shared ones counted for each model). */
  readonly weightBytes: number;
  /** Stored tensors per format (fused gate/up counted once). */
  readonly formats: Readonly<Partial<Record<WeightFormat, number>>>;
  /**
   * GPU bytes by category, as allocated: "kv" (both caches) and "scratch" (activations, logits,
   * attention partials, position state, RoPE table). Weights are in the store.
   */
  readonly bytes: { kv: number; scratch: number };

  readonly #gpu: Gpu;
  readonly #label: string;
  readonly #embedding: StoredTensor;
  readonly #classifier: StoredTensor;
  readonly #outNorm: StoredTensor;
  readonly #layers: LayerWeights[];
  readonly #kCache: GPUBuffer;
  readonly #vCache: GPUBuffer;
  readonly #invFreq: GPUBuffer;
  readonly #act: Record<"x" | "xb" | "q" | "k" | "v" | "att" | "gu" | "h", GPUBuffer>;
  readonly #scratch: AttentionScratch;
  readonly #plans = new Map<string, Promise<Dispatch[]>>();
  readonly #sourceIds = new Map<GPUBuffer, number>(); // token buffers by identity, for plan keys

  private constructor(
    gpu: Gpu,
    config: ModelConfig,
    opts: LlamaBufferShape & { label: string },
    weights: {
      embedding: StoredTensor;
      classifier: StoredTensor;
      outNorm: StoredTensor;
      layers: LayerWeights[];
    },
  ) {
    this.#gpu = gpu;
    this.config = config;
    this.#label = opts.label;
    this.maxSeq = opts.maxSeq;
    this.maxT = opts.maxT;
    this.maxLogitRows = opts.maxLogitRows;
    this.kvType = opts.kvType;
    this.#embedding = weights.embedding;
    this.#classifier = weights.classifier;
    this.#outNorm = weights.outNorm;
    this.#layers = weights.layers;
    const used = new Set<StoredTensor>([weights.embedding, weights.classifier, weights.outNorm]);
    for (const l of weights.layers) for (const t of Object.values(l)) if (t) used.add(t);
    this.weightBytes = [...used].reduce((a, t) => a + t.bytes, 0);
    const formats: Partial<Record<WeightFormat, number>> = {};
    for (const t of used) formats[t.format] = (formats[t.format] ?? 0) + 1;
    this.formats = formats;
    const sizes = llamaBufferSizes(config, opts);
    const S = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC;
    // K/V caches: [layers, maxSeq, nKvHeads, headDim] of kvType (q8: int8 + per-row scales).
    this.#kCache = gpu.buffer(`${opts.label}.kv.k`, sizes.kvCache, S);
    this.#vCache = gpu.buffer(`${opts.label}.kv.v`, sizes.kvCache, S);
    this.state = gpu.buffer(`${opts.label}.state`, 16, S | GPUBufferUsage.COPY_DST);
    const act = (name: keyof typeof sizes.act) =>
      gpu.buffer(`${opts.label}.act.${name}`, sizes.act[name], S);
    this.#act = {
      x: act("x"), // residual stream [T, dim]
      xb: act("xb"), // normed input of a sublayer [T, dim]
      q: act("q"), // [T, nHeads, headDim]
      k: act("k"), // [T, nKvHeads, headDim]
      v: act("v"), // [T, nKvHeads, headDim]
      att: act("att"), // attention output [T, nHeads, headDim]
      gu: act("gu"), // [T, 2*ffnDim]: gate, then up
      h: act("h"), // silu(gate) * up [T, ffnDim]
    };
    this.logits = act("logits"); // [maxLogitRows, vocab]
    this.#invFreq = gpu.upload(
      `${opts.label}.rope.inv_freq`,
      ropeInvFreq(config.headDim, config.ropeTheta, config.ropeScaling),
    );
    // Split-K attention partials, sized for the largest plan of any T and shared by all plans.
    this.#scratch = {
      acc: gpu.buffer(`${opts.label}.attn.partial_acc`, sizes.attnAcc, GPUBufferUsage.STORAGE),
      ml: gpu.buffer(`${opts.label}.attn.partial_ml`, sizes.attnMl, GPUBufferUsage.STORAGE),
    };
    this.bytes = { kv: 2 * this.#kCache.size, scratch: sizes.scratch };
  }

  /**
   * Uploads `model`'s weights into `store` (as `opts.label`), each in the format `opts.formats`
   * gives it, and allocates cache and scratch.
   */
  static async create(
    gpu: Gpu,
    store: WeightStore,
    model: LoadedModel,
    opts: LlamaGpuOptions,
  ): Promise<LlamaGpu> {
    const c = model.config;
    const f16 = gpu.features.f16 && !opts.noF16;
    const formats = opts.formats ??
      new Map([...planQuant(c, model.tensors, { f16 })].map(([n, t]) => [n, t.format]));
    const stored = new Map<string, StoredTensor>();
    for (const { planName, tensor } of uploadList(model)) {
      const format = formats.get(planName);
      if (!format) throw new Error(`${model.source}: no stored format planned for ${planName}`);
      if (format === "f16" && !f16) {
        throw new Error(`${planName}: f16 weights need the shader-f16 feature`);
      }
      stored.set(tensor.name, await store.add(opts.label, tensor, format));
    }
    const get = (name: string) => stored.get(name)!;
    const layers: LayerWeights[] = [];
    for (let l = 0; l < c.nLayers; l++) {
      const p = `blk.${l}.`;
      layers.push({
        attnNorm: get(p + "attn_norm.weight"),
        q: get(p + "attn_q.weight"),
        k: get(p + "attn_k.weight"),
        v: get(p + "attn_v.weight"),
        qBias: stored.get(p + "attn_q.bias"),
        kBias: stored.get(p + "attn_k.bias"),
        vBias: stored.get(p + "attn_v.bias"),
        o: get(p + "attn_output.weight"),
        ffnNorm: get(p + "ffn_norm.weight"),
        gateUp: get(p + "ffn_gate_up.weight"),
        down: get(p + "ffn_down.weight"),
      });
    }
    const embedding = get("token_embd.weight");
    const classifier = c.tiedEmbeddings ? embedding : get("output.weight");
    const outNorm = get("output_norm.weight");
    const kvType = opts.kv ?? (opts.noF16 ? "f32" : kvDType(gpu));
    if (kvType === "f16" && !gpu.features.f16) {
      throw new Error(`${opts.label}: an f16 KV cache needs the shader-f16 feature`);
    }
    const full = {
      label: opts.label,
      maxSeq: opts.maxSeq,
      maxT: opts.maxT ?? 128,
      maxLogitRows: opts.maxLogitRows ?? 17,
      kvType,
      maxWorkgroupStorage: gpu.limits.maxComputeWorkgroupStorageSize,
    };
    return await gpu.scoped(
      `${opts.label} buffers`,
      () => new LlamaGpu(gpu, c, full, { embedding, classifier, outNorm, layers }),
    );
  }

  /**
   * The dispatches of one forward over `T` rows whose ids are read from `tokens`, at positions
   * state[0] .. state[0]+T-1; it ends by advancing state[0] by T. Logits go to `this.logits`:
   * for the last row only ("last": prefill, decode), for all rows ("all": verify, T ≤
   * maxLogitRows) or none ("none": rows that only fill the cache). Plans are built once per
   * (T, source, rows) and cached.
   */
  plan(T: number, tokens: TokenSource, rows: LogitRows): Promise<Dispatch[]> {
    if (T < 1 || T > this.maxT) {
      throw new RangeError(`${this.#label}: T=${T} outside [1, ${this.maxT}]`);
    }
    if (rows === "all" && T > this.maxLogitRows) {
      throw new RangeError(`${this.#label}: ${T} logit rows > maxLogitRows ${this.maxLogitRows}`);
    }
    let id = this.#sourceIds.get(tokens.buffer);
    if (id === undefined) this.#sourceIds.set(tokens.buffer, id = this.#sourceIds.size);
    const key = `${T}:${id}:${tokens.offset}:${rows}`;
    let p = this.#plans.get(key);
    if (!p) {
      p = this.#build(T, tokens, rows);
      this.#plans.set(key, p);
    }
    return p;
  }

  async #build(T: number, tokens: TokenSource, rows: LogitRows): Promise<Dispatch[]> {
    const g = this.#gpu, c = this.config, a = this.#act, L = this.#label;
    const qDim = c.nHeads * c.headDim, kvDim = c.nKvHeads * c.headDim;
    const dt = (t: StoredTensor) => t.format;
    const d: Dispatch[] = [];
    const shape = {
      T,
      nHeads: c.nHeads,
      nKvHeads: c.nKvHeads,
      headDim: c.headDim,
      maxSeq: this.maxSeq,
    };
    const scratch = this.#scratch;
    // xb[first .. first+rows) = rmsnorm(x[first .. first+rows)) * weight.
    const norm = (label: string, weight: StoredTensor, first = 0, rows = T) =>
      createRmsnorm(g, {
        label,
        x: a.x,
        xOffset: first * c.dim,
        w: weight.buffer,
        y: a.xb,
        T: rows,
        D: c.dim,
        eps: c.normEps,
      });
    // x = embedding rows of the T input tokens.
    d.push(
      await createEmbedding(g, {
        label: `${L}.embed`,
        table: this.#embedding.buffer,
        dtype: dt(this.#embedding),
        V: c.vocabSize,
        D: c.dim,
        tokens: tokens.buffer,
        tokensOffset: tokens.offset,
        x: a.x,
        T,
      }),
    );
    for (let l = 0; l < c.nLayers; l++) {
      const w = this.#layers[l], P = `${L}.L${l}`;
      const mm = (
        name: string,
        x: GPUBuffer,
        t: StoredTensor,
        y: GPUBuffer,
        K: number,
        N: number,
        extra = {},
      ) =>
        createMatmul(g, {
          label: `${P}.${name}`,
          x,
          w: t.buffer,
          dtype: dt(t),
          y,
          T,
          K,
          N,
          ...extra,
        });
      // Attention block: xb = rmsnorm(x); q, k, v = xb·Wq, xb·Wk, xb·Wv (+ bias).
      d.push(await norm(`${P}.attn_norm`, w.attnNorm));
      d.push(await mm("attn.q", a.xb, w.q, a.q, c.dim, qDim, { bias: w.qBias?.buffer }));
      d.push(await mm("attn.k", a.xb, w.k, a.k, c.dim, kvDim, { bias: w.kBias?.buffer }));
      d.push(await mm("attn.v", a.xb, w.v, a.v, c.dim, kvDim, { bias: w.vBias?.buffer }));
      // Rotate q and k by their positions (state[0] + t), in the checkpoint's pairing layout.
      d.push(
        await createRope(g, {
          label: `${P}.attn.rope`,
          q: a.q,
          k: a.k,
          invFreq: this.#invFreq,
          half: c.headDim / 2,
          state: this.state,
          layout: c.ropeLayout,
          T,
          nHeads: c.nHeads,
          nKvHeads: c.nKvHeads,
          headDim: c.headDim,
        }),
      );
      // Append k, v to the cache rows state[0] .. state[0]+T-1, then attend causally over them.
      const kv = {
        kCache: this.#kCache,
        vCache: this.#vCache,
        state: this.state,
        dtype: this.kvType,
        layers: c.nLayers,
        layer: l,
      };
      d.push(
        await createKvWrite(g, {
          label: `${P}.attn.kv_write`,
          k: a.k,
          v: a.v,
          T,
          nKvHeads: c.nKvHeads,
          headDim: c.headDim,
          maxSeq: this.maxSeq,
          ...kv,
        }),
      );
      d.push(
        ...await createAttention(g, {
          label: `${P}.attn`,
          ...shape,
          ...kv,
          q: a.q,
          out: a.att,
          scratch,
        }),
      );
      // x += att·Wo (residual fused into the product).
      d.push(await mm("attn.o", a.att, w.o, a.x, qDim, c.dim, { accumulate: true }));
      // Feed-forward block: x += (silu(xb·Wgate) * (xb·Wup))·Wdown with xb = rmsnorm(x).
      d.push(await norm(`${P}.ffn_norm`, w.ffnNorm));
      d.push(await mm("ffn.gate_up", a.xb, w.gateUp, a.gu, c.dim, 2 * c.ffnDim));
      d.push(
        await createSwiglu(g, {
          label: `${P}.ffn.swiglu`,
          gate: a.gu,
          up: a.gu,
          h: a.h,
          T,
          F: c.ffnDim,
          inStride: 2 * c.ffnDim,
          upOffset: c.ffnDim,
        }),
      );
      d.push(await mm("ffn.down", a.h, w.down, a.x, c.ffnDim, c.dim, { accumulate: true }));
    }
    // logits = rmsnorm(x)·Wcls for the last row (prefill, decode) or every row (verify).
    if (rows !== "none") {
      const first = rows === "last" ? T - 1 : 0, n = rows === "last" ? 1 : T;
      d.push(await norm(`${L}.output_norm`, this.#outNorm, first, n));
      d.push(
        await createMatmul(g, {
          label: `${L}.classifier`,
          x: a.xb,
          w: this.#classifier.buffer,
          dtype: dt(this.#classifier),
          y: this.logits,
          T: n,
          K: c.dim,
          N: c.vocabSize,
        }),
      );
    }
    // state[0] += T: these rows are now in the cache.
    d.push(await createAdvance(g, { label: `${L}.advance`, state: this.state, by: T }));
    return d;
  }

  /** Sets state[0] (the cache position) from the host; use between generations, not per token. */
  setPosition(pos: number): void {
    this.#gpu.write(this.state, new Uint32Array([pos, 0, 0, 0]));
  }

  /** Frees the cache, activations and plans (weights belong to the store). */
  destroy(): void {
    for (const b of [this.#kCache, this.#vCache, this.state, this.logits, this.#invFreq]) {
      b.destroy();
    }
    for (const b of Object.values(this.#act)) b.destroy();
    this.#scratch.acc.destroy();
    this.#scratch.ml.destroy();
  }
}

const uploads = new WeakMap<LoadedModel, UploadTensor[]>();

/**
 * The tensors {@linkcode LlamaGpu.create} uploads, in order, with gate and up fused into one
 * `[2*ffnDim, dim]` matrix per layer. Memoized per model, so the VRAM planner and the upload
 * hash the same host arrays once.
 */
export function uploadList(model: LoadedModel): UploadTensor[] {
  let list = uploads.get(model);
  if (list) return list;
  const c = model.config;
  const get = (name: string): HostTensor => {
    const t = model.tensors.get(name);
    if (!t) throw new Error(`${model.source}: tensor "${name}" is missing`);
    return t;
  };
  list = [];
  const add = (name: string) => list!.push({ planName: name, tensor: get(name) });
  for (let l = 0; l < c.nLayers; l++) {
    const p = `blk.${l}.`;
    add(p + "attn_norm.weight");
    for (const m of ["attn_q", "attn_k", "attn_v"]) {
      add(`${p}${m}.weight`);
      if (c.qkvBias) add(`${p}${m}.bias`);
    }
    add(p + "attn_output.weight");
    add(p + "ffn_norm.weight");
    list.push({
      planName: p + "ffn_gate.weight",
      tensor: concatRows(
        `${p}ffn_gate_up.weight`,
        get(p + "ffn_gate.weight"),
        get(p + "ffn_up.weight"),
      ),
    });
    add(p + "ffn_down.weight");
  }
  add("token_embd.weight");
  if (!c.tiedEmbeddings) add("output.weight");
  add("output_norm.weight");
  uploads.set(model, list);
  return list;
}

/**
 * Exact byte sizes of the non-weight buffers a {@linkcode LlamaGpu} allocates for `shape`: one
 * KV cache (K or V), each activation, the split-K attention partials (the largest any T up to
 * maxT needs) and their total as "scratch". The VRAM planner uses the same function.
 */
export function llamaBufferSizes(c: ModelConfig, shape: LlamaBufferShape): {
  kvCache: number;
  act: Record<"x" | "xb" | "q" | "k" | "v" | "att" | "gu" | "h" | "logits", number>;
  attnAcc: number;
  attnMl: number;
  scratch: number;
} {
  const kvDim = c.nKvHeads * c.headDim, qDim = c.nHeads * c.headDim, T = shape.maxT;
  const pad4 = (n: number) => Math.max(4, Math.ceil(n / 4) * 4);
  const act = {
    x: T * c.dim * 4,
    xb: T * c.dim * 4,
    q: T * qDim * 4,
    k: T * kvDim * 4,
    v: T * kvDim * 4,
    att: T * qDim * 4,
    gu: T * 2 * c.ffnDim * 4,
    h: T * c.ffnDim * 4,
    logits: shape.maxLogitRows * c.vocabSize * 4,
  };
  let attnAcc = 4, attnMl = 4;
  for (let t = 1; t <= T; t++) {
    const s = { T: t, nHeads: c.nHeads, nKvHeads: c.nKvHeads, headDim: c.headDim };
    const plan = attentionPlan({ ...s, maxSeq: shape.maxSeq }, shape.maxWorkgroupStorage);
    if (plan.variant !== "flash-split") continue; // the other kernels use no partials
    const rows = plan.nSplits * t * c.nHeads;
    attnAcc = Math.max(attnAcc, rows * c.headDim * 4);
    attnMl = Math.max(attnMl, rows * 8);
  }
  const state = 16, invFreq = pad4((c.headDim / 2) * 4);
  let scratch = state + invFreq + attnAcc + attnMl;
  for (const n of Object.values(act)) scratch += pad4(n);
  const kvCache = pad4(kvCacheBytes(shape.kvType, c.nLayers, shape.maxSeq, c.nKvHeads, c.headDim));
  return { kvCache, act, attnAcc, attnMl, scratch };
}

/** `[a; b]`: rows of `a` then rows of `b` (same dtype and row width), as one host tensor. */
function concatRows(name: string, a: HostTensor, b: HostTensor): HostTensor {
  if (a.dtype !== b.dtype || a.shape[1] !== b.shape[1]) {
    throw new Error(
      `cannot fuse ${a.name} and ${b.name}: ${a.dtype}[${a.shape}] vs ${b.dtype}[${b.shape}]`,
    );
  }
  const data = new Uint8Array(a.data.byteLength + b.data.byteLength);
  data.set(a.data, 0);
  data.set(b.data, a.data.byteLength);
  return { name, dtype: a.dtype, shape: [a.shape[0] + b.shape[0], a.shape[1]], data };
}
