/**
 * The GPU forward pass against real models: greedy text of the tiny llama2.c models must equal
 * their stored reference, and the pycode pair's GPU logits must match the plain-TS CPU forward
 * (models/llama_ref.ts) for prefill and for step-by-step decode through the KV cache.
 */
import assert from "@specdec/assert";
import { assertClose, gpuTest } from "./harness.ts";
import {
  fixture,
  fixtureText,
  GREEDY,
  llama2c,
  QUIET,
  readLogits,
  refWeights,
} from "./fixtures.ts";
import { WeightStore } from "../engine/weights.ts";
import { Decoder } from "../engine/decode.ts";
import { LlamaGpu } from "../models/llama.ts";
import { LlamaRef } from "../models/llama_ref.ts";
import { loadHfFolder } from "../models/hf.ts";
import { planQuant } from "../engine/quant_plan.ts";
import { decodeWeights, encodeWeights, type WeightFormat } from "../kernels/qformats.ts";
import { matvecChunks, matvecMaxT } from "../kernels/matmul.ts";

interface Reference {
  prompt_tokens: number[];
  tokens: number[];
}

async function reference(key: string): Promise<Reference> {
  const all = JSON.parse(await fixtureText("reference-outputs/tok512-greedy-reference.json"));
  return all[key];
}

for (
  const [name, rel, key] of [
    ["stories260K", "icppWorld-icpp_llm/stories260K.bin", "stories260K"],
    ["llama2xs", "saltyduckegg-llama2xs.c/model.bin", "llama2xs_out_model"],
  ] as const
) {
  gpuTest(`${name} greedy decoding from BOS reproduces its reference tokens`, async (gpu) => {
    const model = await llama2c(rel);
    const ref = await reference(key);
    const store = new WeightStore(gpu);
    const m = await LlamaGpu.create(gpu, store, model, {
      label: name,
      maxSeq: model.config.maxSeqLen,
    });
    const dec = new Decoder(gpu, m);
    const want = ref.tokens.slice(ref.prompt_tokens.length);
    const n = Math.min(want.length, 255);
    const r = await dec.generate(ref.prompt_tokens, n, GREEDY, QUIET);
    assert.ok(n >= 200, `reference holds only ${n} tokens`);
    assert.deepEqual(r.tokens, want.slice(0, n));
    dec.destroy();
    m.destroy();
    store.destroy();
  });
}

// A Python prompt (Llama 2 tokenizer ids of "def fibonacci(n):\n    if n" with BOS).
const PROMPT = [1, 822, 18755, 265, 29898, 29876, 1125, 13, 1678, 565, 302];

for (const which of ["draft", "target"] as const) {
  gpuTest(
    `pycode ${which}: GPU logits match the CPU reference for prefill and decode`,
    async (gpu) => {
      const model = await loadHfFolder(await fixture(`pycode-pair/${which}`));
      const store = new WeightStore(gpu);
      const maxSeq = 64;
      const m = await LlamaGpu.create(gpu, store, model, { label: which, maxSeq });
      const ref = new LlamaRef(model.config, refWeights(model), maxSeq);
      const V = model.config.vocabSize;
      // f16 weights are exact in both; the GPU keeps K/V in f16 (where available) and sums in
      // another order, so allow a small normalized error.
      const tol = { nmse: 2e-4, maxAbs: 0.15 };
      const prompt = gpu.upload(`${which}.test.prompt`, new Uint32Array(PROMPT));
      m.setPosition(0);
      await gpu.run("prefill", await m.plan(PROMPT.length, { buffer: prompt, offset: 0 }, "all"));
      const got = await readLogits(gpu, m, PROMPT.length);
      const want = ref.forward(PROMPT);
      for (let t = 0; t < PROMPT.length; t++) {
        assertClose(`prefill row ${t}`, got.subarray(t * V, (t + 1) * V), want[t], tol);
      }
      // Decode through the KV cache: one token per forward at positions PROMPT.length, +1, ...
      const next = gpu.upload(`${which}.test.next`, new Uint32Array(1), GPUBufferUsage.STORAGE);
      const step = await m.plan(1, { buffer: next, offset: 0 }, "last");
      for (const [i, token] of [13, 736, 302, 529].entries()) {
        gpu.write(next, new Uint32Array([token]));
        await gpu.run("decode", step);
        const row = await readLogits(gpu, m, 1);
        assertClose(`decode step ${i}`, row, ref.forward([token])[0], tol);
      }
      m.destroy();
      store.destroy();
    },
  );
}

gpuTest(
  "the fused forward is 5 dispatches per layer plus 3 per forward, for every T",
  async (gpu) => {
    const model = await llama2c("icppWorld-icpp_llm/stories260K.bin");
    const store = new WeightStore(gpu);
    const m = await LlamaGpu.create(gpu, store, model, { label: "count", maxSeq: 256 });
    const ids = gpu.upload("count.ids", new Uint32Array(128));
    const L = model.config.nLayers;
    for (const [T, rows] of [[1, "last"], [5, "all"], [17, "all"], [128, "last"]] as const) {
      const plan = await m.plan(T, { buffer: ids, offset: 0 }, rows);
      // embedding, 5 per layer (qkv, attention, o, gate/up, down), classifier, advance
      assert.equal(plan.length, 5 * L + 3, `T=${T}: ${plan.map((d) => d.label).join(", ")}`);
    }
    const cacheOnly = await m.plan(3, { buffer: ids, offset: 0 }, "none");
    assert.equal(cacheOnly.length, 5 * L + 2);
    m.destroy();
    store.destroy();
  },
);

gpuTest(
  "q, k and v of different formats run as separate products into the qkv rows",
  async (gpu) => {
    // v in q8_0, q and k in f32: the layer cannot fuse them, so three products fill the qkv rows.
    const model = await llama2c("icppWorld-icpp_llm/stories260K.bin");
    const c = model.config;
    const formats = new Map<string, WeightFormat>(
      [...planQuant(c, model.tensors, { f16: false })].map(([n, t]) => [n, t.format]),
    );
    for (let l = 0; l < c.nLayers; l++) formats.set(`blk.${l}.attn_v.weight`, "q8_0");
    const store = new WeightStore(gpu);
    const m = await LlamaGpu.create(gpu, store, model, {
      label: "mixed",
      maxSeq: 64,
      formats,
      noF16: true,
    });
    const ids = gpu.upload("mixed.ids", new Uint32Array(PROMPT.map((t) => t % c.vocabSize)));
    const plan = await m.plan(PROMPT.length, { buffer: ids, offset: 0 }, "all");
    // q and k one dispatch each, v one per chunk of its rows (a block format: at most 8 rows).
    const vChunks = matvecChunks(PROMPT.length, matvecMaxT("q8_0")).length;
    assert.equal(vChunks, 2);
    assert.equal(plan.length, (6 + vChunks) * c.nLayers + 3, "qkv as three products per layer");
    m.setPosition(0);
    await gpu.run("mixed", plan);
    const got = await readLogits(gpu, m, PROMPT.length);
    // The reference multiplies by the q8_0-rounded v weights.
    const base = refWeights(model);
    const ref = new LlamaRef(c, (name) => {
      const w = base(name);
      if (!/attn_v\.weight$/.test(name)) return w;
      const [rows, cols] = model.tensors.get(name)!.shape;
      return decodeWeights("q8_0", encodeWeights("q8_0", w, rows, cols), rows, cols);
    }, 64);
    const want = ref.forward(PROMPT.map((t) => t % c.vocabSize));
    for (let t = 0; t < PROMPT.length; t++) {
      const row = got.subarray(t * c.vocabSize, (t + 1) * c.vocabSize);
      assertClose(`row ${t}`, row, want[t], { nmse: 1e-8, maxAbs: 1e-3 });
    }
    m.destroy();
    store.destroy();
  },
);
