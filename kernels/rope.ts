/**
 * Rotary position embedding, in place on q[T, nHeads, headDim] and k[T, nKvHeads, headDim].
 *
 * Row t sits at position `state[0] + t` (state[0] = tokens already in the KV cache, kept on the
 * GPU), or, with `rowPositions` (a batch of sequences, kernels/paged_attention.ts), at the
 * position the paged rows buffer gives it: `rows[t] = (seq, pos)`. Pair i (i < rotDim/2) turns by angle `pos * invFreq[i]`; the pair is (2i, 2i+1) in the
 * "interleaved" layout and (i, i + rotDim/2) in "rotate-half". Dimensions past rotDim (partial
 * rotary) are left as they are. `invFreq` is computed once on the CPU by {@linkcode ropeInvFreq}.
 *
 * @module
 */
import { type Dispatch, type Gpu, grid2d } from "../engine/gpu.ts";
import type { RopeLayout, RopeScaling } from "../models/types.ts";

/** Invocations per workgroup. */
export const ROPE_WG = 64;

/**
 * Per-pair inverse frequencies `theta^(-2i/rotDim)`, i < rotDim/2 (rotDim = `headDim`, or the
 * rotated dimension count for partial rotary), with optional Llama 3 scaling
 * (transformers' `_compute_llama3_parameters`): wavelengths shorter than
 * `orig / highFreqFactor` are kept, longer than `orig / lowFreqFactor` divided by `factor`, and
 * in between interpolated with `smooth = (orig / wavelen - low) / (high - low)`:
 * `(1 - smooth) * f / factor + smooth * f`.
 *
 * @example
 * ```ts
 * import { ropeInvFreq } from "./rope.ts";
 * console.log([...ropeInvFreq(4, 10000)]); // [1, 0.01]
 * ```
 */
export function ropeInvFreq(headDim: number, theta: number, scaling?: RopeScaling): Float32Array {
  const rotDim = headDim;
  if (!Number.isInteger(rotDim) || rotDim < 2 || rotDim % 2) {
    throw new RangeError(`ropeInvFreq: headDim must be a positive even integer, got ${rotDim}`);
  }
  const out = new Float32Array(rotDim / 2);
  for (let i = 0; i < rotDim / 2; i++) {
    // As transformers: base ** (arange(0, dim, 2).float() / dim), in float32.
    let f = 1 / theta ** Math.fround((2 * i) / rotDim);
    if (scaling) {
      const { factor, lowFreqFactor: low, highFreqFactor: high } = scaling;
      const orig = scaling.originalMaxPositionEmbeddings;
      const wavelen = (2 * Math.PI) / f;
      if (wavelen > orig / low) f = f / factor;
      else if (!(wavelen < orig / high)) {
        const smooth = (orig / wavelen - low) / (high - low);
        f = (1 - smooth) * f / factor + smooth * f;
      }
    }
    out[i] = f;
  }
  return out;
}

/**
 * WGSL of RoPE for `layout`, rotating q and, when `withK`, k too. With `rowPositions` the
 * position of row t is `state[2t + 1]` (binding 3 holds the paged rows `[T] (seq, pos)`), else
 * `state[0] + t`.
 */
export function ropeWgsl(layout: RopeLayout, withK: boolean, rowPositions = false): string {
  const pair = layout === "interleaved"
    ? "let a = base + 2u * i; let b = a + 1u;"
    : "let a = base + i; let b = a + p.half;";
  return /* wgsl */ `
// RoPE (${layout}): one invocation per rotated pair; invocation g covers pair i = g % half of
// head h = (g / half) % (nHeads${withK ? " + nKvHeads" : ""}) of row t = g / (half * heads),
// where heads < nHeads are q's and the rest k's. The grid may be 2-D; invocations past the pair
// count return. ${
    rowPositions
      ? "Angles use each row's own position: pos = rows[t].pos = state[2t + 1]."
      : "Angles use the GPU state position: pos = state[0] + t."
  }
struct Params {
  T: u32,        // rows
  nHeads: u32,   // q heads
  nKvHeads: u32, // k heads (0 when k is not rotated)
  headDim: u32,  // elements per head
  half: u32,     // rotDim / 2 = rotated pairs per head
  qOffset: u32,  // element offset of q[0, 0, 0]
  kOffset: u32,  // element offset of k[0, 0, 0]
  rowStride: u32, // invocations per grid row (2-D grid)
}
@group(0) @binding(0) var<storage, read_write> q: array<f32>; // q: [T, nHeads, headDim] f32
${
    withK
      ? "@group(0) @binding(1) var<storage, read_write> k: array<f32>; // k: [T, nKvHeads, headDim]"
      : ""
  }
@group(0) @binding(2) var<storage, read> invFreq: array<f32>; // invFreq: [half] f32
@group(0) @binding(3) var<storage, read> state: array<u32>;   // ${
    rowPositions ? "paged rows: [T] (seq, pos) u32" : "state[0]: position of row 0"
  }
@group(0) @binding(4) var<uniform> p: Params;

fn rot(v0: f32, v1: f32, c: f32, s: f32) -> vec2<f32> {
  return vec2<f32>(v0 * c - v1 * s, v0 * s + v1 * c);
}

@compute @workgroup_size(${ROPE_WG})
fn main(@builtin(global_invocation_id) gid: vec3u) {
  let g = gid.y * p.rowStride + gid.x;
  let heads = p.nHeads + p.nKvHeads;
  if (g >= p.T * heads * p.half) { return; }
  let i = g % p.half;
  let h = (g / p.half) % heads;
  let t = g / (p.half * heads);
  let angle = f32(${rowPositions ? "state[2u * t + 1u]" : "state[0] + t"}) * invFreq[i];
  let c = cos(angle);
  let s = sin(angle);
  if (h < p.nHeads) {
    let base = p.qOffset + (t * p.nHeads + h) * p.headDim;
    ${pair}
    let r = rot(q[a], q[b], c, s);
    q[a] = r.x;
    q[b] = r.y;
  }${
    withK
      ? ` else {
    let base = p.kOffset + (t * p.nKvHeads + h - p.nHeads) * p.headDim;
    ${pair}
    let r = rot(k[a], k[b], c, s);
    k[a] = r.x;
    k[b] = r.y;
  }`
      : ""
  }
}
`;
}

/** Buffers and sizes for {@linkcode createRope}. */
export interface RopeArgs {
  /** Label of the dispatch, e.g. `target.L0.attn.rope`. */
  label: string;
  /** q: [T, nHeads, headDim] f32 at element `qOffset`, rotated in place. */
  q: GPUBuffer;
  /** Element offset of q[0, 0, 0]; default 0. */
  qOffset?: number;
  /** k: [T, nKvHeads, headDim] f32 at `kOffset`, rotated in place; omit to rotate q only. */
  k?: GPUBuffer;
  /** Element offset of k[0, 0, 0]; default 0. */
  kOffset?: number;
  /** invFreq: [rotDim/2] f32 from {@linkcode ropeInvFreq} (rotDim ≤ headDim). */
  invFreq: GPUBuffer;
  /** Number of pairs per head = invFreq length = rotDim / 2. */
  half: number;
  /** state: u32 buffer; state[0] is the position of row 0 (with `rowPositions`: the paged rows). */
  state: GPUBuffer;
  /**
   * Take row t's position from `state` as paged rows `[T] (seq, pos)` (kernels/paged_attention.ts
   * `pagedRowsImage`), for a batch of sequences; default false: `state[0] + t`.
   */
  rowPositions?: boolean;
  /** Pairing layout. */
  layout: RopeLayout;
  /** Rows. */
  T: number;
  /** q heads. */
  nHeads: number;
  /** k heads (ignored without `k`). */
  nKvHeads: number;
  /** Elements per head. */
  headDim: number;
}

/**
 * Builds the RoPE dispatch (q and k together in one dispatch when `k` is given).
 *
 * @example
 * ```ts ignore
 * const invFreq = gpu.upload("rope.invFreq", ropeInvFreq(64, 10000));
 * const d = await createRope(gpu, {
 *   label: "L0.rope", q, k, invFreq, half: 32, state, layout: "rotate-half",
 *   T: 1, nHeads: 9, nKvHeads: 3, headDim: 64,
 * });
 * ```
 */
export async function createRope(gpu: Gpu, args: RopeArgs): Promise<Dispatch> {
  if (2 * args.half > args.headDim) {
    throw new RangeError(`${args.label}: rotDim ${2 * args.half} > headDim ${args.headDim}`);
  }
  const withK = !!args.k;
  const nKv = withK ? args.nKvHeads : 0;
  const rows = args.rowPositions ?? false;
  const pipeline = await gpu.pipeline(
    `rope.${args.layout}.k${+withK}${rows ? ".rows" : ""}.wg${ROPE_WG}`,
    () => ropeWgsl(args.layout, withK, rows),
  );
  const pairs = args.T * (args.nHeads + nKv) * args.half;
  const workgroups = grid2d(
    Math.ceil(pairs / ROPE_WG),
    gpu.limits.maxComputeWorkgroupsPerDimension,
  );
  const params = gpu.uniform(
    `${args.label}.params`,
    new Uint32Array([
      args.T,
      args.nHeads,
      nKv,
      args.headDim,
      args.half,
      args.qOffset ?? 0,
      args.kOffset ?? 0,
      workgroups[0] * ROPE_WG,
    ]),
  );
  const buffers = withK
    ? [args.q, args.k!, args.invFreq, args.state, params]
    : [args.q, args.invFreq, args.state, params];
  // Without k, binding 1 is absent: bind explicitly by number.
  const bindGroup = withK
    ? gpu.bindGroup(args.label, pipeline, buffers)
    : gpu.device.createBindGroup({
      label: args.label,
      layout: pipeline.getBindGroupLayout(0),
      entries: [0, 2, 3, 4].map((binding, j) => ({ binding, resource: { buffer: buffers[j] } })),
    });
  return { label: args.label, pipeline, bindGroup, workgroups };
}

/**
 * CPU reference: rotates `x[T, nHeads, headDim]` (a copy) for rows at positions pos0, pos0+1, ...
 *
 * @example
 * ```ts
 * import { ropeInvFreq, ropeRef } from "./rope.ts";
 * // One head of 2 dims at position 1 with invFreq [π/2]: (1, 0) turns to (0, 1).
 * const y = ropeRef(new Float32Array([1, 0]), 1, 2, 1, new Float32Array([Math.PI / 2]), "interleaved");
 * console.log([...y].map(Math.round)); // [0, 1]
 * ```
 */
export function ropeRef(
  x: Float32Array,
  nHeads: number,
  headDim: number,
  pos0: number,
  invFreq: Float32Array,
  layout: RopeLayout,
): Float32Array {
  const y = x.slice();
  const half = invFreq.length;
  const T = x.length / (nHeads * headDim);
  for (let t = 0; t < T; t++) {
    for (let h = 0; h < nHeads; h++) {
      const base = (t * nHeads + h) * headDim;
      for (let i = 0; i < half; i++) {
        const angle = (pos0 + t) * invFreq[i];
        const c = Math.cos(angle), s = Math.sin(angle);
        const a = layout === "interleaved" ? base + 2 * i : base + i;
        const b = layout === "interleaved" ? a + 1 : a + half;
        const v0 = x[a], v1 = x[b];
        y[a] = v0 * c - v1 * s;
        y[b] = v0 * s + v1 * c;
      }
    }
  }
  return y;
}
