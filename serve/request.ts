/**
 * The OpenAI request bodies `serve` accepts, validated once into plain settings; every problem is
 * an {@linkcode ApiError} naming the field, in OpenAI's error shape.
 *
 * @module
 */
import type { ChatMessage } from "../models/chat_template.ts";

/** An error answered as `{error: {message, type, param, code}}` with an HTTP status. */
export class ApiError extends Error {
  /** HTTP status. */
  readonly status: number;
  /** OpenAI error type ("invalid_request_error", "server_error", ...). */
  readonly type: string;
  /** The offending field, or null. */
  readonly param: string | null;
  /** A machine-readable code ("context_length_exceeded", "model_not_found", ...), or null. */
  readonly code: string | null;
  /** Extra response headers (e.g. `Retry-After`). */
  readonly headers: Record<string, string>;
  /** `message` says what was wrong and what to do. */
  constructor(
    status: number,
    message: string,
    opts: { type?: string; param?: string | null; code?: string | null } = {},
    headers: Record<string, string> = {},
  ) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.type = opts.type ?? "invalid_request_error";
    this.param = opts.param ?? null;
    this.code = opts.code ?? null;
    this.headers = headers;
  }

  /** The JSON body OpenAI clients read. */
  toJSON(): {
    error: { message: string; type: string; param: string | null; code: string | null };
  } {
    return {
      error: { message: this.message, type: this.type, param: this.param, code: this.code },
    };
  }
}

/** A 400 about `param`. */
function bad(param: string, message: string, code: string | null = null): ApiError {
  return new ApiError(400, message, { param, code });
}

/** Settings of one completion or chat request, validated. */
export interface ParsedRequest {
  /** Which endpoint. */
  kind: "completion" | "chat";
  /** `model`, if given. */
  model?: string;
  /** Completions: the prompt text or token ids. */
  prompt?: string | number[];
  /** Chat: the conversation. */
  messages?: ChatMessage[];
  /** `max_tokens` (or chat's `max_completion_tokens`), if given. */
  maxTokens?: number;
  /** Softmax temperature, 0 = greedy. */
  temperature: number;
  /** Nucleus threshold, 1 = off. */
  topP: number;
  /** Top-k, 0 = off. */
  topK: number;
  /** Sampling seed. */
  seed: number;
  /** Stop strings (at most {@linkcode MAX_STOPS}). */
  stop: string[];
  /** Server-sent events instead of one JSON body. */
  stream: boolean;
  /** `stream_options.include_usage`: a last chunk with `usage` and empty `choices`. */
  includeUsage: boolean;
}

/**
 * Defaults of the sampling fields (OpenAI's: temperature 1, top_p 1; top_k off; a random seed
 * per request).
 */
export const REQUEST_DEFAULTS = { temperature: 1, topP: 1, topK: 0 } as const;

/** Most stop strings per request (OpenAI's limit). */
export const MAX_STOPS = 4;

/** Roles a chat message may have. */
export const CHAT_ROLES = ["system", "developer", "user", "assistant", "tool"] as const;

function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

function given(body: Record<string, unknown>, key: string): boolean {
  return body[key] !== undefined && body[key] !== null;
}

function numberField(
  body: Record<string, unknown>,
  key: string,
  min: number,
  max: number,
  int: boolean,
  openMin = false,
): number | undefined {
  if (!given(body, key)) return undefined;
  const v = body[key];
  if (typeof v !== "number" || !Number.isFinite(v)) {
    throw bad(key, `'${key}' must be ${int ? "an integer" : "a number"}, got ${describe(v)}`);
  }
  if (int && !Number.isInteger(v)) throw bad(key, `'${key}' must be an integer, got ${v}`);
  if (v < min || v > max || (openMin && v === min)) {
    throw bad(key, `'${key}' must be in ${openMin ? "(" : "["}${min}, ${max}], got ${v}`);
  }
  return v;
}

function describe(v: unknown): string {
  if (v === null) return "null";
  if (Array.isArray(v)) return "an array";
  if (typeof v === "string") return `the string ${JSON.stringify(v.slice(0, 40))}`;
  return `${typeof v === "object" ? "an object" : `${typeof v} ${String(v)}`}`;
}

function parseStop(body: Record<string, unknown>): string[] {
  if (!given(body, "stop")) return [];
  const v = body.stop;
  const list = typeof v === "string" ? [v] : v;
  if (!Array.isArray(list) || list.some((s) => typeof s !== "string")) {
    throw bad("stop", `'stop' must be a string or an array of strings, got ${describe(v)}`);
  }
  if (list.length > MAX_STOPS) {
    throw bad("stop", `'stop' has ${list.length} strings; at most ${MAX_STOPS} are allowed`);
  }
  if (list.some((s) => s === "")) throw bad("stop", "'stop' strings must not be empty");
  return list as string[];
}

function parsePrompt(body: Record<string, unknown>): string | number[] {
  if (!given(body, "prompt")) throw bad("prompt", "'prompt' is required");
  const p = body.prompt;
  if (typeof p === "string") return p;
  if (Array.isArray(p)) {
    if (p.length === 1 && typeof p[0] === "string") return p[0];
    if (p.length === 0) throw bad("prompt", "'prompt' is an empty array");
    const badAt = p.findIndex((t) => typeof t !== "number" || !Number.isInteger(t) || t < 0);
    if (badAt < 0) return p as number[];
    if (p.every((t) => typeof t === "string")) {
      throw bad("prompt", "'prompt' with several strings needs n > 1, which is not supported");
    }
    throw bad(
      "prompt",
      `'prompt' must be a string or an array of token ids; item ${badAt} is ${describe(p[badAt])}`,
    );
  }
  throw bad("prompt", `'prompt' must be a string or an array of token ids, got ${describe(p)}`);
}

function parseMessages(body: Record<string, unknown>): ChatMessage[] {
  if (!given(body, "messages")) throw bad("messages", "'messages' is required");
  const list = body.messages;
  if (!Array.isArray(list) || list.length === 0) {
    throw bad("messages", `'messages' must be a non-empty array, got ${describe(list)}`);
  }
  return list.map((m, i) => {
    const where = `messages[${i}]`;
    if (!isRecord(m)) throw bad(where, `'${where}' must be an object, got ${describe(m)}`);
    if (typeof m.role !== "string" || !(CHAT_ROLES as readonly string[]).includes(m.role)) {
      throw bad(
        `${where}.role`,
        `'${where}.role' must be one of ${CHAT_ROLES.join(", ")}, got ${describe(m.role)}`,
      );
    }
    let content: string;
    if (typeof m.content === "string") content = m.content;
    else if (Array.isArray(m.content)) {
      content = m.content.map((part, j) => {
        if (!isRecord(part) || part.type !== "text" || typeof part.text !== "string") {
          throw bad(
            `${where}.content[${j}]`,
            `'${where}.content[${j}]' must be {"type": "text", "text": "..."} (only text is ` +
              `supported)`,
          );
        }
        return part.text;
      }).join("");
    } else {
      throw bad(
        `${where}.content`,
        `'${where}.content' must be a string or an array of text parts, got ${describe(m.content)}`,
      );
    }
    return { role: m.role, content };
  });
}

/**
 * Validates a parsed JSON body of `POST /v1/completions` ("completion") or
 * `POST /v1/chat/completions` ("chat"). Unknown fields are ignored; `n` must be 1.
 *
 * @example
 * ```ts
 * import { parseRequest } from "./request.ts";
 * const r = parseRequest({ prompt: "Once", max_tokens: 8, temperature: 0 }, "completion");
 * console.log(r.maxTokens, r.temperature, r.stream); // 8 0 false
 * ```
 */
export function parseRequest(body: unknown, kind: "completion" | "chat"): ParsedRequest {
  if (!isRecord(body)) {
    throw new ApiError(400, `the request body must be a JSON object, got ${describe(body)}`);
  }
  let model: string | undefined;
  if (given(body, "model")) {
    if (typeof body.model !== "string") {
      throw bad("model", `'model' must be a string, got ${describe(body.model)}`);
    }
    model = body.model;
  }
  const n = numberField(body, "n", 1, 1 << 20, true);
  if (n !== undefined && n !== 1) {
    throw bad("n", `'n' must be 1 (got ${n}): one choice per request`);
  }
  let stream = false;
  if (given(body, "stream")) {
    if (typeof body.stream !== "boolean") {
      throw bad("stream", `'stream' must be a boolean, got ${describe(body.stream)}`);
    }
    stream = body.stream;
  }
  let includeUsage = false;
  if (given(body, "stream_options")) {
    const so = body.stream_options;
    if (!isRecord(so)) {
      throw bad("stream_options", `'stream_options' must be an object, got ${describe(so)}`);
    }
    if (so.include_usage !== undefined && typeof so.include_usage !== "boolean") {
      throw bad("stream_options.include_usage", "'stream_options.include_usage' must be a boolean");
    }
    includeUsage = so.include_usage === true;
  }
  const maxKey = kind === "chat" && given(body, "max_completion_tokens")
    ? "max_completion_tokens"
    : "max_tokens";
  const maxTokens = numberField(body, maxKey, 1, 1 << 24, true);
  const r: ParsedRequest = {
    kind,
    model,
    maxTokens,
    temperature: numberField(body, "temperature", 0, 2, false) ?? REQUEST_DEFAULTS.temperature,
    topP: numberField(body, "top_p", 0, 1, false, true) ?? REQUEST_DEFAULTS.topP,
    topK: numberField(body, "top_k", 0, 1 << 20, true) ?? REQUEST_DEFAULTS.topK,
    seed: numberField(body, "seed", 0, 2 ** 32 - 1, true) ??
      crypto.getRandomValues(new Uint32Array(1))[0],
    stop: parseStop(body),
    stream,
    includeUsage,
  };
  if (kind === "completion") r.prompt = parsePrompt(body);
  else r.messages = parseMessages(body);
  return r;
}
