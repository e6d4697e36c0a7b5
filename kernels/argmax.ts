/**
 * Greedy pick: `ids[idsOffset + t] = argmax_i logits[t, i]` (ties go to the lowest index, like
 * numpy and torch).
 *
 * @module
 */
import { type Dispatch, type Gpu, grid2d } from "../engine/gpu.ts";

/** Invocations per workgroup (one workgroup per row). */
export const ARGMAX_WG = 256;

/** WGSL of the row-wise argmax. */
export function argmaxWgsl(): string {
  return /* wgsl */ `
// Argmax: one workgroup of ${ARGMAX_WG} invocations owns one row (rows may spread over a 2-D
// grid). Invocation i scans elements i, i + ${ARGMAX_WG}, ... (coalesced; the loop bound masks
// ragged V) keeping the first maximum, then (value, index) pairs are tree-reduced in workgroup
// memory preferring the larger value, and the lower index on ties. NaN never wins.
struct Params {
  T: u32,         // rows
  V: u32,         // row length (vocabulary)
  xOffset: u32,   // element offset of logits[0, 0]
  idsOffset: u32, // element offset of ids[0]
}
@group(0) @binding(0) var<storage, read> logits: array<f32>;  // logits: [T, V] f32 at xOffset
@group(0) @binding(1) var<storage, read_write> ids: array<u32>; // ids: [T] u32 at idsOffset
@group(0) @binding(2) var<uniform> p: Params;

var<workgroup> redV: array<f32, ${ARGMAX_WG}>;
var<workgroup> redI: array<u32, ${ARGMAX_WG}>;

@compute @workgroup_size(${ARGMAX_WG})
fn main(@builtin(workgroup_id) wg: vec3u, @builtin(num_workgroups) nwg: vec3u,
        @builtin(local_invocation_index) lid: u32) {
  let t = wg.y * nwg.x + wg.x;
  if (t >= p.T) { return; }
  let row = p.xOffset + t * p.V;
  var best = -3.4028235e38;
  var bi = 0xffffffffu;
  for (var i = lid; i < p.V; i += ${ARGMAX_WG}u) {
    let v = logits[row + i];
    if (v > best || (bi == 0xffffffffu && v == best)) { best = v; bi = i; }
  }
  redV[lid] = best;
  redI[lid] = bi;
  workgroupBarrier();
  for (var s = ${ARGMAX_WG / 2}u; s > 0u; s >>= 1u) {
    if (lid < s) {
      let v = redV[lid + s];
      let j = redI[lid + s];
      if (v > best || (v == best && j < bi)) { best = v; bi = j; redV[lid] = v; redI[lid] = j; }
    }
    workgroupBarrier();
  }
  if (lid == 0u) { ids[p.idsOffset + t] = select(bi, 0u, bi == 0xffffffffu); }
}
`;
}

/** Buffers and sizes for {@linkcode createArgmax}. */
export interface ArgmaxArgs {
  /** Label of the dispatch. */
  label: string;
  /** logits: [T, V] f32 at element `xOffset`. */
  logits: GPUBuffer;
  /** Element offset of logits[0, 0]; default 0. */
  xOffset?: number;
  /** ids: u32 output; row t's id goes to element `idsOffset + t`. */
  ids: GPUBuffer;
  /** Element offset of the first id; default 0. */
  idsOffset?: number;
  /** Rows. */
  T: number;
  /** Row length (vocabulary size). */
  V: number;
}

/**
 * Builds the argmax dispatch.
 *
 * @example
 * ```ts ignore
 * const d = await createArgmax(gpu, { label: "greedy", logits, ids, idsOffset: 3, T: 1, V: 32000 });
 * ```
 */
export async function createArgmax(gpu: Gpu, args: ArgmaxArgs): Promise<Dispatch> {
  const pipeline = await gpu.pipeline(`argmax.wg${ARGMAX_WG}`, argmaxWgsl);
  const params = gpu.uniform(
    `${args.label}.params`,
    new Uint32Array([args.T, args.V, args.xOffset ?? 0, args.idsOffset ?? 0]),
  );
  return {
    label: args.label,
    pipeline,
    bindGroup: gpu.bindGroup(args.label, pipeline, [args.logits, args.ids, params]),
    workgroups: grid2d(args.T, gpu.limits.maxComputeWorkgroupsPerDimension),
  };
}

/**
 * CPU reference: first index of the maximum of each row of `logits[T, V]`.
 *
 * @example
 * ```ts
 * import { argmaxRef } from "./argmax.ts";
 * console.log([...argmaxRef(new Float32Array([1, 5, 5, -3, -2, -1]), 2, 3)]); // [1, 2]
 * ```
 */
export function argmaxRef(logits: Float32Array, T: number, V: number): Uint32Array {
  const ids = new Uint32Array(T);
  for (let t = 0; t < T; t++) {
    let bi = 0;
    for (let i = 1; i < V; i++) if (logits[t * V + i] > logits[t * V + bi]) bi = i;
    ids[t] = bi;
  }
  return ids;
}
