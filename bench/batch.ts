/**
 * Where a batched decode step's GPU time goes (models/llama_batch.ts), beside the serial decode
 * forward (models/llama.ts) of the same model: every dispatch timed alone (GPU timestamps, summed
 * per op), and the whole forward timed as one pass, for each batch size R, with every row at a
 * context of `--ctx` rows.
 *
 *   deno run -A bench/batch.ts --model DIR|dummy:pycode-target [--rows 1,8] [--ctx 256]
 *                              [--json]
 *
 * `dummy:NAME` builds random f16 weights at one of bench/gpu.ts's dummy configurations.
 */
import { parseArgs } from "@specdec/cli";
import { requestGpu } from "../engine/gpu.ts";
import { WeightStore } from "../engine/weights.ts";
import { LlamaGpu } from "../models/llama.ts";
import { LlamaBatch } from "../models/llama_batch.ts";
import { loadModel } from "../models/load.ts";
import { readHfConfig } from "../models/hf.ts";
import { SequenceBlocks } from "../engine/paged_kv.ts";
import { pagedRowsImage } from "../kernels/paged_attention.ts";
import { sessionBatchShapes } from "../engine/batch.ts";
import { profileDispatches, timePass } from "./profile.ts";
import { DUMMY_CONFIGS } from "./gpu.ts";

if (import.meta.main) {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      model: { type: "string" },
      rows: { type: "string", default: "1,8" },
      ctx: { type: "string", default: "256" },
      json: { type: "boolean" },
    },
  });
  if (!values.model) throw new Error("--model is required (a model path or dummy:NAME)");
  const counts = values.rows.split(",").map(Number);
  if (counts.some((n: number) => !Number.isInteger(n) || n < 1 || n > 64)) {
    throw new Error(`--rows wants counts in [1, 64] like 1,8, got ${values.rows}`);
  }
  const ctx = Number(values.ctx);
  if (!Number.isInteger(ctx) || ctx < 1 || ctx > 1000) {
    throw new Error(`--ctx wants an integer in [1, 1000], got ${values.ctx}`);
  }
  const gpu = await requestGpu();
  if (!gpu.features.timestamp) throw new Error("bench/batch.ts needs the timestamp-query feature");
  const store = new WeightStore(gpu);
  let m: LlamaGpu;
  if (values.model.startsWith("dummy:")) {
    const name = values.model.slice(6), json = DUMMY_CONFIGS[name];
    if (!json) throw new Error(`${values.model}: unknown (known: ${Object.keys(DUMMY_CONFIGS)})`);
    const config = { ...readHfConfig(json, `${name} (dummy)`), eosIds: [] };
    m = await LlamaGpu.createRandom(gpu, store, config, "f16", { label: "target", maxSeq: 1024 });
  } else {
    const host = await loadModel(values.model);
    m = await LlamaGpu.create(gpu, store, host, { label: "target", maxSeq: 1024 });
  }
  const S = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_DST;
  const tokens = gpu.buffer("bench.tokens", 64 * 4, S);
  gpu.write(tokens, new Uint32Array(64).fill(100));
  const columns: { name: string; pass: number; ops: Map<string, [number, number]> }[] = [];
  const profile = async (name: string, d: Parameters<typeof timePass>[1], reset: () => void) => {
    reset();
    const ops = new Map<string, [number, number]>();
    for (const r of await profileDispatches(gpu, d, 5)) {
      ops.set(r.op.replace(/^batch\./, ""), [r.dispatches, r.us]);
    }
    reset();
    const pass = await timePass(gpu, d, 5);
    columns.push({ name, pass, ops });
    console.error(`${name}: ${d.length} dispatches, ${pass.toFixed(1)} µs as one pass`);
  };
  // The serial decode forward at position ctx (the plan advances it: reset before each timing).
  await profile(
    "serial T=1",
    await m.plan(1, { buffer: tokens, offset: 0 }, "last"),
    () => m.setPosition(ctx),
  );
  for (const R of counts) {
    const b = await LlamaBatch.create(gpu, m, sessionBatchShapes(R, 1024).target);
    for (let s = 0; s < R; s++) {
      const blocks = new SequenceBlocks(b.pool);
      if (!blocks.ensure(ctx + 1)) throw new Error(`the pool cannot hold ${R} x ${ctx + 1} rows`);
      b.setTable(s, blocks.blocks);
    }
    const rows = gpu.buffer("bench.rows", R * 8, S);
    gpu.write(rows, pagedRowsImage(Array.from({ length: R }, (_, s) => ({ seq: s, pos: ctx }))));
    await profile(
      `batch R=${R}`,
      await b.plan(R, { tokens: { buffer: tokens, offset: 0 }, rows }, "all"),
      () => {},
    );
    rows.destroy();
    b.destroy();
  }
  const opNames = [...new Set(columns.flatMap((c) => [...c.ops.keys()]))];
  const total = (c: (typeof columns)[number]) => [...c.ops.values()].reduce((a, o) => a + o[1], 0);
  opNames.sort((x, y) =>
    (columns.at(-1)!.ops.get(y)?.[1] ?? 0) - (columns.at(-1)!.ops.get(x)?.[1] ?? 0)
  );
  const cells = [
    ["op", ...columns.map((c) => `${c.name} µs (n)`)],
    ...opNames.map((op) => [
      op,
      ...columns.map((c) => {
        const o = c.ops.get(op);
        return o ? `${o[1].toFixed(1)} (${o[0]})` : "-";
      }),
    ]),
    ["sum, each dispatch alone", ...columns.map((c) => total(c).toFixed(1))],
    ["one pass", ...columns.map((c) => c.pass.toFixed(1))],
    [
      "one pass per row",
      ...columns.map((c, i) => (c.pass / (i === 0 ? 1 : counts[i - 1])).toFixed(1)),
    ],
  ];
  if (values.json) {
    console.log(JSON.stringify({
      model: values.model,
      ctx,
      columns: columns.map((c) => ({
        name: c.name,
        pass_us: c.pass,
        ops: Object.fromEntries(c.ops),
      })),
    }));
  } else {
    console.log(
      `GPU time of one decode forward, ${values.model}, context ${ctx} (timestamps, mean of 5):`,
    );
    const w = cells[0].map((_, i) => Math.max(...cells.map((r) => r[i].length)));
    for (const r of cells) {
      console.log(r.map((x, i) => (i ? x.padStart(w[i]) : x.padEnd(w[i]))).join("  "));
    }
  }
  store.destroy();
}
