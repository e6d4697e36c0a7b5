/**
 * The bookkeeping end of one speculative cycle, on the GPU: after the accept kernel chose
 * `count = accepted + 1` tokens, append them to the output and history, roll both models' KV
 * positions back past the rejected rows (a counter move: stale cache rows are masked by
 * position), put the last emitted token first in the next cycle's input, and keep statistics.
 *
 * run state (u32, shared with the sampler's RNG slots):
 *   [0] emitted count  [1] done  [2] sample RNG  [3] accept RNG  [4] max tokens
 *   [5] cycles  [6] accepted draft tokens  [7] prompt length
 *
 * @module
 */
import type { Dispatch, Gpu } from "../engine/gpu.ts";

/** Slots of the run-state buffer (see the module doc). */
export const RUN = {
  count: 0,
  done: 1,
  sampleRng: 2,
  acceptRng: 3,
  maxTokens: 4,
  cycles: 5,
  accepted: 6,
  promptLen: 7,
} as const;

/** u32 slots of the run-state buffer. */
export const RUN_SLOTS = 8;

/** Most EOS ids a model may declare. */
export const COMMIT_MAX_EOS = 8;

/** WGSL: one invocation does the whole (tiny) commit. */
export function commitWgsl(): string {
  return /* wgsl */ `
// One workgroup of one invocation: sequential bookkeeping over at most k + 1 tokens.
struct Params { k: u32, nEos: u32, pad0: u32, pad1: u32, eos: array<vec4u, ${COMMIT_MAX_EOS / 4}> }
@group(0) @binding(0) var<storage, read> outTokens: array<u32>;        // [k + 1] accepted + 1 token
@group(0) @binding(1) var<storage, read> outCount: array<u32>;         // [1] accepted + 1
@group(0) @binding(2) var<storage, read_write> run: array<u32>;        // [8] run state
@group(0) @binding(3) var<storage, read_write> out: array<u32>;        // [maxTokens] emitted ids
@group(0) @binding(4) var<storage, read_write> history: array<u32>;    // [maxSeq] prompt + emitted
@group(0) @binding(5) var<storage, read_write> targetState: array<u32>; // [0] = target pos
@group(0) @binding(6) var<storage, read_write> draftState: array<u32>;  // [0] = draft pos
@group(0) @binding(7) var<storage, read_write> verifyIn: array<u32>;    // [k + 1] next cycle's input
@group(0) @binding(8) var<uniform> p: Params;

@compute @workgroup_size(1)
fn main() {
  let c = outCount[0];
  // Both models processed k + 1 rows this cycle; only the first c are on the accepted path.
  targetState[0] = targetState[0] - (p.k + 1u - c);
  draftState[0] = draftState[0] - (p.k + 1u - c);
  verifyIn[0] = outTokens[c - 1u];
  if (run[1] != 0u) { return; }
  run[5] = run[5] + 1u;
  run[6] = run[6] + c - 1u;
  for (var i = 0u; i < c; i++) {
    let id = outTokens[i];
    out[run[0]] = id;
    history[run[7] + run[0]] = id;
    run[0] = run[0] + 1u;
    var stop = run[0] >= run[4];
    for (var e = 0u; e < p.nEos; e++) {
      if (p.eos[e / 4u][e % 4u] == id) { stop = true; }
    }
    if (stop) { run[1] = 1u; return; }
  }
}
`;
}

/** Buffers and settings for {@linkcode createCommit}. */
export interface CommitArgs {
  /** Label of the dispatch. */
  label: string;
  /** outTokens: [k + 1] u32 from the accept kernel. */
  outTokens: GPUBuffer;
  /** outCount: [1] u32 from the accept kernel. */
  outCount: GPUBuffer;
  /** run: [RUN_SLOTS] u32 run state. */
  run: GPUBuffer;
  /** out: [maxTokens] u32 emitted ids. */
  out: GPUBuffer;
  /** history: [maxSeq] u32, the prompt then the emitted ids (n-gram drafting reads it). */
  history: GPUBuffer;
  /** The target model's state (state[0] = pos). */
  targetState: GPUBuffer;
  /** The draft model's state; for drafts without a cache, any scratch u32 buffer. */
  draftState: GPUBuffer;
  /** verifyIn: [k + 1] u32; slot 0 receives the last emitted token. */
  verifyIn: GPUBuffer;
  /** Draft length. */
  k: number;
  /** End-of-sequence ids. */
  eos: readonly number[];
}

/** Builds the commit dispatch. */
export async function createCommit(gpu: Gpu, args: CommitArgs): Promise<Dispatch> {
  if (args.eos.length > COMMIT_MAX_EOS) {
    throw new RangeError(`${args.label}: ${args.eos.length} EOS ids > ${COMMIT_MAX_EOS}`);
  }
  const pipeline = await gpu.pipeline(`commit.eos${COMMIT_MAX_EOS}`, commitWgsl);
  const params = new Uint32Array(4 + COMMIT_MAX_EOS);
  params.set([args.k, args.eos.length, 0, 0]);
  params.set(args.eos, 4);
  return {
    label: args.label,
    pipeline,
    bindGroup: gpu.bindGroup(args.label, pipeline, [
      args.outTokens,
      args.outCount,
      args.run,
      args.out,
      args.history,
      args.targetState,
      args.draftState,
      args.verifyIn,
      gpu.uniform(`${args.label}.params`, params),
    ]),
    workgroups: [1, 1, 1],
  };
}

/** Host-side mirror of the buffers {@linkcode commitWgsl} updates. */
export interface CommitState {
  run: Uint32Array;
  out: Uint32Array;
  history: Uint32Array;
  targetPos: number;
  draftPos: number;
  verifyIn: Uint32Array;
}

/** CPU reference of {@linkcode commitWgsl}; updates `s` in place. */
export function commitRef(
  s: CommitState,
  outTokens: readonly number[],
  count: number,
  k: number,
  eos: readonly number[],
): void {
  s.targetPos -= k + 1 - count;
  s.draftPos -= k + 1 - count;
  s.verifyIn[0] = outTokens[count - 1];
  const r = s.run;
  if (r[RUN.done]) return;
  r[RUN.cycles]++;
  r[RUN.accepted] += count - 1;
  for (let i = 0; i < count; i++) {
    const id = outTokens[i];
    s.out[r[RUN.count]] = id;
    s.history[r[RUN.promptLen] + r[RUN.count]] = id;
    r[RUN.count]++;
    if (r[RUN.count] >= r[RUN.maxTokens] || eos.includes(id)) {
      r[RUN.done] = 1;
      return;
    }
  }
}
