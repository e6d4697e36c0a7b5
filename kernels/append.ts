/**
 * Records a sampled token in the generation's output on the GPU and detects the end: the
 * bookkeeping step of the GPU-resident decode loop, so the CPU only reads results back rarely.
 *
 * loop state (u32): [0] = tokens appended so far, [1] = done flag (1 after an EOS id, or once
 * `maxOut` tokens were appended). Once done, further appends do nothing.
 *
 * @module
 */
import type { Dispatch, Gpu } from "../engine/gpu.ts";

/** Most EOS ids a model may declare. */
export const APPEND_MAX_EOS = 8;

/** WGSL: a single invocation appends one token. */
export function appendWgsl(): string {
  return /* wgsl */ `
// One workgroup of one invocation: out[run[0]] = token; run[0] += 1; set run[1] on EOS or full.
struct Params { nEos: u32, maxOut: u32, tokenOffset: u32, pad: u32, eos: array<vec4u, ${
    APPEND_MAX_EOS / 4
  }> }
@group(0) @binding(0) var<storage, read> token: array<u32>;       // token[tokenOffset]: the sampled id
@group(0) @binding(1) var<storage, read_write> run: array<u32>;   // run (loop state): [count, done, ...]
@group(0) @binding(2) var<storage, read_write> out: array<u32>;   // out: [maxOut] generated ids
@group(0) @binding(3) var<uniform> p: Params;

@compute @workgroup_size(1)
fn main() {
  if (run[1] != 0u) { return; }
  let id = token[p.tokenOffset];
  out[run[0]] = id;
  run[0] = run[0] + 1u;
  var done = run[0] >= p.maxOut;
  for (var i = 0u; i < p.nEos; i++) {
    if (p.eos[i / 4u][i % 4u] == id) { done = true; }
  }
  if (done) { run[1] = 1u; }
}
`;
}

/** Buffers and settings for {@linkcode createAppend}. */
export interface AppendArgs {
  /** Label of the dispatch. */
  label: string;
  /** Buffer holding the sampled token at `tokenOffset`. */
  token: GPUBuffer;
  /** Element offset of the sampled token; default 0. */
  tokenOffset?: number;
  /** loop: [count, done] u32. */
  loop: GPUBuffer;
  /** out: [maxOut] u32 generated ids. */
  out: GPUBuffer;
  /** Capacity of `out`: the loop is done once this many ids were appended. */
  maxOut: number;
  /** End-of-sequence ids (at most {@linkcode APPEND_MAX_EOS}). */
  eos: readonly number[];
}

/** Builds the append dispatch. */
export async function createAppend(gpu: Gpu, args: AppendArgs): Promise<Dispatch> {
  if (args.eos.length > APPEND_MAX_EOS) {
    throw new RangeError(`${args.label}: ${args.eos.length} EOS ids > ${APPEND_MAX_EOS}`);
  }
  const pipeline = await gpu.pipeline(`append.eos${APPEND_MAX_EOS}`, appendWgsl);
  const params = new Uint32Array(4 + APPEND_MAX_EOS);
  params.set([args.eos.length, args.maxOut, args.tokenOffset ?? 0, 0]);
  params.set(args.eos, 4);
  return {
    label: args.label,
    pipeline,
    bindGroup: gpu.bindGroup(args.label, pipeline, [
      args.token,
      args.loop,
      args.out,
      gpu.uniform(`${args.label}.params`, params),
    ]),
    workgroups: [1, 1, 1],
  };
}

/** CPU reference of {@linkcode appendWgsl}. */
export function appendRef(
  id: number,
  loop: Uint32Array,
  out: Uint32Array,
  maxOut: number,
  eos: readonly number[],
): void {
  if (loop[1]) return;
  out[loop[0]++] = id;
  if (loop[0] >= maxOut || eos.includes(id)) loop[1] = 1;
}
