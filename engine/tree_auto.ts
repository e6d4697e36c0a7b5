/**
 * The automatic tree shape (`--draft-tree auto`): a pure choice of `depth x width` from a measured
 * cost model and a running acceptance estimate, maximizing expected tokens per unit of time.
 *
 * Cost of one tree cycle of shape D x W (what engine/decode.ts issues):
 *   draft(1)            the root through the draft
 *   + D · draft(W)      levels 1..D-1 through the draft, and the last level into its cache
 *   + verify(1 + D·W)   the target's forward over every node
 * where draft(R) and verify(R) are measured once per load at a few row counts (interpolated
 * linearly between them, {@linkcode interpolateCost}).
 *
 * Acceptance: the walk reaches depth d when every level above it held the target's token. With
 * `a(W)` the chance that one level of width W holds it (given the walk got there), the expected
 * number of accepted draft tokens is L(D, W) = Σ_{d=1..D} a(W)^d, and a cycle emits 1 + L tokens.
 * a(W) = 1 − (1 − α)^(1 + κ·(W − 1)): α is the top-1 acceptance, and each extra candidate of a
 * level counts as κ of an independent top-1 try (later ranks are likelier misses). So α = 0 gives
 * a = 0 whatever the width, and α = 1 gives 1. α is estimated from the observed mean accepted
 * length of the shapes run so far (inverting L, {@linkcode fitAcceptance}); κ is a fixed prior
 * ({@linkcode TREE_AUTO_RANK_WEIGHT}), since the readback carries accepted counts only, not which
 * rank was accepted.
 *
 * @module
 */
import { TREE_MAX_NODES, TREE_MAX_WIDTH, type TreeShape } from "./token_tree.ts";

/** Measured costs: `[rows, ms]` points, sorted by rows, for the target's and the draft's forward. */
export interface TreeCostModel {
  /** The target's forward over `rows` rows (a verify), in ms. */
  readonly verify: readonly (readonly [number, number])[];
  /** The draft's forward over `rows` rows (one tree level), in ms. */
  readonly draft: readonly (readonly [number, number])[];
}

/** Limits on the shapes the decoder can run. */
export interface TreeLimits {
  /** Most nodes (root included) the target verifies in one forward (≤ 64). */
  readonly maxNodes: number;
  /** Most rows the draft takes per level (≤ 8). */
  readonly maxWidth: number;
}

/** How much one extra candidate of a level counts against a top-1 try (the prior κ). */
export const TREE_AUTO_RANK_WEIGHT = 0.5;

/**
 * The cost at `rows` from measured `[rows, ms]` points: linear between neighbours, extended
 * linearly past the last two points, never below the first point's cost.
 *
 * @example
 * ```ts
 * import { interpolateCost } from "./tree_auto.ts";
 * console.log(interpolateCost([[1, 2], [9, 6]], 5)); // 4
 * ```
 */
export function interpolateCost(points: readonly (readonly [number, number])[], rows: number) {
  if (points.length === 0) throw new RangeError("a cost model needs at least one measured point");
  if (points.length === 1 || rows <= points[0][0]) return points[0][1];
  let i = 1;
  while (i < points.length - 1 && points[i][0] < rows) i++;
  const [r0, c0] = points[i - 1], [r1, c1] = points[i];
  const c = c0 + (c1 - c0) * (rows - r0) / Math.max(1e-9, r1 - r0);
  return Math.max(points[0][1], c);
}

/** Chance that one level of `width` candidates holds the target's token: 1 − (1 − α)^(1 + κ(W−1)). */
export function levelAcceptance(
  alpha: number,
  width: number,
  kappa = TREE_AUTO_RANK_WEIGHT,
): number {
  return 1 - (1 - alpha) ** (1 + kappa * (width - 1));
}

/** Expected accepted draft tokens of a `shape` tree at top-1 acceptance `alpha`: Σ a(W)^d. */
export function expectedAccepted(
  shape: TreeShape,
  alpha: number,
  kappa = TREE_AUTO_RANK_WEIGHT,
): number {
  const a = levelAcceptance(alpha, shape.width, kappa);
  let sum = 0, pow = 1;
  for (let d = 1; d <= shape.depth; d++) sum += pow *= a;
  return sum;
}

/** ms of one tree cycle of `shape` under `cost` (see the module doc). */
export function treeCycleMs(shape: TreeShape, cost: TreeCostModel): number {
  const { depth, width } = shape;
  return interpolateCost(cost.draft, 1) + depth * interpolateCost(cost.draft, width) +
    interpolateCost(cost.verify, 1 + depth * width);
}

/**
 * The shape maximizing expected tokens per ms, (1 + L(D, W)) / cycle ms, over every shape within
 * `limits`; ties go to the smaller tree. With no acceptance (α = 0) every shape emits one token a
 * cycle, so the cheapest wins (1x1 when costs grow with rows).
 *
 * @example
 * ```ts
 * import { chooseTreeShape } from "./tree_auto.ts";
 * // A verify that costs the same for 1 or 64 rows and a cheap draft: a wide, deep tree.
 * const flat = { verify: [[1, 10], [64, 10]] as [number, number][], draft: [[1, 0.5], [8, 0.5]] as [number, number][] };
 * console.log(chooseTreeShape(flat, 0.8, { maxNodes: 64, maxWidth: 8 }));
 * ```
 */
export function chooseTreeShape(
  cost: TreeCostModel,
  alpha: number,
  limits: TreeLimits,
  kappa = TREE_AUTO_RANK_WEIGHT,
): TreeShape {
  const maxNodes = Math.min(TREE_MAX_NODES, limits.maxNodes);
  const maxWidth = Math.min(TREE_MAX_WIDTH, limits.maxWidth);
  if (maxNodes < 2 || maxWidth < 1) {
    throw new RangeError(`no tree fits: ${maxNodes} nodes, width ${maxWidth}`);
  }
  const a = Math.min(0.999, Math.max(0, alpha));
  let best: TreeShape = { depth: 1, width: 1 }, bestValue = -Infinity, bestNodes = 2;
  for (let width = 1; width <= maxWidth; width++) {
    for (let depth = 1; 1 + depth * width <= maxNodes; depth++) {
      const shape = { depth, width };
      const value = (1 + expectedAccepted(shape, a, kappa)) / treeCycleMs(shape, cost);
      const nodes = 1 + depth * width;
      if (value > bestValue * (1 + 1e-9) || (value >= bestValue && nodes < bestNodes)) {
        best = shape;
        bestValue = value;
        bestNodes = nodes;
      }
    }
  }
  return best;
}

/**
 * The top-1 acceptance α that explains a mean of `meanAccepted` accepted draft tokens per cycle
 * with trees of `shape` (inverts {@linkcode expectedAccepted} by bisection; clamped to [0, 0.99]).
 *
 * @example
 * ```ts
 * import { expectedAccepted, fitAcceptance } from "./tree_auto.ts";
 * const s = { depth: 4, width: 2 };
 * console.log(fitAcceptance(s, expectedAccepted(s, 0.5)).toFixed(3)); // 0.500
 * ```
 */
export function fitAcceptance(
  shape: TreeShape,
  meanAccepted: number,
  kappa = TREE_AUTO_RANK_WEIGHT,
) {
  let lo = 0, hi = 0.99;
  if (meanAccepted <= expectedAccepted(shape, lo, kappa)) return lo;
  if (meanAccepted >= expectedAccepted(shape, hi, kappa)) return hi;
  for (let i = 0; i < 50; i++) {
    const mid = (lo + hi) / 2;
    if (expectedAccepted(shape, mid, kappa) < meanAccepted) lo = mid;
    else hi = mid;
  }
  return (lo + hi) / 2;
}
