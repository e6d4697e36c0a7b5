/**
 * Speculative decoding end to end on real models: lossless at temperature 0 (token for token
 * equal to plain greedy decoding) for k = 1..8 and auto, with model drafts and n-gram drafts;
 * KV rollback (after rejections the caches serve exactly the accepted sequence); the output
 * distribution at temperature > 0 equals the target's (chi-square).
 */
import assert from "@specdec/assert";
import { gpuPair, likeliestNext, llama2c } from "./fixtures.ts";
import { assertClose, gpuTest } from "./harness.ts";
import { fixture } from "./fixtures.ts";
import { autoDraftLength, Decoder, type DraftLength } from "../engine/decode.ts";
import { loadHfFolder } from "../models/hf.ts";
import { chiSquareTest } from "../engine/speculative_math.ts";
import { checkSameVocabulary } from "../engine/session.ts";

const GREEDY = { temperature: 0, topK: 0, topP: 1, seed: 0 };
const quiet = { onTokens: () => {}, cancelled: () => false };

Deno.test("autoDraftLength() grows with acceptance and shrinks with draft cost", () => {
  assert.equal(autoDraftLength(0.1, 0.1), 1);
  assert.ok(autoDraftLength(0.9, 0.05) > autoDraftLength(0.6, 0.05));
  assert.ok(autoDraftLength(0.8, 0.02) > autoDraftLength(0.8, 0.5));
  assert.ok(autoDraftLength(0.99, 0.01) <= 16);
});

gpuTest(
  "tiny pair: speculative greedy equals plain greedy for k = 1..8, auto, and n-gram",
  async (gpu) => {
    const target = await llama2c("icppWorld-icpp_llm/stories260K.bin");
    const draft = await llama2c("saltyduckegg-llama2xs.c/model.bin");
    const { t, d, destroy } = await gpuPair(gpu, target, draft, 256);
    const n = 48;
    const prompt = [1, 403, 407, 261]; // BOS "Once upon a"
    const plain = await new Decoder(gpu, t).generate(prompt, n, GREEDY, quiet);
    assert.equal(plain.tokens.length, n);
    const spec = new Decoder(gpu, t, { kind: "model", draft: d });
    const ks: DraftLength[] = [1, 2, 3, 4, 5, 6, 7, 8, "auto"];
    for (const k of ks) {
      const r = await spec.generate(prompt, n, GREEDY, quiet, k);
      assert.deepEqual(r.tokens, plain.tokens, `k=${k}`);
      assert.ok(r.accepted > 0 && r.accepted <= r.proposed, `k=${k}: ${r.accepted}/${r.proposed}`);
      assert.ok(r.targetPasses < n, `k=${k}: ${r.targetPasses} target passes for ${n} tokens`);
    }
    const ngram = new Decoder(gpu, t, { kind: "ngram", maxN: 3 });
    for (const k of [1, 4, 8] as const) {
      const r = await ngram.generate(prompt, n, GREEDY, quiet, k);
      assert.deepEqual(r.tokens, plain.tokens, `ngram k=${k}`);
    }
    // The same cycle stops at EOS-free max tokens exactly, also mid-cycle.
    const r7 = await spec.generate(prompt, 7, GREEDY, quiet, 8);
    assert.deepEqual(r7.tokens, plain.tokens.slice(0, 7));
    assert.equal(r7.stop, "max-tokens");
    spec.destroy();
    ngram.destroy();
    destroy();
  },
);

gpuTest(
  "pycode pair: speculative greedy equals plain greedy (k = 1, 5, auto; n-gram)",
  async (gpu) => {
    const target = await loadHfFolder(await fixture("pycode-pair/target"));
    const draft = await loadHfFolder(await fixture("pycode-pair/draft"));
    checkSameVocabulary(target, draft);
    const { t, d, destroy } = await gpuPair(gpu, target, draft, 96);
    // BOS "import os\nimport sys\n\n\ndef main():\n"
    const prompt = [1, 1053, 2897, 13, 5215, 10876, 13, 13, 13, 1753, 1667, 7295, 13];
    const n = 12;
    const plain = await new Decoder(gpu, t).generate(prompt, n, GREEDY, quiet);
    const spec = new Decoder(gpu, t, { kind: "model", draft: d });
    for (const k of [1, 5, "auto"] as const) {
      const r = await spec.generate(prompt, n, GREEDY, quiet, k);
      assert.deepEqual(r.tokens, plain.tokens, `k=${k}`);
    }
    const ngram = new Decoder(gpu, t, { kind: "ngram", maxN: 3 });
    assert.deepEqual((await ngram.generate(prompt, n, GREEDY, quiet, 4)).tokens, plain.tokens);
    spec.destroy();
    ngram.destroy();
    destroy();
  },
);

gpuTest(
  "after rejections, the target's logits equal a fresh run on the accepted sequence",
  async (gpu) => {
    const target = await llama2c("icppWorld-icpp_llm/stories260K.bin");
    const draft = await llama2c("saltyduckegg-llama2xs.c/model.bin");
    const { t, d, destroy } = await gpuPair(gpu, target, draft, 256);
    const prompt = [1, 403, 407, 261];
    const spec = new Decoder(gpu, t, { kind: "model", draft: d });
    const r = await spec.generate(prompt, 40, GREEDY, quiet, 6);
    assert.ok(r.accepted < r.proposed, "the test needs at least one rejection");
    // Cache rows 0 .. P+n-2 must hold exactly prompt + tokens[0..n-2], although rejected draft
    // rows were written there on the way; one more step on the last token must then give the
    // logits of a fresh prefill of the whole accepted sequence (a wrong row moves logits by ~10;
    // the f16 cache and the two kernel paths' summation orders by ~1e-3).
    const seq = [...prompt, ...r.tokens];
    const V = t.config.vocabSize;
    t.setPosition(seq.length - 1);
    const last = gpu.upload("test.last", new Uint32Array([seq[seq.length - 1]]));
    await gpu.run("step", await t.plan(1, { buffer: last, offset: 0 }, "last"));
    const afterSpec = new Float32Array(await gpu.read(t.logits, 0, V * 4));
    const all = gpu.upload("test.seq", new Uint32Array(seq));
    t.setPosition(0);
    await gpu.run("fresh", await t.plan(seq.length, { buffer: all, offset: 0 }, "last"));
    const fresh = new Float32Array(await gpu.read(t.logits, 0, V * 4));
    assertClose("logits after rollback vs fresh", afterSpec, fresh, { nmse: 1e-6, maxAbs: 2e-2 });
    spec.destroy();
    destroy();
  },
);

gpuTest(
  "sampled speculative decoding keeps the target's distribution (chi-square, real model)",
  async (gpu) => {
    // The token a speculative cycle emits (accept d1 ~ q with probability min(1, p/q), else
    // resample from norm(max(0, p − q))) must follow the target's processed p. The first token
    // after the prompt comes from the target's own sampler; among runs where it equals the most
    // likely token t*, the cycle's token must follow p(· | prompt, t*), which we compute exactly.
    const target = await llama2c("icppWorld-icpp_llm/stories260K.bin");
    const draft = await llama2c("saltyduckegg-llama2xs.c/model.bin");
    const { t, d, destroy } = await gpuPair(gpu, target, draft, 64);
    const prompt = [1, 403, 407, 261, 378, 432]; // BOS "Once upon a time, there"
    const s = { temperature: 1.3, topK: 10, topP: 1 };
    const V = t.config.vocabSize;
    const { tStar, p1 } = await likeliestNext(gpu, t, prompt, s);
    const spec = new Decoder(gpu, t, { kind: "model", draft: d });
    const counts = new Array(V).fill(0);
    let used = 0;
    for (let seed = 1; seed <= 300; seed++) {
      const r = await spec.generate(prompt, 2, { ...s, seed }, quiet, 1);
      if (r.tokens[0] !== tStar) continue;
      counts[r.tokens[1]]++;
      used++;
    }
    assert.ok(used >= 80, `only ${used} runs started with the most likely token`);
    const { pValue, stat, df } = chiSquareTest(counts, p1);
    // Fixed seeds make this deterministic; a wrong acceptance rule gives p-values << 1e-3.
    assert.ok(pValue > 0.001, `chi-square ${stat.toFixed(1)} on ${df} df, p-value ${pValue}`);
    spec.destroy();
    destroy();
  },
);
