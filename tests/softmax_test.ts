import { createSoftmax, softmaxRef } from "../kernels/softmax.ts";
import { assertClose, gpuTest, randomArray } from "./harness.ts";

// Tolerance: f32 exp and a reordered sum over up to 32000 terms: nmse <= 1e-10, max-abs <= 1e-6.
const TOL = { nmse: 1e-10, maxAbs: 1e-6 };
const RW = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST;

Deno.test("softmaxRef() is stable for large logits and sums to 1", () => {
  const y = softmaxRef(new Float32Array([1000, 1000, -1e30, 0]), 2, 2);
  assertClose("ref", y, [0.5, 0.5, 0, 1], { nmse: 0, maxAbs: 0 });
});

for (const inPlace of [true, false]) {
  gpuTest(
    `softmax ${inPlace ? "in place" : "into y"} matches the reference on ragged T and N`,
    async (gpu) => {
      for (const T of [1, 2, 5, 17]) {
        for (const N of [1, 3, 64, 257, 1031, 32000]) {
          if (T * N > 200000) continue;
          const xOff = 3, yOff = 7;
          // Large logits (scale 80) exercise the max subtraction.
          const x = randomArray(T * N, T * 7 + N, 80);
          const xInit = new Float32Array(xOff + T * N + 2).fill(5);
          xInit.set(x, xOff);
          const xBuf = gpu.upload("x", xInit, RW);
          const yInit = new Float32Array(yOff + T * N + 2).fill(-3);
          const yBuf = inPlace ? undefined : gpu.upload("y", yInit, RW);
          const d = await createSoftmax(gpu, {
            label: "test.softmax",
            x: xBuf,
            xOffset: xOff,
            y: yBuf,
            yOffset: yOff,
            T,
            N,
          });
          await gpu.run("test", [d]);
          const ref = softmaxRef(x, T, N);
          const want = inPlace ? xInit.slice() : yInit.slice();
          want.set(ref, inPlace ? xOff : yOff);
          const got = new Float32Array(await gpu.read(inPlace ? xBuf : yBuf!));
          assertClose(`softmax inPlace=${inPlace} T=${T} N=${N}`, got, want, TOL);
        }
      }
    },
  );
}
