import { argmaxRef, createArgmax } from "../kernels/argmax.ts";
import { gpuTest, randomArray } from "./harness.ts";
import type { Gpu } from "../engine/gpu.ts";
import assert from "@specdec/assert";

// Tolerance: exact (an index).
const RW = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST;

async function gpuArgmax(gpu: Gpu, logits: Float32Array, T: number, V: number, xOff: number) {
  const buf = new Float32Array(xOff + T * V).fill(1e30);
  buf.set(logits, xOff);
  const idsOff = 2;
  const ids = gpu.upload("ids", new Uint32Array(idsOff + T + 1).fill(777), RW);
  const d = await createArgmax(gpu, {
    label: "test.argmax",
    logits: gpu.upload("logits", buf),
    xOffset: xOff,
    ids,
    idsOffset: idsOff,
    T,
    V,
  });
  await gpu.run("test", [d]);
  const got = new Uint32Array(await gpu.read(ids));
  assert.equal(got[0], 777, "wrote before idsOffset");
  assert.equal(got[idsOff + T], 777, "wrote past T ids");
  return got.slice(idsOff, idsOff + T);
}

Deno.test("argmaxRef() returns the first index of the maximum", () => {
  assert.deepEqual([...argmaxRef(new Float32Array([1, 5, 5, -3, -2, -1]), 2, 3)], [1, 2]);
});

gpuTest("argmax matches the reference on ragged T and V, with offsets", async (gpu) => {
  for (const T of [1, 2, 5, 17]) {
    for (const V of [1, 3, 64, 257, 1031, 32000]) {
      if (T * V > 200000) continue;
      const x = randomArray(T * V, T * 13 + V);
      const got = await gpuArgmax(gpu, x, T, V, 5);
      assert.deepEqual([...got], [...argmaxRef(x, T, V)], `argmax T=${T} V=${V}`);
    }
  }
});

gpuTest("argmax breaks ties toward the lowest index, across invocations", async (gpu) => {
  const V = 32000;
  const x = new Float32Array(3 * V).fill(-1);
  // Row 0: ties at 31999, 700, 5 (different invocations) -> 5.
  for (const i of [31999, 700, 5]) x[i] = 4;
  // Row 1: all equal -> 0.
  x.fill(2, V, 2 * V);
  // Row 2: all -Infinity except nothing -> 0; then a tie of -Infinity rows is index 0.
  x.fill(-Infinity, 2 * V, 3 * V);
  const got = await gpuArgmax(gpu, x, 3, V, 0);
  assert.deepEqual([...got], [5, 0, 0]);
  assert.deepEqual([...got], [...argmaxRef(x, 3, V)]);
});
