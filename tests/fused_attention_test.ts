import {
  createFusedAttention,
  FUSED_ATTN_WG_GPU,
  fusedAttentionPlan,
  fusedAttentionRef,
  type FusedAttentionRefShape,
  fusedAttentionScratchBytes,
  fusedAttentionWorkgroup,
} from "../kernels/fused_attention.ts";
import { attentionUsesSplitK } from "../kernels/attention.ts";
import { kvCacheBytes, kvDequantizeRef, type KvDType, kvQuantizeRef } from "../kernels/kv_write.ts";
import { ropeInvFreq } from "../kernels/rope.ts";
import type { RopeLayout } from "../models/types.ts";
import type { Gpu } from "../engine/gpu.ts";
import { chainParents, TREE_MAX_NODES, treeTable } from "../engine/token_tree.ts";
import { assertClose, gpuTest, randomArray, rng } from "./harness.ts";
import assert from "@specdec/assert";

/**
 * Tolerances against the composed reference (ropeRef, kvWriteRef's rounding, attentionRef in
 * f64). f32/f16 caches: the kernel rounds the new rows as the reference does, so the error is
 * GPU cos/sin (RoPE's own bound, max-abs 2e-4 on the rotated values) carried through the
 * softmax: nmse <= 1e-8, max-abs <= 5e-4 (an f16 cache value may round one ulp apart). q8: a RoPE rounding difference may move a new key's
 * int8 by one step (1/127 of its absmax), so the cache comparison allows one step and the
 * output nmse <= 1e-5, max-abs <= 1e-2.
 */
const TOL = { nmse: 1e-8, maxAbs: 5e-4 };
const Q8_TOL = { nmse: 1e-5, maxAbs: 1e-2 };
const LAYERS = 2;
const RW = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST;

interface Case {
  T: number;
  pos: number;
  nHeads: number;
  nKvHeads: number;
  headDim: number;
  maxSeq: number;
  dtype: KvDType;
  layout: RopeLayout;
  /** Tree attention: the tree's parents and the node of row 0 (rows are nodes first..+T-1). */
  tree?: { parents: number[]; first: number };
  /** Invocations per workgroup (default: the adapter's). */
  wg?: number;
}

/** What a cache of `dtype` holds for `values` (f32 values) and the bytes to upload. */
function cacheImage(dtype: KvDType, values: Float32Array, headDim: number) {
  if (dtype === "f32") return { held: values, bytes: new Uint8Array(values.buffer.slice(0)) };
  if (dtype === "f16") {
    const h = new Float16Array(values);
    return { held: Float32Array.from(h), bytes: new Uint8Array(h.buffer) };
  }
  const { q, scale } = kvQuantizeRef(values, values.length / headDim, headDim);
  const bytes = new Uint8Array(q.length + scale.byteLength);
  bytes.set(new Uint8Array(q.buffer));
  bytes.set(new Uint8Array(scale.buffer), q.length);
  return { held: kvDequantizeRef(q, scale, headDim), bytes };
}

/** The f32 values a cache buffer of `dtype` holds. */
function readCache(dtype: KvDType, bytes: ArrayBuffer, n: number, headDim: number): Float32Array {
  if (dtype === "f32") return new Float32Array(bytes, 0, n);
  if (dtype === "f16") return Float32Array.from(new Float16Array(bytes, 0, n));
  return kvDequantizeRef(
    new Int8Array(bytes, 0, n),
    new Float32Array(bytes, n, n / headDim),
    headDim,
  );
}

async function check(gpu: Gpu, c: Case, shared?: GPUBuffer): Promise<Float32Array> {
  const { T, pos, nHeads, nKvHeads, headDim, maxSeq, dtype, layout } = c;
  const table = c.tree && treeTable(c.tree.parents);
  const tree = c.tree && { table: table!, first: c.tree.first };
  const seed = T * 7 + pos * 131 + nHeads * 17 + headDim;
  const W = (nHeads + 2 * nKvHeads) * headDim;
  const qkv = randomArray(T * W, seed, 2);
  const n = LAYERS * maxSeq * nKvHeads * headDim;
  // Rows < pos hold earlier keys; rows >= pos hold stale values the kernel must overwrite/ignore.
  const k0 = cacheImage(dtype, randomArray(n, seed + 1), headDim);
  const v0 = cacheImage(dtype, randomArray(n, seed + 2), headDim);
  const invFreq = ropeInvFreq(headDim, 10000);
  const shape: FusedAttentionRefShape = { ...c, layer: 1, tree };
  const want = fusedAttentionRef(qkv, k0.held, v0.held, invFreq, shape);
  const size = kvCacheBytes(dtype, LAYERS, maxSeq, nKvHeads, headDim);
  const kCache = gpu.upload("k", k0.bytes, RW), vCache = gpu.upload("v", v0.bytes, RW);
  assert.equal(kCache.size, Math.ceil(size / 4) * 4);
  const out = gpu.buffer("out", T * nHeads * headDim * 4, RW);
  const plan = fusedAttentionPlan(c, gpu.limits.maxComputeWorkgroupStorageSize);
  const scratch = shared ??
    gpu.buffer("scratch", Math.max(4, fusedAttentionScratchBytes(c, plan)), RW);
  const d = await createFusedAttention(gpu, {
    label: "test.attn",
    ...c,
    qkv: gpu.upload("qkv", qkv),
    kCache,
    vCache,
    state: gpu.upload("state", new Uint32Array([pos, 0, 0, 0])),
    out,
    invFreq: gpu.upload("inv_freq", invFreq),
    layers: LAYERS,
    layer: 1,
    scratch,
    tree: tree && { table: gpu.upload("tree", table!), first: tree.first },
    wg: c.wg,
  });
  // Twice: the split counters must have returned to 0 for the second run to merge correctly.
  let got = new Float32Array(0);
  for (let rep = 0; rep < 2; rep++) {
    if (rep) gpu.write(kCache, k0.bytes), gpu.write(vCache, v0.bytes);
    await gpu.run("test", [d]);
    const name = `${dtype} ${layout} T=${T} pos=${pos} heads=${nHeads}/${nKvHeads} hd=${headDim}` +
      ` maxSeq=${maxSeq} ${plan.variant} ns=${plan.nSplits} wg=${c.wg ?? "default"} rep=${rep}` +
      (c.tree ? ` tree=[${c.tree.parents}] first=${c.tree.first}` : "");
    const tol = dtype === "q8" ? Q8_TOL : TOL;
    got = new Float32Array(await gpu.read(out));
    assertClose(`${name} out`, got, want.out, tol);
    // One rounding step of the cache type apart at most (f16: an ulp of values below 4).
    const cacheTol = dtype === "q8"
      ? { nmse: 1e-5, maxAbs: 2.01 / 127 * 2 }
      : dtype === "f16"
      ? { nmse: 1e-8, maxAbs: 2 ** -9 }
      : TOL;
    const kGot = readCache(dtype, await gpu.read(kCache), n, headDim);
    const vGot = readCache(dtype, await gpu.read(vCache), n, headDim);
    assertClose(`${name} k cache`, kGot, want.kCache, cacheTol);
    assertClose(`${name} v cache`, vGot, want.vCache, cacheTol);
  }
  return got;
}

Deno.test("fusedAttentionRef() writes the new rows and leaves the others", () => {
  const s: FusedAttentionRefShape = {
    T: 1,
    pos: 1,
    nHeads: 1,
    nKvHeads: 1,
    headDim: 2,
    maxSeq: 3,
    layer: 0,
    dtype: "f32",
    layout: "interleaved",
  };
  // q = (1, 0), k = (2, 0), v = (5, 6) at position 1 with invFreq [0] (no rotation).
  const r = fusedAttentionRef(
    new Float32Array([1, 0, 2, 0, 5, 6]),
    new Float32Array([1, 1, 9, 9, 9, 9]),
    new Float32Array([3, 4, 9, 9, 9, 9]),
    new Float32Array([0]),
    s,
  );
  assert.deepEqual([...r.kCache], [1, 1, 2, 0, 9, 9]);
  assert.deepEqual([...r.vCache], [3, 4, 5, 6, 9, 9]);
  // scores 1/sqrt2 * (1, 2): weights e^0.707, e^1.414 over v (3,4), (5,6)
  const a = Math.exp(1 / Math.SQRT2), b = Math.exp(2 / Math.SQRT2);
  assert.ok(Math.abs(r.out[0] - (3 * a + 5 * b) / (a + b)) < 1e-5);
});

const SHAPES: [number, number, number][] = [[9, 3, 64], [8, 4, 8], [6, 2, 32], [4, 4, 64]];
/** (T, pos, rows of cache past pos + T): decode, verify and prefill widths, split and not. */
const ROWS: [number, number, number][] = [
  [1, 0, 0],
  [1, 37, 64],
  [3, 5, 0],
  [5, 130, 3],
  [17, 29, 64],
  [40, 0, 0],
  [33, 7, 64],
];

for (const dtype of ["f32", "f16", "q8"] as KvDType[]) {
  const features = dtype === "f16" ? ["shader-f16" as const] : [];
  gpuTest(
    `fused attention (${dtype} cache) matches RoPE + KV write + attention on ragged shapes`,
    async (gpu) => {
      let split = 0, unsplit = 0;
      for (const [nHeads, nKvHeads, headDim] of SHAPES) {
        for (const [i, [T, pos, extra]] of ROWS.entries()) {
          const layout: RopeLayout = (i + headDim) % 2 ? "interleaved" : "rotate-half";
          const c = { T, pos, nHeads, nKvHeads, headDim, maxSeq: pos + T + extra, dtype, layout };
          const kt = fusedAttentionPlan(c, gpu.limits.maxComputeWorkgroupStorageSize).kt;
          if (attentionUsesSplitK(c, kt)) split++;
          else unsplit++;
          await check(gpu, c);
        }
      }
      assert.ok(split > 0 && unsplit > 0, `both paths exercised (${split} split, ${unsplit} not)`);
    },
    { features },
  );
}

gpuTest(
  "fused attention at the other workgroup size (64 or 256) matches the reference, split and not",
  async (gpu) => {
    const wg = fusedAttentionWorkgroup(gpu) === 64 ? FUSED_ATTN_WG_GPU : 64;
    // Decode at a short context in a long cache (most key chunks empty), a verify, a prefill.
    const cases: Case[] = [
      { T: 1, pos: 37, nHeads: 8, nKvHeads: 2, headDim: 32, maxSeq: 1024, dtype: "f32" },
      { T: 1, pos: 300, nHeads: 4, nKvHeads: 1, headDim: 64, maxSeq: 512, dtype: "q8" },
      { T: 5, pos: 130, nHeads: 4, nKvHeads: 2, headDim: 16, maxSeq: 400, dtype: "q8" },
      { T: 17, pos: 29, nHeads: 6, nKvHeads: 3, headDim: 8, maxSeq: 300, dtype: "f32" },
      { T: 6, pos: 0, nHeads: 4, nKvHeads: 4, headDim: 16, maxSeq: 8, dtype: "f32" },
    ].map((c, i) => ({
      ...c,
      dtype: c.dtype as KvDType,
      layout: (i % 2 ? "interleaved" : "rotate-half") as RopeLayout,
      wg,
    }));
    let split = 0;
    for (const c of cases) {
      const kt = fusedAttentionPlan(c, gpu.limits.maxComputeWorkgroupStorageSize).kt;
      if (attentionUsesSplitK(c, kt)) split++;
      await check(gpu, c);
    }
    assert.ok(split >= 2 && split < cases.length, `both paths exercised (${split} split)`);
  },
);

gpuTest("fused attention plans of different T share one split-K scratch", async (gpu) => {
  const base = { pos: 20, nHeads: 4, nKvHeads: 4, headDim: 64, maxSeq: 200 };
  const cases = [17, 1, 3, 40, 1, 2].map((T): Case => ({
    ...base,
    T,
    dtype: "f32",
    layout: "rotate-half",
  }));
  const bytes = Math.max(
    ...cases.map((c) =>
      fusedAttentionScratchBytes(
        c,
        fusedAttentionPlan(c, gpu.limits.maxComputeWorkgroupStorageSize),
      )
    ),
  );
  const shared = gpu.buffer("shared.scratch", bytes, RW);
  for (const c of cases) await check(gpu, c, shared);
});

gpuTest("fused attention refuses a split plan without enough scratch", async (gpu) => {
  const c = {
    T: 1,
    nHeads: 4,
    nKvHeads: 2,
    headDim: 16,
    maxSeq: 512,
    dtype: "f32" as KvDType,
    layout: "interleaved" as RopeLayout,
  };
  const size = kvCacheBytes("f32", 1, 512, 2, 16);
  const b = (n: number) => gpu.buffer("b", n, RW);
  await assert.rejects(
    () =>
      createFusedAttention(gpu, {
        label: "L0.attn",
        ...c,
        qkv: b(64 * 4),
        kCache: b(size),
        vCache: b(size),
        state: b(16),
        out: b(64 * 4),
        invFreq: b(32),
        layers: 1,
        layer: 0,
        scratch: b(4),
      }),
    /L0\.attn: split-K scratch of 4 bytes is too small/,
  );
});

/** A random tree of `n` nodes (each parent uniform among the earlier nodes, or among the last 3). */
function randomTree(n: number, seed: number, bushy: boolean): number[] {
  const r = rng(seed);
  return Array.from({ length: n }, (_, i) => {
    if (i === 0) return -1;
    const lo = bushy ? Math.max(0, i - 3) : 0;
    return lo + Math.floor(r() * (i - lo));
  });
}

/** The parents of a level-by-level tree of `depth` levels of `width` nodes under one root. */
function levelTree(depth: number, width: number): number[] {
  const parents = [-1];
  for (let d = 1; d <= depth; d++) {
    for (let i = 0; i < width; i++) {
      parents.push(d === 1 ? 0 : 1 + (d - 2) * width + ((i * 2) % width));
    }
  }
  return parents;
}

Deno.test("fusedAttentionRef() with a tree hides non-ancestors and places rows by depth", () => {
  // Root (node 0) and two children (1, 2): node 2 must not see node 1, and sits at depth 1.
  const s: FusedAttentionRefShape = {
    T: 3,
    pos: 1,
    nHeads: 1,
    nKvHeads: 1,
    headDim: 2,
    maxSeq: 4,
    layer: 0,
    dtype: "f32",
    layout: "interleaved",
    tree: { table: treeTable([-1, 0, 0]), first: 0 },
  };
  // q = (1, 0) everywhere; k = (0, 0) so all visible keys weigh the same; v marks the row.
  const row = (v: number) => [1, 0, 0, 0, v, 0];
  const r = fusedAttentionRef(
    new Float32Array([...row(10), ...row(20), ...row(30)]),
    new Float32Array(8),
    new Float32Array([4, 0, 9, 9, 9, 9, 9, 9]),
    new Float32Array([0]),
    s,
  );
  // Row 0 sees cache row 0 (4) and itself (10); row 1: 4, 10, 20; row 2: 4, 10, 30 (not 20).
  assert.deepEqual([r.out[0], r.out[2], r.out[4]], [7, 34 / 3, 44 / 3].map(Math.fround));
});

const star = (n: number) => Array.from({ length: n }, (_, i) => i === 0 ? -1 : 0);
/**
 * Tree cases (parents, rows = nodes first..first+T-1, pos): one node, stars (depth 1), a chain,
 * random trees up to the 64-node budget, and draft-style forwards of one level whose earlier
 * nodes are already in the cache (then pos = context + first).
 */
const TREES: { parents: number[]; first: number; T: number; pos: number }[] = [
  { parents: [-1], first: 0, T: 1, pos: 0 },
  { parents: [-1], first: 0, T: 1, pos: 37 },
  { parents: star(5), first: 0, T: 5, pos: 5 },
  { parents: chainParents(9), first: 0, T: 9, pos: 29 },
  { parents: randomTree(17, 1, false), first: 0, T: 17, pos: 3 },
  { parents: randomTree(33, 2, true), first: 0, T: 33, pos: 130 },
  { parents: randomTree(TREE_MAX_NODES, 3, false), first: 0, T: TREE_MAX_NODES, pos: 11 },
  { parents: randomTree(40, 4, true), first: 0, T: 40, pos: 0 },
  // Level 3 of a 6x3 tree (nodes 7..9; nodes 0..6 cached after a context of 20), and level 6.
  { parents: levelTree(6, 3), first: 7, T: 3, pos: 20 + 7 },
  { parents: levelTree(6, 3), first: 16, T: 3, pos: 64 + 16 },
  // The leaves of a star: nodes 1..12 after the root (cached after a context of 1).
  { parents: star(13), first: 1, T: 12, pos: 1 + 1 },
];

for (const dtype of ["f32", "f16", "q8"] as KvDType[]) {
  const features = dtype === "f16" ? ["shader-f16" as const] : [];
  gpuTest(
    `fused tree attention (${dtype} cache) matches the masked reference on ragged trees`,
    async (gpu) => {
      let split = 0, unsplit = 0;
      for (const [nHeads, nKvHeads, headDim] of SHAPES.slice(0, 3)) {
        for (const [i, { parents, first, T, pos }] of TREES.entries()) {
          const layout: RopeLayout = (i + headDim) % 2 ? "interleaved" : "rotate-half";
          const extra = i % 2 ? 64 : 0;
          const c: Case = {
            T,
            pos,
            nHeads,
            nKvHeads,
            headDim,
            maxSeq: pos + T + extra,
            dtype,
            layout,
            tree: { parents, first },
          };
          const kt = fusedAttentionPlan(c, gpu.limits.maxComputeWorkgroupStorageSize).kt;
          if (attentionUsesSplitK(c, kt)) split++;
          else unsplit++;
          await check(gpu, c);
        }
      }
      assert.ok(split > 0 && unsplit > 0, `both paths exercised (${split} split, ${unsplit} not)`);
    },
    { features },
  );
}

gpuTest(
  "fused tree attention over a chain's table equals the chain kernel exactly",
  async (gpu) => {
    for (const [T, pos, extra] of [[1, 37, 64], [5, 130, 3], [17, 29, 64], [40, 0, 0]]) {
      const c: Case = {
        T,
        pos,
        nHeads: 9,
        nKvHeads: 3,
        headDim: 64,
        maxSeq: pos + T + extra,
        dtype: "f32",
        layout: "rotate-half",
      };
      const chain = await check(gpu, c);
      const tree = await check(gpu, { ...c, tree: { parents: chainParents(T), first: 0 } });
      assert.deepEqual(tree, chain, `T=${T} pos=${pos}`);
    }
  },
);

gpuTest("fused attention refuses tree rows past the node budget", async (gpu) => {
  const size = kvCacheBytes("f32", 1, 128, 2, 16);
  const b = (n: number) => gpu.buffer("b", n, RW);
  const args = {
    label: "L0.attn",
    T: 4,
    nHeads: 4,
    nKvHeads: 2,
    headDim: 16,
    maxSeq: 128,
    dtype: "f32" as KvDType,
    layout: "interleaved" as RopeLayout,
    qkv: b(4 * 128 * 4),
    kCache: b(size),
    vCache: b(size),
    state: b(16),
    out: b(4 * 64 * 4),
    invFreq: b(32),
    layers: 1,
    layer: 0,
    scratch: b(1 << 16),
  };
  await assert.rejects(
    () => createFusedAttention(gpu, { ...args, tree: { table: b(64 * 16), first: 61 } }),
    /L0\.attn: tree rows 61\.\.64 outside the 64 nodes/,
  );
  await assert.rejects(
    () => createFusedAttention(gpu, { ...args, tree: { table: b(4 * 16), first: 1 } }),
    /ancestor table of 64 bytes is too small for nodes 0\.\.4/,
  );
});
