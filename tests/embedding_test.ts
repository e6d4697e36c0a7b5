import { createEmbedding, embeddingRef } from "../kernels/embedding.ts";
import type { WeightDType } from "../kernels/matmul.ts";
import {
  decodeWeights,
  encodeWeights,
  formatBlock,
  isBlockFormat,
  WEIGHT_FORMATS,
  type WeightFormat,
} from "../kernels/qformats.ts";
import { assertClose, gpuTest, randomArray, rng, roundF16, type Tolerance } from "./harness.ts";
import type { Gpu } from "../engine/gpu.ts";
import assert from "@specdec/assert";

// Tolerance: a copy (f16 tables compared with f16-rounded values): exact.
const EXACT = { nmse: 0, maxAbs: 0 };
const RW = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST;

Deno.test("embeddingRef() gathers table rows by token id", () => {
  const x = embeddingRef(new Float32Array([1, 2, 3, 4, 5, 6]), 2, new Uint32Array([2, 0, 2]));
  assert.deepEqual([...x], [5, 6, 1, 2, 5, 6]);
});

for (const dtype of ["f32", "f16"] as WeightDType[]) {
  gpuTest(
    `embedding ${dtype} matches the reference on ragged T, D, V with offsets`,
    async (gpu) => {
      for (const [V, D] of [[1, 1], [7, 3], [65, 64], [513, 257], [1000, 576]]) {
        const table = roundF16(randomArray(V * D, V + D));
        const tb = gpu.upload("table", dtype === "f16" ? new Float16Array(table) : table);
        for (const T of [1, 2, 5, 17, 33]) {
          await checkGather(gpu, dtype, tb, table, V, D, T, rng(T * V), [4, 2], EXACT);
        }
      }
    },
    { features: dtype === "f16" ? ["shader-f16"] : [] },
  );
}

gpuTest("embedding split into two row ranges writes each token from its range", async (gpu) => {
  const V = 300, D = 9, split = 123, T = 6;
  const table = randomArray(V * D, 5);
  const tokens = new Uint32Array([0, 299, 122, 123, 200, 1]);
  const x = gpu.buffer("x", T * D * 4, RW);
  const tok = gpu.upload("tokens", tokens);
  const lo = await createEmbedding(gpu, {
    label: "lo",
    table: gpu.upload("lo", table.subarray(0, split * D)),
    dtype: "f32",
    V: split,
    D,
    tokens: tok,
    x,
    T,
  });
  const hi = await createEmbedding(gpu, {
    label: "hi",
    table: gpu.upload("hi", table.subarray(split * D)),
    dtype: "f32",
    V: V - split,
    firstRow: split,
    D,
    tokens: tok,
    x,
    T,
  });
  await gpu.run("test", [lo, hi]);
  assertClose("split", new Float32Array(await gpu.read(x)), embeddingRef(table, D, tokens), EXACT);
});

// Block formats: the GPU dequantizes to the values decodeWeights() gives (an f16 scale times a
// small integer or a codebook value: one f32 rounding), except that a GPU may fuse q4_k's
// `d*sc*q - dmin*m` into one rounding: max-abs <= 1e-6 on values of magnitude <= 1.
const DEQUANT = { nmse: 1e-12, maxAbs: 1e-6 };

for (const f of WEIGHT_FORMATS.filter(isBlockFormat)) {
  gpuTest(`embedding ${f} dequantizes the gathered rows in-kernel`, async (gpu) => {
    const b = formatBlock(f);
    for (const [V, D] of [[1, b], [7, 3 * b], [67, b === 256 ? 512 : 5 * 64]]) {
      const bytes = encodeWeights(f, randomArray(V * D, V * D, 0.8), V, D);
      const table = decodeWeights(f, bytes, V, D);
      const tb = gpu.upload("table", bytes);
      for (const T of [1, 5, 17]) {
        await checkGather(gpu, f, tb, table, V, D, T, rng(T * V + 3), [2, 3], DEQUANT);
      }
    }
  });
}

gpuTest("embedding refuses D that is not a multiple of the format's block", async (gpu) => {
  const b = gpu.buffer("b", 4096, RW);
  await assert.rejects(
    () =>
      createEmbedding(gpu, {
        label: "embed",
        table: b,
        dtype: "q4_k",
        V: 2,
        D: 576,
        tokens: b,
        x: b,
        T: 1,
      }),
    /embed: D=576 is not a multiple of the q4_k block size 256/,
  );
});

/**
 * Gathers T random rows (the first is the last row of the table) through the kernel, with ids at
 * element offset `tokOff` and output at `xOff` inside sentinel-filled buffers, and compares with
 * embeddingRef over the table's reference values.
 */
async function checkGather(
  gpu: Gpu,
  dtype: WeightFormat,
  tb: GPUBuffer,
  table: Float32Array,
  V: number,
  D: number,
  T: number,
  r: () => number,
  [tokOff, xOff]: [number, number],
  tol: Tolerance,
): Promise<void> {
  const tokens = Uint32Array.from({ length: T }, () => Math.floor(r() * V));
  tokens[0] = V - 1; // the last row
  const tokBuf = new Uint32Array(tokOff + T);
  tokBuf.set(tokens, tokOff);
  const xInit = new Float32Array(xOff + T * D + 1).fill(-8);
  const x = gpu.upload("x", xInit, RW);
  const d = await createEmbedding(gpu, {
    label: "test.embedding",
    table: tb,
    dtype,
    V,
    D,
    tokens: gpu.upload("tokens", tokBuf),
    tokensOffset: tokOff,
    x,
    xOffset: xOff,
    T,
  });
  await gpu.run("test", [d]);
  const want = xInit.slice();
  want.set(embeddingRef(table, D, tokens), xOff);
  assertClose(
    `embedding ${dtype} V=${V} D=${D} T=${T}`,
    new Float32Array(await gpu.read(x)),
    want,
    tol,
  );
}
