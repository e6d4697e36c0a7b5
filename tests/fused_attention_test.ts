import {
  createFusedAttention,
  fusedAttentionPlan,
  fusedAttentionRef,
  type FusedAttentionRefShape,
  fusedAttentionScratchBytes,
} from "../kernels/fused_attention.ts";
import { attentionUsesSplitK } from "../kernels/attention.ts";
import { kvCacheBytes, kvDequantizeRef, type KvDType, kvQuantizeRef } from "../kernels/kv_write.ts";
import { ropeInvFreq } from "../kernels/rope.ts";
import type { RopeLayout } from "../models/types.ts";
import type { Gpu } from "../engine/gpu.ts";
import { assertClose, gpuTest, randomArray } from "./harness.ts";
import assert from "@specdec/assert";

/**
 * Tolerances against the composed reference (ropeRef, kvWriteRef's rounding, attentionRef in
 * f64). f32/f16 caches: the kernel rounds the new rows as the reference does, so the error is
 * GPU cos/sin (RoPE's own bound, max-abs 2e-4 on the rotated values) carried through the
 * softmax: nmse <= 1e-8, max-abs <= 5e-4 (an f16 cache value may round one ulp apart). q8: a RoPE rounding difference may move a new key's
 * int8 by one step (1/127 of its absmax), so the cache comparison allows one step and the
 * output nmse <= 1e-5, max-abs <= 1e-2.
 */
const TOL = { nmse: 1e-8, maxAbs: 5e-4 };
const Q8_TOL = { nmse: 1e-5, maxAbs: 1e-2 };
const LAYERS = 2;
const RW = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST;

interface Case {
  T: number;
  pos: number;
  nHeads: number;
  nKvHeads: number;
  headDim: number;
  maxSeq: number;
  dtype: KvDType;
  layout: RopeLayout;
}

/** What a cache of `dtype` holds for `values` (f32 values) and the bytes to upload. */
function cacheImage(dtype: KvDType, values: Float32Array, headDim: number) {
  if (dtype === "f32") return { held: values, bytes: new Uint8Array(values.buffer.slice(0)) };
  if (dtype === "f16") {
    const h = new Float16Array(values);
    return { held: Float32Array.from(h), bytes: new Uint8Array(h.buffer) };
  }
  const { q, scale } = kvQuantizeRef(values, values.length / headDim, headDim);
  const bytes = new Uint8Array(q.length + scale.byteLength);
  bytes.set(new Uint8Array(q.buffer));
  bytes.set(new Uint8Array(scale.buffer), q.length);
  return { held: kvDequantizeRef(q, scale, headDim), bytes };
}

/** The f32 values a cache buffer of `dtype` holds. */
function readCache(dtype: KvDType, bytes: ArrayBuffer, n: number, headDim: number): Float32Array {
  if (dtype === "f32") return new Float32Array(bytes, 0, n);
  if (dtype === "f16") return Float32Array.from(new Float16Array(bytes, 0, n));
  return kvDequantizeRef(
    new Int8Array(bytes, 0, n),
    new Float32Array(bytes, n, n / headDim),
    headDim,
  );
}

async function check(gpu: Gpu, c: Case, shared?: GPUBuffer): Promise<void> {
  const { T, pos, nHeads, nKvHeads, headDim, maxSeq, dtype, layout } = c;
  const seed = T * 7 + pos * 131 + nHeads * 17 + headDim;
  const W = (nHeads + 2 * nKvHeads) * headDim;
  const qkv = randomArray(T * W, seed, 2);
  const n = LAYERS * maxSeq * nKvHeads * headDim;
  // Rows < pos hold earlier keys; rows >= pos hold stale values the kernel must overwrite/ignore.
  const k0 = cacheImage(dtype, randomArray(n, seed + 1), headDim);
  const v0 = cacheImage(dtype, randomArray(n, seed + 2), headDim);
  const invFreq = ropeInvFreq(headDim, 10000);
  const shape: FusedAttentionRefShape = { ...c, layer: 1 };
  const want = fusedAttentionRef(qkv, k0.held, v0.held, invFreq, shape);
  const size = kvCacheBytes(dtype, LAYERS, maxSeq, nKvHeads, headDim);
  const kCache = gpu.upload("k", k0.bytes, RW), vCache = gpu.upload("v", v0.bytes, RW);
  assert.equal(kCache.size, Math.ceil(size / 4) * 4);
  const out = gpu.buffer("out", T * nHeads * headDim * 4, RW);
  const plan = fusedAttentionPlan(c, gpu.limits.maxComputeWorkgroupStorageSize);
  const scratch = shared ??
    gpu.buffer("scratch", Math.max(4, fusedAttentionScratchBytes(c, plan)), RW);
  const d = await createFusedAttention(gpu, {
    label: "test.attn",
    ...c,
    qkv: gpu.upload("qkv", qkv),
    kCache,
    vCache,
    state: gpu.upload("state", new Uint32Array([pos, 0, 0, 0])),
    out,
    invFreq: gpu.upload("inv_freq", invFreq),
    layers: LAYERS,
    layer: 1,
    scratch,
  });
  // Twice: the split counters must have returned to 0 for the second run to merge correctly.
  for (let rep = 0; rep < 2; rep++) {
    if (rep) gpu.write(kCache, k0.bytes), gpu.write(vCache, v0.bytes);
    await gpu.run("test", [d]);
    const name = `${dtype} ${layout} T=${T} pos=${pos} heads=${nHeads}/${nKvHeads} hd=${headDim}` +
      ` maxSeq=${maxSeq} ${plan.variant} ns=${plan.nSplits} rep=${rep}`;
    const tol = dtype === "q8" ? Q8_TOL : TOL;
    assertClose(`${name} out`, new Float32Array(await gpu.read(out)), want.out, tol);
    // One rounding step of the cache type apart at most (f16: an ulp of values below 4).
    const cacheTol = dtype === "q8"
      ? { nmse: 1e-5, maxAbs: 2.01 / 127 * 2 }
      : dtype === "f16"
      ? { nmse: 1e-8, maxAbs: 2 ** -9 }
      : TOL;
    const kGot = readCache(dtype, await gpu.read(kCache), n, headDim);
    const vGot = readCache(dtype, await gpu.read(vCache), n, headDim);
    assertClose(`${name} k cache`, kGot, want.kCache, cacheTol);
    assertClose(`${name} v cache`, vGot, want.vCache, cacheTol);
  }
}

Deno.test("fusedAttentionRef() writes the new rows and leaves the others", () => {
  const s: FusedAttentionRefShape = {
    T: 1,
    pos: 1,
    nHeads: 1,
    nKvHeads: 1,
    headDim: 2,
    maxSeq: 3,
    layer: 0,
    dtype: "f32",
    layout: "interleaved",
  };
  // q = (1, 0), k = (2, 0), v = (5, 6) at position 1 with invFreq [0] (no rotation).
  const r = fusedAttentionRef(
    new Float32Array([1, 0, 2, 0, 5, 6]),
    new Float32Array([1, 1, 9, 9, 9, 9]),
    new Float32Array([3, 4, 9, 9, 9, 9]),
    new Float32Array([0]),
    s,
  );
  assert.deepEqual([...r.kCache], [1, 1, 2, 0, 9, 9]);
  assert.deepEqual([...r.vCache], [3, 4, 5, 6, 9, 9]);
  // scores 1/sqrt2 * (1, 2): weights e^0.707, e^1.414 over v (3,4), (5,6)
  const a = Math.exp(1 / Math.SQRT2), b = Math.exp(2 / Math.SQRT2);
  assert.ok(Math.abs(r.out[0] - (3 * a + 5 * b) / (a + b)) < 1e-5);
});

const SHAPES: [number, number, number][] = [[9, 3, 64], [8, 4, 8], [6, 2, 32], [4, 4, 64]];
/** (T, pos, rows of cache past pos + T): decode, verify and prefill widths, split and not. */
const ROWS: [number, number, number][] = [
  [1, 0, 0],
  [1, 37, 64],
  [3, 5, 0],
  [5, 130, 3],
  [17, 29, 64],
  [40, 0, 0],
  [33, 7, 64],
];

for (const dtype of ["f32", "f16", "q8"] as KvDType[]) {
  const features = dtype === "f16" ? ["shader-f16" as const] : [];
  gpuTest(
    `fused attention (${dtype} cache) matches RoPE + KV write + attention on ragged shapes`,
    async (gpu) => {
      let split = 0, unsplit = 0;
      for (const [nHeads, nKvHeads, headDim] of SHAPES) {
        for (const [i, [T, pos, extra]] of ROWS.entries()) {
          const layout: RopeLayout = (i + headDim) % 2 ? "interleaved" : "rotate-half";
          const c = { T, pos, nHeads, nKvHeads, headDim, maxSeq: pos + T + extra, dtype, layout };
          const kt = fusedAttentionPlan(c, gpu.limits.maxComputeWorkgroupStorageSize).kt;
          if (attentionUsesSplitK(c, kt)) split++;
          else unsplit++;
          await check(gpu, c);
        }
      }
      assert.ok(split > 0 && unsplit > 0, `both paths exercised (${split} split, ${unsplit} not)`);
    },
    { features },
  );
}

gpuTest("fused attention plans of different T share one split-K scratch", async (gpu) => {
  const base = { pos: 20, nHeads: 4, nKvHeads: 4, headDim: 64, maxSeq: 200 };
  const cases = [17, 1, 3, 40, 1, 2].map((T): Case => ({
    ...base,
    T,
    dtype: "f32",
    layout: "rotate-half",
  }));
  const bytes = Math.max(
    ...cases.map((c) =>
      fusedAttentionScratchBytes(
        c,
        fusedAttentionPlan(c, gpu.limits.maxComputeWorkgroupStorageSize),
      )
    ),
  );
  const shared = gpu.buffer("shared.scratch", bytes, RW);
  for (const c of cases) await check(gpu, c, shared);
});

gpuTest("fused attention refuses a split plan without enough scratch", async (gpu) => {
  const c = {
    T: 1,
    nHeads: 4,
    nKvHeads: 2,
    headDim: 16,
    maxSeq: 512,
    dtype: "f32" as KvDType,
    layout: "interleaved" as RopeLayout,
  };
  const size = kvCacheBytes("f32", 1, 512, 2, 16);
  const b = (n: number) => gpu.buffer("b", n, RW);
  await assert.rejects(
    () =>
      createFusedAttention(gpu, {
        label: "L0.attn",
        ...c,
        qkv: b(64 * 4),
        kCache: b(size),
        vCache: b(size),
        state: b(16),
        out: b(64 * 4),
        invFreq: b(32),
        layers: 1,
        layer: 0,
        scratch: b(4),
      }),
    /L0\.attn: split-K scratch of 4 bytes is too small/,
  );
});
