/**
 * One level of tree drafting on the GPU (reference: `treeExpandRef` in engine/token_tree.ts):
 * from the draft's logits after the R nodes of the current level, propose each node's `width`
 * most likely tokens and keep the best `width` of those R x width candidates by path score
 * (log q of the path), as the next level's nodes: their tokens go to the tree's token row, their
 * scores, depths, parents and ancestor masks to the tree's tables, where the next draft forward
 * (same ancestor table) and the target's verify read them.
 *
 * @module
 */
import { type Dispatch, type Gpu, GpuError } from "../engine/gpu.ts";
import { TREE_MAX_NODES, TREE_MAX_WIDTH } from "../engine/token_tree.ts";
import { processLogits, rngUniform, type SamplingParams } from "../engine/speculative_math.ts";
import { drawCandidates } from "../engine/tree_sampling.ts";
import { checkSampling, packParams, samplingLibWgsl } from "./sample.ts";
import { argmaxSplit, lastArrivalWgsl } from "./argmax.ts";

/** Invocations per workgroup of the top-k pass. */
export const TREE_DRAFT_WG = 256;

/**
 * u32 words of the top-k scratch (row counters, then each slice's max, sum of exp and top
 * `width`) for any level of a tree of at most {@linkcode TREE_MAX_NODES} candidates over a
 * vocabulary of `V`; the decoder holds one.
 */
export function treeTopkScratchWords(V: number): number {
  // R rows x S slices x (2 + 2 width) words, R * width <= 64: at most 4 * 64 * S.
  return TREE_MAX_NODES + 4 * TREE_MAX_NODES * argmaxSplit(V).slices;
}

/** WGSL of the split per-row top-k pass. */
export function treeTopkWgsl(): string {
  const WG = TREE_DRAFT_WG;
  return /* wgsl */ `
// Tree top-k, split like kernels/argmax.ts: workgroup (s, r) scans slice s of logits row r. It
// reduces the slice's max m_s and sum of exp z_s = Σ exp(x - m_s), then width argmax passes,
// each over the ids that rank below the previous pick in (value desc, id asc) order (a strided
// scan, a tree reduction preferring the larger value and the lower id). With one slice it writes
// cand[r * width + i] = (id, log q) itself; else it leaves (m_s, z_s, picks) in the scratch and
// the last slice of the row to arrive merges: log Z = M + log Σ z_s exp(m_s - M), and width passes
// over the S x width picks (at most 256, one per invocation). The row's top width is among the
// slices' top widths, so the result is the one-pass result.
// Scratch words: [0, ${TREE_MAX_NODES}) row counters (back to 0 after use), then per (r, s) at
// ${TREE_MAX_NODES} + (r S + s)(2 + 2 width): m_s, z_s, width (value bits, id) pairs.
struct Params { V: u32, width: u32, S: u32, slice: u32 }
@group(0) @binding(0) var<storage, read> logits: array<f32>;         // [R, V] f32
@group(0) @binding(1) var<storage, read_write> cand: array<vec2<u32>>; // [R * width]: (id, bitcast log q)
@group(0) @binding(2) var<storage, read_write> part: array<atomic<u32>>; // scratch, see above
@group(0) @binding(3) var<uniform> p: Params;

const NONE = 0xffffffffu;
const LOWEST = -3.4028235e38;
var<workgroup> redV: array<f32, ${WG}>;
var<workgroup> redI: array<u32, ${WG}>;
var<workgroup> pickV: array<f32, ${TREE_MAX_WIDTH}>;
var<workgroup> pickI: array<u32, ${TREE_MAX_WIDTH}>;
var<workgroup> isLast: u32;

// (w, j) ranks before (v, i): a real id, and a larger value or the same value and a lower id.
fn better(v: f32, i: u32, w: f32, j: u32) -> bool {
  return j != NONE && (i == NONE || w > v || (w == v && j < i));
}

// (v, i) ranks after the previous pick (k = 0: no pick yet; an exhausted pass: nothing does).
fn below(k: u32, pv: f32, pi: u32, v: f32, i: u32) -> bool {
  return i != NONE && (k == 0u || (pi != NONE && (v < pv || (v == pv && i > pi))));
}

fn reduceMax(lid: u32, v: f32) -> f32 {
  redV[lid] = v;
  workgroupBarrier();
  for (var s = ${WG / 2}u; s > 0u; s >>= 1u) {
    if (lid < s) { redV[lid] = max(redV[lid], redV[lid + s]); }
    workgroupBarrier();
  }
  let r = workgroupUniformLoad(&redV[0]);
  return r;
}

fn reduceSum(lid: u32, v: f32) -> f32 {
  redV[lid] = v;
  workgroupBarrier();
  for (var s = ${WG / 2}u; s > 0u; s >>= 1u) {
    if (lid < s) { redV[lid] = redV[lid] + redV[lid + s]; }
    workgroupBarrier();
  }
  let r = workgroupUniformLoad(&redV[0]);
  return r;
}

// The best (value, id) over the workgroup; every invocation gets it.
fn reduceBest(lid: u32, v: f32, i: u32) -> vec2u {
  redV[lid] = v;
  redI[lid] = i;
  workgroupBarrier();
  for (var s = ${WG / 2}u; s > 0u; s >>= 1u) {
    if (lid < s && better(redV[lid], redI[lid], redV[lid + s], redI[lid + s])) {
      redV[lid] = redV[lid + s];
      redI[lid] = redI[lid + s];
    }
    workgroupBarrier();
  }
  let r = vec2u(bitcast<u32>(workgroupUniformLoad(&redV[0])), workgroupUniformLoad(&redI[0]));
  return r;
}

fn writeCand(r: u32, k: u32, v: f32, i: u32, logZ: f32) {
  // Fewer than width ids (V < width): an impossible candidate that is never kept first.
  let lq = select(v - logZ, -3.0e38, i == NONE);
  cand[r * p.width + k] = vec2<u32>(select(i, 0u, i == NONE), bitcast<u32>(lq));
}

@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wg: vec3u, @builtin(local_invocation_index) lid: u32) {
  let s = wg.x;
  let r = wg.y;
  let base = r * p.V;
  let start = s * p.slice;
  let end = min(start + p.slice, p.V);
  var m = LOWEST;
  for (var j = start + lid; j < end; j += ${WG}u) { m = max(m, logits[base + j]); }
  m = reduceMax(lid, m);
  var z = 0.0;
  for (var j = start + lid; j < end; j += ${WG}u) { z += exp(logits[base + j] - m); }
  z = reduceSum(lid, z);
  var prevV = 0.0;
  var prevI = NONE;
  for (var k = 0u; k < p.width; k++) {
    var bv = 0.0;
    var bi = NONE;
    for (var j = start + lid; j < end; j += ${WG}u) {
      let v = logits[base + j];
      if (below(k, prevV, prevI, v, j) && better(bv, bi, v, j)) { bv = v; bi = j; }
    }
    let w = reduceBest(lid, bv, bi);
    prevV = bitcast<f32>(w.x);
    prevI = w.y;
    if (lid == 0u) { pickV[k] = prevV; pickI[k] = prevI; }
  }
  workgroupBarrier();
  if (p.S == 1u) {
    if (lid < p.width) { writeCand(r, lid, pickV[lid], pickI[lid], m + log(z)); }
    return;
  }
  let pw = 2u + 2u * p.width;
  let at = ${TREE_MAX_NODES}u + (r * p.S + s) * pw;
  if (lid == 0u) {
    atomicStore(&part[at], bitcast<u32>(m));
    atomicStore(&part[at + 1u], bitcast<u32>(z));
  }
  if (lid < p.width) {
    atomicStore(&part[at + 2u + 2u * lid], bitcast<u32>(pickV[lid]));
    atomicStore(&part[at + 3u + 2u * lid], pickI[lid]);
  }
  ${lastArrivalWgsl("r", "p.S")}
  // The last slice merges: the normalizer over the slices' (m_s, z_s), then the top width of
  // their picks, candidate c = (slice c / width, pick c % width) held by invocation c.
  let row0 = ${TREE_MAX_NODES}u + r * p.S * pw;
  var ms = LOWEST;
  if (lid < p.S) { ms = bitcast<f32>(atomicLoad(&part[row0 + lid * pw])); }
  let M = reduceMax(lid, ms);
  var zs = 0.0;
  if (lid < p.S) { zs = bitcast<f32>(atomicLoad(&part[row0 + lid * pw + 1u])) * exp(ms - M); }
  let logZ = M + log(reduceSum(lid, zs));
  var cv = 0.0;
  var ci = NONE;
  if (lid < p.S * p.width) {
    let q = row0 + (lid / p.width) * pw + 2u + 2u * (lid % p.width);
    cv = bitcast<f32>(atomicLoad(&part[q]));
    ci = atomicLoad(&part[q + 1u]);
  }
  prevV = 0.0;
  prevI = NONE;
  for (var k = 0u; k < p.width; k++) {
    var bv = 0.0;
    var bi = NONE;
    if (below(k, prevV, prevI, cv, ci)) { bv = cv; bi = ci; }
    let w = reduceBest(lid, bv, bi);
    prevV = bitcast<f32>(w.x);
    prevI = w.y;
    if (lid == 0u) { writeCand(r, k, prevV, prevI, logZ); }
  }
}
`;
}

/** WGSL of the selection (one invocation over at most 64 candidates). */
export function treeSelectWgsl(): string {
  return /* wgsl */ `
// Tree select: one invocation. Candidate c (row c / width) scores scores[parentFirst + c / width]
// + log q; width rounds each take the best unchosen one (ties: lower c) as node newFirst + i:
// its token, score and table row (parent's ancestor mask plus itself, depth + 1, parent).
struct Params { R: u32, width: u32, parentFirst: u32, newFirst: u32, tokensOffset: u32, pad0: u32, pad1: u32, pad2: u32 }
@group(0) @binding(0) var<storage, read> cand: array<vec2<u32>>;         // [R * width]: (id, bitcast log q)
@group(0) @binding(1) var<storage, read_write> tokens: array<u32>;       // node tokens at tokensOffset
@group(0) @binding(2) var<storage, read_write> scores: array<f32>;       // [nodes] path log q (node 0: 0)
@group(0) @binding(3) var<storage, read_write> tree: array<vec4<u32>>;   // ancestor table [nodes]
@group(0) @binding(4) var<uniform> p: Params;

@compute @workgroup_size(1)
fn main() {
  var taken: array<bool, ${TREE_MAX_NODES}>;
  let n = p.R * p.width;
  for (var i = 0u; i < p.width; i++) {
    var best = 0u;
    var bestS = 0.0;
    var found = false;
    for (var c = 0u; c < n; c++) {
      let s = scores[p.parentFirst + c / p.width] + bitcast<f32>(cand[c].y);
      if (!taken[c] && (!found || s > bestS)) { best = c; bestS = s; found = true; }
    }
    taken[best] = true;
    let node = p.newFirst + i;
    let parent = p.parentFirst + best / p.width;
    let pm = tree[parent];
    var lo = pm.x;
    var hi = pm.y;
    if (node < 32u) { lo |= 1u << node; } else { hi |= 1u << (node - 32u); }
    tokens[p.tokensOffset + node] = cand[best].x;
    scores[node] = bestS;
    tree[node] = vec4<u32>(lo, hi, pm.z + 1u, parent);
  }
}
`;
}

/** Buffers and shapes for {@linkcode createTreeDraft}. */
export interface TreeDraftArgs {
  /** Label prefix of the two dispatches. */
  label: string;
  /** The draft's logits: [R, V] f32, row r = after node parentFirst + r. */
  logits: GPUBuffer;
  /** Scratch: [R * width] (u32 id, f32 log q) pairs. */
  cand: GPUBuffer;
  /**
   * The top-k scratch, at least {@linkcode treeTopkScratchWords}(V) u32 words, zeroed when
   * created; levels run one after another may share it.
   */
  scratch: GPUBuffer;
  /** Node tokens: u32 from element `tokensOffset`. */
  tokens: GPUBuffer;
  /** Element offset of node 0's token; default 0. */
  tokensOffset?: number;
  /** Path scores: [nodes] f32 (node 0's must be 0). */
  scores: GPUBuffer;
  /** Ancestor table `[nodes, 4] u32` (node 0's row set by the host). */
  table: GPUBuffer;
  /** Logits rows = nodes of the current level. */
  R: number;
  /** Candidates per row and nodes of the new level (1..8). */
  width: number;
  /** Node of logits row 0. */
  parentFirst: number;
  /** Node index of the new level's first node. */
  newFirst: number;
  /** Vocabulary size. */
  V: number;
}

/** Builds the two dispatches of one tree level: the split top-k per row, then the selection. */
export async function createTreeDraft(gpu: Gpu, args: TreeDraftArgs): Promise<Dispatch[]> {
  const { label, R, width, newFirst, parentFirst } = args;
  if (!Number.isInteger(width) || width < 1 || width > TREE_MAX_WIDTH) {
    throw new RangeError(`${label}: width ${width} outside [1, ${TREE_MAX_WIDTH}]`);
  }
  if (!Number.isInteger(R) || R < 1 || R * width > TREE_MAX_NODES) {
    throw new RangeError(`${label}: ${R} rows x width ${width} > ${TREE_MAX_NODES} candidates`);
  }
  if (parentFirst + R > newFirst || newFirst + width > TREE_MAX_NODES) {
    throw new RangeError(
      `${label}: nodes ${newFirst}..${newFirst + width - 1} must follow their parents ` +
        `${parentFirst}..${parentFirst + R - 1} within ${TREE_MAX_NODES} nodes`,
    );
  }
  const need = treeTopkScratchWords(args.V) * 4;
  if (args.scratch.size < need) {
    throw new RangeError(`${label}: top-k scratch of ${args.scratch.size} bytes < ${need}`);
  }
  const { slice, slices } = argmaxSplit(args.V);
  const topk = await gpu.pipeline(`tree_draft.topk.split.wg${TREE_DRAFT_WG}`, treeTopkWgsl);
  const select = await gpu.pipeline(`tree_draft.select.n${TREE_MAX_NODES}`, treeSelectWgsl);
  return [
    {
      label: `${label}.topk`,
      pipeline: topk,
      bindGroup: gpu.bindGroup(`${label}.topk`, topk, [
        args.logits,
        args.cand,
        args.scratch,
        gpu.uniform(`${label}.topk.params`, new Uint32Array([args.V, width, slices, slice])),
      ]),
      workgroups: [slices, R, 1],
    },
    {
      label: `${label}.select`,
      pipeline: select,
      bindGroup: gpu.bindGroup(`${label}.select`, select, [
        args.cand,
        args.tokens,
        args.scores,
        args.table,
        gpu.uniform(
          `${label}.select.params`,
          new Uint32Array([R, width, parentFirst, newFirst, args.tokensOffset ?? 0, 0, 0, 0]),
        ),
      ]),
      workgroups: [1, 1, 1],
    },
  ];
}

/** RNG domain of sampled tree drafting (see {@linkcode treeDraftUniforms}). */
export const TREE_DRAFT_DOMAIN = 4;

/**
 * The `count` uniforms the sampled drafter draws for the children of `node` when the RNG counter
 * holds `counter`: `rngUniform(seed, TREE_DRAFT_DOMAIN, node, counter, i)`, i < count.
 */
export function treeDraftUniforms(
  seed: number,
  node: number,
  counter: number,
  count: number,
): number[] {
  return Array.from(
    { length: count },
    (_, i) => rngUniform(seed, TREE_DRAFT_DOMAIN, node, counter, i),
  );
}

/** WGSL of the sampled drafter: one node's q and its children, drawn without replacement. */
export function treeDraftSampledWgsl(wg: number): string {
  return /* wgsl */ `
// Sampled tree drafting: one workgroup of ${wg} invocations owns one parent node: it processes the
// draft's logits row (temperature, top-k, top-p; samplingLibWgsl) into q, stores q as the node's
// row of probs, then draws width children from q without replacement (each draw an inverse CDF
// over q with the earlier picks zeroed). Invocation 0 reads and advances the RNG counter and
// writes the children's tokens; a draw from an exhausted q gives the id V (no child).
struct Params {
  V: u32, width: u32, topK: u32, seed: u32,
  parent: u32, newFirst: u32, counterIndex: u32, logitsRow: u32,
  temperature: f32, topP: f32, pad0: u32, pad1: u32,
}
@group(0) @binding(0) var<storage, read> logits: array<f32>;          // draft logits [rows, V]
@group(0) @binding(1) var<storage, read_write> probs: array<f32>;     // q per node [nodes, V]
@group(0) @binding(2) var<storage, read_write> tokens: array<u32>;    // node tokens [nodes]
@group(0) @binding(3) var<storage, read_write> state: array<u32>;     // state[counterIndex]: RNG counter
@group(0) @binding(4) var<uniform> P: Params;

${samplingLibWgsl(wg)}

var<workgroup> taken: array<u32, ${TREE_MAX_WIDTH}>;

struct W { base: u32, n: u32 }
fn weightOf(w: W, j: u32) -> f32 {
  for (var i = 0u; i < w.n; i++) { if (taken[i] == j) { return 0.0; } }
  return probs[w.base + j];
}

@compute @workgroup_size(${wg})
fn main(@builtin(local_invocation_id) l3: vec3u) {
  let lid = l3.x;
  let V = P.V;
  if (lid == 0u) {
    let c = state[P.counterIndex];
    bcastU = c;
    state[P.counterIndex] = c + 1u;
  }
  let counter = workgroupUniformLoad(&bcastU);
  workgroupBarrier();
  let base = P.logitsRow * V;
  let plan = planRow(lid, base, V, P.temperature, P.topK, P.topP);
  let qb = P.parent * V;
  for (var j = lid; j < V; j += WG) {
    probs[qb + j] = keptWeight(logits[base + j], plan.thr, plan.m, P.temperature) / plan.z;
  }
  storageBarrier();
  workgroupBarrier();
  for (var i = 0u; i < P.width; i++) {
    let u = rngUniform(P.seed, ${TREE_DRAFT_DOMAIN}u, P.parent, counter, i);
    let tok = sampleChunked(lid, V, W(qb, i), u);
    if (lid == 0u) {
      let t = select(tok, V, tok == NONE);
      taken[i] = t;
      tokens[P.newFirst + i] = t;
    }
    workgroupBarrier();
  }
}
`;
}

/** Buffers and settings for {@linkcode createTreeDraftSampled}. */
export interface TreeDraftSampledArgs extends SamplingParams {
  /** Label of the dispatch. */
  label: string;
  /** The draft's logits, `[rows, V]` f32; row `logitsRow` is the parent's. */
  logits: GPUBuffer;
  /** Row of `logits` after the parent node; default 0. */
  logitsRow?: number;
  /** q per node, `[nodes, V]` f32: the parent's row is written. */
  probs: GPUBuffer;
  /** Node tokens (u32): the children's are written at newFirst.. */
  tokens: GPUBuffer;
  /** `state[counterIndex]`: the RNG counter, advanced once per dispatch. */
  state: GPUBuffer;
  /** Index of the counter in `state`. */
  counterIndex: number;
  /** The parent node. */
  parent: number;
  /** Node index of the first child. */
  newFirst: number;
  /** Children to draw (1..8). */
  width: number;
  /** Vocabulary size. */
  V: number;
  /** RNG seed (u32). */
  seed: number;
}

/** Builds the sampled drafter's dispatch for one parent node (temperature > 0). */
export async function createTreeDraftSampled(
  gpu: Gpu,
  args: TreeDraftSampledArgs,
): Promise<Dispatch> {
  const { label, width } = args, wg = TREE_DRAFT_WG;
  checkSampling(label, args);
  if (!(args.temperature > 0)) {
    throw new GpuError(label, "sampled tree drafting needs temperature > 0 (greedy: top-k)");
  }
  if (!Number.isInteger(width) || width < 1 || width > TREE_MAX_WIDTH) {
    throw new GpuError(label, `width ${width} outside [1, ${TREE_MAX_WIDTH}]`);
  }
  if (args.newFirst <= args.parent || args.newFirst + width > TREE_MAX_NODES) {
    throw new GpuError(label, `children ${args.newFirst}.. must follow parent ${args.parent}`);
  }
  const pipeline = await gpu.pipeline(
    `tree_draft.sampled.wg${wg}.w${TREE_MAX_WIDTH}`,
    () => treeDraftSampledWgsl(wg),
  );
  const params = packParams(
    [
      args.V,
      width,
      args.topK >= args.V ? 0 : args.topK,
      args.seed,
      args.parent,
      args.newFirst,
      args.counterIndex,
      args.logitsRow ?? 0,
    ],
    args.temperature,
    args.topP,
  );
  return {
    label,
    pipeline,
    bindGroup: gpu.bindGroup(label, pipeline, [
      args.logits,
      args.probs,
      args.tokens,
      args.state,
      gpu.uniform(`${label}.params`, params),
    ]),
    workgroups: [1, 1, 1],
  };
}

/**
 * CPU reference of {@linkcode createTreeDraftSampled}: q = processLogits(logits row), then
 * `width` children by `drawCandidates(q, width, u, "without-replacement")` with the drafter's
 * uniforms; missing children (q exhausted) are the id V.
 */
export function treeDraftSampledRef(
  logits: Float32Array,
  params: SamplingParams,
  width: number,
  seed: number,
  parent: number,
  counter: number,
): { q: Float32Array; children: number[] } {
  const q = processLogits(logits, params);
  const u = treeDraftUniforms(seed, parent, counter, width);
  const xs = drawCandidates(q, width, u, "without-replacement");
  while (xs.length < width) xs.push(logits.length);
  return { q, children: xs };
}
