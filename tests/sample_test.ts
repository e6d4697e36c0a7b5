import assert from "@specdec/assert";
import type { Gpu } from "../engine/gpu.ts";
import {
  chiSquareTest,
  processLogits,
  sampleUniform,
  type SamplingParams,
} from "../engine/speculative_math.ts";
import { createSample, sampleRef } from "../kernels/sample.ts";
import { assertClose, gpuTest, randomArray } from "./harness.ts";

const RW = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST;

interface Run {
  tokens: Uint32Array;
  probs: Float32Array;
  state: Uint32Array;
}

/** Runs the sampler over `rows` rows of `logits` with row counters `counters`. */
async function runSample(
  gpu: Gpu,
  logits: Float32Array,
  V: number,
  params: SamplingParams,
  seed: number,
  counters: Uint32Array,
  workgroupSize?: number,
): Promise<Run> {
  const rows = logits.length / V;
  const out = gpu.buffer("test.out", rows * 4, RW);
  const probs = gpu.buffer("test.probs", rows * V * 4, RW);
  const state = gpu.upload("test.state", counters);
  const d = await createSample(gpu, {
    label: "test.sample",
    logits: gpu.upload("test.logits", logits),
    out,
    probs,
    state,
    V,
    rows,
    seed,
    workgroupSize,
    ...params,
  });
  await gpu.run("test.sample", [d]);
  return {
    tokens: new Uint32Array(await gpu.read(out)),
    probs: new Float32Array(await gpu.read(probs)),
    state: new Uint32Array(await gpu.read(state)),
  };
}

/**
 * The GPU's token must have positive reference probability (truncation respected) and its CDF
 * interval [lo, hi) must hold u up to float rounding (1e-5): equal to the reference token, or
 * u sits on a boundary where f32 and f64 sums may disagree. Returns whether it equals the
 * reference exactly.
 */
function checkToken(what: string, probs: Float32Array, u: number, got: number, want: number) {
  assert.ok(got < probs.length && probs[got] > 0, `${what}: token ${got} is outside the kept set`);
  let total = 0, lo = 0;
  for (let j = 0; j < probs.length; j++) {
    if (j === got) lo = total;
    total += probs[j];
  }
  const hi = lo + probs[got];
  assert.ok(
    lo / total - 1e-5 <= u && u < hi / total + 1e-5,
    `${what}: token ${got} (reference ${want}) has CDF [${lo / total}, ${hi / total}) but u = ${u}`,
  );
  return got === want;
}

const CONFIGS: SamplingParams[] = [
  { temperature: 1, topK: 0, topP: 1 },
  { temperature: 0.7, topK: 5, topP: 1 },
  { temperature: 1.3, topK: 0, topP: 0.9 },
  { temperature: 1, topK: 20, topP: 0.8 },
  { temperature: 0.5, topK: 1, topP: 1 },
  { temperature: 0, topK: 0, topP: 1 },
];

gpuTest(
  "sample kernel matches sampleRef tokens and probs on ragged V and all settings",
  async (gpu) => {
    let rowsChecked = 0, exact = 0;
    for (
      const [V, rows] of [[1, 4], [7, 40], [33, 40], [129, 24], [1000, 8], [32000, 2], [128256, 1]]
    ) {
      for (const [ci, params] of CONFIGS.entries()) {
        const seed = 1000 * V + ci;
        // Half the rows have quantized logits (many ties), half continuous ones.
        const logits = randomArray(V * rows, seed, 4);
        for (let i = 0; i < (V * rows) / 2; i++) logits[i] = Math.round(logits[i] * 2) / 2;
        const counters = Uint32Array.from({ length: rows }, (_, r) => r * 7);
        const got = await runSample(gpu, logits, V, params, seed, counters);
        for (let r = 0; r < rows; r++) {
          const row = logits.subarray(r * V, (r + 1) * V);
          const ref = sampleRef(row, params, seed, r, counters[r]);
          const what = `V=${V} row ${r} ${JSON.stringify(params)}`;
          // f32 exp and sums on the GPU vs f64 here: 1e-5 absolute on probabilities.
          assertClose(what, got.probs.subarray(r * V, (r + 1) * V), ref.probs, {
            nmse: 1e-10,
            maxAbs: 1e-5,
          });
          if (
            checkToken(
              what,
              ref.probs,
              sampleUniform(seed, r, counters[r]),
              got.tokens[r],
              ref.token,
            )
          ) {
            exact++;
          }
          rowsChecked++;
        }
        assert.deepEqual(
          [...got.state],
          [...counters].map((c) => c + 1),
          "each row's counter advances by 1",
        );
      }
    }
    // Boundary ties between f32 and f64 are rare: demand 99% identical tokens.
    assert.ok(exact >= 0.99 * rowsChecked, `${exact} of ${rowsChecked} tokens equal the reference`);
  },
);

gpuTest("sample kernel with workgroup size 1 and 32 gives the reference tokens", async (gpu) => {
  const V = 50, rows = 16, params = { temperature: 0.9, topK: 12, topP: 0.85 };
  const logits = randomArray(V * rows, 3, 3);
  for (const wg of [1, 32]) {
    const got = await runSample(gpu, logits, V, params, 3, new Uint32Array(rows), wg);
    for (let r = 0; r < rows; r++) {
      const ref = sampleRef(logits.subarray(r * V, (r + 1) * V), params, 3, r, 0);
      checkToken(`wg ${wg} row ${r}`, ref.probs, sampleUniform(3, r, 0), got.tokens[r], ref.token);
    }
  }
});

gpuTest(
  "sample kernel greedy picks the lowest id among tied maxima and writes one-hot probs",
  async (gpu) => {
    const V = 300;
    const logits = new Float32Array(V).fill(-1);
    logits[257] = 2;
    logits[13] = 2;
    logits[200] = 1.5;
    const got = await runSample(
      gpu,
      logits,
      V,
      { temperature: 0, topK: 0, topP: 1 },
      1,
      new Uint32Array(1),
    );
    assert.equal(got.tokens[0], 13);
    assert.deepEqual([...got.probs].map((x, j) => (x === 1 ? j : -1)).filter((j) => j >= 0), [13]);
    assert.equal(got.probs.reduce((a, b) => a + b), 1);
  },
);

gpuTest(
  "sample kernel is reproducible for a seed and counter, and the counter changes draws",
  async (gpu) => {
    const V = 64, rows = 64, params = { temperature: 1, topK: 0, topP: 1 };
    const logits = new Float32Array(V * rows); // uniform rows: tokens depend on u alone
    const a = await runSample(gpu, logits, V, params, 77, new Uint32Array(rows));
    const b = await runSample(gpu, logits, V, params, 77, new Uint32Array(rows));
    const c = await runSample(gpu, logits, V, params, 77, new Uint32Array(rows).fill(1));
    const d = await runSample(gpu, logits, V, params, 78, new Uint32Array(rows));
    assert.deepEqual(a.tokens, b.tokens);
    for (let r = 0; r < rows; r++) {
      assert.equal(
        a.tokens[r],
        Math.floor(sampleUniform(77, r, 0) * V),
      );
    }
    const same = (x: Uint32Array, y: Uint32Array) => x.filter((t, i) => t === y[i]).length;
    assert.ok(same(a.tokens, c.tokens) < 8, "advancing the counter gives new draws");
    assert.ok(same(a.tokens, d.tokens) < 8, "another seed gives new draws");
  },
);

gpuTest(
  "sample kernel tokens follow processLogits (chi-square p-value > 0.001, 8000 rows)",
  async (gpu) => {
    const V = 16, rows = 8000, params = { temperature: 0.9, topK: 10, topP: 0.95 };
    const row = randomArray(V, 5, 2);
    const logits = new Float32Array(V * rows);
    for (let r = 0; r < rows; r++) logits.set(row, r * V);
    const got = await runSample(gpu, logits, V, params, 2024, new Uint32Array(rows), 16);
    const counts = new Array(V).fill(0);
    for (const t of got.tokens) counts[t]++;
    const p = processLogits(row, params);
    const c = chiSquareTest(counts, p);
    assert.ok(c.pValue > 0.001, `chi2 ${c.stat} df ${c.df} p-value ${c.pValue}`);
    assert.ok(p.filter((x) => x > 0).length < V, "the setting truncates something");
  },
);

gpuTest("createSample() rejects invalid settings with clear errors", async (gpu) => {
  const buf = gpu.buffer("x", 64, RW);
  const base = {
    label: "bad",
    logits: buf,
    out: buf,
    state: buf,
    V: 4,
    rows: 1,
    seed: 0,
    temperature: 1,
    topK: 0,
    topP: 1,
  };
  await assert.rejects(createSample(gpu, { ...base, temperature: -1 }), /temperature/);
  await assert.rejects(createSample(gpu, { ...base, topP: 0 }), /topP/);
  await assert.rejects(createSample(gpu, { ...base, topK: 1.5 }), /topK/);
  await assert.rejects(createSample(gpu, { ...base, workgroupSize: 48 }), /power of two/);
  await assert.rejects(createSample(gpu, { ...base, rows: 0 }), /rows >= 1/);
});
