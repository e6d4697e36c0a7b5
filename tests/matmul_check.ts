/**
 * The one matmul conformance check both matmul test files use: run the product on GPU buffers
 * with offsets and sentinels around x and y, and compare with `matmulRef` over the weights'
 * reference values.
 */
import { createMatmul, type MatmulPath, matmulRef, type WeightDType } from "../kernels/matmul.ts";
import { assertClose, randomArray, type Tolerance } from "./harness.ts";
import type { Gpu } from "../engine/gpu.ts";

const RW = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST;

/** One product to check. */
export interface ProductCase {
  T: number;
  K: number;
  N: number;
  path: MatmulPath;
  bias?: boolean;
  accumulate?: boolean;
  xOffset?: number;
  yOffset?: number;
}

/** Weights on the GPU in `dtype`, with the values the reference multiplies by. */
export interface TestWeights {
  dtype: WeightDType;
  buf: GPUBuffer;
  ref: Float32Array;
}

/** Runs `c` with weights `w` (x, bias and y_old drawn from `seed`) and asserts within `tol`. */
export async function checkProduct(
  gpu: Gpu,
  c: ProductCase,
  w: TestWeights,
  seed: number,
  tol: Tolerance,
): Promise<void> {
  const { T, K, N } = c;
  const xOff = c.xOffset ?? 0, yOff = c.yOffset ?? 0;
  const x = randomArray(T * K, seed);
  const bias = c.bias ? randomArray(N, seed + 2) : undefined;
  const yOld = c.accumulate ? randomArray(T * N, seed + 3) : undefined;
  const xBuf = new Float32Array(xOff + T * K).fill(99);
  xBuf.set(x, xOff);
  // Fill y with a sentinel (or y_old) so writes outside [yOff, yOff + T*N) are detected.
  const yInit = new Float32Array(yOff + T * N + 3).fill(-7);
  if (yOld) yInit.set(yOld, yOff);
  const y = gpu.upload("y", yInit, RW);
  const d = await createMatmul(gpu, {
    label: "test.matmul",
    x: gpu.upload("x", xBuf),
    xOffset: xOff,
    w: w.buf,
    dtype: w.dtype,
    bias: bias ? gpu.upload("bias", bias) : undefined,
    y,
    yOffset: yOff,
    accumulate: c.accumulate,
    T,
    K,
    N,
    path: c.path,
  });
  await gpu.run("test", [d]);
  const got = new Float32Array(await gpu.read(y));
  const want = yInit.slice();
  want.set(matmulRef(x, w.ref, T, K, N, bias, yOld), yOff);
  const name = `${c.path} ${w.dtype} T=${T} K=${K} N=${N} bias=${!!c.bias} ` +
    `acc=${!!c.accumulate} xOffset=${xOff} yOffset=${yOff}`;
  assertClose(name, got, want, tol);
}
