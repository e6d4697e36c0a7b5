/**
 * The int8 matrix-vector path (`matvecTuning.int8x`): the quantize pass against its reference bit
 * for bit, and the int8 product against the reference of what it computes and against the float
 * product.
 */
import {
  createQuantizeX,
  int8xScratchBytes,
  type QuantizedX,
  quantizeXRef,
  readQuantizedX,
} from "../kernels/quantize_x.ts";
import { gpuTest, randomArray } from "./harness.ts";
import type { Gpu } from "../engine/gpu.ts";
import assert from "@specdec/assert";

const RW = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST;

/**
 * x: [T, K] random in [-1, 1) with the edge blocks planted: row 0 block 0 all zero, the last
 * block of the last row one huge value (1e6) among small ones, and (K >= 64) row 0 block 1 with
 * max 127 and exact halves (scale exactly 1, so round-half-even decides).
 */
function raggedX(T: number, K: number, seed: number): Float32Array {
  const x = randomArray(T * K, seed);
  x.fill(0, 0, 32);
  const last = (T * K) - 32;
  x[last + 7] = 1e6;
  if (K >= 64) {
    for (let i = 0; i < 32; i++) x[32 + i] = i === 0 ? 127 : (i % 2 ? -1 : 1) * (i + 0.5);
  }
  return x;
}

function assertSameQuant(name: string, got: QuantizedX, want: QuantizedX, rinvTol: number) {
  for (const f of ["q", "d", "sum"] as const) {
    const a = got[f], b = want[f];
    for (let i = 0; i < b.length; i++) {
      if (!Object.is(a[i], b[i])) {
        throw new Error(`${name}: ${f}[${i}] is ${a[i]}, the reference ${b[i]}`);
      }
    }
  }
  for (let t = 0; t < want.T; t++) {
    const e = Math.abs(got.rinv[t] - want.rinv[t]) / want.rinv[t];
    if (!(e <= rinvTol)) {
      throw new Error(`${name}: rinv[${t}] ${got.rinv[t]}, the reference ${want.rinv[t]}`);
    }
  }
}

Deno.test("quantizeXRef() rounds halves to even and keeps zero and huge-value blocks", () => {
  const x = raggedX(1, 96, 5);
  const qx = quantizeXRef(x, 1, 96);
  assert.deepEqual([qx.d[0], qx.sum[0], [...qx.q.subarray(0, 32)].every((v) => v === 0)], [
    0,
    0,
    true,
  ]);
  // Block 1: scale 127 * f32(1/127) = 1 exactly, so -1.5 -> -2, 2.5 -> 2, -3.5 -> -4, ...
  assert.equal(qx.d[1], 1);
  assert.deepEqual([...qx.q.subarray(32, 37)], [127, -2, 2, -4, 4]);
  // Block 2: one 1e6 among values < 1: it is 127, the others round to 0.
  assert.equal(qx.q[64 + 7], 127);
  assert.equal(qx.sum[2], 127);
  assert.equal(qx.d[2], Math.fround(1e6 * Math.fround(1 / 127)));
  // Every value is within half a step of x (d / 2, plus the f32 rounding of 1 / d).
  const y = raggedX(3, 288, 9);
  const r = quantizeXRef(y, 3, 288);
  for (let i = 0; i < y.length; i++) {
    const d = r.d[Math.floor(i / 32)];
    assert.ok(Math.abs(y[i] - d * r.q[i]) <= d * 0.5001, `value ${i}`);
  }
});

async function checkQuantize(
  gpu: Gpu,
  T: number,
  K: number,
  norm: boolean,
  xOffset: number,
): Promise<void> {
  const seed = T * 1009 + K * 7 + (norm ? 1 : 0) + xOffset;
  const x = raggedX(T, K, seed);
  const xBuf = new Float32Array(xOffset + T * K).fill(99);
  xBuf.set(x, xOffset);
  const g = norm ? { weight: randomArray(K, seed + 1), eps: 1e-5 } : undefined;
  const out = gpu.buffer("qx", int8xScratchBytes(T, K), RW);
  const d = await createQuantizeX(gpu, {
    label: "test.quantize_x",
    x: gpu.upload("x", xBuf),
    xOffset,
    T,
    K,
    norm: g && { weight: gpu.upload("g", g.weight), eps: g.eps },
    out,
  });
  await gpu.run("test", [d]);
  const got = readQuantizedX(await gpu.read(out), T, K);
  // rinv: the kernel's f32 sum of x² in another order and a 2-ulp inverseSqrt.
  assertSameQuant(
    `quantize_x T=${T} K=${K} norm=${norm} xOffset=${xOffset}`,
    got,
    quantizeXRef(x, T, K, g),
    1e-5,
  );
  out.destroy();
}

gpuTest("createQuantizeX() writes the reference's int8 values, scales and sums exactly", async (
  gpu,
) => {
  for (const K of [32, 64, 96, 288, 480, 4128]) {
    for (const T of [1, 2, 3, 5, 8, 17]) {
      for (const norm of [false, true]) await checkQuantize(gpu, T, K, norm, 0);
    }
  }
  for (const K of [32, 96]) {
    for (const T of [1, 3]) {
      for (const norm of [false, true]) await checkQuantize(gpu, T, K, norm, 3); // scalar loads
    }
  }
});
