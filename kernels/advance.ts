/**
 * Moves a model's cache position on the GPU: `state[0] += by`. Ends every forward plan, so
 * positions never travel from the CPU per token.
 *
 * @module
 */
import type { Dispatch, Gpu } from "../engine/gpu.ts";

/** WGSL: a single invocation updates state[0]. */
export function advanceWgsl(): string {
  return /* wgsl */ `
// One workgroup of one invocation: state[0] += by.
struct Params { by: u32 }
@group(0) @binding(0) var<storage, read_write> state: array<u32>; // state: [>=1] u32, state[0] = pos
@group(0) @binding(1) var<uniform> p: Params;

@compute @workgroup_size(1)
fn main() {
  state[0] = state[0] + p.by;
}
`;
}

/** Buffers for {@linkcode createAdvance}. */
export interface AdvanceArgs {
  /** Label of the dispatch. */
  label: string;
  /** The model's state buffer. */
  state: GPUBuffer;
  /** Rows to advance by. */
  by: number;
}

/** Builds the dispatch `state[0] += by`. */
export async function createAdvance(gpu: Gpu, args: AdvanceArgs): Promise<Dispatch> {
  const pipeline = await gpu.pipeline("advance", advanceWgsl);
  const params = gpu.uniform(`${args.label}.params`, new Uint32Array([args.by]));
  return {
    label: args.label,
    pipeline,
    bindGroup: gpu.bindGroup(args.label, pipeline, [args.state, params]),
    workgroups: [1, 1, 1],
  };
}

/** CPU reference of {@linkcode advanceWgsl}. */
export function advanceRef(state: Uint32Array, by: number): void {
  state[0] += by;
}
