import {
  attentionKeyTile,
  attentionPlan,
  attentionRef,
  type AttentionRefShape,
  attentionUsesSplitK,
  type AttentionVariant,
  createAttention,
} from "../kernels/attention.ts";
import type { KvDType } from "../kernels/kv_write.ts";
import type { Gpu } from "../engine/gpu.ts";
import { assertClose, errorStats, gpuTest, randomArray, rng } from "./harness.ts";
import assert from "@specdec/assert";

const VARIANTS: AttentionVariant[] = ["flash", "flash-split", "naive"];
/**
 * The kernels read the same (f16-rounded where the cache is f16) K/V values as the reference and
 * accumulate in f32 against its f64: the only error is f32 rounding of dot products, exp2 and sums
 * over at most ~140 keys.
 */
const TOL = { nmse: 1e-10, maxAbs: 5e-6 };
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

/** Random caches for `c` (2 layers, f16-rounded for an f16 cache), stale rows full of garbage. */
function makeCaches(c: Case, seed: number): { k: Float32Array; v: Float32Array } {
  const row = c.nKvHeads * c.headDim;
  const n = 2 * c.maxSeq * row;
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
  if (c.dtype === "f16") {
    k.set(Float32Array.from(k, Math.f16round));
    v.set(Float32Array.from(v, Math.f16round));
  }
  return { k, v };
}

function toCache(gpu: Gpu, label: string, a: Float32Array, dtype: KvDType): GPUBuffer {
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
        ...c,
      }),
    );
  }
  await gpu.run("test.attn", dispatches);
  return Promise.all(outs.map(async (o) => new Float32Array(await gpu.read(o))));
}

let worst = 0;

async function checkCase(
  gpu: Gpu,
  c: Case,
  variants: (AttentionVariant | undefined)[] = VARIANTS,
): Promise<void> {
  const seed = c.T * 7919 + c.pos * 31 + c.nHeads * 5 + c.nKvHeads + c.headDim;
  const { k, v } = makeCaches(c, seed);
  const q = randomArray(c.T * c.nHeads * c.headDim, seed + 9, 3);
  const want = attentionRef(q, k, v, c);
  const got = await runCase(
    gpu,
    c,
    q,
    toCache(gpu, "k", k, c.dtype),
    toCache(gpu, "v", v, c.dtype),
    variants,
  );
  for (let i = 0; i < variants.length; i++) {
    const name =
      `${variants[i] ?? "auto"} ${c.dtype} T=${c.T} pos=${c.pos} heads=${c.nHeads}/${c.nKvHeads}` +
      ` hd=${c.headDim} maxSeq=${c.maxSeq}`;
    worst = Math.max(worst, errorStats(got[i], want).maxAbs);
    assertClose(name, got[i], want, TOL);
  }
}

for (const dtype of ["f32", "f16"] as KvDType[]) {
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
      console.log(`  worst max-abs error (${dtype}): ${worst.toExponential(2)}`);
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
    for (const dtype of (gpu.features.f16 ? ["f32", "f16"] : ["f32"]) as KvDType[]) {
      await checkCase(gpu, { T, pos, nHeads: 9, nKvHeads: 3, headDim, maxSeq, layer: 1, dtype }, [
        ...VARIANTS,
        undefined,
      ]);
    }
  }
});

gpuTest("attention output does not depend on cache rows beyond pos+T-1", async (gpu) => {
  const dtype: KvDType = gpu.features.f16 ? "f16" : "f32";
  for (const [T, pos] of [[1, 40], [5, 3], [33, 0]]) {
    const c: Case = { T, pos, nHeads: 8, nKvHeads: 4, headDim: 64, maxSeq: 128, layer: 1, dtype };
    const { k, v } = makeCaches(c, T + pos);
    const q = randomArray(T * 8 * 64, 5, 3);
    const first = await runCase(
      gpu,
      c,
      q,
      toCache(gpu, "k", k, dtype),
      toCache(gpu, "v", v, dtype),
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
      toCache(gpu, "k2", k, dtype),
      toCache(gpu, "v2", v, dtype),
      VARIANTS,
    );
    for (let i = 0; i < VARIANTS.length; i++) {
      assert.deepEqual(second[i], first[i], `${VARIANTS[i]} T=${T} pos=${pos} changed`);
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
        layer: 0,
      }),
    /nHeads 9 is not a multiple of nKvHeads 2/,
  );
});
