/**
 * KV-cache write: copies this forward's RoPE'd keys and values (f32 activations) into the model's
 * K and V caches at rows `pos .. pos+T-1` of one layer, converting to f16 where the cache is f16
 * and quantizing to 8 bits where it is q8.
 *
 * Cache layout (one buffer for K, one for V, shared by all layers):
 * - f32, f16: `[layers, maxSeq, nKvHeads, headDim]`, element base of a layer =
 *   `layer*maxSeq*nKvHeads*headDim`.
 * - q8: int8 values `[layers, maxSeq, nKvHeads, headDim]`, 4 per u32 word (element 4w+j in byte j,
 *   little-endian, so the region reads back as an `Int8Array`), then f32 scales
 *   `[layers, maxSeq, nKvHeads]` starting at byte `layers*maxSeq*nKvHeads*headDim`: one symmetric
 *   scale per head vector of one row, `scale = absmax * (1/127)`, `q = round(x / scale)` (ties to
 *   even, clamped to ±127), value = `q * scale`. See {@linkcode kvQuantizeRef}.
 *
 * {@linkcode kvCacheBytes} gives the exact size of one cache buffer for every dtype.
 * `pos` (tokens already cached) is read on the GPU from `state[0]`, never passed from the CPU, so
 * KV rollback after a rejected draft is just moving that counter.
 *
 * @module
 */
import { type Dispatch, type Gpu, grid2d } from "../engine/gpu.ts";

/** Invocations per workgroup. */
export const KV_WRITE_WG = 64;

/** Invocations per workgroup of the q8 write (a power of 2, at least headDim/4 = 64). */
export const KV_WRITE_Q8_WG = 64;
/** Largest headDim the q8 write handles (one vec4 per invocation, one vector per segment). */
export const KV_Q8_MAX_HEAD_DIM = 4 * KV_WRITE_Q8_WG;

/** Element type of a KV cache buffer: f32, f16, or 8-bit with one f32 scale per head vector. */
export type KvDType = "f32" | "f16" | "q8";

/** The KV dtype the engine uses on `gpu`: f16 when `shader-f16` exists, else f32. */
export function kvDType(gpu: Gpu): KvDType {
  return gpu.features.f16 ? "f16" : "f32";
}

function checkPositive(label: string, fields: Record<string, number>): void {
  for (const [f, x] of Object.entries(fields)) {
    if (!Number.isInteger(x) || x < 1) {
      throw new Error(`${label}: ${f} must be a positive integer, got ${x}`);
    }
  }
}

/**
 * Exact size in bytes of ONE KV cache buffer (K or V) of `dtype` holding `layers` layers of
 * `maxSeq` rows of `nKvHeads` vectors of `headDim` values; what `gpu.buffer` must be given.
 * q8 adds 4 bytes (the f32 scale) per head vector to its 1 byte per value.
 *
 * @example
 * ```ts
 * import { kvCacheBytes } from "./kv_write.ts";
 * console.assert(kvCacheBytes("f16", 2, 128, 3, 64) === 2 * 128 * 3 * 64 * 2);
 * console.assert(kvCacheBytes("q8", 2, 128, 3, 64) === 2 * 128 * 3 * (64 + 4));
 * ```
 */
export function kvCacheBytes(
  dtype: KvDType,
  layers: number,
  maxSeq: number,
  nKvHeads: number,
  headDim: number,
): number {
  checkPositive("kvCacheBytes", { layers, maxSeq, nKvHeads, headDim });
  if (headDim % 4 !== 0) {
    throw new Error(`kvCacheBytes: headDim must be a multiple of 4, got ${headDim}`);
  }
  const vecs = layers * maxSeq * nKvHeads;
  if (dtype === "q8") return vecs * (headDim + 4);
  if (dtype === "f16") return vecs * headDim * 2;
  if (dtype === "f32") return vecs * headDim * 4;
  throw new Error(`kvCacheBytes: unknown KV dtype "${dtype}" (f32, f16 or q8)`);
}

/** WGSL for the KV write with a cache of element type `dtype` ("f32" or "f16"). */
export function kvWriteWgsl(dtype: "f32" | "f16"): string {
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

/** Smallest power of 2 that is at least `n`. */
function nextPow2(n: number): number {
  let p = 1;
  while (p < n) p *= 2;
  return p;
}

/**
 * WGSL helpers of every q8 KV write (this file's, kernels/paged_attention.ts's and the fused
 * kernels/paged_qkv_write.ts):
 * `maxAbs4(x)`, the largest |x| of a vec4, and `quantize4(x, scale)`, 4 values to int8
 * (`round(x / scale)`, ties to even, clamped to ±127; all 0 when scale is 0) packed
 * little-endian into one u32 word, element j in byte j.
 */
export const KV_Q8_WGSL = /* wgsl */ `fn maxAbs4(x: vec4<f32>) -> f32 {
  let a = abs(x);
  return max(max(a.x, a.y), max(a.z, a.w));
}

// 4 values to int8 (ties to even, clamped to +-127), packed little-endian into one word.
fn quantize4(x: vec4<f32>, scale: f32) -> u32 {
  var qi = vec4<i32>(0);
  if (scale > 0.0) {
    qi = clamp(vec4<i32>(round(x / scale)), vec4<i32>(-127), vec4<i32>(127));
  }
  let b = bitcast<vec4<u32>>(qi) & vec4<u32>(0xffu);
  return b.x | (b.y << 8u) | (b.z << 16u) | (b.w << 24u);
}`;

/**
 * WGSL statements of a segmented max (the q8 absmax): the workgroup arrays `arrays` hold one
 * value per invocation `lid`; segments of `seg` invocations (a power of 2) reduce by a tree, so
 * after a final `workgroupBarrier()` slot `lid - c` (c = lid % seg, in scope as `c`) holds its
 * segment's max. Every invocation must run them (barriers in uniform control flow).
 */
export function kvQ8SegmentMaxWgsl(arrays: readonly string[], seg: number): string {
  const steps: string[] = [];
  for (let s = seg / 2; s >= 1; s /= 2) {
    steps.push(`  workgroupBarrier();
  if (c < ${s}u) {
${arrays.map((a) => `    ${a}[lid] = max(${a}[lid], ${a}[lid + ${s}u]);`).join("\n")}
  }`);
  }
  return steps.join("\n");
}

/**
 * WGSL for the q8 KV write of head vectors of `headDim` values (a multiple of 4, at most
 * {@linkcode KV_Q8_MAX_HEAD_DIM}).
 */
export function kvWriteQ8Wgsl(headDim: number): string {
  const HD4 = headDim / 4, SEG = nextPow2(HD4), WG = KV_WRITE_Q8_WG, VPW = WG / SEG;
  return /* wgsl */ `
// q8 KV write: a workgroup of ${WG} invocations owns ${VPW} head vector(s) (one (row t, kv head)
// of k and the same of v), a segment of ${SEG} invocations each; invocation c < headDim/4 = ${HD4}
// of a segment loads vec4 c of the vector (the others and vectors past T*nKv load 0). A tree
// reduction in workgroup memory gives each segment its absmax (K and V separately); then each
// live invocation writes its 4 int8 as one u32 word, and c == 0 writes the scale. Rows at or past
// maxSeq are dropped (never written out of the layer's range).
struct Params {
  nVec: u32,      // T * nKv: head vectors to write
  nKv: u32,       // kv heads
  maxSeq: u32,    // cache rows per layer
  layerRow: u32,  // layer * maxSeq: first cache row of the layer
  scaleBase: u32, // layers * maxSeq * nKv * headDim / 4: first word of the scale region
  gridStride: u32,// workgroups per grid row (for 2-D grids)
}
@group(0) @binding(0) var<storage, read> k: array<vec4<f32>>;         // k: [T, nKv, ${headDim}] f32
@group(0) @binding(1) var<storage, read> v: array<vec4<f32>>;         // v: [T, nKv, ${headDim}] f32
@group(0) @binding(2) var<storage, read_write> kCache: array<u32>;    // [layers, maxSeq, nKv, ${headDim}] int8 x4, then scales [layers, maxSeq, nKv] f32
@group(0) @binding(3) var<storage, read_write> vCache: array<u32>;    // same layout as kCache
@group(0) @binding(4) var<storage, read> state: array<u32>;           // state[0] = pos
@group(0) @binding(5) var<uniform> p: Params;

const HD4 = ${HD4}u;
const SEG = ${SEG}u;
const VPW = ${VPW}u;

var<workgroup> kMax: array<f32, ${WG}>; // per invocation, then per segment (at its first slot)
var<workgroup> vMax: array<f32, ${WG}>;

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
${kvQ8SegmentMaxWgsl(["kMax", "vMax"], SEG)}
  workgroupBarrier();
  let row = state[0] + vec / p.nKv;
  if (!live || row >= p.maxSeq) { return; }
  let kScale = kMax[lid - c] * (1.0 / 127.0);
  let vScale = vMax[lid - c] * (1.0 / 127.0);
  let dstVec = (p.layerRow + row) * p.nKv + vec % p.nKv;
  kCache[dstVec * HD4 + c] = quantize4(kx, kScale);
  vCache[dstVec * HD4 + c] = quantize4(vx, vScale);
  if (c == 0u) {
    kCache[p.scaleBase + dstVec] = bitcast<u32>(kScale);
    vCache[p.scaleBase + dstVec] = bitcast<u32>(vScale);
  }
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
  /** K cache: [layers, maxSeq, nKvHeads, headDim] of `dtype` (q8: then scales), {@linkcode kvCacheBytes}. */
  kCache: GPUBuffer;
  /** V cache: same layout as `kCache`. */
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
  /** Layers in the cache buffers (places the q8 scale region; checked for every dtype). */
  layers: number;
  /** Layer whose rows are written, in [0, layers). */
  layer: number;
}

/**
 * Validates the cache shape shared by the KV write and attention: positive sizes, headDim a
 * multiple of 4 (at most {@linkcode KV_Q8_MAX_HEAD_DIM} for q8), `layer` in [0, layers), and both
 * caches at least {@linkcode kvCacheBytes} long. Throws an error starting with `label`.
 */
export function checkKvCache(
  label: string,
  a: {
    dtype: KvDType;
    layers: number;
    layer: number;
    maxSeq: number;
    nKvHeads: number;
    headDim: number;
    kCache: GPUBuffer;
    vCache: GPUBuffer;
  },
): void {
  if (a.dtype !== "f32" && a.dtype !== "f16" && a.dtype !== "q8") {
    throw new Error(`${label}: unknown KV dtype "${a.dtype}" (f32, f16 or q8)`);
  }
  checkPositive(label, {
    layers: a.layers,
    maxSeq: a.maxSeq,
    nKvHeads: a.nKvHeads,
    headDim: a.headDim,
  });
  if (a.headDim % 4 !== 0) {
    throw new Error(`${label}: headDim must be a multiple of 4, got ${a.headDim}`);
  }
  if (a.dtype === "q8" && a.headDim > KV_Q8_MAX_HEAD_DIM) {
    throw new Error(
      `${label}: a q8 KV cache takes headDim <= ${KV_Q8_MAX_HEAD_DIM}, got ${a.headDim}`,
    );
  }
  if (!Number.isInteger(a.layer) || a.layer < 0 || a.layer >= a.layers) {
    throw new Error(`${label}: layer must be an integer in [0, ${a.layers}), got ${a.layer}`);
  }
  const need = kvCacheBytes(a.dtype, a.layers, a.maxSeq, a.nKvHeads, a.headDim);
  if (a.kCache.size < need || a.vCache.size < need) {
    throw new Error(
      `${label}: ${a.layers} layer(s) of ${a.dtype} cache need ${need} bytes per cache` +
        ` (kvCacheBytes), got K ${a.kCache.size} and V ${a.vCache.size}`,
    );
  }
}

/** Builds the dispatch writing `k`, `v` into the caches at rows `state[0] ..` of `layer`. */
export async function createKvWrite(gpu: Gpu, args: KvWriteArgs): Promise<Dispatch> {
  checkPositive(args.label, { T: args.T });
  checkKvCache(args.label, args);
  if (args.dtype === "f16" && !gpu.features.f16) {
    throw new Error(`${args.label}: an f16 KV cache needs the shader-f16 feature`);
  }
  if (args.dtype === "q8") return await createKvWriteQ8(gpu, args);
  const dtype = args.dtype;
  const pipeline = await gpu.pipeline(
    `kv_write.${args.dtype}.wg${KV_WRITE_WG}`,
    () => kvWriteWgsl(dtype),
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

async function createKvWriteQ8(gpu: Gpu, args: KvWriteArgs): Promise<Dispatch> {
  const hd = args.headDim, seg = nextPow2(hd / 4);
  const pipeline = await gpu.pipeline(
    `kv_write.q8.hd${hd}.seg${seg}.wg${KV_WRITE_Q8_WG}`,
    () => kvWriteQ8Wgsl(hd),
  );
  const nVec = args.T * args.nKvHeads;
  const groups = grid2d(Math.ceil(nVec / (KV_WRITE_Q8_WG / seg)));
  const params = gpu.uniform(
    `${args.label}.params`,
    new Uint32Array([
      nVec,
      args.nKvHeads,
      args.maxSeq,
      args.layer * args.maxSeq,
      args.layers * args.maxSeq * args.nKvHeads * hd / 4,
      groups[0],
      0,
      0,
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
  /** Cache element type (f16 rounds the stored values, q8 quantizes then dequantizes them). */
  dtype: KvDType;
}

/**
 * CPU reference for {@linkcode kvWriteWgsl} and {@linkcode kvWriteQ8Wgsl}: writes `src`
 * ([T, nKv, headDim]) into `cache` ([layers, maxSeq, nKv, headDim], f32 values) in place, as the
 * values the cache holds: f16-rounded for f16, quantized and dequantized per head vector for q8.
 */
export function kvWriteRef(cache: Float32Array, src: Float32Array, s: KvWriteShape): void {
  const row = s.nKvHeads * s.headDim;
  for (let t = 0; t < s.T; t++) {
    if (s.pos + t >= s.maxSeq) break;
    const dst = (s.layer * s.maxSeq + s.pos + t) * row;
    if (s.dtype === "q8") {
      const vals = src.subarray(t * row, (t + 1) * row);
      const { q, scale } = kvQuantizeRef(vals, s.nKvHeads, s.headDim);
      cache.set(kvDequantizeRef(q, scale, s.headDim), dst);
      continue;
    }
    for (let i = 0; i < row; i++) {
      const x = src[t * row + i];
      cache[dst + i] = s.dtype === "f16" ? Math.f16round(x) : x;
    }
  }
}

/** 1/127 as an f32: the q8 scale is `absmax * Q8_INV127`, one correctly rounded f32 product. */
const Q8_INV127 = Math.fround(1 / 127);

/** Rounds to the nearest integer, ties to even (WGSL `round`). */
function roundHalfEven(x: number): number {
  const r = Math.round(x);
  return r - x === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

/**
 * CPU reference for the q8 quantization of {@linkcode kvWriteQ8Wgsl}: `nVecs` head vectors of
 * `headDim` values each get `scale = absmax * f32(1/127)` (f32) and `q = round(x / scale)` (ties
 * to even, clamped to ±127; all 0 when absmax is 0). Returns q: [nVecs, headDim] int8 (the
 * cache's int8 region) and scale: [nVecs] f32 (its scale region).
 *
 * @example
 * ```ts
 * import { kvDequantizeRef, kvQuantizeRef } from "./kv_write.ts";
 * const { q, scale } = kvQuantizeRef(new Float32Array([1, -0.5, 0.25, 0]), 1, 4);
 * console.assert(q[0] === 127 && q[1] === -64 && q[3] === 0);
 * console.assert(Math.abs(kvDequantizeRef(q, scale, 4)[1] + 0.5) < 1 / 254);
 * ```
 */
export function kvQuantizeRef(
  values: Float32Array,
  nVecs: number,
  headDim: number,
): { q: Int8Array; scale: Float32Array } {
  if (values.length !== nVecs * headDim) {
    throw new Error(`kvQuantizeRef: ${values.length} values are not ${nVecs} x ${headDim}`);
  }
  const q = new Int8Array(nVecs * headDim), scale = new Float32Array(nVecs);
  for (let n = 0; n < nVecs; n++) {
    const o = n * headDim;
    let absmax = 0;
    for (let i = 0; i < headDim; i++) absmax = Math.max(absmax, Math.abs(values[o + i]));
    const s = Math.fround(absmax * Q8_INV127);
    scale[n] = s;
    if (!(s > 0)) continue;
    for (let i = 0; i < headDim; i++) {
      const r = roundHalfEven(Math.fround(values[o + i] / s));
      q[o + i] = Math.max(-127, Math.min(127, r));
    }
  }
  return { q, scale };
}

/** Dequantizes q8 head vectors: value = f32(q * scale) (what the attention kernels read). */
export function kvDequantizeRef(q: Int8Array, scale: Float32Array, headDim: number): Float32Array {
  if (q.length !== scale.length * headDim) {
    throw new Error(`kvDequantizeRef: ${q.length} values are not ${scale.length} x ${headDim}`);
  }
  const out = new Float32Array(q.length);
  for (let i = 0; i < q.length; i++) out[i] = q[i] * scale[Math.floor(i / headDim)];
  return out;
}

/**
 * The bytes of a whole q8 cache buffer holding `values` ([layers, maxSeq, nKv, headDim] f32,
 * `headDim` innermost): the int8 region, then the f32 scales; length = {@linkcode kvCacheBytes}.
 * For uploading a prepared cache (tests, benchmarks).
 */
export function kvQ8CacheImage(values: Float32Array, headDim: number): Uint8Array {
  const nVecs = values.length / headDim;
  if (!Number.isInteger(nVecs) || headDim % 4 !== 0) {
    throw new Error(`kvQ8CacheImage: ${values.length} values are not vectors of ${headDim} (x4)`);
  }
  const { q, scale } = kvQuantizeRef(values, nVecs, headDim);
  const out = new Uint8Array(q.length + scale.byteLength);
  out.set(new Uint8Array(q.buffer));
  out.set(new Uint8Array(scale.buffer), q.length);
  return out;
}
