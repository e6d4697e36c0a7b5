/**
 * The OpenAI-compatible HTTP API over one loaded {@linkcode Engine}: `POST /v1/completions`,
 * `POST /v1/chat/completions` (streamed as server-sent events ending in `data: [DONE]`, or one
 * JSON body), `GET /v1/models` and `GET /health`. It is a plain `(Request) => Response` handler,
 * so `Deno.serve` runs it and tests call it directly.
 *
 * Requests decode one at a time in arrival order ({@linkcode TurnQueue}), or, when the engine
 * batches (`--parallel` N > 1, plain or draft-model speculation), up to N at once; more than `queue` waiting
 * get 503 with `Retry-After`. A client that goes away (closed connection, cancelled
 * stream) cancels its generation, or leaves the queue if it was still waiting.
 *
 * @module
 */
import type { ChatTemplate } from "../models/chat_template.ts";
import { ChatTemplateError } from "../models/chat_template.ts";
import {
  type BatchFigures,
  type GenerateChunk,
  type GenerateOptions,
  type GenerateStats,
  type ModelInfo,
  serverBatches,
} from "../engine/protocol.ts";
import { ApiError, type ParsedRequest, parseRequest } from "./request.ts";
import { StopMatcher } from "./stop.ts";
import { TurnQueue } from "./queue.ts";

/** What the server needs of the engine (the {@linkcode Engine} class has it). */
export interface Backend {
  /** What was loaded (context rows, vocabulary size, draft). */
  readonly info: ModelInfo;
  /** Token ids of `text`, BOS first when `bos`, `specials` mapped to their ids. */
  tokenize(text: string, bos?: boolean, specials?: readonly string[]): Promise<number[]>;
  /** The batched decoder's load (KV blocks in use), when batching; reported by `/health`. */
  batchLoad?(): Promise<BatchFigures | null>;
  /** Streams one generation; aborting `signal` cancels it. */
  generate(
    options: Partial<GenerateOptions>,
    signal?: AbortSignal,
  ): AsyncGenerator<GenerateChunk, GenerateStats>;
}

/** Settings of a {@linkcode SpecdecServer}. */
export interface ServerConfig {
  /** The model name clients send as `model` and `/v1/models` lists. */
  modelId: string;
  /** Renders chat conversations into the prompt. */
  chatTemplate: ChatTemplate;
  /** When set, `/v1/*` needs `Authorization: Bearer <apiKey>`. */
  apiKey?: string;
  /** Most requests waiting while one decodes; more get 503. */
  queue: number;
  /** Proposal source for every request (default: the draft when loaded, else none). */
  spec?: GenerateOptions["spec"];
  /** Draft tokens per cycle (chain speculation). */
  draftTokens?: GenerateOptions["draftTokens"];
  /** Draft tree shape ("6x3", "auto"). */
  draftTree?: string;
  /** Largest request body accepted, bytes (default 4 MiB). */
  maxBodyBytes?: number;
  /** One line per finished request (default: none). */
  log?: (line: string) => void;
}

/** The OpenAI `finish_reason`s this server gives. */
export type FinishReason = "stop" | "length";

/** Figures of one request's generation under the `specdec` field of responses. */
export interface SpecdecFigures {
  /** Proposal source used. */
  spec: GenerateStats["spec"];
  /** Accepted / proposed draft tokens. */
  acceptance_rate: number;
  /** Tokens emitted per target forward pass. */
  tokens_per_pass: number;
  /** Target forward passes after prefill. */
  target_passes: number;
  /** Prompt tokens per second during prefill. */
  prefill_tok_s: number;
  /** Generated tokens per second after the first. */
  decode_tok_s: number;
  /** Milliseconds from the start of decoding this request to its first token. */
  ttft_ms: number;
  /** Milliseconds the request waited for its turn. */
  queue_ms: number;
  /** The draft tree's shape, when tree speculation ran. */
  tree_shape: string | null;
}

const CORS = {
  "Access-Control-Allow-Origin": "*",
  "Access-Control-Allow-Headers": "Authorization, Content-Type",
  "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
};

function json(body: unknown, status = 200, headers: Record<string, string> = {}): Response {
  return new Response(JSON.stringify(body), {
    status,
    headers: { "Content-Type": "application/json", ...CORS, ...headers },
  });
}

function errorResponse(e: unknown): Response {
  if (e instanceof ApiError) return json(e.toJSON(), e.status, e.headers);
  const err = new ApiError(500, `internal error: ${(e as Error)?.message ?? String(e)}`, {
    type: "server_error",
  });
  return json(err.toJSON(), 500);
}

/** Reads at most `limit` bytes of the body and parses it as JSON; 400/413 otherwise. */
async function readJson(req: Request, limit: number): Promise<unknown> {
  const declared = Number(req.headers.get("content-length") ?? "0");
  if (declared > limit) {
    throw new ApiError(413, `the request body is ${declared} bytes; at most ${limit} are accepted`);
  }
  if (!req.body) throw new ApiError(400, "the request has no body: send a JSON object");
  const reader = req.body.getReader();
  const parts: Uint8Array[] = [];
  let size = 0;
  while (true) {
    const { done, value } = await reader.read();
    if (done) break;
    size += value.length;
    if (size > limit) {
      await reader.cancel().catch(() => {});
      throw new ApiError(413, `the request body exceeds ${limit} bytes`);
    }
    parts.push(value);
  }
  const bytes = new Uint8Array(size);
  let at = 0;
  for (const p of parts) {
    bytes.set(p, at);
    at += p.length;
  }
  let text: string;
  try {
    text = new TextDecoder("utf-8", { fatal: true }).decode(bytes);
  } catch {
    throw new ApiError(400, "the request body is not valid UTF-8");
  }
  try {
    return JSON.parse(text);
  } catch (e) {
    throw new ApiError(400, `the request body is not valid JSON: ${(e as Error).message}`);
  }
}

/** A request checked, tokenized and sized against the context. */
interface Prepared {
  req: ParsedRequest;
  prompt: number[];
  maxTokens: number;
}

/** What one generation produced, after stop strings. */
interface Outcome {
  text: string;
  finish: FinishReason;
  completionTokens: number;
  stats: GenerateStats;
  queueMs: number;
}

/**
 * The API server's request handler.
 *
 * @example Serve a model
 * ```ts ignore
 * const engine = await Engine.load({ model: "models/pycode/target" });
 * const chatTemplate = await loadChatTemplate("models/pycode/target");
 * const server = new SpecdecServer(engine, { modelId: "pycode", chatTemplate, queue: 16 });
 * Deno.serve({ port: 8080 }, (req) => server.handle(req));
 * ```
 */
export class SpecdecServer {
  readonly #backend: Backend;
  readonly #config: ServerConfig;
  readonly #queue: TurnQueue;
  readonly #created = Math.floor(Date.now() / 1000);
  readonly #cancelAll = new AbortController();

  /** Serves `backend` with `config`. */
  constructor(backend: Backend, config: ServerConfig) {
    this.#backend = backend;
    this.#config = config;
    const i = backend.info, parallel = i.parallel ?? 1;
    const batched = serverBatches(parallel, i.draft, config.spec, config.draftTree);
    this.#queue = new TurnQueue(config.queue, batched ? parallel : 1);
  }

  /** Requests decoding at once at most (1, or `--parallel` when batching). */
  get slots(): number {
    return this.#queue.slots;
  }

  /** Requests decoding now and waiting for their turn. */
  get load(): { active: number; waiting: number } {
    return { active: this.#queue.active, waiting: this.#queue.waiting };
  }

  /** Refuses new generations (503) and resolves once the admitted ones have finished. */
  async drain(): Promise<void> {
    this.#queue.close();
    await this.#queue.idle();
  }

  /** Cancels every admitted generation (running or waiting) and refuses new ones. */
  cancel(): void {
    this.#queue.close();
    this.#cancelAll.abort(
      new ApiError(503, "the server is shutting down", { type: "server_error" }),
    );
  }

  /** Answers one HTTP request; never throws (errors become OpenAI error objects). */
  async handle(req: Request): Promise<Response> {
    try {
      const path = new URL(req.url).pathname.replace(/\/+$/, "") || "/";
      if (req.method === "OPTIONS") return new Response(null, { status: 204, headers: CORS });
      if (path === "/health") {
        this.#method(req, "GET");
        const batch = this.#queue.slots > 1 ? await this.#backend.batchLoad?.() : undefined;
        return json({
          status: "ok",
          ...this.load,
          ...(batch ? { kv_blocks: { in_use: batch.blocksInUse, total: batch.blocks } } : {}),
        });
      }
      const routes: Record<string, string> = {
        "/v1/models": "GET",
        "/v1/completions": "POST",
        "/v1/chat/completions": "POST",
      };
      if (!routes[path]) {
        throw new ApiError(404, `no such endpoint: ${req.method} ${path}`, {
          code: "not_found",
        });
      }
      this.#authorize(req);
      this.#method(req, routes[path]);
      if (path === "/v1/models") return json(this.#models());
      const kind = path === "/v1/completions" ? "completion" : "chat";
      const body = await readJson(req, this.#config.maxBodyBytes ?? 4 << 20);
      const prepared = await this.#prepare(parseRequest(body, kind));
      return await this.#respond(prepared, AbortSignal.any([req.signal, this.#cancelAll.signal]));
    } catch (e) {
      return errorResponse(e);
    }
  }

  #method(req: Request, want: string): void {
    if (req.method !== want) {
      throw new ApiError(405, `${new URL(req.url).pathname} takes ${want}, not ${req.method}`, {
        code: "method_not_allowed",
      }, { Allow: want });
    }
  }

  #authorize(req: Request): void {
    const key = this.#config.apiKey;
    if (key === undefined) return;
    const auth = req.headers.get("authorization") ?? "";
    if (auth !== `Bearer ${key}`) {
      throw new ApiError(
        401,
        auth === ""
          ? "no API key: send the header 'Authorization: Bearer <key>' (the server's --api-key)"
          : "the API key is not the server's --api-key",
        { type: "authentication_error", code: "invalid_api_key" },
      );
    }
  }

  #models(): unknown {
    const info = this.#backend.info;
    return {
      object: "list",
      data: [{
        id: this.#config.modelId,
        object: "model",
        created: this.#created,
        owned_by: "specdec",
        meta: {
          context_length: info.kvRows,
          vocab_size: info.vocabSize,
          draft: info.draft,
          kv: info.kv,
          formats: info.formats,
        },
      }],
    };
  }

  async #prepare(r: ParsedRequest): Promise<Prepared> {
    if (r.model !== undefined && r.model !== this.#config.modelId) {
      throw new ApiError(
        404,
        `the model '${r.model}' does not exist here; this server serves '${this.#config.modelId}'`,
        { param: "model", code: "model_not_found" },
      );
    }
    const info = this.#backend.info;
    let prompt: number[];
    if (r.kind === "completion") {
      if (typeof r.prompt === "string") prompt = await this.#backend.tokenize(r.prompt, true);
      else {
        prompt = r.prompt!;
        const i = prompt.findIndex((t) => t >= info.vocabSize);
        if (i >= 0) {
          throw new ApiError(
            400,
            `'prompt' token ${i} is id ${prompt[i]}, outside the vocabulary (${info.vocabSize})`,
            { param: "prompt" },
          );
        }
      }
    } else {
      const t = this.#config.chatTemplate;
      let text: string;
      try {
        text = t.render(r.messages!);
      } catch (e) {
        if (e instanceof ChatTemplateError) {
          throw new ApiError(400, `the chat template refused the messages: ${e.message}`, {
            param: "messages",
          });
        }
        throw e;
      }
      prompt = await this.#backend.tokenize(text, true, t.specialTokens);
    }
    const ctx = info.kvRows;
    const field = r.kind === "chat" ? "messages" : "prompt";
    if (prompt.length >= ctx) {
      throw new ApiError(
        400,
        `the prompt is ${prompt.length} tokens; this server's context is ${ctx} tokens (--ctx), ` +
          `which leaves no room to generate`,
        { param: field, code: "context_length_exceeded" },
      );
    }
    const room = ctx - prompt.length;
    if (r.maxTokens !== undefined && r.maxTokens > room) {
      throw new ApiError(
        400,
        `the prompt (${prompt.length} tokens) plus max_tokens (${r.maxTokens}) exceeds this ` +
          `server's context of ${ctx} tokens; ask for at most ${room}`,
        { param: "max_tokens", code: "context_length_exceeded" },
      );
    }
    return { req: r, prompt, maxTokens: r.maxTokens ?? room };
  }

  /**
   * Waits for a turn, then generates, sending released text to `emit`. Resolves when the worker
   * has finished (so the next turn never overlaps); a stop string or `signal` cancels early.
   */
  async #generate(
    p: Prepared,
    signal: AbortSignal,
    emit: (text: string) => void,
    release: () => void,
    queueMs: number,
  ): Promise<Outcome> {
    const abort = new AbortController();
    const onGone = () => abort.abort();
    signal.addEventListener("abort", onGone, { once: true });
    const stopper = new StopMatcher(p.req.stop);
    let text = "", completionTokens = 0;
    try {
      const gen = this.#backend.generate({
        promptTokens: p.prompt,
        maxTokens: p.maxTokens,
        temperature: p.req.temperature,
        topK: p.req.topK,
        topP: p.req.topP,
        seed: p.req.seed,
        spec: this.#config.spec,
        draftTokens: this.#config.draftTokens,
        draftTree: this.#config.draftTree,
      }, abort.signal);
      let r = await gen.next();
      while (!r.done) {
        if (!stopper.stopped) {
          completionTokens += r.value.tokens.length;
          const step = stopper.push(r.value.text);
          if (step.text) {
            text += step.text;
            emit(step.text);
          }
          if (step.stopped) abort.abort();
        }
        r = await gen.next(); // after a stop, drain until the worker confirms it stopped
      }
      const stats = r.value;
      if (!stopper.stopped) {
        const tail = stopper.flush();
        if (tail) {
          text += tail;
          emit(tail);
        }
      }
      const finish: FinishReason = stopper.stopped || stats.stop_reason === "eos"
        ? "stop"
        : "length";
      return { text, finish, completionTokens, stats, queueMs };
    } finally {
      signal.removeEventListener("abort", onGone);
      release();
    }
  }

  #figures(o: Outcome): SpecdecFigures {
    const s = o.stats;
    return {
      spec: s.spec,
      acceptance_rate: s.acceptance_rate,
      tokens_per_pass: s.tokens_per_pass,
      target_passes: s.target_passes,
      prefill_tok_s: s.prefill_tok_s,
      decode_tok_s: s.decode_tok_s,
      ttft_ms: s.ttft_ms,
      queue_ms: o.queueMs,
      tree_shape: s.tree_shape,
    };
  }

  #usage(p: Prepared, o: Outcome) {
    return {
      prompt_tokens: p.prompt.length,
      completion_tokens: o.completionTokens,
      total_tokens: p.prompt.length + o.completionTokens,
    };
  }

  #logLine(p: Prepared, o: Outcome | undefined, status: string, t0: number): void {
    const log = this.#config.log;
    if (!log) return;
    const secs = (performance.now() - t0) / 1000;
    const what = p.req.kind === "chat" ? "chat" : "completion";
    log(
      o
        ? `${what} ${status}: prompt ${p.prompt.length} tok, ${o.completionTokens} tok in ` +
          `${secs.toFixed(2)} s (decode ${o.stats.decode_tok_s.toFixed(1)} tok/s` +
          (o.stats.spec === "none"
            ? ""
            : `, acceptance ${(100 * o.stats.acceptance_rate).toFixed(0)}%, ` +
              `${o.stats.tokens_per_pass.toFixed(2)} tok/pass`) +
          `), finish ${o.finish}, waited ${o.queueMs.toFixed(0)} ms`
        : `${what} ${status}: prompt ${p.prompt.length} tok, after ${secs.toFixed(2)} s`,
    );
  }

  async #respond(p: Prepared, signal: AbortSignal): Promise<Response> {
    const t0 = performance.now();
    const release = await this.#queue.acquire(signal);
    const queueMs = performance.now() - t0;
    const id = `${p.req.kind === "chat" ? "chatcmpl" : "cmpl"}-${crypto.randomUUID()}`;
    const created = Math.floor(Date.now() / 1000);
    const model = this.#config.modelId;
    const chat = p.req.kind === "chat";
    if (!p.req.stream) {
      let o: Outcome;
      try {
        o = await this.#generate(p, signal, () => {}, release, queueMs);
      } catch (e) {
        this.#logLine(p, undefined, "failed", t0);
        throw e;
      }
      this.#logLine(p, o, signal.aborted ? "cancelled" : "ok", t0);
      const choice = chat
        ? { index: 0, message: { role: "assistant", content: o.text }, logprobs: null }
        : { index: 0, text: o.text, logprobs: null };
      return json({
        id,
        object: chat ? "chat.completion" : "text_completion",
        created,
        model,
        choices: [{ ...choice, finish_reason: o.finish }],
        usage: this.#usage(p, o),
        specdec: this.#figures(o),
      });
    }
    const enc = new TextEncoder();
    const gone = new AbortController();
    const onAbort = () => gone.abort();
    signal.addEventListener("abort", onAbort, { once: true });
    const object = chat ? "chat.completion.chunk" : "text_completion";
    const chunk = (choices: unknown[], extra: Record<string, unknown> = {}) =>
      enc.encode(`data: ${JSON.stringify({ id, object, created, model, choices, ...extra })}\n\n`);
    const delta = (text: string) =>
      chat
        ? { index: 0, delta: { content: text }, logprobs: null, finish_reason: null }
        : { index: 0, text, logprobs: null, finish_reason: null };
    const stream = new ReadableStream<Uint8Array>({
      start: (controller) => {
        const send = (bytes: Uint8Array) => {
          if (!gone.signal.aborted) {
            try {
              controller.enqueue(bytes);
            } catch {
              gone.abort(); // the stream was closed under us: the client is gone
            }
          }
        };
        if (chat) {
          send(chunk([{
            index: 0,
            delta: { role: "assistant", content: "" },
            logprobs: null,
            finish_reason: null,
          }]));
        }
        this.#generate(p, gone.signal, (t) => send(chunk([delta(t)])), release, queueMs)
          .then((o) => {
            this.#logLine(p, o, gone.signal.aborted ? "cancelled (client gone)" : "ok", t0);
            const last = chat
              ? { index: 0, delta: {}, logprobs: null, finish_reason: o.finish }
              : { index: 0, text: "", logprobs: null, finish_reason: o.finish };
            send(chunk([last], { specdec: this.#figures(o) }));
            if (p.req.includeUsage) send(chunk([], { usage: this.#usage(p, o) }));
            send(enc.encode("data: [DONE]\n\n"));
          })
          .catch((e) => {
            this.#logLine(p, undefined, "failed", t0);
            const err = e instanceof ApiError
              ? e
              : new ApiError(500, `generation failed: ${(e as Error)?.message ?? e}`, {
                type: "server_error",
              });
            send(enc.encode(`data: ${JSON.stringify(err.toJSON())}\n\n`));
          })
          .finally(() => {
            signal.removeEventListener("abort", onAbort);
            try {
              controller.close();
            } catch { /* cancelled by the client: already closed */ }
          });
      },
      cancel: () => gone.abort(),
    });
    return new Response(stream, {
      headers: {
        "Content-Type": "text/event-stream",
        "Cache-Control": "no-cache",
        ...CORS,
      },
    });
  }
}
