import { createSwiglu, swigluRef } from "../kernels/swiglu.ts";
import { assertClose, gpuTest, randomArray } from "./harness.ts";

// Tolerance: one f32 exp, divide and multiply per element: nmse <= 1e-12, max-abs <= 1e-5.
const TOL = { nmse: 1e-12, maxAbs: 1e-5 };
const RW = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST;

Deno.test("swigluRef() is silu(gate) * up", () => {
  assertClose("ref", swigluRef(new Float32Array([0, 1, -1]), new Float32Array([5, 2, 3])), [
    0,
    2 / (1 + Math.exp(-1)),
    -3 / (1 + Math.E),
  ], { nmse: 1e-12, maxAbs: 1e-6 });
});

for (const fused of [false, true]) {
  gpuTest(
    `swiglu matches the reference on ragged T and F with ${
      fused ? "a fused [T, 2F]" : "separate"
    } gate/up`,
    async (gpu) => {
      for (const T of [1, 2, 5, 17]) {
        for (const F of [1, 3, 64, 257, 1536]) {
          const gate = randomArray(T * F, T * 3 + F, 8), up = randomArray(T * F, T + F * 5, 2);
          const hOff = 3;
          const hInit = new Float32Array(hOff + T * F + 2).fill(-4);
          const h = gpu.upload("h", hInit, RW);
          let args;
          if (fused) {
            const gu = new Float32Array(T * 2 * F);
            for (let t = 0; t < T; t++) {
              gu.set(gate.subarray(t * F, (t + 1) * F), t * 2 * F);
              gu.set(up.subarray(t * F, (t + 1) * F), t * 2 * F + F);
            }
            const b = gpu.upload("gu", gu);
            args = { gate: b, up: b, inStride: 2 * F, upOffset: F };
          } else {
            const g = new Float32Array(1 + T * F);
            g.set(gate, 1);
            args = { gate: gpu.upload("gate", g), gateOffset: 1, up: gpu.upload("up", up) };
          }
          const d = await createSwiglu(gpu, {
            label: "test.swiglu",
            ...args,
            h,
            hOffset: hOff,
            T,
            F,
          });
          await gpu.run("test", [d]);
          const want = hInit.slice();
          want.set(swigluRef(gate, up), hOff);
          assertClose(
            `swiglu fused=${fused} T=${T} F=${F}`,
            new Float32Array(await gpu.read(h)),
            want,
            TOL,
          );
        }
      }
    },
  );
}
