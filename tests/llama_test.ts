/**
 * The GPU forward pass against real models: greedy text of the tiny llama2.c models must equal
 * their stored reference, and the pycode pair's GPU logits must match the plain-TS CPU forward
 * (models/llama_ref.ts) for prefill and for step-by-step decode through the KV cache.
 */
import assert from "@specdec/assert";
import { assertClose, gpuTest } from "./harness.ts";
import { fixture, fixtureText, GREEDY, QUIET, readLogits, refWeights } from "./fixtures.ts";
import { WeightStore } from "../engine/weights.ts";
import { Decoder } from "../engine/decode.ts";
import { LlamaGpu } from "../models/llama.ts";
import { LlamaRef } from "../models/llama_ref.ts";
import { readLlama2c } from "../models/llama2c.ts";
import { loadHfFolder } from "../models/hf.ts";
import type { LoadedModel } from "../models/types.ts";

async function llama2c(rel: string): Promise<LoadedModel> {
  const path = await fixture(rel);
  const { config, tensors } = readLlama2c(await Deno.readFile(path), path);
  return { source: path, format: "llama2c", config, tensors };
}

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
