/**
 * Kernel conformance harness, in the spirit of llama.cpp's test-backend-ops: every WGSL kernel is
 * compared with its plain-TS reference on ragged shapes with a stated per-op tolerance
 * (normalized MSE and max-abs). GPU tests are registered as ignored, with the reason printed,
 * when no adapter or a needed feature is missing; CPU reference tests always run.
 */
import { type Gpu, requestGpu } from "../engine/gpu.ts";

/** Shapes that catch edge bugs: 1, primes, and sizes just past common tiles. */
export const RAGGED = [1, 3, 7, 17, 31, 33, 65, 127, 129] as const;

/** Per-op tolerance: normalized mean squared error and maximum absolute error. */
export interface Tolerance {
  nmse: number;
  maxAbs: number;
}

let gpuPromise: Promise<Gpu | string> | undefined;

/** The shared test device, or the reason there is none. */
export function testGpu(): Promise<Gpu | string> {
  gpuPromise ??= requestGpu().then(
    (g) => g,
    (e) => `no WebGPU device: ${(e as Error).message}`,
  );
  return gpuPromise;
}

const gpuOrReason = await testGpu();
const reported = new Set<string>();

/** Options for {@linkcode gpuTest}. */
export interface GpuTestOptions {
  /** Optional features the test needs ("shader-f16", "timestamp-query"). */
  features?: ("shader-f16" | "timestamp-query")[];
}

/**
 * Registers a GPU test. With no adapter, or a missing feature, the test is ignored and the reason
 * printed once, so a skip is never silent.
 */
export function gpuTest(
  name: string,
  fn: (gpu: Gpu) => Promise<void> | void,
  options: GpuTestOptions = {},
): void {
  let reason: string | undefined;
  if (typeof gpuOrReason === "string") reason = gpuOrReason;
  else {
    for (const f of options.features ?? []) {
      const has = f === "shader-f16" ? gpuOrReason.features.f16 : gpuOrReason.features.timestamp;
      if (!has) reason = `adapter "${gpuOrReason.adapterName}" lacks ${f}`;
    }
  }
  if (reason && !reported.has(reason)) {
    reported.add(reason);
    console.warn(`SKIP GPU tests: ${reason}`);
  }
  Deno.test({
    name,
    ignore: reason !== undefined,
    sanitizeOps: false,
    sanitizeResources: false,
    fn: () => fn(gpuOrReason as Gpu),
  });
}

/** Normalized MSE and max-abs error of `got` against `want`. */
export function errorStats(
  got: ArrayLike<number>,
  want: ArrayLike<number>,
): { nmse: number; maxAbs: number; worst: number } {
  if (got.length !== want.length) {
    throw new Error(`length mismatch: got ${got.length}, want ${want.length}`);
  }
  let se = 0, ref = 0, maxAbs = 0, worst = 0;
  for (let i = 0; i < want.length; i++) {
    const d = got[i] - want[i];
    if (!Number.isFinite(got[i]) && got[i] !== want[i]) {
      return { nmse: Infinity, maxAbs: Infinity, worst: i };
    }
    se += d * d;
    ref += want[i] * want[i];
    if (Math.abs(d) > maxAbs) {
      maxAbs = Math.abs(d);
      worst = i;
    }
  }
  return { nmse: ref > 0 ? se / ref : se, maxAbs, worst };
}

/** Asserts `got` matches `want` within `tol`; the message names the case and the worst element. */
export function assertClose(
  name: string,
  got: ArrayLike<number>,
  want: ArrayLike<number>,
  tol: Tolerance,
): void {
  const s = errorStats(got, want);
  if (!(s.nmse <= tol.nmse) || !(s.maxAbs <= tol.maxAbs)) {
    throw new Error(
      `${name}: nmse ${s.nmse.toExponential(2)} (limit ${tol.nmse}), max-abs ${
        s.maxAbs.toExponential(2)
      } (limit ${tol.maxAbs}) at index ${s.worst}: got ${got[s.worst]}, want ${want[s.worst]}`,
    );
  }
}

/** A small seeded PRNG (mulberry32) returning floats in [0, 1). */
export function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** `n` seeded uniform values in [-scale, scale). */
export function randomArray(n: number, seed: number, scale = 1): Float32Array {
  const r = rng(seed);
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) out[i] = (r() * 2 - 1) * scale;
  return out;
}

/** Rounds each value to the nearest f16 (what an f16 buffer would hold). */
export function roundF16(a: Float32Array): Float32Array {
  return Float32Array.from(a, (x) => Math.f16round(x));
}
