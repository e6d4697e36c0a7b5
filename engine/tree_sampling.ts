/**
 * Lossless acceptance of a sampled token tree: multi-candidate recursive rejection sampling
 * (SpecInfer, Miao et al. 2024, and Sequoia, Chen et al. 2024), the tree form of speculative
 * sampling in engine/speculative_math.ts. Pure CPU math, the reference of any GPU version.
 *
 * At a node whose children carry tokens x_1..x_m drafted from the draft's distribution q at that
 * node, with the target's distribution p there, and r = p:
 *
 *   for i = 1..m:  accept x_i with probability min(1, r(x_i) / q(x_i))  → move to child i
 *                  else  r ← norm(max(0, r − q))                        (the residual)
 *                        ("without replacement": also q(x_i) ← 0, q ← norm(q))
 *   all rejected:  emit a draw from r and stop
 *
 * The emitted token follows p exactly when the children were drawn i.i.d. from q ("with
 * replacement", SpecInfer) or one after another from q renormalized without the earlier picks
 * ("without replacement", Sequoia). The walk repeats this from the accepted child; at a leaf, the
 * bonus token is drawn from the leaf's p (m = 0: r = p).
 *
 * @module
 */
import { sampleFrom } from "./speculative_math.ts";

/** How the children of a node were drawn from q (see the module doc). */
export type CandidateDraw = "with-replacement" | "without-replacement";

/** Outcome at one node: which child was accepted (-1: none), and the token it emits. */
export interface NodeAcceptResult {
  /** Index into the children of the accepted one, or -1 when all were rejected. */
  child: number;
  /** The accepted child's token, or the residual (or bonus) draw. */
  token: number;
}

function normalized(x: Float64Array<ArrayBuffer>): Float64Array<ArrayBuffer> | undefined {
  let mass = 0;
  for (const v of x) mass += v;
  if (!(mass > 0)) return undefined;
  for (let j = 0; j < x.length; j++) x[j] /= mass;
  return x;
}

/**
 * Multi-candidate rejection sampling at one node: children tokens `xs` (in order), the target's
 * `p` and the draft's `q` at the node, uniforms `u[0..m]` (`u[i]` decides child i as
 * `u[i] * q(x) < r(x)`, `u[m]` draws the final token). A residual of no mass (only possible
 * through rounding) keeps the previous r.
 *
 * @example
 * ```ts
 * import { multiCandidateAccept } from "./tree_sampling.ts";
 * const p = [0.5, 0.5, 0], q = [0, 0.5, 0.5];
 * // x = 2 has p = 0: rejected; the residual max(0, p - q) = (0.5, 0, 0) → token 0.
 * console.log(multiCandidateAccept(p, q, [2], [0.3, 0.7], "with-replacement"));
 * // { child: -1, token: 0 }
 * ```
 */
export function multiCandidateAccept(
  p: ArrayLike<number>,
  q: ArrayLike<number>,
  xs: readonly number[],
  u: readonly number[],
  draw: CandidateDraw,
): NodeAcceptResult {
  if (u.length !== xs.length + 1) {
    throw new Error(`multiCandidateAccept: need ${xs.length + 1} uniforms, got ${u.length}`);
  }
  let r: Float64Array<ArrayBuffer> = Float64Array.from(p);
  let qq: Float64Array<ArrayBuffer> = Float64Array.from(q);
  for (let i = 0; i < xs.length; i++) {
    const x = xs[i];
    if (u[i] * qq[x] < r[x]) return { child: i, token: x };
    const res = new Float64Array(r.length);
    for (let j = 0; j < r.length; j++) res[j] = Math.max(0, r[j] - qq[j]);
    r = normalized(res) ?? r;
    if (draw === "without-replacement") {
      const next = qq.slice();
      next[x] = 0;
      qq = normalized(next) ?? qq;
    }
  }
  return { child: -1, token: sampleFrom(r, u[xs.length]) };
}

/** A sampled token tree with the distributions at each node, for {@linkcode treeAcceptSampled}. */
export interface SampledTree {
  /** Parent of each node (-1 for the root, node 0), parents before children. */
  parents: readonly number[];
  /** Token of each node (the root's is the last committed token, unused here). */
  tokens: readonly number[];
  /** The target's processed distribution after each node. */
  targetProbs: readonly ArrayLike<number>[];
  /** The draft's distribution after each node (its children were drawn from it). */
  draftProbs: readonly ArrayLike<number>[];
}

/**
 * Walks a sampled tree from the root: at each node, {@linkcode multiCandidateAccept} over its
 * children in index order with uniforms `uniforms(node, count)`; an accepted child becomes the
 * current node, otherwise the draw is emitted and the walk stops. Returns the accepted path
 * (node indices from the root) and the emitted tokens (the accepted children, then the final
 * draw).
 */
export function treeAcceptSampled(
  tree: SampledTree,
  uniforms: (node: number, count: number) => number[],
  draw: CandidateDraw,
): { path: number[]; tokens: number[] } {
  const { parents } = tree;
  const path = [0], tokens: number[] = [];
  let node = 0;
  while (true) {
    const kids: number[] = [];
    // Children whose token is not an id (>= V: the drafter's q ran out) do not exist.
    const V = tree.targetProbs[node].length;
    for (let c = node + 1; c < parents.length; c++) {
      if (parents[c] === node && tree.tokens[c] < V) kids.push(c);
    }
    const r = multiCandidateAccept(
      tree.targetProbs[node],
      tree.draftProbs[node],
      kids.map((c) => tree.tokens[c]),
      uniforms(node, kids.length + 1),
      draw,
    );
    tokens.push(r.token);
    if (r.child < 0) return { path, tokens };
    node = kids[r.child];
    path.push(node);
  }
}

/**
 * `m` children drawn from `q` with uniforms `u[0..m)`: i.i.d. ("with-replacement") or each from
 * q renormalized without the earlier picks ("without-replacement"), as a tree drafter samples
 * them for {@linkcode multiCandidateAccept}.
 */
export function drawCandidates(
  q: ArrayLike<number>,
  m: number,
  u: readonly number[],
  draw: CandidateDraw,
): number[] {
  const qq = Float64Array.from(q);
  const xs: number[] = [];
  for (let i = 0; i < m; i++) {
    const x = sampleFrom(qq, u[i]);
    xs.push(x);
    if (draw === "without-replacement") {
      qq[x] = 0;
      if (!qq.some((v) => v > 0)) break; // q's support is used up: fewer children
    }
  }
  return xs;
}
