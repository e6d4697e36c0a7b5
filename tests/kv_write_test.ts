import { createKvWrite, type KvDType, kvWriteRef, type KvWriteShape } from "../kernels/kv_write.ts";
import type { Gpu } from "../engine/gpu.ts";
import { assertClose, gpuTest, randomArray } from "./harness.ts";
import assert from "@specdec/assert";

Deno.test("kvWriteRef() writes rows pos..pos+T-1 of one layer and nothing else", () => {
  const s: KvWriteShape = {
    T: 2,
    pos: 1,
    nKvHeads: 1,
    headDim: 2,
    maxSeq: 4,
    layer: 1,
    dtype: "f32",
  };
  const cache = new Float32Array(2 * 4 * 2).fill(-1);
  kvWriteRef(cache, new Float32Array([1, 2, 3, 4]), s);
  const want = new Float32Array(16).fill(-1);
  want.set([1, 2, 3, 4], 8 + 2);
  assert.deepEqual([...cache], [...want]);
});

Deno.test("kvWriteRef() rounds to f16 and drops rows at or past maxSeq", () => {
  const s: KvWriteShape = {
    T: 3,
    pos: 1,
    nKvHeads: 1,
    headDim: 1,
    maxSeq: 2,
    layer: 0,
    dtype: "f16",
  };
  const cache = new Float32Array(2);
  kvWriteRef(cache, new Float32Array([0.1, 7, 9]), s);
  assert.deepEqual([...cache], [0, Math.f16round(0.1)]);
});

const usage = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST;

/** Uploads `values` as a cache of `dtype`. */
function uploadCache(gpu: Gpu, label: string, values: Float32Array, dtype: KvDType): GPUBuffer {
  const data = dtype === "f16" ? Float16Array.from(values) : values;
  return gpu.upload(label, data, usage);
}

async function readCache(gpu: Gpu, buf: GPUBuffer, n: number, dtype: KvDType) {
  const bytes = await gpu.read(buf, 0, n * (dtype === "f16" ? 2 : 4));
  return dtype === "f16" ? Float32Array.from(new Float16Array(bytes)) : new Float32Array(bytes);
}

async function checkWrite(gpu: Gpu, s: KvWriteShape, layers: number): Promise<void> {
  const row = s.nKvHeads * s.headDim;
  const n = layers * s.maxSeq * row;
  const seed = s.T * 1000 + s.pos * 10 + s.nKvHeads + s.headDim;
  // Caches start full of recognisable garbage so that a write to a wrong row shows up.
  const kWant = randomArray(n, seed, 50), vWant = randomArray(n, seed + 1, 50);
  if (s.dtype === "f16") {
    kWant.set(Float32Array.from(kWant, Math.f16round));
    vWant.set(Float32Array.from(vWant, Math.f16round));
  }
  const kCache = uploadCache(gpu, "kCache", kWant, s.dtype);
  const vCache = uploadCache(gpu, "vCache", vWant, s.dtype);
  const k = randomArray(s.T * row, seed + 2), v = randomArray(s.T * row, seed + 3);
  const d = await createKvWrite(gpu, {
    label: "test.kv_write",
    k: gpu.upload("k", k),
    v: gpu.upload("v", v),
    kCache,
    vCache,
    state: gpu.upload("state", new Uint32Array([s.pos, 0, 0, 0])),
    ...s,
  });
  await gpu.run("test", [d]);
  kvWriteRef(kWant, k, s);
  kvWriteRef(vWant, v, s);
  const name = `${s.dtype} T=${s.T} pos=${s.pos} nKv=${s.nKvHeads} hd=${s.headDim} L${s.layer}`;
  // A copy (with at most one f32->f16 rounding, done identically by both sides): exact.
  const exact = { nmse: 0, maxAbs: 0 };
  assertClose(`K ${name}`, await readCache(gpu, kCache, n, s.dtype), kWant, exact);
  assertClose(`V ${name}`, await readCache(gpu, vCache, n, s.dtype), vWant, exact);
}

for (const dtype of ["f32", "f16"] as KvDType[]) {
  gpuTest(
    `kv_write ${dtype} writes exactly rows pos..pos+T-1 of the layer on ragged shapes`,
    async (gpu) => {
      const cases: [number, number, number, number][] = [
        // T, pos, nKv, headDim
        [1, 0, 1, 8],
        [3, 5, 3, 64],
        [17, 31, 4, 8],
        [5, 100, 3, 64],
        [33, 1, 2, 128],
      ];
      for (const [T, pos, nKvHeads, headDim] of cases) {
        for (const layer of [0, 2]) {
          await checkWrite(gpu, { T, pos, nKvHeads, headDim, maxSeq: 140, layer, dtype }, 3);
        }
      }
    },
    { features: dtype === "f16" ? ["shader-f16"] : [] },
  );
}

gpuTest(
  "kv_write drops rows at or past maxSeq instead of spilling into the next layer",
  async (gpu) => {
    await checkWrite(gpu, {
      T: 7,
      pos: 13,
      nKvHeads: 3,
      headDim: 8,
      maxSeq: 16,
      layer: 0,
      dtype: "f32",
    }, 2);
  },
);

gpuTest("createKvWrite() rejects a cache too small for the layer", async (gpu) => {
  const small = gpu.buffer("small", 64, usage);
  await assert.rejects(
    () =>
      createKvWrite(gpu, {
        label: "test.kv_write.small",
        k: small,
        v: small,
        kCache: small,
        vCache: small,
        state: small,
        dtype: "f32",
        T: 1,
        nKvHeads: 1,
        headDim: 8,
        maxSeq: 4,
        layer: 1,
      }),
    /layer 1 needs caches of at least 256 bytes/,
  );
});
