/** The automatic tree shape: a pure choice from a cost model and an acceptance estimate. */
import assert from "@specdec/assert";
import {
  chooseTreeShape,
  expectedAccepted,
  fitAcceptance,
  interpolateCost,
  levelAcceptance,
  treeCycleMs,
} from "../engine/tree_auto.ts";

type Points = [number, number][];
const ALL = { maxNodes: 64, maxWidth: 8 };
const nodes = (s: { depth: number; width: number }) => 1 + s.depth * s.width;

Deno.test("interpolateCost() is linear between points and past the last two", () => {
  const p: Points = [[1, 2], [9, 6], [17, 10]];
  assert.equal(interpolateCost(p, 1), 2);
  assert.equal(interpolateCost(p, 5), 4);
  assert.equal(interpolateCost(p, 13), 8);
  assert.equal(interpolateCost(p, 33), 18);
  assert.equal(interpolateCost([[1, 3]], 40), 3);
  assert.throws(() => interpolateCost([], 1), /at least one measured point/);
});

Deno.test("expectedAccepted() grows with depth and width and is 0 at zero acceptance", () => {
  assert.equal(expectedAccepted({ depth: 6, width: 8 }, 0), 0);
  assert.equal(levelAcceptance(1, 3), 1);
  assert.ok(Math.abs(expectedAccepted({ depth: 3, width: 1 }, 0.5) - 0.875) < 1e-12);
  assert.ok(
    expectedAccepted({ depth: 3, width: 2 }, 0.5) > expectedAccepted({ depth: 3, width: 1 }, 0.5),
  );
  assert.ok(
    expectedAccepted({ depth: 4, width: 1 }, 0.5) > expectedAccepted({ depth: 3, width: 1 }, 0.5),
  );
});

Deno.test("fitAcceptance() inverts expectedAccepted() and clamps", () => {
  for (const s of [{ depth: 1, width: 1 }, { depth: 6, width: 3 }, { depth: 3, width: 8 }]) {
    for (const a of [0.1, 0.45, 0.8]) {
      assert.ok(
        Math.abs(fitAcceptance(s, expectedAccepted(s, a)) - a) < 1e-6,
        `${s.depth}x${s.width} ${a}`,
      );
    }
  }
  assert.equal(fitAcceptance({ depth: 3, width: 2 }, 0), 0);
  assert.equal(fitAcceptance({ depth: 3, width: 2 }, 5), 0.99);
});

Deno.test("chooseTreeShape(): a verify as cheap for 64 rows as for 1 gives a big tree", () => {
  const cost = { verify: [[1, 10], [64, 10.5]] as Points, draft: [[1, 0.3], [8, 0.35]] as Points };
  const s = chooseTreeShape(cost, 0.7, ALL);
  assert.ok(s.width >= 2 && s.depth >= 6 && nodes(s) >= 33, `${s.depth}x${s.width}`);
});

Deno.test("chooseTreeShape(): a verify whose cost grows with every row gives a chain", () => {
  // Each extra verify row costs as much as the first: width buys less than it costs.
  const cost = { verify: [[1, 10], [64, 640]] as Points, draft: [[1, 0.3], [8, 2.4]] as Points };
  const s = chooseTreeShape(cost, 0.7, ALL);
  assert.equal(s.width, 1, `${s.depth}x${s.width}`);
});

Deno.test("chooseTreeShape(): zero acceptance gives the smallest tree", () => {
  const cost = { verify: [[1, 10], [64, 11]] as Points, draft: [[1, 0.3], [8, 0.4]] as Points };
  assert.deepEqual(chooseTreeShape(cost, 0, ALL), { depth: 1, width: 1 });
});

Deno.test("chooseTreeShape(): more acceptance never gives a shallower tree; limits hold", () => {
  const cost = {
    verify: [[1, 10], [9, 12], [64, 30]] as Points,
    draft: [[1, 1], [8, 1.5]] as Points,
  };
  let depth = 0;
  for (const a of [0.2, 0.4, 0.6, 0.8, 0.95]) {
    const s = chooseTreeShape(cost, a, ALL);
    assert.ok(s.depth >= depth, `alpha ${a}: ${s.depth}x${s.width} after depth ${depth}`);
    depth = s.depth;
    const small = chooseTreeShape(cost, a, { maxNodes: 17, maxWidth: 2 });
    assert.ok(nodes(small) <= 17 && small.width <= 2, `${small.depth}x${small.width}`);
  }
  // A costly draft: fewer levels than a free one at the same acceptance.
  const free = chooseTreeShape({ ...cost, draft: [[1, 0.01], [8, 0.01]] }, 0.8, ALL);
  const dear = chooseTreeShape({ ...cost, draft: [[1, 8], [8, 12]] }, 0.8, ALL);
  assert.ok(dear.depth < free.depth, `${dear.depth}x${dear.width} vs ${free.depth}x${free.width}`);
  assert.ok(treeCycleMs(dear, cost) > 0);
});
