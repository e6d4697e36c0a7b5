/**
 * On-GPU sampling: one workgroup per logits row applies temperature, top-k and top-p (without a
 * sort: bisection over the order-preserving u32 keys of the logits), draws a token with the
 * counter-based RNG, and writes it (and optionally the processed probability row, the draft's
 * q) to GPU buffers. Semantics are those of `processLogits` / `sampleFrom` in
 * engine/speculative_math.ts; the WGSL library here is shared with kernels/accept.ts.
 *
 * @module
 */
import { type Dispatch, type Gpu, GpuError } from "../engine/gpu.ts";
import {
  processLogits,
  SAMPLE_DOMAIN,
  sampleFrom,
  sampleUniform,
  type SamplingParams,
} from "../engine/speculative_math.ts";

/** Default invocations per workgroup (one workgroup owns one row). */
export const SAMPLE_WG = 256;

/**
 * WGSL shared by the sampler and the accept kernel: the RNG, order keys, workgroup reductions,
 * the per-row plan (argmax, top-k/top-p key threshold, normalizer) and the inverse-CDF draw.
 * The including shader must declare `var<storage> logits: array<f32>` and a function
 * `fn weightOf(w: W, j: u32) -> f32` giving the (unnormalized) draw weight of id j.
 *
 * Work split inside a row of V: reductions and bisection passes are strided (invocation t reads
 * t, t + WG, ...); the inverse-CDF draw gives invocation t the contiguous chunk
 * [t * ceil(V / WG), ...) so that a scan of chunk sums orders the ids.
 */
export function samplingLibWgsl(wg: number): string {
  return /* wgsl */ `
const WG: u32 = ${wg}u;
const NONE: u32 = 0xffffffffu;

var<workgroup> redF: array<f32, WG>;
var<workgroup> redK: array<u32, WG>;
var<workgroup> redI: array<u32, WG>;
var<workgroup> bcastU: u32;
var<workgroup> bcastF: f32;
var<workgroup> firstHit: atomic<u32>;  // lowest id whose CDF passes the target
var<workgroup> lastPos: atomic<u32>;   // 1 + highest id with positive weight (0: none)

// PCG hash and the RNG of engine/speculative_math.ts (rngU32 / rngUniform), bit for bit.
fn pcg(v: u32) -> u32 {
  let s = v * 747796405u + 2891336453u;
  let w = ((s >> ((s >> 28u) + 4u)) ^ s) * 277803737u;
  return (w >> 22u) ^ w;
}
fn rngUniform(seed: u32, domain: u32, row: u32, counter: u32, lane: u32) -> f32 {
  let h = pcg(pcg(pcg(pcg(seed ^ pcg(domain)) ^ row) ^ counter) ^ lane);
  return f32(h >> 8u) * (1.0 / 16777216.0);
}

// Order-preserving key of an f32 (-0 folded onto +0), as orderKey() in TS.
fn orderKey(x: f32) -> u32 {
  var b = bitcast<u32>(x);
  if (x == 0.0) { b = 0u; }
  if ((b & 0x80000000u) != 0u) { return ~b; }
  return b | 0x80000000u;
}

// Workgroup sum (fixed tree order, so deterministic); the result is uniform.
fn wgSum(lid: u32, v: f32) -> f32 {
  redF[lid] = v;
  workgroupBarrier();
  for (var s = WG / 2u; s > 0u; s = s >> 1u) {
    if (lid < s) { redF[lid] = redF[lid] + redF[lid + s]; }
    workgroupBarrier();
  }
  let r = workgroupUniformLoad(&redF[0]);
  workgroupBarrier();
  return r;
}

// Workgroup argmax of (key, id): larger key wins, ties go to the lower id. Returns (key, id).
fn wgArgmax(lid: u32, key: u32, id: u32) -> vec2u {
  redK[lid] = key;
  redI[lid] = id;
  workgroupBarrier();
  for (var s = WG / 2u; s > 0u; s = s >> 1u) {
    if (lid < s) {
      let k2 = redK[lid + s];
      let i2 = redI[lid + s];
      if (k2 > redK[lid] || (k2 == redK[lid] && i2 < redI[lid])) {
        redK[lid] = k2;
        redI[lid] = i2;
      }
    }
    workgroupBarrier();
  }
  let r = vec2u(workgroupUniformLoad(&redK[0]), workgroupUniformLoad(&redI[0]));
  workgroupBarrier();
  return r;
}

// The processed distribution of one row: token j is kept iff orderKey(l_j) >= thr, with weight
// exp((l_j - m) / temperature); z is the sum of kept weights. Greedy rows only fill argmax.
struct Plan { m: f32, argmax: u32, thr: u32, z: f32 }

fn keptWeight(l: f32, thr: u32, m: f32, temperature: f32) -> f32 {
  if (orderKey(l) >= thr) { return exp((l - m) / temperature); }
  return 0.0;
}

fn planRow(lid: u32, base: u32, V: u32, temperature: f32, topK: u32, topP: f32) -> Plan {
  // 1. argmax (ties: lowest id).
  var bk = 0u;
  var bi = NONE;
  for (var j = lid; j < V; j += WG) {
    let k = orderKey(logits[base + j]);
    if (bi == NONE || k > bk) { bk = k; bi = j; }
  }
  let top = wgArgmax(lid, bk, bi);
  let m = logits[base + top.y];
  var plan = Plan(m, top.y, top.x, 1.0);
  if (temperature <= 0.0) { return plan; }
  // 2. top-k: the largest key K with count(key >= K) >= topK, i.e. the k-th largest key.
  //    Invariant: the answer lies in [lo, hi]; count(key >= lo) >= topK. <= 32 passes.
  var thr = 0u;
  if (topK > 0u && topK < V) {
    var lo = 0u;
    var hi = top.x;
    loop {
      if (lo >= hi) { break; }
      let d = hi - lo;
      let mid = lo + (d >> 1u) + (d & 1u);
      var c = 0.0;
      for (var j = lid; j < V; j += WG) {
        if (orderKey(logits[base + j]) >= mid) { c += 1.0; }
      }
      if (wgSum(lid, c) >= f32(topK)) { lo = mid; } else { hi = mid - 1u; }
    }
    thr = lo;
  }
  var zk = 0.0;
  for (var j = lid; j < V; j += WG) { zk += keptWeight(logits[base + j], thr, m, temperature); }
  zk = wgSum(lid, zk);
  // 3. top-p: the largest key P >= thr with mass(key >= P) >= topP * zk (<= 32 passes).
  if (topP < 1.0) {
    let need = topP * zk;
    var lo = thr;
    var hi = top.x;
    loop {
      if (lo >= hi) { break; }
      let d = hi - lo;
      let mid = lo + (d >> 1u) + (d & 1u);
      var s = 0.0;
      for (var j = lid; j < V; j += WG) { s += keptWeight(logits[base + j], mid, m, temperature); }
      if (wgSum(lid, s) >= need) { lo = mid; } else { hi = mid - 1u; }
    }
    if (lo != thr) {
      thr = lo;
      zk = 0.0;
      for (var j = lid; j < V; j += WG) { zk += keptWeight(logits[base + j], thr, m, temperature); }
      zk = wgSum(lid, zk);
    }
  }
  plan.thr = thr;
  plan.z = zk;
  return plan;
}

// Inverse-CDF draw over weightOf(w, j), j in [0, V): the first id with positive weight whose
// running sum exceeds u * total; rounding past the end gives the last positive id; NONE if all
// weights are 0. Chunk sums are scanned (Hillis-Steele) so the CDF follows id order.
fn sampleChunked(lid: u32, V: u32, w: W, u: f32) -> u32 {
  let chunk = (V + WG - 1u) / WG;
  let start = min(lid * chunk, V);
  let end = min(start + chunk, V);
  if (lid == 0u) {
    atomicStore(&firstHit, NONE);
    atomicStore(&lastPos, 0u);
  }
  workgroupBarrier();
  var s = 0.0;
  var last = 0u;
  for (var j = start; j < end; j++) {
    let x = weightOf(w, j);
    if (x > 0.0) { s += x; last = j + 1u; }
  }
  atomicMax(&lastPos, last);
  redF[lid] = s;
  workgroupBarrier();
  for (var off = 1u; off < WG; off = off << 1u) {
    var v = redF[lid];
    if (lid >= off) { v += redF[lid - off]; }
    workgroupBarrier();
    redF[lid] = v;
    workgroupBarrier();
  }
  var prefix = 0.0;
  if (lid > 0u) { prefix = redF[lid - 1u]; }
  let total = workgroupUniformLoad(&redF[WG - 1u]);
  let goal = u * total;
  if (s > 0.0 && prefix <= goal) {
    var acc = prefix;
    for (var j = start; j < end; j++) {
      let x = weightOf(w, j);
      if (x > 0.0) {
        acc += x;
        if (acc > goal) { atomicMin(&firstHit, j); break; }
      }
    }
  }
  workgroupBarrier();
  if (lid == 0u) {
    var tok = atomicLoad(&firstHit);
    if (tok == NONE) {
      let lp = atomicLoad(&lastPos);
      if (lp > 0u) { tok = lp - 1u; }
    }
    bcastU = tok;
  }
  let r = workgroupUniformLoad(&bcastU);
  workgroupBarrier();
  return r;
}
`;
}

/** WGSL of the sampler: one workgroup per row; the library above does the row work. */
export function sampleWgsl(wg: number, writeProbs: boolean): string {
  return /* wgsl */ `
// Sampler: workgroup r owns logits row r (${wg} invocations; see samplingLibWgsl for the split).
// Invocation 0 reads and advances the row's RNG counter state[counterIndex + r] and writes the
// token; rows past 'rows' do not exist (the grid is exactly 'rows' workgroups).
struct Params {
  V: u32, rows: u32, topK: u32, seed: u32,
  outOffset: u32, counterIndex: u32, logitsRowOffset: u32, probsRowOffset: u32,
  temperature: f32, topP: f32, pad0: u32, pad1: u32,
}
@group(0) @binding(0) var<storage, read> logits: array<f32>;     // logits: [logitsRowOffset + rows, V]
@group(0) @binding(1) var<storage, read_write> out: array<u32>;  // out: [outOffset + rows] token ids
@group(0) @binding(2) var<storage, read_write> state: array<u32>; // state[counterIndex + r]: RNG counter of row r
@group(0) @binding(3) var<uniform> P: Params;
${
    writeProbs
      ? "@group(0) @binding(4) var<storage, read_write> probs: array<f32>; // probs: [probsRowOffset + rows, V]"
      : ""
  }

${samplingLibWgsl(wg)}

struct W { base: u32, thr: u32, m: f32, temperature: f32 }
fn weightOf(w: W, j: u32) -> f32 { return keptWeight(logits[w.base + j], w.thr, w.m, w.temperature); }

@compute @workgroup_size(${wg})
fn main(@builtin(local_invocation_id) l3: vec3u, @builtin(workgroup_id) g3: vec3u) {
  let lid = l3.x;
  let row = g3.x;
  let base = (P.logitsRowOffset + row) * P.V;
  if (lid == 0u) {
    let c = state[P.counterIndex + row];
    bcastF = rngUniform(P.seed, ${SAMPLE_DOMAIN}u, row, c, 0u);
    state[P.counterIndex + row] = c + 1u;
  }
  let u = workgroupUniformLoad(&bcastF);
  let plan = planRow(lid, base, P.V, P.temperature, P.topK, P.topP);
  let greedy = P.temperature <= 0.0;
  var tok = plan.argmax;
  if (!greedy) { tok = sampleChunked(lid, P.V, W(base, plan.thr, plan.m, P.temperature), u); }
  if (lid == 0u) { out[P.outOffset + row] = tok; }
  ${
    writeProbs
      ? `let pbase = (P.probsRowOffset + row) * P.V;
  for (var j = lid; j < P.V; j += WG) {
    var pj = 0.0;
    if (greedy) { pj = select(0.0, 1.0, j == tok); }
    else { pj = keptWeight(logits[base + j], plan.thr, plan.m, P.temperature) / plan.z; }
    probs[pbase + j] = pj;
  }`
      : ""
  }
}
`;
}

/** Buffers and settings for {@linkcode createSample}. */
export interface SampleArgs extends SamplingParams {
  /** Label of the dispatch and its params buffer. */
  label: string;
  /** Logits `[logitsRowOffset + rows, V]` f32. */
  logits: GPUBuffer | GPUBufferBinding;
  /** Token ids: row r's token goes to `out[outOffset + r]` (u32). */
  out: GPUBuffer | GPUBufferBinding;
  /**
   * `array<u32>`: `state[counterIndex + r]` is row r's RNG counter; the kernel draws
   * `rngUniform(seed, SAMPLE_DOMAIN, r, counter, 0)` and increments it, every dispatch (also
   * greedy ones), so reruns with the same seed and counters reproduce the same tokens.
   */
  state: GPUBuffer | GPUBufferBinding;
  /** Optional `[probsRowOffset + rows, V]` f32: the processed distribution (the draft's q). */
  probs?: GPUBuffer | GPUBufferBinding;
  /** Vocabulary size. */
  V: number;
  /** Rows to sample (one workgroup each). */
  rows: number;
  /** RNG seed (u32). */
  seed: number;
  /** First output slot; default 0. */
  outOffset?: number;
  /** Index of row 0's counter in `state`; default 0. */
  counterIndex?: number;
  /** First logits row; default 0. */
  logitsRowOffset?: number;
  /** First probs row; default 0. */
  probsRowOffset?: number;
  /** Invocations per workgroup (power of two, 1..256); default {@linkcode SAMPLE_WG}. */
  workgroupSize?: number;
}

/** Checks a workgroup size for the shared library (a power of two the device can run). */
export function checkWorkgroupSize(gpu: Gpu, label: string, wg: number): void {
  if (!Number.isInteger(wg) || wg < 1 || wg > 256 || (wg & (wg - 1)) !== 0) {
    throw new GpuError(label, `workgroup size ${wg} must be a power of two in 1..256`);
  }
  if (wg > gpu.limits.maxComputeInvocationsPerWorkgroup) {
    throw new GpuError(label, `workgroup size ${wg} exceeds the device limit`);
  }
}

/** Packs the params shared by sampler and accept kernels: 8 u32 then f32 temperature, topP. */
export function packParams(u32s: number[], temperature: number, topP: number): Uint32Array {
  const buf = new ArrayBuffer(48);
  const u = new Uint32Array(buf);
  u.set(u32s.map((x) => x >>> 0));
  const f = new Float32Array(buf);
  f[8] = temperature;
  f[9] = topP;
  return u;
}

/** Validates sampling settings (finite temperature >= 0, integer topK >= 0, topP in (0, 1]). */
export function checkSampling(label: string, s: SamplingParams): void {
  if (!(s.temperature >= 0 && Number.isFinite(s.temperature))) {
    throw new GpuError(label, `temperature ${s.temperature} must be a finite number >= 0`);
  }
  if (!Number.isInteger(s.topK) || s.topK < 0) {
    throw new GpuError(label, `topK ${s.topK} must be an integer >= 0 (0 = off)`);
  }
  if (!(s.topP > 0 && s.topP <= 1)) throw new GpuError(label, `topP ${s.topP} must be in (0, 1]`);
}

/**
 * Builds the sampler dispatch: for each of `rows` logits rows, draw a token (temperature 0:
 * argmax) into `out[outOffset + row]`, advance the row's RNG counter, and optionally write the
 * processed distribution to `probs`.
 */
export async function createSample(gpu: Gpu, args: SampleArgs): Promise<Dispatch> {
  const wg = args.workgroupSize ?? SAMPLE_WG;
  checkWorkgroupSize(gpu, args.label, wg);
  checkSampling(args.label, args);
  if (!(args.V >= 1) || !(args.rows >= 1)) {
    throw new GpuError(
      args.label,
      `need V >= 1 and rows >= 1 (got V=${args.V}, rows=${args.rows})`,
    );
  }
  if (args.rows > gpu.limits.maxComputeWorkgroupsPerDimension) {
    throw new GpuError(args.label, `rows ${args.rows} exceeds the per-dispatch workgroup limit`);
  }
  const writeProbs = args.probs !== undefined;
  const pipeline = await gpu.pipeline(
    `sample.wg${wg}.probs${writeProbs ? 1 : 0}`,
    () => sampleWgsl(wg, writeProbs),
  );
  const params = gpu.uniform(
    `${args.label}.params`,
    packParams(
      [
        args.V,
        args.rows,
        args.topK >= args.V ? 0 : args.topK,
        args.seed,
        args.outOffset ?? 0,
        args.counterIndex ?? 0,
        args.logitsRowOffset ?? 0,
        args.probsRowOffset ?? 0,
      ],
      args.temperature,
      args.topP,
    ),
  );
  const buffers = [args.logits, args.out, args.state, params];
  if (args.probs) buffers.push(args.probs);
  return {
    label: args.label,
    pipeline,
    bindGroup: gpu.bindGroup(args.label, pipeline, buffers),
    workgroups: [args.rows, 1, 1],
  };
}

/**
 * CPU reference of the sampler for one row: `processLogits`, then `sampleFrom` with the uniform
 * the kernel draws for (seed, row, counter). Returns the token and the processed row.
 */
export function sampleRef(
  logits: Float32Array,
  params: SamplingParams,
  seed: number,
  row: number,
  counter: number,
): { token: number; probs: Float32Array } {
  const probs = processLogits(logits, params);
  return { token: sampleFrom(probs, sampleUniform(seed, row, counter)), probs };
}
