/**
 * The decode timeline (`Decoder.timeline`, engine/timeline.ts): the idle breakdown of crafted
 * spans, and a real generation's record (one span per cycle read, in order, host marks for every
 * submission and readback) with the output unchanged; and the decode loop's chunks that go in as
 * they are encoded: a generation cancelled at any round leaves the decoder as good as new.
 */
import assert from "@specdec/assert";
import { gpuTest } from "./harness.ts";
import { gpuPair, GREEDY, llama2c, QUIET } from "./fixtures.ts";
import { Decoder } from "../engine/decode.ts";
import type { Gpu } from "../engine/gpu.ts";
import { addIdle, chunkTimeline, idleBreakdown } from "../engine/timeline.ts";

Deno.test("idleBreakdown() splits wall time into cycles, gaps in and between chunks, outside", () => {
  const spans = [
    { chunk: 1, begin: 0, end: 1000 },
    { chunk: 1, begin: 1200, end: 2000 },
    { chunk: 2, begin: 5000, end: 6000 },
    { chunk: 3, begin: 6000, end: 6500 },
    { chunk: 3, begin: 6600, end: 7000 },
  ];
  const b = idleBreakdown(spans, 10);
  assert.equal(b.cycles, 5);
  assert.equal(b.chunks, 3);
  assert.ok(Math.abs(b.cyclesMs - 3.7) < 1e-9);
  assert.ok(Math.abs(b.inChunkMs - 0.3) < 1e-9);
  assert.ok(Math.abs(b.betweenChunksMs - 3) < 1e-9);
  assert.equal(b.chunkGaps, 2);
  assert.ok(Math.abs(b.maxChunkGapMs - 3) < 1e-9);
  assert.ok(Math.abs(b.outsideMs - 3) < 1e-9);
  // Every millisecond of the wall is in exactly one bucket.
  assert.ok(Math.abs(b.cyclesMs + b.inChunkMs + b.betweenChunksMs + b.outsideMs - 10) < 1e-9);
  const two = addIdle(b, idleBreakdown(spans.slice(0, 2), 4));
  assert.equal(two.cycles, 7);
  assert.ok(Math.abs(two.wallMs - 14) < 1e-9);
  assert.ok(Math.abs(two.maxChunkGapMs - 3) < 1e-9);
  assert.equal(idleBreakdown([], 5).outsideMs, 5);
});

Deno.test("chunkTimeline() puts the GPU spans on the host's clock, none before its submit", () => {
  const rows = chunkTimeline({
    cycles: [
      { chunk: 1, begin: 0, end: 900 },
      { chunk: 1, begin: 1000, end: 2000 },
      { chunk: 2, begin: 2000, end: 2500 }, // queued behind chunk 1
      { chunk: 3, begin: 6000, end: 7000 }, // found the GPU idle: starts at its submit
    ],
    host: [
      { chunk: 1, what: "encode", ms: 9 },
      { chunk: 1, what: "submit", ms: 10 },
      { chunk: 2, what: "submit", ms: 10.5 },
      { chunk: 3, what: "encode", ms: 12 },
      { chunk: 3, what: "submit", ms: 16.5 },
      { chunk: 3, what: "submit", ms: 16.9 }, // a later part of the same chunk
    ],
  });
  // Host minus GPU ms: chunk 1 10, chunk 2 10.5 - 2 = 8.5, chunk 3 16.5 - 6 = 10.5: the largest
  // puts chunk 3 at its submit mark and every chunk at or after its own.
  assert.deepEqual(rows.map((r) => r.chunk), [1, 2, 3]);
  assert.deepEqual(rows.map((r) => r.cycles), [2, 1, 1]);
  assert.deepEqual(rows.map((r) => r.submitMs), [10, 10.5, 16.5]);
  assert.deepEqual(rows.map((r) => r.encodeMs), [9, undefined, 12]);
  const near = (a: number, b: number) => assert.ok(Math.abs(a - b) < 1e-9, `${a} vs ${b}`);
  near(rows[0].beginMs, 10.5);
  near(rows[1].beginMs, 12.5);
  near(rows[2].beginMs, 16.5);
  near(rows[0].busyMs, 1.9);
  near(rows[0].gapMs, 0);
  near(rows[1].gapMs, 0);
  near(rows[2].gapMs, 3.5);
  assert.deepEqual(chunkTimeline({ cycles: [], host: [] }), []);
});

const PROMPT = [1, 403, 407, 261]; // BOS "Once upon a"

/** Runs `body` with a plain and a speculative decoder over the tiny pair (stories260K, llama2xs). */
async function eachTinyDecoder(
  gpu: Gpu,
  body: (dec: Decoder, kind: string) => Promise<void>,
): Promise<void> {
  const target = await llama2c("icppWorld-icpp_llm/stories260K.bin");
  const draft = await llama2c("saltyduckegg-llama2xs.c/model.bin");
  const { t, d, destroy } = await gpuPair(gpu, target, draft, 256);
  try {
    for (const spec of [{ kind: "none" } as const, { kind: "model", draft: d } as const]) {
      const dec = new Decoder(gpu, t, spec);
      try {
        await body(dec, spec.kind);
      } finally {
        dec.destroy();
      }
    }
  } finally {
    destroy();
  }
}

gpuTest("Decoder.timeline records every cycle read and the host's submissions", async (gpu) => {
  if (!gpu.features.timestamp) throw new Error("this test needs the timestamp-query feature");
  await eachTinyDecoder(gpu, async (dec) => {
    const plain = await dec.generate(PROMPT, 40, GREEDY, QUIET, 3);
    assert.equal(plain.timeline, undefined, "off by default");
    dec.timeline = true;
    const r = await dec.generate(PROMPT, 40, GREEDY, QUIET, 3);
    assert.deepEqual(r.tokens, plain.tokens);
    const tl = r.timeline!;
    // One span per cycle read: at least the committed ones (chunks may run past the stop).
    assert.ok(tl.cycles.length >= r.targetPasses, `${tl.cycles.length} < ${r.targetPasses}`);
    for (let i = 0; i < tl.cycles.length; i++) {
      const c = tl.cycles[i];
      assert.ok(c.chunk >= 1 && c.end >= c.begin, JSON.stringify(c));
      if (i > 0) {
        assert.ok(c.chunk >= tl.cycles[i - 1].chunk, "in submission order");
        assert.ok(c.begin >= tl.cycles[i - 1].end, "cycles run one after another");
      }
    }
    // Every chunk whose cycles were read was encoded and submitted; the prefill was mapped.
    for (const id of new Set(tl.cycles.map((c) => c.chunk))) {
      for (const what of ["encode", "submit"] as const) {
        assert.ok(tl.host.some((h) => h.chunk === id && h.what === what), `${what} ${id}`);
      }
    }
    assert.ok(tl.host.some((h) => h.chunk === 0 && h.what === "mapped"));
    // On one clock every chunk starts at or after it went in, one after another.
    for (const c of chunkTimeline(tl)) {
      assert.ok(c.beginMs >= c.submitMs! - 1e-6 && c.gapMs >= 0 && c.busyMs > 0);
    }
    const ms = tl.host.map((h) => h.ms);
    assert.deepEqual(ms, [...ms].sort((a, b) => a - b), "host marks in time order");
  });
});

gpuTest("a generation cancelled at any round leaves the decoder's next output unchanged", async (
  gpu,
) => {
  await eachTinyDecoder(gpu, async (dec, kind) => {
    const want = await dec.generate(PROMPT, 120, GREEDY, QUIET, 4);
    // Cancel after the first, second, ... readback: chunks in flight or being encoded then
    // (some already partly submitted) run on or are dropped; the next generation is unchanged.
    for (const after of [1, 2, 3]) {
      let reads = 0;
      const r = await dec.generate(PROMPT, 120, GREEDY, {
        onTokens: () => reads++,
        cancelled: () => reads >= after,
      }, 4);
      assert.ok(r.tokens.length <= want.tokens.length);
      assert.deepEqual(r.tokens, want.tokens.slice(0, r.tokens.length), "a prefix of the output");
      const again = await dec.generate(PROMPT, 120, GREEDY, QUIET, 4);
      assert.deepEqual(again.tokens, want.tokens, `${kind}, cancelled after ${after}`);
    }
  });
});
