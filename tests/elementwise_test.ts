import { createElementwise, type ElementwiseOp, elementwiseRef } from "../kernels/elementwise.ts";
import { assertClose, gpuTest, RAGGED, randomArray } from "./harness.ts";
import assert from "@specdec/assert";

Deno.test("elementwiseRef() adds and multiplies", () => {
  const a = new Float32Array([1, 2, 3]), b = new Float32Array([4, 5, 6]);
  assert.deepEqual([...elementwiseRef("add", a, b)], [5, 7, 9]);
  assert.deepEqual([...elementwiseRef("mul", a, b)], [4, 10, 18]);
});

for (const op of ["add", "mul"] as ElementwiseOp[]) {
  gpuTest(`elementwise ${op} matches the reference on ragged sizes`, async (gpu) => {
    for (const n of [...RAGGED, 255, 257, 70001]) {
      const a = randomArray(n, n), b = randomArray(n, n + 1);
      const out = gpu.buffer("out", n * 4, GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC);
      const d = await createElementwise(gpu, {
        label: `test.${op}`,
        op,
        a: gpu.upload("a", a),
        b: gpu.upload("b", b),
        out,
        n,
      });
      await gpu.run("test", [d]);
      const got = new Float32Array(await gpu.read(out, 0, n * 4));
      // f32 in, f32 out, one rounding: exact.
      assertClose(`${op} n=${n}`, got, elementwiseRef(op, a, b), { nmse: 0, maxAbs: 0 });
    }
  });
}
