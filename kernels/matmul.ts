/**
 * Linear layer: `y[T, N] = x[T, K] · W[N, K]^T (+ bias[N]) (+ y_old[T, N] when accumulating)`.
 *
 * Two paths, chosen by {@linkcode matmulPath}:
 * - "matvec" (T ≤ {@linkcode MATVEC_MAX_T}: decode and verify): one workgroup owns one output
 *   column n (one weight row) and loops over all T activation rows inside, so each weight byte is
 *   read once for the whole batch. This is what makes verifying k+1 draft tokens cost about as
 *   much as decoding one.
 * - "tiled" (prefill): a workgroup owns a 64x64 output tile and stages x and W tiles of depth 16
 *   in workgroup memory.
 *
 * Both paths take weights in every {@linkcode WeightFormat} and dequantize them inside the kernel
 * (`kernels/qformats.ts` holds the layouts and the WGSL decoders); for block formats K must be a
 * multiple of the block.
 *
 * @module
 */
import { type Dispatch, type Gpu, grid2d } from "../engine/gpu.ts";
import {
  formatBlock,
  formatGroups,
  isBlockFormat,
  type WeightFormat,
  weightWgsl,
} from "./qformats.ts";

/** Storage format of a weight matrix (an alias of {@linkcode WeightFormat}). */
export type WeightDType = WeightFormat;

/** Which kernel computes a product. */
export type MatmulPath = "matvec" | "tiled";

/** Largest T (activation rows) served by the matrix-vector path. */
export const MATVEC_MAX_T = 16;
/** Invocations per workgroup in the matrix-vector path (they stride over K together). */
export const MATVEC_WG = 64;
/** Output tile of the tiled path: rows of x (T) per workgroup. */
export const TILE_M = 64;
/** Output tile of the tiled path: rows of W (N) per workgroup. */
export const TILE_N = 64;
/** Depth (K) of the tiles staged in workgroup memory. */
export const TILE_K = 16;
/** Each invocation of the tiled path computes a MICRO x MICRO block of outputs. */
const MICRO = 4;
const TILED_WG_X = TILE_N / MICRO; // 16
const TILED_WG_Y = TILE_M / MICRO; // 16

/**
 * The one rule choosing the kernel: the matrix-vector path for T ≤ {@linkcode MATVEC_MAX_T}
 * (decode, draft step, verify), the tiled path above (prefill).
 *
 * @example
 * ```ts
 * import { matmulPath } from "./matmul.ts";
 * console.log(matmulPath(1), matmulPath(128)); // "matvec" "tiled"
 * ```
 */
export function matmulPath(T: number): MatmulPath {
  return T <= MATVEC_MAX_T ? "matvec" : "tiled";
}

/** Specialization values baked into a matmul shader (all part of its pipeline key). */
interface MatmulSpec {
  dtype: WeightFormat;
  bias: boolean;
  accumulate: boolean;
}

function header(s: MatmulSpec): string {
  const wType = s.dtype === "f16" ? "f16" : "f32";
  return `${s.dtype === "f16" ? "enable f16;\n" : ""}
struct Params {
  T: u32,       // activation rows
  K: u32,       // input width
  N: u32,       // output width
  xOffset: u32, // element offset of x[0, 0] in the x buffer
  yOffset: u32, // element offset of y[0, 0] in the y buffer
  vecK: u32,    // K / 4 (matvec vec4 path only)
  nb: u32,      // blocks of W: N * K / block (block formats only)
}
@group(0) @binding(3) var<uniform> p: Params;
@group(0) @binding(2) var<storage, read_write> y: array<f32>; // y: [T, N] f32 at yOffset
${s.bias ? "@group(0) @binding(4) var<storage, read> bias: array<f32>; // bias: [N] f32" : ""}
alias WT = ${wType};

// y[t, n] = acc (+ bias[n]) (+ y[t, n]).
fn store(t: u32, n: u32, acc: f32) {
  let i = p.yOffset + t * p.N + n;
  var v = acc;
  ${s.bias ? "v += bias[n];" : ""}
  ${s.accumulate ? "v += y[i];" : ""}
  y[i] = v;
}
`;
}

/** Up to this many partial sums per invocation the matvec path tree-reduces them. */
const TREE_MAX_PARTIALS = 4;

/**
 * Output columns (weight rows) one matrix-vector workgroup owns for `T` activation rows: 1 for
 * decode, more when T grows so that each x load serves several weight rows.
 */
export function matvecRows(T: number): number {
  return T <= 2 ? 1 : 4;
}

/**
 * WGSL of the matrix-vector path for `T` rows and `R` = {@linkcode matvecRows}(T) output columns
 * per workgroup. With `vec4` (K % 4 == 0 and xOffset % 4 == 0) x and W are loaded as vec4;
 * otherwise as scalars, so any K works.
 */
export function matvecWgsl(s: MatmulSpec & { T: number; vec4: boolean }): string {
  if (isBlockFormat(s.dtype)) return matvecBlockWgsl(s);
  const T = s.T, R = matvecRows(T), P = T * R, S = MATVEC_WG + 1;
  const [len, xi, xStart] = s.vec4
    ? ["p.vecK", "xBase", "p.xOffset / 4u"]
    : ["p.K", "xBase", "p.xOffset"];
  const conv = s.vec4 ? "vec4<f32>" : "f32";
  const mul = (a: string, b: string) => s.vec4 ? `dot(${a}, ${b})` : `${a} * ${b}`;
  const body = [
    ...Array.from({ length: R }, (_, r) => `    let w${r} = ${conv}(w[wRow${r} + k]);`),
    ...Array.from({ length: T }, (_, t) =>
      `    { let xv = x[${xi} + ${t}u * ${len} + k]; ` +
      Array.from({ length: R }, (_, r) => `acc${t}_${r} += ${mul(`w${r}`, "xv")};`).join(" ") +
      " }"),
  ].join("\n");
  const el = s.vec4 ? "vec4<f32>" : "f32";
  const wel = s.vec4 ? "vec4<WT>" : "WT";
  return /* wgsl */ `${header(s)}
// Matrix-vector path, T = ${T}: one workgroup of ${MATVEC_WG} invocations owns ${R} output
// column(s) n0 .. n0+${R - 1} (weight rows). Invocation i loads ${s.vec4 ? "vec4 " : ""}elements
// i, i + ${MATVEC_WG}, ... of those weight rows once and multiplies them into all ${T} activation
// rows (each x load serves ${R} weight rows), keeping ${P} partial sums in registers. The partials
// go to workgroup memory [${P}, ${S}] (padded against bank conflicts) and are ${reduceHow(T)}.
// The loop bound masks ragged K; weight rows past N are clamped when loaded and not stored;
// workgroups past N (2-D grid rounding) return.
@group(0) @binding(0) var<storage, read> x: array<${el}>;  // x: [T, K] f32 at xOffset
@group(0) @binding(1) var<storage, read> w: array<${wel}>; // w: [N, K] ${s.dtype}

var<workgroup> red: array<f32, ${P * S}>; // red: [T*R, ${S}] partial sums

@compute @workgroup_size(${MATVEC_WG})
fn main(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
        @builtin(local_invocation_index) lid: u32) {
  let n0 = (wg.y * nwg.x + wg.x) * ${R}u;
  if (n0 >= p.N) { return; } // uniform per workgroup: safe before the barrier
  let xBase = ${xStart};
${
    Array.from({ length: R }, (_, r) => `  let wRow${r} = min(n0 + ${r}u, p.N - 1u) * ${len};`)
      .join("\n")
  }
${unrolled(P, (e) => `  var acc${Math.floor(e / R)}_${e % R} = 0.0;`)}
  for (var k = lid; k < ${len}; k += ${MATVEC_WG}u) {
${body}
  }
${reduceWgsl(T)}
}
`;
}

/** How {@linkcode reduceWgsl} combines the partial sums (for the shader's opening comment). */
function reduceHow(T: number): string {
  const P = T * matvecRows(T);
  return P <= TREE_MAX_PARTIALS
    ? "tree-reduced"
    : `summed row by row\n// (invocation j < ${P} sums row j)`;
}

/**
 * The matvec epilogue: partial sums `acc{t}_{r}` of each invocation go to workgroup memory and
 * are reduced over the workgroup, then stored to y[t, n0 + r].
 */
function reduceWgsl(T: number): string {
  const R = matvecRows(T), P = T * R, S = MATVEC_WG + 1;
  // Few partials: tree-reduce them (log2 steps). Many: invocation j sums partial row j serially.
  const tree = `  for (var s = ${MATVEC_WG / 2}u; s > 0u; s >>= 1u) {
    if (lid < s) {
${unrolled(P, (e) => `      red[${e * S}u + lid] += red[${e * S}u + lid + s];`)}
    }
    workgroupBarrier();
  }
  if (lid < ${P}u && n0 + lid % ${R}u < p.N) { store(lid / ${R}u, n0 + lid % ${R}u, red[lid * ${S}u]); }`;
  const serial = `  for (var j = lid; j < ${P}u; j += ${MATVEC_WG}u) {
    var sum = 0.0;
    for (var i = 0u; i < ${MATVEC_WG}u; i++) { sum += red[j * ${S}u + i]; }
    let n = n0 + j % ${R}u;
    if (n < p.N) { store(j / ${R}u, n, sum); }
  }`;
  return `${unrolled(P, (e) => `  red[${e * S}u + lid] = acc${Math.floor(e / R)}_${e % R};`)}
  workgroupBarrier();
${P <= TREE_MAX_PARTIALS ? tree : serial}`;
}

/**
 * WGSL of the matrix-vector path for a block format: the same workgroup shape and reduction as
 * {@linkcode matvecWgsl}, but the K loop walks the weight rows in decode units (one u32 of
 * quants each, see `wUnit` in `kernels/qformats.ts`) and dequantizes in registers.
 */
function matvecBlockWgsl(s: MatmulSpec & { T: number; vec4: boolean }): string {
  const T = s.T, R = matvecRows(T), P = T * R, S = MATVEC_WG + 1;
  const G = formatGroups(s.dtype);
  const xLoad = s.vec4
    ? "return x[p.xOffset / 4u + t * p.vecK + k4];"
    : `let i = p.xOffset + t * p.K + 4u * k4;
  return vec4<f32>(x[i], x[i + 1u], x[i + 2u], x[i + 3u]);`;
  const groups = Array.from({ length: G }, (_, g) =>
    `    { let k4 = kx + wUnitK4(j, ${g}u);
${
      unrolled(T, (t) =>
        `      { let xv = xq(${t}u, k4); ` +
        Array.from({ length: R }, (_, r) => `acc${t}_${r} += dot(d${r}[${g}], xv);`).join(" ") +
        " }")
    }
    }`).join("\n");
  return /* wgsl */ `${header(s)}${weightWgsl(s.dtype)}
// Matrix-vector path, ${s.dtype}, T = ${T}: one workgroup of ${MATVEC_WG} invocations owns ${R}
// output column(s) n0 .. n0+${R - 1} (weight rows). A row is K / W_BLOCK blocks of W_UNITS decode
// units; invocation i decodes units i, i + ${MATVEC_WG}, ... of each of its rows (one u32 of quants
// per unit: consecutive invocations load consecutive words, so every quant byte is read once per
// workgroup, coalesced; the block's scales come from cache) into W_GROUPS vec4s, and multiplies
// them into all ${T} activation rows (each x load serves ${R} weight rows), keeping ${P} partial
// sums in registers. The partials go to workgroup memory [${P}, ${S}] and are ${reduceHow(T)}.
// K is a whole number of blocks (checked on the host), so units never straddle K; weight rows
// past N are clamped when loaded and not stored; workgroups past N (2-D grid rounding) return.
@group(0) @binding(0) var<storage, read> x: array<${
    s.vec4 ? "vec4<f32>" : "f32"
  }>; // x: [T, K] f32 at xOffset

var<workgroup> red: array<f32, ${P * S}>; // red: [T*R, ${S}] partial sums

// x[t, 4 k4 .. 4 k4 + 3]
fn xq(t: u32, k4: u32) -> vec4<f32> {
  ${xLoad}
}

@compute @workgroup_size(${MATVEC_WG})
fn main(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
        @builtin(local_invocation_index) lid: u32) {
  wInit(lid);
  workgroupBarrier();
  let n0 = (wg.y * nwg.x + wg.x) * ${R}u;
  if (n0 >= p.N) { return; } // uniform per workgroup: safe before the barrier
  let bpr = p.K / W_BLOCK; // blocks per weight row
${unrolled(R, (r) => `  let b0_${r} = min(n0 + ${r}u, p.N - 1u) * bpr;`)}
${unrolled(P, (e) => `  var acc${Math.floor(e / R)}_${e % R} = 0.0;`)}
  for (var u = lid; u < bpr * W_UNITS; u += ${MATVEC_WG}u) {
    let kb = u / W_UNITS;
    let j = u % W_UNITS;
    let kx = kb * (W_BLOCK / 4u); // vec4 index of the block's first value in an x row
${unrolled(R, (r) => `    let d${r} = wUnit(b0_${r} + kb, j, p.nb);`)}
${groups}
  }
${reduceWgsl(T)}
}
`;
}

/** `n` generated source lines (the micro-tile is unrolled so accumulators stay in registers). */
function unrolled(n: number, line: (i: number) => string): string {
  return Array.from({ length: n }, (_, i) => line(i)).join("\n");
}

/**
 * WGSL of the tiled path (any T, K, N; edges masked when staging tiles and when storing). Block
 * formats dequantize while staging the W tile: each invocation decodes 4 consecutive k of one
 * weight row (`w4` of `kernels/qformats.ts`).
 */
export function tiledWgsl(s: MatmulSpec): string {
  const loads = (TILE_M * TILE_K) / (TILED_WG_X * TILED_WG_Y);
  const block = isBlockFormat(s.dtype);
  // W staging: float formats load element by element with the x tile; block formats decode
  // one vec4 per invocation (TILE_N * TILE_K / 4 == invocations, K a multiple of TILE_K).
  const wScalar = `      var wv = 0.0;
      if (n0 + row < p.N && k < p.K) { wv = f32(w[(n0 + row) * p.K + k]); }
      ws[kk * ${TILE_N}u + row] = wv;
`;
  const wBlock = `    {
      let row = lid / ${TILE_K / 4}u;
      let kk = (lid % ${TILE_K / 4}u) * 4u;
      var wv = vec4<f32>(0.0);
      if (n0 + row < p.N) { wv = w4((n0 + row) * p.K + k0 + kk, p.nb); }
${unrolled(4, (c) => `      ws[(kk + ${c}u) * ${TILE_N}u + row] = wv[${c}];`)}
    }
`;
  return /* wgsl */ `${header(s)}
// Tiled path: workgroup (bx, by) owns y[by*${TILE_M} .. +${TILE_M}, bx*${TILE_N} .. +${TILE_N}].
// For each depth-${TILE_K} slab of K, its ${TILED_WG_X * TILED_WG_Y} invocations stage
// a ${TILE_M}x${TILE_K} tile of x and a ${TILE_N}x${TILE_K} tile of W (${
    block ? "dequantized from " + s.dtype + ", a vec4 of one row per invocation" : s.dtype
  }) in workgroup memory
// (${loads} elements each, K fastest so global loads coalesce; stored k-major so the inner loop
// reads consecutive addresses). Elements past T, N or K are staged as 0. Invocation (tx, ty)
// accumulates (in unrolled registers) the ${MICRO}x${MICRO} outputs (ty + ${TILED_WG_Y}i, tx + ${TILED_WG_X}j); stores
// past T or N are masked.
@group(0) @binding(0) var<storage, read> x: array<f32>; // x: [T, K] f32 at xOffset
${
    block
      ? weightWgsl(s.dtype)
      : `@group(0) @binding(1) var<storage, read> w: array<WT>;  // w: [N, K] ${s.dtype}`
  }

var<workgroup> xs: array<f32, ${TILE_M * TILE_K}>; // xs: [${TILE_K}, ${TILE_M}] (k-major)
var<workgroup> ws: array<f32, ${TILE_N * TILE_K}>; // ws: [${TILE_K}, ${TILE_N}] (k-major)

@compute @workgroup_size(${TILED_WG_X}, ${TILED_WG_Y})
fn main(@builtin(workgroup_id) wg: vec3u, @builtin(local_invocation_id) l: vec3u,
        @builtin(local_invocation_index) lid: u32) {
${block ? "  wInit(lid);\n  workgroupBarrier();\n" : ""}  let m0 = wg.y * ${TILE_M}u;
  let n0 = wg.x * ${TILE_N}u;
${unrolled(MICRO * MICRO, (e) => `  var acc${Math.floor(e / MICRO)}${e % MICRO} = 0.0;`)}
  for (var k0 = 0u; k0 < p.K; k0 += ${TILE_K}u) {
    for (var r = 0u; r < ${loads}u; r++) {
      let e = lid + r * ${TILED_WG_X * TILED_WG_Y}u;
      let row = e / ${TILE_K}u;
      let kk = e % ${TILE_K}u;
      let k = k0 + kk;
      var xv = 0.0;
      if (m0 + row < p.T && k < p.K) { xv = x[p.xOffset + (m0 + row) * p.K + k]; }
      xs[kk * ${TILE_M}u + row] = xv;
${block ? "" : wScalar}    }
${block ? wBlock : ""}    workgroupBarrier();
    for (var kk = 0u; kk < ${TILE_K}u; kk++) {
${unrolled(MICRO, (i) => `      let a${i} = xs[kk * ${TILE_M}u + l.y + ${i * TILED_WG_Y}u];`)}
${unrolled(MICRO, (j) => `      let b${j} = ws[kk * ${TILE_N}u + l.x + ${j * TILED_WG_X}u];`)}
${
    unrolled(MICRO * MICRO, (e) => {
      const i = Math.floor(e / MICRO), j = e % MICRO;
      return `      acc${i}${j} = fma(a${i}, b${j}, acc${i}${j});`;
    })
  }
    }
    workgroupBarrier();
  }
${
    unrolled(MICRO * MICRO, (e) => {
      const i = Math.floor(e / MICRO), j = e % MICRO;
      return `  if (m0 + l.y + ${i * TILED_WG_Y}u < p.T && n0 + l.x + ${j * TILED_WG_X}u < p.N) {
    store(m0 + l.y + ${i * TILED_WG_Y}u, n0 + l.x + ${j * TILED_WG_X}u, acc${i}${j});
  }`;
    })
  }
}
`;
}

/** Buffers, sizes and options for {@linkcode createMatmul}. */
export interface MatmulArgs {
  /** Label of the dispatch and its params, e.g. `target.L3.mlp.down`. */
  label: string;
  /** x: [T, K] f32 activations, starting at element `xOffset`. */
  x: GPUBuffer;
  /** Element offset of x[0, 0] in `x` (to bind a row range of a larger buffer); default 0. */
  xOffset?: number;
  /** w: [N, K] weights (out, in), row-major, in `dtype`'s GPU layout (`encodeWeights`). */
  w: GPUBuffer;
  /**
   * Format of `w` (see `kernels/qformats.ts`); "f16" needs the `shader-f16` feature; block
   * formats need K to be a multiple of their block.
   */
  dtype: WeightFormat;
  /** Optional bias: [N] f32 (Qwen2 Q/K/V). */
  bias?: GPUBuffer;
  /** y: [T, N] f32 output, starting at element `yOffset`. Must not alias `x`. */
  y: GPUBuffer;
  /** Element offset of y[0, 0] in `y`; default 0. */
  yOffset?: number;
  /** Add into y instead of overwriting it (fused residual add): y += x·W^T (+ bias). */
  accumulate?: boolean;
  /** Activation rows (baked into the dispatch). */
  T: number;
  /** Input width. */
  K: number;
  /** Output width. */
  N: number;
  /** Force a path (tests, benchmarks); default {@linkcode matmulPath}(T). */
  path?: MatmulPath;
}

/**
 * Builds the dispatch for `y = x · W^T (+ bias) (+ y)`: pipeline, params and bind group are made
 * once; encode the returned {@linkcode Dispatch} as often as needed.
 *
 * @example
 * ```ts ignore
 * const d = await createMatmul(gpu, { label: "L0.q", x, w, dtype: "f16", y, T: 1, K: 576, N: 576 });
 * await gpu.run("step", [d]);
 * ```
 */
export async function createMatmul(gpu: Gpu, args: MatmulArgs): Promise<Dispatch> {
  const { T, K, N, dtype } = args;
  const xOffset = args.xOffset ?? 0, yOffset = args.yOffset ?? 0;
  for (const [name, v] of [["T", T], ["K", K], ["N", N]] as const) {
    if (!Number.isInteger(v) || v < 1) throw new RangeError(`${args.label}: ${name}=${v} < 1`);
  }
  if (dtype === "f16" && !gpu.features.f16) {
    throw new RangeError(`${args.label}: f16 weights need the shader-f16 feature`);
  }
  const block = formatBlock(dtype);
  if (K % block !== 0) {
    throw new RangeError(
      `${args.label}: K=${K} is not a multiple of the ${dtype} block size ${block}`,
    );
  }
  if (block > 1 && N * K > 0xffffffff) {
    throw new RangeError(`${args.label}: ${N}x${K} ${dtype} weights exceed 2^32 values`);
  }
  const path = args.path ?? matmulPath(T);
  const spec: MatmulSpec = { dtype, bias: !!args.bias, accumulate: !!args.accumulate };
  const specKey = `${dtype}.bias${+spec.bias}.acc${+spec.accumulate}`;
  let pipeline: GPUComputePipeline;
  let workgroups: [number, number, number];
  if (path === "matvec") {
    if (T > MATVEC_MAX_T) {
      throw new RangeError(`${args.label}: matvec path serves T <= ${MATVEC_MAX_T}, got ${T}`);
    }
    const vec4 = K % 4 === 0 && xOffset % 4 === 0;
    pipeline = await gpu.pipeline(
      `matmul.matvec.${specKey}.T${T}.r${matvecRows(T)}.vec${vec4 ? 4 : 1}.wg${MATVEC_WG}`,
      () => matvecWgsl({ ...spec, T, vec4 }),
    );
    workgroups = grid2d(Math.ceil(N / matvecRows(T)), gpu.limits.maxComputeWorkgroupsPerDimension);
  } else {
    pipeline = await gpu.pipeline(
      `matmul.tiled.${specKey}.m${TILE_M}.n${TILE_N}.k${TILE_K}.r${MICRO}`,
      () => tiledWgsl(spec),
    );
    workgroups = [Math.ceil(N / TILE_N), Math.ceil(T / TILE_M), 1];
    const max = gpu.limits.maxComputeWorkgroupsPerDimension;
    if (workgroups[0] > max || workgroups[1] > max) {
      throw new RangeError(`${args.label}: tiled grid ${workgroups} exceeds ${max} per dimension`);
    }
  }
  const params = gpu.uniform(
    `${args.label}.params`,
    new Uint32Array([T, K, N, xOffset, yOffset, K >>> 2, block > 1 ? (N * K) / block : 0, 0]),
  );
  const buffers = [args.x, args.w, args.y, params];
  if (args.bias) buffers.push(args.bias);
  return {
    label: args.label,
    pipeline,
    bindGroup: gpu.bindGroup(args.label, pipeline, buffers),
    workgroups,
  };
}

/**
 * CPU reference: `y = x · W^T (+ bias) (+ yOld)` in f64 accumulation.
 *
 * @example
 * ```ts
 * import { matmulRef } from "./matmul.ts";
 * // x = [[1, 2]], W = [[3, 4], [5, 6]] -> y = [[11, 17]]
 * const y = matmulRef(new Float32Array([1, 2]), new Float32Array([3, 4, 5, 6]), 1, 2, 2);
 * console.log([...y]); // [11, 17]
 * ```
 */
export function matmulRef(
  x: Float32Array,
  w: Float32Array,
  T: number,
  K: number,
  N: number,
  bias?: Float32Array,
  yOld?: Float32Array,
): Float32Array {
  const y = new Float32Array(T * N);
  for (let t = 0; t < T; t++) {
    for (let n = 0; n < N; n++) {
      let s = 0;
      for (let k = 0; k < K; k++) s += x[t * K + k] * w[n * K + k];
      if (bias) s += bias[n];
      if (yOld) s += yOld[t * N + n];
      y[t * N + n] = s;
    }
  }
  return y;
}
