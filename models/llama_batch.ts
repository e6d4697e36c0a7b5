/**
 * The Llama forward over a BATCH of sequences with a paged KV cache (continuous batching, issue
 * 12): batch row r carries its own sequence, position and token (the paged rows `[R] (seq, pos)`
 * of kernels/paged_attention.ts), its K and V go through its sequence's block table into one
 * pool of fixed-size blocks (engine/paged_kv.ts), and every product runs over all R rows at
 * once, so a decode step of R sequences streams each weight once, as one sequence's would.
 *
 * It shares the weights in the store with the model's {@linkcode LlamaGpu} (whose contiguous
 * cache keeps serving the serial path) and owns the pool, the block tables, activations for
 * `maxRows` rows and logits for `maxLogitRows`. One plan shape serves a prefill chunk (R rows of
 * one sequence at consecutive positions, logits of the last) and a decode step (one row per
 * active sequence, logits of every row). Per layer, six dispatches:
 *
 *   qkv = rmsnorm(x)·[Wq; Wk; Wv]^T      products over R rows (kernels/matmul.ts)
 *   q = RoPE(q), pool[phys(seq[r], pos[r])] = RoPE(k), v   kernels/paged_qkv_write.ts
 *   att = causal attention over the row's own sequence through its block table
 *   x += att·Wo; h = swiglu(rmsnorm(x)·Wgate/up); x += h·Wdown
 *
 * @module
 */
import type { Dispatch, Gpu } from "../engine/gpu.ts";
import type { StoredTensor } from "../engine/weights.ts";
import { type LlamaGpu, llamaInt8xK, type LogitRows, type TokenSource } from "./llama.ts";
import type { ModelConfig } from "./types.ts";
import { createEmbedding } from "../kernels/embedding.ts";
import { createLinear, int8xSharedScratchBytes } from "../kernels/matmul.ts";
import { ropeInvFreq } from "../kernels/rope.ts";
import type { KvDType } from "../kernels/kv_write.ts";
import {
  createPagedAttention,
  pagedAttentionPlan,
  pagedAttentionScratchSizes,
  type PagedKvLayout,
} from "../kernels/paged_attention.ts";
import { createPagedQkvWrite } from "../kernels/paged_qkv_write.ts";
import {
  BlockPool,
  blockTableImage,
  KV_BLOCK_ROWS,
  pagedKvBufferBytes,
} from "../engine/paged_kv.ts";

/** The shape that fixes a batch's GPU buffers (and so its bytes, {@linkcode llamaBatchSizes}). */
export interface LlamaBatchShape {
  /** Sequences at once: rows of the block-table buffer (the server's `--parallel`). */
  maxSeqs: number;
  /** Most rows one sequence holds (the context): sizes each table row. */
  maxSeqRows: number;
  /** Blocks in the pool; default enough for every sequence to reach `maxSeqRows`. */
  numBlocks?: number;
  /** Cache rows per block; default {@linkcode KV_BLOCK_ROWS}. */
  blockRows?: number;
  /** Most batch rows per forward (a prefill chunk); default max(maxSeqs, 64). */
  maxRows?: number;
  /** Most logit rows per forward; default maxSeqs. */
  maxLogitRows?: number;
  /** Pool element type; default the model's KV type. */
  kv?: KvDType;
}

/** Resolved {@linkcode LlamaBatchShape}: every field fixed. */
export type LlamaBatchLayout = Required<LlamaBatchShape> & { maxBlocksPerSeq: number };

/** The shape with its defaults filled in, for `model`'s KV type `modelKv`. */
export function resolveBatchShape(s: LlamaBatchShape, modelKv: KvDType): LlamaBatchLayout {
  for (const [f, x] of Object.entries(s)) {
    if (f !== "kv" && x !== undefined && (!Number.isInteger(x) || (x as number) < 1)) {
      throw new RangeError(`batch shape: ${f} must be an integer >= 1, got ${x}`);
    }
  }
  const blockRows = s.blockRows ?? KV_BLOCK_ROWS;
  const maxBlocksPerSeq = Math.ceil(s.maxSeqRows / blockRows);
  return {
    maxSeqs: s.maxSeqs,
    maxSeqRows: s.maxSeqRows,
    blockRows,
    numBlocks: s.numBlocks ?? s.maxSeqs * maxBlocksPerSeq,
    maxRows: s.maxRows ?? Math.max(s.maxSeqs, 64),
    maxLogitRows: s.maxLogitRows ?? s.maxSeqs,
    kv: s.kv ?? modelKv,
    maxBlocksPerSeq,
  };
}

/**
 * Exact bytes of the buffers a {@linkcode LlamaBatch} of `layout` allocates: the pool (K and V
 * together, engine/paged_kv.ts `pagedKvPoolBytes`) as "kv", and activations, logits, block
 * tables, RoPE table, split-K attention scratch and the int8 activations' scratch (`int8xK`:
 * the model's models/llama.ts `llamaInt8xK`, 0 for none) as "scratch". The VRAM planner uses
 * the same.
 */
export function llamaBatchSizes(
  c: ModelConfig,
  layout: LlamaBatchLayout,
  maxWorkgroupStorage: number,
  int8xK = 0,
): {
  kv: number;
  act: Record<BatchAct | "logits", number>;
  attn: [number, number];
  int8x: number;
  scratch: number;
} {
  const pad4 = (n: number) => Math.max(4, Math.ceil(n / 4) * 4);
  const qDim = c.nHeads * c.headDim, kvDim = c.nKvHeads * c.headDim, T = layout.maxRows;
  const act = {
    x: T * c.dim * 4,
    qkv: T * (qDim + 2 * kvDim) * 4,
    q: T * qDim * 4,
    att: T * qDim * 4,
    h: T * c.ffnDim * 4,
    logits: layout.maxLogitRows * c.vocabSize * 4,
  };
  // Split-K scratch: one (acc, ml) pair shared by every R up to maxRows and every layer, as
  // large as the largest split plan's (kernels/paged_attention.ts PagedAttentionScratch).
  let attnAcc = 0, attnMl = 0;
  for (let R = 1; R <= T; R++) {
    // Row groups of any size a plan may take (a batched verify's k + 1 rows per sequence).
    for (let rowGroup = 1; rowGroup <= Math.min(R, MAX_ROW_GROUP); rowGroup++) {
      if (R % rowGroup) continue;
      const shape = {
        R,
        nHeads: c.nHeads,
        nKvHeads: c.nKvHeads,
        headDim: c.headDim,
        maxSeqRows: layout.maxBlocksPerSeq * layout.blockRows,
        rowGroup,
      };
      const plan = pagedAttentionPlan(shape, maxWorkgroupStorage);
      const need = pagedAttentionScratchSizes(shape, plan);
      attnAcc = Math.max(attnAcc, need.acc);
      attnMl = Math.max(attnMl, need.ml);
    }
  }
  const attn: [number, number] = [pad4(attnAcc), pad4(attnMl)];
  const table = pad4(layout.maxSeqs * layout.maxBlocksPerSeq * 4);
  const invFreq = pad4((c.headDim / 2) * 4);
  const int8x = int8xSharedScratchBytes(T, int8xK); // a multiple of 8
  let scratch = attn[0] + attn[1] + table + invFreq + int8x;
  for (const n of Object.values(act)) scratch += pad4(n);
  const kv = 2 * pad4(pagedKvBufferBytes({
    dtype: layout.kv,
    layers: c.nLayers,
    numBlocks: layout.numBlocks,
    blockRows: layout.blockRows,
    nKvHeads: c.nKvHeads,
    headDim: c.headDim,
  }));
  return { kv, act, attn, int8x, scratch };
}

type BatchAct = "x" | "qkv" | "q" | "att" | "h";

/** Block-table entry of no block: past the pool, so the paged kernels drop writes to it. */
const UNMAPPED = 0xffffffff;

/**
 * Most batch rows per row group a forward takes (`rowGroup` of {@linkcode LlamaBatch.plan}: a
 * batched verify's k + 1 rows per sequence; kernels/paged_attention.ts).
 */
export const MAX_ROW_GROUP = 17;

/** Where a batched forward reads its inputs: token ids and paged rows `[R] (seq, pos)`. */
export interface BatchInputs {
  /** u32 ids, row r's at `offset + r`. */
  tokens: TokenSource;
  /** rows: [>= R] (seq, pos) u32 pairs (kernels/paged_attention.ts `pagedRowsImage`). */
  rows: GPUBuffer;
}

/**
 * A model's batched forward over a paged KV pool (see the module doc). Sequence slot `s` (0 ..
 * maxSeqs-1) is row s of the block tables; {@linkcode LlamaBatch.setTable} writes a slot's table.
 */
export class LlamaBatch {
  /** The model whose weights this forward uses. */
  readonly model: LlamaGpu;
  /** Resolved hyperparameters. */
  readonly config: ModelConfig;
  /** Resolved shape. */
  readonly layout: LlamaBatchLayout;
  /** The free list of the pool's blocks. */
  readonly pool: BlockPool;
  /** logits: [maxLogitRows, vocab] f32. */
  readonly logits: GPUBuffer;
  /** GPU bytes as allocated: "kv" (the pool, K and V) and "scratch" (everything else). */
  readonly bytes: { kv: number; scratch: number };

  readonly #gpu: Gpu;
  readonly #label: string;
  readonly #kPool: GPUBuffer;
  readonly #vPool: GPUBuffer;
  readonly #table: GPUBuffer;
  readonly #invFreq: GPUBuffer;
  readonly #act: Record<BatchAct, GPUBuffer>;
  readonly #scratch: { acc: GPUBuffer; ml: GPUBuffer };
  readonly #int8Scratch?: GPUBuffer;
  readonly #plans = new Map<string, Promise<Dispatch[]>>();
  readonly #ids = new Map<GPUBuffer, number>();

  private constructor(gpu: Gpu, model: LlamaGpu, layout: LlamaBatchLayout, label: string) {
    this.#gpu = gpu;
    this.model = model;
    this.config = model.config;
    this.layout = layout;
    this.#label = label;
    const c = model.config;
    const w = model.weights;
    const products = w.layers.flatMap((l) => [...l.qkv.map((p) => p.w), l.o, l.gateUp, l.down]);
    const int8xK = llamaInt8xK([...products, w.classifier]);
    const sizes = llamaBatchSizes(c, layout, gpu.limits.maxComputeWorkgroupStorageSize, int8xK);
    const S = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST;
    // K/V pools: [layers, numBlocks * blockRows, nKvHeads, headDim] of kv (q8: then scales).
    this.#kPool = gpu.buffer(`${label}.pool.k`, sizes.kv / 2, S);
    this.#vPool = gpu.buffer(`${label}.pool.v`, sizes.kv / 2, S);
    // Block tables: [maxSeqs, maxBlocksPerSeq] u32.
    this.#table = gpu.buffer(`${label}.tables`, layout.maxSeqs * layout.maxBlocksPerSeq * 4, S);
    this.#invFreq = gpu.upload(
      `${label}.rope.inv_freq`,
      ropeInvFreq(c.headDim, c.ropeTheta, c.ropeScaling),
    );
    const act = (name: BatchAct | "logits") =>
      gpu.buffer(`${label}.act.${name}`, sizes.act[name], S);
    this.#act = {
      x: act("x"), // residual stream [R, dim]
      qkv: act("qkv"), // [R, qDim + 2 kvDim]: q, k, v before RoPE
      q: act("q"), // [R, nHeads, headDim] after RoPE (k and v go straight into the pool)
      att: act("att"), // attention output [R, nHeads, headDim]
      h: act("h"), // silu(gate) * up [R, ffnDim]
    };
    this.logits = act("logits");
    this.#scratch = {
      acc: gpu.buffer(`${label}.attn.partial_acc`, sizes.attn[0], GPUBufferUsage.STORAGE),
      ml: gpu.buffer(`${label}.attn.partial_ml`, sizes.attn[1], GPUBufferUsage.STORAGE),
    };
    // Int8 x of the q4_0 products (kernels/matmul.ts int8xFor): this forward's own, sized by its
    // maxRows (the model's is sized by its maxT, which may be smaller), shared by its products.
    if (sizes.int8x > 0) {
      this.#int8Scratch = gpu.buffer(`${label}.int8x`, sizes.int8x, GPUBufferUsage.STORAGE);
    }
    this.pool = new BlockPool(layout.numBlocks, layout.blockRows);
    this.bytes = { kv: sizes.kv, scratch: sizes.scratch };
  }

  /**
   * Allocates the pool and buffers of `shape` for `model` (whose weights it shares), labelled
   * `label` (default "target.batch").
   */
  static async create(
    gpu: Gpu,
    model: LlamaGpu,
    shape: LlamaBatchShape,
    label = "target.batch",
  ): Promise<LlamaBatch> {
    const layout = resolveBatchShape(shape, model.kvType);
    const c = model.config;
    if (layout.kv === "f16" && !gpu.features.f16) {
      throw new Error("an f16 KV pool needs the shader-f16 feature");
    }
    if (c.headDim % 4 !== 0) {
      throw new Error(`batched decoding needs headDim to be a multiple of 4, got ${c.headDim}`);
    }
    if (layout.maxSeqRows > c.maxSeqLen) {
      throw new RangeError(
        `batch: ${layout.maxSeqRows} rows per sequence > the model's context ${c.maxSeqLen}`,
      );
    }
    const b = await gpu.scoped(`${label} buffers`, () => new LlamaBatch(gpu, model, layout, label));
    gpu.write(b.#table, new Uint32Array(layout.maxSeqs * layout.maxBlocksPerSeq).fill(UNMAPPED));
    return b;
  }

  /**
   * Writes slot `seq`'s block table (engine/paged_kv.ts `SequenceBlocks.blocks`). Entries past
   * its blocks hold an id outside the pool, so a row written past a sequence's blocks (a
   * rejected draft of a sequence that does not speculate) is dropped, never written into another
   * sequence's block.
   */
  setTable(seq: number, blocks: readonly number[]): void {
    const L = this.layout;
    if (!Number.isInteger(seq) || seq < 0 || seq >= L.maxSeqs) {
      throw new RangeError(`${this.#label}: slot ${seq} outside [0, ${L.maxSeqs})`);
    }
    const row = blockTableImage([blocks], L.maxBlocksPerSeq).fill(UNMAPPED, blocks.length);
    this.#gpu.write(this.#table, row, seq * L.maxBlocksPerSeq * 4);
  }

  /**
   * The dispatches of one forward over `R` batch rows: ids from `io.tokens`, (seq, pos) from
   * `io.rows`. Logits to {@linkcode LlamaBatch.logits}: every row ("all", R ≤ maxLogitRows),
   * the last only ("last": a prefill chunk) or none. With `rowGroup` V > 1 the rows come in R / V
   * groups of one sequence each, step-major (group g: rows g, g + R/V, ...; a batched verify's
   * k + 1 rows), and the attention serves a group's rows in one workgroup (they share their
   * keys). Positions are not advanced (the caller owns
   * `io.rows`). Built once per (R, inputs, rows, rowGroup) and cached.
   */
  plan(R: number, io: BatchInputs, rows: LogitRows, rowGroup = 1): Promise<Dispatch[]> {
    const L = this.layout;
    if (!Number.isInteger(R) || R < 1 || R > L.maxRows) {
      throw new RangeError(`${this.#label}: R=${R} outside [1, ${L.maxRows}]`);
    }
    if (rows === "all" && R > L.maxLogitRows) {
      throw new RangeError(`${this.#label}: ${R} logit rows > maxLogitRows ${L.maxLogitRows}`);
    }
    if (!Number.isInteger(rowGroup) || rowGroup < 1 || rowGroup > MAX_ROW_GROUP || R % rowGroup) {
      throw new RangeError(
        `${this.#label}: rowGroup ${rowGroup} must divide R=${R} and lie in [1, ${MAX_ROW_GROUP}]`,
      );
    }
    const id = (b: GPUBuffer) => {
      let i = this.#ids.get(b);
      if (i === undefined) this.#ids.set(b, i = this.#ids.size);
      return i;
    };
    const key = `${R}:${id(io.tokens.buffer)}.${io.tokens.offset}:${
      id(io.rows)
    }:${rows}:${rowGroup}`;
    let p = this.#plans.get(key);
    if (!p) {
      p = this.#build(R, io, rows, rowGroup);
      this.#plans.set(key, p);
    }
    return p;
  }

  async #build(
    R: number,
    io: BatchInputs,
    rows: LogitRows,
    rowGroup: number,
  ): Promise<Dispatch[]> {
    const g = this.#gpu, c = this.config, a = this.#act, L = this.#label, w = this.model.weights;
    const qDim = c.nHeads * c.headDim, qkvDim = qDim + 2 * c.nKvHeads * c.headDim;
    const eps = c.normEps, lay = this.layout;
    const paged = (layer: number): PagedKvLayout => ({
      nKvHeads: c.nKvHeads,
      headDim: c.headDim,
      blockRows: lay.blockRows,
      numBlocks: lay.numBlocks,
      numSeqs: lay.maxSeqs,
      maxBlocksPerSeq: lay.maxBlocksPerSeq,
      layers: c.nLayers,
      layer,
      dtype: lay.kv,
    });
    const d: Dispatch[] = [];
    // x = embedding rows of the R input tokens.
    d.push(
      await createEmbedding(g, {
        label: `${L}.embed`,
        table: w.embedding.buffer,
        dtype: w.embedding.format,
        V: c.vocabSize,
        D: c.dim,
        tokens: io.tokens.buffer,
        tokensOffset: io.tokens.offset,
        x: a.x,
        T: R,
      }),
    );
    for (let l = 0; l < c.nLayers; l++) {
      const lw = w.layers[l], P = `${L}.L${l}`;
      const mm = (name: string, x: GPUBuffer, t: StoredTensor, y: GPUBuffer, K: number, o = {}) =>
        createLinear(g, {
          label: `${P}.${name}`,
          x,
          w: t.buffer,
          dtype: t.format,
          y,
          T: R,
          K,
          N: t.shape[0],
          int8Scratch: this.#int8Scratch,
          ...o,
        });
      // 1. qkv = rmsnorm(x)·[Wq; Wk; Wv]^T (+ bias), as in models/llama.ts.
      for (const part of lw.qkv) {
        d.push(
          ...await mm(`attn.qkv${lw.qkv.length > 1 ? part.col : ""}`, a.x, part.w, a.qkv, c.dim, {
            norm: { weight: lw.attnNorm.buffer, eps },
            bias: part.bias?.buffer,
            yOffset: part.col,
            yStride: qkvDim,
          }),
        );
      }
      // 2-3. q turned by each row's own position into a.q; k turned and v into the pool at
      // phys(seq[r], pos[r]) (one dispatch). 4. attention over each row's sequence.
      const pools = { kCache: this.#kPool, vCache: this.#vPool, rows: io.rows, table: this.#table };
      d.push(
        await createPagedQkvWrite(g, {
          ...paged(l),
          ...pools,
          label: `${P}.attn.qkv_write`,
          R,
          nHeads: c.nHeads,
          ropeLayout: c.ropeLayout,
          qkv: a.qkv,
          q: a.q,
          invFreq: this.#invFreq,
        }),
      );
      d.push(
        await createPagedAttention(g, {
          ...paged(l),
          ...pools,
          label: `${P}.attn`,
          R,
          nHeads: c.nHeads,
          q: a.q,
          out: a.att,
          scratch: this.#scratch,
          rowGroup,
        }),
      );
      // 5. x += att·Wo; 6. h = silu(xn·Wgate) * (xn·Wup), xn = rmsnorm(x); 7. x += h·Wdown.
      d.push(...await mm("attn.o", a.att, lw.o, a.x, qDim, { accumulate: true }));
      d.push(
        ...await mm("ffn.gate_up", a.x, lw.gateUp, a.h, c.dim, {
          norm: { weight: lw.ffnNorm.buffer, eps },
          swiglu: true,
        }),
      );
      d.push(...await mm("ffn.down", a.h, lw.down, a.x, c.ffnDim, { accumulate: true }));
    }
    // logits = rmsnorm(x)·Wcls for every row (decode step) or the last (prefill chunk).
    if (rows !== "none") {
      const first = rows === "last" ? R - 1 : 0, n = rows === "last" ? 1 : R;
      d.push(
        ...await createLinear(g, {
          label: `${L}.classifier`,
          x: a.x,
          xOffset: first * c.dim,
          w: w.classifier.buffer,
          dtype: w.classifier.format,
          norm: { weight: w.outNorm.buffer, eps },
          y: this.logits,
          T: n,
          K: c.dim,
          N: c.vocabSize,
          int8Scratch: this.#int8Scratch,
        }),
      );
    }
    return d;
  }

  /** Frees the pool, tables, activations and logits (weights belong to the store). */
  destroy(): void {
    for (const b of [this.#kPool, this.#vPool, this.#table, this.#invFreq, this.logits]) {
      b.destroy();
    }
    for (const b of Object.values(this.#act)) b.destroy();
    this.#scratch.acc.destroy();
    this.#scratch.ml.destroy();
    this.#int8Scratch?.destroy();
  }
}
