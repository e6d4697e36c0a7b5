import {
  createKvWrite,
  kvCacheBytes,
  kvDequantizeRef,
  type KvDType,
  kvQ8CacheImage,
  kvQuantizeRef,
  kvWriteRef,
  type KvWriteShape,
} from "../kernels/kv_write.ts";
import type { Gpu } from "../engine/gpu.ts";
import { assertClose, gpuTest, randomArray, rng } from "./harness.ts";
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
    layers,
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

for (const dtype of ["f32", "f16"] as ("f32" | "f16")[]) {
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
        layers: 2,
        layer: 1,
      }),
    /2 layer\(s\) of f32 cache need 256 bytes per cache \(kvCacheBytes\), got K 64 and V 64/,
  );
});

Deno.test("kvCacheBytes() is 1 byte per value plus a 4-byte scale per head vector for q8", () => {
  assert.equal(kvCacheBytes("f32", 3, 10, 2, 8), 3 * 10 * 2 * 8 * 4);
  assert.equal(kvCacheBytes("f16", 3, 10, 2, 8), 3 * 10 * 2 * 8 * 2);
  assert.equal(kvCacheBytes("q8", 3, 10, 2, 8), 3 * 10 * 2 * (8 + 4));
  // pycode target at a 1024 context: q8 is 53% of f16.
  assert.equal(kvCacheBytes("q8", 12, 1024, 3, 64), 12 * 1024 * 3 * 68);
  assert.throws(() => kvCacheBytes("q8", 0, 10, 2, 8), /layers must be a positive integer, got 0/);
  assert.throws(() => kvCacheBytes("q8", 1, 10, 2, 6), /headDim must be a multiple of 4, got 6/);
  assert.throws(() => kvCacheBytes("q4" as KvDType, 1, 1, 1, 4), /unknown KV dtype "q4"/);
});

Deno.test("kvQuantizeRef() maps absmax to ±127, rounds ties to even, keeps zero vectors at 0", () => {
  const { q, scale } = kvQuantizeRef(new Float32Array([-2, 0.5, 1.5, 1, 0, 0, 0, 0]), 2, 4);
  const s0 = Math.fround(2 * Math.fround(1 / 127));
  assert.equal(scale[0], s0);
  assert.equal(scale[1], 0);
  assert.deepEqual([...q.subarray(0, 4)], [-127, Math.round(0.5 / s0), Math.round(1.5 / s0), 64]);
  assert.deepEqual([...q.subarray(4)], [0, 0, 0, 0]);
  // absmax 127: scale = f32(127 * f32(1/127)) is exactly 1, so q = x rounded, ties to even.
  const tie = kvQuantizeRef(new Float32Array([127, 2.5, 3.5, -2.5]), 1, 4);
  assert.equal(tie.scale[0], 1);
  assert.deepEqual([...tie.q], [127, 2, 4, -2]);
  assert.deepEqual([...kvDequantizeRef(tie.q, tie.scale, 4)], [127, 2, 4, -2]);
});

Deno.test("kvQuantizeRef() round trip errs by at most half a scale step", () => {
  const hd = 12, n = 7;
  const x = randomArray(n * hd, 3, 5);
  const { q, scale } = kvQuantizeRef(x, n, hd);
  const y = kvDequantizeRef(q, scale, hd);
  for (let i = 0; i < x.length; i++) {
    const step = scale[Math.floor(i / hd)];
    assert.ok(Math.abs(x[i] - y[i]) <= step / 2 * (1 + 1e-6), `element ${i}: ${x[i]} -> ${y[i]}`);
  }
});

Deno.test("kvWriteRef() q8 stores the dequantized values of each written head vector", () => {
  const s: KvWriteShape = {
    T: 2,
    pos: 3,
    nKvHeads: 2,
    headDim: 4,
    maxSeq: 4,
    layer: 0,
    dtype: "q8",
  };
  const src = randomArray(16, 8);
  const cache = new Float32Array(4 * 8).fill(7);
  kvWriteRef(cache, src, s);
  const { q, scale } = kvQuantizeRef(src.subarray(0, 8), 2, 4);
  assert.deepEqual([...cache.subarray(24)], [...kvDequantizeRef(q, scale, 4)]);
  assert.ok(cache.subarray(0, 24).every((x) => x === 7), "rows before pos untouched");
});

/**
 * Runs the q8 write of a random [T, nKv, headDim] k and v into caches pre-filled with random
 * bytes and compares the whole buffers with the reference: int8 values bit-exact except at ties
 * (where GPU and CPU quotients may round differently by 1), scales within 1 ulp, all else intact.
 */
async function checkQ8Write(gpu: Gpu, s: KvWriteShape, layers: number): Promise<number> {
  const { T, pos, nKvHeads: nKv, headDim: hd, maxSeq, layer } = s;
  const bytes = kvCacheBytes("q8", layers, maxSeq, nKv, hd);
  const i8Bytes = layers * maxSeq * nKv * hd;
  const seed = T * 1000 + pos * 10 + nKv + hd;
  const r = rng(seed);
  const garbage = [0, 1].map(() => Uint8Array.from({ length: bytes }, () => (r() * 256) | 0));
  const caches = garbage.map((g, i) => gpu.upload(`cache${i}`, g, usage));
  // Mixed magnitudes so that scales differ a lot between vectors; one all-zero vector.
  const src = [0, 1].map((i) => {
    const a = randomArray(T * nKv * hd, seed + 2 + i, 1);
    for (let n = 0; n < T * nKv; n++) {
      const m = 10 ** ((n % 7) - 3);
      for (let j = 0; j < hd; j++) a[n * hd + j] *= n === 1 ? 0 : m;
    }
    return a;
  });
  const d = await createKvWrite(gpu, {
    label: "test.kv_write.q8",
    k: gpu.upload("k", src[0]),
    v: gpu.upload("v", src[1]),
    kCache: caches[0],
    vCache: caches[1],
    state: gpu.upload("state", new Uint32Array([pos, 0, 0, 0])),
    dtype: "q8",
    layers,
    T,
    nKvHeads: nKv,
    headDim: hd,
    maxSeq,
    layer,
  });
  await gpu.run("test", [d]);
  let ties = 0;
  for (let c = 0; c < 2; c++) {
    const name = `${c ? "V" : "K"} q8 T=${T} pos=${pos} nKv=${nKv} hd=${hd} L${layer}`;
    const got = new Uint8Array(await gpu.read(caches[c], 0, bytes));
    const want = garbage[c].slice();
    const { q, scale } = kvQuantizeRef(src[c], T * nKv, hd);
    const tie = new Uint8Array(want.length);
    for (let t = 0; t < T && pos + t < maxSeq; t++) {
      for (let h = 0; h < nKv; h++) {
        const n = t * nKv + h, dst = (layer * maxSeq + pos + t) * nKv + h;
        want.set(new Uint8Array(q.buffer, n * hd, hd), dst * hd);
        want.set(new Uint8Array(scale.buffer, n * 4, 4), i8Bytes + dst * 4);
        for (let j = 0; j < hd; j++) {
          const x = scale[n] > 0 ? src[c][n * hd + j] / scale[n] : 0;
          if (Math.abs(Math.abs(x - Math.trunc(x)) - 0.5) < 1e-4) tie[dst * hd + j] = 1;
        }
      }
    }
    const gotQ = new Int8Array(got.buffer, 0, i8Bytes),
      wantQ = new Int8Array(want.buffer, 0, i8Bytes);
    for (let i = 0; i < i8Bytes; i++) {
      if (gotQ[i] === wantQ[i]) continue;
      const where = `${name}: int8 ${i} (vector ${Math.floor(i / hd)}, element ${i % hd})`;
      assert.ok(
        tie[i] && Math.abs(gotQ[i] - wantQ[i]) === 1,
        `${where}: got ${gotQ[i]}, want ${wantQ[i]}`,
      );
      ties++;
    }
    const gotS = new Uint32Array(got.buffer, i8Bytes),
      wantS = new Uint32Array(want.buffer, i8Bytes);
    for (let i = 0; i < gotS.length; i++) {
      assert.ok(
        Math.abs(gotS[i] - wantS[i]) <= 1, // bit patterns of positive f32: 1 apart = 1 ulp
        `${name}: scale of vector ${i}: got bits ${gotS[i].toString(16)}, want ${
          wantS[i].toString(16)
        }`,
      );
    }
  }
  return ties;
}

gpuTest(
  "kv_write q8 matches kvQuantizeRef on ragged T, heads, headDim 4..128 and touches nothing else",
  async (gpu) => {
    const cases: [number, number, number, number][] = [
      // T, pos, nKv, headDim
      [1, 0, 1, 4],
      [3, 5, 3, 8],
      [17, 31, 4, 12],
      [5, 100, 3, 64],
      [33, 1, 2, 128],
      [2, 7, 1, 256],
      [7, 133, 3, 64], // rows 140.. dropped
      [9, 138, 2, 12], // rows 140.. dropped
    ];
    let ties = 0;
    for (const [T, pos, nKvHeads, headDim] of cases) {
      for (const layer of [0, 2]) {
        const s: KvWriteShape = { T, pos, nKvHeads, headDim, maxSeq: 140, layer, dtype: "q8" };
        ties += await checkQ8Write(gpu, s, 3);
      }
    }
    console.log(`  int8 values off by one at a rounding tie: ${ties}`);
  },
);

gpuTest("kv_write q8 then reading the cache back gives the kvWriteRef values", async (gpu) => {
  // Two successive writes into layer 1 of a 2-layer cache prepared on the host: rows 0..2, then
  // rows 3..6 of which row 6 (= maxSeq) is dropped.
  const hd = 8, nKv = 2, maxSeq = 6, layers = 2;
  const init = [0, 1].map((c) => randomArray(layers * maxSeq * nKv * hd, 77 + c, 2));
  const want = init.map((a) => {
    const { q, scale } = kvQuantizeRef(a, a.length / hd, hd);
    return kvDequantizeRef(q, scale, hd);
  });
  const caches = init.map((a, c) => gpu.upload(`cache${c}`, kvQ8CacheImage(a, hd), usage));
  const state = gpu.buffer("state", 16, usage);
  for (const [pos, T] of [[0, 3], [3, 4]]) {
    const src = [0, 1].map((c) => randomArray(T * nKv * hd, 10 * pos + c, 3));
    gpu.write(state, new Uint32Array([pos, 0, 0, 0]));
    const d = await createKvWrite(gpu, {
      label: "test.kv_write.q8.seq",
      k: gpu.upload("k", src[0]),
      v: gpu.upload("v", src[1]),
      kCache: caches[0],
      vCache: caches[1],
      state,
      dtype: "q8",
      layers,
      T,
      nKvHeads: nKv,
      headDim: hd,
      maxSeq,
      layer: 1,
    });
    await gpu.run("test", [d]);
    for (const c of [0, 1]) {
      kvWriteRef(want[c], src[c], {
        T,
        pos,
        nKvHeads: nKv,
        headDim: hd,
        maxSeq,
        layer: 1,
        dtype: "q8",
      });
    }
  }
  const n = init[0].length;
  for (const c of [0, 1]) {
    const bytes = (await gpu.read(caches[c])).slice(0, kvCacheBytes("q8", layers, maxSeq, nKv, hd));
    const got = kvDequantizeRef(
      new Int8Array(bytes, 0, n),
      new Float32Array(bytes.slice(n)),
      hd,
    );
    // Equal, except that a value at a rounding tie may land one step (<= 3/127) away.
    assertClose(`q8 ${c ? "V" : "K"} cache after two writes`, got, want[c], {
      nmse: 1e-6,
      maxAbs: 3 / 127,
    });
  }
});

gpuTest("createKvWrite() rejects a q8 cache one word short and layer >= layers", async (gpu) => {
  const need = kvCacheBytes("q8", 2, 4, 1, 8);
  const ok = gpu.buffer("ok", need, usage), short = gpu.buffer("short", need - 4, usage);
  const args = {
    label: "test.kv_write.q8.small",
    k: ok,
    v: ok,
    kCache: short,
    vCache: ok,
    state: ok,
    dtype: "q8" as const,
    T: 1,
    nKvHeads: 1,
    headDim: 8,
    maxSeq: 4,
    layers: 2,
    layer: 0,
  };
  await assert.rejects(
    () => createKvWrite(gpu, args),
    new RegExp(`q8 cache need ${need} bytes per cache \\(kvCacheBytes\\), got K ${need - 4}`),
  );
  await assert.rejects(
    () => createKvWrite(gpu, { ...args, kCache: ok, layer: 2 }),
    /layer must be an integer in \[0, 2\), got 2/,
  );
  await assert.rejects(
    () => createKvWrite(gpu, { ...args, kCache: ok, headDim: 260 }),
    /q8 KV cache takes headDim <= 256, got 260/,
  );
});
