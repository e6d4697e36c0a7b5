/**
 * Greedy acceptance on a token tree, on the GPU: the target's argmax of every tree row (the
 * argmax kernel, one workgroup per row), then a walk from the root along the child whose token
 * is the argmax, exactly as `treeAcceptGreedy` in engine/token_tree.ts. Writes the tokens to
 * emit with their count (the commit kernel's input, as the chain's accept kernel does) and the
 * accepted path's node indices (the KV compaction's input).
 *
 * @module
 */
import type { Dispatch, Gpu } from "../engine/gpu.ts";
import { createArgmax } from "./argmax.ts";
import { TREE_MAX_NODES } from "../engine/token_tree.ts";

/** WGSL of the walk (one invocation: at most `nodes` steps of a scan over the nodes). */
export function treeWalkWgsl(): string {
  return /* wgsl */ `
// Tree walk: one invocation. From node 0, a = argmax[node]; the first child c of node (table
// parent word) with tokens[c] == a is accepted and the walk continues there; otherwise a is the
// bonus token. Writes outTokens[0..n] (accepted tokens, then the bonus), outCount = n + 1 and
// path[0..n] (node indices, path[0] = 0).
struct Params { nodes: u32, tokensOffset: u32, pad0: u32, pad1: u32 }
@group(0) @binding(0) var<storage, read> argmax: array<u32>;            // [nodes] target argmax per node
@group(0) @binding(1) var<storage, read> tokens: array<u32>;            // [nodes] node tokens at tokensOffset
@group(0) @binding(2) var<storage, read> tree: array<vec4<u32>>;        // ancestor table [nodes]: (lo, hi, depth, parent)
@group(0) @binding(3) var<storage, read_write> outTokens: array<u32>;   // [<= nodes] accepted + bonus
@group(0) @binding(4) var<storage, read_write> outCount: array<u32>;    // [1] accepted + 1
@group(0) @binding(5) var<storage, read_write> path: array<u32>;        // [<= nodes] accepted node indices
@group(0) @binding(6) var<uniform> p: Params;

@compute @workgroup_size(1)
fn main() {
  var node = 0u;
  var n = 0u;
  path[0] = 0u;
  loop {
    let a = argmax[node];
    outTokens[n] = a;
    var next = 0xffffffffu;
    for (var c = node + 1u; c < p.nodes; c++) {
      if (tree[c].w == node && tokens[p.tokensOffset + c] == a) { next = c; break; }
    }
    if (next == 0xffffffffu) { break; }
    n++;
    path[n] = next;
    node = next;
  }
  outCount[0] = n + 1u;
}
`;
}

/** Buffers and sizes for {@linkcode createTreeAccept}. */
export interface TreeAcceptArgs {
  /** Label prefix of the two dispatches. */
  label: string;
  /** targetLogits: [nodes, V] f32, row i = the target's logits after node i. */
  targetLogits: GPUBuffer;
  /** Node tokens: u32 from element `tokensOffset` (node 0 = the root). */
  tokens: GPUBuffer;
  /** Element offset of node 0's token; default 0. */
  tokensOffset?: number;
  /** Ancestor table `[nodes, 4] u32` (engine/token_tree.ts). */
  table: GPUBuffer;
  /** Scratch: [nodes] u32, the argmax of each row. */
  argmax: GPUBuffer;
  /** outTokens: [nodes] u32, accepted tokens then the bonus. */
  outTokens: GPUBuffer;
  /** outCount: [1] u32, accepted + 1. */
  outCount: GPUBuffer;
  /** path: [nodes] u32, node indices of the accepted path. */
  path: GPUBuffer;
  /** Tree nodes (1..64). */
  nodes: number;
  /** Vocabulary size. */
  V: number;
}

/** Builds the two dispatches: the argmax of every tree row, then the walk. */
export async function createTreeAccept(gpu: Gpu, args: TreeAcceptArgs): Promise<Dispatch[]> {
  const { label, nodes } = args;
  if (!Number.isInteger(nodes) || nodes < 1 || nodes > TREE_MAX_NODES) {
    throw new RangeError(`${label}: ${nodes} tree nodes outside [1, ${TREE_MAX_NODES}]`);
  }
  const argmax = await createArgmax(gpu, {
    label: `${label}.argmax`,
    logits: args.targetLogits,
    ids: args.argmax,
    T: nodes,
    V: args.V,
  });
  const pipeline = await gpu.pipeline("tree_walk", treeWalkWgsl);
  const params = new Uint32Array([nodes, args.tokensOffset ?? 0, 0, 0]);
  const walk: Dispatch = {
    label: `${label}.walk`,
    pipeline,
    bindGroup: gpu.bindGroup(`${label}.walk`, pipeline, [
      args.argmax,
      args.tokens,
      args.table,
      args.outTokens,
      args.outCount,
      args.path,
      gpu.uniform(`${label}.walk.params`, params),
    ]),
    workgroups: [1, 1, 1],
  };
  return [argmax, walk];
}
