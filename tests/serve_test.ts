/**
 * The HTTP server end to end on lavapipe: the official `openai` client against a live server
 * gets exactly the tokens `Engine.generate` gives (greedy) for completions and chat, streamed and
 * not; concurrent clients each get their own single-stream output; every error case answers an
 * OpenAI error object with the right status; a client that disconnects mid-stream frees the
 * engine for the next request; the CLI starts, serves and drains on SIGINT.
 */
import assert from "@specdec/assert";
import OpenAI from "openai";
import { Engine } from "../engine/engine.ts";
import type { GenerateOptions } from "../engine/protocol.ts";
import { compileChatTemplate, FALLBACK_CHAT_TEMPLATE } from "../models/chat_template.ts";
import { type ServerConfig, SpecdecServer } from "../serve/server.ts";
import { fixture } from "./fixtures.ts";
import { testGpu } from "./harness.ts";

const noGpu = typeof (await testGpu()) === "string";
const opts = { sanitizeOps: false, sanitizeResources: false, ignore: noGpu };

const MODEL_ID = "tiny";

interface Live {
  server: SpecdecServer;
  url: string;
  close(): Promise<void>;
}

function listen(engine: Engine, config: Partial<ServerConfig> = {}): Live {
  const server = new SpecdecServer(engine, {
    modelId: MODEL_ID,
    chatTemplate: compileChatTemplate({ template: FALLBACK_CHAT_TEMPLATE, source: "fallback" }),
    queue: 16,
    ...config,
  });
  const http = Deno.serve(
    { hostname: "127.0.0.1", port: 0, onListen() {} },
    (req) => server.handle(req),
  );
  return {
    server,
    url: `http://127.0.0.1:${http.addr.port}`,
    close: async () => {
      await server.drain();
      await http.shutdown();
    },
  };
}

/** Greedy tokens of `prompt` straight from the engine (what `generate --json` prints). */
async function reference(
  engine: Engine,
  prompt: number[],
  maxTokens: number,
  extra: Partial<GenerateOptions> = {},
): Promise<{ tokens: number[]; text: string }> {
  const tokens: number[] = [];
  let text = "";
  for await (
    const c of engine.generate({ promptTokens: prompt, maxTokens, temperature: 0, ...extra })
  ) {
    tokens.push(...c.tokens);
    text += c.text;
  }
  return { tokens, text };
}

async function post(url: string, body: unknown, headers: Record<string, string> = {}) {
  const res = await fetch(url, {
    method: "POST",
    headers: { "Content-Type": "application/json", ...headers },
    body: typeof body === "string" ? body : JSON.stringify(body),
  });
  return { status: res.status, headers: res.headers, body: await res.json() };
}

Deno.test({
  ...opts,
  name: "serve: the openai client gets generate's greedy tokens; errors; disconnects",
}, async (t) => {
  const stories = await fixture("icppWorld-icpp_llm/stories260K.bin");
  const tok512 = await fixture("icppWorld-icpp_llm/tok512.bin");
  const draftModel = await fixture("saltyduckegg-llama2xs.c/model.bin");
  const engine = await Engine.load({
    model: stories,
    tokenizer: tok512,
    draft: draftModel,
    draftTokenizer: tok512,
    maxSeq: 128,
  });
  const live = listen(engine, { apiKey: "sk-test", spec: "model", draftTokens: 4 });
  const client = new OpenAI({ baseURL: `${live.url}/v1`, apiKey: "sk-test", maxRetries: 0 });
  const auth = { Authorization: "Bearer sk-test" };
  try {
    const prompt = "Once upon a time";
    const ids = await engine.tokenize(prompt, true);
    const ref = await reference(engine, ids, 40);

    await t.step("completions, plain and streamed, equal the engine's greedy text", async () => {
      const r = await client.completions.create({
        model: MODEL_ID,
        prompt,
        max_tokens: 40,
        temperature: 0,
      });
      assert.equal(r.choices[0].text, ref.text);
      assert.equal(r.choices[0].finish_reason, "length");
      assert.deepEqual(r.usage, {
        prompt_tokens: ids.length,
        completion_tokens: 40,
        total_tokens: ids.length + 40,
      });
      const figures = (r as unknown as { specdec: Record<string, unknown> }).specdec;
      assert.equal(figures.spec, "model");
      assert.ok((figures.tokens_per_pass as number) >= 1);
      let streamed = "";
      let finish: string | null = null;
      const s = await client.completions.create({
        model: MODEL_ID,
        prompt,
        max_tokens: 40,
        temperature: 0,
        stream: true,
      });
      for await (const c of s) {
        streamed += c.choices[0]?.text ?? "";
        finish = c.choices[0]?.finish_reason ?? finish;
      }
      assert.equal(streamed, ref.text);
      assert.equal(finish, "length");
      // Token ids as the prompt give the same tokens as the text.
      const byIds = await client.completions.create({
        model: MODEL_ID,
        prompt: ids,
        max_tokens: 40,
        temperature: 0,
      });
      assert.equal(byIds.choices[0].text, ref.text);
    });

    await t.step("chat, plain and streamed, equals the engine on the rendered prompt", async () => {
      const messages = [{ role: "user" as const, content: "Tell me a story." }];
      const rendered = "user: Tell me a story.\nassistant:";
      const chatRef = await reference(engine, await engine.tokenize(rendered, true), 24);
      const r = await client.chat.completions.create({
        model: MODEL_ID,
        messages,
        max_tokens: 24,
        temperature: 0,
      });
      assert.equal(r.choices[0].message.role, "assistant");
      assert.equal(r.choices[0].message.content, chatRef.text);
      const s = await client.chat.completions.create({
        model: MODEL_ID,
        messages,
        max_tokens: 24,
        temperature: 0,
        stream: true,
        stream_options: { include_usage: true },
      });
      let streamed = "";
      let usage: unknown;
      for await (const c of s) {
        streamed += c.choices[0]?.delta?.content ?? "";
        if (c.usage) usage = c.usage;
      }
      assert.equal(streamed, chatRef.text);
      assert.deepEqual(usage, {
        prompt_tokens: r.usage!.prompt_tokens,
        completion_tokens: 24,
        total_tokens: r.usage!.prompt_tokens + 24,
      });
    });

    await t.step("a stop string ends the text before it, finish_reason stop", async () => {
      const cut = ref.text.indexOf(" ", 12);
      assert.ok(cut > 0, `the reference text has a space to stop at: ${ref.text}`);
      const stop = ref.text.slice(cut, cut + 3);
      const r = await client.completions.create({
        model: MODEL_ID,
        prompt,
        max_tokens: 40,
        temperature: 0,
        stop: [stop],
      });
      assert.equal(r.choices[0].text, ref.text.slice(0, ref.text.indexOf(stop)));
      assert.equal(r.choices[0].finish_reason, "stop");
    });

    await t.step("concurrent streams each get their own single-stream output", async () => {
      const prompts = ["Once upon a time", "The cat", "Lily had a", "One day, Tom"];
      const refs: string[] = []; // one after another, as a single stream each
      for (const p of prompts) {
        refs.push((await reference(engine, await engine.tokenize(p, true), 20)).text);
      }
      const outs = await Promise.all(prompts.map(async (p) => {
        const s = await client.completions.create({
          model: MODEL_ID,
          prompt: p,
          max_tokens: 20,
          temperature: 0,
          stream: true,
        });
        let text = "";
        for await (const c of s) text += c.choices[0]?.text ?? "";
        return text;
      }));
      assert.deepEqual(outs, refs);
      assert.deepEqual(live.server.load, { active: 0, waiting: 0 });
    });

    await t.step("every bad request gets an OpenAI error naming the problem", async () => {
      const u = `${live.url}/v1/completions`;
      const noKey = await post(u, { prompt: "a" });
      assert.equal(noKey.status, 401);
      assert.equal(noKey.body.error.code, "invalid_api_key");
      assert.equal((await post(u, { prompt: "a" }, { Authorization: "Bearer nope" })).status, 401);
      const cases: [unknown, number, string | null, string | null][] = [
        ["{not json", 400, null, null],
        [[1, 2], 400, null, null],
        [{ prompt: "a", max_tokens: -1 }, 400, "max_tokens", null],
        [{ prompt: "a", temperature: "warm" }, 400, "temperature", null],
        [{ prompt: "a", stop: 5 }, 400, "stop", null],
        [{ prompt: [1, 99999] }, 400, "prompt", null],
        [{ prompt: "a", model: "gpt-4" }, 404, "model", "model_not_found"],
        [{ prompt: "a", max_tokens: 1000 }, 400, "max_tokens", "context_length_exceeded"],
        [{ prompt: "word ".repeat(200) }, 400, "prompt", "context_length_exceeded"],
      ];
      for (const [body, status, param, code] of cases) {
        const r = await post(u, body, auth);
        const label = JSON.stringify(body).slice(0, 60);
        assert.equal(r.status, status, label);
        assert.equal(typeof r.body.error.message, "string", label);
        assert.equal(r.body.error.param, param, label);
        assert.equal(r.body.error.code, code, label);
      }
      const chat = await post(`${live.url}/v1/chat/completions`, { messages: [] }, auth);
      assert.equal(chat.status, 400);
      assert.equal(chat.body.error.param, "messages");
      const big = await post(u, { prompt: "x".repeat(5 << 20) }, auth);
      assert.equal(big.status, 413);
      const notFound = await fetch(`${live.url}/v2/nothing`, { headers: auth });
      assert.equal(notFound.status, 404);
      await notFound.body?.cancel();
      const wrongMethod = await fetch(u, { headers: auth });
      assert.equal(wrongMethod.status, 405);
      await wrongMethod.body?.cancel();
      // The openai client surfaces them as its typed errors.
      await assert.rejects(
        () => client.completions.create({ model: "other", prompt: "a" }),
        (e: unknown) => e instanceof OpenAI.NotFoundError,
      );
      const health = await fetch(`${live.url}/health`); // no key needed
      assert.deepEqual(await health.json(), { status: "ok", active: 0, waiting: 0 });
      const models = await client.models.list();
      assert.deepEqual(models.data.map((m) => m.id), [MODEL_ID]);
    });

    await t.step("random bodies never crash the server; it answers each with JSON", async () => {
      let seed = 12345;
      const rnd = () => (seed = (seed * 1103515245 + 12345) >>> 0) / 2 ** 32;
      const pick = <T>(xs: T[]) => xs[Math.floor(rnd() * xs.length)];
      const values: unknown[] = [
        null,
        true,
        -1,
        0,
        1,
        2.5,
        1e308,
        -0,
        "",
        "x",
        "Once",
        [],
        [1],
        ["a"],
        [1, "a"],
        {},
        { text: 1 },
        [{ role: "user", content: "hi" }],
        [{ role: "robot", content: "hi" }],
        [{ role: "user", content: [{ type: "image_url" }] }],
      ];
      const keys = [
        "prompt",
        "messages",
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "stop",
        "stream",
        "n",
        "model",
        "stream_options",
        "max_completion_tokens",
      ];
      const seen = new Map<number, number>();
      for (let i = 0; i < 150; i++) {
        const body: Record<string, unknown> = {};
        const path = rnd() < 0.5 ? "/v1/completions" : "/v1/chat/completions";
        if (path === "/v1/completions") body.prompt = "Once";
        else body.messages = [{ role: "user", content: "hi" }];
        for (let k = Math.floor(rnd() * 4); k > 0; k--) body[pick(keys)] = pick(values);
        if (body.max_tokens === undefined || rnd() < 0.7) body.max_tokens = 2;
        body.stream = false;
        const res = await live.server.handle(
          new Request(`${live.url}${path}`, {
            method: "POST",
            headers: auth,
            body: rnd() < 0.1 ? JSON.stringify(body).slice(0, -3) : JSON.stringify(body),
          }),
        );
        const label = `${path} ${JSON.stringify(body)}`;
        assert.ok([200, 400, 404].includes(res.status), `${res.status}: ${label}`);
        const out = await res.json();
        if (res.status === 200) assert.ok(Array.isArray(out.choices), label);
        else assert.equal(typeof out.error.message, "string", label);
        seen.set(res.status, (seen.get(res.status) ?? 0) + 1);
      }
      assert.ok((seen.get(200) ?? 0) > 5 && (seen.get(400) ?? 0) > 5, JSON.stringify([...seen]));
      assert.deepEqual(live.server.load, { active: 0, waiting: 0 });
    });

    await t.step("a client that disconnects mid-stream frees the engine", async () => {
      const abort = new AbortController();
      const res = await fetch(`${live.url}/v1/completions`, {
        method: "POST",
        headers: { "Content-Type": "application/json", ...auth },
        body: JSON.stringify({ prompt, max_tokens: 120, temperature: 0, stream: true }),
        signal: abort.signal,
      });
      const reader = res.body!.getReader();
      await reader.read(); // the first event arrived: generation is running
      abort.abort();
      await reader.closed.catch(() => {});
      for (let i = 0; i < 100 && live.server.load.active > 0; i++) {
        await new Promise((r) => setTimeout(r, 50));
      }
      assert.deepEqual(live.server.load, { active: 0, waiting: 0 });
      const r = await client.completions.create({
        model: MODEL_ID,
        prompt,
        max_tokens: 40,
        temperature: 0,
      });
      assert.equal(r.choices[0].text, ref.text);
    });
  } finally {
    await live.close();
    await engine.dispose();
  }
});

Deno.test({
  ...opts,
  name: "serve: past --queue waiting requests a request gets 503 with Retry-After",
}, async () => {
  const stories = await fixture("icppWorld-icpp_llm/stories260K.bin");
  const tok512 = await fixture("icppWorld-icpp_llm/tok512.bin");
  const engine = await Engine.load({ model: stories, tokenizer: tok512, maxSeq: 256 });
  const live = listen(engine, { queue: 0 });
  try {
    const u = `${live.url}/v1/completions`;
    const long = fetch(u, {
      method: "POST",
      body: JSON.stringify({ prompt: "Once", max_tokens: 200, temperature: 0, stream: true }),
    });
    const first = await long;
    const reader = first.body!.getReader();
    await reader.read(); // it is decoding now
    const refused = await post(u, { prompt: "Once", max_tokens: 4 });
    assert.equal(refused.status, 503);
    assert.equal(refused.headers.get("retry-after"), "1");
    assert.equal(refused.body.error.code, "server_busy");
    while (!(await reader.read()).done) { /* let it finish */ }
    const ok = await post(u, { prompt: "Once", max_tokens: 4, temperature: 0 });
    assert.equal(ok.status, 200);
    assert.equal(ok.body.usage.completion_tokens, 4);
  } finally {
    await live.close();
    await engine.dispose();
  }
});

Deno.test({
  ...opts,
  name: "serve CLI: starts, answers curl-style requests, drains on SIGINT, refuses bad flags",
}, async () => {
  const stories = await fixture("icppWorld-icpp_llm/stories260K.bin");
  const tok512 = await fixture("icppWorld-icpp_llm/tok512.bin");
  const mod = new URL("../mod.ts", import.meta.url).pathname;
  const bad = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", mod, "serve", "--model", stories, "--port", "70000"],
    stdout: "piped",
    stderr: "piped",
  }).output();
  assert.equal(bad.code, 2);
  assert.match(new TextDecoder().decode(bad.stderr), /--port must be in \[0, 65535\]/);

  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", mod, "serve", "--model", stories, "--tokenizer", tok512, "--port", "0"],
    stdout: "null",
    stderr: "piped",
  }).spawn();
  const lines = child.stderr.pipeThrough(new TextDecoderStream()).getReader();
  let log = "";
  let url: string | undefined;
  try {
    while (!url) {
      const { done, value } = await lines.read();
      if (done) throw new Error(`serve exited before listening:\n${log}`);
      log += value;
      url = log.match(/on (http:\/\/[\d.]+:\d+)/)?.[1];
    }
    const r = await post(`${url}/v1/completions`, {
      model: "stories260K.bin",
      prompt: "Once upon a time",
      max_tokens: 8,
      temperature: 0,
    });
    assert.equal(r.status, 200, JSON.stringify(r.body));
    assert.equal(r.body.usage.completion_tokens, 8);
  } finally {
    child.kill("SIGINT");
  }
  while (true) {
    const { done, value } = await lines.read();
    if (done) break;
    log += value;
  }
  const status = await child.status;
  assert.equal(status.code, 0, log);
  assert.match(log, /stopping: finishing 0 admitted request/);
  assert.match(log, /\nstopped\n/);
});
