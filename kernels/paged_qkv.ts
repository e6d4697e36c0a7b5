/**
 * The q/k/v split of a batched forward (models/llama_batch.ts): the qkv product writes one row
 * `[q (nHeads*headDim), k (nKvHeads*headDim), v (nKvHeads*headDim)]` per batch row, and the paged
 * kernels (kernels/paged_attention.ts) read q, k and v as separate `[R, heads, headDim]` arrays.
 * This dispatch copies them apart and applies RoPE to q and k on the way, each row at its own
 * position `rows[r].pos` (the paged rows `[R] (seq, pos)`), exactly as kernels/rope.ts turns a
 * pair: angle `pos * invFreq[i]`, pairs (2i, 2i+1) "interleaved" or (i, i + headDim/2)
 * "rotate-half". v is copied unchanged.
 *
 * The batched forward no longer runs it: kernels/paged_qkv_write.ts does this split and the
 * paged KV write in one dispatch. It stays as that kernel's GPU oracle (tests/
 * paged_qkv_write_test.ts compares the two bit for bit) and its {@linkcode pagedQkvRef} is half of
 * that kernel's reference.
 *
 * @module
 */
import { type Dispatch, type Gpu, grid2d } from "../engine/gpu.ts";
import type { RopeLayout } from "../models/types.ts";
import { ropeRef } from "./rope.ts";

/** Invocations per workgroup. */
export const PAGED_QKV_WG = 64;

/** WGSL of the split for `layout`. */
export function pagedQkvWgsl(layout: RopeLayout): string {
  const pair = layout === "interleaved"
    ? "let a = 2u * i; let b = a + 1u;"
    : "let a = i; let b = i + p.half;";
  return /* wgsl */ `
// Paged q/k/v split with RoPE (${layout}): one invocation per pair i = g % half of head
// h = (g / half) % (nHeads + 2 nKv) of batch row r = g / (half * heads); heads < nHeads are q's,
// the next nKv k's (both rotated by rows[r].pos), the last nKv v's (copied). The grid may be 2-D;
// invocations past the pair count return.
struct Params {
  R: u32,         // batch rows
  nHeads: u32,    // q heads
  nKv: u32,       // k (and v) heads
  headDim: u32,   // elements per head
  half: u32,      // headDim / 2: pairs per head
  rowStride: u32, // invocations per grid row (2-D grid)
}
@group(0) @binding(0) var<storage, read> qkv: array<f32>;        // qkv: [R, (nHeads + 2 nKv) * headDim] f32
@group(0) @binding(1) var<storage, read_write> q: array<f32>;    // q: [R, nHeads, headDim] f32 (rotated)
@group(0) @binding(2) var<storage, read_write> k: array<f32>;    // k: [R, nKv, headDim] f32 (rotated)
@group(0) @binding(3) var<storage, read_write> v: array<f32>;    // v: [R, nKv, headDim] f32
@group(0) @binding(4) var<storage, read> invFreq: array<f32>;    // invFreq: [half] f32
@group(0) @binding(5) var<storage, read> rows: array<vec2<u32>>; // rows: [R] (seq, pos)
@group(0) @binding(6) var<uniform> p: Params;

@compute @workgroup_size(${PAGED_QKV_WG})
fn main(@builtin(global_invocation_id) gid: vec3u) {
  let g = gid.y * p.rowStride + gid.x;
  let heads = p.nHeads + 2u * p.nKv;
  if (g >= p.R * heads * p.half) { return; }
  let i = g % p.half;
  let h = (g / p.half) % heads;
  let r = g / (p.half * heads);
  ${pair}
  let src = (r * heads + h) * p.headDim;
  let x0 = qkv[src + a];
  let x1 = qkv[src + b];
  if (h >= p.nHeads + p.nKv) {
    let dst = (r * p.nKv + h - p.nHeads - p.nKv) * p.headDim;
    v[dst + a] = x0;
    v[dst + b] = x1;
    return;
  }
  let angle = f32(rows[r].y) * invFreq[i];
  let c = cos(angle);
  let s = sin(angle);
  let y0 = x0 * c - x1 * s;
  let y1 = x0 * s + x1 * c;
  if (h < p.nHeads) {
    let dst = (r * p.nHeads + h) * p.headDim;
    q[dst + a] = y0;
    q[dst + b] = y1;
  } else {
    let dst = (r * p.nKv + h - p.nHeads) * p.headDim;
    k[dst + a] = y0;
    k[dst + b] = y1;
  }
}
`;
}

/** Buffers and sizes for {@linkcode createPagedQkv}. */
export interface PagedQkvArgs {
  /** Label of the dispatch, e.g. `target.batch.L0.attn.split`. */
  label: string;
  /** qkv: [R, (nHeads + 2*nKvHeads) * headDim] f32, the fused product's output. */
  qkv: GPUBuffer;
  /** q: [R, nHeads, headDim] f32 output. */
  q: GPUBuffer;
  /** k: [R, nKvHeads, headDim] f32 output. */
  k: GPUBuffer;
  /** v: [R, nKvHeads, headDim] f32 output. */
  v: GPUBuffer;
  /** invFreq: [headDim / 2] f32, kernels/rope.ts `ropeInvFreq`. */
  invFreq: GPUBuffer;
  /** rows: [R] (seq, pos) u32 pairs, kernels/paged_attention.ts `pagedRowsImage`. */
  rows: GPUBuffer;
  /** RoPE pairing. */
  layout: RopeLayout;
  /** Batch rows. */
  R: number;
  /** q heads. */
  nHeads: number;
  /** k and v heads. */
  nKvHeads: number;
  /** Elements per head (even). */
  headDim: number;
}

/** Builds the split dispatch (pipeline, params and bind group once). */
export async function createPagedQkv(gpu: Gpu, args: PagedQkvArgs): Promise<Dispatch> {
  const { R, nHeads, nKvHeads, headDim } = args;
  for (const [name, x] of Object.entries({ R, nHeads, nKvHeads, headDim })) {
    if (!Number.isInteger(x) || x < 1) {
      throw new RangeError(`${args.label}: ${name} must be an integer >= 1, got ${x}`);
    }
  }
  if (headDim % 2) throw new RangeError(`${args.label}: headDim ${headDim} is odd`);
  const pipeline = await gpu.pipeline(
    `paged_qkv.${args.layout}.wg${PAGED_QKV_WG}`,
    () => pagedQkvWgsl(args.layout),
  );
  const pairs = R * (nHeads + 2 * nKvHeads) * headDim / 2;
  const workgroups = grid2d(
    Math.ceil(pairs / PAGED_QKV_WG),
    gpu.limits.maxComputeWorkgroupsPerDimension,
  );
  const params = gpu.uniform(
    `${args.label}.params`,
    new Uint32Array([R, nHeads, nKvHeads, headDim, headDim / 2, workgroups[0] * PAGED_QKV_WG]),
  );
  return {
    label: args.label,
    pipeline,
    bindGroup: gpu.bindGroup(args.label, pipeline, [
      args.qkv,
      args.q,
      args.k,
      args.v,
      args.invFreq,
      args.rows,
      params,
    ]),
    workgroups,
  };
}

/**
 * CPU reference: splits `qkv[R, (nHeads + 2*nKv) * headDim]` and rotates q and k of row r by
 * position `pos[r]` (kernels/rope.ts `ropeRef`, one row at a time).
 *
 * @example
 * ```ts
 * import { pagedQkvRef } from "./paged_qkv.ts";
 * // One row, one head of each, headDim 2, at position 0 (no turn).
 * const { q, k, v } = pagedQkvRef(
 *   new Float32Array([1, 2, 3, 4, 5, 6]), [0], 1, 1, 2, new Float32Array([1]), "interleaved",
 * );
 * console.log([...q, ...k, ...v]); // [1, 2, 3, 4, 5, 6]
 * ```
 */
export function pagedQkvRef(
  qkv: Float32Array,
  pos: readonly number[],
  nHeads: number,
  nKvHeads: number,
  headDim: number,
  invFreq: Float32Array,
  layout: RopeLayout,
): { q: Float32Array; k: Float32Array; v: Float32Array } {
  const qDim = nHeads * headDim, kvDim = nKvHeads * headDim, width = qDim + 2 * kvDim;
  const R = pos.length;
  const q = new Float32Array(R * qDim), k = new Float32Array(R * kvDim);
  const v = new Float32Array(R * kvDim);
  for (let r = 0; r < R; r++) {
    const row = qkv.subarray(r * width, (r + 1) * width);
    q.set(ropeRef(row.slice(0, qDim), nHeads, headDim, pos[r], invFreq, layout), r * qDim);
    k.set(
      ropeRef(row.slice(qDim, qDim + kvDim), nKvHeads, headDim, pos[r], invFreq, layout),
      r * kvDim,
    );
    v.set(row.subarray(qDim + kvDim), r * kvDim);
  }
  return { q, k, v };
}
