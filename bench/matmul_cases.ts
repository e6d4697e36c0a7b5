/**
 * Matmul bandwidth measurement shared by `bench/matmul_bench.ts` (deno bench) and GPU benchmark
 * scripts: {@linkcode benchMatmul} times each case with GPU timestamps when the device has
 * `timestamp-query` (many dispatches in one timed pass, so readback latency does not count),
 * else with wall time over many dispatches per submission, and reports weight GB/s.
 *
 * @module
 */
import type { Dispatch, Gpu } from "../engine/gpu.ts";
import {
  createLinear,
  type Int8xSetting,
  type MatmulPath,
  matmulPath,
  type MatvecShape,
  matvecShape,
  matvecUnitValues,
  type WeightDType,
} from "../kernels/matmul.ts";
import { formatBlock, weightBytes } from "../kernels/qformats.ts";
import { timePass } from "./profile.ts";

/**
 * The `matvecTuning.int8x` settings a benchmark's `--int8x` list names: "0" off, "1" q4_0 and
 * q8_0, "auto" the engine's default (q4_0 where the runtime has packed integer dot products).
 */
export function parseInt8x(list: string): Int8xSetting[] {
  return list.split(",").map((v) => {
    if (v === "0" || v === "1") return v === "1";
    if (v === "auto") return "auto";
    throw new RangeError(`--int8x: "${v}" is not 0, 1 or auto`);
  });
}

/** A `matvecTuning.int8x` setting as `--int8x` names it ("0", "1", "auto"). */
export function int8xName(s: Int8xSetting): string {
  return s === "auto" ? "auto" : s ? "1" : "0";
}

/** One product to time: y[T, N] = x[T, K] · W[N, K]^T. */
export interface MatmulCase {
  /** Short name, e.g. "ffn.up". */
  name: string;
  /** Activation rows. */
  T: number;
  /** Input width. */
  K: number;
  /** Output width. */
  N: number;
  /** Weight format (any `WeightFormat`; block formats need K % block == 0). */
  dtype: WeightDType;
  /** Force a path; default matmulPath(T, dtype). */
  path?: MatmulPath;
  /** Force a matrix-vector split; default matvecShape(T, software, { K, N, unitValues }). */
  shape?: MatvecShape;
  /** Fold an RMSNorm of x into the product (as the forward's qkv and gate/up products do). */
  norm?: boolean;
  /** Factored block decoding (createMatmul's `factor`; default true). */
  factor?: boolean;
}

/** One measured case. */
export interface MatmulRow extends MatmulCase {
  /** Path actually used. */
  path: MatmulPath;
  /** Dispatches timed. */
  reps: number;
  /** Microseconds per product (all its dispatches on the chunked path). */
  us: number;
  /** Weight bytes read per second / 1e9 (each weight byte counted once per dispatch). */
  gbps: number;
  /** 2·T·K·N / time / 1e9. */
  gflops: number;
  /** "gpu-timestamp" or "wall". */
  clock: "gpu-timestamp" | "wall";
}

function cases(
  shapes: [string, number, number][],
  Ts: number[],
  dtypes: WeightDType[],
): MatmulCase[] {
  const out: MatmulCase[] = [];
  for (const T of Ts) {
    for (const dtype of dtypes) {
      for (const [name, K, N] of shapes) out.push({ name, T, K, N, dtype });
    }
  }
  return out;
}

/** The pycode target's products (576→1536, 1536→576, 576→32000) at T = 1, 8, 128, f16 and f32. */
export const PYCODE_CASES: readonly MatmulCase[] = cases(
  [["ffn.up 576→1536", 576, 1536], ["ffn.down 1536→576", 1536, 576], [
    "lm_head 576→32000",
    576,
    32000,
  ]],
  [1, 8, 128],
  ["f16", "f32"],
);

/** 7B/8B-class products (4096x4096, 4096→14336, 14336→4096) in f16 at T = 1, 8, 128. */
export const LARGE_CASES: readonly MatmulCase[] = cases(
  [["attn 4096→4096", 4096, 4096], ["ffn.up 4096→14336", 4096, 14336], [
    "ffn.down 14336→4096",
    14336,
    4096,
  ]],
  [1, 8, 128],
  ["f16"],
);

/**
 * Block formats at decode and verify sizes (T = 1, 8): the pycode target's products in q8_0,
 * q4_0 and nf4 (576 is not a multiple of 256, so no K-quants there) and the 7B/8B-class products
 * in every block format.
 */
export const QUANT_CASES: readonly MatmulCase[] = [
  ...cases(
    [["ffn.up 576→1536", 576, 1536], ["lm_head 576→32000", 576, 32000]],
    [1, 8],
    ["q8_0", "q4_0", "nf4"],
  ),
  ...cases(
    [["ffn.up 4096→14336", 4096, 14336], ["ffn.down 14336→4096", 14336, 4096]],
    [1, 8],
    ["q8_0", "q4_0", "q4_k", "q6_k", "nf4"],
  ),
].filter((c) => c.K % formatBlock(c.dtype) === 0);

/** The verify widths the matrix-vector path serves, as the benchmark sweeps them. */
export const VERIFY_TS = [1, 2, 3, 5, 8, 12, 17];

/**
 * Verify-width sweep: 4096→14336 at T = 1..17 in every format the dummy models use, so the cost
 * of a T-row product can be read against T = 1 (same weights, one read each).
 */
export const VERIFY_CASES: readonly MatmulCase[] = cases(
  [["ffn.up 4096→14336", 4096, 14336]],
  VERIFY_TS,
  ["f16", "q8_0", "q4_0", "q4_k", "q6_k", "nf4"],
);

/** The splits (rows x lanes x rows per invocation) the `--shapes` sweep compares. */
const SPLITS: readonly MatvecShape[] = [
  { rows: 8, lanes: 32, perThread: 4 },
  { rows: 8, lanes: 64, perThread: 4 },
  { rows: 8, lanes: 128, perThread: 4 },
  { rows: 4, lanes: 256, perThread: 4 },
  { rows: 8, lanes: 32 },
  { rows: 4, lanes: 64 },
  { rows: 2, lanes: 128 },
  // Narrow lanes, more rows: for block formats, whose units hold 16-32 values (few per lane).
  { rows: 16, lanes: 16, perThread: 4 },
  { rows: 32, lanes: 8, perThread: 4 },
  { rows: 16, lanes: 8, perThread: 4 },
  { rows: 16, lanes: 8 },
];

/**
 * Matrix-vector splits compared at decode and verify widths: each product of `[name, K, N,
 * dtype]` at T = 1, 8 and 17 with every split of {@linkcode SPLITS} that has lanes to spare
 * (at least 2 units of K per lane, `matvecUnitValues`) and with the default (`matvecShape`, no forced split), so the
 * rule can be read against the best split. The products: 8B-class ffn.up (f16 and the vec4 block
 * formats) and down (q4_0), a 1B model's down, qkv and o (N = 2048 and 3072: too few rows to fill
 * the GPU with 8-row workgroups), and the pycode target's qkv, down and gate/up.
 */
export const SHAPE_CASES: readonly MatmulCase[] = (
  [
    ["4096→14336", 4096, 14336, "f16"],
    ["1b.down 8192→2048", 8192, 2048, "f16"],
    ["1b.qkv 2048→3072", 2048, 3072, "f16"],
    ["1b.o 2048→2048", 2048, 2048, "f16"],
    ["1b.down 8192→2048", 8192, 2048, "q4_0"],
    ["4096→14336", 4096, 14336, "q4_0"],
    ["4096→14336", 4096, 14336, "q8_0"],
    ["4096→14336", 4096, 14336, "q4_k"],
    ["14336→4096", 14336, 4096, "q4_0"],
    ["pycode.qkv 576→960", 576, 960, "f16"],
    ["pycode.down 1536→576", 1536, 576, "f16"],
    ["pycode.gate_up 576→3072", 576, 3072, "f16"],
    ["pycode.lm_head 576→32000", 576, 32000, "f16"],
    ["draft.lm_head 256→32000", 256, 32000, "f16"],
  ] as [string, number, number, WeightDType][]
).flatMap(([name, K, N, dtype]) =>
  [1, 8, 17].flatMap((T): MatmulCase[] => [
    { name: `${name} auto`, T, K, N, dtype, path: "matvec" },
    ...SPLITS.filter((s) => 2 * matvecUnitValues(dtype) * s.lanes <= K && (T <= 8 || !s.perThread))
      .map((shape) => ({
        name: `${name} ${shape.rows}x${shape.lanes}x${shape.perThread ?? 1}`,
        T,
        K,
        N,
        dtype,
        path: "matvec" as const,
        shape,
      })),
  ])
);

const SWEEP_SPLITS: readonly (MatvecShape & { perThread: number })[] = [
  { rows: 8, lanes: 32, perThread: 2 },
  { rows: 8, lanes: 32, perThread: 1 },
  { rows: 16, lanes: 32, perThread: 4 },
  { rows: 8, lanes: 64, perThread: 4 },
  { rows: 4, lanes: 64, perThread: 1 },
];

/**
 * Rows-per-invocation sweep: 4096→14336 (norm folded in, as the forward's products) at every
 * verify width T in f16 and the vec4 block formats, with 8 rows x 32 lanes and 1, 2 or 4 rows
 * per invocation, beside the default split: where each T's accumulators stop fitting registers.
 */
export const SWEEP_CASES: readonly MatmulCase[] = (["q4_0", "q8_0", "q4_k", "f16"] as const)
  .flatMap((dtype) =>
    [1, 2, 4, 8, 17].flatMap((T) =>
      [false, true].flatMap((norm) =>
        (dtype === "f16" ? [true] : [true, false]).flatMap((factor) =>
          [undefined, ...SWEEP_SPLITS].filter((sh) => !sh || T <= 8 || sh.perThread === 1).map(
            (shape): MatmulCase => ({
              name: `4096→14336${norm ? " norm" : ""}${factor ? "" : " unfactored"} ${
                shape ? `${shape.rows}x${shape.lanes}x${shape.perThread}` : "auto"
              }`,
              T,
              K: 4096,
              N: 14336,
              dtype,
              path: "matvec",
              norm,
              factor,
              shape,
            }),
          )
        )
      )
    )
  );

/**
 * Bytes of weight copies a product's timing rotates over on a GPU: past a large GPU's L2 (50 MB
 * on the H100 and H200), so that each dispatch reads its weights from memory as in a forward,
 * where every product's weights are read once. One 4096→14336 q4_0 matrix (33 MB) fits that L2.
 */
export const MATMUL_ROTATE_BYTES = 128 * 2 ** 20;
/** Most weight copies of one product. */
const MAX_COPIES = 16;

/**
 * Times each case (cases needing f16 are skipped on devices without it). Each case gets one
 * untimed warm-up dispatch; then up to `reps` dispatches are encoded into one timed pass (fewer
 * when one dispatch takes so long that `reps` of them would pass `budgetMs`). On a GPU the
 * dispatches cycle over copies of the weights totalling about {@linkcode MATMUL_ROTATE_BYTES}
 * (at most 16; one per product shape and format, shared by its cases), so they are not timed out
 * of the L2 cache. With `rounds` > 1 every case is timed once per round, the rounds interleaved
 * over all cases (a clock change mid-run hits every case alike), and each case keeps its fastest.
 *
 * @example
 * ```ts ignore
 * const gpu = await requestGpu();
 * for (const r of await benchMatmul(gpu, LARGE_CASES, 50)) console.log(r.name, r.gbps);
 * ```
 */
export async function benchMatmul(
  gpu: Gpu,
  list: readonly MatmulCase[],
  reps = 50,
  budgetMs = 2000,
  rounds = 1,
): Promise<MatmulRow[]> {
  const rw = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST;
  // Buffers are zero-filled: values do not change the work a dense product does.
  const weights = new Map<string, GPUBuffer[]>();
  const copiesOf = (c: MatmulCase, wBytes: number): GPUBuffer[] => {
    const key = `${c.dtype}.${c.K}.${c.N}`;
    let ws = weights.get(key);
    if (!ws) {
      const n = gpu.software
        ? 1
        : Math.min(MAX_COPIES, Math.max(1, Math.ceil(MATMUL_ROTATE_BYTES / wBytes)));
      ws = Array.from({ length: n }, (_, i) => gpu.buffer(`bench.matmul.${key}.w${i}`, wBytes, rw));
      weights.set(key, ws);
    }
    return ws;
  };
  type Timed = {
    c: MatmulCase;
    label: string;
    path: MatmulPath;
    shape?: MatvecShape;
    wBytes: number;
    batch: Dispatch[];
    n: number;
    best: number;
    own: GPUBuffer[];
  };
  const built: Timed[] = [];
  for (const c of list) {
    if (c.dtype === "f16" && !gpu.features.f16) continue;
    const path = c.path ?? matmulPath(c.T, c.dtype);
    const label = `bench.matmul.${c.name}.T${c.T}.${c.dtype}`;
    const shape = path === "matvec"
      ? (c.shape ??
        matvecShape(c.T, gpu.software, { K: c.K, N: c.N, unitValues: matvecUnitValues(c.dtype) }))
      : undefined;
    const wBytes = weightBytes(c.dtype, c.N, c.K);
    const x = gpu.buffer(`${label}.x`, c.T * c.K * 4, rw);
    const y = gpu.buffer(`${label}.y`, c.T * c.N * 4, rw);
    const g = c.norm ? gpu.buffer(`${label}.g`, c.K * 4, rw) : undefined;
    const perCopy: Dispatch[][] = [];
    for (const w of copiesOf(c, wBytes)) {
      perCopy.push(
        await createLinear(gpu, {
          norm: g && { weight: g, eps: 1e-5 },
          label,
          x,
          w,
          y,
          dtype: c.dtype,
          T: c.T,
          K: c.K,
          N: c.N,
          path,
          shape: c.shape,
          factor: c.factor,
        }),
      );
    }
    const t0 = performance.now();
    await gpu.run(`${label}.warmup`, perCopy[0]);
    const est = performance.now() - t0;
    const n = Math.max(1, Math.min(reps, Math.floor(budgetMs / Math.max(est, 1e-3))));
    // The chunks of a chunked product, each repetition on the next copy of the weights.
    const batch = Array.from({ length: n }, (_, i) => perCopy[i % perCopy.length]).flat();
    built.push({
      c,
      label,
      path,
      shape,
      wBytes,
      batch,
      n,
      best: Infinity,
      own: [x, y, ...(g ? [g] : [])],
    });
  }
  const clock: MatmulRow["clock"] = gpu.features.timestamp ? "gpu-timestamp" : "wall";
  for (let r = 0; r < Math.max(1, rounds); r++) {
    for (const b of built) {
      let seconds: number;
      if (gpu.features.timestamp) seconds = (await timePass(gpu, b.batch, 1)) * 1e-6;
      else {
        const t1 = performance.now();
        await gpu.run(b.label, b.batch);
        seconds = (performance.now() - t1) * 1e-3;
      }
      b.best = Math.min(b.best, seconds / b.n);
    }
  }
  for (const b of built) for (const buf of b.own) buf.destroy();
  for (const ws of weights.values()) for (const w of ws) w.destroy();
  return built.map((b): MatmulRow => ({
    ...b.c,
    shape: b.shape,
    path: b.path,
    reps: b.n,
    us: b.best * 1e6,
    gbps: b.wBytes / b.best / 1e9,
    gflops: (2 * b.c.T * b.c.K * b.c.N) / b.best / 1e9,
    clock,
  }));
}

/** Formats rows from {@linkcode benchMatmul} as an aligned text table. */
export function formatMatmulRows(rows: readonly MatmulRow[]): string {
  const head =
    "case                          T  dtype  path     split     reps        µs     GB/s   GFLOP/s  clock";
  const lines = rows.map((r) =>
    `${r.name.padEnd(25)} ${String(r.T).padStart(4)}  ${r.dtype.padEnd(5)}  ${r.path.padEnd(7)} ${
      (r.shape ? `${r.shape.rows}x${r.shape.lanes}x${r.shape.perThread ?? 1}` : "-").padEnd(8)
    } ${String(r.reps).padStart(5)} ${r.us.toFixed(1).padStart(9)} ${
      r.gbps.toFixed(1).padStart(8)
    } ${r.gflops.toFixed(1).padStart(9)}  ${r.clock}`
  );
  return [head, ...lines].join("\n");
}
