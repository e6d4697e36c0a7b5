/**
 * Multi-candidate recursive rejection sampling (engine/tree_sampling.ts): the emitted tokens
 * follow the target's distribution (chi-square) on crafted p/q with several children per node,
 * children drawn with and without replacement, at one node and along a two-level tree; a broken
 * rule (no residual update) is caught by the same test.
 */
import assert from "@specdec/assert";
import { chiSquareTest, rngUniform } from "../engine/speculative_math.ts";
import {
  type CandidateDraw,
  drawCandidates,
  multiCandidateAccept,
  treeAcceptSampled,
} from "../engine/tree_sampling.ts";
import { PAIRS, TRIALS } from "./spec_cases.ts";

const DRAWS: CandidateDraw[] = ["with-replacement", "without-replacement"];
/** RNG domains of these tests (any fixed values: the draws only need to be independent). */
const DRAFT = 11, ACCEPT = 12;

/** The first emitted token's counts over TRIALS trials at one node with `m` drafted children. */
function nodeCounts(
  p: number[],
  q: number[],
  m: number,
  draw: CandidateDraw,
  seed: number,
  accept = multiCandidateAccept,
): number[] {
  const counts = new Array(p.length).fill(0);
  for (let t = 0; t < TRIALS; t++) {
    const ud = Array.from({ length: m }, (_, i) => rngUniform(seed, DRAFT, 0, t, i));
    const xs = drawCandidates(q, m, ud, draw);
    const ua = Array.from({ length: xs.length + 1 }, (_, i) => rngUniform(seed, ACCEPT, 0, t, i));
    counts[accept(p, q, xs, ua, draw).token]++;
  }
  return counts;
}

Deno.test("multiCandidateAccept() accepts a child by min(1, r/q) and updates the residual", () => {
  const p = [0.6, 0.4, 0, 0], q = [0.2, 0.2, 0.3, 0.3];
  // Child 0 (token 2, p = 0) is rejected; r = norm(max(0, p - q)) = (2/3, 1/3, 0, 0); child 1
  // (token 0): accept iff u * 0.2 < 2/3, always.
  assert.deepEqual(multiCandidateAccept(p, q, [2, 0], [0.9, 0.99, 0.5], "with-replacement"), {
    child: 1,
    token: 0,
  });
  // Without replacement q drops token 2 and becomes (2/7, 2/7, 0, 3/7); token 3 then fails
  // (r = 0) and the final draw comes from the residual norm(max(0, r - q)) = (8/9, 1/9, 0, 0).
  assert.deepEqual(multiCandidateAccept(p, q, [2, 3], [0.1, 0.1, 0.7], "without-replacement"), {
    child: -1,
    token: 0,
  });
  // No children: a draw from p.
  assert.equal(multiCandidateAccept(p, q, [], [0.7], "with-replacement").token, 1);
  assert.throws(() => multiCandidateAccept(p, q, [1], [0.5], "with-replacement"), /need 2/);
});

for (const draw of DRAWS) {
  Deno.test(`multi-candidate acceptance keeps p at one node, 1..4 children (${draw})`, () => {
    for (const [i, { name, p, q }] of PAIRS.entries()) {
      for (const m of [1, 2, 3, 4]) {
        const counts = nodeCounts(p, q, m, draw, 100 * i + m);
        const { pValue, stat, df } = chiSquareTest(counts, p);
        // Fixed seeds make this deterministic; a wrong rule gives p-values << 1e-3.
        assert.ok(
          pValue > 1e-3,
          `${name}, m=${m}: chi-square ${stat.toFixed(1)}/${df}, p ${pValue}`,
        );
      }
    }
  });
}

Deno.test("the chi-square test catches a rule that skips the residual update", () => {
  // Without r ← norm(max(0, r − q)) between siblings, the siblings' tokens are over-accepted.
  const broken: typeof multiCandidateAccept = (p, q, xs, u) => {
    for (let i = 0; i < xs.length; i++) {
      if (u[i] * q[xs[i]] < p[xs[i]]) return { child: i, token: xs[i] };
    }
    const r = Array.from(p, (x, j) => Math.max(0, x - q[j]));
    const mass = r.reduce((a, b) => a + b, 0);
    let acc = 0;
    for (let j = 0; j < r.length; j++) {
      acc += r[j] / mass;
      if (acc > u[xs.length]) return { child: -1, token: j };
    }
    return { child: -1, token: r.length - 1 };
  };
  const { p, q } = PAIRS[0];
  const { pValue } = chiSquareTest(nodeCounts(p, q, 3, "with-replacement", 7, broken), p);
  assert.ok(pValue < 1e-6, `broken rule not detected: p-value ${pValue}`);
});

for (const draw of DRAWS) {
  Deno.test(`a two-level sampled tree emits pairs distributed as p1(a) p2(b | a) (${draw})`, () => {
    // Root: 3 children from q1; each child: 2 children from q2[a]. The second token comes from
    // the tree when the walk reaches depth 2, else (as the next cycle would) from p2[a] itself.
    const V = 8;
    const { p: p1, q: q1 } = PAIRS[0];
    const rot = (x: number[], s: number) => x.map((_, j) => x[(j + s) % V]);
    const p2 = Array.from({ length: V }, (_, a) => rot(PAIRS[a % 4].p, a));
    const q2 = Array.from({ length: V }, (_, a) => rot(PAIRS[(a + 1) % 4].q, a + 3));
    const counts = new Array(V * V).fill(0), want = new Array(V * V).fill(0);
    for (let a = 0; a < V; a++) for (let b = 0; b < V; b++) want[a * V + b] = p1[a] * p2[a][b];
    for (let t = 0; t < TRIALS; t++) {
      let lane = 0;
      const ud = () => rngUniform(5, DRAFT, 0, t, lane++);
      const kids = drawCandidates(q1, 3, [ud(), ud(), ud()], draw);
      const parents = [-1], tokens = [0], targetProbs = [p1], draftProbs = [q1];
      for (const a of kids) {
        parents.push(0), tokens.push(a), targetProbs.push(p2[a]), draftProbs.push(q2[a]);
      }
      const level1 = parents.length;
      for (let c = 1; c < level1; c++) {
        const a = tokens[c];
        for (const b of drawCandidates(q2[a], 2, [ud(), ud()], draw)) {
          // Leaves: their p (unused by a two-token check) and q are placeholders.
          parents.push(c), tokens.push(b), targetProbs.push(p1), draftProbs.push(q1);
        }
      }
      const r = treeAcceptSampled(
        { parents, tokens, targetProbs, draftProbs },
        (node, n) => Array.from({ length: n }, (_, i) => rngUniform(5, ACCEPT, node, t, i)),
        draw,
      );
      const a = r.tokens[0];
      const b = r.tokens.length > 1
        ? r.tokens[1]
        : multiCandidateAccept(p2[a], q2[a], [], [rngUniform(5, ACCEPT, 99, t, 0)], draw).token;
      counts[a * V + b]++;
    }
    const { pValue, stat, df } = chiSquareTest(counts, want);
    assert.ok(pValue > 1e-3, `chi-square ${stat.toFixed(1)}/${df}, p ${pValue}`);
  });
}
