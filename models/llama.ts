/**
 * The Llama forward pass on the GPU: weights in the shared store, a preallocated KV cache,
 * activations sized for `maxT` rows, and per-T plans (flat lists of dispatches) built once and
 * encoded as often as needed. One plan shape serves prefill (T = prompt chunk), decode (T = 1)
 * and verification (T = k + 1). Positions live in the GPU `state` buffer, never on the CPU.
 *
 * The forward is fused to five dispatches per layer (DESIGN.md: each dispatch costs ~6-9 µs, more
 * than a small model's weights take to stream): RMSNorm lives inside the products that consume
 * it, q/k/v are one product over concatenated rows, RoPE and the KV-cache write live inside the
 * attention kernel, the residual adds inside the o and down products, and SwiGLU in the epilogue
 * of the gate/up product, whose rows are stored as interleaved (gate, up) pairs.
 *
 * @module
 */
import type { Dispatch, Gpu } from "../engine/gpu.ts";
import type { StoredTensor, WeightStore } from "../engine/weights.ts";
import type { HostTensor, LoadedModel, ModelConfig } from "./types.ts";
import { createEmbedding } from "../kernels/embedding.ts";
import { createLinear, int8xFor, int8xSharedScratchBytes } from "../kernels/matmul.ts";
import { ropeInvFreq } from "../kernels/rope.ts";
import { kvCacheBytes, type KvDType, kvDType } from "../kernels/kv_write.ts";
import {
  createFusedAttention,
  fusedAttentionPlan,
  fusedAttentionScratchBytes,
} from "../kernels/fused_attention.ts";
import type { WeightFormat } from "../kernels/qformats.ts";
import { planQuant } from "../engine/quant_plan.ts";
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
  /**
   * Input width of the widest product on int8 activations ({@linkcode llamaInt8xK}), which sizes
   * the one int8 scratch all products share; 0 or absent: no such product, no scratch.
   */
  int8xK?: number;
}

/** One tensor as the forward pass uploads it: its plan name and the host tensor. */
export interface UploadTensor {
  /** Name in the quantization plan (gate/up fused under `blk.N.ffn_gate.weight`). */
  readonly planName: string;
  /** The tensor to upload (gate and up rows concatenated for the fused product). */
  readonly tensor: HostTensor;
}

/** One product writing a column range of the qkv activation. */
export interface QkvPart {
  w: StoredTensor; // [rows, dim]
  bias?: StoredTensor; // [rows] f32
  col: number; // first column of qkv it writes
}

/** Per-layer weights in the store. Shapes as `[out, in]`. */
export interface LayerWeights {
  attnNorm: StoredTensor; // [dim] f32
  // q, k, v rows: one [qDim + 2*kvDim, dim] matrix (+ bias) when they share a format, else
  // one product each into its columns of qkv.
  qkv: QkvPart[];
  o: StoredTensor; // [dim, nHeads*headDim]
  ffnNorm: StoredTensor; // [dim] f32
  gateUp: StoredTensor; // [2*ffnDim, dim]: rows 2i, 2i+1 = gate_i, up_i
  down: StoredTensor; // [dim, ffnDim]
}

/** A model's stored weights, for plan builders sharing them (models/llama_batch.ts). */
export interface LlamaWeights {
  /** token_embd: [vocab, dim]. */
  readonly embedding: StoredTensor;
  /** The classifier [vocab, dim] (the embedding when tied). */
  readonly classifier: StoredTensor;
  /** output_norm: [dim] f32. */
  readonly outNorm: StoredTensor;
  /** Per-layer weights. */
  readonly layers: readonly LayerWeights[];
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

/**
 * A forward over tree nodes (engine/token_tree.ts): `table` is the ancestor table `[nodes, 4]
 * u32`, and the forward's row t is tree node `first + t` (its cache row is pos + t, its position
 * the tree's base plus its depth).
 */
export interface TreeRows {
  /** Ancestor table, `[nodes, 4] u32`. */
  table: GPUBuffer;
  /** Tree node of the forward's row 0. */
  first: number;
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
   * attention partials, int8 activations, position state, RoPE table). Weights are in the store.
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
  readonly #act: Record<"x" | "qkv" | "att" | "h", GPUBuffer>;
  readonly #attnScratch: GPUBuffer;
  readonly #int8Scratch?: GPUBuffer;
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
    for (const l of weights.layers) {
      for (const t of [l.attnNorm, l.o, l.ffnNorm, l.gateUp, l.down]) used.add(t);
      for (const part of l.qkv) for (const t of [part.w, part.bias]) if (t) used.add(t);
    }
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
      qkv: act("qkv"), // [T, (nHeads + 2*nKvHeads) * headDim]: q, k, v before RoPE
      att: act("att"), // attention output [T, nHeads, headDim]
      h: act("h"), // silu(gate) * up [T, ffnDim]
    };
    this.logits = act("logits"); // [maxLogitRows, vocab]
    this.#invFreq = gpu.upload(
      `${opts.label}.rope.inv_freq`,
      ropeInvFreq(config.headDim, config.ropeTheta, config.ropeScaling),
    );
    // Split-K attention partials and counters, sized for the largest plan of any T and shared
    // by all plans and layers (the counters return to 0 after every dispatch).
    this.#attnScratch = gpu.buffer(
      `${opts.label}.attn.partials`,
      sizes.attn,
      GPUBufferUsage.STORAGE,
    );
    // Int8 x of the q4_0 products (kernels/matmul.ts int8xFor), sized for the widest one at the
    // most rows the matrix-vector paths take, and shared by all plans and products: they run one
    // after another, each quantizing x right before its own product reads it.
    if (sizes.int8x > 0) {
      this.#int8Scratch = gpu.buffer(`${opts.label}.int8x`, sizes.int8x, GPUBufferUsage.STORAGE);
    }
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
    for (const { planName, tensor } of uploadList(model, formats)) {
      const format = formats.get(planName);
      if (!format) throw new Error(`${model.source}: no stored format planned for ${planName}`);
      if (format === "f16" && !f16) {
        throw new Error(`${planName}: f16 weights need the shader-f16 feature`);
      }
      stored.set(tensor.name, await store.add(opts.label, tensor, format));
    }
    return await LlamaGpu.#assemble(gpu, c, stored, opts);
  }

  /**
   * A model of `config`'s exact shapes with random weights in `format` filled on the GPU (as
   * vLLM's `--load-format dummy`; norms are 1): for benchmarks of models that no file here
   * holds. No host copy of the weights exists.
   */
  static async createRandom(
    gpu: Gpu,
    store: WeightStore,
    config: ModelConfig,
    format: Exclude<WeightFormat, "f32">,
    opts: LlamaGpuOptions,
  ): Promise<LlamaGpu> {
    const c = config, qDim = c.nHeads * c.headDim, kvDim = c.nKvHeads * c.headDim;
    const stored = new Map<string, StoredTensor>();
    let seed = 1;
    const rand = async (name: string, shape: number[]) =>
      stored.set(name, await store.addRandom(opts.label, name, shape, format, seed++));
    const vector = async (name: string, n: number, value: number) => {
      const data = new Uint8Array(new Float32Array(n).fill(value).buffer);
      stored.set(
        name,
        await store.add(opts.label, { name, dtype: "f32", shape: [n], data }, "f32"),
      );
    };
    for (let l = 0; l < c.nLayers; l++) {
      const p = `blk.${l}.`;
      await vector(p + "attn_norm.weight", c.dim, 1);
      await rand(p + "attn_qkv.weight", [qDim + 2 * kvDim, c.dim]);
      if (c.qkvBias) await vector(p + "attn_qkv.bias", qDim + 2 * kvDim, 0);
      await rand(p + "attn_output.weight", [c.dim, qDim]);
      await vector(p + "ffn_norm.weight", c.dim, 1);
      await rand(p + "ffn_gate_up.weight", [2 * c.ffnDim, c.dim]);
      await rand(p + "ffn_down.weight", [c.dim, c.ffnDim]);
    }
    await rand("token_embd.weight", [c.vocabSize, c.dim]);
    if (!c.tiedEmbeddings) await rand("output.weight", [c.vocabSize, c.dim]);
    await vector("output_norm.weight", c.dim, 1);
    return await LlamaGpu.#assemble(gpu, c, stored, opts);
  }

  /** The model over stored tensors by name (fused names for qkv and gate/up), with its buffers. */
  static async #assemble(
    gpu: Gpu,
    c: ModelConfig,
    stored: ReadonlyMap<string, StoredTensor>,
    opts: LlamaGpuOptions,
  ): Promise<LlamaGpu> {
    const get = (name: string) => {
      const t = stored.get(name);
      if (!t) throw new Error(`${opts.label}: tensor "${name}" was not stored`);
      return t;
    };
    const qDim = c.nHeads * c.headDim, kvDim = c.nKvHeads * c.headDim;
    const layers: LayerWeights[] = [];
    for (let l = 0; l < c.nLayers; l++) {
      const p = `blk.${l}.`;
      const qkv: QkvPart[] = stored.has(p + "attn_qkv.weight")
        ? [{ w: get(p + "attn_qkv.weight"), bias: stored.get(p + "attn_qkv.bias"), col: 0 }]
        : (["attn_q", "attn_k", "attn_v"] as const).map((m, i) => ({
          w: get(`${p}${m}.weight`),
          bias: stored.get(`${p}${m}.bias`),
          col: [0, qDim, qDim + kvDim][i],
        }));
      layers.push({
        attnNorm: get(p + "attn_norm.weight"),
        qkv,
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
    const products = layers.flatMap((l) => [...l.qkv.map((p) => p.w), l.o, l.gateUp, l.down]);
    const full = {
      label: opts.label,
      maxSeq: opts.maxSeq,
      maxT: opts.maxT ?? 128,
      maxLogitRows: opts.maxLogitRows ?? 17,
      kvType,
      maxWorkgroupStorage: gpu.limits.maxComputeWorkgroupStorageSize,
      int8xK: llamaInt8xK([...products, classifier]),
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
   * maxLogitRows) or none ("none": rows that only fill the cache). With `tree`, the rows are
   * tree nodes and attend by its ancestor table (see {@linkcode TreeRows}). Plans are built once
   * per (T, source, rows, tree) and cached.
   */
  plan(T: number, tokens: TokenSource, rows: LogitRows, tree?: TreeRows): Promise<Dispatch[]> {
    if (T < 1 || T > this.maxT) {
      throw new RangeError(`${this.#label}: T=${T} outside [1, ${this.maxT}]`);
    }
    if (rows === "all" && T > this.maxLogitRows) {
      throw new RangeError(`${this.#label}: ${T} logit rows > maxLogitRows ${this.maxLogitRows}`);
    }
    const idOf = (b: GPUBuffer) => {
      let id = this.#sourceIds.get(b);
      if (id === undefined) this.#sourceIds.set(b, id = this.#sourceIds.size);
      return id;
    };
    const key = `${T}:${idOf(tokens.buffer)}:${tokens.offset}:${rows}` +
      (tree ? `:tree${idOf(tree.table)}.${tree.first}` : "");
    let p = this.#plans.get(key);
    if (!p) {
      p = this.#build(T, tokens, rows, tree);
      this.#plans.set(key, p);
    }
    return p;
  }

  async #build(
    T: number,
    tokens: TokenSource,
    rows: LogitRows,
    tree?: TreeRows,
  ): Promise<Dispatch[]> {
    const g = this.#gpu, c = this.config, a = this.#act, L = this.#label;
    const qDim = c.nHeads * c.headDim, qkvDim = qDim + 2 * c.nKvHeads * c.headDim;
    const eps = c.normEps;
    const d: Dispatch[] = [];
    // x = embedding rows of the T input tokens.
    d.push(
      await createEmbedding(g, {
        label: `${L}.embed`,
        table: this.#embedding.buffer,
        dtype: this.#embedding.format,
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
      // y = x·W^T over the T rows, with the options of createLinear (norm, swiglu, bias, ...).
      const mm = (name: string, x: GPUBuffer, t: StoredTensor, y: GPUBuffer, K: number, o = {}) =>
        createLinear(g, {
          label: `${P}.${name}`,
          x,
          w: t.buffer,
          dtype: t.format,
          y,
          T,
          K,
          N: t.shape[0],
          int8Scratch: this.#int8Scratch,
          ...o,
        });
      // 1. qkv = rmsnorm(x)·[Wq; Wk; Wv]^T (+ bias): one product (one per format if they differ).
      for (const part of w.qkv) {
        d.push(
          ...await mm(`attn.qkv${w.qkv.length > 1 ? part.col : ""}`, a.x, part.w, a.qkv, c.dim, {
            norm: { weight: w.attnNorm.buffer, eps },
            bias: part.bias?.buffer,
            yOffset: part.col,
            yStride: qkvDim,
          }),
        );
      }
      // 2. Rotate q and k by their positions (state[0] + t), append k, v to the cache rows
      //    state[0] .. state[0]+T-1 and attend causally: att = softmax(q·K^T / √d)·V. A tree:
      //    positions by depth, and each row attends to the context and its ancestors only.
      d.push(
        await createFusedAttention(g, {
          label: `${P}.attn`,
          T,
          nHeads: c.nHeads,
          nKvHeads: c.nKvHeads,
          headDim: c.headDim,
          maxSeq: this.maxSeq,
          qkv: a.qkv,
          kCache: this.#kCache,
          vCache: this.#vCache,
          state: this.state,
          out: a.att,
          invFreq: this.#invFreq,
          layout: c.ropeLayout,
          dtype: this.kvType,
          layers: c.nLayers,
          layer: l,
          scratch: this.#attnScratch,
          tree,
        }),
      );
      // 3. x += att·Wo (residual fused into the product).
      d.push(...await mm("attn.o", a.att, w.o, a.x, qDim, { accumulate: true }));
      // 4. h = silu(xn·Wgate) * (xn·Wup) with xn = rmsnorm(x): SwiGLU in the product's epilogue.
      d.push(
        ...await mm("ffn.gate_up", a.x, w.gateUp, a.h, c.dim, {
          norm: { weight: w.ffnNorm.buffer, eps },
          swiglu: true,
        }),
      );
      // 5. x += h·Wdown.
      d.push(...await mm("ffn.down", a.h, w.down, a.x, c.ffnDim, { accumulate: true }));
    }
    // logits = rmsnorm(x)·Wcls for the last row (prefill, decode) or every row (verify).
    if (rows !== "none") {
      const first = rows === "last" ? T - 1 : 0, n = rows === "last" ? 1 : T;
      d.push(
        ...await createLinear(g, {
          label: `${L}.classifier`,
          x: a.x,
          xOffset: first * c.dim,
          w: this.#classifier.buffer,
          dtype: this.#classifier.format,
          norm: { weight: this.#outNorm.buffer, eps },
          y: this.logits,
          T: n,
          K: c.dim,
          N: c.vocabSize,
          int8Scratch: this.#int8Scratch,
        }),
      );
    }
    // state[0] += T: these rows are now in the cache.
    d.push(await createAdvance(g, { label: `${L}.advance`, state: this.state, by: T }));
    return d;
  }

  /**
   * The stored weights, shared with other plan builders (models/llama_batch.ts).
   *
   * @ignore
   */
  get weights(): LlamaWeights {
    return {
      embedding: this.#embedding,
      classifier: this.#classifier,
      outNorm: this.#outNorm,
      layers: this.#layers,
    };
  }

  /**
   * The K and V caches, `[layers, maxSeq, nKvHeads, headDim]` of {@linkcode LlamaGpu.kvType}
   * (q8: then per-row scales), for kernels that move cache rows (kernels/kv_compact.ts).
   */
  get kvCaches(): { k: GPUBuffer; v: GPUBuffer } {
    return { k: this.#kCache, v: this.#vCache };
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
    this.#attnScratch.destroy();
    this.#int8Scratch?.destroy();
  }
}

const uploads = new WeakMap<LoadedModel, Map<string, UploadTensor[]>>();

/**
 * The tensors {@linkcode LlamaGpu.create} uploads, in order, for the stored formats `formats`
 * (by canonical name): per layer q, k and v as one `[qDim + 2*kvDim, dim]` matrix
 * `blk.N.attn_qkv.weight` (bias `attn_qkv.bias`) when `formats` gives them one format (planned
 * under `attn_q`), else apart; gate and up as one `[2*ffnDim, dim]` matrix of interleaved rows
 * (row 2i = gate_i, 2i + 1 = up_i), planned under `ffn_gate`. Memoized per model and fusion
 * pattern, so the VRAM planner and the upload hash the same host arrays once.
 */
export function uploadList(
  model: LoadedModel,
  formats: ReadonlyMap<string, WeightFormat>,
): UploadTensor[] {
  const c = model.config;
  const fused = (l: number) => {
    const f = ["attn_q", "attn_k", "attn_v"].map((m) => formats.get(`blk.${l}.${m}.weight`));
    return f[0] !== undefined && f[0] === f[1] && f[1] === f[2];
  };
  const pattern = Array.from({ length: c.nLayers }, (_, l) => fused(l) ? "1" : "0").join("");
  let byPattern = uploads.get(model);
  if (!byPattern) uploads.set(model, byPattern = new Map());
  let list = byPattern.get(pattern);
  if (list) return list;
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
    const qkv = ["attn_q", "attn_k", "attn_v"];
    if (pattern[l] === "1") {
      for (const kind of c.qkvBias ? ["weight", "bias"] : ["weight"]) {
        list.push({
          planName: `${p}attn_q.${kind}`,
          tensor: concatRows(`${p}attn_qkv.${kind}`, qkv.map((m) => get(`${p}${m}.${kind}`))),
        });
      }
    } else {
      for (const m of qkv) {
        add(`${p}${m}.weight`);
        if (c.qkvBias) add(`${p}${m}.bias`);
      }
    }
    add(p + "attn_output.weight");
    add(p + "ffn_norm.weight");
    list.push({
      planName: p + "ffn_gate.weight",
      tensor: interleaveRows(
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
  byPattern.set(pattern, list);
  return list;
}

/**
 * Input width K of the widest product weight `[N, K]` in `products` whose format takes int8
 * activations under the current `matvecTuning.int8x` (kernels/matmul.ts `int8xFor`: by default
 * q4_0 where the runtime has packed integer dot products), 0 when none does.
 *
 * @example
 * ```ts
 * import { llamaInt8xK } from "./llama.ts";
 * const w = (format: "f16" | "q8_0", K: number) => ({ format, shape: [64, K] });
 * console.log(llamaInt8xK([w("f16", 4096), w("f16", 14336)])); // 0
 * ```
 */
export function llamaInt8xK(
  products: Iterable<{ readonly format: WeightFormat; readonly shape: readonly number[] }>,
): number {
  let K = 0;
  for (const p of products) if (int8xFor(p.format)) K = Math.max(K, p.shape[1]);
  return K;
}

/**
 * {@linkcode llamaInt8xK} of the products {@linkcode LlamaGpu.create} builds for `model` stored
 * as `formats`: every matrix of {@linkcode uploadList} but the embedding table, which is a
 * product (the classifier) only when the embeddings are tied. The VRAM planner's view of it.
 */
export function plannedInt8xK(
  model: LoadedModel,
  formats: ReadonlyMap<string, WeightFormat>,
): number {
  const products = [];
  for (const { planName, tensor } of uploadList(model, formats)) {
    if (tensor.shape.length !== 2) continue; // norms and biases
    if (planName === "token_embd.weight" && !model.config.tiedEmbeddings) continue;
    const format = formats.get(planName);
    if (format) products.push({ format, shape: tensor.shape });
  }
  return llamaInt8xK(products);
}

/**
 * Exact byte sizes of the non-weight buffers a {@linkcode LlamaGpu} allocates for `shape`: one
 * KV cache (K or V), each activation, the fused attention's split-K scratch (the largest any T
 * up to maxT needs), the int8 activations' scratch (0 without `shape.int8xK`) and their total
 * as "scratch". The VRAM planner uses the same function.
 */
export function llamaBufferSizes(c: ModelConfig, shape: LlamaBufferShape): {
  kvCache: number;
  act: Record<"x" | "qkv" | "att" | "h" | "logits", number>;
  attn: number;
  int8x: number;
  scratch: number;
} {
  const kvDim = c.nKvHeads * c.headDim, qDim = c.nHeads * c.headDim, T = shape.maxT;
  const pad4 = (n: number) => Math.max(4, Math.ceil(n / 4) * 4);
  const act = {
    x: T * c.dim * 4,
    qkv: T * (qDim + 2 * kvDim) * 4,
    att: T * qDim * 4,
    h: T * c.ffnDim * 4,
    logits: shape.maxLogitRows * c.vocabSize * 4,
  };
  let attn = 4;
  for (let t = 1; t <= T; t++) {
    const s = {
      T: t,
      nHeads: c.nHeads,
      nKvHeads: c.nKvHeads,
      headDim: c.headDim,
      maxSeq: shape.maxSeq,
    };
    const plan = fusedAttentionPlan(s, shape.maxWorkgroupStorage);
    attn = Math.max(attn, fusedAttentionScratchBytes(s, plan));
  }
  const state = 16, invFreq = pad4((c.headDim / 2) * 4);
  const int8x = int8xSharedScratchBytes(T, shape.int8xK ?? 0); // a multiple of 8
  let scratch = state + invFreq + attn + int8x;
  for (const n of Object.values(act)) scratch += pad4(n);
  const kvCache = pad4(kvCacheBytes(shape.kvType, c.nLayers, shape.maxSeq, c.nKvHeads, c.headDim));
  return { kvCache, act, attn, int8x, scratch };
}

/** Rows of `parts` one after another (same dtype and row width), as one host tensor. */
function concatRows(name: string, parts: HostTensor[]): HostTensor {
  const a = parts[0];
  for (const b of parts) {
    if (b.dtype !== a.dtype || (b.shape[1] ?? 1) !== (a.shape[1] ?? 1)) {
      throw new Error(
        `cannot fuse ${a.name} and ${b.name}: ${a.dtype}[${a.shape}] vs ${b.dtype}[${b.shape}]`,
      );
    }
  }
  const data = new Uint8Array(parts.reduce((n, t) => n + t.data.byteLength, 0));
  let o = 0;
  for (const t of parts) {
    data.set(t.data, o);
    o += t.data.byteLength;
  }
  const rows = parts.reduce((n, t) => n + t.shape[0], 0);
  return { name, dtype: a.dtype, shape: a.shape.length > 1 ? [rows, a.shape[1]] : [rows], data };
}

/**
 * Rows of `a` and `b` interleaved, `[a0; b0; a1; b1; ...]` (same dtype and shape), as one host
 * tensor. Rows are whole byte ranges in every host dtype (block formats hold whole blocks).
 */
function interleaveRows(name: string, a: HostTensor, b: HostTensor): HostTensor {
  if (a.dtype !== b.dtype || a.shape[0] !== b.shape[0] || a.shape[1] !== b.shape[1]) {
    throw new Error(
      `cannot fuse ${a.name} and ${b.name}: ${a.dtype}[${a.shape}] vs ${b.dtype}[${b.shape}]`,
    );
  }
  const rows = a.shape[0], rowBytes = a.data.byteLength / rows;
  const data = new Uint8Array(2 * a.data.byteLength);
  for (let r = 0; r < rows; r++) {
    data.set(a.data.subarray(r * rowBytes, (r + 1) * rowBytes), 2 * r * rowBytes);
    data.set(b.data.subarray(r * rowBytes, (r + 1) * rowBytes), (2 * r + 1) * rowBytes);
  }
  return { name, dtype: a.dtype, shape: [2 * rows, a.shape[1]], data };
}
