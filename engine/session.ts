/**
 * What the GPU worker holds: the device, the weight store, the loaded model with its KV cache,
 * the tokenizer and the decoder. Usable directly (in-process) as well as behind the worker.
 *
 * @module
 */
import { type Gpu, requestGpu } from "./gpu.ts";
import { WeightStore } from "./weights.ts";
import { Decoder } from "./decode.ts";
import { LlamaGpu } from "../models/llama.ts";
import { loadModel } from "../models/load.ts";
import type { Tokenizer } from "../models/types.ts";
import type {
  GenerateChunk,
  GenerateOptions,
  GenerateStats,
  LoadOptions,
  ModelInfo,
} from "./protocol.ts";

/** A loaded model on the GPU, ready to generate. */
export class Session {
  readonly #gpu: Gpu;
  readonly #store: WeightStore;
  readonly #model: LlamaGpu;
  readonly #decoder: Decoder;
  readonly #tokenizer: Tokenizer | undefined;

  private constructor(
    gpu: Gpu,
    store: WeightStore,
    model: LlamaGpu,
    decoder: Decoder,
    tokenizer: Tokenizer | undefined,
  ) {
    this.#gpu = gpu;
    this.#store = store;
    this.#model = model;
    this.#decoder = decoder;
    this.#tokenizer = tokenizer;
  }

  /** Reads the checkpoint, acquires the GPU and uploads the weights. */
  static async load(options: LoadOptions, progress: (msg: string) => void): Promise<Session> {
    const host = await loadModel(options.model, {
      tokenizer: options.tokenizer,
      onProgress: progress,
    });
    const c = host.config;
    const maxSeq = options.maxSeq ?? c.maxSeqLen;
    if (!Number.isInteger(maxSeq) || maxSeq < 2) {
      throw new RangeError(`context ${maxSeq} is too small (need at least 2 rows)`);
    }
    if (maxSeq > c.maxSeqLen) {
      throw new RangeError(
        `context ${maxSeq} is longer than the model's ${c.maxSeqLen} (max_position_embeddings)`,
      );
    }
    const gpu = await requestGpu({ disableF16: options.noF16 });
    progress(`GPU: ${gpu.adapterName}${gpu.features.f16 ? " (shader-f16)" : ""}`);
    const store = new WeightStore(gpu);
    progress(`uploading ${host.tensors.size} tensors`);
    const model = await LlamaGpu.create(gpu, store, host, {
      label: "target",
      maxSeq,
      noF16: options.noF16,
    });
    const decoder = new Decoder(gpu, model);
    return new Session(gpu, store, model, decoder, host.tokenizer);
  }

  /** Facts about the loaded model, including GPU bytes by category. */
  info(): ModelInfo {
    const m = this.#model;
    return {
      adapter: this.#gpu.adapterName,
      f16: m.kvType === "f16",
      maxSeqLen: m.config.maxSeqLen,
      kvRows: m.maxSeq,
      vocabSize: m.config.vocabSize,
      vram: {
        weights: this.#store.bytes,
        kv_cache: m.bytes.kv,
        activations: m.bytes.activations,
        decode: this.#decoder.bytes,
      },
    };
  }

  #needTokenizer(): Tokenizer {
    if (!this.#tokenizer) {
      throw new Error("this model has no tokenizer: pass one (--tokenizer) or use --prompt-tokens");
    }
    return this.#tokenizer;
  }

  /** Token ids of `text`. */
  tokenize(text: string, bos: boolean): number[] {
    return this.#needTokenizer().encode(text, { bos });
  }

  /** Generates, streaming chunks through `onChunk`; returns the statistics. */
  async generate(
    o: GenerateOptions,
    onChunk: (chunk: GenerateChunk) => void,
    cancelled: () => boolean,
  ): Promise<GenerateStats> {
    const tStart = performance.now();
    const V = this.#model.config.vocabSize;
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
    const r = await this.#decoder.generate(prompt, o.maxTokens, o, {
      onTokens: (ids) => {
        if (ids.length === 0) return;
        if (!ttft) ttft = performance.now() - tStart;
        const text = streamer ? ids.map((id) => streamer.push(id)).join("") : "";
        onChunk({ text, tokens: ids });
      },
      cancelled,
    });
    const tail = streamer?.flush() ?? "";
    if (tail) onChunk({ text: tail, tokens: [] });
    const info = this.info();
    return {
      prompt_tokens: prompt.length,
      generated_tokens: r.tokens.length,
      prefill_tok_s: prompt.length / (r.prefillMs / 1000),
      decode_tok_s: r.tokens.length > 1 ? (r.tokens.length - 1) / (r.decodeMs / 1000) : 0,
      ttft_ms: ttft,
      stop_reason: r.stop,
      vram_bytes: Object.values(info.vram).reduce((a, b) => a + b, 0),
    };
  }

  /** Frees every GPU object and the device. */
  dispose(): void {
    this.#decoder.destroy();
    this.#model.destroy();
    this.#store.destroy();
    this.#gpu.destroy();
  }
}
