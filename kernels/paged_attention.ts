/**
 * Paged KV write and paged attention for a BATCH of sequences in one dispatch (vLLM's
 * PagedAttention; issue 12). Batch row r (r = 0 .. R-1) belongs to sequence `seq[r]` and sits at
 * position `pos[r]` of it; several rows may belong to one sequence (speculative verify: consecutive
 * positions), and a row whose `seq` is {@linkcode PAGED_NO_SEQ} (or any id >= numSeqs) is padding:
 * nothing is written for it and its output is 0.
 *
 * The pool (engine/paged_kv.ts) is one K and one V buffer laid out as a contiguous cache of
 * `numBlocks * blockRows` rows (kernels/kv_write.ts layout: `[layers, poolRows, nKvHeads, headDim]`
 * of f32 or f16; q8: int8 values, then one f32 scale per head vector). Sequence row `s` of
 * sequence `q` is physical row
 *
 *   phys(q, s) = table[q * maxBlocksPerSeq + s / blockRows] * blockRows + s % blockRows
 *
 * with `table` the flat u32 block tables `[numSeqs, maxBlocksPerSeq]`
 * (engine/paged_kv.ts `blockTableImage`). Nothing outside the pool is ever read or written,
 * whatever the tables and rows hold: rows at or past `maxBlocksPerSeq * blockRows` are not written
 * and not attended to, and a row mapped to a block id >= numBlocks (a host bug) is not written and
 * reads as zero K and V.
 *
 * - KV write ({@linkcode createPagedKvWrite}): row r's k and v (RoPE already applied) go to
 *   `phys(seq[r], pos[r])` of one layer, converted to the pool's dtype. Two rows naming the same
 *   (seq, pos) race: the caller must not do that.
 * - Attention ({@linkcode createPagedAttention}): causal GQA over the row's own sequence,
 *
 *     out[r, h, :] = softmax_s(q[r, h, :] · K[phys(seq[r], s), h/group, :] * scale) · V[...],
 *     s in 0 .. pos[r], scale = 1/sqrt(headDim),
 *
 *   in ONE dispatch, FlashAttention-style (online softmax over key tiles staged in workgroup
 *   memory) with the tile math of kernels/attention.ts ({@linkcode flashTileWgsl}). Workgroup
 *   (x, y, z) owns a block of query rows of row group x / rowBlocks, kv head y, and key chunk z:
 *   a row group is one batch row (its query heads), or with `rowGroup` V the V rows g, g + R/V,
 *   ... of one sequence (a batched verify's k + 1 rows, step-major), whose V x group query rows
 *   share the key tiles, each masked at its own position.
 *   When the unsplit grid is too small to fill the GPU ({@linkcode pagedAttentionPlan}), the keys
 *   are split (flash-decoding) into chunks of a FIXED size (one key tile): chunk z holds keys
 *   [z*chunk, (z+1)*chunk) of the row, so a row's work follows its own length pos + 1, read
 *   from the rows buffer, and the chunk slots past it (the grid has enough for maxSeqRows) return
 *   at once. A row whose keys fit one chunk writes its output directly; otherwise every chunk
 *   holding keys stores its partial (m, l, acc) and counts itself in an atomic counter of its
 *   (row, head block, kv head), and the last to arrive resets the counter and merges the
 *   partials of those chunks only (as kernels/fused_attention.ts does for the serial cache).
 *   The scratch ({@linkcode PagedAttentionScratch}) is sized exactly by
 *   {@linkcode pagedAttentionScratchSizes} and never needs clearing.
 *
 * The batch rows `rows: [R] (seq, pos)` and the tables are GPU buffers, so the dispatches are
 * built once per (R, shape) and reused as sequences join, grow and leave.
 *
 * @module
 */
import { type Dispatch, type Gpu, grid2d } from "../engine/gpu.ts";
import {
  attentionKeyTile,
  type AttentionPlan,
  ATTN_BQ_MAX,
  ATTN_MIN_WORKGROUPS,
  ATTN_WG,
  cacheElem,
  flashTileVarsWgsl,
  flashTileWgsl,
  kvLoadersWgsl,
  mergeWorkers,
  type SplitMergeWgsl,
  splitMergeWgsl,
} from "./attention.ts";
import { lastArrivalWgsl } from "./argmax.ts";
import { fusedAttentionWorkgroup } from "./fused_attention.ts";
import {
  checkKvCache,
  KV_Q8_WGSL,
  KV_WRITE_Q8_WG,
  KV_WRITE_WG,
  kvDequantizeRef,
  type KvDType,
  kvQuantizeRef,
} from "./kv_write.ts";

/** The `seq` of a padding batch row: nothing is written for it and its output is 0. */
export const PAGED_NO_SEQ = 0xffffffff;

/** One batch row: its sequence (index into the block tables) and its position in that sequence. */
export interface PagedRow {
  /** Sequence index in [0, numSeqs), or {@linkcode PAGED_NO_SEQ} for a padding row. */
  seq: number;
  /** Position (cache row) of this row within its sequence. */
  pos: number;
}

/**
 * The u32 image of the batch rows the paged kernels read: `[R, 2]`, (seq, pos) per row.
 *
 * @example
 * ```ts
 * import { pagedRowsImage, PAGED_NO_SEQ } from "./paged_attention.ts";
 * const img = pagedRowsImage([{ seq: 1, pos: 16 }, { seq: PAGED_NO_SEQ, pos: 0 }]);
 * console.assert(img[0] === 1 && img[1] === 16 && img[2] === PAGED_NO_SEQ);
 * ```
 */
export function pagedRowsImage(rows: readonly PagedRow[]): Uint32Array {
  const out = new Uint32Array(rows.length * 2);
  rows.forEach((r, i) => {
    for (const [f, x] of [["seq", r.seq], ["pos", r.pos]] as const) {
      if (!Number.isInteger(x) || x < 0 || x > PAGED_NO_SEQ) {
        throw new Error(`pagedRowsImage: row ${i} ${f} must be a u32, got ${x}`);
      }
    }
    out[2 * i] = r.seq;
    out[2 * i + 1] = r.pos;
  });
  return out;
}

/** Static shape of the paged pool and block tables, shared by the write and the attention. */
export interface PagedKvLayout {
  /** Key/value heads. */
  nKvHeads: number;
  /** Per-head size; a multiple of 4. */
  headDim: number;
  /** Cache rows per block. */
  blockRows: number;
  /** Blocks in the pool (pool rows = numBlocks * blockRows). */
  numBlocks: number;
  /** Sequences (rows of the block-table buffer). */
  numSeqs: number;
  /** Entries per block-table row: a sequence holds at most maxBlocksPerSeq * blockRows rows. */
  maxBlocksPerSeq: number;
  /** Layers in the pool buffers. */
  layers: number;
  /** Layer written / attended over, in [0, layers). */
  layer: number;
  /** Element type of the pool. */
  dtype: KvDType;
}

/** Static shape of one paged attention dispatch. */
export interface PagedAttentionShape {
  /** Batch rows (static per dispatch). */
  R: number;
  /** Query heads; a multiple of nKvHeads. */
  nHeads: number;
  /** Key/value heads. */
  nKvHeads: number;
  /** Per-head size; a multiple of 4. */
  headDim: number;
  /** Longest sequence the tables allow: maxBlocksPerSeq * blockRows (sizes the key split). */
  maxSeqRows: number;
  /**
   * Batch rows per row group (default 1): with V > 1 the R rows form R / V groups, group g of the
   * rows g, g + R/V, ..., g + (V-1) R/V, all of one sequence (a batched verify's k + 1 rows of a
   * sequence, step-major), and one workgroup serves the V x group query rows of a group, which
   * share the sequence's keys.
   */
  rowGroup?: number;
}

function checkInt(label: string, fields: Record<string, number>, min = 1): void {
  for (const [f, x] of Object.entries(fields)) {
    if (!Number.isInteger(x) || x < min) {
      throw new Error(`${label}: ${f} must be an integer >= ${min}, got ${x}`);
    }
  }
}

function nextPow2(n: number): number {
  let p = 1;
  while (p < n) p *= 2;
  return p;
}

/** Buffers common to the paged write and attention, checked against `layout`. */
interface PagedBuffers {
  kCache: GPUBuffer;
  vCache: GPUBuffer;
  rows: GPUBuffer;
  table: GPUBuffer;
}

function checkLayout(label: string, R: number, a: PagedKvLayout & PagedBuffers): void {
  checkInt(label, {
    R,
    blockRows: a.blockRows,
    numBlocks: a.numBlocks,
    numSeqs: a.numSeqs,
    maxBlocksPerSeq: a.maxBlocksPerSeq,
  });
  checkKvCache(label, { ...a, maxSeq: a.numBlocks * a.blockRows });
  if (a.rows.size < R * 8) {
    throw new Error(`${label}: rows buffer of ${a.rows.size} bytes is short of R=${R} x 8`);
  }
  const tableBytes = a.numSeqs * a.maxBlocksPerSeq * 4;
  if (a.table.size < tableBytes) {
    throw new Error(
      `${label}: block table buffer of ${a.table.size} bytes is short of ` +
        `${a.numSeqs} x ${a.maxBlocksPerSeq} u32 (${tableBytes})`,
    );
  }
}

/**
 * WGSL `physRow(seq, s) -> u32`: pool row of sequence row s, or 0xffffffff when unmapped (a
 * sequence slot or block past the table, or an entry outside the pool). Every paged kernel
 * (this file's write and attention, kernels/paged_qkv_write.ts) uses it; it reads `p.blockRows`,
 * `p.numSeqs`, `p.maxBlocks`, `p.numBlocks` and the `table` binding.
 */
export const PAGED_PHYS_ROW_WGSL = `fn physRow(seq: u32, s: u32) -> u32 {
  let lb = s / p.blockRows;
  if (seq >= p.numSeqs || lb >= p.maxBlocks) { return 0xffffffffu; }
  let blk = table[seq * p.maxBlocks + lb];
  if (blk >= p.numBlocks) { return 0xffffffffu; }
  return blk * p.blockRows + s % p.blockRows;
}`;

// ---------------------------------------------------------------------------------------------
// KV write

/** WGSL of the paged KV write into an f32 or f16 pool. */
export function pagedKvWriteWgsl(dtype: "f32" | "f16"): string {
  const cvt = `vec4<${dtype}>`;
  return /* wgsl */ `
${dtype === "f16" ? "enable f16;" : ""}
// Paged KV write: one invocation per vec4 of k[R, nKv, headDim] AND the same vec4 of v,
// ${KV_WRITE_WG} per workgroup (2-D grid, x fastest); invocations past R*nKv*headDim/4 return.
// Row r goes to pool row physRow(seq[r], pos[r]) of the layer; padding rows and unmapped
// positions are dropped.
struct Params {
  n4: u32,         // R * nKv * headDim / 4
  rowVec4: u32,    // nKv * headDim / 4: vec4s per cache row
  layerBase4: u32, // layer * poolRows * rowVec4
  gridStride: u32, // invocations per grid row
  blockRows: u32,  // cache rows per block
  numBlocks: u32,  // blocks in the pool
  numSeqs: u32,    // rows of the block table
  maxBlocks: u32,  // entries per block-table row
}
@group(0) @binding(0) var<storage, read> k: array<vec4<f32>>;              // k: [R, nKv, headDim] f32
@group(0) @binding(1) var<storage, read> v: array<vec4<f32>>;              // v: [R, nKv, headDim] f32
@group(0) @binding(2) var<storage, read_write> kCache: array<${cvt}>; // [layers, poolRows, nKv, headDim] ${dtype}
@group(0) @binding(3) var<storage, read_write> vCache: array<${cvt}>; // same layout as kCache
@group(0) @binding(4) var<storage, read> rows: array<vec2<u32>>;           // rows: [R] (seq, pos)
@group(0) @binding(5) var<storage, read> table: array<u32>;                // [numSeqs, maxBlocks] block ids
@group(0) @binding(6) var<uniform> p: Params;

${PAGED_PHYS_ROW_WGSL}

@compute @workgroup_size(${KV_WRITE_WG})
fn main(@builtin(global_invocation_id) g: vec3u) {
  let i = g.y * p.gridStride + g.x;
  if (i >= p.n4) { return; }
  let r = i / p.rowVec4;
  let row = rows[r];
  let phys = physRow(row.x, row.y);
  if (phys == 0xffffffffu) { return; }
  let dst = p.layerBase4 + phys * p.rowVec4 + (i - r * p.rowVec4);
  kCache[dst] = ${cvt}(k[i]);
  vCache[dst] = ${cvt}(v[i]);
}
`;
}

/**
 * WGSL of the paged q8 KV write of head vectors of `headDim` values: kernels/kv_write.ts's q8
 * write (same quantization, bit for bit) with the destination row taken through the block table.
 */
export function pagedKvWriteQ8Wgsl(headDim: number): string {
  const HD4 = headDim / 4, SEG = nextPow2(HD4), WG = KV_WRITE_Q8_WG, VPW = WG / SEG;
  const steps: string[] = [];
  for (let s = SEG / 2; s >= 1; s /= 2) {
    steps.push(`  workgroupBarrier();
  if (c < ${s}u) {
    kMax[lid] = max(kMax[lid], kMax[lid + ${s}u]);
    vMax[lid] = max(vMax[lid], vMax[lid + ${s}u]);
  }`);
  }
  return /* wgsl */ `
// Paged q8 KV write: a workgroup of ${WG} invocations owns ${VPW} head vector(s) (one (row r,
// kv head) of k and the same of v), a segment of ${SEG} invocations each; invocation c < headDim/4
// = ${HD4} of a segment loads vec4 c (the others, and vectors past R*nKv, load 0). A tree
// reduction in workgroup memory gives each segment its absmax; then each live invocation writes
// its 4 int8 as one word of pool row physRow(seq[r], pos[r]), and c == 0 writes the scale.
// Padding rows and unmapped positions are dropped.
struct Params {
  nVec: u32,       // R * nKv: head vectors to write
  nKv: u32,        // kv heads
  layerRow: u32,   // layer * poolRows: first pool row of the layer
  scaleBase: u32,  // layers * poolRows * nKv * headDim / 4: first word of the scale region
  gridStride: u32, // workgroups per grid row
  blockRows: u32,  // cache rows per block
  numBlocks: u32,  // blocks in the pool
  numSeqs: u32,    // rows of the block table
  maxBlocks: u32,  // entries per block-table row
}
@group(0) @binding(0) var<storage, read> k: array<vec4<f32>>;         // k: [R, nKv, ${headDim}] f32
@group(0) @binding(1) var<storage, read> v: array<vec4<f32>>;         // v: [R, nKv, ${headDim}] f32
@group(0) @binding(2) var<storage, read_write> kCache: array<u32>;    // [layers, poolRows, nKv, ${headDim}] int8 x4, then scales [layers, poolRows, nKv] f32
@group(0) @binding(3) var<storage, read_write> vCache: array<u32>;    // same layout as kCache
@group(0) @binding(4) var<storage, read> rows: array<vec2<u32>>;      // rows: [R] (seq, pos)
@group(0) @binding(5) var<storage, read> table: array<u32>;           // [numSeqs, maxBlocks] block ids
@group(0) @binding(6) var<uniform> p: Params;

const HD4 = ${HD4}u;
const SEG = ${SEG}u;
const VPW = ${VPW}u;

var<workgroup> kMax: array<f32, ${WG}>; // per invocation, then per segment (at its first slot)
var<workgroup> vMax: array<f32, ${WG}>;

${PAGED_PHYS_ROW_WGSL}

${KV_Q8_WGSL}

@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wg: vec3u, @builtin(local_invocation_index) lid: u32) {
  let vec = (wg.y * p.gridStride + wg.x) * VPW + lid / SEG;
  let c = lid % SEG;
  let live = vec < p.nVec && c < HD4;
  var kx = vec4<f32>(0.0);
  var vx = vec4<f32>(0.0);
  if (live) {
    kx = k[vec * HD4 + c];
    vx = v[vec * HD4 + c];
  }
  kMax[lid] = maxAbs4(kx);
  vMax[lid] = maxAbs4(vx);
${steps.join("\n")}
  workgroupBarrier();
  if (!live) { return; }
  let row = rows[vec / p.nKv];
  let phys = physRow(row.x, row.y);
  if (phys == 0xffffffffu) { return; }
  let kScale = kMax[lid - c] * (1.0 / 127.0);
  let vScale = vMax[lid - c] * (1.0 / 127.0);
  let dstVec = (p.layerRow + phys) * p.nKv + vec % p.nKv;
  kCache[dstVec * HD4 + c] = quantize4(kx, kScale);
  vCache[dstVec * HD4 + c] = quantize4(vx, vScale);
  if (c == 0u) {
    kCache[p.scaleBase + dstVec] = bitcast<u32>(kScale);
    vCache[p.scaleBase + dstVec] = bitcast<u32>(vScale);
  }
}
`;
}

/** Buffers and shapes for {@linkcode createPagedKvWrite}. */
export interface PagedKvWriteArgs extends PagedKvLayout {
  /** Hierarchical label, e.g. `target.L3.kv_write`. */
  label: string;
  /** Batch rows written (static for this dispatch). */
  R: number;
  /** k: [R, nKvHeads, headDim] f32 (after RoPE). */
  k: GPUBuffer;
  /** v: [R, nKvHeads, headDim] f32. */
  v: GPUBuffer;
  /** K pool: [layers, numBlocks*blockRows, nKvHeads, headDim] of `dtype`, `pagedKvBufferBytes`. */
  kCache: GPUBuffer;
  /** V pool: same layout as `kCache`. */
  vCache: GPUBuffer;
  /** rows: [R] (seq, pos) u32 pairs, {@linkcode pagedRowsImage}. */
  rows: GPUBuffer;
  /** Block tables: [numSeqs, maxBlocksPerSeq] u32, engine/paged_kv.ts `blockTableImage`. */
  table: GPUBuffer;
}

/** Builds the dispatch writing row r of `k`, `v` into the pool at `phys(seq[r], pos[r])`. */
export async function createPagedKvWrite(gpu: Gpu, args: PagedKvWriteArgs): Promise<Dispatch> {
  const { label, dtype, headDim: hd } = args;
  checkLayout(label, args.R, args);
  if (dtype === "f16" && !gpu.features.f16) {
    throw new Error(`${label}: an f16 KV pool needs the shader-f16 feature`);
  }
  const poolRows = args.numBlocks * args.blockRows;
  const paging = [args.blockRows, args.numBlocks, args.numSeqs, args.maxBlocksPerSeq];
  const buffers = [args.k, args.v, args.kCache, args.vCache, args.rows, args.table];
  if (dtype === "q8") {
    const seg = nextPow2(hd / 4);
    const pipeline = await gpu.pipeline(
      `paged_kv_write.q8.hd${hd}.seg${seg}.wg${KV_WRITE_Q8_WG}`,
      () => pagedKvWriteQ8Wgsl(hd),
    );
    const nVec = args.R * args.nKvHeads;
    const groups = grid2d(Math.ceil(nVec / (KV_WRITE_Q8_WG / seg)));
    const params = gpu.uniform(
      `${label}.params`,
      new Uint32Array([
        nVec,
        args.nKvHeads,
        args.layer * poolRows,
        args.layers * poolRows * args.nKvHeads * hd / 4,
        groups[0],
        ...paging,
        0,
        0,
        0,
      ]),
    );
    return {
      label,
      pipeline,
      bindGroup: gpu.bindGroup(label, pipeline, [...buffers, params]),
      workgroups: groups,
    };
  }
  const pipeline = await gpu.pipeline(
    `paged_kv_write.${dtype}.wg${KV_WRITE_WG}`,
    () => pagedKvWriteWgsl(dtype),
  );
  const rowVec4 = args.nKvHeads * hd / 4;
  const n4 = args.R * rowVec4;
  const groups = grid2d(Math.ceil(n4 / KV_WRITE_WG));
  const params = gpu.uniform(
    `${label}.params`,
    new Uint32Array([
      n4,
      rowVec4,
      args.layer * poolRows * rowVec4,
      groups[0] * KV_WRITE_WG,
      ...paging,
    ]),
  );
  return {
    label,
    pipeline,
    bindGroup: gpu.bindGroup(label, pipeline, [...buffers, params]),
    workgroups: groups,
  };
}

/** Shapes for {@linkcode pagedKvWriteRef} and {@linkcode pagedAttentionRef}. */
export interface PagedRefLayout {
  /** Key/value heads. */
  nKvHeads: number;
  /** Per-head size. */
  headDim: number;
  /** Cache rows per block. */
  blockRows: number;
  /** Blocks in the pool. */
  numBlocks: number;
  /** Entries per block-table row. */
  maxBlocksPerSeq: number;
  /** Layer written / attended over. */
  layer: number;
  /** Pool element type (f16 rounds the stored values, q8 quantizes then dequantizes them). */
  dtype: KvDType;
}

/** `phys(seq, s)` on the CPU, or -1 when unmapped (padding row, past the table, bad block id). */
function physRowRef(
  table: Uint32Array,
  numSeqs: number,
  seq: number,
  s: number,
  l: PagedRefLayout,
): number {
  const lb = Math.floor(s / l.blockRows);
  if (seq >= numSeqs || lb >= l.maxBlocksPerSeq) return -1;
  const blk = table[seq * l.maxBlocksPerSeq + lb];
  return blk >= l.numBlocks ? -1 : blk * l.blockRows + s % l.blockRows;
}

/**
 * CPU reference for {@linkcode pagedKvWriteWgsl} / {@linkcode pagedKvWriteQ8Wgsl}: writes row r
 * of `src` ([R, nKv, headDim]) into `pool` ([layers, numBlocks*blockRows, nKv, headDim], f32
 * values) at `phys(seq[r], pos[r])` of `layer`, as the values the pool holds (f16-rounded, or
 * q8-quantized and dequantized per head vector). `rows` is {@linkcode pagedRowsImage}'s layout,
 * `table` the block tables `[numSeqs, maxBlocksPerSeq]`.
 */
export function pagedKvWriteRef(
  pool: Float32Array,
  src: Float32Array,
  rows: Uint32Array,
  table: Uint32Array,
  l: PagedRefLayout,
): void {
  const rowLen = l.nKvHeads * l.headDim, numSeqs = table.length / l.maxBlocksPerSeq;
  const poolRows = l.numBlocks * l.blockRows;
  for (let r = 0; r < rows.length / 2; r++) {
    const phys = physRowRef(table, numSeqs, rows[2 * r], rows[2 * r + 1], l);
    if (phys < 0) continue;
    const vals = src.subarray(r * rowLen, (r + 1) * rowLen);
    const dst = (l.layer * poolRows + phys) * rowLen;
    if (l.dtype === "q8") {
      const { q, scale } = kvQuantizeRef(vals, l.nKvHeads, l.headDim);
      pool.set(kvDequantizeRef(q, scale, l.headDim), dst);
    } else {
      pool.set(l.dtype === "f16" ? Float32Array.from(vals, Math.f16round) : vals, dst);
    }
  }
}

/**
 * CPU reference for the paged attention: two-pass softmax, in f64, of each row's query heads
 * (`q`: [R, nHeads, headDim]) over keys 0 .. pos[r] of its own sequence read through `table`
 * from `kPool`, `vPool` ([layers, numBlocks*blockRows, nKv, headDim] f32 values: pass the
 * values the pool holds, e.g. after {@linkcode pagedKvWriteRef}). Keys at or past
 * `maxBlocksPerSeq * blockRows` are not visible, a key in a block id >= numBlocks reads as zero
 * K and V (as the kernel), padding rows give 0. Returns out: [R, nHeads, headDim].
 */
export function pagedAttentionRef(
  q: Float32Array,
  kPool: Float32Array,
  vPool: Float32Array,
  rows: Uint32Array,
  table: Uint32Array,
  nHeads: number,
  l: PagedRefLayout,
): Float32Array {
  const hd = l.headDim, group = nHeads / l.nKvHeads, scale = 1 / Math.sqrt(hd);
  const R = rows.length / 2, numSeqs = table.length / l.maxBlocksPerSeq;
  const poolRows = l.numBlocks * l.blockRows;
  const out = new Float32Array(R * nHeads * hd);
  for (let r = 0; r < R; r++) {
    const seq = rows[2 * r], pos = rows[2 * r + 1];
    if (seq >= numSeqs) continue;
    const keys: number[] = []; // pool rows of the visible keys, in order (-1: reads as zero)
    const end = Math.min(pos + 1, l.maxBlocksPerSeq * l.blockRows);
    for (let s = 0; s < end; s++) keys.push(physRowRef(table, numSeqs, seq, s, l));
    for (let h = 0; h < nHeads; h++) {
      const qo = (r * nHeads + h) * hd, kvh = Math.floor(h / group);
      const at = (phys: number) => ((l.layer * poolRows + phys) * l.nKvHeads + kvh) * hd;
      const w = keys.map((phys) => {
        let d = 0;
        for (let i = 0; phys >= 0 && i < hd; i++) d += q[qo + i] * kPool[at(phys) + i];
        return d * scale;
      });
      const max = Math.max(...w);
      let sum = 0;
      for (let j = 0; j < w.length; j++) sum += w[j] = Math.exp(w[j] - max);
      for (let i = 0; i < hd; i++) {
        let a = 0;
        for (let j = 0; j < keys.length; j++) {
          if (keys[j] >= 0) a += w[j] * vPool[at(keys[j]) + i];
        }
        out[qo + i] = a / sum;
      }
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Attention

/**
 * Query rows per flash workgroup: the query heads of one kv head of a row group's `rowGroup`
 * batch rows (the rows that share its sequence's keys), rounded up to a power of 2, at most
 * {@linkcode ATTN_BQ_MAX}.
 */
export function pagedAttentionRowBlock(nHeads: number, nKvHeads: number, rowGroup = 1): number {
  return Math.min(ATTN_BQ_MAX, nextPow2(rowGroup * nHeads / nKvHeads));
}

/** Most workgroups along one grid dimension every WebGPU device allows. */
const MAX_GRID_DIM = 65535;

/** The plan of one paged attention: kernels/attention.ts's plan plus the key-chunk size. */
export interface PagedAttentionPlan extends AttentionPlan {
  /**
   * Keys per key chunk. Split ("flash-split"): the grid's z dimension holds
   * `nSplits = ceil(maxSeqRows / chunk)` chunk slots, of which a row uses ceil(len / chunk);
   * unsplit ("flash"): maxSeqRows, one chunk of every key.
   */
  chunk: number;
  /** Batch rows per row group ({@linkcode PagedAttentionShape.rowGroup}). */
  rowGroup: number;
}

/** What a test or benchmark may force on {@linkcode pagedAttentionPlan}. */
export interface PagedAttentionForce {
  /** Split the keys (true) or not (false), whatever the predicate says. */
  split?: boolean;
  /** Keys per chunk when split; default the key tile. */
  chunk?: number;
}

/**
 * THE plan of the paged attention for `shape` on a device with `maxShared` bytes of workgroup
 * memory. The grid is (batch row x head block, kv head, key chunk). The predicate: split the
 * keys (flash-decoding, variant "flash-split") when the unsplit grid has fewer than
 * {@linkcode ATTN_MIN_WORKGROUPS} workgroups (too few to fill the GPU) and a sequence can be
 * longer than one chunk. A chunk is one key tile (`kt` keys): each workgroup then stages one
 * tile, the shortest chain of dependent loads and barriers a workgroup can have (few workgroups
 * means this chain IS the latency), and the merge of a row of `len` keys reads ceil(len / kt)
 * partials (8 at 256 keys). As chunks have a fixed size, a row's work follows its own length
 * and the chunks past it exit at once; maxSeqRows only sets how many chunk slots the grid has.
 * `force` overrides the predicate or the chunk size (tests, bench).
 *
 * @example
 * ```ts
 * import { pagedAttentionPlan } from "./paged_attention.ts";
 * const shape = { R: 1, nHeads: 9, nKvHeads: 3, headDim: 64, maxSeqRows: 1024 };
 * const plan = pagedAttentionPlan(shape, 32768);
 * console.assert(plan.variant === "flash-split" && plan.chunk === plan.kt);
 * console.assert(plan.nSplits === 1024 / plan.kt);
 * ```
 */
export function pagedAttentionPlan(
  shape: PagedAttentionShape,
  maxShared: number,
  force: PagedAttentionForce = {},
): PagedAttentionPlan {
  const V = shape.rowGroup ?? 1;
  checkInt("pagedAttentionPlan", { rowGroup: V });
  if (shape.R % V !== 0) {
    throw new Error(`pagedAttentionPlan: R=${shape.R} is not a multiple of rowGroup ${V}`);
  }
  const bq = pagedAttentionRowBlock(shape.nHeads, shape.nKvHeads, V);
  const kt = attentionKeyTile(bq, shape.headDim, maxShared);
  const group = shape.nHeads / shape.nKvHeads;
  const blocks = (shape.R / V) * Math.ceil(V * group / bq) * shape.nKvHeads;
  const chunk = force.chunk ?? kt;
  checkInt("pagedAttentionPlan", { chunk });
  const split = force.split ?? (blocks < ATTN_MIN_WORKGROUPS && shape.maxSeqRows > chunk);
  const ns = split ? Math.ceil(shape.maxSeqRows / chunk) : 1;
  if (ns > MAX_GRID_DIM) {
    throw new Error(
      `pagedAttentionPlan: ${ns} key chunks of ${chunk} keys for ${shape.maxSeqRows} rows ` +
        `exceed the ${MAX_GRID_DIM} workgroups of a grid dimension (use a larger chunk)`,
    );
  }
  if (ns === 1) {
    return { variant: "flash", bq, kt, nSplits: 1, chunk: shape.maxSeqRows, rowGroup: V };
  }
  return { variant: "flash-split", bq, kt, nSplits: ns, chunk, rowGroup: V };
}

const LOG2E = 1.4426950408889634;
/** Running-max start: finite, so exp2(m_old - m_new) never becomes exp2(-inf + inf) = NaN. */
const NEG = "-3.0e38";

/**
 * WGSL of the paged flash attention, split-K merged in the same dispatch when `split`, with
 * `wg` invocations per workgroup.
 */
export function pagedAttentionWgsl(
  headDim: number,
  plan: PagedAttentionPlan,
  dtype: KvDType,
  wg: number = ATTN_WG,
): string {
  const HD4 = headDim / 4, { bq: BQ, kt: KT } = plan, WG = wg;
  const split = plan.variant === "flash-split";
  const ACC = Math.ceil(BQ * HD4 / WG);
  const DT = cacheElem(dtype);
  const layout = dtype === "q8" ? " int8 x4, then scales [layers, poolRows, nKv] f32" : "";
  const V = plan.rowGroup;
  return /* wgsl */ `${dtype === "f16" ? "enable f16;" : ""}
// Paged flash attention${split ? ", split-K (flash-decoding) merged in-kernel" : ""}. Workgroup
// (x, y, z) = (row group grp = x / rowBlocks and row block x % rowBlocks, kv head y, key chunk z)
// owns BQ=${BQ} query rows q of kv head y: head y*group + q % group of batch row
// grp + (q / group) * nGroups, the V=${V} rows of a group being one sequence's (slots past
// V * group are idle); each sees keys 0 .. its own pos of sequence seq[grp]${
    split
      ? `, of which chunk z holds keys
// [z*chunk, (z+1)*chunk): a chunk past the row's length returns at once`
      : ""
  }. ${WG} invocations loop
// over tiles of KT=${KT} keys: each loads vec4s of the tile from pool row physRow(seq, s)${
    dtype === "q8" ? " (dequantized as loaded)" : ""
  }
// (keys past the chunk read as 0, never out of range), then the shared tile math: BQ x KT
// scores, online softmax of BQ rows, and ${ACC} vec4 of the BQ x headDim accumulator per
// invocation. Padding rows (seq >= numSeqs) have no keys: output 0.${
    split
      ? `
// A row whose keys fit one chunk (nActive = 1) writes out directly. Otherwise each chunk stores
// its partial (m, l, acc) with atomic stores and counts itself in the counter of (x, y); the
// last chunk to arrive resets the counter and merges the nActive partials (atomic loads).`
      : ""
  }
struct Params {
  R: u32,          // batch rows
  nHeads: u32,     // query heads
  group: u32,      // nHeads / nKvHeads
  rowBlocks: u32,  // ceil(group / BQ): head blocks per (row, kv head)
  blockRows: u32,  // cache rows per block
  numBlocks: u32,  // blocks in the pool
  numSeqs: u32,    // rows of the block table
  maxBlocks: u32,  // entries per block-table row
  layerBase4: u32, // layer * poolRows * nKv * headDim / 4: first vec4 of the layer
  rowVec4: u32,    // nKv * headDim / 4: vec4s per pool row
  scale: f32,      // log2(e) / sqrt(headDim): scores are kept in the log2 domain
  scaleBase: u32,  // q8: layers * poolRows * nKv * headDim / 4, first word of the scale region
  chunk: u32,      // split: keys per key chunk
  rowsQ: u32,      // R * nHeads: partial rows per chunk
  ctrBase: u32,    // split: word of counter 0 in part (the counters end that buffer)
  nGroups: u32,    // R / V: row groups
}
@group(0) @binding(0) var<storage, read> q: array<vec4<f32>>;   // q: [R, nHeads, ${headDim}] f32
@group(0) @binding(1) var<storage, read> kCache: array<${DT}>;  // [layers, poolRows, nKv, ${headDim}] ${dtype}${layout}
@group(0) @binding(2) var<storage, read> vCache: array<${DT}>;  // same layout as kCache
@group(0) @binding(3) var<storage, read> rows: array<vec2<u32>>; // rows: [R] (seq, pos)
@group(0) @binding(4) var<storage, read> table: array<u32>;     // [numSeqs, maxBlocks] block ids
@group(0) @binding(5) var<storage, read_write> out: array<vec4<f32>>; // out: [R, nHeads, ${headDim}] f32
@group(0) @binding(6) var<uniform> p: Params;
${
    split
      ? `@group(0) @binding(7) var<storage, read_write> partAcc: array<atomic<u32>>; // partial acc: [NS, R, nHeads, ${headDim}] f32 bits
@group(0) @binding(8) var<storage, read_write> part: array<atomic<u32>>;    // partial (m, l): [NS, R, nHeads, 2] f32 bits; counters [nKv, R * rowBlocks] u32 at ctrBase`
      : ""
  }

const HD4 = ${HD4}u;
const BQ = ${BQ}u;
const KT = ${KT}u;
const WG = ${WG}u;
const ACC = ${ACC}u;
const V = ${V}u; // batch rows per group: rows grp, grp + nGroups, ... of one sequence

${kvLoadersWgsl(dtype)}

${PAGED_PHYS_ROW_WGSL}

// Query row q of a group (member q / group, head q % group of kv head kh): its row of q and out.
fn partRow(grp: u32, kh: u32, q: u32) -> u32 {
  ${
    V === 1
      ? "return grp * p.nHeads + kh * p.group + q; // one row per group: q is the head"
      : "return (grp + (q / p.group) * p.nGroups) * p.nHeads + kh * p.group + q % p.group;"
  }
}

${flashTileVarsWgsl(BQ, KT, HD4, WG)}
${split ? "var<workgroup> isLast: u32;                        // this chunk arrived last" : ""}

@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wg: vec3u, @builtin(local_invocation_index) tid: u32) {
  let grp = wg.x / p.rowBlocks;
  let q0 = (wg.x % p.rowBlocks) * BQ;
  let kh = wg.y;
  let vg = V * p.group; // query rows of a group per kv head
  let seq = rows[grp].x;
  // Keys 0 .. the last position of the block's rows (those of the group's sequence), cut at the
  // rows its table can map.
  var seqEnd = 0u;
  if (seq < p.numSeqs) {${
    V === 1
      ? `
    seqEnd = min(rows[grp].y + 1u, p.maxBlocks * p.blockRows);`
      : `
    let last = min(q0 + BQ, vg) - 1u;
    for (var i = q0 / p.group; i <= last / p.group; i++) {
      let rw = rows[grp + i * p.nGroups];
      if (rw.x == seq) { seqEnd = max(seqEnd, rw.y + 1u); }
    }
    seqEnd = min(seqEnd, p.maxBlocks * p.blockRows);`
  }
  }
  var kBegin = 0u;
  var kEnd = seqEnd;
  var nActive = 1u; // chunks holding keys of the row (a padding row's chunk 0 writes its zeros)
${
    split
      ? `  nActive = max(1u, (seqEnd + p.chunk - 1u) / p.chunk);
  if (wg.z >= nActive) { return; } // uniform per workgroup: safe before the barriers
  kBegin = wg.z * p.chunk;
  kEnd = min(kBegin + p.chunk, seqEnd);
`
      : ""
  }
  for (var e = tid; e < BQ * HD4; e += WG) {
    let qq = q0 + e / HD4;
    var x = vec4<f32>(0.0);
    if (qq < vg) {
      x = q[partRow(grp, kh, qq) * HD4 + e % HD4] * p.scale;
    }
    Qs[e] = x;
  }
  if (tid < BQ) {
    // Row tid sees keys 0 .. its own position (none for a padding row or another sequence's).
    let qq = q0 + tid;
    var end = 0u;
    if (qq < vg && seq < p.numSeqs) {${
    V === 1
      ? `
      end = kEnd; // one batch row: its keys are the block's`
      : `
      let rw = rows[grp + (qq / p.group) * p.nGroups];
      if (rw.x == seq) { end = min(rw.y + 1u, kEnd); }`
  }
    }
    rowEnd[tid] = end;
    rowM[tid] = ${NEG};
    rowL[tid] = 0.0;
  }
  var acc: array<vec4<f32>, ACC>;
  let kvBase = p.layerBase4 + kh * HD4;

  for (var s0 = kBegin; s0 < kEnd; s0 += KT) {
    // No barrier before the first staging: Q's loads and the first tile's go out together.
    for (var e = tid; e < KT * HD4; e += WG) {
      let s = s0 + e / HD4;
      var kx = vec4<f32>(0.0);
      var vx = vec4<f32>(0.0);
      if (s < kEnd) {
        let phys = physRow(seq, s);
        if (phys != 0xffffffffu) {
          let gi = kvBase + phys * p.rowVec4 + e % HD4;
          kx = loadK(gi);
          vx = loadV(gi);
        }
      }
      Ks[(e / HD4) * KS + e % HD4] = kx;
      Vs[e] = vx;
    }
    workgroupBarrier();
${flashTileWgsl(WG)}  }
  workgroupBarrier(); // rowM, rowL final (or initial, for an empty chunk)

${
    split
      ? "  if (nActive == 1u) { // uniform: this chunk holds all the row's keys\n"
      : ""
  }  for (var i = 0u; i < ACC; i++) {
    let e = tid + i * WG;
    let j = e / HD4;
    if (e < BQ * HD4 && q0 + j < vg) {
      let l = rowL[j];
      out[partRow(grp, kh, q0 + j) * HD4 + e % HD4] = select(vec4<f32>(0.0), acc[i] / l, l > 0.0);
    }
  }
${split ? `  return;\n  }\n${splitTail(mergeWorkers(BQ, headDim, KT, WG))}` : ""}}
`;
}

/** Split epilogue: store the partials, count the chunk, and merge in the chunk that is last. */
function splitTail(G: number): string {
  return `  for (var i = 0u; i < ACC; i++) {
    let e = tid + i * WG;
    let j = e / HD4;
    if (e < BQ * HD4 && q0 + j < vg) {
      let c = e % HD4;
      let pr = wg.z * p.rowsQ + partRow(grp, kh, q0 + j);
      let o = (pr * HD4 + c) * 4u;
      for (var k = 0u; k < 4u; k++) { atomicStore(&partAcc[o + k], bitcast<u32>(acc[i][k])); }
      if (c == 0u) {
        atomicStore(&part[2u * pr], bitcast<u32>(rowM[j]));
        atomicStore(&part[2u * pr + 1u], bitcast<u32>(rowL[j]));
      }
    }
  }
  let lid = tid;
  ${lastArrivalWgsl("p.ctrBase + kh * p.nGroups * p.rowBlocks + wg.x", "nActive")}
${splitMergeWgsl(MERGE, G)}`;
}

/** The paged kernel's partials and output, for {@linkcode splitMergeWgsl}. */
const MERGE: SplitMergeWgsl = {
  valid: (j) => `q0 + ${j} < vg`,
  qRow: (j) => `partRow(grp, kh, q0 + ${j})`,
  ml: (z, qr) => ({ buf: "part", at: `2u * (${z} * p.rowsQ + ${qr})` }),
  acc: (z, qr, c) => ({ buf: "partAcc", at: `((${z} * p.rowsQ + ${qr}) * HD4 + ${c}) * 4u` }),
  store: (qr, c, v) => `out[${qr} * HD4 + ${c}] = ${v};`,
};

/**
 * The split-K scratch of a paged attention. Plans of different R (and every layer) may share
 * one scratch as large as the largest plan's: the counters END `ml`, so a smaller plan's (m, l)
 * stop before the largest plan's counters start (both grow with R), and counters that overlap
 * each other are all 0 between dispatches.
 */
export interface PagedAttentionScratch {
  /** Partial accumulators: [nSplits, R, nHeads, headDim] f32 bits. */
  readonly acc: GPUBuffer;
  /**
   * Partial (m, l): [nSplits, R, nHeads, 2] f32 bits from word 0, and the arrival counters
   * [nKvHeads, R * rowBlocks] u32 in the last words, zero when created (each returns to 0 after
   * every dispatch, so a plan runs any number of times without clearing).
   */
  readonly ml: GPUBuffer;
}

/**
 * Exact bytes of the two split-K scratch buffers of `plan` for `shape` (0 and 0 when not split):
 * `acc` the partial accumulators, `ml` the partial (m, l) and one counter per (row, head block,
 * kv head).
 */
export function pagedAttentionScratchSizes(
  shape: PagedAttentionShape,
  plan: PagedAttentionPlan,
): { acc: number; ml: number } {
  if (plan.variant !== "flash-split") return { acc: 0, ml: 0 };
  const rows = plan.nSplits * shape.R * shape.nHeads;
  const V = plan.rowGroup;
  const rowBlocks = Math.ceil(V * shape.nHeads / shape.nKvHeads / plan.bq);
  const counters = (shape.R / V) * rowBlocks * shape.nKvHeads;
  return { acc: rows * shape.headDim * 4, ml: (rows * 2 + counters) * 4 };
}

/**
 * Bytes of both split-K scratch buffers of `plan` for `shape` (0 when not split), the sum of
 * {@linkcode pagedAttentionScratchSizes}.
 */
export function pagedAttentionScratchBytes(
  shape: PagedAttentionShape,
  plan: PagedAttentionPlan,
): number {
  const { acc, ml } = pagedAttentionScratchSizes(shape, plan);
  return acc + ml;
}

/** Allocates the zeroed split-K scratch of `plan` ({@linkcode pagedAttentionScratchSizes}). */
export function createPagedAttentionScratch(
  gpu: Gpu,
  label: string,
  shape: PagedAttentionShape,
  plan: PagedAttentionPlan,
): PagedAttentionScratch {
  const { acc, ml } = pagedAttentionScratchSizes(shape, plan);
  return {
    acc: gpu.buffer(`${label}.partial_acc`, Math.max(4, acc), GPUBufferUsage.STORAGE),
    ml: gpu.buffer(`${label}.partial_ml`, Math.max(4, ml), GPUBufferUsage.STORAGE),
  };
}

/** Buffers and shapes for {@linkcode createPagedAttention}. */
export interface PagedAttentionArgs extends PagedKvLayout {
  /** Hierarchical label, e.g. `target.L3.attn`. */
  label: string;
  /** Batch rows (static for this dispatch). */
  R: number;
  /** Query heads; a multiple of nKvHeads. */
  nHeads: number;
  /** q: [R, nHeads, headDim] f32 (after RoPE). */
  q: GPUBuffer;
  /** K pool: [layers, numBlocks*blockRows, nKvHeads, headDim] of `dtype`. */
  kCache: GPUBuffer;
  /** V pool: same layout as `kCache`. */
  vCache: GPUBuffer;
  /** rows: [R] (seq, pos) u32 pairs, {@linkcode pagedRowsImage}. */
  rows: GPUBuffer;
  /** Block tables: [numSeqs, maxBlocksPerSeq] u32. */
  table: GPUBuffer;
  /** out: [R, nHeads, headDim] f32. */
  out: GPUBuffer;
  /** Overrides of {@linkcode pagedAttentionPlan}'s choice (tests, bench). */
  force?: PagedAttentionForce;
  /**
   * Batch rows per row group, default 1 ({@linkcode PagedAttentionShape.rowGroup}): group g is
   * the rows g, g + R/V, ..., all of one sequence; a row of another sequence in a group (a caller
   * bug) gets output 0.
   */
  rowGroup?: number;
  /**
   * Split-K scratch to reuse, zeroed when created and used by one dispatch at a time: at least
   * this plan's {@linkcode pagedAttentionScratchSizes}, or the largest of the plans sharing it.
   * Without it a split plan allocates its own.
   */
  scratch?: PagedAttentionScratch;
  /**
   * Invocations per workgroup (64, 128 or 256): default kernels/fused_attention.ts's
   * `fusedAttentionWorkgroup` (256 on a GPU, 64 on a software adapter).
   */
  wg?: number;
}

/**
 * Builds the single dispatch computing `out` for the R batch rows ("flash", or "flash-split"
 * with the merge in the same dispatch). Pipeline, params and bind group are built once here;
 * `rows` and `table` are read on the GPU at every run.
 *
 * @example
 * ```ts ignore
 * const d = await createPagedAttention(gpu, { ...layout, label: "target.L0.attn", R, nHeads, q, kCache, vCache, rows, table, out });
 * await gpu.run("attn", [d]);
 * ```
 */
export async function createPagedAttention(
  gpu: Gpu,
  args: PagedAttentionArgs,
): Promise<Dispatch> {
  const { label, dtype, headDim: hd, R, nHeads, nKvHeads } = args;
  checkLayout(label, R, args);
  checkInt(label, { nHeads });
  if (nHeads % nKvHeads !== 0) {
    throw new Error(`${label}: nHeads ${nHeads} is not a multiple of nKvHeads ${nKvHeads}`);
  }
  if (dtype === "f16" && !gpu.features.f16) {
    throw new Error(`${label}: an f16 KV pool needs the shader-f16 feature`);
  }
  const wg = args.wg ?? fusedAttentionWorkgroup(gpu);
  if (![64, 128, 256].includes(wg)) {
    throw new Error(`${label}: wg must be 64, 128 or 256, got ${wg}`);
  }
  const shape = {
    R,
    nHeads,
    nKvHeads,
    headDim: hd,
    maxSeqRows: args.maxBlocksPerSeq * args.blockRows,
    rowGroup: args.rowGroup ?? 1,
  };
  const plan = pagedAttentionPlan(shape, gpu.limits.maxComputeWorkgroupStorageSize, args.force);
  const split = plan.variant === "flash-split";
  const V = plan.rowGroup, nGroups = R / V;
  const group = nHeads / nKvHeads, rowBlocks = Math.ceil(V * group / plan.bq);
  const poolRows = args.numBlocks * args.blockRows, rowVec4 = nKvHeads * hd / 4;
  let scratch: PagedAttentionScratch | undefined, ctrBase = 0;
  if (split) {
    const need = pagedAttentionScratchSizes(shape, plan);
    scratch = args.scratch ?? createPagedAttentionScratch(gpu, label, shape, plan);
    if (scratch.acc.size < need.acc || scratch.ml.size < need.ml) {
      throw new Error(
        `${label}: split-K scratch of ${scratch.acc.size} + ${scratch.ml.size} bytes is too ` +
          `small for ${plan.nSplits} chunks of R=${R} (needs ${need.acc} + ${need.ml})`,
      );
    }
    ctrBase = Math.floor(scratch.ml.size / 4) - nGroups * rowBlocks * nKvHeads;
  }
  const raw = new ArrayBuffer(64);
  new Uint32Array(raw).set([
    R,
    nHeads,
    group,
    rowBlocks,
    args.blockRows,
    args.numBlocks,
    args.numSeqs,
    args.maxBlocksPerSeq,
    args.layer * poolRows * rowVec4,
    rowVec4,
    0,
    args.layers * poolRows * rowVec4,
    plan.chunk,
    R * nHeads,
    ctrBase,
    nGroups,
  ]);
  new Float32Array(raw)[10] = LOG2E / Math.sqrt(hd);
  const params = gpu.uniform(`${label}.params`, new Uint8Array(raw));
  const key = `paged_attention.${plan.variant}.hd${hd}.${dtype}.bq${plan.bq}.kt${plan.kt}.wg${wg}` +
    `.v${V}`;
  const pipeline = await gpu.pipeline(key, () => pagedAttentionWgsl(hd, plan, dtype, wg));
  const buffers = [args.q, args.kCache, args.vCache, args.rows, args.table, args.out, params];
  return {
    label,
    pipeline,
    bindGroup: gpu.bindGroup(
      label,
      pipeline,
      scratch ? [...buffers, scratch.acc, scratch.ml] : buffers,
    ),
    workgroups: [nGroups * rowBlocks, nKvHeads, plan.nSplits],
  };
}
