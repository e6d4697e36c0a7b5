/**
 * Continuous batching (issue 12): up to `maxSeqs` sequences decode together, one row each per
 * forward of models/llama_batch.ts, their KV rows in blocks of one paged pool
 * (engine/paged_kv.ts). Plain decoding: each step is
 *
 *   forward   R rows: row i = the last token of active sequence i at its own position
 *   sample    greedy rows: one split argmax over all rows (kernels/argmax.ts); then each
 *             sampled row with its own settings (temperature/top-k/top-p/seed,
 *             kernels/sample.ts); the token is written back as row i's next input
 *   advance   every row's position + 1 (kernels/paged_advance.ts)
 *
 * and a chunk of `n` steps is encoded into one submission and read back once (DESIGN.md: a
 * readback costs >= ~11 ms), so tokens, positions and the RNG counters stay on the GPU within a
 * chunk. While nothing changes (no request waiting, none ended) the next chunk is encoded while
 * the previous one runs and submitted between that one's blocking poll and the 10 ms sleep that
 * ends its `mapAsync`; it continues from the GPU's state, so the GPU never idles through a
 * readback (two chunks in flight at most). When something changes, the host
 * lets the chunks in flight settle, ends the sequences that met a stop (EOS, max tokens, the
 * context, cancel) and gives their blocks back at once, admits waiting requests (each prefilled
 * in its own passes in front of the next chunk, its first token sampled into its row), takes the
 * blocks the next chunk writes, and rewrites the rows, tokens and counters.
 *
 * A chunk never runs a sequence past its last token (n ≤ the fewest tokens any active sequence
 * may still emit, counting the chunk in flight), so no KV row past a sequence's end is ever
 * written. An EOS mid-chunk costs the rest of that chunk's steps for its row, and those of the
 * chunk in flight behind it (its tokens after EOS are dropped).
 *
 * Blocks are taken as sequences grow, chunk by chunk. A request is admitted only when the blocks
 * its whole length (prompt + max tokens) needs, together with what the running sequences may
 * still take, are free: so a running sequence never waits for blocks and nothing is ever
 * preempted. A request that does not fit waits in line (first come, first served).
 *
 * With a draft model ({@linkcode BatchSpeculation}) a step is a greedy speculative cycle instead
 * (kernels/batch_spec.ts): k batched draft steps propose k tokens per sequence (the draft's pool
 * holds the same blocks as the target's, so one block table serves both), the target verifies
 * all (k + 1) R rows in one forward, and each sequence accepts its drafts up to the first
 * disagreement with the target's argmax, plus the target's token there; rejected rows are masked
 * by position. Sequences that do not speculate (`speculate: false`) ride in the same cycles,
 * accepting no draft, with their own sampler over their target row.
 *
 * Per-sequence sampling is bit-compatible with engine/decode.ts's plain path: token j of a
 * sequence is drawn with RNG counter j of its seed (sampler row 0), so greedy output equals
 * `Decoder.generate`'s token for token, and sampled output too wherever the logits agree.
 *
 * @module
 */
import type { Dispatch, Gpu } from "./gpu.ts";
import type { LlamaBatch, LlamaBatchLayout, LlamaBatchShape } from "../models/llama_batch.ts";
import { SequenceBlocks } from "./paged_kv.ts";
import { pagedRowsImage } from "../kernels/paged_attention.ts";
import { createPagedAdvance } from "../kernels/paged_advance.ts";
import { checkSampling, createSample } from "../kernels/sample.ts";
import { argmaxScratchWords, createArgmax } from "../kernels/argmax.ts";
import { createSpecCommit, createSpecRows, SPEC_SEQ_WORDS } from "../kernels/batch_spec.ts";
import type { SamplingSettings } from "./decode.ts";
import type { StopReason } from "./protocol.ts";

/**
 * Most decode steps one chunk (one submission, one readback) runs. A chunk in flight must outlast
 * the readback of the one before it (a 10 ms sleep) plus the host encoding the next (~3 µs a
 * dispatch): 32 steps of an 8-row pycode batch are ~41 ms of GPU time (H200, bench/batch.ts)
 * and ~10 ms of encoding.
 */
export const BATCH_MAX_STEPS = 32;

/**
 * Exact bytes of the buffers a {@linkcode BatchDecoder} over a batch of `layout` allocates
 * ("staging" in the VRAM report): rows, tokens, counters, a prefill chunk, the output ring and
 * its readback copy, and the greedy argmax's scratch for a vocabulary of `vocab`.
 */
export function batchDecoderBytes(
  layout: Pick<LlamaBatchLayout, "maxSeqs" | "maxRows">,
  vocab: number,
  maxSteps = BATCH_MAX_STEPS,
): number {
  const R = layout.maxSeqs;
  return R * 4 + R * 8 + R * 4 + layout.maxRows * 12 + (1 + RING) * (maxSteps + 1) * R * 4 +
    argmaxScratchWords(R, vocab) * 4;
}

/** One generation submitted to a {@linkcode BatchDecoder}. */
export interface BatchRequest {
  /** Prompt ids (at least one). */
  prompt: readonly number[];
  /** Most tokens to generate (at least 1). */
  maxTokens: number;
  /** This sequence's sampling settings. */
  sampling: SamplingSettings;
  /** New ids since the last call, as chunks are read back. */
  onTokens?: (ids: number[]) => void;
  /** Polled between chunks; true ends the sequence ("cancelled"). */
  cancelled?: () => boolean;
  /**
   * With a speculating decoder: draft for this sequence (default true; greedy only). False
   * decodes it plainly in the same cycles, with any sampling settings.
   */
  speculate?: boolean;
  /** With a speculating decoder: drafts this sequence may accept per cycle, at most its k. */
  draftTokens?: number;
}

/** Outcome and timings of one {@linkcode BatchRequest}. */
export interface BatchResult {
  /** Generated ids. */
  tokens: number[];
  /** Why it stopped. */
  stop: StopReason;
  /** Milliseconds from submission to admission (waiting for a slot and blocks). */
  queueMs: number;
  /** Milliseconds from admission to the first token on the host (prefill + its chunk). */
  prefillMs: number;
  /** Milliseconds from the first token to the last. */
  decodeMs: number;
  /** Batched target forward passes this sequence took part in after its prefill. */
  steps: number;
  /** Draft tokens accepted (0 without speculation). */
  accepted: number;
  /** Draft tokens proposed: k per target pass (0 without speculation). */
  proposed: number;
}

/** Figures of the scheduler, for health checks and tests. */
export interface BatchLoad {
  /** Sequences decoding now. */
  active: number;
  /** Requests waiting for a slot or blocks. */
  waiting: number;
  /** Pool blocks held by sequences. */
  blocksInUse: number;
  /** Chunks (submissions with a readback) run so far. */
  chunks: number;
  /**
   * Of them, chunks issued while the previous one was still in flight (continuing from the
   * GPU's state, no host writes between them).
   */
  continued: number;
  /**
   * Host ms the GPU had nothing to run while sequences were decoding: from each readback that
   * drained the queue with no chunk submitted behind it to the next submission.
   */
  waitedMs: number;
}

interface Seq {
  req: BatchRequest;
  slot: number;
  blocks: SequenceBlocks;
  /** Tokens it may emit: maxTokens, cut where its last input would pass the context. */
  limit: number;
  /** Blocks its whole length needs (admission reserves them). */
  need: number;
  tokens: number[];
  /** Tokens it will hold once the chunks in flight settle, at most (every draft accepted). */
  issued: number;
  /** Draft tokens accepted (speculation). */
  accepted: number;
  steps: number;
  /** Chunks it has taken part in. */
  chunks: number;
  t0: number;
  tJoin: number;
  tFirst: number;
  resolve: (r: BatchResult) => void;
  reject: (e: unknown) => void;
}

/** Chunks in flight at once: one running on the GPU while the host reads the other back. */
const RING = 2;

/** A submitted chunk: its rows (active sequences, in row order), steps and readback. */
interface Chunk {
  rows: Seq[];
  /** Speculative cycles (some row drafts) or plain steps. */
  spec: boolean;
  /** Per row: it joined in this chunk (its first token is out[0]). */
  first: boolean[];
  n: number;
  /** Submits its commands (once). */
  submit: () => void;
  /**
   * Maps its readback (after `submit`) and resolves with it; `during` runs once the map call
   * has returned (the queue has drained: Deno's poll waits) and before the map resolves (after a
   * 10 ms sleep), so a chunk submitted there runs through the wait.
   */
  read: (during?: () => void) => Promise<Uint32Array>;
}

/** Drives a {@linkcode LlamaBatch}: admission, chunks of batched steps, leaving. */
export class BatchDecoder {
  readonly #gpu: Gpu;
  readonly #batch: LlamaBatch;
  readonly #maxSteps: number;
  readonly #buf: Record<
    "tokens" | "rows" | "counters" | "prompt" | "promptRows" | "out" | "argmax",
    GPUBuffer
  >;
  readonly #staging: GPUBuffer[]; // [RING] readback copies of out
  readonly #samplers = new Map<string, Promise<Dispatch>>();
  readonly #advance = new Map<number, Promise<Dispatch>>();
  readonly #argmax = new Map<number, Promise<Dispatch>>();
  #waiting: Seq[] = [];
  #active: Seq[] = [];
  #free: number[];
  #running: Promise<void> | undefined;
  #chunks = 0; // chunks settled
  #issued = 0; // chunks submitted
  #continued = 0; // chunks submitted behind one in flight
  #waitedMs = 0; // see BatchLoad.waitedMs
  #drainedAt = -1; // when a readback drained the queue with nothing behind it (-1: none)
  #spec: SpecState | undefined;
  #changed = false; // a sequence ended since the last host-written chunk

  /**
   * A scheduler over `batch` (its `maxSeqs` slots and pool), running at most `maxSteps` steps
   * per chunk ({@linkcode BATCH_MAX_STEPS} default).
   */
  constructor(
    gpu: Gpu,
    batch: LlamaBatch,
    maxSteps = BATCH_MAX_STEPS,
    spec?: BatchSpeculation,
  ) {
    if (!Number.isInteger(maxSteps) || maxSteps < 1) {
      throw new RangeError(`maxSteps must be an integer >= 1, got ${maxSteps}`);
    }
    this.#gpu = gpu;
    this.#batch = batch;
    this.#maxSteps = maxSteps;
    const L = batch.layout;
    if (spec) this.#spec = new SpecState(gpu, batch, spec, maxSteps);
    const S = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST;
    const b = (name: string, bytes: number) => gpu.buffer(`batch.${name}`, bytes, S);
    this.#buf = {
      tokens: b("tokens", L.maxSeqs * 4), // [R] u32: each row's input token, then its sample
      rows: b("rows", L.maxSeqs * 8), // [R] (seq slot, pos)
      counters: b("counters", L.maxSeqs * 4), // [R] u32: each row's RNG counter
      prompt: b("prompt", L.maxRows * 4), // [chunk] u32: a prefill chunk's ids
      promptRows: b("prompt_rows", L.maxRows * 8), // [chunk] (slot, pos) of a prefill chunk
      out: b("out", (maxSteps + 1) * L.maxSeqs * 4), // [n + 1, R] u32: inputs, then each step's
      // The greedy argmax's scratch, shared by every R (kernels/argmax.ts).
      argmax: b("argmax", argmaxScratchWords(L.maxSeqs, batch.config.vocabSize) * 4),
    };
    this.#staging = Array.from({ length: RING }, (_, i) =>
      gpu.buffer(
        `batch.staging${i}`,
        (maxSteps + 1) * L.maxSeqs * 4,
        GPUBufferUsage.COPY_DST | GPUBufferUsage.MAP_READ,
      ));
    this.#free = Array.from({ length: L.maxSeqs }, (_, i) => L.maxSeqs - 1 - i);
  }

  /** GPU bytes this scheduler allocated (rows, tokens, counters, prompt chunk, readback). */
  get bytes(): number {
    let n = this.#spec?.bytes ?? 0;
    for (const b of [...Object.values(this.#buf), ...this.#staging]) n += b.size;
    return n;
  }

  /** Draft tokens per cycle when speculating, else 0 (plain decoding). */
  get draftTokens(): number {
    return this.#spec?.k ?? 0;
  }

  /** Sequences decoding, requests waiting, blocks held, chunks run. */
  get load(): BatchLoad {
    return {
      active: this.#active.length,
      waiting: this.#waiting.length,
      blocksInUse: this.#batch.pool.inUse,
      chunks: this.#chunks,
      continued: this.#continued,
      waitedMs: this.#waitedMs,
    };
  }

  /**
   * Queues a generation; it joins the batch at the next chunk with room (a free slot and the
   * blocks it needs) and resolves when it stops. Rejects at once a request that can never run
   * (empty prompt, no room in the context, bad sampling settings, longer than the whole pool).
   */
  generate(req: BatchRequest): Promise<BatchResult> {
    const L = this.#batch.layout, P = req.prompt.length;
    const V = this.#batch.config.vocabSize;
    try {
      if (P < 1) throw new RangeError("the prompt must hold at least one token");
      const bad = req.prompt.find((t) => !Number.isInteger(t) || t < 0 || t >= V);
      if (bad !== undefined) throw new RangeError(`prompt token ${bad} is outside [0, ${V})`);
      if (P >= L.maxSeqRows) {
        throw new RangeError(
          `the prompt has ${P} tokens but the context holds ${L.maxSeqRows}: no room to generate`,
        );
      }
      if (!Number.isInteger(req.maxTokens) || req.maxTokens < 1) {
        throw new RangeError(`maxTokens must be an integer >= 1, got ${req.maxTokens}`);
      }
      checkSampling("batch", req.sampling);
      if (
        req.draftTokens !== undefined && (!Number.isInteger(req.draftTokens) || req.draftTokens < 1)
      ) {
        throw new RangeError(`draftTokens must be an integer >= 1, got ${req.draftTokens}`);
      }
      if (this.#spec && req.speculate !== false && req.sampling.temperature !== 0) {
        throw new RangeError(
          "batched speculation is greedy only: temperature must be 0 (or speculate: false)",
        );
      }
      if (!Number.isInteger(req.sampling.seed)) {
        throw new RangeError(`seed must be an integer, got ${req.sampling.seed}`);
      }
    } catch (e) {
      return Promise.reject(e);
    }
    // The last token needs no KV row: P + limit - 1 rows at most.
    const limit = Math.min(req.maxTokens, L.maxSeqRows - P + 1);
    // Speculation writes up to k rows past the last input (drafts that may be rejected).
    const spk = this.#spec?.k ?? 0;
    const k = req.speculate === false ? 0 : Math.min(spk, req.draftTokens ?? spk);
    const need = Math.ceil(Math.min(L.maxSeqRows, P + limit - 1 + k) / L.blockRows);
    if (need > L.numBlocks) {
      return Promise.reject(
        new RangeError(
          `this request needs ${need} KV blocks but the pool holds ${L.numBlocks}: ` +
            `lower max tokens or raise the pool`,
        ),
      );
    }
    return new Promise((resolve, reject) => {
      const now = performance.now();
      this.#waiting.push({
        req,
        slot: -1,
        blocks: new SequenceBlocks(this.#batch.pool),
        limit,
        need,
        tokens: [],
        issued: 0,
        accepted: 0,
        steps: 0,
        chunks: 0,
        t0: now,
        tJoin: now,
        tFirst: now,
        resolve,
        reject,
      });
      this.#kick();
    });
  }

  /** Starts the loop unless it runs; restarts it if work arrived as it was ending. */
  #kick(): void {
    if (this.#running) return;
    this.#running = this.#loop().finally(() => {
      this.#running = undefined;
      if (this.#active.length || this.#waiting.length) this.#kick();
    });
  }

  /** Resolves when nothing runs or waits. */
  async idle(): Promise<void> {
    while (this.#running) await this.#running;
  }

  async #loop(): Promise<void> {
    await Promise.resolve(); // requests submitted in the same turn join the first chunk together
    const inflight: Chunk[] = [];
    try {
      while (this.#active.length || this.#waiting.length || inflight.length) {
        // With nothing in flight the host knows every row: admit, rewrite the rows, issue.
        // With one chunk in flight and nothing changed (no joiner, no leaver), the next chunk
        // continues from the GPU's state: it is encoded while the one in flight runs and
        // submitted while that one's readback waits, so the GPU never idles through a readback.
        if (inflight.length === 0) {
          // Requests cancelled while waiting leave the line without running.
          this.#waiting = this.#waiting.filter((s) => {
            if (!s.req.cancelled?.()) return true;
            this.#finish(s, "cancelled");
            return false;
          });
          const joined = this.#admit();
          if (this.#active.length === 0) {
            if (this.#waiting.length) {
              throw new Error("batch: a waiting request fits no empty pool (bookkeeping bug)");
            }
            this.#drainedAt = -1; // idle between requests is no wait
            break;
          }
          this.#changed = false;
          // Everything settled: what each sequence holds is known (speculation counted every
          // draft as accepted while its chunks were in flight).
          for (const s of this.#active) if (s.tokens.length) s.issued = s.tokens.length;
          const c = await this.#issue(joined, true);
          c.submit();
          this.#resumed();
          inflight.push(c);
          continue;
        }
        let next: Chunk | undefined;
        if (
          inflight.length < RING && !this.#changed && this.#waiting.length === 0 &&
          this.#steps(false) > 0
        ) {
          next = await this.#issue([], false);
          this.#continued++;
        }
        const c = inflight.shift()!;
        const out = await c.read(() => {
          if (next) {
            next.submit();
            this.#resumed();
          } else if (this.#drainedAt < 0) this.#drainedAt = performance.now(); // the GPU waits
        });
        if (next) inflight.push(next);
        this.#settle(out, c);
        this.#tighten(inflight);
      }
    } catch (e) {
      // A GPU failure ends every sequence: each caller gets the error, every block returns.
      await Promise.allSettled(inflight.map((c) => c.read()));
      for (const s of [...this.#active, ...this.#waiting]) {
        if (s.blocks.blocks.length) s.blocks.release();
        if (s.slot >= 0) this.#free.push(s.slot);
        s.reject(e);
      }
      this.#active = [];
      this.#waiting = [];
    }
  }

  /**
   * After a chunk settled: each running sequence's `issued` bound becomes what it holds now plus
   * what the chunks still in flight may add at most, where it had counted every draft of the
   * settled chunk as accepted. Still an upper bound on its tokens (and on the cache rows its
   * chunks write), so the next chunk may continue from the GPU's state instead of waiting for
   * everything to settle once the all-accepted count runs out (a k = 4 cycle emits ~3.5 tokens
   * of its 5 on the pycode pair).
   */
  #tighten(inflight: readonly Chunk[]): void {
    for (const s of this.#active) {
      if (!s.tokens.length) continue; // its first token is still in flight
      let bound = s.tokens.length;
      for (const c of inflight) if (c.rows.includes(s)) bound += c.n * (c.spec ? this.#per(s) : 1);
      s.issued = Math.min(s.issued, bound);
    }
  }

  /** After a submission: the GPU's wait since a readback drained its queue ends. */
  #resumed(): void {
    if (this.#drainedAt >= 0) this.#waitedMs += performance.now() - this.#drainedAt;
    this.#drainedAt = -1;
  }

  /** Moves waiting requests into free slots while the pool can hold their whole length. */
  #admit(): Seq[] {
    const joined: Seq[] = [];
    const pool = this.#batch.pool;
    let promised = 0; // blocks running sequences may still take
    for (const s of this.#active) promised += s.need - s.blocks.blocks.length;
    while (this.#waiting.length && this.#free.length) {
      const s = this.#waiting[0];
      if (promised + s.need > pool.available) break;
      this.#waiting.shift();
      s.slot = this.#free.pop()!;
      s.tJoin = performance.now();
      promised += s.need;
      joined.push(s);
      this.#active.push(s);
    }
    return joined;
  }

  /** The sampler of batch row `row` with `s`'s settings, reading logits row `logitsRow`. */
  #sampler(
    s: SamplingSettings,
    row: number,
    logitsRow: number,
    out: GPUBuffer = this.#buf.tokens,
  ): Promise<Dispatch> {
    const key = `${s.temperature}:${s.topK}:${s.topP}:${s.seed}:${row}:${logitsRow}:${out.label}`;
    let d = this.#samplers.get(key);
    if (!d) {
      if (this.#samplers.size >= 512) this.#samplers.clear(); // distinct seeds: stay bounded
      d = createSample(this.#gpu, {
        label: `batch.sample${row}`,
        logits: this.#batch.logits,
        logitsRowOffset: logitsRow,
        out,
        outOffset: row,
        state: this.#buf.counters,
        counterIndex: row,
        V: this.#batch.config.vocabSize,
        rows: 1,
        temperature: s.temperature,
        topK: s.topK,
        topP: s.topP,
        seed: s.seed >>> 0,
      });
      this.#samplers.set(key, d);
    }
    return d;
  }

  /**
   * Steps the next chunk may run: at most maxSteps, none past any active sequence's last token
   * counting the chunks in flight as if none stops early (`fresh`: joiners get their first
   * token from the prefill), and short first chunks (2, 4, 8, ... steps) so that a sequence's
   * first tokens stream soon.
   */
  #steps(fresh: boolean): number {
    const act = this.#active;
    const left = (s: Seq) =>
      Math.ceil((s.limit - (fresh && s.issued === 0 ? 1 : s.issued)) / this.#per(s));
    const ramp = (s: Seq) => 2 << Math.min(s.chunks, 20);
    return Math.min(this.#maxSteps, ...act.map(left), ...act.map(ramp));
  }

  /** Drafts `s` may accept per cycle: 0 when plain, else its draftTokens up to the k. */
  #kOf(s: Seq): number {
    const k = this.#spec?.k ?? 0;
    return s.req.speculate === false ? 0 : Math.min(k, s.req.draftTokens ?? k);
  }

  /** Tokens a cycle of `s` emits at most (and cache rows it moves on). */
  #per(s: Seq): number {
    return this.#kOf(s) + 1;
  }

  /**
   * Encodes and submits one chunk over the active sequences: with `sync`, first the rows state
   * from the host and each joiner's prefill; then n steps; then the copy of out to a staging
   * buffer, whose readback starts at once.
   */
  async #issue(joined: readonly Seq[], sync: boolean): Promise<Chunk> {
    const g = this.#gpu, B = this.#buf, batch = this.#batch, L = batch.layout;
    const act = [...this.#active], R = act.length;
    const n = this.#steps(sync);
    const P = (s: Seq) => s.req.prompt.length;
    // Blocks for every row this chunk writes: inputs at rows P + issued - 1 .. + n - 1 (each
    // speculative cycle moves at most k + 1 rows on and writes k + 1).
    for (const s of act) {
      const had = s.blocks.blocks.length;
      const rows = Math.min(L.maxSeqRows, P(s) + Math.max(1, s.issued) - 1 + n * this.#per(s));
      if (!s.blocks.ensure(rows)) throw new Error("batch: admitted sequence short of blocks");
      if (s.blocks.blocks.length !== had) {
        batch.setTable(s.slot, s.blocks.blocks);
        this.#spec?.draft.setTable(s.slot, s.blocks.blocks);
      }
    }
    // Speculative cycles only while some row drafts; a batch of plain rows takes plain steps
    // (the composition, hence the mode, never changes between host-written chunks).
    if (this.#spec && act.some((s) => this.#kOf(s) > 0)) {
      return await this.#issueSpec(this.#spec, act, joined, sync, n);
    }
    if (sync) {
      // Row state: each row's input token (joiners: their first, sampled below), position and
      // RNG counter (token j of a sequence draws with counter j).
      g.write(B.tokens, new Uint32Array(act.map((s) => s.tokens.at(-1) ?? 0)));
      g.write(
        B.rows,
        pagedRowsImage(act.map((s) => ({ seq: s.slot, pos: P(s) + Math.max(1, s.issued) - 1 }))),
      );
      g.write(B.counters, new Uint32Array(act.map((s) => s.tokens.length)));
    }
    await this.#prefill(act, joined, false);
    // n steps over the R rows; out[0] = the inputs, out[1 + i] = step i's samples.
    const step: Dispatch[] = [
      ...await batch.plan(R, { tokens: { buffer: B.tokens, offset: 0 }, rows: B.rows }, "all"),
    ];
    // Greedy rows: one split argmax over all R rows; sampled rows then overwrite their token.
    if (act.some((s) => s.req.sampling.temperature <= 0)) {
      let am = this.#argmax.get(R);
      if (!am) {
        am = createArgmax(g, {
          label: `batch.argmax${R}`,
          logits: batch.logits,
          ids: B.tokens,
          T: R,
          V: batch.config.vocabSize,
          scratch: { buffer: B.argmax, rows: batch.layout.maxSeqs },
        });
        this.#argmax.set(R, am);
      }
      step.push(await am);
    }
    for (let i = 0; i < R; i++) {
      const s = act[i].req.sampling;
      if (s.temperature > 0) step.push(await this.#sampler(s, i, i));
    }
    let adv = this.#advance.get(R);
    if (!adv) {
      adv = createPagedAdvance(g, { label: `batch.advance${R}`, rows: B.rows, R });
      this.#advance.set(R, adv);
    }
    step.push(await adv);
    const enc = g.device.createCommandEncoder({ label: "batch.chunk" });
    enc.copyBufferToBuffer(B.tokens, 0, B.out, 0, R * 4);
    for (let i = 0; i < n; i++) {
      g.encode(enc, "batch.step", step);
      enc.copyBufferToBuffer(B.tokens, 0, B.out, (i + 1) * R * 4, R * 4);
    }
    const bytes = (n + 1) * R * 4, staging = this.#staging[this.#issued++ % RING];
    enc.copyBufferToBuffer(B.out, 0, staging, 0, bytes);
    const first = act.map((s) => s.issued === 0); // joiners: their first token is out[0]
    for (const s of act) {
      s.issued = Math.max(1, s.issued) + n;
      s.chunks++;
    }
    return { rows: act, spec: false, first, n, ...this.#io(enc.finish(), staging, bytes) };
  }

  /** Submission and readback of a chunk's `commands`, whose last copy fills `staging`. */
  #io(
    commands: GPUCommandBuffer,
    staging: GPUBuffer,
    bytes: number,
  ): Pick<Chunk, "submit" | "read"> {
    const g = this.#gpu;
    let submitted = false;
    return {
      submit: () => {
        if (submitted) return;
        submitted = true;
        g.device.queue.submit([commands]);
      },
      read: async (during?: () => void) => {
        if (!submitted) throw new Error("batch: a chunk read back before it was submitted");
        const mapped = staging.mapAsync(GPUMapMode.READ, 0, bytes);
        during?.();
        await mapped;
        g.throwIfFailed();
        const out = new Uint32Array(staging.getMappedRange(0, bytes).slice(0));
        staging.unmap();
        return out;
      },
    };
  }

  /** {@linkcode BatchDecoder.#issue} when speculating: n cycles of draft, verify, commit. */
  async #issueSpec(
    sp: SpecState,
    act: Seq[],
    joined: readonly Seq[],
    sync: boolean,
    n: number,
  ): Promise<Chunk> {
    const g = this.#gpu, R = act.length, B = sp.buf;
    const P = (s: Seq) => s.req.prompt.length;
    if (sync) {
      // Per row: slot, position of its input, emitted and accepted counts of this chunk; the
      // input (joiners: their first token, sampled by the prefill) in verifyIn row 0.
      const seq = new Uint32Array(R * SPEC_SEQ_WORDS);
      act.forEach((s, i) => {
        seq[SPEC_SEQ_WORDS * i] = s.slot;
        seq[SPEC_SEQ_WORDS * i + 1] = P(s) + Math.max(1, s.issued) - 1;
      });
      g.write(B.seq, seq);
      g.write(B.verifyIn, new Uint32Array(act.map((s) => s.tokens.at(-1) ?? 0)));
      g.write(this.#buf.counters, new Uint32Array(act.map((s) => s.tokens.length)));
      g.write(B.kRow, new Uint32Array(act.map((s) => this.#kOf(s))));
    } else {
      // Continuing from the GPU's positions and inputs: only this chunk's counts restart.
      for (let i = 0; i < R; i++) g.write(B.seq, new Uint32Array(2), (SPEC_SEQ_WORDS * i + 2) * 4);
    }
    await this.#prefill(act, joined, true);
    const cycle = await sp.cycle(
      act.map((s) => s.req.speculate === false ? s.req.sampling : undefined),
      (settings, row) => this.#sampler(settings, row, row, B.tids),
    );
    const staging = sp.staging[this.#issued++ % RING];
    const enc = g.device.createCommandEncoder({ label: "batch.spec_chunk" });
    enc.copyBufferToBuffer(B.verifyIn, 0, staging, 0, R * 4); // the inputs (joiners' first)
    for (let i = 0; i < n; i++) g.encode(enc, "batch.spec_cycle", cycle);
    enc.copyBufferToBuffer(B.seq, 0, staging, R * 4, R * SPEC_SEQ_WORDS * 4);
    enc.copyBufferToBuffer(B.out, 0, staging, R * (1 + SPEC_SEQ_WORDS) * 4, R * sp.cap * 4);
    const bytes = R * (1 + SPEC_SEQ_WORDS + sp.cap) * 4;
    const first = act.map((s) => s.issued === 0);
    for (const s of act) {
      s.issued = Math.max(1, s.issued) + n * this.#per(s);
      s.chunks++;
    }
    return { rows: act, spec: true, first, n, ...this.#io(enc.finish(), staging, bytes) };
  }

  /** {@linkcode BatchDecoder.#settle} when speculating: each row's emitted ids and counts. */
  #settleSpec(sp: SpecState, out: Uint32Array, c: Chunk): void {
    const R = c.rows.length, W = SPEC_SEQ_WORDS;
    c.rows.forEach((s, i) => {
      if (s.slot < 0) return; // it ended in an earlier chunk
      const count = Math.min(out[R + W * i + 2], sp.cap);
      s.accepted += out[R + W * i + 3];
      const base = R * (1 + W) + i * sp.cap;
      const ids = [...(c.first[i] ? [out[i]] : []), ...out.subarray(base, base + count)];
      this.#take(s, ids, c.n);
    });
    this.#endStopped();
  }

  /**
   * Prefill of each joiner in its own submissions (the prompt chunk buffers are rewritten
   * between them; queue writes and submissions run in order), through the draft too when
   * speculating, then its first token into its row's input.
   */
  async #prefill(act: readonly Seq[], joined: readonly Seq[], spec: boolean): Promise<void> {
    const g = this.#gpu, B = this.#buf, batch = this.#batch, L = batch.layout;
    for (const s of joined) {
      const row = act.indexOf(s);
      const prompt = s.req.prompt;
      for (let start = 0; start < prompt.length; start += L.maxRows) {
        const T = Math.min(L.maxRows, prompt.length - start);
        const last = start + T === prompt.length;
        g.write(B.prompt, new Uint32Array(prompt.slice(start, start + T)));
        g.write(
          B.promptRows,
          pagedRowsImage(Array.from({ length: T }, (_, i) => ({ seq: s.slot, pos: start + i }))),
        );
        const io = { tokens: { buffer: B.prompt, offset: 0 }, rows: B.promptRows };
        const d = [...await batch.plan(T, io, last ? "last" : "none")];
        const sp = spec ? this.#spec : undefined;
        if (sp && this.#kOf(s) > 0) d.push(...await sp.draft.plan(T, io, "none"));
        if (last) d.push(await this.#sampler(s.req.sampling, row, 0, sp?.buf.verifyIn));
        const enc = g.device.createCommandEncoder({ label: "batch.prefill" });
        g.encode(enc, "batch.prefill", d);
        g.device.queue.submit([enc.finish()]);
      }
    }
  }

  /**
   * Settles a chunk read back: appends each row's tokens up to a stop, then ends the stopped
   * and the cancelled (their blocks return at once; rows of theirs in a chunk still in flight
   * are dropped when it settles).
   */
  #settle(out: Uint32Array, c: Chunk): void {
    this.#chunks++;
    if (c.spec) return this.#settleSpec(this.#spec!, out, c);
    const R = c.rows.length;
    c.rows.forEach((s, i) => {
      if (s.slot < 0) return; // it ended in an earlier chunk
      const ids: number[] = [];
      for (let j = c.first[i] ? 0 : 1; j <= c.n; j++) ids.push(out[j * R + i]);
      this.#take(s, ids, c.n);
    });
    this.#endStopped();
  }

  /** Sequences that met a stop while settling, and why; ended by {@linkcode #endStopped}. */
  #stopped: [Seq, StopReason][] = [];

  /**
   * Appends `ids` (emitted after `n` target passes) to `s` up to a stop (EOS, its limit), streams
   * them, and marks it stopped or, when its client went away, cancelled.
   */
  #take(s: Seq, ids: ArrayLike<number>, n: number): void {
    const eos = this.#batch.config.eosIds;
    const fresh: number[] = [];
    let stop: StopReason | undefined;
    for (let j = 0; j < ids.length && !stop; j++) {
      fresh.push(ids[j]);
      if (eos.includes(ids[j])) stop = "eos";
      else if (s.tokens.length + fresh.length >= s.limit) {
        stop = s.limit < s.req.maxTokens ? "context" : "max-tokens";
      }
    }
    if (s.tokens.length === 0) s.tFirst = performance.now();
    s.tokens.push(...fresh);
    s.steps += n;
    if (fresh.length) s.req.onTokens?.(fresh);
    if (stop) this.#stopped.push([s, stop]);
    else if (s.req.cancelled?.()) this.#stopped.push([s, "cancelled"]);
  }

  /** Ends the sequences {@linkcode #take} marked: they leave, their blocks return. */
  #endStopped(): void {
    for (const [s, stop] of this.#stopped.splice(0)) {
      this.#active.splice(this.#active.indexOf(s), 1);
      this.#finish(s, stop);
      this.#changed = true;
    }
  }

  /** Gives `s`'s blocks and slot back and resolves its promise. */
  #finish(s: Seq, stop: StopReason): void {
    if (s.blocks.blocks.length) s.blocks.release();
    if (s.slot >= 0) this.#free.push(s.slot);
    s.slot = -1;
    const now = performance.now();
    s.resolve({
      tokens: s.tokens,
      stop,
      queueMs: s.tJoin - s.t0,
      prefillMs: s.tokens.length ? s.tFirst - s.tJoin : 0,
      decodeMs: s.tokens.length ? now - s.tFirst : 0,
      steps: s.steps,
      accepted: s.accepted,
      proposed: s.steps * (this.#per(s) - 1),
    });
  }

  /** Frees the scheduler's buffers (after {@linkcode BatchDecoder.idle}). */
  destroy(): void {
    for (const b of Object.values(this.#buf)) b.destroy();
    for (const b of this.#staging) b.destroy();
    this.#spec?.destroy();
  }
}

/** Speculation for a {@linkcode BatchDecoder}: the draft's batched forward and drafts per cycle. */
export interface BatchSpeculation {
  /**
   * The draft model's batch: same slots, block size, block count and table rows as the target's
   * (its pool holds the same blocks, so one block table serves both), logits for maxSeqs rows.
   */
  draft: LlamaBatch;
  /** Draft tokens per cycle, 1..16. */
  k: number;
}

/** Target batch rows (and logit rows) a {@linkcode BatchSpeculation} of k drafts verifies. */
export function specBatchRows(maxSeqs: number, k: number): number {
  return (k + 1) * maxSeqs;
}

/**
 * The batch shapes a session with `parallel` sequences of `ctx` rows creates: the target's
 * (with room to verify `draftK` drafts per sequence when a draft model is loaded) and the
 * draft's. The VRAM planner plans the same shapes.
 */
export function sessionBatchShapes(
  parallel: number,
  ctx: number,
  draftK?: number,
): { target: LlamaBatchShape; draft?: LlamaBatchShape } {
  const base = { maxSeqs: parallel, maxSeqRows: ctx };
  if (draftK === undefined) return { target: base };
  const rows = specBatchRows(parallel, draftK);
  return { target: { ...base, maxRows: Math.max(64, rows), maxLogitRows: rows }, draft: base };
}

/**
 * Exact bytes of the speculation buffers of a {@linkcode BatchDecoder} over `maxSeqs` slots with
 * k drafts ("staging" in the VRAM report): inputs and drafts, target argmax, sequence state,
 * rows, the emitted ids and their readback copies, and the argmaxes' scratch for a vocabulary
 * of `vocab`.
 */
export function specStateBytes(
  maxSeqs: number,
  k: number,
  vocab: number,
  maxSteps = BATCH_MAX_STEPS,
): number {
  const R = maxSeqs, cap = maxSteps * (k + 1);
  return 2 * (k + 1) * R * 4 + R * SPEC_SEQ_WORDS * 4 + R * 8 + (k + 1) * R * 8 + R * cap * 4 +
    R * 4 + RING * R * (1 + SPEC_SEQ_WORDS + cap) * 4 +
    argmaxScratchWords(specBatchRows(R, k), vocab) * 4;
}

/** GPU state and cycle dispatches of batched greedy speculation (kernels/batch_spec.ts). */
class SpecState {
  readonly k: number;
  readonly draft: LlamaBatch;
  /** Ids per sequence row of out: every cycle of a chunk emitting k + 1. */
  readonly cap: number;
  readonly buf: Record<
    "verifyIn" | "tids" | "seq" | "drows" | "vrows" | "out" | "kRow" | "argmax",
    GPUBuffer
  >;
  readonly staging: GPUBuffer[];
  readonly #gpu: Gpu;
  readonly #target: LlamaBatch;
  readonly #cycles = new Map<string, Promise<Dispatch[]>>();

  constructor(gpu: Gpu, target: LlamaBatch, spec: BatchSpeculation, maxSteps: number) {
    const { draft, k } = spec, T = target.layout, D = draft.layout;
    if (!Number.isInteger(k) || k < 1 || k > 16) {
      throw new RangeError(`draft tokens per cycle must be in [1, 16], got ${k}`);
    }
    for (const f of ["maxSeqs", "blockRows", "numBlocks", "maxBlocksPerSeq"] as const) {
      if (T[f] !== D[f]) {
        throw new Error(
          `batched speculation: draft ${f} ${D[f]} differs from the target's ${T[f]}`,
        );
      }
    }
    const rows = specBatchRows(T.maxSeqs, k);
    if (T.maxRows < rows || T.maxLogitRows < rows) {
      throw new RangeError(
        `batched speculation with k=${k} verifies ${rows} rows: the target batch holds ` +
          `${T.maxRows} rows and ${T.maxLogitRows} logit rows`,
      );
    }
    if (D.maxLogitRows < T.maxSeqs) {
      throw new RangeError(`the draft batch holds ${D.maxLogitRows} logit rows < ${T.maxSeqs}`);
    }
    this.#gpu = gpu;
    this.#target = target;
    this.k = k;
    this.draft = draft;
    this.cap = maxSteps * (k + 1);
    const R = T.maxSeqs;
    const S = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST;
    const b = (name: string, bytes: number) => gpu.buffer(`batch.spec.${name}`, bytes, S);
    this.buf = {
      verifyIn: b("verify_in", (k + 1) * R * 4), // [k + 1, R] u32: inputs, then drafts
      tids: b("tids", (k + 1) * R * 4), // [k + 1, R] u32: target argmax per verify row
      seq: b("seq", R * SPEC_SEQ_WORDS * 4), // [R] (slot, pos, count, accepted)
      drows: b("drows", R * 8), // [R] (slot, pos): the draft's rows
      vrows: b("vrows", (k + 1) * R * 8), // [(k + 1) R] (slot, pos): the verify rows
      out: b("out", R * this.cap * 4), // [R, cap] u32 emitted ids
      kRow: b("k_row", R * 4), // [R] u32: drafts each row may accept (0: plain)
      // The argmaxes' scratch, shared by the draft steps and the verify (kernels/argmax.ts).
      argmax: b("argmax", argmaxScratchWords(rows, target.config.vocabSize) * 4),
    };
    this.staging = Array.from({ length: RING }, (_, i) =>
      gpu.buffer(
        `batch.spec.staging${i}`,
        R * (1 + SPEC_SEQ_WORDS + this.cap) * 4,
        GPUBufferUsage.COPY_DST | GPUBufferUsage.MAP_READ,
      ));
  }

  /** GPU bytes of the speculation buffers. */
  get bytes(): number {
    let n = 0;
    for (const b of [...Object.values(this.buf), ...this.staging]) n += b.size;
    return n;
  }

  /**
   * One cycle over R = `plain.length` sequences: rows from the positions; k draft steps
   * (forward, argmax into verifyIn row i + 1, positions + 1) and one cache-only step for d_k;
   * the target's forward over the (k + 1) R rows with their argmax; for each row that does not
   * speculate and samples (`plain[r]` with temperature > 0), its own sampler (`sampler`) over its
   * target row 0 instead; the commit. Built once per composition.
   */
  cycle(
    plain: readonly (SamplingSettings | undefined)[],
    sampler: (s: SamplingSettings, row: number) => Promise<Dispatch>,
  ): Promise<Dispatch[]> {
    const sampled = plain.map((s) => s && s.temperature > 0 ? s : undefined);
    const key = JSON.stringify(sampled.map((s) => s ? [s.temperature, s.topK, s.topP, s.seed] : 0));
    let c = this.#cycles.get(key);
    if (!c) {
      if (this.#cycles.size >= 256) this.#cycles.clear(); // distinct seeds: stay bounded
      c = this.#build(plain.length, sampled, sampler);
      this.#cycles.set(key, c);
    }
    return c;
  }

  async #build(
    R: number,
    sampled: readonly (SamplingSettings | undefined)[],
    sampler: (s: SamplingSettings, row: number) => Promise<Dispatch>,
  ): Promise<Dispatch[]> {
    const g = this.#gpu, B = this.buf, k = this.k, d = this.draft, t = this.#target;
    const V = t.config.vocabSize;
    const scratch = { buffer: B.argmax, rows: specBatchRows(t.layout.maxSeqs, k) };
    const out: Dispatch[] = [
      await createSpecRows(g, { label: `batch.spec.rows${R}`, ...B, R, k }),
    ];
    const advance = await createPagedAdvance(g, {
      label: `batch.spec.advance${R}`,
      rows: B.drows,
      R,
    });
    for (let i = 0; i <= k; i++) {
      const io = { tokens: { buffer: B.verifyIn, offset: i * R }, rows: B.drows };
      out.push(...await d.plan(R, io, i < k ? "all" : "none"));
      if (i === k) break;
      out.push(
        await createArgmax(g, {
          label: `batch.spec.draft_argmax${i}`,
          logits: d.logits,
          ids: B.verifyIn,
          idsOffset: (i + 1) * R,
          T: R,
          V,
          scratch,
        }),
        advance,
      );
    }
    const rows = specBatchRows(R, k);
    out.push(
      // Verify rows are step-major (row i*R + r: sequence r's i-th), so each sequence's k + 1
      // rows form one row group of the attention.
      ...await t.plan(
        rows,
        { tokens: { buffer: B.verifyIn, offset: 0 }, rows: B.vrows },
        "all",
        k + 1,
      ),
      await createArgmax(g, {
        label: "batch.spec.argmax",
        logits: t.logits,
        ids: B.tids,
        T: rows,
        V,
        scratch,
      }),
    );
    for (let r = 0; r < R; r++) if (sampled[r]) out.push(await sampler(sampled[r]!, r));
    out.push(
      await createSpecCommit(g, {
        label: `batch.spec.commit${R}`,
        seq: B.seq,
        verifyIn: B.verifyIn,
        tids: B.tids,
        out: B.out,
        kRow: B.kRow,
        R,
        k,
        cap: this.cap,
      }),
    );
    return out;
  }

  destroy(): void {
    for (const b of [...Object.values(this.buf), ...this.staging]) b.destroy();
  }
}
