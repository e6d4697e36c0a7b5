/**
 * Perplexity and KL measurement (engine/perplexity.ts) on the tiny llama2.c models: the GPU
 * numbers must equal an independent CPU computation (models/llama_ref.ts, a fresh cache per
 * window, log-softmax in f64 here), a model against itself must show no divergence, and two
 * different models must show a real one. Also the window splitting, the argument errors, and the
 * held-out code text that the pycode quality checks run on.
 */
import assert from "@specdec/assert";
import { gpuTest } from "./harness.ts";
import { fixture } from "./fixtures.ts";
import { WeightStore } from "../engine/weights.ts";
import { LlamaGpu, type LlamaGpuOptions } from "../models/llama.ts";
import { LlamaRef } from "../models/llama_ref.ts";
import { loadModel } from "../models/load.ts";
import { loadTokenizerFile } from "../models/tokenizer.ts";
import { tensorToF32 } from "../models/convert.ts";
import type { LoadedModel } from "../models/types.ts";
import type { Gpu } from "../engine/gpu.ts";
import { perplexity, PERPLEXITY_DEFINITION, perplexityTokens } from "../engine/perplexity.ts";

// 151 tok512 tokens with BOS: windows of 64, 64 and 23 tokens at ctx 64.
const STORY = "Once upon a time, there was a little dog named Max. Max liked to run in the big " +
  "green park with his friend Sue. One day, Sue found a red ball under a tree. She threw the " +
  "ball and Max ran very fast to get it. Max was happy and wagged his tail. Then it started to " +
  "rain, so they went home and had warm milk. Mom gave them a big hug and said they were good " +
  "friends.";
const CTX = 64;

interface Tiny {
  stories: LoadedModel;
  xs: LoadedModel;
  tokens: number[];
}

let tinyPromise: Promise<Tiny> | undefined;

/** stories260K and llama2xs with the shared tok512 tokenizer, and STORY's ids with BOS. */
function tiny(): Promise<Tiny> {
  tinyPromise ??= (async () => {
    const tokenizer = await fixture("icppWorld-icpp_llm/tok512.bin");
    const stories = await loadModel(await fixture("icppWorld-icpp_llm/stories260K.bin"), {
      tokenizer,
    });
    const xs = await loadModel(await fixture("saltyduckegg-llama2xs.c/model.bin"), { tokenizer });
    const tokens = stories.tokenizer!.encode(STORY, { bos: true });
    return { stories, xs, tokens };
  })();
  return tinyPromise;
}

/** Windows of `ctx` tokens from the start, written out here independently of the engine. */
function windowsOf(tokens: readonly number[], ctx: number): number[][] {
  const out: number[][] = [];
  for (let s = 0; s < tokens.length; s += ctx) {
    if (tokens.length - s >= 2) out.push(tokens.slice(s, s + ctx));
  }
  return out;
}

/** CPU logits of each window's rows 0 .. n-2, each window from a fresh cache. */
function cpuLogits(model: LoadedModel, windows: number[][]): Float32Array[][] {
  const cache = new Map<string, Float32Array>();
  const weights = (name: string) => {
    let w = cache.get(name);
    if (!w) {
      const t = model.tensors.get(name);
      if (!t) throw new Error(`missing tensor ${name}`);
      cache.set(name, w = tensorToF32(t));
    }
    return w;
  };
  return windows.map((w) => new LlamaRef(model.config, weights, CTX).forward(w.slice(0, -1)));
}

/** log-softmax of one logit row, in f64. */
function logSoftmax(row: Float32Array): Float64Array {
  const max = row.reduce((a, b) => Math.max(a, b), -Infinity);
  let sum = 0;
  for (const x of row) sum += Math.exp(x - max);
  const lse = max + Math.log(sum);
  return Float64Array.from(row, (x) => x - lse);
}

function argmax(row: ArrayLike<number>): number {
  let best = 0;
  for (let i = 1; i < row.length; i++) if (row[i] > row[best]) best = i;
  return best;
}

/** Mean NLL of each window's tokens 1 .. n-1, and with `ref`, mean KL(ref || model) and top-1. */
function cpuScores(windows: number[][], logits: Float32Array[][], ref?: Float32Array[][]) {
  let nll = 0, kl = 0, agree = 0, n = 0;
  windows.forEach((w, wi) => {
    for (let i = 0; i + 1 < w.length; i++) {
      const q = logSoftmax(logits[wi][i]);
      nll -= q[w[i + 1]];
      if (ref) {
        const p = logSoftmax(ref[wi][i]);
        for (let v = 0; v < p.length; v++) kl += Math.exp(p[v]) * (p[v] - q[v]);
        if (argmax(p) === argmax(q)) agree++;
      }
      n++;
    }
  });
  return { nll: nll / n, kl: kl / n, top1: agree / n, n };
}

function assertRel(name: string, got: number, want: number, rel: number): void {
  const err = Math.abs(got - want) / Math.abs(want);
  assert.ok(err <= rel, `${name}: got ${got}, want ${want} (relative error ${err} > ${rel})`);
}

/** Creates models on a fresh store, runs `fn`, and frees everything. */
async function withModels(
  gpu: Gpu,
  specs: [LoadedModel, LlamaGpuOptions][],
  fn: (models: LlamaGpu[]) => Promise<void>,
): Promise<void> {
  const store = new WeightStore(gpu);
  const models: LlamaGpu[] = [];
  try {
    for (const [m, opts] of specs) models.push(await LlamaGpu.create(gpu, store, m, opts));
    await fn(models);
  } finally {
    for (const m of models) m.destroy();
    store.destroy();
  }
}

Deno.test("perplexityTokens() cuts non-overlapping windows and drops a 1-token remainder", () => {
  const t = [1, 2, 3, 4, 5, 6, 7];
  assert.deepEqual(perplexityTokens(t.slice(0, 6), 3), [[1, 2, 3], [4, 5, 6]]);
  assert.deepEqual(perplexityTokens(t, 3), [[1, 2, 3], [4, 5, 6]]);
  assert.deepEqual(perplexityTokens(t.slice(0, 5), 3), [[1, 2, 3], [4, 5]]);
  assert.deepEqual(perplexityTokens(t, 100), [t]);
  assert.deepEqual(perplexityTokens(t, 7), [t]);
  assert.deepEqual(perplexityTokens([9, 8], 2), [[9, 8]]);
  assert.deepEqual(perplexityTokens([9, 8, 7], 2), [[9, 8]]);
  assert.deepEqual(perplexityTokens(t, 2), [[1, 2], [3, 4], [5, 6]]);
});

Deno.test("perplexityTokens() rejects ctx < 2, a non-integer ctx and fewer than 2 tokens", () => {
  assert.throws(() => perplexityTokens([1, 2, 3], 1), /ctx must be an integer >= 2, got 1/);
  assert.throws(() => perplexityTokens([1, 2, 3], 0), /ctx must be an integer >= 2/);
  assert.throws(() => perplexityTokens([1, 2, 3], 2.5), /ctx must be an integer >= 2/);
  assert.throws(() => perplexityTokens([1], 8), /at least 2 tokens .* got 1/);
  assert.throws(() => perplexityTokens([], 8), /at least 2 tokens .* got 0/);
});

Deno.test("PERPLEXITY_DEFINITION states the tokens, windows, scoring and formula", () => {
  for (const part of ["[BOS] + encode(text)", "non-overlapping", "empty cache", "exp(mean NLL)"]) {
    assert.ok(PERPLEXITY_DEFINITION.includes(part), `definition lacks "${part}"`);
  }
});

gpuTest("stories260K: GPU perplexity over 3 windows equals the CPU reference", async (gpu) => {
  const { stories, tokens } = await tiny();
  assert.ok(tokens.length > 2 * CTX + 1 && tokens.length < 3 * CTX, `${tokens.length} tokens`);
  const windows = windowsOf(tokens, CTX);
  const want = cpuScores(windows, cpuLogits(stories, windows));
  assert.equal(want.n, tokens.length - windows.length);
  await withModels(gpu, [
    [stories, { label: "ppl.f32", maxSeq: CTX, noF16: true }],
    [stories, { label: "ppl.wide", maxSeq: CTX, maxLogitRows: CTX }],
  ], async ([exact, wide]) => {
    // maxLogitRows 17: chunks of 17, 17, 17, 12 rows for full windows and 17, 5 for the last.
    const progress: [number, number][] = [];
    const r = await perplexity(gpu, exact, tokens, {
      ctx: CTX,
      onProgress: (s, t) => progress.push([s, t]),
    });
    assert.equal(r.windows, 3);
    assert.equal(r.ctx, CTX);
    assert.equal(r.tokens_scored, windows.reduce((a, w) => a + w.length - 1, 0));
    assert.equal(r.tokens_scored, want.n);
    assertRel("nll", r.nll, want.nll, 1e-4);
    assertRel("ppl", r.ppl, Math.exp(want.nll), 1e-4);
    assert.ok(r.kl === undefined && r.top1_agreement === undefined, "no reference, no KL");
    assert.ok(r.ppl > 1 && r.ppl < 30, `stories260K PPL ${r.ppl} on a simple story`);
    assert.deepEqual(progress.map((p) => p[0]), [17, 34, 51, 63, 80, 97, 114, 126, 143, 148]);
    assert.ok(progress.every((p) => p[1] === r.tokens_scored), "progress total");
    // Default precision (f16 KV cache where the adapter has it), each window in one chunk.
    const calls: number[] = [];
    const w = await perplexity(gpu, wide, tokens, { ctx: CTX, onProgress: (s) => calls.push(s) });
    assert.deepEqual(calls, [63, 126, 148]);
    assert.equal(w.tokens_scored, r.tokens_scored);
    assertRel("nll at default precision", w.nll, want.nll, 2e-3);
  });
});

gpuTest(
  "perplexity() against a reference: none from itself, a real one from llama2xs",
  async (gpu) => {
    const { stories, xs, tokens } = await tiny();
    const windows = windowsOf(tokens, CTX);
    const storiesCpu = cpuLogits(stories, windows);
    const want = cpuScores(windows, storiesCpu, cpuLogits(xs, windows));
    await withModels(gpu, [
      [stories, { label: "ppl.model", maxSeq: CTX, noF16: true }],
      [stories, { label: "ppl.self", maxSeq: CTX, noF16: true }],
      [xs, { label: "ppl.xs", maxSeq: CTX, noF16: true }],
    ], async ([model, self, other]) => {
      const plain = await perplexity(gpu, model, tokens, { ctx: CTX });
      const same = await perplexity(gpu, model, tokens, { ctx: CTX, reference: self });
      assert.ok(same.kl! >= 0 && same.kl! < 1e-9, `KL against itself: ${same.kl}`);
      assert.equal(same.top1_agreement, 1);
      assert.equal(same.ppl, plain.ppl, "the reference must not disturb the model's run");
      const diff = await perplexity(gpu, model, tokens, { ctx: CTX, reference: other });
      assert.ok(diff.kl! > 0.05, `KL(llama2xs || stories260K) = ${diff.kl}`);
      assert.ok(diff.top1_agreement! < 1, `top-1 agreement ${diff.top1_agreement}`);
      assert.equal(diff.ppl, plain.ppl, "the reference must not disturb the model's run");
      // The same quantities computed on the CPU from LlamaRef logits.
      assertRel("kl", diff.kl!, want.kl, 1e-3);
      assert.ok(
        Math.abs(diff.top1_agreement! - want.top1) <= 2 / want.n,
        `top-1 agreement ${diff.top1_agreement} vs CPU ${want.top1}`,
      );
    });
  },
);

gpuTest(
  "perplexity() in chunks of at most `rows` rows (the decode path) equals the default chunks",
  async (gpu) => {
    const { stories, xs, tokens } = await tiny();
    await withModels(gpu, [
      [stories, { label: "rows.f32", maxSeq: CTX, noF16: true, maxLogitRows: CTX }],
      [xs, { label: "rows.ref", maxSeq: CTX, noF16: true, maxLogitRows: CTX }],
      [stories, { label: "rows.f16", maxSeq: CTX, maxLogitRows: CTX }],
    ], async ([model, reference, f16]) => {
      // Default: each window in one chunk of up to 63 rows (the chunked / tiled products).
      const whole = await perplexity(gpu, model, tokens, { ctx: CTX, reference });
      for (const rows of [1, 3, 8]) {
        const calls: number[] = [];
        const r = await perplexity(gpu, model, tokens, {
          ctx: CTX,
          reference,
          rows,
          onProgress: (s) => calls.push(s),
        });
        // 63, 63 and 22 rows per window, cut into chunks of `rows`.
        const want = [63, 63, 22].reduce((a, n) => a + Math.ceil(n / rows), 0);
        assert.equal(calls.length, want, `rows ${rows}: ${calls.length} chunks`);
        assert.equal(r.tokens_scored, whole.tokens_scored);
        assertRel(`nll at rows ${rows}`, r.nll, whole.nll, 1e-4);
        assertRel(`kl at rows ${rows}`, r.kl!, whole.kl!, 1e-3);
        assert.ok(
          Math.abs(r.top1_agreement! - whole.top1_agreement!) <= 2 / r.tokens_scored,
          `top-1 at rows ${rows}: ${r.top1_agreement} vs ${whole.top1_agreement}`,
        );
      }
      // f16 weights (where the adapter has them): 8-row chunks against the default ones.
      const f16Whole = await perplexity(gpu, f16, tokens, { ctx: CTX });
      const f16Rows = await perplexity(gpu, f16, tokens, { ctx: CTX, rows: 8 });
      assertRel("f16 nll at rows 8", f16Rows.nll, f16Whole.nll, 2e-3);
      await assert.rejects(
        perplexity(gpu, model, tokens, { ctx: CTX, rows: 0 }),
        /rows must be an integer >= 1, got 0/,
      );
      await assert.rejects(
        perplexity(gpu, model, tokens, { ctx: CTX, rows: 2.5 }),
        /rows must be an integer >= 1, got 2.5/,
      );
    });
  },
);

gpuTest(
  "perplexity() rejects bad ctx, short or out-of-vocabulary input and bad references",
  async (gpu) => {
    const { stories, xs, tokens } = await tiny();
    // stories260K with its vocabulary cut to 256 tokens (tied classifier): a mismatched reference.
    const emb = stories.tensors.get("token_embd.weight")!;
    const rowBytes = emb.data.byteLength / emb.shape[0];
    const small: LoadedModel = {
      ...stories,
      config: { ...stories.config, vocabSize: 256 },
      tensors: new Map(stories.tensors).set("token_embd.weight", {
        ...emb,
        shape: [256, emb.shape[1]],
        data: emb.data.slice(0, 256 * rowBytes),
      }),
    };
    await withModels(gpu, [
      [stories, { label: "err.model", maxSeq: CTX }],
      [xs, { label: "err.short", maxSeq: 32 }],
      [small, { label: "err.small", maxSeq: CTX }],
    ], async ([model, short, smallGpu]) => {
      const run = (t: readonly number[], ctx: number, reference?: LlamaGpu) =>
        perplexity(gpu, model, t, { ctx, reference });
      await assert.rejects(run(tokens, 1), /ctx must be an integer >= 2, got 1/);
      await assert.rejects(run(tokens, CTX + 1), /ctx 65 exceeds the model's KV cache of 64 rows/);
      await assert.rejects(run([1], 8), /at least 2 tokens/);
      await assert.rejects(
        run([1, 512, 3], 8),
        /token 1 is 512, outside the vocabulary \[0, 512\)/,
      );
      await assert.rejects(run([1, -1], 8), /token 1 is -1/);
      await assert.rejects(run(tokens, CTX, model), /reference must be a separate LlamaGpu/);
      await assert.rejects(
        run(tokens, CTX, short),
        /ctx 64 exceeds the reference's KV cache of 32/,
      );
      await assert.rejects(
        run(tokens, CTX, smallGpu),
        /vocabulary has 256 tokens, the model's 512/,
      );
      // The same model with a fitting ctx still runs after the rejected calls.
      const ok = await perplexity(gpu, model, tokens, { ctx: 32, reference: short });
      assert.equal(ok.windows, 5);
      assert.equal(ok.tokens_scored, tokens.length - 5);
    });
  },
);

Deno.test("the held-out code text tokenizes with the pycode tokenizer to 1000+ tokens", async () => {
  const text = await Deno.readTextFile(new URL("./data/heldout_code.py", import.meta.url));
  const tokenizer = await loadTokenizerFile(
    await fixture("pycode-pair/target/tokenizer.model"),
  );
  const ids = tokenizer.encode(text, { bos: true });
  assert.equal(ids[0], 1, "starts with BOS");
  assert.ok(ids.length >= 1000, `only ${ids.length} tokens`);
  assert.equal(tokenizer.decode(ids), text, "the text round-trips through the tokenizer");
  // At ctx 512 it fills several windows, so the PPL check averages over more than one.
  assert.ok(perplexityTokens(ids, 512).length >= 2);
});
