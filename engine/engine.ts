/**
 * The main-thread API: `Engine` spawns the GPU worker and talks to it by messages (load, run,
 * stream results, cancel, dispose). Errors inside the worker reject the caller's promise with the
 * worker's message and stack.
 *
 * @module
 */
import {
  type BatchFigures,
  batchMode,
  type GenerateChunk,
  type GenerateOptions,
  type GenerateStats,
  type LoadOptions,
  type ModelInfo,
  type Request,
  type Response,
} from "./protocol.ts";

/** An error raised inside the GPU worker, re-thrown on the caller's side. */
export class WorkerError extends Error {
  /** Wraps the worker's error `name`, `message` and `stack`. */
  constructor(name: string, message: string, stack: string) {
    super(message);
    this.name = name;
    this.stack = `${name}: ${message}\n(in the GPU worker)\n${stack}`;
  }
}

type Pending = {
  onMessage: (msg: Response) => void;
};

/** Default generation options (llama.cpp's sampling defaults). */
export const DEFAULT_GENERATE: GenerateOptions = {
  maxTokens: 256,
  temperature: 0.8,
  topK: 40,
  topP: 0.95,
  seed: 0,
};

/**
 * A loaded model in a GPU worker.
 *
 * @example Greedy generation
 * ```ts ignore
 * const engine = await Engine.load({ model: "models/pycode/target" });
 * for await (const chunk of engine.generate({ prompt: "def main(", temperature: 0 })) {
 *   console.log(chunk.text);
 * }
 * engine.dispose();
 * ```
 */
export class Engine {
  /** What the worker loaded. */
  readonly info: ModelInfo;
  /** Statistics of the last finished generation. */
  lastStats: GenerateStats | undefined;
  #worker: Worker;
  #nextId = 1;
  #pending = new Map<number, Pending>();
  /** Settles when the last generation queued so far has finished: they run one at a time. */
  #turn: Promise<void> = Promise.resolve();

  private constructor(worker: Worker, info: ModelInfo) {
    this.#worker = worker;
    this.info = info;
  }

  /** Spawns the GPU worker and loads `options.model` into it. */
  static async load(
    options: LoadOptions,
    onProgress?: (message: string) => void,
  ): Promise<Engine> {
    const worker = new Worker(new URL("./worker.ts", import.meta.url), { type: "module" });
    const pending = new Map<number, Pending>();
    worker.onmessage = (ev: MessageEvent<Response>) => pending.get(ev.data.id)?.onMessage(ev.data);
    worker.onerror = (ev) => {
      ev.preventDefault();
      const err: Response = {
        id: -1,
        type: "error",
        name: "Error",
        message: `GPU worker crashed: ${ev.message}`,
        stack: "",
      };
      for (const p of pending.values()) p.onMessage(err);
    };
    const info = await new Promise<ModelInfo>((resolve, reject) => {
      pending.set(0, {
        onMessage: (msg) => {
          if (msg.type === "progress") onProgress?.(msg.message);
          else if (msg.type === "loaded") resolve(msg.info);
          else if (msg.type === "error") reject(new WorkerError(msg.name, msg.message, msg.stack));
        },
      });
      worker.postMessage({ id: 0, type: "load", options } satisfies Request);
    }).catch((e) => {
      worker.terminate();
      throw e;
    });
    pending.delete(0);
    const engine = new Engine(worker, info);
    engine.#pending = pending;
    return engine;
  }

  #request<T>(req: Request, onOther?: (msg: Response) => void): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      this.#pending.set(req.id, {
        onMessage: (msg) => {
          if (msg.type === "error") {
            this.#pending.delete(req.id);
            reject(new WorkerError(msg.name, msg.message, msg.stack));
          } else if (msg.type === "result") {
            this.#pending.delete(req.id);
            resolve(msg.value as T);
          } else if (msg.type === "done") {
            this.#pending.delete(req.id);
            resolve(msg.stats as T);
          } else onOther?.(msg);
        },
      });
      this.#worker.postMessage(req);
    });
  }

  /**
   * Token ids of `text` (with BOS first when `bos`, unless the text starts with the BOS piece).
   * Strings in `specials` that are vocabulary pieces (a chat template's special tokens) map to
   * their ids instead of being tokenized as text.
   */
  tokenize(text: string, bos = false, specials: readonly string[] = []): Promise<number[]> {
    return this.#request({
      id: this.#nextId++,
      type: "tokenize",
      text,
      bos,
      specials: [...specials],
    });
  }

  /**
   * Generates text; yields chunks as the worker streams them and records the final statistics in
   * {@linkcode Engine.lastStats}. Aborting `signal` stops generation cleanly (stop reason
   * "cancelled"). Generations started while one runs wait for it: the GPU decodes one sequence
   * at a time, except with `parallel` > 1 (`LoadOptions`), where plain generations and greedy
   * ones speculating with the draft run together, batched (engine/batch.ts, `batchMode`).
   */
  async *generate(
    options: Partial<GenerateOptions>,
    signal?: AbortSignal,
  ): AsyncGenerator<GenerateChunk, GenerateStats> {
    const i = this.info;
    if (batchMode(i.parallel, i.draft, { ...DEFAULT_GENERATE, ...options }) !== "serial") {
      return yield* this.#generate(options, signal);
    }
    const before = this.#turn;
    let release!: () => void;
    this.#turn = new Promise((r) => release = r);
    try {
      await before;
      return yield* this.#generate(options, signal);
    } finally {
      release();
    }
  }

  async *#generate(
    options: Partial<GenerateOptions>,
    signal?: AbortSignal,
  ): AsyncGenerator<GenerateChunk, GenerateStats> {
    const id = this.#nextId++;
    const queue: GenerateChunk[] = [];
    let wake: (() => void) | undefined;
    let finished = false;
    const done = this.#request<GenerateStats>(
      { id, type: "generate", options: { ...DEFAULT_GENERATE, ...options } },
      (msg) => {
        if (msg.type === "chunk") {
          queue.push(msg.chunk);
          wake?.();
        }
      },
    ).finally(() => {
      finished = true;
      wake?.();
    });
    const onAbort = () => this.#worker.postMessage({ id: -1, type: "cancel", target: id });
    signal?.addEventListener("abort", onAbort, { once: true });
    try {
      while (true) {
        while (queue.length) yield queue.shift()!;
        if (finished) break;
        await new Promise<void>((r) => wake = r);
        wake = undefined;
      }
      while (queue.length) yield queue.shift()!;
      this.lastStats = await done;
      return this.lastStats;
    } finally {
      signal?.removeEventListener("abort", onAbort);
      if (!finished) onAbort(); // the consumer stopped early: stop the worker too
    }
  }

  /** The batched decoder's load (active, waiting, blocks in use), or null without batching. */
  batchLoad(): Promise<BatchFigures | null> {
    return this.#request({ id: this.#nextId++, type: "batchLoad" });
  }

  /** Releases the GPU and stops the worker. */
  async dispose(): Promise<void> {
    await this.#request({ id: this.#nextId++, type: "dispose" }).catch(() => {});
    // The worker closes itself after replying; give its thread time to unwind its (already
    // destroyed) GPU objects before the caller may exit the process (Vulkan/EGL teardown has
    // crashed at exit under a live thread, more often on a loaded machine), then make sure.
    await new Promise((r) => setTimeout(r, 250));
    this.#worker.terminate();
  }
}
