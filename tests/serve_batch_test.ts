/**
 * The server with continuous batching (`--parallel 4`) end to end on lavapipe: concurrent
 * streams, one joining while the others run, each equal their single-stream greedy output from
 * the serial engine; the pool's blocks return to zero after all finish and after a client
 * disconnects mid-stream; the CLI starts with `--parallel` and says so.
 */
import assert from "@specdec/assert";
import { Engine } from "../engine/engine.ts";
import { compileChatTemplate, FALLBACK_CHAT_TEMPLATE } from "../models/chat_template.ts";
import { SpecdecServer } from "../serve/server.ts";
import { fixture } from "./fixtures.ts";
import { testGpu } from "./harness.ts";

const noGpu = typeof (await testGpu()) === "string";
const opts = { sanitizeOps: false, sanitizeResources: false, ignore: noGpu };

const PROMPTS = ["Once upon a time", "The cat", "Lily and Ben went to the park", "One day"];
const MAX = [40, 25, 50, 33];

/** The text of a streamed completion (server-sent events up to `data: [DONE]`). */
async function streamText(res: Response, onFirst?: () => Promise<void> | void): Promise<string> {
  const reader = res.body!.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "", text = "", first = true, done = false;
  while (!done) {
    const r = await reader.read();
    if (r.done) break;
    buf += r.value;
    let i;
    while ((i = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, i).replace(/^data: /, "");
      buf = buf.slice(i + 2);
      if (event === "[DONE]") {
        done = true;
        break;
      }
      text += JSON.parse(event).choices[0].text;
      if (first) {
        first = false;
        await onFirst?.();
      }
    }
  }
  await reader.cancel().catch(() => {});
  return text;
}

function stream(url: string, prompt: string, max: number, signal?: AbortSignal) {
  return fetch(`${url}/v1/completions`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ prompt, max_tokens: max, temperature: 0, stream: true }),
    signal,
  });
}

Deno.test({
  ...opts,
  name: "serve --parallel 4: concurrent streams equal their single-stream output; blocks return",
}, async () => {
  const stories = await fixture("icppWorld-icpp_llm/stories260K.bin");
  const tok512 = await fixture("icppWorld-icpp_llm/tok512.bin");
  // Single-stream references from the serial engine.
  const serial = await Engine.load({ model: stories, tokenizer: tok512, maxSeq: 128 });
  const want: string[] = [];
  for (let i = 0; i < 4; i++) {
    let text = "";
    const ids = await serial.tokenize(PROMPTS[i], true);
    for await (
      const c of serial.generate({ promptTokens: ids, maxTokens: MAX[i], temperature: 0 })
    ) {
      text += c.text;
    }
    want.push(text);
  }
  await serial.dispose();

  const engine = await Engine.load({ model: stories, tokenizer: tok512, maxSeq: 128, parallel: 4 });
  assert.equal(engine.info.parallel, 4);
  const server = new SpecdecServer(engine, {
    modelId: "tiny",
    chatTemplate: compileChatTemplate({ template: FALLBACK_CHAT_TEMPLATE, source: "fallback" }),
    queue: 16,
    spec: "none",
  });
  assert.equal(server.slots, 4);
  const http = Deno.serve(
    { hostname: "127.0.0.1", port: 0, onListen() {} },
    (r) => server.handle(r),
  );
  const url = `http://127.0.0.1:${http.addr.port}`;
  try {
    // Three start together; the fourth joins once the first is streaming.
    let peak = 0;
    const sample = async () => {
      peak = Math.max(peak, (await engine.batchLoad())!.active);
    };
    let late: Promise<string> | undefined;
    const texts = await Promise.all([0, 1, 2].map(async (i) => {
      const res = await stream(url, PROMPTS[i], MAX[i]);
      return await streamText(res, async () => {
        await sample();
        if (i === 0) late = stream(url, PROMPTS[3], MAX[3]).then((r) => streamText(r, sample));
      });
    }));
    texts.push(await late!);
    for (let i = 0; i < 4; i++) assert.equal(texts[i], want[i], `stream ${i}`);
    assert.ok(peak >= 2, `streams decoded together (at most ${peak} seen at once)`);
    const load = (await engine.batchLoad())!;
    const { chunks, continued, waitedMs, ...held } = load;
    assert.deepEqual({ ...held, blocks: 0 }, { active: 0, waiting: 0, blocksInUse: 0, blocks: 0 });
    assert.equal(load.blocks, 4 * 8, "4 contexts of 128 rows in 16-row blocks");
    assert.ok(chunks > 0 && continued <= chunks && waitedMs >= 0, JSON.stringify(load));

    // A client that disconnects mid-stream: its sequence leaves and its blocks return.
    const abort = new AbortController();
    const res = await stream(url, PROMPTS[0], 100, abort.signal);
    const reader = res.body!.getReader();
    await reader.read();
    assert.ok((await engine.batchLoad())!.blocksInUse > 0, "the stream holds blocks");
    abort.abort();
    await reader.closed.catch(() => {});
    const t0 = performance.now();
    // The blocks return in the worker and the server hears its stream end by message: the two
    // settle in either order.
    while ((await engine.batchLoad())!.blocksInUse > 0 || server.load.active > 0) {
      assert.ok(performance.now() - t0 < 10_000, "blocks returned after the disconnect");
      await new Promise((r) => setTimeout(r, 20));
    }
    assert.deepEqual(server.load, { active: 0, waiting: 0 });
    const health = await (await fetch(`${url}/health`)).json();
    assert.deepEqual(health, {
      status: "ok",
      active: 0,
      waiting: 0,
      kv_blocks: { in_use: 0, total: 32 },
    });
    // The server still serves afterwards.
    assert.equal(await streamText(await stream(url, PROMPTS[1], MAX[1])), want[1]);
  } finally {
    await server.drain();
    await http.shutdown();
    await engine.dispose();
  }
});

Deno.test({
  ...opts,
  name: "serve CLI --parallel 2: starts batched and answers",
}, async () => {
  const stories = await fixture("icppWorld-icpp_llm/stories260K.bin");
  const tok512 = await fixture("icppWorld-icpp_llm/tok512.bin");
  const mod = new URL("../mod.ts", import.meta.url).pathname;
  const args = ["run", "-A", mod, "serve", "--model", stories, "--tokenizer", tok512];
  const child = new Deno.Command(Deno.execPath(), {
    args: [...args, "--port", "0", "--ctx", "64", "--parallel", "2", "--kv", "q8"],
    stdout: "null",
    stderr: "piped",
  }).spawn();
  const lines = child.stderr.pipeThrough(new TextDecoderStream()).getReader();
  let log = "", url: string | undefined;
  try {
    while (!url) {
      const { done, value } = await lines.read();
      if (done) throw new Error(`serve exited before listening:\n${log}`);
      log += value;
      url = log.match(/on (http:\/\/[\d.]+:\d+)/)?.[1];
    }
    assert.match(log, /2 sequences batched/);
    assert.match(log, /paged KV pool: 8 blocks of 16 rows/);
    const texts = await Promise.all(
      [0, 1].map(async (i) => await streamText(await stream(url!, PROMPTS[i], 8))),
    );
    assert.ok(texts.every((t) => t.length > 0));
  } finally {
    child.kill("SIGINT");
  }
  while (!(await lines.read()).done) { /* drain */ }
  assert.equal((await child.status).code, 0, log);
});

Deno.test({
  ...opts,
  name: "serve --parallel 3 with a draft: greedy streams speculate together and equal plain greedy",
}, async () => {
  const stories = await fixture("icppWorld-icpp_llm/stories260K.bin");
  const tok512 = await fixture("icppWorld-icpp_llm/tok512.bin");
  const xs = await fixture("saltyduckegg-llama2xs.c/model.bin");
  const serial = await Engine.load({ model: stories, tokenizer: tok512, maxSeq: 128 });
  const want: string[] = [];
  for (let i = 0; i < 3; i++) {
    let text = "";
    const ids = await serial.tokenize(PROMPTS[i], true);
    for await (
      const c of serial.generate({ promptTokens: ids, maxTokens: MAX[i], temperature: 0 })
    ) {
      text += c.text;
    }
    want.push(text);
  }
  await serial.dispose();
  const engine = await Engine.load({
    model: stories,
    tokenizer: tok512,
    draft: xs,
    draftTokenizer: tok512,
    maxSeq: 128,
    parallel: 3,
    batchDraftTokens: 3,
  });
  const server = new SpecdecServer(engine, {
    modelId: "tiny",
    chatTemplate: compileChatTemplate({ template: FALLBACK_CHAT_TEMPLATE, source: "fallback" }),
    queue: 16,
    spec: "model",
    draftTokens: 3,
  });
  assert.equal(server.slots, 3);
  const http = Deno.serve(
    { hostname: "127.0.0.1", port: 0, onListen() {} },
    (r) => server.handle(r),
  );
  const url = `http://127.0.0.1:${http.addr.port}`;
  try {
    const texts = await Promise.all(
      [0, 1, 2].map(async (i) => await streamText(await stream(url, PROMPTS[i], MAX[i]))),
    );
    for (let i = 0; i < 3; i++) assert.equal(texts[i], want[i], `stream ${i}`);
    // Not streamed: the response carries the speculation figures.
    const res = await fetch(`${url}/v1/completions`, {
      method: "POST",
      body: JSON.stringify({ prompt: PROMPTS[0], max_tokens: MAX[0], temperature: 0 }),
    });
    const body = await res.json();
    assert.equal(body.choices[0].text, want[0]);
    assert.equal(body.specdec.spec, "model");
    assert.ok(body.specdec.acceptance_rate > 0 && body.specdec.tokens_per_pass > 1);
    assert.equal((await engine.batchLoad())!.blocksInUse, 0);
  } finally {
    await server.drain();
    await http.shutdown();
    await engine.dispose();
  }
});
