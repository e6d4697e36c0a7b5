/**
 * Fused attention: RoPE of this forward's q and k, the KV-cache write (f32, f16 or q8) and causal
 * multi-head attention (GQA) over the cache, in ONE dispatch. It reads the q, k and v that the
 * fused qkv product wrote, `qkv: [T, qDim + 2 kvDim]` (q, then k, then v in each row):
 *
 *   q_t = rope(q[t], pos + t), k_t = cache(rope(k[t], pos + t)), v_t = cache(v[t])
 *   out[t, h, :] = softmax_s(q_t[h] · K[s, h/group] * scale) · V[s, h/group],  s ≤ pos + t
 *
 * where `cache(x)` rounds x as the cache stores it (f16, or q8 with one scale per head vector),
 * so this forward's rows are used exactly as a later forward reads them back, and K[s], V[s] are
 * the cache for s < pos and k_s-pos, v_s-pos for the new rows. `pos` is read from `state[0]`.
 *
 * Tree attention (option `tree`, engine/token_tree.ts): the T rows are nodes first..first+T-1 of a
 * token tree whose node j lies in cache row b + j, b = pos - first. Row t is at position
 * b + depth(t) (RoPE of q and of its k), and its keys are the rows s < b plus the tree rows of its
 * ancestors and itself: the softmax skips the others. KV rows are written as in the chain (row t
 * to cache row pos + t). The chain is the default and its WGSL is unchanged.
 *
 * The work split is "flash" / "flash-split" of `kernels/attention.ts` (same plan, same predicate
 * {@linkcode attentionUsesSplitK}): workgroup (row block, kv head, key chunk). Two additions:
 * - New rows are computed while the K/V tile is staged (RoPE in registers; for q8 a per-key
 *   absmax pass over the staged tile), and the workgroups of the LAST row block, the only ones
 *   whose key range reaches pos + T - 1 (each new key lies in exactly one of their chunks), write
 *   them to the cache. No workgroup reads a cache row written in the same dispatch.
 * - Split-K partials are merged in-kernel: each chunk stores (m, l, acc) with atomic stores and
 *   counts itself in an atomic counter per (row block, kv head); the chunk that arrives last
 *   merges all of them (atomic loads, coherent across workgroups) and resets the counter.
 *
 * @module
 */
import type { Dispatch, Gpu } from "../engine/gpu.ts";
import type { RopeLayout } from "../models/types.ts";
import {
  type AttentionPlan,
  attentionPlan,
  attentionRef,
  type AttentionShape,
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
import { checkKvCache, kvDequantizeRef, type KvDType, kvQuantizeRef } from "./kv_write.ts";
import { ropeRef } from "./rope.ts";
import { TREE_MAX_NODES, TREE_WORDS, treeSees } from "../engine/token_tree.ts";

const LOG2E = 1.4426950408889634;
/** Running-max start: finite, so exp2(m_old - m_new) never becomes exp2(-inf + inf) = NaN. */
const NEG = "-3.0e38";

/**
 * Workgroup memory the fused kernel adds to the flash kernel's: q8 scales of a tile, a flag, the
 * tree masks of a row block.
 */
const EXTRA_SHARED = 2 * 32 * 4 + 16 + 2 * 16 * 4;

/**
 * The plan of the fused kernel for `shape` with `maxShared` bytes of workgroup memory: the flash
 * plan of `kernels/attention.ts` (the same split-K predicate) within the memory left after the
 * fused kernel's own workgroup variables.
 */
export function fusedAttentionPlan(shape: AttentionShape, maxShared: number): AttentionPlan {
  return attentionPlan(shape, maxShared - EXTRA_SHARED);
}

/**
 * Counter words at the start of the split-K scratch: one per (row block, kv head) of a split plan,
 * which splits only grids of fewer than {@linkcode ATTN_MIN_WORKGROUPS} workgroups. The region is
 * the same for every plan, so plans of different T can share one scratch: each plan's counters
 * return to 0 after its dispatch, and no plan's partials overlap them.
 */
const COUNTERS = ATTN_MIN_WORKGROUPS;

/**
 * Bytes of the scratch one fused attention of `shape` under `plan` needs (0 when not split), all
 * u32 words: {@linkcode COUNTERS} counters, partial accumulators [NS, T, nHeads, headDim], and
 * partial (m, l) [NS, T, nHeads, 2]. A scratch shared by several plans (one per T) must be as
 * large as the largest.
 */
export function fusedAttentionScratchBytes(shape: AttentionShape, plan: AttentionPlan): number {
  if (plan.variant !== "flash-split") return 0;
  const rows = plan.nSplits * shape.T * shape.nHeads;
  return 4 * (COUNTERS + rows * shape.headDim + rows * 2);
}

/** WGSL: `rope4(base, c, at)`, vec4 c of the head vector at vec4 `base` of qkv, rotated by angle `at * invFreq` (at = position). */
function ropeWgsl(layout: RopeLayout, hd4: number): string {
  if (layout === "interleaved") {
    return `fn rope4(base: u32, c: u32, at: f32) -> vec4<f32> {
  let v = qkv[base + c];
  let a0 = at * invFreq[2u * c];
  let a1 = at * invFreq[2u * c + 1u];
  let c0 = cos(a0); let s0 = sin(a0);
  let c1 = cos(a1); let s1 = sin(a1);
  return vec4<f32>(v.x * c0 - v.y * s0, v.x * s0 + v.y * c0, v.z * c1 - v.w * s1, v.z * s1 + v.w * c1);
}`;
  }
  const H2 = hd4 / 2;
  return `fn rope4(base: u32, c: u32, at: f32) -> vec4<f32> {
  let first = c < ${H2}u;
  let i = 4u * (c % ${H2}u);
  let v = qkv[base + c];
  let u = qkv[base + select(c - ${H2}u, c + ${H2}u, first)];
  let a = at * vec4<f32>(invFreq[i], invFreq[i + 1u], invFreq[i + 2u], invFreq[i + 3u]);
  // first half: x cos - x' sin; second half: x cos + x' sin (x' the partner half).
  return v * cos(a) + select(u, -u, first) * sin(a);
}`;
}

/** WGSL of the fused kernel for `headDim`, `plan`, cache `dtype` and RoPE `layout`. */
export function fusedAttentionWgsl(
  headDim: number,
  plan: AttentionPlan,
  dtype: KvDType,
  layout: RopeLayout,
  tree = false,
  wg: number = ATTN_WG,
): string {
  const HD4 = headDim / 4, { bq: BQ, kt: KT } = plan, WG = wg;
  const split = plan.variant === "flash-split";
  const NS = plan.nSplits;
  const ACC = Math.ceil(BQ * HD4 / WG);
  const DT = cacheElem(dtype);
  const q8 = dtype === "q8";
  const round = dtype === "f16" ? "vec4<f32>(vec4<f16>(x))" : "x"; // q8: rounded per key later
  return /* wgsl */ `${dtype === "f16" ? "enable f16;" : ""}
// Fused attention (RoPE + KV write + ${
    split ? `flash-decoding over ${NS} key chunks, merged in-kernel` : "flash attention"
  }).
// Workgroup (x, y, z) = (row block, kv head, key chunk) owns BQ=${BQ} query rows of kv head y
// (row r = t*group + g for query head y*group + g) and keys [kBegin, kEnd) of chunk z. ${WG}
// invocations stage Q (rotated, pre-scaled) once, then loop over K/V tiles of KT=${KT} keys: each
// invocation loads vec4s of the tile, from the cache for keys < pos, else computed from qkv (k
// rotated) and rounded as the cache stores them${
    q8 ? " (q8: after a per-key absmax pass)" : ""
  }; the last row
// block writes those new rows to the cache. Then the BQ x KT scores, the online softmax of BQ
// rows (one invocation each), and the BQ x headDim accumulator (${ACC} vec4 per invocation).
// Keys past a row's own end (pos + t + 1) get weight 0; cache rows past pos+T-1 are never read.
struct Params {
  T: u32,          // query rows
  nHeads: u32,     // query heads
  group: u32,      // nHeads / nKvHeads
  maxSeq: u32,     // cache rows per layer
  layerBase4: u32, // layer * maxSeq * rowVec4: first vec4 of the layer
  rowVec4: u32,    // nKv * headDim / 4: vec4s per cache row
  rows: u32,       // T * group: query rows per kv head
  scale: f32,      // log2(e) / sqrt(headDim): scores are kept in the log2 domain
  scaleBase: u32,  // q8: layers * maxSeq * nKv * headDim / 4, first word of the scale region
  qkvRow4: u32,    // vec4s per qkv row: (nHeads + 2 nKv) * headDim / 4
  kOff4: u32,      // vec4 offset of k in a qkv row: nHeads * headDim / 4
  vOff4: u32,      // vec4 offset of v in a qkv row
  lastBlock: u32,  // index of the last row block (its workgroups write the cache)
  accBase: u32,    // split: first word of the partial accumulators in part (after the counters)
  mlBase: u32,     // split: first word of the (m, l) partials in part
  treeFirst: u32,  // tree: the tree node of query row 0 (rows are nodes treeFirst..+T-1)
}
@group(0) @binding(0) var<storage, read> qkv: array<vec4<f32>>;        // qkv: [T, (nHeads + 2 nKv) * ${headDim}] f32
@group(0) @binding(1) var<storage, read_write> kCache: array<${DT}>;  // [layers, maxSeq, nKv, ${headDim}] ${dtype}${
    q8 ? " int8 x4, then scales [layers, maxSeq, nKv] f32" : ""
  }
@group(0) @binding(2) var<storage, read_write> vCache: array<${DT}>;  // same layout as kCache
@group(0) @binding(3) var<storage, read> state: array<u32>;           // state[0] = pos
@group(0) @binding(4) var<storage, read_write> out: array<vec4<f32>>; // out: [T, nHeads, ${headDim}] f32
@group(0) @binding(5) var<uniform> p: Params;
@group(0) @binding(6) var<storage, read> invFreq: array<f32>;          // invFreq: [${
    headDim / 2
  }] f32
${
    split
      ? `@group(0) @binding(7) var<storage, read_write> part: array<atomic<u32>>; // counters [${COUNTERS}], acc [NS, T, nHeads, ${headDim}], (m, l) [NS, T, nHeads]`
      : ""
  }
${
    tree
      ? `@group(0) @binding(8) var<storage, read> tree: array<vec4<u32>>; // ancestor table [nodes]: (mask lo, mask hi, depth, parent)`
      : ""
  }

const HD4 = ${HD4}u;
const BQ = ${BQ}u;
const KT = ${KT}u;
const WG = ${WG}u;
const NS = ${NS}u;
const ACC = ${ACC}u;

${kvLoadersWgsl(dtype)}

${ropeWgsl(layout, HD4)}

${flashTileVarsWgsl(BQ, KT, HD4, WG)}
${
    q8
      ? `var<workgroup> kScale: array<f32, ${KT}>;         // q8 scales of the tile's new keys
var<workgroup> vScale: array<f32, ${KT}>;`
      : ""
  }
${split ? "var<workgroup> isLast: u32;" : ""}
${
    tree
      ? `var<workgroup> seeLo: array<u32, ${BQ}>; // ancestor mask of each row (tree nodes 0..31)
var<workgroup> seeHi: array<u32, ${BQ}>; // (tree nodes 32..63)`
      : ""
  }
${
    tree
      ? `
// Tree mask: cache rows below treeBase are the committed context, visible to every row; row
// treeBase + j holds tree node j, visible to a row whose node has j among its ancestors.
fn sees(lo: u32, hi: u32, s: u32, treeBase: u32) -> bool {
  if (s < treeBase) { return true; }
  let j = s - treeBase;
  if (j < 32u) { return ((lo >> j) & 1u) != 0u; }
  if (j < 64u) { return ((hi >> (j - 32u)) & 1u) != 0u; }
  return false;
}`
      : ""
  }

${
    q8
      ? `fn maxAbs4(x: vec4<f32>) -> f32 {
  let a = abs(x);
  return max(max(a.x, a.y), max(a.z, a.w));
}
// As kernels/kv_write.ts: 4 values to int8 (ties to even, clamped to +-127), packed LE.
fn quantize4(x: vec4<f32>, scale: f32) -> vec4<i32> {
  if (scale > 0.0) { return clamp(vec4<i32>(round(x / scale)), vec4<i32>(-127), vec4<i32>(127)); }
  return vec4<i32>(0);
}
fn pack4(q: vec4<i32>) -> u32 {
  let b = bitcast<vec4<u32>>(q) & vec4<u32>(0xffu);
  return b.x | (b.y << 8u) | (b.z << 16u) | (b.w << 24u);
}`
      : ""
  }

@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wg: vec3u, @builtin(local_invocation_index) tid: u32) {
  let kh = wg.y;
  let row0 = wg.x * BQ;
  let pos = state[0];${
    tree
      ? `
  let treeBase = pos - p.treeFirst; // cache row of tree node 0 (the root)`
      : ""
  }
  let writer = wg.x == p.lastBlock;
  let lastRow = min(row0 + BQ, p.rows) - 1u;
  let blockEnd = min(pos + lastRow / p.group + 1u, p.maxSeq);
  var kBegin = 0u;
  var kEnd = blockEnd;
  var nActive = 1u; // key chunks holding keys: the others return at once and are not merged
  if (NS > 1u) {
    let chunk = max(KT, (((blockEnd + NS - 1u) / NS + KT - 1u) / KT) * KT);
    nActive = max(1u, (blockEnd + chunk - 1u) / chunk);
    if (wg.z >= nActive) { return; } // uniform per workgroup: safe before the barriers
    kBegin = wg.z * chunk;
    kEnd = min(kBegin + chunk, blockEnd);
  }

  for (var e = tid; e < BQ * HD4; e += WG) {
    let row = row0 + e / HD4;
    var x = vec4<f32>(0.0);
    if (row < p.rows) {
      let t = row / p.group;
      let h = kh * p.group + row % p.group;
      x = rope4(t * p.qkvRow4 + h * HD4, e % HD4, f32(${
    tree ? "treeBase + tree[p.treeFirst + t].z" : "pos + t"
  })) * p.scale;
    }
    Qs[e] = x;
  }
  if (tid < BQ) {
    let row = row0 + tid;
    rowEnd[tid] = select(0u, min(pos + row / p.group + 1u, kEnd), row < p.rows);${
    tree
      ? `
    var m = vec4<u32>(0u);
    if (row < p.rows) { m = tree[p.treeFirst + row / p.group]; }
    seeLo[tid] = m.x;
    seeHi[tid] = m.y;`
      : ""
  }
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
        let gi = kvBase + s * p.rowVec4 + e % HD4;
        if (s < pos) {
          kx = loadK(gi);
          vx = loadV(gi);
        } else {
          let t = s - pos;
          var x = rope4(t * p.qkvRow4 + p.kOff4 + kh * HD4, e % HD4, f32(${
    tree ? "treeBase + tree[s - treeBase].z" : "s"
  }));
          kx = ${round};
          x = qkv[t * p.qkvRow4 + p.vOff4 + kh * HD4 + e % HD4];
          vx = ${round};${
    q8 ? "" : `
          if (writer) {
            kCache[gi] = ${DT}(kx);
            vCache[gi] = ${DT}(vx);
          }`
  }
        }
      }
      Ks[(e / HD4) * KS + e % HD4] = kx;
      Vs[e] = vx;
    }
    workgroupBarrier();
${
    q8
      ? `    if (s0 + KT > pos) { // uniform: the tile holds new keys; quantize them as the cache does
      if (tid < KT) {
        var km = 0.0;
        var vm = 0.0;
        for (var c = 0u; c < HD4; c++) {
          km = max(km, maxAbs4(Ks[tid * KS + c]));
          vm = max(vm, maxAbs4(Vs[tid * HD4 + c]));
        }
        kScale[tid] = km * (1.0 / 127.0);
        vScale[tid] = vm * (1.0 / 127.0);
      }
      workgroupBarrier();
      for (var e = tid; e < KT * HD4; e += WG) {
        let j = e / HD4;
        let s = s0 + j;
        if (s >= pos && s < kEnd) {
          let kq = quantize4(Ks[j * KS + e % HD4], kScale[j]);
          let vq = quantize4(Vs[e], vScale[j]);
          Ks[j * KS + e % HD4] = vec4<f32>(kq) * kScale[j];
          Vs[e] = vec4<f32>(vq) * vScale[j];
          if (writer) {
            let gi = kvBase + s * p.rowVec4 + e % HD4;
            kCache[gi] = pack4(kq);
            vCache[gi] = pack4(vq);
            if (e % HD4 == 0u) {
              kCache[p.scaleBase + gi / HD4] = bitcast<u32>(kScale[j]);
              vCache[p.scaleBase + gi / HD4] = bitcast<u32>(vScale[j]);
            }
          }
        }
      }
      workgroupBarrier();
    }
`
      : ""
  } ${
    flashTileWgsl(
      WG,
      tree ? (r, j) => `sees(seeLo[${r}], seeHi[${r}], s0 + ${j}, treeBase)` : undefined,
    )
  }  }
  workgroupBarrier(); // rowM, rowL final (or initial, for an empty chunk)
${split ? splitTail(mergeWorkers(BQ, headDim, KT, WG)) : unsplitTail()}
}
`;
}

/** Unsplit epilogue: out = acc / l. */
function unsplitTail(): string {
  return `  for (var i = 0u; i < ACC; i++) {
    let e = tid + i * WG;
    let r = e / HD4;
    let row = row0 + r;
    if (e < BQ * HD4 && row < p.rows) {
      let qRow = (row / p.group) * p.nHeads + kh * p.group + row % p.group;
      let l = rowL[r];
      out[qRow * HD4 + e % HD4] = select(vec4<f32>(0.0), acc[i] / l, l > 0.0);
    }
  }`;
}

/** Split epilogue: store the partials, count the chunk, and merge in the chunk that is last. */
function splitTail(G: number): string {
  return `  let rowsQ = p.T * p.nHeads;
  for (var i = 0u; i < ACC; i++) {
    let e = tid + i * WG;
    let r = e / HD4;
    let row = row0 + r;
    if (e < BQ * HD4 && row < p.rows) {
      let c = e % HD4;
      let qRow = (row / p.group) * p.nHeads + kh * p.group + row % p.group;
      let o = p.accBase + ((wg.z * rowsQ + qRow) * HD4 + c) * 4u;
      for (var j = 0u; j < 4u; j++) { atomicStore(&part[o + j], bitcast<u32>(acc[i][j])); }
      if (c == 0u) {
        let m = p.mlBase + 2u * (wg.z * rowsQ + qRow);
        atomicStore(&part[m], bitcast<u32>(rowM[r]));
        atomicStore(&part[m + 1u], bitcast<u32>(rowL[r]));
      }
    }
  }
  storageBarrier();
  if (tid == 0u) {
    let counter = kh * (p.lastBlock + 1u) + wg.x;
    let arrived = atomicAdd(&part[counter], 1u);
    isLast = select(0u, 1u, arrived == nActive - 1u);
    if (arrived == nActive - 1u) { atomicStore(&part[counter], 0u); } // ready for the next dispatch
  }
  if (workgroupUniformLoad(&isLast) == 0u) { return; }
${splitMergeWgsl(MERGE, G)}`;
}

/** The fused kernel's partials and output, for {@linkcode splitMergeWgsl}. */
const MERGE: SplitMergeWgsl = {
  valid: (r) => `row0 + ${r} < p.rows`,
  qRow: (r) => `((row0 + ${r}) / p.group) * p.nHeads + kh * p.group + (row0 + ${r}) % p.group`,
  ml: (z, qr) => ({ buf: "part", at: `p.mlBase + 2u * (${z} * rowsQ + ${qr})` }),
  acc: (z, qr, c) => ({
    buf: "part",
    at: `p.accBase + ((${z} * rowsQ + ${qr}) * HD4 + ${c}) * 4u`,
  }),
  store: (qr, c, v) => `out[${qr} * HD4 + ${c}] = ${v};`,
};

/** Buffers and shapes for {@linkcode createFusedAttention}. */
export interface FusedAttentionArgs extends AttentionShape {
  /** Hierarchical label, e.g. `target.L3.attn`. */
  label: string;
  /** qkv: [T, (nHeads + 2 nKvHeads) * headDim] f32, q then k then v per row (before RoPE). */
  qkv: GPUBuffer;
  /** K cache: [layers, maxSeq, nKvHeads, headDim] of `dtype` (q8: then scales), `kvCacheBytes`. */
  kCache: GPUBuffer;
  /** V cache: same layout as `kCache`. */
  vCache: GPUBuffer;
  /** state: array<u32>, state[0] = pos (tokens cached before this forward). */
  state: GPUBuffer;
  /** out: [T, nHeads, headDim] f32. */
  out: GPUBuffer;
  /** invFreq: [headDim / 2] f32 from `ropeInvFreq`. */
  invFreq: GPUBuffer;
  /** Pairing of RoPE. rotate-half needs headDim % 8 == 0. */
  layout: RopeLayout;
  /** Element type of both caches. */
  dtype: KvDType;
  /** Layers in the cache buffers. */
  layers: number;
  /** Layer to write and attend over, in [0, layers). */
  layer: number;
  /**
   * Split-K scratch of at least {@linkcode fusedAttentionScratchBytes} bytes, zero-filled when
   * created (its counters return to 0 after every dispatch); unused when not split.
   */
  scratch?: GPUBuffer;
  /**
   * Tree attention (engine/token_tree.ts): `table` is an ancestor table `[nodes, 4] u32` and this
   * forward's row t is tree node `first + t`; tree node j sits in cache row pos - first + j.
   * Row t then sees the cache rows below pos - first (the context) and the tree rows of its
   * ancestors (and itself), at RoPE position pos - first + depth. Absent: a chain (row t at
   * pos + t sees every row up to its own).
   */
  tree?: { table: GPUBuffer; first: number };
  /**
   * Invocations per workgroup: default {@linkcode fusedAttentionWorkgroup} of the adapter (tests
   * pass the other size to check both on one adapter).
   */
  wg?: number;
}

/**
 * Invocations per fused-attention workgroup on an adapter: 256 on a GPU, where each invocation's
 * K/V staging loads are a chain of round trips to memory (4x the invocations: a quarter of the
 * chain; on the H200 the 8B model's decode attention spent ~40 µs a layer with 64), 64 on a
 * software adapter, where every invocation costs a coroutine switch at each barrier.
 */
export function fusedAttentionWorkgroup(gpu: Gpu): number {
  return gpu.software ? ATTN_WG : FUSED_ATTN_WG_GPU;
}

/** Invocations per fused-attention workgroup on a hardware adapter. */
export const FUSED_ATTN_WG_GPU = 256;

/**
 * Builds the single dispatch of the fused attention (plan by `attentionPlan`). Pipelines, params
 * and bind groups are built once here.
 */
export async function createFusedAttention(
  gpu: Gpu,
  args: FusedAttentionArgs,
): Promise<Dispatch> {
  const { label, dtype, headDim } = args;
  if (!Number.isInteger(args.T) || args.T < 1) {
    throw new Error(`${label}: T must be a positive integer, got ${args.T}`);
  }
  checkKvCache(label, args);
  const tree = args.tree;
  if (tree) {
    const { first } = tree;
    if (!Number.isInteger(first) || first < 0 || first + args.T > TREE_MAX_NODES) {
      throw new RangeError(
        `${label}: tree rows ${first}..${first + args.T - 1} outside the ${TREE_MAX_NODES} nodes ` +
          `a tree may have`,
      );
    }
    if (tree.table.size < (first + args.T) * TREE_WORDS * 4) {
      throw new RangeError(
        `${label}: ancestor table of ${tree.table.size} bytes is too small for nodes ` +
          `0..${first + args.T - 1}`,
      );
    }
  }
  if (args.nHeads % args.nKvHeads !== 0) {
    throw new Error(
      `${label}: nHeads ${args.nHeads} is not a multiple of nKvHeads ${args.nKvHeads}`,
    );
  }
  if (args.layout === "rotate-half" && headDim % 8 !== 0) {
    throw new Error(`${label}: rotate-half RoPE needs headDim % 8 == 0, got ${headDim}`);
  }
  if (dtype === "f16" && !gpu.features.f16) {
    throw new Error(`${label}: an f16 KV cache needs the shader-f16 feature`);
  }
  const plan = fusedAttentionPlan(args, gpu.limits.maxComputeWorkgroupStorageSize);
  const wg = args.wg ?? fusedAttentionWorkgroup(gpu);
  if (![64, 128, 256].includes(wg)) {
    throw new Error(`${label}: wg must be 64, 128 or 256, got ${wg}`);
  }
  const split = plan.variant === "flash-split";
  const need = fusedAttentionScratchBytes(args, plan);
  if (split && (!args.scratch || args.scratch.size < need)) {
    throw new Error(
      `${label}: split-K scratch of ${args.scratch?.size ?? 0} bytes is too small for ` +
        `${plan.nSplits} splits of T=${args.T} (needs ${need})`,
    );
  }
  const group = args.nHeads / args.nKvHeads;
  const rowVec4 = args.nKvHeads * headDim / 4;
  const blocks = Math.ceil(args.T * group / plan.bq);
  const rowsQ = args.T * args.nHeads;
  const raw = new Uint32Array(16);
  raw.set([
    args.T,
    args.nHeads,
    group,
    args.maxSeq,
    args.layer * args.maxSeq * rowVec4,
    rowVec4,
    args.T * group,
    0,
    args.layers * args.maxSeq * rowVec4,
    (args.nHeads + 2 * args.nKvHeads) * headDim / 4,
    args.nHeads * headDim / 4,
    (args.nHeads + args.nKvHeads) * headDim / 4,
    blocks - 1,
    COUNTERS,
    COUNTERS + plan.nSplits * rowsQ * headDim,
    tree?.first ?? 0,
  ]);
  if (split && blocks * args.nKvHeads > COUNTERS) {
    throw new Error(`${label}: ${blocks * args.nKvHeads} split-K counters > ${COUNTERS}`);
  }
  new Float32Array(raw.buffer)[7] = LOG2E / Math.sqrt(headDim);
  const params = gpu.uniform(`${label}.params`, raw);
  const key = `attention.fused.${plan.variant}.hd${headDim}.${dtype}.${args.layout}.bq${plan.bq}` +
    `.kt${plan.kt}.ns${plan.nSplits}.wg${wg}${tree ? ".tree" : ""}`;
  const pipeline = await gpu.pipeline(
    key,
    () => fusedAttentionWgsl(headDim, plan, dtype, args.layout, tree !== undefined, wg),
  );
  return {
    label,
    pipeline,
    bindGroup: gpu.bindGroup(label, pipeline, [
      args.qkv,
      args.kCache,
      args.vCache,
      args.state,
      args.out,
      params,
      args.invFreq,
      split ? args.scratch : undefined,
      tree?.table,
    ]),
    workgroups: [blocks, args.nKvHeads, plan.nSplits],
  };
}

/** Shapes for {@linkcode fusedAttentionRef}. */
export interface FusedAttentionRefShape {
  /** Query rows. */
  T: number;
  /** Tokens cached before this forward. */
  pos: number;
  /** Query heads. */
  nHeads: number;
  /** Key/value heads. */
  nKvHeads: number;
  /** Per-head size. */
  headDim: number;
  /** Cache rows per layer. */
  maxSeq: number;
  /** Layer written and attended over. */
  layer: number;
  /** Cache element type (how new rows are rounded). */
  dtype: KvDType;
  /** RoPE pairing. */
  layout: RopeLayout;
  /** Tree attention, as {@linkcode FusedAttentionArgs.tree} with the table's host copy. */
  tree?: { table: Uint32Array; first: number };
}

/**
 * CPU reference, composed from the unfused references: split `qkv` into q, k, v; `ropeRef` on q
 * and k at positions pos.. (tree: the tree base plus each node's depth); write k, v into (copies of) the caches as the cache stores them
 * (f16-rounded or q8-quantized per head vector); `attentionRef` over the result. The caches are
 * f32 values ([layers, maxSeq, nKvHeads, headDim]); a tree masks the keys by the
 * ancestor table. Returns out [T, nHeads, headDim] and the
 * updated caches.
 */
export function fusedAttentionRef(
  qkv: Float32Array,
  kCache: Float32Array,
  vCache: Float32Array,
  invFreq: Float32Array,
  s: FusedAttentionRefShape,
): { out: Float32Array; kCache: Float32Array; vCache: Float32Array } {
  const { T, nHeads, nKvHeads, headDim: hd } = s;
  const qDim = nHeads * hd, kvDim = nKvHeads * hd, W = qDim + 2 * kvDim;
  const q = new Float32Array(T * qDim), k = new Float32Array(T * kvDim);
  const v = new Float32Array(T * kvDim);
  for (let t = 0; t < T; t++) {
    q.set(qkv.subarray(t * W, t * W + qDim), t * qDim);
    k.set(qkv.subarray(t * W + qDim, t * W + qDim + kvDim), t * kvDim);
    v.set(qkv.subarray(t * W + qDim + kvDim, (t + 1) * W), t * kvDim);
  }
  // Row t's position: pos + t (chain), or the tree base plus its node's depth.
  const tree = s.tree, base = s.pos - (tree?.first ?? 0);
  const at = (node: number) => tree ? base + tree.table[node * TREE_WORDS + 2] : s.pos + node;
  const rope = (x: Float32Array, heads: number) => {
    const y = new Float32Array(x.length), n = heads * hd;
    for (let t = 0; t < T; t++) {
      const row = x.subarray(t * n, (t + 1) * n);
      y.set(ropeRef(row, heads, hd, at((tree?.first ?? 0) + t), invFreq, s.layout), t * n);
    }
    return y;
  };
  const qr = rope(q, nHeads), kr = rope(k, nKvHeads);
  const kc = kCache.slice(), vc = vCache.slice();
  for (const [cache, src] of [[kc, kr], [vc, v]]) {
    for (let t = 0; t < T && s.pos + t < s.maxSeq; t++) {
      const row = src.subarray(t * kvDim, (t + 1) * kvDim);
      const dst = (s.layer * s.maxSeq + s.pos + t) * kvDim;
      if (s.dtype === "q8") {
        const { q: qq, scale } = kvQuantizeRef(row, nKvHeads, hd);
        cache.set(kvDequantizeRef(qq, scale, hd), dst);
      } else {
        cache.set(s.dtype === "f16" ? row.map(Math.f16round) : row, dst);
      }
    }
  }
  const visible = tree &&
    ((t: number, key: number) => key < base || treeSees(tree.table, tree.first + t, key - base));
  const out = attentionRef(qr, kc, vc, s, visible);
  return { out, kCache: kc, vCache: vc };
}
