/**
 * The main-thread API through the GPU worker: streaming, errors from inside the worker as
 * rejected promises with message and stack, cancellation, disposal.
 */
import assert from "@specdec/assert";
import { fixture, fixtureText } from "./fixtures.ts";
import { testGpu } from "./harness.ts";
import { Engine, WorkerError } from "../engine/engine.ts";

const noGpu = typeof (await testGpu()) === "string";
const stories = await fixture("icppWorld-icpp_llm/stories260K.bin");
const tok512 = await fixture("icppWorld-icpp_llm/tok512.bin");
const opts = { sanitizeOps: false, sanitizeResources: false, ignore: noGpu };

Deno.test({
  ...opts,
  name: "Engine streams the same greedy tokens the reference holds, with stats",
  async fn() {
    const ref = JSON.parse(await fixtureText("reference-outputs/tok512-greedy-reference.json"))
      .stories260K;
    const progress: string[] = [];
    const engine = await Engine.load(
      { model: stories, tokenizer: tok512 },
      (m) => progress.push(m),
    );
    assert.ok(progress.some((m) => m.includes("GPU:")), progress.join("\n"));
    const tokens: number[] = [];
    let text = "";
    for await (const c of engine.generate({ promptTokens: [1], maxTokens: 50, temperature: 0 })) {
      tokens.push(...c.tokens);
      text += c.text;
    }
    assert.deepEqual(tokens, ref.tokens.slice(1, 51));
    assert.ok(text.startsWith(ref.text.slice(0, 20).trimStart().slice(0, 10)), text);
    assert.equal(engine.lastStats?.generated_tokens, 50);
    assert.ok(engine.info.vram.kv_cache > 0 && engine.info.vram.target_weights > 0);
    await engine.dispose();
  },
});

Deno.test({
  ...opts,
  name: "errors inside the worker reject with their message and the worker's stack",
  async fn() {
    await assert.rejects(
      () => Engine.load({ model: "/nonexistent/model.bin" }),
      (e: Error) =>
        e instanceof WorkerError && /nonexistent/.test(e.message) &&
        /GPU worker/.test(e.stack ?? ""),
    );
    const engine = await Engine.load({ model: stories, tokenizer: tok512, maxSeq: 8 });
    await assert.rejects(async () => {
      for await (
        const _ of engine.generate({ promptTokens: [1, 2, 3, 4, 5, 6, 7, 8, 9], maxTokens: 4 })
      ) {
        // nothing
      }
    }, /context holds 8/);
    await assert.rejects(async () => {
      for await (const _ of engine.generate({ promptTokens: [1, 99999], maxTokens: 4 })) {
        // nothing
      }
    }, /outside \[0, 512\)/);
    await engine.dispose();
  },
});

Deno.test({
  ...opts,
  name: "aborting the signal stops generation early with stop reason 'cancelled'",
  async fn() {
    const engine = await Engine.load({ model: stories, tokenizer: tok512 });
    const abort = new AbortController();
    let n = 0;
    const gen = engine.generate(
      { promptTokens: [1], maxTokens: 400, temperature: 0 },
      abort.signal,
    );
    let r = await gen.next();
    while (!r.done) {
      n += r.value.tokens.length;
      if (n >= 5) abort.abort();
      r = await gen.next();
    }
    assert.equal(r.value.stop_reason, "cancelled");
    assert.ok(r.value.generated_tokens < 400);
    await engine.dispose();
  },
});

Deno.test({
  ...opts,
  name: "concurrent generate() calls take turns and each equals its run alone",
  async fn() {
    const engine = await Engine.load({ model: stories, tokenizer: tok512, maxSeq: 64 });
    try {
      const prompts = [[1], [1, 403], [1, 365, 304]];
      const run = async (p: number[]) => {
        const out: number[] = [];
        for await (const c of engine.generate({ promptTokens: p, maxTokens: 12, temperature: 0 })) {
          out.push(...c.tokens);
        }
        return out;
      };
      const alone: number[][] = [];
      for (const p of prompts) alone.push(await run(p));
      assert.deepEqual(await Promise.all(prompts.map(run)), alone);
    } finally {
      await engine.dispose();
    }
  },
});

Deno.test({
  ...opts,
  name: "tokenize() maps special-token strings to their ids and adds one BOS",
  async fn() {
    const engine = await Engine.load({ model: stories, tokenizer: tok512, maxSeq: 8 });
    try {
      const plain = await engine.tokenize("Hi there", false);
      const eosText = "</s>";
      const ids = await engine.tokenize(`<s>Hi there${eosText}Hi there`, true, ["<s>", "</s>"]);
      assert.deepEqual(ids, [1, ...plain, 2, ...plain]);
      // Without the specials list the same strings are text.
      const asText = await engine.tokenize("<s>Hi", true);
      assert.equal(asText[0], 1);
      assert.ok(asText.length > 1 + (await engine.tokenize("Hi", false)).length);
    } finally {
      await engine.dispose();
    }
  },
});
