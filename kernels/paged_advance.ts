/**
 * Moves every row of a batched decode step one position on, on the GPU: `rows[r].pos += 1` for
 * r < R (the paged rows `[R] (seq, pos)` of kernels/paged_attention.ts). Ends each step of
 * engine/batch.ts, so several steps run per submission without positions travelling from the CPU.
 *
 * @module
 */
import type { Dispatch, Gpu } from "../engine/gpu.ts";

/** Invocations per workgroup. */
export const PAGED_ADVANCE_WG = 64;

/** WGSL: one invocation per row. */
export function pagedAdvanceWgsl(): string {
  return /* wgsl */ `
// One invocation per batch row r < R (${PAGED_ADVANCE_WG} per workgroup): rows[r].pos += 1.
struct Params { R: u32 }
@group(0) @binding(0) var<storage, read_write> rows: array<vec2<u32>>; // rows: [>= R] (seq, pos)
@group(0) @binding(1) var<uniform> p: Params;

@compute @workgroup_size(${PAGED_ADVANCE_WG})
fn main(@builtin(global_invocation_id) g: vec3u) {
  if (g.x >= p.R) { return; }
  rows[g.x].y = rows[g.x].y + 1u;
}
`;
}

/** Buffers for {@linkcode createPagedAdvance}. */
export interface PagedAdvanceArgs {
  /** Label of the dispatch. */
  label: string;
  /** rows: [>= R] (seq, pos) u32 pairs. */
  rows: GPUBuffer;
  /** Rows to advance. */
  R: number;
}

/** Builds the dispatch `rows[r].pos += 1` for r < R. */
export async function createPagedAdvance(gpu: Gpu, args: PagedAdvanceArgs): Promise<Dispatch> {
  if (!Number.isInteger(args.R) || args.R < 1) {
    throw new RangeError(`${args.label}: R must be an integer >= 1, got ${args.R}`);
  }
  if (args.rows.size < args.R * 8) {
    throw new RangeError(`${args.label}: rows buffer of ${args.rows.size} bytes < R=${args.R} x 8`);
  }
  const pipeline = await gpu.pipeline(`paged_advance.wg${PAGED_ADVANCE_WG}`, pagedAdvanceWgsl);
  const params = gpu.uniform(`${args.label}.params`, new Uint32Array([args.R]));
  return {
    label: args.label,
    pipeline,
    bindGroup: gpu.bindGroup(args.label, pipeline, [args.rows, params]),
    workgroups: [Math.ceil(args.R / PAGED_ADVANCE_WG), 1, 1],
  };
}

/**
 * CPU reference of {@linkcode pagedAdvanceWgsl} on a rows image `[R', 2]` (in place).
 *
 * @example
 * ```ts
 * import { pagedAdvanceRef } from "./paged_advance.ts";
 * const rows = new Uint32Array([0, 5, 1, 9, 7, 7]);
 * pagedAdvanceRef(rows, 2);
 * console.log([...rows]); // [0, 6, 1, 10, 7, 7]
 * ```
 */
export function pagedAdvanceRef(rows: Uint32Array, R: number): void {
  for (let r = 0; r < R; r++) rows[2 * r + 1]++;
}
