/**
 * The one matmul conformance check both matmul test files use: run the product on GPU buffers
 * with offsets and sentinels around x and y, and compare with `matmulRef` over the weights'
 * reference values. It checks the float-x kernels, so int8 activations (`matvecTuning.int8x`,
 * on for q4_0 by default) are off while it builds the product; tests/int8x_test.ts checks those.
 */
import {
  createLinear,
  fusedMatmulRef,
  type MatmulPath,
  type MatvecShape,
  matvecTuning,
  type WeightDType,
} from "../kernels/matmul.ts";
import assert from "@specdec/assert";
import {
  decodeWeights,
  encodeWeights,
  weightBytes,
  type WeightFormat,
} from "../kernels/qformats.ts";
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
  /** RMSNorm of x folded in (a random weight, eps 1e-5). */
  norm?: boolean;
  /** Rows are (gate, up) pairs: y = silu(gate) * up, [T, N / 2]. */
  swiglu?: boolean;
  /** Force a matrix-vector split. */
  shape?: MatvecShape;
  /** Rows of y this many elements apart (a column range of a wider y). */
  yStride?: number;
}

/** Weights on the GPU in `dtype`, with the values the reference multiplies by. */
export interface TestWeights {
  dtype: WeightDType;
  buf: GPUBuffer;
  ref: Float32Array;
}

/** Encoded weights per device, keyed by (format, N, K). */
const weightCache = new WeakMap<Gpu, Map<string, { buf: GPUBuffer; ref: Float32Array }>>();

/**
 * Random weights [N, K] in format `f`, encoded and uploaded once per (device, f, N, K), with
 * their reference decode; asserts that `weightBytes()` is the uploaded size.
 */
export function encodedWeights(
  gpu: Gpu,
  f: WeightFormat,
  N: number,
  K: number,
): { buf: GPUBuffer; ref: Float32Array } {
  let cache = weightCache.get(gpu);
  if (!cache) weightCache.set(gpu, cache = new Map());
  const key = `${f}.${N}.${K}`;
  let w = cache.get(key);
  if (!w) {
    const bytes = encodeWeights(f, randomArray(N * K, N * 131 + K, 0.5), N, K);
    const buf = gpu.upload(`w.${key}`, bytes);
    assert.equal(buf.size, weightBytes(f, N, K), "weightBytes() is the uploaded size");
    w = { buf, ref: decodeWeights(f, bytes, N, K) };
    cache.set(key, w);
  }
  return w;
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
  const outN = c.swiglu ? N / 2 : N;
  const yOld = c.accumulate ? randomArray(T * outN, seed + 3) : undefined;
  if (yOld && c.yStride) throw new Error("checkProduct: accumulate with yStride is not modelled");
  const norm = c.norm ? { weight: randomArray(K, seed + 4), eps: 1e-5 } : undefined;
  const xBuf = new Float32Array(xOff + T * K).fill(99);
  xBuf.set(x, xOff);
  // Fill y with a sentinel (or y_old) so writes outside [yOff, yOff + T*N) are detected.
  const stride = c.yStride ?? outN;
  const yInit = new Float32Array(yOff + T * stride + 3).fill(-7);
  if (yOld) yInit.set(yOld, yOff);
  const y = gpu.upload("y", yInit, RW);
  const int8x = matvecTuning.int8x;
  matvecTuning.int8x = false;
  const d = await createLinear(gpu, {
    label: "test.matmul",
    x: gpu.upload("x", xBuf),
    xOffset: xOff,
    w: w.buf,
    dtype: w.dtype,
    bias: bias ? gpu.upload("bias", bias) : undefined,
    y,
    yOffset: yOff,
    accumulate: c.accumulate,
    norm: norm && { weight: gpu.upload("g", norm.weight), eps: norm.eps },
    swiglu: c.swiglu,
    shape: c.shape,
    yStride: c.yStride,
    T,
    K,
    N,
    path: c.path,
  }).finally(() => matvecTuning.int8x = int8x);
  await gpu.run("test", d);
  const got = new Float32Array(await gpu.read(y));
  const want = yInit.slice();
  const ref = fusedMatmulRef(x, w.ref, T, K, N, { bias, yOld, norm, swiglu: c.swiglu });
  for (let t = 0; t < T; t++) {
    want.set(ref.subarray(t * outN, (t + 1) * outN), yOff + t * stride);
  }
  const name = `${c.path} ${w.dtype} T=${T} K=${K} N=${N} bias=${!!c.bias} ` +
    `acc=${!!c.accumulate} norm=${!!c.norm} swiglu=${!!c.swiglu} xOffset=${xOff} ` +
    `yOffset=${yOff} yStride=${stride}${c.shape ? ` shape=${c.shape.rows}x${c.shape.lanes}` : ""}`;
  assertClose(name, got, want, tol);
}
