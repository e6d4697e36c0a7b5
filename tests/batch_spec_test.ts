/**
 * Batched greedy speculation (engine/batch.ts with a draft, kernels/batch_spec.ts): its kernels
 * against their references, and concurrent speculative sequences on real models (stories260K
 * target, llama2xs draft, same 512-token vocabulary) each equal the target's plain greedy output,
 * with drafts accepted and blocks returned.
 */
import assert from "@specdec/assert";
import { gpuTest } from "./harness.ts";
import { GREEDY, llama2c, QUIET } from "./fixtures.ts";
import { WeightStore } from "../engine/weights.ts";
import { LlamaGpu } from "../models/llama.ts";
import { LlamaBatch } from "../models/llama_batch.ts";
import { BatchDecoder, specBatchRows } from "../engine/batch.ts";
import { Decoder } from "../engine/decode.ts";
import type { Gpu } from "../engine/gpu.ts";
import {
  createSpecCommit,
  createSpecRows,
  specCommitRef,
  specRowsRef,
} from "../kernels/batch_spec.ts";

const S = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST;

gpuTest("createSpecRows() and createSpecCommit() match their references", async (gpu) => {
  for (const [R, k] of [[1, 1], [3, 4], [5, 2]]) {
    const seq = new Uint32Array(4 * R);
    for (let r = 0; r < R; r++) seq.set([R - 1 - r, 7 * r + 3, r % 2 ? 2 : 0, r], 4 * r);
    const verifyIn = Uint32Array.from({ length: (k + 1) * R }, (_, j) => (j * 5) % 11);
    // Target argmax: agree with the drafts for the first (r % (k + 1)) of each sequence.
    const tids = new Uint32Array((k + 1) * R);
    for (let r = 0; r < R; r++) {
      for (let i = 0; i <= k; i++) {
        tids[i * R + r] = i < r % (k + 1) ? verifyIn[(i + 1) * R + r] : 100 + i;
      }
    }
    const cap = 3 * (k + 1);
    const b = {
      seq: gpu.upload("t.seq", seq),
      verifyIn: gpu.upload("t.vin", verifyIn),
      tids: gpu.upload("t.tids", tids),
      out: gpu.upload("t.out", new Uint32Array(R * cap)),
      kRow: gpu.upload("t.krow", Uint32Array.from({ length: R }, (_, r) => r === 2 ? 0 : k)),
      drows: gpu.buffer("t.drows", R * 8, S),
      vrows: gpu.buffer("t.vrows", (k + 1) * R * 8, S),
    };
    await gpu.run("rows", [await createSpecRows(gpu, { label: "t.rows", ...b, R, k })]);
    const rows = specRowsRef(seq, R, k);
    assert.deepEqual([...new Uint32Array(await gpu.read(b.drows))], [...rows.drows]);
    assert.deepEqual([...new Uint32Array(await gpu.read(b.vrows))], [...rows.vrows]);
    await gpu.run("commit", [await createSpecCommit(gpu, { label: "t.c", ...b, R, k, cap })]);
    const want = { seq: seq.slice(), verifyIn: verifyIn.slice(), out: new Uint32Array(R * cap) };
    const kRow = Uint32Array.from({ length: R }, (_, r) => r === 2 ? 0 : k);
    specCommitRef(want.seq, want.verifyIn, tids, want.out, R, k, cap, kRow);
    for (const n of ["seq", "verifyIn", "out"] as const) {
      assert.deepEqual([...new Uint32Array(await gpu.read(b[n]))], [...want[n]], `R=${R} ${n}`);
    }
    // Sequence r accepted r % (k + 1) drafts (at most k): its position moved on by that + 1.
    for (let r = 0; r < R; r++) {
      const a = r === 2 ? 0 : Math.min(r % (k + 1), k); // row 2 does not speculate
      assert.equal(want.seq[4 * r + 1] - seq[4 * r + 1], a + 1);
    }
    for (const x of Object.values(b)) x.destroy();
  }
});

/**
 * The tiny pair batched for speculation: stories260K drafted by llama2xs, `maxSeqs` sequences of
 * `ctx` rows, k drafts per cycle, chunks of at most `maxSteps`; the serial decoder beside it.
 */
async function tinySpecBatch(gpu: Gpu, maxSeqs: number, ctx: number, k: number, maxSteps = 8) {
  const target = await llama2c("icppWorld-icpp_llm/stories260K.bin");
  const draftModel = await llama2c("saltyduckegg-llama2xs.c/model.bin");
  const store = new WeightStore(gpu);
  const t = await LlamaGpu.create(gpu, store, target, { label: "target", maxSeq: ctx });
  const d = await LlamaGpu.create(gpu, store, draftModel, { label: "draft", maxSeq: ctx });
  const rows = specBatchRows(maxSeqs, k);
  const tb = await LlamaBatch.create(gpu, t, {
    maxSeqs,
    maxSeqRows: ctx,
    maxRows: Math.max(64, rows),
    maxLogitRows: rows,
  });
  const db = await LlamaBatch.create(gpu, d, { maxSeqs, maxSeqRows: ctx }, "draft.batch");
  const sched = new BatchDecoder(gpu, tb, maxSteps, { draft: db, k });
  const serial = new Decoder(gpu, t);
  return {
    tb,
    sched,
    serial,
    destroy() {
      serial.destroy();
      sched.destroy();
      db.destroy();
      tb.destroy();
      t.destroy();
      d.destroy();
      store.destroy();
    },
  };
}

gpuTest(
  "batched speculation: speculative and plain sequences together equal their serial output",
  async (gpu) => {
    const k = 3;
    const { tb, sched, serial, destroy } = await tinySpecBatch(gpu, 4, 128, k);
    assert.equal(sched.draftTokens, k);
    const prompts = [[1, 403, 407, 261], [1, 320, 261, 498, 327, 289, 376], [1], [1, 57, 99, 300]];
    const lens = [60, 45, 100, 80];
    // Rows 1 and 2 speculate (greedy), row 3 decodes plainly greedy, row 0 plainly with sampling
    // (its sampler reads target row 0, as the joiners' first-token samplers do). Each equals its
    // serial output. The plain rows' verify rows past their blocks (rejected "drafts") must be
    // dropped: written into block 0 they corrupted another sequence (this test caught it).
    const sampling = [{ temperature: 0.8, topK: 40, topP: 0.95, seed: 7 }, GREEDY, GREEDY, GREEDY];
    const speculate = [false, true, true, false];
    const want = [];
    for (let i = 0; i < 4; i++) {
      want.push((await serial.generate(prompts[i], lens[i], sampling[i], QUIET)).tokens);
    }
    const run = async () => {
      const streamed: number[][] = prompts.map(() => []);
      const got = await Promise.all(prompts.map((prompt, i) =>
        sched.generate({
          prompt,
          maxTokens: lens[i],
          sampling: sampling[i],
          speculate: speculate[i],
          onTokens: (ids) => streamed[i].push(...ids),
        })
      ));
      got.forEach((r, i) => assert.deepEqual(streamed[i], r.tokens, `sequence ${i} streamed`));
      return got;
    };
    const got = await run();
    for (let i = 0; i < 4; i++) assert.deepEqual(got[i].tokens, want[i], `sequence ${i}`);
    assert.deepEqual((await run())[0].tokens, got[0].tokens, "sampled rows are reproducible");
    for (const i of [1, 2]) {
      assert.ok(got[i].accepted > 0, `sequence ${i}: drafts accepted`);
      assert.ok(got[i].steps < lens[i], `sequence ${i}: ${got[i].steps} passes < ${lens[i]}`);
    }
    for (const i of [0, 3]) assert.equal(got[i].accepted + got[i].proposed, 0, `sequence ${i}`);
    assert.equal(tb.pool.inUse, 0);
    assert.ok(sched.load.continued > 0, "chunks ran back to back");
    await assert.rejects(
      sched.generate({ prompt: [1], maxTokens: 4, sampling: { ...GREEDY, temperature: 1 } }),
      /greedy only/,
    );
    destroy();
  },
);

gpuTest(
  "batched speculation: chunks continue from the GPU's state past the all-accepted count",
  async (gpu) => {
    const k = 4;
    const { tb, sched, serial, destroy } = await tinySpecBatch(gpu, 2, 256, k);
    const prompt = [1, 403, 407, 261], n = 160;
    const want = (await serial.generate(prompt, n, GREEDY, QUIET)).tokens;
    const got = await sched.generate({ prompt, maxTokens: n, sampling: GREEDY });
    assert.deepEqual(got.tokens, want);
    // A cycle emits fewer than its k + 1 tokens (some drafts rejected), so counting every draft
    // as accepted runs out early: each chunk settled lowers the bound to the tokens now held
    // plus the chunk in flight at most, and the chunks keep going back to back.
    const perCycle = want.length / got.steps;
    assert.ok(perCycle < k + 1 - 1, `${perCycle.toFixed(2)} tokens per cycle: drafts rejected`);
    const { chunks, continued } = sched.load;
    assert.ok(
      chunks - continued <= 2,
      `${chunks - continued} of ${chunks} chunks waited to settle`,
    );
    assert.equal(tb.pool.inUse, 0);
    destroy();
  },
);
