/**
 * The serving benchmark: one process loads the model (and draft), starts the HTTP server on a
 * loopback port and measures N concurrent greedy streaming clients against one, side by side:
 * aggregate completion tok/s (and its ratio to a single stream), time to first token and the gap
 * between streamed events (p50/p99), with speculation off and on.
 *
 *   deno run -A bench/serve.ts --model DIR [--draft DIR] [--tokenizer F] [--streams 1,8]
 *                              [--tokens 64] [--reps 2] [--parallel N] [--draft-tokens K]
 *                              [--ctx C] [--kv q8]
 *                              [--out F] [--json]
 *
 * With `--parallel 1` (the default) the server decodes one request at a time, so N streams take
 * about N times as long as one: the ratio shows it. With `--parallel N` the engine batches up to
 * N streams per forward over a paged KV cache (engine/batch.ts): plain ones (spec none) and,
 * with a draft, greedy speculative ones (spec model, `--draft-tokens` k, default 4). `--ctx`
 * bounds the KV rows per sequence (the pool holds N of them). Batched rows also count the chunks
 * run, those that waited for everything to settle, and the host ms the GPU had nothing to run
 * (`BatchFigures`).
 */
import { parseArgs } from "@specdec/cli";
import { Engine } from "../engine/engine.ts";
import type { GenerateOptions, LoadOptions } from "../engine/protocol.ts";
import { compileChatTemplate, FALLBACK_CHAT_TEMPLATE } from "../models/chat_template.ts";
import { SpecdecServer } from "../serve/server.ts";

const PROMPTS = [
  "def read_config(path):\n",
  "import os\nimport sys\n\n\ndef main():\n",
  "class Cache:\n    def __init__(self, size):\n",
  "def fibonacci(n):\n",
  "def parse_args(argv):\n    parser = argparse.ArgumentParser(",
  "# Sort a list of dictionaries by key\ndef sort_by(items, key):\n",
  "def is_prime(n):\n    if n < 2:\n",
  "with open(path) as f:\n    for line in f:\n",
];

interface StreamResult {
  tokens: number;
  ttftMs: number;
  gapsMs: number[];
  endMs: number;
}

/** One streaming completion through the server; times measured by the client. */
async function stream(
  url: string,
  prompt: string,
  maxTokens: number,
  t0: number,
): Promise<StreamResult> {
  const res = await fetch(`${url}/v1/completions`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({
      prompt,
      max_tokens: maxTokens,
      temperature: 0,
      stream: true,
      stream_options: { include_usage: true },
    }),
  });
  if (!res.ok) throw new Error(`HTTP ${res.status}: ${await res.text()}`);
  const reader = res.body!.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "", tokens = 0, first = -1, last = -1;
  const gaps: number[] = [];
  while (true) {
    const { done, value } = await reader.read();
    if (done) break;
    buf += value;
    let i;
    while ((i = buf.indexOf("\n\n")) >= 0) {
      const ev = buf.slice(0, i).replace(/^data: /, "");
      buf = buf.slice(i + 2);
      if (ev === "[DONE]") continue;
      const msg = JSON.parse(ev);
      if (msg.error) throw new Error(msg.error.message);
      if (msg.usage) tokens = msg.usage.completion_tokens;
      if (msg.choices?.[0]?.text) {
        const now = performance.now();
        if (first < 0) first = now;
        else gaps.push(now - last);
        last = now;
      }
    }
  }
  return { tokens, ttftMs: first - t0, gapsMs: gaps, endMs: performance.now() - t0 };
}

function pct(xs: number[], p: number): number {
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor(p * s.length))];
}

/** Figures of N concurrent streams. */
interface Row {
  spec: string;
  /** Requests the server decodes at once (1 on the serial path). */
  slots: number;
  streams: number;
  tokens: number;
  wall_s: number;
  aggregate_tok_s: number;
  vs_single: number;
  ttft_p50_ms: number;
  ttft_p99_ms: number;
  gap_p50_ms: number;
  gap_p99_ms: number;
  /**
   * Batched only (else null), per rep: chunks run, those that waited for everything to settle
   * (not continuing behind one in flight), and the host ms the GPU had nothing to run.
   */
  chunks: number | null;
  waited_chunks: number | null;
  waited_ms: number | null;
}

if (import.meta.main) {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      model: { type: "string" },
      draft: { type: "string" },
      tokenizer: { type: "string" },
      streams: { type: "string", default: "1,8" },
      tokens: { type: "string", default: "64" },
      reps: { type: "string", default: "2" },
      parallel: { type: "string", default: "1" },
      "draft-tokens": { type: "string", default: "4" },
      ctx: { type: "string" },
      kv: { type: "string" },
      out: { type: "string" },
      json: { type: "boolean" },
    },
  });
  if (!values.model) throw new Error("--model is required");
  const counts = values.streams.split(",").map(Number);
  if (counts.some((n: number) => !Number.isInteger(n) || n < 1)) {
    throw new Error(`--streams wants counts like 1,8, got ${values.streams}`);
  }
  const maxTokens = Number(values.tokens), reps = Number(values.reps);
  const parallel = Number(values.parallel);
  if (!Number.isInteger(parallel) || parallel < 1) {
    throw new Error(`--parallel wants a count >= 1, got ${values.parallel}`);
  }
  const kv = values.kv as LoadOptions["kv"];
  if (kv !== undefined && !["f16", "f32", "q8"].includes(kv)) {
    throw new Error(`--kv must be f16, f32 or q8, got ${kv}`);
  }
  const engine = await Engine.load(
    {
      model: values.model,
      draft: values.draft,
      tokenizer: values.tokenizer,
      draftTokenizer: values.tokenizer,
      parallel,
      batchDraftTokens: Number(values["draft-tokens"]),
      maxSeq: values.ctx === undefined ? undefined : Number(values.ctx),
      kv,
    },
    (m) => console.error(m),
  );
  const specs: NonNullable<GenerateOptions["spec"]>[] = values.draft ? ["none", "model"] : ["none"];
  const rows: Row[] = [];
  try {
    for (const spec of specs) {
      const server = new SpecdecServer(engine, {
        modelId: "bench",
        chatTemplate: compileChatTemplate({ template: FALLBACK_CHAT_TEMPLATE, source: "fallback" }),
        queue: 1024,
        spec,
        draftTokens: Number(values["draft-tokens"]),
      });
      const http = Deno.serve(
        { hostname: "127.0.0.1", port: 0, onListen() {} },
        (r) => server.handle(r),
      );
      const url = `http://127.0.0.1:${http.addr.port}`;
      await stream(url, PROMPTS[0], 8, performance.now()); // warm-up: pipelines, first submits
      let single = NaN;
      for (const n of counts) {
        let best: Row | undefined;
        for (let rep = 0; rep < reps; rep++) {
          const before = await engine.batchLoad();
          const t0 = performance.now();
          const results = await Promise.all(
            Array.from(
              { length: n },
              (_, i) => stream(url, PROMPTS[i % PROMPTS.length], maxTokens, t0),
            ),
          );
          const wall = Math.max(...results.map((r) => r.endMs)) / 1000;
          const tokens = results.reduce((a, r) => a + r.tokens, 0);
          const ttft = results.map((r) => r.ttftMs);
          const gaps = results.flatMap((r) => r.gapsMs);
          const after = await engine.batchLoad();
          const d = (f: (b: NonNullable<typeof after>) => number) =>
            before && after ? f(after) - f(before) : null;
          const row: Row = {
            spec,
            slots: server.slots,
            streams: n,
            tokens,
            wall_s: wall,
            aggregate_tok_s: tokens / wall,
            vs_single: NaN,
            ttft_p50_ms: pct(ttft, 0.5),
            ttft_p99_ms: pct(ttft, 0.99),
            gap_p50_ms: pct(gaps, 0.5),
            gap_p99_ms: pct(gaps, 0.99),
            chunks: d((b) => b.chunks),
            waited_chunks: d((b) => b.chunks - b.continued),
            waited_ms: d((b) => b.waitedMs),
          };
          if (!best || row.aggregate_tok_s > best.aggregate_tok_s) best = row;
        }
        if (n === 1) single = best!.aggregate_tok_s;
        best!.vs_single = best!.aggregate_tok_s / single;
        rows.push(best!);
        console.error(`spec ${spec}, ${n} stream(s): ${best!.aggregate_tok_s.toFixed(1)} tok/s`);
      }
      await server.drain();
      await http.shutdown();
    }
  } finally {
    await engine.dispose();
  }
  const head = [
    "spec",
    "slots",
    "streams",
    "tokens",
    "wall s",
    "agg tok/s",
    "x single",
    "TTFT p50 ms",
    "TTFT p99 ms",
    "gap p50 ms",
    "gap p99 ms",
    "chunks",
    "waited",
    "GPU wait ms",
  ];
  const cells = [
    head,
    ...rows.map((r) => [
      r.spec,
      String(r.slots),
      String(r.streams),
      String(r.tokens),
      r.wall_s.toFixed(2),
      r.aggregate_tok_s.toFixed(1),
      Number.isNaN(r.vs_single) ? "-" : r.vs_single.toFixed(2),
      r.ttft_p50_ms.toFixed(1),
      r.ttft_p99_ms.toFixed(1),
      r.gap_p50_ms.toFixed(2),
      r.gap_p99_ms.toFixed(2),
      r.chunks === null ? "-" : String(r.chunks),
      r.waited_chunks === null ? "-" : String(r.waited_chunks),
      r.waited_ms === null ? "-" : r.waited_ms.toFixed(1),
    ]),
  ];
  const w = head.map((_, i) => Math.max(...cells.map((c) => c[i].length)));
  const text = cells.map((c) => c.map((x, i) => i ? x.padStart(w[i]) : x.padEnd(w[i])).join("  "))
    .join("\n");
  const report = {
    model: values.model,
    draft: values.draft ?? null,
    max_tokens: maxTokens,
    parallel,
    rows,
  };
  if (values.json) console.log(JSON.stringify(report));
  else {
    console.log(
      `serving ${values.model}${values.draft ? ` (draft ${values.draft})` : ""}, ` +
        `${maxTokens} greedy tokens per stream, best of ${reps}, --parallel ${parallel} ` +
        `("slots": requests decoding at once):`,
    );
    console.log(text);
  }
  if (values.out) await Deno.writeTextFile(values.out, JSON.stringify(report, null, 2));
}
