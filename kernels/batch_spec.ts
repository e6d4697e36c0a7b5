/**
 * The two small kernels of batched greedy speculation (engine/batch.ts with a draft model): per
 * active sequence r (r < R) the GPU keeps `seq[r] = (slot, pos, count, accepted)`: its block-table
 * slot, its position (cache rows written = the position of its next input token), the tokens it
 * emitted in this chunk and the draft tokens accepted in it. A cycle's tokens live step-major in
 * `verifyIn: [k + 1, R]`: row 0 the last emitted token of each sequence, rows 1..k its drafts, so
 * the draft's step i reads the contiguous ids `verifyIn[i*R .. i*R + R)` and the target verifies
 * all `(k + 1) * R` ids in that order.
 *
 * - Rows ({@linkcode createSpecRows}): the paged rows of a cycle: draft rows `[R]` = (slot, pos)
 *   (advanced per draft step by kernels/paged_advance.ts) and verify rows `[(k + 1) * R]`, row
 *   `i*R + r` = (slot_r, pos_r + i).
 * - Commit ({@linkcode createSpecCommit}), one invocation per sequence: with `tids[i*R + r]` the
 *   target's argmax after verify row i*R + r, accept drafts while `verifyIn[(a+1)*R + r] ==
 *   tids[a*R + r]` (a < k), then emit the accepted drafts and the bonus `tids[a*R + r]` to
 *   `out[r, count ..]`, move pos and count on by a + 1, and put the bonus in `verifyIn[0, r]`.
 *   The KV rows past the new position (rejected drafts) stay in the caches and are masked by
 *   position, as in engine/decode.ts. A sequence r with `kRow[r] = 0` does not speculate: it
 *   accepts no draft and emits `tids[r]` (its target row 0, argmax or a sampled token), as a
 *   plain step would.
 *
 * @module
 */
import type { Dispatch, Gpu } from "../engine/gpu.ts";

/** u32 words per sequence in the state buffer: slot, pos, count, accepted. */
export const SPEC_SEQ_WORDS = 4;

/** Invocations per workgroup of both kernels. */
export const SPEC_WG = 64;

/** WGSL of the rows kernel. */
export function specRowsWgsl(): string {
  return /* wgsl */ `
// Speculative rows: one invocation per verify row j < (k + 1) * R (${SPEC_WG} per workgroup):
// i = j / R, r = j % R; vrows[j] = (slot_r, pos_r + i), and for j < R also drows[j] = (slot, pos).
struct Params { R: u32, k1: u32 }
@group(0) @binding(0) var<storage, read> seq: array<vec4<u32>>;         // seq: [R] (slot, pos, count, accepted)
@group(0) @binding(1) var<storage, read_write> drows: array<vec2<u32>>; // drows: [R] (slot, pos)
@group(0) @binding(2) var<storage, read_write> vrows: array<vec2<u32>>; // vrows: [(k + 1) * R] (slot, pos)
@group(0) @binding(3) var<uniform> p: Params;

@compute @workgroup_size(${SPEC_WG})
fn main(@builtin(global_invocation_id) g: vec3u) {
  let j = g.x;
  if (j >= p.R * p.k1) { return; }
  let r = j % p.R;
  let s = seq[r];
  vrows[j] = vec2<u32>(s.x, s.y + j / p.R);
  if (j < p.R) { drows[j] = vec2<u32>(s.x, s.y); }
}
`;
}

/** WGSL of the greedy commit. */
export function specCommitWgsl(): string {
  return /* wgsl */ `
// Speculative greedy commit: one invocation per sequence r < R (${SPEC_WG} per workgroup) walks its
// k drafts against the target's argmax (a handful of ids), then appends the accepted drafts and
// the bonus token to its row of out, moves its position and count on and sets its next input.
struct Params { R: u32, k: u32, cap: u32, pad: u32 }
@group(0) @binding(0) var<storage, read_write> seq: array<vec4<u32>>;  // seq: [R] (slot, pos, count, accepted)
@group(0) @binding(1) var<storage, read_write> verifyIn: array<u32>;   // verifyIn: [k + 1, R] ids
@group(0) @binding(2) var<storage, read> tids: array<u32>;             // tids: [k + 1, R] target argmax
@group(0) @binding(3) var<storage, read_write> out: array<u32>;        // out: [R, cap] emitted ids
@group(0) @binding(4) var<uniform> p: Params;
@group(0) @binding(5) var<storage, read> kRow: array<u32>;             // kRow: [R] drafts it may accept

@compute @workgroup_size(${SPEC_WG})
fn main(@builtin(global_invocation_id) g: vec3u) {
  let r = g.x;
  if (r >= p.R) { return; }
  var a = 0u;
  let k = min(p.k, kRow[r]);
  while (a < k && verifyIn[(a + 1u) * p.R + r] == tids[a * p.R + r]) { a++; }
  var s = seq[r];
  for (var j = 0u; j <= a; j++) {
    var id = tids[a * p.R + r];
    if (j < a) { id = verifyIn[(j + 1u) * p.R + r]; }
    if (s.z + j < p.cap) { out[r * p.cap + s.z + j] = id; }
  }
  verifyIn[r] = tids[a * p.R + r];
  s.y = s.y + a + 1u;
  s.z = s.z + a + 1u;
  s.w = s.w + a;
  seq[r] = s;
}
`;
}

/** Buffers for {@linkcode createSpecRows}. */
export interface SpecRowsArgs {
  /** Label of the dispatch. */
  label: string;
  /** seq: [R] (slot, pos, count, accepted) u32. */
  seq: GPUBuffer;
  /** drows: [R] (slot, pos) output. */
  drows: GPUBuffer;
  /** vrows: [(k + 1) * R] (slot, pos) output. */
  vrows: GPUBuffer;
  /** Sequences. */
  R: number;
  /** Drafts per cycle. */
  k: number;
}

/** Builds the rows dispatch. */
export async function createSpecRows(gpu: Gpu, args: SpecRowsArgs): Promise<Dispatch> {
  const { R, k } = args;
  if (args.vrows.size < R * (k + 1) * 8 || args.drows.size < R * 8) {
    throw new RangeError(`${args.label}: rows buffers too small for R=${R}, k=${k}`);
  }
  const pipeline = await gpu.pipeline(`spec_rows.wg${SPEC_WG}`, specRowsWgsl);
  const params = gpu.uniform(`${args.label}.params`, new Uint32Array([R, k + 1]));
  return {
    label: args.label,
    pipeline,
    bindGroup: gpu.bindGroup(args.label, pipeline, [args.seq, args.drows, args.vrows, params]),
    workgroups: [Math.ceil(R * (k + 1) / SPEC_WG), 1, 1],
  };
}

/** Buffers for {@linkcode createSpecCommit}. */
export interface SpecCommitArgs {
  /** Label of the dispatch. */
  label: string;
  /** seq: [R] (slot, pos, count, accepted) u32, updated. */
  seq: GPUBuffer;
  /** verifyIn: [k + 1, R] u32; row 0 gets the bonus tokens. */
  verifyIn: GPUBuffer;
  /** tids: [k + 1, R] u32, the target's argmax per verify row. */
  tids: GPUBuffer;
  /** out: [R, cap] u32 emitted ids (ids past cap are dropped). */
  out: GPUBuffer;
  /** kRow: [R] u32, drafts each sequence may accept (0: it does not speculate). */
  kRow: GPUBuffer;
  /** Sequences. */
  R: number;
  /** Drafts per cycle. */
  k: number;
  /** Ids per sequence row of out. */
  cap: number;
}

/** Builds the commit dispatch. */
export async function createSpecCommit(gpu: Gpu, args: SpecCommitArgs): Promise<Dispatch> {
  const { R, k, cap } = args;
  if (args.out.size < R * cap * 4) {
    throw new RangeError(`${args.label}: out of ${args.out.size} bytes < R=${R} x cap=${cap}`);
  }
  const pipeline = await gpu.pipeline(`spec_commit.wg${SPEC_WG}`, specCommitWgsl);
  const params = gpu.uniform(`${args.label}.params`, new Uint32Array([R, k, cap, 0]));
  return {
    label: args.label,
    pipeline,
    bindGroup: gpu.bindGroup(args.label, pipeline, [
      args.seq,
      args.verifyIn,
      args.tids,
      args.out,
      params,
      args.kRow,
    ]),
    workgroups: [Math.ceil(R / SPEC_WG), 1, 1],
  };
}

/**
 * CPU reference of {@linkcode specCommitWgsl} (in place on `seq`, `verifyIn` and `out`);
 * `kRow` default: every sequence may accept k.
 *
 * @example
 * ```ts
 * import { specCommitRef } from "./batch_spec.ts";
 * // One sequence, k = 2: draft [7, 8] after input 5; the target's argmax [7, 9, 4]: 7 is
 * // accepted, 8 is not, the bonus is 9.
 * const seq = new Uint32Array([0, 10, 0, 0]);
 * const verifyIn = new Uint32Array([5, 7, 8]);
 * const out = new Uint32Array(4);
 * specCommitRef(seq, verifyIn, new Uint32Array([7, 9, 4]), out, 1, 2, 4);
 * console.log([...out], [...seq], verifyIn[0]); // [7, 9, 0, 0] [0, 12, 2, 1] 9
 * ```
 */
export function specCommitRef(
  seq: Uint32Array,
  verifyIn: Uint32Array,
  tids: Uint32Array,
  out: Uint32Array,
  R: number,
  k: number,
  cap: number,
  kRow?: Uint32Array,
): void {
  for (let r = 0; r < R; r++) {
    let a = 0;
    const kr = Math.min(k, kRow?.[r] ?? k);
    while (a < kr && verifyIn[(a + 1) * R + r] === tids[a * R + r]) a++;
    const count = seq[4 * r + 2];
    for (let j = 0; j <= a; j++) {
      const id = j < a ? verifyIn[(j + 1) * R + r] : tids[a * R + r];
      if (count + j < cap) out[r * cap + count + j] = id;
    }
    verifyIn[r] = tids[a * R + r];
    seq[4 * r + 1] += a + 1;
    seq[4 * r + 2] += a + 1;
    seq[4 * r + 3] += a;
  }
}

/**
 * CPU reference of {@linkcode specRowsWgsl}: draft rows `[R, 2]` and verify rows
 * `[(k + 1) * R, 2]` from the state `[R, 4]`.
 *
 * @example
 * ```ts
 * import { specRowsRef } from "./batch_spec.ts";
 * const { vrows } = specRowsRef(new Uint32Array([3, 10, 0, 0, 1, 4, 0, 0]), 2, 1);
 * console.log([...vrows]); // [3, 10, 1, 4, 3, 11, 1, 5]
 * ```
 */
export function specRowsRef(
  seq: Uint32Array,
  R: number,
  k: number,
): { drows: Uint32Array; vrows: Uint32Array } {
  const drows = new Uint32Array(2 * R), vrows = new Uint32Array(2 * R * (k + 1));
  for (let j = 0; j < R * (k + 1); j++) {
    const r = j % R;
    vrows[2 * j] = seq[4 * r];
    vrows[2 * j + 1] = seq[4 * r + 1] + Math.floor(j / R);
    if (j < R) {
      drows[2 * j] = seq[4 * r];
      drows[2 * j + 1] = seq[4 * r + 1];
    }
  }
  return { drows, vrows };
}
