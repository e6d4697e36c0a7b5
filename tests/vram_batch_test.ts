/**
 * The VRAM planner with batched decoding (`parallel` > 1): the paged KV pool, its activations
 * and the scheduler's buffers are planned to the byte the session allocates, and a budget that
 * holds the serial setup but not the pool is refused before allocation, naming --parallel.
 */
import assert from "@specdec/assert";
import { gpuTest } from "./harness.ts";
import { fixture } from "./fixtures.ts";
import { Session } from "../engine/session.ts";
import { adapterFacts, vramTotal } from "../engine/vram.ts";
import { planConfigurations, type PlanRequest } from "../engine/planner.ts";
import { loadModel } from "../models/load.ts";
import { requestGpu } from "../engine/gpu.ts";
import { decoderBytes } from "../engine/decode.ts";
import { llamaBatchSizes, resolveBatchShape } from "../models/llama_batch.ts";
import { int8xAvailable, int8xSharedScratchBytes, matvecTuning } from "../kernels/matmul.ts";

const STORIES = "icppWorld-icpp_llm/stories260K.bin";
const TOK = "icppWorld-icpp_llm/tok512.bin";

/** Greedy generation of `maxTokens` after a fixed 4-token prompt, through `s`. */
function greedy(s: Session, maxTokens: number) {
  const sampling = { temperature: 0, topK: 0, topP: 1, seed: 0 };
  return s.generate(
    { promptTokens: [1, 403, 407, 261], maxTokens, ...sampling },
    () => {},
    () => false,
  );
}

gpuTest(
  "planner bytes equal the allocated bytes with a paged pool (--parallel 3, q8 KV)",
  async (gpu) => { // the test device: the same adapter as the session's
    const s = await Session.load({
      model: await fixture(STORIES),
      tokenizer: await fixture(TOK),
      maxSeq: 96,
      parallel: 3,
      kv: "q8",
    }, () => {});
    try {
      const r = await greedy(s, 6);
      assert.equal(r.generated_tokens, 6);
      assert.equal(s.batchLoad()!.blocks, 3 * 6, "3 contexts of 96 rows in 16-row blocks");
      // Batched generations never build the serial decoder, which the plan keeps room for.
      const serialDecoder = decoderBytes(96, s.info().vocabSize, false, gpu.features.timestamp);
      assert.deepEqual(s.vram(), { ...s.planned, staging: s.planned.staging - serialDecoder });
      assert.equal(vramTotal(s.vram()), s.allocatedBytes);
      const c = (await loadModel(await fixture(STORIES), { tokenizer: await fixture(TOK) })).config;
      // The pool: K and V, [layers, 18 blocks * 16 rows, kv heads, headDim] int8 + f32 scales.
      const pool = 2 * c.nLayers * 18 * 16 * c.nKvHeads * (c.headDim + 4);
      const layout = resolveBatchShape({ maxSeqs: 3, maxSeqRows: 96 }, "q8");
      assert.equal(llamaBatchSizes(c, layout, 16384).kv, pool);
      assert.ok(s.vram().kv_cache > pool, "the serial cache stays beside the pool");
    } finally {
      await s.dispose();
    }
  },
);

gpuTest(
  "a budget that holds the serial setup but not the pool is refused, naming --parallel",
  async () => {
    const target = await loadModel(await fixture(STORIES), { tokenizer: await fixture(TOK) });
    const gpu = await requestGpu();
    const req: PlanRequest = {
      target,
      ctx: 96,
      kv: "f16",
      quant: "f16",
      speculative: false,
      adapter: adapterFacts(gpu),
      f16: gpu.features.f16,
    };
    gpu.destroy();
    const serial = (await planConfigurations(req))[0].total;
    const batched = (await planConfigurations({ ...req, parallel: 8 }))[0].total;
    assert.ok(batched > serial, `${batched} > ${serial}`);
    const budget = Math.floor((serial + batched) / 2);
    const opts = {
      model: await fixture(STORIES),
      tokenizer: await fixture(TOK),
      maxSeq: 96,
      kv: "f16" as const,
      quant: "f16" as const,
      vram: budget,
    };
    await assert.rejects(
      Session.load({ ...opts, parallel: 8 }, () => {}),
      /nothing fits .* at a context of 96 with a paged KV pool for 8 sequences \(--parallel\)/,
    );
    const s = await Session.load(opts, () => {}); // the same budget without the pool fits
    await s.dispose();
  },
  { features: ["shader-f16"] },
);

gpuTest(
  "planner bytes equal the allocated bytes with batched speculation (draft, --parallel 2)",
  async (gpu) => {
    const s = await Session.load({
      model: await fixture(STORIES),
      tokenizer: await fixture(TOK),
      draft: await fixture("saltyduckegg-llama2xs.c/model.bin"),
      draftTokenizer: await fixture(TOK),
      maxSeq: 96,
      parallel: 2,
      batchDraftTokens: 3,
    }, () => {});
    try {
      const r = await greedy(s, 20);
      assert.equal(r.spec, "model");
      assert.ok(r.accepted_tokens > 0 && r.tokens_per_pass > 1, JSON.stringify(r));
      const serialDecoder = decoderBytes(96, s.info().vocabSize, true, gpu.features.timestamp);
      assert.deepEqual(s.vram(), { ...s.planned, staging: s.planned.staging - serialDecoder });
      assert.equal(vramTotal(s.vram()), s.allocatedBytes);
    } finally {
      await s.dispose();
    }
  },
);

gpuTest(
  "planner bytes equal the allocated bytes with a q4_0 paged batch: its own int8 scratch counted",
  async (gpu) => {
    // The model's int8 scratch (min(maxT 128, 64) rows) and the batch's own (min(maxRows 64, 64)
    // rows), both of the widest q4_0 product's K = dim 64; with int8x off neither exists.
    const scratchOf = async () => {
      const s = await Session.load({
        model: await fixture(STORIES),
        tokenizer: await fixture(TOK),
        maxSeq: 96,
        parallel: 2,
        quant: "q4_0",
      }, () => {});
      try {
        const r = await greedy(s, 4);
        assert.equal(r.generated_tokens, 4);
        assert.ok((s.info().formats.target.q4_0 ?? 0) > 0, JSON.stringify(s.info().formats));
        const serialDecoder = decoderBytes(96, s.info().vocabSize, false, gpu.features.timestamp);
        assert.deepEqual(s.vram(), { ...s.planned, staging: s.planned.staging - serialDecoder });
        assert.equal(vramTotal(s.vram()), s.allocatedBytes);
        return s.vram().scratch;
      } finally {
        await s.dispose();
      }
    };
    const on = await scratchOf();
    const setting = matvecTuning.int8x;
    matvecTuning.int8x = false;
    const off = await scratchOf().finally(() => matvecTuning.int8x = setting);
    assert.equal(on - off, 2 * int8xSharedScratchBytes(64, int8xAvailable() ? 64 : 0));
  },
);
