/**
 * The batched forward over a paged KV pool (models/llama_batch.ts) against the serial forward
 * (models/llama.ts) on real models: sequences of ragged lengths, scattered block tables, f16 and
 * q8 KV. Also the small kernels it adds (q/k/v split with RoPE, rows advance) against their
 * references.
 */
import assert from "@specdec/assert";
import { assertClose, gpuTest, randomArray } from "./harness.ts";
import { fixture, llama2c } from "./fixtures.ts";
import { WeightStore } from "../engine/weights.ts";
import { LlamaGpu } from "../models/llama.ts";
import { LlamaBatch } from "../models/llama_batch.ts";
import { loadHfFolder } from "../models/hf.ts";
import { SequenceBlocks } from "../engine/paged_kv.ts";
import { pagedRowsImage } from "../kernels/paged_attention.ts";
import { createPagedQkv, pagedQkvRef } from "../kernels/paged_qkv.ts";
import { createPagedAdvance, pagedAdvanceRef } from "../kernels/paged_advance.ts";
import { ropeInvFreq } from "../kernels/rope.ts";
import type { KvDType } from "../kernels/kv_write.ts";
import type { LoadedModel } from "../models/types.ts";
import type { Gpu } from "../engine/gpu.ts";

const S = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST;

for (const layout of ["interleaved", "rotate-half"] as const) {
  gpuTest(
    `createPagedQkv() splits q/k/v and turns each row by its own position (${layout})`,
    async (gpu) => {
      for (const [R, nHeads, nKv, hd] of [[1, 1, 1, 4], [3, 9, 3, 64], [7, 4, 2, 8]]) {
        const width = (nHeads + 2 * nKv) * hd;
        const qkv = randomArray(R * width, R * 31 + hd);
        const pos = Array.from({ length: R }, (_, r) => (r * 37 + 5) % 101);
        const invFreq = ropeInvFreq(hd, 10000);
        const bufs = {
          qkv: gpu.upload("t.qkv", qkv),
          q: gpu.buffer("t.q", R * nHeads * hd * 4, S),
          k: gpu.buffer("t.k", R * nKv * hd * 4, S),
          v: gpu.buffer("t.v", R * nKv * hd * 4, S),
          invFreq: gpu.upload("t.inv", invFreq),
          rows: gpu.upload("t.rows", pagedRowsImage(pos.map((p, r) => ({ seq: r, pos: p })))),
        };
        const d = await createPagedQkv(gpu, {
          label: "t.split",
          ...bufs,
          layout,
          R,
          nHeads,
          nKvHeads: nKv,
          headDim: hd,
        });
        await gpu.run("split", [d]);
        const want = pagedQkvRef(qkv, pos, nHeads, nKv, hd, invFreq, layout);
        const tol = { nmse: 1e-10, maxAbs: 1e-4 };
        for (const n of ["q", "k", "v"] as const) {
          const got = new Float32Array(await gpu.read(bufs[n]));
          assertClose(`${layout} R=${R} hd=${hd} ${n}`, got, want[n], tol);
        }
        for (const b of Object.values(bufs)) b.destroy();
      }
    },
  );
}

gpuTest(
  "createPagedAdvance() moves rows 0..R-1 one position on and leaves the rest",
  async (gpu) => {
    const image = pagedRowsImage([0, 1, 2, 3, 4].map((s) => ({ seq: s, pos: 10 * s })));
    const rows = gpu.upload("t.rows", image);
    await gpu.run("advance", [await createPagedAdvance(gpu, { label: "t.adv", rows, R: 3 })]);
    const want = image.slice();
    pagedAdvanceRef(want, 3);
    assert.deepEqual([...new Uint32Array(await gpu.read(rows))], [...want]);
    assert.deepEqual([...want].filter((_, i) => i % 2), [1, 11, 21, 30, 40]);
    rows.destroy();
  },
);

/** Logits of the serial forward after each of `seqs` (each from position 0), last row only. */
async function serialLogits(gpu: Gpu, m: LlamaGpu, seqs: number[][]): Promise<Float32Array[]> {
  const out: Float32Array[] = [];
  const V = m.config.vocabSize;
  for (const s of seqs) {
    const buf = gpu.upload("t.seq", new Uint32Array(s));
    m.setPosition(0);
    await gpu.run("serial", await m.plan(s.length, { buffer: buf, offset: 0 }, "last"));
    out.push(new Float32Array(await gpu.read(m.logits, 0, V * 4)));
    buf.destroy();
  }
  return out;
}

function argmax(a: Float32Array): number {
  let best = 0;
  for (let i = 1; i < a.length; i++) if (a[i] > a[best]) best = i;
  return best;
}

async function batchMatchesSerial(gpu: Gpu, model: LoadedModel, kv: KvDType, name: string) {
  const V = model.config.vocabSize;
  const store = new WeightStore(gpu);
  const m = await LlamaGpu.create(gpu, store, model, { label: "t", maxSeq: 64, kv });
  // Small blocks so every sequence spans several, taken from the pool in turns (scattered).
  const batch = await LlamaBatch.create(gpu, m, {
    maxSeqs: 3,
    maxSeqRows: 64,
    blockRows: 4,
    maxRows: 32,
  }, "t.batch");
  assert.equal(batch.layout.kv, kv);
  const lens = [5, 23, 12]; // ragged: a block boundary, several blocks, a partial block
  const seqs = lens.map((n, s) => Array.from({ length: n }, (_, i) => 1 + (i * 7 + s * 13) % 200));
  const want = await serialLogits(gpu, m, seqs);
  const tables = seqs.map(() => new SequenceBlocks(batch.pool));
  for (let row = 4; row <= 24; row += 4) {
    tables.forEach((t, s) => assert.ok(t.ensure(Math.min(row, lens[s]))));
  }
  tables.forEach((t, s) => batch.setTable(s, t.blocks));
  const flat = tables.flatMap((t) => t.blocks);
  assert.ok(flat.some((b, i) => i > 0 && b !== flat[i - 1] + 1), "tables are scattered");
  const tokens = gpu.buffer("t.tokens", 32 * 4, S);
  const rows = gpu.buffer("t.rows", 32 * 8, S);
  // Prefill all but the last token of each sequence, one pass per sequence (no logits)...
  for (let s = 0; s < 3; s++) {
    const n = lens[s] - 1;
    gpu.write(tokens, new Uint32Array(seqs[s].slice(0, n)));
    gpu.write(rows, pagedRowsImage(seqs[s].slice(0, n).map((_, i) => ({ seq: s, pos: i }))));
    await gpu.run(
      "prefill",
      await batch.plan(n, { tokens: { buffer: tokens, offset: 0 }, rows }, "none"),
    );
  }
  // ...then one step over the three last tokens at their own positions, logits for every row.
  gpu.write(tokens, new Uint32Array(seqs.map((s) => s[s.length - 1])));
  gpu.write(rows, pagedRowsImage(lens.map((n, s) => ({ seq: s, pos: n - 1 }))));
  await gpu.run(
    "step",
    await batch.plan(3, { tokens: { buffer: tokens, offset: 0 }, rows }, "all"),
  );
  const got = new Float32Array(await gpu.read(batch.logits, 0, 3 * V * 4));
  const tol = { nmse: 1e-5, maxAbs: 0.05 };
  for (let s = 0; s < 3; s++) {
    const row = got.subarray(s * V, (s + 1) * V);
    assertClose(`${name} ${kv} step row ${s} (length ${lens[s]})`, row, want[s], tol);
    assert.equal(argmax(row), argmax(want[s]), `${name} ${kv} row ${s} argmax`);
  }
  // A whole prompt as one prefill chunk ("last"): sequence 1 again into fresh blocks.
  tables[1].release();
  assert.ok(tables[1].ensure(lens[1]));
  batch.setTable(1, tables[1].blocks);
  gpu.write(tokens, new Uint32Array(seqs[1]));
  gpu.write(rows, pagedRowsImage(seqs[1].map((_, i) => ({ seq: 1, pos: i }))));
  await gpu.run(
    "chunk",
    await batch.plan(lens[1], { tokens: { buffer: tokens, offset: 0 }, rows }, "last"),
  );
  const chunk = new Float32Array(await gpu.read(batch.logits, 0, V * 4));
  assertClose(`${name} ${kv} prefill chunk`, chunk, want[1], tol);
  for (const t of tables) t.release();
  assert.equal(batch.pool.inUse, 0);
  tokens.destroy();
  rows.destroy();
  batch.destroy();
  m.destroy();
  store.destroy();
}

for (const kv of ["f16", "q8"] as const) {
  gpuTest(
    `batched forward logits equal per-sequence logits: stories260K, ${kv} KV`,
    async (gpu) => {
      await batchMatchesSerial(
        gpu,
        await llama2c("icppWorld-icpp_llm/stories260K.bin"),
        kv,
        "stories260K",
      );
    },
    { features: ["shader-f16"] },
  );
  gpuTest(
    `batched forward logits equal per-sequence logits: pycode draft, ${kv} KV`,
    async (gpu) => {
      const model = await loadHfFolder(await fixture("pycode-pair/draft"));
      await batchMatchesSerial(gpu, model, kv, "pycode draft");
    },
    { features: ["shader-f16"] },
  );
}
