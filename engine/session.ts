/**
 * What the GPU worker holds: the device, the weight store shared by target and draft, both
 * models with their KV caches, the tokenizer and the decoders. Usable directly (in-process) as well as behind the worker.
 *
 * @module
 */
import { type Gpu, requestGpu } from "./gpu.ts";
import { WeightStore } from "./weights.ts";
import { Decoder, type SamplingSettings, type Speculation, targetLogitRows } from "./decode.ts";
import { parseTreeShape, type TreeShape, treeShapeName } from "./token_tree.ts";
import { LlamaGpu } from "../models/llama.ts";
import { LlamaBatch } from "../models/llama_batch.ts";
import { BATCH_MAX_STEPS, BatchDecoder, sessionBatchShapes } from "./batch.ts";
import { planFormats } from "./quant_plan.ts";
import {
  formatPlanTable,
  planConfigurations,
  type PlanRequest,
  selfDraftFormats,
} from "./planner.ts";
import { adapterFacts, estimateVram, formatBytes, type VramBytes, vramTotal } from "./vram.ts";
import type { WeightFormat } from "../kernels/qformats.ts";
import { contextLimitReason, loadModel } from "../models/load.ts";
import type { LoadedModel, Tokenizer } from "../models/types.ts";
import {
  type BatchFigures,
  batchMode,
  type GenerateChunk,
  type GenerateOptions,
  type GenerateStats,
  type LoadOptions,
  type ModelInfo,
} from "./protocol.ts";

/** A loaded target (and optional draft) on the GPU, ready to generate. */
export class Session {
  readonly #gpu: Gpu;
  readonly #store: WeightStore;
  readonly #target: LlamaGpu;
  readonly #draft: LlamaGpu | undefined;
  readonly #decoders = new Map<string, Decoder>();
  readonly #tokenizer: Tokenizer | undefined;
  /**
   * Batched decoding (`parallel` > 1): the target's paged forward (and the draft's, for batched
   * speculation) and the scheduler.
   */
  readonly #batch: SessionBatch | undefined;
  /** The planner's figures for this setup, computed before anything was allocated. */
  readonly planned: VramBytes;

  private constructor(
    gpu: Gpu,
    store: WeightStore,
    target: LlamaGpu,
    draft: LlamaGpu | undefined,
    tokenizer: Tokenizer | undefined,
    planned: VramBytes,
    batch?: SessionBatch,
  ) {
    this.planned = planned;
    this.#batch = batch;
    this.#gpu = gpu;
    this.#store = store;
    this.#target = target;
    this.#draft = draft;
    this.#tokenizer = tokenizer;
  }

  /** Reads the checkpoints, checks they share a vocabulary, acquires the GPU, uploads weights. */
  static async load(options: LoadOptions, progress: (msg: string) => void): Promise<Session> {
    const host = await loadModel(options.model, {
      tokenizer: options.tokenizer,
      onProgress: progress,
    });
    const draftHost = options.draft
      ? await loadModel(options.draft, {
        tokenizer: options.draftTokenizer ?? options.tokenizer,
        onProgress: progress,
      })
      : undefined;
    if (draftHost) checkSameVocabulary(host, draftHost);
    const c = host.config;
    const modelMax = Math.min(c.maxSeqLen, draftHost?.config.maxSeqLen ?? Infinity);
    const maxSeq = options.maxSeq ?? modelMax;
    if (!Number.isInteger(maxSeq) || maxSeq < 2) {
      throw new RangeError(`context ${maxSeq} is too small (need at least 2 rows)`);
    }
    if (maxSeq > modelMax) {
      throw new RangeError(
        `context ${maxSeq} is longer than the model${draftHost ? "s'" : "'s"} ${modelMax} ` +
          `(${contextLimitReason(c, ...(draftHost ? [draftHost.config] : []))})`,
      );
    }
    const gpu = await requestGpu({ disableF16: options.noF16 });
    progress(`GPU: ${gpu.adapterName}${gpu.features.f16 ? " (shader-f16)" : ""}`);
    try {
      return await Session.#upload(gpu, options, host, draftHost, maxSeq, progress);
    } catch (e) {
      gpu.destroy();
      throw e;
    }
  }

  static async #upload(
    gpu: Gpu,
    options: LoadOptions,
    host: LoadedModel,
    draftHost: LoadedModel | undefined,
    maxSeq: number,
    progress: (msg: string) => void,
  ): Promise<Session> {
    const f16 = gpu.features.f16 && !options.noF16;
    const parallel = options.parallel ?? 1;
    if (!Number.isInteger(parallel) || parallel < 1 || parallel > 64) {
      throw new RangeError(`parallel must be an integer in [1, 64], got ${parallel}`);
    }
    const batchK = options.batchDraftTokens ?? 4;
    if (!Number.isInteger(batchK) || batchK < 1 || batchK > 16) {
      throw new RangeError(`batched draft tokens must be an integer in [1, 16], got ${batchK}`);
    }
    if (options.kv === "f16" && !f16) {
      throw new Error(
        "--kv f16 needs the shader-f16 feature (this device or --no-f16 rules it out)",
      );
    }
    const self = options.selfDraft === true;
    const req: PlanRequest = {
      target: host,
      draft: draftHost,
      self,
      quant: options.quant,
      draftQuant: options.draftQuant,
      keep: options.keep,
      keepFormat: options.keepFormat,
      kv: options.kv ?? (options.vram === undefined ? (f16 ? "f16" : "f32") : undefined),
      ctx: maxSeq,
      budget: options.vram,
      speculative: self || draftHost !== undefined,
      parallel,
      batchDraftTokens: batchK,
      adapter: adapterFacts(gpu),
      f16,
    };
    let targetFormats: ReadonlyMap<string, WeightFormat>;
    let draftFormats: ReadonlyMap<string, WeightFormat> | undefined;
    let kv = req.kv!;
    let planned: VramBytes | undefined;
    if (options.vram !== undefined) {
      // Pick the most precise configuration that fits, or refuse before allocating anything.
      const rows = await planConfigurations(req);
      const pick = rows.find((r) => r.chosen);
      if (!pick) {
        throw new Error(
          `nothing fits ${formatBytes(options.vram)} at a context of ${maxSeq}` +
            (parallel > 1 ? ` with a paged KV pool for ${parallel} sequences (--parallel)` : "") +
            `; the options:\n` +
            formatPlanTable(rows, req),
        );
      }
      targetFormats = pick.targetFormats;
      draftFormats = pick.draftFormats;
      kv = pick.kv;
      planned = pick.bytes;
      progress(
        `VRAM plan: ${pick.quant ?? "weights as loaded"}${
          pick.draftFormats ? `, draft ${pick.draftQuant ?? "as loaded"}` : ""
        }, ${kv} KV cache: ${formatBytes(pick.total)} of ${formatBytes(options.vram)}`,
      );
    } else {
      const formats = (m: LoadedModel, quant = options.quant) =>
        planFormats(m.config, m.tensors, {
          quant,
          keep: options.keep,
          keepFormat: options.keepFormat,
          f16,
        });
      targetFormats = formats(host);
      if (self) {
        draftFormats = selfDraftFormats(host, targetFormats, options.draftQuant ?? "q4_0", req);
      } else if (draftHost) draftFormats = formats(draftHost, options.draftQuant ?? options.quant);
      const draftModel = self ? host : draftHost;
      const est = await estimateVram({
        ...req,
        target: { model: host, formats: targetFormats },
        draft: draftModel && draftFormats
          ? { model: draftModel, formats: draftFormats }
          : undefined,
        kv,
      }, maxSeq);
      if (est.problems.length > 0) {
        throw new Error(`this setup exceeds the adapter's limits: ${est.problems.join("; ")}`);
      }
      planned = est.bytes;
    }
    const store = new WeightStore(gpu);
    progress(
      `uploading ${host.tensors.size} target tensors (${formatBytes(planned.target_weights)})`,
    );
    const draftModel = self ? host : draftHost;
    const target = await LlamaGpu.create(gpu, store, host, {
      label: "target",
      maxSeq,
      maxLogitRows: targetLogitRows(draftModel !== undefined),
      noF16: options.noF16,
      formats: targetFormats,
      kv,
    });
    let draft: LlamaGpu | undefined;
    if (draftModel) {
      progress(
        `uploading ${self ? "the self-draft" : "draft"} tensors (${
          formatBytes(planned.draft_weights)
        } more)`,
      );
      draft = await LlamaGpu.create(gpu, store, draftModel, {
        label: "draft",
        maxSeq,
        noF16: options.noF16,
        formats: draftFormats,
        kv,
      });
    }
    const tokenizer = host.tokenizer ?? draftHost?.tokenizer;
    let batch: SessionBatch | undefined;
    if (parallel > 1) {
      const shapes = sessionBatchShapes(parallel, maxSeq, draft ? batchK : undefined);
      const forward = await LlamaBatch.create(gpu, target, shapes.target);
      const draftForward = draft && shapes.draft
        ? await LlamaBatch.create(gpu, draft, shapes.draft, "draft.batch")
        : undefined;
      const poolBytes = forward.bytes.kv + (draftForward?.bytes.kv ?? 0);
      progress(
        `paged KV pool: ${forward.layout.numBlocks} blocks of ${forward.layout.blockRows} rows ` +
          `(${formatBytes(poolBytes)}${draftForward ? ", target and draft" : ""}) for ` +
          `${parallel} sequences`,
      );
      const spec = draftForward ? { draft: draftForward, k: batchK } : undefined;
      batch = {
        forward,
        draftForward,
        decoder: new BatchDecoder(gpu, forward, BATCH_MAX_STEPS, spec),
      };
    }
    return new Session(gpu, store, target, draft, tokenizer, planned, batch);
  }

  #decoder(spec: "model" | "ngram" | "none"): Decoder {
    let d = this.#decoders.get(spec);
    if (!d) {
      const s: Speculation = spec === "model"
        ? { kind: "model", draft: this.#draft! }
        : spec === "ngram"
        ? { kind: "ngram", maxN: 3 }
        : { kind: "none" };
      d = new Decoder(this.#gpu, this.#target, s);
      this.#decoders.set(spec, d);
    }
    return d;
  }

  /** Bytes of every non-uniform GPU buffer this session has created (see `Gpu.allocatedBytes`). */
  get allocatedBytes(): number {
    return this.#gpu.allocatedBytes;
  }

  /** GPU bytes by category, from the buffers actually created (see `engine/vram.ts`). */
  vram(): VramBytes {
    const t = this.#target, d = this.#draft;
    let staging = 0;
    for (const dec of this.#decoders.values()) staging += dec.bytes;
    const b = this.#batch;
    return {
      target_weights: this.#store.bytesOf("target"),
      draft_weights: this.#store.bytesOf("draft"),
      kv_cache: t.bytes.kv + (d?.bytes.kv ?? 0) + (b?.forward.bytes.kv ?? 0) +
        (b?.draftForward?.bytes.kv ?? 0),
      scratch: t.bytes.scratch + (d?.bytes.scratch ?? 0) + (b?.forward.bytes.scratch ?? 0) +
        (b?.draftForward?.bytes.scratch ?? 0),
      staging: staging + (b?.decoder.bytes ?? 0),
    };
  }

  /** Facts about the loaded models, including GPU bytes by category. */
  info(): ModelInfo {
    const t = this.#target, d = this.#draft;
    return {
      adapter: this.#gpu.adapterName,
      f16: t.kvType === "f16",
      kv: t.kvType,
      maxSeqLen: t.config.maxSeqLen,
      kvRows: t.maxSeq,
      vocabSize: t.config.vocabSize,
      draft: d !== undefined,
      parallel: this.#batch?.forward.layout.maxSeqs ?? 1,
      formats: { target: { ...t.formats }, ...(d ? { draft: { ...d.formats } } : {}) },
      vram: this.vram(),
    };
  }

  /** The batched decoder's load, or null without batching (`parallel` 1). */
  batchLoad(): BatchFigures | null {
    const b = this.#batch;
    if (!b) return null;
    const l = b.decoder.load;
    return {
      active: l.active,
      waiting: l.waiting,
      blocksInUse: l.blocksInUse,
      blocks: b.forward.layout.numBlocks,
      chunks: l.chunks,
      continued: l.continued,
      waitedMs: l.waitedMs,
    };
  }

  #needTokenizer(): Tokenizer {
    if (!this.#tokenizer) {
      throw new Error("this model has no tokenizer: pass one (--tokenizer) or use --prompt-tokens");
    }
    return this.#tokenizer;
  }

  /**
   * Token ids of `text`, with BOS first when `bos`. Occurrences of the strings in `specials`
   * (a chat template's `<s>`, `</s>`, `<|eot_id|>`...) become the id of the vocabulary piece that
   * equals them, not their spelling as text; a special string the vocabulary lacks is text. With
   * `bos`, no second BOS is added when the text already starts with the BOS piece.
   */
  tokenize(text: string, bos: boolean, specials: readonly string[] = []): number[] {
    const tok = this.#needTokenizer();
    const ids = new Map<string, number>();
    if (specials.length) {
      const wanted = new Set(specials.filter((s) => s !== ""));
      for (let id = 0; id < tok.vocabSize && ids.size < wanted.size; id++) {
        const p = tok.piece(id);
        if (wanted.has(p) && !ids.has(p)) ids.set(p, id);
      }
    }
    if (ids.size === 0) return tok.encode(text, { bos });
    // Longest first, so "<|end|>" is not cut by a shorter special that prefixes it.
    const names = [...ids.keys()].sort((a, b) => b.length - a.length);
    const out: number[] = [];
    let i = 0, from = 0;
    while (i < text.length) {
      const hit = names.find((n) => text.startsWith(n, i));
      if (!hit) {
        i++;
        continue;
      }
      if (i > from) out.push(...tok.encode(text.slice(from, i)));
      out.push(ids.get(hit)!);
      i += hit.length;
      from = i;
    }
    if (from < text.length) out.push(...tok.encode(text.slice(from)));
    if (bos && tok.bosId !== undefined && out[0] !== tok.bosId) out.unshift(tok.bosId);
    return out;
  }

  /** Generates, streaming chunks through `onChunk`; returns the statistics. */
  async generate(
    o: GenerateOptions,
    onChunk: (chunk: GenerateChunk) => void,
    cancelled: () => boolean,
  ): Promise<GenerateStats> {
    const tStart = performance.now();
    const V = this.#target.config.vocabSize;
    const spec = o.spec ?? (this.#draft ? "model" : "none");
    if (spec === "model" && !this.#draft) {
      throw new Error("speculation with a draft model needs a draft (--draft <dir|file>)");
    }
    const k = o.draftTokens ?? 4;
    let tree: TreeShape | "auto" | undefined;
    if (o.draftTree !== undefined) {
      if (spec !== "model") {
        throw new Error(
          `a draft tree (${o.draftTree}) needs a draft model (--draft or --spec self), not ` +
            `--spec ${spec}`,
        );
      }
      tree = o.draftTree === "auto" ? "auto" : parseTreeShape(o.draftTree);
    }
    let prompt: number[];
    if (o.promptTokens) {
      const bad = o.promptTokens.find((t) => !Number.isInteger(t) || t < 0 || t >= V);
      if (bad !== undefined) throw new RangeError(`prompt token ${bad} is outside [0, ${V})`);
      prompt = o.promptTokens;
    } else if (o.prompt !== undefined) {
      prompt = this.#needTokenizer().encode(o.prompt, { bos: true });
    } else throw new Error("give a prompt (text or token ids)");
    const streamer = this.#tokenizer?.decoder();
    let ttft = 0;
    const sampling = { temperature: o.temperature, topK: o.topK, topP: o.topP, seed: o.seed };
    const mode = this.#batch
      ? batchMode(this.#batch.forward.layout.maxSeqs, !!this.#draft, o)
      : "serial";
    if (mode !== "serial") {
      const speculate = mode === "speculative";
      return await this.#generateBatched(prompt, o, sampling, speculate, onChunk, cancelled);
    }
    const r = await this.#decoder(spec).generate(
      prompt,
      o.maxTokens,
      sampling,
      {
        onTokens: (ids) => {
          if (ids.length === 0) return;
          if (!ttft) ttft = performance.now() - tStart;
          const text = streamer ? ids.map((id) => streamer.push(id)).join("") : "";
          onChunk({ text, tokens: ids });
        },
        cancelled,
      },
      k,
      tree,
    );
    const tail = streamer?.flush() ?? "";
    if (tail) onChunk({ text: tail, tokens: [] });
    const info = this.info();
    const gpuTotal = r.gpuMs ? r.gpuMs.draft + r.gpuMs.verify : 0;
    return {
      prompt_tokens: prompt.length,
      generated_tokens: r.tokens.length,
      prefill_tok_s: prompt.length / (r.prefillMs / 1000),
      decode_tok_s: r.tokens.length > 1 ? (r.tokens.length - 1) / (r.decodeMs / 1000) : 0,
      ttft_ms: ttft,
      stop_reason: r.stop,
      vram_bytes: vramTotal(info.vram),
      vram: info.vram,
      spec,
      acceptance_rate: r.proposed ? r.accepted / r.proposed : 0,
      proposed_tokens: r.proposed,
      accepted_tokens: r.accepted,
      target_passes: r.targetPasses,
      tokens_per_pass: r.targetPasses ? (r.tokens.length - 1) / r.targetPasses : 0,
      tree_shape: r.tree ? treeShapeName(r.tree) : null,
      draft_time_share: gpuTotal ? r.gpuMs!.draft / gpuTotal : null,
      verify_time_share: gpuTotal ? r.gpuMs!.verify / gpuTotal : null,
      gpu_busy: r.gpuMs && r.decodeMs > 0 ? gpuTotal / r.decodeMs : null,
    };
  }

  /** One generation on the batched path (engine/batch.ts), with the serial path's statistics. */
  async #generateBatched(
    prompt: number[],
    o: GenerateOptions,
    sampling: SamplingSettings,
    speculate: boolean,
    onChunk: (chunk: GenerateChunk) => void,
    cancelled: () => boolean,
  ): Promise<GenerateStats> {
    const streamer = this.#tokenizer?.decoder();
    const r = await this.#batch!.decoder.generate({
      prompt,
      maxTokens: o.maxTokens,
      sampling,
      speculate,
      draftTokens: typeof o.draftTokens === "number" ? o.draftTokens : undefined,
      onTokens: (ids) => {
        const text = streamer ? ids.map((id) => streamer.push(id)).join("") : "";
        onChunk({ text, tokens: ids });
      },
      cancelled,
    });
    const tail = streamer?.flush() ?? "";
    if (tail) onChunk({ text: tail, tokens: [] });
    const info = this.info();
    const n = r.tokens.length;
    return {
      prompt_tokens: prompt.length,
      generated_tokens: n,
      prefill_tok_s: r.prefillMs > 0 ? prompt.length / (r.prefillMs / 1000) : 0,
      decode_tok_s: n > 1 && r.decodeMs > 0 ? (n - 1) / (r.decodeMs / 1000) : 0,
      ttft_ms: r.queueMs + r.prefillMs,
      stop_reason: r.stop,
      vram_bytes: vramTotal(info.vram),
      vram: info.vram,
      spec: speculate ? "model" : "none",
      acceptance_rate: r.proposed ? r.accepted / r.proposed : 0,
      proposed_tokens: r.proposed,
      accepted_tokens: r.accepted,
      target_passes: r.steps,
      tokens_per_pass: r.steps ? (n - 1) / r.steps : 0,
      tree_shape: null,
      draft_time_share: null,
      verify_time_share: null,
      gpu_busy: null,
    };
  }

  /** Frees every GPU object and the device; resolves once the device is gone. */
  async dispose(): Promise<void> {
    if (this.#batch) {
      await this.#batch.decoder.idle();
      this.#batch.decoder.destroy();
      this.#batch.forward.destroy();
      this.#batch.draftForward?.destroy();
    }
    for (const d of this.#decoders.values()) d.destroy();
    this.#draft?.destroy();
    this.#target.destroy();
    this.#store.destroy();
    await this.#gpu.device.queue.onSubmittedWorkDone();
    this.#gpu.destroy();
    await this.#gpu.device.lost;
  }
}

/** A session's batched path: the paged forwards of target (and draft) and their scheduler. */
interface SessionBatch {
  forward: LlamaBatch;
  draftForward?: LlamaBatch;
  decoder: BatchDecoder;
}

/**
 * Throws unless draft and target tokenize identically: same vocabulary size and, where both
 * carry a tokenizer, the same piece for every id (the error names the first difference).
 */
export function checkSameVocabulary(target: LoadedModel, draft: LoadedModel): void {
  const a = target.config.vocabSize, b = draft.config.vocabSize;
  if (a !== b) {
    throw new Error(
      `draft ${draft.source} has a vocabulary of ${b} tokens, the target ${target.source} ${a}: ` +
        `speculative decoding needs the same tokenizer`,
    );
  }
  const ta = target.tokenizer, tb = draft.tokenizer;
  if (!ta || !tb) return;
  const n = Math.min(ta.vocabSize, tb.vocabSize);
  for (let id = 0; id < n; id++) {
    if (ta.piece(id) !== tb.piece(id)) {
      throw new Error(
        `draft and target vocabularies differ first at token ${id}: ` +
          `${JSON.stringify(tb.piece(id))} (draft) vs ${JSON.stringify(ta.piece(id))} (target)`,
      );
    }
  }
}
