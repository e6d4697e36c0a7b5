/**
 * RMSNorm over T rows: `y[t, :] = x[t, :] / sqrt(mean(x[t, :]^2) + eps) * w`.
 *
 * @module
 */
import { type Dispatch, type Gpu, grid2d } from "../engine/gpu.ts";

/** Invocations per workgroup (one workgroup per row). */
export const RMSNORM_WG = 256;

/** WGSL of the RMSNorm kernel. */
export function rmsnormWgsl(): string {
  return /* wgsl */ `
// RMSNorm: one workgroup of ${RMSNORM_WG} invocations owns one row t (rows may spread over a 2-D
// grid). Invocation i sums squares of elements i, i + ${RMSNORM_WG}, ... (the loop bound masks
// ragged D), the sums are tree-reduced in workgroup memory, then each invocation scales the same
// elements it read. Workgroups past T return (uniformly, before any barrier).
struct Params {
  T: u32,       // rows
  D: u32,       // row width
  xOffset: u32, // element offset of x[0, 0] in x
  yOffset: u32, // element offset of y[0, 0] in y
  eps: f32,     // epsilon added to the mean square
}
@group(0) @binding(0) var<storage, read> x: array<f32>;       // x: [T, D] f32 at xOffset
@group(0) @binding(1) var<storage, read> w: array<f32>;       // w: [D] f32
@group(0) @binding(2) var<storage, read_write> y: array<f32>; // y: [T, D] f32 at yOffset
@group(0) @binding(3) var<uniform> p: Params;

var<workgroup> red: array<f32, ${RMSNORM_WG}>;

@compute @workgroup_size(${RMSNORM_WG})
fn main(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
        @builtin(local_invocation_index) lid: u32) {
  let t = wg.y * nwg.x + wg.x;
  if (t >= p.T) { return; }
  let xRow = p.xOffset + t * p.D;
  var ss = 0.0;
  for (var i = lid; i < p.D; i += ${RMSNORM_WG}u) { let v = x[xRow + i]; ss += v * v; }
  red[lid] = ss;
  workgroupBarrier();
  for (var s = ${RMSNORM_WG / 2}u; s > 0u; s >>= 1u) {
    if (lid < s) { red[lid] += red[lid + s]; }
    workgroupBarrier();
  }
  let scale = inverseSqrt(red[0] / f32(p.D) + p.eps);
  let yRow = p.yOffset + t * p.D;
  for (var i = lid; i < p.D; i += ${RMSNORM_WG}u) { y[yRow + i] = x[xRow + i] * scale * w[i]; }
}
`;
}

/** Buffers and sizes for {@linkcode createRmsnorm}. */
export interface RmsnormArgs {
  /** Label of the dispatch, e.g. `target.L0.attn_norm`. */
  label: string;
  /** x: [T, D] f32 at element `xOffset`. */
  x: GPUBuffer;
  /** Element offset of x[0, 0]; default 0. */
  xOffset?: number;
  /** w: [D] f32 norm weight. */
  w: GPUBuffer;
  /** y: [T, D] f32 at element `yOffset`; must be a different buffer from `x`. */
  y: GPUBuffer;
  /** Element offset of y[0, 0]; default 0. */
  yOffset?: number;
  /** Rows. */
  T: number;
  /** Row width. */
  D: number;
  /** Epsilon (ModelConfig.normEps). */
  eps: number;
}

/**
 * Builds the RMSNorm dispatch (pipeline, params and bind group once).
 *
 * @example
 * ```ts ignore
 * const d = await createRmsnorm(gpu, { label: "L0.norm", x, w, y, T: 1, D: 576, eps: 1e-5 });
 * ```
 */
export async function createRmsnorm(gpu: Gpu, args: RmsnormArgs): Promise<Dispatch> {
  const pipeline = await gpu.pipeline(`rmsnorm.wg${RMSNORM_WG}`, rmsnormWgsl);
  const raw = new ArrayBuffer(32);
  new Uint32Array(raw).set([args.T, args.D, args.xOffset ?? 0, args.yOffset ?? 0]);
  new Float32Array(raw)[4] = args.eps;
  const params = gpu.uniform(`${args.label}.params`, new Uint8Array(raw));
  return {
    label: args.label,
    pipeline,
    bindGroup: gpu.bindGroup(args.label, pipeline, [args.x, args.w, args.y, params]),
    workgroups: grid2d(args.T, gpu.limits.maxComputeWorkgroupsPerDimension),
  };
}

/**
 * CPU reference of RMSNorm over `T` rows of width `D`.
 *
 * @example
 * ```ts
 * import { rmsnormRef } from "./rmsnorm.ts";
 * const y = rmsnormRef(new Float32Array([3, 4]), new Float32Array([1, 2]), 1, 2, 0);
 * console.log([...y]); // ≈ [0.8485, 2.2627]: rms = sqrt(12.5)
 * ```
 */
export function rmsnormRef(
  x: Float32Array,
  w: Float32Array,
  T: number,
  D: number,
  eps: number,
): Float32Array {
  const y = new Float32Array(T * D);
  for (let t = 0; t < T; t++) {
    let ss = 0;
    for (let i = 0; i < D; i++) ss += x[t * D + i] ** 2;
    const scale = 1 / Math.sqrt(ss / D + eps);
    for (let i = 0; i < D; i++) y[t * D + i] = x[t * D + i] * scale * w[i];
  }
  return y;
}
