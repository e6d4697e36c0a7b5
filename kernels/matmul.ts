/**
 * Linear layer: `y[T, N] = x[T, K] · W[N, K]^T (+ bias[N]) (+ y_old[T, N] when accumulating)`,
 * with two fusions the forward pass uses:
 * - `norm`: RMSNorm of the x rows folded into the product, `x ← x / rms(x) * g`. The product
 *   multiplies each weight by g[k] as it is loaded and accumulates Σx² beside Σx·g·w, so the
 *   normalized x is never written: `y = (Σ_k x g w) / sqrt(Σ_k x² / K + eps)`.
 * - `swiglu`: the weight rows are (gate, up) pairs interleaved (row 2i = gate_i, row 2i + 1 =
 *   up_i), and the output is `y[t, i] = silu(gate) * up`, width N / 2.
 *
 * Three paths, chosen by {@linkcode matmulPath}:
 * - "matvec" (T ≤ {@linkcode MATVEC_MAX_T}, 8 for block formats: decode and verify): a workgroup
 *   owns R output columns (weight rows) and loops over all T activation rows inside, so each weight
 *   byte is read once
 *   for the whole batch. This is what makes verifying k+1 draft tokens cost about as much as
 *   decoding one. R and the lanes per row grow with T ({@linkcode matvecShape}).
 * - "chunked" (T ≤ {@linkcode MATVEC_CHUNKED_MAX_T}: token trees, batched verifies, short
 *   prompts): matvec dispatches over consecutive chunks of at most 17 rows, 8 for block formats
 *   ({@linkcode matvecChunks}, {@linkcode matvecMaxT}), each reading the weights once. Measured
 *   on the H200 (pycode target's down projection, 19 tree rows): the tiled path took 22x a one-row
 *   product, since 64-column tiles of its 576 outputs make 9 workgroups for 132 SMs; two chunks
 *   (10 + 9 rows) take 2.4x.
 * - "tiled" (prefill): a workgroup owns a 64x64 output tile and stages x and W tiles of depth 16
 *   in workgroup memory.
 *
 * {@linkcode createLinear} builds the dispatches of any path; {@linkcode createMatmul} the one
 * dispatch of a matvec (T ≤ 17) or tiled product.
 *
 * Both paths take weights in every {@linkcode WeightFormat} and dequantize them inside the kernel
 * (`kernels/qformats.ts` holds the layouts and the WGSL decoders); for block formats K must be a
 * multiple of the block.
 *
 * Int8 activations ({@linkcode int8xFor}, `matvecTuning.int8x`): q4_0 products on the
 * matrix-vector and chunked paths quantize x once to int8 blocks of 32 (`kernels/quantize_x.ts`)
 * and multiply with `dot4I8Packed` ({@linkcode matvecInt8Wgsl}, reference
 * {@linkcode int8MatmulRef}), as llama.cpp's "mmvq" kernels do. On by default for q4_0 where the
 * runtime has `packed_4x8_integer_dot_product`: a dummy llama-3.1-8b q4_0 decoded 198 → 268 tok/s
 * on an H200 (+35%), and through the decode path (bench/quant.ts, pycode target, 1022 tokens) PPL
 * went 14.8543 → 14.8450 and the KL against f16 0.01468 → 0.01496 (2% of what q4_0 weights
 * already cost), top-1 93.15% both. q8_0 stays on float x by default: 219 → 203 tok/s (slower);
 * `matvecTuning.int8x = true` turns it on for both formats, `false` off.
 *
 * @module
 */
import { type Dispatch, type Gpu, grid2d } from "../engine/gpu.ts";
import {
  formatBlock,
  formatFactoring,
  formatGroups,
  formatUnitValues,
  isBlockFormat,
  weightAlign,
  type WeightFormat,
  weightWgsl,
} from "./qformats.ts";
import {
  createQuantizeX,
  int8xMetaOffset,
  int8xScratchBytes,
  type QuantizedX,
  QX_BLOCK,
} from "./quantize_x.ts";
import { rmsnormRef } from "./rmsnorm.ts";
import { swigluRef } from "./swiglu.ts";

/** Storage format of a weight matrix (an alias of {@linkcode WeightFormat}). */
export type WeightDType = WeightFormat;

/** Which kernel computes a product. */
export type MatmulPath = "matvec" | "chunked" | "tiled";

/** Largest T (activation rows) of one matrix-vector dispatch: a verify of 16 drafts + 1. */
export const MATVEC_MAX_T = 17;
/**
 * Largest T of one matrix-vector dispatch over a block format (q8_0, q4_0, q4_k, ...): past 8
 * rows the accumulators of every row and the decoded weights spill. Measured on the H200
 * (`bench/gpu.ts --shapes`, 4096→14336): q4_0 T = 8 181 µs, T = 17 4287 µs in one dispatch (1001
 * with the best split), so 17 rows as 9 + 8 cost about 2 x 181; q8_0 110 and 2101 µs, q4_k 250 and
 * 3281 µs.
 */
export const MATVEC_BLOCK_MAX_T = 8;
/** Largest T served by matrix-vector dispatches in chunks of ≤ 17 (8) rows: a whole token tree. */
export const MATVEC_CHUNKED_MAX_T = 64;
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
 * The widest matrix-vector dispatch for weights in `dtype`: {@linkcode MATVEC_MAX_T} rows for
 * f32 and f16, {@linkcode MATVEC_BLOCK_MAX_T} for block formats.
 */
export function matvecMaxT(dtype: WeightFormat): number {
  return isBlockFormat(dtype) ? matvecTuning.blockMaxT : MATVEC_MAX_T;
}

/**
 * The one rule choosing the kernel for T rows of weights in `dtype` (default f16): the
 * matrix-vector path up to {@linkcode matvecMaxT} rows (decode, draft step, verify),
 * matrix-vector chunks of at most that many rows up to {@linkcode MATVEC_CHUNKED_MAX_T} (token
 * trees, batched and quantized verifies), the tiled path above (prefill).
 *
 * @example
 * ```ts
 * import { matmulPath } from "./matmul.ts";
 * console.log(matmulPath(1), matmulPath(19), matmulPath(128)); // "matvec" "chunked" "tiled"
 * console.log(matmulPath(12, "q4_0")); // "chunked"
 * ```
 */
export function matmulPath(T: number, dtype: WeightFormat = "f16"): MatmulPath {
  return T <= matvecMaxT(dtype) ? "matvec" : T <= MATVEC_CHUNKED_MAX_T ? "chunked" : "tiled";
}

/**
 * Rows of each chunk of a chunked product of `T` rows, at most `maxRows` each (default 17):
 * ceil(T / maxRows) chunks, as equal as possible, the larger first (19 → [10, 9]: two shorter
 * matvecs cost less than 17 + 2 rows).
 *
 * @example
 * ```ts
 * import { matvecChunks } from "./matmul.ts";
 * console.log(matvecChunks(19), matvecChunks(64)); // [10, 9] [16, 16, 16, 16]
 * console.log(matvecChunks(17, 8)); // [6, 6, 5]
 * ```
 */
export function matvecChunks(T: number, maxRows: number = MATVEC_MAX_T): number[] {
  const n = Math.ceil(T / maxRows), base = Math.floor(T / n);
  return Array.from({ length: n }, (_, i) => base + (i < T % n ? 1 : 0));
}

/**
 * Work split of a matrix-vector workgroup: `rows` weight rows, `lanes` invocations striding over
 * K together, each invocation holding `perThread` of the rows (so each x load serves that many
 * weight rows from registers): `rows / perThread * lanes` invocations.
 */
export interface MatvecShape {
  /** Weight rows (output columns) per workgroup; even, so (gate, up) pairs stay together. */
  readonly rows: number;
  /** Invocations striding over K for one row; a power of 2. */
  readonly lanes: number;
  /** Rows each invocation multiplies (divides `rows`); default 1. */
  readonly perThread?: number;
  /**
   * Units each lane loads before it multiplies any (default 1): with 2, both units' loads are in
   * flight together, halving the round trips to memory of a lane's K stride.
   */
  readonly unroll?: number;
}

/**
 * Benchmark knobs of {@linkcode matvecShape}, {@linkcode matvecMaxT} and
 * {@linkcode createLinear}, which benchmarks set to compare (`bench/gpu.ts --unroll`,
 * `--widen-small-k`, `--block-rows`, `--int8x`); engine code never changes them. `unroll`: the
 * units in flight per lane of every split (1). `widenSmallK`: the shortest K that widens at
 * T ≤ 2 (decode, a one-token draft step), default {@linkcode MATVEC_WIDEN_MIN_K} like every T.
 * `blockMaxT`: the widest one-dispatch product of a block format (8). `int8x`: which products on
 * the matrix-vector and chunked paths quantize x to int8 first and multiply with packed integer
 * dot products ({@linkcode matvecInt8Wgsl}, rule {@linkcode int8xFor}): "auto" (default) q4_0
 * where the runtime has `packed_4x8_integer_dot_product` (H200, dummy llama-3.1-8b decode: q4_0
 * 198 → 268 tok/s, +35%, for 2% more KL against f16 than q4_0 weights already cost; q8_0 219 →
 * 203 tok/s, slower, so not q8_0), true q4_0 and q8_0 (`--int8x 1`), false none (`--int8x 0`).
 * Set it before creating models (their int8 scratch is sized by it) and building dispatches.
 */
export const matvecTuning: {
  unroll: number;
  widenSmallK: number;
  blockMaxT: number;
  int8x: Int8xSetting;
} = {
  unroll: 1,
  widenSmallK: 2048,
  blockMaxT: MATVEC_BLOCK_MAX_T,
  int8x: "auto",
};

/**
 * Which weight formats take int8 activations (`matvecTuning.int8x`): "auto" q4_0 where the
 * runtime has `packed_4x8_integer_dot_product`, true q4_0 and q8_0, false none.
 */
export type Int8xSetting = "auto" | boolean;

/** Size of one product, for {@linkcode matvecShape}: input width K, weight rows N. */
export interface MatvecSize {
  /** Input width. */
  readonly K: number;
  /** Weight rows (output columns; twice the output width with swiglu). */
  readonly N: number;
  /**
   * Values of K one lane loads per step (its unit): default 4 (a vec4 of f32/f16 weights); see
   * {@linkcode matvecUnitValues} for a format's.
   */
  readonly unitValues?: number;
}

/**
 * Values of K per matrix-vector unit of `f`, as {@linkcode matvecShape} counts them: 16 for
 * q8_0 and 32 for q4_0 and q4_k (one vec4<u32> of quants each, `formatUnitValues`); 4 for the
 * others. The formats loading one u32 per unit (q6_k, nf4, q4_1, q5_0, q5_1, q2_k, q3_k, q5_k)
 * keep the 4-value count their widening was measured with, though their units are 8 or 16 values.
 *
 * @example
 * ```ts
 * import { matvecUnitValues } from "./matmul.ts";
 * console.log(matvecUnitValues("q4_0"), matvecUnitValues("q8_0"), matvecUnitValues("f16"));
 * // 32 16 4
 * ```
 */
export function matvecUnitValues(f: WeightFormat): number {
  return weightAlign(f) === 16 ? formatUnitValues(f) : 4;
}

/**
 * Invocations a matrix-vector product keeps in flight before {@linkcode matvecShape} stops
 * widening its lanes: enough loads in flight to cover the memory latency of a large GPU
 * (132 SMs on the H200). The base split of a 4096→14336 product (114k invocations at T ≤ 8)
 * sits near it, a 2048-row product at a quarter.
 */
export const MATVEC_FILL = 1 << 16;
/** Invocations per matrix-vector workgroup at most (WebGPU's guaranteed limit). */
const MATVEC_MAX_WG = 256;
/** Lanes per row at most. */
const MATVEC_MAX_LANES = 256;
/**
 * Shortest K that widens: on the H200 (`--shapes`, one run) widening made the 1B model's K = 2048
 * and 8192 products 1.2-1.9x faster at T = 1 and 8, but the pycode target's K = 576 and 1536
 * products up to 1.8x slower at T = 8 and 17 (each lane's stride gets too short).
 */
export const MATVEC_WIDEN_MIN_K = 2048;
/**
 * Whether a product of `T` rows and `size` is too small for 4 rows per invocation: K below
 * {@linkcode MATVEC_WIDEN_MIN_K}, T ≤ 8, and too few rows to fill the GPU even at one row per
 * invocation of 32 lanes divided by 4 ((N / 4) x 32 < {@linkcode MATVEC_FILL}). Such a product
 * takes one row per invocation and widens its lanes like a large-K one: four times the
 * invocations for the same x loads. Measured on the H200 (`bench/gpu.ts --shapes --filter
 * pycode`, one run, f16, µs at T = 1 / 8): the pycode target's qkv 576→960 4.7 / 10.8 with 4 rows
 * per invocation, 3.9 / 6.7 as 4 rows x 64 lanes; its down 1536→576 6.2 / 13.2, 4.2 / 7.6 as 2 x
 * 128; its gate/up 576→3072 4.9 / 12.1, 4.6 / 9.4 as 8 x 32 (it fills the GPU without widening).
 * At T = 17 (one row per invocation already) widening cost up to 1.6x (down: 12.1 → 19.3), so
 * from T = 9 the small-K rule stays the base split.
 */
export function matvecFewRows(T: number, size: MatvecSize): boolean {
  return T <= 8 && size.K < MATVEC_WIDEN_MIN_K && (size.N / 4) * 32 < MATVEC_FILL;
}

/** Fewest rows of a {@linkcode matvecManyShortRows} product. */
export const MATVEC_MANY_ROWS = 16384;

/**
 * Whether a product has many short rows, like a small model's classifier: K below
 * {@linkcode MATVEC_WIDEN_MIN_K}, at least {@linkcode MATVEC_MANY_ROWS} rows (the GPU fills many
 * times over) and 4-value units (f32, f16 and the u32-unit formats). Such a product takes 16 rows
 * per workgroup and NARROW lanes, so each lane walks a longer stride of K: at T = 1 the lanes
 * that give each about 8 units (8 to 32) and 4 rows per invocation, from T = 2 8 lanes and one
 * row per invocation. Measured on the H200 (`bench/gpu.ts --shapes --filter lm_head`, one run,
 * f16, µs at T = 1 / 8 / 17): the pycode target's 576→32000 12.8 / 69.4 / 148.5 with the base
 * split, 9.7 (16 x 16 lanes, 4 rows per invocation) / 34.8 / 67.7 (16 x 8); the draft's
 * 256→32000 10.2 / 59.0 / 120.4, 6.6 (16 x 8, 4 rows per invocation) / 19.5 / 39.1.
 */
export function matvecManyShortRows(size: MatvecSize): boolean {
  return size.K < MATVEC_WIDEN_MIN_K && size.N >= MATVEC_MANY_ROWS &&
    (size.unitValues ?? 4) === 4;
}

/** Workgroup memory the partial sums of a widened split may take (bytes). */
const MATVEC_RED_BYTES = 32768;

/**
 * The matrix-vector split for `T` activation rows, 8 rows and 32 lanes per workgroup: up to T = 8
 * each invocation holds 4 of the rows, so each x load serves 4 weight rows from registers; above,
 * one row each (4 x T accumulators would spill). Measured on the H200 (`bench/gpu.ts --shapes`,
 * 4096→14336 f16): T = 1 36.6 µs (3.2 TB/s) against 43.5 for 2 rows x 64 lanes, T = 8 97.5 µs,
 * T = 17 202 µs against 271 with 4 rows per invocation.
 *
 * Given the product's `size`, a product too small to fill the GPU (fewer than
 * {@linkcode MATVEC_FILL} invocations, e.g. the 2048-row down projection of a 1B model, or every
 * product of a small model) doubles its lanes per row, keeping at least 2 units of K per lane
 * (so every lane loads), and halves its rows per workgroup where the lanes would pass
 * 256 invocations: more, shorter K strides in flight at once, the same epilogue (a row is still
 * reduced inside one workgroup); only from K = {@linkcode MATVEC_WIDEN_MIN_K}, or for the small
 * products {@linkcode matvecFewRows} picks (one row per invocation, widened from any K). A unit is
 * `size.unitValues` values of K (default 4; {@linkcode matvecUnitValues}), so a q4_0 row of
 * K = 2048 (64 units of 32) stays at 32 lanes, where 4-value units would widen it to 128.
 * Products with many short rows (a small model's classifier) take narrow lanes instead
 * ({@linkcode matvecManyShortRows}). On a `software` adapter (lavapipe) narrow lanes: each
 * reduction step there is a barrier, a coroutine switch per invocation, and coalescing buys nothing
 * (measured 4x faster at T = 1).
 *
 * @example
 * ```ts
 * import { matvecShape } from "./matmul.ts";
 * console.log(matvecShape(1), matvecShape(17));
 * // { rows: 8, lanes: 32, perThread: 4 } { rows: 8, lanes: 32 }
 * console.log(matvecShape(1, false, { K: 8192, N: 2048 })); // more lanes for a small N
 * // { rows: 8, lanes: 128, perThread: 4 }
 * console.log(matvecShape(1, false, { K: 2048, N: 2048, unitValues: 32 })); // q4_0: 64 units
 * // { rows: 8, lanes: 32, perThread: 4 }
 * ```
 */
export function matvecShape(T: number, software = false, size?: MatvecSize): MatvecShape {
  if (software) return { rows: 8, lanes: 8 };
  if (size && matvecManyShortRows(size)) {
    const units = Math.ceil(size.K / 4);
    const lanes = Math.min(32, Math.max(8, 2 ** Math.floor(Math.log2(units / 8))));
    const shape: MatvecShape = T === 1 ? { rows: 16, lanes, perThread: 4 } : { rows: 16, lanes: 8 };
    return matvecTuning.unroll > 1 ? { ...shape, unroll: matvecTuning.unroll } : shape;
  }
  const few = size !== undefined && matvecFewRows(T, size);
  const rt = T <= 8 && !few ? 4 : 1;
  let rows = 8, lanes = 32;
  const minK = few ? 0 : T <= 2 ? matvecTuning.widenSmallK : MATVEC_WIDEN_MIN_K;
  if (size && size.K >= minK) {
    const units = Math.ceil(size.K / (size.unitValues ?? 4)); // loads of K per row
    const slotBytes = (r: number) => (r * T + T) * 4; // partial sums per lane (+ Σx²)
    while (
      lanes < MATVEC_MAX_LANES && (size.N / rt) * lanes < MATVEC_FILL && 4 * lanes <= units
    ) {
      let r = rows;
      if ((r / rt) * lanes * 2 > MATVEC_MAX_WG) {
        if (r / 2 < rt || (r / 2) % 2) break;
        r /= 2;
      }
      if (slotBytes(r) * lanes * 2 > MATVEC_RED_BYTES) break;
      rows = r;
      lanes *= 2;
    }
  }
  const shape: MatvecShape = rt > 1 ? { rows, lanes, perThread: rt } : { rows, lanes };
  return matvecTuning.unroll > 1 ? { ...shape, unroll: matvecTuning.unroll } : shape;
}

/** Specialization values baked into a matmul shader (all part of its pipeline key). */
interface MatmulSpec {
  dtype: WeightFormat;
  bias: boolean;
  accumulate: boolean;
  norm: boolean;
  swiglu: boolean;
}

function specKey(s: MatmulSpec): string {
  return `${s.dtype}.bias${+s.bias}.acc${+s.accumulate}.norm${+s.norm}.swiglu${+s.swiglu}`;
}

function header(s: MatmulSpec, vec4Norm: boolean): string {
  const wType = s.dtype === "f16" ? "f16" : "f32";
  const g = vec4Norm ? "vec4<f32>" : "f32";
  return `${s.dtype === "f16" ? "enable f16;\n" : ""}
struct Params {
  T: u32,       // activation rows
  K: u32,       // input width
  N: u32,       // weight rows (output width, or twice it with swiglu)
  xOffset: u32, // element offset of x[0, 0] in the x buffer
  yOffset: u32, // element offset of y[0, 0] in the y buffer
  vecK: u32,    // K / 4 (vec4 loads only)
  nb: u32,      // blocks of W: N * K / block (block formats only)
  eps: f32,     // RMSNorm epsilon (norm only)
  yStride: u32, // elements between rows of y (N, N / 2 with swiglu, or wider: a column range)
}
@group(0) @binding(3) var<uniform> p: Params;
@group(0) @binding(2) var<storage, read_write> y: array<f32>; // y: [T, N${
    s.swiglu ? " / 2" : ""
  }] f32 at yOffset, rows yStride apart
${s.bias ? "@group(0) @binding(4) var<storage, read> bias: array<f32>; // bias: [N] f32" : ""}
${
    s.norm
      ? `@group(0) @binding(5) var<storage, read> g: array<${g}>; // g: [K] f32 RMSNorm weight`
      : ""
  }
alias WT = ${wType};

// 1 / rms of x row t from its sum of squares (1 without norm).
fn rinv(ss: f32) -> f32 { return ${s.norm ? "inverseSqrt(ss / f32(p.K) + p.eps)" : "1.0"}; }

// y[t, n] = acc (+ bias[n]) (+ y[t, n]).
fn store(t: u32, n: u32, acc: f32) {
  let i = p.yOffset + t * p.yStride + n;
  var v = acc;
  ${s.bias ? "v += bias[n];" : ""}
  ${s.accumulate ? "v += y[i];" : ""}
  y[i] = v;
}

// y[t, n / 2] = silu(gate) * up for the pair of weight rows (n, n + 1) = (gate, up).
fn storePair(t: u32, n: u32, gate: f32, up: f32) {
  var a = gate;
  var b = up;
  ${s.bias ? "a += bias[n]; b += bias[n + 1u];" : ""}
  y[p.yOffset + t * p.yStride + n / 2u] = a / (1.0 + exp(-a)) * b;
}
`;
}

/** `n` generated source lines (accumulators are unrolled so they stay in registers). */
function unrolled(n: number, line: (i: number) => string): string {
  return Array.from({ length: n }, (_, i) => line(i)).join("\n");
}

/**
 * WGSL of a matrix-vector workgroup's epilogue: its R rows' T sums, each lane group's total at
 * `red[(slot) * L]` (slot = row * T + t), times `scale` (a WGSL suffix on the value, e.g. the
 * folded norm's 1/rms of row t), through `store(t, n, v)`, or with SwiGLU pairs of interleaved
 * gate/up rows through `storePair(t, n, gate, up)`. The float and int8 paths share it.
 */
function storeWgsl(
  swiglu: boolean,
  R: number,
  T: number,
  L: number,
  WG: number,
  scale: string,
): string {
  return swiglu
    ? `  for (var e = lid; e < ${(R / 2) * T}u; e += ${WG}u) {
    let i = e / ${T}u;
    let t = e % ${T}u;
    let n = n0 + 2u * i;
    if (n < p.N) {
      storePair(t, n, red[(2u * i * ${T}u + t) * ${L}u]${scale}, red[((2u * i + 1u) * ${T}u + t) * ${L}u]${scale});
    }
  }`
    : `  for (var e = lid; e < ${R * T}u; e += ${WG}u) {
    let t = e % ${T}u;
    let n = n0 + e / ${T}u;
    if (n < p.N) { store(t, n, red[e * ${L}u]${scale}); }
  }`;
}

/**
 * WGSL of the matrix-vector path for `T` rows with the split `shape`. With `vec4` (K % 4 == 0
 * and xOffset % 4 == 0) x is loaded as vec4 (float weights too); otherwise as scalars, so any K
 * works. Block formats decode weights in units (one vec4<u32> of quants for q8_0, q4_0 and q4_k,
 * one u32 for the others: `wUnit` in `kernels/qformats.ts`).
 */
export function matvecWgsl(
  s: MatmulSpec & { T: number; vec4: boolean; shape?: MatvecShape; factor?: boolean },
): string {
  const shape = s.shape ?? matvecShape(s.T);
  const T = s.T, R = shape.rows, L = shape.lanes, RT = shape.perThread ?? 1;
  const U = shape.unroll ?? 1;
  const G2 = R / RT, WG = G2 * L; // row groups (of RT rows) x lanes
  const block = isBlockFormat(s.dtype);
  // x and the weights in vec4 (v) or scalar (scalar float path) units.
  const v = block || s.vec4;
  const V = v ? "vec4<f32>" : "f32";
  const mul = (a: string, b: string) => v ? `dot(${a}, ${b})` : `${a} * ${b}`;
  const xLoad = s.vec4
    ? `return x[p.xOffset / 4u + t * p.vecK + k];`
    : v
    ? `let i = p.xOffset + t * p.K + 4u * k;
  return vec4<f32>(x[i], x[i + 1u], x[i + 2u], x[i + 3u]);`
    : `return x[p.xOffset + t * p.K + k];`;
  const slots = R * T + (s.norm ? T : 0);
  // One weight unit of each of the RT rows: its values as vec4 groups (or a scalar) at x
  // positions k (the same k for every row: rows are walked in step).
  const G = block ? formatGroups(s.dtype) : 1;
  // vec4 formats: a unit is loaded raw (quants and scales) and group g decoded where it is used.
  const lazy = weightAlign(s.dtype) === 16;
  const group = (r: number, g: number) => lazy ? `wGroup(d${r}, ${g}u)` : `d${r}[${g}]`;
  const unitCount = block ? "(p.K / W_BLOCK) * W_UNITS" : v ? "p.vecK" : "p.K";
  const decode = block
    ? `    let kb = u / W_UNITS;
    let j = u % W_UNITS;
${unrolled(RT, (r) => `    let d${r} = wUnit(rowBlock${r} + kb, j, p.nb);`)}
${unrolled(G, (g) => `    let k${g} = kb * (W_BLOCK / 4u) + wUnitK4(j, ${g}u);`)}`
    : `    let k0 = u;
${unrolled(RT, (r) => `    let d${r} = array<${V}, 1>(${V}(w[rowStart${r} + u]));`)}`;
  // The RMSNorm gain g[k] multiplies whichever side has fewer vec4s per group: the RT weight
  // groups, or the T x loads (decode: 1 x row against 4 weight rows).
  const xGain = s.norm && T < RT;
  const wGain = s.norm && !xGain;
  // Factored formats (q8_0, q4_0, q4_k): each part of a unit sums Σ q x over its groups into
  // q{t}_{r}, then adds scale * q{t}_{r} (- offset * Σ x) to the accumulator: one multiply per
  // part instead of one per value.
  const fac = lazy && s.factor !== false ? formatFactoring(s.dtype) : undefined;
  const groupBody = (g: number) =>
    `    {
${s.norm ? `      let gk = g[k${g}];` : ""}
${
      unrolled(
        RT,
        (r) =>
          `      let w${r} = ${fac ? `wGroupQ(d${r}, ${g}u)` : group(r, g)}${
            wGain ? " * gk" : ""
          };`,
      )
    }
${
      unrolled(T, (t) => {
        const xs = xGain ? "xg" : "xv";
        const dst = (r: number) => fac ? `q${t}_${r}` : `acc${t}_${r}`;
        return `      { let xv = xq(${t}u, k${g}); ${xGain ? "let xg = xv * gk; " : ""}${
          Array.from({ length: RT }, (_, r) => `${dst(r)} += ${mul(`w${r}`, xs)};`).join(" ")
        }${s.norm ? ` ss${t} += ${mul("xv", "xv")};` : ""}${
          fac?.offset ? ` sx${t} += dot(${xs}, ${wGain ? "gk" : "vec4<f32>(1.0)"});` : ""
        } }`;
      })
    }
    }`;
  const body = fac
    ? unrolled(fac.parts, (part) => {
      const per = G / fac.parts, gs = Array.from({ length: per }, (_, i) => part * per + i);
      return `    {
${
        unrolled(T, (t) =>
          `      ${Array.from({ length: RT }, (_, r) => `var q${t}_${r} = 0.0;`).join(" ")}${
            fac.offset ? ` var sx${t} = 0.0;` : ""
          }`)
      }
${gs.map(groupBody).join("\n")}
${
        unrolled(RT, (r) =>
          `      { let sc = wScale(d${r}, ${part}u); ${
            Array.from(
              { length: T },
              (_, t) => `acc${t}_${r} += sc.x * q${t}_${r}${fac.offset ? ` - sc.y * sx${t}` : ""};`,
            ).join(" ")
          } }`)
      }
    }`;
    })
    : unrolled(G, groupBody);
  const store = storeWgsl(
    s.swiglu,
    R,
    T,
    L,
    WG,
    s.norm ? ` * rinv(red[(${R * T}u + t) * ${L}u])` : "",
  );
  return /* wgsl */ `${header(s, v)}${
    block
      ? weightWgsl(s.dtype)
      : `@group(0) @binding(1) var<storage, read> w: array<${
        v ? "vec4<WT>" : "WT"
      }>; // w: [N, K] ${s.dtype}\nfn wInit(lid: u32) {}`
  }
// Matrix-vector path, ${s.dtype}, T = ${T}: a workgroup of ${WG} invocations owns ${R} weight
// rows n0 .. n0+${R - 1} as ${G2} groups of ${RT} rows, ${L} lanes per group: lane l of group i
// loads ${
    block
      ? `decode units (one ${lazy ? "vec4<u32>" : "u32"} of quants`
      : v
      ? "vec4 units ("
      : "elements ("
  }each) l, l + ${L}, ... of its ${RT} weight row(s) n0 + ${RT}i ..${
    s.norm ? " times g" : ""
  } (consecutive lanes load consecutive
// words, coalesced) and multiplies them into all ${T} activation rows (each x load serving
// ${RT} row(s)), keeping ${T * RT} partial sums${
    s.norm
      ? ` and ${T} sums
// of x² (the RMSNorm of the x rows)`
      : ""
  } in registers. The ${slots} partial sums per lane go to workgroup
// memory [${slots}, ${L}] and are tree-reduced over the lanes; then ${
    s.swiglu ? "pairs (gate, up) of rows are combined by silu(gate) * up" : "each sum is stored"
  }.
// The loop bound masks ragged K; weight rows past N are clamped when loaded and not stored;
// workgroups past N (2-D grid rounding) return.
@group(0) @binding(0) var<storage, read> x: array<${
    s.vec4 ? "vec4<f32>" : "f32"
  }>; // x: [T, K] f32 at xOffset

var<workgroup> red: array<f32, ${slots * L}>; // red: [${slots}, ${L}] partial sums

// x[t, k] (a vec4 of x when k counts vec4s)
fn xq(t: u32, k: u32) -> ${V} {
  ${xLoad}
}

@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
        @builtin(local_invocation_index) lid: u32) {
  wInit(lid);
  workgroupBarrier();
  let n0 = (wg.y * nwg.x + wg.x) * ${R}u;
  if (n0 >= p.N) { return; } // uniform per workgroup: safe before the barriers
  let gi = lid / ${L}u; // row group
  let lane = lid % ${L}u;
${
    unrolled(RT, (r) =>
      `  let row${r} = min(n0 + gi * ${RT}u + ${r}u, p.N - 1u);\n  ${
        block
          ? `let rowBlock${r} = row${r} * (p.K / W_BLOCK);`
          : `let rowStart${r} = row${r} * ${unitCount};`
      }`)
  }
${
    unrolled(T, (t) =>
      `  ${
        Array.from({ length: RT }, (_, r) => `var acc${t}_${r} = 0.0;`).join(" ")
      }${s.norm ? ` var ss${t} = 0.0;` : ""}`)
  }
  for (var u = lane; u < ${unitCount}; u += ${U * L}u) {
${decode}
${
    unrolled(U - 1, (i) => {
      const n = i + 1,
        rename = (text: string, uName: string) =>
          text.replace(/\b(d\d+|k\d+|kb|j)\b/g, `$1_${n}`).replace(/\bu\b/g, uName);
      return `    let u_${n} = u + ${
        n * L
      }u; // unit ${n} of this step (clamped when loaded, skipped past the end)
    let uc_${n} = min(u_${n}, ${unitCount} - 1u);
${rename(decode, `uc_${n}`)}`;
    })
  }
${body}
${
    unrolled(U - 1, (i) => {
      const n = i + 1;
      return `    if (u_${n} < ${unitCount}) {
${body.replace(/\b(d\d+|k\d+)\b/g, `$1_${n}`)}
    }`;
    })
  }
  }
${
    unrolled(T * RT, (e) => {
      const t = e % T, r = Math.floor(e / T);
      return `  red[((gi * ${RT}u + ${r}u) * ${T}u + ${t}u) * ${L}u + lane] = acc${t}_${r};`;
    })
  }
${
    s.norm
      ? `  if (gi == 0u) {\n${
        unrolled(T, (t) => `    red[(${R * T + t}u) * ${L}u + lane] = ss${t};`)
      }\n  }`
      : ""
  }
  workgroupBarrier();
  for (var h = ${L / 2}u; h > 0u; h >>= 1u) {
    if (lane < h) {
      for (var e = gi; e < ${slots}u; e += ${G2}u) {
        red[e * ${L}u + lane] += red[e * ${L}u + lane + h];
      }
    }
    workgroupBarrier();
  }
${store}
}
`;
}

/** The weight formats the int8 matrix-vector path serves (`matvecTuning.int8x` true). */
const INT8X_FORMATS: ReadonlySet<WeightFormat> = new Set(["q8_0", "q4_0"]);

/**
 * Whether products of `dtype` weights on the matrix-vector and chunked paths run on int8 x
 * (quantize pass + {@linkcode matvecInt8Wgsl}) under `setting` (default `matvecTuning.int8x`):
 * "auto" for q4_0 where {@linkcode int8xAvailable} (on q8_0 it measured slower, see
 * `matvecTuning`), true for q4_0 and q8_0, false never. The tiled path never does.
 *
 * @example
 * ```ts
 * import { int8xFor } from "./matmul.ts";
 * console.log(int8xFor("q8_0", "auto"), int8xFor("q8_0", true), int8xFor("q4_0", false));
 * // false true false
 * ```
 */
export function int8xFor(dtype: WeightFormat, setting: Int8xSetting = matvecTuning.int8x): boolean {
  if (setting === "auto") return dtype === "q4_0" && int8xAvailable();
  return setting && INT8X_FORMATS.has(dtype);
}

/**
 * Bytes of one int8 scratch that serves every product of a model with at most `maxT` rows whose
 * widest int8 product has input width `K` ({@linkcode int8xFor}); 0 when `K` is 0 (no such
 * product). Only the matrix-vector and chunked paths (T ≤ {@linkcode MATVEC_CHUNKED_MAX_T}) use
 * it, so its rows are min(maxT, 64); the scratch of (T, K) grows with both, so this one fits all.
 *
 * @example
 * ```ts
 * import { int8xSharedScratchBytes } from "./matmul.ts";
 * console.log(int8xSharedScratchBytes(128, 1536), int8xSharedScratchBytes(128, 0)); // 123392 0
 * ```
 */
export function int8xSharedScratchBytes(maxT: number, K: number): number {
  return K > 0 ? int8xScratchBytes(Math.min(maxT, MATVEC_CHUNKED_MAX_T), K) : 0;
}

/**
 * Whether this runtime's WGSL has `dot4I8Packed` and `pack4xI8` (the language feature
 * `packed_4x8_integer_dot_product`), which the int8 matrix-vector path needs.
 *
 * @example
 * ```ts
 * import { int8xAvailable } from "./matmul.ts";
 * console.log(typeof int8xAvailable()); // "boolean"
 * ```
 */
export function int8xAvailable(): boolean {
  const gpu = (globalThis.navigator as { gpu?: { wgslLanguageFeatures?: ReadonlySet<string> } })
    ?.gpu;
  return gpu?.wgslLanguageFeatures?.has("packed_4x8_integer_dot_product") ?? false;
}

/**
 * WGSL of the int8 matrix-vector path (q8_0 and q4_0 weights) for `T` rows with the split
 * `shape`: x was quantized by `kernels/quantize_x.ts` (int8 blocks of 32, scale d_x and sum
 * Σq_x per block, the row's rinv), and each unit of weights is multiplied into every x row with
 * `dot4I8Packed`, four int8 products per instruction, a whole block of 32 per lane step: a
 * q4_0 block is `d_w d_x (Σ n q_x − 8 Σ q_x)` (nibbles n = 0..15 are valid signed bytes:
 * `w & 0x0F0F0F0F` of quant word g holds values 4g..4g+3 of the block,
 * `(w >> 4) & 0x0F0F0F0F` values 16+4g..), a q8_0 block `d_w d_x Σ q_w q_x`. The work split
 * (with units of 32 values: {@linkcode matvecShape} of `unitValues` 32), the reduction and the
 * epilogues (bias, accumulate, SwiGLU) are those of {@linkcode matvecWgsl}; a folded RMSNorm
 * multiplies each sum by the row's rinv (the gain was applied before quantizing).
 */
export function matvecInt8Wgsl(s: MatmulSpec & { T: number; shape: MatvecShape }): string {
  if (!INT8X_FORMATS.has(s.dtype)) throw new RangeError(`int8 matvec: no ${s.dtype} weights`);
  const { T, shape } = s;
  const R = shape.rows, L = shape.lanes, RT = shape.perThread ?? 1, U = shape.unroll ?? 1;
  const G2 = R / RT, WG = G2 * L, slots = R * T;
  const q4 = s.dtype === "q4_0";
  const rows = (line: (r: number) => string) => unrolled(RT, line);
  // The loads of block `kb` of the RT weight rows into names with suffix _n: the quants of
  // values 0..15 (lo) and 16..31 (hi) as int8 words, and the scale (read once per block).
  const load = (n: number, kb: string) =>
    `    let kb_${n} = ${kb};
${
      rows((r) =>
        q4
          ? `    let w${r}_${n} = wUnit(rowBlock${r} + kb_${n}, 0u, p.nb);
    let lo${r}_${n} = w${r}_${n}.q & vec4<u32>(0x0F0F0F0Fu);
    let hi${r}_${n} = (w${r}_${n}.q >> vec4<u32>(4u)) & vec4<u32>(0x0F0F0F0Fu);
    let d${r}_${n} = w${r}_${n}.d;`
          : `    let w${r}_${n} = wUnit(rowBlock${r} + kb_${n}, 0u, p.nb);
    let lo${r}_${n} = w${r}_${n}.q;
    let hi${r}_${n} = wUnit(rowBlock${r} + kb_${n}, 1u, p.nb).q;
    let d${r}_${n} = w${r}_${n}.d;`
      )
    }`;
  // Block _n times every x row: its x quants (two vec4<u32>) and (d_x, Σq_x).
  const compute = (n: number) =>
    unrolled(T, (t) =>
      `    {
      let xb = (xr0 + ${t}u) * nbk + kb_${n};
      let m = xm[(xr0 + ${t}u) * ms + kb_${n}];
      let dx = bitcast<f32>(m.x);
      let a = xq[2u * xb];
      let c = xq[2u * xb + 1u];
${q4 ? "      let o = 8 * bitcast<i32>(m.y);" : ""}
${
        rows((r) =>
          `      acc${t}_${r} += (d${r}_${n} * dx) * f32(dot4(lo${r}_${n}, a) + dot4(hi${r}_${n}, c)${
            q4 ? " - o" : ""
          });`
        )
      }
    }`);
  const r = (t: string) => s.norm ? ` * rinvX(${t})` : "";
  const store = storeWgsl(s.swiglu, R, T, L, WG, r("t"));
  return /* wgsl */ `${header({ ...s, norm: false }, false)}${weightWgsl(s.dtype)}
// Int8 matrix-vector path, ${s.dtype}, T = ${T}: a workgroup of ${WG} invocations owns ${R} weight
// rows n0 .. n0+${
    R - 1
  } as ${G2} groups of ${RT} rows, ${L} lanes per group: lane l of group i loads
// blocks l, l + ${L}, ... (${
    q4 ? "one vec4<u32> of nibbles" : "two vec4<u32> of bytes"
  } and the f16 scale, read once) of its
// ${RT} weight row(s) n0 + ${RT}i .. (consecutive lanes load consecutive ${
    q4 ? 16 : 32
  }-byte blocks, coalesced)
// and multiplies them into all ${T} quantized x rows with dot4I8Packed (each x load serving ${RT}
// row(s)), keeping ${T * RT} partial sums in registers. The ${slots} partial sums per lane go to
// workgroup memory [${slots}, ${L}] and are tree-reduced over the lanes; then ${
    s.swiglu ? "pairs (gate, up) of rows are combined by silu(gate) * up" : "each sum is stored"
  }${
    s.norm ? ",\n// times the x row's rinv" : ""
  }. The loop bound masks ragged K; weight rows past N are clamped when loaded and
// not stored; workgroups past N (2-D grid rounding) return. p.xOffset is the element offset of
// x[0, 0] in the quantized x (a whole number of rows: p.xOffset / K is the first row).
@group(0) @binding(0) var<storage, read> xq: array<vec4<u32>>; // xq: i8[rows, K], 16 per vec4
@group(0) @binding(6) var<storage, read> xm: array<vec2<u32>>; // xm: [rows, K / 32 + 1] (d, Σq) per block, then (rinv, 0)

var<workgroup> red: array<f32, ${slots * L}>; // red: [${slots}, ${L}] partial sums

// Σ of the 16 int8 products of a and b.
fn dot4(a: vec4<u32>, b: vec4<u32>) -> i32 {
  return dot4I8Packed(a.x, b.x) + dot4I8Packed(a.y, b.y) + dot4I8Packed(a.z, b.z) + dot4I8Packed(a.w, b.w);
}
// 1 / rms of x row t (written by the quantize pass).
fn rinvX(t: u32) -> f32 {
  let ms = p.K / 32u + 1u;
  return bitcast<f32>(xm[(p.xOffset / p.K + t) * ms + ms - 1u].x);
}

@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
        @builtin(local_invocation_index) lid: u32) {
  let n0 = (wg.y * nwg.x + wg.x) * ${R}u;
  if (n0 >= p.N) { return; } // uniform per workgroup: safe before the barriers
  let gi = lid / ${L}u; // row group
  let lane = lid % ${L}u;
  let nbk = p.K / 32u; // blocks per row
  let ms = nbk + 1u; // xm entries per x row
  let xr0 = p.xOffset / p.K; // first x row
${rows((r) => `  let rowBlock${r} = min(n0 + gi * ${RT}u + ${r}u, p.N - 1u) * nbk;`)}
${
    unrolled(T, (t) =>
      `  ${Array.from({ length: RT }, (_, r) => `var acc${t}_${r} = 0.0;`).join(" ")}`)
  }
  for (var u = lane; u < nbk; u += ${U * L}u) {
${load(0, "u")}
${
    unrolled(U - 1, (i) =>
      `    let u_${i + 1} = u + ${(i + 1) * L}u; // block ${
        i + 1
      } of this step (clamped when loaded, skipped past the end)
${load(i + 1, `min(u_${i + 1}, nbk - 1u)`)}`)
  }
${compute(0)}
${unrolled(U - 1, (i) => `    if (u_${i + 1} < nbk) {\n${compute(i + 1)}\n    }`)}
  }
${
    unrolled(T * RT, (e) => {
      const t = e % T, r = Math.floor(e / T);
      return `  red[((gi * ${RT}u + ${r}u) * ${T}u + ${t}u) * ${L}u + lane] = acc${t}_${r};`;
    })
  }
  workgroupBarrier();
  for (var h = ${L >> 1}u; h > 0u; h >>= 1u) {
    if (lane < h) {
      for (var e = gi; e < ${slots}u; e += ${G2}u) {
        red[e * ${L}u + lane] += red[e * ${L}u + lane + h];
      }
    }
    workgroupBarrier();
  }
${store}
}
`;
}

/**
 * WGSL of the tiled path (any T, K, N; edges masked when staging tiles and when storing). Block
 * formats dequantize while staging the W tile: each invocation decodes 4 consecutive k of one
 * weight row (`w4` of `kernels/qformats.ts`). With swiglu an invocation owns two adjacent
 * (gate, up) column pairs per 32 columns instead of every 16th column.
 */
export function tiledWgsl(s: MatmulSpec): string {
  const loads = (TILE_M * TILE_K) / (TILED_WG_X * TILED_WG_Y);
  const block = isBlockFormat(s.dtype);
  // Column j (0..3) of invocation tx within the tile.
  const col = (j: number) =>
    s.swiglu ? `2u * l.x + ${(j & 1) + 32 * (j >> 1)}u` : `l.x + ${j * TILED_WG_X}u`;
  // W staging: float formats load element by element with the x tile; block formats decode
  // one vec4 per invocation (TILE_N * TILE_K / 4 == invocations, K a multiple of TILE_K).
  const wScalar = `      var wv = 0.0;
      if (n0 + row < p.N && k < p.K) { wv = f32(w[(n0 + row) * p.K + k])${
    s.norm ? " * g[k]" : ""
  }; }
      ws[kk * ${TILE_N}u + row] = wv;
`;
  const wBlock = `    {
      let row = lid / ${TILE_K / 4}u;
      let kk = (lid % ${TILE_K / 4}u) * 4u;
      var wv = vec4<f32>(0.0);
      if (n0 + row < p.N) {
        wv = w4((n0 + row) * p.K + k0 + kk, p.nb)${
    s.norm ? ` * vec4<f32>(g[k0 + kk], g[k0 + kk + 1u], g[k0 + kk + 2u], g[k0 + kk + 3u])` : ""
  };
      }
${unrolled(4, (c) => `      ws[(kk + ${c}u) * ${TILE_N}u + row] = wv[${c}];`)}
    }
`;
  const stores = s.swiglu
    ? unrolled(MICRO * 2, (e) => {
      const i = Math.floor(e / 2), j = 2 * (e % 2);
      return `  if (m0 + l.y + ${i * TILED_WG_Y}u < p.T && n0 + ${col(j)} < p.N) {
    let r = rinv(ss${i});
    storePair(m0 + l.y + ${i * TILED_WG_Y}u, n0 + ${col(j)}, acc${i}${j} * r, acc${i}${j + 1} * r);
  }`;
    })
    : unrolled(MICRO * MICRO, (e) => {
      const i = Math.floor(e / MICRO), j = e % MICRO;
      return `  if (m0 + l.y + ${i * TILED_WG_Y}u < p.T && n0 + ${col(j)} < p.N) {
    store(m0 + l.y + ${i * TILED_WG_Y}u, n0 + ${col(j)}, acc${i}${j}${
        s.norm ? ` * rinv(ss${i})` : ""
      });
  }`;
    });
  return /* wgsl */ `${header(s, false)}
// Tiled path: workgroup (bx, by) owns y[by*${TILE_M} .. +${TILE_M}, bx*${TILE_N} .. +${TILE_N}].
// For each depth-${TILE_K} slab of K, its ${TILED_WG_X * TILED_WG_Y} invocations stage
// a ${TILE_M}x${TILE_K} tile of x and a ${TILE_N}x${TILE_K} tile of W (${
    block ? "dequantized from " + s.dtype + ", a vec4 of one row per invocation" : s.dtype
  }${s.norm ? ", times g" : ""}) in workgroup memory
// (${loads} elements each, K fastest so global loads coalesce; stored k-major so the inner loop
// reads consecutive addresses). Elements past T, N or K are staged as 0. Invocation (tx, ty)
// accumulates (in unrolled registers) the ${MICRO}x${MICRO} outputs of rows ty + ${TILED_WG_Y}i and columns ${
    s.swiglu ? "2tx + {0, 1, 32, 33}" : `tx + ${TILED_WG_X}j`
  }${s.norm ? ",\n// and the sums of x² of its rows (RMSNorm)" : ""}; stores past T or N are masked.
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
${unrolled(MICRO, (i) => `  var ss${i} = 0.0;`)}
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
${unrolled(MICRO, (j) => `      let b${j} = ws[kk * ${TILE_N}u + ${col(j)}];`)}
${
    unrolled(MICRO * MICRO, (e) => {
      const i = Math.floor(e / MICRO), j = e % MICRO;
      return `      acc${i}${j} = fma(a${i}, b${j}, acc${i}${j});`;
    })
  }
${s.norm ? unrolled(MICRO, (i) => `      ss${i} = fma(a${i}, a${i}, ss${i});`) : ""}
    }
    workgroupBarrier();
  }
${stores}
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
  /** RMSNorm of the x rows folded into the product: weight g: [K] f32 and epsilon. */
  norm?: { weight: GPUBuffer; eps: number };
  /**
   * Rows of `w` are interleaved (gate, up) pairs; y: [T, N / 2] = silu(gate) * up (N even; not
   * with `accumulate`).
   */
  swiglu?: boolean;
  /** y: [T, N] f32 output ([T, N / 2] with swiglu), starting at element `yOffset`. Not `x`. */
  y: GPUBuffer;
  /** Element offset of y[0, 0] in `y`; default 0. */
  yOffset?: number;
  /** Elements between rows of y; default the output width (a larger one writes a column range). */
  yStride?: number;
  /** Add into y instead of overwriting it (fused residual add): y += x·W^T (+ bias). */
  accumulate?: boolean;
  /** Activation rows (baked into the dispatch). */
  T: number;
  /** Input width. */
  K: number;
  /** Weight rows (output width; twice the output width with swiglu). */
  N: number;
  /** Force a path (tests, benchmarks); default {@linkcode matmulPath}(T). */
  path?: MatmulPath;
  /**
   * Force a matrix-vector split (benchmarks); default {@linkcode matvecShape}(T, software,
   * {K, N, unitValues}).
   */
  shape?: MatvecShape;
  /**
   * Matrix-vector path, factored formats (q8_0, q4_0, q4_k; `formatFactoring`): multiply by the
   * scales once per part of a unit (default true) or, false, each value as it is decoded
   * (benchmarks compare the two).
   */
  factor?: boolean;
  /**
   * Where {@linkcode int8xFor} applies: the scratch the quantized x is written to, shared by
   * products run one after another (at least `int8xScratchBytes(T, K)` bytes of
   * `kernels/quantize_x.ts`, STORAGE usage); default a scratch of its own per
   * {@linkcode createLinear} call. Ignored by products on float x.
   */
  int8Scratch?: GPUBuffer;
}

/**
 * Builds the dispatches for `y = x · W^T (+ bias) (+ y)` (with the optional RMSNorm and SwiGLU
 * fusions) on the path of {@linkcode matmulPath}: one dispatch, or one per chunk of rows on the
 * chunked path. Pipelines, params and bind groups are made once; encode the returned
 * {@linkcode Dispatch}es, in order, as often as needed.
 *
 * Where {@linkcode int8xFor}(dtype) holds (by default q4_0), products on the matrix-vector and
 * chunked paths are the quantize pass of all T rows (`kernels/quantize_x.ts`) followed by the
 * int8 matrix-vector dispatch of each chunk ({@linkcode matvecInt8Wgsl}); their scratch is
 * `args.int8Scratch` or a buffer of this call's own, `int8xScratchBytes(T, K)` ≈ 1.25 T K bytes
 * (models pass one shared scratch, models/llama.ts).
 *
 * @example
 * ```ts ignore
 * const d = await createLinear(gpu, { label: "L0.q", x, w, dtype: "f16", y, T: 19, K: 576, N: 576 });
 * await gpu.run("step", d);
 * ```
 */
export async function createLinear(gpu: Gpu, args: MatmulArgs): Promise<Dispatch[]> {
  const { T, K } = args;
  const path = args.path ?? matmulPath(T, args.dtype);
  if (path !== "tiled" && int8xFor(args.dtype)) {
    return await createInt8Linear(gpu, args, path);
  }
  if (path !== "chunked") return [await createMatmul(gpu, { ...args, path })];
  if (!Number.isInteger(T) || T < 1 || T > MATVEC_CHUNKED_MAX_T) {
    throw new RangeError(
      `${args.label}: chunked path serves T <= ${MATVEC_CHUNKED_MAX_T}, got ${T}`,
    );
  }
  const outN = args.swiglu ? args.N / 2 : args.N;
  const yStride = args.yStride ?? outN;
  const out: Dispatch[] = [];
  let t0 = 0;
  for (const n of matvecChunks(T, matvecMaxT(args.dtype))) {
    out.push(
      await createMatmul(gpu, {
        ...args,
        path: "matvec",
        T: n,
        xOffset: (args.xOffset ?? 0) + t0 * K,
        yOffset: (args.yOffset ?? 0) + t0 * yStride,
        yStride,
      }),
    );
    t0 += n;
  }
  return out;
}

/**
 * Checks what every product needs (positive sizes, f16 support, K a multiple of the block, the
 * flat weight index within u32, SwiGLU's even N) and returns the format's block.
 */
function checkArgs(gpu: Gpu, args: MatmulArgs): number {
  const { T, K, N, dtype } = args;
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
  if (args.swiglu && (N % 2 !== 0 || args.accumulate)) {
    throw new RangeError(`${args.label}: swiglu needs an even N and no accumulate (N=${N})`);
  }
  return block;
}

/** Checks a matrix-vector split: even rows, lanes a power of 2, perThread dividing rows. */
function checkShape(label: string, shape: MatvecShape): void {
  const rt = shape.perThread ?? 1;
  if (shape.rows % 2 || shape.lanes & (shape.lanes - 1) || shape.rows % rt) {
    throw new RangeError(
      `${label}: matvec rows must be even, lanes a power of 2 and perThread divide rows`,
    );
  }
}

/** The rows of y's stride (default the output width), checked. */
function checkYStride(args: MatmulArgs): number {
  const outN = args.swiglu ? args.N / 2 : args.N;
  const yStride = args.yStride ?? outN;
  if (!Number.isInteger(yStride) || yStride < outN) {
    throw new RangeError(`${args.label}: yStride=${yStride} is less than the output width ${outN}`);
  }
  return yStride;
}

/** The uniform `Params` of a matmul shader (see `header`); `eps` only where x is normalized. */
function matmulParams(
  gpu: Gpu,
  label: string,
  [T, K, N, xOffset, yOffset, yStride]: number[],
  block: number,
  eps: number,
): GPUBuffer {
  const raw = new Uint32Array(12); // 9 fields, padded to 16 bytes
  raw.set([T, K, N, xOffset, yOffset, K >>> 2, block > 1 ? (N * K) / block : 0, 0, yStride]);
  new Float32Array(raw.buffer)[7] = eps;
  return gpu.uniform(`${label}.params`, raw);
}

/** {@linkcode createLinear} on int8 x ({@linkcode int8xFor}) for q8_0 / q4_0 weights on `path`. */
async function createInt8Linear(
  gpu: Gpu,
  args: MatmulArgs,
  path: MatmulPath,
): Promise<Dispatch[]> {
  const { T, K, N, label } = args;
  if (!int8xAvailable()) {
    throw new RangeError(
      `${label}: matvecTuning.int8x needs WGSL's packed_4x8_integer_dot_product, which this ` +
        'runtime lacks (set it to "auto" or false)',
    );
  }
  const block = checkArgs(gpu, args);
  const max = path === "matvec" ? MATVEC_MAX_T : MATVEC_CHUNKED_MAX_T;
  if (T > max) throw new RangeError(`${label}: ${path} path serves T <= ${max}, got ${T}`);
  const yStride = checkYStride(args);
  const need = int8xScratchBytes(T, K);
  if (args.int8Scratch && args.int8Scratch.size < need) {
    throw new RangeError(
      `${label}: int8Scratch holds ${args.int8Scratch.size} bytes but T=${T} K=${K} needs ${need} ` +
        "(size it with int8xSharedScratchBytes, after setting matvecTuning.int8x)",
    );
  }
  const scratch = args.int8Scratch ?? gpu.buffer(`${label}.int8x`, need, GPUBufferUsage.STORAGE);
  const out = [
    await createQuantizeX(gpu, {
      label: `${label}.quantize_x`,
      x: args.x,
      xOffset: args.xOffset,
      T,
      K,
      norm: args.norm,
      out: scratch,
    }),
  ];
  const spec: MatmulSpec = {
    dtype: args.dtype,
    bias: !!args.bias,
    accumulate: !!args.accumulate,
    norm: !!args.norm,
    swiglu: !!args.swiglu,
  };
  const meta = int8xMetaOffset(T, K), bytes = int8xScratchBytes(T, K);
  const xq = { buffer: scratch, offset: 0, size: T * K };
  const xm = { buffer: scratch, offset: meta, size: bytes - meta };
  let t0 = 0;
  for (const n of path === "matvec" ? [T] : matvecChunks(T, matvecMaxT(args.dtype))) {
    const shape = args.shape ??
      matvecShape(n, gpu.software, { K, N, unitValues: QX_BLOCK }); // a lane steps by blocks
    checkShape(label, shape);
    const pipeline = await gpu.pipeline(
      `matmul.matvec_int8.${specKey(spec)}.T${n}.r${shape.rows}.l${shape.lanes}` +
        `.pt${shape.perThread ?? 1}.u${shape.unroll ?? 1}`,
      () => matvecInt8Wgsl({ ...spec, T: n, shape }),
    );
    const yOffset = (args.yOffset ?? 0) + t0 * yStride;
    out.push({
      label,
      pipeline,
      bindGroup: gpu.bindGroup(label, pipeline, [
        xq,
        args.w,
        args.y,
        matmulParams(gpu, label, [n, K, N, t0 * K, yOffset, yStride], block, 0), // eps: unused
        args.bias,
        undefined,
        xm,
      ]),
      workgroups: grid2d(Math.ceil(N / shape.rows), gpu.limits.maxComputeWorkgroupsPerDimension),
    });
    t0 += n;
  }
  return out;
}

/**
 * Builds the one dispatch of a matvec (T ≤ {@linkcode MATVEC_MAX_T}) or tiled product; the
 * default path is matvec up to 17 rows, tiled above. {@linkcode createLinear} also chunks.
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
  const block = checkArgs(gpu, args);
  const path = args.path ?? (T <= MATVEC_MAX_T ? "matvec" : "tiled");
  if (path === "chunked") {
    throw new RangeError(`${args.label}: the chunked path is several dispatches (createLinear)`);
  }
  const spec: MatmulSpec = {
    dtype,
    bias: !!args.bias,
    accumulate: !!args.accumulate,
    norm: !!args.norm,
    swiglu: !!args.swiglu,
  };
  let pipeline: GPUComputePipeline;
  let workgroups: [number, number, number];
  if (path === "matvec") {
    if (T > MATVEC_MAX_T) {
      throw new RangeError(
        `${args.label}: matvec path serves T <= ${MATVEC_MAX_T}, got ${T}`,
      );
    }
    const shape = args.shape ??
      matvecShape(T, gpu.software, { K, N, unitValues: matvecUnitValues(dtype) });
    const rt = shape.perThread ?? 1;
    checkShape(args.label, shape);
    const vec4 = K % 4 === 0 && xOffset % 4 === 0;
    pipeline = await gpu.pipeline(
      `matmul.matvec.${specKey(spec)}.T${T}.r${shape.rows}.l${shape.lanes}.pt${rt}` +
        `.u${shape.unroll ?? 1}` +
        `.vec${vec4 ? 4 : 1}.f${+(args.factor ?? true)}`,
      () => matvecWgsl({ ...spec, T, vec4, shape, factor: args.factor }),
    );
    workgroups = grid2d(Math.ceil(N / shape.rows), gpu.limits.maxComputeWorkgroupsPerDimension);
  } else {
    pipeline = await gpu.pipeline(
      `matmul.tiled.${specKey(spec)}.m${TILE_M}.n${TILE_N}.k${TILE_K}.r${MICRO}`,
      () => tiledWgsl(spec),
    );
    workgroups = [Math.ceil(N / TILE_N), Math.ceil(T / TILE_M), 1];
    const max = gpu.limits.maxComputeWorkgroupsPerDimension;
    if (workgroups[0] > max || workgroups[1] > max) {
      throw new RangeError(`${args.label}: tiled grid ${workgroups} exceeds ${max} per dimension`);
    }
  }
  const yStride = checkYStride(args);
  const params = matmulParams(
    gpu,
    args.label,
    [T, K, N, xOffset, yOffset, yStride],
    block,
    args.norm?.eps ?? 0,
  );
  return {
    label: args.label,
    pipeline,
    bindGroup: gpu.bindGroup(args.label, pipeline, [
      args.x,
      args.w,
      args.y,
      params,
      args.bias,
      args.norm?.weight,
    ]),
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

/** The fusions of {@linkcode fusedMatmulRef}. */
export interface FusedRefOptions {
  /** Bias: [N]. */
  bias?: Float32Array;
  /** Previous y to add (residual). */
  yOld?: Float32Array;
  /** RMSNorm of x first: weight [K] and epsilon. */
  norm?: { weight: Float32Array; eps: number };
  /** Rows of W are (gate, up) pairs: the result is silu(gate) * up, [T, N / 2]. */
  swiglu?: boolean;
}

/**
 * CPU reference of the fused product, composed from the unfused references: `rmsnormRef`, then
 * {@linkcode matmulRef}, then `swigluRef` over the de-interleaved (gate, up) columns.
 *
 * @example
 * ```ts
 * import { fusedMatmulRef } from "./matmul.ts";
 * // one row x = [3, 4] normalized (rms 3.54), W = [[1, 0], [0, 1]] as a (gate, up) pair
 * const y = fusedMatmulRef(new Float32Array([3, 4]), new Float32Array([1, 0, 0, 1]), 1, 2, 2, {
 *   norm: { weight: new Float32Array([1, 1]), eps: 0 },
 *   swiglu: true,
 * });
 * console.log(y.length); // 1
 * ```
 */
export function fusedMatmulRef(
  x: Float32Array,
  w: Float32Array,
  T: number,
  K: number,
  N: number,
  o: FusedRefOptions = {},
): Float32Array {
  const xn = o.norm ? rmsnormRef(x, o.norm.weight, T, K, o.norm.eps) : x;
  const y = matmulRef(xn, w, T, K, N, o.bias, o.yOld);
  return o.swiglu ? swigluPairs(y, T, N) : y;
}

/** silu(gate) * up of the (gate, up) column pairs of y: [T, N] → [T, N / 2]. */
function swigluPairs(y: Float32Array, T: number, N: number): Float32Array {
  const F = N / 2, gate = new Float32Array(T * F), up = new Float32Array(T * F);
  for (let t = 0; t < T; t++) {
    for (let i = 0; i < F; i++) {
      gate[t * F + i] = y[t * N + 2 * i];
      up[t * F + i] = y[t * N + 2 * i + 1];
    }
  }
  return swigluRef(gate, up);
}

/**
 * CPU reference of the int8 matrix-vector path: what {@linkcode matvecInt8Wgsl} computes from x
 * quantized as `qx` (`quantizeXRef` of `kernels/quantize_x.ts`; with a folded RMSNorm the gain
 * was applied there and `qx.rinv` holds each row's 1 / rms) and the weights' decoded values `w`
 * ([N, K], `decodeWeights`): `y[t, n] = rinv_t Σ_k (d_x q_x)[t, k] w[n, k] (+ bias) (+ yOld)`,
 * in f64, then SwiGLU over (gate, up) pairs. Per block that sum is the kernel's
 * `d_w d_x Σ q_w q_x` exactly (q4_0: `Σ (n − 8) q_x`), so the kernel differs only by its f32
 * rounding of `d_w d_x` and of the accumulation. `o.norm` is ignored (it is in `qx`).
 *
 * @example
 * ```ts
 * import { int8MatmulRef } from "./matmul.ts";
 * import { quantizeXRef } from "./quantize_x.ts";
 * const qx = quantizeXRef(new Float32Array(32).fill(0.5), 1, 32); // q = 127, d = 0.5 / 127
 * console.log(int8MatmulRef(qx, new Float32Array(32).fill(2), 1)[0].toFixed(3)); // "32.000"
 * ```
 */
export function int8MatmulRef(
  qx: QuantizedX,
  w: Float32Array,
  N: number,
  o: FusedRefOptions = {},
): Float32Array {
  const { T, K } = qx;
  const y = new Float32Array(T * N);
  for (let t = 0; t < T; t++) {
    for (let n = 0; n < N; n++) {
      let s = 0;
      for (let k = 0; k < K; k++) {
        s += qx.d[Math.floor((t * K + k) / QX_BLOCK)] * qx.q[t * K + k] * w[n * K + k];
      }
      s *= qx.rinv[t];
      if (o.bias) s += o.bias[n];
      if (o.yOld) s += o.yOld[t * N + n];
      y[t * N + n] = s;
    }
  }
  return o.swiglu ? swigluPairs(y, T, N) : y;
}
