/**
 * KV-cache write: copies this forward's RoPE'd keys and values (f32 activations) into the model's
 * K and V caches at rows `pos .. pos+T-1` of one layer, converting to f16 where the cache is f16.
 *
 * Cache layout (one buffer for K, one for V, shared by all layers):
 * `[layers, maxSeq, nKvHeads, headDim]`, element base of a layer = `layer*maxSeq*nKvHeads*headDim`.
 * `pos` (tokens already cached) is read on the GPU from `state[0]`, never passed from the CPU, so
 * KV rollback after a rejected draft is just moving that counter.
 *
 * @module
 */
import { type Dispatch, type Gpu, grid2d } from "../engine/gpu.ts";

/** Invocations per workgroup. */
export const KV_WRITE_WG = 64;

/** Element type of a KV cache buffer. */
export type KvDType = "f16" | "f32";

/** The KV dtype the engine uses on `gpu`: f16 when `shader-f16` exists, else f32. */
export function kvDType(gpu: Gpu): KvDType {
  return gpu.features.f16 ? "f16" : "f32";
}

/** WGSL for the KV write with a cache of element type `dtype`. */
export function kvWriteWgsl(dtype: KvDType): string {
  const cvt = dtype === "f16" ? "vec4<f16>" : "vec4<f32>";
  return /* wgsl */ `
${dtype === "f16" ? "enable f16;" : ""}
// KV write: one invocation per 4 consecutive elements (one vec4) of k[T, nKv, headDim] AND the
// same vec4 of v; ${KV_WRITE_WG} invocations per workgroup, the grid may be 2-D (x fastest).
// Invocations past T*nKv*headDim/4 return; rows at or past maxSeq are dropped (never written out
// of the layer's range).
struct Params {
  n4: u32,        // T * nKv * headDim / 4
  rowVec4: u32,   // nKv * headDim / 4 (vec4s per cache row)
  maxSeq: u32,    // cache rows per layer
  layerBase4: u32,// layer * maxSeq * rowVec4
  gridStride: u32,// invocations per grid row (for 2-D grids)
}
@group(0) @binding(0) var<storage, read> k: array<vec4<f32>>;               // k: [T, nKv, headDim] f32
@group(0) @binding(1) var<storage, read> v: array<vec4<f32>>;               // v: [T, nKv, headDim] f32
@group(0) @binding(2) var<storage, read_write> kCache: array<${cvt}>;  // [layers, maxSeq, nKv, headDim] ${dtype}
@group(0) @binding(3) var<storage, read_write> vCache: array<${cvt}>;  // [layers, maxSeq, nKv, headDim] ${dtype}
@group(0) @binding(4) var<storage, read> state: array<u32>;                 // state[0] = pos
@group(0) @binding(5) var<uniform> p: Params;

@compute @workgroup_size(${KV_WRITE_WG})
fn main(@builtin(global_invocation_id) g: vec3u) {
  let i = g.y * p.gridStride + g.x;
  if (i >= p.n4) { return; }
  let t = i / p.rowVec4;
  let row = state[0] + t;
  if (row >= p.maxSeq) { return; }
  let dst = p.layerBase4 + row * p.rowVec4 + (i - t * p.rowVec4);
  kCache[dst] = ${cvt}(k[i]);
  vCache[dst] = ${cvt}(v[i]);
}
`;
}

/** Buffers and shapes for {@linkcode createKvWrite}. */
export interface KvWriteArgs {
  /** Hierarchical label, e.g. `target.L3.kv_write`. */
  label: string;
  /** k: [T, nKvHeads, headDim] f32 (after RoPE). */
  k: GPUBuffer;
  /** v: [T, nKvHeads, headDim] f32. */
  v: GPUBuffer;
  /** K cache: [layers, maxSeq, nKvHeads, headDim] of `dtype`. */
  kCache: GPUBuffer;
  /** V cache: [layers, maxSeq, nKvHeads, headDim] of `dtype`. */
  vCache: GPUBuffer;
  /** state: array<u32>, state[0] = pos (tokens already in the cache). */
  state: GPUBuffer | GPUBufferBinding;
  /** Element type of both caches. */
  dtype: KvDType;
  /** Rows written per forward (static for this dispatch). */
  T: number;
  /** Key/value heads. */
  nKvHeads: number;
  /** Per-head size; a multiple of 4. */
  headDim: number;
  /** Cache rows per layer. */
  maxSeq: number;
  /** Layer whose rows are written. */
  layer: number;
}

function checkKvWrite(a: KvWriteArgs): void {
  for (const f of ["T", "nKvHeads", "headDim", "maxSeq"] as const) {
    if (!Number.isInteger(a[f]) || a[f] < 1) {
      throw new Error(`${a.label}: ${f} must be a positive integer, got ${a[f]}`);
    }
  }
  if (a.headDim % 4 !== 0) {
    throw new Error(`${a.label}: headDim must be a multiple of 4, got ${a.headDim}`);
  }
  const need = (a.layer + 1) * a.maxSeq * a.nKvHeads * a.headDim * (a.dtype === "f16" ? 2 : 4);
  if (!Number.isInteger(a.layer) || a.layer < 0 || a.kCache.size < need || a.vCache.size < need) {
    throw new Error(
      `${a.label}: layer ${a.layer} needs caches of at least ${need} bytes, got K ${a.kCache.size}` +
        ` and V ${a.vCache.size}`,
    );
  }
}

/** Builds the dispatch writing `k`, `v` into the caches at rows `state[0] ..` of `layer`. */
export async function createKvWrite(gpu: Gpu, args: KvWriteArgs): Promise<Dispatch> {
  checkKvWrite(args);
  if (args.dtype === "f16" && !gpu.features.f16) {
    throw new Error(`${args.label}: an f16 KV cache needs the shader-f16 feature`);
  }
  const pipeline = await gpu.pipeline(
    `kv_write.${args.dtype}.wg${KV_WRITE_WG}`,
    () => kvWriteWgsl(args.dtype),
  );
  const rowVec4 = args.nKvHeads * args.headDim / 4;
  const n4 = args.T * rowVec4;
  const groups = grid2d(Math.ceil(n4 / KV_WRITE_WG));
  const params = gpu.uniform(
    `${args.label}.params`,
    new Uint32Array([
      n4,
      rowVec4,
      args.maxSeq,
      args.layer * args.maxSeq * rowVec4,
      groups[0] * KV_WRITE_WG,
    ]),
  );
  return {
    label: args.label,
    pipeline,
    bindGroup: gpu.bindGroup(args.label, pipeline, [
      args.k,
      args.v,
      args.kCache,
      args.vCache,
      args.state,
      params,
    ]),
    workgroups: groups,
  };
}

/** Shapes for {@linkcode kvWriteRef}. */
export interface KvWriteShape {
  /** Rows written. */
  T: number;
  /** First cache row written (tokens already cached). */
  pos: number;
  /** Key/value heads. */
  nKvHeads: number;
  /** Per-head size. */
  headDim: number;
  /** Cache rows per layer. */
  maxSeq: number;
  /** Layer written. */
  layer: number;
  /** Cache element type (f16 rounds the stored values). */
  dtype: KvDType;
}

/**
 * CPU reference for {@linkcode kvWriteWgsl}: writes `src` ([T, nKv, headDim]) into `cache`
 * ([layers, maxSeq, nKv, headDim], f32 values, f16-rounded when `dtype` is f16) in place.
 */
export function kvWriteRef(cache: Float32Array, src: Float32Array, s: KvWriteShape): void {
  const row = s.nKvHeads * s.headDim;
  for (let t = 0; t < s.T; t++) {
    if (s.pos + t >= s.maxSeq) break;
    const dst = (s.layer * s.maxSeq + s.pos + t) * row;
    for (let i = 0; i < row; i++) {
      const x = src[t * row + i];
      cache[dst + i] = s.dtype === "f16" ? Math.f16round(x) : x;
    }
  }
}
