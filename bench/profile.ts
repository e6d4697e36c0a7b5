/**
 * GPU-timestamp profiling of a list of dispatches: each dispatch in its own compute pass with
 * begin/end timestamps, summed by the op name at the end of its label (`target.L3.attn.q` →
 * `attn.q`, layer numbers dropped). Used by the GPU benchmark to say where a forward's time goes.
 */
import type { Dispatch, Gpu } from "../engine/gpu.ts";

/** Microseconds per op, summed over `reps` runs and divided by `reps`. */
export interface ProfileRow {
  op: string;
  dispatches: number;
  us: number;
}

/** The op a dispatch label names, without the model prefix and layer. */
export function opOf(label: string): string {
  return label.split(".").filter((p, i) => i > 0 && !/^L\d+$/.test(p)).join(".") || label;
}

/** Times every dispatch of `dispatches` with GPU timestamps, `reps` times; needs timestamp-query. */
export async function profileDispatches(
  gpu: Gpu,
  dispatches: readonly Dispatch[],
  reps = 5,
): Promise<ProfileRow[]> {
  if (!gpu.features.timestamp) throw new Error("profiling needs the timestamp-query feature");
  const n = dispatches.length;
  if (n === 0) return [];
  const querySet = gpu.device.createQuerySet({ label: "profile", type: "timestamp", count: 2 * n });
  const resolve = gpu.buffer(
    "profile.resolve",
    16 * n,
    GPUBufferUsage.QUERY_RESOLVE | GPUBufferUsage.COPY_SRC,
  );
  const sums = new Map<string, ProfileRow>();
  for (let r = 0; r < reps; r++) {
    const enc = gpu.device.createCommandEncoder({ label: "profile" });
    dispatches.forEach((d, i) => {
      const pass = enc.beginComputePass({
        label: d.label,
        timestampWrites: {
          querySet,
          beginningOfPassWriteIndex: 2 * i,
          endOfPassWriteIndex: 2 * i + 1,
        },
      });
      pass.setPipeline(d.pipeline);
      pass.setBindGroup(0, d.bindGroup);
      pass.dispatchWorkgroups(...d.workgroups);
      pass.end();
    });
    enc.resolveQuerySet(querySet, 0, 2 * n, resolve, 0);
    gpu.device.queue.submit([enc.finish()]);
    const t = new BigUint64Array(await gpu.read(resolve));
    dispatches.forEach((d, i) => {
      const op = opOf(d.label);
      const row = sums.get(op) ?? { op, dispatches: 0, us: 0 };
      if (r === 0) row.dispatches++;
      row.us += Number(t[2 * i + 1] - t[2 * i]) / 1000;
      sums.set(op, row);
    });
  }
  querySet.destroy();
  resolve.destroy();
  return [...sums.values()].map((s) => ({ ...s, us: s.us / reps })).sort((a, b) => b.us - a.us);
}

/**
 * Median GPU time in µs of `dispatches` encoded as ONE compute pass (as a forward runs), over
 * `reps` passes of one submission; needs timestamp-query.
 */
export async function timePass(
  gpu: Gpu,
  dispatches: readonly Dispatch[],
  reps = 5,
): Promise<number> {
  if (!gpu.features.timestamp) throw new Error("timing needs the timestamp-query feature");
  const querySet = gpu.device.createQuerySet({ label: "pass", type: "timestamp", count: 2 * reps });
  const resolve = gpu.buffer(
    "pass.resolve",
    16 * reps,
    GPUBufferUsage.QUERY_RESOLVE | GPUBufferUsage.COPY_SRC,
  );
  const enc = gpu.device.createCommandEncoder({ label: "pass" });
  for (let r = 0; r < reps; r++) {
    gpu.encode(enc, "pass", dispatches, {
      querySet,
      beginningOfPassWriteIndex: 2 * r,
      endOfPassWriteIndex: 2 * r + 1,
    });
  }
  enc.resolveQuerySet(querySet, 0, 2 * reps, resolve, 0);
  gpu.device.queue.submit([enc.finish()]);
  const t = new BigUint64Array(await gpu.read(resolve));
  querySet.destroy();
  resolve.destroy();
  const us = Array.from({ length: reps }, (_, r) => Number(t[2 * r + 1] - t[2 * r]) / 1000);
  return us.sort((a, b) => a - b)[Math.floor(reps / 2)];
}
