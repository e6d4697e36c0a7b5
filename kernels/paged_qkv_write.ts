/**
 * The fused q/k/v split, RoPE and paged KV write of a batched forward (models/llama_batch.ts):
 * one dispatch doing what kernels/paged_qkv.ts `createPagedQkv` followed by
 * kernels/paged_attention.ts `createPagedKvWrite` do in two. From the qkv product's rows
 * `[R, q (nHeads*headDim) | k (nKv*headDim) | v (nKv*headDim)]` it writes
 *
 * - q rotated by `pos[r]` to the q activation `[R, nHeads, headDim]` f32 (what paged attention
 *   reads), for every row, padding rows included (as the split does);
 * - k rotated by `pos[r]`, and v unchanged, straight into the K and V pools at pool row
 *   `phys(seq[r], pos[r])` of one layer through the block table, converted to the pool's dtype
 *   (f32, f16, or q8 with one f32 scale per head vector, kernels/kv_write.ts layout and
 *   quantization). A row whose seq is padding, whose position is past its table, or whose table
 *   entry is no block of the pool is dropped: nothing is written for it.
 *
 * RoPE is kernels/rope.ts's turn of a pair by angle `pos * invFreq[i]`, pairs (2i, 2i+1)
 * "interleaved" or (i, i + headDim/2) "rotate-half", computed with the same products and sums
 * as the split, so the pools hold what the two-dispatch path stored.
 *
 * @module
 */
import { type Dispatch, type Gpu, grid2d } from "../engine/gpu.ts";
import type { RopeLayout } from "../models/types.ts";
import {
  checkKvCache,
  KV_Q8_WGSL,
  KV_WRITE_Q8_WG,
  KV_WRITE_WG,
  type KvDType,
  kvQ8SegmentMaxWgsl,
} from "./kv_write.ts";
import {
  PAGED_PHYS_ROW_WGSL,
  type PagedKvLayout,
  pagedKvWriteRef,
  type PagedRefLayout,
} from "./paged_attention.ts";
import { pagedQkvRef } from "./paged_qkv.ts";

/** Smallest power of 2 that is at least `n`. */
function nextPow2(n: number): number {
  let p = 1;
  while (p < n) p *= 2;
  return p;
}

/**
 * WGSL of the fused split + RoPE + paged KV write for a pool of `dtype` and RoPE `layout`;
 * q8 is specialized on `headDim` (its segment size), f32/f16 ignore it.
 */
export function pagedQkvWriteWgsl(dtype: KvDType, layout: RopeLayout, headDim: number): string {
  const q8 = dtype === "q8", HD4 = headDim / 4;
  const SEG = nextPow2(HD4), WG = q8 ? KV_WRITE_Q8_WG : KV_WRITE_WG;
  const pool = q8 ? "u32" : `vec4<${dtype}>`;
  const pair = layout === "interleaved"
    ? "let i = e / 2u; let a = src + 2u * i; let b = a + 1u; let first = e % 2u == 0u;"
    : "let i = e % p.half; let a = src + i; let b = a + p.half; let first = e < p.half;";
  const split = q8
    ? `a workgroup of ${WG} invocations owns ${WG / SEG} head vector(s), a segment of ${SEG}
// invocations each; invocation c < headDim/4 = ${HD4} of a segment computes vec4 c of the vector
// (the others, and vectors past R*heads, compute 0). A tree reduction in workgroup memory gives
// each segment its absmax; then each live invocation of a k or v vector writes its 4 int8 as one
// u32 word of the pool, and c == 0 writes the vector's scale.`
    : `one invocation per vec4 c of one head vector, ${WG} per workgroup (2-D grid, x
// fastest); invocations past R*heads*headDim/4 return.`;
  return /* wgsl */ `
${dtype === "f16" ? "enable f16;" : ""}
// Paged q/k/v split + RoPE (${layout}) + KV write (${dtype}): head vector hv = (row r, head h) of
// the qkv rows, heads = nHeads + 2 nKv (h < nHeads: q, then nKv k's, then nKv v's); ${split}
// q goes to the q activation for every row; k and v of row r go to pool row
// physRow(seq[r], pos[r]) of the layer, or nowhere when that is unmapped.
struct Params {
  nVec: u32,       // R * (nHeads + 2 nKv): head vectors
  nHeads: u32,     // q heads
  nKv: u32,        // k (and v) heads
  headDim: u32,    // elements per head
  half: u32,       // headDim / 2: pairs per head
  gridStride: u32, // per grid row: invocations (f32, f16) or workgroups (q8)
  layerRow: u32,   // layer * poolRows: first pool row of the layer
  scaleBase: u32,  // q8: layers * poolRows * nKv * headDim / 4, first word of the scales
  blockRows: u32,  // cache rows per block
  numBlocks: u32,  // blocks in the pool
  numSeqs: u32,    // rows of the block table
  maxBlocks: u32,  // entries per block-table row
}
@group(0) @binding(0) var<storage, read> qkv: array<f32>;            // qkv: [R, (nHeads + 2 nKv) * headDim] f32
@group(0) @binding(1) var<storage, read_write> q: array<vec4<f32>>;  // q: [R, nHeads, headDim] f32 (rotated)
@group(0) @binding(2) var<storage, read_write> kCache: array<${pool}>; // [layers, poolRows, nKv, headDim] ${dtype}${
    q8 ? " x4, then scales [layers, poolRows, nKv] f32" : ""
  }
@group(0) @binding(3) var<storage, read_write> vCache: array<${pool}>; // same layout as kCache
@group(0) @binding(4) var<storage, read> invFreq: array<f32>;        // invFreq: [half] f32
@group(0) @binding(5) var<storage, read> rows: array<vec2<u32>>;     // rows: [R] (seq, pos)
@group(0) @binding(6) var<storage, read> table: array<u32>;          // [numSeqs, maxBlocks] block ids
@group(0) @binding(7) var<uniform> p: Params;

${PAGED_PHYS_ROW_WGSL}

// Element e of the head vector at qkv[src ..] turned by angle pos * invFreq[i] of its pair
// (x0, x1) = (qkv[a], qkv[b]): y0 = x0 c - x1 s (e is the pair's first), y1 = x0 s + x1 c.
fn turned(src: u32, e: u32, pos: f32) -> f32 {
  ${pair}
  let x0 = qkv[a];
  let x1 = qkv[b];
  let angle = pos * invFreq[i];
  let c = cos(angle);
  let s = sin(angle);
  if (first) { return x0 * c - x1 * s; }
  return x0 * s + x1 * c;
}

// vec4 c4 of head vector hv (head h of its row) at position pos: turned for q and k, copied for v.
fn headVec4(hv: u32, h: u32, c4: u32, pos: f32) -> vec4<f32> {
  let src = hv * p.headDim;
  let e = 4u * c4;
  if (h >= p.nHeads + p.nKv) {
    return vec4<f32>(qkv[src + e], qkv[src + e + 1u], qkv[src + e + 2u], qkv[src + e + 3u]);
  }
  return vec4<f32>(
    turned(src, e, pos), turned(src, e + 1u, pos), turned(src, e + 2u, pos), turned(src, e + 3u, pos)
  );
}
${q8 ? q8Main(HD4, SEG, WG) : plainMain(dtype as "f32" | "f16", HD4, WG)}
`;
}

/** Entry point of the f32/f16 variant: one vec4 per invocation, no reduction. */
function plainMain(dtype: "f32" | "f16", HD4: number, WG: number): string {
  return /* wgsl */ `
const HD4 = ${HD4}u;

@compute @workgroup_size(${WG})
fn main(@builtin(global_invocation_id) g: vec3u) {
  let i = g.y * p.gridStride + g.x;
  if (i >= p.nVec * HD4) { return; }
  let c4 = i % HD4;
  let hv = i / HD4;
  let heads = p.nHeads + 2u * p.nKv;
  let h = hv % heads;
  let r = hv / heads;
  let row = rows[r];
  let x = headVec4(hv, h, c4, f32(row.y));
  if (h < p.nHeads) {
    q[(r * p.nHeads + h) * HD4 + c4] = x;
    return;
  }
  let phys = physRow(row.x, row.y);
  if (phys == 0xffffffffu) { return; }
  let dst = ((p.layerRow + phys) * p.nKv + (h - p.nHeads) % p.nKv) * HD4 + c4;
  if (h < p.nHeads + p.nKv) {
    kCache[dst] = vec4<${dtype}>(x);
  } else {
    vCache[dst] = vec4<${dtype}>(x);
  }
}
`;
}

/** Entry point of the q8 variant: a segment per head vector, absmax by tree reduction. */
function q8Main(HD4: number, SEG: number, WG: number): string {
  return /* wgsl */ `
const HD4 = ${HD4}u;
const SEG = ${SEG}u;
const VPW = ${WG / SEG}u;

var<workgroup> amax: array<f32, ${WG}>; // per invocation, then per segment (at its first slot)

${KV_Q8_WGSL}

@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wg: vec3u, @builtin(local_invocation_index) lid: u32) {
  let hv = (wg.y * p.gridStride + wg.x) * VPW + lid / SEG;
  let c = lid % SEG;
  let live = hv < p.nVec && c < HD4;
  let heads = p.nHeads + 2u * p.nKv;
  let h = hv % heads;
  let r = hv / heads;
  var x = vec4<f32>(0.0);
  var row = vec2<u32>(0u);
  if (live) {
    row = rows[r];
    x = headVec4(hv, h, c, f32(row.y));
  }
  amax[lid] = maxAbs4(x);
${kvQ8SegmentMaxWgsl(["amax"], SEG)}
  workgroupBarrier();
  if (!live) { return; }
  if (h < p.nHeads) {
    q[(r * p.nHeads + h) * HD4 + c] = x;
    return;
  }
  let phys = physRow(row.x, row.y);
  if (phys == 0xffffffffu) { return; }
  let scale = amax[lid - c] * (1.0 / 127.0);
  let dstVec = (p.layerRow + phys) * p.nKv + (h - p.nHeads) % p.nKv;
  let word = quantize4(x, scale);
  if (h < p.nHeads + p.nKv) {
    kCache[dstVec * HD4 + c] = word;
    if (c == 0u) { kCache[p.scaleBase + dstVec] = bitcast<u32>(scale); }
  } else {
    vCache[dstVec * HD4 + c] = word;
    if (c == 0u) { vCache[p.scaleBase + dstVec] = bitcast<u32>(scale); }
  }
}
`;
}

/** Buffers and shapes for {@linkcode createPagedQkvWrite}. */
export interface PagedQkvWriteArgs extends PagedKvLayout {
  /** Hierarchical label, e.g. `target.batch.L3.attn.qkv_write`. */
  label: string;
  /** Batch rows (static for this dispatch). */
  R: number;
  /** q heads. */
  nHeads: number;
  /** RoPE pairing. */
  ropeLayout: RopeLayout;
  /** qkv: [R, (nHeads + 2*nKvHeads) * headDim] f32, the fused product's output. */
  qkv: GPUBuffer;
  /** q: [R, nHeads, headDim] f32 output (rotated). */
  q: GPUBuffer;
  /** invFreq: [headDim / 2] f32, kernels/rope.ts `ropeInvFreq`. */
  invFreq: GPUBuffer;
  /** K pool: [layers, numBlocks*blockRows, nKvHeads, headDim] of `dtype`, `pagedKvBufferBytes`. */
  kCache: GPUBuffer;
  /** V pool: same layout as `kCache`. */
  vCache: GPUBuffer;
  /** rows: [R] (seq, pos) u32 pairs, kernels/paged_attention.ts `pagedRowsImage`. */
  rows: GPUBuffer;
  /** Block tables: [numSeqs, maxBlocksPerSeq] u32, engine/paged_kv.ts `blockTableImage`. */
  table: GPUBuffer;
}

/**
 * Builds the fused dispatch (pipeline, params and bind group once): q of every row to `q`, k and
 * v of row r into the pools at `phys(seq[r], pos[r])` of `layer`. Throws, naming `label`, on bad
 * shapes or short buffers.
 */
export async function createPagedQkvWrite(gpu: Gpu, args: PagedQkvWriteArgs): Promise<Dispatch> {
  const { label, dtype, R, nHeads, nKvHeads, headDim: hd, ropeLayout } = args;
  for (const [f, x] of Object.entries({ R, nHeads, ...pagingOf(args) })) {
    if (!Number.isInteger(x) || x < 1) {
      throw new RangeError(`${label}: ${f} must be an integer >= 1, got ${x}`);
    }
  }
  const poolRows = args.numBlocks * args.blockRows;
  checkKvCache(label, { ...args, maxSeq: poolRows });
  if (dtype === "f16" && !gpu.features.f16) {
    throw new Error(`${label}: an f16 KV pool needs the shader-f16 feature`);
  }
  const heads = nHeads + 2 * nKvHeads;
  const need: [string, GPUBuffer, number][] = [
    ["qkv", args.qkv, R * heads * hd * 4],
    ["q", args.q, R * nHeads * hd * 4],
    ["invFreq", args.invFreq, hd / 2 * 4],
    ["rows", args.rows, R * 8],
    ["table", args.table, args.numSeqs * args.maxBlocksPerSeq * 4],
  ];
  for (const [name, buf, bytes] of need) {
    if (buf.size < bytes) {
      throw new Error(`${label}: ${name} buffer of ${buf.size} bytes is short of ${bytes}`);
    }
  }
  const q8 = dtype === "q8", seg = nextPow2(hd / 4);
  const pipeline = await gpu.pipeline(
    `paged_qkv_write.${dtype}.${ropeLayout}.hd${hd}` +
      (q8 ? `.seg${seg}.wg${KV_WRITE_Q8_WG}` : `.wg${KV_WRITE_WG}`),
    () => pagedQkvWriteWgsl(dtype, ropeLayout, hd),
  );
  const nVec = R * heads;
  const groups = q8
    ? grid2d(Math.ceil(nVec / (KV_WRITE_Q8_WG / seg)), gpu.limits.maxComputeWorkgroupsPerDimension)
    : grid2d(Math.ceil(nVec * hd / 4 / KV_WRITE_WG), gpu.limits.maxComputeWorkgroupsPerDimension);
  const params = gpu.uniform(
    `${label}.params`,
    new Uint32Array([
      nVec,
      nHeads,
      nKvHeads,
      hd,
      hd / 2,
      q8 ? groups[0] : groups[0] * KV_WRITE_WG,
      args.layer * poolRows,
      q8 ? args.layers * poolRows * nKvHeads * hd / 4 : 0,
      args.blockRows,
      args.numBlocks,
      args.numSeqs,
      args.maxBlocksPerSeq,
    ]),
  );
  return {
    label,
    pipeline,
    bindGroup: gpu.bindGroup(label, pipeline, [
      args.qkv,
      args.q,
      args.kCache,
      args.vCache,
      args.invFreq,
      args.rows,
      args.table,
      params,
    ]),
    workgroups: groups,
  };
}

function pagingOf(a: PagedKvLayout): Record<string, number> {
  return {
    blockRows: a.blockRows,
    numBlocks: a.numBlocks,
    numSeqs: a.numSeqs,
    maxBlocksPerSeq: a.maxBlocksPerSeq,
  };
}

/**
 * CPU reference for {@linkcode pagedQkvWriteWgsl}, composed of the two it fuses: kernels/
 * paged_qkv.ts `pagedQkvRef` (split, q and k turned by `pos[r]`) then kernels/paged_attention.ts
 * `pagedKvWriteRef` of k into `kPool` and of v into `vPool` (in place; f32 values of the pools,
 * `[layers, numBlocks*blockRows, nKv, headDim]`, as held: f16-rounded or q8-dequantized). `rows`
 * is `pagedRowsImage`'s `[R] (seq, pos)`, `table` the block tables. Returns q: [R, nHeads,
 * headDim].
 *
 * @example
 * ```ts
 * import { pagedQkvWriteRef } from "./paged_qkv_write.ts";
 * // One row (seq 0, pos 0: no turn), one head of each, headDim 4, one block of 1 row.
 * const kPool = new Float32Array(4), vPool = new Float32Array(4);
 * const q = pagedQkvWriteRef(
 *   new Float32Array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]),
 *   new Uint32Array([0, 0]),
 *   new Uint32Array([0]),
 *   new Float32Array([1, 0.01]),
 *   { nHeads: 1, nKvHeads: 1, headDim: 4, blockRows: 1, numBlocks: 1, maxBlocksPerSeq: 1,
 *     layer: 0, dtype: "f32", ropeLayout: "interleaved" },
 *   kPool,
 *   vPool,
 * );
 * console.log([...q, ...kPool, ...vPool]); // [1, 2, ..., 12]
 * ```
 */
export function pagedQkvWriteRef(
  qkv: Float32Array,
  rows: Uint32Array,
  table: Uint32Array,
  invFreq: Float32Array,
  l: PagedRefLayout & { nHeads: number; ropeLayout: RopeLayout },
  kPool: Float32Array,
  vPool: Float32Array,
): Float32Array {
  const pos = Array.from({ length: rows.length / 2 }, (_, r) => rows[2 * r + 1]);
  const { q, k, v } = pagedQkvRef(
    qkv,
    pos,
    l.nHeads,
    l.nKvHeads,
    l.headDim,
    invFreq,
    l.ropeLayout,
  );
  pagedKvWriteRef(kPool, k, rows, table, l);
  pagedKvWriteRef(vPool, v, rows, table, l);
  return q;
}
