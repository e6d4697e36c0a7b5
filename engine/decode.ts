/**
 * Plain (one model) GPU-resident generation: prefill in chunks, then decode steps that sample on
 * the GPU, feed the sampled id straight into the next step's embedding, and append it to an
 * output buffer. The CPU enqueues many steps per submission and reads the output back once per
 * chunk (DESIGN.md: each readback costs >= ~11 ms on Deno).
 *
 * @module
 */
import type { Dispatch, Gpu } from "./gpu.ts";
import type { LlamaGpu } from "../models/llama.ts";
import { createSample } from "../kernels/sample.ts";
import { createAppend } from "../kernels/append.ts";
import type { StopReason } from "./protocol.ts";

/** Sampling settings of one generation. */
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
}

/** Loop state slots (u32) of the `run` buffer. */
const RUN_COUNT = 0, RUN_DONE = 1, RUN_RNG = 2;

/** Drives one model's GPU-resident generation. */
export class Decoder {
  readonly #gpu: Gpu;
  readonly #model: LlamaGpu;
  readonly #maxOut: number;
  /** prompt: [maxSeq] u32 prompt ids. */
  readonly #prompt: GPUBuffer;
  /** cur: [1] u32, the last sampled id, input of the next decode step. */
  readonly #cur: GPUBuffer;
  /** run: [count, done, rngCounter, 0] u32. */
  readonly #run: GPUBuffer;
  /** out: [maxOut] u32 generated ids. */
  readonly #out: GPUBuffer;
  /** staging: run state + out, read back once per chunk. */
  readonly #staging: GPUBuffer;
  #sampleKey = "";
  #step: Dispatch[] = [];
  #first: Dispatch[] = [];

  /** A decoder for `model` that can generate up to `maxOut` tokens per call. */
  constructor(gpu: Gpu, model: LlamaGpu, maxOut = model.maxSeq) {
    this.#gpu = gpu;
    this.#model = model;
    this.#maxOut = maxOut;
    const S = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST;
    const L = "decode";
    this.#prompt = gpu.buffer(`${L}.prompt`, model.maxSeq * 4, S);
    this.#cur = gpu.buffer(`${L}.cur`, 4, S);
    this.#run = gpu.buffer(`${L}.run`, 16, S);
    this.#out = gpu.buffer(`${L}.out`, maxOut * 4, S);
    this.#staging = gpu.buffer(
      `${L}.staging`,
      16 + maxOut * 4,
      GPUBufferUsage.COPY_DST | GPUBufferUsage.MAP_READ,
    );
  }

  /** GPU bytes this decoder allocated. */
  get bytes(): number {
    return this.#prompt.size + this.#cur.size + this.#run.size + this.#out.size +
      this.#staging.size;
  }

  /** Builds (once per settings) the sampler + append tail shared by prefill and decode. */
  async #prepare(s: SamplingSettings): Promise<void> {
    const key = JSON.stringify(s);
    if (key === this.#sampleKey) return;
    const g = this.#gpu, m = this.#model;
    const sample = await createSample(g, {
      label: "decode.sample",
      logits: m.logits,
      out: this.#cur,
      state: this.#run,
      counterIndex: RUN_RNG,
      V: m.config.vocabSize,
      rows: 1,
      seed: s.seed,
      temperature: s.temperature,
      topK: s.topK,
      topP: s.topP,
    });
    const append = await createAppend(g, {
      label: "decode.append",
      token: this.#cur,
      loop: this.#run,
      out: this.#out,
      maxOut: this.#maxOut,
      eos: m.config.eosIds,
    });
    const forward = await m.plan(1, { buffer: this.#cur, offset: 0 }, "last");
    this.#first = [sample, append];
    this.#step = [...forward, sample, append];
    this.#sampleKey = key;
  }

  /**
   * Generates up to `maxTokens` ids after `prompt` (the cache starts empty). Stops at an EOS id,
   * at `maxTokens`, at the end of the KV cache, or when cancelled.
   */
  async generate(
    prompt: readonly number[],
    maxTokens: number,
    sampling: SamplingSettings,
    events: DecodeEvents,
  ): Promise<DecodeResult> {
    const g = this.#gpu, m = this.#model;
    if (prompt.length < 1) throw new RangeError("the prompt must hold at least one token");
    if (prompt.length >= m.maxSeq) {
      throw new RangeError(
        `the prompt has ${prompt.length} tokens but the context holds ${m.maxSeq}: ` +
          `no room to generate (shorten the prompt or raise --ctx)`,
      );
    }
    await this.#prepare(sampling);
    // Room: the cache holds maxSeq rows; every generated token but the last is fed back.
    const limit = Math.min(maxTokens, this.#maxOut, m.maxSeq - prompt.length + 1);
    g.write(this.#prompt, new Uint32Array(prompt));
    g.write(this.#run, new Uint32Array([0, 0, 0, 0]));
    m.setPosition(0);

    // Prefill: the prompt in chunks of maxT rows, logits of the last row, then sample + append.
    const t0 = performance.now();
    const enc = g.device.createCommandEncoder({ label: "decode.prefill" });
    for (let start = 0; start < prompt.length; start += m.maxT) {
      const T = Math.min(m.maxT, prompt.length - start);
      const plan = await m.plan(T, { buffer: this.#prompt, offset: start }, "last");
      g.encode(enc, `decode.prefill.${start}`, plan);
    }
    g.encode(enc, "decode.first", this.#first);
    let state = await this.#submitAndRead(enc, 1);
    const tokens = [...state.ids];
    events.onTokens(state.ids);
    const t1 = performance.now();

    // Decode: `chunk` steps per submission, growing so the first tokens stream quickly.
    let chunk = 4;
    while (!state.done && tokens.length < limit && !events.cancelled()) {
      const steps = Math.min(chunk, limit - tokens.length);
      const e = g.device.createCommandEncoder({ label: "decode.steps" });
      const pass = e.beginComputePass({ label: "decode.steps" });
      for (let i = 0; i < steps; i++) {
        for (const d of this.#step) {
          pass.setPipeline(d.pipeline);
          pass.setBindGroup(0, d.bindGroup);
          pass.dispatchWorkgroups(...d.workgroups);
        }
      }
      pass.end();
      state = await this.#submitAndRead(e, tokens.length + steps, tokens.length);
      tokens.push(...state.ids);
      events.onTokens(state.ids);
      chunk = Math.min(chunk * 2, 64);
    }
    const t2 = performance.now();
    const last = tokens[tokens.length - 1];
    let stop: StopReason;
    if (state.done && m.config.eosIds.includes(last)) stop = "eos";
    else if (tokens.length >= maxTokens) stop = "max-tokens";
    else if (tokens.length >= limit) stop = "context";
    else stop = "cancelled";
    return { tokens, stop, prefillMs: t1 - t0, decodeMs: t2 - t1 };
  }

  /** Copies the run state and out[from..upTo) to staging, submits, waits, returns the new ids. */
  async #submitAndRead(
    enc: GPUCommandEncoder,
    upTo: number,
    from = 0,
  ): Promise<{ ids: number[]; done: boolean }> {
    enc.copyBufferToBuffer(this.#run, 0, this.#staging, 0, 16);
    if (upTo > from) {
      enc.copyBufferToBuffer(this.#out, from * 4, this.#staging, 16 + from * 4, (upTo - from) * 4);
    }
    this.#gpu.device.queue.submit([enc.finish()]);
    await this.#staging.mapAsync(GPUMapMode.READ, 0, 16 + upTo * 4);
    this.#gpu.throwIfFailed();
    const view = new Uint32Array(this.#staging.getMappedRange(0, 16 + upTo * 4));
    const count = view[RUN_COUNT];
    const ids = Array.from(view.subarray(4 + from, 4 + Math.min(count, upTo)));
    const done = view[RUN_DONE] !== 0;
    this.#staging.unmap();
    return { ids, done };
  }

  /** Frees the decoder's buffers. */
  destroy(): void {
    for (const b of [this.#prompt, this.#cur, this.#run, this.#out, this.#staging]) b.destroy();
  }
}
