/**
 * GPU time of the attention dispatches the decoders run, at real models' shapes: the fused
 * attention of the serial forward (RoPE, KV write and attention in one dispatch) at decode and
 * verify widths, and the paged attention of the batched forward, each timed by GPU timestamps
 * around `--reps` back-to-back repetitions in one compute pass (so the figure is the dispatch's
 * own cost, launch included, without the pass overhead of a per-op profile).
 *
 *   deno run -A bench/attention_gpu.ts [--reps 200] [--rounds 5] [--splits 32,8] [--wg 128,256]
 *                                   [--paged-split 0,1] [--before DIR[,DIR]] [--json]
 *
 * `--before DIR[,DIR]` also times the kernels of other checkouts of this repository (e.g. a
 * `git archive` of an earlier commit) in the same process, row by row beside these.
 * `--splits` runs the fused cases once per cap on the key chunks (`attentionTuning.maxSplits`),
 * `--wg 128,256` every case once per workgroup size (default: the adapter's), `--paged-split 0,1`
 * the paged cases once unsplit and once split whatever `pagedAttentionPlan` would choose.
 *
 * @module
 */
import { parseArgs } from "@specdec/cli";
import { basename, resolve } from "@specdec/path";
import { type Dispatch, type Gpu, requestGpu } from "../engine/gpu.ts";
import { kvCacheBytes, type KvDType, kvDType } from "../kernels/kv_write.ts";
import { ropeInvFreq } from "../kernels/rope.ts";
import { randomArray } from "../tests/harness.ts";
import { blockTableImage } from "../engine/paged_kv.ts";
import { timePass } from "./profile.ts";

interface Shape {
  model: string;
  nHeads: number;
  nKvHeads: number;
  headDim: number;
  maxSeq: number;
}
const PYCODE_TARGET: Shape = {
  model: "pycode-target",
  nHeads: 9,
  nKvHeads: 3,
  headDim: 64,
  maxSeq: 1024,
};
const PYCODE_DRAFT: Shape = {
  model: "pycode-draft",
  nHeads: 4,
  nKvHeads: 4,
  headDim: 64,
  maxSeq: 1024,
};
const LLAMA_8B: Shape = {
  model: "llama-3.1-8b",
  nHeads: 32,
  nKvHeads: 8,
  headDim: 128,
  maxSeq: 4096,
};

/** Fused cases: shape, query rows T, keys cached before the forward. */
const FUSED: [Shape, number, number][] = [
  [PYCODE_TARGET, 1, 128],
  [PYCODE_TARGET, 1, 300],
  [PYCODE_TARGET, 1, 1000],
  [PYCODE_TARGET, 5, 300],
  [PYCODE_TARGET, 17, 300],
  [PYCODE_DRAFT, 1, 300],
  [PYCODE_DRAFT, 5, 300],
  [LLAMA_8B, 1, 512],
  [LLAMA_8B, 1, 2000],
  [LLAMA_8B, 8, 512],
];
/**
 * Paged cases: shape, batch rows R, keys per sequence, rows per row group V (R / V sequences,
 * step-major as a batched verify of k + 1 = V rows; 1: one sequence per row).
 */
const PAGED: [Shape, number, number, number][] = [
  [PYCODE_TARGET, 1, 300, 1],
  [PYCODE_TARGET, 8, 300, 1],
  [PYCODE_TARGET, 40, 300, 1],
  [PYCODE_TARGET, 40, 300, 5],
  [PYCODE_TARGET, 40, 1000, 1],
  [PYCODE_TARGET, 40, 1000, 5],
  [PYCODE_DRAFT, 8, 300, 1],
  [PYCODE_DRAFT, 40, 300, 1],
  [PYCODE_DRAFT, 40, 300, 5],
];

const { values } = parseArgs({
  options: {
    reps: { type: "string", default: "200" },
    rounds: { type: "string", default: "5" },
    splits: { type: "string" },
    wg: { type: "string" },
    "paged-split": { type: "string" },
    before: { type: "string" },
    json: { type: "boolean", default: false },
  },
});
const reps = Number(values.reps);
const rounds = Number(values.rounds);
for (const [name, v] of [["reps", reps], ["rounds", rounds]] as const) {
  if (!Number.isInteger(v) || v < 1) throw new Error(`--${name} must be a positive integer`);
}

type Kernels = {
  name: string;
  fused: typeof import("../kernels/fused_attention.ts");
  attention: typeof import("../kernels/attention.ts");
  paged: typeof import("../kernels/paged_attention.ts");
};
async function kernelsOf(name: string, root: URL): Promise<Kernels> {
  return {
    name,
    fused: await import(new URL("kernels/fused_attention.ts", root).href),
    attention: await import(new URL("kernels/attention.ts", root).href),
    paged: await import(new URL("kernels/paged_attention.ts", root).href),
  };
}
const sets = [await kernelsOf("now", new URL("../", import.meta.url))];
// --before A[,B]: other checkouts, named by their folders, timed before this one.
for (const dir of values.before?.split(",").reverse() ?? []) {
  sets.unshift(await kernelsOf(basename(dir), new URL(`file://${resolve(dir)}/`)));
}

const device = await requestGpu();
if (!device.features.timestamp) {
  throw new Error("attention_gpu: the adapter has no timestamp-query");
}
/**
 * The device as kernel set `name` sees it: its pipelines keyed apart from the other sets' (the
 * pipeline cache is keyed by specialization, and both checkouts use the same keys).
 */
function gpuFor(name: string): Gpu {
  return new Proxy(device, {
    get(t, k) {
      if (k === "pipeline") {
        return (key: string, code: () => string) => t.pipeline(`${name}:${key}`, code);
      }
      const v = Reflect.get(t, k, t);
      return typeof v === "function" ? v.bind(t) : v;
    },
  });
}
const gpu = device;
const dtype: KvDType = kvDType(gpu);

/** Seconds per repetition of `d`: GPU timestamps around `reps` of it in one pass. */
async function seconds(g: Gpu, d: Dispatch): Promise<number> {
  return await timePass(g, Array.from({ length: reps }, () => d), 1) / 1e6 / reps;
}

function cache(s: Shape, seed: number): GPUBuffer {
  const n = kvCacheBytes(dtype, 1, s.maxSeq, s.nKvHeads, s.headDim) / (dtype === "f16" ? 2 : 4);
  const a = randomArray(n, seed);
  return gpu.upload(`bench.cache.${seed}`, dtype === "f16" ? Float16Array.from(a) : a);
}

async function fusedCase(
  k: Kernels,
  s: Shape,
  T: number,
  pos: number,
  wg?: number,
): Promise<Dispatch> {
  const shape = { T, nHeads: s.nHeads, nKvHeads: s.nKvHeads, headDim: s.headDim, maxSeq: s.maxSeq };
  const plan = k.fused.fusedAttentionPlan(shape, gpu.limits.maxComputeWorkgroupStorageSize);
  const scratchBytes = k.fused.fusedAttentionScratchBytes(shape, plan);
  const qkvLen = T * (s.nHeads + 2 * s.nKvHeads) * s.headDim;
  const d = await k.fused.createFusedAttention(gpuFor(k.name), {
    label: `bench.${k.name}.fused`,
    ...shape,
    qkv: gpu.upload("bench.qkv", randomArray(qkvLen, 3)),
    kCache: cache(s, 1),
    vCache: cache(s, 2),
    state: gpu.upload("bench.state", new Uint32Array([pos])),
    out: gpu.buffer("bench.out", 4 * T * s.nHeads * s.headDim, GPUBufferUsage.STORAGE),
    invFreq: gpu.upload("bench.inv_freq", ropeInvFreq(s.headDim, 10000)),
    layout: "rotate-half",
    dtype,
    layers: 1,
    layer: 0,
    wg,
    scratch: scratchBytes
      ? gpu.buffer("bench.scratch", scratchBytes, GPUBufferUsage.STORAGE)
      : undefined,
  });
  await gpu.run("bench.warmup", [d]);
  return d;
}

async function pagedCase(
  k: Kernels,
  s: Shape,
  R: number,
  len: number,
  V: number,
  wg?: number,
  split?: boolean,
): Promise<Dispatch> {
  const blockRows = 16, maxBlocksPerSeq = s.maxSeq / blockRows, nSeq = R / V;
  const numBlocks = nSeq * maxBlocksPerSeq;
  const layout = {
    nKvHeads: s.nKvHeads,
    headDim: s.headDim,
    blockRows,
    numBlocks,
    numSeqs: nSeq,
    maxBlocksPerSeq,
    layers: 1,
    layer: 0,
    dtype,
  };
  // Sequence g holds blocks g, g + nSeq, g + 2 nSeq, ...: scattered across the pool. Row
  // i * nSeq + g is its i-th of V rows, at positions len - V .. len - 1 (a verify's).
  const tables = Array.from(
    { length: nSeq },
    (_, g) => Array.from({ length: Math.ceil(len / blockRows) }, (_, b) => g + b * nSeq),
  );
  const rows = k.paged.pagedRowsImage(
    Array.from({ length: R }, (_, r) => ({ seq: r % nSeq, pos: len - V + Math.floor(r / nSeq) })),
  );
  const poolRows = numBlocks * blockRows;
  const big: Shape = { ...s, maxSeq: poolRows };
  const d = await k.paged.createPagedAttention(gpuFor(k.name), {
    label: `bench.${k.name}.paged`,
    ...layout,
    R,
    nHeads: s.nHeads,
    q: gpu.upload("bench.q", randomArray(R * s.nHeads * s.headDim, 4)),
    kCache: cache(big, 5),
    vCache: cache(big, 6),
    rows: gpu.upload("bench.rows", rows),
    table: gpu.upload("bench.table", blockTableImage(tables, maxBlocksPerSeq)),
    out: gpu.buffer("bench.out", 4 * R * s.nHeads * s.headDim, GPUBufferUsage.STORAGE),
    wg,
    force: split === undefined ? undefined : { split },
    rowGroup: V,
  });
  await gpu.run("bench.warmup", [d]);
  return d;
}

interface Row {
  kernel: string;
  model: string;
  rows: number;
  keys: number;
  splits?: number;
  wg?: number;
  us: Record<string, number>;
}
// Every dispatch is built first, then timed in `--rounds` rounds over all of them, keeping each
// one's fastest round: a slow spell of the GPU (clocks, another tenant) then costs a round of
// every case alike instead of all the rounds of a few.
const out: Row[] = [];
const built: { row: Row; d: Record<string, Dispatch> }[] = [];
const splitCaps = values.splits?.split(",").map(Number) ?? [undefined];
const wgs = values.wg?.split(",").map(Number) ?? [undefined];
const pagedSplits: (boolean | undefined)[] =
  values["paged-split"]?.split(",").map((v: string) => v === "1") ?? [undefined];
for (const wg of wgs) {
  for (const cap of splitCaps) {
    for (const [s, T, pos] of FUSED) {
      const d: Record<string, Dispatch> = {};
      for (const k of sets) {
        if (cap !== undefined) k.attention.attentionTuning.maxSplits = cap;
        d[k.name] = await fusedCase(k, s, T, pos, wg);
      }
      const row = { kernel: "fused", model: s.model, rows: T, keys: pos + T, splits: cap, wg };
      built.push({ row: { ...row, us: {} }, d });
    }
  }
  for (const split of pagedSplits) {
    for (const [s, R, len, V] of PAGED) {
      const d: Record<string, Dispatch> = {};
      for (const k of sets) d[k.name] = await pagedCase(k, s, R, len, V, wg, split);
      const kernel = (split === undefined ? "paged" : split ? "paged split" : "paged unsplit") +
        (V > 1 ? ` (groups of ${V})` : "");
      built.push({ row: { kernel, model: s.model, rows: R, keys: len, wg, us: {} }, d });
    }
  }
}
for (let round = 0; round < rounds; round++) {
  for (const { row, d } of built) {
    for (const k of sets) {
      const us = 1e6 * await seconds(gpu, d[k.name]);
      row.us[k.name] = Math.min(row.us[k.name] ?? Infinity, us);
    }
  }
}
out.push(...built.map((b) => b.row));

if (values.json) {
  console.log(JSON.stringify({ adapter: gpu.adapterName, dtype, reps, rows: out }, null, 2));
} else {
  console.log(
    `attention dispatches on ${gpu.adapterName}, ${dtype} cache, µs per dispatch ` +
      `(GPU timestamps, ${reps} back to back in one pass, fastest of ${rounds} rounds)`,
  );
  const names = sets.map((k) => k.name);
  const head = [
    "kernel",
    "model",
    "rows",
    "keys",
    "split cap",
    "wg",
    ...names.map((n) => `${n} µs`),
  ];
  const body = out.map((r) => [
    r.kernel,
    r.model,
    String(r.rows),
    String(r.keys),
    r.splits === undefined ? "default" : String(r.splits),
    r.wg === undefined ? "default" : String(r.wg),
    ...names.map((n) => r.us[n].toFixed(2)),
  ]);
  const w = head.map((h, i) => Math.max(h.length, ...body.map((b) => b[i].length)));
  for (const line of [head, w.map((n) => "-".repeat(n)), ...body]) {
    console.log(line.map((c, i) => c.padEnd(w[i])).join("  "));
  }
}
