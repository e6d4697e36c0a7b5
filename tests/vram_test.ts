/**
 * The VRAM planner against the buffers actually created: for several setups (weights as loaded,
 * quantized target and draft, 8-bit KV, a self-draft, a budget) the planner's bytes per category
 * equal what the session reports, and their sum equals every byte the device was asked for.
 */
import assert from "@specdec/assert";
import { gpuTest } from "./harness.ts";
import { fixture } from "./fixtures.ts";
import { Session } from "../engine/session.ts";
import type { GenerateOptions, LoadOptions } from "../engine/protocol.ts";
import { adapterFacts, formatBytes, parseBytes, vramTotal } from "../engine/vram.ts";
import { formatPlanTable, planConfigurations, type PlanRequest } from "../engine/planner.ts";
import { loadModel } from "../models/load.ts";
import { requestGpu } from "../engine/gpu.ts";
import { int8xAvailable, int8xSharedScratchBytes, matvecTuning } from "../kernels/matmul.ts";

const STORIES = "icppWorld-icpp_llm/stories260K.bin";
const TOK = "icppWorld-icpp_llm/tok512.bin";
const XS = "saltyduckegg-llama2xs.c/model.bin";

async function loadAndMeasure(
  opts: Partial<LoadOptions>,
  gen: Partial<GenerateOptions> = {},
): Promise<Session> {
  const session = await Session.load({
    model: await fixture(STORIES),
    tokenizer: await fixture(TOK),
    maxSeq: 96,
    ...opts,
  }, () => {});
  await session.generate(
    {
      promptTokens: [1, 403, 407, 261],
      maxTokens: 6,
      temperature: 0,
      topK: 0,
      topP: 1,
      seed: 0,
      ...gen,
    },
    () => {},
    () => false,
  );
  return session;
}

async function assertPlannedEqualsAllocated(
  opts: Partial<LoadOptions>,
  gen: Partial<GenerateOptions> = {},
): Promise<Session> {
  const session = await loadAndMeasure(opts, gen);
  try {
    assert.deepEqual(session.vram(), session.planned);
    assert.equal(vramTotal(session.vram()), session.allocatedBytes);
  } catch (e) {
    await session.dispose();
    throw e;
  }
  return session;
}

gpuTest("planner bytes equal the allocated bytes: weights as loaded, f16 KV", async () => {
  const s = await assertPlannedEqualsAllocated({});
  try {
    assert.equal(s.vram().draft_weights, 0);
    assert.ok(s.vram().target_weights > 0 && s.vram().kv_cache > 0);
  } finally {
    await s.dispose();
  }
}, { features: ["shader-f16"] });

gpuTest("planner bytes equal the allocated bytes: q8_0 target, q4_0 draft, 8-bit KV", async () => {
  const draft = await fixture(XS);
  const s = await assertPlannedEqualsAllocated({
    draft,
    quant: "q8_0",
    draftQuant: "q4_0",
    kv: "q8",
  }, { spec: "model", draftTokens: 3 });
  try {
    assert.equal(s.info().kv, "q8");
    assert.ok((s.info().formats.target.q8_0 ?? 0) > 0, JSON.stringify(s.info().formats));
    assert.ok((s.info().formats.draft?.q4_0 ?? 0) > 0, JSON.stringify(s.info().formats));
  } finally {
    await s.dispose();
  }
});

gpuTest(
  "planner bytes equal the allocated bytes: a q4_0 target's int8 scratch, one per model",
  async () => {
    // int8 activations on (the default for q4_0) and off: both plan what they allocate, and
    // they differ by exactly one scratch of min(maxT 128, 64) rows of the widest q4_0 product's
    // K (dim 64: ffn_down's K = 172 is no multiple of 32 and stays f16).
    const on = await assertPlannedEqualsAllocated({ quant: "q4_0" });
    const setting = matvecTuning.int8x;
    matvecTuning.int8x = false;
    let off;
    try {
      off = await assertPlannedEqualsAllocated({ quant: "q4_0" });
    } finally {
      matvecTuning.int8x = setting;
    }
    try {
      assert.ok((on.info().formats.target.q4_0 ?? 0) > 0, JSON.stringify(on.info().formats));
      const int8x = int8xSharedScratchBytes(128, int8xAvailable() ? 64 : 0);
      if (int8xAvailable()) assert.equal(int8x, 4096 + 64 * 3 * 8, "64 rows of int8 + meta");
      assert.equal(on.vram().scratch - off.vram().scratch, int8x);
      assert.equal(on.allocatedBytes - off.allocatedBytes, int8x);
    } finally {
      await on.dispose();
      await off.dispose();
    }
  },
);

gpuTest(
  "planner bytes equal the allocated bytes: nf4 self-draft shares the kept tensors",
  async () => {
    const s = await assertPlannedEqualsAllocated({ selfDraft: true, draftQuant: "nf4" }, {
      spec: "model",
      draftTokens: 2,
    });
    try {
      const v = s.vram();
      // The draft adds only its own 4-bit layers: embedding, norms and kept layers are shared.
      assert.ok(v.draft_weights > 0 && v.draft_weights < v.target_weights / 2, JSON.stringify(v));
    } finally {
      await s.dispose();
    }
  },
);

gpuTest(
  "generate --vram picks the planner's most precise fitting row and allocates exactly it",
  async () => {
    const target = await loadModel(await fixture(STORIES), { tokenizer: await fixture(TOK) });
    const gpu = await requestGpu();
    const req: PlanRequest = {
      target,
      ctx: 96,
      speculative: false,
      adapter: adapterFacts(gpu),
      f16: gpu.features.f16,
    };
    gpu.destroy();
    const all = await planConfigurations(req);
    assert.ok(all.length >= 6, formatPlanTable(all, req));
    // A budget just below the largest setup: the first row no longer fits, the next one is chosen.
    const budget = all[0].total - 1;
    const rows = await planConfigurations({ ...req, budget });
    const pick = rows.find((r) => r.chosen)!;
    assert.ok(pick && !rows[0].fits && pick.total <= budget, formatPlanTable(rows, req));
    const s = await assertPlannedEqualsAllocated({ vram: budget });
    try {
      assert.deepEqual(s.planned, pick.bytes);
      assert.equal(s.info().kv, pick.kv);
    } finally {
      await s.dispose();
    }
  },
);

gpuTest("a budget nothing fits is refused before allocation, with the table", async () => {
  await assert.rejects(
    Session.load({
      model: await fixture(STORIES),
      tokenizer: await fixture(TOK),
      maxSeq: 96,
      vram: 100_000,
    }, () => {}),
    (e: Error) => {
      assert.match(e.message, /nothing fits 97\.7 KiB at a context of 96/);
      assert.match(e.message, /longest ctx/);
      assert.match(e.message, /q4_0/);
      return true;
    },
  );
});

Deno.test("parseBytes reads decimal and binary units and rejects nonsense", () => {
  assert.equal(parseBytes("6GB"), 6e9);
  assert.equal(parseBytes("512MiB"), 512 * 2 ** 20);
  assert.equal(parseBytes("1.5 GiB"), 1.5 * 2 ** 30);
  assert.equal(parseBytes("123"), 123);
  assert.equal(parseBytes("2kb"), 2000);
  for (const bad of ["", "6 GX", "-1GB", "0", "GB", "1e9"]) {
    assert.throws(() => parseBytes(bad), RangeError, bad);
  }
  assert.equal(formatBytes(1536), "1.50 KiB");
  assert.equal(formatBytes(12), "12 B");
});
