import {
  createMatmul,
  type MatmulPath,
  matmulPath,
  matmulRef,
  MATVEC_BLOCK_MAX_T,
  MATVEC_CHUNKED_MAX_T,
  MATVEC_FILL,
  MATVEC_MANY_ROWS,
  MATVEC_MAX_T,
  MATVEC_WIDEN_MIN_K,
  matvecChunks,
  matvecFewRows,
  matvecManyShortRows,
  matvecMaxT,
  type MatvecShape,
  matvecShape,
  matvecUnitValues,
  type WeightDType,
} from "../kernels/matmul.ts";
import { gpuTest, randomArray, roundF16 } from "./harness.ts";
import type { Gpu } from "../engine/gpu.ts";
import { checkProduct } from "./matmul_check.ts";
import assert from "@specdec/assert";

// Tolerance, f32 and f16 weights alike (f16 is compared with the reference on f16-rounded
// weights, so only f32 accumulation order differs): nmse <= 1e-10, max-abs <= 1e-4.
const TOL = { nmse: 1e-10, maxAbs: 1e-4 };
const KS = [1, 3, 64, 129, 576];
const NS = [1, 7, 65, 257, 1536];
const RW = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST;

interface Case {
  T: number;
  K: number;
  N: number;
  dtype: WeightDType;
  path: MatmulPath;
  bias?: boolean;
  accumulate?: boolean;
  xOffset?: number;
  yOffset?: number;
  yStride?: number;
  norm?: boolean;
  swiglu?: boolean;
  shape?: MatvecShape;
}

async function check(gpu: Gpu, c: Case): Promise<void> {
  const seed = c.T * 1000003 + c.K * 1009 + c.N;
  let w = randomArray(c.N * c.K, seed + 1);
  let buf: GPUBuffer;
  if (c.dtype === "f16") {
    w = roundF16(w);
    buf = gpu.upload("w", new Float16Array(w));
  } else buf = gpu.upload("w", w);
  await checkProduct(gpu, c, { dtype: c.dtype, buf, ref: w }, seed, TOL);
}

Deno.test("matmulPath() picks matvec up to 17 rows, matvec chunks up to 64 and tiled above", () => {
  assert.equal(matmulPath(1), "matvec");
  assert.equal(matmulPath(MATVEC_MAX_T), "matvec");
  assert.equal(matmulPath(MATVEC_MAX_T + 1), "chunked");
  assert.equal(matmulPath(MATVEC_CHUNKED_MAX_T), "chunked");
  assert.equal(matmulPath(MATVEC_CHUNKED_MAX_T + 1), "tiled");
  assert.equal(matmulPath(512), "tiled");
  // Block formats: one dispatch up to 8 rows, chunks of <= 8 above.
  assert.equal(matvecMaxT("q4_0"), MATVEC_BLOCK_MAX_T);
  assert.equal(matvecMaxT("f32"), MATVEC_MAX_T);
  assert.equal(matmulPath(MATVEC_BLOCK_MAX_T, "q4_k"), "matvec");
  assert.equal(matmulPath(MATVEC_BLOCK_MAX_T + 1, "nf4"), "chunked");
  assert.equal(matmulPath(MATVEC_MAX_T, "q8_0"), "chunked");
  assert.equal(matmulPath(MATVEC_CHUNKED_MAX_T + 1, "q8_0"), "tiled");
  assert.deepEqual(matvecChunks(17, MATVEC_BLOCK_MAX_T), [6, 6, 5]);
});

Deno.test("matvecChunks() cuts T rows into the fewest chunks of <= 17, nearly equal", () => {
  for (let T = 1; T <= MATVEC_CHUNKED_MAX_T; T++) {
    const c = matvecChunks(T);
    assert.equal(c.reduce((a, b) => a + b, 0), T, `T=${T}`);
    assert.equal(c.length, Math.ceil(T / MATVEC_MAX_T), `T=${T}`);
    assert.ok(Math.max(...c) - Math.min(...c) <= 1 && c[0] === Math.max(...c), `T=${T}: ${c}`);
  }
  assert.deepEqual(matvecChunks(19), [10, 9]);
  assert.deepEqual(matvecChunks(35), [12, 12, 11]);
});

Deno.test("matvecShape() keeps rows even and lanes a power of 2, narrow on software adapters", () => {
  for (let T = 1; T <= MATVEC_MAX_T; T++) {
    for (const software of [false, true]) {
      const s = matvecShape(T, software);
      assert.ok(
        s.rows % 2 === 0 && (s.lanes & (s.lanes - 1)) === 0,
        `T=${T}: ${JSON.stringify(s)}`,
      );
    }
    assert.ok(matvecShape(T).rows <= matvecShape(T + 1).rows || T === MATVEC_MAX_T);
  }
  assert.deepEqual(matvecShape(1, true), { rows: 8, lanes: 8 });
  assert.ok(matvecShape(1).lanes >= 32, "decode keeps wide, coalesced lanes on a GPU");
});

Deno.test("matvecShape() widens the lanes of products too small to fill the GPU, within limits", () => {
  const sizes = [[1, 1], [3, 7], [64, 2], [576, 960], [1536, 576], [2048, 3072], [8192, 2048]];
  for (const [K, N] of [...sizes, [4096, 14336], [14336, 4096], [576, 32000], [129, 67]]) {
    for (let T = 1; T <= MATVEC_MAX_T; T++) {
      const s = matvecShape(T, false, { K, N }), base = matvecShape(T);
      const rt = s.perThread ?? 1, wg = (s.rows / rt) * s.lanes;
      const what = `T=${T} K=${K} N=${N}: ${JSON.stringify(s)}`;
      assert.ok(s.rows % 2 === 0 && s.rows % rt === 0 && (s.lanes & (s.lanes - 1)) === 0, what);
      assert.ok(wg <= 256 && (s.rows * T + T) * s.lanes * 4 <= 32768, what);
      const few = matvecFewRows(T, { K, N });
      assert.equal(few, T <= 8 && K < MATVEC_WIDEN_MIN_K && N * 8 < MATVEC_FILL, what);
      const many = matvecManyShortRows({ K, N });
      assert.equal(many, K < MATVEC_WIDEN_MIN_K && N >= MATVEC_MANY_ROWS, what);
      if (many) {
        assert.ok(s.rows === 16 && s.lanes >= 8 && s.lanes <= 32, what);
        assert.equal(rt, T === 1 ? 4 : 1, what);
        continue;
      }
      assert.equal(rt, few ? 1 : base.perThread ?? 1, what);
      assert.ok(s.lanes >= base.lanes && s.lanes <= Math.max(base.lanes, K / 8), what);
      const threads = (N / rt) * s.lanes;
      if (s.lanes > base.lanes) assert.ok(threads / 2 < MATVEC_FILL, what);
      if (K < MATVEC_WIDEN_MIN_K && !few) assert.deepEqual(s, base, what);
    }
  }
  // The pycode target's products (K = 576 and 1536): one row per invocation up to T = 8, widened
  // where the rows leave the GPU idle; the base split from T = 9. The classifiers (32000 rows)
  // take 16 rows of narrow lanes: 16 lanes for K = 576 and 8 for the draft's K = 256 at T = 1.
  for (const T of [1, 5, 8]) {
    assert.deepEqual(matvecShape(T, false, { K: 576, N: 960 }), { rows: 4, lanes: 64 });
    assert.deepEqual(matvecShape(T, false, { K: 1536, N: 576 }), { rows: 2, lanes: 128 });
    assert.deepEqual(matvecShape(T, false, { K: 576, N: 3072 }), { rows: 8, lanes: 32 });
  }
  assert.deepEqual(matvecShape(1, false, { K: 576, N: 32000 }), {
    rows: 16,
    lanes: 16,
    perThread: 4,
  });
  assert.deepEqual(matvecShape(1, false, { K: 256, N: 32000 }), {
    rows: 16,
    lanes: 8,
    perThread: 4,
  });
  for (const T of [2, 5, 17]) {
    assert.deepEqual(matvecShape(T, false, { K: 576, N: 32000 }), { rows: 16, lanes: 8 });
  }
  assert.deepEqual(matvecShape(1, false, { K: 576, N: 32000, unitValues: 32 }), matvecShape(1));
  assert.deepEqual(matvecShape(17, false, { K: 1536, N: 576 }), matvecShape(17));
  assert.ok(matvecShape(1, false, { K: 8192, N: 2048 }).lanes > 32, "a 1B model's down widens");
  assert.deepEqual(matvecShape(1, false, { K: 4096, N: 14336 }), matvecShape(1));
  assert.deepEqual(matvecShape(1, true, { K: 8192, N: 2048 }), { rows: 8, lanes: 8 });
});

Deno.test("matvecShape() widens a vec4-load format only while every lane keeps 2 of its units", () => {
  assert.deepEqual([matvecUnitValues("f16"), matvecUnitValues("q8_0")], [4, 16]);
  assert.deepEqual([matvecUnitValues("q4_0"), matvecUnitValues("q4_k")], [32, 32]);
  assert.equal(matvecUnitValues("q6_k"), 4, "u32-unit formats keep the measured 4-value count");
  for (const f of ["q8_0", "q4_0", "q4_k"] as WeightDType[]) {
    const unitValues = matvecUnitValues(f);
    for (const [K, N] of [[2048, 2048], [2304, 2048], [8192, 2048], [14336, 4096]]) {
      for (let T = 1; T <= MATVEC_MAX_T; T++) {
        const s = matvecShape(T, false, { K, N, unitValues });
        const what = `${f} T=${T} K=${K} N=${N}: ${JSON.stringify(s)}`;
        assert.ok(s.lanes <= Math.max(32, K / unitValues / 2), what);
        assert.ok(s.lanes <= matvecShape(T, false, { K, N }).lanes, what);
      }
    }
  }
  // A 1B model's q4_0 down projection (K = 8192: 256 units of 32) still widens to 128 lanes.
  const q4 = { K: 8192, N: 2048, unitValues: 32 };
  assert.deepEqual(matvecShape(1, false, q4), { rows: 8, lanes: 128, perThread: 4 });
  // K = 2048 of q4_0 is 64 units: 32 lanes already hold 2 each (4-value units would give 128).
  assert.equal(matvecShape(1, false, { K: 2048, N: 2048 }).lanes, 128);
  assert.deepEqual(matvecShape(1, false, { K: 2048, N: 2048, unitValues: 32 }), matvecShape(1));
});

Deno.test("matmulRef() computes x·W^T + bias + y_old", () => {
  const y = matmulRef(
    new Float32Array([1, 2, 3, 4]), // x: [2, 2]
    new Float32Array([1, 0, 0, 1, 1, 1]), // W: [3, 2]
    2,
    2,
    3,
    new Float32Array([10, 20, 30]),
    new Float32Array([1, 1, 1, 2, 2, 2]),
  );
  assert.deepEqual([...y], [12, 23, 34, 15, 26, 39]);
});

for (const dtype of ["f32", "f16"] as WeightDType[]) {
  const features = dtype === "f16" ? ["shader-f16" as const] : [];
  gpuTest(`matmul matvec ${dtype} matches the reference on ragged T, K, N`, async (gpu) => {
    for (const T of [1, 5]) {
      for (const K of KS) {
        for (const N of NS) {
          await check(gpu, { T, K, N, dtype, path: "matvec" });
        }
      }
    }
    for (const T of [2, 16, 17]) {
      for (const [K, N] of [[3, 65], [129, 7], [576, 1536]]) {
        await check(gpu, { T, K, N, dtype, path: "matvec" });
      }
    }
  }, { features });

  gpuTest(`matmul chunked ${dtype} matches the reference on ragged T, K, N`, async (gpu) => {
    for (const T of [18, 19, 35, 64]) {
      for (const [K, N] of [[3, 65], [129, 7], [576, 257]]) {
        await check(gpu, { T, K, N, dtype, path: "chunked" });
      }
    }
  }, { features });

  gpuTest(`matmul tiled ${dtype} matches the reference on ragged T, K, N`, async (gpu) => {
    for (const T of [17, 33]) {
      for (const K of KS) {
        for (const N of NS) {
          await check(gpu, { T, K, N, dtype, path: "tiled" });
        }
      }
    }
    for (const T of [1, 5, 65, 130]) {
      for (const [K, N] of [[3, 65], [129, 7], [576, 257]]) {
        await check(gpu, { T, K, N, dtype, path: "tiled" });
      }
    }
  }, { features });

  gpuTest(
    `matmul ${dtype} fuses bias and residual accumulate and honours x/y offsets on both paths`,
    async (gpu) => {
      for (const path of ["matvec", "chunked", "tiled"] as MatmulPath[]) {
        for (const T of path === "chunked" ? [18, 37] : [1, 3, 16]) {
          await check(gpu, { T, K: 129, N: 65, dtype, path, bias: true });
          await check(gpu, { T, K: 64, N: 7, dtype, path, accumulate: true, yOffset: 5 });
          await check(gpu, { T, K: 64, N: 33, dtype, path, bias: true, accumulate: true });
          await check(gpu, { T, K: 64, N: 17, dtype, path, xOffset: 3 }); // scalar x loads
          await check(gpu, { T, K: 64, N: 17, dtype, path, xOffset: 8, yOffset: 1 });
        }
      }
    },
    { features },
  );
}

for (const dtype of ["f32", "f16"] as WeightDType[]) {
  const features = dtype === "f16" ? ["shader-f16" as const] : [];
  gpuTest(
    `matmul ${dtype} folds RMSNorm into the product and SwiGLU into its epilogue on both paths`,
    async (gpu) => {
      for (const path of ["matvec", "chunked", "tiled"] as MatmulPath[]) {
        for (const T of path === "chunked" ? [19, 40] : [1, 2, 5, 17, 40]) {
          if (path === "matvec" && T > MATVEC_MAX_T) continue;
          await check(gpu, { T, K: 129, N: 66, dtype, path, norm: true });
          await check(gpu, { T, K: 64, N: 130, dtype, path, norm: true, swiglu: true });
          await check(gpu, { T, K: 100, N: 2, dtype, path, swiglu: true, bias: true });
          await check(gpu, { T, K: 64, N: 33, dtype, path, norm: true, accumulate: true });
          await check(gpu, { T, K: 64, N: 34, dtype, path, norm: true, swiglu: true, xOffset: 3 });
          await check(gpu, { T, K: 64, N: 7, dtype, path, norm: true, yOffset: 5, yStride: 20 });
        }
      }
    },
    { features },
  );
}

gpuTest("matmul matvec gives the same products for every row/lane split", async (gpu) => {
  const shapes: MatvecShape[] = [
    { rows: 2, lanes: 64 },
    { rows: 4, lanes: 32 },
    { rows: 8, lanes: 32 },
    { rows: 16, lanes: 16 },
    { rows: 32, lanes: 8 },
    { rows: 16, lanes: 8 }, // classifiers from T = 2 (matvecManyShortRows)
    { rows: 4, lanes: 64, perThread: 4 },
    { rows: 8, lanes: 32, perThread: 2 },
    { rows: 16, lanes: 16, perThread: 4 },
    { rows: 8, lanes: 128, perThread: 4 }, // widened splits of matvecShape (small N)
    { rows: 4, lanes: 256, perThread: 4 },
    { rows: 2, lanes: 128 },
    { rows: 8, lanes: 32, perThread: 4, unroll: 2 }, // two units per lane in flight
    { rows: 4, lanes: 16, unroll: 2 },
    { rows: 8, lanes: 8, perThread: 2, unroll: 3 },
  ];
  for (const shape of shapes) {
    for (const T of [1, 4, 17]) {
      await check(gpu, { T, K: 129, N: 67, dtype: "f32", path: "matvec", shape });
      await check(gpu, {
        T,
        K: 64,
        N: 66,
        dtype: "f32",
        path: "matvec",
        shape,
        norm: true,
        swiglu: true,
      });
    }
  }
});

gpuTest("matmul matvec spreads N > 65535 output columns over a 2-D grid", async (gpu) => {
  await check(gpu, { T: 2, K: 4, N: 65537 + 70, dtype: "f32", path: "matvec" }); // 2 rows/group
  await check(gpu, { T: 3, K: 4, N: 8 * 65535 + 9, dtype: "f32", path: "matvec" }); // 8 rows/group
});

gpuTest("matmul matvec refuses T above MATVEC_MAX_T", async (gpu) => {
  const b = gpu.buffer("b", 4 * 17 * 4, RW);
  await assert.rejects(
    () =>
      createMatmul(gpu, {
        label: "bad",
        x: b,
        w: b,
        y: b,
        dtype: "f32",
        T: MATVEC_MAX_T + 1,
        K: 4,
        N: 4,
        path: "matvec",
      }),
    /matvec path serves T <= 17/,
  );
});
