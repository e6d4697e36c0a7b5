import { createMatmul, type MatmulPath } from "../kernels/matmul.ts";
import {
  formatBlock,
  isBlockFormat,
  WEIGHT_FORMATS,
  type WeightFormat,
} from "../kernels/qformats.ts";
import { gpuTest } from "./harness.ts";
import type { Gpu } from "../engine/gpu.ts";
import { checkProduct, encodedWeights } from "./matmul_check.ts";
import assert from "@specdec/assert";

// Tolerance: the GPU dequantizes to the same f32 values as decodeWeights() (products of an f16
// scale and a small integer are exact; q4_k's `d*sc*q - dmin*m` may differ by one rounding where
// a GPU fuses it), so the error is f32 accumulation order over K <= 512: nmse <= 1e-10,
// max-abs <= 2e-4 (outputs are up to ~10 in magnitude).
const TOL = { nmse: 1e-10, maxAbs: 2e-4 };
const RW = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST;
const BLOCK_FORMATS: WeightFormat[] = WEIGHT_FORMATS.filter(isBlockFormat);
const NS = [1, 7, 67];
const MATVEC_TS = [1, 2, 3, 5, 16, 17];
const TILED_TS = [1, 2, 3, 5, 16, 17, 40];

/** K values for `f`: 256 and 512 for the K formats; 32*3 and 64*5 (and one block) otherwise. */
function ks(f: WeightFormat): number[] {
  const b = formatBlock(f);
  return b === 256 ? [256, 512] : [...new Set([b, 32 * 3, 64 * 5].filter((k) => k % b === 0))];
}

interface Case {
  f: WeightFormat;
  path: MatmulPath;
  T: number;
  K: number;
  N: number;
  bias?: boolean;
  accumulate?: boolean;
  xOffset?: number;
  yOffset?: number;
  norm?: boolean;
  swiglu?: boolean;
  shape?: { rows: number; lanes: number; perThread?: number };
}

async function check(gpu: Gpu, c: Case): Promise<void> {
  const w = encodedWeights(gpu, c.f, c.N, c.K);
  await checkProduct(gpu, c, { dtype: c.f, ...w }, c.T * 7919 + c.K * 31 + c.N, TOL);
}

for (const f of BLOCK_FORMATS) {
  gpuTest(`matmul matvec ${f} dequantizes in-kernel and matches the reference`, async (gpu) => {
    for (const T of MATVEC_TS) {
      for (const K of ks(f)) {
        for (const N of NS) await check(gpu, { f, path: "matvec", T, K, N });
      }
    }
  });

  gpuTest(`matmul tiled ${f} dequantizes in-kernel and matches the reference`, async (gpu) => {
    for (const T of TILED_TS) {
      for (const K of ks(f)) {
        for (const N of NS) await check(gpu, { f, path: "tiled", T, K, N });
      }
    }
  });
}

for (const f of ["q4_0", "q6_k"] as WeightFormat[]) {
  gpuTest(`matmul ${f} fuses bias and accumulate and honours x/y offsets on both paths`, async (
    gpu,
  ) => {
    const K = formatBlock(f) === 256 ? 256 : 96;
    for (const path of ["matvec", "tiled"] as MatmulPath[]) {
      for (const T of [1, 3, 16]) {
        await check(gpu, { f, path, T, K, N: 67, bias: true });
        await check(gpu, { f, path, T, K, N: 7, accumulate: true, yOffset: 5 });
        await check(gpu, { f, path, T, K, N: 7, bias: true, accumulate: true });
        await check(gpu, { f, path, T, K, N: 7, xOffset: 3 }); // scalar x loads
        await check(gpu, { f, path, T, K, N: 7, xOffset: 8, yOffset: 1 });
      }
    }
  });
}

gpuTest("matmul fuses RMSNorm and SwiGLU for every block format on both paths", async (gpu) => {
  for (const f of BLOCK_FORMATS) {
    const K = ks(f)[0];
    for (const path of ["matvec", "chunked", "tiled"] as MatmulPath[]) {
      for (const T of path === "chunked" ? [9, 19] : [1, 3, 17]) {
        await check(gpu, { f, path, T, K, N: 66, norm: true, swiglu: true });
        await check(gpu, { f, path, T, K, N: 7, norm: true, accumulate: true, xOffset: 3 });
        if (path === "matvec") {
          const shape = { rows: 8, lanes: 16, perThread: 4 };
          await check(gpu, { f, path, T, K, N: 66, norm: true, swiglu: true, shape });
          // a widened split (small N): more lanes than K has units for some formats
          const wide = T <= 8 ? { rows: 4, lanes: 256, perThread: 4 } : { rows: 2, lanes: 128 };
          await check(gpu, { f, path, T, K, N: 66, norm: true, swiglu: true, shape: wide });
          // several units per lane in flight, the last step ragged (some lanes skip unit 2)
          const unrolled = T <= 8
            ? { rows: 8, lanes: 4, perThread: 4, unroll: 2 }
            : { rows: 8, lanes: 4, unroll: 3 };
          const K2 = ks(f).at(-1)!;
          await check(gpu, { f, path, T, K: K2, N: 66, norm: true, swiglu: true, shape: unrolled });
          await check(gpu, { f, path, T, K: K2, N: 7, accumulate: true, shape: unrolled });
        }
      }
    }
  }
});

gpuTest("matmul f32 and f16 weights from encodeWeights() match the reference", async (gpu) => {
  for (const f of ["f32", "f16"] as WeightFormat[]) {
    if (f === "f16" && !gpu.features.f16) continue;
    for (const path of ["matvec", "tiled"] as MatmulPath[]) {
      for (const [T, K, N] of [[1, 67, 7], [5, 96, 67], [16, 3, 1]]) {
        await check(gpu, { f, path, T, K, N });
      }
    }
  }
});

gpuTest("matmul matvec q8_0 spreads N > 65535 output columns over a 2-D grid", async (gpu) => {
  await check(gpu, { f: "q8_0", path: "matvec", T: 1, K: 32, N: 65535 + 9 });
});

gpuTest("matmul refuses K that is not a multiple of the format's block, naming the label", async (
  gpu,
) => {
  const b = gpu.buffer("b", 4096, RW);
  for (const [f, K] of [["q4_k", 576], ["q8_0", 48], ["nf4", 96]] as [WeightFormat, number][]) {
    for (const path of ["matvec", "tiled"] as MatmulPath[]) {
      await assert.rejects(
        () => createMatmul(gpu, { label: "L0.q", x: b, w: b, y: b, dtype: f, T: 1, K, N: 4, path }),
        new RegExp(`L0\\.q: K=${K} is not a multiple of the ${f} block size ${formatBlock(f)}`),
      );
    }
  }
});
