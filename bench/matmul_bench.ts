/**
 * Matmul benchmarks at the pycode target's sizes (f16, f32 and the block formats q8_0, q4_0,
 * nf4): `deno bench -A bench/matmul_bench.ts`.
 *
 * First {@linkcode benchMatmul} measures every case (GPU timestamps when the device has them,
 * many dispatches per timed pass); its table of weight bandwidth (GB/s) per path is printed at the
 * end. Then each `Deno.bench` case submits a batch of dispatches and waits (wall time, so it
 * includes one ~11 ms completion poll per submission); the batch is sized from the first
 * measurement (up to 50 dispatches, about 200 ms of GPU work) so software adapters finish.
 *
 * @module
 */
import { requestGpu } from "../engine/gpu.ts";
import { createLinear } from "../kernels/matmul.ts";
import { weightBytes } from "../kernels/qformats.ts";
import { benchMatmul, formatMatmulRows, PYCODE_CASES, QUANT_CASES } from "./matmul_cases.ts";

/** Most dispatches per submission. */
const PER_SUBMIT = 50;

const gpu = await requestGpu();
const rw = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST;
const quant = QUANT_CASES.filter((c) => c.K === 576); // the pycode sizes; large ones: bench/gpu.ts
const rows = await benchMatmul(gpu, [...PYCODE_CASES, ...quant], PER_SUBMIT, 500);

for (const r of rows) {
  const label = `bench.${r.name}.T${r.T}.${r.dtype}`;
  const perSubmit = Math.max(1, Math.min(PER_SUBMIT, Math.floor(200_000 / r.us)));
  const d = await createLinear(gpu, {
    label,
    x: gpu.buffer(`${label}.x`, r.T * r.K * 4, rw),
    w: gpu.buffer(`${label}.w`, weightBytes(r.dtype, r.N, r.K), rw),
    y: gpu.buffer(`${label}.y`, r.T * r.N * 4, rw),
    dtype: r.dtype,
    T: r.T,
    K: r.K,
    N: r.N,
    path: r.path,
  });
  const batch = Array.from({ length: perSubmit }, () => d).flat();
  Deno.bench({
    name: `matmul ${r.path} ${r.name} T=${r.T} ${r.dtype} x${perSubmit}/submit`,
    group: `T=${r.T}`,
    n: 3,
    warmup: 1,
    fn: () => gpu.run(label, batch),
  });
}

globalThis.addEventListener("unload", () => {
  console.log(`\nmatmul weight bandwidth on ${gpu.adapterName}:\n${formatMatmulRows(rows)}`);
});
