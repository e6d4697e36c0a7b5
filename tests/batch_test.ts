/**
 * Continuous batching (engine/batch.ts) on a real model: concurrent sequences each equal their
 * serial (engine/decode.ts) output, greedy and seeded; a request joins while others run; a
 * cancelled one leaves; blocks return to the pool; a request short of blocks waits its turn.
 */
import assert from "@specdec/assert";
import { gpuTest } from "./harness.ts";
import { GREEDY, llama2c, QUIET } from "./fixtures.ts";
import { WeightStore } from "../engine/weights.ts";
import { LlamaGpu } from "../models/llama.ts";
import { LlamaBatch, type LlamaBatchShape } from "../models/llama_batch.ts";
import { BatchDecoder } from "../engine/batch.ts";
import { Decoder, type SamplingSettings } from "../engine/decode.ts";
import type { Gpu } from "../engine/gpu.ts";

const CTX = 128;

async function setup(
  gpu: Gpu,
  shape: Partial<LlamaBatchShape> = {},
  maxSteps?: number,
  eosIds?: number[],
) {
  let model = await llama2c("icppWorld-icpp_llm/stories260K.bin");
  if (eosIds) model = { ...model, config: { ...model.config, eosIds } };
  const store = new WeightStore(gpu);
  const m = await LlamaGpu.create(gpu, store, model, { label: "t", maxSeq: CTX });
  const batch = await LlamaBatch.create(gpu, m, { maxSeqs: 4, maxSeqRows: CTX, ...shape });
  const sched = new BatchDecoder(gpu, batch, maxSteps);
  const serial = new Decoder(gpu, m);
  return {
    batch,
    sched,
    /** The serial decoder's output for the same request. */
    async reference(prompt: number[], n: number, s: SamplingSettings = GREEDY) {
      return (await serial.generate(prompt, n, s, QUIET)).tokens;
    },
    destroy() {
      serial.destroy();
      sched.destroy();
      batch.destroy();
      m.destroy();
      store.destroy();
    },
  };
}

// Ragged prompts (stories260K ids < 512; 1 = BOS), one longer than a 16-row block.
const PROMPTS = [
  [1, 403, 407, 261],
  [1, 320, 261, 498, 327, 289, 376],
  [1],
  [1, 57, 99, 300, 301, 302, 120, 121, 122, 410, 411, 200, 201, 202, 203, 204, 205, 9],
];

gpuTest(
  "4 concurrent greedy sequences each equal their serial output; blocks return",
  async (gpu) => {
    const t = await setup(gpu);
    const lens = [40, 23, 57, 9];
    const want = [];
    for (let i = 0; i < 4; i++) want.push(await t.reference(PROMPTS[i], lens[i]));
    let peak = 0;
    const streamed: number[][] = PROMPTS.map(() => []);
    const got = await Promise.all(PROMPTS.map((prompt, i) =>
      t.sched.generate({
        prompt,
        maxTokens: lens[i],
        sampling: GREEDY,
        onTokens: (ids) => {
          streamed[i].push(...ids);
          peak = Math.max(peak, t.sched.load.active);
        },
      })
    ));
    assert.equal(peak, 4, "all four decoded together");
    assert.ok(t.sched.load.continued > 0, "chunks ran back to back (pipelined)");
    for (let i = 0; i < 4; i++) {
      assert.deepEqual(got[i].tokens, want[i], `sequence ${i}`);
      assert.deepEqual(streamed[i], want[i], `sequence ${i} streamed`);
      assert.equal(got[i].stop, want[i].length < lens[i] ? "eos" : "max-tokens");
    }
    assert.equal(t.sched.load.blocksInUse, 0);
    assert.equal(t.batch.pool.inUse, 0);
    t.destroy();
  },
);

gpuTest("batched sampling with a seed follows the serial sampler's draws", async (gpu) => {
  const t = await setup(gpu);
  const settings = [
    { temperature: 0.8, topK: 40, topP: 0.95, seed: 7 },
    { temperature: 1, topK: 0, topP: 1, seed: 123 },
    GREEDY,
  ];
  const want = [];
  for (let i = 0; i < 3; i++) want.push(await t.reference(PROMPTS[i], 30, settings[i]));
  const got = await Promise.all(
    settings.map((sampling, i) =>
      t.sched.generate({ prompt: PROMPTS[i], maxTokens: 30, sampling })
    ),
  );
  for (let i = 0; i < 3; i++) assert.deepEqual(got[i].tokens, want[i], `sequence ${i}`);
  assert.notDeepEqual(got[0].tokens, got[2].tokens.slice(0, got[0].tokens.length));
  t.destroy();
});

gpuTest("a request joins while others decode, and a cancelled one leaves at once", async (gpu) => {
  const t = await setup(gpu, {}, 4); // short chunks: several joins and leaves per run
  const want = await t.reference(PROMPTS[1], 30);
  let cancel = false, joined: Promise<{ tokens: number[] }> | undefined, activeAtJoin = 0;
  const long = t.sched.generate({
    prompt: PROMPTS[0],
    maxTokens: 100,
    sampling: GREEDY,
    cancelled: () => cancel,
    onTokens: () => {
      if (!joined) {
        activeAtJoin = t.sched.load.active;
        joined = t.sched.generate({
          prompt: PROMPTS[1],
          maxTokens: 30,
          sampling: GREEDY,
          onTokens: () => cancel = true, // the long one stops once the joiner streams
        });
      }
    },
  });
  const a = await long;
  assert.equal(activeAtJoin, 1);
  assert.equal(a.stop, "cancelled");
  assert.ok(a.tokens.length < 100, `cancelled after ${a.tokens.length} tokens`);
  const b = await joined!;
  assert.deepEqual(b.tokens, want, "the joiner's output is its serial output");
  assert.equal(t.sched.load.blocksInUse, 0);
  t.destroy();
});

gpuTest("a request the pool cannot hold yet waits, then runs when blocks return", async (gpu) => {
  // 10 blocks of 16 rows: two sequences of 4 + 60 tokens (4 blocks each) fit, a third waits.
  const t = await setup(gpu, { numBlocks: 10 });
  const want = await t.reference(PROMPTS[0], 60);
  const seen: string[] = []; // (active, waiting) whenever tokens arrive
  const runs = [0, 1, 2].map(() =>
    t.sched.generate({
      prompt: PROMPTS[0],
      maxTokens: 60,
      sampling: GREEDY,
      onTokens: () => {
        seen.push(`${t.sched.load.active},${t.sched.load.waiting}`);
        assert.ok(t.batch.pool.inUse <= 10);
      },
    })
  );
  const got = await Promise.all(runs);
  assert.ok(seen.includes("2,1"), `two decode while the third waits: ${seen}`);
  assert.ok(!seen.some((x) => x.startsWith("3")), "never three at once");
  for (const r of got) assert.deepEqual(r.tokens, want);
  assert.ok(got[2].queueMs > 0);
  assert.equal(t.batch.pool.inUse, 0);
  await assert.rejects(
    t.sched.generate({ prompt: PROMPTS[0], maxTokens: 0, sampling: GREEDY }),
    /maxTokens must be an integer >= 1/,
  );
  await assert.rejects(
    t.sched.generate({ prompt: [], maxTokens: 5, sampling: GREEDY }),
    /at least one token/,
  );
  t.destroy();
});

gpuTest("a sequence stopping at EOS mid-chunk leaves while the others run on", async (gpu) => {
  // stories260K never emits its EOS within these lengths: call a token it does emit "EOS".
  const plain = await setup(gpu);
  const free = await plain.reference(PROMPTS[1], 60);
  plain.destroy();
  const eos = free[20];
  const t = await setup(gpu, {}, 8, [eos]);
  const want = [];
  for (let i = 0; i < 4; i++) want.push(await t.reference(PROMPTS[i], 60));
  assert.ok(want[1].length <= 21 && want[1].at(-1) === eos, "the serial run stops at it");
  const got = await Promise.all(
    PROMPTS.map((prompt) => t.sched.generate({ prompt, maxTokens: 60, sampling: GREEDY })),
  );
  for (let i = 0; i < 4; i++) {
    assert.deepEqual(got[i].tokens, want[i], `sequence ${i}`);
    assert.equal(got[i].stop, want[i].length < 60 ? "eos" : "max-tokens");
  }
  assert.equal(got[1].stop, "eos");
  assert.ok(t.sched.load.continued > 0);
  assert.equal(t.batch.pool.inUse, 0);
  t.destroy();
});
