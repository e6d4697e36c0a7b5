import { createRmsnorm, rmsnormRef } from "../kernels/rmsnorm.ts";
import { assertClose, gpuTest, randomArray } from "./harness.ts";
import assert from "@specdec/assert";

// Tolerance: f32 sum of squares in a different order and inverseSqrt: nmse <= 1e-10, max-abs 1e-5.
const TOL = { nmse: 1e-10, maxAbs: 1e-5 };
const RW = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST;

Deno.test("rmsnormRef() divides by the root mean square and scales by w", () => {
  const y = rmsnormRef(new Float32Array([3, 4, 1, 1]), new Float32Array([1, 2]), 2, 2, 0);
  const r = Math.sqrt(12.5);
  assertClose("ref", y, [3 / r, 8 / r, 1, 2], { nmse: 1e-12, maxAbs: 1e-6 });
});

gpuTest("rmsnorm matches the reference on ragged T and D, with offsets", async (gpu) => {
  for (const T of [1, 2, 5, 17, 33]) {
    for (const D of [1, 3, 64, 257, 576, 1031]) {
      for (const [xOff, yOff] of [[0, 0], [3, 5]]) {
        const x = randomArray(T * D, T * 31 + D, 3);
        const w = randomArray(D, D + 7);
        const xBuf = new Float32Array(xOff + T * D).fill(42);
        xBuf.set(x, xOff);
        const yInit = new Float32Array(yOff + T * D + 2).fill(-9);
        const y = gpu.upload("y", yInit, RW);
        const eps = 1e-5;
        const d = await createRmsnorm(gpu, {
          label: "test.rmsnorm",
          x: gpu.upload("x", xBuf),
          xOffset: xOff,
          w: gpu.upload("w", w),
          y,
          yOffset: yOff,
          T,
          D,
          eps,
        });
        await gpu.run("test", [d]);
        const want = yInit.slice();
        want.set(rmsnormRef(x, w, T, D, eps), yOff);
        assertClose(
          `rmsnorm T=${T} D=${D} xOffset=${xOff} yOffset=${yOff}`,
          new Float32Array(await gpu.read(y)),
          want,
          TOL,
        );
      }
    }
  }
});

gpuTest("rmsnorm adds eps inside the square root", async (gpu) => {
  const y = gpu.buffer("y", 8, RW);
  const d = await createRmsnorm(gpu, {
    label: "test.rmsnorm.eps",
    x: gpu.upload("x", new Float32Array([0.001, 0.001])),
    w: gpu.upload("w", new Float32Array([1, 1])),
    y,
    T: 1,
    D: 2,
    eps: 1,
  });
  await gpu.run("test", [d]);
  const got = new Float32Array(await gpu.read(y));
  assert.ok(Math.abs(got[0] - 0.001 / Math.sqrt(1 + 1e-6)) < 1e-9, `got ${got[0]}`);
});
