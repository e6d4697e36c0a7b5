import {
  BlockPool,
  blockTableImage,
  KV_BLOCK_ROWS,
  pagedKvBlocksFitting,
  pagedKvBufferBytes,
  pagedKvPoolBytes,
  SequenceBlocks,
} from "../engine/paged_kv.ts";
import {
  createPagedAttention,
  createPagedAttentionScratch,
  createPagedKvWrite,
  PAGED_NO_SEQ,
  type PagedAttentionForce,
  pagedAttentionPlan,
  pagedAttentionRef,
  pagedAttentionScratchBytes,
  pagedAttentionScratchSizes,
  type PagedKvLayout,
  pagedKvWriteRef,
  type PagedRefLayout,
  type PagedRow,
  pagedRowsImage,
} from "../kernels/paged_attention.ts";
import { attentionRef } from "../kernels/attention.ts";
import { createRope, ropeInvFreq, ropeRef } from "../kernels/rope.ts";
import {
  kvCacheBytes,
  kvDequantizeRef,
  type KvDType,
  kvQ8CacheImage,
  kvQuantizeRef,
} from "../kernels/kv_write.ts";
import type { Gpu } from "../engine/gpu.ts";
import { assertClose, errorStats, gpuTest, randomArray, rng } from "./harness.ts";
import assert from "@specdec/assert";

// ------------------------------------------------------------------------------------------
// Allocator

Deno.test("BlockPool.alloc() takes free blocks and returns null, taking none, when short", () => {
  const pool = new BlockPool(5);
  assert.equal(pool.blockRows, KV_BLOCK_ROWS);
  const a = pool.alloc(3)!;
  assert.deepEqual(a, [0, 1, 2]);
  assert.equal(pool.inUse, 3);
  assert.equal(pool.available, 2);
  assert.equal(pool.alloc(3), null);
  assert.equal(pool.inUse, 3, "a failed alloc takes nothing");
  assert.deepEqual(pool.alloc(0), []);
  const b = pool.alloc(2)!;
  assert.deepEqual(b, [3, 4]);
  assert.equal(pool.available, 0);
  assert.equal(pool.alloc(1), null);
  pool.free([a[1]]);
  assert.deepEqual(pool.alloc(1), [1], "a freed block is reused");
  pool.free([...a, ...b]);
  assert.equal(pool.inUse, 0);
  assert.equal(pool.available, 5);
  assert.throws(() => pool.alloc(-1), /n must be an integer >= 0, got -1/);
  assert.throws(() => new BlockPool(0), /numBlocks must be an integer >= 1, got 0/);
  assert.throws(() => new BlockPool(4, 1.5), /blockRows must be an integer >= 1, got 1.5/);
});

Deno.test("BlockPool.free() rejects double frees and foreign blocks and then frees nothing", () => {
  const pool = new BlockPool(4, 8);
  const a = pool.alloc(2)!;
  pool.free([a[0]]);
  assert.throws(() => pool.free([a[0]]), /block 0 is not held \(double free\?\)/);
  assert.throws(() => pool.free([a[1], a[1]]), /block 1 is not held \(double free\?\)/);
  assert.ok(pool.isHeld(a[1]), "the rejected free left block 1 held");
  assert.throws(() => pool.free([a[1], 4]), /4 is not a block of this pool \(ids 0\.\.3\)/);
  assert.throws(() => pool.free([-1]), /-1 is not a block of this pool/);
  assert.throws(() => pool.free([0.5]), /0.5 is not a block of this pool/);
  assert.throws(() => pool.free([3]), /block 3 is not held/, "never allocated");
  assert.equal(pool.inUse, 1);
  pool.free([a[1]]);
  assert.equal(pool.inUse, 0);
});

Deno.test("SequenceBlocks.ensure() grows by whole blocks and release() returns them all", () => {
  const pool = new BlockPool(6, 16);
  const s = new SequenceBlocks(pool);
  assert.ok(s.ensure(0));
  assert.equal(s.blocks.length, 0);
  assert.ok(s.ensure(1));
  assert.equal(s.blocks.length, 1);
  assert.ok(s.ensure(16));
  assert.equal(s.blocks.length, 1, "16 rows still fit one block");
  assert.ok(s.ensure(17));
  assert.equal(s.blocks.length, 2);
  assert.equal(s.capacity, 32);
  assert.ok(s.ensure(5), "never shrinks");
  assert.equal(s.blocks.length, 2);
  const t = new SequenceBlocks(pool);
  assert.ok(t.ensure(64)); // 4 blocks: the pool is now full
  assert.equal(pool.available, 0);
  assert.equal(s.ensure(33), false, "exhausted pool");
  assert.equal(s.blocks.length, 2, "a failed ensure takes nothing");
  assert.equal(s.physicalRow(17), s.blocks[1] * 16 + 1);
  assert.throws(() => s.physicalRow(32), /row 32 is outside the 32 rows held/);
  t.release();
  assert.equal(pool.inUse, 2);
  assert.ok(s.ensure(70));
  assert.equal(s.blocks.length, 5);
  s.release();
  s.release(); // nothing left: a no-op, not a double free
  assert.equal(pool.inUse, 0);
  assert.ok(s.ensure(3), "a released table is reusable");
  s.release();
  assert.equal(pool.inUse, 0);
});

Deno.test("SequenceBlocks growing in turns get interleaved (scattered) blocks", () => {
  const pool = new BlockPool(12, 8);
  const seqs = [0, 1, 2].map(() => new SequenceBlocks(pool));
  for (let rows = 1; rows <= 32; rows += 8) seqs.forEach((s) => assert.ok(s.ensure(rows)));
  assert.deepEqual(seqs.map((s) => s.blocks), [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]]);
  assert.deepEqual(
    [...blockTableImage(seqs.map((s) => s.blocks), 5)],
    [0, 3, 6, 9, 0, 1, 4, 7, 10, 0, 2, 5, 8, 11, 0],
  );
  seqs[1].release();
  assert.ok(seqs[0].ensure(40));
  assert.equal(seqs[0].blocks[4], 10, "the last freed block is reused first");
  assert.throws(() => blockTableImage(seqs.map((s) => s.blocks), 4), /table 0 has 5 blocks/);
});

Deno.test("pagedKvPoolBytes() is K plus V of a cache of numBlocks*blockRows rows", () => {
  for (const dtype of ["f32", "f16", "q8"] as KvDType[]) {
    const s = { dtype, layers: 3, numBlocks: 10, blockRows: 16, nKvHeads: 2, headDim: 64 };
    assert.equal(pagedKvBufferBytes(s), kvCacheBytes(dtype, 3, 160, 2, 64));
    assert.equal(pagedKvPoolBytes(s), 2 * kvCacheBytes(dtype, 3, 160, 2, 64));
    const n = pagedKvBlocksFitting(pagedKvPoolBytes(s) + 5, s);
    assert.equal(n, 10);
    assert.equal(pagedKvBlocksFitting(pagedKvPoolBytes(s) - 1, s), 9);
  }
  assert.equal(
    pagedKvBlocksFitting(10, {
      dtype: "f16",
      layers: 1,
      blockRows: 16,
      nKvHeads: 1,
      headDim: 8,
    }),
    0,
  );
  assert.throws(
    () =>
      pagedKvPoolBytes({
        dtype: "f16",
        layers: 1,
        numBlocks: 0,
        blockRows: 16,
        nKvHeads: 1,
        headDim: 8,
      }),
    /numBlocks must be an integer >= 1, got 0/,
  );
});

Deno.test("pagedRowsImage() packs (seq, pos) and rejects values that are not u32", () => {
  assert.deepEqual([...pagedRowsImage([{ seq: 2, pos: 7 }, { seq: PAGED_NO_SEQ, pos: 0 }])], [
    2,
    7,
    PAGED_NO_SEQ,
    0,
  ]);
  assert.throws(() => pagedRowsImage([{ seq: -1, pos: 0 }]), /row 0 seq must be a u32, got -1/);
});

Deno.test("pagedAttentionPlan() splits small batches into chunks of one key tile, whatever R", () => {
  const shape = { nHeads: 9, nKvHeads: 3, headDim: 64, maxSeqRows: 1024 };
  const one = pagedAttentionPlan({ ...shape, R: 1 }, 32768);
  assert.deepEqual(one, {
    variant: "flash-split",
    bq: 4,
    kt: 32,
    nSplits: 32,
    chunk: 32,
    rowGroup: 1,
  });
  // The chunk is fixed in keys: R changes neither it nor the chunk slots of the grid.
  assert.deepEqual(pagedAttentionPlan({ ...shape, R: 8 }, 32768), one);
  assert.deepEqual(pagedAttentionPlan({ ...shape, R: 21 }, 32768), one); // 63 workgroups unsplit
  const unsplit = { variant: "flash", bq: 4, kt: 32, nSplits: 1, chunk: 1024, rowGroup: 1 };
  assert.deepEqual(pagedAttentionPlan({ ...shape, R: 22 }, 32768), unsplit); // 66: enough
  assert.equal(pagedAttentionPlan({ ...shape, R: 1, maxSeqRows: 32 }, 32768).variant, "flash");
  assert.equal(pagedAttentionPlan({ ...shape, R: 1, maxSeqRows: 33 }, 32768).nSplits, 2);
  assert.deepEqual(pagedAttentionPlan({ ...shape, R: 1 }, 32768, { split: false }), unsplit);
  const forced = pagedAttentionPlan({ ...shape, R: 64 }, 32768, { split: true, chunk: 5 });
  assert.deepEqual(forced, {
    variant: "flash-split",
    bq: 4,
    kt: 32,
    nSplits: 205,
    chunk: 5,
    rowGroup: 1,
  });
  // Row groups: a verify's 5 rows per sequence share a workgroup (15 query rows: bq 16), so 8
  // sequences are 24 workgroups unsplit and the keys split; R must be a multiple of the group.
  const grouped = pagedAttentionPlan({ ...shape, R: 40, rowGroup: 5 }, 32768);
  assert.deepEqual(grouped, {
    variant: "flash-split",
    bq: 16,
    kt: 32,
    nSplits: 32,
    chunk: 32,
    rowGroup: 5,
  });
  assert.throws(
    () => pagedAttentionPlan({ ...shape, R: 41, rowGroup: 5 }, 32768),
    /R=41 is not a multiple of rowGroup 5/,
  );
  assert.equal(pagedAttentionPlan({ ...shape, nHeads: 54, R: 1 }, 32768).bq, 16);
  assert.throws(
    () => pagedAttentionPlan({ ...shape, R: 1, maxSeqRows: 1 << 22 }, 32768),
    /131072 key chunks of 32 keys for 4194304 rows exceed the 65535 workgroups/,
  );
  assert.throws(
    () => pagedAttentionPlan({ ...shape, R: 1 }, 32768, { chunk: 0 }),
    /chunk must be an integer >= 1, got 0/,
  );
});

Deno.test("pagedAttentionScratchSizes() counts partials of every chunk slot and one counter per workgroup column", () => {
  // pycode target: 9 query heads, 3 kv heads (bq 4: one head block), head dim 64, 1024 rows.
  const shape = { R: 8, nHeads: 9, nKvHeads: 3, headDim: 64, maxSeqRows: 1024 };
  const plan = pagedAttentionPlan(shape, 32768);
  const rows = 32 * 8 * 9; // chunk slots x R x heads
  assert.deepEqual(pagedAttentionScratchSizes(shape, plan), {
    acc: rows * 64 * 4,
    ml: (rows * 2 + 8 * 3) * 4,
  });
  assert.equal(pagedAttentionScratchBytes(shape, plan), rows * 64 * 4 + (rows * 2 + 24) * 4);
  const flash = pagedAttentionPlan(shape, 32768, { split: false });
  assert.deepEqual(pagedAttentionScratchSizes(shape, flash), { acc: 0, ml: 0 });
  // Both buffers grow with R: the largest plan's scratch serves the smaller ones.
  const small = { ...shape, R: 3 };
  const s3 = pagedAttentionScratchSizes(small, pagedAttentionPlan(small, 32768));
  const s8 = pagedAttentionScratchSizes(shape, plan);
  assert.ok(s3.acc < s8.acc && s3.ml < s8.ml);
});

// ------------------------------------------------------------------------------------------
// Scenarios: sequences with scattered blocks, a batch of new rows per sequence

/**
 * The kernels read the same pool values as the reference (f16-rounded for f16, int8 x scale for
 * q8: the GPU quantization of the new rows is kv_write's, bit for bit) and accumulate in f32
 * against the reference's f64, over at most 70 keys: f32 rounding only, as attention_test.ts.
 */
const TOL = { nmse: 1e-10, maxAbs: 5e-6 };
/** Layers in every test pool; the tests write and attend over layer 1. */
const LAYERS = 2;
/** Magnitude of the garbage in pool rows no sequence holds: would swamp any score it entered. */
const STALE = 3e4;

interface Scenario {
  dtype: KvDType;
  blockRows: number;
  nHeads: number;
  nKvHeads: number;
  headDim: number;
  /** Length of each sequence after this batch. */
  lens: number[];
  /** Rows each sequence appends in this batch (its last ones; <= its length). */
  fresh: number[];
  /** Padding rows added to the batch. */
  padding: number;
  /** Spare blocks no sequence holds (full of garbage). */
  spare: number;
  seed: number;
}

interface Built {
  layout: PagedKvLayout & PagedRefLayout;
  tables: number[][];
  table: Uint32Array;
  /** Batch rows, shuffled; padding rows mixed in. */
  rows: PagedRow[];
  rowsImg: Uint32Array;
  /** Pool contents before the batch (f32 values; rows not yet written hold garbage). */
  k0: Float32Array;
  v0: Float32Array;
  /** This batch's new k, v: [R, nKv, headDim], and q: [R, nHeads, headDim]. */
  k: Float32Array;
  v: Float32Array;
  q: Float32Array;
}

function shuffle<T>(a: T[], r: () => number): T[] {
  for (let i = a.length - 1; i > 0; i--) {
    const j = Math.floor(r() * (i + 1));
    [a[i], a[j]] = [a[j], a[i]];
  }
  return a;
}

function build(sc: Scenario): Built {
  const r = rng(sc.seed);
  const nBlocks = sc.lens.map((n) => Math.ceil(n / sc.blockRows));
  const numBlocks = nBlocks.reduce((a, b) => a + b, 0) + sc.spare;
  const maxBlocksPerSeq = Math.max(...nBlocks) + 1; // one unused entry per table
  // A random permutation of the pool: each sequence's blocks are scattered and out of order.
  const perm = shuffle(Array.from({ length: numBlocks }, (_, i) => i), r);
  const tables: number[][] = [];
  let next = 0;
  for (const n of nBlocks) tables.push(perm.slice(next, next += n));
  const layout = {
    nKvHeads: sc.nKvHeads,
    headDim: sc.headDim,
    blockRows: sc.blockRows,
    numBlocks,
    numSeqs: sc.lens.length,
    maxBlocksPerSeq,
    layers: LAYERS,
    layer: 1,
    dtype: sc.dtype,
  };
  const rowLen = sc.nKvHeads * sc.headDim, poolRows = numBlocks * sc.blockRows;
  // Garbage everywhere, then random values in the rows each sequence already holds.
  const k0 = new Float32Array(LAYERS * poolRows * rowLen).map(() => r() < 0.5 ? -STALE : STALE);
  const v0 = k0.map(() => r() < 0.5 ? -STALE : STALE);
  const rows: PagedRow[] = [];
  sc.lens.forEach((len, seq) => {
    const old = len - sc.fresh[seq];
    for (let layer = 0; layer < LAYERS; layer++) {
      for (let s = 0; s < old; s++) {
        const phys = tables[seq][Math.floor(s / sc.blockRows)] * sc.blockRows + s % sc.blockRows;
        const o = (layer * poolRows + phys) * rowLen;
        k0.set(randomArray(rowLen, sc.seed + 7 * o + 1), o);
        v0.set(randomArray(rowLen, sc.seed + 7 * o + 2), o);
      }
    }
    for (let s = old; s < len; s++) rows.push({ seq, pos: s });
  });
  for (let i = 0; i < sc.padding; i++) rows.push({ seq: PAGED_NO_SEQ, pos: 3 });
  shuffle(rows, r);
  const R = rows.length;
  return {
    layout,
    tables,
    table: blockTableImage(tables, maxBlocksPerSeq),
    rows,
    rowsImg: pagedRowsImage(rows),
    k0,
    v0,
    k: randomArray(R * rowLen, sc.seed + 3),
    v: randomArray(R * rowLen, sc.seed + 4),
    q: randomArray(R * sc.nHeads * sc.headDim, sc.seed + 5, 3),
  };
}

/** The values a pool of `dtype` holds for `a` (f16-rounded, or q8-quantized and dequantized). */
function held(a: Float32Array, dtype: KvDType, headDim: number): Float32Array {
  if (dtype === "f16") return Float32Array.from(a, Math.f16round);
  if (dtype === "q8") {
    const { q, scale } = kvQuantizeRef(a, a.length / headDim, headDim);
    return kvDequantizeRef(q, scale, headDim);
  }
  return a;
}

/** The reference pools after the batch's write, and the reference attention output. */
function reference(b: Built, nHeads: number) {
  const { dtype, headDim } = b.layout;
  const kRef = held(b.k0, dtype, headDim), vRef = held(b.v0, dtype, headDim);
  pagedKvWriteRef(kRef, b.k, b.rowsImg, b.table, b.layout);
  pagedKvWriteRef(vRef, b.v, b.rowsImg, b.table, b.layout);
  const out = pagedAttentionRef(b.q, kRef, vRef, b.rowsImg, b.table, nHeads, b.layout);
  return { kRef, vRef, out };
}

/**
 * The same attention the contiguous way: each sequence's rows gathered into a cache
 * [LAYERS, len, nKv, headDim] of its own and its batch rows (consecutive positions) as T query
 * rows at pos = first new position, through kernels/attention.ts's `attentionRef`.
 */
function contiguousRef(b: Built, sc: Scenario, kPool: Float32Array, vPool: Float32Array) {
  const rowLen = sc.nKvHeads * sc.headDim, poolRows = b.layout.numBlocks * sc.blockRows;
  const qLen = sc.nHeads * sc.headDim;
  const out = new Float32Array(b.q.length);
  sc.lens.forEach((len, seq) => {
    const k = new Float32Array(LAYERS * len * rowLen), v = new Float32Array(k.length);
    for (let layer = 0; layer < LAYERS; layer++) {
      for (let s = 0; s < len; s++) {
        const phys = b.tables[seq][Math.floor(s / sc.blockRows)] * sc.blockRows +
          s % sc.blockRows;
        const src = (layer * poolRows + phys) * rowLen, dst = (layer * len + s) * rowLen;
        k.set(kPool.subarray(src, src + rowLen), dst);
        v.set(vPool.subarray(src, src + rowLen), dst);
      }
    }
    const mine = b.rows.map((row, i) => ({ ...row, i })).filter((row) => row.seq === seq)
      .sort((x, y) => x.pos - y.pos);
    const T = mine.length, pos = mine[0].pos;
    const q = new Float32Array(T * qLen);
    mine.forEach((row, t) => q.set(b.q.subarray(row.i * qLen, (row.i + 1) * qLen), t * qLen));
    const o = attentionRef(q, k, v, {
      T,
      pos,
      nHeads: sc.nHeads,
      nKvHeads: sc.nKvHeads,
      headDim: sc.headDim,
      maxSeq: len,
      layer: 1,
    });
    mine.forEach((row, t) => out.set(o.subarray(t * qLen, (t + 1) * qLen), row.i * qLen));
  });
  return out;
}

const BASE: Omit<Scenario, "dtype" | "blockRows" | "nHeads" | "nKvHeads" | "headDim"> = {
  lens: [1, 17, 33, 70],
  fresh: [1, 3, 1, 4],
  padding: 2,
  spare: 3,
  seed: 1,
};

Deno.test("pagedAttentionRef() equals attentionRef() over the same sequences laid out contiguously", () => {
  for (const blockRows of [16, 8]) {
    for (const [nHeads, nKvHeads, headDim] of [[4, 2, 8], [4, 2, 16], [3, 1, 8]]) {
      const sc: Scenario = { ...BASE, dtype: "f32", blockRows, nHeads, nKvHeads, headDim };
      const b = build(sc);
      const { kRef, vRef, out } = reference(b, nHeads);
      const want = contiguousRef(b, sc, kRef, vRef);
      assertClose(`paged vs contiguous ref bs=${blockRows} ${nHeads}/${nKvHeads}`, out, want, {
        nmse: 1e-24,
        maxAbs: 1e-12,
      });
      // The padding rows are 0 in both.
      b.rows.forEach((row, i) => {
        if (row.seq === PAGED_NO_SEQ) {
          assert.ok(
            out.subarray(i * nHeads * headDim, (i + 1) * nHeads * headDim).every((x) => x === 0),
          );
        }
      });
    }
  }
});

Deno.test("pagedKvWriteRef() writes each row at its block-table row and nothing else", () => {
  const layout: PagedRefLayout = {
    nKvHeads: 1,
    headDim: 2,
    blockRows: 2,
    numBlocks: 3,
    maxBlocksPerSeq: 2,
    layer: 0,
    dtype: "f32",
  };
  const pool = new Float32Array(6 * 2).fill(-1);
  // seq 0 holds blocks [2, 0]; row (0, 2) -> block 0 row 0; row (0, 1) -> block 2 row 1;
  // (0, 4) is past the table and the padding row writes nothing.
  const rows = pagedRowsImage([{ seq: 0, pos: 2 }, { seq: 0, pos: 1 }, { seq: 0, pos: 4 }, {
    seq: PAGED_NO_SEQ,
    pos: 0,
  }]);
  pagedKvWriteRef(
    pool,
    new Float32Array([1, 2, 3, 4, 5, 6, 7, 8]),
    rows,
    new Uint32Array([2, 0]),
    layout,
  );
  assert.deepEqual([...pool], [1, 2, -1, -1, -1, -1, -1, -1, -1, -1, 3, 4]);
});

// ------------------------------------------------------------------------------------------
// GPU: kernels against the references

const usage = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST;

function toPool(gpu: Gpu, label: string, a: Float32Array, dtype: KvDType, hd: number): GPUBuffer {
  if (dtype === "q8") return gpu.upload(label, kvQ8CacheImage(a, hd), usage);
  return gpu.upload(label, dtype === "f16" ? Float16Array.from(a) : a, usage);
}

/** The f32 values of a pool buffer read back from the GPU. */
async function readPool(gpu: Gpu, buf: GPUBuffer, n: number, dtype: KvDType, hd: number) {
  if (dtype === "f32") return new Float32Array(await gpu.read(buf, 0, n * 4));
  if (dtype === "f16") return Float32Array.from(new Float16Array(await gpu.read(buf, 0, n * 2)));
  const bytes = await gpu.read(buf, 0, n + n / hd * 4);
  return kvDequantizeRef(new Int8Array(bytes, 0, n), new Float32Array(bytes, n, n / hd), hd);
}

/** Worst error per dtype over all cases (printed: the tolerance's evidence). */
const worst = new Map<string, number>();

/** One attention dispatch of a scenario: the plan overrides and the workgroup size. */
interface Variant {
  force?: PagedAttentionForce;
  wg?: number;
  rowGroup?: number;
}
const UNSPLIT: Variant = { force: { split: false } };
const AUTO: Variant = {};

function variantName(v: Variant): string {
  const f = v.force;
  const split = f?.split === false ? "unsplit" : `split${f?.chunk ? `/${f.chunk}` : ""}`;
  return `${f ? split : "auto"} wg=${v.wg ?? "default"}` +
    (v.rowGroup ? ` rowGroup=${v.rowGroup}` : "");
}

/**
 * Writes the batch's k, v into the pool and attends, in one submission, once per variant;
 * checks the pool against pagedKvWriteRef exactly and each output against pagedAttentionRef and
 * the contiguous attentionRef.
 */
async function checkScenario(
  gpu: Gpu,
  sc: Scenario,
  variants: Variant[],
  corrupt?: (b: Built) => void,
) {
  const b = build(sc);
  corrupt?.(b);
  const { kRef, vRef, out: want } = reference(b, sc.nHeads);
  // A corrupted batch has no contiguous equivalent: compare with pagedAttentionRef only.
  const wantContig = corrupt ? want : contiguousRef(b, sc, kRef, vRef);
  const R = b.rows.length, hd = sc.headDim;
  const kPool = toPool(gpu, "test.paged.k_pool", b.k0, sc.dtype, hd);
  const vPool = toPool(gpu, "test.paged.v_pool", b.v0, sc.dtype, hd);
  const rows = gpu.upload("test.paged.rows", b.rowsImg);
  const table = gpu.upload("test.paged.table", b.table);
  const common = { ...b.layout, R, kCache: kPool, vCache: vPool, rows, table };
  const dispatches = [
    await createPagedKvWrite(gpu, {
      ...common,
      label: "test.paged.kv_write",
      k: gpu.upload("test.paged.k", b.k),
      v: gpu.upload("test.paged.v", b.v),
    }),
  ];
  const q = gpu.upload("test.paged.q", b.q);
  const outs = variants.map((_, i) => gpu.buffer(`test.paged.out${i}`, b.q.byteLength, usage));
  for (let i = 0; i < variants.length; i++) {
    dispatches.push(
      await createPagedAttention(gpu, {
        ...common,
        label: `test.paged.attn${i}`,
        nHeads: sc.nHeads,
        q,
        out: outs[i],
        ...variants[i],
      }),
    );
  }
  await gpu.run("test.paged", dispatches);
  const name = `${sc.dtype} bs=${sc.blockRows} heads=${sc.nHeads}/${sc.nKvHeads} hd=${hd}` +
    ` lens=${sc.lens} fresh=${sc.fresh}`;
  const n = kRef.length;
  assert.deepEqual(await readPool(gpu, kPool, n, sc.dtype, hd), kRef, `${name}: K pool`);
  assert.deepEqual(await readPool(gpu, vPool, n, sc.dtype, hd), vRef, `${name}: V pool`);
  for (let i = 0; i < variants.length; i++) {
    const got = new Float32Array(await gpu.read(outs[i]));
    const label = `${name} R=${R} ${variantName(variants[i])}`;
    const e = errorStats(got, want).maxAbs;
    worst.set(sc.dtype, Math.max(worst.get(sc.dtype) ?? 0, e));
    assertClose(`${label} vs pagedAttentionRef`, got, want, TOL);
    assertClose(`${label} vs contiguous attentionRef`, got, wantContig, TOL);
    b.rows.forEach((row, r) => {
      if (row.seq < b.layout.numSeqs) return;
      const o = got.subarray(r * sc.nHeads * hd, (r + 1) * sc.nHeads * hd);
      assert.ok(o.every((x) => x === 0), `${label}: padding row ${r} is not 0`);
    });
  }
}

for (const dtype of ["f32", "f16", "q8"] as KvDType[]) {
  gpuTest(
    `paged kv_write + attention ${dtype} match the references with scattered tables, ragged lengths, GQA`,
    async (gpu) => {
      let seed = 1;
      for (const blockRows of [16, 8]) {
        for (const [nHeads, nKvHeads, headDim] of [[4, 2, 8], [4, 2, 16], [3, 1, 8], [36, 2, 8]]) {
          // Unsplit, forced chunks of 8 keys, and the plan's own choice (split: small batches).
          await checkScenario(gpu, {
            ...BASE,
            dtype,
            blockRows,
            nHeads,
            nKvHeads,
            headDim,
            seed: seed++,
          }, [UNSPLIT, { force: { split: true, chunk: 8 } }, AUTO]);
        }
      }
      // Decode-like: one row per sequence; and verify-like: 5 rows of one long sequence.
      await checkScenario(gpu, {
        dtype,
        blockRows: 16,
        nHeads: 4,
        nKvHeads: 2,
        headDim: 16,
        lens: [2, 16, 65, 40, 9],
        fresh: [1, 1, 1, 1, 1],
        padding: 0,
        spare: 0,
        seed: 100,
      }, [UNSPLIT, AUTO]);
      await checkScenario(gpu, {
        dtype,
        blockRows: 8,
        nHeads: 4,
        nKvHeads: 2,
        headDim: 8,
        lens: [70, 5],
        fresh: [5, 5],
        padding: 1,
        spare: 2,
        seed: 101,
      }, [UNSPLIT, AUTO]);
      console.log(`  worst ${dtype} max-abs vs reference: ${worst.get(dtype)?.toExponential(2)}`);
    },
    { features: dtype === "f16" ? ["shader-f16"] : [] },
  );
}

/**
 * Ragged decode and verify batches for the split path at R = 1, 3, 8, 17 (head layout 4/2 x 16:
 * below ATTN_MIN_WORKGROUPS workgroups unsplit, so the plan splits into chunks of one key tile,
 * 32 keys on lavapipe): rows with 1 key, exactly 1 and 2 chunks, one key past a boundary, many
 * chunks, and verify rows (consecutive positions of one sequence) inside and across a boundary.
 */
const SPLIT_SCENARIOS: Omit<Scenario, "dtype">[] = [
  { lens: [97], fresh: [1] },
  { lens: [64], fresh: [1] },
  { lens: [1, 32, 130], fresh: [1, 1, 1] },
  { lens: [1, 32, 33, 64, 65, 200, 7, 96], fresh: [1, 1, 1, 1, 1, 1, 1, 1] },
  { lens: [1, 32, 64, 130, 33, 200], fresh: [1, 1, 5, 5, 1, 4] },
].map((s, i) => ({
  ...s,
  blockRows: 16,
  nHeads: 4,
  nKvHeads: 2,
  headDim: 16,
  padding: 0,
  spare: 2,
  seed: 300 + i,
}));

for (const dtype of ["f32", "f16", "q8"] as KvDType[]) {
  gpuTest(
    `paged attention split-K ${dtype} merged in-kernel matches the references at R = 1, 3, 8, 17 with 1-key rows, chunk boundaries, many chunks, verify rows`,
    async (gpu) => {
      const maxShared = gpu.limits.maxComputeWorkgroupStorageSize;
      for (const sc of SPLIT_SCENARIOS) {
        const R = sc.fresh.reduce((a, b) => a + b, 0);
        const maxSeqRows = (Math.max(...sc.lens.map((n) => Math.ceil(n / 16))) + 1) * 16;
        const plan = pagedAttentionPlan({ ...sc, R, maxSeqRows }, maxShared);
        assert.equal(plan.variant, "flash-split", `R=${R}: the plan splits`);
        assert.equal(plan.chunk, plan.kt);
        await checkScenario(gpu, { ...sc, dtype }, [
          AUTO,
          { wg: 64 },
          { wg: 256 },
          { force: { split: true, chunk: 16 } },
          UNSPLIT,
        ]);
      }
      console.log(`  worst ${dtype} max-abs vs reference: ${worst.get(dtype)?.toExponential(2)}`);
    },
    { features: dtype === "f16" ? ["shader-f16"] : [] },
  );
}

/**
 * Reorders a built batch of V fresh rows per sequence (and V padding rows) into row groups,
 * step-major as a batched verify lays them out: row i*G + g is the i-th row (by position) of
 * the g-th sequence (padding last), with its q, k and v.
 */
function toRowGroups(b: Built, V: number, nHeads: number): void {
  const R = b.rows.length, G = R / V, hd = b.layout.headDim;
  const order = b.rows.map((row, i) => ({ row, i }))
    .sort((x, y) => x.row.seq - y.row.seq || x.row.pos - y.row.pos);
  const src = Array.from({ length: R }, (_, j) => order[(j % G) * V + Math.floor(j / G)].i);
  const take = (a: Float32Array, w: number) => {
    const o = new Float32Array(a.length);
    src.forEach((s, j) => o.set(a.subarray(s * w, (s + 1) * w), j * w));
    return o;
  };
  const kv = b.layout.nKvHeads * hd;
  b.k = take(b.k, kv);
  b.v = take(b.v, kv);
  b.q = take(b.q, nHeads * hd);
  b.rows = src.map((s) => b.rows[s]);
  b.rowsImg = pagedRowsImage(b.rows);
}

gpuTest(
  "paged attention over row groups (a verify's k + 1 rows per sequence, step-major) matches the reference, split and not, with a padding group",
  async (gpu) => {
    const scenarios: [Omit<Scenario, "dtype">, number][] = [
      [{ ...SPLIT_SCENARIOS[0], lens: [5, 37, 70, 100], fresh: [5, 5, 5, 5], padding: 5 }, 5],
      [{
        ...SPLIT_SCENARIOS[0],
        nHeads: 9,
        nKvHeads: 3,
        headDim: 8,
        lens: [3, 33, 64],
        fresh: [3, 3, 3],
        seed: 411,
      }, 3],
    ];
    for (const [sc, V] of scenarios) {
      await checkScenario(
        gpu,
        { ...sc, dtype: "f32" },
        [
          { rowGroup: V },
          { rowGroup: V, force: { split: true, chunk: 16 } },
          { rowGroup: V, ...UNSPLIT },
          AUTO,
        ],
        (b) => toRowGroups(b, V, sc.nHeads),
      );
    }
  },
);

gpuTest(
  "split paged attention run twice in one submission and beside a smaller plan on a shared scratch: the counters return to 0",
  async (gpu) => {
    const sc: Scenario = { ...SPLIT_SCENARIOS[4], dtype: "f32" };
    const b = build(sc);
    const { kRef, vRef, out: want } = reference(b, sc.nHeads);
    const R = b.rows.length, hd = sc.headDim, qLen = sc.nHeads * hd;
    // The same attention over the batch's first 3 rows (an R = 3 plan reading the same rows).
    const want3 = pagedAttentionRef(
      b.q.subarray(0, 3 * qLen),
      kRef,
      vRef,
      b.rowsImg.subarray(0, 6),
      b.table,
      sc.nHeads,
      b.layout,
    );
    const kPool = toPool(gpu, "test.paged.reuse.k_pool", b.k0, sc.dtype, hd);
    const vPool = toPool(gpu, "test.paged.reuse.v_pool", b.v0, sc.dtype, hd);
    const rows = gpu.upload("test.paged.reuse.rows", b.rowsImg);
    const table = gpu.upload("test.paged.reuse.table", b.table);
    const common = { ...b.layout, R, kCache: kPool, vCache: vPool, rows, table };
    const shape = {
      R,
      nHeads: sc.nHeads,
      nKvHeads: sc.nKvHeads,
      headDim: hd,
      maxSeqRows: b.layout.maxBlocksPerSeq * b.layout.blockRows,
    };
    const plan = pagedAttentionPlan(shape, gpu.limits.maxComputeWorkgroupStorageSize);
    assert.equal(plan.variant, "flash-split");
    // One scratch, sized for the largest plan (R = 17), serves both plans.
    const scratch = createPagedAttentionScratch(gpu, "test.paged.reuse.scratch", shape, plan);
    const q = gpu.upload("test.paged.reuse.q", b.q);
    const out = [0, 1, 2].map((i) => gpu.buffer(`test.paged.reuse.out${i}`, b.q.byteLength, usage));
    const attn = (i: number, rowsN: number) =>
      createPagedAttention(gpu, {
        ...common,
        label: `test.paged.reuse.attn${i}`,
        R: rowsN,
        nHeads: sc.nHeads,
        q,
        out: out[i],
        scratch,
      });
    const x = await attn(0, R), small = await attn(1, 3), y = await attn(2, R);
    const list = [
      await createPagedKvWrite(gpu, {
        ...common,
        label: "test.paged.reuse.kv_write",
        k: gpu.upload("test.paged.reuse.k", b.k),
        v: gpu.upload("test.paged.reuse.v", b.v),
      }),
      x,
      x, // a second run of the same plan: its counters must be back at 0
      small, // a smaller plan on the same scratch: its partials end before x's counters
      y, // a third plan: merges only if x and small left every counter at 0
    ];
    for (let run = 0; run < 2; run++) {
      for (const o of out) gpu.write(o, new Float32Array(b.q.length));
      await gpu.run("test.paged.reuse", list);
      const got = await Promise.all(out.map(async (o) => new Float32Array(await gpu.read(o))));
      assertClose(`run ${run}: R=${R} twice`, got[0], want, TOL);
      assertClose(
        `run ${run}: R=3 on the shared scratch`,
        got[1].subarray(0, 3 * qLen),
        want3,
        TOL,
      );
      assertClose(`run ${run}: R=${R} after both`, got[2], want, TOL);
    }
  },
);

gpuTest(
  "createPagedAttention() and createPagedKvWrite() reject bad shapes and short buffers",
  async (gpu) => {
    const b = gpu.buffer("test.paged.bad", 1 << 16, usage);
    const args = {
      label: "test.paged.bad",
      R: 2,
      nHeads: 4,
      nKvHeads: 2,
      headDim: 8,
      blockRows: 16,
      numBlocks: 4,
      numSeqs: 2,
      maxBlocksPerSeq: 4,
      layers: 1,
      layer: 0,
      dtype: "f32" as KvDType,
      q: b,
      k: b,
      v: b,
      kCache: b,
      vCache: b,
      rows: b,
      table: b,
      out: b,
    };
    await createPagedAttention(gpu, args); // valid as given
    await assert.rejects(
      () => createPagedAttention(gpu, { ...args, nHeads: 5 }),
      /nHeads 5 is not a multiple of nKvHeads 2/,
    );
    const short = gpu.buffer("test.paged.short", 28, usage);
    await assert.rejects(
      () => createPagedAttention(gpu, { ...args, table: short }),
      /block table buffer of 28 bytes is short of 2 x 4 u32 \(32\)/,
    );
    await assert.rejects(
      () => createPagedKvWrite(gpu, { ...args, rows: gpu.buffer("test.paged.r", 12, usage) }),
      /rows buffer of 12 bytes is short of R=2 x 8/,
    );
    await assert.rejects(
      () => createPagedKvWrite(gpu, { ...args, numBlocks: 1000 }),
      /cache need \d+ bytes per cache/,
    );
    await assert.rejects(
      () => createPagedKvWrite(gpu, { ...args, maxBlocksPerSeq: 0 }),
      /maxBlocksPerSeq must be an integer >= 1, got 0/,
    );
  },
);

gpuTest("createRope() with rowPositions turns each batch row by its own position", async (gpu) => {
  // Rows of 3 sequences at scattered positions (verify rows 40..42 of one), and a padding row
  // (RoPE of padding is harmless: its position is whatever the image says).
  const rows: PagedRow[] = [
    { seq: 2, pos: 40 },
    { seq: 0, pos: 0 },
    { seq: 2, pos: 41 },
    { seq: 1, pos: 17 },
    { seq: PAGED_NO_SEQ, pos: 3 },
    { seq: 2, pos: 42 },
  ];
  const R = rows.length, nHeads = 4, nKvHeads = 2, hd = 16;
  for (const layout of ["rotate-half", "interleaved"] as const) {
    const invFreq = ropeInvFreq(hd, 10000);
    const q = randomArray(R * nHeads * hd, 11, 2), k = randomArray(R * nKvHeads * hd, 12, 2);
    const qBuf = gpu.upload("test.paged.rope.q", q), kBuf = gpu.upload("test.paged.rope.k", k);
    const d = await createRope(gpu, {
      label: `test.paged.rope.${layout}`,
      q: qBuf,
      k: kBuf,
      invFreq: gpu.upload("test.paged.rope.inv_freq", invFreq),
      half: hd / 2,
      state: gpu.upload("test.paged.rope.rows", pagedRowsImage(rows)),
      rowPositions: true,
      layout,
      T: R,
      nHeads,
      nKvHeads,
      headDim: hd,
    });
    await gpu.run("test.paged.rope", [d]);
    const gotQ = new Float32Array(await gpu.read(qBuf)),
      gotK = new Float32Array(await gpu.read(kBuf));
    rows.forEach((row, r) => {
      for (const [got, x, heads] of [[gotQ, q, nHeads], [gotK, k, nKvHeads]] as const) {
        const n = heads * hd;
        const want = ropeRef(x.subarray(r * n, (r + 1) * n), heads, hd, row.pos, invFreq, layout);
        // f32 angle and GPU sin/cos against f64 Math.sin/cos at positions up to 42.
        assertClose(`${layout} row ${r} pos ${row.pos}`, got.subarray(r * n, (r + 1) * n), want, {
          nmse: 1e-10,
          maxAbs: 1e-4,
        });
      }
    });
  }
});

gpuTest(
  "paged kv_write + attention over cycles of continuous batching: join, grow, leave, reuse blocks",
  async (gpu) => {
    // 3 sequence slots share a pool of 10 blocks of 4 rows; 4 batch rows per cycle. The
    // dispatches are built once; each cycle rewrites rows, tables, k, v, q, as a server would.
    const blockRows = 4, numBlocks = 10, numSeqs = 3, maxBlocksPerSeq = 6, R = 4;
    const nHeads = 4, nKvHeads = 2, hd = 8, rowLen = nKvHeads * hd;
    const dtype: KvDType = gpu.features.f16 ? "f16" : "f32";
    const pool = new BlockPool(numBlocks, blockRows);
    const layout = {
      nKvHeads,
      headDim: hd,
      blockRows,
      numBlocks,
      numSeqs,
      maxBlocksPerSeq,
      layers: LAYERS,
      layer: 1,
      dtype,
    };
    const poolRows = numBlocks * blockRows, n = LAYERS * poolRows * rowLen;
    const kPool = toPool(gpu, "test.paged.cb.k_pool", new Float32Array(n), dtype, hd);
    const vPool = toPool(gpu, "test.paged.cb.v_pool", new Float32Array(n), dtype, hd);
    const kRef = new Float32Array(n), vRef = new Float32Array(n);
    const rowsBuf = gpu.buffer("test.paged.cb.rows", R * 8, usage);
    const tableBuf = gpu.buffer("test.paged.cb.table", numSeqs * maxBlocksPerSeq * 4, usage);
    const k = gpu.buffer("test.paged.cb.k", R * rowLen * 4, usage);
    const v = gpu.buffer("test.paged.cb.v", R * rowLen * 4, usage);
    const q = gpu.buffer("test.paged.cb.q", R * nHeads * hd * 4, usage);
    const out = gpu.buffer("test.paged.cb.out", R * nHeads * hd * 4, usage);
    const common = { ...layout, R, kCache: kPool, vCache: vPool, rows: rowsBuf, table: tableBuf };
    const dispatches = [
      await createPagedKvWrite(gpu, { ...common, label: "test.paged.cb.kv_write", k, v }),
      await createPagedAttention(gpu, {
        ...common,
        label: "test.paged.cb.attn",
        nHeads,
        q,
        out,
      }),
    ];
    // slots[i]: the sequence in slot i (its blocks and length), or null.
    const slots: ({ blocks: SequenceBlocks; len: number } | null)[] = [null, null, null];
    // Per cycle, rows each slot appends (0: idle/absent); slot 1 leaves after cycle 4 and a new
    // sequence joins it at cycle 6 on the freed blocks.
    const plan = [
      [1, 3, 0],
      [1, 1, 2],
      [2, 1, 1],
      [1, 2, 1],
      [1, 1, 1],
      [1, 0, 3],
      [1, 2, 1],
      [3, 1, 0],
      [1, 1, 1],
      [2, 1, 1],
    ];
    let peak = 0, freed: readonly number[] = [];
    for (let cycle = 0; cycle < plan.length; cycle++) {
      if (cycle === 5) {
        freed = slots[1]!.blocks.blocks;
        slots[1]!.blocks.release();
        slots[1] = null;
      }
      const rows: PagedRow[] = [];
      plan[cycle].forEach((add, i) => {
        if (add === 0) return;
        slots[i] ??= { blocks: new SequenceBlocks(pool), len: 0 };
        const s = slots[i]!;
        assert.ok(s.blocks.ensure(s.len + add), `cycle ${cycle}: pool exhausted`);
        for (let j = 0; j < add; j++) rows.push({ seq: i, pos: s.len + j });
        s.len += add;
      });
      peak = Math.max(peak, pool.inUse);
      if (cycle === 6) {
        // The newcomer's block holds the old sequence's rows past its position: masked by pos.
        assert.ok(freed.includes(slots[1]!.blocks.blocks[0]), "freed blocks are reused");
      }
      assert.ok(rows.length <= R);
      while (rows.length < R) rows.push({ seq: PAGED_NO_SEQ, pos: 0 });
      const rowsImg = pagedRowsImage(rows);
      const table = blockTableImage(slots.map((s) => s?.blocks.blocks ?? []), maxBlocksPerSeq);
      const kx = randomArray(R * rowLen, 1000 + cycle), vx = randomArray(R * rowLen, 2000 + cycle);
      const qx = randomArray(R * nHeads * hd, 3000 + cycle, 3);
      gpu.write(rowsBuf, rowsImg);
      gpu.write(tableBuf, table);
      gpu.write(k, kx);
      gpu.write(v, vx);
      gpu.write(q, qx);
      await gpu.run("test.paged.cb", dispatches);
      pagedKvWriteRef(kRef, kx, rowsImg, table, layout);
      pagedKvWriteRef(vRef, vx, rowsImg, table, layout);
      const want = pagedAttentionRef(qx, kRef, vRef, rowsImg, table, nHeads, layout);
      assertClose(`cycle ${cycle}`, new Float32Array(await gpu.read(out)), want, TOL);
    }
    assert.ok(peak >= 9, `the pool was mostly used (peak ${peak} of ${numBlocks} blocks)`);
    for (const s of slots) s?.blocks.release();
    assert.equal(pool.inUse, 0, "every block returned");
  },
);

gpuTest(
  "paged kernels stay inside the pool with rows past the table and bad block ids",
  async (gpu) => {
    // Host bugs the kernels must survive: a row past its table's capacity (not written, attends
    // over the capacity), a table entry naming block numBlocks + 5 (not written, reads as zero),
    // and a row of sequence numSeqs (padding).
    for (const dtype of ["f32", "q8"] as KvDType[]) {
      await checkScenario(
        gpu,
        {
          ...BASE,
          dtype,
          blockRows: 8,
          nHeads: 4,
          nKvHeads: 2,
          headDim: 8,
          seed: 200,
        },
        [UNSPLIT, { force: { split: true, chunk: 8 } }, { force: { split: true } }],
        (b) => {
          const cap = b.layout.maxBlocksPerSeq * b.layout.blockRows;
          const at = (seq: number) => b.rows.findIndex((r) => r.seq === seq);
          b.rows[at(3)] = { seq: 3, pos: cap + 3 };
          b.rows[at(2)] = { seq: 2, pos: cap - 5 }; // in its last entry, now pointing off the pool:
          b.table[2 * b.layout.maxBlocksPerSeq + b.layout.maxBlocksPerSeq - 1] =
            b.layout.numBlocks + 5;
          b.rows[at(0)] = { seq: b.layout.numSeqs, pos: 0 };
          b.rowsImg = pagedRowsImage(b.rows);
        },
      );
    }
  },
);
