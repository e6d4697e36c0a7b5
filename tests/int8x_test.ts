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
  quantizeXSplits,
  readQuantizedX,
} from "../kernels/quantize_x.ts";
import {
  createLinear,
  fusedMatmulRef,
  int8MatmulRef,
  int8xAvailable,
  int8xFor,
  type Int8xSetting,
  int8xSharedScratchBytes,
  type MatmulPath,
  MATVEC_CHUNKED_MAX_T,
  matvecChunks,
  type MatvecShape,
  matvecTuning,
} from "../kernels/matmul.ts";
import type { WeightFormat } from "../kernels/qformats.ts";
import { encodedWeights } from "./matmul_check.ts";
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

Deno.test("int8xFor() takes q4_0 by default, q4_0 and q8_0 when on, none when off", () => {
  const formats: WeightFormat[] = ["f32", "f16", "q8_0", "q4_0", "q4_k", "nf4"];
  const on = (s: Int8xSetting) => formats.filter((f) => int8xFor(f, s));
  assert.deepEqual(on("auto"), int8xAvailable() ? ["q4_0"] : []);
  assert.deepEqual(on(true), ["q8_0", "q4_0"]);
  assert.deepEqual(on(false), []);
  assert.equal(matvecTuning.int8x, "auto", "the default setting");
});

Deno.test("int8xSharedScratchBytes() fits every product of at most maxT rows and width K", () => {
  for (const [maxT, K] of [[1, 32], [5, 96], [17, 576], [128, 1536], [64, 14336]]) {
    const bytes = int8xSharedScratchBytes(maxT, K);
    let most = 0;
    for (let T = 1; T <= Math.min(maxT, MATVEC_CHUNKED_MAX_T); T++) {
      for (let k = 32; k <= K; k += 32) most = Math.max(most, int8xScratchBytes(T, k));
    }
    assert.equal(bytes, most, `maxT=${maxT} K=${K}: the largest (T, K) any product uses`);
  }
  assert.equal(int8xSharedScratchBytes(128, 0), 0, "no int8 product, no scratch");
});

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
  split = false,
): Promise<void> {
  const seed = T * 1009 + K * 7 + (norm ? 1 : 0) + xOffset;
  const x = raggedX(T, K, seed);
  const xBuf = new Float32Array(xOffset + T * K).fill(99);
  xBuf.set(x, xOffset);
  const g = norm ? { weight: randomArray(K, seed + 1), eps: 1e-5 } : undefined;
  const out = gpu.buffer("qx", int8xScratchBytes(T, K), RW);
  // split: the GPU's layout (several workgroups per row) on any adapter.
  const view = split
    ? new Proxy(gpu, {
      get(t, k) {
        if (k === "software") return false;
        const v = Reflect.get(t, k, t);
        return typeof v === "function" ? v.bind(t) : v;
      },
    })
    : gpu;
  const d = await createQuantizeX(view, {
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
    `quantize_x T=${T} K=${K} norm=${norm} xOffset=${xOffset} split=${split}`,
    got,
    quantizeXRef(x, T, K, g),
    1e-5,
  );
  out.destroy();
}

gpuTest("createQuantizeX() writes the reference's int8 values, scales and sums exactly", async (
  gpu,
) => {
  // The software adapter's layout (one workgroup per row) and the GPU's: rows of one workgroup
  // (K <= 2048) and of several, the last one ragged (4128: 64 + 64 + 1 blocks), each row's rinv
  // written once.
  assert.deepEqual([32, 2048, 4128].map((K) => quantizeXSplits(K)), [1, 1, 3]);
  for (const K of [32, 64, 96, 288, 480, 4128]) {
    for (const T of [1, 2, 3, 5, 8, 17]) {
      for (const norm of [false, true]) {
        await checkQuantize(gpu, T, K, norm, 0);
        if (K > 2048) await checkQuantize(gpu, T, K, norm, 0, true);
      }
    }
  }
  for (const K of [32, 96]) {
    for (const T of [1, 3]) {
      for (const norm of [false, true]) await checkQuantize(gpu, T, K, norm, 3); // scalar loads
    }
  }
});

// ---- the int8 product --------------------------------------------------------------------------

/** One product through createLinear with matvecTuning.int8x. */
interface Int8Case {
  f: "q4_0" | "q8_0";
  T: number;
  K: number;
  N: number;
  path?: MatmulPath;
  bias?: boolean;
  accumulate?: boolean;
  norm?: boolean;
  swiglu?: boolean;
  xOffset?: number;
  yOffset?: number;
  yStride?: number;
  shape?: MatvecShape;
  /** Plant the zero and huge-value blocks of raggedX() in x (else plain random x). */
  ragged?: boolean;
}

/** |silu(g') u' - silu(g) u| for |g' - g| <= bg, |u' - u| <= bu (silu is 1.1-Lipschitz). */
function swigluBound(g: number, u: number, bg: number, bu: number): number {
  return 1.1 * bg * (Math.abs(u) + bu) + Math.abs(g / (1 + Math.exp(-g))) * bu;
}

/** Errors of the int8 product against the float reference, summed over the plain cases. */
const floatErr = { se: 0, ref: 0 };

/**
 * Runs `c` and checks the output two ways, element by element:
 * - against int8MatmulRef() of the quantized x the GPU wrote (read back from the scratch): the
 *   same block sums, so only f32 rounding differs: |Δ| <= 1e-5 S + 1e-6, S = the sum of the
 *   magnitudes of the terms (rinv Σ|d_x q_x w| + |bias| + |y_old|);
 * - against the float product (fusedMatmulRef): each quantized value is within 0.5001 d of the
 *   value it stands for (half a step, plus the f32 rounding of 1 / d), so
 *   |Δ| <= rinv Σ_blocks 0.5001 d Σ_k∈block |w| + the f32 slack above.
 * With SwiGLU both bounds go through silu(gate) * up by swigluBound(). Writes outside y's rows
 * (sentinels) must not happen.
 */
async function checkInt8(gpu: Gpu, c: Int8Case): Promise<void> {
  const { f, T, K, N } = c;
  const seed = T * 7919 + K * 31 + N + (c.norm ? 5 : 0) + (c.swiglu ? 11 : 0);
  const xOff = c.xOffset ?? 0, yOff = c.yOffset ?? 0;
  const w = encodedWeights(gpu, f, N, K);
  const x = c.ragged ? raggedX(T, K, seed) : randomArray(T * K, seed);
  const bias = c.bias ? randomArray(N, seed + 2) : undefined;
  const outN = c.swiglu ? N / 2 : N, stride = c.yStride ?? outN;
  const yOld = c.accumulate ? randomArray(T * N, seed + 3) : undefined;
  const norm = c.norm ? { weight: randomArray(K, seed + 4), eps: 1e-5 } : undefined;
  const xBuf = new Float32Array(xOff + T * K).fill(99);
  xBuf.set(x, xOff);
  const yInit = new Float32Array(yOff + T * stride + 3).fill(-7);
  for (let t = 0; t < T && yOld; t++) yInit.set(yOld.subarray(t * N, t * N + N), yOff + t * stride);
  const y = gpu.upload("y", yInit, RW);
  const scratch = gpu.buffer("int8x", int8xScratchBytes(T, K), RW);
  const path = c.path ?? (T <= matvecTuning.blockMaxT ? "matvec" : "chunked");
  const setting = matvecTuning.int8x;
  matvecTuning.int8x = true;
  let d;
  try {
    d = await createLinear(gpu, {
      label: "test.int8x",
      x: gpu.upload("x", xBuf),
      xOffset: xOff,
      w: w.buf,
      dtype: f,
      bias: bias && gpu.upload("bias", bias),
      y,
      yOffset: yOff,
      yStride: c.yStride,
      accumulate: c.accumulate,
      norm: norm && { weight: gpu.upload("g", norm.weight), eps: norm.eps },
      swiglu: c.swiglu,
      shape: c.shape,
      int8Scratch: scratch,
      T,
      K,
      N,
      path,
    });
  } finally {
    matvecTuning.int8x = setting;
  }
  const chunks = path === "matvec" ? 1 : matvecChunks(T, matvecTuning.blockMaxT).length;
  assert.equal(d.length, 1 + chunks, "a quantize pass, then one int8 matvec per chunk");
  await gpu.run("test", d);
  const got = new Float32Array(await gpu.read(y));
  const qx = readQuantizedX(await gpu.read(scratch), T, K);
  const name = `int8x ${path} ${f} T=${T} K=${K} N=${N} bias=${!!c.bias} acc=${!!c.accumulate} ` +
    `norm=${!!c.norm} swiglu=${!!c.swiglu} xOffset=${xOff} yOffset=${yOff} yStride=${stride}` +
    `${c.shape ? ` shape=${JSON.stringify(c.shape)}` : ""}`;
  assertSameQuant(name, qx, quantizeXRef(x, T, K, norm), 1e-5);
  // Pre-activations [T, N]: the float reference, the magnitude sums S and int8 bounds Q.
  const pre = fusedMatmulRef(x, w.ref, T, K, N, { bias, yOld, norm });
  const S = new Float64Array(T * N), Q = new Float64Array(T * N);
  for (let t = 0; t < T; t++) {
    for (let n = 0; n < N; n++) {
      let s = 0, q = 0;
      for (let b = 0; b < K / 32; b++) {
        const db = qx.d[t * (K / 32) + b];
        let aw = 0;
        for (let k = 32 * b; k < 32 * b + 32; k++) {
          const wk = Math.abs(w.ref[n * K + k]);
          aw += wk;
          s += Math.abs(db * qx.q[t * K + k]) * wk;
        }
        q += 0.5001 * db * aw;
      }
      const i = t * N + n;
      S[i] = qx.rinv[t] * s + Math.abs(bias?.[n] ?? 0) + Math.abs(yOld?.[i] ?? 0);
      Q[i] = qx.rinv[t] * q;
    }
  }
  const want8 = int8MatmulRef(qx, w.ref, N, { bias, yOld, swiglu: c.swiglu });
  const wantF = c.swiglu ? fusedMatmulRef(x, w.ref, T, K, N, { bias, norm, swiglu: true }) : pre;
  const pre8 = c.swiglu ? int8MatmulRef(qx, w.ref, N, { bias }) : want8;
  const want = yInit.slice();
  for (let t = 0; t < T; t++) {
    for (let o = 0; o < outN; o++) {
      const j = yOff + t * stride + o, i = t * outN + o;
      let tol8: number, tolF: number;
      if (c.swiglu) {
        const gi = t * N + 2 * o, ui = gi + 1;
        const fg = 1e-5 * S[gi] + 1e-6, fu = 1e-5 * S[ui] + 1e-6;
        tol8 = swigluBound(pre8[gi], pre8[ui], fg, fu);
        tolF = swigluBound(pre[gi], pre[ui], Q[gi] + fg, Q[ui] + fu);
      } else {
        tol8 = 1e-5 * S[i] + 1e-6;
        tolF = Q[i] + tol8;
      }
      const e8 = Math.abs(got[j] - want8[i]), eF = Math.abs(got[j] - wantF[i]);
      if (!(e8 <= tol8) || !(eF <= tolF)) {
        throw new Error(
          `${name}: y[${t}, ${o}] = ${got[j]}, int8 reference ${want8[i]} (bound ${tol8}), ` +
            `float reference ${wantF[i]} (bound ${tolF})`,
        );
      }
      if (!c.ragged && !c.swiglu) {
        floatErr.se += (got[j] - wantF[i]) ** 2;
        floatErr.ref += wantF[i] ** 2;
      }
      want[j] = got[j];
    }
  }
  for (let j = 0; j < want.length; j++) {
    if (!Object.is(got[j], want[j])) throw new Error(`${name}: wrote y element ${j} outside y`);
  }
  scratch.destroy();
  y.destroy();
}

const FORMATS = ["q4_0", "q8_0"] as const;

gpuTest("int8x matvec matches its reference and the float product on ragged shapes", async (
  gpu,
) => {
  floatErr.se = floatErr.ref = 0;
  for (const f of FORMATS) {
    for (const K of [32, 64, 288, 480]) {
      for (const N of [1, 7, 67]) {
        for (const T of [1, 2, 3, 5, 8]) await checkInt8(gpu, { f, T, K, N });
      }
    }
    await checkInt8(gpu, { f, T: 3, K: 96, N: 7, ragged: true });
  }
  // The statistical bound: per value the rounding error is uniform in ±d/2 (variance d²/12,
  // d = max|x|/127 of its block), so for x uniform in [-1, 1) (E[x²] = 1/3, max|x| ≈ 1) the
  // expected normalized MSE of the products is about (1/127)² / 12 * 3 = 1.6e-5.
  const nmse = floatErr.se / floatErr.ref;
  assert.ok(nmse < 5e-5, `int8x nmse against the float product ${nmse.toExponential(2)}`);
});

gpuTest("int8x matvec keeps the bias, residual, RMSNorm, SwiGLU and offset epilogues", async (
  gpu,
) => {
  for (const f of FORMATS) {
    for (const T of [1, 3, 8]) {
      await checkInt8(gpu, { f, T, K: 96, N: 67, bias: true });
      await checkInt8(gpu, { f, T, K: 288, N: 66, norm: true, swiglu: true, ragged: true });
      await checkInt8(gpu, { f, T, K: 96, N: 7, accumulate: true, yOffset: 5 });
      await checkInt8(gpu, { f, T, K: 96, N: 7, norm: true, accumulate: true, xOffset: 3 });
      await checkInt8(gpu, { f, T, K: 64, N: 66, bias: true, swiglu: true, yStride: 40 });
      await checkInt8(gpu, { f, T, K: 96, N: 17, bias: true, norm: true, xOffset: 8, yOffset: 1 });
    }
  }
});

gpuTest("int8x chunks T = 12 and 17 rows and honours forced splits", async (gpu) => {
  for (const f of FORMATS) {
    for (const T of [12, 17]) {
      await checkInt8(gpu, { f, T, K: 96, N: 66, norm: true, swiglu: true });
      await checkInt8(gpu, { f, T, K: 64, N: 7, bias: true, accumulate: true, xOffset: 3 });
    }
    await checkInt8(gpu, { f, T: 17, K: 96, N: 7, path: "matvec" }); // one dispatch of 17
    for (const T of [1, 5, 8, 17]) {
      const wide: MatvecShape = T <= 8
        ? { rows: 4, lanes: 256, perThread: 4 }
        : { rows: 2, lanes: 128 };
      const unrolled: MatvecShape = T <= 8
        ? { rows: 8, lanes: 4, perThread: 4, unroll: 2 }
        : { rows: 8, lanes: 4, unroll: 3 };
      for (const shape of [wide, unrolled]) {
        await checkInt8(gpu, { f, T, K: 480, N: 66, norm: true, swiglu: true, shape });
        await checkInt8(gpu, { f, T, K: 288, N: 7, accumulate: true, shape });
      }
    }
  }
});

gpuTest("int8x leaves other formats, the tiled path and int8x off unchanged", async (gpu) => {
  const b = gpu.buffer("b", 1 << 16, RW);
  const args = { label: "L0.q", x: b, w: b, y: b, T: 3, K: 256, N: 8 };
  const count = async (dtype: WeightFormat, path?: MatmulPath, int8x: Int8xSetting = true) => {
    const setting = matvecTuning.int8x;
    matvecTuning.int8x = int8x;
    try {
      return (await createLinear(gpu, { ...args, dtype, path })).map((d) => d.label);
    } finally {
      matvecTuning.int8x = setting;
    }
  };
  assert.deepEqual(await count("q4_k"), ["L0.q"]);
  assert.deepEqual(await count("q4_0", "tiled"), ["L0.q"]);
  assert.deepEqual(await count("q4_0", undefined, false), ["L0.q"]);
  assert.deepEqual(await count("q8_0"), ["L0.q.quantize_x", "L0.q"]);
  // The default, "auto": q4_0 on int8 x, q8_0 on float x (slower on int8 x, see matvecTuning).
  assert.deepEqual(await count("q4_0", undefined, "auto"), ["L0.q.quantize_x", "L0.q"]);
  assert.deepEqual(await count("q8_0", undefined, "auto"), ["L0.q"]);
  assert.deepEqual(await count("q4_0", "tiled", "auto"), ["L0.q"]);
});
