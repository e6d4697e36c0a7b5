import assert from "@specdec/assert";
import type { Gpu } from "../engine/gpu.ts";
import {
  chiSquareTest,
  processLogits,
  rngUniform,
  sampleFrom,
  type SamplingParams,
} from "../engine/speculative_math.ts";
import { acceptRef, createAccept } from "../kernels/accept.ts";
import { gpuTest, randomArray } from "./harness.ts";
import { PAIRS, TRIALS } from "./spec_cases.ts";

const RW = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST;
const TEST_DOMAIN = 99;

interface Case {
  /** [batch, k + 1, V] */
  targetLogits: Float32Array;
  /** [batch, k, V] */
  draftProbs: Float32Array;
  /** [batch, k] */
  draftTokens: Uint32Array;
}

async function runAccept(
  gpu: Gpu,
  c: Case,
  k: number,
  V: number,
  params: SamplingParams,
  seed: number,
  counters: Uint32Array,
  workgroupSize?: number,
): Promise<{ tokens: Uint32Array; count: Uint32Array; state: Uint32Array }> {
  const batch = c.draftTokens.length / k;
  const outTokens = gpu.buffer("test.outTokens", batch * (k + 1) * 4, RW);
  const outCount = gpu.buffer("test.outCount", batch * 4, RW);
  const state = gpu.upload("test.state", counters);
  const d = await createAccept(gpu, {
    label: "test.accept",
    targetLogits: gpu.upload("test.target", c.targetLogits),
    draftProbs: gpu.upload("test.q", c.draftProbs),
    draftTokens: gpu.upload("test.draft", c.draftTokens),
    outTokens,
    outCount,
    state,
    k,
    V,
    seed,
    batch,
    workgroupSize,
    ...params,
  });
  await gpu.run("test.accept", [d]);
  return {
    tokens: new Uint32Array(await gpu.read(outTokens)),
    count: new Uint32Array(await gpu.read(outCount)),
    state: new Uint32Array(await gpu.read(state)),
  };
}

/** Rows of a flat [n, V] array. */
const rowsOf = (a: Float32Array, start: number, n: number, V: number) =>
  Array.from({ length: n }, (_, i) => a.slice((start + i) * V, (start + i + 1) * V));

gpuTest(
  "accept kernel matches acceptRef on random verify steps (ragged V, all settings)",
  async (gpu) => {
    const configs: SamplingParams[] = [
      { temperature: 1, topK: 0, topP: 1 },
      { temperature: 0.8, topK: 6, topP: 1 },
      { temperature: 1.2, topK: 0, topP: 0.85 },
      { temperature: 1, topK: 10, topP: 0.9 },
      { temperature: 0, topK: 0, topP: 1 },
    ];
    let steps = 0, same = 0;
    for (const [V, k, batch] of [[5, 3, 64], [33, 4, 48], [300, 2, 16], [2000, 5, 4]]) {
      for (const [ci, params] of configs.entries()) {
        const seed = V * 10 + ci;
        // Draft logits = target logits + noise, so drafts are often (not always) accepted.
        const targetLogits = randomArray(batch * (k + 1) * V, seed, 3);
        const noise = randomArray(batch * k * V, seed + 1, 1);
        const draftProbs = new Float32Array(batch * k * V);
        const draftTokens = new Uint32Array(batch * k);
        for (let b = 0; b < batch; b++) {
          for (let i = 0; i < k; i++) {
            const off = ((b * (k + 1)) + i) * V;
            const dl = Float32Array.from(
              { length: V },
              (_, j) => targetLogits[off + j] + noise[(b * k + i) * V + j],
            );
            const q = processLogits(dl, params);
            draftProbs.set(q, (b * k + i) * V);
            draftTokens[b * k + i] = sampleFrom(q, rngUniform(seed, TEST_DOMAIN, b, 0, i));
          }
        }
        const counters = Uint32Array.from({ length: batch }, (_, b) => b * 3 + 1);
        const got = await runAccept(
          gpu,
          { targetLogits, draftProbs, draftTokens },
          k,
          V,
          params,
          seed,
          counters,
        );
        assert.deepEqual([...got.state], [...counters].map((c) => c + 1), "counters advance by 1");
        for (let b = 0; b < batch; b++) {
          const ref = acceptRef(
            rowsOf(targetLogits, b * (k + 1), k + 1, V),
            rowsOf(draftProbs, b * k, k, V),
            [...draftTokens.subarray(b * k, (b + 1) * k)],
            params,
            seed,
            b,
            counters[b],
          );
          const n = got.count[b];
          assert.ok(n >= 1 && n <= k + 1, `count ${n} out of range`);
          const tokens = [...got.tokens.subarray(b * (k + 1), b * (k + 1) + n)];
          // Accepted tokens are always the draft's prefix.
          assert.deepEqual(tokens.slice(0, n - 1), [...draftTokens.subarray(b * k, b * k + n - 1)]);
          steps++;
          if (n === ref.tokens.length && tokens.every((t, i) => t === ref.tokens[i])) same++;
        }
      }
    }
    // f32 (GPU) vs f64 (reference) probabilities can flip a decision only when a uniform lies
    // within ~1e-6 of a boundary: demand 99% identical verify steps.
    assert.ok(same >= 0.99 * steps, `${same} of ${steps} verify steps equal the reference`);
  },
);

gpuTest(
  "accept kernel greedy: all accepted gives the bonus; a mismatch at i gives argmax p_i",
  async (gpu) => {
    const V = 10, k = 4;
    const argmaxes = [3, 7, 0, 9, 4];
    const rowLogits = argmaxes.map((a) => {
      const l = randomArray(V, a, 1);
      l[a] = 5;
      return l;
    });
    // A tie: row 2 has its maximum at 0 and 6; the lowest id (0) is the argmax.
    rowLogits[2][6] = 5;
    const drafts = [
      [3, 7, 0, 9], // all accepted -> [3, 7, 0, 9, 4]
      [3, 7, 6, 9], // mismatch at 2 (6 ties 0 but is not the lowest id) -> [3, 7, 0]
      [1, 7, 0, 9], // mismatch at 0 -> [3]
    ];
    const batch = drafts.length;
    const targetLogits = new Float32Array(batch * (k + 1) * V);
    for (let b = 0; b < batch; b++) {
      rowLogits.forEach((l, i) => targetLogits.set(l, (b * (k + 1) + i) * V));
    }
    const got = await runAccept(
      gpu,
      {
        targetLogits,
        draftProbs: new Float32Array(batch * k * V),
        draftTokens: Uint32Array.from(drafts.flat()),
      },
      k,
      V,
      { temperature: 0, topK: 0, topP: 1 },
      0,
      new Uint32Array(batch),
    );
    assert.deepEqual([...got.count], [5, 3, 1]);
    assert.deepEqual([...got.tokens.subarray(0, 5)], [3, 7, 0, 9, 4]);
    assert.deepEqual([...got.tokens.subarray(5, 8)], [3, 7, 0]);
    assert.deepEqual([...got.tokens.subarray(10, 11)], [3]);
  },
);

for (const pair of PAIRS) {
  gpuTest(
    `accept kernel emits tokens distributed as p (chi-square p-value > 0.001, ${TRIALS} trials): ${pair.name}`,
    async (gpu) => {
      // One dispatch, one workgroup per trial; k = 2, every position has target p (given as
      // logits log p, -Infinity where p = 0) and draft q.
      const V = 8, k = 2, seed = 31;
      const params = { temperature: 1, topK: 0, topP: 1 };
      const pl = Float32Array.from(pair.p, Math.log), q = Float32Array.from(pair.q);
      const targetLogits = new Float32Array(TRIALS * (k + 1) * V);
      const draftProbs = new Float32Array(TRIALS * k * V);
      const draftTokens = new Uint32Array(TRIALS * k);
      for (let t = 0; t < TRIALS; t++) {
        for (let i = 0; i <= k; i++) targetLogits.set(pl, (t * (k + 1) + i) * V);
        for (let i = 0; i < k; i++) {
          draftProbs.set(q, (t * k + i) * V);
          draftTokens[t * k + i] = sampleFrom(q, rngUniform(seed, TEST_DOMAIN, t, 0, i));
        }
      }
      const got = await runAccept(
        gpu,
        { targetLogits, draftProbs, draftTokens },
        k,
        V,
        params,
        seed,
        new Uint32Array(TRIALS),
        8,
      );
      const first = new Array(V).fill(0), second = new Array(V).fill(0);
      let same = 0;
      for (let t = 0; t < TRIALS; t++) {
        const n = got.count[t];
        first[got.tokens[t * (k + 1)]]++;
        if (n > 1) second[got.tokens[t * (k + 1) + 1]]++;
        const ref = acceptRef(
          rowsOf(targetLogits, t * (k + 1), k + 1, V),
          rowsOf(draftProbs, t * k, k, V),
          [...draftTokens.subarray(t * k, (t + 1) * k)],
          params,
          seed,
          t,
          0,
        );
        if (
          ref.tokens.length === n && ref.tokens.every((x, i) => x === got.tokens[t * (k + 1) + i])
        ) same++;
      }
      const c1 = chiSquareTest(first, pair.p), c2 = chiSquareTest(second, pair.p);
      assert.ok(c1.pValue > 0.001, `first token: chi2 ${c1.stat} df ${c1.df} p-value ${c1.pValue}`);
      assert.ok(
        c2.pValue > 0.001,
        `second token: chi2 ${c2.stat} df ${c2.df} p-value ${c2.pValue}`,
      );
      assert.ok(same >= 0.99 * TRIALS, `${same} of ${TRIALS} trials equal acceptRef`);
    },
  );
}

gpuTest("createAccept() rejects k = 0 and bad settings with clear errors", async (gpu) => {
  const buf = gpu.buffer("x", 64, RW);
  const base = {
    label: "bad",
    targetLogits: buf,
    draftProbs: buf,
    draftTokens: buf,
    outTokens: buf,
    outCount: buf,
    state: buf,
    k: 2,
    V: 4,
    seed: 0,
    temperature: 1,
    topK: 0,
    topP: 1,
  };
  await assert.rejects(createAccept(gpu, { ...base, k: 0 }), /k >= 1/);
  await assert.rejects(createAccept(gpu, { ...base, topP: 1.5 }), /topP/);
});
