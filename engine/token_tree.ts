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
