/**
 * SwiGLU gate: `h[t, i] = silu(gate[t, i]) * up[t, i]`, `silu(v) = v / (1 + exp(-v))`.
 *
 * gate and up are read through (offset, row stride), so they may be two buffers [T, F] or one
 * fused buffer [T, 2F] holding gate then up in each row: bind the same buffer twice with
 * `gateOffset: 0, upOffset: F, inStride: 2F`.
 *
 * @module
 */
import type { Dispatch, Gpu } from "../engine/gpu.ts";

/** Invocations per workgroup (along F). */
export const SWIGLU_WG = 256;

/** WGSL of the SwiGLU kernel. */
export function swigluWgsl(): string {
  return /* wgsl */ `
// SwiGLU: one invocation per output element; workgroup (bx, t) covers elements
// bx*${SWIGLU_WG} .. +${SWIGLU_WG} of row t. Invocations past F return.
struct Params {
  T: u32,          // rows
  F: u32,          // hidden width
  inStride: u32,   // elements between rows of gate / up (F, or 2F for a fused buffer)
  gateOffset: u32, // element offset of gate[0, 0]
  upOffset: u32,   // element offset of up[0, 0]
  hOffset: u32,    // element offset of h[0, 0]
}
@group(0) @binding(0) var<storage, read> gate: array<f32>;    // gate: [T, inStride] f32
@group(0) @binding(1) var<storage, read> up: array<f32>;      // up: [T, inStride] f32
@group(0) @binding(2) var<storage, read_write> h: array<f32>; // h: [T, F] f32
@group(0) @binding(3) var<uniform> p: Params;

@compute @workgroup_size(${SWIGLU_WG})
fn main(@builtin(global_invocation_id) g: vec3u) {
  let i = g.x;
  let t = g.y;
  if (i >= p.F || t >= p.T) { return; }
  let v = gate[p.gateOffset + t * p.inStride + i];
  h[p.hOffset + t * p.F + i] = v / (1.0 + exp(-v)) * up[p.upOffset + t * p.inStride + i];
}
`;
}

/** Buffers and sizes for {@linkcode createSwiglu}. */
export interface SwigluArgs {
  /** Label of the dispatch. */
  label: string;
  /** gate: f32, row t at `gateOffset + t * inStride`. */
  gate: GPUBuffer;
  /** up: f32, row t at `upOffset + t * inStride` (may be the same buffer as `gate`). */
  up: GPUBuffer;
  /** h: [T, F] f32 output at `hOffset`; must not be `gate` or `up`. */
  h: GPUBuffer;
  /** Rows. */
  T: number;
  /** Hidden width. */
  F: number;
  /** Elements between rows of gate/up; default F (use 2F for a fused [T, 2F] buffer). */
  inStride?: number;
  /** Element offset of gate[0, 0]; default 0. */
  gateOffset?: number;
  /** Element offset of up[0, 0]; default 0 (F for a fused buffer). */
  upOffset?: number;
  /** Element offset of h[0, 0]; default 0. */
  hOffset?: number;
}

/**
 * Builds the SwiGLU dispatch.
 *
 * @example Fused gate/up buffer [T, 2F]
 * ```ts ignore
 * const d = await createSwiglu(gpu, {
 *   label: "L0.mlp.act", gate: gu, up: gu, h, T: 1, F: 1536, inStride: 3072, upOffset: 1536,
 * });
 * ```
 */
export async function createSwiglu(gpu: Gpu, args: SwigluArgs): Promise<Dispatch> {
  if (args.T > gpu.limits.maxComputeWorkgroupsPerDimension) {
    throw new RangeError(`${args.label}: T=${args.T} exceeds the workgroups per dimension`);
  }
  const pipeline = await gpu.pipeline(`swiglu.wg${SWIGLU_WG}`, swigluWgsl);
  const params = gpu.uniform(
    `${args.label}.params`,
    new Uint32Array([
      args.T,
      args.F,
      args.inStride ?? args.F,
      args.gateOffset ?? 0,
      args.upOffset ?? 0,
      args.hOffset ?? 0,
      0,
      0,
    ]),
  );
  return {
    label: args.label,
    pipeline,
    bindGroup: gpu.bindGroup(args.label, pipeline, [args.gate, args.up, args.h, params]),
    workgroups: [Math.ceil(args.F / SWIGLU_WG), args.T, 1],
  };
}

/**
 * CPU reference: `silu(gate) * up` elementwise.
 *
 * @example
 * ```ts
 * import { swigluRef } from "./swiglu.ts";
 * console.log([...swigluRef(new Float32Array([0, 1]), new Float32Array([5, 2]))]); // [0, 1.4621...]
 * ```
 */
export function swigluRef(gate: Float32Array, up: Float32Array): Float32Array {
  return Float32Array.from(gate, (g, i) => g / (1 + Math.exp(-g)) * up[i]);
}
