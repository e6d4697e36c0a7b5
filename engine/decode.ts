/**
 * GPU-resident generation, plain or speculative. Every cycle runs entirely on the GPU and the CPU
 * enqueues many cycles per submission (a chunk), submitting up to {@linkcode RING} chunks between
 * two readbacks and reading back only the newest (DESIGN.md: each readback costs >= ~11 ms on
 * Deno: its poll blocks until the queue drains, then it sleeps 10 ms before it looks whether the
 * map is done; one chunk is submitted between the two and the next encoded during the sleep);
 * cycles past a stop are no-ops on the GPU.
 *
 * One cycle, with `verifyIn = [last emitted token, d1..dk]`:
 *   draft   k proposals d1..dk with their distributions q (a draft model: k decode steps, plus
 *           one cache-only step for dk; n-gram: a lookup in the history with one-hot q)
 *   verify  the target's forward over the k + 1 rows of verifyIn, logits for every row
 *   accept  kernels/accept.ts: keep d_i with probability min(1, p/q), else resample from
 *           norm(max(0, p − q)); all kept → a bonus token from row k (engine/speculative_math.ts)
 *   commit  kernels/commit.ts: append the accepted + 1 tokens, move both KV positions back past
 *           the rejected rows, put the last token in verifyIn[0]
 * Plain decoding is the same cycle with k = 0 and no draft.
 *
 * A tree cycle (a draft model and a {@linkcode TreeShape} `depth x width`), with the tree's
 * nodes in `verifyIn` (node 0 = the last emitted token) and its ancestor table in a GPU buffer:
 *   draft   the root through the draft (T = 1), then per level: the best `width` of the level's
 *           candidates (kernels/tree_draft.ts: each node's top `width` tokens by path log q) become
 *           the next level's nodes, and that level goes through the draft in one forward (T =
 *           width, tree mask); the last level enters the draft's cache only
 *   verify  the target's forward over all 1 + depth * width nodes with the tree mask
 *   accept  kernels/tree_accept.ts: walk from the root along the target's argmax while a child
 *           matches; the argmax at the last accepted node is the bonus token
 *   compact kernels/kv_compact.ts: the accepted path's KV rows into contiguous positions, in
 *           both models' caches; then commit as above (with k = nodes - 1)
 * Sampled (temperature > 0), the layout is fixed (`sampledTreeParents`: each level is `width`
 * children of the previous level's first node, drawn from its q without replacement by
 * kernels/tree_draft.ts) and acceptance is multi-candidate recursive rejection sampling
 * (kernels/tree_sample_accept.ts, engine/tree_sampling.ts); the rest is the same.
 *
 * With `tree = "auto"` the shape is chosen per chunk by engine/tree_auto.ts from a cost model
 * measured once per decoder (wall time of target forwards over several row counts and draft
 * forwards over 1..8 rows) and the top-1 acceptance fitted to the chunks read back so far.
 *
 * @module
 */
import type { Dispatch, Gpu } from "./gpu.ts";
import type { LlamaGpu } from "../models/llama.ts";
import { createSample } from "../kernels/sample.ts";
import { createAccept } from "../kernels/accept.ts";
import { type ArgmaxArgs, argmaxScratchWords, createArgmax } from "../kernels/argmax.ts";
import { createCommit, RUN, RUN_SLOTS } from "../kernels/commit.ts";
import { createNgram } from "../kernels/ngram.ts";
import type { StopReason } from "./protocol.ts";
import {
  createTreeDraft,
  createTreeDraftSampled,
  treeTopkScratchWords,
} from "../kernels/tree_draft.ts";
import { createTreeAccept } from "../kernels/tree_accept.ts";
import { createTreeSampleAccept } from "../kernels/tree_sample_accept.ts";
import { createKvCompact } from "../kernels/kv_compact.ts";
import {
  checkTreeShape,
  sampledTreeParents,
  TREE_MAX_NODES,
  TREE_WORDS,
  treeNodes,
  type TreeShape,
  treeShapeName,
  treeTable,
} from "./token_tree.ts";
import { chooseTreeShape, fitAcceptance, type TreeCostModel } from "./tree_auto.ts";

/** Sampling settings of one generation (the target's p and the draft's q alike). */
export interface SamplingSettings {
  /** 0 = greedy. */
  temperature: number;
  /** 0 = off. */
  topK: number;
  /** 1 = off. */
  topP: number;
  /** RNG seed. */
  seed: number;
}

/** How proposals are made. */
export type Speculation =
  | { kind: "none" }
  | { kind: "model"; draft: LlamaGpu }
  | { kind: "ngram"; maxN: number };

/** Draft length per cycle: fixed, or adapted to the running acceptance. */
export type DraftLength = number | "auto";

/** Largest draft length. */
export const MAX_DRAFT = 16;

/** Progress of a generation as the host sees it. */
export interface DecodeEvents {
  /** New ids since the last call. */
  onTokens(ids: number[]): void;
  /** Polled between submissions; true stops generation. */
  cancelled(): boolean;
}

/** Timings and outcome of one {@linkcode Decoder.generate} call. */
export interface DecodeResult {
  /** Generated ids. */
  tokens: number[];
  /** Why generation stopped. */
  stop: StopReason;
  /** Milliseconds spent on prefill including the first token's readback. */
  prefillMs: number;
  /** Milliseconds spent decoding after the first token. */
  decodeMs: number;
  /** Target forward passes after prefill (cycles). */
  targetPasses: number;
  /** Draft tokens proposed (a tree cycle counts its depth, the longest path it offers). */
  proposed: number;
  /** Draft tokens accepted. */
  accepted: number;
  /** The tree shape the cycles used, when tree speculation ran (auto: the one most cycles used). */
  tree?: TreeShape;
  /** Auto trees: cycles issued per shape ("DxW"), in the order the shapes were first chosen. */
  treeCycles?: Record<string, number>;
  /** GPU time in drafting and in verify/accept/commit (ms), where timestamps exist. */
  gpuMs?: { draft: number; verify: number };
  /**
   * With {@linkcode Decoder.timeline} on (and timestamps): every read cycle's GPU span, in
   * submission order, and the host's submissions and readbacks (see {@linkcode DecodeTimeline}).
   */
  timeline?: DecodeTimeline;
}

/** Cycles per submission at most (bounded by the timestamp query set too). */
const MAX_CYCLES = 128;
/**
 * Chunks submitted between two readbacks (and staging buffers). Chunk sizes start small (the
 * first sized to outlast a readback's sleep, {@linkcode READ_MS}) and double while no cycle cost
 * is known; then each holds {@linkcode CHUNK_MS} of GPU time at its own shape's measured cost.
 */
export const RING = 4;
/**
 * GPU time a chunk of cycles aims at once a cycle's cost is known (ms). A readback costs no idle
 * GPU time while a chunk submitted during it runs (see {@linkcode READ_MS}), so the size only
 * trades host work per round against how often text streams: RING chunks of 25 ms stream every
 * ~0.1 s.
 */
const CHUNK_MS = 25;
/**
 * GPU time the chunk submitted during a readback should outlast (ms): Deno's `mapAsync` returns
 * once the queue drains and resolves after a 10 ms sleep, which that chunk fills.
 */
const READ_MS = 12;
/** Cycles of the first round's chunk encoded before the prefill's readback (see `deferred`). */
const FIRST_CYCLES = 4;

/**
 * Exact GPU bytes a {@linkcode Decoder} allocates ("staging" in the VRAM report: token rings,
 * draft distributions, run state and readback buffers) for `maxSeq` rows and a vocabulary of
 * `vocab`; `speculative` adds the draft distributions and, with `timestamps`, the query buffers.
 */
export function decoderBytes(
  maxSeq: number,
  vocab: number,
  speculative: boolean,
  timestamps: boolean,
): number {
  const pad4 = (n: number) => Math.max(4, Math.ceil(n / 4) * 4);
  let n = maxSeq * 4 + 2 * TREE_MAX_NODES * 4 + 4 + 4 + RUN_SLOTS * 4 + 2 * (maxSeq + 1) * 4;
  n += pad4(speculative ? TREE_MAX_NODES * vocab * 4 : 4) + 16 +
    RING * (RUN_SLOTS + maxSeq + 1) * 4;
  // Tree buffers: two ancestor tables, path scores, path, argmax, candidates, and the sampled
  // acceptance's residual rows; the top-k scratch.
  n += TREE_MAX_NODES * 4 * (2 * TREE_WORDS + 1 + 1 + 1 + 2) + (speculative ? 2 * vocab * 4 : 4);
  n += speculative ? treeTopkScratchWords(vocab) * 4 : 4; // the tree top-k's scratch
  n += argmaxScratchWords(TREE_MAX_NODES, vocab) * 4;
  // With timestamps: the resolve buffer, and a copy of it in each staging buffer.
  if (timestamps) n += (1 + RING) * RING * 4 * MAX_CYCLES * 8;
  return n;
}

/**
 * Logit rows the target is created with: a whole token tree's (64) when a draft model may draft
 * trees, else the chain's widest verify (MAX_DRAFT + 1 = 17). The session and the VRAM planner
 * both use this.
 */
export function targetLogitRows(draftModel: boolean): number {
  return draftModel ? TREE_MAX_NODES : MAX_DRAFT + 1;
}

/**
 * One cycle's GPU span on the device's timestamp clock (µs since the generation's first timed
 * pass began): `chunk` numbers the submission (1 is the first chunk of cycles), `begin` is the
 * start of its first pass (the draft's, or the verify's), `end` the end of its last.
 */
export interface CycleSpan {
  /** Submission the cycle was encoded in (1, 2, ...; the prefill is 0 and untimed). */
  chunk: number;
  /** Start of the cycle's first pass (µs). */
  begin: number;
  /** End of its verify pass (µs). */
  end: number;
}

/** A host event of a generation: a chunk's submission, or its readback's map call and result. */
export interface HostMark {
  /** Submission (0 is the prefill's). */
  chunk: number;
  /** "encode" (its encoding began), "submit", "map" (mapAsync called), "mapped" (it resolved). */
  what: "encode" | "submit" | "map" | "mapped";
  /** Milliseconds since the generation began (`performance.now()`). */
  ms: number;
}

/** What {@linkcode Decoder.timeline} records of one generation. */
export interface DecodeTimeline {
  /** Every read cycle's GPU span (device clock). */
  cycles: CycleSpan[];
  /** The host's submissions and readbacks (host clock). */
  host: HostMark[];
}

/** Where a chunk's timestamps are (its query slot) and how many it wrote. */
interface ChunkTiming {
  slot: number;
  timed?: { cycles: number; per: number };
  /** Submission number (for {@linkcode CycleSpan}). */
  id?: number;
}

/** A finished chunk's submission and readback (`Decoder.#finish`). */
interface ChunkIo {
  submit: () => void;
  /**
   * Maps the staging copy and resolves with what it says; `during` runs once the map call has
   * returned (the queue has drained) and before the map resolves: a submission made there runs
   * while the host waits.
   */
  read: (chunks: ChunkTiming[], during?: () => void) => Promise<ReadState>;
}

/** What one readback says. */
interface ReadState {
  /** out index the ids start at (tokens known when the submission was encoded). */
  from: number;
  /** out[from .. count): every id emitted since `from`. */
  ids: number[];
  /** The run is over (EOS or max tokens). */
  done: boolean;
  /** Cycles committed so far. */
  cycles: number;
  /** Draft tokens accepted so far. */
  accepted: number;
  /** GPU ms of this submission's draft passes. */
  draftMs: number;
  /** GPU ms of this submission's verify passes. */
  verifyMs: number;
  /** GPU ms of each chunk read (in the order given to `read`; 0 where untimed). */
  chunkMs: number[];
}

/** Drives one target model's (and optionally a draft's) GPU-resident generation. */
export class Decoder {
  readonly #gpu: Gpu;
  readonly #target: LlamaGpu;
  readonly #spec: Speculation;
  readonly #maxSeq: number;
  readonly #buf: Record<
    | "prompt"
    | "verifyIn"
    | "outTokens"
    | "outCount"
    | "one"
    | "q"
    | "run"
    | "out"
    | "history"
    | "argmax",
    GPUBuffer
  >;
  // Tree speculation: ancestor table [64, 4] u32 (greedy: drafted), the fixed table of sampled
  // trees, path scores [64] f32, accepted path [64] u32, the target's argmax per node [64] u32,
  // draft candidates [64] (id, log q), residual rows [2, V] f32 of the sampled acceptance.
  readonly #tree: Record<
    "table" | "fixed" | "scores" | "path" | "argmax" | "cand" | "res" | "topk",
    GPUBuffer
  >;
  readonly #dummyState: GPUBuffer;
  readonly #staging: GPUBuffer[]; // [RING] timestamps + run state + out ids, one read per round
  // Timestamps: 4 per cycle (draft begin/end, verify begin/end), RING slices of the set.
  readonly #query?: { set: GPUQuerySet; resolve: GPUBuffer };
  #samplingKey = "";
  #cycles = new Map<number | string, { draft: Dispatch[]; verify: Dispatch[] }>();
  #first: Dispatch[] = [];
  /** GPU ms of one cycle, per draft length or tree shape, as last measured (sizes first chunks). */
  #cycleMs = new Map<number | string, number>();
  /**
   * Record each generation's GPU timeline ({@linkcode DecodeResult.timeline}): the span of every
   * cycle read back, for finding where the GPU waits (`bench/gpu.ts --timeline`). Off by default.
   */
  timeline = false;
  #spans?: { base?: bigint; list: CycleSpan[]; host: HostMark[]; t0: number };
  #cost?: TreeCostModel;

  /** A decoder for `target`, speculating per `spec` (default: plain decoding). */
  constructor(gpu: Gpu, target: LlamaGpu, spec: Speculation = { kind: "none" }) {
    this.#gpu = gpu;
    this.#target = target;
    this.#spec = spec;
    this.#maxSeq = spec.kind === "model"
      ? Math.min(target.maxSeq, spec.draft.maxSeq)
      : target.maxSeq;
    if (spec.kind === "model" && spec.draft.config.vocabSize !== target.config.vocabSize) {
      throw new Error(
        `draft vocabulary (${spec.draft.config.vocabSize}) differs from the target's ` +
          `(${target.config.vocabSize})`,
      );
    }
    const S = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST;
    const V = target.config.vocabSize;
    const b = (name: string, bytes: number) => gpu.buffer(`decode.${name}`, bytes, S);
    const speculative = spec.kind !== "none";
    this.#buf = {
      prompt: b("prompt", this.#maxSeq * 4), // [maxSeq] u32 prompt ids
      verifyIn: b("verify_in", TREE_MAX_NODES * 4), // [k + 1] u32: last token, d1..dk (or tree nodes)
      outTokens: b("out_tokens", TREE_MAX_NODES * 4), // [k + 1] u32 accepted + 1
      outCount: b("out_count", 4), // [1] u32 accepted + 1
      one: b("one", 4), // [1] u32 = 1: the count of a plain step
      q: b("q", speculative ? TREE_MAX_NODES * V * 4 : 4), // [k (or nodes), V] f32 draft q
      run: b("run", RUN_SLOTS * 4), // run state, kernels/commit.ts RUN
      out: b("out", (this.#maxSeq + 1) * 4), // [maxSeq + 1] u32 emitted ids
      history: b("history", (this.#maxSeq + 1) * 4), // [maxSeq + 1] prompt + emitted ids
      // The greedy argmaxes' shared scratch (kernels/argmax.ts): up to 64 rows, since a deep tree
      // near the end of the cache falls back to a chain of its depth.
      argmax: b("argmax", argmaxScratchWords(TREE_MAX_NODES, V) * 4),
    };
    gpu.write(this.#buf.one, new Uint32Array([1]));
    const N = TREE_MAX_NODES;
    this.#tree = {
      table: b("tree.table", N * TREE_WORDS * 4),
      scores: b("tree.scores", N * 4),
      path: b("tree.path", N * 4),
      argmax: b("tree.argmax", N * 4),
      cand: b("tree.cand", N * 8),
      topk: b("tree.topk", speculative ? treeTopkScratchWords(V) * 4 : 4),
      fixed: b("tree.fixed", N * TREE_WORDS * 4),
      res: b("tree.res", speculative ? 2 * V * 4 : 4),
    };
    // Node 0 (the root) never changes: ancestors {0}, depth 0, score 0.
    gpu.write(this.#tree.table, treeTable([-1]));
    gpu.write(this.#tree.scores, new Float32Array(N));
    this.#dummyState = b("dummy_state", 16);
    const read = GPUBufferUsage.COPY_DST | GPUBufferUsage.MAP_READ;
    // Staging: [the resolved timestamps of every slot (with timestamps) | run state | out ids].
    const ts = gpu.features.timestamp ? RING * 4 * MAX_CYCLES * 8 : 0;
    this.#staging = Array.from(
      { length: RING },
      (_, i) => gpu.buffer(`decode.staging${i}`, ts + (RUN_SLOTS + this.#maxSeq + 1) * 4, read),
    );
    if (gpu.features.timestamp) {
      this.#query = {
        set: gpu.device.createQuerySet({
          label: "decode.timestamps",
          type: "timestamp",
          count: RING * 4 * MAX_CYCLES,
        }),
        resolve: gpu.buffer(
          "decode.timestamps.resolve",
          ts,
          GPUBufferUsage.QUERY_RESOLVE | GPUBufferUsage.COPY_SRC,
        ),
      };
    }
  }

  /** The KV rows available to a generation (the smaller cache of target and draft). */
  get maxSeq(): number {
    return this.#maxSeq;
  }

  /** GPU bytes this decoder allocated. */
  get bytes(): number {
    let n = this.#dummyState.size;
    for (const b of [...Object.values(this.#buf), ...Object.values(this.#tree), ...this.#staging]) {
      n += b.size;
    }
    if (this.#query) n += this.#query.resolve.size;
    return n;
  }

  /**
   * The sampler writing the target's next token into `out[0]`; greedy, the split argmax (many
   * workgroups per row, where the sampler has one).
   */
  #targetSample(s: SamplingSettings, out: GPUBuffer): Promise<Dispatch> {
    if (s.temperature <= 0) {
      return this.#argmax({
        label: "decode.target.argmax",
        logits: this.#target.logits,
        ids: out,
        T: 1,
      });
    }
    return createSample(this.#gpu, {
      label: "decode.target.sample",
      logits: this.#target.logits,
      out,
      state: this.#buf.run,
      counterIndex: RUN.sampleRng,
      V: this.#target.config.vocabSize,
      rows: 1,
      temperature: s.temperature,
      topK: s.topK,
      topP: s.topP,
      seed: s.seed,
    });
  }

  /** A split argmax over the vocabulary (kernels/argmax.ts) on the decoder's shared scratch. */
  #argmax(args: Omit<ArgmaxArgs, "V" | "scratch">): Promise<Dispatch> {
    return createArgmax(this.#gpu, {
      ...args,
      V: this.#target.config.vocabSize,
      scratch: { buffer: this.#buf.argmax, rows: TREE_MAX_NODES },
    });
  }

  #commit(k: number): Promise<Dispatch> {
    const spec = this.#spec;
    return createCommit(this.#gpu, {
      label: `decode.commit.k${k}`,
      outTokens: this.#buf.outTokens,
      outCount: k === 0 ? this.#buf.one : this.#buf.outCount,
      run: this.#buf.run,
      out: this.#buf.out,
      history: this.#buf.history,
      targetState: this.#target.state,
      draftState: spec.kind === "model" ? spec.draft.state : this.#dummyState,
      verifyIn: this.#buf.verifyIn,
      k,
      eos: this.#target.config.eosIds,
    });
  }

  /** The dispatches of one cycle with draft length k (k = 0: a plain step). Built once. */
  async #cycle(k: number, s: SamplingSettings): Promise<{ draft: Dispatch[]; verify: Dispatch[] }> {
    const cached = this.#cycles.get(k);
    if (cached) return cached;
    const g = this.#gpu, t = this.#target, B = this.#buf, spec = this.#spec;
    const V = t.config.vocabSize, greedy = s.temperature <= 0;
    const draft: Dispatch[] = [], verify: Dispatch[] = [];
    if (k === 0) {
      verify.push(...await t.plan(1, { buffer: B.verifyIn, offset: 0 }, "last"));
      verify.push(await this.#targetSample(s, B.outTokens), await this.#commit(0));
    } else {
      if (spec.kind === "model") {
        const d = spec.draft;
        for (let i = 0; i < k; i++) {
          // Draft step i: verifyIn[i] → d_{i+1} into verifyIn[i+1], its q into row i.
          draft.push(...await d.plan(1, { buffer: B.verifyIn, offset: i }, "last"));
          // Greedy acceptance reads no q: the draft's argmax alone.
          draft.push(
            greedy
              ? await this.#argmax({
                label: `decode.draft.argmax${i}`,
                logits: d.logits,
                ids: B.verifyIn,
                idsOffset: i + 1,
                T: 1,
              })
              : await createSample(g, {
                label: `decode.draft.sample${i}`,
                logits: d.logits,
                out: B.verifyIn,
                outOffset: i + 1,
                probs: B.q,
                probsRowOffset: i,
                state: B.run,
                counterIndex: RUN.sampleRng,
                V,
                rows: 1,
                temperature: s.temperature,
                topK: s.topK,
                topP: s.topP,
                seed: s.seed,
              }),
          );
        }
        // d_k enters the draft's cache too, so the draft is in step when all k are accepted.
        draft.push(...await d.plan(1, { buffer: B.verifyIn, offset: k }, "none"));
      } else if (spec.kind === "ngram") {
        draft.push(
          await createNgram(g, {
            label: `decode.ngram.k${k}`,
            history: B.history,
            run: B.run,
            verifyIn: B.verifyIn,
            q: B.q,
            k,
            maxN: spec.maxN,
            V,
          }),
        );
      }
      verify.push(...await t.plan(k + 1, { buffer: B.verifyIn, offset: 0 }, "all"));
      verify.push(
        greedy
          ? await this.#argmax({
            label: `decode.accept.k${k}`,
            logits: t.logits,
            ids: B.outTokens,
            T: k + 1,
            accept: { draftTokens: B.verifyIn, tokensOffset: 1, outCount: B.outCount },
          })
          : await createAccept(g, {
            label: `decode.accept.k${k}`,
            targetLogits: t.logits,
            draftProbs: B.q,
            draftTokens: B.verifyIn,
            draftTokensOffset: 1,
            outTokens: B.outTokens,
            outCount: B.outCount,
            state: B.run,
            counterIndex: RUN.acceptRng,
            k,
            V,
            temperature: s.temperature,
            topK: s.topK,
            topP: s.topP,
            seed: s.seed,
          }),
        await this.#commit(k),
      );
    }
    const c = { draft, verify };
    this.#cycles.set(k, c);
    return c;
  }

  /**
   * The dispatches of one tree cycle of `shape` (see the module doc), greedy or sampled (then the
   * layout is `sampledTreeParents` and its table `#tree.fixed`). Built once.
   */
  async #treeCycle(
    shape: TreeShape,
    s: SamplingSettings,
  ): Promise<{ draft: Dispatch[]; verify: Dispatch[] }> {
    const sampled = s.temperature > 0;
    const key = `tree${treeShapeName(shape)}${sampled ? "s" : ""}`;
    const cached = this.#cycles.get(key);
    if (cached) return cached;
    const g = this.#gpu, t = this.#target, B = this.#buf, T = this.#tree, spec = this.#spec;
    if (spec.kind !== "model") throw new Error("tree speculation needs a draft model");
    const d = spec.draft, V = t.config.vocabSize, { depth, width } = shape, N = treeNodes(shape);
    const at = (first: number) => ({ buffer: B.verifyIn, offset: first });
    const table = sampled ? T.fixed : T.table;
    // Greedy: the best width of each level's candidates by path score (tree_draft.ts top-k).
    // Sampled: width children of the level's first node, drawn from its q without replacement.
    const expand = sampled
      ? async (_R: number, parentFirst: number) => [
        await createTreeDraftSampled(g, {
          label: `decode.tree.sampled${parentFirst}`,
          logits: d.logits,
          probs: B.q,
          tokens: B.verifyIn,
          state: B.run,
          counterIndex: RUN.sampleRng,
          parent: parentFirst,
          newFirst: parentFirst === 0 ? 1 : parentFirst + width,
          width,
          V,
          ...s,
        }),
      ]
      : (R: number, parentFirst: number) => greedyExpand(R, parentFirst);
    const greedyExpand = (R: number, parentFirst: number) =>
      createTreeDraft(g, {
        label: `decode.tree.level${parentFirst}`,
        logits: d.logits,
        cand: T.cand,
        scratch: T.topk,
        tokens: B.verifyIn,
        scores: T.scores,
        table,
        R,
        width,
        parentFirst,
        newFirst: parentFirst + R,
        V,
      });
    const draft: Dispatch[] = [];
    // The root (the last emitted token) through the draft at its position, then level 1.
    draft.push(...await d.plan(1, at(0), "last"), ...await expand(1, 0));
    for (let level = 1; level < depth; level++) {
      const first = 1 + (level - 1) * width;
      draft.push(...await d.plan(width, at(first), "all", { table, first }));
      draft.push(...await expand(width, first));
    }
    // The last level enters the draft's cache too, so every node has its draft KV rows.
    const last = 1 + (depth - 1) * width;
    draft.push(...await d.plan(width, at(last), "none", { table, first: last }));
    const compact = (m: LlamaGpu, label: string) =>
      createKvCompact(g, {
        label,
        kCache: m.kvCaches.k,
        vCache: m.kvCaches.v,
        state: m.state,
        path: T.path,
        count: B.outCount,
        nodes: N,
        dtype: m.kvType,
        layers: m.config.nLayers,
        maxSeq: m.maxSeq,
        nKvHeads: m.config.nKvHeads,
        headDim: m.config.headDim,
      });
    const accept = sampled
      ? [
        await createTreeSampleAccept(g, {
          label: "decode.tree.sample_accept",
          targetLogits: t.logits,
          draftProbs: B.q,
          tokens: B.verifyIn,
          table,
          outTokens: B.outTokens,
          outCount: B.outCount,
          path: T.path,
          state: B.run,
          counterIndex: RUN.acceptRng,
          scratch: T.res,
          nodes: N,
          V,
          draw: "without-replacement",
          ...s,
        }),
      ]
      : await createTreeAccept(g, {
        label: "decode.tree.accept",
        targetLogits: t.logits,
        tokens: B.verifyIn,
        table,
        argmax: T.argmax,
        outTokens: B.outTokens,
        outCount: B.outCount,
        path: T.path,
        nodes: N,
        V,
      });
    const verify: Dispatch[] = [
      ...await t.plan(N, at(0), "all", { table, first: 0 }),
      ...accept,
      await compact(t, "decode.tree.compact.target"),
      await compact(d, "decode.tree.compact.draft"),
      await this.#commit(N - 1),
    ];
    const c = { draft, verify };
    this.#cycles.set(key, c);
    return c;
  }

  /** The largest trees this decoder's target and draft can take. */
  #treeLimits(): { maxNodes: number; maxWidth: number } {
    const spec = this.#spec;
    return {
      maxNodes: Math.min(TREE_MAX_NODES, this.#target.maxLogitRows, this.#target.maxT),
      maxWidth: spec.kind === "model" ? spec.draft.maxLogitRows : 1,
    };
  }

  /**
   * The cost model of auto trees, measured on the first call and kept: wall time of target
   * forwards over 1, 2, 5, 9, 17, 33 and 64 rows (as many as the target takes) and of draft
   * forwards over 1, 2, 4 and 8 rows (as many as it takes). Each point: one warm-up, then the
   * median of 3 submissions of 2 forwards each, less the median of 3 empty submissions (the
   * readback's fixed cost), divided by 2. The forwards write garbage KV rows from position 0;
   * every generation starts by overwriting them with its prefill.
   */
  async treeCosts(): Promise<TreeCostModel> {
    if (this.#cost) return this.#cost;
    const spec = this.#spec;
    if (spec.kind !== "model") throw new Error("tree costs need a draft model");
    const g = this.#gpu, B = this.#buf;
    g.write(B.verifyIn, new Uint32Array(TREE_MAX_NODES)); // token 0 in every row
    const median = (xs: number[]) => xs.sort((a, b) => a - b)[xs.length >> 1];
    const time = async (ds: Dispatch[], reps: number) => {
      const t0 = performance.now();
      const enc = g.device.createCommandEncoder({ label: "decode.tree_costs" });
      for (let i = 0; i < reps; i++) g.encode(enc, "decode.tree_costs", ds);
      g.device.queue.submit([enc.finish()]);
      await g.device.queue.onSubmittedWorkDone();
      g.throwIfFailed();
      return performance.now() - t0;
    };
    const empty = [];
    for (let i = 0; i < 3; i++) empty.push(await time([], 1));
    const base = median(empty);
    const measure = async (m: LlamaGpu, rows: number[]) => {
      const points: [number, number][] = [];
      for (const T of rows.filter((r) => r <= Math.min(m.maxT, m.maxLogitRows))) {
        m.setPosition(0);
        const ds = await m.plan(T, { buffer: B.verifyIn, offset: 0 }, "all");
        await time(ds, 1);
        const xs = [];
        for (let i = 0; i < 3; i++) xs.push(await time(ds, 2));
        points.push([T, Math.max(1e-3, (median(xs) - base) / 2)]);
      }
      return points;
    };
    const verify = await measure(this.#target, [1, 2, 5, 9, 17, 33, 64]);
    const draft = await measure(spec.draft, [1, 2, 4, 8]);
    this.#cost = { verify, draft };
    return this.#cost;
  }

  /** Throws unless tree speculation of `shape` can run on this decoder. */
  #checkTree(shape: TreeShape): void {
    checkTreeShape(shape);
    const spec = this.#spec, N = treeNodes(shape), name = treeShapeName(shape);
    if (spec.kind !== "model") {
      throw new Error(`tree speculation (${name}) needs a draft model (--draft)`);
    }
    if (N > this.#target.maxLogitRows || N > this.#target.maxT) {
      throw new RangeError(
        `a ${name} tree verifies ${N} rows but the target holds logits for ` +
          `${this.#target.maxLogitRows} (maxLogitRows) and ${this.#target.maxT} rows per forward`,
      );
    }
    if (shape.width > spec.draft.maxLogitRows) {
      throw new RangeError(
        `a ${name} tree drafts ${shape.width} rows per level but the draft holds logits for ` +
          `${spec.draft.maxLogitRows}`,
      );
    }
  }

  /**
   * The dispatches of one cycle with settings `s`: draft length `k` (0 = a plain step) or a tree
   * of `tree`'s shape, as {@linkcode Decoder.generate} encodes them (for per-op GPU profiles).
   * Running them moves the caches' positions like a cycle does; the next generation's prefill
   * starts over.
   */
  async cycleDispatches(
    s: SamplingSettings,
    k: number,
    tree?: TreeShape,
  ): Promise<{ draft: Dispatch[]; verify: Dispatch[] }> {
    if (k > 0 && !tree && this.#spec.kind === "none") {
      throw new Error(`a draft length of ${k} needs speculation (a draft model or n-gram)`);
    }
    await this.#prepare(s);
    if (tree) {
      this.#checkTree(tree);
      return this.#treeCycle(tree, s);
    }
    return this.#cycle(k, s);
  }

  async #prepare(s: SamplingSettings): Promise<void> {
    const key = JSON.stringify([s.temperature, s.topK, s.topP, s.seed]);
    if (key === this.#samplingKey) return;
    this.#cycles.clear();
    this.#first = [await this.#targetSample(s, this.#buf.outTokens), await this.#commit(0)];
    this.#samplingKey = key;
  }

  /**
   * Generates up to `maxTokens` ids after `prompt` (the caches start empty), with draft length
   * `k` per cycle, or with a draft tree of `tree`'s shape (a draft model; `k` unused).
   * Stops at an EOS id, at `maxTokens`, at the end of the KV cache, or when cancelled.
   */
  async generate(
    prompt: readonly number[],
    maxTokens: number,
    sampling: SamplingSettings,
    events: DecodeEvents,
    k: DraftLength = 4,
    treeOption?: TreeShape | "auto",
  ): Promise<DecodeResult> {
    const g = this.#gpu, t = this.#target, spec = this.#spec, B = this.#buf;
    if (prompt.length < 1) throw new RangeError("the prompt must hold at least one token");
    if (prompt.length >= this.#maxSeq) {
      throw new RangeError(
        `the prompt has ${prompt.length} tokens but the context holds ${this.#maxSeq}: ` +
          `no room to generate (shorten the prompt or raise --ctx)`,
      );
    }
    if (k !== "auto" && (!Number.isInteger(k) || k < 1 || k > MAX_DRAFT)) {
      throw new RangeError(`draft length ${k} is outside [1, ${MAX_DRAFT}]`);
    }
    const auto = treeOption === "auto";
    let alphaTree = 0.7; // auto trees: the running top-1 acceptance estimate
    let cost: TreeCostModel | undefined;
    if (auto) {
      if (spec.kind !== "model") throw new Error("tree speculation (auto) needs a draft model");
      cost = await this.treeCosts();
    }
    const limits = this.#treeLimits();
    let tree = auto ? chooseTreeShape(cost!, alphaTree, limits) : treeOption;
    // A sampled tree's layout is fixed: its ancestor table is written whenever the shape changes
    // (queue writes land between the submissions, so chunks in flight keep theirs).
    let fixedShape = "";
    const useShape = (shape: TreeShape) => {
      this.#checkTree(shape);
      const name = treeShapeName(shape);
      if (sampling.temperature > 0 && name !== fixedShape) {
        g.write(this.#tree.fixed, treeTable(sampledTreeParents(shape)));
        fixedShape = name;
      }
    };
    if (tree) useShape(tree);
    const treeCycles: Record<string, number> = {};
    await this.#prepare(sampling);
    this.#spans = this.timeline && this.#query
      ? { list: [], host: [], t0: performance.now() }
      : undefined;
    const P = prompt.length;
    const run = new Uint32Array(RUN_SLOTS);
    run[RUN.maxTokens] = maxTokens;
    run[RUN.promptLen] = P;
    g.write(B.run, run);
    g.write(B.prompt, new Uint32Array(prompt));
    g.write(B.history, new Uint32Array(prompt));
    t.setPosition(0);
    if (spec.kind === "model") spec.draft.setPosition(0);

    // Prefill: the prompt in chunks of maxT rows through the target (and the draft's cache),
    // then the first token from the target's last row.
    const t0 = performance.now();
    const enc = g.device.createCommandEncoder({ label: "decode.prefill" });
    for (const m of spec.kind === "model" ? [t, spec.draft] : [t]) {
      for (let start = 0; start < P; start += m.maxT) {
        const T = Math.min(m.maxT, P - start);
        const rows = m === t && start + T === P ? "last" : "none";
        g.encode(enc, "decode.prefill", await m.plan(T, { buffer: B.prompt, offset: start }, rows));
      }
    }
    g.encode(enc, "decode.first", this.#first);
    const first = this.#finish(enc, 0, undefined, 0, 0);
    first.submit();

    // Decode: chunks of cycles, up to RING in flight. A chunk is issued only when it fits in the
    // context even if every chunk in flight emits all its k + 1 tokens per cycle; near the end
    // the loop runs one at a time. A cycle past the stop is a no-op but still costs a full
    // forward, so chunks hold only the cycles the tokens left need at the expected tokens per
    // cycle (measured, else a guess), counting those in flight at theirs: sized by the one-token
    // minimum instead, a k = 4 chain ran ~3x the cycles it needed (H200, pycode pair). Falling
    // short costs one more round.
    //
    // Up to RING chunks go in flight between two readbacks, and only the newest is read back:
    // its copy holds the run state, every id since the oldest, and every chunk's timestamps.
    // Deno's `mapAsync` blocks until the queue drains and resolves ~10 ms later (it polls the
    // device with a wait, then sleeps 10 ms: DESIGN.md), so the next chunk is encoded before the
    // readback (`pending`) and submitted between the two: the GPU runs it through the sleep.
    // The first readback is the prefill's (the first token): a pending chunk of cycles sized to
    // outlast that sleep (from the last generation's cycle cost) runs behind it.
    let kNow = spec.kind === "none" ? 0 : k === "auto" ? 4 : k;
    const known = this.#cycleMs.get(tree ? treeShapeName(tree) : kNow);
    let cycles = known ? Math.max(2, Math.ceil(READ_MS / known)) : 2;
    let cycleMsNow = known ?? 0; // GPU ms of one cycle, as last measured (0: not yet)
    let alpha = 0.7; // running acceptance estimate for "auto"
    const gpuMs = { draft: 0, verify: 0 };
    let proposed = 0, issued = 1; // staging slot 0 holds the prefill's readback
    // kc: draft tokens proposed per cycle (a tree: its depth); per: most tokens a cycle emits.
    interface Chunk extends ChunkTiming {
      io: ChunkIo;
      kc: number;
      n: number;
      per: number;
      shape?: TreeShape;
      expected: number;
    }
    // The prefill, as a chunk in flight: one token, no cycles.
    let inflight: Chunk[] = [{ io: first, slot: 0, kc: 0, n: 1, per: 1, expected: 1 }];
    let pending: Chunk | undefined;
    // The chunk encoded during the next readback's sleep: how to encode it, and what it was
    // counted as (undone if it never goes in).
    let deferred:
      | Pick<Chunk, "n" | "per" | "expected" | "shape"> & {
        make: (early?: () => boolean) => Promise<Chunk>;
      }
      | undefined;
    let worst = 1; // tokens the chunks in flight may still add
    let expected = 1; // tokens they are expected to add
    let tpc = 0; // tokens per cycle, measured and smoothed (0: none read yet)
    const tokens: number[] = [];
    let state: ReadState | undefined; // the last readback (none before the prefill's)
    let t1 = 0;
    while (true) {
      const stop = state?.done || events.cancelled();
      const pos = P + tokens.length - 1 + worst; // target cache rows in use, at worst
      const room = this.#maxSeq - pos;
      // A tree cycle writes N cache rows before compaction: near the end of the cache, chains.
      const N = tree ? treeNodes(tree) : 0;
      const useTree = tree !== undefined && room >= N;
      const kc = useTree ? tree!.depth : Math.min(tree?.depth ?? kNow, room - 1);
      const per = kc + 1;
      // Expected tokens per cycle: measured; a first guess of 70% acceptance per draft token;
      // sized 10% low so a chunk rather overshoots than needs one more round trip.
      const perCycle = Math.max(1, 0.9 * (tpc > 0 ? tpc : 1 + 0.7 * kc));
      const left = maxTokens - tokens.length - expected;
      // Up to RING chunks are submitted as they are encoded; then two wait for the readback of
      // the newest: `pending`, encoded now and submitted as soon as the map call returns (the
      // queue has drained), holding what outlasts the readback's sleep, and `deferred`, encoded
      // during that sleep (while `pending` runs) and submitted when encoded, so the host's
      // encoding never leaves the GPU waiting. `pending` is submitted before the host can hear a
      // cancel (the poll blocks the thread), so a cancel costs at most it beyond the round in
      // flight; `deferred` stops going in when cancelled (parts already in run on, as no-ops
      // past the stop or into a generation nobody reads).
      const waits = !state || inflight.length >= RING;
      // The first round: a small pending chunk (the prefill's readback is short), then the rest
      // of what fills its sleep as the deferred one.
      const firstSmall = !state && !pending;
      // GPU ms of one cycle of what this chunk runs: its own shape's (draft length's) last
      // measured cost, else the last round's (auto trees and auto k change shape between rounds,
      // and a chunk sized by another shape's cost can end before the readback's sleep does).
      const ms = this.#cycleMs.get(useTree ? treeShapeName(tree!) : kc) ?? cycleMsNow;
      const n = Math.min(
        firstSmall
          ? Math.min(cycles, FIRST_CYCLES)
          : state && waits && !pending && ms > 0
          ? Math.max(2, Math.ceil((2 * READ_MS) / ms))
          : state && ms > 0
          ? Math.max(2, Math.ceil(CHUNK_MS / ms))
          : cycles,
        MAX_CYCLES,
        useTree ? Math.floor((room - N) / per) + 1 : Math.floor(room / per),
        Math.ceil(left / perCycle),
      );
      if (!stop && !(waits && pending && deferred) && room > 0 && n > 0) {
        if (useTree) {
          useShape(tree!);
          const name = treeShapeName(tree!);
          treeCycles[name] = (treeCycles[name] ?? 0) + n;
        }
        const slot = issued % RING, id = issued, shape = useTree ? tree : undefined;
        const exp = Math.min(left, n * perCycle), from = tokens.length + (state ? 0 : 1);
        // `early`: the chunk goes in as it is encoded (while `early()` holds), its cycles in
        // command buffers of 2, 4, 8, ... cycles, so the GPU starts on the first while the host
        // encodes the rest (H200: a 56-cycle plain chunk takes ~9 ms to encode).
        const encode = async (early?: () => boolean): Promise<Chunk> => {
          this.#mark(id, "encode");
          const cyc = shape
            ? await this.#treeCycle(shape, sampling)
            : await this.#cycle(kc, sampling);
          let e = g.device.createCommandEncoder({ label: "decode.cycles" });
          // Timestamps per cycle: (draft begin, end,) verify begin, end, in this slot's slice of
          // the set. Only written queries are resolved (an unwritten one can stall the resolve).
          const q = this.#query, base = 4 * MAX_CYCLES * slot;
          const qPer = cyc.draft.length ? 4 : 2;
          const times = (at: number) =>
            q && { querySet: q.set, beginningOfPassWriteIndex: at, endOfPassWriteIndex: at + 1 };
          for (let i = 0, cut = 2; i < n; i++) {
            if (cyc.draft.length) g.encode(e, "decode.draft", cyc.draft, times(base + qPer * i));
            g.encode(e, "decode.verify", cyc.verify, times(base + qPer * i + qPer - 2));
            if (early && i + 1 === cut && i + 1 < n && early()) {
              g.device.queue.submit([e.finish()]);
              this.#mark(id, "submit");
              e = g.device.createCommandEncoder({ label: "decode.cycles" });
              cut = 2 * cut + 2;
            }
          }
          const timed = q ? { cycles: n, per: qPer } : undefined;
          const io = this.#finish(e, from, timed, slot, id);
          return { io, slot, timed, kc, n, per, shape, expected: exp, id };
        };
        // Before the first token is read the deferred chunk is the rest of the first round:
        // encoded before the prefill's readback, it would hold the first token back by its
        // encoding when the prefill is short (H200: serve TTFT 16 → 26 ms). The pending and
        // deferred chunks take the slots of the round's two oldest chunks, done by the time
        // they go in (the queue has drained) and never mapped.
        if (!waits) {
          const c = await encode(() => true);
          c.io.submit();
          inflight.push(c);
        } else if (!pending) pending = await encode();
        else deferred = { make: encode, n, per, expected: exp, shape };
        issued++;
        worst += n * per;
        expected += exp;
        // Until a cycle's cost is known (no timestamps), chunks double; then `ms` sizes them.
        if (!firstSmall) cycles = Math.min(MAX_CYCLES, 2 * cycles);
        continue; // issue the next chunk before waiting on this one
      }
      if (inflight.length === 0) break;
      const round = inflight, newest = round[round.length - 1], later = deferred;
      inflight = [];
      deferred = undefined;
      const before = state;
      // The pending chunk goes in while the readback sleeps (see above); it continues from the
      // GPU's state, so it needs nothing from this readback. Cancelled: it is never submitted.
      const sent = new Set<Chunk>();
      let encoding: Promise<Chunk> | undefined;
      const next = pending;
      state = await newest.io.read(round, () => {
        if (events.cancelled()) return;
        if (next) {
          next.io.submit();
          sent.add(next);
        }
        // Encoded (microtasks) and submitted while the map's sleep runs.
        encoding = later?.make(() => !events.cancelled()).then((c) => {
          if (!events.cancelled()) {
            c.io.submit();
            sent.add(c);
          }
          return c;
        });
      });
      pending = undefined;
      const deferredChunk = await encoding;
      for (const c of [next, deferredChunk ?? later]) {
        if (!c) continue;
        if (sent.has(c as Chunk)) inflight.push(c as Chunk);
        else {
          // Never submitted: undo its accounting.
          worst -= c.n * c.per;
          expected -= c.expected;
          issued--;
          if (c.shape) treeCycles[treeShapeName(c.shape)] -= c.n;
        }
      }
      for (const c of round) {
        worst -= c.n * c.per;
        expected -= c.expected;
      }
      const fresh = state.ids.slice(tokens.length - state.from);
      tokens.push(...fresh);
      events.onTokens(fresh);
      if (!before) {
        t1 = performance.now(); // the first token is out: decoding starts
        if (state.done) break;
        continue;
      }
      gpuMs.draft += state.draftMs;
      gpuMs.verify += state.verifyMs;
      const dCycles = state.cycles - before.cycles, dAcc = state.accepted - before.accepted;
      if (dCycles > 0) tpc = tpc > 0 ? 0.5 * tpc + 0.5 * (dAcc / dCycles + 1) : dAcc / dCycles + 1;
      // Chunks big enough that a round's readback is a small share, from the GPU time of the
      // cycles just read; remembered per shape to size the next generation's first chunk.
      const cycleMs = dCycles > 0 ? (state.draftMs + state.verifyMs) / dCycles : 0;
      if (cycleMs > 0) cycleMsNow = cycleMs;
      // Each chunk's own cost per cycle, under its shape (or draft length).
      round.forEach((c, i) => {
        const ms = state!.chunkMs[i];
        if (c.timed && ms > 0) {
          this.#cycleMs.set(c.shape ? treeShapeName(c.shape) : c.kc, ms / c.n);
        }
      });
      // The committed cycles are the first of the round's (the rest ran past the stop).
      let real = dCycles;
      for (const c of round) {
        const used = Math.min(c.n, real);
        proposed += used * c.kc;
        real -= used;
      }
      if (auto && newest.shape && dCycles > 0) {
        // The top-1 acceptance that explains this round's mean accepted length, smoothed.
        const fit = fitAcceptance(newest.shape, dAcc / dCycles);
        alphaTree = 0.5 * alphaTree + 0.5 * fit;
        tree = chooseTreeShape(cost!, alphaTree, limits);
      }
      if (k === "auto" && !tree && newest.kc > 0 && dCycles > 0) {
        alpha = 0.5 * alpha + 0.5 * Math.min(0.99, dAcc / (dCycles * newest.kc));
        kNow = autoDraftLength(alpha, this.#costRatio());
      }
      // Over: a chunk submitted behind this readback runs no-op cycles; nothing waits on it.
      if (state.done) break;
    }
    if (!state) throw new Error("decode: the prefill was never read back (bookkeeping bug)");
    const t2 = performance.now();
    const last = tokens[tokens.length - 1];
    let stop: StopReason;
    if (state.done && t.config.eosIds.includes(last)) stop = "eos";
    else if (tokens.length >= maxTokens) stop = "max-tokens";
    else if (P + tokens.length - 1 >= this.#maxSeq) stop = "context";
    else stop = "cancelled";
    return {
      tokens,
      stop,
      prefillMs: t1 - t0,
      decodeMs: t2 - t1,
      targetPasses: state.cycles - 1, // the first commit follows prefill
      proposed,
      accepted: state.accepted,
      gpuMs: this.#query ? gpuMs : undefined,
      tree: auto ? mostUsed(treeCycles) ?? tree : tree,
      treeCycles: auto ? treeCycles : undefined,
      timeline: this.#spans && { cycles: this.#spans.list, host: this.#spans.host },
    };
  }

  /** Records a host event of chunk `id` when the timeline is on. */
  #mark(id: number, what: HostMark["what"]): void {
    const spans = this.#spans;
    spans?.host.push({ chunk: id, what, ms: performance.now() - spans.t0 });
  }

  /** Cost of one draft step relative to one target pass (weight bytes, at least 1/20). */
  #costRatio(): number {
    const s = this.#spec;
    if (s.kind !== "model") return 0.02;
    return Math.max(0.05, s.draft.weightBytes / Math.max(1, this.#target.weightBytes));
  }

  /**
   * Finishes `enc` with the copies a readback needs: the run state and out[from..) to staging
   * buffer `slot`, after this chunk's timestamps (`timed.cycles` cycles, `timed.per` per cycle,
   * resolved into the set's slice `slot`) and the resolved timestamps of every slot. `submit`
   * submits; `read` (after `submit`, when `slot` is unmapped) maps the staging buffer and resolves
   * once the GPU is done with this submission and every one before it, with the run state and
   * the GPU ms of `chunks` (slot and timing of each chunk submitted since the last read, this one
   * included: their timestamps were resolved before this copy).
   */
  #finish(
    enc: GPUCommandEncoder,
    from: number,
    timed: { cycles: number; per: number } | undefined,
    slot: number,
    id: number,
  ): ChunkIo {
    const B = this.#buf, g = this.#gpu, staging = this.#staging[slot];
    const cap = this.#maxSeq + 1;
    const q = this.#query, qBase = 4 * MAX_CYCLES * slot;
    const ts = q ? q.resolve.size : 0; // the staging buffer: [timestamps | run state | out]
    const nq = timed ? timed.cycles * timed.per : 0;
    if (q && nq) enc.resolveQuerySet(q.set, qBase, nq, q.resolve, qBase * 8);
    if (q) enc.copyBufferToBuffer(q.resolve, 0, staging, 0, ts);
    enc.copyBufferToBuffer(B.run, 0, staging, ts, RUN_SLOTS * 4);
    enc.copyBufferToBuffer(B.out, from * 4, staging, ts + (RUN_SLOTS + from) * 4, (cap - from) * 4);
    const commands = enc.finish();
    const bytes = ts + (RUN_SLOTS + cap) * 4;
    const spans = this.#spans;
    const mark = (what: HostMark["what"]) => this.#mark(id, what);
    return {
      submit: () => {
        g.device.queue.submit([commands]);
        mark("submit");
      },
      read: async (chunks: ChunkTiming[], during?: () => void): Promise<ReadState> => {
        mark("map");
        const mapped = staging.mapAsync(GPUMapMode.READ, 0, bytes);
        during?.();
        await mapped;
        mark("mapped");
        g.throwIfFailed();
        const view = new Uint32Array(staging.getMappedRange(ts, bytes - ts));
        const count = view[RUN.count];
        const r: ReadState = {
          from,
          ids: Array.from(view.subarray(RUN_SLOTS + from, RUN_SLOTS + Math.max(from, count))),
          done: view[RUN.done] !== 0,
          cycles: view[RUN.cycles],
          accepted: view[RUN.accepted],
          draftMs: 0,
          verifyMs: 0,
          chunkMs: chunks.map(() => 0),
        };
        if (q) {
          const stamps = new BigUint64Array(staging.getMappedRange(0, ts));
          const ms = (at: number) => Number(stamps[at + 1] - stamps[at]) / 1e6;
          chunks.forEach((c, ci) => {
            if (!c.timed) return;
            const base = 4 * MAX_CYCLES * c.slot;
            for (let i = 0; i < c.timed.cycles; i++) {
              const at = base + c.timed.per * i;
              const d = c.timed.per === 4 ? ms(at) : 0, v = ms(at + c.timed.per - 2);
              r.draftMs += d;
              r.verifyMs += v;
              r.chunkMs[ci] += d + v;
              if (spans) {
                spans.base ??= stamps[at];
                const us = (t: bigint) => Number(t - spans.base!) / 1e3;
                spans.list.push({
                  chunk: c.id ?? 0,
                  begin: us(stamps[at]),
                  end: us(stamps[at + c.timed.per - 1]),
                });
              }
            }
          });
        }
        staging.unmap();
        return r;
      },
    };
  }

  /** Frees the decoder's buffers. */
  destroy(): void {
    for (const b of [...Object.values(this.#buf), ...Object.values(this.#tree), ...this.#staging]) {
      b.destroy();
    }
    this.#dummyState.destroy();
    if (this.#query) {
      this.#query.set.destroy();
      this.#query.resolve.destroy();
    }
  }
}

/** The key with the largest count (the first such), or undefined when there is none. */
function mostUsed(counts: Record<string, number>): TreeShape | undefined {
  let best: string | undefined;
  for (const [name, n] of Object.entries(counts)) {
    if (best === undefined || n > counts[best]) best = name;
  }
  if (best === undefined) return undefined;
  const [depth, width] = best.split("x").map(Number);
  return { depth, width };
}

/**
 * The draft length maximizing expected tokens per unit of cost when each draft token is accepted
 * with probability `alpha` (independently, as in Leviathan et al. 2023, eq. 1) and one draft step
 * costs `ratio` target passes: E[tokens per cycle] = (1 − α^(k+1)) / (1 − α), cost = 1 + k·ratio.
 */
export function autoDraftLength(alpha: number, ratio: number): number {
  let best = 1, bestValue = 0;
  for (let k = 1; k <= MAX_DRAFT; k++) {
    const value = (1 - alpha ** (k + 1)) / (1 - alpha) / (1 + k * ratio);
    if (value > bestValue + 1e-9) {
      best = k;
      bestValue = value;
    }
  }
  return best;
}
