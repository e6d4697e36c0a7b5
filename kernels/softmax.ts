/**
 * Numerically stable softmax over the rows of `x[T, N]`:
 * `y[t, i] = exp(x[t, i] - max_j x[t, j]) / sum_j exp(x[t, j] - max)`.
 *
 * @module
 */
import { type Dispatch, type Gpu, grid2d } from "../engine/gpu.ts";

/** Invocations per workgroup (one workgroup per row). */
export const SOFTMAX_WG = 256;

/** WGSL of softmax; `inPlace` reads and writes the one buffer `x`. */
export function softmaxWgsl(inPlace: boolean): string {
  const out = inPlace ? "x" : "y";
  const outOff = inPlace ? "p.xOffset" : "p.yOffset";
  return /* wgsl */ `
// Softmax: one workgroup of ${SOFTMAX_WG} invocations owns one row (rows may spread over a 2-D
// grid). Pass 1: invocation i keeps an online (max, sum of exp(v - max)) over elements
// i, i + ${SOFTMAX_WG}, ... (loop bound masks ragged N); the pairs are tree-reduced in workgroup
// memory. Pass 2: each invocation writes exp(v - max) / sum for the same elements${
    inPlace ? ", in place" : ""
  }.
// Workgroups past T return (uniformly, before any barrier).
struct Params {
  T: u32,       // rows
  N: u32,       // row length
  xOffset: u32, // element offset of x[0, 0]
  yOffset: u32, // element offset of y[0, 0] (unused in place)
}
@group(0) @binding(0) var<storage, ${inPlace ? "read_write" : "read"}> x: array<f32>; // x: [T, N]
${inPlace ? "" : "@group(0) @binding(2) var<storage, read_write> y: array<f32>; // y: [T, N]"}
@group(0) @binding(1) var<uniform> p: Params;

var<workgroup> redM: array<f32, ${SOFTMAX_WG}>;
var<workgroup> redS: array<f32, ${SOFTMAX_WG}>;

@compute @workgroup_size(${SOFTMAX_WG})
fn main(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
        @builtin(local_invocation_index) lid: u32) {
  let t = wg.y * nwg.x + wg.x;
  if (t >= p.T) { return; }
  let row = p.xOffset + t * p.N;
  var m = -3.4028235e38;
  var s = 0.0;
  for (var i = lid; i < p.N; i += ${SOFTMAX_WG}u) {
    let v = x[row + i];
    if (v > m) { s = s * exp(m - v) + 1.0; m = v; } else { s += exp(v - m); }
  }
  redM[lid] = m;
  redS[lid] = s;
  workgroupBarrier();
  for (var k = ${SOFTMAX_WG / 2}u; k > 0u; k >>= 1u) {
    if (lid < k) {
      let m2 = redM[lid + k];
      let mm = max(m, m2);
      s = s * exp(m - mm) + redS[lid + k] * exp(m2 - mm);
      m = mm;
      redM[lid] = m;
      redS[lid] = s;
    }
    workgroupBarrier();
  }
  let mx = redM[0];
  let inv = 1.0 / redS[0];
  let orow = ${outOff} + t * p.N;
  for (var i = lid; i < p.N; i += ${SOFTMAX_WG}u) { ${out}[orow + i] = exp(x[row + i] - mx) * inv; }
}
`;
}

/** Buffers and sizes for {@linkcode createSoftmax}. */
export interface SoftmaxArgs {
  /** Label of the dispatch. */
  label: string;
  /** x: [T, N] f32 at element `xOffset`; overwritten with the result when `y` is absent. */
  x: GPUBuffer;
  /** Element offset of x[0, 0]; default 0. */
  xOffset?: number;
  /** y: [T, N] f32 at `yOffset`; omit to compute in place in `x`. Must not be `x`. */
  y?: GPUBuffer;
  /** Element offset of y[0, 0]; default 0. */
  yOffset?: number;
  /** Rows. */
  T: number;
  /** Row length. */
  N: number;
}

/**
 * Builds the softmax dispatch (in place when `y` is absent).
 *
 * @example
 * ```ts ignore
 * const d = await createSoftmax(gpu, { label: "probs", x: logits, T: 1, N: 32000 });
 * ```
 */
export async function createSoftmax(gpu: Gpu, args: SoftmaxArgs): Promise<Dispatch> {
  const inPlace = !args.y;
  const pipeline = await gpu.pipeline(
    `softmax.${inPlace ? "inplace" : "out"}.wg${SOFTMAX_WG}`,
    () => softmaxWgsl(inPlace),
  );
  const params = gpu.uniform(
    `${args.label}.params`,
    new Uint32Array([args.T, args.N, args.xOffset ?? 0, args.yOffset ?? 0]),
  );
  const buffers = inPlace ? [args.x, params] : [args.x, params, args.y!];
  return {
    label: args.label,
    pipeline,
    bindGroup: gpu.bindGroup(args.label, pipeline, buffers),
    workgroups: grid2d(args.T, gpu.limits.maxComputeWorkgroupsPerDimension),
  };
}

/**
 * CPU reference: row-wise stable softmax of `x[T, N]`.
 *
 * @example
 * ```ts
 * import { softmaxRef } from "./softmax.ts";
 * console.log([...softmaxRef(new Float32Array([0, Math.log(3)]), 1, 2)]); // [0.25, 0.75]
 * ```
 */
export function softmaxRef(x: Float32Array, T: number, N: number): Float32Array {
  const y = new Float32Array(T * N);
  for (let t = 0; t < T; t++) {
    let m = -Infinity;
    for (let i = 0; i < N; i++) m = Math.max(m, x[t * N + i]);
    let s = 0;
    for (let i = 0; i < N; i++) s += Math.exp(x[t * N + i] - m);
    for (let i = 0; i < N; i++) y[t * N + i] = Math.exp(x[t * N + i] - m) / s;
  }
  return y;
}
