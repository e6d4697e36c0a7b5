/**
 * The fused q/k/v split + RoPE + paged KV write (kernels/paged_qkv_write.ts) against its CPU
 * reference (pagedQkvRef then pagedKvWriteRef) and, bit for bit, against the two dispatches it
 * replaces (createPagedQkv then createPagedKvWrite) on ragged shapes: R = 1, 3, 8, 17; heads
 * 9/3, 4/2, 1/1; headDim 8 and 64; scattered block tables with rows either side of block
 * boundaries, an unmapped row and a padding row; f32, f16 and q8 pools; both RoPE layouts.
 *
 * Tolerances against the CPU reference (GPU sin/cos differ from the CPU's in the last bits):
 * q and f32 pools max-abs 1e-4; f16 pools 2e-3 (one f16 step near 2 is 2^-9 ≈ 2e-3, when the
 * rounding falls the other way); q8 pools 0.012 (one quantization step, absmax ≤ √2 over 127).
 */
import assert from "@specdec/assert";
import { assertClose, errorStats, gpuTest, randomArray, rng } from "./harness.ts";
import { createPagedQkvWrite, pagedQkvWriteRef } from "../kernels/paged_qkv_write.ts";
import { createPagedQkv } from "../kernels/paged_qkv.ts";
import {
  createPagedKvWrite,
  PAGED_NO_SEQ,
  type PagedKvLayout,
  type PagedRow,
  pagedRowsImage,
} from "../kernels/paged_attention.ts";
import {
  kvDequantizeRef,
  type KvDType,
  kvQ8CacheImage,
  kvQuantizeRef,
} from "../kernels/kv_write.ts";
import { ropeInvFreq } from "../kernels/rope.ts";
import { blockTableImage } from "../engine/paged_kv.ts";
import type { Gpu } from "../engine/gpu.ts";
import type { RopeLayout } from "../models/types.ts";

const usage = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST;
const UNMAPPED = 0xffffffff;
const BLOCK_ROWS = 4, SEQS = 5, MAPPED_BLOCKS = 4, MAX_BLOCKS = 6, SPARE = 3, LAYERS = 2;
/** The k-th row of a sequence sits at POS[k]: either side of the boundaries 4, 8 and the end. */
const POS = [3, 4, 0, 15, 8, 7];
/** Past the sequence's 4 mapped blocks but inside its table: an unmapped entry. */
const UNMAPPED_POS = MAPPED_BLOCKS * BLOCK_ROWS + 1;

interface Case {
  R: number;
  nHeads: number;
  nKvHeads: number;
  headDim: number;
  dtype: KvDType;
  ropeLayout: RopeLayout;
  seed: number;
}

/** Shuffled block tables, the batch rows, qkv rows and stale pools of one case. */
function build(c: Case) {
  const r = rng(c.seed);
  const numBlocks = SEQS * MAPPED_BLOCKS + SPARE;
  const ids = Array.from({ length: numBlocks }, (_, i) => i);
  for (let i = ids.length - 1; i > 0; i--) {
    const j = Math.floor(r() * (i + 1));
    [ids[i], ids[j]] = [ids[j], ids[i]];
  }
  const tables = Array.from(
    { length: SEQS },
    (_, s) => ids.slice(s * MAPPED_BLOCKS, (s + 1) * MAPPED_BLOCKS),
  );
  const table = blockTableImage(tables, MAX_BLOCKS);
  for (let s = 0; s < SEQS; s++) {
    table.fill(UNMAPPED, s * MAX_BLOCKS + MAPPED_BLOCKS, (s + 1) * MAX_BLOCKS);
  }
  const rows: PagedRow[] = Array.from(
    { length: c.R },
    (_, i) => ({ seq: i % SEQS, pos: POS[Math.floor(i / SEQS)] }),
  );
  if (c.R >= 3) rows[c.R - 1] = { seq: (c.R - 1) % SEQS, pos: UNMAPPED_POS };
  if (c.R >= 8) rows[c.R - 2] = { seq: PAGED_NO_SEQ, pos: 2 };
  const layout: PagedKvLayout = {
    nKvHeads: c.nKvHeads,
    headDim: c.headDim,
    blockRows: BLOCK_ROWS,
    numBlocks,
    numSeqs: SEQS,
    maxBlocksPerSeq: MAX_BLOCKS,
    layers: LAYERS,
    layer: 1,
    dtype: c.dtype,
  };
  const poolLen = LAYERS * numBlocks * BLOCK_ROWS * c.nKvHeads * c.headDim;
  return {
    layout,
    table,
    rows,
    rowsImg: pagedRowsImage(rows),
    qkv: randomArray(c.R * (c.nHeads + 2 * c.nKvHeads) * c.headDim, c.seed + 1),
    k0: randomArray(poolLen, c.seed + 2, 4),
    v0: randomArray(poolLen, c.seed + 3, 4),
    invFreq: ropeInvFreq(c.headDim, 10000),
  };
}

/** The values a pool of `dtype` holds for `a` (f16-rounded, or q8-quantized and dequantized). */
function held(a: Float32Array, dtype: KvDType, hd: number): Float32Array {
  if (dtype === "f16") return Float32Array.from(a, Math.f16round);
  if (dtype === "q8") {
    const { q, scale } = kvQuantizeRef(a, a.length / hd, hd);
    return kvDequantizeRef(q, scale, hd);
  }
  return a.slice();
}

function toPool(gpu: Gpu, label: string, a: Float32Array, dtype: KvDType, hd: number): GPUBuffer {
  if (dtype === "q8") return gpu.upload(label, kvQ8CacheImage(a, hd), usage);
  return gpu.upload(label, dtype === "f16" ? Float16Array.from(a) : a, usage);
}

function poolValues(bytes: ArrayBuffer, n: number, dtype: KvDType, hd: number): Float32Array {
  if (dtype === "f32") return new Float32Array(bytes, 0, n);
  if (dtype === "f16") return Float32Array.from(new Float16Array(bytes, 0, n));
  return kvDequantizeRef(new Int8Array(bytes, 0, n), new Float32Array(bytes, n, n / hd), hd);
}

const TOL: Record<KvDType, number> = { f32: 1e-4, f16: 2e-3, q8: 0.012 };
const worst = new Map<string, number>();

/** Runs the fused kernel and the two-dispatch path on the same inputs; checks both ways. */
async function check(gpu: Gpu, c: Case): Promise<void> {
  const b = build(c), hd = c.headDim;
  const name = `${c.dtype} ${c.ropeLayout} R=${c.R} heads=${c.nHeads}/${c.nKvHeads} hd=${hd}`;
  const kRef = held(b.k0, c.dtype, hd), vRef = held(b.v0, c.dtype, hd);
  const qRef = pagedQkvWriteRef(
    b.qkv,
    b.rowsImg,
    b.table,
    b.invFreq,
    { ...b.layout, nHeads: c.nHeads, ropeLayout: c.ropeLayout },
    kRef,
    vRef,
  );
  const qBytes = c.R * c.nHeads * hd * 4, kvBytes = c.R * c.nKvHeads * hd * 4;
  const bufs = {
    qkv: gpu.upload("t.fqkv.qkv", b.qkv),
    invFreq: gpu.upload("t.fqkv.inv", b.invFreq),
    rows: gpu.upload("t.fqkv.rows", b.rowsImg),
    table: gpu.upload("t.fqkv.table", b.table),
    q: gpu.buffer("t.fqkv.q", qBytes, usage),
    kPool: toPool(gpu, "t.fqkv.kpool", b.k0, c.dtype, hd),
    vPool: toPool(gpu, "t.fqkv.vpool", b.v0, c.dtype, hd),
    // The two-dispatch path's outputs.
    q2: gpu.buffer("t.fqkv.q2", qBytes, usage),
    k2: gpu.buffer("t.fqkv.k2", kvBytes, usage),
    v2: gpu.buffer("t.fqkv.v2", kvBytes, usage),
    kPool2: toPool(gpu, "t.fqkv.kpool2", b.k0, c.dtype, hd),
    vPool2: toPool(gpu, "t.fqkv.vpool2", b.v0, c.dtype, hd),
  };
  const shape = { R: c.R, nHeads: c.nHeads, nKvHeads: c.nKvHeads, headDim: hd };
  const paging = { ...b.layout, R: c.R, rows: bufs.rows, table: bufs.table };
  await gpu.run("t.fqkv", [
    await createPagedQkvWrite(gpu, {
      ...paging,
      label: "t.fqkv.fused",
      nHeads: c.nHeads,
      ropeLayout: c.ropeLayout,
      qkv: bufs.qkv,
      q: bufs.q,
      invFreq: bufs.invFreq,
      kCache: bufs.kPool,
      vCache: bufs.vPool,
    }),
    await createPagedQkv(gpu, {
      ...shape,
      label: "t.fqkv.split",
      layout: c.ropeLayout,
      qkv: bufs.qkv,
      q: bufs.q2,
      k: bufs.k2,
      v: bufs.v2,
      invFreq: bufs.invFreq,
      rows: bufs.rows,
    }),
    await createPagedKvWrite(gpu, {
      ...paging,
      label: "t.fqkv.kv_write",
      k: bufs.k2,
      v: bufs.v2,
      kCache: bufs.kPool2,
      vCache: bufs.vPool2,
    }),
  ]);
  const q = new Float32Array(await gpu.read(bufs.q));
  assertClose(`${name}: q vs reference`, q, qRef, { nmse: 1e-10, maxAbs: 1e-4 });
  assert.deepEqual(q, new Float32Array(await gpu.read(bufs.q2)), `${name}: q vs createPagedQkv`);
  const pools: [GPUBuffer, GPUBuffer, Float32Array][] = [
    [bufs.kPool, bufs.kPool2, kRef],
    [bufs.vPool, bufs.vPool2, vRef],
  ];
  for (const [p, p2, ref] of pools) {
    const bytes = await gpu.read(p);
    const got = poolValues(bytes, ref.length, c.dtype, hd);
    const e = errorStats(got, ref).maxAbs;
    worst.set(c.dtype, Math.max(worst.get(c.dtype) ?? 0, e));
    assertClose(`${name}: pool vs reference`, got, ref, {
      nmse: 1e-4,
      maxAbs: TOL[c.dtype],
    });
    assert.deepEqual(
      new Uint8Array(bytes),
      new Uint8Array(await gpu.read(p2)),
      `${name}: pool bytes vs createPagedQkv + createPagedKvWrite`,
    );
  }
  for (const buf of Object.values(bufs)) buf.destroy();
}

for (const dtype of ["f32", "f16", "q8"] as KvDType[]) {
  gpuTest(
    `createPagedQkvWrite() ${dtype} matches pagedQkvWriteRef and the split + kv_write dispatches`,
    async (gpu) => {
      let seed = 1;
      for (const ropeLayout of ["interleaved", "rotate-half"] as const) {
        for (const [nHeads, nKvHeads] of [[9, 3], [4, 2], [1, 1]]) {
          for (const headDim of [8, 64]) {
            for (const R of [1, 3, 8, 17]) {
              await check(gpu, { R, nHeads, nKvHeads, headDim, dtype, ropeLayout, seed: seed++ });
            }
          }
        }
      }
      console.log(
        `  worst ${dtype} pool max-abs vs reference: ${worst.get(dtype)?.toExponential(2)}`,
      );
    },
    { features: dtype === "f16" ? ["shader-f16"] : [] },
  );
}

Deno.test("pagedQkvWriteRef() drops unmapped and padding rows and writes the rest at phys(seq, pos)", () => {
  const c: Case = {
    R: 8,
    nHeads: 2,
    nKvHeads: 1,
    headDim: 4,
    dtype: "f32",
    ropeLayout: "rotate-half",
    seed: 9,
  };
  const b = build(c);
  const k = new Float32Array(b.k0.length), v = new Float32Array(b.v0.length);
  pagedQkvWriteRef(b.qkv, b.rowsImg, b.table, b.invFreq, { ...b.layout, ...c }, k, v);
  const poolRows = b.layout.numBlocks * BLOCK_ROWS, width = (c.nHeads + 2) * 4;
  const written = new Set<number>();
  b.rows.forEach((row, r) => {
    if (row.seq >= SEQS || row.pos >= MAPPED_BLOCKS * BLOCK_ROWS) return;
    const phys = b.table[row.seq * MAX_BLOCKS + Math.floor(row.pos / BLOCK_ROWS)] * BLOCK_ROWS +
      row.pos % BLOCK_ROWS;
    const o = (poolRows + phys) * 4; // layer 1
    written.add(o);
    // v is copied unchanged from the row's last head.
    assert.deepEqual([...v.subarray(o, o + 4)], [
      ...b.qkv.subarray(r * width + 12, r * width + 16),
    ]);
  });
  assert.equal(written.size, 6, "rows 6 (padding) and 7 (unmapped) are dropped");
  for (let o = 0; o < v.length; o += 4) {
    if (!written.has(o)) assert.ok(v.subarray(o, o + 4).every((x) => x === 0), `row at ${o}`);
  }
});

gpuTest("createPagedQkvWrite() rejects bad shapes and short buffers", async (gpu) => {
  const c: Case = {
    R: 3,
    nHeads: 4,
    nKvHeads: 2,
    headDim: 8,
    dtype: "f32",
    ropeLayout: "interleaved",
    seed: 5,
  };
  const b = build(c);
  const args = {
    ...b.layout,
    label: "t.fqkv.bad",
    R: c.R,
    nHeads: c.nHeads,
    ropeLayout: c.ropeLayout,
    qkv: gpu.upload("t.fqkv.qkv", b.qkv),
    q: gpu.buffer("t.fqkv.q", c.R * c.nHeads * 8 * 4, usage),
    invFreq: gpu.upload("t.fqkv.inv", b.invFreq),
    kCache: toPool(gpu, "t.fqkv.k", b.k0, "f32", 8),
    vCache: toPool(gpu, "t.fqkv.v", b.v0, "f32", 8),
    rows: gpu.upload("t.fqkv.rows", b.rowsImg),
    table: gpu.upload("t.fqkv.table", b.table),
  };
  await createPagedQkvWrite(gpu, args);
  await assert.rejects(() => createPagedQkvWrite(gpu, { ...args, R: 4 }), /qkv buffer/);
  await assert.rejects(
    () => createPagedQkvWrite(gpu, { ...args, numBlocks: 1000 }),
    /t\.fqkv\.bad/,
  );
  await assert.rejects(() => createPagedQkvWrite(gpu, { ...args, nHeads: 0 }), /nHeads/);
  await assert.rejects(() => createPagedQkvWrite(gpu, { ...args, headDim: 6 }), /multiple of 4/);
  await assert.rejects(
    () => createPagedQkvWrite(gpu, { ...args, q: gpu.buffer("t.fqkv.q1", 4, usage) }),
    /q buffer/,
  );
});
