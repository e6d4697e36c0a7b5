/**
 * Paged KV cache bookkeeping (vLLM's PagedAttention, issue 12): one pool of `numBlocks`
 * fixed-size blocks of `blockRows` cache rows per model, and a block table per sequence mapping
 * its logical block i (rows i*blockRows .. (i+1)*blockRows - 1) to a physical block of the pool.
 *
 * The pool's K and V buffers are laid out exactly like a contiguous cache of
 * `maxSeq = numBlocks * blockRows` rows (kernels/kv_write.ts: `[layers, rows, nKvHeads, headDim]`,
 * q8 scales after the values), so sequence row `pos` of a sequence with table `t` lives in
 * physical row `t[floor(pos / blockRows)] * blockRows + pos % blockRows`
 * (kernels/paged_attention.ts reads and writes it there).
 *
 * This file is CPU only: which blocks are free, which sequence holds which, and the u32 image of
 * the block tables the kernels read. Nothing here touches the GPU.
 *
 * @module
 */
import { kvCacheBytes, type KvDType } from "../kernels/kv_write.ts";

/** Default cache rows per block (vLLM's default block size). */
export const KV_BLOCK_ROWS = 16;

function checkCount(label: string, field: string, x: number, min: number): void {
  if (!Number.isInteger(x) || x < min) {
    throw new Error(`${label}: ${field} must be an integer >= ${min}, got ${x}`);
  }
}

/**
 * The free list of one model's KV pool: block ids `0 .. numBlocks-1`, each either free or held.
 *
 * `alloc(n)` returns `null` (and takes nothing) when fewer than `n` blocks are free: running out
 * is an expected state for a server, which queues the request until blocks return, not an error.
 * `free()` of a block that is not held (double free, an id from another pool, a non-integer)
 * throws and frees nothing: that is always a bookkeeping bug.
 *
 * @example
 * ```ts
 * import { BlockPool } from "./paged_kv.ts";
 * const pool = new BlockPool(4);
 * const a = pool.alloc(3)!;
 * console.assert(pool.inUse === 3 && pool.available === 1);
 * console.assert(pool.alloc(2) === null); // only 1 free: nothing taken
 * pool.free(a);
 * console.assert(pool.inUse === 0);
 * ```
 */
export class BlockPool {
  /** Blocks in the pool. */
  readonly numBlocks: number;
  /** Cache rows per block. */
  readonly blockRows: number;
  #free: number[];
  #held: Uint8Array;

  /** A pool of `numBlocks` free blocks of `blockRows` rows ({@linkcode KV_BLOCK_ROWS} default). */
  constructor(numBlocks: number, blockRows: number = KV_BLOCK_ROWS) {
    checkCount("BlockPool", "numBlocks", numBlocks, 1);
    checkCount("BlockPool", "blockRows", blockRows, 1);
    this.numBlocks = numBlocks;
    this.blockRows = blockRows;
    this.#held = new Uint8Array(numBlocks);
    // A stack popped from the end: block 0 is handed out first, a freed block is reused first.
    this.#free = Array.from({ length: numBlocks }, (_, i) => numBlocks - 1 - i);
  }

  /** Blocks currently held by some sequence. */
  get inUse(): number {
    return this.numBlocks - this.#free.length;
  }

  /** Blocks currently free (named `available` because `free` is the method returning blocks). */
  get available(): number {
    return this.#free.length;
  }

  /** Whether block `id` is currently held. */
  isHeld(id: number): boolean {
    return Number.isInteger(id) && id >= 0 && id < this.numBlocks && this.#held[id] === 1;
  }

  /** Takes `n` free blocks and returns their ids, or `null` (taking none) if fewer are free. */
  alloc(n: number): number[] | null {
    checkCount("BlockPool.alloc", "n", n, 0);
    if (n > this.#free.length) return null;
    const out = this.#free.splice(this.#free.length - n, n).reverse();
    for (const id of out) this.#held[id] = 1;
    return out;
  }

  /**
   * Returns `blocks` to the pool. Throws, freeing none of them, if any id is not a held block of
   * this pool or appears twice.
   */
  free(blocks: readonly number[]): void {
    const seen = new Set<number>();
    for (const id of blocks) {
      if (!Number.isInteger(id) || id < 0 || id >= this.numBlocks) {
        throw new Error(
          `BlockPool.free: ${id} is not a block of this pool (ids 0..${this.numBlocks - 1})`,
        );
      }
      if (this.#held[id] !== 1 || seen.has(id)) {
        throw new Error(`BlockPool.free: block ${id} is not held (double free?)`);
      }
      seen.add(id);
    }
    for (const id of blocks) {
      this.#held[id] = 0;
      this.#free.push(id);
    }
  }
}

/**
 * The block table of one sequence: the physical blocks holding its rows, logical block i first
 * at index i. It grows with {@linkcode SequenceBlocks.ensure} as rows are appended and gives all
 * its blocks back with {@linkcode SequenceBlocks.release} when the sequence ends.
 *
 * @example
 * ```ts
 * import { BlockPool, SequenceBlocks } from "./paged_kv.ts";
 * const pool = new BlockPool(8, 16);
 * const seq = new SequenceBlocks(pool);
 * console.assert(seq.ensure(17)); // 17 rows: 2 blocks
 * console.assert(seq.blocks.length === 2 && seq.capacity === 32);
 * console.assert(seq.physicalRow(16) === seq.blocks[1] * 16);
 * seq.release();
 * console.assert(pool.inUse === 0);
 * ```
 */
export class SequenceBlocks {
  /** The pool the blocks come from. */
  readonly pool: BlockPool;
  #blocks: number[] = [];

  /** An empty table taking blocks from `pool`. */
  constructor(pool: BlockPool) {
    this.pool = pool;
  }

  /** The physical block of each logical block, in order. */
  get blocks(): readonly number[] {
    return this.#blocks;
  }

  /** Rows the held blocks can hold. */
  get capacity(): number {
    return this.#blocks.length * this.pool.blockRows;
  }

  /**
   * Makes room for rows `0 .. rows-1`: takes the missing blocks from the pool. Returns false,
   * taking none, when the pool has too few free blocks (the table is unchanged). Never shrinks.
   */
  ensure(rows: number): boolean {
    checkCount("SequenceBlocks.ensure", "rows", rows, 0);
    const need = Math.ceil(rows / this.pool.blockRows) - this.#blocks.length;
    if (need <= 0) return true;
    const got = this.pool.alloc(need);
    if (got === null) return false;
    this.#blocks.push(...got);
    return true;
  }

  /** The pool row holding sequence row `pos` (which must lie within {@linkcode capacity}). */
  physicalRow(pos: number): number {
    if (!Number.isInteger(pos) || pos < 0 || pos >= this.capacity) {
      throw new Error(
        `SequenceBlocks.physicalRow: row ${pos} is outside the ${this.capacity} rows held`,
      );
    }
    const b = this.pool.blockRows;
    return this.#blocks[Math.floor(pos / b)] * b + pos % b;
  }

  /** Returns every block to the pool; the table is empty (and reusable) afterwards. */
  release(): void {
    const blocks = this.#blocks;
    this.#blocks = [];
    this.pool.free(blocks);
  }
}

/**
 * The u32 image of the block tables the paged kernels read: `[tables.length, maxBlocksPerSeq]`,
 * row i = table i, padded with 0 (a valid block id, so a stray read stays inside the pool; the
 * kernels never read past a row's position). Throws if a table is longer than `maxBlocksPerSeq`.
 *
 * @example
 * ```ts
 * import { blockTableImage } from "./paged_kv.ts";
 * const img = blockTableImage([[5, 2], [7]], 3);
 * console.assert(img.join() === "5,2,0,7,0,0");
 * ```
 */
export function blockTableImage(
  tables: readonly (readonly number[])[],
  maxBlocksPerSeq: number,
): Uint32Array {
  checkCount("blockTableImage", "maxBlocksPerSeq", maxBlocksPerSeq, 1);
  const out = new Uint32Array(tables.length * maxBlocksPerSeq);
  tables.forEach((t, i) => {
    if (t.length > maxBlocksPerSeq) {
      throw new Error(
        `blockTableImage: table ${i} has ${t.length} blocks, more than maxBlocksPerSeq ${maxBlocksPerSeq}`,
      );
    }
    out.set(t, i * maxBlocksPerSeq);
  });
  return out;
}

/** The shape of one model's KV pool. */
export interface PagedKvShape {
  /** Element type of the pool (kernels/kv_write.ts). */
  dtype: KvDType;
  /** Layers of the model (one pool buffer holds all of them). */
  layers: number;
  /** Blocks in the pool. */
  numBlocks: number;
  /** Cache rows per block. */
  blockRows: number;
  /** Key/value heads. */
  nKvHeads: number;
  /** Per-head size; a multiple of 4. */
  headDim: number;
}

/**
 * Exact bytes of ONE pool buffer (K or V): a contiguous cache of `numBlocks * blockRows` rows,
 * {@linkcode kvCacheBytes}. The pool needs two (K and V): {@linkcode pagedKvPoolBytes}.
 *
 * @example
 * ```ts
 * import { pagedKvBufferBytes } from "./paged_kv.ts";
 * const s = { dtype: "f16" as const, layers: 2, numBlocks: 8, blockRows: 16, nKvHeads: 3, headDim: 64 };
 * console.assert(pagedKvBufferBytes(s) === 2 * 8 * 16 * 3 * 64 * 2);
 * ```
 */
export function pagedKvBufferBytes(s: PagedKvShape): number {
  checkCount("pagedKvBufferBytes", "numBlocks", s.numBlocks, 1);
  checkCount("pagedKvBufferBytes", "blockRows", s.blockRows, 1);
  return kvCacheBytes(s.dtype, s.layers, s.numBlocks * s.blockRows, s.nKvHeads, s.headDim);
}

/**
 * Bytes of one model's whole pool, K and V buffers together: what the VRAM planner accounts.
 *
 * @example
 * ```ts
 * import { pagedKvPoolBytes } from "./paged_kv.ts";
 * const s = { dtype: "q8" as const, layers: 1, numBlocks: 2, blockRows: 16, nKvHeads: 1, headDim: 8 };
 * console.assert(pagedKvPoolBytes(s) === 2 * 2 * 16 * (8 + 4));
 * ```
 */
export function pagedKvPoolBytes(s: PagedKvShape): number {
  return 2 * pagedKvBufferBytes(s);
}

/**
 * The most blocks whose pool (K and V) fits in `bytes`: the inverse of
 * {@linkcode pagedKvPoolBytes} (which is linear in the block count), 0 if not even one fits.
 *
 * @example
 * ```ts
 * import { pagedKvBlocksFitting, pagedKvPoolBytes } from "./paged_kv.ts";
 * const s = { dtype: "f32" as const, layers: 2, blockRows: 16, nKvHeads: 2, headDim: 8 };
 * const n = pagedKvBlocksFitting(1 << 20, s);
 * console.assert(pagedKvPoolBytes({ ...s, numBlocks: n }) <= 1 << 20);
 * console.assert(pagedKvPoolBytes({ ...s, numBlocks: n + 1 }) > 1 << 20);
 * ```
 */
export function pagedKvBlocksFitting(bytes: number, s: Omit<PagedKvShape, "numBlocks">): number {
  const perBlock = pagedKvPoolBytes({ ...s, numBlocks: 1 });
  return Math.max(0, Math.floor(bytes / perBlock));
}
