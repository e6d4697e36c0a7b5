/**
 * Where a generation's GPU waits: the cycle spans a {@linkcode Decoder} records with `timeline`
 * on ({@linkcode CycleSpan}, device timestamps), split into GPU work and the gaps between cycles
 * of one submission, between submissions, and the wall time outside the timed span (the head
 * before the first read cycle and the tail after the last, such as the final readback's sleep).
 *
 * @module
 */
import type { CycleSpan, DecodeTimeline, HostMark } from "./decode.ts";

/** The idle of one or more generations, from {@linkcode idleBreakdown} (ms unless said). */
export interface IdleBreakdown {
  /** Wall time of the decode (as `DecodeResult.decodeMs`). */
  wallMs: number;
  /** GPU time inside the cycles (first pass begin to last pass end, each cycle). */
  cyclesMs: number;
  /** Gaps between consecutive cycles of one submission. */
  inChunkMs: number;
  /** Gaps between the last cycle of a submission and the first of the next. */
  betweenChunksMs: number;
  /** How many such gaps, and the longest. */
  chunkGaps: number;
  /** The longest gap between submissions. */
  maxChunkGapMs: number;
  /** Wall time outside the first cycle's begin .. the last cycle's end (may be negative when
   * cycles ran before the decode's clock started, e.g. behind the prefill's readback). */
  outsideMs: number;
  /** Cycles and submissions counted. */
  cycles: number;
  /** Submissions counted. */
  chunks: number;
}

/**
 * Splits the wall time `wallMs` of a generation whose read cycles spanned `spans` (in submission
 * order, as {@linkcode Decoder} records them) into GPU work and idle; {@linkcode addIdle} sums
 * several generations.
 *
 * @example
 * ```ts
 * import { idleBreakdown } from "./timeline.ts";
 * const b = idleBreakdown([
 *   { chunk: 1, begin: 0, end: 1000 },
 *   { chunk: 1, begin: 1010, end: 2000 },
 *   { chunk: 2, begin: 2500, end: 3000 },
 * ], 4);
 * console.log(b.cyclesMs, b.inChunkMs, b.betweenChunksMs, b.outsideMs); // 2.49 0.01 0.5 1
 * ```
 */
export function idleBreakdown(spans: readonly CycleSpan[], wallMs: number): IdleBreakdown {
  const b: IdleBreakdown = {
    wallMs,
    cyclesMs: 0,
    inChunkMs: 0,
    betweenChunksMs: 0,
    chunkGaps: 0,
    maxChunkGapMs: 0,
    outsideMs: wallMs,
    cycles: spans.length,
    chunks: new Set(spans.map((s) => s.chunk)).size,
  };
  if (spans.length === 0) return b;
  for (let i = 0; i < spans.length; i++) {
    const s = spans[i];
    b.cyclesMs += (s.end - s.begin) / 1e3;
    if (i === 0) continue;
    const gap = Math.max(0, s.begin - spans[i - 1].end) / 1e3;
    if (s.chunk === spans[i - 1].chunk) b.inChunkMs += gap;
    else {
      b.betweenChunksMs += gap;
      b.chunkGaps++;
      b.maxChunkGapMs = Math.max(b.maxChunkGapMs, gap);
    }
  }
  b.outsideMs = wallMs - (spans[spans.length - 1].end - spans[0].begin) / 1e3;
  return b;
}

/** The sum of two breakdowns (the longest gap is the longer one). */
export function addIdle(a: IdleBreakdown, b: IdleBreakdown): IdleBreakdown {
  return {
    wallMs: a.wallMs + b.wallMs,
    cyclesMs: a.cyclesMs + b.cyclesMs,
    inChunkMs: a.inChunkMs + b.inChunkMs,
    betweenChunksMs: a.betweenChunksMs + b.betweenChunksMs,
    chunkGaps: a.chunkGaps + b.chunkGaps,
    maxChunkGapMs: Math.max(a.maxChunkGapMs, b.maxChunkGapMs),
    outsideMs: a.outsideMs + b.outsideMs,
    cycles: a.cycles + b.cycles,
    chunks: a.chunks + b.chunks,
  };
}

/** One submission of a generation, on the host's clock ({@linkcode chunkTimeline}). */
export interface ChunkRow {
  /** Submission number. */
  chunk: number;
  /** Cycles read back from it. */
  cycles: number;
  /** Host ms (since the generation began) its encoding began, and it (its first part) went in. */
  encodeMs?: number;
  /** As `encodeMs`, for its first submission. */
  submitMs?: number;
  /** Its first cycle's begin and last cycle's end, on the host's clock (see below). */
  beginMs: number;
  /** As `beginMs`. */
  endMs: number;
  /** GPU time inside its cycles. */
  busyMs: number;
  /** Idle GPU time between the previous submission's last cycle and its first (0 for the first). */
  gapMs: number;
}

/**
 * A generation's submissions on one clock: the GPU spans of `timeline` moved onto the host's
 * clock by the smallest offset that has every submission start at or after its host submit mark
 * (so the one that found the GPU idle starts at once), next to the host's encode and submit
 * marks. So a gap with a late submit mark is the
 * host's encoding; one without, a readback's wait.
 *
 * @example
 * ```ts
 * import { chunkTimeline } from "./timeline.ts";
 * const rows = chunkTimeline({
 *   cycles: [{ chunk: 1, begin: 0, end: 900 }, { chunk: 2, begin: 3000, end: 4000 }],
 *   host: [
 *     { chunk: 1, what: "submit", ms: 4 },
 *     { chunk: 2, what: "encode", ms: 5.1 },
 *     { chunk: 2, what: "submit", ms: 8 },
 *   ],
 * });
 * console.log(rows.map((r) => [r.chunk, r.beginMs, r.gapMs])); // [[1, 5, 0], [2, 8, 2.1]]
 * ```
 */
export function chunkTimeline(timeline: DecodeTimeline): ChunkRow[] {
  const ids = [...new Set(timeline.cycles.map((c) => c.chunk))];
  const first = (id: number, what: HostMark["what"]) =>
    timeline.host.find((h) => h.chunk === id && h.what === what)?.ms;
  let offset = -Infinity; // host ms minus GPU ms
  for (const id of ids) {
    const s = first(id, "submit");
    const b = timeline.cycles.find((c) => c.chunk === id)!.begin / 1e3;
    if (s !== undefined) offset = Math.max(offset, s - b);
  }
  if (!Number.isFinite(offset)) offset = 0;
  const rows: ChunkRow[] = [];
  for (const id of ids) {
    const cs = timeline.cycles.filter((c) => c.chunk === id);
    const beginMs = cs[0].begin / 1e3 + offset, endMs = cs[cs.length - 1].end / 1e3 + offset;
    const prev = rows[rows.length - 1];
    rows.push({
      chunk: id,
      cycles: cs.length,
      encodeMs: first(id, "encode"),
      submitMs: first(id, "submit"),
      beginMs,
      endMs,
      busyMs: cs.reduce((a, c) => a + c.end - c.begin, 0) / 1e3,
      gapMs: prev ? Math.max(0, beginMs - prev.endMs) : 0,
    });
  }
  return rows;
}
