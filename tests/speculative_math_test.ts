import assert from "@specdec/assert";
import {
  ACCEPT_DOMAIN,
  acceptDraft,
  acceptUniforms,
  argmax,
  chiSquareTest,
  gammaQ,
  orderKey,
  processLogits,
  rngUniform,
  SAMPLE_DOMAIN,
  sampleFrom,
} from "../engine/speculative_math.ts";
import { PAIRS, TRIALS } from "./spec_cases.ts";

const f32 = (xs: number[]) => new Float32Array(xs);
const logs = (ps: number[]) => f32(ps.map((p) => Math.log(p)));
const near = (got: ArrayLike<number>, want: number[], tol = 1e-6) => {
  assert.equal(got.length, want.length);
  for (let i = 0; i < want.length; i++) {
    assert.ok(Math.abs(got[i] - want[i]) <= tol, `[${i}] got ${got[i]}, want ${want[i]}`);
  }
};
const oneHot = (n: number, i: number) =>
  Float32Array.from({ length: n }, (_, j) => (j === i ? 1 : 0));

Deno.test("gammaQ() gives known chi-square tail probabilities", () => {
  // df = 2: Q(1, x/2) = e^(-x/2); df = 4: Q(2, x/2) = e^(-x/2) (1 + x/2). x = 1 takes the series
  // branch, x = 10 the continued fraction.
  for (const x of [1, 10]) {
    assert.ok(Math.abs(gammaQ(1, x / 2) - Math.exp(-x / 2)) < 1e-12);
    assert.ok(Math.abs(gammaQ(2, x / 2) - Math.exp(-x / 2) * (1 + x / 2)) < 1e-12);
  }
  // Tabulated critical values: chi2(1) at 3.841459 -> 0.05, chi2(7) at 18.475307 -> 0.01.
  assert.ok(Math.abs(gammaQ(0.5, 3.841459 / 2) - 0.05) < 1e-6);
  assert.ok(Math.abs(gammaQ(3.5, 18.475307 / 2) - 0.01) < 1e-6);
  assert.equal(chiSquareTest([5, 0], [0.5, 0]).df, 1);
  assert.equal(chiSquareTest([5, 1], [1, 0]).pValue, 0);
});

Deno.test("rngUniform() is exact in f32, reproducible, and uniform (chi-square, 16 bins)", () => {
  const bins = new Array(16).fill(0);
  for (let i = 0; i < 50000; i++) {
    const u = rngUniform(7, SAMPLE_DOMAIN, i % 13, i, 0);
    assert.ok(u >= 0 && u < 1 && Math.fround(u) === u && (u * 16777216) % 1 === 0);
    bins[Math.floor(u * 16)]++;
  }
  assert.ok(chiSquareTest(bins, new Array(16).fill(1)).pValue > 0.001);
  assert.equal(rngUniform(1, 2, 3, 4, 5), rngUniform(1, 2, 3, 4, 5));
  // Every input changes the draw.
  const base = rngUniform(1, 2, 3, 4, 5);
  for (
    const v of [[2, 2, 3, 4, 5], [1, 1, 3, 4, 5], [1, 2, 4, 4, 5], [1, 2, 3, 5, 5], [1, 2, 3, 4, 6]]
  ) {
    assert.notEqual(rngUniform(v[0], v[1], v[2], v[3], v[4]), base);
  }
  assert.deepEqual(
    acceptUniforms(9, 2, 3, 2),
    [0, 1, 2].map((i) => rngUniform(9, ACCEPT_DOMAIN, 2, 3, i)),
  );
});

Deno.test("orderKey() orders floats like <, with -0 equal to +0", () => {
  const xs = [-Infinity, -3e38, -1, -1e-40, 0, 1e-40, 0.5, 1, 3e38, Infinity];
  for (let i = 1; i < xs.length; i++) assert.ok(orderKey(xs[i - 1]) < orderKey(xs[i]));
  assert.equal(orderKey(-0), orderKey(0));
  assert.equal(argmax(f32([1, 5, 2, 5])), 1);
});

Deno.test("processLogits() with temperature 0 is one-hot at the lowest-id argmax", () => {
  assert.deepEqual([...processLogits(f32([1, 4, 2, 4]), { temperature: 0, topK: 0, topP: 1 })], [
    0,
    1,
    0,
    0,
  ]);
  assert.deepEqual([...processLogits(f32([-0, 0]), { temperature: 0, topK: 0, topP: 1 })], [1, 0]);
});

Deno.test("processLogits() applies temperature as softmax(l / T)", () => {
  const l = [0.5, -1, 2, 0];
  for (const T of [0.5, 1, 2]) {
    const e = l.map((x) => Math.exp(x / T));
    const z = e.reduce((a, b) => a + b);
    near(processLogits(f32(l), { temperature: T, topK: 0, topP: 1 }), e.map((x) => x / z));
  }
  // -Infinity logits get probability 0.
  near(processLogits(f32([0, -Infinity, 0]), { temperature: 1, topK: 0, topP: 1 }), [0.5, 0, 0.5]);
});

Deno.test("processLogits() top-k keeps the k largest and every tie at the boundary", () => {
  const opts = { temperature: 1, topP: 1 };
  near(processLogits(f32([1, 3, 3, 2]), { ...opts, topK: 2 }), [0, 0.5, 0.5, 0]);
  // k = 1 with a tied maximum keeps both; k = 3 with a tie at the 3rd place keeps 4.
  near(processLogits(f32([3, 0, 3]), { ...opts, topK: 1 }), [0.5, 0, 0.5]);
  const p = processLogits(f32([5, 1, 4, 1, 0]), { ...opts, topK: 3 });
  assert.deepEqual([...p].map((x) => x > 0), [true, true, true, true, false]);
  // topK 0 and topK >= V are off.
  for (const topK of [0, 5, 9]) {
    assert.ok(processLogits(f32([5, 1, 4, 1, 0]), { ...opts, topK }).every((x) => x > 0));
  }
});

Deno.test("processLogits() top-p keeps the smallest head with mass >= topP, ties included", () => {
  const l = logs([0.5, 0.3, 0.15, 0.05]);
  const opts = { temperature: 1, topK: 0 };
  near(processLogits(l, { ...opts, topP: 0.75 }), [0.625, 0.375, 0, 0]);
  near(processLogits(l, { ...opts, topP: 0.81 }), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0]);
  near(processLogits(l, { ...opts, topP: 0.3 }), [1, 0, 0, 0]);
  near(processLogits(l, { ...opts, topP: 1 }), [0.5, 0.3, 0.15, 0.05]);
  // A tie at the boundary is kept whole: 0.4 alone < 0.5, so all three 0.2s join.
  near(processLogits(logs([0.2, 0.4, 0.2, 0.2]), { ...opts, topP: 0.5 }), [0.2, 0.4, 0.2, 0.2]);
  // Order: top-k first, then top-p on the renormalized survivors: [0.625, 0.375] -> {0}.
  near(processLogits(l, { temperature: 1, topK: 2, topP: 0.6 }), [1, 0, 0, 0]);
});

Deno.test("sampleFrom() inverts the CDF, skips zero entries and never returns them", () => {
  const p = [0, 0.25, 0, 0.5, 0.25, 0];
  assert.equal(sampleFrom(p, 0), 1);
  assert.equal(sampleFrom(p, 0.2499), 1);
  assert.equal(sampleFrom(p, 0.25), 3);
  assert.equal(sampleFrom(p, 0.75), 4);
  assert.equal(sampleFrom(p, 1 - 2 ** -24), 4);
  assert.equal(sampleFrom([2, 6], 0.3), 1); // unnormalized weights
  assert.throws(() => sampleFrom([0, 0], 0.5), /no positive entry/);
});

Deno.test("acceptDraft() greedy: accepts while draft == argmax, then emits the argmax", () => {
  const V = 6, a = [2, 5, 0, 3];
  const targetProbs = a.map((i) => oneHot(V, i));
  const u = [0.9, 0.9, 0.9, 0.9];
  // All accepted: the bonus is argmax p_3.
  let r = acceptDraft({
    targetProbs,
    draftProbs: [oneHot(V, 2), oneHot(V, 5), oneHot(V, 0)],
    draftTokens: [2, 5, 0],
    uniforms: u,
  });
  assert.deepEqual(r, { accepted: 3, tokens: [2, 5, 0, 3] });
  // Mismatch at i = 1: the correction is argmax p_1.
  r = acceptDraft({
    targetProbs,
    draftProbs: [oneHot(V, 2), oneHot(V, 4), oneHot(V, 0)],
    draftTokens: [2, 4, 0],
    uniforms: u,
  });
  assert.deepEqual(r, { accepted: 1, tokens: [2, 5] });
  // Mismatch at i = 0, even with a non-greedy q.
  r = acceptDraft({
    targetProbs,
    draftProbs: [f32([0.1, 0.5, 0.1, 0.1, 0.1, 0.1]), oneHot(V, 5), oneHot(V, 0)],
    draftTokens: [1, 5, 0],
    uniforms: u,
  });
  assert.deepEqual(r, { accepted: 0, tokens: [2] });
});

Deno.test("acceptDraft() accepts when q(x) = 0 < p(x), rejects when p(x) = 0", () => {
  const p = [f32([0.5, 0.5, 0]), f32([1 / 3, 1 / 3, 1 / 3])];
  const yes = acceptDraft({
    targetProbs: p,
    draftProbs: [f32([0, 0, 1])],
    draftTokens: [1],
    uniforms: [0.999, 0.1],
  });
  assert.equal(yes.accepted, 1);
  const no = acceptDraft({
    targetProbs: p,
    draftProbs: [f32([0, 0, 1])],
    draftTokens: [2],
    uniforms: [0, 0.6],
  });
  // Residual max(0, p - q) = [0.5, 0.5, 0]; u = 0.6 picks id 1.
  assert.deepEqual(no, { accepted: 0, tokens: [1] });
  assert.throws(
    () => acceptDraft({ targetProbs: p, draftProbs: [], draftTokens: [1], uniforms: [0, 0] }),
    /k \+ 1 target rows/,
  );
});

const TEST_DOMAIN = 99;

for (const pair of PAIRS) {
  Deno.test(
    `acceptDraft() emits tokens distributed as p (chi-square p-value > 0.001, ${TRIALS} trials): ${pair.name}`,
    () => {
      // k = 2, every position uses (p, q): the first emitted token (x_0 or the residual draw) and
      // the second (x_1, its residual draw, or never when x_0 was rejected) must both follow p.
      const p0 = f32(pair.p), q0 = f32(pair.q);
      const first = new Array(8).fill(0), second = new Array(8).fill(0);
      let accepted0 = 0;
      for (let t = 0; t < TRIALS; t++) {
        const x = [0, 1].map((i) => sampleFrom(q0, rngUniform(5, TEST_DOMAIN, t, 0, i)));
        const r = acceptDraft({
          targetProbs: [p0, p0, p0],
          draftProbs: [q0, q0],
          draftTokens: x,
          uniforms: acceptUniforms(11, t, 0, 2),
        });
        first[r.tokens[0]]++;
        if (r.tokens.length > 1) second[r.tokens[1]]++;
        if (r.accepted > 0) accepted0++;
      }
      const c1 = chiSquareTest(first, pair.p), c2 = chiSquareTest(second, pair.p);
      assert.ok(c1.pValue > 0.001, `first token: chi2 ${c1.stat} df ${c1.df} p ${c1.pValue}`);
      assert.ok(c2.pValue > 0.001, `second token: chi2 ${c2.stat} df ${c2.df} p ${c2.pValue}`);
      // The acceptance rate is sum(min(p, q)) (Leviathan et al., alpha); allow 5 sigma.
      const alpha = pair.p.reduce((s, pj, j) => s + Math.min(pj, pair.q[j]), 0);
      const sd = Math.sqrt((alpha * (1 - alpha)) / TRIALS) + 1e-9;
      assert.ok(
        Math.abs(accepted0 / TRIALS - alpha) <= 5 * sd + 1e-12,
        `rate ${accepted0 / TRIALS} vs ${alpha}`,
      );
    },
  );
}
