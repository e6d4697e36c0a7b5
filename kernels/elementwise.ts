/**
 * Elementwise binary ops on f32 activations: `out[i] = a[i] op b[i]` for add (residual) and mul.
 *
 * @module
 */
import { type Dispatch, type Gpu, grid2d } from "../engine/gpu.ts";

/** Invocations per workgroup. */
export const ELEMENTWISE_WG = 256;

/** A supported elementwise binary op. */
export type ElementwiseOp = "add" | "mul";

/** WGSL for `op`: each invocation owns one element; the tail past `n` is masked. */
export function elementwiseWgsl(op: ElementwiseOp): string {
  const expr = op === "add" ? "a[i] + b[i]" : "a[i] * b[i]";
  return /* wgsl */ `
// Elementwise ${op}: one invocation per element, ${ELEMENTWISE_WG} per workgroup; the grid may be
// 2-D for large n (x fastest); invocations past n return.
struct Params { n: u32, rowStride: u32 }
@group(0) @binding(0) var<storage, read> a: array<f32>;        // a: [n]
@group(0) @binding(1) var<storage, read> b: array<f32>;        // b: [n]
@group(0) @binding(2) var<storage, read_write> out: array<f32>; // out: [n] (may alias nothing)
@group(0) @binding(3) var<uniform> p: Params;

@compute @workgroup_size(${ELEMENTWISE_WG})
fn main(@builtin(global_invocation_id) g: vec3u) {
  let i = g.y * p.rowStride + g.x;
  if (i >= p.n) { return; }
  out[i] = ${expr};
}
`;
}

/** Buffers and size for {@linkcode createElementwise}. */
export interface ElementwiseArgs {
  label: string;
  op: ElementwiseOp;
  a: GPUBuffer;
  b: GPUBuffer;
  out: GPUBuffer;
  n: number;
}

/** Builds the dispatch computing `out = a op b` over `n` f32 elements. */
export async function createElementwise(gpu: Gpu, args: ElementwiseArgs): Promise<Dispatch> {
  const pipeline = await gpu.pipeline(
    `elementwise.${args.op}.wg${ELEMENTWISE_WG}`,
    () => elementwiseWgsl(args.op),
  );
  const groups = grid2d(Math.ceil(args.n / ELEMENTWISE_WG));
  const params = gpu.uniform(
    `${args.label}.params`,
    new Uint32Array([args.n, groups[0] * ELEMENTWISE_WG]),
  );
  return {
    label: args.label,
    pipeline,
    bindGroup: gpu.bindGroup(args.label, pipeline, [args.a, args.b, args.out, params]),
    workgroups: groups,
  };
}

/** CPU reference for {@linkcode elementwiseWgsl}. */
export function elementwiseRef(op: ElementwiseOp, a: Float32Array, b: Float32Array): Float32Array {
  const out = new Float32Array(a.length);
  for (let i = 0; i < a.length; i++) out[i] = op === "add" ? a[i] + b[i] : a[i] * b[i];
  return out;
}
