/**
 * Activation quantization for the int8 matrix-vector path (`matvecTuning.int8x` in
 * `kernels/matmul.ts`): the T rows of x are quantized once per product to int8 in blocks of
 * {@linkcode QX_BLOCK} values with one f32 scale per block, so the product multiplies packed
 * int8 x by q8_0 / q4_0 weights with `dot4I8Packed` (four int8 products per instruction) instead
 * of unpacking every value to f32.
 *
 * Per block of 32 values v (of x, or of x·g with a folded RMSNorm):
 * `d = max|v| * f32(1/127)` (0 when that is below the smallest normal f32, 2^-126),
 * `id = 1 / d` (0 when d is 0), `q = clamp(round(v * id), -127, 127)` with `round` rounding
 * half to even (WGSL's `round`), and the block's integer sum `Σ q` (q4_0's −8 offset:
 * `Σ (n − 8) q = Σ n q − 8 Σ q`). The scale multiplies rather than divides, so `d` is the same
 * correctly rounded f32 on every device; `id` is one f32 division, correctly rounded on lavapipe
 * (where the tests pin the GPU bit for bit to {@linkcode quantizeXRef}) but allowed 2.5 ulp by
 * Vulkan, so another GPU may round a value lying within an ulp of a half the other way.
 *
 * A folded RMSNorm is split the way the float matrix-vector path splits it: the gain g[k]
 * multiplies x before it is quantized, and the row's `1 / rms(x) = 1 / sqrt(Σ x² / K + eps)` is
 * written beside the blocks for the product's epilogue to multiply by. So the quantized values
 * depend only on correctly rounded operations of x and g (no sum over the row), and the product
 * is `rinv · Σ_blocks d_w d_x Σ q_w q_x`, exactly how the float path computes
 * `(Σ x g w) / rms(x)`.
 *
 * The quantized x lives in a scratch buffer ({@linkcode int8xScratchBytes}):
 * - q region at byte 0: `i8[T, K]`, row t at byte `t K`, value k at byte k (read as u32 words:
 *   value 4i + j is byte j of word i).
 * - meta region at byte {@linkcode int8xMetaOffset}: `vec2<u32>[T, K / 32 + 1]`, per block
 *   `(bits of d as f32, Σ q as i32)`, then `(bits of rinv as f32, 0)` closing each row (rinv is
 *   1 without a norm).
 *
 * @module
 */
import type { Dispatch, Gpu } from "../engine/gpu.ts";

/** Values per block of the quantized x: one f32 scale each (the q8_0 / q4_0 block). */
export const QX_BLOCK = 32;
/** Byte alignment of the meta region: WebGPU's largest `minStorageBufferOffsetAlignment`. */
const REGION_ALIGN = 256;
/**
 * Largest invocations per quantize workgroup. On a GPU each takes one block and a row of K values
 * without a folded norm spreads over ceil(K / 32 / 64) workgroups (see {@linkcode
 * quantizeXSplits}); on a software adapter one workgroup walks the whole row (there each
 * workgroup costs more than it overlaps).
 */
const QX_MAX_WG = 64;
/** Largest invocations of a GPU's one workgroup per row (a folded RMSNorm). */
const QX_MAX_WG_ROW = 256;

const F32 = new Float32Array(1), U32 = new Uint32Array(F32.buffer);
/** f32(1 / 127): the scale is `max|v|` times this (one correctly rounded multiply). */
const INV127 = Math.fround(1 / 127);
/** The smallest normal f32, 2^-126: smaller scales become 0 (GPUs may flush subnormals). */
const MIN_NORMAL = 2 ** -126;

/** WGSL literal of the positive normal f32 `v`, exact: a hexadecimal float of its bits. */
function f32Hex(v: number): string {
  F32[0] = v;
  const e = (U32[0] >>> 23) - 127, m = (U32[0] & 0x7fffff) << 1;
  return `0x1.${m.toString(16).padStart(6, "0")}p${e}f`;
}

function checkShape(T: number, K: number, where: string): void {
  if (!Number.isInteger(T) || T < 1) throw new RangeError(`${where}: T=${T} < 1`);
  if (!Number.isInteger(K) || K < QX_BLOCK || K % QX_BLOCK) {
    throw new RangeError(`${where}: K=${K} is not a positive multiple of ${QX_BLOCK}`);
  }
}

/**
 * Byte offset of the meta region (block scales and sums, then each row's rinv) in the scratch of
 * `T` quantized rows of width `K`: the q region's `T K` bytes, rounded up to 256 so the region
 * binds on its own.
 *
 * @example
 * ```ts
 * import { int8xMetaOffset } from "./quantize_x.ts";
 * console.log(int8xMetaOffset(1, 4096), int8xMetaOffset(3, 96)); // 4096 512
 * ```
 */
export function int8xMetaOffset(T: number, K: number): number {
  checkShape(T, K, "int8xMetaOffset");
  return Math.ceil((T * K) / REGION_ALIGN) * REGION_ALIGN;
}

/**
 * Bytes of the scratch holding `T` rows of width `K` quantized: `T K` int8 values (padded to
 * 256), then 8 bytes per block of 32 and 8 per row, about 1.25 T K bytes (4096 wide: 5.1 KB a
 * row).
 *
 * @example
 * ```ts
 * import { int8xScratchBytes } from "./quantize_x.ts";
 * console.log(int8xScratchBytes(1, 4096)); // 5128 (4096 + 129 * 8)
 * ```
 */
export function int8xScratchBytes(T: number, K: number): number {
  return int8xMetaOffset(T, K) + T * (K / QX_BLOCK + 1) * 8;
}

/** T rows of x quantized (the contents of the scratch, see the module doc). */
export interface QuantizedX {
  /** Rows. */
  readonly T: number;
  /** Values per row (a multiple of 32). */
  readonly K: number;
  /** q: [T, K] int8 values. */
  readonly q: Int8Array;
  /** d: [T, K / 32] f32 scales. */
  readonly d: Float32Array;
  /** sum: [T, K / 32] Σ q of each block. */
  readonly sum: Int32Array;
  /** rinv: [T] 1 / rms(x row) with a folded RMSNorm, else 1. */
  readonly rinv: Float32Array;
}

/** WebGPU's round(): to the nearest integer, halves to even. */
function roundHalfEven(v: number): number {
  const r = Math.round(v); // halves up
  return r - v === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

/**
 * CPU reference of the quantize pass: bit for bit the q, d and sum the kernel writes (where f32
 * division is correctly rounded, see the module doc); rinv in f64 rounded to f32 (the kernel
 * sums x² in another order: compare it with a tolerance). `x` is [T, K]; `norm` is the folded
 * RMSNorm's gain [K] and epsilon.
 *
 * @example
 * ```ts
 * import { quantizeXRef } from "./quantize_x.ts";
 * const x = Float32Array.from({ length: 32 }, (_, i) => i === 0 ? 127 : 2.5);
 * const qx = quantizeXRef(x, 1, 32);
 * console.log(qx.d[0], qx.q[0], qx.q[1], qx.sum[0]); // 1 127 2 189 (2.5 rounds to even)
 * ```
 */
export function quantizeXRef(
  x: Float32Array,
  T: number,
  K: number,
  norm?: { weight: Float32Array; eps: number },
): QuantizedX {
  checkShape(T, K, "quantizeXRef");
  if (x.length < T * K) throw new RangeError(`quantizeXRef: ${x.length} values for ${T}x${K}`);
  const nbk = K / QX_BLOCK;
  const q = new Int8Array(T * K), d = new Float32Array(T * nbk), sum = new Int32Array(T * nbk);
  const rinv = new Float32Array(T).fill(1);
  const v = new Float32Array(QX_BLOCK);
  for (let t = 0; t < T; t++) {
    let ss = 0;
    for (let b = 0; b < nbk; b++) {
      let amax = 0;
      for (let i = 0; i < QX_BLOCK; i++) {
        const k = b * QX_BLOCK + i, xv = x[t * K + k];
        ss += xv * xv;
        v[i] = norm ? Math.fround(xv * norm.weight[k]) : xv;
        amax = Math.max(amax, Math.abs(v[i]));
      }
      let s = Math.fround(amax * INV127);
      if (s < MIN_NORMAL) s = 0;
      const id = s > 0 ? Math.fround(1 / s) : 0;
      let n = 0;
      for (let i = 0; i < QX_BLOCK; i++) {
        const qi = Math.min(127, Math.max(-127, roundHalfEven(Math.fround(v[i] * id))));
        q[t * K + b * QX_BLOCK + i] = qi;
        n += qi;
      }
      d[t * nbk + b] = s;
      sum[t * nbk + b] = n;
    }
    if (norm) rinv[t] = 1 / Math.sqrt(ss / K + norm.eps);
  }
  return { T, K, q, d, sum, rinv };
}

/**
 * Reads the scratch of `T` rows of width `K` (bytes from byte 0, e.g. `gpu.read(scratch)`) into
 * a {@linkcode QuantizedX}: for tests and debugging.
 *
 * @example
 * ```ts
 * import { int8xScratchBytes, readQuantizedX } from "./quantize_x.ts";
 * const qx = readQuantizedX(new ArrayBuffer(int8xScratchBytes(1, 32)), 1, 32);
 * console.log(qx.q.length, qx.d.length); // 32 1
 * ```
 */
export function readQuantizedX(bytes: ArrayBuffer, T: number, K: number): QuantizedX {
  const need = int8xScratchBytes(T, K);
  if (bytes.byteLength < need) {
    throw new RangeError(`readQuantizedX: ${bytes.byteLength} bytes, ${T}x${K} needs ${need}`);
  }
  const nbk = K / QX_BLOCK, ms = nbk + 1;
  const q = new Int8Array(bytes, 0, T * K).slice();
  const mf = new Float32Array(bytes, int8xMetaOffset(T, K), T * ms * 2);
  const mi = new Int32Array(bytes, int8xMetaOffset(T, K), T * ms * 2);
  const d = new Float32Array(T * nbk), sum = new Int32Array(T * nbk), rinv = new Float32Array(T);
  for (let t = 0; t < T; t++) {
    for (let b = 0; b < nbk; b++) {
      d[t * nbk + b] = mf[2 * (t * ms + b)];
      sum[t * nbk + b] = mi[2 * (t * ms + b) + 1];
    }
    rinv[t] = mf[2 * (t * ms + nbk)];
  }
  return { T, K, q, d, sum, rinv };
}

/**
 * Invocations of a quantize workgroup for rows of `K`: one per block, a power of 2, capped at 64
 * (or at 256 for a GPU's one workgroup per row, `row`).
 */
function quantizeWorkgroup(K: number, row = false): number {
  const cap = row ? QX_MAX_WG_ROW : QX_MAX_WG;
  let wg = 1;
  while (wg < K / QX_BLOCK && wg < cap) wg *= 2;
  return wg;
}

/**
 * Workgroups the quantize pass spreads one row of `K` values over: on a GPU one block per
 * invocation of workgroups of up to 64; with a folded RMSNorm (`norm`, whose 1 / rms needs the
 * whole row) and on a `software` adapter one. H200, one call, both interleaved over 6 rounds, µs
 * at T = 1 (one workgroup per row → split): K = 14336 without norm 7.76 → 4.36 (T = 8: 7.98 →
 * 4.56), K = 4096 4.40 → 4.36; with norm, each split workgroup summing the row's x² itself, 10.0
 * → 15.1 (K = 4096: 5.6 → 7.2), so the norm keeps one.
 *
 * @example
 * ```ts
 * import { quantizeXSplits } from "./quantize_x.ts";
 * console.log(quantizeXSplits(576), quantizeXSplits(4096), quantizeXSplits(14336)); // 1 2 7
 * console.log(quantizeXSplits(14336, true), quantizeXSplits(14336, false, true)); // 1 1
 * ```
 */
export function quantizeXSplits(K: number, software = false, norm = false): number {
  return software || norm ? 1 : Math.ceil(K / QX_BLOCK / quantizeWorkgroup(K));
}

/**
 * WGSL of the quantize pass for workgroups of `wg` invocations; `vec4` loads x as vec4 (x offset
 * a multiple of 4), `norm` multiplies by the RMSNorm gain and writes each row's rinv.
 */
export function quantizeXWgsl(s: { wg: number; vec4: boolean; norm: boolean }): string {
  const xLoad = s.vec4
    ? "return x[p.xOffset / 4u + t * (p.K / 4u) + i];"
    : `let e = p.xOffset + t * p.K + 4u * i;
  return vec4<f32>(x[e], x[e + 1u], x[e + 2u], x[e + 3u]);`;
  return /* wgsl */ `
// Quantize x to int8 blocks of ${QX_BLOCK} (kernels/quantize_x.ts): workgroup (s, t) owns blocks
// s p.span .. s p.span + p.span - 1 of row t of x (clipped at the row's end), its ${s.wg}
// invocations taking them in turn (invocation i: blocks i, i + ${s.wg}, ... of its span), each
// loading its block's 8 vec4s of x${
    s.norm ? " (times the RMSNorm gain g)" : ""
  }, writing 8 packed words of int8 and its (scale, sum). ${
    s.norm
      ? `With the norm a row is one workgroup (p.span = K / ${QX_BLOCK}): each
// invocation sums x² over its blocks, the sums are tree-reduced in workgroup memory and invocation
// 0 writes the row's 1 / rms(x).`
      : "Workgroup 0 writes the row's rinv = 1 (no norm)."
  }
struct Params {
  T: u32,       // rows
  K: u32,       // values per row (a multiple of ${QX_BLOCK})
  xOffset: u32, // element offset of x[0, 0] in the x buffer
  eps: f32,     // RMSNorm epsilon (norm only)
  span: u32,    // blocks per workgroup
}
@group(0) @binding(0) var<storage, read> x: array<${
    s.vec4 ? "vec4<f32>" : "f32"
  }>; // x: [T, K] f32 at xOffset
@group(0) @binding(1) var<storage, read_write> xq: array<vec4<u32>>; // xq: i8[T, K], 16 per vec4
@group(0) @binding(2) var<storage, read_write> xm: array<vec2<u32>>; // xm: [T, K / ${QX_BLOCK} + 1] (d, Σq), then (rinv, 0)
@group(0) @binding(3) var<uniform> p: Params;
${
    s.norm
      ? `@group(0) @binding(4) var<storage, read> g: array<vec4<f32>>; // g: [K] f32 RMSNorm weight
var<workgroup> red: array<f32, ${s.wg}>; // red: [${s.wg}] partial sums of x²`
      : ""
  }
const INV127 = ${f32Hex(INV127)}; // f32(1 / 127)
const MIN_NORMAL = ${f32Hex(MIN_NORMAL)}; // 2^-126

// Values 4i .. 4i + 3 of row t.
fn xv(t: u32, i: u32) -> vec4<f32> {
  ${xLoad}
}

@compute @workgroup_size(${s.wg})
fn main(@builtin(workgroup_id) wg: vec3u, @builtin(local_invocation_index) lid: u32) {
  let t = wg.y;
  let nbk = p.K / ${QX_BLOCK}u;
  let b1 = min(wg.x * p.span + p.span, nbk);
  var ss = 0.0;
  for (var b = wg.x * p.span + lid; b < b1; b += ${s.wg}u) {
    var v: array<vec4<f32>, 8>;
    var amax = 0.0;
    for (var i = 0u; i < 8u; i++) {
      let a = xv(t, 8u * b + i);
${s.norm ? "      ss += dot(a, a);\n" : ""}      let s = a${s.norm ? " * g[8u * b + i]" : ""};
      v[i] = s;
      let m = abs(s);
      amax = max(amax, max(max(m.x, m.y), max(m.z, m.w)));
    }
    let dRaw = amax * INV127;
    let d = select(0.0, dRaw, dRaw >= MIN_NORMAL);
    let id = select(0.0, 1.0 / d, d > 0.0);
    var sum = 0;
    var w: array<u32, 8>;
    for (var i = 0u; i < 8u; i++) {
      let qi = vec4<i32>(clamp(round(v[i] * id), vec4<f32>(-127.0), vec4<f32>(127.0)));
      sum += qi.x + qi.y + qi.z + qi.w;
      w[i] = pack4xI8(qi);
    }
    let o = 2u * (t * nbk + b);
    xq[o] = vec4<u32>(w[0], w[1], w[2], w[3]);
    xq[o + 1u] = vec4<u32>(w[4], w[5], w[6], w[7]);
    xm[t * (nbk + 1u) + b] = vec2<u32>(bitcast<u32>(d), bitcast<u32>(sum));
  }
${
    s.norm
      ? `  red[lid] = ss;
  workgroupBarrier();
  for (var h = ${s.wg >> 1}u; h > 0u; h >>= 1u) {
    if (lid < h) { red[lid] += red[lid + h]; }
    workgroupBarrier();
  }
  if (lid == 0u) {
    xm[t * (nbk + 1u) + nbk] = vec2<u32>(bitcast<u32>(inverseSqrt(red[0] / f32(p.K) + p.eps)), 0u);
  }`
      : `  if (wg.x == 0u && lid == 0u) { xm[t * (nbk + 1u) + nbk] = vec2<u32>(bitcast<u32>(1.0), 0u); }`
  }
}
`;
}

/** Buffers and sizes for {@linkcode createQuantizeX}. */
export interface QuantizeXArgs {
  /** Label of the dispatch and its params, e.g. `target.L3.ffn.down.quantize_x`. */
  label: string;
  /** x: [T, K] f32 rows, starting at element `xOffset`. */
  x: GPUBuffer;
  /** Element offset of x[0, 0] in `x`; default 0. */
  xOffset?: number;
  /** Rows. */
  T: number;
  /** Values per row: a multiple of {@linkcode QX_BLOCK}. */
  K: number;
  /** The product's folded RMSNorm: gain g: [K] f32 and epsilon. */
  norm?: { weight: GPUBuffer; eps: number };
  /** The scratch written: at least {@linkcode int8xScratchBytes}(T, K) bytes, STORAGE usage. */
  out: GPUBuffer;
}

/**
 * Builds the one dispatch ({@linkcode quantizeXSplits} workgroups per row) quantizing the T rows
 * of x into `out`.
 *
 * @example
 * ```ts ignore
 * const out = gpu.buffer("q.x8", int8xScratchBytes(T, K), GPUBufferUsage.STORAGE);
 * const d = await createQuantizeX(gpu, { label: "L0.q.quantize_x", x, T, K, out });
 * await gpu.run("quantize", [d]);
 * ```
 */
export async function createQuantizeX(gpu: Gpu, args: QuantizeXArgs): Promise<Dispatch> {
  const { T, K, label } = args;
  const xOffset = args.xOffset ?? 0;
  checkShape(T, K, label);
  if (T > gpu.limits.maxComputeWorkgroupsPerDimension) {
    throw new RangeError(`${label}: T=${T} rows exceed the workgroups of one dimension`);
  }
  const splits = quantizeXSplits(K, gpu.software, !!args.norm);
  if (splits > gpu.limits.maxComputeWorkgroupsPerDimension) {
    throw new RangeError(`${label}: K=${K} needs ${splits} workgroups per row, past the limit`);
  }
  const need = int8xScratchBytes(T, K);
  if (args.out.size < need) {
    throw new RangeError(`${label}: scratch of ${args.out.size} bytes, ${T}x${K} needs ${need}`);
  }
  const wg = quantizeWorkgroup(K, !!args.norm && !gpu.software);
  const vec4 = xOffset % 4 === 0, norm = !!args.norm;
  const pipeline = await gpu.pipeline(
    `quantize_x.wg${wg}.vec${vec4 ? 4 : 1}.norm${+norm}`,
    () => quantizeXWgsl({ wg, vec4, norm }),
  );
  const raw = new Uint32Array([T, K, xOffset, 0, Math.ceil(K / QX_BLOCK / splits), 0, 0, 0]);
  new Float32Array(raw.buffer)[3] = args.norm?.eps ?? 0;
  const meta = int8xMetaOffset(T, K);
  return {
    label,
    pipeline,
    bindGroup: gpu.bindGroup(label, pipeline, [
      args.x,
      { buffer: args.out, offset: 0, size: T * K },
      { buffer: args.out, offset: meta, size: need - meta },
      gpu.uniform(`${label}.params`, raw),
      args.norm?.weight,
    ]),
    workgroups: [splits, T, 1],
  };
}
