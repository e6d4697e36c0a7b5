/**
 * Greedy pick: `ids[idsOffset + t] = argmax_i logits[t, i]` (ties go to the lowest index, like
 * numpy and torch), and optionally the greedy accept of a speculative chain in the same dispatch.
 *
 * A row of a 32000-token vocabulary is too much for one workgroup when it is the whole dispatch
 * (one SM reading 128 KB with a chain of dependent loads: a decode step's sampler and a verify's
 * accept were single-workgroup passes like that). So each row is cut into up to
 * {@linkcode ARGMAX_MAX_SLICES} slices, one workgroup each; every workgroup stores its slice's
 * (value, index) with atomic stores and counts itself in the row's atomic counter, and the
 * workgroup that arrives last merges the row (as the split-K merge in kernels/fused_attention.ts)
 * and resets the counter for the next dispatch. In accept mode the rows are a verify's k + 1
 * target rows: the last row to finish also counts the leading draft tokens equal to the target's
 * argmax, so `ids` (the cycle's output tokens) holds the accepted tokens then the correction or
 * bonus token, and `outCount[0]` = accepted + 1 — exactly `acceptDraft` at temperature 0.
 *
 * @module
 */
import { type Dispatch, type Gpu, GpuError } from "../engine/gpu.ts";

/** Invocations per workgroup (one workgroup per slice of a row). */
export const ARGMAX_WG = 256;

/** Most workgroups one row is split over (the merge reads one partial per slice). */
export const ARGMAX_MAX_SLICES = 32;

/** Fewest elements one invocation scans in its slice (below this a split does not pay). */
const MIN_PER_INVOCATION = 4;

/**
 * The split of a row of `V` elements: `slice` elements per workgroup (a multiple of
 * {@linkcode ARGMAX_WG}) and `slices` workgroups, at most {@linkcode ARGMAX_MAX_SLICES}.
 *
 * @example
 * ```ts
 * import { argmaxSplit } from "./argmax.ts";
 * console.log(argmaxSplit(32000)); // { slice: 1024, slices: 32 }
 * ```
 */
export function argmaxSplit(V: number): { slice: number; slices: number } {
  const perInvocation = Math.max(
    MIN_PER_INVOCATION,
    Math.ceil(V / (ARGMAX_MAX_SLICES * ARGMAX_WG)),
  );
  const slice = perInvocation * ARGMAX_WG;
  return { slice, slices: Math.max(1, Math.ceil(V / slice)) };
}

/**
 * u32 words of a scratch for dispatches of up to `T` rows of `V` (counters, results, partials);
 * see {@linkcode ArgmaxArgs.scratch}.
 */
export function argmaxScratchWords(T: number, V: number): number {
  return 2 * T + 1 + 2 * T * argmaxSplit(V).slices;
}

/**
 * WGSL: the workgroup counts itself in the atomic counter `part[counter]` of `n` workgroups;
 * all but the last to arrive return, and the last resets the counter for the next dispatch and
 * sees every other's stores. Needs `part: array<atomic<u32>>`, `var<workgroup> isLast: u32` and
 * `lid` (the local invocation index); use it in uniform control flow.
 */
export function lastArrivalWgsl(counter: string, n: string): string {
  return `storageBarrier();
  if (lid == 0u) {
    let arrived = atomicAdd(&part[${counter}], 1u);
    isLast = select(0u, 1u, arrived == ${n} - 1u);
    if (arrived == ${n} - 1u) { atomicStore(&part[${counter}], 0u); } // ready for the next dispatch
  }
  if (workgroupUniformLoad(&isLast) == 0u) { return; }
  storageBarrier();`;
}

/** WGSL of the split argmax; `accept` adds the greedy chain accept (bindings 4 and 5). */
export function argmaxWgsl(accept: boolean): string {
  return /* wgsl */ `
// Split argmax: workgroup (s, t) scans slice s of row t; invocation i reads elements
// start + i, start + i + ${ARGMAX_WG}, ... (coalesced; ragged ends masked by the loop bound),
// keeping the first maximum; (value, index) pairs are tree-reduced in workgroup memory,
// preferring the larger value and the lower index on ties. NaN never wins; a row with no value
// above -FLT_MAX (all -inf or NaN) gives index 0.
// Scratch words, for a scratch of C >= T rows: [0, C) row counters, C the rows-done counter
// (accept mode), [C + 1, 2C + 1) row results, then partials (value bits, index) of [C, S] slices.
// Counters return to 0 after use, so dispatches of any T may share one scratch of C rows.
struct Params {
  T: u32,            // rows
  V: u32,            // row length (vocabulary)
  xOffset: u32,      // element offset of logits[0, 0]
  idsOffset: u32,    // element offset of ids[0]
  S: u32,            // slices per row
  slice: u32,        // elements per slice (a multiple of ${ARGMAX_WG})
  k: u32,            // accept mode: draft tokens (T = k + 1)
  tokensOffset: u32, // accept mode: element offset of d1 in draftTokens
  C: u32,            // rows of the scratch (>= T)
}
@group(0) @binding(0) var<storage, read> logits: array<f32>;        // [T, V] f32 at xOffset
@group(0) @binding(1) var<storage, read_write> ids: array<u32>;     // [T] u32 at idsOffset
@group(0) @binding(2) var<storage, read_write> part: array<atomic<u32>>; // scratch, see above
@group(0) @binding(3) var<uniform> p: Params;
${
    accept
      ? `@group(0) @binding(4) var<storage, read> draftTokens: array<u32>;  // [k] d1..dk at tokensOffset
@group(0) @binding(5) var<storage, read_write> outCount: array<u32>; // [1] accepted + 1`
      : ""
  }

const NONE: u32 = 0xffffffffu;
const LOWEST: f32 = -3.4028235e38;

var<workgroup> redV: array<f32, ${ARGMAX_WG}>;
var<workgroup> redI: array<u32, ${ARGMAX_WG}>;
var<workgroup> isLast: u32;

// Workgroup reduction of (value, index); every invocation gets the winner.
fn reduce(lid: u32, v0: f32, i0: u32) -> vec2u {
  var best = v0;
  var bi = i0;
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
  let r = vec2u(bitcast<u32>(workgroupUniformLoad(&redV[0])), workgroupUniformLoad(&redI[0]));
  return r;
}

@compute @workgroup_size(${ARGMAX_WG})
fn main(@builtin(workgroup_id) wg: vec3u, @builtin(local_invocation_index) lid: u32) {
  let s = wg.x;
  let t = wg.y;
  let row = p.xOffset + t * p.V;
  let start = s * p.slice;
  let end = min(start + p.slice, p.V);
  var best = LOWEST;
  var bi = NONE;
  for (var i = start + lid; i < end; i += ${ARGMAX_WG}u) {
    let v = logits[row + i];
    if (v > best || (bi == NONE && v == best)) { best = v; bi = i; }
  }
  var win = reduce(lid, best, bi);
  if (p.S > 1u) {
    let pw = 2u * p.C + 1u + 2u * (t * p.S + s);
    if (lid == 0u) {
      atomicStore(&part[pw], win.x);
      atomicStore(&part[pw + 1u], win.y);
    }
    ${lastArrivalWgsl("t", "p.S")}
    // The last slice of the row merges the row's partials, one per invocation.
    var v = LOWEST;
    var j = NONE;
    if (lid < p.S) {
      let q = 2u * p.C + 1u + 2u * (t * p.S + lid);
      v = bitcast<f32>(atomicLoad(&part[q]));
      j = atomicLoad(&part[q + 1u]);
    }
    win = reduce(lid, v, j);
  }
  let id = select(win.y, 0u, win.y == NONE);
  if (lid == 0u) { ids[p.idsOffset + t] = id; }
  ${
    accept
      ? `// Accept: the last row to finish counts the draft tokens that match the target's argmax.
  if (lid == 0u) { atomicStore(&part[p.C + 1u + t], id); }
  ${lastArrivalWgsl("p.C", "p.T")}
  if (lid == 0u) {
    var n = 0u;
    loop {
      if (n >= p.k) { break; }
      if (draftTokens[p.tokensOffset + n] != atomicLoad(&part[p.C + 1u + n])) { break; }
      n += 1u;
    }
    outCount[0] = n + 1u;
  }`
      : ""
  }
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
  /**
   * A scratch shared with other argmax dispatches of this `V` (run one after another, never
   * concurrently): `rows` >= T and `buffer` of at least `argmaxScratchWords(rows, V)` u32 words,
   * zeroed when created. Without it the dispatch creates its own.
   */
  scratch?: { buffer: GPUBuffer; rows: number };
  /**
   * Greedy accept of a chain of `k = T - 1` draft tokens (the rows are the verify's k + 1 target
   * rows): `outCount[0]` gets 1 + the number of leading `draftTokens[tokensOffset + i]` equal to
   * row i's argmax, and `ids` holds the accepted tokens then the correction/bonus token.
   */
  accept?: {
    /** d1..dk, u32. */
    draftTokens: GPUBuffer;
    /** Element offset of d1; default 0. */
    tokensOffset?: number;
    /** [1] u32: accepted + 1. */
    outCount: GPUBuffer;
  };
}

/**
 * Builds the argmax dispatch (with `scratch`, or its own small scratch of counters and partials).
 *
 * @example
 * ```ts ignore
 * const d = await createArgmax(gpu, { label: "greedy", logits, ids, idsOffset: 3, T: 1, V: 32000 });
 * ```
 */
export async function createArgmax(gpu: Gpu, args: ArgmaxArgs): Promise<Dispatch> {
  const { label, T, V } = args;
  if (!Number.isInteger(T) || T < 1 || !Number.isInteger(V) || V < 1) {
    throw new GpuError(label, `need integer T >= 1 and V >= 1 (got T=${T}, V=${V})`);
  }
  if (T > gpu.limits.maxComputeWorkgroupsPerDimension) {
    throw new GpuError(label, `${T} rows exceed the per-dispatch workgroup limit`);
  }
  const accept = args.accept !== undefined;
  const { slice, slices } = argmaxSplit(V);
  const C = args.scratch?.rows ?? T;
  if (args.scratch) {
    const need = argmaxScratchWords(C, V) * 4;
    if (!Number.isInteger(C) || C < T || args.scratch.buffer.size < need) {
      throw new GpuError(
        label,
        `scratch of ${args.scratch.rows} rows, ${args.scratch.buffer.size} bytes cannot hold ` +
          `${T} rows of ${V} (needs rows >= ${T} and ${need} bytes)`,
      );
    }
  }
  const pipeline = await gpu.pipeline(
    `argmax.wg${ARGMAX_WG}.accept${accept ? 1 : 0}`,
    () => argmaxWgsl(accept),
  );
  const params = gpu.uniform(
    `${label}.params`,
    new Uint32Array([
      T,
      V,
      args.xOffset ?? 0,
      args.idsOffset ?? 0,
      slices,
      slice,
      accept ? T - 1 : 0,
      args.accept?.tokensOffset ?? 0,
      C,
    ]),
  );
  const scratch = args.scratch?.buffer ??
    gpu.buffer(`${label}.scratch`, argmaxScratchWords(T, V) * 4, GPUBufferUsage.STORAGE);
  return {
    label,
    pipeline,
    bindGroup: gpu.bindGroup(label, pipeline, [
      args.logits,
      args.ids,
      scratch,
      params,
      args.accept?.draftTokens,
      args.accept?.outCount,
    ]),
    workgroups: [slices, T, 1],
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

/**
 * CPU reference of the accept mode: the argmax of each of the k + 1 rows, and 1 + the number of
 * leading draft tokens equal to them.
 */
export function argmaxAcceptRef(
  logits: Float32Array,
  draft: ArrayLike<number>,
  V: number,
): { ids: Uint32Array; count: number } {
  const ids = argmaxRef(logits, draft.length + 1, V);
  let n = 0;
  while (n < draft.length && draft[n] === ids[n]) n++;
  return { ids, count: n + 1 };
}
