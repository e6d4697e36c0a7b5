/**
 * Matmul benchmarks at the pycode target's sizes: `deno bench -A bench/matmul_bench.ts`.
 *
 * Each `Deno.bench` case submits PER_SUBMIT dispatches and waits (wall time, so it includes one
 * ~11 ms completion poll per submission); the summary printed at the end comes from
 * {@linkcode benchMatmul}, which uses GPU timestamps when the device has them, and reports the
 * weight bandwidth (GB/s) each path reaches.
 *
 * @module
 */
import { requestGpu } from "../engine/gpu.ts";
import { createMatmul, matmulPath } from "../kernels/matmul.ts";
import { benchMatmul, formatMatmulRows, PYCODE_CASES } from "./matmul_cases.ts";

/** Dispatches per submission in the Deno.bench cases. */
const PER_SUBMIT = 50;

const gpu = await requestGpu();
const rw = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST;

for (const c of PYCODE_CASES) {
  if (c.dtype === "f16" && !gpu.features.f16) continue;
  const label = `bench.${c.name}.T${c.T}.${c.dtype}`;
  const path = matmulPath(c.T);
  // Prefill-sized products are slow on software adapters: fewer dispatches per submission.
  const perSubmit = c.T > 16 ? 5 : PER_SUBMIT;
  const d = await createMatmul(gpu, {
    label,
    x: gpu.buffer(`${label}.x`, c.T * c.K * 4, rw),
    w: gpu.buffer(`${label}.w`, c.N * c.K * (c.dtype === "f16" ? 2 : 4), rw),
    y: gpu.buffer(`${label}.y`, c.T * c.N * 4, rw),
    dtype: c.dtype,
    T: c.T,
    K: c.K,
    N: c.N,
  });
  const batch = new Array(perSubmit).fill(d);
  Deno.bench({
    name: `matmul ${path} ${c.name} T=${c.T} ${c.dtype} x${perSubmit}/submit`,
    group: `T=${c.T}`,
    n: 5,
    warmup: 1,
    fn: () => gpu.run(label, batch),
  });
}

const rows = await benchMatmul(gpu, PYCODE_CASES, PER_SUBMIT);
globalThis.addEventListener("unload", () => {
  console.log(`\nmatmul weight bandwidth on ${gpu.adapterName}:\n${formatMatmulRows(rows)}`);
});
