/**
 * Random fill of a weight buffer on the GPU, for models with dummy weights at real shapes (as
 * vLLM's `--load-format dummy`): benchmarks measure the bandwidth-bound regime of 1B-8B models
 * without a file and without uploading gigabytes. Every u32 word gets a hash of its index and the
 * seed; the words that hold f16 scales (or f16 weights) get two small finite f16 values instead
 * (magnitude 2^-7 .. 2^-6, random sign and mantissa), so no product meets an Inf or NaN.
 *
 * @module
 */
import { type Dispatch, type Gpu, grid2d } from "../engine/gpu.ts";
import type { HalfWords } from "./qformats.ts";

/** Invocations per workgroup. */
export const FILL_WG = 256;

/** WGSL of the fill (one invocation per word, 2-D grid). */
export function fillWgsl(): string {
  return /* wgsl */ `
// Random fill: invocation i (2-D grid, x fastest; invocations past n return) writes word i:
// hash(i, seed), or two small f16 (exponent 2^-7, random sign and mantissa) where the word holds
// f16 scales or weights: i >= halfFrom, or i % halfStride == halfPhase when halfStride > 0.
struct Params { n: u32, seed: u32, halfFrom: u32, halfStride: u32, halfPhase: u32, gridStride: u32 }
@group(0) @binding(0) var<storage, read_write> w: array<u32>; // w: [n] u32
@group(0) @binding(1) var<uniform> p: Params;

// lowbias32 (Chris Wellons): a well-mixed 32-bit integer hash.
fn hash(x0: u32) -> u32 {
  var x = x0;
  x ^= x >> 16u; x *= 0x7feb352du;
  x ^= x >> 15u; x *= 0x846ca68bu;
  x ^= x >> 16u;
  return x;
}

@compute @workgroup_size(${FILL_WG})
fn main(@builtin(global_invocation_id) g: vec3u) {
  let i = g.y * p.gridStride + g.x;
  if (i >= p.n) { return; }
  var v = hash(i ^ hash(p.seed));
  if (i >= p.halfFrom || (p.halfStride > 0u && i % p.halfStride == p.halfPhase)) {
    v = (v & 0x83ff83ffu) | 0x20002000u; // sign, mantissa random; exponent 8 (2^-7)
  }
  w[i] = v;
}
`;
}

/** Arguments of {@linkcode createFill}. */
export interface FillArgs extends HalfWords {
  /** Label of the dispatch. */
  label: string;
  /** The buffer to fill: `words` u32 words. */
  buffer: GPUBuffer;
  /** Words to write. */
  words: number;
  /** Seed of the hash. */
  seed: number;
}

/** Builds the fill dispatch. */
export async function createFill(gpu: Gpu, args: FillArgs): Promise<Dispatch> {
  if (!Number.isInteger(args.words) || args.words < 1 || args.words * 4 > args.buffer.size) {
    throw new RangeError(`${args.label}: ${args.words} words do not fit ${args.buffer.size} bytes`);
  }
  const pipeline = await gpu.pipeline(`fill.wg${FILL_WG}`, fillWgsl);
  const groups = grid2d(
    Math.ceil(args.words / FILL_WG),
    gpu.limits.maxComputeWorkgroupsPerDimension,
  );
  const params = gpu.uniform(
    `${args.label}.params`,
    new Uint32Array([
      args.words,
      args.seed >>> 0,
      args.halfFrom,
      args.halfStride,
      args.halfPhase,
      groups[0] * FILL_WG,
      0,
      0,
    ]),
  );
  return {
    label: args.label,
    pipeline,
    bindGroup: gpu.bindGroup(args.label, pipeline, [args.buffer, params]),
    workgroups: groups,
  };
}

function hash(x0: number): number {
  let x = x0 >>> 0;
  x ^= x >>> 16;
  x = Math.imul(x, 0x7feb352d) >>> 0;
  x ^= x >>> 15;
  x = Math.imul(x, 0x846ca68b) >>> 0;
  x ^= x >>> 16;
  return x >>> 0;
}

/**
 * CPU reference of {@linkcode fillWgsl}: the `words` words the fill writes.
 *
 * @example
 * ```ts
 * import { fillRef } from "./fill.ts";
 * const w = fillRef(4, 1, { halfFrom: 2, halfStride: 0, halfPhase: 0 });
 * console.log(new Float16Array(w.buffer).slice(4).every((x) => Math.abs(x) < 1 / 64)); // true
 * ```
 */
export function fillRef(words: number, seed: number, half: HalfWords): Uint32Array {
  const out = new Uint32Array(words), s = hash(seed);
  for (let i = 0; i < words; i++) {
    let v = hash((i ^ s) >>> 0);
    if (i >= half.halfFrom || (half.halfStride > 0 && i % half.halfStride === half.halfPhase)) {
      v = ((v & 0x83ff83ff) | 0x20002000) >>> 0;
    }
    out[i] = v;
  }
  return out;
}
