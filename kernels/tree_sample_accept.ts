/**
 * Sampled acceptance on a token tree, on the GPU: multi-candidate recursive rejection sampling
 * (SpecInfer / Sequoia) exactly as `treeAcceptSampled` in engine/tree_sampling.ts, with the
 * target's distributions processed from its logits (temperature, top-k, top-p) as the sampler
 * does. Writes the emitted tokens with their count (the commit's input) and the accepted path
 * (the KV compaction's input).
 *
 * @module
 */
import { type Dispatch, type Gpu, GpuError } from "../engine/gpu.ts";
import { processLogits, rngUniform, type SamplingParams } from "../engine/speculative_math.ts";
import { type CandidateDraw, treeAcceptSampled } from "../engine/tree_sampling.ts";
import { TREE_MAX_NODES } from "../engine/token_tree.ts";
import { checkSampling, checkWorkgroupSize, packParams, samplingLibWgsl } from "./sample.ts";

/** RNG domain of the tree acceptance (see {@linkcode treeSampleUniforms}). */
export const TREE_ACCEPT_DOMAIN = 3;

/** Default invocations per workgroup (one workgroup owns one tree of the batch). */
export const TREE_SAMPLE_WG = 256;

/**
 * The `count` uniforms the kernel draws at `node` of batch tree `b` when its RNG counter holds
 * `counter`: `rngUniform(seed, TREE_ACCEPT_DOMAIN, b * 64 + node, counter, i)`, i < count.
 */
export function treeSampleUniforms(
  seed: number,
  b: number,
  node: number,
  counter: number,
  count: number,
): number[] {
  return Array.from(
    { length: count },
    (_, i) => rngUniform(seed, TREE_ACCEPT_DOMAIN, b * TREE_MAX_NODES + node, counter, i),
  );
}

/** WGSL of the sampled tree acceptance. */
export function treeSampleAcceptWgsl(wg: number): string {
  return /* wgsl */ `
// Sampled tree acceptance: workgroup b owns tree b of the batch; ${wg} invocations. Invocation 0
// reads and advances the RNG counter, finds each node's children (table parent word, index
// order) and takes every accept/reject decision, broadcast through workgroup memory. At a node:
// all invocations write r = p (the processed target row, strided) and q' = q into scratch, then
// per child x: accept iff u * q'(x) < r(x); else r <- norm(max(0, r - q')) (kept when that has no
// mass) and, drawing without replacement, q'(x) <- 0, q' <- norm(q'). No child accepted: a draw
// from r (inverse CDF over the ids, samplingLibWgsl).
struct Params {
  V: u32, batch: u32, topK: u32, seed: u32,
  nodes: u32, counterIndex: u32, pad0: u32, pad1: u32,
  temperature: f32, topP: f32, withoutReplacement: u32, pad2: u32,
}
@group(0) @binding(0) var<storage, read> logits: array<f32>;          // target logits [batch, nodes, V]
@group(0) @binding(1) var<storage, read> draftProbs: array<f32>;      // q after each node [batch, nodes, V]
@group(0) @binding(2) var<storage, read> tokens: array<u32>;          // node tokens [batch, nodes]
@group(0) @binding(3) var<storage, read> tree: array<vec4<u32>>;      // ancestor table [nodes]: (lo, hi, depth, parent)
@group(0) @binding(4) var<storage, read_write> outTokens: array<u32>; // [batch, nodes] emitted tokens
@group(0) @binding(5) var<storage, read_write> outCount: array<u32>;  // [batch] emitted count
@group(0) @binding(6) var<storage, read_write> path: array<u32>;      // [batch, nodes] accepted nodes
@group(0) @binding(7) var<storage, read_write> state: array<u32>;     // state[counterIndex + b]: RNG counter
@group(0) @binding(8) var<storage, read_write> res: array<f32>;       // scratch [batch, 2, V]: r, then q'
@group(0) @binding(9) var<uniform> P: Params;

${samplingLibWgsl(wg)}

struct W { base: u32 }
fn weightOf(w: W, j: u32) -> f32 { return res[w.base + j]; }

var<workgroup> bcastChild: u32;
var<workgroup> bcastOk: u32;

@compute @workgroup_size(${wg})
fn main(@builtin(local_invocation_id) l3: vec3u, @builtin(workgroup_id) g3: vec3u) {
  let lid = l3.x;
  let b = g3.x;
  let V = P.V;
  let R = b * 2u * V;
  let Q = R + V;
  if (lid == 0u) {
    let c = state[P.counterIndex + b];
    bcastU = c;
    state[P.counterIndex + b] = c + 1u;
  }
  let counter = workgroupUniformLoad(&bcastU);
  workgroupBarrier();
  var node = 0u;
  var n = 0u;
  if (lid == 0u) { path[b * P.nodes] = 0u; }
  loop {
    let base = (b * P.nodes + node) * V;
    let plan = planRow(lid, base, V, P.temperature, P.topK, P.topP);
    for (var j = lid; j < V; j += WG) {
      res[R + j] = keptWeight(logits[base + j], plan.thr, plan.m, P.temperature) / plan.z;
      res[Q + j] = draftProbs[base + j];
    }
    storageBarrier();
    workgroupBarrier();
    let row = b * ${TREE_MAX_NODES}u + node;
    var i = 0u;
    var cursor = node + 1u;
    var accepted = NONE;
    loop {
      if (lid == 0u) {
        var c = cursor;
        loop {
          if (c >= P.nodes || tree[c].w == node) { break; }
          c++;
        }
        bcastChild = c;
      }
      let c = workgroupUniformLoad(&bcastChild);
      if (c >= P.nodes) { break; }
      cursor = c + 1u;
      let x = tokens[b * P.nodes + c];
      if (x >= V) { continue; } // no child (the drafter's q ran out): nothing to decide
      if (lid == 0u) {
        let u = rngUniform(P.seed, ${TREE_ACCEPT_DOMAIN}u, row, counter, i);
        bcastOk = select(0u, 1u, u * res[Q + x] < res[R + x]);
      }
      let ok = workgroupUniformLoad(&bcastOk);
      if (ok != 0u) { accepted = c; break; }
      // r <- norm(max(0, r - q')), unless that has no mass.
      var s = 0.0;
      for (var j = lid; j < V; j += WG) { s += max(0.0, res[R + j] - res[Q + j]); }
      let mass = wgSum(lid, s);
      if (mass > 0.0) {
        for (var j = lid; j < V; j += WG) { res[R + j] = max(0.0, res[R + j] - res[Q + j]) / mass; }
      }
      storageBarrier();
      workgroupBarrier();
      if (P.withoutReplacement != 0u) {
        var t = 0.0;
        for (var j = lid; j < V; j += WG) { t += select(res[Q + j], 0.0, j == x); }
        let qm = wgSum(lid, t);
        if (qm > 0.0) {
          for (var j = lid; j < V; j += WG) { res[Q + j] = select(res[Q + j], 0.0, j == x) / qm; }
        }
        storageBarrier();
        workgroupBarrier();
      }
      i++;
    }
    if (accepted != NONE) {
      if (lid == 0u) {
        outTokens[b * P.nodes + n] = tokens[b * P.nodes + accepted];
        path[b * P.nodes + n + 1u] = accepted;
      }
      n++;
      node = accepted;
      continue;
    }
    let u = rngUniform(P.seed, ${TREE_ACCEPT_DOMAIN}u, row, counter, i);
    var tok = sampleChunked(lid, V, W(R), u);
    if (tok == NONE) { tok = plan.argmax; } // r without mass (never with exact arithmetic)
    if (lid == 0u) {
      outTokens[b * P.nodes + n] = tok;
      outCount[b] = n + 1u;
    }
    break;
  }
}
`;
}

/** Buffers and settings for {@linkcode createTreeSampleAccept}. */
export interface TreeSampleAcceptArgs extends SamplingParams {
  /** Label of the dispatch. */
  label: string;
  /** Target logits `[batch, nodes, V]` f32 (row i: after node i). */
  targetLogits: GPUBuffer;
  /** Draft distributions `[batch, nodes, V]` f32 (row i: q after node i, its children's source). */
  draftProbs: GPUBuffer;
  /** Node tokens `[batch, nodes]` u32. */
  tokens: GPUBuffer;
  /** Ancestor table `[nodes, 4] u32` shared by the batch (engine/token_tree.ts). */
  table: GPUBuffer;
  /** Output `[batch, nodes]` u32: accepted tokens, then the final draw. */
  outTokens: GPUBuffer;
  /** Output `[batch]` u32: the number of emitted tokens (accepted + 1). */
  outCount: GPUBuffer;
  /** Output `[batch, nodes]` u32: the accepted path's node indices (path[0] = 0). */
  path: GPUBuffer;
  /** `state[counterIndex + b]`: tree b's RNG counter, advanced once per dispatch. */
  state: GPUBuffer;
  /** Scratch of at least `batch * 2 * V` f32. */
  scratch: GPUBuffer;
  /** Tree nodes (1..64). */
  nodes: number;
  /** Vocabulary size. */
  V: number;
  /** RNG seed (u32). */
  seed: number;
  /** How the children were drawn from q. */
  draw: CandidateDraw;
  /** Independent trees, one workgroup each; default 1. */
  batch?: number;
  /** Index of tree 0's counter in `state`; default 0. */
  counterIndex?: number;
  /** Invocations per workgroup (power of two, 1..256); default {@linkcode TREE_SAMPLE_WG}. */
  workgroupSize?: number;
}

/** Builds the sampled tree acceptance dispatch (temperature > 0). */
export async function createTreeSampleAccept(
  gpu: Gpu,
  args: TreeSampleAcceptArgs,
): Promise<Dispatch> {
  const wg = args.workgroupSize ?? TREE_SAMPLE_WG, batch = args.batch ?? 1;
  checkWorkgroupSize(gpu, args.label, wg);
  checkSampling(args.label, args);
  if (!(args.temperature > 0)) {
    throw new GpuError(
      args.label,
      "sampled tree acceptance needs temperature > 0 (greedy: tree_accept.ts)",
    );
  }
  if (!Number.isInteger(args.nodes) || args.nodes < 1 || args.nodes > TREE_MAX_NODES) {
    throw new GpuError(args.label, `${args.nodes} tree nodes outside [1, ${TREE_MAX_NODES}]`);
  }
  if (args.scratch.size < batch * 2 * args.V * 4) {
    throw new GpuError(
      args.label,
      `scratch of ${args.scratch.size} bytes < ${batch * 2 * args.V * 4}`,
    );
  }
  const pipeline = await gpu.pipeline(`tree_sample_accept.wg${wg}`, () => treeSampleAcceptWgsl(wg));
  const raw = packParams(
    [
      args.V,
      batch,
      args.topK >= args.V ? 0 : args.topK,
      args.seed,
      args.nodes,
      args.counterIndex ?? 0,
    ],
    args.temperature,
    args.topP,
  );
  raw[10] = args.draw === "without-replacement" ? 1 : 0;
  return {
    label: args.label,
    pipeline,
    bindGroup: gpu.bindGroup(args.label, pipeline, [
      args.targetLogits,
      args.draftProbs,
      args.tokens,
      args.table,
      args.outTokens,
      args.outCount,
      args.path,
      args.state,
      args.scratch,
      gpu.uniform(`${args.label}.params`, raw),
    ]),
    workgroups: [batch, 1, 1],
  };
}

/**
 * CPU reference of one tree of the batch: process the target rows with `params`, then
 * `treeAcceptSampled` with the uniforms the kernel draws for (seed, b, counter).
 */
export function treeSampleAcceptRef(
  tree: { parents: readonly number[]; tokens: readonly number[] },
  targetLogits: readonly Float32Array[],
  draftProbs: readonly ArrayLike<number>[],
  params: SamplingParams,
  draw: CandidateDraw,
  seed: number,
  b: number,
  counter: number,
): { path: number[]; tokens: number[] } {
  return treeAcceptSampled(
    { ...tree, targetProbs: targetLogits.map((l) => processLogits(l, params)), draftProbs },
    (node, count) => treeSampleUniforms(seed, b, node, counter, count),
    draw,
  );
}
