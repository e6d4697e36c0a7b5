/**
 * KV compaction after a tree verify: the accepted path's cache rows move into contiguous
 * positions, so the cache holds exactly the accepted sequence again. With the tree's nodes laid
 * out flat after the context (engine/token_tree.ts), node j in cache row b + j, and the accepted
 * path `path[0] = 0 (root), path[1..m]` (node indices, increasing):
 *
 *   row b + i  <-  row b + path[i],   i = 1..m,   b = state[0] - nodes
 *
 * for every layer, in both caches (f32, f16, or q8 values AND their per-row scales). `m + 1` is
 * `count[0]` (the accept kernel's accepted + 1). The kernel runs after the tree forward advanced
 * state[0] by `nodes` and before the commit moves it back to b + m + 1.
 *
 * In place and race-free: path[i] >= i (a node at depth i has i ancestors before it), so a row
 * written at step i is never read at a later step; one invocation owns one u32 column of a
 * layer's rows and walks i = 1..m in order.
 *
 * @module
 */
import type { Dispatch, Gpu } from "../engine/gpu.ts";
import { checkKvCache, type KvDType } from "./kv_write.ts";
import { TREE_MAX_NODES } from "../engine/token_tree.ts";

/** Invocations per workgroup. */
export const KV_COMPACT_WG = 64;

/** u32 words of one cache row (all kv heads of one layer and position) and of its q8 scales. */
export function kvRowWords(dtype: KvDType, nKvHeads: number, headDim: number) {
  const kvDim = nKvHeads * headDim;
  const values = dtype === "f32" ? kvDim : dtype === "f16" ? kvDim / 2 : kvDim / 4;
  return { values, scales: dtype === "q8" ? nKvHeads : 0 };
}

/** WGSL of the compaction kernel. */
export function kvCompactWgsl(): string {
  return /* wgsl */ `
// KV compaction: invocation c (1-D grid of ${KV_COMPACT_WG}-wide workgroups) owns column c of
// [layers, rowWords + scaleWords]: one u32 word of every cache row of one layer, in K and in V
// (scale words live after all value words, at scaleBase). It copies row b + path[i] to row b + i
// for i = 1..count-1 in order. Invocations past the columns return.
struct Params {
  nodes: u32,      // tree nodes of the verify forward
  layers: u32,
  maxSeq: u32,
  rowWords: u32,   // u32 words of values per cache row
  scaleWords: u32, // q8: u32 scale words per cache row (nKv), else 0
  scaleBase: u32,  // q8: first word of the scales (layers * maxSeq * rowWords)
  pad0: u32,
  pad1: u32,
}
@group(0) @binding(0) var<storage, read_write> kCache: array<u32>; // [layers, maxSeq, rowWords] (+ scales)
@group(0) @binding(1) var<storage, read_write> vCache: array<u32>; // same layout as kCache
@group(0) @binding(2) var<storage, read> state: array<u32>;        // state[0] = b + nodes
@group(0) @binding(3) var<storage, read> path: array<u32>;         // [m + 1] accepted node indices
@group(0) @binding(4) var<storage, read> count: array<u32>;        // [1] m + 1
@group(0) @binding(5) var<uniform> p: Params;

fn addr(layer: u32, row: u32, w: u32) -> u32 {
  if (w < p.rowWords) { return (layer * p.maxSeq + row) * p.rowWords + w; }
  return p.scaleBase + (layer * p.maxSeq + row) * p.scaleWords + (w - p.rowWords);
}

@compute @workgroup_size(${KV_COMPACT_WG})
fn main(@builtin(global_invocation_id) gid: vec3u) {
  let cols = p.rowWords + p.scaleWords;
  if (gid.x >= p.layers * cols) { return; }
  let layer = gid.x / cols;
  let w = gid.x % cols;
  let b = state[0] - p.nodes;
  let n = min(count[0], p.nodes);
  for (var i = 1u; i < n; i++) {
    let j = path[i];
    if (j != i) {
      let src = addr(layer, b + j, w);
      let dst = addr(layer, b + i, w);
      kCache[dst] = kCache[src];
      vCache[dst] = vCache[src];
    }
  }
}
`;
}

/** Buffers and shapes for {@linkcode createKvCompact}. */
export interface KvCompactArgs {
  /** Label of the dispatch, e.g. `target.kv.compact`. */
  label: string;
  /** K cache: [layers, maxSeq, nKvHeads, headDim] of `dtype` (q8: then scales). */
  kCache: GPUBuffer;
  /** V cache: same layout. */
  vCache: GPUBuffer;
  /** state: state[0] = b + nodes, the position after the tree forward. */
  state: GPUBuffer;
  /** path: [m + 1] u32 node indices of the accepted path, path[0] = 0. */
  path: GPUBuffer;
  /** count: [1] u32 = m + 1. */
  count: GPUBuffer;
  /** Tree nodes the verify forward processed (1..64). */
  nodes: number;
  /** Cache element type. */
  dtype: KvDType;
  /** Layers in the caches. */
  layers: number;
  /** Cache rows per layer. */
  maxSeq: number;
  /** Key/value heads. */
  nKvHeads: number;
  /** Per-head size. */
  headDim: number;
}

/** Builds the compaction dispatch (params and bind group built once). */
export async function createKvCompact(gpu: Gpu, args: KvCompactArgs): Promise<Dispatch> {
  const { label, nodes } = args;
  checkKvCache(label, { ...args, layer: 0 });
  if (!Number.isInteger(nodes) || nodes < 1 || nodes > TREE_MAX_NODES) {
    throw new RangeError(`${label}: ${nodes} tree nodes outside [1, ${TREE_MAX_NODES}]`);
  }
  const { values, scales } = kvRowWords(args.dtype, args.nKvHeads, args.headDim);
  const params = new Uint32Array([
    nodes,
    args.layers,
    args.maxSeq,
    values,
    scales,
    args.layers * args.maxSeq * values,
    0,
    0,
  ]);
  const pipeline = await gpu.pipeline(`kv_compact.wg${KV_COMPACT_WG}`, kvCompactWgsl);
  const cols = args.layers * (values + scales);
  return {
    label,
    pipeline,
    bindGroup: gpu.bindGroup(label, pipeline, [
      args.kCache,
      args.vCache,
      args.state,
      args.path,
      args.count,
      gpu.uniform(`${label}.params`, params),
    ]),
    workgroups: [Math.ceil(cols / KV_COMPACT_WG), 1, 1],
  };
}

/**
 * CPU reference on one cache as u32 words (`values` then `scales` regions as on the GPU, see
 * {@linkcode kvRowWords}): rows b + path[i] → b + i for i = 1..count-1, in place.
 */
export function kvCompactRef(
  cache: Uint32Array,
  s: { layers: number; maxSeq: number; rowWords: number; scaleWords: number },
  b: number,
  path: readonly number[],
  count: number,
): void {
  const scaleBase = s.layers * s.maxSeq * s.rowWords;
  for (let l = 0; l < s.layers; l++) {
    for (let i = 1; i < count; i++) {
      const src = l * s.maxSeq + b + path[i], dst = l * s.maxSeq + b + i;
      cache.copyWithin(dst * s.rowWords, src * s.rowWords, (src + 1) * s.rowWords);
      cache.copyWithin(
        scaleBase + dst * s.scaleWords,
        scaleBase + src * s.scaleWords,
        scaleBase + (src + 1) * s.scaleWords,
      );
    }
  }
}
