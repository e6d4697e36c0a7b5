import {
  attentionKeyTile,
  attentionPlan,
  attentionRef,
  type AttentionRefShape,
  type AttentionScratch,
  attentionScratchBytes,
  attentionUsesSplitK,
  type AttentionVariant,
  createAttention,
  createAttentionScratch,
} from "../kernels/attention.ts";
import {
  kvCacheBytes,
  kvDequantizeRef,
  type KvDType,
  kvQ8CacheImage,
  kvQuantizeRef,
} from "../kernels/kv_write.ts";
import type { Gpu } from "../engine/gpu.ts";
import { assertClose, errorStats, gpuTest, randomArray, rng } from "./harness.ts";
import assert from "@specdec/assert";

const VARIANTS: AttentionVariant[] = ["flash", "flash-split", "naive"];
/**
 * The kernels read the same K/V values as the reference (f16-rounded where the cache is f16,
 * int8 x scale where it is q8: both sides form the same f32 product) and accumulate in f32 against
 * its f64: the only error is f32 rounding of dot products, exp2 and sums over at most ~140 keys.
 */
const TOL = { nmse: 1e-10, maxAbs: 5e-6 };
/**
 * q8 cache against the reference over the UNQUANTIZED f32 values (q in [-3, 3), K/V in [-1, 1),
 * headDim 8..128, up to 140 keys): the error of 8-bit storage itself (each value off by at most
 * absmax/254). Measured on lavapipe over every q8 case here: worst nmse 4.4e-5, worst max-abs
 * 7.6e-3 (the tests print them); the bound is ~3x that.
 */
const Q8_VS_F32 = { nmse: 1.5e-4, maxAbs: 2.5e-2 };
/** Layers in every test cache (tests attend over layer 1, so layer 0 sits below it). */
const LAYERS = 2;
/** Magnitude of the stale garbage in cache rows past pos+T-1: would swamp any score it entered. */
const STALE = 3e4;

Deno.test("attentionRef() averages V uniformly when all scores are equal", () => {
  // q = 0 -> every visible key gets weight 1/(pos+t+1).
  const s: AttentionRefShape = {
    T: 2,
    pos: 1,
    nHeads: 2,
    nKvHeads: 1,
    headDim: 1,
    maxSeq: 4,
    layer: 0,
  };
  const v = new Float32Array([1, 2, 3, 1000]);
  const out = attentionRef(new Float32Array(4), new Float32Array(4), v, s);
  assert.deepEqual([...out], [1.5, 1.5, 2, 2]);
});

Deno.test("attentionRef() puts all weight on the key aligned with a dominant query", () => {
  const s: AttentionRefShape = {
    T: 1,
    pos: 1,
    nHeads: 1,
    nKvHeads: 1,
    headDim: 1,
    maxSeq: 2,
    layer: 0,
  };
  const out = attentionRef(
    new Float32Array([100]),
    new Float32Array([-1, 1]),
    new Float32Array([5, 7]),
    s,
  );
  assert.ok(Math.abs(out[0] - 7) < 1e-6, `got ${out[0]}`);
});

Deno.test("attentionUsesSplitK() splits decode/verify and not prefill (pycode target shapes)", () => {
  const pycode = { nHeads: 9, nKvHeads: 3, headDim: 64, maxSeq: 1024 };
  assert.equal(attentionUsesSplitK({ ...pycode, T: 1 }, 32), true);
  assert.equal(attentionUsesSplitK({ ...pycode, T: 17 }, 32), true);
  assert.equal(attentionUsesSplitK({ ...pycode, T: 512 }, 32), false);
  // A cache no longer than one tile has nothing to split.
  assert.equal(attentionUsesSplitK({ ...pycode, T: 1, maxSeq: 32 }, 32), false);
  const decode = attentionPlan({ ...pycode, T: 1 }, 32768);
  assert.deepEqual(decode, { variant: "flash-split", bq: 4, kt: 32, nSplits: 32 });
  assert.equal(attentionPlan({ ...pycode, T: 512 }, 32768).variant, "flash");
});

Deno.test("attentionKeyTile() shrinks the key tile until workgroup memory fits", () => {
  assert.equal(attentionKeyTile(16, 64, 32768), 32);
  assert.equal(attentionKeyTile(16, 128, 32768), 16);
  assert.equal(attentionKeyTile(16, 128, 49152), 32);
  assert.throws(() => attentionKeyTile(16, 1024, 32768), /needs more than 32768 bytes/);
});

interface Case extends AttentionRefShape {
  dtype: KvDType;
}

const usage = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST;

/** Random caches for `c` (2 layers, f32 values), stale rows full of garbage. */
function makeCaches(c: Case, seed: number): { k: Float32Array; v: Float32Array } {
  const row = c.nKvHeads * c.headDim;
  const n = LAYERS * c.maxSeq * row;
  const k = randomArray(n, seed, 1), v = randomArray(n, seed + 1, 1);
  const r = rng(seed + 2);
  for (let layer = 0; layer < 2; layer++) {
    for (let s = c.pos + c.T; s < c.maxSeq; s++) {
      for (let i = 0; i < row; i++) {
        const o = (layer * c.maxSeq + s) * row + i;
        k[o] = r() < 0.5 ? -STALE : STALE;
        v[o] = r() < 0.5 ? -STALE : STALE;
      }
    }
  }
  return { k, v };
}

/** The values a cache of `dtype` holds for `a` (f16-rounded, or q8-quantized and dequantized). */
function held(a: Float32Array, dtype: KvDType, headDim: number): Float32Array {
  if (dtype === "f16") return Float32Array.from(a, Math.f16round);
  if (dtype === "q8") {
    const { q, scale } = kvQuantizeRef(a, a.length / headDim, headDim);
    return kvDequantizeRef(q, scale, headDim);
  }
  return a;
}

function toCache(gpu: Gpu, label: string, a: Float32Array, dtype: KvDType, hd: number): GPUBuffer {
  if (dtype === "q8") return gpu.upload(label, kvQ8CacheImage(a, hd), usage);
  return gpu.upload(label, dtype === "f16" ? Float16Array.from(a) : a, usage);
}

/** Runs `variants` on case `c` (all in one submission) and returns each output. */
async function runCase(
  gpu: Gpu,
  c: Case,
  q: Float32Array,
  k: GPUBuffer,
  v: GPUBuffer,
  variants: (AttentionVariant | undefined)[],
  scratch?: AttentionScratch,
): Promise<Float32Array[]> {
  const state = gpu.upload("state", new Uint32Array([c.pos, 0, 0, 0]));
  const qBuf = gpu.upload("q", q);
  const outs = variants.map((_, i) => gpu.buffer(`out${i}`, q.byteLength, usage));
  const dispatches = [];
  for (let i = 0; i < variants.length; i++) {
    dispatches.push(
      ...await createAttention(gpu, {
        label: `test.attn.${variants[i] ?? "auto"}`,
        q: qBuf,
        kCache: k,
        vCache: v,
        state,
        out: outs[i],
        variant: variants[i],
        layers: LAYERS,
        scratch,
        ...c,
      }),
    );
  }
  await gpu.run("test.attn", dispatches);
  return Promise.all(outs.map(async (o) => new Float32Array(await gpu.read(o))));
}

/** Worst errors seen per dtype: against the held values, and (q8) against the f32 values. */
const worst = new Map<string, { maxAbs: number; nmse: number }>();

function track(key: string, got: Float32Array, want: Float32Array): void {
  const s = errorStats(got, want), w = worst.get(key) ?? { maxAbs: 0, nmse: 0 };
  worst.set(key, { maxAbs: Math.max(w.maxAbs, s.maxAbs), nmse: Math.max(w.nmse, s.nmse) });
}

function report(key: string): void {
  const w = worst.get(key);
  if (w) {
    console.log(
      `  worst ${key}: max-abs ${w.maxAbs.toExponential(2)}, nmse ${w.nmse.toExponential(2)}`,
    );
  }
}

async function checkCase(
  gpu: Gpu,
  c: Case,
  variants: (AttentionVariant | undefined)[] = VARIANTS,
): Promise<void> {
  const seed = c.T * 7919 + c.pos * 31 + c.nHeads * 5 + c.nKvHeads + c.headDim;
  const { k, v } = makeCaches(c, seed);
  const q = randomArray(c.T * c.nHeads * c.headDim, seed + 9, 3);
  const want = attentionRef(q, held(k, c.dtype, c.headDim), held(v, c.dtype, c.headDim), c);
  const wantF32 = c.dtype === "q8" ? attentionRef(q, k, v, c) : undefined;
  const got = await runCase(
    gpu,
    c,
    q,
    toCache(gpu, "k", k, c.dtype, c.headDim),
    toCache(gpu, "v", v, c.dtype, c.headDim),
    variants,
  );
  for (let i = 0; i < variants.length; i++) {
    const name =
      `${variants[i] ?? "auto"} ${c.dtype} T=${c.T} pos=${c.pos} heads=${c.nHeads}/${c.nKvHeads}` +
      ` hd=${c.headDim} maxSeq=${c.maxSeq}`;
    track(c.dtype, got[i], want);
    assertClose(name, got[i], want, TOL);
    if (wantF32) {
      track("q8 vs unquantized f32", got[i], wantF32);
      assertClose(`${name} vs unquantized f32`, got[i], wantF32, Q8_VS_F32);
    }
  }
}

for (const dtype of ["f32", "f16", "q8"] as KvDType[]) {
  gpuTest(
    `attention ${dtype}: flash, flash-split and naive match the reference on ragged T, pos, GQA`,
    async (gpu) => {
      let i = 0;
      for (const T of [1, 2, 5, 17, 33]) {
        for (const pos of [0, 1, 31, 100]) {
          for (const [nHeads, nKvHeads] of [[1, 1], [4, 4], [8, 4], [9, 3]]) {
            // headDim alternates so that every (T, pos, heads) pair meets both over the dtypes.
            const headDim = (i++ + (dtype === "f16" ? 1 : 0)) % 2 ? 64 : 8;
            // One maxSeq for all (fewer pipeline specializations); >= 5 stale rows past the end.
            const maxSeq = 140;
            await checkCase(gpu, { T, pos, nHeads, nKvHeads, headDim, maxSeq, layer: 1, dtype });
          }
        }
      }
      report(dtype);
      report("q8 vs unquantized f32");
    },
    { features: dtype === "f16" ? ["shader-f16"] : [] },
  );
}

gpuTest("attention handles S just past a key tile, long caches and headDim 128", async (gpu) => {
  const kt = attentionPlan(
    { T: 1, nHeads: 9, nKvHeads: 3, headDim: 64, maxSeq: 1024 },
    gpu.limits.maxComputeWorkgroupStorageSize,
  ).kt;
  const cases: [number, number, number, number][] = [
    // T, pos, headDim, maxSeq
    [1, kt, 64, 1024], // S = kt + 1, many (mostly empty) split chunks
    [2, kt - 1, 64, 200], // last row sees kt + 1 keys, the first exactly kt
    [1, 2 * kt, 8, 2 * kt + 1], // S = 2kt + 1 = maxSeq: the cache is full
    [3, kt - 2, 128, 70],
    [17, 2 * kt, 128, 2 * kt + 20],
  ];
  for (const [T, pos, headDim, maxSeq] of cases) {
    for (const dtype of (gpu.features.f16 ? ["f32", "f16", "q8"] : ["f32", "q8"]) as KvDType[]) {
      await checkCase(gpu, { T, pos, nHeads: 9, nKvHeads: 3, headDim, maxSeq, layer: 1, dtype }, [
        ...VARIANTS,
        undefined,
      ]);
    }
  }
  report("q8 vs unquantized f32");
});

gpuTest("attention output does not depend on cache rows beyond pos+T-1", async (gpu) => {
  const plain: KvDType = gpu.features.f16 ? "f16" : "f32";
  for (
    const [T, pos, dtype] of [
      [1, 40, plain],
      [5, 3, plain],
      [33, 0, plain],
      [1, 40, "q8"],
      [5, 3, "q8"],
    ] as [number, number, KvDType][]
  ) {
    const c: Case = { T, pos, nHeads: 8, nKvHeads: 4, headDim: 64, maxSeq: 128, layer: 1, dtype };
    const { k, v } = makeCaches(c, T + pos);
    const q = randomArray(T * 8 * 64, 5, 3);
    const first = await runCase(
      gpu,
      c,
      q,
      toCache(gpu, "k", k, dtype, 64),
      toCache(gpu, "v", v, dtype, 64),
      VARIANTS,
    );
    // Replace every stale row (both layers) with different garbage; nothing may change, bit for bit.
    const row = c.nKvHeads * c.headDim;
    const r = rng(99);
    for (let layer = 0; layer < 2; layer++) {
      for (let i = (layer * c.maxSeq + pos + T) * row; i < (layer + 1) * c.maxSeq * row; i++) {
        k[i] = (r() - 0.5) * 6e4;
        v[i] = (r() - 0.5) * 6e4;
      }
    }
    const second = await runCase(
      gpu,
      c,
      q,
      toCache(gpu, "k2", k, dtype, 64),
      toCache(gpu, "v2", v, dtype, 64),
      VARIANTS,
    );
    for (let i = 0; i < VARIANTS.length; i++) {
      assert.deepEqual(second[i], first[i], `${VARIANTS[i]} ${dtype} T=${T} pos=${pos} changed`);
    }
  }
});

gpuTest("createAttention() rejects heads that are not a multiple of kv heads", async (gpu) => {
  const b = gpu.buffer("b", 1 << 16, usage);
  await assert.rejects(
    () =>
      createAttention(gpu, {
        label: "test.attn.bad",
        q: b,
        kCache: b,
        vCache: b,
        state: b,
        out: b,
        dtype: "f32",
        T: 1,
        nHeads: 9,
        nKvHeads: 2,
        headDim: 8,
        maxSeq: 4,
        layers: 1,
        layer: 0,
      }),
    /nHeads 9 is not a multiple of nKvHeads 2/,
  );
});

for (const dtype of ["f32", "f16", "q8"] as KvDType[]) {
  gpuTest(
    `createAttention() rejects a ${dtype} cache one word short of kvCacheBytes`,
    async (gpu) => {
      const need = kvCacheBytes(dtype, 2, 16, 3, 64);
      const ok = gpu.buffer("ok", need, usage), short = gpu.buffer("short", need - 4, usage);
      const q = gpu.buffer("q", 9 * 64 * 4, usage);
      const args = {
        label: `test.attn.${dtype}.small`,
        q,
        kCache: ok,
        vCache: short,
        state: q,
        out: q,
        dtype,
        T: 1,
        nHeads: 9,
        nKvHeads: 3,
        headDim: 64,
        maxSeq: 16,
        layers: 2,
        layer: 0,
      };
      await assert.rejects(
        () => createAttention(gpu, args),
        new RegExp(`2 layer\\(s\\) of ${dtype} cache need ${need} bytes per cache`),
      );
      await assert.rejects(
        () => createAttention(gpu, { ...args, vCache: ok, layer: 2 }),
        /layer must be an integer in \[0, 2\), got 2/,
      );
    },
    { features: dtype === "f16" ? ["shader-f16"] : [] },
  );
}

Deno.test("attentionScratchBytes() counts both split-K buffers, 8 bytes when not split", () => {
  const shape = { T: 1, nHeads: 9, nKvHeads: 3, headDim: 64, maxSeq: 1024 };
  const split = attentionPlan(shape, 32768);
  assert.equal(split.nSplits, 32);
  assert.equal(attentionScratchBytes(shape, split), 32 * 9 * (64 * 4 + 8));
  const flash = attentionPlan({ ...shape, T: 512 }, 32768);
  assert.equal(attentionScratchBytes({ ...shape, T: 512 }, flash), 8);
});

gpuTest(
  "attention shares one scratch, larger than each plan needs, across T plans",
  async (gpu) => {
    const base = { nHeads: 9, nKvHeads: 3, headDim: 64, maxSeq: 200, layer: 1 };
    const maxShared = gpu.limits.maxComputeWorkgroupStorageSize;
    const Ts = [1, 2, 5, 17];
    const bytes = Ts.map((T) => {
      const shape = { ...base, T };
      return attentionScratchBytes(shape, attentionPlan(shape, maxShared, "flash-split"));
    });
    // The largest plan's scratch, plus room: every other plan gets a strictly larger buffer.
    const big = { ...base, T: 17 };
    const scratch = createAttentionScratch(
      gpu,
      "test.attn.shared",
      big,
      attentionPlan(big, maxShared, "flash-split"),
    );
    assert.equal(scratch.acc.size + scratch.ml.size, bytes[3]);
    assert.ok(bytes.slice(0, 3).every((b) => b < bytes[3]), `scratch bytes per T: ${bytes}`);
    for (const T of Ts) {
      for (const dtype of ["f32", "q8"] as KvDType[]) {
        const c: Case = { ...base, T, pos: 37, dtype };
        const { k, v } = makeCaches(c, T * 3 + 1);
        const q = randomArray(T * 9 * 64, T, 3);
        const want = attentionRef(q, held(k, dtype, 64), held(v, dtype, 64), c);
        const [got] = await runCase(
          gpu,
          c,
          q,
          toCache(gpu, "k", k, dtype, 64),
          toCache(gpu, "v", v, dtype, 64),
          ["flash-split"],
          scratch,
        );
        assertClose(`shared scratch ${dtype} T=${T}`, got, want, TOL);
      }
    }
    const small = createAttentionScratch(gpu, "test.attn.small", { ...base, T: 1 }, {
      variant: "flash-split",
      bq: 4,
      kt: 8,
      nSplits: 1,
    });
    const c: Case = { ...base, T: 17, pos: 0, dtype: "f32" };
    const cache = gpu.buffer("cache", kvCacheBytes("f32", LAYERS, 200, 3, 64), usage);
    await assert.rejects(
      () =>
        runCase(
          gpu,
          c,
          new Float32Array(17 * 9 * 64),
          cache,
          cache,
          ["flash-split"],
          small,
        ),
      /split-K scratch of \d+ \+ \d+ bytes is too small/,
    );
  },
);
