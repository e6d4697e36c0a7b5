/**
 * Token trees for tree speculation, as plain data (no GPU): the layout of a tree's nodes in the
 * KV cache and the ancestor table the attention kernel reads.
 *
 * A tree of `n` nodes is laid out flat after the committed context: node 0 is the root (the last
 * committed token, not yet in the cache), node i sits in cache row `base + i`, and its parent has
 * a smaller index (breadth-first or any topological order). Node i is at RoPE position
 * `base + depth(i)`, so a path through the tree reads exactly as a chain would.
 *
 * The ancestor table, `[n, 4] u32` per node: words 0 and 1 are a 64-bit mask whose bit j is set
 * when node j is an ancestor of the node or the node itself; word 2 is the depth (root 0); word
 * 3 is the parent index as an i32 (-1 for the root). A chain is the tree whose node i has parent
 * i - 1 (mask bits 0..i, depth i).
 *
 * @module
 */

/** Most nodes of one token tree (the ancestor mask is 64 bits). */
export const TREE_MAX_NODES = 64;

/** u32 words per node in an ancestor table. */
export const TREE_WORDS = 4;

/**
 * Checks `parents` (parent index of each node, -1 for the root only at index 0, every parent
 * before its child) and returns the depth of each node.
 *
 * @example
 * ```ts
 * import { treeDepths } from "./token_tree.ts";
 * console.log(treeDepths([-1, 0, 0, 1])); // [0, 1, 1, 2]
 * ```
 */
export function treeDepths(parents: readonly number[]): number[] {
  const n = parents.length;
  if (n < 1 || n > TREE_MAX_NODES) {
    throw new RangeError(`a token tree needs 1..${TREE_MAX_NODES} nodes, got ${n}`);
  }
  if (parents[0] !== -1) throw new RangeError(`node 0 is the root: its parent must be -1`);
  const depth = [0];
  for (let i = 1; i < n; i++) {
    const p = parents[i];
    if (!Number.isInteger(p) || p < 0 || p >= i) {
      throw new RangeError(`node ${i}: parent ${p} must be an earlier node (0..${i - 1})`);
    }
    depth.push(depth[p] + 1);
  }
  return depth;
}

/**
 * The ancestor table of a tree given by `parents` (see the module doc): `[n, 4] u32`.
 *
 * @example
 * ```ts
 * import { treeTable } from "./token_tree.ts";
 * const t = treeTable([-1, 0, 0, 1]);
 * console.log(t[3 * 4], t[3 * 4 + 2]); // 0b1011 = 11 (nodes 0, 1, 3), depth 2
 * ```
 */
export function treeTable(parents: readonly number[]): Uint32Array {
  const depth = treeDepths(parents);
  const n = parents.length;
  const t = new Uint32Array(n * TREE_WORDS);
  for (let i = 0; i < n; i++) {
    const p = parents[i];
    if (p >= 0) t.set(t.subarray(p * TREE_WORDS, p * TREE_WORDS + 2), i * TREE_WORDS);
    t[i * TREE_WORDS + (i >> 5)] |= 1 << (i & 31);
    t[i * TREE_WORDS + 2] = depth[i];
    t[i * TREE_WORDS + 3] = p >>> 0;
  }
  return t;
}

/** Whether node `j` is node `i` or one of its ancestors, by the ancestor `table`. */
export function treeSees(table: Uint32Array, i: number, j: number): boolean {
  if (j < 0 || j >= TREE_MAX_NODES) return false;
  return ((table[i * TREE_WORDS + (j >> 5)] >>> (j & 31)) & 1) === 1;
}

/** The parents of a chain of `n` nodes: [-1, 0, 1, ..., n - 2]. */
export function chainParents(n: number): number[] {
  return Array.from({ length: n }, (_, i) => i - 1);
}

/** The outcome of accepting along a tree: the path, and the tokens to emit. */
export interface TreeAcceptResult {
  /** Node indices of the accepted path, `path[0] = 0` (the root) then one node per depth. */
  path: number[];
  /** The accepted nodes' tokens then the target's next token (`path.length` tokens). */
  tokens: number[];
}

/**
 * Greedy acceptance on a tree: from the root, follow the child whose token is the target's
 * argmax at the current node while one exists; the argmax at the last node is the bonus token.
 * `argmax[i]` is the target's greedy token after node i (from its row of the tree forward),
 * `tokens[i]` node i's token. Lossless: every emitted token is the target's greedy choice given
 * the accepted prefix. When several children carry the same token, the first one counts.
 *
 * @example
 * ```ts
 * import { treeAcceptGreedy } from "./token_tree.ts";
 * // root 0 with children 1 ("a" = 7) and 2 ("b" = 8); 2 has child 3 ("c" = 9)
 * const r = treeAcceptGreedy([-1, 0, 0, 2], [5, 7, 8, 9], [8, 0, 9, 4]);
 * console.log(r); // { path: [0, 2, 3], tokens: [8, 9, 4] }
 * ```
 */
export function treeAcceptGreedy(
  parents: readonly number[],
  tokens: readonly number[],
  argmax: ArrayLike<number>,
): TreeAcceptResult {
  treeDepths(parents);
  const path = [0], out: number[] = [];
  let node = 0;
  while (true) {
    const a = argmax[node];
    out.push(a);
    let next = -1;
    for (let c = node + 1; c < parents.length; c++) {
      if (parents[c] === node && tokens[c] === a) {
        next = c;
        break;
      }
    }
    if (next < 0) return { path, tokens: out };
    path.push(next);
    node = next;
  }
}

/** The static shape of a drafted tree: `depth` levels of `width` nodes under the root. */
export interface TreeShape {
  /** Levels below the root (the longest path the tree can accept). */
  readonly depth: number;
  /** Nodes per level, and candidates per expanded node. */
  readonly width: number;
}

/** Most nodes per level of a drafted tree (candidates per level: width², at most 64). */
export const TREE_MAX_WIDTH = 8;

/** Nodes of a drafted tree of `shape`, root included: 1 + depth * width. */
export function treeNodes(shape: TreeShape): number {
  return 1 + shape.depth * shape.width;
}

/**
 * The name "DEPTHxWIDTH" of `shape` (e.g. "6x3"), as {@linkcode parseTreeShape} reads it.
 *
 * @example
 * ```ts
 * import { treeShapeName } from "./token_tree.ts";
 * console.log(treeShapeName({ depth: 6, width: 3 })); // "6x3"
 * ```
 */
export function treeShapeName(shape: TreeShape): string {
  return `${shape.depth}x${shape.width}`;
}

/**
 * Parses and checks a tree shape "DEPTHxWIDTH" (e.g. "6x3"); the error says what is allowed.
 *
 * @example
 * ```ts
 * import { parseTreeShape } from "./token_tree.ts";
 * console.log(parseTreeShape("6x3")); // { depth: 6, width: 3 }
 * ```
 */
export function parseTreeShape(text: string): TreeShape {
  const m = /^(\d+)x(\d+)$/.exec(text.trim());
  if (!m) {
    throw new RangeError(`tree shape "${text}" is not DEPTHxWIDTH (e.g. 6x3)`);
  }
  return checkTreeShape({ depth: Number(m[1]), width: Number(m[2]) });
}

/** Checks `shape`: width 1..8, depth >= 1, 1 + depth * width <= 64 nodes. Returns it. */
export function checkTreeShape(shape: TreeShape): TreeShape {
  const { depth, width } = shape;
  if (!Number.isInteger(width) || width < 1 || width > TREE_MAX_WIDTH) {
    throw new RangeError(`tree width ${width} is outside [1, ${TREE_MAX_WIDTH}]`);
  }
  if (!Number.isInteger(depth) || depth < 1 || treeNodes(shape) > TREE_MAX_NODES) {
    throw new RangeError(
      `tree depth ${depth} x width ${width} needs ${1 + depth * width} nodes; a tree holds ` +
        `at most ${TREE_MAX_NODES} (depth <= ${
          Math.floor((TREE_MAX_NODES - 1) / width)
        } at width ${width})`,
    );
  }
  return shape;
}

/** One drafted node: its token, its parent node, and its path log-probability under the draft. */
export interface DraftedNode {
  /** Token id. */
  token: number;
  /** Parent node index. */
  parent: number;
  /** log q of the path from the root to this node. */
  score: number;
}

/**
 * The next level of a drafted tree (reference of kernels/tree_draft.ts): each of the `R` logits
 * rows (`logits: [R, V]`, row r = the draft after node `parentFirst + r`, whose path score is
 * `scores[r]`) proposes its `width` most likely tokens (ties: lower id first) with score
 * `scores[r] + log q(token)`, q = softmax(row); the level keeps the best `width` of these R x width
 * candidates (ties: lower row, then higher rank first), in that order.
 */
export function treeExpandRef(
  logits: Float32Array,
  R: number,
  V: number,
  width: number,
  parentFirst: number,
  scores: readonly number[],
): DraftedNode[] {
  const cands: (DraftedNode & { c: number })[] = [];
  for (let r = 0; r < R; r++) {
    const row = logits.subarray(r * V, (r + 1) * V);
    let m = -Infinity;
    for (const x of row) m = Math.max(m, x);
    let z = 0;
    for (const x of row) z += Math.exp(x - m);
    const order = Array.from({ length: V }, (_, j) => j)
      .sort((a, b) => row[b] - row[a] || a - b)
      .slice(0, width);
    order.forEach((j, i) =>
      cands.push({
        token: j,
        parent: parentFirst + r,
        score: scores[r] + (row[j] - m - Math.log(z)),
        c: r * width + i,
      })
    );
  }
  cands.sort((a, b) => b.score - a.score || a.c - b.c);
  return cands.slice(0, width).map(({ token, parent, score }) => ({ token, parent, score }));
}

/**
 * The fixed layout of a sampled tree of `shape` (temperature > 0): level 1 is `width` children
 * of the root, and each deeper level is `width` children of the previous level's first node (the
 * first-drawn child, the likeliest to be accepted). Multi-candidate rejection sampling
 * (engine/tree_sampling.ts) needs every node's children to be draws from q whose number does
 * not depend on the draws, which a layout fixed in advance guarantees; greedy trees may choose
 * their nodes by score instead (kernels/tree_draft.ts).
 *
 * @example
 * ```ts
 * import { sampledTreeParents } from "./token_tree.ts";
 * console.log(sampledTreeParents({ depth: 2, width: 2 })); // [-1, 0, 0, 1, 1]
 * ```
 */
export function sampledTreeParents(shape: TreeShape): number[] {
  checkTreeShape(shape);
  const parents = [-1];
  for (let d = 1; d <= shape.depth; d++) {
    const parent = d === 1 ? 0 : 1 + (d - 2) * shape.width;
    for (let i = 0; i < shape.width; i++) parents.push(parent);
  }
  return parents;
}
