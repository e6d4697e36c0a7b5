/**
 * The GPU verify step of speculative decoding: given the target's logits at the k draft positions
 * and the next one, the draft's q rows and its k tokens, accept/reject on the GPU exactly as
 * `acceptDraft` in engine/speculative_math.ts and write the tokens to emit and their count.
 *
 * @module
 */
import { type Dispatch, type Gpu, GpuError } from "../engine/gpu.ts";
import {
  ACCEPT_DOMAIN,
  acceptDraft,
  type AcceptResult,
  acceptUniforms,
  processLogits,
  type SamplingParams,
} from "../engine/speculative_math.ts";
import { checkSampling, checkWorkgroupSize, packParams, samplingLibWgsl } from "./sample.ts";

/** Default invocations per workgroup (one workgroup owns one verify step). */
export const ACCEPT_WG = 256;

/** WGSL of the accept kernel. */
export function acceptWgsl(wg: number): string {
  return /* wgsl */ `
// Accept: workgroup b owns verify step b of a batch (normally 1): its k + 1 target rows are
// processed one after another by all ${wg} invocations (row work split as in samplingLibWgsl);
// invocation 0 alone reads/advances the RNG counter state[counterIndex + b], takes each
// accept/reject decision (broadcast through workgroup memory) and writes the outputs.
struct Params {
  V: u32, batch: u32, topK: u32, seed: u32,
  k: u32, counterIndex: u32, tokensOffset: u32, pad1: u32,
  temperature: f32, topP: f32, pad2: u32, pad3: u32,
}
@group(0) @binding(0) var<storage, read> logits: array<f32>;          // targetLogits: [batch, k + 1, V]
@group(0) @binding(1) var<storage, read> draftProbs: array<f32>;      // q: [batch, k, V] (unread when greedy)
@group(0) @binding(2) var<storage, read> draftTokens: array<u32>;     // [batch, k] from element tokensOffset
@group(0) @binding(3) var<storage, read_write> outTokens: array<u32>; // [batch, k + 1]
@group(0) @binding(4) var<storage, read_write> outCount: array<u32>;  // [batch]: accepted + 1
@group(0) @binding(5) var<storage, read_write> state: array<u32>;     // state[counterIndex + b]: RNG counter
@group(0) @binding(6) var<uniform> P: Params;

${samplingLibWgsl(wg)}

// mode 0: the target's kept weight; mode 1: the residual max(0, p_j - q_j) with p_j = e_j / z.
struct W { base: u32, thr: u32, m: f32, temperature: f32, mode: u32, z: f32, qbase: u32 }
fn weightOf(w: W, j: u32) -> f32 {
  let e = keptWeight(logits[w.base + j], w.thr, w.m, w.temperature);
  if (w.mode == 0u) { return e; }
  return max(0.0, e / w.z - draftProbs[w.qbase + j]);
}

var<workgroup> bcastAccept: u32;

@compute @workgroup_size(${wg})
fn main(@builtin(local_invocation_id) l3: vec3u, @builtin(workgroup_id) g3: vec3u) {
  let lid = l3.x;
  let b = g3.x;
  let k = P.k;
  let V = P.V;
  let greedy = P.temperature <= 0.0;
  if (lid == 0u) {
    let c = state[P.counterIndex + b];
    bcastU = c;
    state[P.counterIndex + b] = c + 1u;
  }
  let counter = workgroupUniformLoad(&bcastU);
  workgroupBarrier();
  // u_k: the one draw for the final token (residual or bonus).
  let uLast = rngUniform(P.seed, ${ACCEPT_DOMAIN}u, b, counter, k);
  var n = 0u;
  var plan: Plan;
  loop {
    if (n >= k) { break; }
    let base = (b * (k + 1u) + n) * V;
    let qbase = (b * k + n) * V;
    plan = planRow(lid, base, V, P.temperature, P.topK, P.topP);
    if (lid == 0u) {
      let x = draftTokens[P.tokensOffset + b * k + n];
      var ok = false;
      if (x < V) {
        if (greedy) {
          ok = x == plan.argmax;
        } else {
          // accept with probability min(1, p(x) / q(x)):  u_n * q(x) < p(x)
          let px = keptWeight(logits[base + x], plan.thr, plan.m, P.temperature) / plan.z;
          let u = rngUniform(P.seed, ${ACCEPT_DOMAIN}u, b, counter, n);
          ok = u * draftProbs[qbase + x] < px;
        }
      }
      if (ok) { outTokens[b * (k + 1u) + n] = x; }
      bcastAccept = select(0u, 1u, ok);
    }
    let accepted = workgroupUniformLoad(&bcastAccept);
    workgroupBarrier();
    if (accepted == 0u) { break; }
    n += 1u;
  }
  // The final token: at a rejection (n < k) from norm(max(0, p_n - q_n)) (falling back to p_n
  // if that is all zero); after k acceptances, the bonus from p_k. Greedy: argmax either way.
  let base = (b * (k + 1u) + n) * V;
  if (n >= k) { plan = planRow(lid, base, V, P.temperature, P.topK, P.topP); }
  var tok = plan.argmax;
  if (!greedy) {
    var w = W(base, plan.thr, plan.m, P.temperature, 0u, plan.z, (b * k + n) * V);
    if (n < k) {
      w.mode = 1u;
      tok = sampleChunked(lid, V, w, uLast);
      w.mode = 0u;
    }
    if (n >= k || tok == NONE) { tok = sampleChunked(lid, V, w, uLast); }
  }
  if (lid == 0u) {
    outTokens[b * (k + 1u) + n] = tok;
    outCount[b] = n + 1u;
  }
}
`;
}

/** Buffers and settings for {@linkcode createAccept}. */
export interface AcceptArgs extends SamplingParams {
  /** Label of the dispatch and its params buffer. */
  label: string;
  /** Target logits `[batch, k + 1, V]` f32 (the verify forward's k + 1 rows). */
  targetLogits: GPUBuffer | GPUBufferBinding;
  /** Draft distributions q `[batch, k, V]` f32, as written by the sampler's `probs` (unread when
   * temperature is 0, but a buffer must be bound). */
  draftProbs: GPUBuffer | GPUBufferBinding;
  /** Draft tokens `[batch, k]` u32. */
  draftTokens: GPUBuffer | GPUBufferBinding;
  /** Element offset of the first draft token in `draftTokens`; default 0. */
  draftTokensOffset?: number;
  /** Output `[batch, k + 1]` u32: accepted draft tokens then the correction/bonus token. */
  outTokens: GPUBuffer | GPUBufferBinding;
  /** Output `[batch]` u32: accepted + 1, the number of valid `outTokens`. */
  outCount: GPUBuffer | GPUBufferBinding;
  /**
   * `array<u32>`: `state[counterIndex + b]` is step b's RNG counter c; the kernel draws
   * `u_i = rngUniform(seed, ACCEPT_DOMAIN, b, c, i)` for i = 0..k (see `acceptUniforms`) and
   * increments c once per dispatch (also when greedy).
   */
  state: GPUBuffer | GPUBufferBinding;
  /** Draft length k >= 1. */
  k: number;
  /** Vocabulary size. */
  V: number;
  /** RNG seed (u32). */
  seed: number;
  /** Independent verify steps, one workgroup each; default 1. */
  batch?: number;
  /** Index of step 0's counter in `state`; default 0. */
  counterIndex?: number;
  /** Invocations per workgroup (power of two, 1..256); default {@linkcode ACCEPT_WG}. */
  workgroupSize?: number;
}

/** Builds the accept dispatch (one workgroup per verify step of the batch). */
export async function createAccept(gpu: Gpu, args: AcceptArgs): Promise<Dispatch> {
  const wg = args.workgroupSize ?? ACCEPT_WG;
  const batch = args.batch ?? 1;
  checkWorkgroupSize(gpu, args.label, wg);
  checkSampling(args.label, args);
  if (!(args.V >= 1) || !(args.k >= 1) || !(batch >= 1)) {
    throw new GpuError(
      args.label,
      `need V >= 1, k >= 1 and batch >= 1 (got V=${args.V}, k=${args.k}, batch=${batch})`,
    );
  }
  if (batch > gpu.limits.maxComputeWorkgroupsPerDimension) {
    throw new GpuError(args.label, `batch ${batch} exceeds the per-dispatch workgroup limit`);
  }
  const pipeline = await gpu.pipeline(`accept.wg${wg}`, () => acceptWgsl(wg));
  const params = gpu.uniform(
    `${args.label}.params`,
    packParams(
      [
        args.V,
        batch,
        args.topK >= args.V ? 0 : args.topK,
        args.seed,
        args.k,
        args.counterIndex ?? 0,
        args.draftTokensOffset ?? 0,
      ],
      args.temperature,
      args.topP,
    ),
  );
  return {
    label: args.label,
    pipeline,
    bindGroup: gpu.bindGroup(args.label, pipeline, [
      args.targetLogits,
      args.draftProbs,
      args.draftTokens,
      args.outTokens,
      args.outCount,
      args.state,
      params,
    ]),
    workgroups: [batch, 1, 1],
  };
}

/**
 * CPU reference of one verify step: process the k + 1 target logits rows with `params` and run
 * `acceptDraft` with the uniforms the kernel draws for (seed, row, counter).
 */
export function acceptRef(
  targetLogits: Float32Array[],
  draftProbs: Float32Array[],
  draftTokens: number[],
  params: SamplingParams,
  seed: number,
  row: number,
  counter: number,
): AcceptResult {
  return acceptDraft({
    targetProbs: targetLogits.map((l) => processLogits(l, params)),
    draftProbs,
    draftTokens,
    uniforms: acceptUniforms(seed, row, counter, draftTokens.length),
  });
}
