/**
 * Causal multi-head attention (GQA) of `T` query rows over the GPU KV cache, FlashAttention-style:
 *
 *   out[t, h, :] = softmax_s(q[t, h, :] · K[s, h/group, :] * scale) · V[s, h/group, :],
 *   s in 0 .. pos+t (query row t sits at position pos+t), scale = 1/sqrt(headDim).
 *
 * `pos` is read on the GPU from `state[0]`. Cache layout: `[layers, maxSeq, nKvHeads, headDim]`
 * (f16 or f32; q8: int8 values 4 per word, then one f32 scale per head vector, see kv_write.ts),
 * one buffer for K and one for V shared by all layers. Every variant reads the cache through
 * `loadK`/`loadV`, which dequantize a q8 vec4 (int8 x scale) as it is loaded: no separate
 * dequantize pass. Cache rows past `pos+T-1` are never read, so KV rollback is moving `pos` back.
 *
 * Three variants, chosen by {@linkcode attentionUsesSplitK} unless forced by name:
 * - "flash": one workgroup per (kv head, block of BQ query rows); K/V tiles of KT keys staged in
 *   workgroup memory, online softmax (running max m, sum l, rescaled accumulator). Prefill.
 * - "flash-split" (flash-decoding): as "flash", and the keys are also split into NS chunks, one
 *   workgroup each, writing partial (m, l, acc); a second dispatch merges them. Decode/verify,
 *   where heads x row blocks alone cannot fill the GPU.
 * - "naive": one invocation per (query row, head), two passes over global memory. The oracle.
 *
 * @module
 */
import { type Dispatch, type Gpu, grid2d } from "../engine/gpu.ts";
import { checkKvCache, type KvDType } from "./kv_write.ts";

/** Invocations per workgroup of the flash kernels. */
export const ATTN_WG = 64;
/** Most query rows ((t, head) pairs of one kv head) one flash workgroup owns. */
export const ATTN_BQ_MAX = 16;
/** Split-K is used when the unsplit grid has fewer workgroups than this. */
export const ATTN_MIN_WORKGROUPS = 64;
/** Split-K aims at about this many workgroups in total. */
export const ATTN_TARGET_WORKGROUPS = 128;
/** Most key chunks of split-K. */
export const ATTN_MAX_SPLITS = 32;
/**
 * Benchmark knob (`bench/gpu.ts --attn-splits`): the most key chunks {@linkcode attentionPlan}
 * gives split-K, default {@linkcode ATTN_MAX_SPLITS}. Set it before creating a model (its scratch
 * is sized by the plan).
 */
export const attentionTuning: { maxSplits: number } = { maxSplits: ATTN_MAX_SPLITS };
/** Invocations per workgroup of the naive and merge kernels. */
export const ATTN_SIMPLE_WG = 64;

/** The attention kernels by name. */
export type AttentionVariant = "flash" | "flash-split" | "naive";

/** Static shape of one attention dispatch. */
export interface AttentionShape {
  /** Query rows per forward (static). */
  T: number;
  /** Query heads. */
  nHeads: number;
  /** Key/value heads; divides nHeads. */
  nKvHeads: number;
  /** Per-head size; a multiple of 4 (8, 64, 128 in practice). */
  headDim: number;
  /** Cache rows per layer. */
  maxSeq: number;
}

/** The specialization a dispatch runs with. */
export interface AttentionPlan {
  /** Kernel variant. */
  readonly variant: AttentionVariant;
  /** Query rows per workgroup (flash variants). */
  readonly bq: number;
  /** Keys per K/V tile in workgroup memory (flash variants). */
  readonly kt: number;
  /** Key chunks (1 unless "flash-split"). */
  readonly nSplits: number;
}

function nextPow2(n: number): number {
  let p = 1;
  while (p < n) p *= 2;
  return p;
}

/** Query rows per flash workgroup for `shape`: T*group rows rounded up to a power of 2, at most 16. */
export function attentionRowBlock(shape: AttentionShape): number {
  return Math.min(ATTN_BQ_MAX, nextPow2(shape.T * shape.nHeads / shape.nKvHeads));
}

/** Workgroup-memory bytes of a flash workgroup with `bq` rows, `kt` keys per tile, `headDim`. */
export function attentionSharedBytes(bq: number, kt: number, headDim: number): number {
  // Q block + K tile (rows padded by a vec4) + V tile (f32) + scores + per-row m, l, alpha,
  // end + the softmax's partial max and sum per (row, lane).
  return 4 * (bq * headDim + 2 * kt * headDim + 4 * kt + bq * kt + 4 * bq + 2 * SOFTMAX_LANES * bq);
}

/** Keys per tile: the largest of 32, 16, 8 whose workgroup memory fits `maxShared` bytes. */
export function attentionKeyTile(bq: number, headDim: number, maxShared: number): number {
  for (const kt of [32, 16, 8]) {
    if (attentionSharedBytes(bq, kt, headDim) <= maxShared) return kt;
  }
  throw new Error(
    `attention: headDim ${headDim} needs more than ${maxShared} bytes of shared memory`,
  );
}

/**
 * THE predicate choosing between the attention kernels: split the keys (flash-decoding) when the
 * unsplit grid, nKvHeads x ceil(T*group / BQ) workgroups, is too small to fill the GPU
 * (< {@linkcode ATTN_MIN_WORKGROUPS}) and the cache is longer than one key tile.
 */
export function attentionUsesSplitK(shape: AttentionShape, kt: number): boolean {
  const group = shape.nHeads / shape.nKvHeads;
  const blocks = shape.nKvHeads * Math.ceil(shape.T * group / attentionRowBlock(shape));
  return blocks < ATTN_MIN_WORKGROUPS && shape.maxSeq > kt;
}

/** The plan for `shape` on a device with `maxShared` bytes of workgroup memory. */
export function attentionPlan(
  shape: AttentionShape,
  maxShared: number,
  variant?: AttentionVariant,
): AttentionPlan {
  const bq = attentionRowBlock(shape);
  const kt = attentionKeyTile(bq, shape.headDim, maxShared);
  const v = variant ?? (attentionUsesSplitK(shape, kt) ? "flash-split" : "flash");
  if (v !== "flash-split") return { variant: v, bq, kt, nSplits: 1 };
  const group = shape.nHeads / shape.nKvHeads;
  const blocks = shape.nKvHeads * Math.ceil(shape.T * group / bq);
  const nSplits = Math.max(
    1,
    Math.min(
      Math.ceil(ATTN_TARGET_WORKGROUPS / blocks),
      Math.ceil(shape.maxSeq / kt),
      attentionTuning.maxSplits,
    ),
  );
  return { variant: v, bq, kt, nSplits };
}

const LOG2E = 1.4426950408889634;
/** Running-max start: finite, so exp2(m_old - m_new) never becomes exp2(-inf + inf) = NaN. */
const NEG = "-3.0e38";

/** WGSL element type of a cache binding: vec4 of f16/f32, or u32 words (4 int8) for q8. */
export function cacheElem(dtype: KvDType): string {
  return dtype === "q8" ? "u32" : `vec4<${dtype}>`;
}

/**
 * WGSL `loadK(gi)` / `loadV(gi)`: vec4 number gi of a cache as f32 (gi counts vec4s of values
 * from the start of the buffer). q8: word gi holds 4 int8 (byte j = element j, sign-extended by
 * the arithmetic shift), times the scale of its head vector, word `p.scaleBase + gi / HD4`.
 * Expects `kCache`, `vCache`, the constant `HD4` and, for q8, `p.scaleBase` in scope.
 */
export function kvLoadersWgsl(dtype: KvDType): string {
  if (dtype !== "q8") {
    return `fn loadK(gi: u32) -> vec4<f32> { return vec4<f32>(kCache[gi]); }
fn loadV(gi: u32) -> vec4<f32> { return vec4<f32>(vCache[gi]); }`;
  }
  return `fn unpackQ8(w: u32) -> vec4<f32> {
  let b = bitcast<vec4<i32>>(vec4<u32>(w) << vec4<u32>(24u, 16u, 8u, 0u)) >> vec4<u32>(24u);
  return vec4<f32>(b);
}
fn loadK(gi: u32) -> vec4<f32> {
  return unpackQ8(kCache[gi]) * bitcast<f32>(kCache[p.scaleBase + gi / HD4]);
}
fn loadV(gi: u32) -> vec4<f32> {
  return unpackQ8(vCache[gi]) * bitcast<f32>(vCache[p.scaleBase + gi / HD4]);
}`;
}

/** Shared WGSL head: enable f16, the params struct. */
function header(dtype: KvDType): string {
  return `${dtype === "f16" ? "enable f16;" : ""}
struct Params {
  T: u32,          // query rows
  nHeads: u32,     // query heads
  group: u32,      // nHeads / nKvHeads
  maxSeq: u32,     // cache rows per layer
  layerBase4: u32, // layer * maxSeq * nKv * headDim / 4: first vec4 of the layer
  rowVec4: u32,    // nKv * headDim / 4: vec4s per cache row
  rows: u32,       // T * group: query rows per kv head
  scale: f32,      // log2(e) / sqrt(headDim): scores are kept in the log2 domain
  scaleBase: u32,  // q8: layers * maxSeq * nKv * headDim / 4, first word of the scale region
}`;
}

/** Invocations that share one query row's softmax in {@linkcode flashTileWgsl} (at most). */
export const SOFTMAX_LANES = 8;

/**
 * Invocations per query row's softmax for workgroups of `wg` invocations:
 * {@linkcode SOFTMAX_LANES} from 128 (a GPU's 256), else 1, one invocation per row walking it to
 * the row's end. Software adapters (64: lavapipe, where each barrier switches every invocation)
 * keep the simple form: the first version of these kernels at 64 invocations (shared softmax,
 * G-way merge, a max over the whole masked tile) ran the tiny pair at 199.9 tok/s against 219.0
 * before, and in a lavapipe ablation of the fused kernel the masked max alone cost 7%.
 */
export function softmaxLanes(wg: number): number {
  return wg >= 128 ? SOFTMAX_LANES : 1;
}

/**
 * WGSL workgroup memory of the flash kernels' tile loop: Qs [BQ, headDim] (pre-scaled), the K
 * tile with rows padded to HD4 + 1 vec4 (`KS`: the score loop's lanes then read different
 * banks), the V tile, the scores S [BQ, KT], the per-row running max, sum, rescale and visible
 * end, and the softmax's partial max and sum of {@linkcode softmaxLanes}(`wg`) lanes per row.
 * Expects the constants HD4, BQ, KT in scope (it declares KS).
 */
export function flashTileVarsWgsl(bq: number, kt: number, hd4: number, wg: number): string {
  const L = softmaxLanes(wg) * bq;
  return `const KS = ${hd4 + 1}u; // row stride of Ks, in vec4
var<workgroup> Qs: array<vec4<f32>, ${bq * hd4}>;      // [BQ, headDim], pre-scaled
var<workgroup> Ks: array<vec4<f32>, ${kt * (hd4 + 1)}>; // [KT, KS]
var<workgroup> Vs: array<vec4<f32>, ${kt * hd4}>;      // [KT, headDim]
var<workgroup> S: array<f32, ${bq * kt}>;              // [BQ, KT] scores, then weights
var<workgroup> rowM: array<f32, ${bq}>;                // running max (log2 domain)
var<workgroup> rowL: array<f32, ${bq}>;                // running sum of weights
var<workgroup> rowAlpha: array<f32, ${bq}>;            // rescale of this tile
var<workgroup> rowEnd: array<u32, ${bq}>;              // keys [.., rowEnd) visible to the row
var<workgroup> redM: array<f32, ${L}>;                 // softmax: partial max per (row, lane)
var<workgroup> redL: array<f32, ${L}>;                 // softmax: partial sum per (row, lane)`;
}

/**
 * WGSL of one K/V tile's work in the flash kernels, after the tile is staged in `Ks` (rows of
 * stride KS) and `Vs`: the BQ x KT scores, the online softmax of BQ rows, and the accumulator
 * update `acc = acc * alpha + S·V`, then a barrier (the next tile may be staged). With `wg`
 * invocations the softmax of a row is shared by {@linkcode softmaxLanes} of them (partial max,
 * then weights and partial sums, then one invocation per row combines them: new running max,
 * sum, rescale `alpha`), or walked by one. Key j of the tile is visible to row r when
 * `j < nValid` (the causal end) and, if given, the WGSL boolean
 * `visible(r, j)` (e.g. a tree mask). Declarations: {@linkcode flashTileVarsWgsl}.
 */
export function flashTileWgsl(wg: number, visible?: (r: string, j: string) => string): string {
  const SL = softmaxLanes(wg);
  const also = visible ? ` && ${visible("r", "j")}` : "";
  const lane = `let r = e / ${SL}u;
      let end = rowEnd[r];
      let nValid = select(0u, min(end - s0, KT), end > s0);`;
  return `    for (var e = tid; e < BQ * KT; e += WG) {
      let qb = (e / KT) * HD4;
      let kb = (e % KT) * KS;
      var d = 0.0;
      for (var c = 0u; c < HD4; c++) {
        d += dot(Qs[qb + c], Ks[kb + c]);
      }
      S[e] = d;
    }
    workgroupBarrier();
${
    SL === 1
      ? `    // Softmax, one invocation per row (r = tid): its max up to its end, then the weights.
    if (tid < BQ) {
      let r = tid;
      let end = rowEnd[r];
      let nValid = select(0u, min(end - s0, KT), end > s0);
      let mOld = rowM[r];
      var mNew = mOld;
      for (var j = 0u; j < nValid; j++) { // the row's own end (lavapipe: 7% faster than masked)
        mNew = ${
        visible
          ? `select(mNew, max(mNew, S[r * KT + j]), ${visible("r", "j")})`
          : "max(mNew, S[r * KT + j])"
      };
      }
      var sum = 0.0;
      for (var j = 0u; j < KT; j++) {
        let w = select(0.0, exp2(S[r * KT + j] - mNew), j < nValid${also});
        S[r * KT + j] = w;
        sum += w;
      }
      let alpha = exp2(mOld - mNew);
      rowL[r] = rowL[r] * alpha + sum;
      rowM[r] = mNew;
      rowAlpha[r] = alpha;
    }
`
      : `    // Softmax, ${SL} invocations per row: invocation (r, q) holds keys q, q + ${SL}, ...
    for (var e = tid; e < BQ * ${SL}u; e += WG) {
      ${lane}
      var mx = ${NEG};
      for (var k = 0u; k < KT / ${SL}u; k++) {
        let j = e % ${SL}u + k * ${SL}u;
        mx = select(mx, max(mx, S[r * KT + j]), j < nValid${also});
      }
      redM[e] = mx;
    }
    workgroupBarrier();
    for (var e = tid; e < BQ * ${SL}u; e += WG) {
      ${lane}
      var mNew = rowM[r];
      for (var k = 0u; k < ${SL}u; k++) { mNew = max(mNew, redM[r * ${SL}u + k]); }
      var sum = 0.0;
      for (var k = 0u; k < KT / ${SL}u; k++) {
        let j = e % ${SL}u + k * ${SL}u;
        let w = select(0.0, exp2(S[r * KT + j] - mNew), j < nValid${also});
        S[r * KT + j] = w;
        sum += w;
      }
      redL[e] = sum;
    }
    workgroupBarrier();
    if (tid < BQ) {
      let mOld = rowM[tid];
      var mNew = mOld;
      var sum = 0.0;
      for (var k = 0u; k < ${SL}u; k++) {
        mNew = max(mNew, redM[tid * ${SL}u + k]);
        sum += redL[tid * ${SL}u + k];
      }
      let alpha = exp2(mOld - mNew);
      rowL[tid] = rowL[tid] * alpha + sum;
      rowM[tid] = mNew;
      rowAlpha[tid] = alpha;
    }
`
  }    workgroupBarrier();
    for (var i = 0u; i < ACC; i++) {
      let e = tid + i * WG;
      if (e < BQ * HD4) {
        let r = e / HD4;
        let c = e % HD4;
        var a = acc[i] * rowAlpha[r];
        for (var j = 0u; j < KT; j++) {
          a += S[r * KT + j] * Vs[j * HD4 + c];
        }
        acc[i] = a;
      }
    }
    workgroupBarrier(); // the tile is consumed: the next one may be staged
`;
}

/** Partials each merge worker loads per round (their loads are in flight together). */
const MERGE_UNROLL = 4;

/**
 * Merge workers per (row, vec4) of a split-K merge done by one workgroup: `G` workers of one
 * output vec4 each fold every G-th partial, so a merge of n partials is a chain of
 * ceil(n / (G * 4)) rounds of loads instead of n. G is as large as the workgroup allows and as
 * the K/V tiles can hold the workers' results (they are combined through `Ks` and `Vs`); 1
 * below 128 invocations (software adapters keep the simplest merge: removing the merge there
 * changed nothing measurable, so it is not what a GPU's G buys).
 */
export function mergeWorkers(bq: number, headDim: number, kt: number, wg: number): number {
  if (wg < 128) return 1; // software adapters: no combine barrier (see softmaxLanes)
  const hd4 = headDim / 4;
  return Math.max(1, Math.min(Math.floor(wg / (bq * hd4)), Math.floor(kt / bq)));
}

/** How {@linkcode splitMergeWgsl} reads the partials and writes the output. */
export interface SplitMergeWgsl {
  /** WGSL bool of `r` (a u32 in [0, BQ)): the workgroup's row r is a query row. */
  valid: (r: string) => string;
  /** WGSL u32 of `r`: the partial row (of the rows per chunk) of workgroup row r. */
  qRow: (r: string) => string;
  /** WGSL atomic word array and u32 index of m of partial row `qr` of chunk `z` (l: the next word). */
  ml: (z: string, qr: string) => { buf: string; at: string };
  /** WGSL atomic word array and u32 index of the first word of acc vec4 `c` of (z, qr). */
  acc: (z: string, qr: string, c: string) => { buf: string; at: string };
  /** WGSL statement storing the vec4 `v` as output vec4 `c` of partial row `qr`. */
  store: (qr: string, c: string, v: string) => string;
}

/**
 * WGSL of the split-K merge by the chunk that arrives last, after the partials (m, l, acc) of
 * `nActive` chunks are stored: out = sum_z acc_z 2^(m_z - M) / sum_z l_z 2^(m_z - M), M = max m_z.
 * Worker (g, r, c) folds the partials z = g, g + G, ... into a running (m, l, acc), loading
 * {@linkcode MERGE_UNROLL} partials per round; with G > 1 the G workers of (r, c) then combine
 * through `Ks` / `Vs` (free after the tile loop). Expects `tid`, `nActive`, `Ks`, `Vs` and the
 * constants HD4, BQ, WG in scope, in uniform control flow (it holds a barrier when G > 1).
 */
export function splitMergeWgsl(o: SplitMergeWgsl, G: number): string {
  const U = MERGE_UNROLL;
  const a = o.acc("mz", "mq", "mc"), b = o.ml("mz", "mq");
  const word = (k: number) => `bitcast<f32>(atomicLoad(&${a.buf}[${a.at} + ${k}u]))`;
  const done = "select(vec4<f32>(0.0), ma / ml, ml > 0.0)";
  const result = G === 1 ? `if (${o.valid("mr")}) { ${o.store("mq", "mc", done)} }` : `Ks[me] = ma;
    Vs[me] = vec4<f32>(mm, ml, 0.0, 0.0);`;
  const combine = G === 1 ? "" : `
  workgroupBarrier();
  for (var me = tid; me < BQ * HD4; me += WG) {
    let mr = me / HD4;
    let mc = me % HD4;
    if (${o.valid("mr")}) {
      let mq = ${o.qRow("mr")};
      var mm = ${NEG};
      for (var mg = 0u; mg < ${G}u; mg++) { mm = max(mm, Vs[mg * BQ * HD4 + me].x); }
      var ml = 0.0;
      var ma = vec4<f32>(0.0);
      for (var mg = 0u; mg < ${G}u; mg++) {
        let w = exp2(Vs[mg * BQ * HD4 + me].x - mm);
        ml += Vs[mg * BQ * HD4 + me].y * w;
        ma += Ks[mg * BQ * HD4 + me] * w;
      }
      ${o.store("mq", "mc", done)}
    }
  }`;
  return `  // Merge: worker (mg, mr, mc) folds partials mg, mg + ${G}, ..., ${U} per round.
  for (var me = tid; me < ${G}u * BQ * HD4; me += WG) {
    let mg = me / (BQ * HD4);
    let mr = (me / HD4) % BQ;
    let mc = me % HD4;
    let mq = ${o.qRow("mr")};
    var mm = ${NEG};
    var ml = 0.0;
    var ma = vec4<f32>(0.0);
    if (${o.valid("mr")}) {
      for (var mz0 = mg; mz0 < nActive; mz0 += ${U * G}u) {
        var pm: array<f32, ${U}>;
        var pl: array<f32, ${U}>;
        var pa: array<vec4<f32>, ${U}>;
        for (var mu = 0u; mu < ${U}u; mu++) {
          let mz = mz0 + mu * ${G}u;
          pm[mu] = ${NEG};
          pl[mu] = 0.0;
          pa[mu] = vec4<f32>(0.0);
          if (mz < nActive) {
            pm[mu] = bitcast<f32>(atomicLoad(&${b.buf}[${b.at}]));
            pl[mu] = bitcast<f32>(atomicLoad(&${b.buf}[${b.at} + 1u]));
            pa[mu] = vec4<f32>(${word(0)}, ${word(1)}, ${word(2)}, ${word(3)});
          }
        }
        for (var mu = 0u; mu < ${U}u; mu++) {
          let mNew = max(mm, pm[mu]);
          let s0 = exp2(mm - mNew);
          let s1 = exp2(pm[mu] - mNew);
          ml = ml * s0 + pl[mu] * s1;
          ma = ma * s0 + pa[mu] * s1;
          mm = mNew;
        }
      }
    }
    ${result}
  }${combine}
`;
}

/** WGSL of the flash kernel (split = write partials for the merge pass). */
export function attentionFlashWgsl(
  headDim: number,
  plan: AttentionPlan,
  dtype: KvDType,
): string {
  const HD4 = headDim / 4, { bq: BQ, kt: KT } = plan, WG = ATTN_WG;
  const split = plan.variant === "flash-split";
  const NS = plan.nSplits;
  const ACC = Math.ceil(BQ * HD4 / WG);
  const DT = cacheElem(dtype);
  const layout = dtype === "q8" ? " int8 x4, then scales [layers, maxSeq, nKv] f32" : "";
  return /* wgsl */ `${header(dtype)}
// Flash attention${split ? ", split-K (flash-decoding) first pass" : ""}. Workgroup (x, y, z) =
// (row block, kv head, key chunk) owns BQ=${BQ} query rows of kv head y, row r = t*group + g for
// query head y*group + g, and the keys [kBegin, kEnd) of chunk z (${NS} chunk(s); chunk size is
// derived on the GPU from pos so empty chunks cost nothing). ${WG} invocations loop over K/V tiles
// of KT=${KT} keys: all load the tile (vec4 per invocation${
    dtype === "q8" ? ", dequantized as loaded" : ""
  }, keys past kEnd read as 0, never out of
// range), compute the BQ x KT scores, BQ invocations do the online softmax of their row, and each
// invocation owns ${ACC} vec4 of the BQ x headDim accumulator. Keys past a row's own end
// (pos + t + 1) get weight 0: rows beyond pos+T-1 of the cache are never loaded.
@group(0) @binding(0) var<storage, read> q: array<vec4<f32>>;   // q: [T, nHeads, ${headDim}] f32
@group(0) @binding(1) var<storage, read> kCache: array<${DT}>;  // [layers, maxSeq, nKv, ${headDim}] ${dtype}${layout}
@group(0) @binding(2) var<storage, read> vCache: array<${DT}>;  // same layout as kCache
@group(0) @binding(3) var<storage, read> state: array<u32>;     // state[0] = pos
${
    split
      ? "@group(0) @binding(4) var<storage, read_write> out: array<vec4<f32>>; // partial acc: [NS, T, nHeads, headDim] f32"
      : "@group(0) @binding(4) var<storage, read_write> out: array<vec4<f32>>; // out: [T, nHeads, headDim] f32"
  }
@group(0) @binding(5) var<uniform> p: Params;
${
    split
      ? "@group(0) @binding(6) var<storage, read_write> ml: array<vec2<f32>>; // partial (m, l): [NS, T, nHeads]"
      : ""
  }

const HD4 = ${HD4}u;
const BQ = ${BQ}u;
const KT = ${KT}u;
const WG = ${WG}u;
const NS = ${NS}u;
const ACC = ${ACC}u;

${kvLoadersWgsl(dtype)}

${flashTileVarsWgsl(BQ, KT, HD4, WG)}

@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wg: vec3u, @builtin(local_invocation_index) tid: u32) {
  let kh = wg.y;
  let row0 = wg.x * BQ;
  let pos = state[0];
  let lastRow = min(row0 + BQ, p.rows) - 1u;
  let blockEnd = min(pos + lastRow / p.group + 1u, p.maxSeq);
  var kBegin = 0u;
  var kEnd = blockEnd;
  if (NS > 1u) {
    let chunk = max(KT, (((blockEnd + NS - 1u) / NS + KT - 1u) / KT) * KT);
    kBegin = min(wg.z * chunk, blockEnd);
    kEnd = min(kBegin + chunk, blockEnd);
  }

  for (var e = tid; e < BQ * HD4; e += WG) {
    let row = row0 + e / HD4;
    var x = vec4<f32>(0.0);
    if (row < p.rows) {
      let h = kh * p.group + row % p.group;
      x = q[((row / p.group) * p.nHeads + h) * HD4 + e % HD4] * p.scale;
    }
    Qs[e] = x;
  }
  if (tid < BQ) {
    let row = row0 + tid;
    rowEnd[tid] = select(0u, min(pos + row / p.group + 1u, kEnd), row < p.rows);
    rowM[tid] = ${NEG};
    rowL[tid] = 0.0;
  }
  var acc: array<vec4<f32>, ACC>;
  let kvBase = p.layerBase4 + kh * HD4;

  for (var s0 = kBegin; s0 < kEnd; s0 += KT) {
    // No barrier before the first staging: Q's loads and the first tile's go out together.
    for (var e = tid; e < KT * HD4; e += WG) {
      let s = s0 + e / HD4;
      var kx = vec4<f32>(0.0);
      var vx = vec4<f32>(0.0);
      if (s < kEnd) {
        let gi = kvBase + s * p.rowVec4 + e % HD4;
        kx = loadK(gi);
        vx = loadV(gi);
      }
      Ks[(e / HD4) * KS + e % HD4] = kx;
      Vs[e] = vx;
    }
    workgroupBarrier();
${flashTileWgsl(WG)}  }
  workgroupBarrier(); // rowM, rowL final (or initial, for an empty chunk)

  for (var i = 0u; i < ACC; i++) {
    let e = tid + i * WG;
    let r = e / HD4;
    let row = row0 + r;
    if (e < BQ * HD4 && row < p.rows) {
      let c = e % HD4;
      let qRow = (row / p.group) * p.nHeads + kh * p.group + row % p.group;
${
    split
      ? `      out[(wg.z * p.T * p.nHeads + qRow) * HD4 + c] = acc[i];
      if (c == 0u) {
        ml[wg.z * p.T * p.nHeads + qRow] = vec2<f32>(rowM[r], rowL[r]);
      }`
      : `      let l = rowL[r];
      out[qRow * HD4 + c] = select(vec4<f32>(0.0), acc[i] / l, l > 0.0);`
  }
    }
  }
}
`;
}

/** WGSL of the split-K merge pass. */
export function attentionMergeWgsl(headDim: number, nSplits: number): string {
  return /* wgsl */ `
// Split-K merge: one invocation per vec4 of out[T, nHeads, ${headDim}], ${ATTN_SIMPLE_WG} per workgroup
// (2-D grid, x fastest); invocations past the end return. Each reads the ${nSplits} partials
// (m, l, acc) of its row: M = max m, out = sum(acc * 2^(m-M)) / sum(l * 2^(m-M)).
struct MergeParams { n4: u32, rowsQ: u32, gridStride: u32 }
@group(0) @binding(0) var<storage, read> part: array<vec4<f32>>; // partial acc: [NS, T, nHeads, headDim]
@group(0) @binding(1) var<storage, read> ml: array<vec2<f32>>;   // partial (m, l): [NS, T, nHeads]
@group(0) @binding(2) var<storage, read_write> out: array<vec4<f32>>; // out: [T, nHeads, headDim]
@group(0) @binding(3) var<uniform> p: MergeParams;

const HD4 = ${headDim / 4}u;
const NS = ${nSplits}u;

@compute @workgroup_size(${ATTN_SIMPLE_WG})
fn main(@builtin(global_invocation_id) g: vec3u) {
  let i = g.y * p.gridStride + g.x;
  if (i >= p.n4) { return; }
  let row = i / HD4;
  var m = ${NEG};
  for (var s = 0u; s < NS; s++) {
    m = max(m, ml[s * p.rowsQ + row].x);
  }
  var l = 0.0;
  var a = vec4<f32>(0.0);
  for (var s = 0u; s < NS; s++) {
    let x = ml[s * p.rowsQ + row];
    let w = exp2(x.x - m);
    l += x.y * w;
    a += part[s * p.n4 + i] * w;
  }
  out[i] = select(vec4<f32>(0.0), a / l, l > 0.0);
}
`;
}

/** WGSL of the naive oracle. */
export function attentionNaiveWgsl(headDim: number, dtype: KvDType): string {
  const HD4 = headDim / 4;
  return /* wgsl */ `${header(dtype)}
// Naive attention: one invocation per (query row t, head h), ${ATTN_SIMPLE_WG} per workgroup;
// invocations past T*nHeads return. Each reads its keys 0 .. pos+t straight from the cache twice:
// once for the max score, once for the weights and the weighted sum of V.
@group(0) @binding(0) var<storage, read> q: array<vec4<f32>>;   // q: [T, nHeads, ${headDim}] f32
@group(0) @binding(1) var<storage, read> kCache: array<${
    cacheElem(dtype)
  }>; // [layers, maxSeq, nKv, ${headDim}] ${dtype}${
    dtype === "q8" ? " int8 x4, then scales [layers, maxSeq, nKv] f32" : ""
  }
@group(0) @binding(2) var<storage, read> vCache: array<${
    cacheElem(dtype)
  }>; // same layout as kCache
@group(0) @binding(3) var<storage, read> state: array<u32>;     // state[0] = pos
@group(0) @binding(4) var<storage, read_write> out: array<vec4<f32>>; // out: [T, nHeads, ${headDim}]
@group(0) @binding(5) var<uniform> p: Params;

const HD4 = ${HD4}u;

${kvLoadersWgsl(dtype)}

@compute @workgroup_size(${ATTN_SIMPLE_WG})
fn main(@builtin(global_invocation_id) g: vec3u) {
  let i = g.x;
  if (i >= p.T * p.nHeads) { return; }
  let t = i / p.nHeads;
  let base = p.layerBase4 + ((i % p.nHeads) / p.group) * HD4;
  let end = min(state[0] + t + 1u, p.maxSeq);
  var qv: array<vec4<f32>, HD4>;
  for (var c = 0u; c < HD4; c++) { qv[c] = q[i * HD4 + c] * p.scale; }
  var m = ${NEG};
  for (var s = 0u; s < end; s++) {
    var d = 0.0;
    for (var c = 0u; c < HD4; c++) { d += dot(qv[c], loadK(base + s * p.rowVec4 + c)); }
    m = max(m, d);
  }
  var l = 0.0;
  var acc: array<vec4<f32>, HD4>;
  for (var s = 0u; s < end; s++) {
    var d = 0.0;
    for (var c = 0u; c < HD4; c++) { d += dot(qv[c], loadK(base + s * p.rowVec4 + c)); }
    let w = exp2(d - m);
    l += w;
    for (var c = 0u; c < HD4; c++) { acc[c] += w * loadV(base + s * p.rowVec4 + c); }
  }
  for (var c = 0u; c < HD4; c++) {
    out[i * HD4 + c] = select(vec4<f32>(0.0), acc[c] / l, l > 0.0);
  }
}
`;
}

/** Scratch for split-K partials; shareable by every layer's attention of one forward. */
export interface AttentionScratch {
  /** Partial accumulators: [nSplits, T, nHeads, headDim] f32. */
  readonly acc: GPUBuffer;
  /** Partial (m, l): [nSplits, T, nHeads, 2] f32. */
  readonly ml: GPUBuffer;
}

/** Bytes of the two split-K scratch buffers (acc, ml) `plan` needs; [4, 4] placeholders if unsplit. */
function scratchSizes(shape: AttentionShape, plan: AttentionPlan): [number, number] {
  if (plan.variant !== "flash-split") return [4, 4];
  const rows = plan.nSplits * shape.T * shape.nHeads;
  return [rows * shape.headDim * 4, rows * 8];
}

/**
 * Bytes of both buffers {@linkcode createAttentionScratch} makes for `shape` and `plan` (a
 * multiple of 4 each, so exactly what `gpu.buffer` allocates): the partial accumulators and
 * (m, l) pairs of a "flash-split" plan, two 4-byte placeholders for the other variants.
 * A scratch shared by several plans (one per T) must be as large as the LARGEST of their
 * values: nSplits * T peaks at small T, not at the largest T.
 */
export function attentionScratchBytes(shape: AttentionShape, plan: AttentionPlan): number {
  const [acc, ml] = scratchSizes(shape, plan);
  return acc + ml;
}

/**
 * Allocates the split-K scratch for `plan` and `shape` (4-byte placeholders when not split);
 * {@linkcode attentionScratchBytes} bytes in all. {@linkcode createAttention} accepts any
 * scratch at least this large, so one scratch can serve several plans.
 */
export function createAttentionScratch(
  gpu: Gpu,
  label: string,
  shape: AttentionShape,
  plan: AttentionPlan,
): AttentionScratch {
  const [acc, ml] = scratchSizes(shape, plan);
  const usage = GPUBufferUsage.STORAGE;
  return {
    acc: gpu.buffer(`${label}.partial_acc`, acc, usage),
    ml: gpu.buffer(`${label}.partial_ml`, ml, usage),
  };
}

/** Buffers and shapes for {@linkcode createAttention}. */
export interface AttentionArgs extends AttentionShape {
  /** Hierarchical label, e.g. `target.L3.attn`. */
  label: string;
  /** q: [T, nHeads, headDim] f32 (after RoPE). */
  q: GPUBuffer;
  /** K cache: [layers, maxSeq, nKvHeads, headDim] of `dtype` (q8: then scales), `kvCacheBytes`. */
  kCache: GPUBuffer;
  /** V cache: same layout as `kCache`. */
  vCache: GPUBuffer;
  /** state: array<u32>, state[0] = pos (tokens cached before this forward). */
  state: GPUBuffer | GPUBufferBinding;
  /** out: [T, nHeads, headDim] f32. */
  out: GPUBuffer;
  /** Element type of both caches. */
  dtype: KvDType;
  /** Layers in the cache buffers (places the q8 scale region; checked for every dtype). */
  layers: number;
  /** Layer to attend over, in [0, layers). */
  layer: number;
  /** Force a kernel by name (bench, tests); default: {@linkcode attentionPlan}'s choice. */
  variant?: AttentionVariant;
  /** Split-K scratch to reuse: from {@linkcode createAttentionScratch}, this plan's or larger. */
  scratch?: AttentionScratch;
}

function checkShape(label: string, a: AttentionArgs): void {
  for (const f of ["T", "nHeads"] as const) {
    if (!Number.isInteger(a[f]) || a[f] < 1) {
      throw new Error(`${label}: ${f} must be a positive integer, got ${a[f]}`);
    }
  }
  checkKvCache(label, a);
  if (a.nHeads % a.nKvHeads !== 0) {
    throw new Error(`${label}: nHeads ${a.nHeads} is not a multiple of nKvHeads ${a.nKvHeads}`);
  }
}

/**
 * Builds the dispatches computing `out` for `T` query rows at positions `state[0] ..`: one
 * dispatch ("flash", "naive") or two ("flash-split": partials, then merge). Pipelines, params and
 * bind groups are built once here.
 */
export async function createAttention(gpu: Gpu, args: AttentionArgs): Promise<Dispatch[]> {
  const { label, dtype, headDim } = args;
  checkShape(label, args);
  if (dtype === "f16" && !gpu.features.f16) {
    throw new Error(`${label}: an f16 KV cache needs the shader-f16 feature`);
  }
  const plan = attentionPlan(args, gpu.limits.maxComputeWorkgroupStorageSize, args.variant);
  const group = args.nHeads / args.nKvHeads;
  const rowVec4 = args.nKvHeads * headDim / 4;
  const raw = new ArrayBuffer(48); // 9 fields, padded to 16 bytes
  new Uint32Array(raw).set([
    args.T,
    args.nHeads,
    group,
    args.maxSeq,
    args.layer * args.maxSeq * rowVec4,
    rowVec4,
    args.T * group,
  ]);
  new Float32Array(raw)[7] = LOG2E / Math.sqrt(headDim);
  new Uint32Array(raw)[8] = args.layers * args.maxSeq * rowVec4;
  const params = gpu.uniform(`${label}.params`, new Uint8Array(raw));
  const common = [args.q, args.kCache, args.vCache, args.state];

  if (plan.variant === "naive") {
    const pipeline = await gpu.pipeline(
      `attention.naive.hd${headDim}.${dtype}.wg${ATTN_SIMPLE_WG}`,
      () => attentionNaiveWgsl(headDim, dtype),
    );
    return [{
      label,
      pipeline,
      bindGroup: gpu.bindGroup(label, pipeline, [...common, args.out, params]),
      workgroups: [Math.ceil(args.T * args.nHeads / ATTN_SIMPLE_WG), 1, 1],
    }];
  }

  const key = `attention.${plan.variant}.hd${headDim}.${dtype}.bq${plan.bq}.kt${plan.kt}` +
    `.ns${plan.nSplits}.wg${ATTN_WG}`;
  const pipeline = await gpu.pipeline(key, () => attentionFlashWgsl(headDim, plan, dtype));
  const workgroups: [number, number, number] = [
    Math.ceil(args.T * group / plan.bq),
    args.nKvHeads,
    plan.nSplits,
  ];
  if (plan.variant === "flash") {
    return [{
      label,
      pipeline,
      bindGroup: gpu.bindGroup(label, pipeline, [...common, args.out, params]),
      workgroups,
    }];
  }

  const scratch = args.scratch ?? createAttentionScratch(gpu, label, args, plan);
  const [needAcc, needMl] = scratchSizes(args, plan);
  if (scratch.acc.size < needAcc || scratch.ml.size < needMl) {
    throw new Error(
      `${label}: split-K scratch of ${scratch.acc.size} + ${scratch.ml.size} bytes is too small` +
        ` for ${plan.nSplits} splits of T=${args.T} (needs ${needAcc} + ${needMl})`,
    );
  }
  const first: Dispatch = {
    label: `${label}.partial`,
    pipeline,
    bindGroup: gpu.bindGroup(`${label}.partial`, pipeline, [
      ...common,
      scratch.acc,
      params,
      scratch.ml,
    ]),
    workgroups,
  };
  const mergePipeline = await gpu.pipeline(
    `attention.merge.hd${headDim}.ns${plan.nSplits}.wg${ATTN_SIMPLE_WG}`,
    () => attentionMergeWgsl(headDim, plan.nSplits),
  );
  const n4 = args.T * args.nHeads * headDim / 4;
  const groups = grid2d(Math.ceil(n4 / ATTN_SIMPLE_WG));
  const mergeParams = gpu.uniform(
    `${label}.merge.params`,
    new Uint32Array([n4, args.T * args.nHeads, groups[0] * ATTN_SIMPLE_WG]),
  );
  const merge: Dispatch = {
    label: `${label}.merge`,
    pipeline: mergePipeline,
    bindGroup: gpu.bindGroup(`${label}.merge`, mergePipeline, [
      scratch.acc,
      scratch.ml,
      args.out,
      mergeParams,
    ]),
    workgroups: groups,
  };
  return [first, merge];
}

/** Shapes for {@linkcode attentionRef}. */
export interface AttentionRefShape {
  /** Query rows. */
  T: number;
  /** Position of query row 0 (tokens cached before this forward). */
  pos: number;
  /** Query heads. */
  nHeads: number;
  /** Key/value heads. */
  nKvHeads: number;
  /** Per-head size. */
  headDim: number;
  /** Cache rows per layer. */
  maxSeq: number;
  /** Layer attended over. */
  layer: number;
}

/**
 * CPU reference: two-pass softmax attention of `q` ([T, nHeads, headDim]) over the caches
 * ([layers, maxSeq, nKvHeads, headDim], f32 values; pass f16-rounded values for an f16 cache and
 * the dequantized values, `kvDequantizeRef`, for a q8 cache).
 * `visible(t, s)`, when given, also hides key s from row t (a tree mask; kernels/fused_attention.ts).
 * Returns out: [T, nHeads, headDim]. Computed in f64.
 */
export function attentionRef(
  q: Float32Array,
  kCache: Float32Array,
  vCache: Float32Array,
  s: AttentionRefShape,
  visible?: (t: number, key: number) => boolean,
): Float32Array {
  const { T, pos, nHeads, nKvHeads, headDim: hd, maxSeq, layer } = s;
  const group = nHeads / nKvHeads, scale = 1 / Math.sqrt(hd);
  const out = new Float32Array(T * nHeads * hd);
  for (let t = 0; t < T; t++) {
    const end = Math.min(pos + t + 1, maxSeq);
    for (let h = 0; h < nHeads; h++) {
      const qo = (t * nHeads + h) * hd;
      const kvh = Math.floor(h / group);
      const scores = new Float64Array(end);
      let max = -Infinity;
      for (let j = 0; j < end; j++) {
        const ko = ((layer * maxSeq + j) * nKvHeads + kvh) * hd;
        let d = 0;
        for (let i = 0; i < hd; i++) d += q[qo + i] * kCache[ko + i];
        scores[j] = visible && !visible(t, j) ? -Infinity : d * scale;
        if (scores[j] > max) max = scores[j];
      }
      let sum = 0;
      for (let j = 0; j < end; j++) {
        scores[j] = Math.exp(scores[j] - max);
        sum += scores[j];
      }
      for (let i = 0; i < hd; i++) {
        let a = 0;
        for (let j = 0; j < end; j++) {
          a += scores[j] * vCache[((layer * maxSeq + j) * nKvHeads + kvh) * hd + i];
        }
        out[qo + i] = a / sum;
      }
    }
  }
  return out;
}
