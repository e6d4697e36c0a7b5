/**
 * Draftless speculation (prompt lookup): propose the k tokens that followed the most recent
 * earlier occurrence of the context's last n tokens (n = maxN down to 1), on the GPU. The proposal
 * is deterministic, so its q is one-hot: the accept kernel then keeps token x with probability
 * p(x), and on rejection resamples from norm(max(0, p − onehot)) — still exactly the target's
 * distribution.
 *
 * @module
 */
import type { Dispatch, Gpu } from "../engine/gpu.ts";

/** Invocations per workgroup. */
export const NGRAM_WG = 256;

/** WGSL: one workgroup; threads search start positions in parallel, then write k one-hot rows. */
export function ngramWgsl(): string {
  return /* wgsl */ `
// One workgroup of ${NGRAM_WG} invocations. Search: for n = maxN..1, each invocation tests
// candidate starts j (strided) where history[j..j+n) equals the last n tokens and j+n < len,
// keeping the largest j with atomicMax; the first n with a match wins. Then invocation 0 writes
// the k tokens after it (repeating the last one past the end of the history), and all
// invocations write the k one-hot q rows.
struct Params { k: u32, maxN: u32, V: u32, pad: u32 }
@group(0) @binding(0) var<storage, read> history: array<u32>;       // [maxSeq] prompt + emitted
@group(0) @binding(1) var<storage, read> run: array<u32>;           // run[0] emitted, run[7] prompt len
@group(0) @binding(2) var<storage, read_write> verifyIn: array<u32>; // [k + 1]; writes 1..k
@group(0) @binding(3) var<storage, read_write> q: array<f32>;        // [k, V] one-hot proposals
@group(0) @binding(4) var<uniform> p: Params;

var<workgroup> best: atomic<i32>;
var<workgroup> found: i32;

@compute @workgroup_size(${NGRAM_WG})
fn main(@builtin(local_invocation_index) lid: u32) {
  let len = run[7] + run[0];
  if (lid == 0u) { found = -1; }
  workgroupBarrier();
  for (var n = p.maxN; n >= 1u; n--) {
    if (n >= len) { continue; }
    if (lid == 0u) { atomicStore(&best, -1); }
    workgroupBarrier();
    // Candidate starts j in [0, len - n - 1]: the match must be followed by at least one token.
    for (var j = lid; j + n < len; j += ${NGRAM_WG}u) {
      var same = true;
      for (var i = 0u; i < n; i++) {
        if (history[j + i] != history[len - n + i]) { same = false; break; }
      }
      if (same) { atomicMax(&best, i32(j + n)); }
    }
    workgroupBarrier();
    if (lid == 0u) { found = atomicLoad(&best); }
    if (workgroupUniformLoad(&found) >= 0) { break; }
  }
  let start = workgroupUniformLoad(&found);
  if (lid == 0u) {
    var last = history[len - 1u];
    for (var i = 0u; i < p.k; i++) {
      if (start >= 0 && u32(start) + i < len) { last = history[u32(start) + i]; }
      verifyIn[1u + i] = last;
    }
  }
  workgroupBarrier();
  let total = p.k * p.V;
  for (var e = lid; e < total; e += ${NGRAM_WG}u) {
    q[e] = select(0.0, 1.0, verifyIn[1u + e / p.V] == e % p.V);
  }
}
`;
}

/** Buffers and settings for {@linkcode createNgram}. */
export interface NgramArgs {
  /** Label of the dispatch. */
  label: string;
  /** history: [maxSeq] u32 (prompt, then emitted ids). */
  history: GPUBuffer;
  /** run state (see kernels/commit.ts RUN). */
  run: GPUBuffer;
  /** verifyIn: [k + 1] u32; slot 0 holds the last emitted token, 1..k receive the proposal. */
  verifyIn: GPUBuffer;
  /** q: [k, V] f32 one-hot rows of the proposal. */
  q: GPUBuffer;
  /** Draft length. */
  k: number;
  /** Longest n-gram to match (tries maxN down to 1). */
  maxN: number;
  /** Vocabulary size. */
  V: number;
}

/** Builds the n-gram proposal dispatch. */
export async function createNgram(gpu: Gpu, args: NgramArgs): Promise<Dispatch> {
  const pipeline = await gpu.pipeline(`ngram.wg${NGRAM_WG}`, ngramWgsl);
  const params = gpu.uniform(
    `${args.label}.params`,
    new Uint32Array([args.k, args.maxN, args.V, 0]),
  );
  return {
    label: args.label,
    pipeline,
    bindGroup: gpu.bindGroup(args.label, pipeline, [
      args.history,
      args.run,
      args.verifyIn,
      args.q,
      params,
    ]),
    workgroups: [1, 1, 1],
  };
}

/** CPU reference: the k proposed tokens after `history` (whose last token ends the context). */
export function ngramRef(history: readonly number[], k: number, maxN: number): number[] {
  const len = history.length;
  let start = -1;
  for (let n = maxN; n >= 1 && start < 0; n--) {
    if (n >= len) continue;
    for (let j = len - n - 1; j >= 0; j--) {
      let same = true;
      for (let i = 0; i < n; i++) if (history[j + i] !== history[len - n + i]) same = false;
      if (same) {
        start = j + n;
        break;
      }
    }
  }
  const out: number[] = [];
  let last = history[len - 1];
  for (let i = 0; i < k; i++) {
    if (start >= 0 && start + i < len) last = history[start + i];
    out.push(last);
  }
  return out;
}
